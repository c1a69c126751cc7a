"""The datastore: a Peewee database chosen by URL, migrated to the latest schema at open time."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from buildfarm.errors import DatastoreError, NoDatastoreError

from . import migrations, postgresql
from .models import ALL_MODELS, database_proxy

SQLITE_PREFIX = "sqlite://"
POSTGRES_PREFIXES = postgresql.PREFIXES
BUSY_TIMEOUT_MS = 60_000


def sqlite_path(url: str) -> str | None:
    """The file of an sqlite:// URL (None for other engines)."""
    if not url.startswith(SQLITE_PREFIX):
        return None
    path = url[len(SQLITE_PREFIX) :]
    if not path:
        raise DatastoreError(f"datastore URL {url!r} names no file; use sqlite:///PATH")
    return path


@dataclass
class Datastore:
    """An open, migrated datastore; the models are bound to it while it is open."""

    url: str
    db: Any

    @property
    def engine(self) -> str:
        """'sqlite' or 'postgresql'."""
        return migrations.engine_of(self.db)

    def atomic(self) -> Any:
        """One transaction; writers queue instead of failing (BEGIN IMMEDIATE on SQLite, an
        advisory lock on PostgreSQL: see postgresql.py)."""
        return self.db.atomic()

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    def __enter__(self) -> Datastore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create_sqlite(path: str) -> None:
    """A new SQLite datastore's file, mode 0600 (its journals take that mode from it), in a
    directory made 0700 if missing: it is the farm's history, tags and hooks' payloads."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise DatastoreError(f"cannot create {e.filename or path}: {e.strerror}") from None


def _connect(url: str, create: bool) -> Any:
    import peewee as pw

    path = sqlite_path(url)
    if path is not None:
        if path != ":memory:" and not os.path.exists(path):
            if not create:
                raise NoDatastoreError(
                    f"no datastore at {path}: nothing was submitted there yet "
                    "(`buildfarm submit` creates it)"
                )
            _create_sqlite(path)
        return pw.SqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",
                "foreign_keys": 1,
                "busy_timeout": BUSY_TIMEOUT_MS,
                "cache_size": -64_000,
            },
            timeout=BUSY_TIMEOUT_MS / 1000,
            lock_type="IMMEDIATE",
        )
    if postgresql.is_postgresql(url):
        return postgresql.PostgresqlDatastore(url)
    scheme, colon, _ = url.partition(":")  # never the rest: it may hold a password
    what = f"scheme {scheme[:20] + ':'!r}" if colon else f"{url[:40]!r} (no scheme)"
    raise DatastoreError(
        f"unknown datastore URL {what}: use sqlite:///PATH (or postgresql://USER@HOST/DB)"
    )


def _unopenable(url: str, error: Exception) -> DatastoreError:
    return DatastoreError(f"cannot open datastore {describe(url)}: {postgresql.one_line(error)}")


def connect(url: str, *, create: bool = True) -> Any:
    """An open peewee database for `url`, neither migrated nor bound to the models. Without
    `create`, an SQLite file that does not exist is a DatastoreError (nothing is made)."""
    import peewee as pw

    db = _connect(url, create)
    # SQLite: switching a new file to WAL needs a moment alone with it, and SQLite answers
    # "locked" at once (no busy wait) to a second process opening it at that moment.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            db.connect()
            return db
        except pw.OperationalError as e:
            if "locked" not in str(e) or sqlite_path(url) is None or time.monotonic() > deadline:
                raise _unopenable(url, e) from None
            time.sleep(0.01)
        except pw.DatabaseError as e:
            raise _unopenable(url, e) from None


def open_datastore(url: str, *, upto: int | None = None, create: bool = True) -> Datastore:
    """Open the datastore at `url`, apply pending migrations and bind the models to it.
    Without `create` (the commands that only read, or change what must exist already), a
    datastore that does not exist yet is a DatastoreError: neither an SQLite file nor a
    PostgreSQL schema is made."""
    import peewee as pw

    db = connect(url, create=create)
    try:
        version = migrations.applied_version(db)
        if version == 0 and not create:
            raise NoDatastoreError(
                f"no datastore in {describe(url)}: nothing was submitted there yet "
                "(`buildfarm submit` or `buildfarm db migrate` creates it)"
            )
        if version > migrations.LATEST:
            raise DatastoreError(
                f"{describe(url)}: schema version {version} is newer than this buildfarm "
                f"understands ({migrations.LATEST}); upgrade buildfarm"
            )
        migrations.migrate(db, upto=upto)
    except pw.DatabaseError as e:
        db.close()
        raise _unopenable(url, e) from None
    except BaseException:
        db.close()
        raise
    database_proxy.initialize(db)
    return Datastore(url=url, db=db)


@contextlib.contextmanager
def opened(url: str) -> Iterator[Datastore]:
    store = open_datastore(url)
    try:
        yield store
    finally:
        store.close()


def describe(url: str) -> str:
    """The URL as messages show it: without a password."""
    return postgresql.redact(url)


def without_password(url: str) -> str:
    """The URL as others may have it (hooks): no password in it."""
    return postgresql.without_password(url)


__all__ = [
    "ALL_MODELS",
    "Datastore",
    "connect",
    "describe",
    "open_datastore",
    "opened",
    "sqlite_path",
    "without_password",
]
