"""Reader and writer for the ATerm `.drv` files that Guix and Nix share.

The format is canonical (no white space, only the escapes ``\\" \\\\ \\n \\r \\t``), so the
parser accepts exactly what the writers produce and ``serialize(parse(b)) == b``.  Submitting
tens of thousands of derivations must take seconds, hence the regex-driven scanner: each list
element is matched by one compiled pattern, and only a failed match takes the slow path that
works out the exact byte offset and reason for the error message.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

from buildfarm.errors import DerivationError

__all__ = [
    "Derivation",
    "DerivationOutput",
    "is_store_path",
    "parse",
    "read",
    "read_bytes",
    "serialize",
    "store_path_name",
]

# Store path: "<store dir>/<32 nix-base32 chars>-<name>"; names as Guix's checkStoreName
# allows them (no leading dot, at most 211 characters). The store dir is a canonical absolute
# path: no "." or ".." segment (it would lead out of the store), no control character.
_STORE_PATH = re.compile(
    r"(?:/(?!\.\.?/)[^/\x00-\x1f\x7f]+)+"
    r"/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-_?=][A-Za-z0-9+\-._?=]{0,210}"
)
_HASH_ALGO = re.compile(r"(?:r:|text:)?(?:md5|sha1|sha256|sha512)")
_HEX = re.compile(r"[0-9a-f]+")

# A string body: anything but '"', '\' and the raw characters the writers always escape.
# Possessive (*+): a string's end is never backtracked into, and without them Python's matcher
# keeps a frame per escape, about 80 bytes per 2 bytes of a file of escapes.
_S = r'"([^"\\\n\r\t]*+(?:\\[\\"nrt][^"\\\n\r\t]*+)*+)"'
_STRING = re.compile(_S)
_STRING_THEN = re.compile(_S + r"([,\]])")
_OUTPUT_THEN = re.compile(rf"\({_S},{_S},{_S},{_S}\)([,\]])")
_PAIR_THEN = re.compile(rf"\({_S},{_S}\)([,\]])")
_INPUT_DRV_HEAD = re.compile(rf"\({_S},\[")
# The usual input derivation, whose output names need no escapes, in one match.
_PLAIN = r'"[^"\\\n\r\t]*+"'
_INPUT_DRV_THEN = re.compile(rf"\({_S},\[({_PLAIN}(?:,{_PLAIN})*+)\]\)([,\]])")
# Bytes of a .drv file at most: room for environment strings of several MiB (real derivations
# with the largest hold a few), and parsing holds at most about 3.5 times the file.
MAX_SIZE = 32 << 20
# Items of any one list at most: real derivations have thousands at most (a large system's input
# derivations), and each item costs about a hundred bytes of objects however short its text.
MAX_ITEMS = 1 << 16
_UNESCAPES = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_NEEDS_ESCAPE = re.compile(r'["\\\n\r\t]')


@dataclass(frozen=True, slots=True)
class DerivationOutput:
    """One output: name and path; fixed outputs also carry the expected hash."""

    name: str
    path: str
    hash_algo: str
    hash: str

    @property
    def fixed(self) -> bool:
        """True for a fixed-output (content-addressed by a declared hash) output."""
        return bool(self.hash_algo)


@dataclass(frozen=True, slots=True)
class Derivation:
    """A parsed `.drv` file; every list keeps the file's order."""

    outputs: tuple[DerivationOutput, ...]
    input_drvs: tuple[tuple[str, tuple[str, ...]], ...]
    input_srcs: tuple[str, ...]
    system: str
    builder: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    @property
    def required_features(self) -> frozenset[str]:
        """The `requiredSystemFeatures` env value (Guix and Nix use the same key)."""
        for key, value in self.env:
            if key == "requiredSystemFeatures":
                return frozenset(value.split())
        return frozenset()

    @property
    def output_paths(self) -> dict[str, str]:
        return {o.name: o.path for o in self.outputs}

    @property
    def references(self) -> tuple[str, ...]:
        """The store paths the `.drv` file itself refers to: input drvs and sources."""
        return tuple(sorted({p for p, _ in self.input_drvs} | set(self.input_srcs)))

    @property
    def store_dir(self) -> str:
        """The store directory, e.g. "/gnu/store", taken from the first output path."""
        return self.outputs[0].path.rsplit("/", 1)[0]


def is_store_path(path: str) -> bool:
    """True for "<storedir>/<32 nix-base32 chars>-<name>" with a valid name."""
    return _STORE_PATH.fullmatch(path) is not None


def store_path_name(path: str) -> str:
    """The name part of a store path (after "<hash>-"); ValueError if it is not one."""
    if not is_store_path(path):
        raise ValueError(f"not a store path: {path!r}")
    return path.rsplit("/", 1)[1][33:]


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a `.drv` file: a regular file of at most MAX_SIZE bytes. It is opened
    without waiting (a FIFO is refused at once, not waited on) and read no further than the
    limit (so is /dev/zero). OSError when it cannot be read (IsADirectoryError for a
    directory), DerivationError when it is not a regular file or is too large."""
    source = os.fspath(path)
    with open(os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
        kind = stat.S_IFMT(os.fstat(f.fileno()).st_mode)
        if kind == stat.S_IFDIR:
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), source)
        if kind != stat.S_IFREG:
            what = _KINDS.get(kind, "a special file")
            raise DerivationError(source, 0, f"not a regular file but {what}")
        data = f.read(MAX_SIZE + 1)
    if len(data) > MAX_SIZE:
        raise DerivationError(source, MAX_SIZE, f"larger than {MAX_SIZE >> 20} MiB, the most a "
                              "derivation may be")
    return data


def read(path: str | os.PathLike[str]) -> Derivation:
    """Read and parse a `.drv` file; a file that cannot be read is a DerivationError too."""
    source = os.fspath(path)
    try:
        data = read_bytes(source)
    except OSError as e:
        raise DerivationError(source, 0, e.strerror or str(e)) from None
    return parse(data, source)


def serialize(drv: Derivation) -> bytes:
    """The canonical ATerm bytes of `drv` (lists written in the order given)."""
    q = _quote
    outputs = ",".join(
        f"({q(o.name)},{q(o.path)},{q(o.hash_algo)},{q(o.hash)})" for o in drv.outputs
    )
    inputs = ",".join(
        f"({q(p)},[{','.join(map(q, names))}])" for p, names in drv.input_drvs
    )
    srcs = ",".join(map(q, drv.input_srcs))
    args = ",".join(map(q, drv.args))
    env = ",".join(f"({q(k)},{q(v)})" for k, v in drv.env)
    text = (
        f"Derive([{outputs}],[{inputs}],[{srcs}],{q(drv.system)},{q(drv.builder)},"
        f"[{args}],[{env}])"
    )
    return text.encode()


def _quote(s: str) -> str:
    if _NEEDS_ESCAPE.search(s) is None:
        return f'"{s}"'
    return f'"{s.translate(_ESCAPES)}"'


def _unescape(s: str) -> str:
    """Undo the escapes of a string the scanner already checked (each '\\' starts a pair).

    Replacing '\\\\' first is safe: scanning left to right, the first double backslash found
    always starts an escape pair, as an earlier pair would have been found first. It stands in
    as NUL, which parse() refuses in the text, until the other escapes are undone: a few
    copies of the string, never an object per escape.
    """
    if "\\" not in s:
        return s
    return (
        s.replace("\\\\", "\0").replace('\\"', '"').replace("\\n", "\n").replace("\\r", "\r")
        .replace("\\t", "\t").replace("\0", "\\")
    )


class _Fail(Exception):
    """Internal: a parse failure at a character index of the decoded text."""

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason


def _check_count(count: int, pos: int, what: str) -> None:
    if count > MAX_ITEMS:
        raise _Fail(pos, f"more than {MAX_ITEMS} items in {what}")


def parse(data: bytes, source: str = "<bytes>") -> Derivation:
    """Parse `.drv` bytes; any defect raises DerivationError(source, byte offset, reason)."""
    try:
        text = (data if isinstance(data, bytes) else bytes(data)).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DerivationError(source, e.start, "invalid UTF-8") from None
    except TypeError:
        raise DerivationError(source, 0, "not a byte string") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise DerivationError(source, _byte_offset(text, nul), "NUL byte (binary data)")
    try:
        return _parse_text(text)
    except _Fail as f:
        raise DerivationError(source, _byte_offset(text, f.index), f.reason) from None


def _byte_offset(text: str, index: int) -> int:
    index = min(index, len(text))
    return index if text.isascii() else len(text[:index].encode())


def _expect(text: str, pos: int, literal: str) -> int:
    if text.startswith(literal, pos):
        return pos + len(literal)
    end = pos
    for want, got in zip(literal, text[pos:], strict=False):
        if want != got:
            break
        end += 1
    if end >= len(text):
        raise _Fail(end, f"truncated: expected {literal[end - pos:]!r}")
    raise _Fail(end, f"expected {literal[end - pos]!r}, found {text[end]!r}")


def _string_error(text: str, pos: int) -> _Fail:
    """Why no well-formed string starts at `pos` (the slow path for error messages)."""
    if pos >= len(text):
        return _Fail(pos, "truncated: expected a string")
    if text[pos] != '"':
        return _Fail(pos, f"expected '\"' (a string), found {text[pos]!r}")
    i = pos + 1
    while i < len(text):
        c = text[i]
        if c == '"':  # well-formed after all: callers only get here on a real defect
            return _Fail(i + 1, "malformed string")
        if c == "\\":
            if i + 1 >= len(text):
                break
            if text[i + 1] not in _UNESCAPES:
                return _Fail(i, f"bad escape {text[i:i + 2]!r} (only \\\" \\\\ \\n \\r \\t)")
            i += 2
            continue
        if c in "\n\r\t":
            return _Fail(i, f"unescaped control character {c!r} in a string")
        i += 1
    return _Fail(len(text), "truncated: unterminated string")


def _string(text: str, pos: int) -> tuple[str, int]:
    m = _STRING.match(text, pos)
    if m is None:
        raise _string_error(text, pos)
    return _unescape(m[1]), m.end()


def _list_end(text: str, pos: int, what: str) -> _Fail:
    """The precise error after a list element not followed by ',' or ']'."""
    if pos >= len(text):
        return _Fail(pos, f"truncated: expected ',' or ']' in {what}")
    return _Fail(pos, f"expected ',' or ']' in {what}, found {text[pos]!r}")


def _tuple_error(text: str, pos: int, arity: int, what: str) -> _Fail:
    """Locate the defect in a ("s",...) element that the fast pattern rejected."""
    p = _expect(text, pos, "(")
    for k in range(arity):
        if k:
            p = _expect(text, p, ",")
        m = _STRING.match(text, p)
        if m is None:
            return _string_error(text, p)
        p = m.end()
    return _list_end(text, _expect(text, p, ")"), what)


def _string_list(text: str, pos: int, what: str) -> tuple[list[tuple[str, int]], int]:
    """Parse ["a","b",...] at pos; return (value, char index) pairs and the end index."""
    pos = _expect(text, pos, "[")
    items: list[tuple[str, int]] = []
    if text.startswith("]", pos):
        return items, pos + 1
    match = _STRING_THEN.match
    while True:
        m = match(text, pos)
        if m is None:
            s = _STRING.match(text, pos)
            if s is None:
                raise _string_error(text, pos)
            raise _list_end(text, s.end(), what)
        items.append((_unescape(m[1]), pos))
        _check_count(len(items), pos, what)
        pos = m.end()
        if m[2] == "]":
            return items, pos


def _check_path(text: str, index: int, path: str, store_dir: str, what: str) -> None:
    if not is_store_path(path):
        raise _Fail(index, f"{what} {path!r} is not an absolute store path")
    if path.rsplit("/", 1)[0] != store_dir:
        raise _Fail(index, f"{what} {path!r} is not in the store directory {store_dir}")


def _parse_text(text: str) -> Derivation:
    """Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])"""
    outputs, pos = _parse_outputs(text, _expect(text, 0, "Derive(["))
    store_dir = outputs[0].path.rsplit("/", 1)[0]
    input_drvs, pos = _parse_input_drvs(text, _expect(text, pos, ",["), store_dir)
    srcs, pos = _string_list(text, _expect(text, pos, ","), "the input sources")
    for src, index in srcs:
        _check_path(text, index, src, store_dir, "input source")
    system, pos = _string(text, _expect(text, pos, ","))
    builder, pos = _string(text, _expect(text, pos, ","))
    args, pos = _string_list(text, _expect(text, pos, ","), "the builder arguments")
    env, pos = _parse_env(text, _expect(text, pos, ",["))
    pos = _expect(text, pos, ")")
    if pos != len(text):
        raise _Fail(pos, f"trailing data after the derivation ({len(text) - pos} characters)")
    return Derivation(
        outputs=tuple(outputs),
        input_drvs=tuple(input_drvs),
        input_srcs=tuple(v for v, _ in srcs),
        system=system,
        builder=builder,
        args=tuple(v for v, _ in args),
        env=tuple(env),
    )


def _parse_outputs(text: str, pos: int) -> tuple[list[DerivationOutput], int]:
    """("name","path","hashAlgo","hash"),... up to and including the closing ']'."""
    if text.startswith("]", pos):
        raise _Fail(pos, "a derivation needs at least one output")
    outputs: list[DerivationOutput] = []
    names: set[str] = set()
    store_dir = ""
    match = _OUTPUT_THEN.match
    while True:
        m = match(text, pos)
        if m is None:
            raise _tuple_error(text, pos, 4, "the outputs")
        name, path, algo, digest = (_unescape(m[1]), _unescape(m[2]),
                                    _unescape(m[3]), _unescape(m[4]))
        if not name:
            raise _Fail(m.start(1) - 1, "empty output name")
        if name in names:
            raise _Fail(m.start(1) - 1, f"duplicate output {name!r}")
        names.add(name)
        if not store_dir and is_store_path(path):
            store_dir = path.rsplit("/", 1)[0]
        _check_path(text, m.start(2) - 1, path, store_dir, "output path")
        if algo or digest:
            if _HASH_ALGO.fullmatch(algo) is None:
                raise _Fail(m.start(3) - 1, f"unknown hash algorithm {algo!r}")
            if _HEX.fullmatch(digest) is None:
                raise _Fail(m.start(4) - 1, f"hash {digest!r} is not lowercase base16")
        outputs.append(DerivationOutput(name, path, algo, digest))
        _check_count(len(outputs), pos, "the outputs")
        pos = m.end()
        if m[5] == "]":
            return outputs, pos


def _parse_input_drvs(
    text: str, pos: int, store_dir: str
) -> tuple[list[tuple[str, tuple[str, ...]]], int]:
    """("/store/...drv",["out",...]),... up to and including the closing ']'."""
    input_drvs: list[tuple[str, tuple[str, ...]]] = []
    if text.startswith("]", pos):
        return input_drvs, pos + 1
    seen: set[str] = set()
    fast = _INPUT_DRV_THEN.match
    while True:
        f = fast(text, pos)
        m = f or _INPUT_DRV_HEAD.match(text, pos)
        if m is None:
            _, p = _string(text, _expect(text, pos, "("))
            _expect(text, p, ",[")
            raise _Fail(pos, "malformed input derivation")  # not reached
        path = _unescape(m[1])
        _check_path(text, pos + 1, path, store_dir, "input derivation")
        if not path.endswith(".drv"):
            raise _Fail(pos + 1, f"input derivation {path!r} does not end in .drv")
        if path in seen:
            raise _Fail(pos + 1, f"duplicate input derivation {path!r}")
        seen.add(path)
        _check_count(len(seen), pos, "the input derivations")
        if f is not None:  # output names without escapes, matched in one go
            names = f[2][1:-1].split('","')
            _check_count(len(names), f.start(2), "the input derivation's outputs")
            input_drvs.append((path, tuple(names)))
            pos = f.end()
            if f[3] == "]":
                return input_drvs, pos
            continue
        out_names, p = _string_list(text, m.end() - 1, "the input derivation's outputs")
        input_drvs.append((path, tuple(v for v, _ in out_names)))
        p = _expect(text, p, ")")
        if not text.startswith((",", "]"), p):
            raise _list_end(text, p, "the input derivations")
        pos = p + 1
        if text[p] == "]":
            return input_drvs, pos


def _parse_env(text: str, pos: int) -> tuple[list[tuple[str, str]], int]:
    """("key","value"),... up to and including the closing ']'."""
    env: list[tuple[str, str]] = []
    if text.startswith("]", pos):
        return env, pos + 1
    keys: set[str] = set()
    match = _PAIR_THEN.match
    while True:
        m = match(text, pos)
        if m is None:
            raise _tuple_error(text, pos, 2, "the environment")
        key = _unescape(m[1])
        if key in keys:
            raise _Fail(pos + 1, f"duplicate environment variable {key!r}")
        keys.add(key)
        env.append((key, _unescape(m[2])))
        _check_count(len(env), pos, "the environment")
        pos = m.end()
        if m[3] == "]":
            return env, pos
