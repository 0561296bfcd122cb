"""Registered voices: a reference clip's Mimi codes, its transcript and speaker id, kept on disk.

A voice is CSM context: its turn (``[speaker]transcript`` + the clip's codes) is put before every
request that names it, so the model continues in that voice. Each voice is one JSON file (metadata)
and one ``.npy`` file (codes ``(frames, 32)`` int16), both written atomically (temporary file, then
``os.replace``), the codes first, so a crash never leaves a voice that points at missing codes. At
start-up, files that cannot be read are skipped with a warning and never stop the server.

Several processes may share one directory (Ray Serve replicas on a shared volume): a voice another
process registered is read from disk the first time it is asked for (or listed), and one it deleted
disappears here too. Temporary files have unique names, so writers never collide.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from csmserve.errors import Conflict

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^voice_[A-Za-z0-9_-]{12}$")
#: A temporary file older than this is a crashed writer's, not one still being written by another process.
STALE_TMP_S = 600.0
WRITING_PATTERN = re.compile(r"^voice_[A-Za-z0-9_-]{12}\.(json|npy)\.[0-9a-f]{12}\.tmp$")


@dataclass(frozen=True)
class Voice:
    id: str
    name: str
    speaker_id: int
    transcript: str
    frames: int
    created: float

    def public(self) -> dict:
        """The voice as the API shows it (no codes)."""
        return {**asdict(self), "object": "voice", "duration_s": round(self.frames * 0.08, 2)}


class VoiceStore:
    """Voices under ``directory``; thread-safe; survives restarts; shareable between processes."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._voices: dict[str, Voice] = {}
        self._codes: dict[str, np.ndarray] = {}
        self._unreadable: dict[str, float] = {}  # id -> mtime of a file already warned about
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

    def _read(self, meta: Path) -> tuple[Voice, np.ndarray] | None:
        try:
            data = json.loads(meta.read_text())
            voice = Voice(**data)
            if not ID_PATTERN.match(voice.id) or meta.stem != voice.id:
                raise ValueError("id does not match the file name")
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
        """Pick up voices other processes added to the directory, and drop those they deleted."""
        on_disk = {meta.stem: meta for meta in self.directory.glob("voice_*.json")}
        with self._lock:
            known = set(self._voices)
        for gone in known - set(on_disk):
            with self._lock:
                self._voices.pop(gone, None)
                self._codes.pop(gone, None)
        for voice_id in sorted(set(on_disk) - known):
            try:
                mtime = on_disk[voice_id].stat().st_mtime
            except FileNotFoundError:
                continue
            if self._unreadable.get(voice_id) == mtime:
                continue
            loaded = self._read(on_disk[voice_id])
            if loaded is None:
                self._unreadable[voice_id] = mtime
            else:
                with self._lock:
                    self._voices[voice_id], self._codes[voice_id] = loaded

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def add(self, name: str, speaker_id: int, transcript: str, codes: np.ndarray) -> Voice:
        """Store a new voice. Raises :class:`Conflict` when ``name`` (case-insensitive) is taken."""
        with self._lock:
            if any(v.name.casefold() == name.casefold() for v in self._voices.values()):
                raise Conflict(f"a voice named {name!r} exists already; pick another name or delete it first")
        voice = Voice(
            id="voice_" + secrets.token_urlsafe(9),
            name=name,
            speaker_id=speaker_id,
            transcript=transcript,
            frames=int(codes.shape[0]),
            created=time.time(),
        )
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(codes, dtype=np.int16), allow_pickle=False)
        self._write_atomic(self.directory / f"{voice.id}.npy", buffer.getvalue())
        self._write_atomic(self.directory / f"{voice.id}.json", json.dumps(asdict(voice)).encode())
        with self._lock:
            self._voices[voice.id] = voice
            self._codes[voice.id] = np.asarray(codes, dtype=np.int16)
        return voice

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

    def _find(self, key: str) -> Voice | None:
        with self._lock:
            if key in self._voices:
                return self._voices[key]
            for voice in self._voices.values():
                if voice.name == key:
                    return voice
        return None

    def codes(self, voice_id: str) -> np.ndarray:
        with self._lock:
            return self._codes[voice_id]

    def delete(self, voice_id: str) -> bool:
        with self._lock:
            voice = self._voices.pop(voice_id, None)
            self._codes.pop(voice_id, None)
        if voice is None:
            return False
        (self.directory / f"{voice_id}.json").unlink(missing_ok=True)
        (self.directory / f"{voice_id}.npy").unlink(missing_ok=True)
        return True
