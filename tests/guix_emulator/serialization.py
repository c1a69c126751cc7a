"""Nars and export bundles as the Guix daemon writes and reads them.

[SER] guix/serialization.scm (write-file: a file tree as a nar), the daemon's [AR]
nix/libutil/archive.cc (dumpPath, parseDump: reading one back, with its errors) and [SZ]
nix/libutil/serialise.cc (integers, strings, padding).  Integers are 64-bit little-endian; a
string is its length, its bytes and zeros up to a multiple of 8.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from guix_emulator.store import assert_store_path

EXPORT_MAGIC = 0x4558494E  # [LS] "NIXE"
ARCHIVE_VERSION_1 = b"nix-archive-1"
_LONGEST_STRING = 1 << 20  # names, targets, paths, signatures: far shorter in any real archive
Write = Callable[[bytes], object]


class ArchiveError(Exception):
    """What the daemon throws reading an archive: its message, verbatim."""


def write_int(n: int) -> bytes:
    return struct.pack("<Q", n)


def write_string(data: bytes) -> bytes:
    return write_int(len(data)) + data + bytes(-len(data) % 8)


class Source:
    """[LS] HashAndReadSource: exact reads from a stream, hashed while `hashing`, each byte of a
    nar also copied to `copy` when one is set (the daemon restores it; we keep it in a file)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.hasher = hashlib.sha256()
        self.hashing = True
        self.copy: Write | None = None

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) < n:
            raise ArchiveError("unexpected end-of-file")  # [SZ] readFull: EndOfFile
        if self.hashing:
            self.hasher.update(data)
        if self.copy is not None:
            self.copy(data)
        return data

    def read_int(self) -> int:
        return int(struct.unpack("<Q", self.read(8))[0])

    def read_padding(self, length: int) -> None:
        if any(self.read(-length % 8)):
            raise ArchiveError("non-zero padding")  # [SZ] readPadding

    def read_string(self) -> bytes:
        length = self.read_int()
        if length > _LONGEST_STRING:
            raise ArchiveError(f"bad archive: a string of {length} bytes")  # emulator's bound
        data = self.read(length)
        self.read_padding(length)
        return data


@dataclass(frozen=True)
class ExportItem:
    """One item of an export bundle, its nar aside (copied to the Source's `copy`)."""

    path: str
    references: tuple[str, ...]
    deriver: str
    sha256: bytes  # of the nar and the trailer: what a signature signs
    signature: bytes | None


def read_export_item(source: Source) -> ExportItem:
    """[LS] importPath's reading of one item, after its marker: the nar, the export magic,
    the path, references and deriver ([SA] readStorePath: store paths), the signature."""
    source.hasher, source.hashing = hashlib.sha256(), True
    read_nar(source)
    copy, source.copy = source.copy, None
    try:
        if source.read_int() != EXPORT_MAGIC:
            raise ArchiveError("normalized archive cannot be imported; wrong format")
        path = _read_store_path(source)
        references = tuple(_read_store_path(source) for _ in range(source.read_int()))
        deriver = source.read_string().decode("latin-1")
        if deriver:
            assert_store_path(deriver)
        digest = source.hasher.digest()
        source.hashing = False
        signature = source.read_string() if source.read_int() == 1 else None
    finally:
        source.copy = copy
    return ExportItem(path, references, deriver, digest, signature)


def _read_store_path(source: Source) -> str:
    path = source.read_string().decode("latin-1")
    assert_store_path(path)
    return path


def read_nar(source: Source) -> None:
    """[AR] parseDump: read one nar from `source`, checking it as the daemon restores it."""
    try:
        version = source.read_string()
    except ArchiveError:
        version = b""  # "the integer at the start couldn't be decoded"
    if version != ARCHIVE_VERSION_1:
        raise ArchiveError("bad archive: input doesn't look like a normalized archive")
    _read_node(source)


def _bad(reason: str) -> ArchiveError:
    return ArchiveError(f"bad archive: {reason}")


def _read_node(source: Source) -> None:
    """[AR] parse: "(" then fields until ")"."""
    if source.read_string() != b"(":
        raise _bad("expected open tag")
    kind = None
    while (field := source.read_string()) != b")":
        if field == b"type":
            if kind is not None:
                raise _bad("multiple type fields")
            kind = source.read_string()
            if kind not in (b"regular", b"directory", b"symlink"):
                raise _bad(f"unknown file type {kind.decode('latin-1')}")
        elif field == b"contents" and kind == b"regular":
            size = source.read_int()
            for _ in range(size >> 20):
                source.read(1 << 20)
            source.read(size & ((1 << 20) - 1))
            source.read_padding(size)
        elif field == b"executable" and kind == b"regular":
            source.read_string()
        elif field == b"entry" and kind == b"directory":
            _read_entry(source)
        elif field == b"target" and kind == b"symlink":
            source.read_string()
        else:
            raise _bad(f"unknown field {field.decode('latin-1')}")


def _read_entry(source: Source) -> None:
    """One "entry": the daemon keeps its previous name per entry, so its "NAR directory is not
    sorted" check never fires and is left out."""
    if source.read_string() != b"(":
        raise _bad("expected open tag")
    while (field := source.read_string()) != b")":
        if field == b"name":
            name = source.read_string()
            if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
                raise ArchiveError(f"NAR contains invalid file name `{name.decode('latin-1')}'")
        elif field == b"node":
            _read_node(source)
        else:
            raise _bad(f"unknown field {field.decode('latin-1')}")


def write_file(path: str, write: Write) -> None:
    """[SER] write-file: the nar of PATH, entries in byte order, executables by the owner's
    x bit; sent to `write` piece by piece (a file's contents in blocks)."""
    write(write_string(ARCHIVE_VERSION_1))
    _write_node(os.fsencode(path), write)


def _write_node(path: bytes, write: Write) -> None:
    info = os.lstat(path)
    write(write_string(b"(") + write_string(b"type"))
    if stat.S_ISREG(info.st_mode):
        write(write_string(b"regular"))
        if info.st_mode & 0o100:
            write(write_string(b"executable") + write_string(b""))
        write(write_string(b"contents") + write_int(info.st_size))
        with open(path, "rb") as stream:
            while block := stream.read(1 << 20):
                write(block)
        write(bytes(-info.st_size % 8))
    elif stat.S_ISDIR(info.st_mode):
        write(write_string(b"directory"))
        for name in sorted(os.listdir(path)):
            write(write_string(b"entry") + write_string(b"(") + write_string(b"name")
                  + write_string(name) + write_string(b"node"))
            _write_node(os.path.join(path, name), write)
            write(write_string(b")"))
    elif stat.S_ISLNK(info.st_mode):
        write(write_string(b"symlink") + write_string(b"target") + write_string(
            os.readlink(path)))
    else:  # [AR] dump
        raise ArchiveError(f"file `{os.fsdecode(path)}' has an unsupported type")
    write(write_string(b")"))
