"""Builds chosen by what they are rather than by UUID: `builds cancel` and `builds priority`
with filters (tags, system, state, a glob over the derivation's name), each one transaction.

After a branch is rebased, thousands of queued builds are moot: an operator cancels them by
tag. One of them may still be needed by a build that stays (another branch's, say):
`spare_required` keeps every chosen build that a queued or running build left alone needs,
directly or through other spared builds, as the original coordinator's
--ignore-if-required-by-another does.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from buildfarm.errors import UsageError

from . import dependencies, events
from .bulk import chunks
from .models import (
    CANCELED,
    QUEUED,
    RUNNING,
    Build,
    BuildTag,
    Derivation,
    DerivationInput,
    DerivationOutput,
    database_proxy,
)

ACTIVE = (QUEUED, RUNNING)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which builds: every condition given must hold. Only queued or running builds are ever
    chosen (the others can be neither canceled nor reprioritised)."""

    tags: tuple[tuple[str, str], ...] = ()
    system: str | None = None
    state: str | None = None  # QUEUED or RUNNING; None: both
    name: str | None = None  # a glob over the derivation's name (its file name's "NAME.drv")

    def given(self) -> bool:
        return bool(self.tags) or any(v is not None for v in (self.system, self.state, self.name))


@dataclass(frozen=True, slots=True)
class Chosen:
    id: int
    uuid: str
    derivation: str
    state: str
    priority: int

    def json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "derivation": self.derivation, "state": self.state,
                "priority": self.priority}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a filtered command did (or, with dry_run, would do)."""

    changed: list[Chosen]
    spared: list[Chosen]  # matched, but needed by a build left alone
    raised: int = 0  # builds of inputs whose priority was raised with them


def derivation_name(path: str) -> str:
    """NAME of /STORE/HASH-NAME.drv."""
    base = path.rsplit("/", 1)[-1]
    base = base.split("-", 1)[1] if "-" in base else base
    return base.removesuffix(".drv")


def choose(which: Filter) -> list[Chosen]:
    """The queued or running builds `which` names, oldest first (tags, system and state through
    indexes; the name glob over what they leave)."""
    if not which.given():
        raise UsageError("name builds by UUID, or give at least one of --tag, --system, "
                         "--state, --name")
    if which.state is not None and which.state not in ACTIVE:
        raise UsageError(f"--state must be {QUEUED} or {RUNNING}: only those builds change")
    states = ACTIVE if which.state is None else (which.state,)
    query: Any = (
        Build.select(Build.id, Build.uuid, Derivation.path, Build.state, Build.priority)
        .join(Derivation)
        .where(Build.state.in_(list(states)))
    )
    if which.system is not None:
        query = query.where(Build.system == which.system)
    for key, value in which.tags:
        tagged = BuildTag.select(BuildTag.build).where(
            (BuildTag.key == key) & (BuildTag.value == value))
        query = query.where(Build.id.in_(tagged))
    rows = query.order_by(Build.created_at, Build.id).tuples()
    return [
        Chosen(*row) for row in rows
        if which.name is None or fnmatch.fnmatchcase(derivation_name(row[2]), which.name)
    ]


def _spared(chosen: Sequence[Chosen]) -> set[int]:
    """Ids of the chosen builds that a queued or running build not chosen needs, directly or
    through other such spared builds."""
    ids = {c.id for c in chosen}
    by_path: dict[str, list[int]] = {}
    for c in chosen:
        by_path.setdefault(c.derivation, []).append(c.id)
    needs: dict[int, set[str]] = {}  # an active build -> the chosen derivations it needs
    for chunk in chunks(list(by_path)):
        query: Any = (
            DerivationInput.select(Build.id, DerivationInput.input_path)
            .join(Build, on=(Build.derivation == DerivationInput.derivation))
            .where(DerivationInput.input_path.in_(list(chunk)) & Build.state.in_(list(ACTIVE)))
            .tuples()
        )
        for build_id, path in query:
            needs.setdefault(build_id, set()).add(path)
    spared: set[int] = set()
    pending = [b for b in needs if b not in ids]  # needers that stay
    while pending:
        needer = pending.pop()
        for path in needs.get(needer, ()):
            for build_id in by_path[path]:
                if build_id not in spared:
                    spared.add(build_id)
                    pending.append(build_id)
    return spared


def _split(chosen: list[Chosen], spare_required: bool) -> tuple[list[Chosen], list[Chosen]]:
    if not spare_required or not chosen:
        return chosen, []
    spared = _spared(chosen)
    return [c for c in chosen if c.id not in spared], [c for c in chosen if c.id in spared]


def summaries(ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """events.build_summary of many builds, in a few queries per 500."""
    found: dict[int, dict[str, Any]] = {}
    for chunk in chunks(list(ids)):
        query: Any = (Build.select(Build.id, Build.uuid, Derivation.path, Build.system,
                                   Build.state, Build.priority, Build.derivation)
                      .join(Derivation).where(Build.id.in_(list(chunk))).tuples())
        drv_of: dict[int, int] = {}
        for build_id, uuid, path, system, state, priority, drv_id in query:
            drv_of[build_id] = drv_id
            found[build_id] = {"outputs": {}, "uuid": uuid, "derivation": path,
                               "system": system, "state": state, "priority": priority,
                               "tags": {}}
        tags: Any = (BuildTag.select(BuildTag.build, BuildTag.key, BuildTag.value)
                     .where(BuildTag.build.in_(list(chunk))).tuples())
        for build_id, key, value in tags:
            found[build_id]["tags"][key] = value
        outputs: dict[int, dict[str, str]] = {}
        rows: Any = (DerivationOutput.select(DerivationOutput.derivation, DerivationOutput.name,
                                             DerivationOutput.path)
                     .where(DerivationOutput.derivation.in_(list(set(drv_of.values())))).tuples())
        for drv_id, name, path in rows:
            outputs.setdefault(drv_id, {})[name] = path
        for build_id, drv_id in drv_of.items():
            found[build_id]["outputs"] = dict(sorted(outputs.get(drv_id, {}).items()))
    return found


def cancel_matching(which: Filter, *, dry_run: bool = False,
                    spare_required: bool = False) -> Outcome:
    """Cancel the builds `which` names (a running one is stopped by the coordinator), with
    their build-canceled events, in one transaction; nothing with `dry_run`."""
    now = time.time()
    with database_proxy.atomic():
        victims, spared = _split(choose(which), spare_required)
        if dry_run or not victims:
            return Outcome(victims, spared)
        ids = [c.id for c in victims]
        for chunk in chunks(ids):
            Build.update(state=CANCELED, ended_at=now, reason="canceled by a user").where(
                Build.id.in_(list(chunk)) & Build.state.in_(list(ACTIVE))).execute()
        about = summaries(ids)
        events.record_many("build-canceled", [(i, about[i]) for i in ids], now)
    return Outcome([_with(c, state=CANCELED) for c in victims], spared)


def prioritise_matching(which: Filter, priority: int, *, dry_run: bool = False,
                        spare_required: bool = False) -> Outcome:
    """Set the priority of the builds `which` names, and raise the queued or running builds
    they need to at least as much (as `builds priority UUID` does), in one transaction.
    `spare_required` leaves alone those a build not chosen needs (their priority may only be
    raised, through it)."""
    with database_proxy.atomic():
        chosen, spared = _split(choose(which), spare_required)
        if dry_run or not chosen:
            return Outcome(chosen, spared)
        ids = [c.id for c in chosen]
        for chunk in chunks(ids):
            Build.update(priority=priority).where(Build.id.in_(list(chunk))).execute()
        raised = dependencies.raise_priorities(_inputs_of(ids), priority)
    return Outcome([_with(c, priority=priority) for c in chosen], spared, raised)


def _inputs_of(build_ids: Iterable[int]) -> list[str]:
    paths: set[str] = set()
    for chunk in chunks(list(build_ids)):
        query: Any = (DerivationInput.select(DerivationInput.input_path)
                      .join(Build, on=(Build.derivation == DerivationInput.derivation))
                      .where(Build.id.in_(list(chunk))).tuples())
        paths.update(path for (path,) in query)
    return sorted(paths)


def _with(chosen: Chosen, **changes: Any) -> Chosen:
    from dataclasses import replace

    return replace(chosen, **changes)
