"""The compressions nars are published in (names as in a narinfo's `Compression:` field).

gzip (the standard library's zlib) reaches every Guix and Nix client; zstd (the `zstandard`
package) decompresses several times faster and is what Nix picks, since it comes last.  lzip is
left out: no well-kept Python binding exists.  Compression is streamed in blocks, so a nar of any
size needs little memory; output is deterministic (no time stamp or file name in the header).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from buildfarm.errors import UsageError

BLOCK = 1 << 20
TYPES = ("gzip", "zstd")


@dataclass(frozen=True, slots=True)
class Compression:
    type: str
    level: int

    def __str__(self) -> str:
        return f"{self.type}:{self.level}"


# gzip at Guix's default level for `guix publish -C gzip`; zstd at a level that still compresses
# about 60 MB/s on one core. Order matters: Nix uses the last one listed in a narinfo.
DEFAULT_COMPRESSIONS = (Compression("gzip", 3), Compression("zstd", 10))
_LEVELS = {"gzip": range(1, 10), "zstd": range(1, 23)}


def parse_compression(text: str) -> Compression:
    """`TYPE[:LEVEL]`, as `guix publish -C` takes it."""
    kind, _, level = text.partition(":")
    if kind not in TYPES:
        raise UsageError(f"unsupported compression {kind!r}: use one of {', '.join(TYPES)}")
    default = {c.type: c.level for c in DEFAULT_COMPRESSIONS}[kind]
    try:
        value = int(level) if level else default
    except ValueError:
        raise UsageError(f"invalid compression level {level!r}") from None
    if value not in _LEVELS[kind]:
        bounds = _LEVELS[kind]
        raise UsageError(f"{kind} levels go from {bounds.start} to {bounds.stop - 1}")
    return Compression(kind, value)


def parse_compressions(texts: Sequence[str]) -> tuple[Compression, ...]:
    """Repeated `TYPE[:LEVEL]`s, in the order given (Nix picks the last); none: the default."""
    chosen = tuple(parse_compression(text) for text in texts)
    seen: set[str] = set()
    for compression in chosen:
        if compression.type in seen:
            raise UsageError(f"compression {compression.type!r} given twice: give each type once")
        seen.add(compression.type)
    return chosen or DEFAULT_COMPRESSIONS


def compress(source: BinaryIO, target: BinaryIO, compression: Compression) -> int:
    """Copy `source` to `target` compressed; return the number of bytes written."""
    written = 0
    if compression.type == "gzip":
        compressor = zlib.compressobj(compression.level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        while block := source.read(BLOCK):
            out = compressor.compress(block)
            target.write(out)
            written += len(out)
        out = compressor.flush()
        target.write(out)
        return written + len(out)
    if compression.type == "zstd":
        import zstandard

        _read, written = zstandard.ZstdCompressor(level=compression.level).copy_stream(
            source, target, read_size=BLOCK, write_size=BLOCK
        )
        return int(written)
    raise UsageError(f"unsupported compression {compression.type!r}")

