"""The parts of the package and what each may import, as ARCHITECTURE.md's table declares them.

Every `import` and `from … import` in buildfarm/ counts, wherever it stands (module level, inside
a function, under TYPE_CHECKING): a lazy import is still a dependency. Two rules:
- a module of one part imports only the parts the table lets that part import;
- no cycle between modules.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "buildfarm"
EVERY_PART_BUT = re.compile(r"every part(?: but (?P<but>[\w, ]+))?\Z")


def declared_rules() -> dict[str, set[str]]:
    """part -> the parts it may import, read from the table of ARCHITECTURE.md."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \|[^|]*\|([^|]*)\|$", text, re.M)
    assert rows, "ARCHITECTURE.md has no table of parts"
    parts = [part for part, _ in rows]
    rules: dict[str, set[str]] = {}
    for part, allowed in rows:
        allowed = allowed.strip()
        every = EVERY_PART_BUT.match(allowed)
        if every:
            but = {p.strip() for p in (every["but"] or "").split(",") if p.strip()}
            rules[part] = set(parts) - but - {part}
        else:
            rules[part] = {p.strip() for p in allowed.split(",") if p.strip()}
    return rules


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        words = list(path.relative_to(ROOT).with_suffix("").parts)
        if words[-1] == "__init__":
            words.pop()
        found[".".join(words)] = path
    return found


def imports(module: str, path: Path, known: Mapping[str, Path]) -> Iterator[str]:
    """The buildfarm modules `module` imports (a package's name when a name is not a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                words = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*words, *([node.module] if node.module else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    yield f"{base}.{alias.name}"
                elif base in known:
                    yield base


def part_of(module: str) -> str:
    words = module.split(".")
    return words[1] if len(words) > 1 else "buildfarm"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: set(imports(m, p, known)) - {m} for m, p in known.items()}


def test_the_table_names_every_part_of_the_package() -> None:
    rules = declared_rules()
    parts = {part_of(m) for m in modules()} - {"buildfarm", "__main__"}
    assert parts == set(rules), "ARCHITECTURE.md's table and buildfarm/ name different parts"
    for part, allowed in rules.items():
        assert allowed <= set(rules), f"{part} may import an unknown part: {allowed - set(rules)}"


def test_each_part_imports_only_what_the_table_allows() -> None:
    rules = declared_rules()
    rules["__main__"] = {"cli"}
    wrong = []
    for module, targets in sorted(graph().items()):
        part = part_of(module)
        for target in sorted(targets):
            other = part_of(target)
            if other not in (part, "buildfarm") and other not in rules[part]:
                wrong.append(f"{module} imports {target} ({part} may not import {other})")
    assert wrong == []


def find_cycle(edges: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_no_module_imports_itself_through_others() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("edges", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b", "c"}, "b": set(), "c": {"c2"}, "c2": {"c"}}, ["c", "c2", "c"]),
    ],
)
def test_the_cycle_finder_finds_cycles(edges: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(edges) == cycle


def test_the_import_reader_counts_lazy_relative_and_type_only_imports(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n    from buildfarm.pkg.typed import T\n"
        "def f():\n    from buildfarm.lazy import x\n",
        encoding="utf-8",
    )
    known = dict.fromkeys(
        ["buildfarm.pkg", "buildfarm.pkg.sibling", "buildfarm.pkg.typed", "buildfarm.lazy"],
        source,
    )
    found = set(imports("buildfarm.pkg.mod", source, known))
    assert found == {"buildfarm.pkg.sibling", "buildfarm.pkg.typed", "buildfarm.lazy"}


def test_every_package_says_what_it_is_for() -> None:
    for init in sorted(PACKAGE.rglob("__init__.py")):
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert docstring, f"{init.relative_to(ROOT)} has no docstring"
