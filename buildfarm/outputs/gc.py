"""`buildfarm outputs gc`: free the output store by age and/or total size.

Kept whatever happens: every output a queued or running build needs as an input, with its
stored closure (those are pushed to machines), and every reference of an output that stays
(a substitute cache must be closed under references, or clients cannot fetch what it lists).
Among the rest, least recently used first: an output goes if it is older than the age limit,
or while the store is over the size limit. The log of a derivation whose build failed (it has
no output) stays until it is older than the age limit. Files no datastore record accounts for
(left by a crash mid-import), and compressed nars no kept output's narinfo names, go once they
are older than an hour, so an import or publication in flight is never touched.
The records are deleted in one transaction that also reads what is needed, so no build can be
queued in between; the files go after it, narinfo first.
"""

from __future__ import annotations

import heapq
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from buildfarm.errors import UsageError
from buildfarm.outputs.store import OutputStore

ORPHAN_GRACE = 3600.0  # seconds a file without a record is left alone (an import may be writing)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """`500M`, `20G`, `1.5T`, `123456` (bytes; K/M/G/T are powers of 1024, `B`/`iB` allowed)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise UsageError(f"invalid size {text!r}: use e.g. 500M, 20G or 1T")
    return int(float(match[1]) * _UNITS[match[2]])


def parse_duration(text: str) -> float:
    """`90m`, `12h`, `30d`, `2w`, or seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if match is None:
        raise UsageError(f"invalid duration {text!r}: use e.g. 12h, 30d or 2w")
    return float(match[1]) * _SECONDS[match[2] or "s"]


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@dataclass(frozen=True, slots=True)
class GcPolicy:
    older_than: float | None = None  # seconds since last use
    max_size: int | None = None  # bytes the output store may keep
    now: float = field(default_factory=time.time)
    orphan_grace: float = ORPHAN_GRACE

    def __post_init__(self) -> None:
        if self.older_than is None and self.max_size is None:
            raise UsageError("say what to remove: --older-than DURATION and/or --max-size SIZE")


@dataclass(frozen=True, slots=True)
class Item:
    """One stored output as the collector sees it."""

    path: str
    references: tuple[str, ...]
    deriver: str
    last_used_at: float
    size: int  # bytes on disk: nar, compressed nars, narinfo
    file: str = ""  # its nar, relative to the output store


@dataclass(frozen=True, slots=True)
class Removal:
    path: str
    size: int
    last_used_at: float
    reason: str  # "age" or "size"


@dataclass(frozen=True, slots=True)
class GcResult:
    removed: tuple[Removal, ...]
    orphans: tuple[str, ...]  # files without a record
    freed: int  # bytes
    kept: int  # outputs
    kept_bytes: int
    protected: int  # outputs kept because queued or running builds need them
    dry_run: bool


def plan(items: Sequence[Item], needed: Iterable[str], policy: GcPolicy) -> list[Removal]:
    """Which outputs go, in the order they go (pure: no files, no datastore)."""
    by_path = {item.path: item for item in items}
    protected: set[str] = set()
    todo = [p for p in needed if p in by_path]
    while todo:
        path = todo.pop()
        if path in protected:
            continue
        protected.add(path)
        todo.extend(r for r in by_path[path].references if r in by_path)
    referrers = dict.fromkeys(by_path, 0)
    for item in items:
        for ref in set(item.references):
            if ref != item.path and ref in referrers:
                referrers[ref] += 1
    cutoff = None if policy.older_than is None else policy.now - policy.older_than
    total = sum(item.size for item in items)
    heap = [(i.last_used_at, i.path) for i in items if not referrers[i.path]]
    heapq.heapify(heap)
    removed: list[Removal] = []
    while heap:
        _, path = heapq.heappop(heap)
        item = by_path[path]
        if path in protected:
            continue
        if cutoff is not None and item.last_used_at < cutoff:
            reason = "age"
        elif policy.max_size is not None and total > policy.max_size:
            reason = "size"
        else:
            continue  # stays, and so do its references
        removed.append(Removal(path, item.size, item.last_used_at, reason))
        total -= item.size
        for ref in set(item.references):
            if ref != path and ref in referrers:
                referrers[ref] -= 1
                if not referrers[ref]:
                    heapq.heappush(heap, (by_path[ref].last_used_at, ref))
    return removed


def needed_inputs() -> set[str]:
    """Stored-output paths that queued or running builds take as inputs."""
    from buildfarm.datastore.models import (
        QUEUED,
        RUNNING,
        Build,
        Derivation,
        DerivationInput,
        DerivationOutput,
    )

    query: Any = (
        DerivationOutput.select(
            DerivationOutput.path, DerivationOutput.name, DerivationInput.outputs
        )
        .join(Derivation, on=(DerivationOutput.derivation == Derivation.id))
        .join(DerivationInput, on=(DerivationInput.input_path == Derivation.path))
        .join(Build, on=(Build.derivation == DerivationInput.derivation))
        .where(Build.state.in_([QUEUED, RUNNING]))
        .tuples()
    )
    return {path for path, name, outputs in query if name in outputs.split()}


def failed_derivations() -> set[str]:
    """The file names of the derivations whose builds failed: their logs are published."""
    from buildfarm.datastore.models import FAILED, Build, Derivation

    query: Any = (Derivation.select(Derivation.path).join(Build)
                  .where(Build.state == FAILED).distinct().tuples())
    return {os.path.basename(path) for (path,) in query}


def _items(store: OutputStore) -> list[Item]:
    from buildfarm.datastore.models import StoredOutput

    return [
        Item(row.path, tuple(row.refs.split()), row.deriver, row.last_used_at,
             store.disk_usage(row.path, row.file), row.file)
        for row in StoredOutput.select()
    ]


def collect(store: OutputStore, policy: GcPolicy, *, dry_run: bool = False) -> GcResult:
    """Plan and (unless `dry_run`) delete: records in one transaction, then the files."""
    from buildfarm.datastore.models import StoredOutput, database_proxy

    if dry_run:
        items = _items(store)
        needed = needed_inputs()
        removed = plan(items, needed, policy)
    else:
        with database_proxy.atomic():
            items = _items(store)
            needed = needed_inputs()
            removed = plan(items, needed, policy)
            paths = [r.path for r in removed]
            for start in range(0, len(paths), 500):
                StoredOutput.delete().where(StoredOutput.path.in_(paths[start:start + 500])
                                            ).execute()
    gone = {r.path for r in removed}
    kept = [i for i in items if i.path not in gone]
    freed = 0
    if not dry_run:
        files = {i.path: i.file for i in items}
        for removal in removed:
            freed += store.remove(removal.path, files[removal.path])
    else:
        freed = sum(r.size for r in removed)
    orphans = _orphans(store, kept, {i.deriver for i in items if i.path in gone},
                       failed_derivations(), policy)
    if not dry_run:
        for path in orphans:
            try:
                size = os.stat(path).st_size
                os.unlink(path)
            except FileNotFoundError:
                continue
            freed += size
    kept_paths = {i.path for i in kept}
    protected = len(needed & kept_paths)
    return GcResult(
        removed=tuple(removed),
        orphans=tuple(orphans),
        freed=freed,
        kept=len(kept),
        kept_bytes=sum(i.size for i in kept),
        protected=protected,
        dry_run=dry_run,
    )


def _orphans(
    store: OutputStore, kept: Sequence[Item], derivers_gone: set[str], failed: set[str],
    policy: GcPolicy,
) -> list[str]:
    """Files no kept record accounts for: old enough ones, the logs of the outputs just
    removed, and the logs of `failed` derivations older than the age limit."""
    hashes = {os.path.basename(i.path)[:32] for i in kept}
    named = {os.path.normpath(f) for i in kept for f in store.files_of(i.path, i.file)}
    derivers = {os.path.basename(i.deriver) for i in kept if i.deriver}
    gone_logs = {os.path.basename(d) for d in derivers_gone if d} - derivers
    cutoff = policy.now - policy.orphan_grace
    found = []
    for kind, path in store.published_files():
        name = os.path.basename(path)
        if kind == "narinfo":
            accounted = name[:32] in hashes
        elif kind == "log":
            accounted = name in derivers
            if not accounted and name in failed:
                accounted = policy.older_than is None or _mtime(path) >= (
                    policy.now - policy.older_than)
            elif not accounted and name in gone_logs:
                found.append(path)
                continue
        else:  # a nar its record names, or a compressed one its narinfo names
            accounted = os.path.normpath(path) in named
        if not accounted and _mtime(path) < cutoff:
            found.append(path)
    return sorted(found)


def _mtime(path: str) -> float:
    """When the file last changed (gone meanwhile: never, so it is left alone)."""
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return float("inf")
