"""Recording submissions: derivations, and the builds they ask for, in one transaction."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from buildfarm.errors import UsageError

from . import dependencies, events
from .bulk import chunks, insert_rows
from .models import FAILED, QUEUED, Build, database_proxy

if TYPE_CHECKING:
    from buildfarm.formats import derivation as drvmod


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    priority: int = 0
    tags: tuple[tuple[str, str], ...] = ()
    uuid: str | None = None
    ignore_if_built: bool = False  # reuse a queued, running or succeeded build, or held outputs
    ignore_if_queued: bool = False  # reuse a queued or running build
    ignore_if_failed: bool = False  # as ignore_if_built, and a failed build too
    closure: bool = False  # also a build of each input read that has none and is not held
    defer_until: float | None = None
    retries: int | None = None  # builder failures tried again; None: the inventory's default
    machine_tags: tuple[tuple[str, str], ...] = ()  # tags a machine must carry to take it


def machine_tags(tags: Sequence[tuple[str, str]]) -> str:
    """How a build keeps the machine tags it needs: sorted KEY=VALUE words (as features)."""
    return " ".join(sorted(f"{key}={value}" for key, value in dict(tags).items()))


@dataclass(frozen=True, slots=True)
class ReadDerivation:
    """A parsed derivation with its store path and the exact bytes it was read from."""

    path: str
    drv: drvmod.Derivation
    contents: bytes


@dataclass(frozen=True, slots=True)
class Submitted:
    uuid: str
    derivation: str
    created: bool  # False when --ignore-if-built found an existing build
    state: str = QUEUED  # or failed: dependency-failed at once
    reason: str | None = None
    target: bool = True  # False: a build of an input, submitted by --closure


def _ids_by(table: str, column: str, keys: Sequence[str]) -> dict[str, int]:
    """key -> id of the rows of `table` whose `column` is one of `keys`."""
    db = database_proxy.obj
    found: dict[str, int] = {}
    for chunk in chunks(list(keys)):
        marks = ", ".join([db.param] * len(chunk))
        sql = f"SELECT {column}, id FROM {table} WHERE {column} IN ({marks})"
        found.update(db.execute_sql(sql, tuple(chunk)).fetchall())
    return found


def _record_derivations(items: Sequence[ReadDerivation], now: float) -> dict[str, int]:
    """Insert the derivations not yet known (in batches); return path -> id for all of them."""
    unique = list({item.path: item for item in items}.values())
    ids = _ids_by("derivation", "path", [i.path for i in unique])
    new = [i for i in unique if i.path not in ids]
    insert_rows(
        "derivation",
        ("path", "system", "required_features", "contents", "created_at"),
        [
            (i.path, i.drv.system, " ".join(sorted(i.drv.required_features)), i.contents, now)
            for i in new
        ],
    )
    ids.update(_ids_by("derivation", "path", [i.path for i in new]))
    insert_rows(
        "derivation_output",
        ("derivation_id", "name", "path", "hash_algo", "hash"),
        [(ids[i.path], o.name, o.path, o.hash_algo, o.hash) for i in new for o in i.drv.outputs],
    )
    insert_rows(
        "derivation_input",
        ("derivation_id", "input_path", "outputs"),
        [(ids[i.path], path, " ".join(names)) for i in new for path, names in i.drv.input_drvs],
    )
    return ids


def _inputs_first(items: Sequence[ReadDerivation]) -> list[ReadDerivation]:
    """`items` without repeats, each after those of its inputs among them (iteratively: a
    closure may be thousands of derivations deep)."""
    by_path = {i.path: i for i in items}
    order: list[ReadDerivation] = []
    seen: set[str] = set()
    for root in items:
        stack: list[tuple[str, bool]] = [(root.path, False)]
        while stack:
            path, expanded = stack.pop()
            if expanded:
                order.append(by_path[path])
                continue
            if path in seen:
                continue
            seen.add(path)
            stack.append((path, True))
            stack.extend((p, False) for p, _ in by_path[path].drv.input_drvs
                         if p in by_path and p not in seen)
    return order


def _reusable(path: str, facts: dependencies.Known, options: SubmitOptions,
              target: bool) -> tuple[str | None] | None:
    """The existing build that stands for derivation `path` in this submission (a 1-tuple,
    whose UUID is None when only its outputs are held), or None: a new build is needed.
    A target is reused as its options say; an input of --closure whenever it is queued,
    running or failed (a failure is retried on purpose only) or its outputs are held."""
    builds = facts.of(path)
    built = options.ignore_if_built or options.ignore_if_failed
    if not target:
        if builds.active is not None:
            return (builds.active,)
        if facts.outputs_held(path):
            return (None,)
        return (builds.latest_uuid,) if builds.failed is not None else None
    if built and builds.built is not None:
        return (builds.built,)
    if options.ignore_if_queued and builds.active is not None:
        return (builds.active,)
    if built and facts.outputs_held(path):
        producer = dependencies.succeeded_producer(facts.outputs[path])
        if producer is not None:
            return (producer,)
    if options.ignore_if_failed and builds.failed is not None:
        return (builds.latest_uuid,)
    return None


@dataclass(slots=True)
class _NewBuild:
    uuid: str
    item: ReadDerivation
    cause: dependencies.Cause | None  # an input failed: it is dependency-failed at once
    via: str | None = None


def record_submission(
    targets: Sequence[ReadDerivation],
    inputs: Sequence[ReadDerivation],
    options: SubmitOptions,
    now: float,
) -> list[Submitted]:
    """Record derivations and the builds the options ask for, with their events, in one
    transaction and in batches (100,000 submissions must take well under a minute): one build
    per target (or the existing one it may reuse) and, with `closure`, one per input that is
    neither queued, running, failed nor held. A new build whose input's latest build failed
    (and nothing else provides it) is dependency-failed at once. Queued or running builds the
    new ones need get at least their priority. Returns the targets' builds in order, then the
    inputs' new builds."""
    reusing = options.ignore_if_built or options.ignore_if_queued or options.ignore_if_failed
    tags = dict(options.tags)
    with database_proxy.atomic():
        if options.uuid is not None and Build.select().where(Build.uuid == options.uuid).exists():
            raise UsageError(f"a build with UUID {options.uuid} already exists")
        ids = _record_derivations([*targets, *inputs], now)
        target_paths = {t.path for t in targets}
        candidates = _inputs_first([*targets, *(inputs if options.closure else ())])
        facts = dependencies.known(
            [*(c.path for c in candidates), *(p for c in candidates for p, _ in c.drv.input_drvs)],
            outputs={c.path: [o.path for o in c.drv.outputs] for c in candidates},
        )
        new: dict[str, _NewBuild] = {}
        standing: dict[str, tuple[str | None, bool]] = {}  # path -> (UUID, created)

        def make(item: ReadDerivation, uuid: str | None = None) -> _NewBuild:
            cause = via = None
            for input_path, _ in item.drv.input_drvs:
                made = new.get(input_path)
                cause = made.cause if made is not None else facts.blocker(input_path)
                if cause is not None:
                    via = input_path
                    break
            build = _NewBuild(uuid or str(uuidlib.uuid4()), item, cause, via)
            new.setdefault(item.path, build)
            return build

        extra: list[_NewBuild] = []  # targets named again, without an option to reuse
        for item in candidates:
            found = _reusable(item.path, facts, options, item.path in target_paths)
            if found is not None:
                standing[item.path] = (found[0], False)
            else:
                uuid = options.uuid if item.path in target_paths else None
                standing[item.path] = (make(item, uuid).uuid, True)
        results: list[Submitted] = []
        named: set[str] = set()
        for target in targets:
            again = target.path in named
            named.add(target.path)
            if again and not reusing:
                build = make(target)
                extra.append(build)
                results.append(_submitted(build, True))
                continue
            uuid, created = standing[target.path]
            made = new.get(target.path)
            if made is not None:
                results.append(_submitted(made, created and not again))
            elif uuid is not None:
                results.append(Submitted(uuid, target.path, created=False))
        builds = [*new.values(), *extra]
        results += [_submitted(b, True, target=False) for b in new.values()
                    if b.item.path not in target_paths]
        _insert_builds(builds, ids, options, tags, now)
        _raise_priorities(candidates, standing, new, options.priority)
    return results


def _submitted(build: _NewBuild, created: bool, target: bool = True) -> Submitted:
    failed = build.cause is not None
    return Submitted(
        build.uuid, build.item.path, created,
        state=FAILED if failed else QUEUED,
        reason=build.cause.reason(build.via) if build.cause is not None else None,
        target=target,
    )


def _insert_builds(builds: Sequence[_NewBuild], ids: dict[str, int], options: SubmitOptions,
                   tags: dict[str, str], now: float) -> None:
    """The new builds (`ids`: their derivations'), their tags, and their events:
    build-submitted for each, build-failure too for each that is dependency-failed at once."""
    insert_rows(
        "build",
        (
            "uuid", "derivation_id", "system", "required_features", "state", "priority",
            "created_at", "defer_until", "ended_at", "reason", "cause_id", "retries",
            "machine_tags",
        ),
        [
            (
                b.uuid, ids[b.item.path], b.item.drv.system,
                " ".join(sorted(b.item.drv.required_features)),
                QUEUED if b.cause is None else FAILED, options.priority, now,
                options.defer_until,
                None if b.cause is None else now,
                None if b.cause is None else b.cause.reason(b.via),
                None if b.cause is None else b.cause.id,
                options.retries,
                machine_tags(options.machine_tags),
            )
            for b in builds
        ],
    )
    build_ids = _ids_by("build", "uuid", [b.uuid for b in builds])
    if tags:
        insert_rows(
            "build_tag",
            ("build_id", "key", "value"),
            [(build_ids[b.uuid], k, v) for b in builds for k, v in tags.items()],
        )

    def summary(b: _NewBuild) -> dict[str, Any]:
        return {
            "uuid": b.uuid,
            "derivation": b.item.path,
            "system": b.item.drv.system,
            "state": QUEUED if b.cause is None else FAILED,
            "priority": options.priority,
            "tags": tags,
            "outputs": b.item.drv.output_paths,
        }

    events.record_many("build-submitted", [(build_ids[b.uuid], summary(b)) for b in builds], now)
    blocked = [b for b in builds if b.cause is not None]
    events.record_many(
        "build-failure",
        [(build_ids[b.uuid], summary(b)) for b in blocked],
        now,
        [
            {"machine": None, "attempt": None, "log": None,
             "result": {"exit_status": None, "reason": b.cause.reason(b.via)}}
            for b in blocked if b.cause is not None
        ],
    )


def _raise_priorities(candidates: Sequence[ReadDerivation],
                      standing: dict[str, tuple[str | None, bool]], new: dict[str, _NewBuild],
                      priority: int) -> None:
    """Every queued or running build this submission reuses or needs gets at least `priority`
    (the new ones have it already)."""
    reused = {path for path, (uuid, created) in standing.items() if uuid and not created}
    needed = {p for c in candidates if c.path in new and new[c.path].cause is None
              for p, _ in c.drv.input_drvs}
    dependencies.raise_priorities(list((reused | needed) - new.keys()), priority)
