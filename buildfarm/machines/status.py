"""`buildfarm machines`: each inventory machine as the running coordinator sees it (from the
datastore) beside a fresh probe of all of them at once (`machines test` is checks.py).

Probes run concurrently, one task per machine, each on a fresh connection (no backoff carried
over), so one unreachable machine costs its connect timeout and no more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from buildfarm.backends import get_backend
from buildfarm.errors import RemoteError
from buildfarm.inventory import Machine
from buildfarm.ssh.remote import Remote, RunResult

# Where a store may be, in the order looked for ($NIX_STORE_DIR, which both honour, first).
STORE_DIRS = {"guix": ("/gnu/store", "/nix/store"), "nix": ("/nix/store", "/gnu/store")}
STORE_PROGRAMS = {"guix": "Guix", "nix": "Nix"}
CLOSE_TIMEOUT = 2.0

# One round trip for the numbers; `date` last, so the clock is read after the rest.
_PROBE_SCRIPT = (
    'echo "cores $(nproc 2>/dev/null)"; '
    '[ -r /proc/loadavg ] && read load _ < /proc/loadavg && echo "load $load"; '
    'for dir in ${NIX_STORE_DIR:+"$NIX_STORE_DIR"} "$@"; do if [ -d "$dir" ]; then '
    'echo "store $dir"; df -Pk "$dir" 2>/dev/null | tail -n 1 | '
    '{ read _ _ _ free _ && echo "free $free"; }; break; fi; done; '
    'echo "clock $(date +%s.%N)"'
)


def reason(error: BaseException, machine: Machine) -> str:
    """A RemoteError's message without the machine-name prefix (the row names the machine)."""
    text = str(error) or type(error).__name__
    return text.removeprefix(f"{machine.name}: ")


def command_problem(result: RunResult) -> str:
    """What went wrong, in one line: the command, its status, and its last error message (with
    the lines continuing it: Guix prints keys over several lines)."""
    words = [w for w in result.argv if w != "env" and "=" not in w]  # past `env VAR=VALUE`
    program = words[0] if words else result.argv[0]
    if result.exit_status == 127:
        return f"{program}: command not found"
    lines = [line.strip() for line in result.stderr.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    message = lines[-1] if lines else ""
    for index in range(len(lines) - 1, -1, -1):
        if "error:" in lines[index]:
            message = " ".join(lines[index:])
            break
    status = "killed by a signal" if result.exit_status is None else (
        f"exit status {result.exit_status}")
    text = f"{' '.join(words[:2])}: {status}" + (f": {message}" if message else "")
    return text if len(text) <= 500 else text[:499] + "…"


async def close_quietly(remote: Remote) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(remote.close(), CLOSE_TIMEOUT)


# --- the probe ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """What one fresh connection found. ``error`` says why the machine is unreachable, or what
    the probe found wrong on a reachable one (e.g. no store tool)."""

    name: str
    reachable: bool
    error: str | None = None
    seconds: float = 0.0
    store_version: str | None = None
    store_dir: str | None = None
    cores: int | None = None
    load: float | None = None
    free_disk: int | None = None  # bytes available in the store's file system
    clock_skew: float | None = None  # seconds, the machine's clock minus the coordinator's


def _parse_probe(stdout: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in stdout.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if value.strip():
            found[key] = value.strip()
    return found


def _number(text: str | None, kind: Callable[[str], Any]) -> Any:
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        return None


def _clock(text: str | None) -> float | None:
    if text is None:
        return None
    value = _number(text, float)
    if value is None:  # a date(1) without %N prints "1700000000.N"
        value = _number(text.split(".")[0], float)
    return value if isinstance(value, float) else None


async def probe(machine: Machine) -> Probe:
    """Connect, then ask the store version and the machine's numbers in parallel."""
    started = time.monotonic()
    remote = Remote(machine)
    backend = get_backend(machine.store)
    limit = machine.connect_timeout

    def done(**fields: Any) -> Probe:
        return Probe(machine.name, seconds=round(time.monotonic() - started, 3), **fields)

    try:
        await remote.connect()
    except RemoteError as e:
        return done(reachable=False, error=reason(e, machine))
    except Exception as e:  # a bug must not hide the other machines: say what it was
        return done(reachable=False, error=f"internal error: {e!r}")
    try:
        version_command = backend.version()
        script = ["sh", "-c", _PROBE_SCRIPT, "sh", *STORE_DIRS[machine.store]]

        async def numbers() -> tuple[RunResult, float, float]:
            before = time.time()
            result = await remote.run(script, timeout=limit)
            return result, before, time.time()

        version, (result, before, after) = await asyncio.gather(
            remote.run(version_command.argv, timeout=limit), numbers()
        )
        values = _parse_probe(result.stdout)
        clock = _clock(values.get("clock"))
        free = _number(values.get("free"), int)
        store_version, problem = None, None
        if version.ok:
            try:
                store_version = backend.parse_version(version.stdout)
            except RemoteError as e:
                problem = str(e)
        else:
            problem = command_problem(version)
        return done(
            reachable=True, error=problem, store_version=store_version,
            store_dir=values.get("store"), cores=_number(values.get("cores"), int),
            load=_number(values.get("load"), float),
            free_disk=free * 1024 if free is not None else None,
            clock_skew=round(clock - (before + after) / 2, 3) if clock is not None else None,
        )
    except RemoteError as e:
        return done(reachable=True, error=reason(e, machine))
    finally:
        await close_quietly(remote)


async def probe_all(machines: Sequence[Machine]) -> list[Probe]:
    """Every machine at once, in the order given."""
    return list(await asyncio.gather(*(_bounded(m, probe(m)) for m in machines)))


async def _bounded(machine: Machine, work: Awaitable[Probe]) -> Probe:
    """A safety net over the timeouts each step has: a probe never outlives this."""
    limit = 3 * machine.connect_timeout + 5
    try:
        return await asyncio.wait_for(work, limit)
    except TimeoutError:
        return Probe(machine.name, False, f"no answer within {limit:g}s", limit)


# --- what the coordinator sees (the datastore) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """A machine as the coordinator recorded it: its open attempts and its backoff."""

    running: tuple[str, ...] = ()  # UUIDs of the builds it runs
    failures: int = 0
    backoff_until: float | None = None
    last_error: str | None = None
    updated_at: float | None = None


def coordinator_view(names: Sequence[str]) -> dict[str, Seen]:
    """Read from the open datastore (machine_state and attempts without a result)."""
    from buildfarm.datastore.models import Attempt, Build, MachineState

    running: dict[str, list[str]] = {}
    query: Any = (
        Attempt.select(Attempt.machine, Build.uuid).join(Build)
        .where(Attempt.result.is_null() & Attempt.machine.in_(list(names)))
        .order_by(Attempt.id)
    )
    for machine, uuid in query.tuples():
        running.setdefault(machine, []).append(uuid)
    seen = {name: Seen(tuple(uuids)) for name, uuids in running.items()}
    for state in MachineState.select().where(MachineState.name.in_(list(names))):
        seen[state.name] = Seen(
            tuple(running.get(state.name, ())), state.failures, state.backoff_until,
            state.last_error, state.updated_at,
        )
    return seen


def _iso(moment: float | None) -> str | None:
    from buildfarm.datastore.builds import iso

    return iso(moment)


def status(machine: Machine, found: Probe | None, seen: Seen | None, now: float) -> dict[str, Any]:
    """One machine's object of `machines --json` (json_schemas.SCHEMAS["machines"])."""
    seen = seen or Seen()
    backoff = seen.backoff_until if seen.backoff_until and seen.backoff_until > now else None
    probed = found or Probe(machine.name, False, "disabled in the inventory: not probed")
    return {
        "name": machine.name,
        "host": machine.host if machine.transport == "ssh" else None,
        "port": machine.port if machine.transport == "ssh" else None,
        "transport": machine.transport,
        "store": machine.store,
        "enabled": machine.enabled,
        "systems": list(machine.systems),
        "features": list(machine.features),
        "tags": dict(machine.tags),
        "reachable": probed.reachable if found is not None else None,
        "error": probed.error,
        "probe_seconds": probed.seconds if found is not None else None,
        "store_version": probed.store_version,
        "store_dir": probed.store_dir,
        "cores": probed.cores,
        "load": probed.load,
        "free_disk": probed.free_disk,
        "clock_skew": probed.clock_skew,
        "slots": machine.max_builds,
        "running": len(seen.running),
        "running_builds": list(seen.running),
        "failures": seen.failures,
        "backoff_until": _iso(backoff),
        "last_error": seen.last_error,
        "updated_at": _iso(seen.updated_at),
    }


# --- for people -----------------------------------------------------------------------------

COLUMNS = ("name", "state", "store", "systems", "tags", "cores", "load", "free", "skew",
           "builds", "backoff", "note")
STATES = {
    "up": "The probe logged in and the store tool answered.",
    "broken": "The probe logged in, but found something wrong (NOTE says what), e.g. no store "
    "tool.",
    "down": "No login: NOTE says why (refused, no answer within connect_timeout, "
    "authentication, host key).",
    "disabled": "enabled: false in the inventory; not probed.",
}
STATE_STYLES = {"up": "green", "down": "red", "broken": "yellow", "disabled": "dim"}


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A `machines --json` object as the columns of the table people read."""
    from buildfarm.outputs.gc import format_size

    if row["reachable"] is None:
        state = "disabled"
    elif not row["reachable"]:
        state = "down"
    else:
        state = "broken" if row["error"] else "up"
    backoff = None
    if row["backoff_until"]:
        clock = row["backoff_until"].split("T", 1)[-1].removesuffix("+00:00")
        backoff = f"until {clock} UTC ({row['failures']} failures)"
    version = row["store_version"]
    skew = row["clock_skew"]
    return {
        "name": row["name"],
        "state": state,
        "store": f"{row['store']} {version}" if version else row["store"],
        "systems": ",".join(row["systems"]),
        "tags": ",".join(f"{k}={v}" for k, v in row["tags"].items()) or None,
        "cores": row["cores"],
        "load": f"{row['load']:.2f}" if row["load"] is not None else None,
        "free": format_size(row["free_disk"]) if row["free_disk"] is not None else None,
        "skew": f"{skew:+.3f}s" if skew is not None else None,
        "builds": f"{row['running']}/{row['slots']}",
        "backoff": backoff,
        "note": row["error"] or (row["last_error"] if backoff else None),
    }
