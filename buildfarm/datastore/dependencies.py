"""What a derivation's builds mean for the builds that need it.

- **Reuse**: which existing build stands for a derivation (queued or running, succeeded,
  failed), and whether the output store holds its outputs, whatever .drv produced them.
- **Failures remembered**: a build whose input's latest build failed (and that nothing else
  will provide) is dependency-failed at once, naming the **root cause**: the failed build at
  the bottom of the chain, which every build it blocks records (`build.cause_id`).
- **Priorities inherited**: the queued or running builds a build needs get at least its
  priority, whenever it is submitted or raised.

Every function here runs inside its caller's transaction and reads in batches (a closure has
thousands of derivations).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import events
from .bulk import chunks
from .models import (
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Build,
    Derivation,
    DerivationInput,
    database_proxy,
)

ACTIVE = (QUEUED, RUNNING)
DEPENDENCY_FAILED = "dependency-failed"


@dataclass(frozen=True, slots=True)
class Cause:
    """A failed build that others depend on: the root cause they name."""

    id: int
    uuid: str
    derivation: str

    def reason(self, via: str | None = None) -> str:
        """The reason of a build it makes dependency-failed (through input `via`)."""
        text = f"{DEPENDENCY_FAILED}: {self.derivation} (build {self.uuid})"
        return text if via is None or via == self.derivation else f"{text} via {via}"


@dataclass(slots=True)
class Builds:
    """One derivation's builds, as far as reusing them goes."""

    active: str | None = None  # the oldest queued or running build
    built: str | None = None  # the oldest queued, running or succeeded build
    failed: Cause | None = None  # the root cause, when the latest build (not canceled) failed
    latest_uuid: str | None = None  # that latest build


@dataclass(slots=True)
class Known:
    """What the datastore knows of some derivations and their outputs."""

    builds: dict[str, Builds] = field(default_factory=dict)  # by derivation path
    outputs: dict[str, list[str]] = field(default_factory=dict)  # derivation -> output paths
    held: set[str] = field(default_factory=set)  # output paths in the output store

    def of(self, path: str) -> Builds:
        return self.builds.get(path) or Builds()

    def outputs_held(self, path: str) -> bool:
        """Whether the output store holds every output of derivation `path`."""
        paths = self.outputs.get(path, [])
        return bool(paths) and all(p in self.held for p in paths)

    def known_build(self, path: str) -> bool:
        """Whether derivation `path` has a build (canceled ones aside) or held outputs."""
        return self.of(path).latest_uuid is not None or self.outputs_held(path)

    def blocker(self, path: str) -> Cause | None:
        """The root cause that keeps a build needing derivation `path` from ever running: its
        latest build failed, none is queued or running, and its outputs are not held."""
        builds = self.of(path)
        if builds.active is not None or builds.failed is None or self.outputs_held(path):
            return None
        return builds.failed


def _marks(count: int) -> str:
    return ", ".join([database_proxy.obj.param] * count)


def known(paths: Iterable[str], outputs: dict[str, list[str]] | None = None) -> Known:
    """The builds of derivations `paths`, their outputs (those of `outputs` given, the rest
    read), and which of those the output store holds."""
    db = database_proxy.obj
    wanted = list(dict.fromkeys(paths))
    found = Known(outputs=dict(outputs or {}))
    for chunk in chunks(wanted):
        rows = db.execute_sql(
            "SELECT d.path, b.uuid, b.state, b.id, c.id, c.uuid, cd.path FROM build AS b"
            " JOIN derivation AS d ON d.id = b.derivation_id"
            " LEFT JOIN build AS c ON c.id = b.cause_id"
            " LEFT JOIN derivation AS cd ON cd.id = c.derivation_id"
            f" WHERE d.path IN ({_marks(len(chunk))}) ORDER BY b.id",
            tuple(chunk),
        ).fetchall()
        for path, uuid, state, build_id, cause_id, cause_uuid, cause_path in rows:
            builds = found.builds.setdefault(path, Builds())
            if state in ACTIVE and builds.active is None:
                builds.active = uuid
            if (state in ACTIVE or state == SUCCEEDED) and builds.built is None:
                builds.built = uuid
            if state != CANCELED:
                builds.latest_uuid = uuid
                builds.failed = None
                if state == FAILED:
                    builds.failed = (Cause(cause_id, cause_uuid, cause_path) if cause_id
                                     else Cause(build_id, uuid, path))
    unread = [p for p in wanted if p not in found.outputs]
    for chunk in chunks(unread):
        rows = db.execute_sql(
            "SELECT d.path, o.path FROM derivation_output AS o"
            " JOIN derivation AS d ON d.id = o.derivation_id"
            f" WHERE d.path IN ({_marks(len(chunk))})",
            tuple(chunk),
        ).fetchall()
        for drv_path, output_path in rows:
            found.outputs.setdefault(drv_path, []).append(output_path)
    every_output = [p for path in wanted for p in found.outputs.get(path, ())]
    for chunk in chunks(every_output):
        rows = db.execute_sql(
            f"SELECT path FROM stored_output WHERE path IN ({_marks(len(chunk))})", tuple(chunk)
        ).fetchall()
        found.held.update(path for (path,) in rows)
    return found


def succeeded_producer(output_paths: Sequence[str]) -> str | None:
    """The UUID of the oldest succeeded build of a derivation with these outputs (any .drv)."""
    if not output_paths:
        return None
    db = database_proxy.obj
    row = db.execute_sql(
        "SELECT b.uuid FROM derivation_output AS o JOIN build AS b"
        " ON b.derivation_id = o.derivation_id"
        f" WHERE o.path = {db.param} AND b.state = 'succeeded' ORDER BY b.id LIMIT 1",
        (output_paths[0],),
    ).fetchone()
    return None if row is None else str(row[0])


def raise_priorities(drv_paths: Iterable[str], priority: int) -> int:
    """Give the queued or running builds of derivations `drv_paths`, and those their inputs
    have (through other such builds), at least `priority`; return how many were raised. A
    build already at `priority` or more is passed by: its inputs got its priority with it."""
    db = database_proxy.obj
    raised = 0
    seen: set[str] = set()
    level = list(dict.fromkeys(drv_paths))
    while level:
        seen.update(level)
        lower: dict[int, int] = {}  # build id -> its derivation's id
        for chunk in chunks(level):
            rows = db.execute_sql(
                "SELECT b.id, b.derivation_id FROM build AS b"
                " JOIN derivation AS d ON d.id = b.derivation_id"
                f" WHERE d.path IN ({_marks(len(chunk))})"
                f" AND b.state IN ('queued', 'running') AND b.priority < {db.param}",
                (*chunk, priority),
            ).fetchall()
            lower.update(rows)
        ids = list(lower)
        for chunk in chunks(ids):
            Build.update(priority=priority).where(Build.id.in_(list(chunk))).execute()
        raised += len(ids)
        inputs: set[str] = set()
        for chunk in chunks(list(set(lower.values()))):
            rows = db.execute_sql(
                "SELECT input_path FROM derivation_input"
                f" WHERE derivation_id IN ({_marks(len(chunk))})",
                tuple(chunk),
            ).fetchall()
            inputs.update(path for (path,) in rows)
        level = [p for p in inputs if p not in seen]
    return raised


def cause_of(build: Build) -> Cause:
    """The root cause a failed build stands for: itself, or what made it dependency-failed."""
    if build.cause_id is None:
        return Cause(build.id, build.uuid, build.derivation.path)
    root: Build = Build.select(Build, Derivation).join(Derivation).where(
        Build.id == build.cause_id).get()
    return Cause(root.id, root.uuid, root.derivation.path)


def end_dependency_failed(build: Build, cause: Cause, via: str | None, now: float,
                          **event: Any) -> None:
    """End queued `build` failed because of `cause`, with its build-failure event."""
    build.state, build.ended_at = FAILED, now
    build.reason = cause.reason(via)
    build.cause = cause.id
    build.save()
    events.record(
        "build-failure", build, **{"machine": None, "attempt": None, "log": None, **event},
        result={"exit_status": None, "reason": build.reason},
    )


def fail_dependants(failed: Build, now: float) -> list[str]:
    """Queued builds that need `failed`'s derivation, directly or through other queued builds
    that now cannot run, end dependency-failed naming its root cause; return their UUIDs. A
    derivation with another queued or running build, or whose outputs the output store holds
    (a failed rebuild), blocks nothing."""
    db = database_proxy.obj
    cause = cause_of(failed)
    ended: list[str] = []
    level = [failed.derivation.path]
    while level:
        facts = known(level)
        blocking = [p for p in dict.fromkeys(level) if facts.blocker(p) is not None]
        waiting: dict[int, str] = {}  # queued build id -> the blocking input it needs
        for chunk in chunks(blocking):
            rows = db.execute_sql(
                "SELECT b.id, i.input_path FROM derivation_input AS i"
                " JOIN build AS b ON b.derivation_id = i.derivation_id"
                f" WHERE i.input_path IN ({_marks(len(chunk))}) AND b.state = 'queued'"
                " ORDER BY b.id, i.input_path",
                tuple(chunk),
            ).fetchall()
            for build_id, input_path in rows:
                waiting.setdefault(build_id, input_path)
        level = []
        for build_id, via in waiting.items():
            build = Build.select(Build, Derivation).join(Derivation).where(
                (Build.id == build_id) & (Build.state == QUEUED)).first()
            if build is None:
                continue
            end_dependency_failed(build, cause, via, now)
            ended.append(build.uuid)
            level.append(build.derivation.path)
    return ended


def caused_by(build_id: int) -> list[Build]:
    """The builds `build_id`'s failure made dependency-failed, oldest first."""
    return list(Build.select().where(
        (Build.cause == build_id) & (Build.state == FAILED)).order_by(Build.id))


def requeue(builds: Sequence[Build], now: float) -> list[str]:
    """Failed builds go back to the queue (their attempts stay), each with a build-submitted
    event; one whose input still cannot be provided ends dependency-failed again at once.
    Returns the UUIDs of those."""
    for build in builds:
        build.state, build.reason, build.cause = QUEUED, None, None
        build.ended_at = build.retry_after = None
        build.fruitless_attempts = 0
        build.save()
        events.record("build-submitted", build)
    inputs: dict[int, list[str]] = {}
    query: Any = (
        Build.select(Build.id, DerivationInput.input_path)
        .join(DerivationInput, on=(DerivationInput.derivation == Build.derivation))
        .where(Build.id.in_([b.id for b in builds]))
        .order_by(Build.id, DerivationInput.input_path)
        .tuples()
    )
    for build_id, input_path in query:
        inputs.setdefault(build_id, []).append(input_path)
    facts = known(p for paths in inputs.values() for p in paths)
    blocked: list[str] = []
    for build in builds:
        if build.uuid in blocked:
            continue
        for input_path in inputs.get(build.id, ()):
            cause = facts.blocker(input_path)
            if cause is not None:
                end_dependency_failed(build, cause, input_path, now)
                blocked += [build.uuid, *fail_dependants(build, now)]
                break
    return blocked
