"""The REST audio store: bounded by count, bytes and age; ids are opaque; survives a restart."""

from __future__ import annotations

from csmserve.server.store import AudioStore


def make(tmp_path, **kw):
    args = {"max_files": 10, "max_bytes": 10_000, "ttl_s": 60.0}
    args.update(kw)
    return AudioStore(tmp_path, **args)


def test_put_then_get_returns_the_same_bytes(tmp_path):
    """A stored file is found by its id and holds what was written."""
    store = make(tmp_path)
    item = store.put(b"RIFF1234")
    assert store.get(item.id).path.read_bytes() == b"RIFF1234"


def test_ids_are_opaque_and_unique(tmp_path):
    """Ids are random url-safe tokens, never derived from input."""
    store = make(tmp_path)
    ids = {store.put(b"x").id for _ in range(5)}
    assert len(ids) == 5 and all(len(i) == 22 for i in ids)


def test_count_bound_evicts_the_oldest(tmp_path):
    """Beyond max_files the oldest file is deleted from disk and index."""
    store = make(tmp_path, max_files=3)
    items = [store.put(b"x") for _ in range(5)]
    assert len(store) == 3
    assert store.get(items[0].id) is None and not items[0].path.exists()
    assert store.get(items[-1].id) is not None


def test_byte_bound_evicts_until_under_the_limit(tmp_path):
    """Total bytes stay within max_bytes."""
    store = make(tmp_path, max_bytes=250)
    for _ in range(5):
        store.put(b"y" * 100)
    assert store.total_bytes <= 250
    assert len(list(tmp_path.glob("*.wav"))) == len(store) == 2


def test_expired_files_are_removed(tmp_path):
    """Files older than ttl_s are gone at the next cleanup."""
    store = make(tmp_path, ttl_s=10)
    item = store.put(b"z")
    store.cleanup(now=item.created + 11)
    assert store.get(item.id) is None
    assert not item.path.exists()


def test_malformed_ids_are_not_looked_up(tmp_path):
    """Anything but a 22-character url-safe token is refused before touching the disk."""
    store = make(tmp_path)
    for bad in ["../x", "a/b", "", "." * 22, "A" * 21, "A" * 23, "AAAAAAAAAAAAAAAAAAAA/A"]:
        assert store.get(bad) is None


def test_restart_keeps_downloads_and_drops_partial_writes(tmp_path):
    """A new store on the same folder serves earlier files and deletes leftover temp files."""
    first = make(tmp_path)
    item = first.put(b"keep me")
    (tmp_path / "partial.tmp").write_bytes(b"half")
    second = make(tmp_path)
    assert second.get(item.id).path.read_bytes() == b"keep me"
    assert not (tmp_path / "partial.tmp").exists()


def test_a_file_stored_by_another_process_on_the_same_folder_is_served(tmp_path):
    """Replicas sharing the folder: a download id another store wrote is found on disk."""
    writer, reader = make(tmp_path), make(tmp_path)
    item = writer.put(b"from the other replica")
    assert reader.get(item.id).path.read_bytes() == b"from the other replica"
