"""Closures the coordinator pushes to machines: derivations and stored outputs, inputs first."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .models import Derivation, DerivationInput, DerivationOutput, StoredOutput


@dataclass(frozen=True, slots=True)
class KnownDerivation:
    path: str
    contents: bytes


def derivations(drv_path: str) -> list[KnownDerivation]:
    """The .drv closure we hold the text of, each after its inputs (topological order)."""
    order: list[KnownDerivation] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        # Iterative depth-first post-order: deep graphs must not hit the recursion limit.
        stack: list[tuple[str, bool]] = [(path, False)]
        while stack:
            current, expanded = stack.pop()
            if expanded:
                row = Derivation.get_or_none(Derivation.path == current)
                if row is not None:
                    order.append(KnownDerivation(current, bytes(row.contents)))
                continue
            if current in seen:
                continue
            seen.add(current)
            stack.append((current, True))
            inputs = (
                DerivationInput.select(DerivationInput.input_path)
                .join(Derivation)
                .where(Derivation.path == current)
            )
            stack.extend((i.input_path, False) for i in inputs if i.input_path not in seen)

    visit(drv_path)
    return order


def input_outputs(drv_path: str) -> tuple[list[str], bool]:
    """The store paths of the input outputs `drv_path` uses, and whether we know them all
    (an input derivation we never read has outputs we cannot name)."""
    paths: list[str] = []
    complete = True
    inputs = DerivationInput.select().join(Derivation).where(Derivation.path == drv_path)
    for row in inputs:
        wanted = set(row.outputs.split())
        outputs = {
            o.name: o.path
            for o in DerivationOutput.select()
            .join(Derivation)
            .where(Derivation.path == row.input_path)
        }
        if not wanted <= set(outputs):
            complete = False
        paths.extend(path for name, path in outputs.items() if name in wanted)
    return sorted(paths), complete


def derivations_of(paths: Iterable[str]) -> dict[str, str]:
    """Output path -> the derivation that produces it, where known."""
    query: Any = (
        DerivationOutput.select(DerivationOutput.path, Derivation.path)
        .join(Derivation)
        .where(DerivationOutput.path.in_(list(paths)))
        .tuples()
    )
    return dict(query)


def stored_closure(paths: Iterable[str]) -> list[StoredOutput]:
    """Stored outputs among `paths` with every stored reference, references first."""
    by_path: dict[str, StoredOutput] = {}
    order: list[StoredOutput] = []
    stack: list[tuple[str, bool]] = [(p, False) for p in sorted(set(paths), reverse=True)]
    seen: set[str] = set()
    while stack:
        path, expanded = stack.pop()
        if expanded:
            order.append(by_path[path])
            continue
        if path in seen:
            continue
        seen.add(path)
        row = StoredOutput.get_or_none(StoredOutput.path == path)
        if row is None:
            continue
        by_path[path] = row
        stack.append((path, True))
        stack.extend((r, False) for r in row.refs.split() if r != path and r not in seen)
    return order
