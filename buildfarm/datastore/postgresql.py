"""PostgreSQL specifics: the driver (psycopg 3), URLs, and the advisory locks.

The queries in datastore/*.py and coordinator/scheduler.py read, check and then write, as SQLite
allows: there one writer at a time holds the database (BEGIN IMMEDIATE). To keep them correct under
PostgreSQL's READ COMMITTED, every transaction first takes one transaction-scoped advisory lock, so
writers queue in order exactly as on SQLite; each later statement sees what the previous holder
committed. Statements outside a transaction (reads, single-row updates) never wait.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import peewee as pw

from buildfarm.errors import DatastoreError

PREFIXES = ("postgresql://", "postgres://")
LOCK_TIMEOUT_MS = 60_000  # as SQLite's busy timeout: a writer waits this long, then fails


def _key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for `name`."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


WRITE_LOCK = _key("buildfarm: one writing transaction at a time")
MIGRATE_LOCK = _key("buildfarm: one process migrating at a time")
RUN_LOCK = _key("buildfarm: one `buildfarm run` per datastore")


def is_postgresql(url: str) -> bool:
    return url.startswith(PREFIXES)


def conninfo(url: str) -> str:
    """The libpq URI of a datastore URL (postgres:// is accepted as an alias)."""
    if url.startswith("postgres://"):
        return "postgresql://" + url[len("postgres://") :]
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if not is_postgresql(url):
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def one_line(error: BaseException) -> str:
    """libpq's messages span lines; the CLI shows one."""
    return " ".join(str(error).split())


def require_driver() -> Any:
    try:
        import psycopg
    except ImportError:
        raise DatastoreError(
            "PostgreSQL datastores need the psycopg driver: pip install 'buildfarm[postgresql]'"
        ) from None
    return psycopg


def connect_defaults(url: str, application_name: str) -> dict[str, Any]:
    """Connection parameters the URL may override: a name in pg_stat_activity, TCP keepalives."""
    psycopg = require_driver()
    try:
        given = psycopg.conninfo.conninfo_to_dict(conninfo(url))
    except psycopg.ProgrammingError as e:
        raise DatastoreError(f"bad PostgreSQL URL {redact(url)}: {one_line(e)}") from None
    defaults: dict[str, Any] = {"application_name": application_name[:63], "keepalives": 1}
    return {k: v for k, v in defaults.items() if k not in given}


def split_key(key: int) -> tuple[int, int]:
    """(classid, objid) under which pg_locks shows a bigint advisory lock key."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


class PostgresqlDatastore(pw.PostgresqlDatabase):
    """peewee's PostgreSQL database on psycopg 3, whose transactions queue like SQLite's."""

    def __init__(self, url: str) -> None:
        if not hasattr(pw, "Psycopg3Adapter"):
            raise DatastoreError(
                "PostgreSQL datastores need peewee 4.5 or later: "
                "pip install 'buildfarm[postgresql]'"
            )
        super().__init__(conninfo(url), prefer_psycopg3=True, **connect_defaults(url, "buildfarm"))

    def _initialize_connection(self, conn: Any) -> None:
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")

    def begin(self, isolation_level: Any = None) -> None:
        super().begin(isolation_level)
        database: Any = self
        database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))


def connection_lost(db: Any, error: BaseException) -> bool:
    """Whether `error` came from `db`'s PostgreSQL connection having died (a server restart,
    a network cut), not from the statement: then the transaction was rolled back by the server
    and the same call can be made again on a new connection."""
    if not isinstance(db, PostgresqlDatastore) or not isinstance(
        error, pw.OperationalError | pw.InterfaceError
    ):
        return False
    conn = getattr(getattr(db, "_state", None), "conn", None)
    return conn is None or bool(getattr(conn, "closed", False) or getattr(conn, "broken", False))


def drop_connection(db: Any) -> None:
    """Forget a dead connection; peewee opens a new one on the next statement."""
    conn = db._state.conn
    db._state.reset()
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
