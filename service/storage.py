"""Artifact store: files under one root directory, written atomically, never outside the root.

Keys are relative POSIX paths that Centroid generates itself (``datasets/<id>.parquet``); they are
still validated, so no key can name a file outside the root.  A write goes to a temporary file
in the destination directory and is renamed into place only when the caller says so; whatever
goes wrong before that leaves no file behind.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.errors import AppError, storage_error

log = logging.getLogger("centroid.storage")

_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
TEMP_PREFIX = ".tmp-"


class InvalidArtifactKey(AppError):
    """A key that could escape the artifact root (a programming error, never user input)."""


class StagedFile:
    """A file being written: ``path`` is a temp file until :meth:`publish` renames it into place."""

    def __init__(self, final_path: Path) -> None:
        self.final_path = final_path
        self.path = final_path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{final_path.name}")
        self.published = False

    def publish(self) -> None:
        try:
            _fsync_file(self.path)
            os.replace(self.path, self.final_path)
        except OSError as exc:
            raise storage_error(exc, self.final_path.name) from exc
        self.published = True

    def discard(self) -> None:
        for candidate in (self.path, self.final_path if self.published else None):
            if candidate is not None:
                candidate.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalArtifactStore:
    """Artifacts in a local directory (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The absolute path of ``key``, refusing anything that could leave the root."""
        parts = key.split("/")
        if not parts or not all(_KEY_PART.match(part) for part in parts):
            raise InvalidArtifactKey(f"invalid artifact key {key!r}")
        resolved = (self.root / Path(*parts)).resolve()
        if not resolved.is_relative_to(self.root):
            raise InvalidArtifactKey(f"artifact key {key!r} escapes the store")
        return resolved

    @contextmanager
    def staged(self, key: str) -> Iterator[StagedFile]:
        """Write through a temp file; on any exception neither temp nor published file remains."""
        final_path = self.path(key)
        try:
            final_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise storage_error(exc, key) from exc
        staged = StagedFile(final_path)
        try:
            yield staged
        except OSError as exc:
            staged.discard()
            raise storage_error(exc, key) from exc
        except BaseException:
            staged.discard()
            raise
        finally:
            if not staged.published:
                staged.path.unlink(missing_ok=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.staged(key) as staged:
            staged.path.write_bytes(data)
            staged.publish()

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def is_writable(self) -> bool:
        """Probe by writing and removing a small file (what /readyz reports)."""
        probe = self.root / f"{TEMP_PREFIX}probe-{uuid.uuid4().hex}"
        try:
            self.ensure_root()
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False

    def sweep_orphans(self, prefix: str, known_keys: set[str], older_than_seconds: float) -> list[str]:
        """Remove temp files and files under ``prefix`` that no database row names.

        Only files older than the grace period go, so a replica's in-flight write is left alone.
        """
        directory = self.path(prefix)
        if not directory.is_dir():
            return []
        cutoff = time.time() - older_than_seconds
        removed: list[str] = []
        for entry in directory.iterdir():
            key = f"{prefix}/{entry.name}"
            if not entry.is_file() or key in known_keys or entry.stat().st_mtime > cutoff:
                continue
            entry.unlink(missing_ok=True)
            removed.append(key)
        if removed:
            log.warning("removed %d orphan artifact file(s) under %s", len(removed), prefix)
        return removed
