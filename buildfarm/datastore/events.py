"""Durable events: written in the same transaction as the state change that causes them."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from .bulk import insert_rows
from .models import CANCELED, FAILED, SUCCEEDED, Build, BuildTag, DerivationOutput, Event

# The events that end a build, and the state each leaves it in: every way a build ends (its
# attempt's result, an input's failure, a user's cancel) records one of them.
ENDINGS = {"build-success": SUCCEEDED, "build-failure": FAILED, "build-canceled": CANCELED}


def build_summary(build: Build) -> dict[str, Any]:
    """What every event carries about its build."""
    tags = {t.key: t.value for t in BuildTag.select().where(BuildTag.build == build)}
    outputs = DerivationOutput.select().where(DerivationOutput.derivation == build.derivation_id)
    return {
        "outputs": {o.name: o.path for o in outputs},
        "uuid": build.uuid,
        "derivation": build.derivation.path,
        "system": build.system,
        "state": build.state,
        "priority": build.priority,
        "tags": tags,
    }


def record(name: str, build: Build | None, **data: Any) -> Event:
    """Queue event `name` for the hooks; call inside the transaction that changes the state."""
    payload: dict[str, Any] = {"event": name}
    if build is not None:
        payload["build"] = build_summary(build)
    payload.update(data)
    event: Event = Event.create(
        name=name,
        build=build,
        payload=json.dumps(payload, sort_keys=True),
        created_at=time.time(),
    )
    return event


def record_many(
    name: str, builds: Sequence[tuple[int, dict[str, Any]]], now: float,
    extra: Sequence[dict[str, Any]] = (),
) -> None:
    """Queue one event per (build id, build summary), in batches; `extra`, when given, holds
    each event's other fields, in the same order."""
    fields = list(extra) or [{}] * len(builds)
    insert_rows("event", ("name", "build_id", "payload", "created_at"), [
        (name, build_id,
         json.dumps({"event": name, "build": summary, **more}, sort_keys=True), now)
        for (build_id, summary), more in zip(builds, fields, strict=True)
    ])


def pending(limit: int = 100) -> list[Event]:
    """Events not yet delivered, oldest first."""
    return list(
        Event.select().where(Event.delivered_at.is_null()).order_by(Event.id).limit(limit)
    )


def mark_delivered(event_id: int) -> None:
    Event.update(delivered_at=time.time()).where(Event.id == event_id).execute()


def mark_delivered_many(event_ids: Sequence[int]) -> None:
    """Events no script fires on: delivered at once, in batches."""
    now = time.time()
    ids = list(event_ids)
    for start in range(0, len(ids), 500):
        Event.update(delivered_at=now).where(Event.id.in_(ids[start : start + 500])).execute()


def newest_id() -> int:
    """The id of the newest event (0 when there is none)."""
    row = Event.select(Event.id).order_by(Event.id.desc()).first()
    return int(row.id) if row is not None else 0


PAGE = 5000  # events read at a time by names_after


def names_after(last_id: int, limit: int = PAGE) -> list[tuple[int, str, float]]:
    """(id, name, created_at) of the events after `last_id`, oldest first (the primary key)."""
    query: Any = (
        Event.select(Event.id, Event.name, Event.created_at)
        .where(Event.id > last_id)
        .order_by(Event.id)
        .limit(limit)
        .tuples()
    )
    return [(int(i), str(n), float(c)) for i, n, c in query]
