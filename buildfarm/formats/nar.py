"""Nix archives (nar), export bundles and Nix's base32, as Guix and Nix write them.

Outputs can be hundreds of megabytes, so nothing here holds a whole nar in memory: nars are
parsed as a stream (validating every token, the sort order of directory entries and the zero
padding), hashed incrementally, and copied to wherever the caller wants them.  Byte layouts
follow guix-facts.md section 4 (Guix's serialization.scm and Nix's libstore).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from buildfarm.errors import ArchiveError
from buildfarm.formats.derivation import is_store_path

__all__ = [
    "EXPORT_MAGIC",
    "BundleItem",
    "Signature",
    "dump_path",
    "export_trailer",
    "max_bundle_size",
    "nar_bytes",
    "nix_base32_decode",
    "nix_base32_encode",
    "read_bundle",
    "restore_nar",
    "write_bundle",
]

EXPORT_MAGIC = 0x4558494E  # "NIXE"
_CHUNK = 1 << 20
_MAX_TOKEN = 64  # "nix-archive-1", "type", "directory", ...
_MAX_NAME = 255  # NAME_MAX
_MAX_TARGET = 4095  # PATH_MAX - 1
_MAX_PATH = 4096
_MAX_SIGNATURE = 1 << 16
_MAX_REFERENCES = 1 << 20

# --- nix-base32 ----------------------------------------------------------------------------

_B32 = "0123456789abcdfghijklmnpqrsvwxyz"
_B32_VALUE = {c: i for i, c in enumerate(_B32)}


def nix_base32_encode(data: bytes) -> str:
    """Nix's base32: its own alphabet, least significant 5 bits of the hash printed last."""
    if not data:
        return ""
    n = int.from_bytes(data, "little")
    length = (len(data) * 8 - 1) // 5 + 1
    return "".join(_B32[(n >> (5 * k)) & 31] for k in range(length - 1, -1, -1))


def nix_base32_decode(text: str) -> bytes:
    """Inverse of nix_base32_encode; ArchiveError for a bad character, length or spare bits."""
    size = len(text) * 5 // 8
    if (size * 8 - 1) // 5 + 1 != len(text) and text:
        raise ArchiveError(f"invalid nix-base32 length {len(text)}: {text!r}")
    n = 0
    for i, c in enumerate(text):
        v = _B32_VALUE.get(c)
        if v is None:
            raise ArchiveError(f"invalid nix-base32 character {c!r} at {i} in {text!r}")
        n = (n << 5) | v
    if n >> (size * 8):
        raise ArchiveError(f"invalid nix-base32 (non-zero spare bits): {text!r}")
    return n.to_bytes(size, "little")


# --- wire primitives -----------------------------------------------------------------------

def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def _str(data: bytes) -> bytes:
    """u64 length, the bytes, zero padding to a multiple of 8."""
    return _u64(len(data)) + data + bytes(-len(data) & 7)


_T_OPEN = _str(b"(")
_T_CLOSE = _str(b")")
_NAR_HEADER = _str(b"nix-archive-1")
_NODE_START = _T_OPEN + _str(b"type")
_T_DIRECTORY = _str(b"directory")
_T_SYMLINK_TARGET = _str(b"symlink") + _str(b"target")
_T_REGULAR = _str(b"regular")
_T_EXECUTABLE = _str(b"executable") + _str(b"")
_T_CONTENTS = _str(b"contents")
_T_ENTRY_NAME = _str(b"entry") + _T_OPEN + _str(b"name")
_T_NODE = _str(b"node")


class _Reader:
    """Exact reads from a stream, counting the offset, feeding a hash and a copy sink."""

    __slots__ = ("_read", "hasher", "offset", "sink", "source")

    def __init__(self, stream: BinaryIO, source: str, offset: int = 0) -> None:
        self._read = stream.read
        self.source = source
        self.offset = offset
        self.hasher: hashlib._Hash | None = None
        self.sink: Callable[[bytes], object] | None = None

    def error(self, offset: int, reason: str) -> ArchiveError:
        return ArchiveError(f"{self.source}: byte {offset}: {reason}")

    def _take(self, data: bytes) -> None:
        self.offset += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        if self.sink is not None:
            self.sink(data)

    def exact(self, n: int, what: str) -> bytes:
        data = self._read(n)
        if len(data) != n:
            parts = [data]
            got = len(data)
            while got < n:
                more = self._read(n - got)
                if not more:
                    raise self.error(self.offset + got, f"truncated while reading {what}")
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self._take(data)
        return data

    def u64(self, what: str) -> int:
        return int.from_bytes(self.exact(8, what), "little")

    def string(self, limit: int, what: str) -> bytes:
        start = self.offset
        n = self.u64(what)
        if n > limit:
            raise self.error(start, f"{what} is {n} bytes long (at most {limit} allowed)")
        padded = (n + 7) & ~7
        data = self.exact(padded, what)
        if padded != n:
            self._check_padding(data[n:], what)
            return data[:n]
        return data

    def _check_padding(self, pad: bytes, what: str) -> None:
        if pad.count(0) != len(pad):
            at = self.offset - len(pad) + next(i for i, b in enumerate(pad) if b)
            raise self.error(at, f"non-zero padding after {what}")

    def expect(self, token: bytes, what: str) -> None:
        start = self.offset
        got = self.string(_MAX_TOKEN, what)
        if got != token:
            raise self.error(start, f"expected {token.decode()!r} ({what}), found {got!r}")

    def copy(self, size: int, write: Callable[[bytes], object] | None) -> None:
        """Stream `size` bytes of file contents (plus padding) through hash, sink and write."""
        remaining = size
        read = self._read
        while remaining:
            chunk = read(min(remaining, _CHUNK))
            if not chunk:
                raise self.error(
                    self.offset, f"truncated file contents ({remaining} of {size} bytes missing)"
                )
            remaining -= len(chunk)
            self._take(chunk)
            if write is not None:
                write(chunk)
        if size & 7:
            self._check_padding(self.exact(-size & 7, "file contents padding"), "file contents")


# --- nar parsing (streaming, iterative: no recursion limit on deep trees) ------------------

class _Restorer:
    """Creates the tree a nar describes under `dest`, refusing to touch anything else."""

    def __init__(self, dest: bytes) -> None:
        self.dest = dest
        self.created = False
        self._pending = dest
        self._dirs: list[bytes] = []
        self._file: BinaryIO | None = None

    def directory(self) -> None:
        os.mkdir(self._pending, 0o777)
        self.created = True
        self._dirs.append(self._pending)

    def entry(self, name: bytes) -> None:
        self._pending = self._dirs[-1] + b"/" + name

    def leave(self) -> None:
        self._dirs.pop()

    def regular(self, executable: bool) -> Callable[[bytes], object]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._pending, flags, 0o666)
        self.created = True
        if executable:  # as Nix's restorePath: add every x bit to the mode umask left
            os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | 0o111)
        self._file = os.fdopen(fd, "wb")
        return self._file.write

    def end_regular(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def symlink(self, target: bytes) -> None:
        os.symlink(target, self._pending)
        self.created = True

    def abort(self) -> None:
        """Close what is open and remove everything created (dest was new, so all of it)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.created:
            return
        if os.path.isdir(self.dest) and not os.path.islink(self.dest):
            shutil.rmtree(self.dest, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(self.dest)


def _parse_nar(r: _Reader, v: _Restorer | None) -> None:
    """Read one nar from `r`, checking every token; create it through `v` if given."""
    r.expect(b"nix-archive-1", "nar magic")
    names: list[bytes | None] = []  # per open directory: the previous entry name
    while True:
        r.expect(b"(", "node start")
        r.expect(b"type", "node type")
        at = r.offset
        kind = r.string(_MAX_TOKEN, "node type")
        if kind == b"directory":
            if v is not None:
                v.directory()
            names.append(None)
        else:
            if kind == b"regular":
                _parse_regular(r, v)
            elif kind == b"symlink":
                r.expect(b"target", "symlink")
                at = r.offset
                target = r.string(_MAX_TARGET, "symlink target")
                if not target or b"\0" in target:
                    raise r.error(at, f"invalid symlink target {target!r}")
                if v is not None:
                    v.symlink(target)
            else:
                raise r.error(at, f"unknown node type {kind!r}")
            r.expect(b")", "node end")
            if not names:
                return
            r.expect(b")", "directory entry end")
        while True:  # inside a directory: the next entry, or its end
            at = r.offset
            token = r.string(_MAX_TOKEN, "directory entry")
            if token == b"entry":
                r.expect(b"(", "directory entry")
                r.expect(b"name", "directory entry")
                at = r.offset
                name = r.string(_MAX_NAME, "entry name")
                if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
                    raise r.error(at, f"invalid entry name {name!r}")
                previous = names[-1]
                if previous is not None and name <= previous:
                    reason = "duplicate" if name == previous else "unsorted"
                    raise r.error(at, f"{reason} entry name {name!r} (after {previous!r})")
                names[-1] = name
                r.expect(b"node", "directory entry")
                if v is not None:
                    v.entry(name)
                break
            if token != b")":
                raise r.error(at, f"expected 'entry' or ')' in a directory, found {token!r}")
            names.pop()
            if v is not None:
                v.leave()
            if not names:
                return
            r.expect(b")", "directory entry end")


def _parse_regular(r: _Reader, v: _Restorer | None) -> None:
    at = r.offset
    token = r.string(_MAX_TOKEN, "regular file")
    executable = token == b"executable"
    if executable:
        r.expect(b"", "executable marker")
        at = r.offset
        token = r.string(_MAX_TOKEN, "regular file")
    if token != b"contents":
        raise r.error(at, f"expected 'contents' in a regular file, found {token!r}")
    size = r.u64("file size")
    write = v.regular(executable) if v is not None else None
    r.copy(size, write)
    if v is not None:
        v.end_regular()


def restore_nar(
    stream: BinaryIO, dest: str | os.PathLike[str], *, source: str = "nar"
) -> tuple[bytes, int]:
    """Unpack one nar from `stream` into the new path `dest`; return (sha256, nar size).

    Reads exactly the nar's bytes.  Entry names must be valid, sorted and unique, so nothing
    is ever written outside `dest` (files are created with O_EXCL | O_NOFOLLOW).  On any error
    everything created is removed; an existing `dest` is an OSError (FileExistsError).
    """
    r = _Reader(stream, source)
    r.hasher = hashlib.sha256()
    restorer = _Restorer(os.fsencode(dest))
    try:
        _parse_nar(r, restorer)
    except BaseException:
        restorer.abort()
        raise
    return r.hasher.digest(), r.offset


# --- nar writing ---------------------------------------------------------------------------

class _Writer:
    __slots__ = ("_write", "hasher", "size")

    def __init__(self, out: BinaryIO) -> None:
        self._write = out.write
        self.hasher = hashlib.sha256()
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self._write(data)
        self.hasher.update(data)
        self.size += len(data)


def dump_path(path: str | os.PathLike[str], out: BinaryIO) -> tuple[bytes, int]:
    """Write the nar of a file, symlink or directory tree; return (sha256, nar size).

    Symlinks are stored, never followed; other file types are an ArchiveError; filesystem
    errors are OSError.  Directory entries are sorted bytewise, as Nix and Guix sort them.
    """
    w = _Writer(out)
    w(_NAR_HEADER)
    pending = os.fsencode(path)
    stack: list[tuple[bytes, Iterator[bytes]]] = []
    while True:
        st = os.lstat(pending)
        w(_NODE_START)
        if stat.S_ISDIR(st.st_mode):
            w(_T_DIRECTORY)
            stack.append((pending, iter(sorted(os.listdir(pending)))))
        else:
            if stat.S_ISREG(st.st_mode):
                _dump_regular(pending, w)
            elif stat.S_ISLNK(st.st_mode):
                w(_T_SYMLINK_TARGET + _str(os.readlink(pending)))
            else:
                raise ArchiveError(f"{os.fsdecode(pending)}: cannot archive this file type")
            w(_T_CLOSE)
            if not stack:
                return w.hasher.digest(), w.size
            w(_T_CLOSE)  # the entry
        while stack:
            directory, names = stack[-1]
            name = next(names, None)
            if name is not None:
                w(_T_ENTRY_NAME + _str(name) + _T_NODE)
                pending = directory + b"/" + name
                break
            stack.pop()
            w(_T_CLOSE)  # the directory node
            if not stack:
                return w.hasher.digest(), w.size
            w(_T_CLOSE)  # the entry holding it


def _dump_regular(path: bytes, w: _Writer) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        size = st.st_size
        w(_T_REGULAR + (_T_EXECUTABLE if st.st_mode & stat.S_IXUSR else b"")
          + _T_CONTENTS + _u64(size))
        remaining = size
        while remaining:
            chunk = f.read(min(remaining, _CHUNK))
            if not chunk:
                raise ArchiveError(f"{os.fsdecode(path)}: file shrank while being archived")
            remaining -= len(chunk)
            w(chunk)
        w(bytes(-size & 7))


def nar_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole nar of `path` in memory (for small trees and tests)."""
    buf = io.BytesIO()
    dump_path(path, buf)
    return buf.getvalue()


# --- export bundles ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BundleItem:
    """One store item of an export bundle, as read (its nar went to the sink)."""

    path: str
    references: tuple[str, ...]
    deriver: str
    signature: bytes | None  # as the machine wrote it: libgcrypt may print raw bytes 0xA1-0xFF
    nar_sha256: bytes
    nar_size: int
    signed_sha256: bytes  # SHA-256 from the nar start through the padded deriver (Guix signs it)


def export_trailer(path: str, references: Iterable[str], deriver: str) -> bytes:
    """The bytes after an item's nar up to its signature marker (hashed into signed_sha256)."""
    refs = sorted(set(references))
    return b"".join(
        [_u64(EXPORT_MAGIC), _str(path.encode()), _u64(len(refs))]
        + [_str(ref.encode()) for ref in refs]
        + [_str(deriver.encode())]
    )


def max_bundle_size(items: Iterable[tuple[int | None, int | None]]) -> int | None:
    """The most bytes a bundle of items with these (nar size, reference count) can hold and
    still pass read_bundle: per item its nar, the item marker, the export magic, the reference
    count and the signature marker (8 bytes each), and its store path, references, deriver and
    signature each at the longest read_bundle accepts. An unknown count (None) counts as the
    most read_bundle accepts, a loose bound; an unknown nar size (None) leaves no bound."""
    path = 8 + _MAX_PATH  # a length, then the bytes padded to 8 (_MAX_PATH is a multiple of 8)
    total = 8  # the end marker
    for nar_size, references in items:
        if nar_size is None:
            return None
        count = _MAX_REFERENCES if references is None else references
        total += 4 * 8 + nar_size + (2 + count) * path + 8 + _MAX_SIGNATURE
    return total


def read_bundle(
    stream: BinaryIO,
    sink: Callable[[int], BinaryIO] | None = None,
    *,
    max_items: int | None = None,
    source: str = "export bundle",
    trailing_ok: bool = False,
) -> Iterator[BundleItem]:
    """Stream an export bundle (`guix archive --export`, `nix-store --export`).

    Item i's nar bytes are copied into sink(i) (the caller closes it, also after an error).
    Every nar is validated while streaming; anything malformed, truncated, more than
    `max_items` items, or data after the end marker (unless `trailing_ok`) is an ArchiveError
    naming the byte offset in the bundle.
    """
    r = _Reader(stream, source)
    index = 0
    while True:
        at = r.offset
        marker = r.u64("item marker")
        if marker == 0:
            break
        if marker != 1:
            raise r.error(at, f"expected item marker 1 or end marker 0, found {marker}")
        if max_items is not None and index >= max_items:
            raise r.error(at, f"more than {max_items} items")
        yield _read_item(r, index, sink(index) if sink is not None else None)
        index += 1
    if not trailing_ok and stream.read(1):
        raise r.error(r.offset, "trailing data after the end of the bundle")


def _read_item(r: _Reader, index: int, out: BinaryIO | None) -> BundleItem:
    hasher = hashlib.sha256()
    r.hasher = hasher
    r.sink = out.write if out is not None else None
    start = r.offset
    try:
        _parse_nar(r, None)
    finally:
        r.sink = None
    nar_sha256 = hasher.digest()
    nar_size = r.offset - start
    at = r.offset
    magic = r.u64("export magic")
    if magic != EXPORT_MAGIC:
        raise r.error(at, f"item {index}: expected export magic 0x4558494e, found {magic:#x}")
    path = _read_path(r, "store path")
    at = r.offset
    count = r.u64("reference count")
    if count > _MAX_REFERENCES:
        raise r.error(at, f"{count} references (at most {_MAX_REFERENCES} allowed)")
    references = tuple(_read_path(r, "reference") for _ in range(count))
    deriver = _read_path(r, "deriver", optional=True)
    r.hasher = None
    signed_sha256 = hasher.digest()
    at = r.offset
    flag = r.u64("signature marker")
    signature: bytes | None = None
    if flag == 1:
        signature = r.string(_MAX_SIGNATURE, "signature")
    elif flag != 0:
        raise r.error(at, f"expected signature marker 0 or 1, found {flag}")
    return BundleItem(path, references, deriver, signature, nar_sha256, nar_size, signed_sha256)


def _read_path(r: _Reader, what: str, *, optional: bool = False) -> str:
    at = r.offset
    raw = r.string(_MAX_PATH, what)
    try:
        path = raw.decode()
    except UnicodeDecodeError:
        raise r.error(at, f"{what} is not UTF-8") from None
    if not (optional and not path) and not is_store_path(path):
        raise r.error(at, f"{what} {path!r} is not a store path")
    return path


Signature = bytes | Callable[[bytes], bytes] | None
"""A signature, none, or a function from the item's signed SHA-256 to the signature."""


def write_bundle(
    out: BinaryIO,
    items: Iterable[tuple[BinaryIO | bytes, str, Sequence[str], str, Signature]],
) -> None:
    """Write an export bundle: (nar stream or bytes, path, references, deriver, signature).

    Each nar is validated while it is copied (a bad one raises ArchiveError, leaving `out`
    incomplete).  A callable signature is called with the item's signed SHA-256, so a
    signer can sign in the same single pass.  References are written sorted.
    """
    for nar, path, references, deriver, signature in items:
        for p in (path, *references, *([deriver] if deriver else [])):
            if not is_store_path(p):
                raise ArchiveError(f"cannot export {path}: {p!r} is not a store path")
        src: BinaryIO = io.BytesIO(nar) if isinstance(nar, bytes | bytearray) else nar
        out.write(_u64(1))
        r = _Reader(src, f"nar of {path}")
        hasher = hashlib.sha256()
        r.hasher = hasher
        r.sink = out.write
        _parse_nar(r, None)
        if src.read(1):
            raise r.error(r.offset, "trailing data after the nar")
        trailer = export_trailer(path, references, deriver)
        out.write(trailer)
        hasher.update(trailer)
        if callable(signature):
            signature = signature(hasher.digest())
        if signature is None:
            out.write(_u64(0))
        else:
            out.write(_u64(1) + _str(signature))
    out.write(_u64(0))
