"""Hooks: the declared events, the scripts in hooks.d/<event>.d/, and the runner that delivers.

Events are rows written in the same transaction as the state change that causes them
(datastore/events.py). The runner delivers each at least once: it marks an event delivered only
after every script for it has run, so a coordinator killed in between delivers it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from buildfarm.datastore import events as event_rows


@dataclass(frozen=True, slots=True)
class HookEvent:
    name: str
    when: str
    receives: str


COMMON = "build (uuid, derivation, system, state, priority, tags, outputs)"

EVENTS: tuple[HookEvent, ...] = (
    HookEvent("build-submitted", "a build was queued by `buildfarm submit`", COMMON),
    HookEvent(
        "build-started",
        "the coordinator allocated the build to a machine",
        f"{COMMON}, machine, attempt",
    ),
    HookEvent(
        "build-success",
        "the build succeeded and its outputs are in the output store",
        f"{COMMON}, machine, attempt, log, outputs (store path -> nar hash)",
    ),
    HookEvent(
        "build-failure",
        "the builder failed, or an input's build failed (reason dependency-failed)",
        f"{COMMON}, machine, attempt, log, result (exit_status, reason)",
    ),
    HookEvent(
        "build-missing-inputs",
        "a machine lacked inputs the output store does not hold (a setup failure)",
        f"{COMMON}, machine, attempt, missing_inputs (list of {{path, derivation}})",
    ),
    HookEvent("build-canceled", "a user canceled the build", COMMON),
)
EVENT_NAMES = tuple(e.name for e in EVENTS)

# run-parts(8): skip dotfiles, editor backups and package-manager leftovers.
_SKIPPED = re.compile(r"^\.|~$|\.dpkg-|\.rpm")
MAX_OUTPUT = 64 * 1024  # bytes of a hook's output kept for the log; the rest is drained


def scripts(hooks_dir: str, event: str) -> list[str]:
    """The executables that fire on `event`, in lexical (byte) order, as run-parts runs them."""
    directory = os.path.join(hooks_dir, f"{event}.d")
    try:
        names = sorted(os.listdir(directory), key=os.fsencode)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        path = os.path.join(directory, name)
        if _SKIPPED.search(name) or not os.path.isfile(path) or not os.access(path, os.X_OK):
            continue
        found.append(path)
    return found


@dataclass(frozen=True, slots=True)
class HookSettings:
    hooks_dir: str
    environment: dict[str, str]  # BUILDFARM_DB, BUILDFARM_STATE_DIR, ...
    timeout: float = 60.0
    workers: int = 4
    per_event: int = 2  # scripts of one event name running at once
    trace: bool = False


@dataclass(frozen=True, slots=True)
class HookRun:
    script: str
    exit_status: int | None  # None: killed after the timeout
    seconds: float
    output: str


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)


async def run_script(
    script: str, payload: str, env: dict[str, str], timeout: float
) -> HookRun:
    """Run one hook with the event on stdin; kill its whole process group at the timeout."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        script,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    kept = bytearray()

    async def converse() -> None:
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(payload.encode())
            await process.stdin.drain()
            process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # a hook need not read its input
        while block := await process.stdout.read(65536):
            if len(kept) < MAX_OUTPUT:
                kept.extend(block[: MAX_OUTPUT - len(kept)])
        await process.wait()

    status: int | None
    try:
        await asyncio.wait_for(converse(), timeout)
        status = process.returncode
    except TimeoutError:
        status = None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    return HookRun(script, status, time.monotonic() - started, _printable(bytes(kept)))


def _environment(settings: HookSettings, payload: dict[str, Any]) -> dict[str, str]:
    build = payload.get("build") or {}
    env = dict(os.environ)
    env.update(settings.environment)
    env["BUILDFARM_EVENT"] = str(payload.get("event", ""))
    env["BUILDFARM_BUILD_UUID"] = str(build.get("uuid", ""))
    env["BUILDFARM_DERIVATION"] = str(build.get("derivation", ""))
    # Hooks may call `buildfarm` itself: put this installation first on PATH.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


class HookRunner:
    """Delivers pending events to hooks in a bounded pool beside the scheduler."""

    def __init__(
        self,
        settings: HookSettings,
        db: Callable[..., Awaitable[Any]],
        report: Callable[[str], None],
        wake: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.wake = wake
        self.db = db
        self.report = report
        self.runs = 0
        self.failures = 0
        self._slots = asyncio.Semaphore(settings.workers)
        self._per_event = {name: asyncio.Semaphore(settings.per_event) for name in EVENT_NAMES}
        self._in_flight: set[int] = set()
        self._busy_builds: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def dispatch(self) -> None:
        """Start delivering what is pending (events of one build stay in order)."""
        pending = await self.db(event_rows.pending, 200)
        for event in pending:
            if event.id in self._in_flight:
                continue
            if event.build_id is not None and event.build_id in self._busy_builds:
                continue
            if len(self._in_flight) >= self.settings.workers * 4:
                break
            self._in_flight.add(event.id)
            if event.build_id is not None:
                self._busy_builds.add(event.build_id)
            task = asyncio.create_task(self._deliver(event.id, event.build_id, event.name,
                                                     event.payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event_id: int, build_id: int | None, name: str, payload: str) -> None:
        try:
            for script in scripts(self.settings.hooks_dir, name):
                async with self._slots, self._per_event.setdefault(name, asyncio.Semaphore(1)):
                    env = _environment(self.settings, json.loads(payload))
                    result = await run_script(script, payload, env, self.settings.timeout)
                self._record(name, result)
            await self.db(event_rows.mark_delivered, event_id)
        except OSError as e:
            self.report(f"hook for {name}: cannot run: {e}")
            await self.db(event_rows.mark_delivered, event_id)
        finally:
            self._in_flight.discard(event_id)
            if build_id is not None:
                self._busy_builds.discard(build_id)
            self.wake.set()

    def _record(self, event: str, run: HookRun) -> None:
        label = f"hook {event}/{os.path.basename(run.script)}"
        self.runs += 1
        for line in run.output.splitlines()[:200]:
            self.report(f"{label}: {line}")
        if run.exit_status is None:
            self.failures += 1
            self.report(f"{label}: killed after {self.settings.timeout:.0f}s timeout")
        elif run.exit_status != 0:
            self.failures += 1
            self.report(f"{label}: exited with status {run.exit_status}")
        if self.settings.trace:
            self.report(
                f"trace: event={event} script={run.script} exit={run.exit_status} "
                f"time={run.seconds:.3f}s"
            )

    async def idle(self) -> bool:
        """Nothing in flight and nothing pending."""
        return not self._tasks and not await self.db(event_rows.pending, 1)

    async def drain(self, deadline: float) -> None:
        """Give deliveries in flight until `deadline` (monotonic) to finish, then stop them."""
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
