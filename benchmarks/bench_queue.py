"""Why queued builds wait, at up to 1,000,000 queued builds: `buildfarm queue`'s summary (the
queue by reason and system) and one build's reason (what `builds show` adds).

The datastore is the scheduler group's (graphs.py, written through record_submission); the
machines `run` would have recorded are written inside a transaction that is rolled back, so the
datastore stays as the other groups find it: x86_64 machines busy, the i686 one down, none for
aarch64, so that the summary has every kind of machine reason to work out.

Peers, on the same datastore in the same run: for the summary, the queue depth per system
(`scheduler.queue_depth`, the count the coordinator makes every few seconds, over the index
build_queue); for one build, reading the build by UUID (`builds.get_build`), where every
`builds show` starts.
"""

from __future__ import annotations

import random
import time
from typing import Any

from figures import median, percentile

from buildfarm.coordinator import scheduler
from buildfarm.datastore import open_datastore, waiting
from buildfarm.datastore.builds import get_build
from buildfarm.datastore.models import Build

MACHINES = [
    waiting.MachineReport(f"x86-{n}", ("x86_64-linux",), frozenset({"big-parallel"}),
                          frozenset(), "/nix/store", 4, 4, "busy") for n in range(8)
] + [waiting.MachineReport("i686-a", ("i686-linux",), frozenset(), frozenset(), "/nix/store",
                           2, 0, "down", time.time() + 600, "connection refused")]


def _timed(call: Any, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return times


def measure(url: str, *, runs: int = 5, reasons: int = 200, seed: int = 3) -> dict[str, Any]:
    """Median seconds of the summary and of queue_depth; p50, p99 and max of one build's
    reason and of get_build over `reasons` random queued builds."""
    with open_datastore(url) as store:
        ids = [i for (i,) in Build.select(Build.id).where(Build.state == "queued").tuples()]
        rng = random.Random(seed)
        picked = [Build.get_by_id(i).uuid for i in rng.sample(ids, min(reasons, len(ids)))]
        with store.atomic() as transaction:
            waiting.record_machines(MACHINES, time.time())
            waiting.summary()  # warm the caches as a second run of the command would
            summary = _timed(waiting.summary, runs)
            depth = _timed(scheduler.queue_depth, runs)
            groups = waiting.summary()
            reason_times, lookup_times, kinds = [], [], set()
            for uuid in picked:
                began = time.perf_counter()
                found = waiting.why_waiting(get_build(uuid))
                reason_times.append(time.perf_counter() - began)
                kinds.add(found.reason if found else None)
                lookup_times.extend(_timed(lambda u=uuid: get_build(u), 1))
            transaction.rollback()
    return {
        "queued": len(ids),
        "summary": median(summary), "depth": median(depth), "groups": len(groups),
        "reasons": sorted(k for k in kinds if k),
        "reason_p50": percentile(reason_times, 0.5), "reason_p99": percentile(reason_times, 0.99),
        "reason_max": max(reason_times), "lookup_p50": percentile(lookup_times, 0.5),
    }
