"""Writing and reading many rows at once, the same way on both engines."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .models import database_proxy

CHUNK = 500  # rows per IN (...) or insert batch: well under SQLite's variable limit


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def insert_rows(table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """INSERT every row with one prepared statement (executemany): building SQL text per batch
    costs far more than the inserts themselves at 100,000 rows."""
    if not rows:
        return
    db = database_proxy.obj
    marks = ", ".join([db.param] * len(columns))
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
    cursor = db.cursor()
    try:
        for chunk in chunks(rows, 5000):
            cursor.executemany(sql, chunk)
    finally:
        cursor.close()
