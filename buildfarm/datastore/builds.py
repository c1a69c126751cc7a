"""Queries about builds: record submissions, list, show, cancel, reprioritise."""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from buildfarm.errors import NotFoundError, UsageError

from . import events
from .models import (
    CANCELED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Attempt,
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

if TYPE_CHECKING:
    from buildfarm.submission import ReadDerivation, SubmitOptions, Submitted

CHUNK = 500  # rows per IN (...) or insert batch: well under SQLite's variable limit


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def _ids_by(model: Any, column: Any, keys: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in _chunks(keys):
        for key, row_id in model.select(column, model.id).where(column.in_(chunk)).tuples():
            found[key] = row_id
    return found


def _record_derivations(items: Sequence[ReadDerivation], now: float) -> dict[str, int]:
    """Insert the derivations not yet known (in batches); return path -> id for all of them."""
    unique = list({item.path: item for item in items}.values())
    ids = _ids_by(Derivation, Derivation.path, [i.path for i in unique])
    new = [i for i in unique if i.path not in ids]
    rows = [
        {
            "path": i.path,
            "system": i.drv.system,
            "required_features": " ".join(sorted(i.drv.required_features)),
            "contents": i.contents,
            "created_at": now,
        }
        for i in new
    ]
    for chunk in _chunks(rows, 100):
        Derivation.insert_many(chunk).execute()
    ids.update(_ids_by(Derivation, Derivation.path, [i.path for i in new]))
    outputs = [
        {
            "derivation": ids[i.path],
            "name": o.name,
            "path": o.path,
            "hash_algo": o.hash_algo,
            "hash": o.hash,
        }
        for i in new
        for o in i.drv.outputs
    ]
    inputs = [
        {"derivation": ids[i.path], "input_path": path, "outputs": " ".join(names)}
        for i in new
        for path, names in i.drv.input_drvs
    ]
    for chunk in _chunks(outputs, 150):
        DerivationOutput.insert_many(chunk).execute()
    for chunk in _chunks(inputs, 250):
        DerivationInput.insert_many(chunk).execute()
    return ids


def _existing_builds(derivation_ids: Sequence[int], states: Sequence[str]) -> dict[int, str]:
    """derivation id -> UUID of its oldest build in one of `states`."""
    found: dict[int, str] = {}
    for chunk in _chunks(list(derivation_ids)):
        query: Any = (
            Build.select(Build.derivation, Build.uuid)
            .where(Build.derivation.in_(chunk) & Build.state.in_(list(states)))
            .order_by(Build.id.desc())
            .tuples()
        )
        for derivation_id, uuid in query:
            found[derivation_id] = uuid
    return found


def record_submission(
    targets: Sequence[ReadDerivation],
    inputs: Sequence[ReadDerivation],
    options: SubmitOptions,
    now: float,
) -> list[Submitted]:
    """Record derivations and one build per target, with their build-submitted events, in one
    transaction and in batches (100,000 submissions must take well under a minute)."""
    from buildfarm.submission import Submitted

    reuse = (
        (QUEUED, RUNNING, SUCCEEDED)
        if options.ignore_if_built
        else (QUEUED, RUNNING)
        if options.ignore_if_queued
        else ()
    )
    tags = dict(options.tags)
    with database_proxy.atomic():
        if options.uuid is not None and Build.select().where(Build.uuid == options.uuid).exists():
            raise UsageError(f"a build with UUID {options.uuid} already exists")
        ids = _record_derivations([*targets, *inputs], now)
        existing = _existing_builds([ids[t.path] for t in targets], reuse) if reuse else {}
        results: list[Submitted] = []
        new_builds: list[dict[str, Any]] = []
        for target in targets:
            known = existing.get(ids[target.path])
            if known is not None:
                results.append(Submitted(known, target.path, created=False))
                continue
            uuid = options.uuid or str(uuidlib.uuid4())
            build: dict[str, Any] = {
                "uuid": uuid,
                "derivation": ids[target.path],
                "system": target.drv.system,
                "required_features": " ".join(sorted(target.drv.required_features)),
                "state": QUEUED,
                "priority": options.priority,
                "created_at": now,
                "defer_until": options.defer_until,
            }
            if options.ignore_if_built or options.ignore_if_queued:
                existing[ids[target.path]] = uuid  # the same DRV twice in one call
            new_builds.append(build)
            results.append(Submitted(uuid, target.path, created=True))
        for chunk in _chunks(new_builds, 100):
            Build.insert_many(chunk).execute()
        build_ids = _ids_by(Build, Build.uuid, [b["uuid"] for b in new_builds])
        if tags:
            tag_rows = [
                {"build": build_ids[b["uuid"]], "key": k, "value": v}
                for b in new_builds
                for k, v in tags.items()
            ]
            for chunk in _chunks(tag_rows, 250):
                BuildTag.insert_many(chunk).execute()
        by_path = {t.path: t for t in targets}
        payloads = []
        for result in results:
            if not result.created:
                continue
            target = by_path[result.derivation]
            summary = {
                "uuid": result.uuid,
                "derivation": result.derivation,
                "system": target.drv.system,
                "state": QUEUED,
                "priority": options.priority,
                "tags": tags,
                "outputs": target.drv.output_paths,
            }
            payloads.append((build_ids[result.uuid], summary))
        events.record_many("build-submitted", payloads, now)
    return results


def get_build(uuid: str) -> Build:
    try:
        key = str(uuidlib.UUID(uuid.strip()))
    except ValueError:
        raise NotFoundError(f"{uuid!r} is not a build UUID") from None
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
) -> list[dict[str, Any]]:
    """Newest first; every filter is served by an index."""
    query = Build.select(Build, Derivation.path).join(Derivation)
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


def _attempt_json(attempt: Attempt) -> dict[str, Any]:
    failure = SetupFailure.select().where(SetupFailure.attempt == attempt).first()
    missing = (
        [m.path for m in MissingInput.select().where(MissingInput.setup_failure == failure)]
        if failure is not None
        else []
    )
    steps = AttemptStep.select().where(AttemptStep.attempt == attempt).order_by(AttemptStep.id)
    return {
        "machine": attempt.machine,
        "started_at": iso(attempt.started_at),
        "ended_at": iso(attempt.ended_at),
        "result": attempt.result,
        "step": attempt.step,
        "exit_status": attempt.exit_status,
        "detail": attempt.detail,
        "setup_failure": failure.kind if failure is not None else None,
        "missing_inputs": missing,
        "log": attempt.log_path,
        "steps": [
            {
                "name": s.name,
                "started_at": iso(s.started_at),
                "ended_at": iso(s.ended_at),
                "detail": s.detail,
            }
            for s in steps
        ],
    }


def show_build(uuid: str) -> dict[str, Any]:
    build = get_build(uuid)
    drv = build.derivation
    outputs = {o.name: o.path for o in drv.outputs.order_by(DerivationOutput.name)}
    inputs = []
    for row in drv.inputs.order_by(DerivationInput.input_path):
        latest = (
            Build.select(Build.uuid, Build.state)
            .join(Derivation)
            .where(Derivation.path == row.input_path)
            .order_by(Build.id.desc())
            .first()
        )
        inputs.append(
            {
                "derivation": row.input_path,
                "outputs": row.outputs.split(),
                "build": latest.uuid if latest else None,
                "state": latest.state if latest else None,
            }
        )
    return {
        "uuid": build.uuid,
        "derivation": drv.path,
        "system": build.system,
        "required_features": build.required_features.split(),
        "state": build.state,
        "reason": build.reason,
        "priority": build.priority,
        "tags": {t.key: t.value for t in build.tags.order_by(BuildTag.key)},
        "outputs": outputs,
        "inputs": inputs,
        "created_at": iso(build.created_at),
        "defer_until": iso(build.defer_until),
        "started_at": iso(build.started_at),
        "ended_at": iso(build.ended_at),
        "attempts": [_attempt_json(a) for a in build.attempts.order_by(Attempt.id)],
    }


def cancel_builds(uuids: Sequence[str]) -> list[str]:
    """Cancel queued or running builds (a running one is stopped by the coordinator)."""
    with database_proxy.atomic():
        found = [get_build(u) for u in uuids]
        for build in found:
            if build.state in FINAL_STATES:
                raise UsageError(f"build {build.uuid} cannot be canceled: it is {build.state}")
        for build in found:
            build.state = CANCELED
            build.ended_at = time.time()
            build.reason = "canceled by a user"
            build.save()
            events.record("build-canceled", build)
    return [b.uuid for b in found]


def set_priority(uuid: str, priority: int) -> None:
    with database_proxy.atomic():
        build = get_build(uuid)
        if build.state in FINAL_STATES:
            raise UsageError(f"build {build.uuid} is {build.state}: its priority no longer matters")
        build.priority = priority
        build.save()


def latest_log(uuid: str) -> tuple[str, bool]:
    """The log file of the build's latest attempt, and whether that attempt still runs."""
    import os

    build = get_build(uuid)
    attempt = (
        Attempt.select()
        .where((Attempt.build == build) & Attempt.log_path.is_null(False))
        .order_by(Attempt.id.desc())
        .first()
    )
    current = Attempt.select().where(Attempt.build == build).order_by(Attempt.id.desc()).first()
    if attempt is None or not os.path.exists(attempt.log_path):
        raise NotFoundError(f"build {build.uuid} has no log yet")
    return attempt.log_path, current is not None and current.result is None
