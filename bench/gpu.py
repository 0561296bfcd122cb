"""`make bench-gpu`: how many callers one GPU holds, in one command (`make bench` runs it small on a CPU).

The full-size csm-1b architecture with random weights (``CsmConfig()`` defaults: the real model's compute,
no download), in the dtype the server would pick:

1. **The bare step** (``BatchRunner.decode``: the whole frame of every row, Mimi included) at each row
   count: preparation time and device memory per bucket (the CUDA graph capture on a GPU), then the
   median step over ``--steps`` steps (CUDA events on a GPU), with graphs and, for comparison, eager.
2. **Checks** (GPU only): the noise hash gives the same bits on the CPU and the GPU; a seeded row's codes
   alone vs. at slot 5 of a bucket of 64 (bfloat16: agreement is counted, not promised); the captured
   codec step vs. an eager decode.
3. **The server** (``csmserve serve`` in its own process, the same checkpoint saved to disk) with N
   simultaneous WebSocket streams of ``--frames`` frames each at ``chunk_ms`` 80, each size run twice and
   the second reported: first audio p50/p99, audio seconds per wall second, streams in real time (every
   chunk arrived before the audio before it had finished playing), p99 gap between chunks, and the step
   times ``/metrics`` reports (wall, model-thread CPU, device) beside the bare step; in three layouts,
   side by side: the engine beside the API, the engine in its own process, and that engine fed by four
   API workers.

Every figure is printed as it is measured, and with ``$OUT`` set also written to ``$OUT/gpu_bench.json``
(a run cut short still reports). ``--write docs/benchmarks.md`` replaces its section there.

    python bench/gpu.py                      # on a GPU: 1, 16, 64, 128, 256 rows and streams (make bench-gpu)
    python bench/gpu.py                      # on a CPU: 1, 2, 4 rows; 1 and 4 streams on the offline model
    python bench/gpu.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from load import free_port, wait_healthy  # noqa: E402
from run import PROMPT, full_size_model, machine, write_section  # noqa: E402
from streams import streams_at_once  # noqa: E402

from csmserve.engine.runner import BatchRunner, RowSampling  # noqa: E402

RESULTS: dict = {}


def record(key: str, value) -> None:
    """Keep a figure and write everything so far under ``$OUT`` (a run cut short still reports)."""
    RESULTS[key] = value
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_bench.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def say(text: str) -> None:
    print(text, flush=True)


def default_dtype(device: str) -> str:
    from csmserve.engine.loading import resolve_dtype

    return resolve_dtype("auto", device).dtype


# -- 1. the bare step ---------------------------------------------------------------------------------
def bare_steps(model, sizes: list[int], steps: int, mode: str) -> list[dict]:
    """Prepare a runner of ``max(sizes)`` slots in ``mode`` (graphs, eager, compiled), then time ``steps``
    steps at each size with every row decoding."""
    graphs = mode in ("graphs", "compiled")
    runner = BatchRunner(model, slots=max(sizes), graphs=graphs if torch.cuda.is_available() else False,
                         compile=mode == "compiled")
    embeds = runner.embed_text(PROMPT)[0]
    for slot in range(runner.slots):
        runner.start(slot, RowSampling.create(runner.defaults, seed=slot))
    runner.prefill([(slot, 0, embeds) for slot in range(runner.slots)])
    started = time.perf_counter()
    reports = {report.size: report for report in runner.prepare()}
    say(f"  {mode}: {len(reports)} buckets prepared in {time.perf_counter() - started:.1f} s")
    rows = []
    for size in sizes:
        device_ms, wall_ms = [], []
        for step in range(steps):
            begun = time.perf_counter()
            out = runner.decode([(slot, PROMPT.shape[1] + step, step) for slot in range(size)])
            wall_ms.append(1000 * (time.perf_counter() - begun))
            if out.device_ms is not None:
                device_ms.append(out.device_ms)
        report = reports.get(size)
        row = {
            "mode": mode, "rows": size, "step_ms": statistics.median(device_ms or wall_ms),
            "wall_ms": statistics.median(wall_ms), "prepare_s": report.prepare_s if report else None,
            "memory_mb": report.memory_mb if report else None,
        }
        row["frames_per_s"] = 1000 * size / row["step_ms"]
        rows.append(row)
        say(f"  {mode} {size} rows: {row['step_ms']:.1f} ms/step ({row['wall_ms']:.1f} wall), "
            f"{row['frames_per_s']:.0f} frames/s, prepared in {row['prepare_s'] or 0:.1f} s"
            + (f", {row['memory_mb']:.0f} MiB" if row["memory_mb"] is not None else ""))
        record(f"bare.{mode}", rows)
    del runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


# -- 2. checks (GPU) -----------------------------------------------------------------------------------
def checks(model) -> dict:
    from csmserve.engine.mimi_stream import BatchedMimiDecoder
    from csmserve.engine.sampling import row_keys, token_steps, uniform_bits

    found: dict = {}
    seeds = torch.arange(64, dtype=torch.long) * 7919 + 2**40
    frames = torch.arange(64, dtype=torch.long)
    cpu = uniform_bits(row_keys(seeds, frames, 32), token_steps(2048, "cpu"))
    gpu = uniform_bits(row_keys(seeds.cuda(), frames.cuda(), 32), token_steps(2048, "cuda")).cpu()
    found["hash_cpu_equals_cuda"] = bool(torch.equal(cpu, gpu))
    say(f"  noise hash CPU == CUDA: {found['hash_cpu_equals_cuda']}")

    def seeded(slots: int, slot: int, others: bool) -> list[list[int]]:
        runner = BatchRunner(model, slots=slots, graphs=True)
        embeds = runner.embed_text(PROMPT)[0]
        rows = list(range(slots)) if others else [slot]
        for row in rows:
            runner.start(row, RowSampling.create(runner.defaults, seed=1234 if row == slot else row))
        runner.prefill([(row, 0, embeds) for row in rows])
        runner.prepare()
        out = []
        for step in range(40):
            result = runner.decode([(row, PROMPT.shape[1] + step, step) for row in rows])
            out.append(result.codes[slot].tolist())
        return out

    alone, among = seeded(1, 0, False), seeded(64, 5, True)
    same = sum(a == b for a, b in zip(alone, among))
    found["seeded_frames_equal_alone_vs_bucket_64"] = f"{same}/40"
    say(f"  seeded row, alone vs slot 5 of 64: {same}/40 frames equal (bfloat16 GEMMs differ by bucket)")

    codec = model.codec_model
    codes = torch.randint(0, 2048, (4, 32, 10), device="cuda")
    graph_decoder, eager_decoder = BatchedMimiDecoder(codec, 4), BatchedMimiDecoder(codec, 4)
    go = torch.ones(4, dtype=torch.bool, device="cuda")
    with torch.inference_mode():
        static = codes[:, :, 0].clone()
        graph_decoder.step(static, go)  # warm-up, then reset and capture
        graph_decoder.reset([0, 1, 2, 3])
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            audio = graph_decoder.step(static, go)
        worst = 0.0
        graph_decoder.reset([0, 1, 2, 3])
        for frame in range(10):
            static.copy_(codes[:, :, frame])
            graph.replay()
            expect = eager_decoder.decode(codes[:, :, frame : frame + 1], [0, 1, 2, 3])
            worst = max(worst, float((audio.float().cpu() - expect).abs().max()))
    found["codec_graph_vs_eager_max_abs"] = worst
    say(f"  codec step captured vs eager over 10 frames: max |diff| {worst:.2e}")
    record("checks", found)
    return found


# -- 3. the server -------------------------------------------------------------------------------------
def save_checkpoint(model, directory: Path, dtype: str) -> Path:
    """The full-size model on disk, with the offline model's tokenizer and processor files beside it."""
    from csmserve.engine.tiny import make_tiny_model

    model.to(getattr(torch, dtype)).save_pretrained(directory)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_model(Path(tmp) / "tiny")
        for path in tiny.iterdir():
            if path.name not in ("config.json", "generation_config.json") and not path.name.endswith(".safetensors"):
                shutil.copy(path, directory / path.name)
    return directory


@contextlib.contextmanager
def server(model_dir: str, port: int, max_batch: int, tmp: Path, layout: tuple[str, int]):
    """``csmserve serve`` in its own process, ready; ``layout``: (engine_process off/on, API workers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "csmserve", "serve", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "info", "--audio-dir", str(tmp / "audio"), "--voices-dir", str(tmp / "voices"),
        "--max-batch", str(max_batch), "--no-prefix-cache",
        "--engine-process", layout[0], "--api-workers", str(layout[1]),
    ]
    log_path = tmp / "server.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process, log_path, timeout=600)  # load and capture
        ready_s = time.monotonic() - started
        say(f"  server ready in {ready_s:.1f} s (load, capture of every bucket, warm-up)")
        record("server.ready_s", ready_s)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        record("server.log_tail", log_path.read_text()[-3000:])


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


#: How the server runs: the engine beside the API (one process), in its own process, and fed by several
#: API workers; each measured with the same streams, one after the other.
LAYOUTS = (("off", 1), ("on", 1), ("on", 4))


def layout_name(layout: tuple[str, int]) -> str:
    engine, workers = layout
    where = "engine in its own process" if engine == "on" else "engine beside the API"
    return f"{where}, {workers} API worker{'s' if workers > 1 else ''}"


def server_table(model_dir: str, streams: list[int], frames: int, layouts=LAYOUTS) -> list[dict]:
    rows = []
    for layout in layouts:
        say(f" {layout_name(layout)}:")
        rows += server_rows(model_dir, streams, frames, layout)
    return rows


def server_rows(model_dir: str, streams: list[int], frames: int, layout: tuple[str, int]) -> list[dict]:
    port = free_port()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, server(model_dir, port, max(streams), Path(tmp), layout):
        for n in streams:
            for attempt in range(2):  # the first pays any one-off set-up: report the second
                started = time.monotonic()
                runs = asyncio.run(streams_at_once(port, n, frames))
                wall = time.monotonic() - started
                if attempt == 0:
                    first_wall = wall
            ttfa = [1000 * r["ttfa"] for r in runs]
            gaps = [1000 * g for r in runs for g in r["gaps"]]
            row = {
                "layout": layout_name(layout), "streams": n,
                "p50_ttfa_ms": percentile(ttfa, 50), "p99_ttfa_ms": percentile(ttfa, 99),
                "audio_per_wall": sum(r["audio_s"] for r in runs) / max(r["end"] for r in runs),
                "real_time": sum(r["real_time"] for r in runs), "worst_behind_ms": 1000 * max(r["behind"] for r in runs),
                "p99_gap_ms": percentile(gaps, 99), "first_run_wall_s": first_wall, "wall_s": wall,
                "step_ms": metric(port, "csm_engine_step_milliseconds"),
                "step_cpu_ms": metric(port, "csm_engine_step_cpu_milliseconds"),
                "step_device_ms": metric(port, "csm_engine_step_device_milliseconds"),
            }
            rows.append(row)
            say(f"  {n} streams: first audio p50 {row['p50_ttfa_ms']:.0f} ms, p99 {row['p99_ttfa_ms']:.0f} ms; "
                f"{row['audio_per_wall']:.1f}x real time in all; {row['real_time']}/{n} in real time "
                f"(worst {row['worst_behind_ms']:.0f} ms behind); p99 gap {row['p99_gap_ms']:.0f} ms; "
                f"last step {row['step_ms']} ms (cpu {row['step_cpu_ms']}, device {row['step_device_ms']})")
            record("server", rows)
    return rows


# -- report --------------------------------------------------------------------------------------------
def render(device_name: str, dtype: str, bare: list[dict], server_rows: list[dict], found: dict, args) -> str:
    lines = [
        f"Measured by `python bench/gpu.py {' '.join(args.argv)}` on {device_name} ({machine()}); the full-size "
        f"csm-1b architecture with random weights in {dtype}.",
        "",
        "Bare step (every row decoding; the frame, its 31 depth steps, sampling, the backbone and Mimi):",
        "",
        "| mode | rows | step ms | frames/s | prepared in s | memory MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in bare:
        memory = "" if r["memory_mb"] is None else f"{r['memory_mb']:.0f}"
        lines.append(f"| {r['mode']} | {r['rows']} | {r['step_ms']:.1f} | {r['frames_per_s']:.0f} | "
                     f"{(r['prepare_s'] or 0):.1f} | {memory} |")
    if found:
        lines += ["", "Checks: " + "; ".join(f"{k} = {v}" for k, v in found.items()) + "."]
    if server_rows:
        lines += [
            "",
            f"The server, N WebSocket streams started together, {args.frames} frames (80 ms) each, chunk_ms 80 "
            "(second run of each size):",
            "",
            "| layout | streams | first audio p50 ms | p99 ms | audio s per wall s | streams in real time | p99 gap ms "
            "| step ms (cpu, device) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in server_rows:
            step = f"{r['step_ms']:.1f}" if r["step_ms"] is not None else "-"
            cpu = f"{r['step_cpu_ms']:.1f}" if r["step_cpu_ms"] is not None else "-"
            dev = f"{r['step_device_ms']:.1f}" if r["step_device_ms"] is not None else "-"
            lines.append(f"| {r['layout']} | {r['streams']} | {r['p50_ttfa_ms']:.0f} | {r['p99_ttfa_ms']:.0f} | {r['audio_per_wall']:.1f} | "
                         f"{r['real_time']} of {r['streams']} | {r['p99_gap_ms']:.0f} | {step} ({cpu}, {dev}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--sizes", default="1,16,64,128,256" if cuda else "1,2,4", help="row counts of the bare step")
    parser.add_argument("--streams", default="1,16,64,128,256" if cuda else "1,4",
                        help="simultaneous streams for the server ('' skips it)")
    parser.add_argument("--steps", type=int, default=50 if cuda else 5, help="steps timed per size")
    parser.add_argument("--frames", type=int, default=40, help="frames per stream in the server test")
    parser.add_argument("--eager-sizes", default="1,256", help="row counts timed without graphs, for comparison")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd step (minutes)")
    parser.add_argument("--server-model", default="full" if cuda else "offline",
                        help="full (the random full-size model), offline, or a checkpoint directory")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--write", type=Path, help="replace this file's GPU section (docs/benchmarks.md)")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    device = "cuda" if cuda else "cpu"
    dtype = default_dtype(device) if args.dtype == "auto" else args.dtype
    device_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    say(f"{device_name}, {dtype}; {machine()}")
    record("machine", {"device": device_name, "dtype": dtype, "machine": machine()})
    sizes = [int(s) for s in args.sizes.split(",") if s]
    streams = [int(s) for s in args.streams.split(",") if s]

    started = time.monotonic()
    model = full_size_model(device).to(getattr(torch, dtype))
    say(f"full-size model built in {time.monotonic() - started:.1f} s")
    bare = []
    say("bare step:")
    bare += bare_steps(model, sizes, args.steps, "graphs" if cuda else "eager")
    eager_sizes = [int(s) for s in args.eager_sizes.split(",") if s and int(s) <= max(sizes)]
    if cuda and eager_sizes:
        bare += bare_steps(model, eager_sizes, max(5, args.steps // 5), "eager")
    if args.compile:
        bare += bare_steps(model, sizes, args.steps, "compiled")
    found = {}
    if cuda:
        say("checks:")
        found = checks(model)

    server_rows = []
    if streams:
        say("server:")
        with tempfile.TemporaryDirectory() as tmp:
            if args.server_model == "full":
                model_dir = str(save_checkpoint(model, Path(tmp) / "csm-full-random", dtype))
            elif args.server_model == "offline":
                from csmserve.engine.tiny import make_tiny_model

                model_dir = str(make_tiny_model(Path(tmp) / "offline"))
            else:
                model_dir = args.server_model
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            server_rows = server_table(model_dir, streams, args.frames)
    block = render(device_name, dtype, bare, server_rows, found, args)
    print("\n" + block)
    if args.write:
        kind = "gpu" if cuda else "gpu-on-cpu"
        heading = "" if cuda else "## GPU script on a CPU (`python bench/gpu.py`)\n\n"
        write_section(args.write, kind, f"<!-- bench:{kind}:start -->\n{heading}{block}\n<!-- bench:{kind}:end -->")
        say(f"wrote {args.write}")


if __name__ == "__main__":
    main()
