"""Recording what happens to an attempt: each step, and how it ends (one transaction each)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import dependencies, events
from .models import (
    CANCELED,
    FAILED,
    FAILURE,
    INTERRUPTED,
    MISSING_INPUTS,
    OUTPUTS_PRESENT,
    QUEUED,
    RUNNING,
    SETUP_FAILURE,
    SUCCEEDED,
    SUCCESS,
    Attempt,
    AttemptInput,
    AttemptStep,
    Build,
    Derivation,
    DerivationInput,
    DerivationOutput,
    MissingInput,
    SetupFailure,
    StoredOutput,
    database_proxy,
)


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """An output fetched, verified and written to the output store."""

    path: str
    deriver: str
    nar_hash: str  # "sha256:<nix-base32>"
    nar_size: int
    references: tuple[str, ...]
    signature: bytes | None  # the machine's, exactly as it wrote it (see nar.BundleItem)
    file: str


def step(
    attempt_id: int, name: str, detail: str | None = None, *,
    skipped: Sequence[tuple[str, str]] = (), log_path: str | None = None,
    inputs: Sequence[tuple[str, str]] = (),
) -> None:
    """Start step `name`, after the `skipped` ones (name, why), recorded as taking no time;
    `log_path` names the attempt's log from now on; `inputs` (path, source) say where the
    attempt's inputs came from (AttemptInput)."""
    now = time.time()
    with database_proxy.atomic():
        if inputs:
            AttemptInput.insert_many(
                [{"attempt": attempt_id, "path": p, "source": s} for p, s in inputs]
            ).execute()
        AttemptStep.update(ended_at=now).where(
            (AttemptStep.attempt == attempt_id) & AttemptStep.ended_at.is_null()
        ).execute()
        for skipped_name, why in skipped:
            AttemptStep.create(
                attempt=attempt_id, name=skipped_name, started_at=now, ended_at=now, detail=why
            )
        AttemptStep.create(attempt=attempt_id, name=name, started_at=now, detail=detail)
        fields: dict[str, str] = {"step": name}
        if log_path is not None:
            fields["log_path"] = log_path
        Attempt.update(**fields).where(Attempt.id == attempt_id).execute()


def _close(attempt: Attempt, result: str, now: float, **fields: object) -> None:
    AttemptStep.update(ended_at=now).where(
        (AttemptStep.attempt == attempt.id) & AttemptStep.ended_at.is_null()
    ).execute()
    Attempt.update(result=result, ended_at=now, **fields).where(Attempt.id == attempt.id).execute()


def record_outputs(records: Sequence[OutputRecord], now: float) -> None:
    for r in records:
        fields = {
            "deriver": r.deriver,
            "nar_hash": r.nar_hash,
            "nar_size": r.nar_size,
            "refs": " ".join(r.references),
            "signature": r.signature,
            "file": r.file,
            "last_used_at": now,
        }
        if not StoredOutput.update(**fields).where(StoredOutput.path == r.path).execute():
            StoredOutput.create(path=r.path, created_at=now, **fields)


def succeed(
    attempt_id: int, records: Sequence[OutputRecord], log_path: str | None,
    check_result: str | None = None,
) -> bool:
    """The build succeeded (`check_result`: what a rebuild with --check found). Returns
    whether it is flaky: its builder had failed before."""
    now = time.time()
    with database_proxy.atomic():
        attempt = Attempt.get_by_id(attempt_id)
        record_outputs(records, now)
        _close(attempt, SUCCESS, now, exit_status=0, log_path=log_path, check_result=check_result)
        build = attempt.build
        if build.state == RUNNING:
            build.state, build.ended_at = SUCCEEDED, now
            build.save()
        # Builds that waited for this one after a setup failure may go now: that is progress.
        waiting = (
            Derivation.select(Derivation.id)
            .join(DerivationInput, on=(DerivationInput.derivation == Derivation.id))
            .where(DerivationInput.input_path == build.derivation.path)
        )
        Build.update(retry_after=None, fruitless_attempts=0).where(
            (Build.state == QUEUED) & Build.derivation.in_(waiting)
            & (Build.retry_after.is_null(False) | (Build.fruitless_attempts > 0))
        ).execute()
        events.record(
            "build-success",
            build,
            machine=attempt.machine,
            attempt=attempt.id,
            log=log_path,
            outputs={r.path: r.nar_hash for r in records},
        )
        return build.builder_failures > 0


def fail(attempt_id: int, exit_status: int | None, reason: str, log_path: str | None) -> list[str]:
    """The builder failed: the build ends failed, and every queued build that needs it ends
    dependency-failed. Returns the UUIDs of those dependants."""
    return builder_failed(attempt_id, exit_status, reason, log_path).ended


@dataclass(frozen=True, slots=True)
class BuilderFailed:
    """How a builder failure ended: tried again (the how-many-th retry), or failed."""

    retry: int | None  # the retry this failure starts (1 for the first); None: it ended failed
    ended: list[str]  # with retry None: the UUIDs of its dependants, dependency-failed now


def builder_failed(
    attempt_id: int, exit_status: int | None, reason: str, log_path: str | None,
    retries: int = 0, retry: Retry | None = None,
) -> BuilderFailed:
    """The builder failed. While the build has retries left (its own, from submit --retries,
    or else `retries`, the farm's) it is queued again after `retry`'s wait (doubling, with
    jitter), its attempt kept as it is, and no event is recorded; otherwise it ends failed,
    and every queued build that needs it ends dependency-failed."""
    now = time.time()
    with database_proxy.atomic():
        attempt = Attempt.get_by_id(attempt_id)
        _close(attempt, FAILURE, now, exit_status=exit_status, detail=reason, log_path=log_path)
        build = attempt.build
        allowed = build.retries if build.retries is not None else retries
        if build.state == RUNNING and build.builder_failures < allowed:
            build.builder_failures += 1
            build.state, build.reason = QUEUED, None
            build.retry_after = now + (retry or Retry()).delay(build.builder_failures)
            build.save()
            return BuilderFailed(build.builder_failures, [])
        if build.state == RUNNING:
            build.builder_failures += 1
            build.state, build.ended_at, build.reason = FAILED, now, reason
            build.save()
        events.record(
            "build-failure",
            build,
            machine=attempt.machine,
            attempt=attempt.id,
            log=log_path,
            result={"exit_status": exit_status, "reason": reason},
        )
        return BuilderFailed(None, dependencies.fail_dependants(build, now))


@dataclass(frozen=True, slots=True)
class Retry:
    """How a build is tried again after an attempt that made no progress (a setup failure, a
    lost connection, a failed transfer or store command): after a wait that doubles each time,
    with jitter; after `limit` such attempts in a row it ends failed with the last reason."""

    first_delay: float = 2.0
    max_delay: float = 600.0
    limit: int = 8

    def delay(self, fruitless: int) -> float:
        """Seconds to wait after the `fruitless`-th such attempt in a row."""
        ceiling = min(self.max_delay, self.first_delay * 2.0 ** min(fruitless - 1, 60))
        return ceiling * random.uniform(0.8, 1.2)


def _requeue(build: Build, attempt: Attempt, detail: str, retry: Retry | None, now: float,
             *, wait: bool = True) -> list[str]:
    """A running build whose attempt made no progress goes back to the queue (`retry` None:
    not counted), after `retry`'s wait unless not `wait`, or ends failed at its limit. Returns
    the UUIDs of the builds that ended failed (it and its dependants)."""
    if build.state != RUNNING:
        return []
    build.state = QUEUED
    if retry is not None:
        build.fruitless_attempts += 1
        if build.fruitless_attempts >= retry.limit:
            build.state, build.ended_at = FAILED, now
            build.reason = (f"gave up after {build.fruitless_attempts} attempts in a row that "
                            f"made no progress; the last: {detail}")
            build.save()
            events.record(
                "build-failure", build, machine=attempt.machine, attempt=attempt.id, log=None,
                result={"exit_status": None, "reason": build.reason},
            )
            return [build.uuid, *dependencies.fail_dependants(build, now)]
        if wait:
            build.retry_after = now + retry.delay(build.fruitless_attempts)
    build.save()
    return []


def setup_failure(
    attempt_id: int, kind: str, paths: Sequence[str], detail: str, retry: Retry | float
) -> list[str]:
    """The machine could not start the build: the build is tried again later (`retry`, or a
    fixed wait in seconds), or ends failed. Inputs it lacks whose latest build failed, and
    that nothing else provides, make it dependency-failed at once; its other missing inputs
    are still announced (build-missing-inputs), so that they are built as `--keep-going` would.
    When every missing input is a derivation with a build already (or held outputs), there is
    nothing new to announce: the build waits for those builds. Outputs already on the machine
    (OUTPUTS_PRESENT) only send it to another machine: not counted, no wait. Returns the UUIDs
    of the builds that ended failed."""
    now = time.time()
    policy = retry if isinstance(retry, Retry) else Retry(first_delay=retry, max_delay=retry)
    with database_proxy.atomic():
        attempt = Attempt.get_by_id(attempt_id)
        _close(attempt, SETUP_FAILURE, now, detail=detail)
        failure = SetupFailure.create(attempt=attempt, kind=kind)
        if paths:
            MissingInput.insert_many(
                [{"setup_failure": failure.id, "path": p} for p in paths]
            ).execute()
        build = attempt.build
        if kind != MISSING_INPUTS:
            return _requeue(build, attempt, detail, None if kind == OUTPUTS_PRESENT else policy,
                            now)
        from .closure import derivations_of

        producers = derivations_of(paths)
        needed = sorted({d for d in (p if p.endswith(".drv") else producers.get(p)
                                     for p in paths) if d})
        facts = dependencies.known(needed)
        blockers = [(c, path) for path in needed if (c := facts.blocker(path)) is not None]
        ended: list[str] = []
        if blockers and build.state == RUNNING:
            cause, via = blockers[0]
            dependencies.end_dependency_failed(build, cause, via, now, machine=attempt.machine,
                                               attempt=attempt.id)
            ended = [build.uuid, *dependencies.fail_dependants(build, now)]
        else:
            ended = _requeue(build, attempt, detail, policy, now)
        if len(needed) == len(paths) and all(facts.known_build(d) for d in needed):
            return ended  # every one has a build already: nothing for the hooks to do
        events.record(
            "build-missing-inputs",
            build,
            machine=attempt.machine,
            attempt=attempt.id,
            missing_inputs=[
                {"path": p, "derivation": p if p.endswith(".drv") else producers.get(p)}
                for p in paths
            ],
        )
        return ended


def interrupt(attempt_id: int, detail: str, defer_seconds: float | None = None) -> None:
    """Coordinator stopping, canceled, or the coordinator's own disk: not the build's doing, so
    not counted against it; a running build is queued again (not before `defer_seconds` from
    now, if given)."""
    now = time.time()
    with database_proxy.atomic():
        attempt = Attempt.get_by_id(attempt_id)
        if attempt.result is not None:
            return
        _close(attempt, INTERRUPTED, now, detail=detail)
        later = {} if defer_seconds is None else {"retry_after": now + defer_seconds}
        Build.update(state=QUEUED, **later).where(
            (Build.id == attempt.build_id) & (Build.state == RUNNING)
        ).execute()


def retry_later(attempt_id: int, detail: str, retry: Retry, *, wait: bool = True) -> list[str]:
    """The attempt was cut short (connection lost, a transfer or store command failed, a
    corrupt nar, a bug): the build is queued again and the attempt counted against `retry`'s
    limit, at which it ends failed. It waits `retry`'s delay first unless not `wait`: a failure
    of the machine's own pauses that machine instead, and another may take the build at once.
    Returns the UUIDs of the builds that ended failed."""
    now = time.time()
    with database_proxy.atomic():
        attempt = Attempt.get_by_id(attempt_id)
        if attempt.result is not None:
            return []
        _close(attempt, INTERRUPTED, now, detail=detail)
        return _requeue(attempt.build, attempt, detail, retry, now, wait=wait)


def recover(detail: str = "coordinator stopped") -> int:
    """At start: attempts a dead coordinator left open end `interrupted`; their builds requeue."""
    now = time.time()
    with database_proxy.atomic():
        open_attempts = list(Attempt.select().where(Attempt.result.is_null()))
        for attempt in open_attempts:
            _close(attempt, INTERRUPTED, now, detail=detail)
        Build.update(state=QUEUED).where(Build.state == RUNNING).execute()
    return len(open_attempts)


def canceled(attempt_ids: Sequence[int]) -> list[int]:
    """Which of these running attempts belong to builds a user canceled."""
    if not attempt_ids:
        return []
    query = (
        Attempt.select(Attempt.id)
        .join(Build)
        .where(Attempt.id.in_(list(attempt_ids)) & (Build.state == CANCELED))
    )
    return [a.id for a in query]


def output_paths(drv_path: str) -> dict[str, str]:
    query = DerivationOutput.select().join(Derivation).where(Derivation.path == drv_path)
    return {o.name: o.path for o in query}


def failure_reasons(uuids: list[str]) -> list[tuple[str, str]]:
    """(UUID, why it failed) of the builds that ended failed with an attempt."""
    reasons: dict[str, str | None] = {}
    for start in range(0, len(uuids), 500):
        query: Any = Build.select(Build.uuid, Build.reason).where(
            Build.uuid.in_(uuids[start:start + 500])).tuples()
        reasons.update(query)
    return [(uuid, reasons.get(uuid) or "failed") for uuid in uuids]
