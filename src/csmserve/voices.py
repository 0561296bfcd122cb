"""Registered voices: a reference clip's Mimi codes, its transcript and speaker id, kept on disk.

A voice is CSM context: its turn (``[speaker]transcript`` + the clip's codes) is put before every
request that names it, so the model continues in that voice. Each voice is one JSON file (metadata)
and one ``.npy`` file (codes ``(frames, 32)`` int16), both written atomically (temporary file, then
``os.replace``), the codes first, so a crash never leaves a voice that points at missing codes. At
start-up, files that cannot be read are skipped with a warning and never stop the server.

Several processes may share one directory (Ray Serve replicas on a shared volume): a voice another
process registered is read from disk the first time it is asked for (or listed), and one it deleted
disappears here too. Temporary files have unique names, so writers never collide. The directory is
scanned again only when its modification time says its listing changed (or changed so recently that
a second change could share the timestamp), so a lookup that misses costs one ``stat``, not a scan:
a client asking for names that do not exist cannot make every request read the directory.

Names are compared and stored in one form (:func:`normalise_name`): NFKC, so full-width and other
compatibility forms are the letters they look like; format characters (zero-width, direction marks)
and a mix of scripts with look-alike letters (a Cyrillic "а" among Latin ones) are refused.
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
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from csmserve.errors import Conflict, InvalidRequest

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^voice_[A-Za-z0-9_-]{12}$")
#: A temporary file older than this is a crashed writer's, not one still being written by another process.
STALE_TMP_S = 600.0
WRITING_PATTERN = re.compile(r"^voice_[A-Za-z0-9_-]{12}\.(json|npy)\.[0-9a-f]{12}\.tmp$")
#: A directory changed less than this long before a scan may change again within the same timestamp
#: (coarse file system clocks: FAT's 2 s): until it is older, a miss scans again.
RACY_S = 2.0


def normalise_name(name: str) -> str:
    """A voice name as it is stored and compared: NFKC-normalised (``ａｌｌｏｙ`` is ``alloy``) and
    stripped. Raises :class:`InvalidRequest` for format or control characters (``alloy`` + U+200B) and
    for letters of several scripts that look alike (``аlloy`` with a Cyrillic ``а``)."""
    from confusable_homoglyphs import confusables  # its tables load on first use: registration only

    name = unicodedata.normalize("NFKC", name).strip()
    if any(unicodedata.category(c) in ("Cf", "Cc", "Cs", "Co", "Cn") for c in name):
        raise InvalidRequest("a voice name may not contain invisible, control or unassigned characters", "name")
    if confusables.is_dangerous(name):
        raise InvalidRequest("a voice name may not mix scripts whose letters look alike", "name")
    return name


def latin_skeleton(name: str) -> str:
    """``name`` in lower case with every letter that looks like a Latin one replaced by it (a whole
    Cyrillic ``аllоу`` reads ``alloy``): what a reserved name is compared with."""
    from confusable_homoglyphs import confusables

    out = []
    for char in unicodedata.normalize("NFKC", name).casefold():
        found = not char.isascii() and confusables.is_confusable(char, preferred_aliases=["latin"])
        latin = [g["c"] for g in found[0]["homoglyphs"] if g["c"].isascii()] if found else []
        out.append(latin[0].lower() if latin else char)
    return "".join(out)


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
        self._listed: int | None = None  # the directory's mtime (ns) at the last scan; None: scan
        #: Directory scans so far (a miss that finds the listing unchanged does not scan).
        self.scans = 0
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

    def _listing_changed(self) -> bool:
        """Whether the directory may list other files than at the last scan; remembers its mtime if so."""
        try:
            mtime = self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            return True
        if mtime == self._listed:
            return False
        # A change within RACY_S of now may be followed by another with the same timestamp: scan again next time.
        self._listed = mtime if time.time_ns() - mtime > RACY_S * 1e9 else None
        return True

    def refresh(self) -> None:
        """Pick up voices other processes added to the directory, and drop those they deleted (a
        scan only when the directory's listing changed)."""
        if not self._listing_changed():
            return
        self.scans += 1
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
        """Store a new voice under its :func:`normalise_name`. Raises :class:`Conflict` when the name
        (case-insensitive) is taken, :class:`InvalidRequest` when it is not a valid name."""
        name = normalise_name(name)
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
        name = unicodedata.normalize("NFKC", key)  # names are stored normalised
        with self._lock:
            if key in self._voices:
                return self._voices[key]
            for voice in self._voices.values():
                if voice.name == name:
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
