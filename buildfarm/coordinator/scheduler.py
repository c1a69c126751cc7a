"""Which build goes to which machine next (ARCHITECTURE.md, step 2), at any queue length.

A queued build may start when no input derivation of it has a build still queued or running.
Testing that for every queued build in priority order is linear in the builds that are blocked
(at 1,000,000 queued builds, most are), so the datastore keeps it instead: `build.waiting_on`
counts those input builds, kept by triggers in the transaction of every change (migration 3),
and the partial index `build_ready` holds exactly the queued builds whose count is 0, ordered
by system, required features, machine tags, priority, age. A decision reads, for each system
the slot runs and each set of features and of tags it offers, the head of one index range, and
merges them; only builds deferred or backed off until later are skipped over one by one.

Two builds of one derivation never run at once: on one machine the second would wait on the
store's lock behind the first, so the later one waits in the queue until the first ends. A
build whose missing-inputs hooks have not run yet waits for them too.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from peewee import SQL, fn

from buildfarm.datastore import events
from buildfarm.datastore.models import (
    QUEUED,
    RUNNING,
    Attempt,
    Build,
    Derivation,
    Event,
    database_proxy,
)

FIRST_PAGE = 4  # rows read per range at first: the first ready build is usually taken
PAGE = 64
MAX_FEATURE_SETS = 64  # feature subsets read as ranges of their own; past that, filter rows

# The ready builds of one system and feature set, best first, from `key` on (keyset paging).
# State and count are literals so that both engines match the partial index build_ready.
_READY = """
SELECT b.id, b.priority, b.created_at, b.required_features, b.machine_tags FROM build AS b
WHERE b.state = 'queued' AND b.waiting_on = 0 AND b.system = {p} {features} {store}
  AND (b.defer_until IS NULL OR b.defer_until <= {p})
  AND (b.retry_after IS NULL OR b.retry_after <= {p})
  AND NOT EXISTS (
      SELECT 1 FROM derivation_input AS i
      JOIN derivation AS d ON d.path = i.input_path
      JOIN build AS ib ON ib.derivation_id = d.id
      WHERE i.derivation_id = b.derivation_id AND ib.state IN ('queued', 'running'))
  {after}
ORDER BY b.priority DESC, b.created_at, b.id
LIMIT {p}
"""
# A slot of a machine with one store directory: derivations of that store only (a range of
# paths: "DIR/" up to "DIR0", '0' being the character after '/').
_STORE = (
    "AND EXISTS (SELECT 1 FROM derivation AS sd WHERE sd.id = b.derivation_id "
    "AND sd.path > {p} AND sd.path < {p})"
)
_AFTER = (
    "AND (b.priority < {p} OR (b.priority = {p} AND (b.created_at > {p} "
    "OR (b.created_at = {p} AND b.id > {p}))))"
)


@dataclass(frozen=True, slots=True)
class Slot:
    """What a machine with a free slot can take."""

    machine: str
    systems: tuple[str, ...]
    features: frozenset[str]
    store_dir: str | None = None  # None: derivations of any store
    tags: frozenset[str] = frozenset()  # the machine's tags as KEY=VALUE words


def feature_sets(features: frozenset[str]) -> list[str] | None:
    """Every `required_features` value a machine with `features` satisfies (sorted names joined
    by spaces, as submissions store them), or None when there are too many to list; the same
    for machine tags (KEY=VALUE words)."""
    names = sorted(features)
    if 2 ** len(names) > MAX_FEATURE_SETS:
        return None
    return [
        " ".join(chosen)
        for size in range(len(names) + 1)
        for chosen in itertools.combinations(names, size)
    ]


def _ready_range(
    system: str, sets: tuple[str, str] | None, store_dir: str | None, now: float
) -> Iterator[tuple[Any, ...]]:
    """(sort key, build id, required features, machine tags) of one range of build_ready
    (`sets`: its required features and machine tags; None: every one), best first."""
    db = database_proxy.obj
    p = db.param
    where = "" if sets is None else f"AND b.required_features = {p} AND b.machine_tags = {p}"
    store = "" if store_dir is None else _STORE.format(p=p)
    first = _READY.format(p=p, features=where, store=store, after="")
    more = _READY.format(p=p, features=where, store=store, after=_AFTER.format(p=p))
    head: list[Any] = [system] + ([] if sets is None else list(sets))
    head += [] if store_dir is None else [store_dir + "/", store_dir + "0"]
    head += [now, now]
    size = FIRST_PAGE
    rows = db.execute_sql(first, (*head, size)).fetchall()
    while True:
        for build_id, priority, created_at, required, tags in rows:
            yield (-priority, created_at, build_id), build_id, required, tags
        if len(rows) < size:
            return
        last_id, last_priority, last_created, _, _ = rows[-1]
        after = (last_priority, last_priority, last_created, last_created, last_id)
        size = PAGE
        rows = db.execute_sql(more, (*head, *after, size)).fetchall()


def _range_sets(slot: Slot) -> list[tuple[str, str]] | None:
    """Every (required features, machine tags) pair the slot satisfies, or None when there are
    too many to read as ranges of their own."""
    features, tags = feature_sets(slot.features), feature_sets(slot.tags)
    if features is None or tags is None or len(features) * len(tags) > MAX_FEATURE_SETS:
        return None
    return [(f, t) for f in features for t in tags]


def candidate_ids(slot: Slot, now: float, exclude: Iterable[int] = ()) -> Iterator[int]:
    """Ids of the queued builds this slot may run, best first: priority, then age."""
    sets = _range_sets(slot)
    ranges = [
        _ready_range(system, pair, slot.store_dir, now)
        for system in dict.fromkeys(slot.systems)
        for pair in (sets if sets is not None else [None])
    ]
    excluded = set(exclude)
    for _key, build_id, required, tags in heapq.merge(*ranges):
        if build_id in excluded:
            continue
        if sets is None and not (set(required.split()) <= slot.features
                                 and set(tags.split()) <= slot.tags):
            continue
        yield build_id


def candidates(slot: Slot, now: float, exclude: Iterable[int] = ()) -> Iterator[Build]:
    """Queued builds this slot may run, best first: priority, then age."""
    for build_id in candidate_ids(slot, now, exclude):
        build = Build.get_or_none(Build.id == build_id)
        if build is not None:
            yield build


def allocate(slot: Slot, now: float | None = None, exclude: Iterable[int] = ()) -> Attempt | None:
    """Start an attempt of the best build for `slot`, in one transaction, or None.

    The attempt comes with its build and the build's derivation loaded, so the caller reads
    them without going back to the datastore."""
    moment = time.time() if now is None else now
    twin = Build.alias()
    running_twin = twin.select(SQL("1")).where(
        (twin.derivation == Build.derivation) & (twin.state == RUNNING)
    )
    # After a missing-inputs setup failure a build waits for its hooks (which submit those
    # inputs, so that it waits for their builds): trying it again sooner fails the same way.
    unheard = Event.select(SQL("1")).where(
        (Event.build == Build.id) & Event.delivered_at.is_null()
        & (Event.name == "build-missing-inputs")
    )
    with database_proxy.atomic():
        for build_id in candidate_ids(slot, moment, exclude):
            taken = (
                Build.update(state=RUNNING, started_at=moment)
                .where((Build.id == build_id) & (Build.state == QUEUED)
                       & ~fn.EXISTS(running_twin) & ~fn.EXISTS(unheard))
                .execute()
            )
            if not taken:
                continue
            build: Build = (
                Build.select(Build, Derivation).join(Derivation).where(Build.id == build_id).get()
            )
            attempt: Attempt = Attempt.create(
                build=build, machine=slot.machine, started_at=moment, step="allocated"
            )
            events.record("build-started", build, machine=slot.machine, attempt=attempt.id)
            return attempt
    return None


def queue_depth(systems: Sequence[str] | None = None) -> dict[str, int]:
    """Queued builds per system (a count over the covering index build_queue: about 50 ms at
    1,000,000 queued builds)."""
    query: Any = Build.select(Build.system, fn.COUNT(SQL("*"))).where(Build.state == QUEUED)
    if systems is not None:
        query = query.where(Build.system.in_(systems))
    return {system: count for system, count in query.group_by(Build.system).tuples()}


def next_start(now: float) -> float | None:
    """When the soonest ready build that waits (deferred, or backed off after an attempt that
    made no progress) may start; None when none waits."""
    db = database_proxy.obj
    p = db.param
    row = db.execute_sql(
        "SELECT MIN(CASE WHEN COALESCE(b.retry_after, 0) > COALESCE(b.defer_until, 0)"
        " THEN b.retry_after ELSE b.defer_until END) FROM build AS b"
        " WHERE b.state = 'queued' AND b.waiting_on = 0"
        f" AND (b.retry_after > {p} OR b.defer_until > {p})",
        (now, now),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


@dataclass(frozen=True, slots=True)
class Stuck:
    """Queued builds no machine takes, alike in what a machine must offer."""

    system: str
    features: frozenset[str]
    store_dir: str
    count: int
    example: str  # one derivation among them
    tags: frozenset[str] = frozenset()  # the machine tags they need (KEY=VALUE)


STUCK_ROWS = 100_000  # ready builds read to say what is stuck (the counts stop there)


def stuck() -> tuple[list[Stuck], int]:
    """The queued builds that could start (none of their inputs is queued or running), by
    system, features and store; and how many queued builds wait for other queued builds."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    query: Any = (
        Build.select(Build.system, Build.required_features, Build.machine_tags, Derivation.path)
        .join(Derivation)
        .where((Build.state == QUEUED) & (SQL("waiting_on") == 0))
        .limit(STUCK_ROWS)
        .tuples()
    )
    for system, features, tags, path in query:
        groups.setdefault((system, features, path.rsplit("/", 1)[0], tags), []).append(path)
    waiting = Build.select().where((Build.state == QUEUED) & (SQL("waiting_on") > 0)).count()
    found = [
        Stuck(system, frozenset(features.split()), store_dir, len(paths), min(paths),
              frozenset(tags.split()))
        for (system, features, store_dir, tags), paths in sorted(groups.items())
    ]
    return found, waiting
