"""Hooks: the declared events, the scripts in hooks.d/<event>.d/, and the runner that delivers.

Events are rows written in the same transaction as the state change that causes them
(datastore/events.py). The runner delivers each at least once: it marks an event delivered only
after every script for it has run, so a coordinator killed in between delivers it again at its
next start. Hooks run in a bounded pool of asyncio tasks beside the scheduler: a hook that is
slow, hangs, fails, crashes or floods its output costs a worker slot, never the main loop.

EVENTS, PAYLOAD_FIELDS, BUILD_FIELDS and ENVIRONMENT are the one declared description of what a
hook gets; man/buildfarm-hooks.7 is generated from them (buildfarm/docs/manpages.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from buildfarm.datastore import events as event_rows

logger = logging.getLogger("buildfarm")


@dataclass(frozen=True, slots=True)
class HookEvent:
    """One event: its name, when it fires, and the keys of the JSON object a hook reads."""

    name: str
    when: str
    fields: tuple[str, ...]  # keys of the payload besides "event" and "build"


# What each payload key holds (every event has "event" and "build"), for the man page.
PAYLOAD_FIELDS: dict[str, str] = {
    "event": "The event's name.",
    "build": "The build the event is about: an object, see below.",
    "machine": "The name of the machine, as in the inventory (null when no machine was involved).",
    "attempt": "The attempt's id (null when no attempt was involved).",
    "log": "The path of the attempt's gzip-compressed build log on the coordinator "
    "(null when there is none).",
    "outputs": "An object: store path -> nar hash (sha256:<nix-base32>) of each output, "
    "now in the output store.",
    "result": "An object: exit_status (the builder's, or null) and reason (a short text; "
    "dependency-failed: DRV (build UUID) when an input's latest build failed, naming the failed "
    "build at the bottom of the chain, followed by via INPUT when that is another derivation).",
    "missing_inputs": "A list of objects: path (a store path the machine lacked) and "
    "derivation (the .drv that produces it, or null when none is known).",
}
BUILD_FIELDS: dict[str, str] = {
    "uuid": "The build's UUID.",
    "derivation": "The .drv store path.",
    "system": "The system type, e.g. x86_64-linux.",
    "state": "The build's state when the event was recorded: queued, running, succeeded, "
    "failed or canceled.",
    "priority": "The build's priority (an integer; higher runs first).",
    "tags": "An object: tag key -> value.",
    "outputs": "An object: output name -> store path.",
}

EVENTS: tuple[HookEvent, ...] = (
    HookEvent("build-submitted", "a build was queued by `buildfarm submit`, or again by "
              "`buildfarm builds retry`", ()),
    HookEvent(
        "build-started",
        "the coordinator allocated the build to a machine",
        ("machine", "attempt"),
    ),
    HookEvent(
        "build-success",
        "the build succeeded and its outputs are in the output store",
        ("machine", "attempt", "log", "outputs"),
    ),
    HookEvent(
        "build-failure",
        "the builder failed (once its retries, submit --retries, are spent: a failure tried "
        "again records no event), or the build can never run because an input's build failed "
        "(reason dependency-failed: ..., when it is submitted, when the input fails or when a "
        "machine finds it missing; machine, attempt and log are then null), or attempts in a "
        "row made no progress (run --retry-limit)",
        ("machine", "attempt", "log", "result"),
    ),
    HookEvent(
        "build-missing-inputs",
        "a machine lacked inputs that the output store does not hold, one of which at least has "
        "no build yet (a setup failure: the build goes back to the queue, and is not tried "
        "again before this event's hooks have run)",
        ("machine", "attempt", "missing_inputs"),
    ),
    HookEvent("build-canceled", "a user canceled the build (`buildfarm builds cancel`)", ()),
)
EVENT_NAMES = tuple(e.name for e in EVENTS)

# The environment of every hook, for the man page: these, PATH, the variables of PASSED_ON the
# coordinator has, and those `run --hook-env` names. Never the rest of the coordinator's own: it
# may hold secrets (a PGPASSWORD, a cloud token) that no hook asked for.
ENVIRONMENT: dict[str, str] = {
    "BUILDFARM_EVENT": "The event's name.",
    "BUILDFARM_EVENT_ID": "The event's number in the datastore: the same when it is delivered "
    "again, so that a hook can recognise an event it has handled.",
    "BUILDFARM_BUILD_UUID": "The build's UUID.",
    "BUILDFARM_DERIVATION": "The build's .drv store path.",
    "BUILDFARM_DB": "The datastore URL of the running coordinator, without its password: a "
    "hook's buildfarm finds a PostgreSQL password in the password file (~/.pgpass, or the file "
    "PGPASSFILE names), or in PGPASSWORD when buildfarm run --hook-env PGPASSWORD passes it.",
    "BUILDFARM_STATE_DIR": "The coordinator's state directory.",
    "BUILDFARM_INVENTORY": "The coordinator's inventory file.",
    "BUILDFARM_HOOKS_DIR": "The coordinator's hooks directory.",
}

# What a script needs to run at all, passed on when the coordinator has it; no secret.
PASSED_ON = ("HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR",
             "PGPASSFILE")
PASSED_ON_PREFIX = "LC_"  # the locale's categories

# run-parts(8): skip non-executables, dotfiles, editor backups and package-manager leftovers.
SKIPPED_NAMES = ("names starting with a dot", "names ending in ~", "names containing .dpkg-",
                 "names containing .rpm")
_SKIPPED = re.compile(r"^\.|~$|\.dpkg-|\.rpm")
MAX_OUTPUT = 64 * 1024  # bytes of a hook's output kept for the log; the rest is read and dropped
MAX_LINES = 200  # lines of a hook's output logged
MAX_LINE = 1000  # characters of one line logged
LINGER = 5.0  # seconds a hook's leftover processes may hold its output open after it exits


def scripts(hooks_dir: str, event: str) -> list[str]:
    """The executables that fire on `event`, in lexical (byte) order, as run-parts runs them."""
    directory = os.path.join(hooks_dir, f"{event}.d")
    try:
        names = sorted(os.listdir(directory), key=os.fsencode)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
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
    environment: Mapping[str, str] = field(default_factory=dict)  # BUILDFARM_DB, ...
    passed_on: tuple[str, ...] = ()  # more of the coordinator's variables (run --hook-env)
    timeout: float = 60.0
    workers: int = 4  # hooks running at once
    per_event: int = 2  # scripts of one event name running at once
    trace: bool = False


@dataclass(frozen=True, slots=True)
class HookRun:
    """How one script ran: exit_status is None when it was killed at the timeout."""

    script: str
    exit_status: int | None
    seconds: float
    output: str  # printable text only, at most MAX_OUTPUT bytes of it
    dropped: int = 0  # bytes of output beyond MAX_OUTPUT

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _HookProtocol(asyncio.SubprocessProtocol):
    """Keeps the first MAX_OUTPUT bytes of a hook's output; notes its exit and end of output."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.kept = bytearray()
        self.dropped = 0
        self.exited: asyncio.Future[None] = loop.create_future()
        self.output_closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        block = data if isinstance(data, bytes) else data.encode()
        room = max(0, MAX_OUTPUT - len(self.kept))
        self.kept.extend(block[:room])
        self.dropped += len(block) - min(room, len(block))

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1 and not self.output_closed.done():
            self.output_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


async def run_script(script: str, payload: str, env: Mapping[str, str], timeout: float) -> HookRun:
    """Run one hook with `payload` on its stdin, reading its output as it comes.

    The hook leads a session of its own; at the timeout the whole process group is killed, and so
    is what it left behind holding its output open after it exited. Raises OSError when the
    script cannot be started at all.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _HookProtocol(loop),
        script,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env),
        start_new_session=True,
    )
    status: int | None = None
    try:
        stdin = transport.get_pipe_transport(0)
        assert isinstance(stdin, asyncio.WriteTransport)
        stdin.write(payload.encode())
        stdin.close()  # after the buffer is written; a hook need not read it
        await asyncio.wait_for(asyncio.shield(protocol.exited), timeout)
        status = transport.get_returncode()
        left = timeout - (time.monotonic() - started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(protocol.output_closed), max(0.0, min(left, LINGER))
            )
    except TimeoutError:
        pass
    finally:
        if not protocol.exited.done() or not protocol.output_closed.done():
            # The group lives while any member does, so its id cannot have been reused.
            _kill_group(transport.get_pid())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(asyncio.gather(protocol.exited, protocol.output_closed)), 5.0
                )
        transport.close()
    kept = bytes(protocol.kept)
    return HookRun(script, status, time.monotonic() - started, _printable(kept), protocol.dropped)


def hook_environment(
    settings: HookSettings, event_id: int, payload: Mapping[str, Any]
) -> dict[str, str]:
    """What a hook runs with (ENVIRONMENT): the variables that name this event and the
    coordinator's settings, and of the coordinator's own environment only what a script needs
    (PASSED_ON) and what `run --hook-env` asks for."""
    build = payload.get("build") or {}
    wanted = {*PASSED_ON, *settings.passed_on}
    env = {k: v for k, v in os.environ.items() if k in wanted or k.startswith(PASSED_ON_PREFIX)}
    env.update(settings.environment)
    env["BUILDFARM_EVENT"] = str(payload.get("event", ""))
    env["BUILDFARM_EVENT_ID"] = str(event_id)
    env["BUILDFARM_BUILD_UUID"] = str(build.get("uuid", ""))
    env["BUILDFARM_DERIVATION"] = str(build.get("derivation", ""))
    # Hooks may call `buildfarm` itself: put this installation first on PATH.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable),
                                   os.environ.get("PATH", os.defpath)])
    return env


def describe_exit(run: HookRun, timeout: float) -> str | None:
    """Why a run counts as failed, or None when it succeeded."""
    if run.exit_status is None:
        return f"killed after the {timeout:g}s timeout"
    if run.exit_status < 0:
        try:
            name = signal.Signals(-run.exit_status).name
        except ValueError:
            name = f"signal {-run.exit_status}"
        return f"crashed ({name})"
    if run.exit_status > 0:
        return f"exited with status {run.exit_status}"
    return None


class HookRunner:
    """Delivers pending events to hooks in a bounded pool beside the scheduler.

    `db` runs a datastore function in the coordinator's datastore thread, `report` writes a line
    to the coordinator's log, `wake` wakes its main loop (set when a delivery ends).
    """

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
        """Start delivering what is pending; the events of one build are delivered in order."""
        pending = await self.db(event_rows.pending, 500)
        found: dict[str, list[str]] = {}
        nothing_to_run: list[int] = []
        for event in pending:
            if event.id in self._in_flight:
                continue
            if event.name not in found:
                found[event.name] = scripts(self.settings.hooks_dir, event.name)
            if not found[event.name]:
                nothing_to_run.append(event.id)
                continue
            if event.build_id is not None and event.build_id in self._busy_builds:
                continue
            if len(self._in_flight) >= self.settings.workers * 4:
                continue
            self._in_flight.add(event.id)
            if event.build_id is not None:
                self._busy_builds.add(event.build_id)
            task = asyncio.create_task(
                self._deliver(event.id, event.build_id, event.name, event.payload),
                name=f"hooks-{event.name}-{event.id}",
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if nothing_to_run:
            await self.db(event_rows.mark_delivered_many, nothing_to_run)
            if len(pending) == 500:
                self.wake.set()  # more may be waiting behind these

    async def _deliver(self, event_id: int, build_id: int | None, name: str, payload: str) -> None:
        try:
            env = hook_environment(self.settings, event_id, json.loads(payload))
            for script in scripts(self.settings.hooks_dir, name):
                await self._run_one(name, script, payload, env)
            await self.db(event_rows.mark_delivered, event_id)
        except asyncio.CancelledError:
            raise  # the coordinator is stopping: the event stays pending for the next start
        except Exception as e:  # the datastore failed us: the event stays pending, retried
            logger.exception("delivering event %s", event_id)
            self.report(f"hooks for {name}: delivery failed, will retry: {e}")
        finally:
            self._in_flight.discard(event_id)
            if build_id is not None:
                self._busy_builds.discard(build_id)
            self.wake.set()

    async def _run_one(self, event: str, script: str, payload: str, env: dict[str, str]) -> None:
        label = f"hook {event}/{os.path.basename(script)}"
        semaphore = self._per_event.setdefault(event, asyncio.Semaphore(self.settings.per_event))
        run: HookRun | None = None
        async with semaphore, self._slots:
            began = time.monotonic()
            try:
                run = await run_script(script, payload, env, self.settings.timeout)
            except OSError as e:
                problem: str | None = f"cannot run: {e.strerror or e}"
        self.runs += 1
        if run is not None:
            self._log_output(label, run)
            problem = describe_exit(run, self.settings.timeout)
        if problem:
            self.failures += 1
            self.report(f"{label}: {problem}")
        if self.settings.trace:
            status = "none" if run is None or run.exit_status is None else run.exit_status
            seconds = time.monotonic() - began if run is None else run.seconds
            self.report(
                f"trace: event={event} script={script} exit={status} time={seconds:.3f}s"
            )

    def _log_output(self, label: str, run: HookRun) -> None:
        lines = run.output.splitlines()
        for line in lines[:MAX_LINES]:
            cut = line[:MAX_LINE] + (" [...]" if len(line) > MAX_LINE else "")
            self.report(f"{label}: {cut}")
        if len(lines) > MAX_LINES or run.dropped:
            self.report(f"{label}: (more output not logged)")

    async def idle(self) -> bool:
        """Nothing in flight and nothing pending."""
        return not self._tasks and not await self.db(event_rows.pending, 1)

    async def drain(self, deadline: float) -> None:
        """Give deliveries in flight until `deadline` (monotonic) to finish, then stop them:
        their events stay pending and are delivered at the next start."""
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
