"""The allocation decision at 1,000 to 1,000,000 queued builds, and what a completion costs.

A datastore of N queued builds of a distribution-shaped graph (graphs.py) is written through the
datastore's public API (record_submission), submitted in a shuffled order so that ready builds
are scattered through the priority order, as after many evaluations. Then a simulated farm
works on it: 16 machines' worth of slots, each decision `scheduler.allocate` for a free slot
(timed), each completion `attempts.succeed` (timed, it recounts the dependants' waiting_on).
Past a warm-up (the bootstrap chains), D decisions are timed.

The peer is the scheduling rule (ARCHITECTURE.md step 2) asked directly, as the scheduler did before
migration 3: the first queued build, in priority order, with no queued or running input build (a NOT
EXISTS test per queued build, in order): timed on the same datastore, same moment.

Datastores are named by URL, so either engine works; suite.py copies the SQLite datastore into
PostgreSQL rather than writing it there through record_submission (quadratic on PostgreSQL).
"""

from __future__ import annotations

import random
import time
from typing import Any

from figures import percentile
from graphs import distribution

from buildfarm.coordinator import scheduler
from buildfarm.datastore import attempts as records
from buildfarm.datastore import open_datastore
from buildfarm.datastore.builds import record_submission
from buildfarm.datastore.models import database_proxy
from buildfarm.submission import SubmitOptions

SLOT = scheduler.Slot("bench", ("x86_64-linux", "i686-linux"), frozenset({"big-parallel"}),
                      "/nix/store")  # as a machine of the graph's store asks
RUNNING = 16  # builds in flight in the simulated farm
CHUNK = 10_000  # derivations per submission


def make_datastore(url: str, count: int, *, seed: int = 1) -> float:
    """The datastore at `url` (empty, or not there yet) given `count` queued builds; returns
    the seconds it took."""
    began = time.perf_counter()
    items = list(distribution(count, store="/nix/store", seed=seed))
    random.Random(seed).shuffle(items)
    rng = random.Random(seed + 1)
    with open_datastore(url):
        now = time.time() - count / 1000  # submissions a little apart, oldest first
        for start in range(0, count, CHUNK):
            chunk = items[start : start + CHUNK]
            # Most builds at the default priority, some raised (as an operator does).
            priorities = [_priority(rng.random()) for _ in chunk]
            for priority in (0, 1, 2):
                part = [c for c, p in zip(chunk, priorities, strict=True) if p == priority]
                record_submission(part, [], SubmitOptions(priority=priority), now)
            now += CHUNK / 1000
    return time.perf_counter() - began


def _priority(draw: float) -> int:
    return 0 if draw < 0.9 else 1 if draw < 0.97 else 2


_REFERENCE = """
SELECT b.id FROM build AS b
WHERE b.state = 'queued' AND b.system IN ('x86_64-linux', 'i686-linux')
  AND b.required_features IN ('', 'big-parallel')
  AND (b.defer_until IS NULL OR b.defer_until <= ?)
  AND (b.retry_after IS NULL OR b.retry_after <= ?)
  AND NOT EXISTS (SELECT 1 FROM derivation_input AS i
      JOIN derivation AS d ON d.path = i.input_path
      JOIN build AS ib ON ib.derivation_id = d.id
      WHERE i.derivation_id = b.derivation_id AND ib.state IN ('queued', 'running'))
ORDER BY b.priority DESC, b.created_at, b.id LIMIT 1
"""


def reference_decision(now: float) -> tuple[float, int | None]:
    """Seconds the direct query takes to find the first allowed build, and its id."""
    db = database_proxy.obj
    began = time.perf_counter()
    row = db.execute_sql(_REFERENCE.replace("?", db.param), (now, now)).fetchone()
    return time.perf_counter() - began, (row[0] if row else None)


def simulate(url: str, decisions: int, *, warmup: int = 150,
             reference_samples: int = 3) -> dict[str, Any]:
    """Work the datastore at `url` as a farm; time decisions and completions."""
    rng = random.Random(3)
    allocations: list[float] = []
    misses: list[float] = []
    completions: list[float] = []
    running: list[int] = []
    with open_datastore(url):
        queued = database_proxy.obj.execute_sql(
            "SELECT COUNT(*) FROM build WHERE state = 'queued'").fetchone()[0]
        done = 0
        while len(allocations) < decisions:
            timing = done >= warmup
            if len(running) < RUNNING:
                began = time.perf_counter()
                attempt = scheduler.allocate(SLOT)
                took = time.perf_counter() - began
                if attempt is not None:
                    running.append(attempt.id)
                    if timing:
                        allocations.append(took)
                    continue
                if timing:
                    misses.append(took)
                if not running:
                    break  # nothing ready and nothing running: the graph is done
            attempt_id = running.pop(rng.randrange(len(running)))
            began = time.perf_counter()
            records.succeed(attempt_id, [], None)
            if timing:
                completions.append(time.perf_counter() - began)
            done += 1
        agreed = _same_first_choice()
        reference = [reference_decision(time.time())[0] for _ in range(reference_samples)]
    if not allocations:
        raise RuntimeError(f"no allocation at {queued} queued builds")
    return {
        "queued": queued,
        "p50": percentile(allocations, 0.5),
        "p99": percentile(allocations, 0.99),
        "max": max(allocations),
        "decisions": len(allocations),
        "empty_p50": percentile(misses, 0.5) if misses else None,
        "completion_p50": percentile(completions, 0.5) if completions else None,
        "completion_p99": percentile(completions, 0.99) if completions else None,
        "completion_max": max(completions) if completions else None,
        "reference": percentile(reference, 0.5),
        "agreed": agreed,
    }


def _same_first_choice() -> bool:
    """The scheduler's first choice is the direct query's (a sanity check of the run)."""
    now = time.time()
    first = next(iter(scheduler.candidate_ids(SLOT, now)), None)
    return first == reference_decision(now)[1]
