"""The local side of pulling a file: the copy for `transport: local` machines, and the error
that says the coordinator's own file failed. Used by ``Remote.fetch`` and buildfarm.ssh.sftp.

An OSError of the coordinator's own file is carried as LocalFileError past the machine's error
boundary: a full local disk says nothing about the machine and must not back it off.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


class LocalFileError(Exception):
    """An OSError of a file on the coordinator, carried past ``Remote.boundary`` (which would
    make it a RemoteError)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def local(call: Callable[[], _T]) -> _T:
    try:
        return call()
    except OSError as exc:
        raise LocalFileError(exc) from None


async def copy_local(source: str, target: str, progress: Callable[[int], None] | None,
                     limit: int | None = None) -> int:
    """Resumable local copy, done in a thread, of at most the size the source had when opened
    and at most `limit` bytes; progress is reported on the event loop."""
    loop = asyncio.get_running_loop()

    def copy() -> int:
        with open(source, "rb") as src, open(target, "ab") as dst:
            size = os.fstat(src.fileno()).st_size
            if limit is not None:
                size = min(size, limit)
            offset = dst.tell()
            if offset > size:
                dst.truncate(0)
                offset = 0
            src.seek(offset)
            while offset < size and (block := src.read(min(1 << 20, size - offset))):
                dst.write(block)
                offset += len(block)
                if progress is not None:
                    loop.call_soon_threadsafe(progress, offset)
            return offset

    return await asyncio.to_thread(copy)
