"""What the pages show, read from the datastore (run on the web's datastore thread).

Every query is bounded at any datastore size: each reads one index range, or a fixed number of
rows, never a whole table. That is what keeps every page under 200 ms with 1,000,000 builds
(benchmarks/web.py). The one filter no index can serve, a substring of the derivation name, is
searched in windows of SCAN_WINDOW builds; a page that could not be filled within its window
says how far it searched and links to the next window (see builds.py of this package).
Each function returns plain JSON-able values: the JSON API serves them as they are and the
pages render them.
"""

from __future__ import annotations

import heapq
import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from buildfarm.datastore.builds import cause_json, get_build, iso, reproducible
from buildfarm.datastore.events import ENDINGS
from buildfarm.datastore.migrations import engine_of
from buildfarm.datastore.models import (
    ATTEMPT_RESULTS,
    CANCELED,
    FAILED,
    FAILURE,
    INTERRUPTED,
    QUEUED,
    SETUP_FAILURE,
    SUCCEEDED,
    SUCCESS,
    Attempt,
    AttemptInput,
    AttemptStep,
    Build,
    BuildTag,
    Derivation,
    DerivationInput,
    DerivationOutput,
    Event,
    MachineState,
    MissingInput,
    SetupFailure,
    database_proxy,
)
from buildfarm.datastore.waiting import why_waiting
from buildfarm.errors import NotFoundError
from buildfarm.inventory import Inventory, Machine

RECENT_RESULTS = 15
RECENT_WINDOW = 200  # newest ended attempts among which the most recently ended are chosen
DEPENDANTS_SHOWN = 50
DEPENDANTS_COUNTED = 10_000  # "10,000 or more" past this
MACHINE_ATTEMPTS = 25
RATE_WINDOW = 100  # a machine's recent success rate: over the last RATE_WINDOW builds it finished
HOURS = 24
# A build finished on a machine when its attempt there succeeded or failed; setup failures
# and interruptions send the build back to the queue and say nothing of the machine's builds.
FINISHED = (SUCCESS, FAILURE)


def drv_name(path: str) -> str:
    """hello-2.12 for /gnu/store/<hash>-hello-2.12.drv."""
    base = os.path.basename(path)
    base = base.removesuffix(".drv")
    head, dash, rest = base.partition("-")
    return rest if dash and len(head) == 32 else base


def _seconds(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, end - start), 3)


# -- machines -------------------------------------------------------------------------------


def _busy_slots() -> dict[str, int]:
    """Open attempts per machine (the NULL range of the index attempt_open)."""
    query: Any = (
        Attempt.select(Attempt.machine, Attempt.id)
        .where(Attempt.result.is_null())
        .tuples()
    )
    busy: dict[str, int] = {}
    for machine, _ in query:
        busy[machine] = busy.get(machine, 0) + 1
    return busy


def _machine_state(
    machine: Machine | None, busy: int, row: MachineState | None, now: float
) -> str:
    if machine is None:
        return "retired"
    if not machine.enabled:
        return "disabled"
    if row is not None and row.backoff_until is not None and row.backoff_until > now:
        return "backing-off"
    if row is not None and row.last_error:
        return "offline"
    if busy >= machine.max_builds:
        return "busy"
    return "building" if busy else "idle"


def _machine_json(
    name: str, machine: Machine | None, busy: int, row: MachineState | None, now: float
) -> dict[str, Any]:
    """What the pages say about a machine: never how it is reached (host, user, key)."""
    slots = machine.max_builds if machine is not None else 0
    return {
        "name": name,
        "state": _machine_state(machine, busy, row, now),
        "in_inventory": machine is not None,
        "enabled": machine.enabled if machine is not None else False,
        "systems": list(machine.systems) if machine is not None else [],
        "features": list(machine.features) if machine is not None else [],
        "tags": dict(machine.tags) if machine is not None else {},
        "store": machine.store if machine is not None else None,
        "speed": machine.speed if machine is not None else None,
        "slots": slots,
        "busy": busy,
        "free": max(0, slots - busy),
        "failures": row.failures if row is not None else 0,
        "last_error": row.last_error if row is not None else None,
        "backoff_until": iso(row.backoff_until) if row is not None else None,
        "updated_at": iso(row.updated_at) if row is not None else None,
    }


def machines(inventory: Inventory | None, now: float | None = None) -> list[dict[str, Any]]:
    """Every machine of the inventory, in its order, then machines that are no longer in it
    but still have running attempts or a recorded state."""
    moment = time.time() if now is None else now
    busy = _busy_slots()
    rows = {r.name: r for r in MachineState.select()}
    known = list(inventory.machines) if inventory is not None else []
    out = [_machine_json(m.name, m, busy.get(m.name, 0), rows.get(m.name), moment)
           for m in known]
    names = {m.name for m in known}
    for name in sorted((set(busy) | set(rows)) - names):
        out.append(_machine_json(name, None, busy.get(name, 0), rows.get(name), moment))
    return out


def _attempt_ranges(
    machine: str, limit: int, results: Sequence[str | None] = (None, *ATTEMPT_RESULTS)
) -> list[tuple[int, str | None]]:
    """(id, result) of the machine's newest `limit` attempts with one of `results` (None:
    running): one range of the index attempt_open (result, machine) per result, merged newest
    first."""
    db = database_proxy.obj
    p = db.param
    ranges = []
    for result in results:
        where = "result IS NULL" if result is None else f"result = {p}"
        params: tuple[Any, ...] = (machine, limit) if result is None else (result, machine, limit)
        sql = f"SELECT id FROM attempt WHERE {where} AND machine = {p} ORDER BY id DESC LIMIT {p}"
        ranges.append([(row[0], result) for row in db.execute_sql(sql, params).fetchall()])
    merged = heapq.merge(*ranges, reverse=True)
    return [item for item, _ in zip(merged, range(limit), strict=False)]


def _result_counts(machine: str) -> dict[str, int]:
    db = database_proxy.obj
    p = db.param
    counts = {}
    for result in ATTEMPT_RESULTS:
        sql = f"SELECT COUNT(*) FROM attempt WHERE result = {p} AND machine = {p}"
        counts[result] = int(db.execute_sql(sql, (result, machine)).fetchone()[0])
    return counts


def _rate(successes: int, total: int) -> float | None:
    return round(successes / total, 4) if total else None


def machine_detail(name: str, inventory: Inventory | None) -> dict[str, Any]:
    """One machine: its state and settings, its recent attempts, and its success rates over
    the builds it finished (succeeded or failed there: setup failures and interruptions are
    counted on their own, never against it)."""
    machine = None
    if inventory is not None:
        machine = next((m for m in inventory.machines if m.name == name), None)
    row = MachineState.get_or_none(MachineState.name == name)
    recent = _attempt_ranges(name, MACHINE_ATTEMPTS)
    if machine is None and row is None and not recent:
        raise NotFoundError(f"no machine called {name!r}")
    busy = _busy_slots().get(name, 0)
    info = _machine_json(name, machine, busy, row, time.time())
    finished = [result for _, result in _attempt_ranges(name, RATE_WINDOW, FINISHED)]
    counts = _result_counts(name)
    info.update(
        attempts=_attempts_with_builds([attempt_id for attempt_id, _ in recent]),
        results=counts,
        finished=counts[SUCCESS] + counts[FAILURE],
        success_rate=_rate(counts[SUCCESS], counts[SUCCESS] + counts[FAILURE]),
        recent_success_rate=_rate(finished.count(SUCCESS), len(finished)),
        recent_window=len(finished),
    )
    return info


def _attempts_with_builds(ids: Sequence[int]) -> list[dict[str, Any]]:
    """The attempts `ids` (in that order) with their build's UUID, derivation and system."""
    if not ids:
        return []
    query = (
        Attempt.select(Attempt, Build.uuid, Build.system, Build.state, Derivation.path)
        .join(Build)
        .join(Derivation)
        .where(Attempt.id.in_(list(ids)))
    )
    found = {a.id: a for a in query}
    out = []
    for attempt_id in ids:
        a = found.get(attempt_id)
        if a is None:
            continue
        out.append({
            "id": a.id,
            "build": a.build.uuid,
            "derivation": a.build.derivation.path,
            "name": drv_name(a.build.derivation.path),
            "system": a.build.system,
            "build_state": a.build.state,
            "machine": a.machine,
            "result": a.result,
            "step": a.step,
            "started_at": iso(a.started_at),
            "ended_at": iso(a.ended_at),
            "started": a.started_at,
            "ended": a.ended_at,
            "duration": _seconds(a.started_at, a.ended_at),
            "detail": a.detail,
        })
    return out


# -- overview ------------------------------------------------------------------------------


def queue_depth() -> list[dict[str, Any]]:
    """Queued builds per system, and how many of them are ready (no input build pending)."""
    db = database_proxy.obj
    queued = db.execute_sql(
        "SELECT system, COUNT(*) FROM build WHERE state = 'queued' GROUP BY system"
    ).fetchall()
    ready = dict(db.execute_sql(
        "SELECT system, COUNT(*) FROM build WHERE state = 'queued' AND waiting_on = 0 "
        "GROUP BY system"
    ).fetchall())
    return [
        {"system": system, "queued": int(count), "ready": int(ready.get(system, 0))}
        for system, count in sorted(queued)
    ]


def running() -> list[dict[str, Any]]:
    """Open attempts, oldest first, with the step they are in and since when."""
    ids = [a.id for a in Attempt.select(Attempt.id).where(Attempt.result.is_null())]
    attempts = sorted(_attempts_with_builds(ids), key=lambda a: a["id"])
    if attempts:
        steps: Any = (
            AttemptStep.select(AttemptStep.attempt, AttemptStep.started_at)
            .where(AttemptStep.attempt.in_([a["id"] for a in attempts])
                   & AttemptStep.ended_at.is_null())
            .tuples()
        )
        since = {attempt_id: started for attempt_id, started in steps}
        for a in attempts:
            a["step_started"] = since.get(a["id"])
    return attempts


def recent_results() -> list[dict[str, Any]]:
    """The attempts that ended last (among the newest RECENT_WINDOW ended ones)."""
    ids = [
        a.id for a in Attempt.select(Attempt.id)
        .where(Attempt.result.is_null(False))
        .order_by(Attempt.id.desc())
        .limit(RECENT_WINDOW)
    ]
    ended = _attempts_with_builds(ids)
    ended.sort(key=lambda a: (a["ended"] or 0, a["id"]), reverse=True)
    return ended[:RECENT_RESULTS]


def _first_id_since(table: str, column: str, moment: float) -> int | None:
    """The lowest id of `table` (attempt or event) whose `column` (when it started, or was
    recorded) is at or after `moment`, as ids grow with it: a binary search of primary-key
    lookups, not a scan."""
    db = database_proxy.obj
    p = db.param
    # One aggregate per query: SQLite reads MIN or MAX alone off the index, both at once not.
    lowest = db.execute_sql(f"SELECT MIN(id) FROM {table}").fetchone()[0]
    if lowest is None:
        return None
    low = int(lowest)
    high = int(db.execute_sql(f"SELECT MAX(id) FROM {table}").fetchone()[0])
    probe = f"SELECT id, {column} FROM {table} WHERE id >= {p} ORDER BY id LIMIT 1"
    while low < high:
        middle = (low + high) // 2
        row = db.execute_sql(probe, (middle,)).fetchone()
        if row[1] >= moment:
            high = middle
        else:
            low = int(row[0]) + 1
    return low


def per_hour(now: float | None = None) -> list[dict[str, Any]]:
    """Each of the last HOURS hours: the builds that ended in it, by the state they ended in
    (from the events that ended them: every build once, whether an attempt, an input's failure
    or a user ended it), and apart from them the attempts that ended in it (a build may take
    several: setup failures and interruptions send it back to the queue)."""
    moment = time.time() if now is None else now
    end = (int(moment) // 3600 + 1) * 3600
    start = end - HOURS * 3600
    buckets: list[dict[str, Any]] = [
        {"hour": iso(start + i * 3600), SUCCEEDED: 0, FAILED: 0, CANCELED: 0, "attempts": 0,
         "setup_failures": 0, "interrupted": 0}
        for i in range(HOURS)
    ]
    db = database_proxy.obj
    p = db.param

    def hour(column: str) -> str:
        """The hour of `column`, rounded down (CAST truncates on SQLite, rounds on
        PostgreSQL)."""
        if engine_of(db) == "postgresql":
            return f"FLOOR(({column} - {p}) / 3600)"
        return f"CAST(({column} - {p}) / 3600 AS INTEGER)"

    first = _first_id_since("event", "created_at", start)
    if first is not None:
        names = ", ".join([p] * len(ENDINGS))
        rows = db.execute_sql(
            f"SELECT {hour('created_at')} AS hour, name, COUNT(DISTINCT build_id) FROM event"
            f" WHERE id >= {p} AND name IN ({names}) GROUP BY hour, name",
            (start, first, *ENDINGS),
        ).fetchall()
        for index, name, count in rows:
            if 0 <= int(index) < HOURS:
                buckets[int(index)][ENDINGS[name]] += int(count)
    # An attempt that ends within the day started at most a day before it (builds time out).
    first = _first_id_since("attempt", "started_at", start - 86400)
    if first is not None:
        rows = db.execute_sql(
            f"SELECT {hour('ended_at')} AS hour, result, COUNT(*) FROM attempt"
            f" WHERE id >= {p} AND ended_at >= {p} GROUP BY hour, result",
            (start, first, start),
        ).fetchall()
        for index, result, count in rows:
            if 0 <= int(index) < HOURS:
                bucket = buckets[int(index)]
                bucket["attempts"] += int(count)
                if result == SETUP_FAILURE:
                    bucket["setup_failures"] += int(count)
                elif result == INTERRUPTED:
                    bucket["interrupted"] += int(count)
    return buckets


def overview(inventory: Inventory | None) -> dict[str, Any]:
    now = time.time()
    return {
        "generated_at": iso(now),
        "queue": queue_depth(),
        "machines": machines(inventory, now),
        "running": running(),
        "recent": recent_results(),
        "per_hour": per_hour(now),
    }


# -- one build ------------------------------------------------------------------------------


def _latest_builds(paths: Iterable[str]) -> dict[str, tuple[str, str]]:
    """derivation path -> (UUID, state) of its newest build."""
    wanted = sorted(set(paths))
    found: dict[str, tuple[int, str, str]] = {}
    for start in range(0, len(wanted), 500):
        query: Any = (
            Build.select(Derivation.path, Build.id, Build.uuid, Build.state)
            .join(Derivation)
            .where(Derivation.path.in_(wanted[start:start + 500]))
            .tuples()
        )
        for path, build_id, uuid, state in query:
            if path not in found or build_id > found[path][0]:
                found[path] = (build_id, uuid, state)
    return {path: (uuid, state) for path, (_, uuid, state) in found.items()}


def _dependants(drv_path: str) -> tuple[list[dict[str, Any]], int]:
    """The newest derivations that take `drv_path` as an input (DEPENDANTS_SHOWN of them, with
    their newest build), and how many there are (counted up to DEPENDANTS_COUNTED)."""
    db = database_proxy.obj
    p = db.param
    rows = db.execute_sql(
        "SELECT d.path FROM derivation_input AS i JOIN derivation AS d ON d.id = i.derivation_id"
        f" WHERE i.input_path = {p} ORDER BY i.id DESC LIMIT {p}",
        (drv_path, DEPENDANTS_SHOWN),
    ).fetchall()
    paths = [r[0] for r in rows]
    if len(paths) < DEPENDANTS_SHOWN:
        count = len(paths)
    else:
        count = int(db.execute_sql(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM derivation_input WHERE input_path = {p}"
            f" LIMIT {p}) AS counted",
            (drv_path, DEPENDANTS_COUNTED),
        ).fetchone()[0])
    builds = _latest_builds(paths)
    return [
        {"derivation": path, "name": drv_name(path),
         "build": builds[path][0] if path in builds else None,
         "state": builds[path][1] if path in builds else None}
        for path in paths
    ], count


def _attempt_detail(attempt: Attempt) -> dict[str, Any]:
    failure = SetupFailure.select().where(SetupFailure.attempt == attempt).first()
    missing = (
        [m.path for m in MissingInput.select().where(MissingInput.setup_failure == failure)
         .order_by(MissingInput.id)]
        if failure is not None else []
    )
    producers = _producers(missing)
    steps = AttemptStep.select().where(AttemptStep.attempt == attempt).order_by(AttemptStep.id)
    sources: Any = (AttemptInput.select(AttemptInput.path, AttemptInput.source)
               .where(AttemptInput.attempt == attempt).order_by(AttemptInput.id).tuples())
    return {
        "id": attempt.id,
        "machine": attempt.machine,
        "started_at": iso(attempt.started_at),
        "ended_at": iso(attempt.ended_at),
        "started": attempt.started_at,
        "duration": _seconds(attempt.started_at, attempt.ended_at),
        "result": attempt.result,
        "step": attempt.step,
        "exit_status": attempt.exit_status,
        "detail": attempt.detail,
        "setup_failure": failure.kind if failure is not None else None,
        "missing_inputs": [{"path": path, **producers.get(path, {})} for path in missing],
        "check": attempt.check_result,
        "input_sources": [{"path": path, "source": source} for path, source in sources],
        "has_log": attempt.log_path is not None,
        "steps": [
            {
                "name": s.name,
                "started_at": iso(s.started_at),
                "ended_at": iso(s.ended_at),
                "started": s.started_at,
                "duration": _seconds(s.started_at, s.ended_at),
                "detail": s.detail,
            }
            for s in steps
        ],
    }


def _producers(paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Missing input path -> the derivation that makes it and that derivation's newest build."""
    if not paths:
        return {}
    drvs: dict[str, str] = {p: p for p in paths if p.endswith(".drv")}
    outputs = [p for p in paths if not p.endswith(".drv")]
    if outputs:
        query: Any = (
            DerivationOutput.select(DerivationOutput.path, Derivation.path)
            .join(Derivation)
            .where(DerivationOutput.path.in_(outputs))
            .tuples()
        )
        drvs.update({out: drv for out, drv in query})
    builds = _latest_builds(drvs.values())
    return {
        path: {"derivation": drv, "build": builds.get(drv, (None, None))[0],
               "state": builds.get(drv, (None, None))[1]}
        for path, drv in drvs.items()
    }


def build_detail(uuid: str) -> dict[str, Any]:
    """One build: its derivation (outputs, inputs and dependants with their builds' states),
    tags, times and every attempt with its steps and setup failures."""
    build = get_build(uuid)
    drv = build.derivation
    outputs = {o.name: o.path for o in drv.outputs.order_by(DerivationOutput.name)}
    input_rows = list(drv.inputs.order_by(DerivationInput.input_path))
    builds = _latest_builds(r.input_path for r in input_rows)
    inputs = [
        {
            "derivation": r.input_path,
            "name": drv_name(r.input_path),
            "outputs": r.outputs.split(),
            "build": builds[r.input_path][0] if r.input_path in builds else None,
            "state": builds[r.input_path][1] if r.input_path in builds else None,
        }
        for r in input_rows
    ]
    dependants, dependant_count = _dependants(drv.path)
    attempts = [_attempt_detail(a) for a in build.attempts.order_by(Attempt.id)]
    others = (
        Build.select(Build.uuid, Build.state, Build.created_at)
        .where((Build.derivation == drv.id) & (Build.id != build.id))
        .order_by(Build.id.desc())
        .limit(20)
    )
    return {
        "uuid": build.uuid,
        "derivation": drv.path,
        "name": drv_name(drv.path),
        "system": build.system,
        "required_features": build.required_features.split(),
        "state": build.state,
        "reason": build.reason,
        "cause": cause_json(build),
        "reproducible": reproducible(build),
        "flaky": build.state == "succeeded" and build.builder_failures > 0,
        "builder_failures": build.builder_failures,
        "machine_tags": dict(word.split("=", 1) for word in build.machine_tags.split()),
        "waiting": why.json() if (why := why_waiting(build)) is not None else None,
        "priority": build.priority,
        "tags": {t.key: t.value for t in build.tags.order_by(BuildTag.key)},
        "outputs": outputs,
        "inputs": inputs,
        "dependants": dependants,
        "dependant_count": dependant_count,
        "dependants_counted_up_to": DEPENDANTS_COUNTED,
        "other_builds": [
            {"build": o.uuid, "state": o.state, "created_at": iso(o.created_at)} for o in others
        ],
        "created_at": iso(build.created_at),
        "defer_until": iso(build.defer_until),
        "started_at": iso(build.started_at),
        "ended_at": iso(build.ended_at),
        "attempts": attempts,
        "running": bool(attempts) and attempts[-1]["result"] is None,
    }


# -- events ----------------------------------------------------------------------------------


def public_payload(payload: str) -> str:
    """An event as the web shows it: as the hooks get it, except `log`, a file of the
    coordinator's state directory for them, which is the log's URL path here."""
    if '"log": "' not in payload:
        return payload
    event = json.loads(payload)
    event["log"] = f"/builds/{event['build']['uuid']}/log"
    return json.dumps(event, sort_keys=True)


def events_after(last_id: int, limit: int = 500) -> list[tuple[int, str, str]]:
    """(id, name, payload) of the events after `last_id`, oldest first (the primary key)."""
    query: Any = (
        Event.select(Event.id, Event.name, Event.payload)
        .where(Event.id > last_id)
        .order_by(Event.id)
        .limit(limit)
        .tuples()
    )
    return [(int(i), str(n), public_payload(str(p))) for i, n, p in query]


def systems() -> list[str]:
    """Systems with queued builds, for the filter form (the queue index, read only)."""
    rows = database_proxy.obj.execute_sql(
        "SELECT DISTINCT system FROM build WHERE state = 'queued'").fetchall()
    return sorted(str(r[0]) for r in rows)


__all__ = [
    "QUEUED",
    "build_detail",
    "drv_name",
    "events_after",
    "machine_detail",
    "machines",
    "overview",
]
