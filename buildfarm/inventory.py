"""The machine inventory: YAML -> frozen Machine objects.

The YAML is read as a node tree (yaml.compose), not as plain Python values, so that every
problem can be reported as ``FILE:LINE:COLUMN: what is wrong; how to fix it``. Every problem
raises InventoryError; nothing else escapes from load() or parse().
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import platform
from dataclasses import dataclass
from typing import NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from buildfarm.errors import InventoryError
from buildfarm.inventory_fields import (
    BUILD_RETRIES,
    FIELDS,
    KIND_WORDS,
    PATH_FIELDS,
    STORE_DIRS,
    SYSTEM_RE,
    TAG_KEY_RE,
    TAG_VALUE_RE,
    Field,
    show,
)

__all__ = ["Inventory", "Machine", "load", "local_system", "parse"]


@dataclass(frozen=True, slots=True)
class Machine:
    """One build machine, as the inventory describes it (see inventory.example.yaml)."""

    name: str
    host: str | None
    port: int = 22
    user: str | None = None
    identity: str | None = None
    known_hosts: str | None = None
    host_key: str | None = None
    transport: str = "ssh"
    systems: tuple[str, ...] = ()
    max_builds: int = 1
    features: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()  # (key, value), sorted: submit --machine-tag
    speed: float = 1.0
    store: str = "guix"
    store_dir: str | None = None  # None: the store's usual one (STORE_DIRS)
    overload_threshold: float | None = None
    max_sessions: int = 8
    connect_timeout: float = 10.0
    keepalive_interval: float = 15.0
    answer_timeout: float = 120.0
    max_silent_time: int | None = None
    timeout: int | None = None
    # Where the machine may download inputs from (Guix --substitute-urls; Nix substituters),
    # instead of having them pushed by the coordinator; none: everything is pushed.
    substitute_urls: tuple[str, ...] = ()
    enabled: bool = True

    @property
    def tag_words(self) -> frozenset[str]:
        """Its tags as builds name them: KEY=VALUE words."""
        return frozenset(f"{key}={value}" for key, value in self.tags)

    @property
    def store_directory(self) -> str:
        """The store directory whose derivations the machine builds."""
        return self.store_dir or STORE_DIRS[self.store]


@dataclass(frozen=True, slots=True)
class Inventory:
    """All machines of one inventory file, in file order."""

    path: str
    machines: tuple[Machine, ...]
    build_retries: int = 0  # builder failures tried again, for builds without submit --retries

    def machine(self, name: str) -> Machine:
        """The machine called ``name``; KeyError if there is none."""
        for machine in self.machines:
            if machine.name == name:
                return machine
        raise KeyError(name)


_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "i386": "i686",
    "i486": "i686",
    "i586": "i686",
    "arm64": "aarch64",
    "armv6l": "armhf",
    "armv7l": "armhf",
    "armv8l": "armhf",
    "ppc64le": "powerpc64le",
    "ppc64": "powerpc64",
    "ppc": "powerpc",
}


def local_system() -> str:
    """This host's system type in Guix/Nix spelling, e.g. ``x86_64-linux``."""
    arch = platform.machine().lower() or "x86_64"
    arch = _ARCH_ALIASES.get(arch, arch)
    kernel = platform.system().lower() or "linux"
    system = f"{arch}-{kernel}"
    return system if SYSTEM_RE.fullmatch(system) else "x86_64-linux"


def load(path: str | os.PathLike[str]) -> Inventory:
    """Read and check the inventory file at ``path``.

    Relative ``identity`` and ``known_hosts`` paths are taken relative to the file's directory.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise InventoryError(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InventoryError(
            f"{source}:{line}:{column}: cannot read: not UTF-8 text"
            f" (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None
    return parse(text, source, base_dir=os.path.dirname(os.path.abspath(source)))


def parse(text: str, source: str = "<inventory>", *, base_dir: str | None = None) -> Inventory:
    """Check inventory YAML ``text``; ``source`` names it in error messages.

    ``base_dir``, if given, is where relative ``identity``/``known_hosts`` paths start from.
    """
    parser = _Parser(source, base_dir)
    try:
        return parser.inventory(text)
    except RecursionError:
        parser.fail(None, "the inventory is nested too deeply", "flatten the structure")


_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_BOOLS = {"yes": True, "true": True, "on": True, "no": False, "false": False, "off": False}
_CONSTRUCTOR = SafeConstructor()

Value = str | int | float | bool | tuple[str, ...] | tuple[tuple[str, str], ...] | None

assert list(FIELDS) == [f.name for f in dataclasses.fields(Machine)]


# --- the parser -----------------------------------------------------------------------------


class _Parser:
    """Walks the composed node tree of one inventory; every failure goes through fail()."""

    def __init__(self, source: str, base_dir: str | None) -> None:
        self.source = source
        self.base_dir = base_dir
        self.flattened: dict[int, dict[str, tuple[Node, Node]]] = {}  # id(mapping) -> its keys

    def fail(self, mark: Mark | None, what: str, hint: str) -> NoReturn:
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        raise InventoryError(f"{self.source}:{line}:{column}: {what}; {hint}")

    def inventory(self, text: str) -> Inventory:
        root = self.compose(text)
        if root is None:
            self.fail(None, "the inventory is empty", "write at least 'machines: []'")
        top = self.mapping(root, "the inventory", "write 'defaults:' and 'machines:' keys")
        for key, (key_node, _) in top.items():
            if key not in ("defaults", "machines", "build_retries"):
                self.unknown_key(key, key_node, ("defaults", "machines", "build_retries"),
                                 top_level=True)
        retries = 0
        if "build_retries" in top:
            found = self.value("build_retries", BUILD_RETRIES, top["build_retries"][1])
            assert isinstance(found, int)
            retries = found
        defaults: dict[str, Value] = {}
        if "defaults" in top:
            node = top["defaults"][1]
            if not self.is_null(node):
                defaults = self.machine_fields(node, in_defaults=True)[0]
        if "machines" not in top:
            self.fail(root.start_mark, "no 'machines:' key", "add 'machines:' with a list")
        items = top["machines"][1]
        if self.is_null(items):
            return Inventory(self.source, (), retries)
        if not isinstance(items, SequenceNode) or items.tag != _TAG + "seq":
            self.fail(items.start_mark, "machines must be a list",
                      "write each machine as a '- name: ...' item under 'machines:'")
        machines: list[Machine] = []
        first_seen: dict[str, Node] = {}
        for item in items.value:
            machine, name_node = self.machine(item, defaults)
            if machine.name in first_seen:
                first = first_seen[machine.name].start_mark.line + 1
                at = item if name_node is first_seen[machine.name] else name_node  # via <<
                self.fail(at.start_mark,
                          f"duplicate machine name {show(machine.name)} (first at line {first})",
                          "give each machine a unique name")
            first_seen[machine.name] = name_node
            machines.append(machine)
        return Inventory(self.source, tuple(machines), retries)

    def compose(self, text: str) -> Node | None:
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            parts = [str(part) for part in (exc.context, exc.problem) if part]
            problem = " ".join(", ".join(parts or ["syntax error"]).split())
            self.fail(exc.problem_mark or exc.context_mark, f"invalid YAML: {problem}",
                      _yaml_hint(problem))
        except ReaderError as exc:
            position = exc.position if isinstance(exc.position, int) else 0
            mark = _mark_at(text, position)
            code = exc.character if isinstance(exc.character, int) else 0
            self.fail(mark, f"invalid YAML: character #x{code:04x} is not allowed",
                      "remove it, or write it as an escape inside double quotes")
        except RecursionError:
            self.fail(None, "invalid YAML: nested too deeply", "flatten the structure")
        except Exception as exc:  # a parser bug must still not escape as a traceback
            self.fail(None, f"invalid YAML: {type(exc).__name__}",
                      "check the YAML syntax (indentation, quotes, brackets)")

    # -- node helpers

    @staticmethod
    def is_null(node: Node) -> bool:
        return isinstance(node, ScalarNode) and node.tag == _TAG + "null"

    def mapping(self, node: Node, what: str, hint: str) -> dict[str, tuple[Node, Node]]:
        """The keys of a mapping node (with << merges), checking for duplicate keys."""
        if not isinstance(node, MappingNode) or node.tag != _TAG + "map":
            self.fail(node.start_mark, f"{what} must be a mapping (key: value lines)", hint)
        return self.pairs(node, set())

    def pairs(self, node: MappingNode, active: set[int]) -> dict[str, tuple[Node, Node]]:
        if id(node) in self.flattened:  # an alias: done already (also stops alias bombs)
            return self.flattened[id(node)]
        if id(node) in active:
            self.fail(node.start_mark, "a merge (<<) refers to the mapping it is in",
                      "merge a different anchor")
        active = active | {id(node)}
        own: dict[str, tuple[Node, Node]] = {}
        merged: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag == _TAG + "merge":
                sources = value_node.value if isinstance(value_node, SequenceNode) else [
                    value_node]
                for merge_source in sources:
                    if not isinstance(merge_source, MappingNode):
                        self.fail(merge_source.start_mark, "'<<' must merge a mapping",
                                  "write '<<: *anchor' where &anchor names a mapping")
                    for key, pair in self.pairs(merge_source, active).items():
                        merged.setdefault(key, pair)
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                self.fail(key_node.start_mark, "a key must be a plain word",
                          "write keys like 'port:'")
            key = key_node.value
            if key in own:
                first = own[key][0].start_mark.line + 1
                self.fail(key_node.start_mark,
                          f"duplicate key {show(key)} (first at line {first})",
                          "remove one of them")
            own[key] = (key_node, value_node)
        result = {**merged, **own}
        self.flattened[id(node)] = result
        return result

    def unknown_key(self, key: str, node: Node, valid: tuple[str, ...], top_level: bool = False,
                    ) -> NoReturn:
        close = difflib.get_close_matches(key.lower(), valid, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif top_level and key in FIELDS:
            hint = "machine fields go under 'defaults:' or in an item of 'machines:'"
        else:
            hint = "valid keys are: " + ", ".join(valid)
        self.fail(node.start_mark, f"unknown key {show(key)}", hint)

    # -- machines

    def machine(self, node: Node, defaults: dict[str, Value]) -> tuple[Machine, Node]:
        fields, nodes = self.machine_fields(node, in_defaults=False)
        assert isinstance(node, MappingNode)
        if "name" not in fields:
            self.fail(node.start_mark, "this machine has no name",
                      "add 'name: NAME' (unique; letters, digits, '.', '_', '-')")
        name = fields["name"]
        assert isinstance(name, str)
        values = {**defaults, **fields}
        if values.get("transport", "ssh") == "ssh" and values.get("host") is None:
            self.fail(node.start_mark, f"machine {show(name)} has no host",
                      "add 'host: NAME' (or 'transport: local' for this host)")
        values.setdefault("host", None)
        if "systems" not in values:
            values["systems"] = (local_system(),)
        for key in PATH_FIELDS:
            path = values.get(key)
            if isinstance(path, str):
                path = os.path.expanduser(path)
                if self.base_dir is not None:
                    path = os.path.join(self.base_dir, path)
                values[key] = path
        return Machine(**values), nodes["name"]  # type: ignore[arg-type]

    def machine_fields(self, node: Node, in_defaults: bool,
                       ) -> tuple[dict[str, Value], dict[str, Node]]:
        """The checked values of one machine mapping (or the defaults) and their value nodes."""
        if in_defaults:
            valid = tuple(k for k, f in FIELDS.items() if f.in_defaults)
            pairs = self.mapping(node, "defaults", "write 'key: value' lines under 'defaults:'")
        else:
            valid = tuple(FIELDS)
            pairs = self.mapping(node, "each machine",
                                 "write each machine as '- name: NAME' with keys below it")
        values: dict[str, Value] = {}
        nodes: dict[str, Node] = {}
        for key, (key_node, value_node) in pairs.items():
            if key not in valid:
                if key in FIELDS:
                    self.fail(key_node.start_mark, f"{key} cannot be set in defaults",
                              f"set {key} on each machine")
                self.unknown_key(key, key_node, valid)
            values[key] = self.value(key, FIELDS[key], value_node)
            nodes[key] = value_node
        return values, nodes

    def value(self, key: str, field: Field, node: Node) -> Value:
        if field.optional and self.is_null(node):
            return None
        want = f"{key} must be {KIND_WORDS[field.kind]}"
        hint = f"write e.g. {field.example}"
        if field.kind == "list":
            return self.string_list(key, field, node, want, hint)
        if field.kind == "map":
            return self.tag_map(key, node, want, hint)
        if not isinstance(node, ScalarNode):
            self.fail(node.start_mark, f"{want}, not a {_node_kind(node)}", hint)
        if node.tag not in _SCALAR_TAGS:
            self.fail(node.start_mark, f"unsupported YAML tag {show(node.tag)}",
                      "remove the tag")
        if node.tag == _TAG + "null":
            self.fail(node.start_mark, f"{want}, not empty", hint + ", or remove the key")
        if field.kind == "str":
            return self.string(key, field, node)
        if field.kind == "bool":
            if node.tag == _TAG + "bool" and node.value.lower() in _BOOLS:
                return _BOOLS[node.value.lower()]
            self.fail(node.start_mark, f"{want}, not {show(node.value)}", hint)
        number = self.number(field, node, want, hint)
        self.check_range(key, field, node, number)
        return number

    def string(self, key: str, field: Field, node: ScalarNode) -> str:
        text: str = node.value
        if field.choices and text not in field.choices:
            close = difflib.get_close_matches(text.lower(), field.choices, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "use " + " or ".join(field.choices)
            self.fail(node.start_mark, f"unknown {key} {show(text)}", hint)
        problem = field.check(text) if field.check is not None else None
        if problem is not None:
            self.fail(node.start_mark, f"bad {key} {show(text)}", problem)
        return text

    def string_list(self, key: str, field: Field, node: Node, want: str, hint: str,
                    ) -> tuple[str, ...]:
        if not isinstance(node, SequenceNode) or node.tag != _TAG + "seq":
            what = show(node.value) if isinstance(node, ScalarNode) else f"a {_node_kind(node)}"
            self.fail(node.start_mark, f"{want} of strings, not {what}", hint)
        if field.nonempty and not node.value:
            self.fail(node.start_mark, f"{key} must not be empty",
                      f"{hint}, or remove the key to use this host's ({local_system()})")
        items: list[str] = []
        for item in node.value:
            if (not isinstance(item, ScalarNode) or item.tag not in _SCALAR_TAGS
                    or item.tag == _TAG + "null"):
                self.fail(item.start_mark, f"each item of {key} must be a string", hint)
            text = self.string(key.rstrip("s"), field, item)
            if text in items:
                self.fail(item.start_mark, f"{show(text)} appears twice in {key}",
                          "remove one of them")
            items.append(text)
        return tuple(items)

    def tag_map(self, key: str, node: Node, want: str, hint: str) -> tuple[tuple[str, str], ...]:
        """KEY: VALUE pairs of words, sorted by key."""
        pairs = self.mapping(node, key, hint)
        found: dict[str, str] = {}
        for name, (name_node, value_node) in pairs.items():
            if not TAG_KEY_RE.fullmatch(name):
                self.fail(name_node.start_mark, f"bad tag key {show(name)}",
                          "use letters, digits and _.:/- (starting with a letter, digit or _)")
            if (not isinstance(value_node, ScalarNode) or value_node.tag not in _SCALAR_TAGS
                    or value_node.tag == _TAG + "null"
                    or not TAG_VALUE_RE.fullmatch(value_node.value)):
                self.fail(value_node.start_mark, f"{want}: the value of {show(name)} "
                          "must be one word of printable ASCII (1 to 128 characters)", hint)
            found[name] = value_node.value
        return tuple(sorted(found.items()))

    def number(self, field: Field, node: ScalarNode, want: str, hint: str) -> int | float:
        tag, text = node.tag, node.value
        if tag == _TAG + "bool":
            self.fail(node.start_mark, f"{want}, not the boolean {show(text)}",
                      f"YAML reads yes/no/on/off/true/false as booleans; {hint}")
        try:
            if tag == _TAG + "int":
                number: int | float = int(_CONSTRUCTOR.construct_yaml_int(node))
            elif tag == _TAG + "float" and field.kind == "float":
                number = float(_CONSTRUCTOR.construct_yaml_float(node))
            elif field.kind == "float" and node.style is None and text.strip():
                number = float(text)  # 1e3: YAML 1.1 reads it as a string
            else:
                raise ValueError(text)
        except (ValueError, IndexError, OverflowError):
            if node.style in ("'", '"') and _looks_numeric(text):
                self.fail(node.start_mark, f"{want}, not the quoted string {show(text)}",
                          f"remove the quotes; {hint}")
            self.fail(node.start_mark, f"{want}, not {show(text)}", hint)
        if field.kind == "float":
            number = float(number)
            if not math.isfinite(number):
                self.fail(node.start_mark, f"{want}, not {show(text)}", hint)
        return number

    def check_range(self, key: str, field: Field, node: Node, number: float) -> None:
        low, high = field.minimum, field.maximum
        if low is not None and (number < low or (field.exclusive and number == low)):
            bound = f"greater than {low:g}" if field.exclusive else f"at least {low:g}"
            if high is not None:
                bound = f"between {low:g} and {high}"
            self.fail(node.start_mark, f"{key} must be {bound}, not {node.value}",
                      f"write e.g. {field.example}")
        if high is not None and number > high:
            self.fail(node.start_mark, f"{key} must be between {low:g} and {high}, not "
                      f"{node.value}", f"write e.g. {field.example}")


def _looks_numeric(text: str) -> bool:
    try:
        float(text.replace("_", ""))
    except ValueError:
        return False
    return True


def _node_kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "mapping"
    if isinstance(node, SequenceNode):
        return "list"
    return "single value"


def _yaml_hint(problem: str) -> str:
    if "'\\t'" in problem:
        return "indent with spaces; YAML does not allow tabs there"
    if "mapping values are not allowed" in problem:
        return "check the indentation, or quote a value that contains ': '"
    if "undefined alias" in problem:
        return "define the anchor (&name) before using it (*name)"
    if "another document" in problem:
        return "keep the whole inventory in one YAML document (remove the '---')"
    return "check the YAML syntax here (indentation, quotes, brackets)"


def _mark_at(text: str, position: int) -> Mark:
    """The line and column PyYAML would report for a character offset."""
    line = column = 0
    for index, char in enumerate(text[:position]):
        if char in "\n\x85\u2028\u2029" or (
            char == "\r" and (index + 1 >= len(text) or text[index + 1] != "\n")
        ):
            line, column = line + 1, 0
        elif char != "\ufeff":
            column += 1
    return Mark("<inventory>", position, line, column, None, 0)
