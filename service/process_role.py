"""Which of the API processes runs the embedded worker.

`centroid serve --workers N` starts N uvicorn processes on one data directory, and every one of
them runs the same lifespan. The embedded worker belongs in one of them only: the one holding an
exclusive ``flock`` on ``<data_dir>/embedded-worker.lock``. The kernel drops the lock when its
holder exits, however it exits (``kill -9`` included), so the election needs no clean-up and no
timeout: the others retry every few seconds, and the first to try after the holder is gone (a
surviving process or uvicorn's replacement) takes over. With one process the lock is always free
and nothing changes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

log = logging.getLogger("centroid")

LOCK_FILE = "embedded-worker.lock"
RETRY_SECONDS = 2.0


class ProcessLock:
    """An exclusive, non-blocking ``flock`` on one file, held until :meth:`release` or process exit.

    Locks belong to the open file, so two instances conflict even inside one process.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; never waits. Raises OSError if the file cannot be opened."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for people looking; the lock itself is the flock
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder_pid(self) -> int | None:
        """The pid the current holder wrote, if any (informational: it may be stale)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None


class Startable(Protocol):
    def start(self) -> None: ...

    def stop(self, timeout: float = ...) -> None: ...


class ElectedWorker:
    """Wraps an embedded worker so it only runs while this process holds the data directory's lock.

    Same ``start``/``stop`` interface as the worker it wraps; ``bool()`` says whether it runs here.
    """

    def __init__(self, data_dir: Path, worker: Startable, retry_seconds: float = RETRY_SECONDS) -> None:
        self.lock = ProcessLock(Path(data_dir) / LOCK_FILE)
        self.worker = worker
        self.retry_seconds = retry_seconds
        self.running = False
        self._mutex = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def __bool__(self) -> bool:
        return self.running

    def start(self) -> None:
        if self._try_take_over():
            return
        log.info(
            "embedded worker runs in another process; this one serves requests only",
            extra={"lock": str(self.lock.path), "holder_pid": self.lock.holder_pid()},
        )
        self._watcher = threading.Thread(target=self._watch, name="centroid-worker-election", daemon=True)
        self._watcher.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
        with self._mutex:
            try:
                if self.running:
                    self.worker.stop(timeout)
                    self.running = False
            finally:
                self.lock.release()

    def _watch(self) -> None:
        while not self._stopping.wait(self.retry_seconds):
            if self._try_take_over():
                log.info("took over the embedded worker", extra={"lock": str(self.lock.path)})
                return

    def _try_take_over(self) -> bool:
        with self._mutex:
            if self._stopping.is_set():
                return False
            try:
                acquired = self.lock.try_acquire()
            except OSError as exc:
                # No lock file (read-only or odd file system): behave as before the election existed.
                log.warning("cannot lock %s (%s); running the embedded worker anyway", self.lock.path, exc)
                acquired = True
            if acquired:
                try:
                    self.worker.start()
                except BaseException:
                    self.lock.release()
                    raise
                self.running = True
            return acquired
