"""Where ``POST /generate`` keeps its WAV files until they are downloaded or expire.

Bounded by count, bytes and age; the oldest files go first. Files are named by an opaque random id
the server generates, and a download is looked up in the index by that id: a client-supplied
string never becomes a path. Replicas that share the folder serve each other's files: an id this
process does not know is looked for on disk (after the id pattern check).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{22}$")


@dataclass
class StoredAudio:
    id: str
    path: Path
    size: int
    created: float


class AudioStore:
    def __init__(self, directory: Path, max_files: int, max_bytes: int, ttl_s: float):
        self.directory = Path(directory)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, StoredAudio] = OrderedDict()
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._reindex()

    def _reindex(self) -> None:
        """Pick up files left by a previous run (oldest first); remove anything else that is ours."""
        found = []
        for path in self.directory.glob("*.wav"):
            if ID_PATTERN.match(path.stem):
                stat = path.stat()
                found.append(StoredAudio(path.stem, path, stat.st_size, stat.st_mtime))
        for item in sorted(found, key=lambda i: i.created):
            self._items[item.id] = item
        for tmp in self.directory.glob("*.tmp"):
            # Another replica's write in progress is fresh and named by an id; anything else is debris.
            with contextlib.suppress(FileNotFoundError):
                if not ID_PATTERN.match(tmp.stem) or time.time() - tmp.stat().st_mtime > 60:
                    tmp.unlink(missing_ok=True)
        self.cleanup()

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def put(self, data: bytes) -> StoredAudio:
        """Store ``data`` under a new opaque id (atomic write), then evict to the bounds."""
        audio_id = secrets.token_urlsafe(16)
        path = self.directory / f"{audio_id}.wav"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        item = StoredAudio(audio_id, path, len(data), time.time())
        with self._lock:
            self._items[audio_id] = item
        self.cleanup()
        return item

    def get(self, audio_id: str) -> StoredAudio | None:
        """The stored audio for ``audio_id``, or None (unknown, malformed or expired)."""
        if not ID_PATTERN.match(audio_id):
            return None
        self.cleanup()
        with self._lock:
            item = self._items.get(audio_id)
        if item is None:
            item = self._shared(audio_id)
        if item is None or not item.path.is_file():
            return None
        return item

    def _shared(self, audio_id: str) -> StoredAudio | None:
        """A file another process sharing the folder stored, if it is there and not expired."""
        path = self.directory / f"{audio_id}.wav"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if time.time() - stat.st_mtime > self.ttl_s:
            return None
        return StoredAudio(audio_id, path, stat.st_size, stat.st_mtime)

    def cleanup(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            doomed = []
            for item in list(self._items.values()):
                if now - item.created > self.ttl_s:
                    doomed.append(self._items.pop(item.id))
            while self._items and (len(self._items) > self.max_files or self.total_bytes > self.max_bytes):
                doomed.append(self._items.popitem(last=False)[1])
        for item in doomed:
            item.path.unlink(missing_ok=True)
