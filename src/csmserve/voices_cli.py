"""``csmserve voices add | list | remove``: manage the voices directory from the command line.

The CLI works on the directory itself (``CSM_VOICES_DIR``, or ``--voices-dir``), the same store the
HTTP API uses, with the same checks, whether a server runs or not: every write is atomic, and a running
server sees a change at its next request, without a restart. Encoding a clip needs the model, which the
CLI does not load: ``add`` checks and keeps the clip (mono, 24 kHz) as a **pending** voice, and the
server encodes it with its own codec the first time a request uses it (once; the codes are stored).
Imports neither torch nor the server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from csmserve.config import Settings

if TYPE_CHECKING:
    from csmserve.speech.voices import VoiceBook


def add_voices_parser(sub) -> None:
    """``voices`` and its three commands, under the main parser's subparsers ``sub``."""
    voices = sub.add_parser(
        "voices", help="add, list and remove registered voices (the server's voices directory)",
        description="Manage the voices directory (CSM_VOICES_DIR) that csmserve serve uses; safe while it runs.",
    )
    voices.add_argument("--voices-dir", type=Path, default=None, help="the voices directory [env CSM_VOICES_DIR]")
    commands = voices.add_subparsers(dest="voices_command", required=True)
    add = commands.add_parser(
        "add", help="register a voice from a reference clip (the server encodes it when first used)",
    )
    add.add_argument("name", help="the voice's name, as requests will name it")
    add.add_argument("file", type=Path, help="the reference clip: WAV, FLAC, MP3 or OGG, 0.5 to 30 s")
    add.add_argument("--text", default="", help="what the clip says, word for word (strongly advised)")
    add.add_argument("--speaker", type=int, default=0, help="the CSM speaker id the voice speaks as (default 0)")
    add.set_defaults(func=with_voices(cmd_add))
    listing = commands.add_parser("list", help="list the registered voices, the default voice and the voice map")
    listing.set_defaults(func=with_voices(cmd_list))
    remove = commands.add_parser("remove", help="remove a registered voice (by name or id)")
    remove.add_argument("name")
    remove.set_defaults(func=with_voices(cmd_remove))


def with_voices(command):
    """``command(args, settings, book)`` run with the settings a server started here would have
    (``--voices-dir`` wins) and their voices; invalid settings end it with exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from pydantic import ValidationError

        from csmserve.speech.voices import VoiceBook

        overrides = {"voices_dir": args.voices_dir} if args.voices_dir is not None else {}
        try:
            settings = Settings(**overrides)
        except ValidationError as exc:
            print(f"error: invalid settings:\n{exc}", file=sys.stderr)
            return 2
        return command(args, settings, VoiceBook.from_settings(settings))

    return run


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def cmd_add(args: argparse.Namespace, settings: Settings, book: VoiceBook) -> int:
    from csmserve.audio.decode import decode_clip
    from csmserve.audio.pcm import float_to_pcm16
    from csmserve.audio.wav import pcm16_to_wav
    from csmserve.errors import CsmServeError
    from csmserve.voices import CLIP_RATE

    try:
        name, transcript = book.check_new(args.name, args.text, args.speaker, settings)
        data = args.file.read_bytes()
    except OSError as exc:
        return fail(f"cannot read {args.file}: {exc.strerror or exc}")
    except CsmServeError as exc:
        return fail(exc.message)
    try:
        clip = decode_clip(
            data, CLIP_RATE, settings.max_voice_seconds,
            max_channels=settings.max_voice_channels, max_rate=settings.max_voice_sample_rate,
        )
    except CsmServeError as exc:
        return fail(f"{args.file}: {exc.message}")
    wav = pcm16_to_wav(float_to_pcm16(clip).tobytes(), CLIP_RATE)
    try:
        voice = book.store.add_clip(name, args.speaker, transcript, wav, len(clip))
    except CsmServeError as exc:  # the name was taken meanwhile
        return fail(exc.message)
    print(
        f"added {voice.name} ({voice.id}): {len(clip) / CLIP_RATE:.1f} s clip, speaker {voice.speaker_id}, "
        f"in {book.store.directory}"
    )
    print("the server encodes it with its model the first time a request names it (no restart needed)")
    if not transcript:
        print(
            "note: no transcript (--text): CSM reads a clip with its words as one earlier turn; without them "
            "the voice follows the clip less closely",
            file=sys.stderr,
        )
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings, book: VoiceBook) -> int:
    voices = book.store.list()
    if not voices:
        print(f"no voices in {book.store.directory}")
    else:
        rows = [("NAME", "ID", "SPEAKER", "CLIP", "STATUS", "TRANSCRIPT")]
        for voice in voices:
            words = voice.transcript if len(voice.transcript) <= 40 else voice.transcript[:39] + "…"
            status = "pending (encoded on first use)" if voice.pending else "encoded"
            rows.append((voice.name, voice.id, str(voice.speaker_id), f"{voice.frames * 0.08:.1f} s", status, words or "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    if book.default is not None:
        print(f"default voice (CSM_DEFAULT_VOICE): {book.default}")
    for name, target in book.mapped.items():
        print(f"mapped (CSM_VOICE_MAP): {name} -> {target}")
    for problem in book.problems():
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def cmd_remove(args: argparse.Namespace, settings: Settings, book: VoiceBook) -> int:
    voice = book.store.get(args.name)
    if voice is None or not book.store.delete(voice.id):
        return fail(f"no voice {args.name!r} in {book.store.directory} (csmserve voices list)")
    print(f"removed {voice.name} ({voice.id})")
    for problem in book.problems():
        print(f"warning: {problem}", file=sys.stderr)
    return 0
