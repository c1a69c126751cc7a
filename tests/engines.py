"""The datastore engines the tests run on: `pytest --engine sqlite|postgresql`.

The engine comes from --engine, else BUILDFARM_TEST_ENGINE, else sqlite. Under PostgreSQL the
tests use the throwaway server ``bash scripts/test`` starts on a Unix socket in its temporary
directory: BUILDFARM_TEST_PG holds the URL of its `postgres` database, from which every test that
asks for a datastore gets a database of its own (created empty, dropped after the test).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ENGINES = ("sqlite", "postgresql")
ENV_ENGINE = "BUILDFARM_TEST_ENGINE"
ENV_SERVER = "BUILDFARM_TEST_PG"


def sqlite_url(path: Path) -> str:
    return f"sqlite://{path}"


@dataclass(frozen=True)
class ScratchDatabase:
    """A test's datastore URL, with raw SQL access that needs no buildfarm code."""

    engine: str
    url: str

    @property
    def param(self) -> str:
        return "?" if self.engine == "sqlite" else "%s"

    @contextmanager
    def connection(self) -> Iterator[Any]:
        if self.engine == "sqlite":
            with closing(sqlite3.connect(self.url[len("sqlite://") :])) as conn:
                yield conn
                conn.commit()
        else:
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                yield conn

    def exists(self) -> bool:
        return self.engine != "sqlite" or Path(self.url[len("sqlite://") :]).exists()

    def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """`sql` may use ? for parameters on every engine."""
        if self.engine != "sqlite":
            sql = sql.replace("?", "%s")
        with self.connection() as conn:
            return [tuple(_plain(v) for v in row) for row in conn.execute(sql, params).fetchall()]

    def scalar(self, sql: str, *params: Any) -> Any:
        (row,) = self.rows(sql, *params)
        return row[0]

    def execute(self, sql: str, *params: Any) -> None:
        if self.engine != "sqlite":
            sql = sql.replace("?", "%s")
        with self.connection() as conn:
            conn.execute(sql, params)

    def tables(self) -> list[str]:
        if not self.exists():
            return []
        if self.engine == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        else:
            sql = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        return sorted(r[0] for r in self.rows(sql))

    def dump(self, tables: Sequence[str] | None = None) -> list[tuple[Any, ...]]:
        """Every row of every table, in key order: what 'nothing written' is checked against."""
        rows: list[tuple[Any, ...]] = []
        for table in tables if tables is not None else self.tables():
            rows.extend((table, *r) for r in self.rows(f"SELECT * FROM {table} ORDER BY 1"))
        return rows


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


class PostgresServer:
    """The throwaway server of this test run, reached through its `postgres` database."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url

    def url_of(self, name: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path=f"/{name}"))

    def problem(self) -> str | None:
        try:
            import psycopg
        except ImportError:
            return "psycopg is not installed (pip install -e '.[test]')"
        try:
            with psycopg.connect(self.admin_url, connect_timeout=10) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as e:
            return f"cannot reach {self.admin_url}: {' '.join(str(e).split())}"
        return None

    def create(self) -> ScratchDatabase:
        import psycopg

        name = f"bf_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
        return ScratchDatabase("postgresql", self.url_of(name))

    def restart(self) -> None:
        """Stop the server (ending every session, as an operator's restart does) and start it
        again; scripts/test names its programs and directory in BF_PG_BIN and BF_PG."""
        pg_bin, pg = os.environ.get("BF_PG_BIN"), os.environ.get("BF_PG")
        if not pg_bin or not pg:
            raise RuntimeError("BF_PG_BIN and BF_PG name the server only under scripts/test")
        subprocess.run(
            ["runuser", "-u", "postgres", "--", f"{pg_bin}/pg_ctl", "-D", f"{pg}/data", "-l",
             f"{pg}/server.log", "-m", "fast", "-w", "-t", "120", "restart"],
            check=True, capture_output=True, timeout=180,
        )

    def drop(self, database: ScratchDatabase) -> None:
        import psycopg

        name = urlsplit(database.url).path.lstrip("/")
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def server_from_environment() -> PostgresServer | None:
    url = os.environ.get(ENV_SERVER)
    return PostgresServer(url) if url else None
