"""The coordinator's machines: each one's connection and running attempts, and the inventory
reload that adds, changes and retires them (on SIGHUP, or when the file changes).

A removed machine is *retiring*: it has no free slot, so it takes no new build, but the attempts
it runs go on to their end on its connection; once none is left it is dropped and its
connection closed.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from buildfarm.coordinator.scheduler import Stuck
from buildfarm.datastore.waiting import MachineReport
from buildfarm.errors import BuildfarmError, RemoteError
from buildfarm.inventory import Inventory, Machine
from buildfarm.inventory import load as load_inventory
from buildfarm.ssh.remote import Remote
from buildfarm.ssh.store_session import StoreSessions, session_limit

REPORT_EVERY = 30.0  # seconds between records of the machines' reports when nothing changed
# A machine whose attempts keep failing (transfers, store commands) takes no new build for a
# while: 1 s after the first failure in a row, doubling up to a minute, with jitter.
PAUSE_BASE = 1.0
PAUSE_MAX = 60.0


@dataclass
class RunningAttempt:
    attempt_id: int
    build_id: int
    build_uuid: str
    drv_path: str
    started: float
    task: asyncio.Task[None] | None = None
    step: str = "allocated"
    transferred: int = 0
    system: str | None = None


@dataclass
class MachineSlots:
    """A machine's connection and what it is doing now."""

    machine: Machine
    remote: Remote
    sessions: StoreSessions | None = None
    ready: bool = False
    connecting: asyncio.Task[None] | None = None
    probing: asyncio.Task[None] | None = None  # reading the load
    running: dict[int, RunningAttempt] = field(default_factory=dict)
    load: float | None = None
    cores: int | None = None
    load_probed: float = 0.0
    last_error: str | None = None
    retiring: bool = False
    failed_attempts: int = 0  # in a row, by the machine's doing (not the builds')
    paused_until: float = 0.0  # time.time() before which it takes no new build

    @property
    def free(self) -> int:
        return 0 if self.retiring else self.machine.max_builds - len(self.running)

    @property
    def paused(self) -> bool:
        return self.paused_until > time.time()

    def attempt_failed(self) -> float:
        """An attempt failed on the machine's side: pause it; return until when."""
        self.failed_attempts += 1
        ceiling = min(PAUSE_MAX, PAUSE_BASE * 2.0 ** min(self.failed_attempts - 1, 60))
        self.paused_until = time.time() + ceiling * random.uniform(0.8, 1.2)
        return self.paused_until

    def attempt_worked(self) -> bool:
        """An attempt went through (built, or the builder failed): no pause. Returns whether
        the machine was failing until now."""
        failing, self.failed_attempts, self.paused_until = self.failed_attempts > 0, 0, 0.0
        return failing

    def can_take(self, system: str, features: frozenset[str], store_dir: str,
                 tags: frozenset[str] = frozenset()) -> bool:
        """Whether the machine builds for `system` with `features` from `store_dir`, and
        carries `tags` (KEY=VALUE words)."""
        machine = self.machine
        return (system in machine.systems and features <= set(machine.features)
                and store_dir == machine.store_directory and tags <= machine.tag_words)

    def report(self, now: float) -> MachineReport:
        """What it offers and what it is doing, for the reason a queued build waits."""
        machine, until, status = self.machine, None, "free"
        backed_off = self.remote.backed_off_until
        if self.retiring:
            status = "retiring"
        elif not self.ready:
            status = "down" if self.last_error else "connecting"
            until = backed_off if backed_off is not None and backed_off > now else None
        elif self.paused_until > now:
            status, until = "paused", self.paused_until
        elif self.overloaded():
            status = "overloaded"
        elif self.free <= 0:
            status = "busy"
        return MachineReport(
            machine.name, machine.systems, frozenset(machine.features), machine.tag_words,
            machine.store_directory, machine.max_builds, len(self.running), status, until,
            None if status in ("free", "busy") else self.last_error)

    def overloaded(self) -> bool:
        threshold = self.machine.overload_threshold
        if threshold is None or self.load is None or not self.cores:
            return False
        return self.load / self.cores > threshold

    async def probe_load(self) -> None:
        """load1 and cores, on the open connection: for overload_threshold, for choosing
        among machines, and for the live view."""
        self.load_probed = time.monotonic()
        try:
            result = await self.remote.run(["sh", "-c", "nproc; cat /proc/loadavg"], timeout=30)
            lines = result.stdout.decode().split("\n")
            self.cores = int(lines[0])
            self.load = float(lines[1].split()[0])
        except (RemoteError, ValueError, IndexError, TimeoutError):
            self.load = None

    async def probe_in_background(self) -> None:
        try:
            await self.probe_load()
        finally:
            self.probing = None


def machine_slots(machine: Machine) -> MachineSlots:
    """A machine's connection, with a pool of store sessions if it is a Nix machine."""
    remote = Remote(machine)
    limit = session_limit(machine.max_sessions, machine.max_builds)
    sessions = StoreSessions(remote, limit) if machine.store == "nix" and limit else None
    return MachineSlots(machine, remote, sessions)


async def close_connection(remote: Remote, sessions: StoreSessions | None) -> None:
    if sessions is not None:
        await sessions.close()
    await remote.close()


class Fleet:
    """The machines `run` uses, by name, kept in step with the inventory file."""

    def __init__(self, inventory: Inventory, report: Callable[[str], None]) -> None:
        self.inventory = inventory
        self.report = report
        self.machines: dict[str, MachineSlots] = {}
        self.background: set[asyncio.Task[None]] = set()  # connections closing
        self._requested = False
        self._stamp: tuple[float, int] | None = None
        self._reported: tuple[list[MachineReport], float] = ([], float("-inf"))

    def start(self) -> None:
        """Connections for the inventory's enabled machines (they connect when first needed)."""
        self._stamp = _stamp(self.inventory.path)
        for machine in self.inventory.machines:
            if machine.enabled:
                self.machines[machine.name] = machine_slots(machine)

    def ordered(self) -> list[MachineSlots]:
        """Free slot first, then lowest load ÷ speed."""

        def key(s: MachineSlots) -> float:
            load = s.load / (s.cores or 1) if s.load is not None else 0.0
            return (load + len(s.running) / s.machine.max_builds) / s.machine.speed

        return sorted(self.machines.values(), key=key)

    def probe_loads(self, interval: float) -> None:
        """Read again, in the background, the load of every connected machine whose reading
        is older than `interval` seconds."""
        now = time.monotonic()
        for slots in self.machines.values():
            if (slots.ready and not slots.retiring and slots.probing is None
                    and now - slots.load_probed >= interval):
                slots.probing = asyncio.create_task(slots.probe_in_background())

    def why_stuck(self, group: Stuck) -> str:
        """Why no machine takes a group of queued builds, for run --exit-when-idle."""
        machines = [m for m in self.machines.values() if not m.retiring]
        for_system = [m for m in machines if group.system in m.machine.systems]
        if not for_system:
            return "no machine builds for that system"
        with_features = [m for m in for_system if group.features <= set(m.machine.features)]
        if not with_features:
            return "no machine for that system offers those features"
        able = [m for m in with_features if m.machine.store_directory == group.store_dir]
        if not able:
            return "no machine for that system has that store"
        able = [m for m in able if group.tags <= m.machine.tag_words]
        if not able:
            return "no machine for that system carries the machine tags " + " ".join(
                sorted(group.tags))
        unreachable = [m for m in able if not m.ready]
        if unreachable:
            return "; ".join(f"machine {m.machine.name} is unreachable: {m.last_error}"
                             for m in unreachable)
        return "no machine took them"

    def reports_to_record(self, now: float) -> list[MachineReport] | None:
        """The machines' reports when they changed since last recorded (or REPORT_EVERY
        passed), else None."""
        reports = [slots.report(now) for slots in self.machines.values()]
        last, when = self._reported
        if reports == last and now - when < REPORT_EVERY:
            return None
        self._reported = (reports, now)
        return reports

    def request_reload(self) -> None:
        """SIGHUP: read the file again at the next turn, changed or not."""
        self._requested = True

    async def maybe_reload(self) -> None:
        """Reload if asked to or if the file changed. A file that does not load is reported and
        changes nothing."""
        stamp = _stamp(self.inventory.path)
        if not self._requested and stamp == self._stamp:
            return
        self._requested = False
        self._stamp = stamp
        try:
            fresh = await asyncio.to_thread(load_inventory, self.inventory.path)
        except BuildfarmError as e:
            self.report(f"inventory not reloaded, keeping the old one: {e}")
            return
        self.apply(fresh)

    def apply(self, fresh: Inventory) -> None:
        """New machines start taking builds; removed ones finish what runs and take no more;
        changed ones take their new settings (a new connection if how to reach them changed)."""
        wanted = {m.name: m for m in fresh.machines if m.enabled}
        for name, slots in list(self.machines.items()):
            machine = wanted.get(name)
            if machine is None:
                if not slots.retiring:
                    slots.retiring = True
                    self.report(f"machine {name} removed: finishing its running builds")
                continue
            if machine == slots.machine and not slots.retiring:
                continue
            if _reach(machine) != _reach(slots.machine):
                self._retire_connection(slots)
                fresh_slots = machine_slots(machine)
                slots.remote, slots.sessions = fresh_slots.remote, fresh_slots.sessions
                slots.ready = False
            slots.machine, slots.retiring = machine, False
            self.report(f"machine {name} updated")
        for name, machine in wanted.items():
            if name not in self.machines:
                self.machines[name] = machine_slots(machine)
                self.report(f"machine {name} added")
        self.inventory = fresh

    def drop_retired(self) -> None:
        """Drop the removed machines whose builds have all ended, and close their connections."""
        for name, slots in list(self.machines.items()):
            if slots.retiring and not slots.running:
                for task in (slots.connecting, slots.probing):
                    if task is not None:
                        task.cancel()
                self._retire_connection(slots)
                del self.machines[name]
                self.report(f"machine {name} retired: its builds have ended")

    def _retire_connection(self, slots: MachineSlots) -> None:
        """Close a connection once the attempts using it have ended."""
        old, sessions = slots.remote, slots.sessions
        tasks = [r.task for r in slots.running.values() if r.task is not None]

        async def close_when_done() -> None:
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_connection(old, sessions)

        task = asyncio.create_task(close_when_done())
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def _stamp(path: str) -> tuple[float, int] | None:
    """When the inventory file last changed (None if it is gone)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime, status.st_size


def _reach(machine: Machine) -> tuple[object, ...]:
    """The settings that decide how a machine is reached: a change needs a new connection."""
    return (
        machine.host, machine.port, machine.user, machine.identity, machine.known_hosts,
        machine.host_key, machine.transport, machine.max_sessions, machine.connect_timeout,
        machine.keepalive_interval,
    )
