"""Why queued builds wait, at 1,000,000 queued builds: `buildfarm queue`'s summary (the queue
by reason and system) and one build's reason (what `builds show` adds).

The datastore is written here, in bulk (make_datastore: a few minutes, where the scheduler's,
written through record_submission with whole .drv contents, takes an hour on a loaded
machine): derivations of four systems in graphs.py's shares, each needing up to three recent
ones of its system (so most builds wait for inputs, through the real waiting_on triggers), a
few deferred, backed off, needing big-parallel or a machine tag. The machines `run` would have
recorded are written inside a transaction rolled back afterwards: x86_64 busy, i686 down, none
for aarch64, powerpc64le free, so every machine reason is worked out.

Peers, on the same datastore in the same run: for the summary, the queue depth per system
(`scheduler.queue_depth`, the count the coordinator makes every few seconds, over the index
build_queue); for one build, reading the build by UUID (`builds.get_build`), where every
`builds show` starts.

Alone: `.venv/bin/python benchmarks/bench_queue.py sqlite:///PATH COUNT`.
"""

from __future__ import annotations

import random
import time
from typing import Any

from figures import median, percentile
from graphs import SYSTEMS

from buildfarm.coordinator import scheduler
from buildfarm.datastore import open_datastore, waiting
from buildfarm.datastore.builds import get_build
from buildfarm.datastore.bulk import insert_rows
from buildfarm.datastore.models import Build

MACHINES = [
    waiting.MachineReport(f"x86-{n}", ("x86_64-linux",), frozenset({"big-parallel"}),
                          frozenset(), "/nix/store", 4, 4, "busy") for n in range(8)
] + [waiting.MachineReport("i686-a", ("i686-linux",), frozenset(), frozenset(), "/nix/store",
                           2, 0, "down", time.time() + 600, "connection refused"),
      waiting.MachineReport("ppc-a", ("powerpc64le-linux",), frozenset(), frozenset(),
                            "/nix/store", 2, 0, "free")]


CHUNK = 50_000


def make_datastore(url: str, count: int, *, seed: int = 1) -> float:
    """`count` queued builds, one per derivation, written in bulk; returns the seconds."""
    began = time.perf_counter()
    rng = random.Random(seed)
    now = time.time()
    systems = [name for name, _ in SYSTEMS]
    weights = [share for _, share in SYSTEMS]
    recent: dict[str, list[int]] = {name: [] for name in systems}
    with open_datastore(url) as store:
        for start in range(0, count, CHUNK):
            drvs, inputs, builds = [], [], []
            for index in range(start, min(count, start + CHUNK)):
                system = rng.choices(systems, weights)[0]
                path = f"/nix/store/{index:032d}-pkg{index}.drv"
                pool = recent[system][-500:]
                needed = rng.sample(pool, min(len(pool), rng.choice((0, 1, 1, 2, 3))))
                features = "big-parallel" if rng.random() < 0.03 else ""
                tags = "gpu=a100" if rng.random() < 0.01 else ""
                drvs.append((index + 1, path, system, features, b"", now))
                inputs += [(index + 1, f"/nix/store/{n:032d}-pkg{n}.drv", "out")
                           for n in needed]
                defer = now + 3600 if rng.random() < 0.05 else None
                retry = now + 600 if rng.random() < 0.02 else None
                builds.append((f"{index:08x}-0000-4000-8000-{rng.getrandbits(48):012x}",
                               index + 1, system, features, tags, "queued", 0,
                               now - count + index, defer, retry))
                recent[system].append(index)
            with store.atomic():
                insert_rows("derivation", ("id", "path", "system", "required_features",
                                           "contents", "created_at"), drvs)
                insert_rows("derivation_input", ("derivation_id", "input_path", "outputs"),
                            inputs)
                insert_rows("build", ("uuid", "derivation_id", "system", "required_features",
                                      "machine_tags", "state", "priority", "created_at",
                                      "defer_until", "retry_after"), builds)
    return time.perf_counter() - began


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


if __name__ == "__main__":
    import sys

    target, size = sys.argv[1], int(sys.argv[2])
    print(f"written in {make_datastore(target, size):.0f} s", flush=True)
    print(measure(target), flush=True)
