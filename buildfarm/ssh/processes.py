"""Started commands, remote or local, as the SSH layer (buildfarm.ssh.remote) drives them: their
pipes, their process group, and how to end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Coroutine
from typing import Any, Protocol

import asyncssh

from buildfarm.errors import RemoteError

# The login shell execs sh, which prints its pid and execs the command. sshd made that pid a
# session (so process group) leader: "kill -SIG -PID" reaches the command and all its children.
GROUP_WRAPPER = "exec sh -c 'echo \"$$\"; exec \"$@\"' sh "
# dash's kill takes no "--"; a "-PGID" operand after the signal names a process group.
KILL_SCRIPT = (
    'kill -TERM "-$1" 2>/dev/null || exit 0; i=0; '
    'while [ "$i" -lt "$2" ]; do kill -0 "-$1" 2>/dev/null || exit 0; sleep 0.1; '
    'i=$((i+1)); done; kill -KILL "-$1" 2>/dev/null; exit 0'
)


class Reader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...
    async def readline(self) -> bytes: ...
    async def readexactly(self, n: int) -> bytes: ...
    def at_eof(self) -> bool: ...


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...


class Proc:
    """A started command, remote or local; ``pgid`` is known once start() has returned."""

    pgid: int | None = None
    stdin: Writer | None
    stdout: Reader
    stderr: Reader

    async def start(self) -> None:
        return None

    async def finish(self) -> int | None:
        """Wait for the end: the exit status, or None if a signal killed the command."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SSHProc(Proc):
    def __init__(self, name: str, process: asyncssh.SSHClientProcess[bytes], group: bool):
        self._name, self._process, self._group = name, process, group
        self.stdin, self.stdout, self.stderr = process.stdin, process.stdout, process.stderr

    async def start(self) -> None:
        if self._group:
            with contextlib.suppress(ValueError):
                self.pgid = int(await self.stdout.readline())

    async def finish(self) -> int | None:
        await self._process.wait_closed()
        if self._process.exit_signal is not None:
            return None
        if self._process.exit_status is None:
            raise RemoteError(f"{self._name}: connection lost during the command")
        return self._process.exit_status

    def close(self) -> None:
        self._process.close()


class LocalProc(Proc):
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None and process.stderr is not None
        self._process, self.pgid = process, process.pid
        self.stdin, self.stdout, self.stderr = process.stdin, process.stdout, process.stderr

    async def finish(self) -> int | None:
        status = await self._process.wait()
        return None if status < 0 else status

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()


async def gather_or_cancel(*coros: Coroutine[Any, Any, None]) -> None:
    """Like gather, but the first failure cancels the others."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def kill_local_group(pgid: int, grace: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        os.killpg(pgid, signal.SIGTERM)
        deadline = loop.time() + grace
        while loop.time() < deadline:
            await asyncio.sleep(0.05)
            os.killpg(pgid, 0)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
