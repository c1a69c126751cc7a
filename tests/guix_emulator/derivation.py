"""`.drv` files as [D] guix/derivations.scm `read-derivation` reads them.

Guix hands the file to Guile's `read`: `Derive` is a symbol, `[...]` and `(...)` are lists, a
comma is `unquote` (dropped), strings take Guile's escapes.  The result must have Derive's shape:
outputs, input derivations, sources, system, builder, arguments, environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from guix_emulator.options import NotEmulated

_TOKEN = re.compile(rb'\s*(?:([\[\](),])|"((?:[^"\\]|\\.)*)"|([A-Za-z]+))', re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "f": "\f", "v": "\v", "0": "\0",
            "\\": "\\", '"': '"'}
Value = str | list["Value"]


@dataclass(frozen=True)
class Derivation:
    path: str
    outputs: tuple[tuple[str, str], ...]  # (name, store path), in the file's order
    inputs: tuple[tuple[str, tuple[str, ...]], ...]  # (.drv file, output names)
    sources: tuple[str, ...]
    system: str
    builder: str

    @property
    def output_paths(self) -> list[str]:
        return [path for _, path in self.outputs]


def read_derivation(path: str) -> Derivation:
    """[D] read-derivation-from-file.  A file Guix would fail on ("failed to parse derivation",
    a Guile error with a backtrace) is not emulated."""
    try:
        with open(path, "rb") as stream:
            return parse_derivation(stream.read(), path)
    except OSError as error:
        raise NotEmulated(f"cannot read derivation {path}: {error}") from None


def parse_derivation(text: bytes, path: str) -> Derivation:
    """[D] read-derivation on the text of the .drv file `path`."""
    try:
        match _read(text):
            case ["Derive", [outputs, inputs, sources, str(system), str(builder), list(),
                             list()]] if _all_lists(outputs, inputs) and _strings(sources):
                return Derivation(
                    path,
                    tuple((name, out) for name, out, *_ in _shaped(outputs, 4)),
                    tuple((drv, tuple(names)) for drv, names in _shaped(inputs, 2)),
                    tuple(sources), system, builder)
    except ValueError as error:
        raise NotEmulated(f"cannot read derivation {path}: {error}") from None
    raise NotEmulated(f"cannot read derivation {path}: failed to parse derivation")


def _all_lists(*values: Value) -> bool:
    return all(isinstance(v, list) for v in values)


def _strings(value: Value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _shaped(items: Value, width: int) -> list[Value]:
    """Each item a list of `width` elements, strings but for an input's list of outputs."""
    assert isinstance(items, list)
    for item in items:
        if not isinstance(item, list) or len(item) != width or not isinstance(item[0], str):
            raise ValueError(f"unexpected derivation element {item!r}")
        if not _strings(item) and not (width == 2 and _strings(item[1])):
            raise ValueError(f"unexpected derivation element {item!r}")
    return items


def _read(text: bytes) -> list[Value]:
    """Guile's `read`, repeated to the end of the file, on the ATerm subset: the data read."""
    stack: list[list[Value]] = [[]]
    at = 0
    while at < len(text.rstrip()):
        m = _TOKEN.match(text, at)
        if m is None:
            raise ValueError(f"unexpected byte at offset {at}")
        at = m.end()
        bracket, string, symbol = m.groups()
        if bracket in (b"(", b"["):
            stack.append([])
        elif bracket in (b")", b"]"):
            if len(stack) == 1:
                raise ValueError(f"unbalanced {bracket.decode()} at offset {at}")
            done = stack.pop()
            stack[-1].append(done)
        elif bracket == b",":
            continue  # `unquote` of the next datum, removed by ununquote
        elif string is not None:
            stack[-1].append(_unescape(string.decode("utf-8")))
        else:
            stack[-1].append(symbol.decode())
    if len(stack) != 1:
        raise ValueError("unexpected end of file")
    return stack[0]


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m[1], m[1]), body, flags=re.S)
