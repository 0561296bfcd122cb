"""`make load-ray`: the single server vs csmserve on Ray Serve with two replicas, side by side in one run.

Both run the fake engine with a per-frame delay (``--fake-frame-delay-ms``: each 80 ms frame takes
that long, for all the streams of a step together), so the figures are the serving path's: the
proxy, the replicas, the sockets. Measured at the client, for each target in turn:

* per-message latency: one request frame that the server answers at once (an empty text, an
  ``invalid_request`` error frame), ``--pings`` times, one after another on one connection. Through
  Ray each frame passes the proxy once each way, so half the difference of the two round trips is
  what the proxy adds to each audio chunk;
* load: ``--clients`` WebSockets, ``--requests`` requests each (bench/load.py's clients): time to first
  audio, inter-chunk gap, and throughput (seconds of audio per second of wall time, requests per second).

The single server is ``csmserve serve`` in a child process; the Ray deployment is a local Ray cluster
started here (loopback, no dashboard, no usage stats) with deploy/ray/local.yaml's application and two
replicas, stopped at the end. Both get the same settings (:func:`settings`). Everything shares this
machine's cores.

    python bench/ray_load.py                          # 32 clients x 2 requests, 200 pings
    python bench/ray_load.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import (  # noqa: E402
    DEFAULT_TEXT, ROOT, bounded, commit, drive, free_port, machine, percentile, summary, wait_healthy,
)
from sections import replace_section  # noqa: E402

START, END = "<!-- ray-load:start -->", "<!-- ray-load:end -->"


async def pings(url: str, count: int) -> list[float]:
    """Round trips (ms) of a frame answered without the model: an empty text, an error frame back."""
    times = []
    async with connect(url, compression=None, max_size=None) as ws:
        for _ in range(count):
            sent = time.perf_counter()
            await ws.send(json.dumps({"text": "", "speaker_id": 0}))
            reply = json.loads(await ws.recv())
            times.append(1000 * (time.perf_counter() - sent))
            assert reply.get("error", {}).get("code") == "invalid_request", reply
    return times


async def measure(url: str, args) -> dict:
    rtt = await pings(url, args.pings)
    stats = summary(await drive(url, {}, args))
    return {**stats, "rtt_ms": rtt, "requests_per_s": stats["ok"] / stats["wall_s"] if stats["wall_s"] else 0.0}


def settings(args, folder: str) -> dict:
    """What the single server and each replica run with: the paced fake engine, admission for the load."""
    return {
        "engine": "fake", "fake_frame_delay_ms": args.fake_frame_delay_ms, "log_level": "warning",
        "max_streams": max(16, args.clients), "max_queue": max(32, args.clients),
        "voices_dir": f"{folder}/voices", "audio_dir": f"{folder}/audio",
    }


@contextlib.contextmanager
def single_server(args):
    """``csmserve serve`` in a child process on a free loopback port with :func:`settings` (as CSM_*)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="csm-load-") as folder:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
        env.update({f"CSM_{name.upper()}": str(value) for name, value in settings(args, folder).items()})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
        log_path = Path(folder) / "server.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "csmserve", "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", process, log_path)
            yield f"ws://127.0.0.1:{port}/ws/generate"
        finally:
            process.terminate()
            process.wait(30)


@contextlib.contextmanager
def ray_deployment(args):
    """A local Ray cluster serving deploy/ray/local.yaml's application with two fake-engine replicas."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    from csmserve.ray_app import build

    config = yaml.safe_load((ROOT / "deploy" / "ray" / "local.yaml").read_text())
    (application,) = config["applications"]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="csmray") as temp, tempfile.TemporaryDirectory(prefix="csm-load-") as folder:
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=96 * 1024 * 1024,
                 _node_ip_address="127.0.0.1", _temp_dir=temp, log_to_driver=False)
        try:
            serve.start(http_options={**config["http_options"], "host": "127.0.0.1", "port": port})
            replica_args = {
                **application["args"], "num_replicas": 2, "metrics_port": 0,
                "settings": {**application["args"].get("settings", {}), **settings(args, folder)},
            }
            serve.run(build(replica_args), name="csmserve", route_prefix="/")
            yield f"ws://127.0.0.1:{port}/ws/generate"
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def fmt(value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f}" if value < 100 else f"{value:.0f}")


def report(single: dict, ray: dict, args) -> list[str]:
    rows = [("per-message round trip (ms)", "rtt_ms"), ("time to first audio (ms)", "ttfa_ms"),
            ("inter-chunk gap (ms)", "gaps_ms")]
    lines = [
        f"Machine: {machine()}; clients, server, Ray and its replicas share it.",
        (f"Code{commit()}. Fake engine at {args.fake_frame_delay_ms:g} ms per 80 ms frame in both. "
         f"Single server: `csmserve serve` in a child process. Ray: a local cluster, deploy/ray/local.yaml's "
         f"application with 2 replicas behind Ray's proxy. Load: {args.clients} WebSockets x {args.requests} requests "
         f"({len(args.text)}-character text, `chunk_ms` {args.chunk_ms}, `max_audio_ms` {args.max_audio_ms}); "
         f"{args.pings} round trips on one idle connection first."),
        "",
        "| measure | single p50 | single p99 | Ray 2 replicas p50 | Ray 2 replicas p99 |",
        "|---|---|---|---|---|",
    ]
    for name, key in rows:
        lines.append(f"| {name} | {fmt(percentile(single[key], 50))} | {fmt(percentile(single[key], 99))} | "
                     f"{fmt(percentile(ray[key], 50))} | {fmt(percentile(ray[key], 99))} |")
    added = {q: (percentile(ray["rtt_ms"], q) - percentile(single["rtt_ms"], q)) / 2 for q in (50, 99)}
    for label, stats in (("single server", single), ("Ray, 2 replicas", ray)):
        errors = sum(stats["errors"].values())
        lines.append("")
        lines.append(f"Throughput, {label}: {stats['ok']}/{stats['streams']} requests complete, {errors} errors; "
                     f"{stats['audio_s']:.1f} s of audio in {stats['wall_s']:.2f} s wall "
                     f"({stats['aggregate_rtf']:.1f} s of audio per second, {stats['requests_per_s']:.1f} requests/s).")
    lines += ["", f"Latency the proxy adds per chunk (half the round-trip difference): p50 {added[50]:.1f} ms, "
                  f"p99 {added[99]:.1f} ms."]
    return lines


def write_section(path: Path, lines: list[str]) -> None:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    block = "\n".join([START, f"## Ray Serve vs the single server (`make load-ray`), {date}", "", *lines, END])
    replace_section(path, START, END, block)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=bounded(1, 200), default=32)
    parser.add_argument("--requests", type=bounded(1, 20), default=2)
    parser.add_argument("--pings", type=bounded(1, 5000), default=200)
    parser.add_argument("--fake-frame-delay-ms", type=float, default=10.0)
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--chunk-ms", type=bounded(20, 1000), default=200)
    parser.add_argument("--max-audio-ms", type=bounded(80, 30_000), default=2000)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for each load run")
    parser.add_argument("--recv-timeout", type=float, default=30.0)
    parser.add_argument("--write", type=Path, help="replace the ray-load section of this markdown file")
    args = parser.parse_args(argv)
    args.hostile, args.hostile_lag_s = 0, 1.0  # bench/load.py's clients read these: no hostile clients here

    with single_server(args) as url:
        print(f"single server: {args.pings} pings, then {args.clients} x {args.requests} ...", flush=True)
        single = asyncio.run(measure(url, args))
    with ray_deployment(args) as url:
        print(f"Ray, 2 replicas: {args.pings} pings, then {args.clients} x {args.requests} ...", flush=True)
        ray = asyncio.run(measure(url, args))
    lines = report(single, ray, args)
    print("\n".join(lines))
    if args.write:
        write_section(args.write, lines)
    return 1 if single["errors"] or ray["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
