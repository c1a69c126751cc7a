"""The coordinator's door to each build machine: run commands, stream builds, fetch files.

One ``Remote`` per inventory machine keeps ONE asyncssh connection (and one SFTP client) open and
reuses it for everything, reconnecting lazily when it drops. The rules that keep a farm safe live
here (and in buildfarm.ssh.connect) and nowhere else: argv lists are quoted with ``shlex.join``
(nothing reaches a remote shell unquoted), host keys are always checked, at most
``max_sessions`` channels are open at once, every network wait is bounded (connect_timeout,
keepalives), a failing machine is backed off (circuit breaker: exponential backoff with full
jitter) without touching the others, and a streamed command runs in its own process group so
that a timeout or a cancel kills it and all its children. ``transport: local`` machines get the
same API over local subprocesses.

Errors: everything raises ``RemoteError`` naming the machine; a command killed for running too
long or too quietly raises ``CommandTimeoutError`` (a ``RemoteError``); a command that prints
more than MAX_OUTPUT where its output is collected, or an SFTP server that breaks the protocol,
raises ``ProtocolError`` (a ``RemoteError``); a cancelled call kills its process group and lets
the ``asyncio.CancelledError`` go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shlex
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncssh

from buildfarm.errors import ProtocolError, RemoteError
from buildfarm.inventory import Machine
from buildfarm.ssh import transfer
from buildfarm.ssh.connect import describe, open_connection
from buildfarm.ssh.processes import (
    GROUP_WRAPPER,
    KILL_SCRIPT,
    LocalProc,
    Proc,
    Reader,
    SSHProc,
    Writer,
    gather_or_cancel,
    kill_local_group,
)
from buildfarm.ssh.sftp import SFTPClient, Violation

__all__ = ["CommandTimeoutError", "Remote", "RemoteProcess", "RunResult"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_Sink = Callable[[bytes], None]

READ_CHUNK = 64 * 1024
# Bytes of a command's stdout or stderr collected at most (a dry run of a graph of 100,000
# derivations prints about 10 MB): more answers nothing the coordinator asks.
MAX_OUTPUT = 64 << 20
CHANNEL_OPEN_RETRIES = 6
CHANNEL_RETRY_DELAY = 0.05
KILL_GRACE = 2.0
_RETRIED_OPEN_ERRORS = {asyncssh.OPEN_CONNECT_FAILED, asyncssh.OPEN_RESOURCE_SHORTAGE}


@dataclass(frozen=True, slots=True)
class RunResult:
    """What a command did. ``exit_status`` is None when it was killed by a signal.

    For ``run_streaming``, ``stdout``/``stderr`` hold only what was not given to a callback.
    """

    argv: tuple[str, ...]
    exit_status: int | None
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class CommandTimeoutError(RemoteError):
    """A command outlived ``timeout`` or stayed silent past ``silence_timeout``; its process
    group was killed. ``reason`` is "timeout" or "silence"; ``result`` holds the partial output."""

    def __init__(self, message: str, *, reason: str, result: RunResult) -> None:
        super().__init__(message)
        self.reason = reason
        self.result = result


@dataclass(frozen=True, slots=True)
class _Job:
    """One command and how to run it: what the public run methods hand to _execute."""

    argv: tuple[str, ...]
    input: bytes | None = None
    stdin: AsyncIterator[bytes] | None = None
    on_stdout: _Sink | None = None
    on_stderr: _Sink | None = None
    timeout: float | None = None
    silence_timeout: float | None = None
    group: bool = True
    interactive: bool = False  # the caller talks to stdin itself (RemoteProcess)


class RemoteProcess:
    """A command started by ``Remote.start_process``; ``close`` ends it and frees its channel."""

    def __init__(self, remote: Remote, proc: Proc) -> None:
        assert proc.stdin is not None
        self._remote, self._proc, self._closed = remote, proc, False
        self.stdin: Writer = proc.stdin
        self.stdout, self.stderr = proc.stdout, proc.stderr

    async def close(self, *, kill: bool = False) -> None:
        """EOF on its stdin and a short wait for its exit, or (``kill``, or if it lingers)
        SIGTERM then SIGKILL to its whole process group. Never raises but CancelledError."""
        if self._closed:
            return
        self._closed = True
        if not kill:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.stdin.write_eof()
            try:
                await asyncio.wait_for(self._proc.finish(), KILL_GRACE)
            except (TimeoutError, RemoteError, OSError, asyncssh.Error):
                kill = True
        self._proc.close()
        self._remote._slots.release()  # first: with max_sessions < 3 the kill needs the slot
        if kill:
            await self._remote._shielded(self._remote._kill_group(self._proc))


class Remote:
    """One machine's pooled connection; see the module docstring for the rules it keeps.

    ``kill_grace`` is how long a killed process group has between SIGTERM and SIGKILL; ``rng``
    draws the backoff jitter (tests pass a deterministic one).
    """

    def __init__(
        self, machine: Machine, *, backoff_base: float = 1.0, backoff_max: float = 300.0,
        kill_grace: float = KILL_GRACE, rng: random.Random | None = None,
    ) -> None:
        self.machine = machine
        self._local = machine.transport == "local"
        self._backoff_base, self._backoff_max = backoff_base, backoff_max
        self._kill_grace = kill_grace
        self._rng = rng or random.Random()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: SFTPClient | None = None
        self._sftp_conn: asyncssh.SSHClientConnection | None = None
        self._connect_lock, self._sftp_lock = asyncio.Lock(), asyncio.Lock()
        # With room for it, one channel stays reserved for kills (so a cancel never waits behind
        # long builds) and the SFTP client stays open in one of the others.
        reserve = 1 if machine.max_sessions >= 3 else 0
        self._keep_sftp = reserve == 1
        self._slots = asyncio.Semaphore(max(1, machine.max_sessions - reserve))
        self._kill_slots = asyncio.Semaphore(1) if reserve else self._slots
        self._failures = 0
        self._backed_off_until: float | None = None
        self._last_failure = ""
        self._closing = False
        self._cleanups: set[asyncio.Task[None]] = set()

    # --- circuit breaker -------------------------------------------------------------------

    @property
    def backed_off_until(self) -> float | None:
        """Wall-clock time (time.time()) before which calls fail fast, or None."""
        until = self._backed_off_until
        return until if until is not None and until > time.time() else None

    @property
    def failures(self) -> int:
        """Consecutive failures since the last success."""
        return self._failures

    def note_failure(self, reason: str) -> None:
        """Count a failure; calls fail fast for a random time between half of and the whole
        of base * 2**(failures-1) (jitter that never makes a backoff vanish)."""
        self._failures += 1
        self._last_failure = reason
        ceiling = min(self._backoff_max, self._backoff_base * 2 ** min(self._failures - 1, 60))
        self._backed_off_until = time.time() + self._rng.uniform(ceiling / 2, ceiling)

    def note_success(self) -> None:
        self._failures, self._backed_off_until, self._last_failure = 0, None, ""

    def _check_breaker(self) -> None:
        until = self.backed_off_until
        if until is not None:
            clock = time.strftime("%H:%M:%S", time.localtime(until))
            raise RemoteError(
                f"{self.machine.name}: backed off until {clock} after {self._failures} "
                f"failure(s); last: {self._last_failure}"
            )

    # --- connection ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection unless it is open already; RemoteError says why it cannot."""
        if not self._local:
            self._check_breaker()
            await self._connection()

    async def close(self) -> None:
        """Wait (bounded) for pending kills, then close SFTP and the connection."""
        if self._cleanups:
            await asyncio.wait(set(self._cleanups), timeout=self._kill_grace + 5.0)
        conn, self._closing = self._conn, True
        try:
            async with self._sftp_lock:
                if self._sftp is not None:
                    self._sftp.close()
                    self._sftp = None
                    self._slots.release()
            if conn is not None:
                conn.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.wait_closed(), 5.0)
        finally:
            self._conn, self._closing = None, False

    async def _connection(self) -> asyncssh.SSHClientConnection:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and not conn.is_closed():
                return conn
            self._check_breaker()
            try:
                conn = await open_connection(self.machine, self._connection_lost)
            except RemoteError as exc:
                self.note_failure(str(exc))
                raise
            self._conn = conn
            self.note_success()
            return conn

    def _connection_lost(self, conn: asyncssh.SSHClientConnection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if self._sftp is not None:
            self._sftp = None
            self._slots.release()
        if exc is not None and not self._closing:
            self.note_failure(f"connection lost: {describe(exc)}")

    async def _open_channel(self, opener: Callable[[], Awaitable[_T]]) -> _T:
        """Open a channel, retrying sshd's brief "open failed" right after another closed."""
        for attempt in range(1, CHANNEL_OPEN_RETRIES + 1):
            try:
                return await asyncio.wait_for(opener(), self.machine.connect_timeout)
            except asyncssh.ChannelOpenError as exc:
                if exc.code not in _RETRIED_OPEN_ERRORS or attempt == CHANNEL_OPEN_RETRIES:
                    raise
            await asyncio.sleep(CHANNEL_RETRY_DELAY * attempt)
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def boundary(self, what: str) -> AsyncIterator[None]:
        """Turn network and OS errors into one RemoteError naming the machine."""
        try:
            yield
        except (OSError, asyncssh.Error) as exc:
            raise RemoteError(f"{self.machine.name}: {what}: {describe(exc)}") from None

    # --- commands --------------------------------------------------------------------------

    async def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None,
        check: bool = False,
    ) -> RunResult:
        """Run ``argv`` and collect its output; ``check`` raises RemoteError on a non-zero exit.

        With a ``timeout`` the command runs in its own process group, which is killed (and
        CommandTimeoutError raised) when the time is up. Without one, a cancelled call only closes
        the channel: use a timeout or run_streaming for commands that must die with the call.
        """
        result = await self._execute(
            _Job(tuple(argv), input=input, timeout=timeout, group=timeout is not None)
        )
        if check and not result.ok:
            last = result.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise RemoteError(
                f"{self.machine.name}: {shlex.join(result.argv)} exited with status "
                f"{result.exit_status}" + (f": {last[0]}" if last else "")
            )
        return result

    async def run_streaming(
        self,
        argv: Sequence[str],
        *,
        stdin: AsyncIterator[bytes] | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        timeout: float | None = None,
        silence_timeout: float | None = None,
    ) -> RunResult:
        """Run ``argv`` in its own process group, feeding ``stdin`` and handing each output chunk
        to the callbacks as it arrives. On timeout or silence the group gets SIGTERM, then SIGKILL
        after ``kill_grace``, and CommandTimeoutError is raised; on cancel the same, then the
        CancelledError goes on. A lost connection raises RemoteError (the group may live on).
        """
        return await self._execute(_Job(
            tuple(argv), stdin=stdin, on_stdout=on_stdout, on_stderr=on_stderr, timeout=timeout,
            silence_timeout=silence_timeout, group=True,
        ))

    async def start_process(self, argv: Sequence[str]) -> RemoteProcess:
        """Start ``argv`` in its own process group and hand over its pipes: a long-lived
        command the caller talks to (a store session). It holds one channel until closed."""
        self._check_breaker()
        await self._slots.acquire()
        proc = None
        try:
            async with self.boundary(f"cannot start {shlex.join(argv)}"):
                proc = await self._spawn(_Job(tuple(argv), group=True, interactive=True))
                await proc.start()
        except BaseException:
            if proc is not None:
                proc.close()
            self._slots.release()
            if proc is not None:
                await self._shielded(self._kill_group(proc))
            raise
        return RemoteProcess(self, proc)

    def connected(self) -> bool:
        """Whether the connection is up (always, for a local machine)."""
        return self._local or (self._conn is not None and not self._conn.is_closed())

    async def _execute(self, job: _Job) -> RunResult:
        if not job.argv:
            raise ValueError("empty argv")
        self._check_breaker()
        await self._slots.acquire()
        held, proc = True, None
        try:
            async with self.boundary(f"cannot run {shlex.join(job.argv)}"):
                proc = await self._spawn(job)
                result = await self._supervise(proc, job)
            if self._failures:
                self.note_success()
            return result
        except BaseException:
            if proc is not None:  # free our slot first: with max_sessions < 3 the kill needs it
                proc.close()
                self._slots.release()
                held = False
                await self._shielded(self._kill_group(proc))
            raise
        finally:
            if held:
                if proc is not None:
                    proc.close()
                self._slots.release()

    async def _spawn(self, job: _Job) -> Proc:
        if self._local:
            # Through sh, like sshd does, so that a missing program is exit status 127 here too.
            pipe = asyncio.subprocess.PIPE
            wants_stdin = job.input is not None or job.stdin is not None or job.interactive
            return LocalProc(await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", 'exec "$@"', "sh", *job.argv, start_new_session=True,
                stdin=pipe if wants_stdin else asyncio.subprocess.DEVNULL, stdout=pipe, stderr=pipe,
            ))
        command = (GROUP_WRAPPER if job.group else "") + shlex.join(job.argv)
        conn = await self._connection()

        async def open_process() -> asyncssh.SSHClientProcess[bytes]:
            return await conn.create_process(command, encoding=None)

        return SSHProc(self.machine.name, await self._open_channel(open_process), job.group)

    async def _supervise(self, proc: Proc, job: _Job) -> RunResult:
        loop = asyncio.get_running_loop()
        out, err = bytearray(), bytearray()
        last_output = started = loop.time()

        async def pump(reader: Reader, callback: _Sink | None, buffer: bytearray) -> None:
            nonlocal last_output
            while data := await reader.read(READ_CHUNK):
                last_output = loop.time()
                if callback is not None:
                    callback(data)
                    continue
                buffer += data
                if len(buffer) > MAX_OUTPUT:
                    where = "stdout" if buffer is out else "stderr"
                    raise ProtocolError(f"{self.machine.name}: {job.argv[0]} printed more than "
                                        f"{MAX_OUTPUT >> 20} MiB on {where}; killed it")

        async def feed(writer: Writer) -> None:
            try:
                if job.input:
                    writer.write(job.input)
                    await writer.drain()
                elif job.stdin is not None:
                    async for chunk in job.stdin:
                        writer.write(chunk)
                        await writer.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the command stopped reading; its exit status tells why
            finally:
                with contextlib.suppress(OSError, asyncssh.Error):
                    writer.write_eof()

        async def body() -> int | None:
            await proc.start()
            streams = [pump(proc.stdout, job.on_stdout, out), pump(proc.stderr, job.on_stderr, err)]
            if proc.stdin is not None:
                streams.append(feed(proc.stdin))
            await gather_or_cancel(*streams)
            return await proc.finish()

        task = asyncio.ensure_future(body())
        try:
            while True:
                deadlines = [started + job.timeout] if job.timeout is not None else []
                if job.silence_timeout is not None:
                    deadlines.append(last_output + job.silence_timeout)
                wait = max(0.0, min(deadlines) - loop.time()) if deadlines else None
                done, _ = await asyncio.wait({task}, timeout=wait)
                if done:
                    return RunResult(job.argv, task.result(), bytes(out), bytes(err))
                now = loop.time()
                if job.timeout is not None and now >= started + job.timeout:
                    reason, what = "timeout", f"still running after {job.timeout:g}s (timeout)"
                elif job.silence_timeout is not None and now >= last_output + job.silence_timeout:
                    reason = "silence"
                    what = f"silent for {job.silence_timeout:g}s (silence_timeout)"
                else:
                    continue
                raise CommandTimeoutError(
                    f"{self.machine.name}: {shlex.join(job.argv)} {what}; killed it",
                    reason=reason, result=RunResult(job.argv, None, bytes(out), bytes(err)),
                )
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _shielded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a cleanup to its end even if our caller is cancelled again meanwhile."""
        task = asyncio.ensure_future(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    async def _kill_group(self, proc: Proc) -> None:
        """SIGTERM the command's process group, SIGKILL it after the grace; never raises."""
        pgid = proc.pgid
        if pgid is None or pgid <= 1:  # never "kill -1"
            return
        try:
            if self._local:
                await kill_local_group(pgid, self._kill_grace)
                await asyncio.wait_for(proc.finish(), 5.0)  # reap it
                return
            conn = self._conn
            if conn is None or conn.is_closed():
                log.warning("%s: connection lost; process group %d may still run there",
                            self.machine.name, pgid)
                return
            steps = str(max(1, round(self._kill_grace / 0.1)))
            command = shlex.join(["sh", "-c", KILL_SCRIPT, "sh", str(pgid), steps])
            async with self._kill_slots:
                process = await self._open_channel(lambda: conn.create_process(command))
                try:
                    await asyncio.wait_for(process.wait(), self._kill_grace + 10.0)
                finally:
                    process.close()
        except (OSError, asyncssh.Error) as exc:
            log.warning("%s: could not kill process group %d: %s",
                        self.machine.name, pgid, describe(exc))

    # --- files -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _sftp_client(self) -> AsyncIterator[SFTPClient]:
        conn = await self._connection()

        def start() -> Awaitable[SFTPClient]:
            return SFTPClient.start(conn, self.machine.answer_timeout)

        if not self._keep_sftp:  # too few channels to keep one for SFTP: open it per use
            async with self._slots:
                sftp = await self._open_channel(start)
                try:
                    yield sftp
                finally:
                    sftp.close()
            return
        async with self._sftp_lock:
            if self._sftp is not None and (self._sftp_conn is not conn or self._sftp.error):
                self._sftp.close()
                self._sftp = None
                self._slots.release()
            if self._sftp is None:
                await self._slots.acquire()
                try:
                    self._sftp = await self._open_channel(start)
                    self._sftp_conn = conn
                except BaseException:
                    self._slots.release()
                    raise
            sftp = self._sftp
        yield sftp

    async def fetch(
        self, remote_path: str, local_path: str, *, progress: Callable[[int], None] | None = None,
        limit: int | None = None,
    ) -> int:
        """Copy ``remote_path`` to ``local_path`` and return its size. If ``local_path`` exists,
        its bytes are trusted as the file's beginning and only the rest is transferred (a file
        longer than the source is started again). ``progress`` gets the size of ``local_path``
        after every block. An error of ``local_path`` itself (a full disk) is an OSError, not
        a RemoteError: the machine is not to blame. A file larger than ``limit`` bytes (what
        the caller can legitimately expect) is refused before any byte of it is read, with a
        ProtocolError; no more than the size the file had when opened is ever read, so a file
        that grows meanwhile cannot take more either."""
        self._check_breaker()
        if self._local:
            async with self.boundary(f"cannot copy {remote_path} to {local_path}"):
                self._within(remote_path, os.stat(remote_path).st_size, limit)
                return await transfer.copy_local(remote_path, local_path, progress, limit)
        try:
            async with self.boundary(f"cannot fetch {remote_path}"), self._sftp_client() as sftp:
                handle = await sftp.open(remote_path)
                try:
                    size = await sftp.size(handle)
                    self._within(remote_path, size, limit)
                    target = transfer.local(lambda: open(local_path, "ab"))  # noqa: SIM115
                    try:
                        offset = target.tell()
                        if offset > size:
                            transfer.local(lambda: target.truncate(0))
                            offset = 0
                        offset = await sftp.pull(handle, target, offset, size, progress)
                    finally:
                        transfer.local(target.close)
                finally:
                    sftp.close_handle(handle)
                if offset != size:
                    raise RemoteError(f"{self.machine.name}: {remote_path} shrank during the "
                                      f"transfer ({offset} of {size} bytes)")
                return size
        except transfer.LocalFileError as exc:  # the coordinator's disk: not the machine's fault
            raise exc.error from None
        except Violation as exc:
            raise self._violation(exc) from None

    def _within(self, remote_path: str, size: int, limit: int | None) -> None:
        if limit is not None and size > limit:
            raise ProtocolError(f"{self.machine.name}: {remote_path} is {size} bytes, more than "
                                f"the {limit} it can legitimately hold; refused it")

    async def remove(self, remote_path: str) -> None:
        """Delete a file on the machine; a file that is already gone is fine."""
        self._check_breaker()
        async with self.boundary(f"cannot remove {remote_path}"):
            if self._local:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(remote_path)
                return
            try:
                async with self._sftp_client() as sftp:
                    with contextlib.suppress(FileNotFoundError):
                        await sftp.remove(remote_path)
            except Violation as exc:
                raise self._violation(exc) from None

    def _violation(self, exc: Violation) -> ProtocolError:
        return ProtocolError(f"{self.machine.name}: {exc}; its SFTP channel is closed")

    async def mktemp(self) -> str:
        """A fresh, empty temporary file on the machine (the caller removes it)."""
        if self._local:
            self._check_breaker()
            fd, path = tempfile.mkstemp(prefix="buildfarm.")
            os.close(fd)
            return path
        result = await self.run(["mktemp", "-t", "buildfarm.XXXXXXXXXX"], check=True)
        return result.stdout.decode().strip()
