"""How fast `buildfarm web` answers with 1,000,000 builds in the datastore (target: every page and
API call under 200 ms).

A datastore shaped like a month of a busy farm is made once through the public API
(`record_submission` of synthetic Guix-shaped derivations, benchmarks/graphs.py), then aged with
plain SQL: most builds finished on one of eight machines (one attempt each, with steps for the
recent ones, some setup failures with missing inputs, a log for a few), the newest still queued,
a few running. Then `buildfarm web` is started on it and every page and API call is timed over
HTTP, several times each (the median and the worst are reported).

Run: .venv/bin/python benchmarks/web.py [--builds N] [--datastore PATH] [--repeat N]
The datastore is kept at PATH (default /var/tmp/buildfarm-web-bench/N.db) and reused.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from graphs import SYSTEMS, distribution

from buildfarm.submission import ReadDerivation, SubmitOptions

BATCH = 10_000  # builds per submission (one evaluation)
DAYS = 30
MACHINES = tuple(f"{arch}-{n:02d}" for arch in ("x86", "arm", "ppc") for n in (1, 2, 3))
TARGET_MS = 200.0


def _batches(count: int) -> Iterator[list[ReadDerivation]]:
    batch: list[ReadDerivation] = []
    for item in distribution(count):
        batch.append(item)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def make_datastore(path: Path, count: int, logs_dir: Path) -> None:
    """Submit `count` builds in evaluations of BATCH, then age them (see the module docstring)."""
    from buildfarm.datastore import builds as queries
    from buildfarm.datastore import open_datastore

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        leftover.unlink(missing_ok=True)
    store = open_datastore(f"sqlite://{partial}")
    now = time.time()
    start = now - DAYS * 86400
    batches = max(1, (count + BATCH - 1) // BATCH)
    began = time.perf_counter()
    for number, batch in enumerate(_batches(count)):
        jobset = "staging" if number % 10 == 9 else "master"
        options = SubmitOptions(tags=(("jobset", jobset), ("evaluation", str(number + 1))))
        queries.record_submission(batch, [], options, start + number * DAYS * 86400 / batches)
        print(f"  submitted {(number + 1) * BATCH:,} builds "
              f"({time.perf_counter() - began:.0f} s)", flush=True)
    age(store.db, logs_dir)
    # No ANALYZE: a coordinator never runs it, so the pages must not depend on statistics.
    store.close()
    partial.rename(path)
    for suffix in ("-wal", "-shm"):
        Path(f"{partial}{suffix}").unlink(missing_ok=True)


def age(db: object, logs_dir: Path) -> None:
    """Finish the oldest 97 % of the builds (spread evenly over the month), leave a few running.

    The waiting_on triggers (migration 3) recount the dependants of every build whose state
    changes, which is right one build at a time and far too slow for a million at once: they
    are set aside while the states are rewritten, the counts made once, and the triggers put
    back, all in the one transaction."""
    from buildfarm.datastore import migrations

    execute = db.execute_sql  # type: ignore[attr-defined]
    (low, high, start), = execute("SELECT MIN(id), MAX(id), MIN(created_at) FROM build"
                                  ).fetchall()
    now = time.time()
    with db.atomic():  # type: ignore[attr-defined]
        triggers = [name for (name,) in execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'build' "
            "AND name LIKE 'build_waiting_%'").fetchall()]
        for name in triggers:
            execute(f"DROP TRIGGER {name}")
        _age(db, now, start, logs_dir, low, high)
        execute(f"UPDATE build SET waiting_on = {migrations._WAITING_COUNT} "
                f"WHERE state IN {migrations._ACTIVE}")
        for trigger in migrations._SQLITE_TRIGGERS:
            execute(trigger)


def _age(db: object, now: float, start: float, logs_dir: Path, low: int, high: int) -> None:
    execute = db.execute_sql  # type: ignore[attr-defined]
    total = high - low + 1
    finished_until = low + int(total * 0.97)
    span = (now - 300) - (start + 3600)
    machines = len(MACHINES)
    execute(
        "UPDATE build SET state = CASE WHEN abs(random()) % 100 < 7 THEN 'failed' "
        "ELSE 'succeeded' END, "
        f"ended_at = {start + 3600} + (id - {low}) * {span / total * 1.03}, "
        "started_at = NULL WHERE id < ?", (finished_until,),
    )
    execute("UPDATE build SET started_at = ended_at - 10 - abs(random()) % 900, "
            "reason = CASE state WHEN 'failed' THEN 'builder failed with exit code 1' END "
            "WHERE id < ?", (finished_until,))
    cases = " ".join(f"WHEN {i} THEN '{name}'" for i, name in enumerate(MACHINES))
    execute(
        "INSERT INTO attempt (build_id, machine, started_at, ended_at, result, step, "
        "exit_status, detail) "
        f"SELECT id, CASE id % {machines} {cases} END, started_at, ended_at, "
        "CASE state WHEN 'failed' THEN 'failure' ELSE 'success' END, 'fetch-outputs', "
        "CASE state WHEN 'failed' THEN 1 ELSE 0 END, reason FROM build WHERE id < ? "
        "ORDER BY id",
        (finished_until,),
    )
    execute(
        "INSERT INTO event (name, build_id, payload, created_at, delivered_at) "
        "SELECT CASE b.state WHEN 'failed' THEN 'build-failure' ELSE 'build-success' END, "
        "b.id, '{\"event\": \"build-' || CASE b.state WHEN 'failed' THEN 'failure' "
        "ELSE 'success' END || '\", \"build\": {\"uuid\": \"' || b.uuid || '\"}, "
        "\"machine\": \"' || a.machine || '\", \"attempt\": ' || a.id || '}', "
        "b.ended_at, b.ended_at FROM build b JOIN attempt a ON a.build_id = b.id "
        "ORDER BY b.ended_at",
    )
    # A farm records each event as it happens, so event ids grow with time (the overview's
    # builds per hour relies on it): number them again in time order.
    execute("CREATE TEMPORARY TABLE event_by_time AS SELECT name, build_id, payload, "
            "created_at, delivered_at FROM event ORDER BY created_at, id")
    execute("DELETE FROM event")
    execute("INSERT INTO event (name, build_id, payload, created_at, delivered_at) "
            "SELECT * FROM event_by_time ORDER BY rowid")
    execute("DROP TABLE event_by_time")
    steps = ("push-derivations", "push-inputs", "dry-run", "delete-outputs", "build",
             "export-outputs", "fetch-outputs", "verify-outputs")
    recent = execute("SELECT id, started_at, ended_at FROM attempt ORDER BY id DESC "
                     "LIMIT 20000").fetchall()
    rows = []
    for attempt_id, began, ended in recent:
        share = (ended - began) / len(steps)
        rows.extend((attempt_id, name, began + i * share, began + (i + 1) * share)
                    for i, name in enumerate(steps))
    db.cursor().executemany(  # type: ignore[attr-defined]
        "INSERT INTO attempt_step (attempt_id, name, started_at, ended_at) "
        "VALUES (?, ?, ?, ?)", rows)
    # Setup failures with missing inputs, one in fifty attempts of the recent ones.
    rng = random.Random(7)
    for attempt_id, _began, _ended in recent[::50]:
        execute("UPDATE attempt SET result = 'setup-failure', step = 'dry-run', "
                "detail = 'inputs missing' WHERE id = ?", (attempt_id,))
        cursor = execute("INSERT INTO setup_failure (attempt_id, kind) "
                         "VALUES (?, 'missing-inputs')", (attempt_id,))
        for n in range(rng.randint(1, 4)):
            execute("INSERT INTO missing_input (setup_failure_id, path) VALUES (?, ?)",
                    (cursor.lastrowid, f"/gnu/store/{'x' * 32}-missing-{n}"))
    # A few running builds: an open attempt each, in its build step, with a log.
    running = execute("SELECT id, uuid FROM build WHERE id >= ? ORDER BY id LIMIT 6",
                      (finished_until,)).fetchall()
    for n, (build_id, uuid) in enumerate(running):
        began = now - 60 * (n + 1)
        execute("UPDATE build SET state = 'running', started_at = ? WHERE id = ?",
                (began, build_id))
        cursor = execute(
            "INSERT INTO attempt (build_id, machine, started_at, step) VALUES (?, ?, ?, ?)",
            (build_id, MACHINES[n % machines], began, "build"))
        attempt_id = cursor.lastrowid
        log = logs_dir / uuid[:2] / f"{uuid}-{attempt_id}.log.gz"
        log.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(log, "wt") as handle:
            for line in range(5000):
                handle.write(f"building line {line}: gcc -O2 -c file{line}.c\n")
        execute("UPDATE attempt SET log_path = ? WHERE id = ?", (str(log), attempt_id))
        for i, name in enumerate(steps[:5]):
            execute("INSERT INTO attempt_step (attempt_id, name, started_at, ended_at) "
                    "VALUES (?, ?, ?, ?)",
                    (attempt_id, name, began + i, None if name == "build" else began + i + 1))
    execute("INSERT INTO machine_state (name, failures, updated_at) "
            + " UNION ALL ".join(f"SELECT '{m}', 0, {now}" for m in MACHINES))


def write_inventory(path: Path) -> None:
    systems = {"x86": ["x86_64-linux", "i686-linux"], "arm": ["aarch64-linux"],
               "ppc": ["powerpc64le-linux"]}
    lines = ["machines:"]
    for name in MACHINES:
        lines += [f"  - name: {name}", f"    host: {name}.example.org", "    systems:"]
        lines += [f"      - {s}" for s in systems[name.split("-")[0]]]
        lines += ["    max_builds: 4", "    store: guix"]
    path.write_text("\n".join(lines) + "\n")


def _get(url: str) -> tuple[float, bytes, dict[str, str]]:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
        headers = dict(response.headers)
    return (time.perf_counter() - began) * 1000, body, headers


def _pages(base: str, db_path: Path) -> list[tuple[str, str]]:
    """(label, path) of every page and API call, on builds chosen from the datastore."""
    import sqlite3

    with sqlite3.connect(db_path) as db:
        old = db.execute("SELECT uuid FROM build ORDER BY id LIMIT 1 OFFSET 100").fetchone()[0]
        base_pkg = db.execute(
            "SELECT b.uuid FROM build b JOIN derivation d ON d.id = b.derivation_id "
            "WHERE d.path LIKE '%pkg40-%' ORDER BY b.id LIMIT 1").fetchone()[0]
        running = db.execute("SELECT uuid FROM build WHERE state = 'running' LIMIT 1").fetchone()
        setup = db.execute(
            "SELECT b.uuid FROM build b JOIN attempt a ON a.build_id = b.id "
            "WHERE a.result = 'setup-failure' LIMIT 1").fetchone()[0]
        middle = db.execute("SELECT uuid FROM build ORDER BY id LIMIT 1 OFFSET 500000"
                            ).fetchone()
    cursor = middle[0] if middle else old
    quote = urllib.parse.quote
    pages = [
        ("overview", "/"),
        ("builds, newest", "/builds"),
        ("builds, failed", "/builds?state=failed"),
        ("builds, queued", "/builds?state=queued"),
        ("builds, tag jobset=staging", "/builds?tag=jobset%3Dstaging"),
        ("builds, tag of an old evaluation", "/builds?tag=evaluation%3D3"),
        ("builds, system (rare)", "/builds?system=powerpc64le-linux"),
        ("builds, system absent", "/builds?system=mips64el-linux"),
        ("builds, name", "/builds?name=pkg4242-"),
        ("builds, name absent", "/builds?name=no-such-package"),
        ("builds, failed + system + tag",
         "/builds?state=failed&system=i686-linux&tag=jobset%3Dmaster"),
        ("builds, page in the middle", f"/builds?after={quote(cursor)}"),
        ("builds, newer than the middle", f"/builds?before={quote(cursor)}"),
        ("build, old", f"/builds/{old}"),
        ("build, input of many", f"/builds/{base_pkg}"),
        ("build, setup failure", f"/builds/{setup}"),
        ("machine", f"/machines/{MACHINES[0]}"),
        ("machines", "/machines"),
    ]
    if running:
        pages += [("build, running", f"/builds/{running[0]}"),
                  ("build log", f"/builds/{running[0]}/log")]
    api = [(f"API: {label}", "/api" + (path if path != "/" else "/overview"))
           for label, path in pages if not path.endswith("/log")]
    return [(label, base.rstrip("/") + path) for label, path in pages + api]


def measure(db_path: Path, inventory: Path, repeat: int) -> list[tuple[str, float, float]]:
    """(label, median ms, worst ms) of every page, against a `buildfarm web` subprocess."""
    env = {**os.environ, "BUILDFARM_DB": f"sqlite://{db_path}",
           "BUILDFARM_INVENTORY": str(inventory), "BUILDFARM_STATE_DIR": str(db_path.parent)}
    server = subprocess.Popen(
        [sys.executable, "-m", "buildfarm", "web", "--listen", "127.0.0.1:0"],
        env=env, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        found = re.search(r"http://\S+", line)
        if found is None:
            raise SystemExit(f"buildfarm web did not start: {line!r}")
        base = found.group(0)
        results = []
        for label, url in _pages(base, db_path):
            _get(url)  # warm: the first read of a page fills the caches
            times = [_get(url)[0] for _ in range(repeat)]
            results.append((label, statistics.median(times), max(times)))
            print(f"  {label:40} median {results[-1][1]:7.1f} ms  worst {results[-1][2]:7.1f} ms",
                  flush=True)
        return results
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", type=int, default=1_000_000)
    parser.add_argument("--datastore", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    db_path = args.datastore or Path(f"/var/tmp/buildfarm-web-bench/{args.builds}.db")
    logs_dir = db_path.parent / "logs"
    if not db_path.exists():
        print(f"making {db_path} with {args.builds:,} builds (once)", flush=True)
        make_datastore(db_path, args.builds, logs_dir)
    inventory = db_path.parent / "inventory.yaml"
    write_inventory(inventory)
    results = measure(db_path, inventory, args.repeat)
    worst = max(results, key=lambda r: r[2])
    print(json.dumps({"builds": args.builds, "systems": [s for s, _ in SYSTEMS],
                      "slowest median ms": max(r[1] for r in results),
                      "worst ms": worst[2], "worst page": worst[0],
                      "target ms": TARGET_MS}))


if __name__ == "__main__":
    main()
