"""Only one coordinator per datastore: an exclusive lock held for the life of `run`."""

from __future__ import annotations

import fcntl
import os

from buildfarm.datastore import sqlite_path
from buildfarm.errors import AlreadyRunningError


class RunLock:
    """An flock on a file beside the datastore: released by the kernel if the process dies."""

    def __init__(self, db_url: str, state_dir: str) -> None:
        db_file = sqlite_path(db_url)
        base = db_file if db_file is not None else os.path.join(state_dir, "datastore")
        self.path = base + ".run-lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AlreadyRunningError(
                f"another `buildfarm run` (pid {holder}) is already using this datastore"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
