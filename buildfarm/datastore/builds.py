"""Queries about builds: list, show, cancel, reprioritise, retry (submissions are recorded by
submissions.py, whose API is offered here too)."""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from buildfarm.errors import NotFoundError, UsageError

from . import dependencies, events, waiting
from .bulk import chunks
from .models import (
    CANCELED,
    FAILED,
    FINAL_STATES,
    IDENTICAL,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Attempt,
    AttemptInput,
    AttemptStep,
    Build,
    BuildTag,
    Derivation,
    DerivationInput,
    DerivationOutput,
    MissingInput,
    SetupFailure,
    database_proxy,
)
from .submissions import ReadDerivation, SubmitOptions, Submitted, record_submission
from .waiting import iso

__all__ = [
    "LogState", "ReadDerivation", "SubmitOptions", "Submitted", "cancel_builds", "cause_json",
    "get_build", "iso", "list_builds", "log_state", "record_submission", "reproducible",
    "resolve_uuid", "retry_builds",
    "set_priority", "show_build",
]


UUID_PREFIX_MIN = 8  # characters of a UUID that may name a build (the live view shows 8)
_DASHES = (8, 12, 16, 20)  # where a UUID's 32 hexadecimal digits are cut by dashes
_HEX = frozenset("0123456789abcdef")


def resolve_uuid(text: str) -> str:
    """The UUID of the one build `text` names: its whole UUID, or the first UUID_PREFIX_MIN or
    more of its characters (dashes optional). Unknown or ambiguous: NotFoundError."""
    word = text.strip().lower()
    try:
        return str(uuidlib.UUID(word))
    except ValueError:
        pass
    digits = word.replace("-", "")
    if not UUID_PREFIX_MIN <= len(digits) < 32 or not set(digits) <= _HEX:
        raise NotFoundError(
            f"{text!r} is not a build UUID, nor its first {UUID_PREFIX_MIN} or more characters"
        )
    prefix = "".join(("-" if i in _DASHES else "") + c for i, c in enumerate(digits))
    # An index range on both engines and in any collation: after the prefix come only hex
    # digits and dashes, which sort before "z".
    query = (Build.select(Build.uuid)
             .where((Build.uuid >= prefix) & (Build.uuid < prefix + "z"))
             .order_by(Build.uuid).limit(2))
    found = [b.uuid for b in query if b.uuid.startswith(prefix)]
    if not found:
        raise NotFoundError(f"no build's UUID starts with {prefix}")
    if len(found) > 1:
        raise NotFoundError(
            f"{prefix} starts the UUIDs of several builds ({', '.join(found[:2])}, …): "
            "give more of it"
        )
    return found[0]


def get_build(uuid: str) -> Build:
    """The build a UUID or a unique prefix of one names (see resolve_uuid)."""
    key = resolve_uuid(uuid)
    build = Build.get_or_none(Build.uuid == key)
    if build is None:
        raise NotFoundError(f"no build with UUID {key}")
    return build


def list_builds(
    *,
    state: str | None = None,
    tags: Sequence[tuple[str, str]] = (),
    system: str | None = None,
    limit: int = 50,
    flaky: bool = False,
) -> list[dict[str, Any]]:
    """Newest first; every filter is served by an index (`flaky`: succeeded after a builder
    failure, by the partial index build_flaky)."""
    query = Build.select(Build, Derivation.path).join(Derivation)
    if flaky:
        query = query.where((Build.state == SUCCEEDED) & (Build.builder_failures > 0))
    if state is not None:
        query = query.where(Build.state == state)
    if system is not None:
        query = query.where(Build.system == system)
    for key, value in tags:
        tagged = BuildTag.select(BuildTag.build).where(
            (BuildTag.key == key) & (BuildTag.value == value)
        )
        query = query.where(Build.id.in_(tagged))
    rows = list(query.order_by(Build.created_at.desc(), Build.id.desc()).limit(limit))
    tag_map: dict[int, dict[str, str]] = {r.id: {} for r in rows}
    if rows:
        for tag in BuildTag.select().where(BuildTag.build.in_(list(tag_map))):
            tag_map[tag.build_id][tag.key] = tag.value
    return [
        {
            "uuid": b.uuid,
            "derivation": b.derivation.path,
            "system": b.system,
            "state": b.state,
            "priority": b.priority,
            "tags": tag_map[b.id],
            "created_at": iso(b.created_at),
            "ended_at": iso(b.ended_at),
            "reason": b.reason,
        }
        for b in rows
    ]


def _attempts_json(build: Build) -> list[dict[str, Any]]:
    """The build's attempts, oldest first, each with its steps, setup failure, missing inputs
    and where its inputs came from: five queries whatever the number of attempts."""
    attempts = list(build.attempts.order_by(Attempt.id))
    ids = [a.id for a in attempts]
    steps: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    failures: dict[int, tuple[int, str]] = {}  # attempt id -> (setup failure id, kind)
    missing: dict[int, list[str]] = {}
    sources: dict[int, list[dict[str, str]]] = {}
    if ids:
        query: Any = (
            AttemptStep.select(AttemptStep.attempt, AttemptStep.name, AttemptStep.started_at,
                               AttemptStep.ended_at, AttemptStep.detail)
            .where(AttemptStep.attempt.in_(ids))
            .order_by(AttemptStep.id)
            .tuples()
        )
        for attempt_id, name, started_at, ended_at, detail in query:
            steps[attempt_id].append({
                "name": name,
                "started_at": iso(started_at),
                "ended_at": iso(ended_at),
                "detail": detail,
            })
        query = (
            SetupFailure.select(SetupFailure.id, SetupFailure.attempt, SetupFailure.kind)
            .where(SetupFailure.attempt.in_(ids))
            .order_by(SetupFailure.id.desc())
            .tuples()
        )
        for failure_id, attempt_id, kind in query:
            failures[attempt_id] = (failure_id, kind)  # an attempt's first one, as before
        by_failure = {failure_id: a for a, (failure_id, _) in failures.items()}
        if by_failure:
            query = (
                MissingInput.select(MissingInput.setup_failure, MissingInput.path)
                .where(MissingInput.setup_failure.in_(list(by_failure)))
                .order_by(MissingInput.id)
                .tuples()
            )
            for failure_id, path in query:
                missing.setdefault(by_failure[failure_id], []).append(path)
        query = (
            AttemptInput.select(AttemptInput.attempt, AttemptInput.path, AttemptInput.source)
            .where(AttemptInput.attempt.in_(ids))
            .order_by(AttemptInput.id)
            .tuples()
        )
        for attempt_id, path, source in query:
            sources.setdefault(attempt_id, []).append({"path": path, "source": source})
    return [
        {
            "machine": a.machine,
            "started_at": iso(a.started_at),
            "ended_at": iso(a.ended_at),
            "result": a.result,
            "step": a.step,
            "exit_status": a.exit_status,
            "detail": a.detail,
            "setup_failure": failures[a.id][1] if a.id in failures else None,
            "missing_inputs": missing.get(a.id, []),
            "input_sources": sources.get(a.id, []),
            "log": a.log_path,
            "check": a.check_result,
            "steps": steps[a.id],
        }
        for a in attempts
    ]


def _newest_builds(drv_paths: Sequence[str]) -> dict[str, tuple[str, str]]:
    """derivation path -> (UUID, state) of its newest build, for those that have one."""
    found: dict[str, tuple[str, str]] = {}
    for chunk in chunks(list(drv_paths)):
        query: Any = (
            Build.select(Derivation.path, Build.uuid, Build.state)
            .join(Derivation)
            .where(Derivation.path.in_(list(chunk)))
            .order_by(Build.id)
            .tuples()
        )
        for path, uuid, state in query:
            found[path] = (uuid, state)
    return found


def cause_json(build: Build) -> dict[str, str] | None:
    """The root cause of a dependency-failed build: the failed build and its derivation."""
    if build.cause_id is None:
        return None
    cause = dependencies.cause_of(build)
    return {"build": cause.uuid, "derivation": cause.derivation}


def reproducible(build: Build) -> bool | None:
    """What the latest rebuild with --check of a succeeded build found: true when identical,
    false when it differed from the outputs the machine held, null when none was compared."""
    checked = (
        Attempt.select(Attempt.check_result)
        .where((Attempt.build == build) & Attempt.check_result.is_null(False))
        .order_by(Attempt.id.desc())
        .first()
    )
    return None if checked is None else checked.check_result == IDENTICAL


def show_build(uuid: str) -> dict[str, Any]:
    build = get_build(uuid)
    drv = build.derivation
    outputs = {o.name: o.path for o in drv.outputs.order_by(DerivationOutput.name)}
    rows = list(drv.inputs.order_by(DerivationInput.input_path))
    newest = _newest_builds([row.input_path for row in rows])
    inputs = [
        {
            "derivation": row.input_path,
            "outputs": row.outputs.split(),
            "build": newest[row.input_path][0] if row.input_path in newest else None,
            "state": newest[row.input_path][1] if row.input_path in newest else None,
        }
        for row in rows
    ]
    return {
        "uuid": build.uuid,
        "derivation": drv.path,
        "system": build.system,
        "required_features": build.required_features.split(),
        "machine_tags": dict(word.split("=", 1) for word in build.machine_tags.split()),
        "state": build.state,
        "reason": build.reason,
        "cause": cause_json(build),
        "reproducible": reproducible(build),
        "retries": build.retries,
        "builder_failures": build.builder_failures,
        "flaky": build.state == SUCCEEDED and build.builder_failures > 0,
        "priority": build.priority,
        "tags": {t.key: t.value for t in build.tags.order_by(BuildTag.key)},
        "outputs": outputs,
        "inputs": inputs,
        "created_at": iso(build.created_at),
        "defer_until": iso(build.defer_until),
        "started_at": iso(build.started_at),
        "ended_at": iso(build.ended_at),
        "waiting": why.json() if (why := waiting.why_waiting(build)) is not None else None,
        "attempts": _attempts_json(build),
    }


def _builds_named(texts: Sequence[str], refused: list[str]) -> Iterator[Build]:
    """The build each UUID (or unique prefix) names; why not, in `refused`, for the others."""
    for text in texts:
        try:
            yield get_build(text)
        except NotFoundError as e:
            refused.append(str(e))


def cancel_builds(uuids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Cancel every queued or running build named (a running one is stopped by the
    coordinator), in one transaction: the UUIDs canceled, and why each other could not be."""
    canceled: list[str] = []
    refused: list[str] = []
    with database_proxy.atomic():
        for build in _builds_named(uuids, refused):
            if build.uuid in canceled:
                continue
            if build.state in FINAL_STATES:
                refused.append(f"build {build.uuid} cannot be canceled: it is {build.state}")
                continue
            build.state = CANCELED
            build.ended_at = time.time()
            build.reason = "canceled by a user"
            build.save()
            events.record("build-canceled", build)
            canceled.append(build.uuid)
    return canceled, refused


def set_priority(uuid: str, priority: int) -> tuple[str, int, int]:
    """Set a queued or running build's priority; the queued or running builds it needs get at
    least as much (they keep theirs when it is lowered). Returns its UUID, the priority it had
    and how many of those inputs were raised."""
    with database_proxy.atomic():
        build = get_build(uuid)
        if build.state in FINAL_STATES:
            raise UsageError(f"build {build.uuid} is {build.state}: its priority no longer matters")
        before = build.priority
        build.priority = priority
        build.save()
        inputs = [i.input_path for i in build.derivation.inputs]
        raised = dependencies.raise_priorities(inputs, priority)
        return build.uuid, before, raised


def retry_builds(uuids: Sequence[str], dependants: bool = False) -> tuple[list[str], list[str]]:
    """Queue failed builds again (each keeps its UUID and attempts), and with `dependants` the
    builds their failure made dependency-failed. Returns the UUIDs queued again and, for each
    build that cannot be retried, one line saying why; those queued again but dependency-failed
    at once (another input of theirs still failed) are named there too."""
    now = time.time()
    retried: list[Build] = []
    refused: list[str] = []
    with database_proxy.atomic():
        for build in _builds_named(uuids, refused):
            if build.state != FAILED:
                refused.append(f"build {build.uuid} is {build.state}: only a failed build is "
                               "retried")
            elif build.cause_id is not None:
                cause = dependencies.cause_of(build)
                refused.append(
                    f"build {build.uuid} is {dependencies.DEPENDENCY_FAILED}: retry what it "
                    f"waits for, build {cause.uuid} ({cause.derivation}), with --dependants")
            elif build.id not in {b.id for b in retried}:
                retried.append(build)
                if dependants:
                    retried += dependencies.caused_by(build.id)
        blocked = dependencies.requeue(retried, now) if retried else []
    refused += [f"build {uuid} ended dependency-failed at once: an input it needs still failed"
                for uuid in blocked]
    return [b.uuid for b in retried], refused


@dataclass(frozen=True, slots=True)
class LogState:
    """Where a build's log is, or why it has none."""

    uuid: str
    state: str  # the build's
    reason: str | None  # the build's
    path: str | None  # the newest log of its attempts, if one was started and is still there
    running: bool  # whether the attempt that writes that log still runs
    attempt: int | None  # that attempt's id
    step: str | None  # the step of the build's open attempt, if one is open
    tried: bool  # whether the build has had any attempt

    def why_none(self) -> str:
        """Why there is no log to show: not yet, or never (and why never)."""
        head = f"build {self.uuid} has no log"
        if self.step is not None:
            return (f"{head} yet: its attempt is at step {self.step or 'allocated'} (the log "
                    "begins with the build step)")
        if self.state in (QUEUED, RUNNING):
            return f"{head} yet: it is {self.state}"
        if self.attempt is not None:
            return f"{head}: its log file is gone"
        if self.state == CANCELED:
            return f"{head}: it was canceled before " + (
                "its builder ran" if self.tried else "it ran")
        because = f": {self.reason}" if self.reason else ""
        return f"{head}: it {self.state} without running its builder{because}"


def log_state(uuid: str) -> LogState:
    """The build's newest log and whether it is still being written, or why there is none."""
    import os

    build = get_build(uuid)
    newest = (Attempt.select(Attempt.id, Attempt.result, Attempt.step, Attempt.log_path)
              .where(Attempt.build == build).order_by(Attempt.id.desc()).first())
    logged = newest if newest is None or newest.log_path is not None else (
        Attempt.select(Attempt.id, Attempt.result, Attempt.log_path)
        .where((Attempt.build == build) & Attempt.log_path.is_null(False))
        .order_by(Attempt.id.desc()).first())
    path = logged.log_path if logged is not None and os.path.exists(logged.log_path) else None
    open_attempt = newest is not None and newest.result is None
    return LogState(
        uuid=build.uuid, state=build.state, reason=build.reason, path=path,
        running=logged is not None and logged.result is None,
        attempt=logged.id if logged is not None else None,
        step=newest.step if open_attempt and newest.log_path is None else None,
        tried=newest is not None,
    )
