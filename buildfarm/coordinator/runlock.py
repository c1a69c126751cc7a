"""Only one coordinator per datastore: an exclusive lock held for the life of `run`.

SQLite: an flock on a file beside the datastore. PostgreSQL: a session advisory lock on a
connection of its own, so coordinators on different hosts sharing one server exclude each other.
Either way the lock goes when the process dies (the kernel closes the file or the connection).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from typing import Any

from buildfarm.datastore import describe, postgresql, sqlite_path
from buildfarm.errors import AlreadyRunningError, DatastoreError

_HOLDER = """
SELECT a.application_name
FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = %s AND l.objid = %s
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
_NAME_PREFIX = "buildfarm run "


def _already(holder: str) -> AlreadyRunningError:
    return AlreadyRunningError(
        f"another `buildfarm run` ({holder}) is already using this datastore"
    )


class RunLock:
    """Acquire before opening the datastore in `run`; release when `run` ends."""

    def __init__(self, db_url: str, state_dir: str) -> None:
        self.db_url = db_url
        self.postgresql = postgresql.is_postgresql(db_url)
        db_file = sqlite_path(db_url)
        base = db_file if db_file is not None else os.path.join(state_dir, "datastore")
        self.path = base + ".run-lock"
        self._fd: int | None = None
        self._conn: Any = None
        self._lost = False

    def acquire(self) -> None:
        if self.postgresql:
            self._acquire_advisory()
        else:
            self._acquire_flock()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._lost = False
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()  # ends the session, and with it the advisory lock

    def check(self) -> None:
        """PostgreSQL: the lock lives as long as its session. After a server restart, take it
        again: DatastoreError while the server is away, AlreadyRunningError if another `run`
        took it meanwhile (this one must then stop at once)."""
        if not self.postgresql or (self._conn is None and not self._lost):
            return
        if self._conn is not None:
            psycopg = postgresql.require_driver()
            try:
                self._conn.execute("SELECT 1")
                return
            except psycopg.Error:
                self._lost = True
                conn, self._conn = self._conn, None
                with contextlib.suppress(psycopg.Error):
                    conn.close()
        self._acquire_advisory()
        self._lost = False

    def _acquire_flock(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise _already(f"pid {holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _acquire_advisory(self) -> None:
        psycopg = postgresql.require_driver()
        name = f"{_NAME_PREFIX}pid {os.getpid()} on {socket.gethostname()}"
        params = postgresql.connect_defaults(self.db_url, name)
        try:
            conn = psycopg.connect(postgresql.conninfo(self.db_url), autocommit=True, **params)
        except psycopg.Error as e:
            where = describe(self.db_url)
            raise DatastoreError(
                f"cannot open datastore {where}: {postgresql.one_line(e)}"
            ) from None
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (postgresql.RUN_LOCK,)).fetchone()
            if not row[0]:
                found = conn.execute(_HOLDER, postgresql.split_key(postgresql.RUN_LOCK)).fetchone()
                holder = str(found[0]) if found else ""
                if holder.startswith(_NAME_PREFIX):
                    holder = holder[len(_NAME_PREFIX) :]
                raise _already(holder or "another session")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
