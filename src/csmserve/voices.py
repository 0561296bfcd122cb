"""Registered voices: a reference clip's Mimi codes, its transcript and speaker id, kept on disk.

A voice is CSM context: its turn (``[speaker]transcript`` + the clip's codes) is put before every
request that names it, so the model continues in that voice. Each voice is one JSON file (metadata)
and one ``.npy`` file (codes ``(frames, 32)`` int16), both written atomically (temporary file, then
``os.replace``), the codes first, so a crash never leaves a voice that points at missing codes. At
start-up, files that cannot be read are skipped with a warning and never stop the server.
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
    """Voices under ``directory``; thread-safe; survives restarts."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._voices: dict[str, Voice] = {}
        self._codes: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self._load_all()

    def _load_all(self) -> None:
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        for meta in sorted(self.directory.glob("voice_*.json")):
            try:
                data = json.loads(meta.read_text())
                voice = Voice(**data)
                if not ID_PATTERN.match(voice.id) or meta.stem != voice.id:
                    raise ValueError("id does not match the file name")
                codes = np.load(self.directory / f"{voice.id}.npy", allow_pickle=False)
                if codes.ndim != 2 or codes.shape[0] != voice.frames:
                    raise ValueError(f"codes of shape {codes.shape} for {voice.frames} frames")
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the server
                log.warning("skipping unreadable voice file %s: %s", meta.name, exc)
                continue
            self._voices[voice.id] = voice
            self._codes[voice.id] = codes

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
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
        with self._lock:
            return sorted(self._voices.values(), key=lambda v: v.created)

    def get(self, key: str) -> Voice | None:
        """A voice by id, or by name when no id matches."""
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
