"""`buildfarm db migrate-from`: copy a whole datastore into an empty one, on any engine.

In one transaction on the target: it is brought to the source's schema version, every table is
copied with its ids (parents before children), the copy is checked (the row count of every table,
and a sample of rows read back from the target, must equal the source), and the target gets the
migrations the source lacked. Anything wrong rolls it all back. The source is read in one
snapshot and never written, so a coordinator may keep running on it meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import peewee as pw

from buildfarm.errors import DatastoreError, UsageError

from . import connect, describe, migrations, postgresql, sqlite_path
from .models import ALL_MODELS

BATCH = 1000  # rows per fetch from the source and per executemany on an SQLite target
SAMPLE = 200  # rows per table read back from the target and compared (first and last included)


@dataclass(frozen=True, slots=True)
class TableCopy:
    table: str
    rows: int
    compared: int  # rows read back from the target and found equal


@dataclass(frozen=True, slots=True)
class CopyReport:
    source_version: int  # schema version copied at
    target_version: int  # after the migrations the source lacked
    tables: tuple[TableCopy, ...]

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    key: str  # the primary key column
    columns: tuple[str, ...]
    serial: bool  # an auto-increment id whose counter must follow the copied ids


def _same_place(a: str, b: str) -> bool:
    path_a, path_b = sqlite_path(a), sqlite_path(b)
    if path_a is not None and path_b is not None:
        return os.path.realpath(path_a) == os.path.realpath(path_b)
    return postgresql.conninfo(a) == postgresql.conninfo(b)


def _parents_first(models: Sequence[Any]) -> list[Any]:
    order: list[Any] = []

    def visit(model: Any) -> None:
        if model in order:
            return
        for field in model._meta.fields.values():
            if isinstance(field, pw.ForeignKeyField) and field.rel_model is not model:
                visit(field.rel_model)
        order.append(model)

    for model in models:
        visit(model)
    return order


def _tables(db: Any) -> list[_Table]:
    """The datastore's tables, parents before children (the models' foreign keys)."""
    present = set(db.get_tables())
    known = {m._meta.table_name for m in ALL_MODELS} | {"schema_migration"}
    unknown = sorted(t for t in present - known if not t.startswith("sqlite_"))
    if unknown:
        raise DatastoreError(
            f"the source has tables this buildfarm does not know ({', '.join(unknown)}): "
            "copying would lose them; use the buildfarm version that made it"
        )
    tables = []
    for model in _parents_first(ALL_MODELS):
        name = model._meta.table_name
        if name not in present:
            continue  # added by a migration the source has not had yet
        cursor = db.execute_sql(f"SELECT * FROM {name} WHERE 1 = 0")
        columns = tuple(d[0] for d in cursor.description)
        key = model._meta.primary_key.column_name
        tables.append(_Table(name, key, columns, serial=isinstance(model.id, pw.AutoField)))
    return tables


def _is_empty(db: Any, tables: Sequence[_Table]) -> bool:
    present = set(db.get_tables())
    return all(
        db.execute_sql(f"SELECT 1 FROM {t.name} LIMIT 1").fetchone() is None
        for t in tables
        if t.name in present
    )


@contextlib.contextmanager
def _snapshot(db: Any) -> Iterator[None]:
    """One read-only snapshot of the source for the whole copy (no write lock taken)."""
    if migrations.engine_of(db) == "postgresql":
        db.execute_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    else:
        db.execute_sql("BEGIN DEFERRED")
    try:
        yield
    finally:
        db.execute_sql("ROLLBACK")


def _rows(db: Any, table: _Table) -> Iterator[Sequence[Any]]:
    """The source's rows in key order, fetched in batches (a server-side cursor on PostgreSQL)."""
    sql = f"SELECT {', '.join(table.columns)} FROM {table.name} ORDER BY {table.key}"
    conn = db.connection()
    if migrations.engine_of(db) == "postgresql":
        cursor = conn.cursor(name=f"buildfarm_copy_{table.name}")
    else:
        cursor = conn.cursor()
    try:
        cursor.execute(sql)
        while batch := cursor.fetchmany(BATCH):
            yield from batch
    finally:
        cursor.close()


def _normal(value: Any) -> Any:
    """Values as both drivers agree on them (bytea may come back as a memoryview)."""
    return bytes(value) if isinstance(value, memoryview) else value


class _Sampler:
    """Counts the rows going by and keeps a sample: the first, the last, and a reservoir."""

    def __init__(self, key_at: int, rng: random.Random) -> None:
        self.key_at = key_at
        self.rng = rng
        self.count = 0
        self.first: tuple[Any, ...] | None = None
        self.last: tuple[Any, ...] | None = None
        self.reservoir: list[tuple[Any, ...]] = []

    def watch(self, rows: Iterator[Sequence[Any]]) -> Iterator[tuple[Any, ...]]:
        for raw in rows:
            row = tuple(_normal(v) for v in raw)
            self.count += 1
            self.first = self.first or row
            self.last = row
            if len(self.reservoir) < SAMPLE:
                self.reservoir.append(row)
            else:
                slot = self.rng.randrange(self.count)
                if slot < SAMPLE:
                    self.reservoir[slot] = row
            yield row

    def sample(self) -> list[tuple[Any, ...]]:
        rows = [*self.reservoir, self.first, self.last]
        return list({row[self.key_at]: row for row in rows if row is not None}.values())


def _write(target: Any, table: _Table, rows: Iterator[tuple[Any, ...]]) -> None:
    """Insert `rows` as they are. PostgreSQL: one COPY, with the table's own triggers off (as
    pg_restore --disable-triggers does: what they derive, such as build.waiting_on, is copied
    already right; foreign keys are still checked). SQLite: batches of executemany (its
    triggers cannot be switched off and derive the same values again)."""
    columns = ", ".join(table.columns)
    cursor = target.connection().cursor()
    try:
        if migrations.engine_of(target) == "postgresql":
            target.execute_sql(f"ALTER TABLE {table.name} DISABLE TRIGGER USER")
            with cursor.copy(f"COPY {table.name} ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            target.execute_sql(f"ALTER TABLE {table.name} ENABLE TRIGGER USER")
            return
        marks = ", ".join([target.param] * len(table.columns))
        insert = f"INSERT INTO {table.name} ({columns}) VALUES ({marks})"
        while batch := list(itertools.islice(rows, BATCH)):
            cursor.executemany(insert, batch)
    finally:
        cursor.close()


def _copy_table(
    source: Any, target: Any, table: _Table, rng: random.Random
) -> tuple[int, list[tuple[Any, ...]]]:
    """Copy one table; return its row count and a sample of the rows as read from the source."""
    sampler = _Sampler(table.columns.index(table.key), rng)
    _write(target, table, sampler.watch(_rows(source, table)))
    return sampler.count, sampler.sample()


def _check(
    source: Any, target: Any, table: _Table, count: int, sample: list[tuple[Any, ...]]
) -> int:
    """Counts equal on both sides and the sampled rows equal in the target, or an error."""
    sql = f"SELECT COUNT(*) FROM {table.name}"
    counts = [db.execute_sql(sql).fetchone()[0] for db in (source, target)]
    if counts != [count, count]:
        raise DatastoreError(
            f"copy of {table.name} does not add up: source {counts[0]} rows, read {count}, "
            f"target {counts[1]}; nothing was committed"
        )
    key_at = table.columns.index(table.key)
    p = target.param
    select = (
        f"SELECT {', '.join(table.columns)} FROM {table.name} WHERE {table.key} = {p}"
    )
    for expected in sample:
        found = target.execute_sql(select, (expected[key_at],)).fetchone()
        if found is None or tuple(_normal(v) for v in found) != expected:
            raise DatastoreError(
                f"copy of {table.name} row {table.key}={expected[key_at]!r} differs in the "
                "target; nothing was committed"
            )
    return len(sample)


def _next_ids(source: Any, tables: Sequence[_Table]) -> dict[str, int]:
    """Per table, the highest id ever handed out in the source (ids are never reused)."""
    found: dict[str, int] = {}
    for table in tables:
        if not table.serial:
            continue
        top = source.execute_sql(f"SELECT MAX({table.key}) FROM {table.name}").fetchone()[0]
        found[table.name] = int(top or 0)
    if migrations.engine_of(source) == "sqlite" and "sqlite_sequence" in source.get_tables():
        for name, seq in source.execute_sql("SELECT name, seq FROM sqlite_sequence"):
            if name in found:
                found[name] = max(found[name], int(seq))
    elif migrations.engine_of(source) == "postgresql":
        for name in found:
            # last_value is null until the sequence first hands out an id.
            row = source.execute_sql(
                "SELECT last_value FROM pg_sequences WHERE schemaname = current_schema() "
                "AND sequencename = split_part(pg_get_serial_sequence(%s, 'id'), '.', 2)",
                (name,),
            ).fetchone()
            if row is not None and row[0] is not None:
                found[name] = max(found[name], int(row[0]))
    return found


def _set_counters(target: Any, next_ids: dict[str, int]) -> None:
    """Ids the target hands out next continue after the copied ones."""
    for name, top in next_ids.items():
        if migrations.engine_of(target) == "postgresql":
            target.execute_sql(
                "SELECT setval(pg_get_serial_sequence(%s, 'id'), %s, %s)",
                (name, max(top, 1), top > 0),
            )
        elif top > 0:
            target.execute_sql("DELETE FROM sqlite_sequence WHERE name = ?", (name,))
            target.execute_sql("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (name, top))


def copy_datastore(
    source_url: str,
    target_url: str,
    *,
    progress: Callable[[str, int], None] | None = None,
    seed: int | None = None,
) -> CopyReport:
    """Copy the datastore at `source_url` into the empty one at `target_url` (see the module
    docstring); `progress(table, rows)` is called after each table."""
    if _same_place(source_url, target_url):
        raise UsageError("the source and the target are the same datastore")
    source_file = sqlite_path(source_url)
    if source_file is not None and not os.path.isfile(source_file):
        raise DatastoreError(f"{source_file}: no such datastore file")
    source = connect(source_url, create=False)
    try:
        target = connect(target_url)
        try:
            return _copy(source, target, source_url, target_url, progress, random.Random(seed))
        finally:
            target.close()
    finally:
        source.close()


def _copy(
    source: Any,
    target: Any,
    source_url: str,
    target_url: str,
    progress: Callable[[str, int], None] | None,
    rng: random.Random,
) -> CopyReport:
    version = migrations.applied_version(source)
    if version == 0:
        raise DatastoreError(f"{describe(source_url)} holds no buildfarm datastore")
    if version > migrations.LATEST:
        raise DatastoreError(
            f"{describe(source_url)}: schema version {version} is newer than this buildfarm "
            f"understands ({migrations.LATEST}); upgrade buildfarm"
        )
    # One transaction on the target: if anything fails, it is left as it was.
    with _snapshot(source), target.atomic():
        tables = _tables(source)
        if not _is_empty(target, tables):
            raise UsageError(
                f"{describe(target_url)} already holds builds or other records: "
                "migrate-from copies into an empty datastore only"
            )
        target_version = migrations.applied_version(target)
        if target_version > version:
            raise UsageError(
                f"{describe(target_url)} is at schema version {target_version} but the source "
                f"at {version}: bring the source up to date first "
                f"(`buildfarm --db SOURCE db migrate`), or start from a new, empty target"
            )
        migrations.migrate(target, upto=version)
        copied: list[TableCopy] = []
        for table in tables:
            count, sample = _copy_table(source, target, table, rng)
            compared = _check(source, target, table, count, sample)
            copied.append(TableCopy(table.name, count, compared))
            if progress is not None:
                progress(table.name, count)
        _set_counters(target, _next_ids(source, tables))
        migrations.migrate(target)
        return CopyReport(version, migrations.applied_version(target), tuple(copied))
