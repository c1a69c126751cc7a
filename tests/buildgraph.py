"""A generated graph of real, buildable derivations shaped like a distribution's: layers, shared
inputs (diamonds), `out`+`dev` derivations used by either output, a directory tree with a
symlink and an executable used by what needs it, one big output, and one derivation in the
middle whose builder fails. Used by tests/test_graph.py and benchmarks/bench_graph.py, which
build it through buildfarm and through Nix's own remote building.

Builders are /bin/sh scripts (PATH unset, absolute paths only) that read a little of each input
and write a few bytes, so a build costs what the farm costs around it; the big output is the
exception (BIG_BYTES of random bytes).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from testbed import instantiate_all, nix_string

LAYERS = (40, 36, 34, 32, 30, 30, 30, 28, 24, 20)  # derivations per layer: 304
BIG_BYTES = 24_000_000
TREE_AT = (2, 0)  # (layer, index) of the directory tree
BIG_AT = (4, 0)
FAILING_AT = (5, 1)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    layer: int
    kind: str  # "file", "multi" (out + dev), "tree", "big" or "failing"
    inputs: tuple[tuple[str, str], ...]  # (node name, output name)

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("out", "dev") if self.kind == "multi" else ("out",)


@dataclass
class Graph:
    tag: str
    nodes: dict[str, Node]
    drvs: dict[str, str] = field(default_factory=dict)  # node name -> .drv path

    @property
    def failing(self) -> str:
        return next(n.name for n in self.nodes.values() if n.kind == "failing")

    def tops(self) -> list[str]:
        """The nodes nothing needs."""
        needed = {i for n in self.nodes.values() for i, _ in n.inputs}
        return [name for name in self.nodes if name not in needed]

    def closure(self, names: Iterable[str]) -> set[str]:
        """`names` and everything they need."""
        seen: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(i for i, _ in self.nodes[name].inputs)
        return seen

    def dependants(self, name: str) -> set[str]:
        """Everything that needs `name`, directly or not."""
        return {n for n in self.nodes if n != name and name in self.closure([n])}

    def diamonds(self) -> int:
        """Nodes reached from one node by two different inputs."""
        count = 0
        for node in self.nodes.values():
            paths = [self.closure([i]) for i, _ in node.inputs]
            count += any(a & b for k, a in enumerate(paths) for b in paths[k + 1:])
        return count


def generate(tag: str, seed: int = 18) -> Graph:
    """The graph's shape, named after `tag` (a new tag gives new derivations: outputs no store
    has yet)."""
    rng = random.Random(seed)
    layers: list[list[Node]] = []
    for layer, size in enumerate(LAYERS):
        nodes: list[Node] = []
        for index in range(size):
            kind = {TREE_AT: "tree", BIG_AT: "big", FAILING_AT: "failing"}.get(
                (layer, index), "multi" if index % 9 == 3 else "file")
            inputs: list[Node] = []
            if layer:
                below = layers[layer - 1]
                inputs = rng.sample(below, min(len(below), rng.choice((1, 2, 2, 3))))
                if layer > 1 and rng.random() < 0.3:
                    inputs.append(rng.choice(layers[rng.randrange(layer - 1)]))
                forced = {(3, 0): TREE_AT, (5, 0): BIG_AT, (6, 0): FAILING_AT,
                          (6, 1): FAILING_AT}.get((layer, index))
                if forced is not None:
                    inputs.append(layers[forced[0]][forced[1]])
            unique = list({n.name: n for n in inputs}.values())
            chosen = tuple(
                (n.name, "dev" if n.kind == "multi" and rng.random() < 0.5 else "out")
                for n in unique
            )
            nodes.append(Node(f"g{layer}x{index}", layer, kind, chosen))
        layers.append(nodes)
    return Graph(tag, {n.name: n for layer in layers for n in layer})


def _script(graph: Graph, node: Node) -> str:
    """The builder's script: a few bytes of each input (the tree: run its tool, read its link),
    then what the node itself makes."""
    lines = [f"echo {node.name}-{graph.tag} > $out"]
    for number, (name, _) in enumerate(node.inputs):
        if graph.nodes[name].kind == "tree":
            lines.append(f'"$in{number}/bin/tool" >> $out; /bin/cat "$in{number}/bin/link" >> $out')
        else:
            lines.append(f'/usr/bin/head -c 64 "$in{number}" >> $out')
    if node.kind == "multi":
        lines.append(f"echo {node.name}-dev > $dev")
    elif node.kind == "tree":
        lines = [
            "/bin/mkdir -p $out/bin $out/share/doc/deep",
            f"echo {node.name}-{graph.tag} > $out/share/doc/deep/file",
            "/bin/ln -s ../share/doc/deep/file $out/bin/link",
            "printf '#!/bin/sh\\necho tool ran\\n' > $out/bin/tool",
            "/bin/chmod 755 $out/bin/tool",
        ]
    elif node.kind == "big":
        lines.append(f"/usr/bin/head -c {BIG_BYTES} /dev/urandom >> $out")
    elif node.kind == "failing":
        lines.append(f"echo {node.name} fails on purpose; exit 1")
    return "; ".join(lines)


def expression(graph: Graph) -> str:
    """One Nix expression whose value is the list of every node's derivation, in node order."""
    bindings = []
    for node in graph.nodes.values():
        attrs = "".join(
            f" in{number} = {name}" + (".dev" if output == "dev" else "") + ";"
            for number, (name, output) in enumerate(node.inputs)
        )
        outputs = " ".join(f'"{o}"' for o in node.outputs)
        bindings.append(
            f"  {node.name} = derivation {{ name = {nix_string(f'{node.name}-{graph.tag}')};"
            f' system = builtins.currentSystem; builder = "/bin/sh";'
            f" outputs = [ {outputs} ]; args = [ \"-c\" {nix_string(_script(graph, node))} ];"
            f"{attrs} }};"
        )
    names = " ".join(graph.nodes)
    return "let\n" + "\n".join(bindings) + f"\nin [ {names} ]\n"


def instantiate_graph(tag: str) -> Graph:
    """The graph's derivations, written into the coordinator's (private) store."""
    graph = generate(tag)
    paths = instantiate_all(expression(graph))
    if len(paths) != len(graph.nodes):
        raise RuntimeError(f"nix-instantiate made {len(paths)} derivations, not "
                           f"{len(graph.nodes)}")
    graph.drvs = dict(zip(graph.nodes, paths, strict=True))
    return graph
