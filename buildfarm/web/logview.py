"""Build logs for the web: the tail a page shows, the whole text, and a live stream.

Logs are gzip files flushed as the build writes them (buildfarm/logs.py), so a running build's
log can be read up to its last flush. Positions are offsets in the decompressed log: a stream
resumed at an offset (Last-Event-ID) skips what the client already has. What is shown is plain
text (render.PlainText: no escape sequences or control characters but newline and tab); a
position never falls inside a sequence cut by the end of what was read so far.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any

from buildfarm.render import PlainText

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
    """The last `limit` bytes of the log (from a line start) as plain text, its size so far,
    and the offset where a stream of what follows begins."""
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
    text = PlainText()
    shown = text.feed(bytes(kept))
    return {"text": shown, "size": size, "shown": len(kept), "offset": size - text.pending}


def whole(path: str) -> Generator[bytes, None, None]:
    """The log's plain text so far, block by block (UTF-8)."""
    text = PlainText()
    for block in _decompressed(path):
        yield text.feed(block).encode()
    yield text.feed(b"", final=True).encode()


async def follow(
    path: str, offset: int, running: Callable[[], Awaitable[bool]]
) -> AsyncIterator[tuple[int, str]]:
    """(offset after the chunk, text) from `offset` on, until the build has stopped running and
    the log holds nothing more."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    plain = PlainText()
    position = 0  # bytes of the log read so far
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
            text = plain.feed(piece)
            if text:
                found.append((first + start + len(piece) - plain.pending, text))
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
                    last = plain.feed(b"", final=True)  # a sequence the log ends inside
                    if last:
                        yield position, last
                    return
            await asyncio.sleep(POLL)
    finally:
        await asyncio.to_thread(handle.close)
