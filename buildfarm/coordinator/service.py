"""The `run` service: startup, main loop, shutdown (after uvicorn's Server).

The datastore is used from one dedicated thread, so a slow disk never stalls the event loop;
each attempt is one asyncio task; allocation runs whenever a slot frees or every tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from buildfarm.backends import get_backend
from buildfarm.config import Settings, private_directory
from buildfarm.coordinator import scheduler
from buildfarm.coordinator.attempt import (
    AttemptRun,
    BuildFailed,
    SetupFailed,
    StoreCommandFailed,
    TransferFailed,
)
from buildfarm.coordinator.fleet import Fleet, MachineSlots, RunningAttempt, close_connection
from buildfarm.coordinator.hooks import HookRunner, HookSettings
from buildfarm.coordinator.options import RunOptions
from buildfarm.coordinator.reconnecting import DatastoreLost, reconnecting
from buildfarm.coordinator.runlock import RunLock
from buildfarm.coordinator.tally import Tally
from buildfarm.datastore import attempts as records
from buildfarm.datastore import events as event_rows
from buildfarm.datastore import open_datastore, without_password
from buildfarm.datastore.models import OUTPUTS_PRESENT, Attempt, Build
from buildfarm.datastore.waiting import note_machine, record_machines, stopped
from buildfarm.errors import (
    AlreadyRunningError,
    BuildfarmError,
    DatastoreError,
    ProtocolError,
    RemoteError,
)
from buildfarm.formats.keys import key_name
from buildfarm.formats.signing import SigningKey, load_key, save_key
from buildfarm.inventory import Inventory
from buildfarm.logs import log_path
from buildfarm.outputs.store import OutputStore, Publisher

if TYPE_CHECKING:
    from buildfarm.coordinator.metrics import Metrics

logger = logging.getLogger("buildfarm")
T = TypeVar("T")
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TALLY_EVERY = 1.0  # seconds between two reads of the events that end builds
LOCAL_FAILURE_RETRY = 10.0  # seconds a build waits after the coordinator's own disk failed it
# --exit-when-idle: a machine that failed to connect this many times in a row counts as gone.
GIVE_UP_CONNECTING = 5
RUN_LOCK_CHECK_EVERY = 5.0


@dataclass
class Moving:
    """A build some machines had better not get again while another could take it: they hold
    its outputs already (it goes to one that lacks them: see AttemptRun.survey), or its
    builder failed there (a retry goes elsewhere)."""

    system: str
    features: frozenset[str]
    store_dir: str
    holders: set[str]
    tags: frozenset[str] = frozenset()  # the machine tags it needs


class Reporter(Protocol):
    """What the user sees: the live view or one line per event."""

    def event(self, line: str) -> None: ...
    def update(self, coordinator: Coordinator) -> None: ...


class Coordinator:
    def __init__(
        self, settings: Settings, inventory: Inventory, options: RunOptions, reporter: Reporter,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.options = options
        self.reporter = reporter
        self.metrics = metrics
        self.fleet = Fleet(inventory, reporter.event)
        self.machines = self.fleet.machines  # by name; removed machines until their builds end
        self.should_exit = False
        self.force_exit = False
        self.tally = Tally()  # builds and attempts that ended since the start, apart
        self._tallied = float("-inf")
        self.queue_depth: dict[str, int] = {}
        self.moving: dict[int, Moving] = {}  # by build id
        self._settled = False  # the last allocation asked every machine that could take work
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datastore")
        self._wake = asyncio.Event()
        self._lock = RunLock(settings.db_url, settings.state_dir)
        self._lock_checked = time.monotonic()
        self._datastore_lost = False
        self._signal_handlers: dict[int, Any] = {}
        self.outputs: OutputStore | None = None
        self.key: SigningKey | None = None
        self.hooks = HookRunner(
            HookSettings(
                hooks_dir=settings.hooks_dir,
                environment={
                    "BUILDFARM_DB": without_password(settings.db_url),
                    "BUILDFARM_STATE_DIR": settings.state_dir,
                    "BUILDFARM_INVENTORY": settings.inventory_path,
                    "BUILDFARM_HOOKS_DIR": settings.hooks_dir,
                },
                passed_on=options.hook_env,
                timeout=options.hook_timeout,
                workers=options.hook_workers,
                per_event=options.hook_parallelism,
                trace=os.environ.get("BUILDFARM_TRACE_HOOKS") == "1",
            ),
            self.db,
            reporter.event,
            self._wake,
        )

    # -- the datastore thread

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()

        def notify(line: str) -> None:
            loop.call_soon_threadsafe(self.reporter.event, line)

        call = functools.partial(
            reconnecting, functools.partial(fn, *args), notify,
            lambda: self.force_exit or self._datastore_lost,
        )
        try:
            return await loop.run_in_executor(self._executor, call)
        except DatastoreLost:
            self._datastore_lost = self.should_exit = True  # every later call fails at once
            raise

    async def check_run_lock(self) -> None:
        """PostgreSQL: after a server restart the run lock is taken again, or run stops."""
        if time.monotonic() - self._lock_checked < RUN_LOCK_CHECK_EVERY:
            return
        self._lock_checked = time.monotonic()
        try:
            await self.db(self._lock.check)
        except AlreadyRunningError as e:
            self.reporter.event(f"lost the run lock while the datastore was away: {e}; stopping")
            self.should_exit = self.force_exit = True
        except DatastoreError:
            pass  # the server is still away; the datastore calls wait for it meanwhile

    # -- lifecycle

    async def serve(self) -> None:
        self.install_signal_handlers()
        try:
            await self.startup()
            try:
                await self.main_loop()
            finally:
                await self.shutdown()
        finally:
            self.restore_signal_handlers()
            self._executor.shutdown(wait=True)
            self._lock.release()

    async def startup(self) -> None:
        private_directory(self.settings.state_dir)
        self._lock.acquire()
        await self.db(open_datastore, self.settings.db_url)
        recovered = await self.db(records.recover)
        self.tally.position = await self.db(event_rows.newest_id)
        if recovered:
            self.reporter.event(f"{recovered} attempt(s) left running by a previous run requeued")
        self.key = self._signing_key()
        self.outputs = OutputStore(
            self.settings.outputs_dir, Publisher(self.key, key_name(self.settings.state_dir),
                                                 compressions=self.options.compressions)
        )
        self.outputs.clean_temporary()
        swept = await self.db(self.outputs.sweep_unrecorded)
        if swept:
            self.reporter.event(f"{len(swept)} nar(s) no record names, left by a previous run, "
                                "removed")
        self.fleet.start()
        names = ", ".join(self.machines) or "none"
        self.reporter.event(f"coordinator started with machines: {names}")
        if self.metrics is not None:
            self.reporter.event(f"metrics at {await self.metrics.start(self)}")

    # -- inventory reload (SIGHUP, or the file changed): see buildfarm.coordinator.fleet

    def request_reload(self) -> None:
        self.fleet.request_reload()
        self._wake.set()

    def _signing_key(self) -> SigningKey:
        try:
            return load_key(self.settings.state_dir)
        except BuildfarmError:
            if os.path.exists(os.path.join(self.settings.state_dir, "signing-key.secret")):
                raise
        key = SigningKey.generate()
        save_key(key, self.settings.state_dir)
        self.reporter.event("generated a signing key (see `buildfarm key show`)")
        return key

    async def main_loop(self) -> None:
        depth_probed = 0.0
        # --exit-when-idle: idle at the end of the iteration before, so that this iteration's
        # allocation came after every attempt and hook delivery had ended (one that ends
        # between an allocation and the look at the queue may have freed a build).
        idle_before = False
        while not self.should_exit:
            await self.check_run_lock()
            await self.fleet.maybe_reload()  # before allocating: new machines start connecting
            self.fleet.drop_retired()
            self.fleet.probe_loads(self.options.load_interval)
            await self.check_cancellations()
            await self.allocate()
            if (reports := self.fleet.reports_to_record(time.time())) is not None:
                await self.db(record_machines, reports, time.time())
            await self.hooks.dispatch()
            if time.monotonic() - depth_probed > 5:
                depth_probed = time.monotonic()
                self.queue_depth = await self.db(scheduler.queue_depth)
            await self.count_endings()
            self.reporter.update(self)
            if self.options.exit_when_idle and await self.hooks.idle() and await self.idle():
                if idle_before:
                    await self.count_endings(force=True)  # the last view counts every build
                    await self.report_stuck()
                    return
                idle_before = True
                continue  # allocate once more, at once
            idle_before = False
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.options.tick)

    async def shutdown(self) -> None:
        running = [r for m in self.machines.values() for r in m.running.values()]
        if running and not self.force_exit:
            self.reporter.event(
                f"stopping: waiting up to {self.options.grace:.0f}s for {len(running)} "
                "running build(s) (interrupt again to stop now)"
            )
            deadline = time.monotonic() + self.options.grace
            while not self.force_exit and time.monotonic() < deadline:
                if not any(m.running for m in self.machines.values()):
                    break
                await asyncio.sleep(0.2)
        tasks = [
            r.task for m in self.machines.values() for r in m.running.values() if r.task is not None
        ]
        for task in tasks:
            task.cancel("coordinator stopping")
        await asyncio.gather(*tasks, return_exceptions=True)
        # Events of the builds just ended get a moment; undelivered ones wait for the next run.
        await self.hooks.dispatch()
        await self.hooks.drain(time.monotonic() + (0 if self.force_exit else 5.0))
        for slots in self.machines.values():
            for background in (slots.connecting, slots.probing):
                if background is not None:
                    background.cancel()
        await asyncio.gather(
            *(close_connection(s.remote, s.sessions) for s in self.machines.values()),
            *self.fleet.background,
            return_exceptions=True,
        )
        if self.metrics is not None:
            await self.metrics.stop()
        with contextlib.suppress(DatastoreError):  # queued builds say run is not running
            await self.db(stopped, time.time())

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            self._signal_handlers[sig] = signal.getsignal(sig)
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        self._signal_handlers[signal.SIGHUP] = signal.getsignal(signal.SIGHUP)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def restore_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig, handler in self._signal_handlers.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        self._wake.set()

    # -- the loop's work

    async def idle(self) -> bool:
        """Nothing can make progress: nothing runs, the last allocation asked every machine
        that may take work and none took any, and no queued build waits for a later start."""
        if any(m.running for m in self.machines.values()):
            return False
        if not any((await self.db(scheduler.queue_depth)).values()):
            return True
        return self._settled and await self.db(scheduler.next_start, time.time()) is None

    async def report_stuck(self) -> None:
        """Say what is left in the queue, and why no machine takes it."""
        groups, waiting = await self.db(scheduler.stuck)
        if not groups and not waiting:
            self.reporter.event("nothing queued or running: exiting")
            return
        for group in groups:
            self.reporter.event(f"stuck: {group.count} queued build(s) for {group.system}"
                                f"{_features(group.features)} of {group.store_dir}: "
                                f"{self.fleet.why_stuck(group)} (e.g. {group.example})")
        if waiting:
            self.reporter.event(f"stuck: {waiting} queued build(s) wait for those")
        self.reporter.event("nothing else can make progress: exiting")

    async def check_cancellations(self) -> None:
        running = {r.attempt_id: r for m in self.machines.values() for r in m.running.values()}
        for attempt_id in await self.db(records.canceled, list(running)):
            run = running[attempt_id]
            if run.task is not None and not run.task.done():
                self.reporter.event(f"build {run.build_uuid} canceled: stopping it")
                run.task.cancel("canceled by a user")

    def _ensure_connecting(self, slots: MachineSlots) -> None:
        if slots.ready or slots.connecting is not None:
            return
        until = slots.remote.backed_off_until
        if until is not None and until > time.time():
            return
        slots.connecting = asyncio.create_task(self._connect(slots))

    async def _connect(self, slots: MachineSlots) -> None:
        name = slots.machine.name
        try:
            await slots.remote.connect()
            await slots.probe_load()  # before the first allocation there
            slots.ready = True
            slots.last_error = None
            await self.db(note_machine, name, None, None)
            self.reporter.event(f"machine {name} connected")
        except RemoteError as e:
            slots.last_error = str(e)
            until = slots.remote.backed_off_until
            await self.db(note_machine, name, str(e), until)
            self.reporter.event(f"machine {name} unavailable: {e}")
        finally:
            slots.connecting = None
            self._wake.set()

    async def count_endings(self, force: bool = False) -> None:
        """Read the events recorded since the last look (at most every TALLY_EVERY seconds
        unless `force`), for the tally of builds that ended."""
        if self.tally.position is None or (
                not force and time.monotonic() - self._tallied < TALLY_EVERY):
            return
        self._tallied = time.monotonic()
        while True:
            rows = await self.db(event_rows.names_after, self.tally.position)
            self.tally.add_events(rows)
            if len(rows) < event_rows.PAGE:
                return

    async def allocate(self) -> None:
        if self.should_exit:
            return
        settled = True
        for slots in self.fleet.ordered():
            if slots.retiring:
                continue  # removed: finishes its builds on the connection it has
            self._ensure_connecting(slots)
            if slots.sessions is not None:
                slots.sessions.prune()
            if not slots.ready:
                settled = settled and slots.remote.failures >= GIVE_UP_CONNECTING
                continue
            if slots.free <= 0 or slots.paused:
                settled = False
                continue
            if slots.overloaded():
                settled = False
                continue
            slot = scheduler.Slot(
                slots.machine.name,
                slots.machine.systems,
                frozenset(slots.machine.features),
                slots.machine.store_directory,
                slots.machine.tag_words,
            )
            avoided = [b for b, moving in self.moving.items()
                       if slots.machine.name in moving.holders and self._other_taker(moving)]
            while slots.free > 0:
                attempt = await self.db(scheduler.allocate, slot, None, avoided)
                if attempt is None:
                    break
                settled = False
                self._start(slots, attempt)
        self._settled = settled

    def _other_taker(self, moving: Moving, also: str | None = None) -> bool:
        """Whether a connected machine that may lack a build's outputs (it is none of their
        holders, nor `also`) could take it."""
        return any(
            m.ready and not m.retiring and m.machine.name not in moving.holders
            and m.machine.name != also
            and m.can_take(moving.system, moving.features, moving.store_dir, moving.tags)
            for m in self.machines.values()
        )

    def _start(self, slots: MachineSlots, attempt: Attempt) -> None:
        build: Build = attempt.build
        drv_path = build.derivation.path
        run = RunningAttempt(
            attempt_id=attempt.id,
            build_id=build.id,
            build_uuid=build.uuid,
            drv_path=drv_path,
            started=time.time(),
            system=build.system,
        )
        moving = self.moving.get(build.id) or Moving(
            build.system, frozenset(build.required_features.split()),
            drv_path.rsplit("/", 1)[0], set(), frozenset(build.machine_tags.split()),
        )
        run.task = asyncio.create_task(self._run_attempt(slots, run, moving),
                                       name=f"attempt-{attempt.id}")
        slots.running[attempt.id] = run
        self.reporter.event(f"build {build.uuid} started on {slots.machine.name} ({drv_path})")

    async def _run_attempt(self, slots: MachineSlots, run: RunningAttempt,
                           moving: Moving) -> None:
        machine = slots.machine
        assert self.outputs is not None and self.key is not None
        path = log_path(self.settings.logs_dir, run.build_uuid, run.attempt_id)
        steps = AttemptRun(
            attempt_id=run.attempt_id,
            build_uuid=run.build_uuid,
            drv_path=run.drv_path,
            machine=machine,
            remote=slots.remote,
            sessions=slots.sessions,
            backend=get_backend(machine.store),
            outputs=self.outputs,
            db=self.db,
            key=self.key,
            log_path=path,
            max_log_bytes=self.options.max_log_bytes,
            on_step=lambda name: setattr(run, "step", name),
            on_progress=lambda n: setattr(run, "transferred", n),
            on_pushed=None if self.metrics is None else functools.partial(
                self.metrics.pushed, machine.name
            ),
            system=run.system,
            may_move=self._other_taker(moving, also=machine.name),
            running=lambda: list(slots.running),
            trusted_keys=(self.key.nix_public(key_name(self.settings.state_dir)),),
        )
        uuid, name = run.build_uuid, machine.name
        outcome, setup_kind = "interrupted", None
        retried = False  # a builder failure tried again: the build goes on
        retry = self.options.retry
        ended: list[str] = []  # other builds that ended failed with this attempt (or it, given up)
        try:
            stored = await steps.run()
            flaky = await self.db(records.succeed, run.attempt_id, stored, path,
                                  steps.check_result)
            await asyncio.to_thread(self.outputs.remove_superseded, stored)
            checked = f", checked: {steps.check_result}" if steps.check_result else ""
            flaky_words = ", flaky: its builder failed before" if flaky else ""
            self.reporter.event(f"build {uuid} succeeded (on {name}{checked}{flaky_words})")
            if flaky and self.metrics is not None:
                self.metrics.flaky.inc()
            outcome = "success"
            await self._machine_worked(slots)
        except BuildFailed as e:
            outcome = "failure"
            await self._publish_log(run.drv_path, path)
            failed = await self.db(records.builder_failed, run.attempt_id, e.exit_status,
                                   e.reason, path, self.fleet.inventory.build_retries, retry)
            if failed.retry is not None:  # tried again, on another machine if one may take it
                retried = True
                if self.metrics is not None:
                    self.metrics.retries.inc()
                self.moving.setdefault(run.build_id, moving).holders.add(name)
                self.reporter.event(f"build {uuid} failed (on {name}): {e.reason}; trying "
                                    f"again (retry {failed.retry})")
            else:
                self.reporter.event(f"build {uuid} failed (on {name}): {e.reason}")
            ended = failed.ended
            await self._machine_worked(slots)
        except SetupFailed as e:
            outcome, setup_kind = "setup-failure", e.kind
            if e.kind == OUTPUTS_PRESENT:
                self.moving.setdefault(run.build_id, moving).holders.add(name)
            ended = await self.db(
                records.setup_failure, run.attempt_id, e.kind, e.paths, e.detail, retry
            )
            self.reporter.event(f"build {uuid} setup failure on {name}: {e.kind}: {e.detail}")
        except (TransferFailed, StoreCommandFailed) as e:
            what = "transfer failed" if isinstance(e, TransferFailed) else "store command failed"
            # The machine's doing: it pauses, and another machine may take the build at once.
            ended = await self.db(functools.partial(
                records.retry_later, run.attempt_id, f"{what}: {e}", retry, wait=False))
            self.reporter.event(f"build {uuid} interrupted on {name}: {what}: {e}")
            await self._machine_failed(slots, f"{what}: {e}")
        except RemoteError as e:
            slots.ready = False
            slots.last_error = str(e)
            slots.remote.note_failure(str(e))
            until = slots.remote.backed_off_until  # now: a short backoff may end while we wait
            what = "machine misbehaved" if isinstance(e, ProtocolError) else "connection lost"
            ended = await self.db(functools.partial(
                records.retry_later, run.attempt_id, f"{what}: {e}", retry, wait=False))
            await self.db(note_machine, name, str(e), until)
            line = f"build {uuid} interrupted on {name}: {e}"
            if until is not None:
                clock = time.strftime("%H:%M:%S", time.localtime(until))
                line += f"; {name} backed off until {clock}"
            self.reporter.event(line)
        except OSError as e:
            # The coordinator's own disk (full, read-only): retry later, keep running.
            await self.db(
                records.interrupt, run.attempt_id, f"coordinator: {e}", LOCAL_FAILURE_RETRY
            )
            self.reporter.event(f"build {uuid} interrupted on {name}: {e}")
        except asyncio.CancelledError as e:
            reason = str(e.args[0]) if e.args else "canceled"
            await asyncio.shield(self.db(records.interrupt, run.attempt_id, reason))
            self.reporter.event(f"build {uuid} interrupted on {name}: {reason}")
        except Exception as e:  # a bug must not take the farm down: log it, retry (bounded)
            logger.exception("attempt %s on %s", run.attempt_id, name)
            ended = await self.db(
                records.retry_later, run.attempt_id, f"internal error: {e!r}", retry
            )
        finally:
            slots.running.pop(run.attempt_id, None)
            self.tally.add_attempt(outcome)
            if setup_kind != OUTPUTS_PRESENT and outcome != "interrupted" and not retried:
                self.moving.pop(run.build_id, None)
            if self.metrics is not None:
                self.metrics.attempt_ended(
                    name, outcome, setup_kind, time.time() - run.started, run.transferred
                )
            self._wake.set()
        if ended:
            for other, reason in await self.db(records.failure_reasons, ended):
                self.reporter.event(f"build {other} failed: {reason}")

    async def _machine_failed(self, slots: MachineSlots, error: str) -> None:
        """An attempt failed on the machine's side: it takes no new build for a while."""
        until = slots.attempt_failed()
        slots.last_error = error
        await self.db(note_machine, slots.machine.name, error, until)

    async def _machine_worked(self, slots: MachineSlots) -> None:
        if slots.attempt_worked():
            slots.last_error = None
            await self.db(note_machine, slots.machine.name, None, None)

    async def _publish_log(self, drv_path: str, log_file: str) -> None:
        """A failed build's log is published as a successful one's is (with its outputs), for
        `guix build --log-file` and `nix log`; not publishing it fails nothing."""
        assert self.outputs is not None
        try:
            await asyncio.to_thread(self.outputs.publish_log, drv_path, log_file)
        except (OSError, BuildfarmError) as e:
            self.reporter.event(f"log of {drv_path} not published: {e}")


def _features(features: frozenset[str]) -> str:
    return f" with features {', '.join(sorted(features))}" if features else ""
