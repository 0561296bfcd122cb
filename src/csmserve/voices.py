"""Registered voices: a reference clip's Mimi codes, its transcript and speaker id, kept on disk.

A voice is CSM context: its turn (``[speaker]transcript`` + the clip's codes) is put before every
request that names it, so the model continues in that voice. Each voice is one JSON file (metadata)
and one ``.npy`` file (codes ``(frames, 32)`` int16), both written atomically (temporary file, then
``os.replace``), the codes first, so a crash never leaves a voice that points at missing codes. At
start-up, files that cannot be read are skipped with a warning and never stop the server.

A voice added without a model (``csmserve voices add``) is **pending**: its clip is kept as a WAV file
(mono 16-bit at 24 kHz, ``voice_<id>.wav``) instead of codes, and the server that first needs it encodes
it with its own codec and stores the codes (:meth:`VoiceStore.set_codes`).

Several processes may share one directory (Ray Serve replicas on a shared volume, the CLI next to a
running server): a voice another process registered is read from disk the first time it is asked for
(or listed), one it changed (encoded) is read again, and one it deleted disappears here too. Temporary
files have unique names, so writers never collide; adding takes a lock file, so two processes never
give one name to two voices.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from csmserve.errors import Conflict

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^voice_[A-Za-z0-9_-]{12}$")
#: A temporary file older than this is a crashed writer's, not one still being written by another process.
STALE_TMP_S = 600.0
WRITING_PATTERN = re.compile(r"^voice_[A-Za-z0-9_-]{12}\.(json|npy|wav)\.[0-9a-f]{12}\.tmp$")
#: Audio per codec frame: 80 ms, 1920 samples at 24 kHz.
FRAME_S = 0.08
FRAME_SAMPLES = 1920
#: The rate a pending voice's clip is kept at: CSM's codec (Mimi) works at 24 kHz.
CLIP_RATE = 24_000


@dataclass(frozen=True)
class Voice:
    """A voice's metadata. ``frames``: its clip's length in 80 ms codec frames (the codes' count once
    encoded). ``pending``: its clip waits to be encoded by a server (no codes yet). ``description`` and
    ``labels`` are what an ElevenLabs client gave (shown in its voice lists, searched)."""

    id: str
    name: str
    speaker_id: int
    transcript: str
    frames: int
    created: float
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    pending: bool = False

    def public(self) -> dict:
        """The voice as the API shows it (no codes)."""
        return {**asdict(self), "object": "voice", "duration_s": round(self.frames * FRAME_S, 2)}


class VoiceStore:
    """Voices under ``directory``; thread-safe; survives restarts; shareable between processes."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._voices: dict[str, Voice] = {}
        self._codes: dict[str, np.ndarray] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # id -> (mtime, size) of the metadata file read
        self._unreadable: dict[str, tuple[int, int]] = {}  # id -> (mtime, size) of a file already warned about
        self._lock = threading.Lock()
        self._load_all()

    def _load_all(self) -> None:
        now = time.time()
        for tmp in self.directory.glob("*.tmp"):
            try:
                if not WRITING_PATTERN.match(tmp.name) or now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink(missing_ok=True)  # a crashed writer's; a live one's is recent
            except FileNotFoundError:
                pass
        self.refresh()

    def _read(self, meta: Path) -> tuple[Voice, np.ndarray | None] | None:
        try:
            data = json.loads(meta.read_text())
            voice = Voice(**data)
            if not ID_PATTERN.match(voice.id) or meta.stem != voice.id:
                raise ValueError("id does not match the file name")
            if voice.pending:
                if not self.clip_path(voice.id).is_file():
                    raise ValueError("a pending voice without its clip")
                return voice, None
            codes = np.load(self.directory / f"{voice.id}.npy", allow_pickle=False)
            if codes.ndim != 2 or codes.shape[0] != voice.frames:
                raise ValueError(f"codes of shape {codes.shape} for {voice.frames} frames")
        except FileNotFoundError:
            return None  # deleted by another process meanwhile
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the server
            log.warning("skipping unreadable voice file %s: %s", meta.name, exc)
            return None
        return voice, codes

    def refresh(self) -> None:
        """Pick up voices other processes added to the directory or changed (encoded), and drop
        those they deleted."""
        on_disk = {}
        for meta in self.directory.glob("voice_*.json"):
            with contextlib.suppress(FileNotFoundError):
                on_disk[meta.stem] = (meta, _signature(meta))
        with self._lock:
            known = dict(self._seen)
        for gone in set(known) - set(on_disk):
            self._forget(gone)
        for voice_id in sorted(on_disk):
            meta, signature = on_disk[voice_id]
            if known.get(voice_id) == signature or self._unreadable.get(voice_id) == signature:
                continue
            loaded = self._read(meta)
            if loaded is None:
                self._unreadable[voice_id] = signature
                self._forget(voice_id)
            else:
                self._remember(*loaded, signature)

    def _remember(self, voice: Voice, codes: np.ndarray | None, signature: tuple[int, int]) -> None:
        with self._lock:
            self._voices[voice.id], self._seen[voice.id] = voice, signature
            if codes is None:
                self._codes.pop(voice.id, None)
            else:
                self._codes[voice.id] = codes

    def _forget(self, voice_id: str) -> None:
        with self._lock:
            self._voices.pop(voice_id, None)
            self._codes.pop(voice_id, None)
            self._seen.pop(voice_id, None)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def _write_meta(self, voice: Voice, codes: np.ndarray | None) -> None:
        meta = self.directory / f"{voice.id}.json"
        self._write_atomic(meta, json.dumps(asdict(voice)).encode())
        self._remember(voice, codes, _signature(meta))

    @contextlib.contextmanager
    def _adding(self) -> Iterator[None]:
        """Hold the directory's lock file: no other process adds a voice meanwhile."""
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _check_name_free(self, name: str) -> None:
        self.refresh()
        with self._lock:
            if any(v.name.casefold() == name.casefold() for v in self._voices.values()):
                raise Conflict(f"a voice named {name!r} exists already; pick another name or delete it first")

    def _new(self, name: str, speaker_id: int, transcript: str, frames: int, pending: bool, **about: object) -> Voice:
        return Voice(
            id="voice_" + secrets.token_urlsafe(9), name=name, speaker_id=speaker_id, transcript=transcript,
            frames=frames, created=time.time(), pending=pending, **about,
        )

    def add(
        self, name: str, speaker_id: int, transcript: str, codes: np.ndarray, description: str = "",
        labels: dict[str, str] | None = None,
    ) -> Voice:
        """Store a new voice from its codes ``(frames, 32)``. Raises :class:`Conflict` when ``name``
        (case-insensitive) is taken, here or by another process on the directory."""
        codes = np.asarray(codes, dtype=np.int16)
        with self._adding():
            self._check_name_free(name)
            voice = self._new(
                name, speaker_id, transcript, int(codes.shape[0]), False, description=description, labels=labels or {}
            )
            self._write_atomic(self.directory / f"{voice.id}.npy", _npy(codes))
            self._write_meta(voice, codes)
        return voice

    def add_clip(self, name: str, speaker_id: int, transcript: str, wav: bytes, samples: int) -> Voice:
        """Store a new **pending** voice from its clip: ``wav`` a WAV file of ``samples`` mono samples at
        :data:`CLIP_RATE`, kept until a server encodes it (:meth:`set_codes`). Raises :class:`Conflict` as :meth:`add`."""
        frames = max(1, samples // FRAME_SAMPLES)
        with self._adding():
            self._check_name_free(name)
            voice = self._new(name, speaker_id, transcript, frames, True)
            self._write_atomic(self.clip_path(voice.id), wav)
            self._write_meta(voice, None)
        return voice

    def clip_path(self, voice_id: str) -> Path:
        """Where a voice's clip is kept (a pending voice's, and an encoded one's that was added so)."""
        return self.directory / f"{voice_id}.wav"

    def set_codes(self, voice_id: str, codes: np.ndarray) -> Voice | None:
        """Store the codes ``(frames, 32)`` of a pending voice (encoded by a server): the voice is
        usable from then on by every process. None when the voice is gone meanwhile. The clip stays."""
        codes = np.asarray(codes, dtype=np.int16)
        voice = self.get(voice_id)
        if voice is None:
            return None
        self._write_atomic(self.directory / f"{voice.id}.npy", _npy(codes))
        encoded = replace(voice, frames=int(codes.shape[0]), pending=False)
        if not (self.directory / f"{voice.id}.json").exists():  # deleted while encoding
            (self.directory / f"{voice.id}.npy").unlink(missing_ok=True)
            return None
        self._write_meta(encoded, codes)
        return encoded

    def list(self) -> list[Voice]:
        self.refresh()
        with self._lock:
            return sorted(self._voices.values(), key=lambda v: v.created)

    def get(self, key: str) -> Voice | None:
        """A voice by id, or by name when no id matches (on this process or, after a look at the
        directory, on another that shares it)."""
        voice = self._find(key)
        if voice is not None and not (self.directory / f"{voice.id}.json").exists():
            self.refresh()  # deleted by another process
            voice = self._find(key)
        if voice is None:
            self.refresh()
            voice = self._find(key)
        return voice

    def current(self, voice: Voice) -> Voice | None:
        """``voice`` as the directory has it now: encoded by another process meanwhile, or gone."""
        self.refresh()
        with self._lock:
            return self._voices.get(voice.id)

    def _find(self, key: str) -> Voice | None:
        with self._lock:
            if key in self._voices:
                return self._voices[key]
            for voice in self._voices.values():
                if voice.name == key:
                    return voice
        return None

    def codes(self, voice_id: str) -> np.ndarray | None:
        """An encoded voice's codes ``(frames, 32)`` int16; None for a pending voice."""
        with self._lock:
            return self._codes.get(voice_id)

    def delete(self, voice_id: str) -> bool:
        with self._lock:
            voice = self._voices.get(voice_id)
        self._forget(voice_id)
        if voice is None:
            return False
        for suffix in (".json", ".npy", ".wav"):
            (self.directory / f"{voice_id}{suffix}").unlink(missing_ok=True)
        return True


def _signature(path: Path) -> tuple[int, int]:
    """What tells one version of a metadata file from the next (even within one mtime tick: the size)."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _npy(codes: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, codes, allow_pickle=False)
    return buffer.getvalue()
