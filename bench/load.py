"""`make load`: N concurrent WebSocket clients against /ws/generate; latency, gaps, errors, speed.

Each client opens one connection; all start together, then each sends ``--requests`` requests one
after another and reads every frame. Measured at the client:

* time to first audio: from sending a request to its first binary frame;
* inter-chunk gap: between consecutive binary frames of one stream;
* errors: error frames (``{"done": true, "error": ...}``), connections closed early, timeouts;
* real-time factor: audio seconds received / wall seconds, per stream (request sent to ``done``)
  and for the whole run (all audio / the run's wall time). Above 1 is faster than real time (the
  ``rtf`` in ``done`` frames is the inverse: generation time / audio duration).

Time to first audio includes waiting for a row of the engine's batch: the engine steps every active
stream together (the fake engine too), so a request waits only when all rows are taken.

Without ``--url`` it starts its own server, ``python -m csmserve serve --engine fake`` on a free loopback
port in a child process (the clients' CPU time stays out of the server's process), with admission
limits raised to the client count, and stops it afterwards. The fake engine is instant and ignores
speed: audio leaves as fast as the server can send it, so the figures measure the server alone.

    python bench/load.py                                   # 50 clients x 3 requests, own server
    python bench/load.py --clients 50 --write docs/benchmarks.md
    python bench/load.py --url ws://127.0.0.1:8000/ws/generate --api-key KEY
    python bench/load.py --hostile 2                       # honest clients alone, then beside hostile ones

``--hostile N`` measures the honest clients twice against the same server: alone, then beside N hostile
clients of each kind (``bench/hostile.py``: on every streaming route a non-reader and a goer; ElevenLabs
context hogs that open, flush and close contexts in a loop; cancel storms that send a request and
disconnect), and reports both side by side. The hostile clients use a key of their own (our own server
gets two keys, and room for each key's share: ``--max-streams`` twice the honest slots, each key half).
``--frame-delay-ms`` and ``--max-batch`` make our own fake engine pace its steps and hold fewer rows,
so that streams occupy rows long enough to compete for them.

Loopback only, bounded: at most 1000 clients x 100 requests, and ``--timeout`` seconds in all.
Exit status 1 when any request failed, or when the p99 inter-chunk gap exceeds ``--max-gap-p99-ms``
(by default 50 ms with our own fake-engine server: the server alone must hold 50 streams that well).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.routes, for bench/hostile.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile  # noqa: E402
from sections import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_CLIENTS, MAX_REQUESTS = 1000, 100
#: Long enough (213 characters) that --max-audio-ms, not the text, bounds the fake engine's audio.
DEFAULT_TEXT = (
    "Hello, and thank you for calling. This is a load test of the streaming server: every client reads "
    "the same few sentences, one after another, while all the others do the same. The figures tell "
    "how well it keeps up."
)
START, END = "<!-- load:start -->", "<!-- load:end -->"
HOSTILE_START, HOSTILE_END = "<!-- load-hostile:start -->", "<!-- load-hostile:end -->"
#: The keys of our own server with --hostile: the measured clients', the hostile clients'.
HONEST_KEY, HOSTILE_KEY = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
#: The target for the server alone (own server, fake engine): no error and a p99 gap under this.
FAKE_GAP_P99_TARGET_MS = 50.0


# -- measurements ---------------------------------------------------------------------------------


@dataclass
class Stream:
    """One request as a client saw it. Times are ``time.perf_counter()`` seconds."""

    sent: float
    chunk_times: list[float] = field(default_factory=list)
    audio_bytes: int = 0
    finished: float | None = None
    error: str | None = None  # "error frame: <code>", "closed (<close code>)", "timeout"

    @property
    def ttfa_s(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def gaps_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass
class Run:
    streams: list[Stream] = field(default_factory=list)
    connect_errors: list[str] = field(default_factory=list)
    #: Requests never sent: their connection was closed (or timed out) before their turn.
    unsent: int = 0
    started: float = 0.0
    ended: float = 0.0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- clients --------------------------------------------------------------------------------------


class Barrier:
    """Every client reports in (connected or failed); then all start at once."""

    def __init__(self, parties: int):
        self.parties, self.arrived = parties, 0
        self.all_in, self.go = asyncio.Event(), asyncio.Event()

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.all_in.set()


async def client(number: int, url: str, headers: dict, barrier: Barrier, args, run: Run) -> None:
    try:
        ws = await connect(url, additional_headers=headers, compression=None, max_size=None, open_timeout=30)
    except (OSError, websockets.WebSocketException, TimeoutError) as exc:
        run.connect_errors.append(f"{type(exc).__name__}: {exc}")
        barrier.arrive()
        return
    async with ws:
        barrier.arrive()
        await barrier.go.wait()
        previous = None
        for index in range(args.requests):
            request = {"text": args.text, "speaker_id": 0, "chunk_ms": args.chunk_ms,
                       "max_audio_ms": args.max_audio_ms, "request_id": f"load-{number}-{index}"}
            stream = Stream(sent=time.perf_counter())
            run.streams.append(stream)
            try:
                await ws.send(json.dumps(request))
                while True:
                    message = await asyncio.wait_for(ws.recv(), args.recv_timeout)
                    now = time.perf_counter()
                    if isinstance(message, bytes):
                        stream.chunk_times.append(now)
                        stream.audio_bytes += len(message)
                        continue
                    event = json.loads(message)
                    if event.get("done"):
                        stream.finished = now
                        if "error" in event:
                            stream.error = f"error frame: {event['error'].get('code')}"
                        break
            except TimeoutError:
                stream.error = "timeout"
                run.unsent += args.requests - index - 1
                return
            except websockets.ConnectionClosed as exc:
                if previous is not None and previous.error and not stream.chunk_times:
                    # The close that followed the previous request's error frame (1013, 1008): one failure.
                    run.streams.remove(stream)
                    run.unsent += args.requests - index
                else:
                    stream.error = f"closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
                    run.unsent += args.requests - index - 1
                return
            previous = stream


async def drive(url: str, headers: dict, args, hostile_key: str | None = None, hostile_clients: int = 0) -> Run:
    """All clients connect, start together, and run to the end or ``--timeout``; with ``hostile_clients``,
    the hostile ones (with ``hostile_key``) start ``--hostile-head-start-s`` before them and run beside."""
    run = Run()
    barrier = Barrier(args.clients)
    harm = hostile.tasks(url, hostile_clients, hostile_key, args.text, args.hostile_lag_s) if hostile_clients else []
    if harm:
        await asyncio.sleep(args.hostile_head_start_s)
    tasks = [asyncio.create_task(client(i, url, headers, barrier, args, run)) for i in range(args.clients)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(barrier.all_in.wait(), 60)
    run.started = time.perf_counter()
    barrier.go.set()
    done, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for task in [*pending, *harm]:
        task.cancel()
    await asyncio.gather(*harm, return_exceptions=True)
    await asyncio.gather(*pending, return_exceptions=True)
    run.ended = time.perf_counter()
    for stream in run.streams:
        if stream.finished is None and stream.error is None:
            stream.error = "timeout"
    for task in done:
        if task.exception() is not None:
            run.connect_errors.append(repr(task.exception()))
    return run


# -- our own server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def own_server(args):
    """``csmserve serve --engine fake`` in a child process on a free loopback port, healthy, then stopped."""
    port = free_port()
    slots = max(16, args.clients)
    with tempfile.TemporaryDirectory(prefix="csm-load-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
        if args.hostile:  # two keys, and room for each key's share (half of max_streams): the honest clients'
            env["CSM_API_KEYS"] = f"{HONEST_KEY},{HOSTILE_KEY}"
            slots *= 2
        command = [
            sys.executable, "-m", "csmserve", "serve", "--engine", args.engine, "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", "--audio-dir", f"{tmp}/audio", "--voices-dir", f"{tmp}/voices",
            # Admission sized for the load: every honest client streams at once, none is refused.
            "--max-streams", str(slots), "--max-queue", str(max(32, slots)),
            "--fake-frame-delay-ms", str(args.frame_delay_ms),
        ]
        if args.max_batch:
            command += ["--max-batch", str(args.max_batch)]
        if args.hostile:  # a short lag before the non-readers are cut
            command += ["--max-lag-s", str(args.hostile_lag_s)]
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", process, log_path)
            yield f"ws://127.0.0.1:{port}/ws/generate", process
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            if args.server_log:
                print("\n-- server log --\n" + log_path.read_text())


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited:\n" + log_path.read_text())
        with (
            contextlib.suppress(OSError, urllib.error.URLError, ValueError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if json.load(response).get("status") == "healthy":
                return
        time.sleep(0.1)
    raise SystemExit("the server never became healthy:\n" + log_path.read_text())


def check_loopback(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise SystemExit(f"--url must be ws://HOST:PORT/ws/generate, got {url!r}")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--url must point at this machine (127.0.0.1, ::1 or localhost), not {host!r}")


# -- report ---------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores; Python {platform.python_version()}"


def summary(run: Run, sample_rate: int = 24_000) -> dict:
    ok = [s for s in run.streams if s.error is None]
    errors: dict[str, int] = {}
    for s in run.streams:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    for e in run.connect_errors:
        key = f"connect: {e.split(':')[0]}"
        errors[key] = errors.get(key, 0) + 1
    ttfa = [1000 * s.ttfa_s for s in run.streams if s.ttfa_s is not None]
    gaps = [1000 * g for s in run.streams for g in s.gaps_s]
    audio_s = [s.audio_bytes / 2 / sample_rate for s in ok]
    per_stream = [a / (s.finished - s.sent) for a, s in zip(audio_s, ok) if s.finished > s.sent]
    wall = run.ended - run.started
    total_audio = sum(s.audio_bytes for s in run.streams) / 2 / sample_rate
    return {
        "streams": len(run.streams),
        "unsent": run.unsent,
        "ok": len(ok),
        "errors": errors,
        "ttfa_ms": ttfa,
        "gaps_ms": gaps,
        "rtf": per_stream,
        "audio_s": total_audio,
        "wall_s": wall,
        "aggregate_rtf": total_audio / wall if wall > 0 else 0.0,
    }


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.1f}{unit}" if value < 1000 else f"{value:.0f}{unit}"


def table(stats: dict) -> list[str]:
    rows = [
        ("time to first audio (ms)", stats["ttfa_ms"]),
        ("inter-chunk gap (ms)", stats["gaps_ms"]),
        ("real-time factor per stream (x)", stats["rtf"]),
    ]
    lines = ["| measure | p50 | p99 | max | samples |", "|---|---|---|---|---|"]
    for name, values in rows:
        lines.append(
            f"| {name} | {fmt(percentile(values, 50))} | {fmt(percentile(values, 99))} | "
            f"{fmt(max(values) if values else None)} | {len(values)} |"
        )
    return lines


def commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        if out.returncode == 0:
            return f" (commit {out.stdout.strip()})"
    return ""


def report(stats: dict, args, target: str) -> list[str]:
    errors = sum(stats["errors"].values())
    detail = ", ".join(f"{n} {kind}" for kind, n in sorted(stats["errors"].items())) or "none"
    lines = [
        f"Machine: {machine()}; clients and server share it.",
        (
            f"Server{commit()}: {target}. Clients: {args.clients} concurrent WebSockets, {args.requests} requests "
            f"each, one after another ({len(args.text)}-character text, `chunk_ms` {args.chunk_ms}, "
            f"`max_audio_ms` {args.max_audio_ms}); times measured at the client."
        ),
        "",
        *table(stats),
        "",
        (
            f"Requests: {stats['streams']} sent, {stats['ok']} complete"
            + (f", {stats['unsent']} not sent (their connection had closed)" if stats["unsent"] else "")
            + f"; errors: {errors} ({detail}). "
            f"Aggregate: {stats['audio_s']:.1f} s of audio in {stats['wall_s']:.2f} s wall, "
            f"real-time factor {stats['aggregate_rtf']:.1f}x."
        ),
    ]
    gap_p99 = percentile(stats["gaps_ms"], 99)
    if args.max_gap_p99_ms is not None:
        met = errors == 0 and gap_p99 is not None and gap_p99 <= args.max_gap_p99_ms
        verdict = "met" if met else "missed"
        lines += ["", f"Target (no error, p99 inter-chunk gap under {args.max_gap_p99_ms:g} ms): {verdict}."]
    return lines


def side_by_side(alone: dict, beside: dict, args, target: str) -> list[str]:
    """The honest clients' figures alone and beside the hostile ones, one column each."""

    def errors(stats: dict) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in sorted(stats["errors"].items())) or "none"

    rows = [
        ("time to first audio p50 (ms)", lambda st: fmt(percentile(st["ttfa_ms"], 50))),
        ("time to first audio p99 (ms)", lambda st: fmt(percentile(st["ttfa_ms"], 99))),
        ("inter-chunk gap p99 (ms)", lambda st: fmt(percentile(st["gaps_ms"], 99))),
        ("requests complete", lambda st: f"{st['ok']} of {args.clients * args.requests}"),
        ("errors", errors),
    ]
    delay = f", steps paced at {args.frame_delay_ms:g} ms" if args.frame_delay_ms else ""
    rows_note = f", {args.max_batch} rows" if args.max_batch else ""
    return [
        f"Machine: {machine()}; clients and server share it.",
        (
            f"Server{commit()}: {target}{delay}{rows_note}. Honest clients: {args.clients} concurrent WebSockets on "
            f"`/ws/generate` with one key, {args.requests} requests each ({len(args.text)}-character text, `chunk_ms` "
            f"{args.chunk_ms}, `max_audio_ms` {args.max_audio_ms}). Hostile clients, with another key, started "
            f"{args.hostile_head_start_s:g} s earlier: {args.hostile} of each kind (`bench/hostile.py`): a non-reader "
            f"and a goer on each of the {len(hostile.STREAMING_ROUTES)} streaming routes, an ElevenLabs context hog "
            "(open, flush, close in a loop), a cancel storm (request, then disconnect)."
        ),
        "",
        "| honest clients | alone | beside the hostile clients |",
        "|---|---|---|",
        *(f"| {name} | {cell(alone)} | {cell(beside)} |" for name, cell in rows),
    ]


def write_section(
    path: Path, lines: list[str], start: str = START, end: str = END, title: str = "Load (`make load`)"
) -> None:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    block = "\n".join([start, f"## {title}, {date}", "", *lines, end])
    replace_section(path, start, end, block)


# -- main -----------------------------------------------------------------------------------------


def bounded(lo: int, hi: int):
    def parse(value: str) -> int:
        number = int(value)
        if not lo <= number <= hi:
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi}")
        return number

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server's ws://.../ws/generate (loopback); default: start one")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer (servers with CSM_API_KEYS)")
    parser.add_argument("--engine", choices=["fake", "csm"], default="fake", help="engine of our own server")
    parser.add_argument("--clients", type=bounded(1, MAX_CLIENTS), default=50)
    parser.add_argument("--requests", type=bounded(1, MAX_REQUESTS), default=3, help="requests per client, in turn")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--chunk-ms", type=bounded(20, 1000), default=200)
    parser.add_argument("--max-audio-ms", type=bounded(80, 90_000), default=4000)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole run")
    parser.add_argument("--recv-timeout", type=float, default=30.0, help="seconds to wait for any one frame")
    parser.add_argument("--max-gap-p99-ms", type=float,
                        help=f"exit 1 when the p99 inter-chunk gap exceeds this (default with our own fake-engine "
                             f"server: {FAKE_GAP_P99_TARGET_MS:g}; with --url: no limit)")
    parser.add_argument("--hostile", type=bounded(0, 20), default=0,
                        help="measure alone, then beside this many hostile clients of each kind (bench/hostile.py)")
    parser.add_argument("--hostile-api-key", help="with --url: the hostile clients' key (another than --api-key)")
    parser.add_argument("--hostile-lag-s", type=float, default=1.0, help="our own server's --max-lag-s with --hostile")
    parser.add_argument("--hostile-head-start-s", type=float, default=1.0,
                        help="how long the hostile clients run before the measured ones start")
    parser.add_argument("--frame-delay-ms", type=float, default=0.0, help="our own fake engine's time per step")
    parser.add_argument("--max-batch", type=bounded(1, 256), help="our own engine's rows (default: its own)")
    parser.add_argument("--write", type=Path, help="replace the load section of this markdown file")
    parser.add_argument("--server-log", action="store_true", help="print our own server's log at the end")
    args = parser.parse_args(argv)

    api_key, hostile_key = args.api_key, args.hostile_api_key
    with contextlib.ExitStack() as stack:
        if args.url:
            check_loopback(args.url)
            url, target = args.url, f"`{args.url}`"
        else:
            url, _process = stack.enter_context(own_server(args))
            target = (f"its own child process, `csmserve serve --engine {args.engine}` on loopback, with "
                      "`--max-streams`/`--max-queue` raised to the client count")
            if args.hostile:
                api_key, hostile_key = HONEST_KEY, HOSTILE_KEY
                target = (f"its own child process, `csmserve serve --engine {args.engine}` on loopback with two keys, "
                          "`--max-streams`/`--max-queue` twice the honest client count (each key's default share: half)")
            if args.max_gap_p99_ms is None and args.engine == "fake" and not args.frame_delay_ms:
                args.max_gap_p99_ms = FAKE_GAP_P99_TARGET_MS
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        print(f"{args.clients} clients x {args.requests} requests against {url} ...", flush=True)
        run = asyncio.run(drive(url, headers, args))
        if args.hostile:
            print(f"... again, beside {args.hostile} hostile clients of each kind ...", flush=True)
            beside = summary(asyncio.run(drive(url, headers, args, hostile_key, args.hostile)))
    stats = summary(run)
    if args.hostile:
        lines = side_by_side(stats, beside, args, target)
        print("\n".join(lines))
        if args.write:
            title = "Load beside hostile clients (`make load`, `--hostile`)"
            write_section(args.write, lines, HOSTILE_START, HOSTILE_END, title)
        honest_ok = all(not st["errors"] and st["ok"] == args.clients * args.requests for st in (stats, beside))
        return 0 if honest_ok else 1
    lines = report(stats, args, target)
    print("\n".join(lines))
    if args.write:
        write_section(args.write, lines)
    failed = bool(stats["errors"]) or stats["ok"] < args.clients * args.requests
    gap_p99 = percentile(stats["gaps_ms"], 99)
    if args.max_gap_p99_ms is not None and (gap_p99 is None or gap_p99 > args.max_gap_p99_ms):
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
