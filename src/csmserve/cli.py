"""``csmserve serve | wyoming | say | voices | make-tiny-model``. Every ``serve`` flag is also a ``CSM_*`` variable.

Imports nothing heavy before a command runs: ``csmserve --help`` does not load torch, and neither does
``csmserve voices`` (:mod:`csmserve.voices_cli`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import typing
from pathlib import Path

from csmserve.config import Settings
from csmserve.processes import EXIT_LOAD_FAILED  # noqa: F401 - the exit code for a model that cannot load


def _flag_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if args:
        return _flag_type(args[0])
    if annotation is bool:
        return "bool", None
    return annotation, None


#: Settings with no flag: a key on the command line is visible to every user in the process list.
ENV_ONLY = ("api_keys",)


class _EnvOnly(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            f"{option_string} is not accepted: a key on the command line is visible in the process list; "
            "set CSM_API_KEYS or CSM_API_KEYS_FILE (a file with one key per line) instead"
        )


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field (secrets excepted), documented with its env variable and default."""
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            parser.add_argument("--" + name.replace("_", "-"), action=_EnvOnly, help=argparse.SUPPRESS)
            continue
        kind, choices = _flag_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        env = f"CSM_{name.upper()}"
        default = field.default
        help_text = f"{field.description or ''} [env {env}; default {default}]".strip()
        if kind == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            convert = kind if kind in (int, float, str, Path) else str
            parser.add_argument(flag, dest=name, type=convert, choices=choices, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**overrides)


def configured(args: argparse.Namespace) -> Settings | None:
    """The settings a server command runs with (flags over ``CSM_*``), logging set up by them; None
    (said on stderr) when they are invalid."""
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return None
    from csmserve.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format, settings.log_query_strings)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    settings = configured(args)
    if settings is None:
        return 2
    from csmserve.processes import serve

    return serve(settings)


def cmd_wyoming(args: argparse.Namespace) -> int:
    """The Wyoming port alone (Home Assistant), on the engine ``serve`` would load, until SIGTERM/SIGINT."""
    import signal

    settings = configured(args)
    if settings is None:
        return 2
    from csmserve.app import serve_wyoming

    async def run():
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        return await serve_wyoming(settings, stop=stop)

    failure = asyncio.run(run())
    if failure is not None:
        print(f"error: {failure.message}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    return 0


def server_health(ws_url: str) -> dict | None:
    """``/health`` of the server behind ``ws_url`` (same host, same path prefix), or ``None`` when it
    cannot be read: it only adds detail to what ``say`` prints."""
    import json
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(ws_url)
    prefix = parts.path.removesuffix("/ws/generate") if parts.path.endswith("/ws/generate") else ""
    url = urlunsplit(("https" if parts.scheme == "wss" else "http", parts.netloc, prefix + "/health", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def describe_server(url: str, health: dict | None, done: dict) -> str:
    """One line naming the server that answered: its URL, and its model and device when known."""
    from csmserve.logs import redact

    line = f"server: {redact(url)}"
    if health is not None:
        line += f" ({health.get('model')} on {health.get('device')}, {health.get('dtype')})"
    if done.get("replica"):
        line += f", replica {done['replica']}"
    return line


def cmd_say(args: argparse.Namespace) -> int:
    import numpy as np
    import soundfile as sf

    from csmserve.client import CsmClient, ServerError, server_url

    try:
        url = args.url or server_url()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    options = {key: value for key, value in (("seed", args.seed), ("voice", args.voice)) if value is not None}

    async def run():
        async with CsmClient(url) as client:
            return await client.synthesize(args.text, args.speaker, **options)

    try:
        result = asyncio.run(run())
    except ServerError as exc:
        print(f"error from {url}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"error: cannot reach {url}: {exc} (is `csmserve serve` running? `say` follows CSM_HOST and "
            "CSM_PORT as the server does, or pass --url)",
            file=sys.stderr,
        )
        return 1
    rate = int(result.done.get("sample_rate", 24000))
    sf.write(args.output, np.frombuffer(result.pcm, dtype="<i2"), rate, subtype="PCM_16")
    ttfa = f"{1000 * result.ttfa_s:.0f} ms" if result.ttfa_s is not None else "n/a"
    health = server_health(url)
    print(
        f"wrote {args.output}: {len(result.pcm) / 2 / rate:.2f} s of audio in {len(result.chunk_sizes)} chunks; "
        f"time to first audio {ttfa}"
    )
    print(describe_server(url, health, result.done))
    if health is not None and health.get("offline_model"):
        print("note: that server runs the offline model (random weights): the audio is noise", file=sys.stderr)
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from csmserve.engine.tiny import make_tiny_model

    path = make_tiny_model(args.directory)
    print(f"wrote the offline CSM checkpoint (random weights: its audio is noise) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csmserve", description="Real-time streaming server for Sesame CSM-1B.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the server", allow_abbrev=False)
    add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    wyoming = sub.add_parser(
        "wyoming", allow_abbrev=False,
        help="serve only Wyoming, for Home Assistant (CSM_WYOMING_HOST:CSM_WYOMING_PORT, 127.0.0.1:10200 by default)",
    )
    add_settings_flags(wyoming)
    wyoming.set_defaults(func=cmd_wyoming)

    say = sub.add_parser("say", help="stream speech from a running server into a WAV file")
    say.add_argument("text")
    say.add_argument("-o", "--output", default="out.wav", help="WAV file to write")
    say.add_argument(
        "--url",
        default=None,
        help="the server's WebSocket URL (default: ws://CSM_HOST:CSM_PORT/ws/generate, as `serve` listens; "
        "a wildcard host such as 0.0.0.0 means 127.0.0.1)",
    )
    say.add_argument(
        "--speaker", type=int, default=None,
        help="speaker id (default: the voice's own; with neither, the server's default voice, else speaker 0)",
    )
    say.add_argument("--voice", default=None, help="a registered voice's name or id (csmserve voices list)")
    say.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same audio)")
    say.set_defaults(func=cmd_say)

    from csmserve.voices_cli import add_voices_parser

    add_voices_parser(sub)

    tiny = sub.add_parser("make-tiny-model", help="write the offline CSM checkpoint (random weights)")
    tiny.add_argument("directory", type=Path)
    tiny.set_defaults(func=cmd_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
