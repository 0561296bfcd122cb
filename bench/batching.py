"""`make bench` (batching part): what continuous batching buys, measured side by side in one run.

1. The batched step on the full-size csm-1b architecture (random weights), per dtype: step time and
   aggregate frames per second at batch 1, 2, 4, 8, 16, each as a ratio to batch 1, beside the memory
   floor of one step (the weight bytes a step reads / the bandwidth of a batch-1 ``F.linear``).
2. The server (offline model here; ``--model`` for another) with N = 1, 4, 8, 16 simultaneous WebSocket
   streams: p50 and worst time to first audio as a ratio to a lone request, aggregate speed (audio
   seconds per wall second), p99 gap between chunks, and how many streams stayed real time (every chunk
   arrived before the audio before it had finished playing).
3. A picture of both (``docs/batching.svg``): frames per second and worst time to first audio against
   the number of streams.

    python bench/batching.py                          # print the tables
    python bench/batching.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from run import (  # noqa: E402
    PROMPT,
    full_size_model,
    machine,
    matvec_bandwidth,
    serve,
    sync,
    weight_bytes_per_frame,
    write_section,
)
from streams import streams_at_once  # noqa: E402

from csmserve.engine.runner import BatchRunner, RowSampling  # noqa: E402

SIZES = (1, 2, 4, 8, 16)
STREAMS = (1, 4, 8, 16)


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def step_table(model, dtype: str, device: str, frames: int) -> list[dict]:
    """Median step time (one frame for every row: backbone, 31 depth steps, sampling, feeding it back, the
    codec's decode of the frame) at each batch size, on the runner the server uses (eager on a CPU)."""
    runner = BatchRunner(model, slots=max(SIZES))
    embeds = runner.embed_text(PROMPT)[0]
    for slot in range(max(SIZES)):
        runner.start(slot, RowSampling.create(runner.defaults, seed=slot))
    runner.prefill([(slot, 0, embeds) for slot in range(max(SIZES))])
    floor = 1000 * weight_bytes_per_frame(model) / matvec_bandwidth(runner.dtype, device)
    rows = []
    for size in SIZES:
        times = []
        for step in range(frames + 1):  # the first step warms up this batch size
            sync(device)
            started = time.perf_counter()
            runner.decode([(slot, PROMPT.shape[1] + step, step) for slot in range(size)])
            if step:
                times.append(time.perf_counter() - started)
        ms = 1000 * statistics.median(times)
        rows.append({"dtype": dtype, "batch": size, "step_ms": ms, "fps": 1000 * size / ms, "floor_ms": floor})
        print(f"  {dtype} batch {size}: {ms:.0f} ms/step, {1000 * size / ms:.2f} frames/s", flush=True)
    base = rows[0]["fps"]
    for row in rows:
        row["speedup"] = row["fps"] / base
    return rows


def server_table(model_dir: str | None, frames: int) -> list[dict]:
    from csmserve.config import Settings
    from csmserve.engine.csm import CsmEngine

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            model=model_dir, offline_model_dir=Path(tmp) / "offline", host="127.0.0.1", port=0, device="cpu" if not torch.cuda.is_available() else "auto",
            audio_dir=Path(tmp) / "audio", max_batch=max(STREAMS), max_streams=64, prefix_cache=False,
        )
        engine = CsmEngine(settings)
        server, thread, port = serve(engine, settings)
        while not engine.info.ready:
            time.sleep(0.1)
        asyncio.run(streams_at_once(port, 2, 4))  # warm up: the first batched steps pay one-off kernel set-up
        rows = []
        for n in STREAMS:
            runs = asyncio.run(streams_at_once(port, n, frames))
            ttfa = sorted(r["ttfa"] for r in runs)
            gaps = sorted(g for r in runs for g in r["gaps"])
            wall = max(r["end"] for r in runs)
            rows.append({
                "streams": n, "p50_ttfa_ms": 1000 * statistics.median(ttfa), "worst_ttfa_ms": 1000 * ttfa[-1],
                "x_real_time": sum(r["audio_s"] for r in runs) / wall,
                "p99_gap_ms": 1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else 0.0,
                "real_time": sum(r["real_time"] for r in runs),
                "fps": sum(r["audio_s"] for r in runs) / 0.08 / wall,
            })
            print(f"  {n} streams: worst ttfa {rows[-1]['worst_ttfa_ms']:.0f} ms, {rows[-1]['x_real_time']:.1f}x real time", flush=True)
        server.should_exit = True
        thread.join(30)
    lone = rows[0]["p50_ttfa_ms"]
    for row in rows:
        row["p50_ratio"], row["worst_ratio"] = row["p50_ttfa_ms"] / lone, row["worst_ttfa_ms"] / lone
    return rows


def svg(step_rows: list[dict], server_rows: list[dict]) -> str:
    """Two small line charts side by side: frames/s against rows (full size, per dtype), and the server's
    worst time to first audio against streams."""
    def chart(x0: int, title: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str) -> list[str]:
        w, h, pad = 330, 220, 40
        xs = [x for points in series.values() for x, _ in points]
        ys = [y for points in series.values() for _, y in points]
        xmax, ymax = max(xs), max(ys) * 1.1 or 1
        out = [f'<text x="{x0 + w / 2}" y="16" text-anchor="middle" font-weight="bold">{title}</text>',
               f'<line x1="{x0 + pad}" y1="{h}" x2="{x0 + w}" y2="{h}" stroke="black"/>',
               f'<line x1="{x0 + pad}" y1="{h}" x2="{x0 + pad}" y2="30" stroke="black"/>',
               f'<text x="{x0 + w / 2}" y="{h + 30}" text-anchor="middle">{xlabel}</text>',
               f'<text x="{x0 + 4}" y="26">{ylabel} (max {ymax / 1.1:.3g})</text>']
        colours = ["#1f77b4", "#d62728", "#2ca02c"]
        for index, ((name, points), colour) in enumerate(zip(series.items(), colours)):
            coords = [(x0 + pad + (w - pad) * x / xmax, h - (h - 30) * y / ymax) for x, y in points]
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in coords)}"/>')
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in coords]
            out.append(f'<text x="{x0 + pad + 10}" y="{44 + 16 * index}" fill="{colour}">&#9632; {name}</text>')  # legend
            out += [f'<text x="{a:.1f}" y="{h + 14}" text-anchor="middle" font-size="10">{x:g}</text>' for (x, _), (a, _) in zip(points, coords)]
        return out

    by_dtype: dict[str, list[tuple[float, float]]] = {}
    for row in step_rows:
        by_dtype.setdefault(row["dtype"], []).append((row["batch"], row["fps"]))
    parts = chart(0, "csm-1b step: frames/s", by_dtype, "rows in the batch", "frames/s")
    parts += chart(360, "server: worst first audio", {"worst ms": [(r["streams"], r["worst_ttfa_ms"]) for r in server_rows]},
                   "simultaneous streams", "ms")
    body = "\n".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="720" height="270" font-family="sans-serif" font-size="12">\n'
            f'<rect width="720" height="270" fill="white"/>\n{body}\n</svg>\n')


def render(step_rows: list[dict], server_rows: list[dict], frames: int, plot: str | None) -> str:
    lines = ["<!-- bench:batching:start -->", f"### Batching: {machine()}; torch CPU capability `{cpu_capability()}`", "",
             f"Full-size csm-1b architecture, random weights: one batched step (a frame for every row), median of {frames} steps, "
             "sampled (per-row generators); memory floor = the weight bytes one step reads / batch-1 `F.linear` bandwidth.", "",
             "| dtype | rows | ms/step | frames/s | frames/s vs batch 1 | memory floor ms/step |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['batch']} | {r['step_ms']:.0f} | {r['fps']:.2f} | {r['speedup']:.2f}x | {r['floor_ms']:.0f} |"
              for r in step_rows]
    lines += ["", "The server on the offline model, N WebSocket clients at once, each asking for the same length of audio "
              "(`chunk_ms` 80, prefix reuse off so every prompt is prefilled):", "",
              "| streams | p50 first audio ms | worst first audio ms | p50 / lone | worst / lone | x real time (all streams) "
              "| p99 chunk gap ms | streams in real time |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['streams']} | {r['p50_ttfa_ms']:.0f} | {r['worst_ttfa_ms']:.0f} | {r['p50_ratio']:.2f} | {r['worst_ratio']:.2f} "
              f"| {r['x_real_time']:.1f} | {r['p99_gap_ms']:.0f} | {r['real_time']} of {r['streams']} |" for r in server_rows]
    if plot:
        lines += ["", f"![frames per second and worst time to first audio against streams]({plot})"]
    lines.append("<!-- bench:batching:end -->")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--frames", type=int, default=3, help="steps per batch size")
    parser.add_argument("--server-frames", type=int, default=25, help="frames per stream in the server table")
    parser.add_argument("--model", help="the server table's model (default: the offline model)")
    parser.add_argument("--write", type=Path, help="replace the batching section of a markdown file (and write the plot beside it)")
    args = parser.parse_args()
    print(f"machine: {machine()}; capability {cpu_capability()}", flush=True)
    print("server streams:", flush=True)
    server_rows = server_table(args.model, args.server_frames)
    model = full_size_model(args.device)
    step_rows = []
    for dtype in sorted(args.dtypes.split(","), key=lambda d: d != "float32"):
        model.to(getattr(torch, dtype))
        gc.collect()
        step_rows += step_table(model, dtype, args.device, args.frames)
    plot = None
    if args.write:
        plot_path = args.write.parent / "batching.svg"
        plot_path.write_text(svg(step_rows, server_rows))
        plot = plot_path.name
    block = render(step_rows, server_rows, args.frames, plot)
    print("\n" + block)
    if args.write:
        write_section(args.write, "batching", block)

if __name__ == "__main__":
    main()
