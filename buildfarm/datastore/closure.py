"""Closures the coordinator pushes to machines: derivations and stored outputs, inputs first.

A closure is read one level at a time, each level in a few IN (...) queries, never one query
per item: a Guix package's .drv closure has hundreds of derivations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .models import Derivation, DerivationInput, DerivationOutput, StoredOutput

CHUNK = 500  # keys per IN (...): well under SQLite's variable limit


@dataclass(frozen=True, slots=True)
class KnownDerivation:
    path: str
    contents: bytes


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def _reachable(
    roots: Iterable[str], fetch: Callable[[list[str]], dict[str, list[str]]]
) -> dict[str, list[str]]:
    """path -> its successors, for every path reachable from `roots`; `fetch` answers one level
    (paths it does not know are absent from its answer, and are not expanded)."""
    known: dict[str, list[str]] = {}
    asked: set[str] = set()
    level = list(dict.fromkeys(roots))
    while level:
        asked.update(level)
        found = fetch(level)
        known.update(found)
        level = list(dict.fromkeys(
            n for successors in found.values() for n in successors if n not in asked
        ))
    return known


def _post_order(roots: Sequence[str], successors: dict[str, list[str]]) -> list[str]:
    """Known paths, each after its successors: the depth-first post-order, iteratively (deep
    graphs must not hit the recursion limit): successors are stacked in their listed order,
    so the last one is visited first."""
    order: list[str] = []
    seen: set[str] = set()
    stack: list[tuple[str, bool]] = [(p, False) for p in reversed(roots)]
    while stack:
        path, expanded = stack.pop()
        if expanded:
            order.append(path)
            continue
        if path in seen:
            continue
        seen.add(path)
        if path not in successors:
            continue
        stack.append((path, True))
        stack.extend((n, False) for n in successors[path] if n not in seen)
    return order


def derivations(drv_path: str) -> list[KnownDerivation]:
    """The .drv closure we hold the text of, each after its inputs (topological order)."""
    contents: dict[str, bytes] = {}

    def level(paths: list[str]) -> dict[str, list[str]]:
        ids: dict[int, str] = {}
        for chunk in _chunks(paths):
            query: Any = (
                Derivation.select(Derivation.id, Derivation.path, Derivation.contents)
                .where(Derivation.path.in_(list(chunk)))
                .tuples()
            )
            for row_id, path, text in query:
                ids[row_id] = path
                contents[path] = bytes(text)
        inputs: dict[str, list[str]] = {path: [] for path in ids.values()}
        keys = list(ids)
        for start in range(0, len(keys), CHUNK):
            query = (
                DerivationInput.select(DerivationInput.derivation, DerivationInput.input_path)
                .where(DerivationInput.derivation.in_(keys[start : start + CHUNK]))
                .order_by(DerivationInput.derivation, DerivationInput.input_path)
                .tuples()
            )
            for derivation_id, input_path in query:
                inputs[ids[derivation_id]].append(input_path)
        return inputs

    graph = _reachable([drv_path], level)
    return [KnownDerivation(p, contents[p]) for p in _post_order([drv_path], graph)]


def input_outputs(drv_path: str) -> tuple[list[str], bool]:
    """The store paths of the input outputs `drv_path` uses, and whether we know them all
    (an input derivation we never read has outputs we cannot name)."""
    wanted: dict[str, set[str]] = {}
    query: Any = (
        DerivationInput.select(DerivationInput.input_path, DerivationInput.outputs)
        .join(Derivation)
        .where(Derivation.path == drv_path)
        .tuples()
    )
    for input_path, names in query:
        wanted[input_path] = set(names.split())
    known: dict[str, dict[str, str]] = {path: {} for path in wanted}
    for chunk in _chunks(list(wanted)):
        query = (
            DerivationOutput.select(Derivation.path, DerivationOutput.name, DerivationOutput.path)
            .join(Derivation)
            .where(Derivation.path.in_(list(chunk)))
            .tuples()
        )
        for input_path, name, path in query:
            known[input_path][name] = path
    paths = [
        path
        for input_path, names in wanted.items()
        for name, path in known[input_path].items()
        if name in names
    ]
    complete = all(names <= set(known[p]) for p, names in wanted.items())
    return sorted(paths), complete


def derivations_of(paths: Iterable[str]) -> dict[str, str]:
    """Output path -> the derivation that produces it, where known."""
    found: dict[str, str] = {}
    for chunk in _chunks(list(paths)):
        query: Any = (
            DerivationOutput.select(DerivationOutput.path, Derivation.path)
            .join(Derivation)
            .where(DerivationOutput.path.in_(list(chunk)))
            .tuples()
        )
        found.update(query)
    return found


def stored_closure(paths: Iterable[str]) -> list[StoredOutput]:
    """Stored outputs among `paths` with every stored reference, references first."""
    rows: dict[str, StoredOutput] = {}

    def level(batch: list[str]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for chunk in _chunks(batch):
            for row in StoredOutput.select().where(StoredOutput.path.in_(list(chunk))):
                rows[row.path] = row
                found[row.path] = [r for r in row.refs.split() if r != row.path]
        return found

    roots = sorted(set(paths))
    graph = _reachable(roots, level)
    return [rows[p] for p in _post_order(roots, graph)]
