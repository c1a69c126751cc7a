"""Where the benchmarks' datastores live: SQLite files, or scratch databases on a PostgreSQL
server (the throwaway one `bash benchmarks/run --engine postgresql` starts: its URL is in
BUILDFARM_BENCH_PG).

A datastore is named by its URL, as buildfarm names it (`sqlite:///PATH`, `postgresql://...`);
`scalar` reads one value from it with raw SQL (`?` for parameters on either engine), without
binding buildfarm's models.
"""

from __future__ import annotations

import os
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ENGINES = ("sqlite", "postgresql")
LABELS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
ENV_SERVER = "BUILDFARM_BENCH_PG"
SQLITE_PREFIX = "sqlite://"
_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def sqlite_url(path: Path) -> str:
    return f"{SQLITE_PREFIX}{path}"


def engine_of(url: str) -> str:
    return "sqlite" if url.startswith(SQLITE_PREFIX) else "postgresql"


def scalar(url: str, sql: str, *params: Any) -> Any:
    """The first column of the first row of `sql` on the datastore at `url`."""
    if engine_of(url) == "sqlite":
        with closing(sqlite3.connect(url[len(SQLITE_PREFIX) :])) as db:
            row = db.execute(sql, params).fetchone()
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            row = conn.execute(sql.replace("?", "%s"), params).fetchone()
    return None if row is None else row[0]


@dataclass(frozen=True)
class PostgresServer:
    """A PostgreSQL server reached through the URL of its `postgres` database."""

    admin_url: str

    @classmethod
    def from_environment(cls) -> PostgresServer | None:
        url = os.environ.get(ENV_SERVER)
        return cls(url) if url else None

    def url_of(self, name: str) -> str:
        return urlunsplit(urlsplit(self.admin_url)._replace(path=f"/{_checked(name)}"))

    def _admin(self, sql: str) -> Any:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchone() if sql.startswith("SELECT") else None

    def create(self, name: str, template: str = "template0") -> str:
        """A new database `name`, a copy of `template` (which nobody may be connected to:
        PostgreSQL refuses otherwise); returns its URL. A database of that name is dropped
        first. FILE_COPY copies the files (after a checkpoint) instead of writing every page
        to the WAL: much faster for a datastore of a million builds."""
        self.drop(name)
        self._admin(f"CREATE DATABASE {_checked(name)} TEMPLATE {_checked(template)} "
                    "STRATEGY FILE_COPY")
        return self.url_of(name)

    def drop(self, name: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {_checked(name)} WITH (FORCE)")

    def size(self, name: str) -> int:
        """Bytes on disk (tables, indexes, TOAST), as pg_database_size counts them."""
        row = self._admin(f"SELECT pg_database_size('{_checked(name)}')")
        return int(row[0])

    def vacuum_analyze(self, name: str) -> None:
        """VACUUM (ANALYZE) database `name`: the visibility map and the statistics autovacuum
        gives a table some time after a bulk load (a datastore copied with COPY has neither)."""
        import psycopg

        with psycopg.connect(self.url_of(name), autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")

    def version(self) -> str:
        row = self._admin("SELECT current_setting('server_version')")
        return str(row[0])


def _checked(name: str) -> str:
    """A database name safe to put in SQL as is (the names here are the suite's own)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a plain database name: {name!r}")
    return name
