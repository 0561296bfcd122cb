"""`make bench`: the frame loop, the streaming codec and time to first audio, ours vs the reference.

Runs the full-size csm-1b architecture (``CsmConfig()`` defaults) with random weights: the same compute
as the real model. Every figure compares two things measured in the same run, on the same machine,
one after the other; the ratio is the figure (absolute times drift on a shared machine).

    python bench/run.py                      # print the tables
    python bench/run.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from sections import replace_section  # noqa: E402

from csmserve.engine.frames import FrameGenerator  # noqa: E402
from csmserve.engine.loading import (  # noqa: E402
    codec_to_float32_on_cpu,
    forget_cached_codebooks,
    keep_codec_float32,
    this_cpu_bf16_native,
)
from csmserve.engine.mimi_stream import StreamingMimiDecoder  # noqa: E402

UNDECODABLE = [2048, 2049, 2050]
PROMPT = torch.tensor([[128000, 58, 15, 60, 9906, 1917, 11, 420, 374, 264, 1296, 315, 279, 17265, 3622, 13, 128001]])


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def full_size_model(device: str):
    from transformers import CsmConfig, CsmForConditionalGeneration

    from csmserve.engine.tiny import randomize_codebooks

    torch.manual_seed(0)
    model = CsmForConditionalGeneration(CsmConfig()).eval()
    randomize_codebooks(model.codec_model)
    return model.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prompt_for(model) -> torch.Tensor:
    """A fixed prompt valid for the model's text vocabulary (a small one gets byte-level ids)."""
    if model.config.text_vocab_size > int(PROMPT.max()):
        return PROMPT
    return torch.tensor([[256, 58, 48, 60, *b"Hello world, this is a test of the server.", 257]])


def time_generate(model, frames: int, device: str) -> float:
    ids = prompt_for(model).to(device)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=frames, do_sample=False,
            depth_decoder_do_sample=False, suppress_tokens=UNDECODABLE, depth_decoder_suppress_tokens=UNDECODABLE,
        )
    sync(device)
    assert out.shape[1] == frames, "the random model ended early; use more frames"
    return (time.perf_counter() - started) / frames


def time_ours(generator: FrameGenerator, frames: int, device: str, greedy: bool) -> float:
    embeds = generator.embed_text(prompt_for(generator.model))
    sync(device)
    started = time.perf_counter()
    count = sum(1 for _ in generator.frames(embeds, frames, greedy=greedy, seed=0))
    sync(device)
    assert count == frames
    return (time.perf_counter() - started) / frames


def frame_loop(model, dtype: str, frames: int, device: str, repeats: int) -> dict:
    generator = FrameGenerator(model)
    time_generate(model, 2, device)
    time_ours(generator, 2, device, True)
    ref, ours, sampled = [], [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        ref.append(time_generate(model, frames, device))
        ours.append(time_ours(generator, frames, device, True))
        sampled.append(time_ours(generator, frames, device, False))
    r, o, s = (1000 * statistics.median(x) for x in (ref, ours, sampled))
    floor = 1000 * weight_bytes_per_frame(model) / matvec_bandwidth(generator.dtype, device)
    return {"dtype": dtype, "generate_ms": r, "ours_ms": o, "ours_sampled_ms": s, "speedup": r / o, "floor_ms": floor}


def weight_bytes_per_frame(model) -> int:
    """Bytes of weights one frame reads at batch 1: the backbone and its head once, and for each of the
    depth decoder's 31 steps its layers, its input projection and one codebook head (embedding rows
    are gathered, a few kilobytes, and left out)."""
    def size(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    depth = model.depth_decoder
    heads = depth.codebooks_head.weight
    steps = model.config.num_codebooks - 1
    backbone = size(model.backbone_model.layers) + size(model.backbone_model.norm) + size(model.lm_head)
    per_step = size(depth.model.layers) + size(depth.model.norm) + size(depth.model.inputs_embeds_projector)
    return backbone + steps * per_step + heads.numel() * heads.element_size()


def matvec_bandwidth(dtype: torch.dtype, device: str) -> float:
    """Bytes per second one batch-1 ``F.linear`` streams from memory: the roofline of this loop.

    Two 8192 x 8192 weights used in turn, larger than any cache, so every call reads from memory.
    """
    weights = [torch.randn(8192, 8192, device=device).to(dtype) for _ in range(2)]
    x = torch.randn(1, 8192, device=device).to(dtype)
    times = []
    with torch.inference_mode():
        for i in range(24):
            sync(device)
            started = time.perf_counter()
            torch.nn.functional.linear(x, weights[i % 2])
            sync(device)
            if i >= 4:
                times.append(time.perf_counter() - started)
    return weights[0].numel() * weights[0].element_size() / statistics.median(times)


def mimi_decode(model, frames: int, device: str) -> dict:
    decoder = StreamingMimiDecoder(model.codec_model)
    codes = torch.randint(0, 2048, (32, frames), device=device)
    decoder.decode(codes[:, :2])
    decoder.reset()
    per_frame = []
    for i in range(frames):
        sync(device)
        started = time.perf_counter()
        decoder.decode(codes[:, i : i + 1])
        sync(device)
        per_frame.append(time.perf_counter() - started)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.codec_model.decode(codes[None])
    sync(device)
    whole = (time.perf_counter() - started) / frames
    return {"stream_ms": 1000 * statistics.median(per_frame), "p90_ms": 1000 * sorted(per_frame)[int(0.9 * frames)],
            "one_shot_ms": 1000 * whole}


# -- time to first audio over a real WebSocket ---------------------------------------------------------
def serve(engine, settings):
    import uvicorn

    from csmserve.app import create_app

    app = create_app(settings, engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws_per_message_deflate=False))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


async def first_audio(port: int, frames: int, cancel_after_first: bool) -> tuple[float, float]:
    """Client-side time to the first audio chunk, and to done (None when cancelled after the first)."""
    from csmserve.client import CsmClient

    async with CsmClient(f"ws://127.0.0.1:{port}/ws/generate") as client:
        started = time.monotonic()
        await client.send({"text": TTFA_TEXT,
                           "max_audio_ms": 80 * frames, "seed": 0, "chunk_ms": 80})
        first = None
        received = 0
        async for chunk in client.receive():
            if first is None:
                first = time.monotonic() - started
                if cancel_after_first:  # the rest of the utterance does not change its first chunk
                    await client.send({"type": "cancel"})
            received += len(chunk)
        total = time.monotonic() - started
    if not cancel_after_first:
        assert received == 2 * 1920 * frames, "fixed frame count not reached"
    return first, (None if cancel_after_first else total)


def prefill_ms(model, processor, device: str, text: str) -> float:
    """The backbone's pass over the prompt alone (what every first frame waits for)."""
    generator = FrameGenerator(model)
    embeds = generator.embed_text(processor(f"[0]{text}", add_special_tokens=True)["input_ids"])
    times = []
    for _ in range(3):
        sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            generator.runner.prefill([(0, 0, embeds[0])])
        sync(device)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


TTFA_TEXT = "Hello world, this is a test of the streaming server."


def voice_first_frame(model, processor, device: str, repeats: int) -> dict:
    """Time to the first frame with a 2 s voice as context: prefilled whole (cold) vs the voice's positions
    reused from the backbone cache (a second request with the same voice and new text)."""
    import numpy as np

    from csmserve.engine.prompt import PromptBuilder, Turn

    generator = FrameGenerator(model)
    builder = PromptBuilder(processor.tokenizer, generator)
    voice = [Turn(1, "This is the reference recording of my voice.", np.random.default_rng(0).integers(0, 2048, (25, 32)))]

    def first_frame(text: str, keyed: bool) -> float:
        embeds = builder.embeddings(voice, 0, text)
        key = builder.key(voice, 0, text) if keyed else None
        sync(device)
        started = time.perf_counter()
        frames = generator.frames(embeds, 1, greedy=True, prompt_key=key)
        next(frames)
        frames.close()
        sync(device)
        return time.perf_counter() - started

    cold, warm, reused = [], [], 0
    for i in range(repeats):
        for _ in generator.frames(generator.embed_text(prompt_for(model)[:, :2]), 1, greedy=True):
            pass  # a short unkeyed prompt: the cache holds nothing reusable after it
        cold.append(first_frame(f"The first request, number {i}.", keyed=True))
        warm.append(first_frame(f"A second request, number {i}.", keyed=True))
        reused = generator.reused_positions
    positions = len(builder.key(voice, 0, "A second request, number 0."))
    return {"cold_ms": 1000 * statistics.median(cold), "warm_ms": 1000 * statistics.median(warm),
            "positions": positions, "reused": reused}


def ttfa(model, dtype: str, device: str, utterances: dict[str, int], repeats: int, tiny_dir: Path) -> list[dict]:
    from baseline import GenerateThenChunkEngine
    from transformers import AutoProcessor

    from csmserve.config import Settings
    from csmserve.engine.csm import CsmEngine
    from csmserve.engine.loading import LoadedModel

    processor = AutoProcessor.from_pretrained(tiny_dir)  # Llama 3 ids: the real model's prompts
    loaded = LoadedModel(model=model, processor=processor, path=Path("csm-1b-architecture-random"), device=device, dtype=dtype)
    # Every request here sends the same prompt: with prefix reuse the repeats would skip their prefill, and
    # this table is about a prompt the server has not seen (reuse has its own table).
    settings = Settings(host="127.0.0.1", port=0, audio_dir=tiny_dir / "audio", max_audio_ms=90_000, prefix_cache=False)
    rows = [{"engine": "prefill alone", "utterance": "-", "frames": 0, "ttfa_ms": prefill_ms(model, processor, device, TTFA_TEXT)}]
    for name, engine_cls in (("ours (streaming)", CsmEngine), ("generate then chunk", GenerateThenChunkEngine)):
        engine = engine_cls(settings, loaded=loaded)
        server, thread, port = serve(engine, settings)
        while not engine.info.ready:
            time.sleep(0.1)
        streaming = engine_cls is CsmEngine
        for label, frames in utterances.items():
            runs = []
            for _ in range(repeats if streaming else 1):
                runs.append(asyncio.run(first_audio(port, frames, streaming)))
                # A cancelled request still finishes the frame it is in: let the worker go idle, so the
                # next request's time to first audio does not include the end of this one.
                while engine.capacity().active or engine.capacity().waiting:
                    time.sleep(0.05)
            totals = [r[1] for r in runs if r[1] is not None]
            rows.append({"engine": name, "utterance": label, "frames": frames,
                         "ttfa_ms": 1000 * statistics.median(r[0] for r in runs),
                         "total_ms": 1000 * statistics.median(totals) if totals else None})
        server.should_exit = True
        thread.join(30)
    return rows


def render(sections: list[str]) -> str:
    return "\n\n".join(sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--frames", type=int, default=12, help="frames per frame-loop measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ttfa-dtype", default="bfloat16")
    parser.add_argument("--skip-ttfa", action="store_true")
    parser.add_argument("--write", type=Path, help="replace this machine kind's section of a markdown file")
    args = parser.parse_args()

    import tempfile

    from csmserve.engine.tiny import make_tiny_model

    device = args.device
    started = time.monotonic()
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import CsmForConditionalGeneration

        tiny = CsmForConditionalGeneration.from_pretrained(make_tiny_model(Path(tmp) / "t")).eval().to(device)
        tiny_row = frame_loop(tiny, "float32", 60, device, args.repeats)
        del tiny
    print(f"frame loop, offline checkpoint: generate {tiny_row['generate_ms']:.1f} ms/frame, ours "
          f"{tiny_row['ours_ms']:.1f}, {tiny_row['speedup']:.2f}x", flush=True)
    model = full_size_model(device)
    print(f"built the full-size architecture in {time.monotonic() - started:.0f} s", flush=True)
    loop_rows, mimi_rows, ttfa_rows, voice_row = [], [], [], None
    # float32 first, then convert in place: one copy of the weights in memory at a time.
    for dtype in sorted(args.dtypes.split(","), key=lambda d: d != "float32"):
        model.to(getattr(torch, dtype))
        forget_cached_codebooks(model.codec_model)
        gc.collect()
        row = frame_loop(model, dtype, args.frames, device, args.repeats)
        loop_rows.append(row)
        print(f"frame loop {dtype}: generate {row['generate_ms']:.0f} ms/frame, ours {row['ours_ms']:.0f} "
              f"(sampled {row['ours_sampled_ms']:.0f}), {row['speedup']:.2f}x", flush=True)
        mimi = mimi_decode(model, 50, device)
        # A CPU server keeps the codec in float32 unless this dtype is native here (load_csm's rule).
        served = not keep_codec_float32(device, dtype, device == "cpu" and this_cpu_bf16_native())
        mimi_rows.append({"dtype": dtype, "served": served, **mimi})
        print(f"mimi {dtype}: {mimi['stream_ms']:.1f} ms/frame streaming (p90 {mimi['p90_ms']:.1f}), "
              f"one-shot {mimi['one_shot_ms']:.1f} ms/frame", flush=True)
        if not args.skip_ttfa and dtype == args.ttfa_dtype:
            codec_to_float32_on_cpu(model, device)  # as load_csm serves it
            with tempfile.TemporaryDirectory() as tmp:
                tiny_dir = make_tiny_model(Path(tmp) / "tiny")
                rows = ttfa(model, dtype, device, {"2 s": 25, "8 s": 100}, 3, tiny_dir)
                from transformers import AutoProcessor  # Llama 3 ids: the real model's prompts

                voice_row = voice_first_frame(model, AutoProcessor.from_pretrained(tiny_dir), device, 3)
            print(f"voice context {dtype}: first frame cold {voice_row['cold_ms']:.0f} ms, "
                  f"reused {voice_row['warm_ms']:.0f} ms", flush=True)
            ttfa_rows.extend({"dtype": dtype, **r} for r in rows)
            for r in rows:
                print(f"ttfa {dtype} {r['engine']} {r['utterance']}: {r['ttfa_ms']:.0f} ms", flush=True)

    kind = "gpu" if device == "cuda" else "cpu"
    lines = [f"<!-- bench:{kind}:start -->", f"### {kind.upper()}: {machine()}", "",
             f"Full-size csm-1b architecture, random weights, batch 1, greedy unless noted; median of {args.repeats}.", "",
             "| dtype | `model.generate` ms/frame | ours ms/frame (greedy) | ours ms/frame (sampled) | speed-up "
             "| memory floor ms/frame | ours / floor |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['generate_ms']:.0f} | {r['ours_ms']:.0f} | {r['ours_sampled_ms']:.0f} | {r['speedup']:.2f}x "
              f"| {r['floor_ms']:.0f} | {r['ours_ms'] / r['floor_ms']:.2f} |" for r in loop_rows]
    lines += ["", "Memory floor: the bytes of weights one frame must read at batch 1 (the backbone once, the depth "
              "decoder 31 times) divided by the bandwidth of one batch-1 `F.linear` over a weight larger than any "
              "cache, measured in the same run. No batch-1 loop that reads its weights from memory can beat it."]
    lines += ["", "The same loop on the offline checkpoint (tiny widths: per-step overhead dominates, as it does for "
              "the real model on a GPU at batch 1):", "",
              "| model | `model.generate` ms/frame | ours ms/frame (greedy) | ours (sampled) | speed-up |", "|---|---|---|---|---|",
              f"| offline checkpoint, float32 | {tiny_row['generate_ms']:.1f} | {tiny_row['ours_ms']:.1f} | "
              f"{tiny_row['ours_sampled_ms']:.1f} | {tiny_row['speedup']:.2f}x |"]
    lines += ["", "Streaming Mimi decode (full-size codec, one frame per call, 50 frames):", "",
              "| codec dtype | streaming ms/frame (median) | p90 | one-shot decode ms/frame | served |", "|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['stream_ms']:.1f} | {r['p90_ms']:.1f} | {r['one_shot_ms']:.1f} | "
              f"{'yes' if r['served'] else 'no: this CPU keeps the codec in float32'} |" for r in mimi_rows]
    if ttfa_rows:
        lines += ["", f"Time to first audio over a real WebSocket (`chunk_ms` 80, {args.ttfa_dtype}; ours: median of 3, "
                  "cancelled after the first chunk; prefix reuse off, so every request prefills its whole prompt; baseline: one "
                  "run, it must generate everything first):", "",
                  "| engine | utterance | frames | time to first audio ms |", "|---|---|---|---|"]
        lines += [f"| {r['engine']} | {r['utterance']} | {r['frames']} | {r['ttfa_ms']:.0f} |" for r in ttfa_rows]
        ours = {r["utterance"]: r["ttfa_ms"] for r in ttfa_rows if r["engine"].startswith("ours")}
        if "2 s" in ours and "8 s" in ours:
            lines += ["", f"Ours: 8 s utterance / 2 s utterance time to first audio = {ours['8 s'] / ours['2 s']:.2f}."]
        prefill = next(r["ttfa_ms"] for r in ttfa_rows if r["engine"] == "prefill alone")
        frame = next(r["ours_ms"] for r in loop_rows if r["dtype"] == args.ttfa_dtype)
        codec_dtype = "float32" if device == "cpu" else args.ttfa_dtype
        decode = next(r["stream_ms"] for r in mimi_rows if r["dtype"] == codec_dtype)
        bound = prefill + 2 * frame + decode
        lines += [f"Bound prefill + 2 frames + one decode step = {prefill:.0f} + 2 x {frame:.0f} + {decode:.0f} = "
                  f"{bound:.0f} ms; ours (worst of the two) = {max(ours.values()):.0f} ms."]
    if voice_row:
        lines += ["", f"Prefix reuse ({args.ttfa_dtype}, frame loop without the server, median of 3): time to the first "
                  "frame of a request whose context is a 2 s voice (25 frames and its transcript), prefilled whole vs "
                  "the same voice again with new text, its positions taken from the backbone cache:", "",
                  "| prompt | positions | prefilled | first frame ms |", "|---|---|---|---|",
                  f"| cold | {voice_row['positions']} | {voice_row['positions']} | {voice_row['cold_ms']:.0f} |",
                  f"| voice reused | {voice_row['positions']} | {voice_row['positions'] - voice_row['reused']} | "
                  f"{voice_row['warm_ms']:.0f} |",
                  "", f"Reused / cold = {voice_row['warm_ms'] / voice_row['cold_ms']:.2f}."]
    lines.append(f"<!-- bench:{kind}:end -->")
    block = "\n".join(lines)
    print("\n" + block)
    if args.write:
        write_section(args.write, kind, block)


def write_section(path: Path, kind: str, block: str) -> None:
    """Replace the ``<!-- bench:KIND:start -->`` ... ``end`` block of a markdown file (or append it)."""
    replace_section(path, f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->", block)

if __name__ == "__main__":
    main()
