"""Which build goes to which machine next (design.md, step 2), with indexed queries only."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from peewee import fn

from buildfarm.datastore import events
from buildfarm.datastore.models import (
    QUEUED,
    RUNNING,
    Attempt,
    Build,
    Derivation,
    DerivationInput,
    database_proxy,
)

PAGE = 64


@dataclass(frozen=True, slots=True)
class Slot:
    """What a machine with a free slot can take."""

    machine: str
    systems: tuple[str, ...]
    features: frozenset[str]


def _blocked_by_inputs(candidate: Any) -> Any:
    """SQL: the candidate has an input derivation whose build is still queued or running."""
    Input = DerivationInput.alias("blocking_input")
    InputDrv = Derivation.alias("blocking_derivation")
    InputBuild = Build.alias("blocking_build")
    return (
        Input.select(Input.id)
        .join(InputDrv, on=(InputDrv.path == Input.input_path))
        .join(InputBuild, on=(InputBuild.derivation == InputDrv.id))
        .where(
            (Input.derivation == candidate.derivation)
            & (InputBuild.state.in_((QUEUED, RUNNING)))
        )
    )


def candidates(slot: Slot, now: float, exclude: Iterable[int] = ()) -> Iterable[Build]:
    """Queued builds this slot may run, best first: priority, then age."""
    B = Build.alias("candidate")
    query = (
        B.select()
        .where(
            (B.state == QUEUED)
            & (B.system.in_(slot.systems))
            & (B.defer_until.is_null() | (B.defer_until <= now))
            & (B.retry_after.is_null() | (B.retry_after <= now))
            & ~fn.EXISTS(_blocked_by_inputs(B))
        )
        .order_by(B.priority.desc(), B.created_at, B.id)
    )
    excluded = set(exclude)
    offset = 0
    while True:
        page = list(query.offset(offset).limit(PAGE))
        for build in page:
            if build.id in excluded:
                continue
            if set(build.required_features.split()) <= slot.features:
                yield build
        if len(page) < PAGE:
            return
        offset += PAGE


def allocate(slot: Slot, now: float | None = None, exclude: Iterable[int] = ()) -> Attempt | None:
    """Start an attempt of the best build for `slot`, in one transaction, or None."""
    moment = time.time() if now is None else now
    with database_proxy.atomic():
        for build in candidates(slot, moment, exclude):
            taken = (
                Build.update(state=RUNNING, started_at=moment)
                .where((Build.id == build.id) & (Build.state == QUEUED))
                .execute()
            )
            if not taken:
                continue
            build.state = RUNNING
            attempt: Attempt = Attempt.create(
                build=build, machine=slot.machine, started_at=moment, step="allocated"
            )
            events.record("build-started", build, machine=slot.machine, attempt=attempt.id)
            return attempt
    return None


def queue_depth(systems: Sequence[str] | None = None) -> dict[str, int]:
    """Queued builds per system."""
    query: Any = Build.select(Build.system, fn.COUNT(Build.id)).where(Build.state == QUEUED)
    if systems is not None:
        query = query.where(Build.system.in_(systems))
    return {system: count for system, count in query.group_by(Build.system).tuples()}
