"""The builds list: filters, newest first, in pages with stable URLs, at any datastore size.

One index range drives the walk, newest first: the builds of the most selective tag filter
(build_tag_kv: its rows are written with their builds, so their ids follow submission order),
else the builds in the wanted state (build_state_newest), else every build (build_newest). It
is read in growing chunks; the other filters are checked on each chunk's rows by primary key.
The walk stops when a page is full, or after SCAN_WINDOW builds: a filter that no index serves
(a derivation name, a rare system) then gives a short page that says how far it searched and
links to the next window. Every request therefore reads a bounded number of rows.

Pages are addressed by a cursor, the UUID of a build: `after` lists the builds older than it,
`before` the builds newer than it, so a page's URL keeps showing the same builds while new ones
arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from buildfarm.datastore.builds import get_build, iso
from buildfarm.datastore.migrations import engine_of
from buildfarm.datastore.models import BUILD_STATES, database_proxy
from buildfarm.errors import UsageError
from buildfarm.submission import parse_tag

from .queries import drv_name

PAGE = 50
MAX_PAGE = 500
SCAN_WINDOW = 20_000  # builds read at most per request (about 30 ms on SQLite)
FIRST_CHUNK = 64
MAX_CHUNK = 4096
TAG_COUNTED = 10_000  # tags are compared by their number of builds, counted up to this
MAX_NAME = 200


@dataclass(frozen=True, slots=True)
class Filters:
    state: str | None = None
    system: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    name: str | None = None

    @classmethod
    def parse(cls, state: str | None, system: str | None, tags: Sequence[str],
              name: str | None) -> Filters:
        """From query parameters; empty values mean no filter. UsageError on bad values."""
        state = (state or "").strip() or None
        if state is not None and state not in BUILD_STATES:
            raise UsageError(f"unknown state {state!r}: one of {', '.join(BUILD_STATES)}")
        name = (name or "").strip() or None
        if name is not None and len(name) > MAX_NAME:
            raise UsageError(f"the name filter is longer than {MAX_NAME} characters")
        parsed = tuple(parse_tag(t.strip()) for t in tags if t.strip())
        return cls(state, (system or "").strip() or None, parsed, name)

    def query(self) -> list[tuple[str, str]]:
        """The filters as URL query pairs, for links that keep them."""
        pairs = [("state", self.state or ""), ("system", self.system or "")]
        pairs += [("tag", f"{k}={v}") for k, v in self.tags]
        pairs.append(("name", self.name or ""))
        return [(k, v) for k, v in pairs if v]

    def as_json(self) -> dict[str, Any]:
        return {"state": self.state, "system": self.system, "tags": [list(t) for t in self.tags],
                "name": self.name}


@dataclass
class _Walk:
    """One driving index range, read newest first (or oldest first, for `before`): `table`
    rows matching `where`, ordered by `keys` (the columns of a position in the range)."""

    table: str
    where: str
    params: list[Any]
    keys: tuple[str, ...]
    position: tuple[Any, ...] | None
    newest_first: bool
    tag: tuple[str, str] | None = None  # the tag filter that drives the walk
    by_state: bool = False  # the walk reads only builds in the wanted state
    scanned: int = 0
    done: bool = False

    def _range(self, p: str) -> tuple[str, list[Any]]:
        """SQL conditions and parameters of the rest of the range, after the position."""
        if self.position is None:
            return self.where, list(self.params)
        op = "<" if self.newest_first else ">"
        if len(self.keys) == 1:
            after = f"{self.keys[0]} {op} {p}"
        else:
            after = f"({', '.join(self.keys)}) {op} ({', '.join([p] * len(self.keys))})"
        return f"{self.where} AND {after}", [*self.params, *self.position]

    def _order(self) -> str:
        direction = "DESC" if self.newest_first else "ASC"
        return ", ".join(f"{k} {direction}" for k in self.keys)

    def window(self, p: str, size: int) -> tuple[str, list[Any]]:
        """A derived table of the next `size` rows of the range: bid (the build id) and the
        position columns k0, k1..."""
        where, params = self._range(p)
        bid = "build_id" if self.tag is not None else "id"
        keys = ", ".join(f"{k} AS k{i}" for i, k in enumerate(self.keys))
        sql = (f"SELECT {bid} AS bid, {keys} FROM {self.table} WHERE {where}"
               f" ORDER BY {self._order()} LIMIT {p}")
        return sql, [*params, size]

    def advance(self, p: str, size: int) -> None:
        """Move the position past the next `size` rows; done when no row follows them."""
        where, params = self._range(p)
        rows = database_proxy.obj.execute_sql(
            f"SELECT {', '.join(self.keys)} FROM {self.table} WHERE {where}"
            f" ORDER BY {self._order()} LIMIT 2 OFFSET {p}", (*params, size - 1),
        ).fetchall()
        self.scanned += size
        if rows:
            self.position = tuple(rows[0])
        self.done = len(rows) < 2


def _tag_sizes(tags: Sequence[tuple[str, str]]) -> list[tuple[int, tuple[str, str]]]:
    db = database_proxy.obj
    p = db.param
    sizes = []
    for key, value in tags:
        count = db.execute_sql(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM build_tag WHERE key = {p} AND value = {p}"
            f" LIMIT {p}) AS counted", (key, value, TAG_COUNTED + 1),
        ).fetchone()[0]
        sizes.append((int(count), (key, value)))
    return sorted(sizes)


def _tag_position(cursor: int, newest_first: bool) -> tuple[int]:
    """A position among tag rows for a build without the tag: next to the tag rows of the
    nearest build on the walk's side (tag rows are written in the order of their builds)."""
    db = database_proxy.obj
    p = db.param
    op, order, step, none = ("<", "DESC", 1, 0) if newest_first else (">", "ASC", -1, 2**62)
    row = db.execute_sql(
        f"SELECT id FROM build_tag WHERE build_id {op} {p} ORDER BY build_id {order} LIMIT 1",
        (cursor,),
    ).fetchone()
    return (int(row[0]) + step,) if row is not None else (none,)


def _walk(filters: Filters, cursor: int | None, newest_first: bool) -> _Walk:
    """The driving range for `filters`, from the build with id `cursor` (excluded)."""
    db = database_proxy.obj
    p = db.param
    if filters.tags:
        (_, (key, value)), *_ = _tag_sizes(filters.tags)
        tag_position: tuple[int] | None = None
        if cursor is not None:
            row = db.execute_sql(
                f"SELECT id FROM build_tag WHERE build_id = {p} AND key = {p}", (cursor, key)
            ).fetchone()
            tag_position = ((int(row[0]),) if row is not None
                            else _tag_position(cursor, newest_first))
        return _Walk("build_tag", f"key = {p} AND value = {p}", [key, value], ("id",),
                     tag_position,
                     newest_first, tag=(key, value))
    position: tuple[Any, ...] | None = None
    if cursor is not None:
        row = db.execute_sql(f"SELECT created_at, id FROM build WHERE id = {p}",
                             (cursor,)).fetchone()
        position = (row[0], row[1])
    if filters.state is not None:
        return _Walk("build", f"state = {p}", [filters.state], ("created_at", "id"), position,
                     newest_first, by_state=True)
    return _Walk("build", "1 = 1", [], ("created_at", "id"), position, newest_first)


def _matching(walk: _Walk, size: int, filters: Filters) -> list[dict[str, Any]]:
    """The builds among the walk's next `size` that pass every filter, in walk order."""
    db = database_proxy.obj
    p = db.param
    window, params = walk.window(p, size)
    where = ["1 = 1"]
    if filters.state is not None and not walk.by_state:
        where.append(f"b.state = {p}")
        params.append(filters.state)
    if filters.system is not None:
        where.append(f"b.system = {p}")
        params.append(filters.system)
    if filters.name is not None:
        pattern = filters.name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        like = "ILIKE" if engine_of(db) == "postgresql" else "LIKE"
        where.append(f"d.path {like} {p} ESCAPE '\\'")
        params.append(f"%{pattern}%")
    for key, value in filters.tags:
        if (key, value) == walk.tag:
            continue
        where.append(f"EXISTS (SELECT 1 FROM build_tag AS t WHERE t.build_id = b.id"
                     f" AND t.key = {p} AND t.value = {p})")
        params += [key, value]
    keys = ", ".join(f"w.k{i}" for i in range(len(walk.keys)))
    sql = (
        "SELECT b.id, b.uuid, b.system, b.state, b.priority, b.created_at, b.ended_at,"
        f" b.reason, d.path, {keys} FROM ({window}) AS w"
        " JOIN build AS b ON b.id = w.bid JOIN derivation AS d ON d.id = b.derivation_id"
        f" WHERE {' AND '.join(where)}"
    )
    rows = db.execute_sql(sql, params).fetchall()
    rows.sort(key=lambda r: tuple(r[9:]), reverse=walk.newest_first)
    return [
        {
            "id": r[0], "uuid": r[1], "system": r[2], "state": r[3], "priority": r[4],
            "created_at": iso(r[5]), "ended_at": iso(r[6]), "reason": r[7],
            "derivation": r[8], "name": drv_name(r[8]),
        }
        for r in rows
    ]


def _attach_tags(builds: list[dict[str, Any]]) -> None:
    if not builds:
        return
    db = database_proxy.obj
    p = db.param
    by_id = {b["id"]: b for b in builds}
    for b in builds:
        b["tags"] = {}
    rows = db.execute_sql(
        f"SELECT build_id, key, value FROM build_tag WHERE build_id IN"
        f" ({', '.join([p] * len(by_id))}) ORDER BY key", list(by_id),
    ).fetchall()
    for build_id, key, value in rows:
        by_id[build_id]["tags"][key] = value


def list_builds(filters: Filters, *, after: str | None = None, before: str | None = None,
                limit: int = PAGE) -> dict[str, Any]:
    """One page of builds matching `filters`, newest first, older than the build `after` or
    newer than the build `before` (UUIDs). See the module docstring for `searched_to`."""
    if after and before:
        raise UsageError("give either after or before, not both")
    limit = max(1, min(limit, MAX_PAGE))
    cursor_uuid = after or before
    cursor = get_build(cursor_uuid).id if cursor_uuid else None
    newest_first = before is None
    walk = _walk(filters, cursor, newest_first)
    found: list[dict[str, Any]] = []
    size = FIRST_CHUNK
    p = database_proxy.obj.param
    while not walk.done and walk.scanned < SCAN_WINDOW:
        size = min(size, SCAN_WINDOW - walk.scanned)
        found += _matching(walk, size, filters)
        if len(found) > limit:
            break
        walk.advance(p, size)
        size = min(size * 4, MAX_CHUNK)
    more = len(found) > limit or not walk.done
    page = found[:limit]
    if not newest_first:
        page.reverse()
    _attach_tags(page)
    short = len(found) <= limit and not walk.done  # the window ended before the page filled
    older_uuid: str | None = None
    newer_uuid: str | None = None
    if newest_first:
        if more:
            older_uuid = page[-1]["uuid"] if len(found) > limit else _uuid_at(walk)
        if cursor is not None:
            newer_uuid = page[0]["uuid"] if page else cursor_uuid
    else:
        older_uuid = page[-1]["uuid"] if page else cursor_uuid
        if more:
            newer_uuid = page[0]["uuid"] if len(found) > limit else _uuid_at(walk)
    for b in page:
        del b["id"]
    return {
        "filters": filters.as_json(),
        "builds": page,
        "older": older_uuid,
        "newer": newer_uuid,
        "cursor": cursor_uuid,
        "searched": walk.scanned if short else None,
        "searched_to": _time_at(walk) if short else None,
    }


def _last_build_id(walk: _Walk) -> int | None:
    if walk.position is None:
        return None
    if walk.tag is not None:
        db = database_proxy.obj
        row = db.execute_sql(f"SELECT build_id FROM build_tag WHERE id = {db.param}",
                             (walk.position[0],)).fetchone()
        return int(row[0]) if row is not None else None
    return int(walk.position[1])


def _uuid_at(walk: _Walk) -> str | None:
    """The UUID of the last build the walk read: where the next window starts."""
    build_id = _last_build_id(walk)
    if build_id is None:
        return None
    db = database_proxy.obj
    row = db.execute_sql(f"SELECT uuid FROM build WHERE id = {db.param}", (build_id,)).fetchone()
    return str(row[0]) if row is not None else None


def _time_at(walk: _Walk) -> str | None:
    build_id = _last_build_id(walk)
    if build_id is None:
        return None
    db = database_proxy.obj
    row = db.execute_sql(f"SELECT created_at FROM build WHERE id = {db.param}",
                         (build_id,)).fetchone()
    return iso(row[0]) if row is not None else None
