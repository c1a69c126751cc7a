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
import re
from typing import Any
from urllib.parse import unquote

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


# --- secrets in URLs ----------------------------------------------------------------------
# A URL's password may sit in its user information (USER:PASSWORD@HOST) or in a query parameter
# (?password=...). Neither is ever shown: messages name a URL through redact(), the driver's own
# messages (which quote what it could not parse) go through scrub(), and hooks get the URL
# without_password().

_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:ssl)?password=)([^&#]*)")
_MUST_ENCODE = re.compile(r"[@/?#\s]|%(?![0-9A-Fa-f]{2})")
_SECRETS: set[str] = set()  # of every URL given to conninfo(), for scrub()


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the user information's password is: from its first ':' to the last '@' of the
    URL (libpq ends the user information at the first '@', urllib at the last: this covers
    both, and a '/', '?' or '#' left unencoded in the password too)."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    colon = rest.find(":", 0, max(at, 0))
    if not sep or rest.startswith("/") or colon < 0:
        return None
    start = len(scheme) + len(sep)
    return start + colon + 1, start + at


def secrets(url: str) -> list[str]:
    """The passwords `url` holds, as written and percent-decoded."""
    span = _password_span(url)
    found = [url[span[0]:span[1]]] if span is not None else []
    found += [m[2] for m in _QUERY_PASSWORD.finditer(url)]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def redact(url: str) -> str:
    """The URL as messages show it: every password written ***."""
    span = _password_span(url)
    if span is not None and span[0] < span[1]:
        url = url[:span[0]] + "***" + url[span[1]:]
    return _QUERY_PASSWORD.sub(r"\1***", url)


def without_password(url: str) -> str:
    """The URL without any password (for hooks: libpq then reads ~/.pgpass or PGPASSFILE)."""
    span = _password_span(url)
    if span is not None:
        url = url[:span[0] - 1] + url[span[1]:]
    url = _QUERY_PASSWORD.sub(lambda m: m[1][0], url).replace("?&", "?")
    return url.rstrip("?&")


def scrub(text: str) -> str:
    """`text` (a driver's message, say) with every password of a URL seen written ***."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def conninfo(url: str) -> str:
    """The libpq URI of a datastore URL (postgres:// is accepted as an alias). Its passwords
    are noted for scrub(); a user name or password that libpq and urllib would read apart
    (an unencoded '@', '/', '?', '#', space or stray '%') is refused, without showing it."""
    _SECRETS.update(secrets(url))
    span = _password_span(url)
    if span is not None:
        userinfo = url[url.index("://") + 3:span[1]]
        if _MUST_ENCODE.search(userinfo):
            raise DatastoreError(
                f"bad PostgreSQL URL {redact(url)}: percent-encode the user name and password "
                "(@ as %40, / as %2F, ? as %3F, # as %23, a space as %20, % as %25)"
            )
    if url.startswith("postgres://"):
        return "postgresql://" + url[len("postgres://") :]
    return url


def one_line(error: BaseException) -> str:
    """libpq's messages span lines; the CLI shows one, without any password (scrub)."""
    return scrub(" ".join(str(error).split()))


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
