"""Prometheus metrics of `buildfarm run --metrics ADDRESS:PORT`, made with the official client
library (prometheus_client).

Counters and the duration histogram are updated where things happen (the coordinator calls
attempt_ended when an attempt ends; pushed as an attempt sends a bundle to a machine); gauges
are read from the coordinator at each scrape. The HTTP server runs in the coordinator's event
loop (aiohttp), so a scrape reads the coordinator between two of its steps, never in the middle
of one; build counts come from the datastore, through the coordinator's datastore thread, at
most once every COUNT_EVERY seconds.

METRICS is the one declared list: the collectors take their help texts from it, and
buildfarm-run(1) is generated from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from buildfarm.errors import UsageError

if TYPE_CHECKING:
    from aiohttp import web

    from buildfarm.coordinator.fleet import MachineSlots
    from buildfarm.coordinator.hooks import HookRunner
    from buildfarm.coordinator.tally import Tally

T = TypeVar("T")


class Observed(Protocol):
    """What a scrape reads of the running coordinator (coordinator.service.Coordinator hands
    itself to `Metrics.start`): its queue, machines, builds and attempts that ended, hook
    counts, and its datastore thread."""

    @property
    def queue_depth(self) -> Mapping[str, int]: ...

    @property
    def machines(self) -> Mapping[str, MachineSlots]: ...

    @property
    def hooks(self) -> HookRunner: ...

    @property
    def tally(self) -> Tally: ...

    async def db(self, fn: Callable[..., T], *args: Any) -> T: ...

logger = logging.getLogger("buildfarm")
COUNT_EVERY = 2.0  # seconds between two counts of the builds by state
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
BUILD_STATES = ("queued", "running", "succeeded", "failed", "canceled")
ENDED_STATES = BUILD_STATES[2:]
PATH = "/metrics"
# No *_created series: they only say when each counter started, which nobody asks.
disable_created_metrics()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric as scraped: its name (counters end in _total), type, labels and meaning."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    labels: tuple[str, ...]
    help: str


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("buildfarm_builds", "gauge", ("state",),
               "Builds in the datastore, by state (queued, running, succeeded, failed, "
               "canceled)."),
    MetricSpec("buildfarm_queue_depth", "gauge", ("system",), "Queued builds, by system."),
    MetricSpec("buildfarm_builds_ended_total", "counter", ("state",),
               "Builds that ended since the coordinator started, by the state they ended in "
               "(succeeded, failed, canceled): each build once, however many attempts it "
               "took."),
    MetricSpec("buildfarm_attempts_total", "counter", ("machine", "result"),
               "Attempts ended since the coordinator started, by machine and result (success, "
               "failure, setup-failure, interrupted): a build may take several."),
    MetricSpec("buildfarm_setup_failures_total", "counter", ("machine", "kind"),
               "Setup failures, by machine and kind (missing-inputs, outputs-present)."),
    MetricSpec("buildfarm_attempt_duration_seconds", "histogram", ("result",),
               "Time from allocation to the end of each attempt, by result."),
    MetricSpec("buildfarm_fetched_bytes_total", "counter", ("machine",),
               "Bytes of build outputs fetched from each machine."),
    MetricSpec("buildfarm_pushed_bytes_total", "counter", ("machine", "kind"),
               "Bytes pushed to each machine, by kind: derivations (the .drv closure), sources "
               "(input sources from the coordinator's store), inputs (input outputs from the "
               "output store)."),
    MetricSpec("buildfarm_machine_up", "gauge", ("machine",),
               "1 while the coordinator holds a working connection to the machine, else 0."),
    MetricSpec("buildfarm_machine_slots", "gauge", ("machine",),
               "Builds the machine may run at once (max_builds)."),
    MetricSpec("buildfarm_machine_slots_used", "gauge", ("machine",),
               "Builds running on the machine."),
    MetricSpec("buildfarm_machine_backoff_seconds", "gauge", ("machine",),
               "Seconds until the coordinator tries a failing machine again (0: not backed "
               "off)."),
    MetricSpec("buildfarm_machine_failures", "gauge", ("machine",),
               "Connection failures in a row."),
    MetricSpec("buildfarm_machine_load", "gauge", ("machine",),
               "The machine's 1-minute load average (absent until measured)."),
    MetricSpec("buildfarm_build_retries_total", "counter", (),
               "Builder failures tried again (submit --retries, the inventory's "
               "build_retries)."),
    MetricSpec("buildfarm_flaky_builds_total", "counter", (),
               "Builds that succeeded after their builder had failed: flaky."),
    MetricSpec("buildfarm_hook_runs_total", "counter", (), "Hook scripts run."),
    MetricSpec("buildfarm_hook_failures_total", "counter", (),
               "Hook scripts that failed: non-zero exit, killed, timed out or not started."),
)
SPECS = {spec.name: spec for spec in METRICS}


def parse_address(text: str) -> tuple[str, int]:
    """ADDRESS:PORT, [IPV6]:PORT or :PORT (every address); port 0 picks a free port."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--metrics {text!r}: expected ADDRESS:PORT, e.g. 127.0.0.1:9100")
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0", int(port)


def builds_by_state() -> dict[str, int]:
    """Build counts by state (in the datastore thread)."""
    from peewee import fn

    from buildfarm.datastore.models import Build

    query: Any = Build.select(Build.state, fn.COUNT(Build.id)).group_by(Build.state)
    return {state: count for state, count in query.tuples()}


class _Live(Collector):
    """The gauges, read from the coordinator at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        coordinator = self.metrics.coordinator
        if coordinator is None:
            return

        def gauge(name: str) -> GaugeMetricFamily:
            spec = SPECS[name]
            return GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))

        builds = gauge("buildfarm_builds")
        for state in BUILD_STATES:
            builds.add_metric([state], self.metrics.build_counts.get(state, 0))
        yield builds
        queue = gauge("buildfarm_queue_depth")
        for system, count in sorted(coordinator.queue_depth.items()):
            queue.add_metric([system], count)
        yield queue
        families = {name: gauge(name) for name in (
            "buildfarm_machine_up", "buildfarm_machine_slots", "buildfarm_machine_slots_used",
            "buildfarm_machine_backoff_seconds", "buildfarm_machine_failures",
            "buildfarm_machine_load",
        )}
        now = time.time()
        for name, slots in sorted(coordinator.machines.items()):
            until = slots.remote.backed_off_until
            values = {
                "buildfarm_machine_up": 1.0 if slots.ready else 0.0,
                "buildfarm_machine_slots": slots.machine.max_builds,
                "buildfarm_machine_slots_used": len(slots.running),
                "buildfarm_machine_backoff_seconds": max(0.0, until - now) if until else 0.0,
                "buildfarm_machine_failures": slots.remote.failures,
                "buildfarm_machine_load": slots.load,
            }
            for metric, value in values.items():
                if value is not None:
                    families[metric].add_metric([name], float(value))
        yield from families.values()
        spec = SPECS["buildfarm_builds_ended_total"]
        ended = CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))
        for state in ENDED_STATES:
            ended.add_metric([state], coordinator.tally.builds[state])
        yield ended
        for name, value in (("buildfarm_hook_runs_total", coordinator.hooks.runs),
                            ("buildfarm_hook_failures_total", coordinator.hooks.failures)):
            yield CounterMetricFamily(name, SPECS[name].help, value=value)


class Metrics:
    """The coordinator's metrics and the HTTP server that serves them at PATH."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.registry = CollectorRegistry()
        self.coordinator: Observed | None = None
        self.build_counts: dict[str, int] = {}
        self._counted = float("-inf")
        self._runner: web.AppRunner | None = None

        def spec(name: str) -> dict[str, Any]:
            found = SPECS[name]
            return {"name": found.name, "documentation": found.help,
                    "labelnames": found.labels, "registry": self.registry}

        self.attempts = Counter(**spec("buildfarm_attempts_total"))
        self.setup_failures = Counter(**spec("buildfarm_setup_failures_total"))
        self.duration = Histogram(**spec("buildfarm_attempt_duration_seconds"),
                                  buckets=DURATION_BUCKETS)
        self.fetched = Counter(**spec("buildfarm_fetched_bytes_total"))
        self.pushed_bytes = Counter(**spec("buildfarm_pushed_bytes_total"))
        self.retries = Counter(**spec("buildfarm_build_retries_total"))
        self.flaky = Counter(**spec("buildfarm_flaky_builds_total"))
        self.registry.register(_Live(self))

    def attempt_ended(self, machine: str, result: str, setup_kind: str | None, seconds: float,
                      fetched_bytes: int) -> None:
        """Count one attempt that ended (result: success, failure, setup-failure,
        interrupted)."""
        self.attempts.labels(machine, result).inc()
        if setup_kind is not None:
            self.setup_failures.labels(machine, setup_kind).inc()
        self.duration.labels(result).observe(max(0.0, seconds))
        if fetched_bytes > 0:
            self.fetched.labels(machine).inc(fetched_bytes)

    def pushed(self, machine: str, kind: str, size: int) -> None:
        """Count bytes pushed to a machine, as they are sent (kind: attempt.PUSH_KINDS)."""
        self.pushed_bytes.labels(machine, kind).inc(size)

    def exposition(self) -> bytes:
        """The text a scrape gets."""
        return generate_latest(self.registry)

    async def refresh(self) -> None:
        """Count the builds by state again, unless that was done in the last COUNT_EVERY s."""
        coordinator = self.coordinator
        if coordinator is None or time.monotonic() - self._counted < COUNT_EVERY:
            return
        self._counted = time.monotonic()
        try:
            self.build_counts = await coordinator.db(builds_by_state)
        except Exception as e:  # a busy or broken datastore: serve the last counts
            logger.warning("metrics: cannot count builds: %s", e)

    # -- the HTTP server, in the coordinator's event loop

    async def start(self, coordinator: Observed) -> str:
        """Listen; return the URL of the metrics."""
        from aiohttp import web

        self.coordinator = coordinator
        app = web.Application()
        app.router.add_get(PATH, self._scrape)
        app.router.add_get("/", self._index)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as e:
            await runner.cleanup()
            raise UsageError(
                f"--metrics: cannot listen on {self.host}:{self.port}: {e.strerror or e}"
            ) from None
        self._runner = runner
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        return f"http://{shown}:{bound[1]}{PATH}"

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _scrape(self, request: web.Request) -> web.Response:
        from aiohttp import web

        await self.refresh()
        return web.Response(body=self.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _index(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(text=f"buildfarm run: Prometheus metrics at {PATH}\n")
