"""One writer per index: an flock the kernel drops when the holder dies, so stale locks never block."""

from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".embindex.lock"


class LockHeld(Exception):
    """Another live run holds the index."""


class IndexLock:
    """Held from acquire() to release(); acquiring it again in the holder nests (the CLI takes it before the
    slow imports, the runner's `with` then keeps it). A folder the lock created and nothing else used is
    removed on release: a run refused for a bad config writes nothing."""

    def __init__(self, folder: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self._depth = 0
        self._created_folder = False

    def acquire(self) -> None:
        if self._fd is not None:
            self._depth += 1
            return
        self._created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            try:
                info = json.loads(holder)
                who = f"pid {info['pid']}, started {info['started_at']}"
            except (ValueError, KeyError):
                who = "unknown holder"
            raise LockHeld(f"another embindex run holds the index lock {self.path} ({who})") from None
        os.ftruncate(fd, 0)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.write(fd, json.dumps({"pid": os.getpid(), "started_at": started}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._depth:
            self._depth -= 1
            return
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            self._remove_if_unused()

    def _remove_if_unused(self) -> None:
        if self._created_folder and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()
            except OSError:  # another run wrote there meanwhile: its folder now
                pass

    def __enter__(self) -> IndexLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
