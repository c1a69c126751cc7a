"""Why a queued build is not running, and the queue by reason (`builds show`, the build page,
/api, `buildfarm queue`).

A queued build has one reason, the first of these that holds: it is deferred (submit
--defer-until); it waits for input builds still queued or running; it is backed off after
attempts that made no progress or a builder failure it gets retried; its missing-inputs hooks
have not run; a build of the same derivation is running; no machine serves it (system,
features, tags, store); every machine that could is busy, down, paused or overloaded; or none
of these: it starts at the next allocation. What the machines offer and what they are doing is
what `run` last recorded (machine_state.report, written by record_machines).

The summary groups the queued builds by these reasons (from the first reasons through one
index, build_waiting, and from the machines for the rest) and by system: an operator sees at
once that 40,000 builds wait for an aarch64 machine that is down.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .models import (
    QUEUED,
    RUNNING,
    Attempt,
    Build,
    Derivation,
    DerivationInput,
    Event,
    MachineState,
    SetupFailure,
    database_proxy,
)

# Reasons, as `buildfarm queue` and the pages name them.
DEFERRED, INPUTS, BACKED_OFF = "deferred", "waiting-for-inputs", "backed-off"
HOOKS, TWIN = "waiting-for-hooks", "same-derivation-running"
NO_MACHINE, UNAVAILABLE, NEXT = "no-machine", "machines-unavailable", "starts-next"
NO_COORDINATOR = "no-coordinator"
REASONS = (DEFERRED, INPUTS, BACKED_OFF, HOOKS, TWIN, NO_MACHINE, UNAVAILABLE, NO_COORDINATOR,
           NEXT)
# Machine statuses (MachineReport.status) in which a machine takes no new build now.
FREE, BUSY, STOPPED = "free", "busy", "stopped"
STALE_AFTER = 120.0  # seconds after which a machine report is shown with its age
INPUTS_SHOWN = 20


@dataclass(frozen=True, slots=True)
class MachineReport:
    """What `run` knows of one machine: what it offers and what it is doing."""

    name: str
    systems: tuple[str, ...]
    features: frozenset[str]
    tags: frozenset[str]  # KEY=VALUE words
    store_dir: str
    slots: int
    running: int
    status: str  # free, busy, connecting, down, paused, overloaded, retiring, stopped (run)
    until: float | None = None  # down (backed off) or paused until then
    error: str | None = None

    def json(self) -> dict[str, Any]:
        return {"systems": list(self.systems), "features": sorted(self.features),
                "tags": sorted(self.tags), "store_dir": self.store_dir, "slots": self.slots,
                "running": self.running, "status": self.status, "until": self.until,
                "error": self.error}

    @staticmethod
    def of(name: str, data: Mapping[str, Any]) -> MachineReport:
        return MachineReport(
            name, tuple(data["systems"]), frozenset(data["features"]), frozenset(data["tags"]),
            data["store_dir"], data["slots"], data["running"], data["status"], data["until"],
            data["error"])

    def serves(self, system: str, features: frozenset[str], tags: frozenset[str]) -> bool:
        return system in self.systems and features <= self.features and tags <= self.tags

    def describe(self) -> str:
        """e.g. "x86-a busy (2/2)", "arm-b down until 12:00:00 UTC: connection refused"."""
        line = f"{self.name} {self.status}"
        if self.status == BUSY:
            line += f" ({self.running}/{self.slots})"
        if self.until is not None:
            line += f" until {_clock(self.until)}"
        if self.error:
            line += f": {self.error}"
        return line


def record_machines(reports: Sequence[MachineReport], now: float) -> None:
    """`run`: what it knows of its machines now (one transaction); machines it no longer has
    lose their report."""
    with database_proxy.atomic():
        names = [r.name for r in reports]
        MachineState.update(report=None, reported_at=now).where(
            MachineState.report.is_null(False) & MachineState.name.not_in(names)).execute()
        for report in reports:
            text = json.dumps(report.json(), sort_keys=True)
            if not MachineState.update(report=text, reported_at=now).where(
                    MachineState.name == report.name).execute():
                MachineState.create(name=report.name, report=text, reported_at=now,
                                    updated_at=now)


def note_machine(name: str, error: str | None, backoff_until: float | None) -> None:
    """What an attempt or a connection found of a machine: its error and backoff, and its
    failures in a row (none once it worked)."""
    now = time.time()
    with database_proxy.atomic():
        state = MachineState.get_or_none(MachineState.name == name)
        failures = 0 if error is None else (state.failures if state else 0) + 1
        fields = {"last_error": error, "backoff_until": backoff_until, "failures": failures,
                  "updated_at": now}
        if state is None:
            MachineState.create(name=name, **fields)
        else:
            MachineState.update(**fields).where(MachineState.name == name).execute()

def stopped(now: float) -> None:
    """`run` stops: its machines take no build until it runs again."""
    with database_proxy.atomic():
        for row in MachineState.select().where(MachineState.report.is_null(False)):
            data = json.loads(row.report or "{}")
            data.update(status=STOPPED, until=None, error=None, running=0)
            MachineState.update(report=json.dumps(data, sort_keys=True), reported_at=now).where(
                MachineState.name == row.name).execute()


def machine_reports() -> tuple[list[MachineReport], float | None]:
    """The machines `run` last recorded, and when."""
    rows = (MachineState.select(MachineState.name, MachineState.report,
                                MachineState.reported_at)
            .where(MachineState.report.is_null(False)).order_by(MachineState.name))
    found = [MachineReport.of(r.name, json.loads(r.report or "{}")) for r in rows]
    stamps = [r.reported_at for r in rows if r.reported_at is not None]
    return found, max(stamps) if stamps else None


@dataclass(frozen=True, slots=True)
class Why:
    """The one reason a queued build is not running now."""

    reason: str  # one of REASONS
    summary: str  # one line
    until: float | None = None
    inputs: tuple[dict[str, str], ...] = ()  # {build, derivation, state}
    machines: tuple[MachineReport, ...] = ()  # those that could take it, unavailable

    def json(self) -> dict[str, Any]:
        return {"reason": self.reason, "summary": self.summary, "until": iso(self.until),
                "inputs": list(self.inputs),
                "machines": [{"name": m.name, "status": m.status, "until": iso(m.until),
                              "error": m.error} for m in self.machines]}


def iso(moment: float | None) -> str | None:
    """A moment as the datastore's readers show it: ISO 8601, UTC, to the second."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def _clock(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def why_waiting(build: Build, now: float | None = None) -> Why | None:
    """Why `build` is not running (None unless it is queued): a few indexed queries."""
    if build.state != QUEUED:
        return None
    moment = time.time() if now is None else now
    if build.defer_until is not None and build.defer_until > moment:
        return Why(DEFERRED, f"deferred until {_clock(build.defer_until)} (submit "
                   "--defer-until)", build.defer_until)
    inputs = _active_inputs(build)
    if inputs:
        shown = ", ".join(f"{i['derivation']} ({i['state']})" for i in inputs[:3])
        more = f" and {len(inputs) - 3} more" if len(inputs) > 3 else ""
        return Why(INPUTS, f"waiting for {len(inputs)} input build(s): {shown}{more}",
                   inputs=tuple(inputs[:INPUTS_SHOWN]))
    if build.retry_after is not None and build.retry_after > moment:
        return Why(BACKED_OFF, f"backed off until {_clock(build.retry_after)}: "
                   f"{_last_trouble(build)}", build.retry_after)
    if (Event.select().where((Event.build == build) & Event.delivered_at.is_null()
                             & (Event.name == "build-missing-inputs")).exists()):
        return Why(HOOKS, "waiting for its build-missing-inputs hooks to run (they submit "
                   "the inputs a machine lacked)")
    twin = (Build.select(Build.uuid).where((Build.derivation == build.derivation_id)
                                            & (Build.state == RUNNING)).first())
    if twin is not None:
        return Why(TWIN, f"build {twin.uuid} of the same derivation is running")
    store_dir = build.derivation.path.rsplit("/", 1)[0]
    return _by_machines(build.system, frozenset(build.required_features.split()),
                        frozenset(build.machine_tags.split()), store_dir, moment,
                        *machine_reports())


def _active_inputs(build: Build) -> list[dict[str, str]]:
    """The queued or running builds of its inputs (through indexes: its inputs, their
    derivations by path, their builds by derivation and state)."""
    query: Any = (
        Build.select(Build.uuid, Derivation.path, Build.state)
        .join(Derivation)
        .join(DerivationInput, on=(DerivationInput.input_path == Derivation.path))
        .where((DerivationInput.derivation == build.derivation_id)
               & Build.state.in_([QUEUED, RUNNING]))
        .order_by(Derivation.path)
        .limit(1000)
        .tuples()
    )
    return [{"build": uuid, "derivation": path, "state": state} for uuid, path, state in query]


def _last_trouble(build: Build) -> str:
    """Why the build waits: its last attempt's result and detail."""
    last = (Attempt.select(Attempt.id, Attempt.machine, Attempt.result, Attempt.detail)
            .where(Attempt.build == build).order_by(Attempt.id.desc()).first())
    if last is None:
        return "after an attempt that made no progress"
    kind = (SetupFailure.select(SetupFailure.kind).where(SetupFailure.attempt == last.id)
            .scalar())
    what = {"failure": f"its builder failed on {last.machine} (retry "
                       f"{build.builder_failures} comes next)",
            "setup-failure": f"setup failure on {last.machine}"
                             + (f" ({kind})" if kind else ""),
            "interrupted": f"its attempt on {last.machine} was cut short"}.get(
                last.result or "", f"attempt on {last.machine}")
    in_a_row = (f"; {build.fruitless_attempts} attempt(s) in a row without progress"
                if build.fruitless_attempts else "")
    detail = f": {last.detail}" if last.detail else ""
    return f"{what}{detail}{in_a_row}"


def _by_machines(system: str, features: frozenset[str], tags: frozenset[str],
                 store_dir: str | None, now: float, reports: Sequence[MachineReport],
                 reported_at: float | None) -> Why:
    if not reports:
        return Why(NO_COORDINATOR, "no machine recorded: `buildfarm run` has not run with "
                   "this datastore since it learned to record them")
    stale = (f" (as `buildfarm run` recorded at {_clock(reported_at)})"
             if reported_at is not None and now - reported_at > STALE_AFTER else "")
    missing = _what_no_machine_serves(reports, system, features, tags, store_dir)
    if missing is not None:
        return Why(NO_MACHINE, f"no machine in the inventory {missing}{stale}")
    if all(m.status == STOPPED for m in reports) and reported_at is not None:
        return Why(NO_COORDINATOR, "`buildfarm run` is not running: it stopped at "
                   f"{_clock(reported_at)}")
    able = [m for m in reports if m.serves(system, features, tags)
            and (store_dir is None or m.store_dir == store_dir)]
    free = [m for m in able if m.status == FREE]
    if free:
        return Why(NEXT, "ready: it starts at the next allocation unless builds of higher "
                   f"priority take the free slots ({', '.join(m.name for m in free)}){stale}")
    soonest = min((m.until for m in able if m.until is not None), default=None)
    return Why(UNAVAILABLE, "every machine that could take it is busy, down or backed off: "
               + "; ".join(m.describe() for m in able) + stale, soonest, machines=tuple(able))


def _what_no_machine_serves(reports: Sequence[MachineReport], system: str,
                            features: frozenset[str], tags: frozenset[str],
                            store_dir: str | None) -> str | None:
    """What no recorded machine offers ("builds for aarch64-linux", ...), or None."""
    able = [m for m in reports if system in m.systems]
    if not able:
        return f"builds for {system}"
    able = [m for m in able if features <= m.features]
    if not able:
        return f"for {system} offers the features {' '.join(sorted(features))}"
    able = [m for m in able if tags <= m.tags]
    if not able:
        return f"for {system} carries the machine tags {' '.join(sorted(tags))}"
    if store_dir is not None and not any(m.store_dir == store_dir for m in able):
        return f"for {system} has the store {store_dir}"
    return None


# --- the queue by reason --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Group:
    reason: str
    system: str
    count: int
    oldest: float
    detail: str  # what no machine serves, or the machines unavailable

    def json(self) -> dict[str, Any]:
        return {"reason": self.reason, "system": self.system, "count": self.count,
                "oldest": iso(self.oldest), "detail": self.detail}


# One pass over the covering index build_waiting (state, system, waiting_on, required_features,
# machine_tags, defer_until, retry_after, created_at), grouped in its own order (no sort): per
# group, the deferred builds, and among the others those backed off, each with the oldest.
_SUMMARY = """
SELECT b.system, b.waiting_on, b.required_features, b.machine_tags, COUNT(*),
  SUM(CASE WHEN b.defer_until > {p} THEN 1 ELSE 0 END),
  MIN(CASE WHEN b.defer_until > {p} THEN b.created_at END),
  SUM(CASE WHEN b.defer_until > {p} THEN 0 WHEN b.retry_after > {p} THEN 1 ELSE 0 END),
  MIN(CASE WHEN b.defer_until > {p} THEN NULL WHEN b.retry_after > {p} THEN b.created_at END),
  MIN(CASE WHEN b.defer_until > {p} OR b.retry_after > {p} THEN NULL ELSE b.created_at END)
FROM build AS b WHERE b.state = 'queued'
GROUP BY b.system, b.waiting_on, b.required_features, b.machine_tags
"""


def _earliest(*moments: float | None) -> float | None:
    known = [m for m in moments if m is not None]
    return min(known) if known else None


def summary(now: float | None = None) -> list[Group]:
    """The queued builds by reason and system (the machines' reasons from what `run` recorded;
    store directories are not told apart here), largest groups first."""
    moment = time.time() if now is None else now
    db = database_proxy.obj
    rows = db.execute_sql(_SUMMARY.format(p=db.param), (moment,) * 8).fetchall()
    machines = machine_reports()
    merged: dict[tuple[str, str, str], list[Any]] = {}  # (reason, system, detail)

    def add(reason: str, system: str, detail: str, count: int, oldest: float | None) -> None:
        if count and oldest is not None:
            entry = merged.setdefault((reason, system, detail), [0, oldest])
            entry[0] += count
            entry[1] = min(entry[1], oldest)

    for (system, waiting_on, features, tags, count, deferred, deferred_oldest, backed,
         backed_oldest, rest_oldest) in rows:
        add(DEFERRED, system, "submit --defer-until", int(deferred or 0), deferred_oldest)
        rest = count - int(deferred or 0)
        if waiting_on:
            add(INPUTS, system, "", rest, _earliest(backed_oldest, rest_oldest))
            continue
        add(BACKED_OFF, system, "after attempts without progress or a failure retried",
            int(backed or 0), backed_oldest)
        found = _by_machines(system, frozenset(features.split()), frozenset(tags.split()), None,
                             moment, *machines)
        detail = "; ".join(m.describe() for m in found.machines) if found.machines else (
            found.summary if found.reason != NEXT else "")
        add(found.reason, system, detail, rest - int(backed or 0), rest_oldest)
    groups = [Group(r, s, int(c), o, d) for (r, s, d), (c, o) in merged.items()]
    return sorted(groups, key=lambda g: (-g.count, g.reason, g.system))


__all__ = ["REASONS", "Group", "MachineReport", "Why", "machine_reports", "record_machines",
           "stopped", "summary", "why_waiting"]
