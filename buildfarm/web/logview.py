"""Build logs for the web: the tail a page shows, the whole text, and a live stream.

Logs are gzip files flushed as the build writes them (buildfarm/logs.py), so a running build's
log can be read up to its last flush. Positions are offsets in the decompressed text: a stream
resumed at an offset (Last-Event-ID) skips what the client already has.
"""

from __future__ import annotations

import asyncio
import codecs
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any

TAIL_BYTES = 64 * 1024  # of text, shown on a build's page
READ = 64 * 1024
CHUNK = 16 * 1024  # of text per stream event
POLL = 0.4  # seconds between looks at a growing log
STILL_RUNNING_EVERY = 2.0  # seconds between asking the datastore whether the build still runs


def _decompressed(path: str) -> Generator[bytes, None, None]:
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as handle:
        while block := handle.read(READ):
            out = decompressor.decompress(block)
            if out:
                yield out


def tail(path: str, limit: int = TAIL_BYTES) -> dict[str, Any]:
    """The last `limit` bytes of the log's text (from a line start), its size so far."""
    kept = bytearray()
    size = 0
    for block in _decompressed(path):
        size += len(block)
        kept += block
        if len(kept) > 2 * limit:
            del kept[: len(kept) - limit]
    if len(kept) > limit:
        del kept[: len(kept) - limit]
        newline = kept.find(b"\n")
        if 0 <= newline < len(kept) - 1:
            del kept[: newline + 1]
    return {"text": bytes(kept).decode("utf-8", "replace"), "size": size, "shown": len(kept)}


def whole(path: str) -> Generator[bytes, None, None]:
    """The log's text so far, block by block."""
    yield from _decompressed(path)


async def follow(
    path: str, offset: int, running: Callable[[], Awaitable[bool]]
) -> AsyncIterator[tuple[int, str]]:
    """(offset after the chunk, text) from `offset` on, until the build has stopped running and
    the log holds nothing more."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    position = 0  # bytes of text read so far
    loop = asyncio.get_running_loop()
    checked = float("-inf")

    def pieces(out: bytes) -> list[tuple[int, str]]:
        nonlocal position
        begin = position
        position += len(out)
        data = out[max(0, offset - begin):]
        first = position - len(data)
        found = []
        for start in range(0, len(data), CHUNK):
            piece = data[start:start + CHUNK]
            text = decoder.decode(piece)
            if text:
                found.append((first + start + len(piece), text))
        return found

    handle = await asyncio.to_thread(open, path, "rb")
    try:
        while True:
            block = await asyncio.to_thread(handle.read, READ)
            if block:
                for item in pieces(decompressor.decompress(block)):
                    yield item
                continue
            if loop.time() - checked >= STILL_RUNNING_EVERY:
                checked = loop.time()
                if not await running():
                    # One more read: the writer may have finished between the two looks.
                    rest = await asyncio.to_thread(handle.read)
                    for item in pieces(decompressor.decompress(rest) if rest else b""):
                        yield item
                    return
            await asyncio.sleep(POLL)
    finally:
        await asyncio.to_thread(handle.close)
