"""Recording what happens to an attempt: each step, and how it ends (one transaction each)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from . import events
from .models import (
    CANCELED,
    FAILED,
    FAILURE,
    INTERRUPTED,
    MISSING_INPUTS,
    QUEUED,
    RUNNING,
    SETUP_FAILURE,
    SUCCEEDED,
    SUCCESS,
    Attempt,
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
    signature: str | None
    file: str


def step(
    attempt_id: int, name: str, detail: str | None = None, *,
    skipped: Sequence[tuple[str, str]] = (), log_path: str | None = None,
) -> None:
    """Start step `name`, after the `skipped` ones (name, why), recorded as taking no time;
    `log_path` names the attempt's log from now on."""
    now = time.time()
    with database_proxy.atomic():
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


def succeed(attempt_id: int, records: Sequence[OutputRecord], log_path: str | None) -> None:
    now = time.time()
    with database_proxy.atomic():
        attempt = Attempt.get_by_id(attempt_id)
        record_outputs(records, now)
        _close(attempt, SUCCESS, now, exit_status=0, log_path=log_path)
        build = attempt.build
        if build.state == RUNNING:
            build.state, build.ended_at = SUCCEEDED, now
            build.save()
        # Builds that waited for this one after a missing-inputs failure may go now.
        waiting = (
            Derivation.select(Derivation.id)
            .join(DerivationInput, on=(DerivationInput.derivation == Derivation.id))
            .where(DerivationInput.input_path == build.derivation.path)
        )
        Build.update(retry_after=None).where(
            (Build.state == QUEUED) & Build.retry_after.is_null(False)
            & Build.derivation.in_(waiting)
        ).execute()
        events.record(
            "build-success",
            build,
            machine=attempt.machine,
            attempt=attempt.id,
            log=log_path,
            outputs={r.path: r.nar_hash for r in records},
        )


def fail(attempt_id: int, exit_status: int | None, reason: str, log_path: str | None) -> list[str]:
    """The builder failed: the build ends failed, and so does every queued build waiting on it.
    Returns the UUIDs of those dependants."""
    now = time.time()
    with database_proxy.atomic():
        attempt = Attempt.get_by_id(attempt_id)
        _close(attempt, FAILURE, now, exit_status=exit_status, detail=reason, log_path=log_path)
        build = attempt.build
        if build.state == RUNNING:
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
        return fail_dependants(build.derivation.path, now)


def fail_dependants(drv_path: str, now: float) -> list[str]:
    """Queued builds that need `drv_path` (directly or through other queued builds) can never
    succeed: end them `failed` with reason dependency-failed naming it."""
    failed: list[str] = []
    todo = [drv_path]
    while todo:
        path = todo.pop()
        waiting = (
            Build.select()
            .join(Derivation)
            .join(DerivationInput, on=(DerivationInput.derivation == Derivation.id))
            .where((DerivationInput.input_path == path) & (Build.state == QUEUED))
        )
        for build in waiting:
            build.state, build.ended_at = FAILED, now
            build.reason = f"dependency-failed: {path}"
            build.save()
            events.record(
                "build-failure", build, machine=None, attempt=None, log=None,
                result={"exit_status": None, "reason": build.reason},
            )
            failed.append(build.uuid)
            todo.append(build.derivation.path)
    return failed


def _failed_since(drv_paths: Sequence[str], since: float) -> str | None:
    """The first of these derivations whose latest build failed after `since`, if any."""
    for path in drv_paths:
        latest = (
            Build.select(Build.state, Build.ended_at)
            .join(Derivation)
            .where(Derivation.path == path)
            .order_by(Build.id.desc())
            .first()
        )
        if latest is not None and latest.state == FAILED and (latest.ended_at or 0) >= since:
            return path
    return None


def setup_failure(
    attempt_id: int, kind: str, paths: Sequence[str], detail: str, defer_seconds: float
) -> None:
    """The machine could not start the build: the build waits a little, then is queued again."""
    now = time.time()
    with database_proxy.atomic():
        attempt = Attempt.get_by_id(attempt_id)
        _close(attempt, SETUP_FAILURE, now, detail=detail)
        failure = SetupFailure.create(attempt=attempt, kind=kind)
        if paths:
            MissingInput.insert_many(
                [{"setup_failure": failure.id, "path": p} for p in paths]
            ).execute()
        build = attempt.build
        if build.state == RUNNING:
            build.state, build.retry_after = QUEUED, now + defer_seconds
            build.save()
        if kind == MISSING_INPUTS:
            from .closure import derivations_of

            producers = derivations_of(paths)
            needed = {p if p.endswith(".drv") else producers.get(p) for p in paths}
            failed_input = _failed_since(sorted(d for d in needed if d), build.created_at)
            if failed_input is not None and build.state == QUEUED:
                # An input's build failed while this one waited: resubmitting it would loop.
                build.state, build.ended_at = FAILED, now
                build.reason = f"dependency-failed: {failed_input}"
                build.save()
                events.record(
                    "build-failure", build, machine=attempt.machine, attempt=attempt.id,
                    log=None, result={"exit_status": None, "reason": build.reason},
                )
                fail_dependants(build.derivation.path, now)
                return
            events.record(
                "build-missing-inputs",
                build,
                machine=attempt.machine,
                attempt=attempt.id,
                missing_inputs=[
                    {
                        "path": p,
                        "derivation": p if p.endswith(".drv") else producers.get(p),
                    }
                    for p in paths
                ],
            )


def interrupt(attempt_id: int, detail: str, defer_seconds: float | None = None) -> None:
    """Connection lost, coordinator stopping, or canceled: a running build is queued again
    (not before `defer_seconds` from now, if given)."""
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
