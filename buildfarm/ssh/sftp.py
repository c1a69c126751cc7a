"""The SFTP client the coordinator reads and removes files on a machine with: version 3 of the
protocol (draft-ietf-secsh-filexfer-02, what OpenSSH's sftp-server speaks), and only the five
requests it needs (open for reading, fstat, read, close, remove).

Why not asyncssh's SFTP client: its read path copies every byte twice more than the SSH channel
does (it joins a reply's packets into one string, then slices the data out of that). Here a
reply's data goes from the channel's packets straight into the local file, in order of offset,
and a batch of read requests leaves in one channel write (one SSH packet). On loopback, where
the coordinator's CPU is the limit, that is the difference between about 0.8 and about 0.95 of
the throughput of `cat` streamed over the same connection (BENCHMARKS.md).

Errors the machine reports are OSErrors with the matching errno (FileNotFoundError for a missing
file); a channel that closes fails every waiting request with asyncssh.ConnectionLost. A server
that breaks the protocol (a reply longer than its read, a reply to no request, nonsense) or
answers nothing for `timeout` seconds while requests wait is a Violation: the channel is closed
and every waiting request fails with it. No reply is held beyond what its read asked for. A
local file that cannot be written fails the read with transfer.LocalFileError (the machine is
not to blame).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import struct
from collections.abc import Awaitable, Callable
from typing import BinaryIO, TypeVar

import asyncssh

from buildfarm.ssh.transfer import LocalFileError

_T = TypeVar("_T")
BLOCK_SIZE = 255 * 1024  # OpenSSH's sftp-server answers at most 256 KiB - 1 KiB per read
MAX_REQUESTS = 32  # 8 MiB in flight; more only adds bookkeeping (benchmarks/sftp_pull.py)
REFILL = 16  # read requests go out 16 at a time: one SSH packet, one wake-up of the machine's sshd

_INIT, _VERSION, _OPEN, _CLOSE, _READ, _FSTAT, _REMOVE = 1, 2, 3, 4, 5, 8, 13
_STATUS, _HANDLE, _DATA, _ATTRS = 101, 102, 103, 105
_OK, _EOF = 0, 1
_ERRNO = {2: errno.ENOENT, 3: errno.EACCES, 8: errno.EOPNOTSUPP}
_OPEN_READ, _ATTR_SIZE = 1, 1
_MAX_MESSAGE = 256 * 1024  # the longest reply other than data that a client must accept
_DATA_HEADER = 13  # length, type, id, data length


class Violation(Exception):
    """The SFTP server broke the protocol or stopped answering; its channel is closed."""


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _strings(body: bytes, count: int) -> list[bytes]:
    """The first `count` strings of a message body (fewer if it ends early)."""
    found: list[bytes] = []
    at = 0
    while len(found) < count and at + 4 <= len(body):
        (size,) = struct.unpack_from(">I", body, at)
        found.append(body[at + 4:at + 4 + size])
        at += 4 + size
    return found


class _Read:
    """One read request of a file being pulled."""

    __slots__ = ("chunks", "finished", "got", "length", "offset", "pull")

    def __init__(self, pull: _Pull, offset: int, length: int) -> None:
        self.pull, self.offset, self.length = pull, offset, length
        self.got, self.finished = 0, False
        self.chunks: list[memoryview] = []


class _Pull:
    """A file being pulled: each reply is written as a whole, in order of offset, with the
    packets it came in (no copy), so the local file only ever holds a prefix of the source:
    valid for a resume."""

    def __init__(self, client: SFTPClient, handle: bytes, fd: int, offset: int,
                 progress: Callable[[int], None] | None) -> None:
        self.client, self.handle, self.fd, self.offset = client, handle, fd, offset
        self.progress = progress
        self.queue: collections.deque[_Read] = collections.deque()
        self.changed = asyncio.Event()
        self.error: BaseException | None = None
        self.ended = self.closed = False

    def request(self, offset: int, length: int, *, first: bool = False) -> bytes:
        read = _Read(self, offset, length)
        if first:
            self.queue.appendleft(read)
        else:
            self.queue.append(read)
        return self.client.read_request(read)

    def arrived(self, read: _Read, piece: memoryview, last: bool) -> None:
        if self.closed or self.ended:
            return
        read.got += len(piece)
        if piece:
            read.chunks.append(piece)
        if last:
            read.finished = True
            self._advance()

    def answered(self, read: _Read, code: int, message: str) -> None:
        if self.closed or self.ended:
            return
        if code != _EOF:
            self.fail(_status_error(code, message, ""))
            return
        read.finished = True
        self._advance()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.changed.set()

    def _write(self, pieces: list[memoryview]) -> None:
        """Append a reply's pieces to the file with one system call (no copy to join them)."""
        if self.error is not None or not pieces:
            return
        total = sum(len(piece) for piece in pieces)
        try:
            written = os.writev(self.fd, pieces)
            if written < total:  # rare: a signal, a disk that just filled
                rest = b"".join(pieces)[written:]
                while rest:
                    rest = rest[os.write(self.fd, rest):]
        except OSError as exc:
            self.fail(LocalFileError(exc))
            return
        self.offset += total

    def _advance(self) -> None:
        while self.queue and self.error is None:
            head = self.queue[0]
            if not head.finished:
                break
            self.queue.popleft()
            self._write(head.chunks)
            if head.got == 0 and head.length:  # end of file before the size it had
                self.ended = True
                break
            if head.got < head.length:  # a short read: ask for the rest before going on
                rest = self.request(head.offset + head.got, head.length - head.got, first=True)
                self.client.send(rest)
            if self.progress is not None:
                self.progress(self.offset)
        self.changed.set()


class _Session(asyncssh.SSHClientSession[bytes]):
    def __init__(self, client: SFTPClient) -> None:
        self._client = client

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._client.received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.lost(exc or asyncssh.ConnectionLost("the SFTP channel closed"))


class SFTPClient:
    """One SFTP channel; any number of requests and pulls may share it. A server that leaves
    requests unanswered for `timeout` seconds is stalled (a Violation)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._version: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A connection lost while the channel opens fails it with nobody left to wait for it.
        self._version.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._next_id = 0
        self._replies: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._reads: dict[int, _Read] = {}
        self._pulls: set[_Pull] = set()
        self._buf = bytearray()
        self._data_left = 0
        self._data_to: _Read | None = None
        self.error: BaseException | None = None

    @classmethod
    async def start(cls, conn: asyncssh.SSHClientConnection, timeout: float) -> SFTPClient:
        """Open the `sftp` subsystem on a channel of `conn` and agree on version 3."""
        client = cls(timeout)
        chan, _ = await conn.create_session(lambda: _Session(client), subsystem="sftp",
                                            encoding=None)
        client._chan = chan
        chan.write(struct.pack(">IBI", 5, _INIT, 3))
        try:
            await client._answer(client._version)
        except BaseException:
            chan.close()
            raise
        return client

    def close(self) -> None:
        if self._chan is not None:
            self._chan.close()
        self.lost(asyncssh.ConnectionLost("the SFTP channel was closed"))

    # --- requests -------------------------------------------------------------------------

    async def open(self, path: str) -> bytes:
        """A handle for reading `path`."""
        kind, body = await self._request(_OPEN, _string(os.fsencode(path))
                                         + struct.pack(">II", _OPEN_READ, 0), path)
        if kind != _HANDLE:
            raise self._nonsense("no handle")
        return _strings(body, 1)[0]

    async def size(self, handle: bytes) -> int:
        """The size of an open file (0 if the server does not say)."""
        kind, body = await self._request(_FSTAT, _string(handle), "")
        if kind != _ATTRS or len(body) < 4:
            raise self._nonsense("no attributes")
        (flags,) = struct.unpack_from(">I", body)
        return int(struct.unpack_from(">Q", body, 4)[0]) if flags & _ATTR_SIZE else 0

    def close_handle(self, handle: bytes) -> None:
        """Let go of a handle; nothing waits for the answer (a canceled fetch must not)."""
        if self.error is None:
            self.send(self._message(_CLOSE, self._new_id(), _string(handle)))

    async def remove(self, path: str) -> None:
        await self._request(_REMOVE, _string(os.fsencode(path)), path)

    async def pull(self, handle: bytes, target: BinaryIO, offset: int, size: int,
                   progress: Callable[[int], None] | None = None) -> int:
        """Read the open file from `offset` to `size` into `target`; return the end offset
        (short of `size` if the file shrank). `progress` gets the offset after every block."""
        target.flush()
        pull = _Pull(self, handle, target.fileno(), offset, progress)
        self._pulls.add(pull)
        ask = offset
        try:
            while True:
                if pull.error is not None:
                    raise pull.error
                if pull.ended or (ask >= size and not pull.queue):
                    return pull.offset
                if ask < size and len(pull.queue) <= MAX_REQUESTS - REFILL:
                    batch = []
                    while ask < size and len(pull.queue) < MAX_REQUESTS:
                        want = min(BLOCK_SIZE, size - ask)
                        batch.append(pull.request(ask, want))
                        ask += want
                    self.send(b"".join(batch))
                pull.changed.clear()
                await self._answer(pull.changed.wait())
        finally:
            pull.closed = True  # replies still on their way are dropped
            self._pulls.discard(pull)

    def read_request(self, read: _Read) -> bytes:
        request_id = self._new_id()
        self._reads[request_id] = read
        return self._message(_READ, request_id, _string(read.pull.handle)
                             + struct.pack(">QI", read.offset, read.length))

    def send(self, message: bytes) -> None:
        if self.error is not None:
            raise self.error
        assert self._chan is not None
        self._chan.write(message)

    async def _request(self, kind: int, payload: bytes, path: str) -> tuple[int, bytes]:
        request_id = self._new_id()
        reply = asyncio.get_running_loop().create_future()
        self._replies[request_id] = reply
        try:
            self.send(self._message(kind, request_id, payload))
            answer, body = await self._answer(reply)
        finally:
            self._replies.pop(request_id, None)
        if answer == _STATUS:
            code, message = _status(body)
            if code != _OK:
                raise _status_error(code, message, path)
        return answer, body

    def _new_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        return self._next_id

    @staticmethod
    def _message(kind: int, request_id: int, payload: bytes) -> bytes:
        return struct.pack(">IBI", 5 + len(payload), kind, request_id) + payload

    async def _answer(self, waiting: Awaitable[_T]) -> _T:
        """What `waiting` gives, unless the server stays silent for `timeout` seconds."""
        try:
            return await asyncio.wait_for(waiting, self.timeout)
        except TimeoutError:
            raise self._broken(f"did not answer within {self.timeout:g}s (answer_timeout)"
                               ) from None

    def _nonsense(self, what: str) -> Violation:
        return self._broken(f"sent {what}")

    def _broken(self, what: str) -> Violation:
        error = Violation(f"the SFTP server {what}")
        if self._chan is not None:
            self._chan.close()
        self.lost(error)
        return error

    # --- replies --------------------------------------------------------------------------

    def received(self, data: bytes) -> None:
        """Cut the channel's bytes into replies; a reply's data goes on as it comes."""
        view = memoryview(data)
        while self.error is None:
            if self._data_left:
                if not view:
                    return
                piece = view[:self._data_left]
                view = view[len(piece):]
                self._data_left -= len(piece)
                if self._data_to is not None:
                    self._data_to.pull.arrived(self._data_to, piece, not self._data_left)
                continue
            want = self._wanted()
            if want < 0:
                return
            if len(self._buf) < want:
                if not view:
                    return
                take = want - len(self._buf)
                self._buf += view[:take]
                view = view[take:]
                continue
            self._dispatch(bytes(self._buf))
            self._buf.clear()

    def _wanted(self) -> int:
        """How many bytes of the reply at hand to gather before handling it (-1: nonsense)."""
        if len(self._buf) < 5:
            return 5
        if self._buf[4] == _DATA:
            return _DATA_HEADER
        length = int.from_bytes(self._buf[:4], "big")
        if not 1 <= length <= _MAX_MESSAGE:
            self._nonsense(f"a message of {length} bytes")
            return -1
        return 4 + length

    def _dispatch(self, message: bytes) -> None:
        kind = message[4]
        if kind == _VERSION:
            if not self._version.done():
                self._version.set_result(None)
            return
        if len(message) < 9:
            self._nonsense("a reply without an id")
            return
        (request_id,) = struct.unpack_from(">I", message, 5)
        if kind == _DATA:
            length, _, _, size = struct.unpack_from(">IBII", message)
            if length != 9 + size:
                self._nonsense("a data reply of the wrong length")
                return
            self._data_to = self._reads.pop(request_id, None)
            if self._data_to is None:
                self._nonsense(f"data answering request {request_id}, which is no read")
                return
            if size > self._data_to.length:
                self._nonsense(f"a data reply of {size} bytes to a read of "
                               f"{self._data_to.length}")
                return
            self._data_left = size
            if size == 0 and self._data_to is not None:
                self._data_to.pull.arrived(self._data_to, memoryview(b""), True)
            return
        body = message[9:]
        read = self._reads.pop(request_id, None)
        if read is not None:
            if kind != _STATUS:
                self._nonsense("an odd answer to a read")
                return
            read.pull.answered(read, *_status(body))
            return
        reply = self._replies.get(request_id)
        if reply is not None and not reply.done():
            reply.set_result((kind, body))

    def lost(self, error: BaseException) -> None:
        if self.error is not None:
            return
        self.error = error
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(error)
        if not self._version.done():
            self._version.set_exception(error)
        for pull in self._pulls:
            pull.fail(error)
        self._reads.clear()


def _status(body: bytes) -> tuple[int, str]:
    code = struct.unpack_from(">I", body)[0] if len(body) >= 4 else 4
    message = _strings(body[4:], 1)
    return code, message[0].decode("utf-8", "replace") if message else ""


def _status_error(code: int, message: str, path: str) -> OSError:
    number = _ERRNO.get(code, errno.EIO)
    return OSError(number, message or os.strerror(number), *([path] if path else []))
