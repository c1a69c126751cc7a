"""Pulling a file from a machine: SFTP reads in flight, resumable, and the local copy for
`transport: local` machines. Used by ``Remote.fetch``.

An OSError of the coordinator's own file is carried as LocalFileError past the machine's error
boundary: a full local disk says nothing about the machine and must not back it off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import asyncssh

_T = TypeVar("_T")

SFTP_BLOCK_SIZE = 255 * 1024  # OpenSSH's sftp-server answers at most 256 KiB - 1 KiB per read
SFTP_MAX_REQUESTS = 32  # 8 MiB in flight; more only adds bookkeeping (benchmarks/sftp_pull.py)
# Read requests go out 16 at a time in one corked burst: one wake-up of the machine's sshd
# instead of 16 (each send over loopback cost ~50 µs of the coordinator's one core).
SFTP_REFILL = 16


@contextlib.contextmanager
def corked(sock: Any) -> Iterator[None]:
    """Hold back what is written to a TCP socket until the block ends (TCP_CORK)."""
    corked = False
    if sock is not None and hasattr(socket, "TCP_CORK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            corked = True
    try:
        yield
    finally:
        if corked:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


async def pull(source: asyncssh.SFTPClientFile, target: BinaryIO, offset: int, size: int,
                progress: Callable[[int], None] | None, sock: Any = None) -> int:
    """Read ``source`` from ``offset`` to ``size`` into ``target``; return the end offset.

    Up to SFTP_MAX_REQUESTS reads are in flight, consumed in order: the file only ever grows by
    whole, contiguous blocks, so a partial file stays valid for the next resume.
    """
    inflight: collections.deque[tuple[int, int, asyncio.Future[bytes]]] = collections.deque()
    ask = offset
    try:
        while ask < size or inflight:
            if ask < size and len(inflight) <= SFTP_MAX_REQUESTS - SFTP_REFILL:
                with corked(sock):
                    while ask < size and len(inflight) < SFTP_MAX_REQUESTS:
                        want = min(SFTP_BLOCK_SIZE, size - ask)
                        inflight.append((ask, want, asyncio.ensure_future(source.read(want, ask))))
                        ask += want
                    await asyncio.sleep(0)  # the request tasks send now, into the corked socket
            at, want, reply = inflight.popleft()
            data = await reply
            while 0 < len(data) < want:  # a short read: ask for the rest of this block
                more: bytes = await source.read(want - len(data), at + len(data))
                if not more:
                    break
                data += more
            local(lambda: target.write(data))  # noqa: B023 - called at once
            offset += len(data)
            if progress is not None:
                progress(offset)
            if len(data) != want:
                return offset  # the file shrank meanwhile
        return offset
    finally:
        for _, _, reply in inflight:
            reply.cancel()
        await asyncio.gather(*(reply for _, _, reply in inflight), return_exceptions=True)


def tcp_socket(conn: asyncssh.SSHClientConnection | None) -> Any:
    """The connection's TCP socket (asyncio's TransportSocket), or None (a tunnel, a test)."""
    sock = None if conn is None else conn.get_extra_info("socket")
    tcp = getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6)
    return sock if tcp and getattr(sock, "type", None) == socket.SOCK_STREAM else None


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


async def copy_local(source: str, target: str, progress: Callable[[int], None] | None) -> int:
    """Resumable local copy, done in a thread; progress is reported on the event loop."""
    loop = asyncio.get_running_loop()

    def copy() -> int:
        with open(source, "rb") as src, open(target, "ab") as dst:
            size = os.fstat(src.fileno()).st_size
            offset = dst.tell()
            if offset > size:
                dst.truncate(0)
                offset = 0
            src.seek(offset)
            while block := src.read(1 << 20):
                dst.write(block)
                offset += len(block)
                if progress is not None:
                    loop.call_soon_threadsafe(progress, offset)
            return offset

    return await asyncio.to_thread(copy)
