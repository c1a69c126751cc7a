"""Store sessions: `nix-store --serve --write` spoken over one SSH channel.

Starting a `nix-store` process costs a Nix machine more CPU than a trivial build does, and an
attempt needs several store operations (which paths are valid, import, build, nar hashes). Like
Nix's own remote building (its legacy SSH store) and hydra-queue-runner, a Nix machine keeps
`nix-store --serve --write` processes (one per running attempt at most) reused from attempt to
attempt: each operation is one request on its stdin and one answer on its stdout (small outputs
come back that way too, as an export bundle), and the build log arrives on its stderr. Guix has
no such command (its offload talks to the daemon through `guix repl`), so Guix machines run one
command per operation (buildfarm.coordinator.attempt).

Wire format, from NixOS/nix src/nix-store/nix-store.cc (opServe), src/libstore/serve-protocol.hh
and src/libutil/serialise.cc: integers are 64-bit little-endian; a string is its length, its
bytes and zero padding to a multiple of 8; a set of strings is a count and the strings.

Every answer is read within what the question allows: at most as many paths as were asked, only
those, strings no longer than what they hold can be, and a byte budget per answer. A machine
that sends more (or nothing, for its answer_timeout) breaks the protocol: ProtocolError, the
session is killed, and the coordinator backs the machine off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncssh

from buildfarm.errors import ProtocolError, RemoteError
from buildfarm.ssh.remote import CommandTimeoutError, Remote, RemoteProcess, RunResult

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SERVE_MAGIC_1 = 0x390C9DEB
SERVE_MAGIC_2 = 0x5452EECB
# Protocol 2.4: build options carry max-log-size (2.2) and the repeat settings (2.3); path
# infos carry the nar hash (2.4). Nix 2.0 and later answer with 2.5 or newer.
CLIENT_VERSION = 0x204
CMD_QUERY_VALID_PATHS = 1
CMD_QUERY_PATH_INFOS = 2
CMD_IMPORT_PATHS = 4
CMD_EXPORT_PATHS = 5
CMD_BUILD_PATHS = 6
STDERR_TAIL = 8192
# Bounds of what an answer may hold: a store path (Linux's PATH_MAX), a hash, content address or
# signature, a failed build's message (Nix adds the log's last lines), one path's information
# (its references and signatures: ten thousand references) and any one answer.
PATH_MAX = 4096
FIELD_MAX = 4096
MESSAGE_MAX = 1 << 20
INFO_MAX = 1 << 20
ANSWER_MAX = 64 << 20
LOG_SETTLE = 0.05  # seconds without stderr after a failed build's answer: its log is complete
SESSION_USES = 100  # attempts a session serves before it retires
SESSION_AGE = 300.0  # seconds a session lives at most
SESSION_IDLE = 30.0  # seconds an unused session is kept
SERVE_ARGV = ("nix-store", "--serve", "--write")


class SessionFailed(Exception):
    """The store session ended or answered nonsense; the machine itself is still reachable."""


@dataclass(frozen=True, slots=True)
class PathInfo:
    nar_hash: str  # "sha256:<nix-base32>"
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None


def _int(value: int) -> bytes:
    return struct.pack("<Q", value)


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _int(len(data)) + data + b"\0" * (-len(data) % 8)


def _strings(values: Sequence[str]) -> bytes:
    return _int(len(values)) + b"".join(_string(v) for v in values)


def _exported_size(path: str, info: PathInfo) -> int:
    """Bytes of one item of an export bundle: 1, the nar, the export magic, the path, the
    references, the deriver, 0 (no signature)."""
    return (8 + info.nar_size + 8 + len(_string(path)) + len(_strings(info.references))
            + len(_string(info.deriver or "")) + 8)


class StoreSession:
    """One `nix-store --serve --write` on a machine; one operation at a time.

    Any failure or cancellation in the middle of an operation leaves the stream in an unknown
    state, so the session kills its process group and is never used again (``usable``).
    """

    def __init__(self, remote: Remote, process: RemoteProcess) -> None:
        self.remote, self._process = remote, process
        self._left = 0  # bytes the answer being read may still hold
        self._stderr_tail = bytearray()
        self._sink: Callable[[bytes], None] | None = None
        self.last_output = 0.0
        self._broken = False
        self.started_at = self.idle_since = time.monotonic()
        self.uses = 0
        self.ending = False  # StoreSessions: counted out already
        self._pump = asyncio.ensure_future(self._pump_stderr())

    @classmethod
    async def start(cls, remote: Remote) -> StoreSession:
        """Start the command and exchange the greeting; SessionFailed if it does not speak the
        protocol (not a Nix store, or one too old)."""
        session = cls(remote, await remote.start_process(SERVE_ARGV))

        async def greet() -> None:
            session._send(_int(SERVE_MAGIC_1) + _int(CLIENT_VERSION))
            await session._drain()
            session._left = 16
            if await session._read_int() != SERVE_MAGIC_2:
                raise SessionFailed("nix-store --serve: protocol mismatch")
            version = await session._read_int()
            if version >> 8 != 2 or version & 0xFF < 4:
                raise SessionFailed(f"nix-store --serve speaks protocol {version:#x}, not 2.4+")

        await session._operation(greet, remote.machine.answer_timeout)
        return session

    @property
    def usable(self) -> bool:
        return not self._broken and not self._process.stdout.at_eof()

    async def query_valid(self, paths: Sequence[str], timeout: float) -> set[str]:
        """Which of `paths` are valid: some of them, nothing else."""
        asked = set(paths)

        async def ask() -> set[str]:
            request = _strings(paths)
            self._send(_int(CMD_QUERY_VALID_PATHS) + _int(0) + _int(0) + request)
            await self._drain()
            self._left = len(request)  # the most a true answer can be: every path asked
            longest = max((len(p.encode()) for p in asked), default=0)
            valid = await self._read_strings(longest, len(asked), "a query")
            if not asked.issuperset(valid):
                raise self._violation("answered a query with a path it was not asked about")
            return set(valid)

        return await self._operation(ask, timeout)

    async def path_infos(self, paths: Sequence[str], timeout: float) -> dict[str, PathInfo]:
        """What the store knows of those of `paths` it has."""
        asked = set(paths)

        async def ask() -> dict[str, PathInfo]:
            self._send(_int(CMD_QUERY_PATH_INFOS) + _strings(paths))
            await self._drain()
            self._left = min(ANSWER_MAX, 8 + len(asked) * INFO_MAX)
            infos: dict[str, PathInfo] = {}
            while path := await self._read_string(PATH_MAX):
                if path not in asked or path in infos:
                    raise self._violation("answered a path query with a path not asked about, "
                                          "or twice")
                deriver = await self._read_string(PATH_MAX)
                references = tuple(await self._read_strings(PATH_MAX, INFO_MAX, "references"))
                await self._read_int()  # download size (the nar size again)
                nar_size = await self._read_int()
                nar_hash = await self._read_string(FIELD_MAX)
                await self._read_string(FIELD_MAX)  # content address
                await self._read_strings(FIELD_MAX, INFO_MAX, "signatures")
                infos[path] = PathInfo(nar_hash, nar_size, references, deriver or None)
            return infos

        return await self._operation(ask, timeout)

    async def export_paths(
        self, infos: dict[str, PathInfo], timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> bytes:
        """The export bundle (`nix-store --export` format) of the paths ``infos`` describes, as
        `path_infos` answered: the bundle carries no length, so its length is computed from
        theirs and exactly that much is read (a store that sends less or more breaks the
        session or fails the nar hash check)."""
        paths = sorted(infos)
        length = 8 + sum(_exported_size(path, infos[path]) for path in paths)

        async def ask() -> bytes:
            self._send(_int(CMD_EXPORT_PATHS) + _int(0) + _strings(paths))
            await self._drain()
            data = bytearray()
            while len(data) < length:
                chunk = await self._process.stdout.read(min(length - len(data), 1 << 20))
                if not chunk:
                    raise asyncio.IncompleteReadError(bytes(data), length)
                data += chunk
                if progress is not None:
                    progress(len(data))
            return bytes(data)

        return await self._operation(ask, timeout)

    async def import_paths(self, bundle: AsyncIterator[bytes], timeout: float) -> None:
        """Send an export bundle (`nix-store --export` format) to be imported."""
        async def send() -> None:
            self._send(_int(CMD_IMPORT_PATHS))
            async for chunk in bundle:
                self._send(chunk)
                await self._drain()
            self._left = 8
            if await self._read_int() != 1:
                raise SessionFailed("nix-store --serve: unexpected answer to an import")

        await self._operation(send, timeout)

    async def build(
        self, drv: str, *, max_silent_time: int | None, timeout: int | None,
        on_log: Callable[[bytes], None], safety_timeout: float | None,
        safety_silence: float | None,
    ) -> tuple[int, str]:
        """Build ``drv`` (all its outputs); its log goes to ``on_log``. Returns the store's
        status (0, or the exit status `nix-store --realise` would have: 100 failed, 101 timed
        out, …) and its error message. The store enforces both limits; the safety ones are the
        coordinator's net, raising CommandTimeoutError."""
        request = (
            _int(CMD_BUILD_PATHS) + _strings([drv]) + _int(max_silent_time or 0)
            + _int(timeout or 0) + _int(0) + _int(0) + _int(0)  # max-log-size, repeats, enforce
        )

        async def run() -> tuple[int, str]:
            self._send(request)
            await self._drain()
            self._left = 16 + MESSAGE_MAX
            status = await self._read_int()
            return status, (await self._read_string(MESSAGE_MAX) if status else "")

        loop = asyncio.get_running_loop()
        started = self.last_output = loop.time()
        self._sink = on_log
        task = asyncio.ensure_future(self._operation(run, None))
        try:
            while True:
                deadlines = [started + safety_timeout] if safety_timeout is not None else []
                if safety_silence is not None:
                    deadlines.append(self.last_output + safety_silence)
                wait = max(0.0, min(deadlines) - loop.time()) if deadlines else None
                done, _ = await asyncio.wait({task}, timeout=wait)
                if done:
                    status, message = task.result()
                    if status:  # the log's last lines may still trail the answer: keep them
                        settled = loop.time() + 20 * LOG_SETTLE
                        while loop.time() - self.last_output < LOG_SETTLE < settled - loop.time():
                            await asyncio.sleep(LOG_SETTLE)
                    return status, message
                now = loop.time()
                if safety_timeout is not None and now >= started + safety_timeout:
                    reason, what = "timeout", f"still running after {safety_timeout:g}s (timeout)"
                elif safety_silence is not None and now >= self.last_output + safety_silence:
                    reason, what = "silence", f"silent for {safety_silence:g}s (silence_timeout)"
                else:
                    continue
                raise CommandTimeoutError(
                    f"{self.remote.machine.name}: build of {drv} {what}; killed it",
                    reason=reason,
                    result=RunResult(SERVE_ARGV, None, b"", bytes(self._stderr_tail)),
                )
        finally:
            self._sink = None
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await self.close(kill=True)

    async def close(self, *, kill: bool = False) -> None:
        """End the session: EOF on its stdin lets it exit; ``kill`` ends its process group
        (and any build in it) at once."""
        self._broken = True
        try:
            await self._process.close(kill=kill)
        finally:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)

    # --- plumbing ---------------------------------------------------------------------------

    async def _operation(self, work: Callable[[], Awaitable[_T]], timeout: float | None) -> _T:
        """Run one request/answer exchange; any failure breaks (and kills) the session."""
        if self._broken:
            raise SessionFailed("store session already ended")
        try:
            return await asyncio.wait_for(work(), timeout)
        except TimeoutError:  # first: it is an OSError too
            await self.close(kill=True)
            raise ProtocolError(f"{self.remote.machine.name}: nix-store --serve did not answer "
                                f"within {timeout:g}s (answer_timeout)") from None
        except (asyncio.IncompleteReadError, OSError, asyncssh.Error) as exc:
            # The process ended (or the connection did): let its last words arrive first.
            await asyncio.wait({self._pump}, timeout=1.0)
            await self.close(kill=True)
            if not self.remote.connected():
                raise RemoteError(f"{self.remote.machine.name}: connection lost") from None
            reason = self.stderr_summary() if self._stderr_tail else str(exc) or type(exc).__name__
            raise SessionFailed(f"nix-store --serve ended: {reason}") from None
        except BaseException:
            await self.close(kill=True)
            raise

    def stderr_summary(self) -> str:
        lines = [line.strip() for line in self._stderr_tail.decode(errors="replace").splitlines()]
        lines = [line for line in lines if line]
        for index in range(len(lines) - 1, -1, -1):
            if "error:" in lines[index]:
                return " ".join(lines[index:])[:1000]
        return lines[-1][:1000] if lines else "no message"

    async def _pump_stderr(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, asyncssh.Error):
            while data := await self._process.stderr.read(65536):
                self.last_output = loop.time()
                if self._sink is not None:
                    self._sink(data)
                self._stderr_tail += data
                del self._stderr_tail[:-STDERR_TAIL]

    def _send(self, data: bytes) -> None:
        self._process.stdin.write(data)

    async def _drain(self) -> None:
        await self._process.stdin.drain()

    def _violation(self, what: str) -> ProtocolError:
        return ProtocolError(f"{self.remote.machine.name}: broke the nix-store --serve "
                             f"protocol: {what}")

    async def _read(self, size: int) -> bytes:
        """`size` bytes of the answer, within what is left of its budget."""
        if size > self._left:
            raise self._violation(f"an answer longer than the question allows ({size} more "
                                  f"bytes, {self._left} left)")
        self._left -= size
        return await self._process.stdout.readexactly(size)

    async def _read_int(self) -> int:
        value: int = struct.unpack("<Q", await self._read(8))[0]
        return value

    async def _read_string(self, limit: int) -> str:
        size = await self._read_int()
        if size > limit:
            raise self._violation(f"a string of {size} bytes where at most {limit} fit")
        data = await self._read(size + (-size % 8))
        return data[:size].decode(errors="surrogateescape")

    async def _read_strings(self, limit: int, most: int, what: str) -> list[str]:
        count = await self._read_int()
        if count > most:
            raise self._violation(f"{count} strings answering {what} ({most} at most)")
        return [await self._read_string(limit) for _ in range(count)]


class StoreSessions:
    """A Nix machine's store sessions, reused by attempt after attempt: at most ``limit`` at
    once; when none is free (or the machine cannot serve), ``take`` answers None and the
    attempt runs one command per operation.

    `nix-store --serve` holds a temporary GC root on everything it built or imported until it
    exits. So a session retires after SESSION_USES attempts or SESSION_AGE seconds, and an
    idle one after SESSION_IDLE seconds (``prune``), which leaves the machine's own garbage
    collector something to collect.
    """

    def __init__(self, remote: Remote, limit: int) -> None:
        self.remote, self.limit = remote, limit
        self._idle: list[StoreSession] = []
        self._count = 0
        self._refused = self._closed = False
        self._ending: set[asyncio.Task[None]] = set()

    async def take(self) -> StoreSession | None:
        self.prune()
        while self._idle:
            session = self._idle.pop()
            if session.usable:
                session.uses += 1
                return session
            self._end(session)
        if self._refused or self._closed or self._count >= self.limit:
            return None
        self._count += 1
        try:
            session = await StoreSession.start(self.remote)
        except SessionFailed as e:
            self._count -= 1
            self._refused = True
            log.warning("%s: no store session (%s); running one command per operation",
                        self.remote.machine.name, e)
        except ProtocolError:
            self._count -= 1
            raise  # the machine misbehaves: the attempt ends, and the machine is backed off
        except (RemoteError, OSError, asyncssh.Error) as e:
            self._count -= 1
            log.info("%s: no store session: %s", self.remote.machine.name, e)
        except BaseException:
            self._count -= 1
            raise
        else:
            session.uses = 1
            return session
        return None

    def give_back(self, session: StoreSession) -> None:
        if session.usable and not self._closed and not self._worn(session):
            session.idle_since = time.monotonic()
            self._idle.append(session)
        else:
            self._end(session)

    def prune(self) -> None:
        """End the sessions idle too long or too old (call it now and then)."""
        now = time.monotonic()
        keep = [s for s in self._idle
                if s.usable and now - s.idle_since < SESSION_IDLE and not self._worn(s)]
        for session in self._idle:
            if session not in keep:
                self._end(session)
        self._idle = keep

    async def close(self) -> None:
        """No more sessions: end the idle ones, wait for every ending one."""
        self._closed = True
        idle, self._idle = self._idle, []
        for session in idle:
            self._end(session)
        await asyncio.gather(*self._ending, return_exceptions=True)

    def _worn(self, session: StoreSession) -> bool:
        return (session.uses >= SESSION_USES
                or time.monotonic() - session.started_at >= SESSION_AGE)

    def _end(self, session: StoreSession) -> None:
        """End a session in the background (EOF: it exits and drops its roots)."""
        if session.ending:
            return
        session.ending = True
        self._count -= 1  # its channel is freed once it has exited (Remote counts those)
        task = asyncio.ensure_future(session.close())
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)


def session_limit(max_sessions: int, max_builds: int) -> int:
    """Sessions hold a channel each, busy or idle. Of the channels left after the kill reserve
    and SFTP, all but one may be sessions, which leaves commands (a build without a session,
    an attempt's occasional export, dry run or check build) at least one channel: they may queue
    for it, but none needs another to finish, so each gets its turn."""
    spare = max_sessions - 2 if max_sessions >= 3 else max_sessions
    return max(0, min(max_builds, spare - 1))
