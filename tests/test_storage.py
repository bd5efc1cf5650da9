"""The artifact store: atomic writes, no path escapes, orphan sweeping."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from service.errors import InsufficientStorage
from service.storage import InvalidArtifactKey, LocalArtifactStore


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    store = LocalArtifactStore(tmp_path / "artifacts")
    store.ensure_root()
    return store


@pytest.mark.parametrize(
    "key", ["../x", "a/../../x", "/etc/passwd", "a//b", "", ".hidden", "a/./b", "a\\..\\b", "a/b/", "x" * 300]
)
def test_keys_cannot_escape_the_root(store: LocalArtifactStore, key: str) -> None:
    with pytest.raises(InvalidArtifactKey):
        store.path(key)


def test_symlinked_directory_cannot_lead_outside(store: LocalArtifactStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, store.root / "link")
    with pytest.raises(InvalidArtifactKey):
        store.path("link/file")


def test_staged_write_publishes_atomically(store: LocalArtifactStore) -> None:
    with store.staged("d/a.bin") as staged:
        staged.path.write_bytes(b"hello")
        assert not store.exists("d/a.bin")
        staged.publish()
    assert store.read_bytes("d/a.bin") == b"hello"
    assert [p.name for p in (store.root / "d").iterdir()] == ["a.bin"]


def test_failure_after_publish_leaves_nothing(store: LocalArtifactStore) -> None:
    with pytest.raises(RuntimeError), store.staged("d/a.bin") as staged:
        staged.path.write_bytes(b"hello")
        staged.publish()
        raise RuntimeError("database commit failed")
    assert list((store.root / "d").iterdir()) == []


def test_disk_full_becomes_507(store: LocalArtifactStore) -> None:
    with pytest.raises(InsufficientStorage), store.staged("d/a.bin"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list((store.root / "d").iterdir()) == []


def test_sweep_removes_only_old_unknown_files(store: LocalArtifactStore) -> None:
    for name in ("known.parquet", "orphan.parquet", "fresh.parquet"):
        store.write_bytes(f"datasets/{name}", b"x")
    (store.root / "datasets" / ".tmp-abc-x.parquet").write_bytes(b"partial")
    old = time.time() - 3600
    for name in ("known.parquet", "orphan.parquet", ".tmp-abc-x.parquet"):
        os.utime(store.root / "datasets" / name, (old, old))
    removed = store.sweep_orphans("datasets", {"datasets/known.parquet"}, older_than_seconds=600)
    assert sorted(removed) == ["datasets/.tmp-abc-x.parquet", "datasets/orphan.parquet"]
    assert sorted(p.name for p in (store.root / "datasets").iterdir()) == ["fresh.parquet", "known.parquet"]
