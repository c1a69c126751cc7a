"""Every benchmark, in one run, into one table (run it through benchmarks/run).

Groups (--only NAME selects some): startup, submit, scheduler, queries, queue (benchmarks/
bench_queue.py: why queued builds wait), memory, e2e, graph
(benchmarks/bench_graph.py: a whole graph with a failure, against Nix's remote building),
transfer, substitutes (benchmarks/bench_substitutes.py: bytes the coordinator pushes with and
without substitute_urls), web (benchmarks/web.py: every page and API call of `buildfarm web` on
an aged datastore).
--quick stops the datastore sizes at 100,000 builds and does fewer trivial builds: a few
minutes instead of an hour; the full run is the one BENCHMARKS.md records.

--engine postgresql (or both) measures the scale groups (submit, scheduler, queries) on the
PostgreSQL server whose `postgres` database BUILDFARM_BENCH_PG names (benchmarks/run starts a
throwaway one), in a scratch database per datastore size (the SQLite datastore of that size,
copied), with the same sizes and figures, each named with " (PostgreSQL)" at its end; submit
there is timed at 1,000 to 8,000 derivations (see Suite._submit_postgresql). The other groups
always measure SQLite, the default datastore, which is also the default engine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from datastores import LABELS, PostgresServer, engine_of, sqlite_url
from figures import Figure, Report, machine, table

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("startup", "submit", "scheduler", "queries", "queue", "memory", "e2e", "graph",
          "transfer", "substitutes", "web")
ENGINE_CHOICES = {"sqlite": ("sqlite",), "postgresql": ("postgresql",),
                  "both": ("sqlite", "postgresql")}
MARK_BEGIN = "<!-- benchmarks/run --write: begin -->"
MARK_END = "<!-- benchmarks/run --write: end -->"


class Suite:
    def __init__(self, work: Path, quick: bool, report: Report, *,
                 engines: tuple[str, ...] = ("sqlite",),
                 server: PostgresServer | None = None) -> None:
        self.work = work
        self.quick = quick
        self.report = report
        self.sizes = (1_000, 10_000, 100_000) if quick else (1_000, 10_000, 100_000, 1_000_000)
        self.engines = engines  # of the scale groups: submit, scheduler, queries
        self.server = server
        self.datastores: dict[tuple[str, int], str] = {}

    @property
    def biggest(self) -> int:
        return self.sizes[-1]

    def pg(self) -> PostgresServer:
        if self.server is None:
            raise RuntimeError("no PostgreSQL server: run through benchmarks/run --engine")
        return self.server

    @staticmethod
    def suffix(engine: str) -> str:
        """What a figure's name ends with on `engine`: nothing on SQLite, the default."""
        return "" if engine == "sqlite" else f" ({LABELS[engine]})"

    def datastore(self, count: int, engine: str = "sqlite") -> str:
        """The URL of the datastore of `count` queued builds on `engine`, made on first use."""
        if (engine, count) not in self.datastores:
            if engine == "sqlite":
                import bench_scheduler

                path = self.work / f"datastore-{count}" / "buildfarm.db"
                path.parent.mkdir(parents=True)
                url = sqlite_url(path)
                print(f"making a datastore of {count:,} queued builds ...", flush=True)
                seconds = bench_scheduler.make_datastore(url, count)
                size = sum(f.stat().st_size for f in path.parent.iterdir()) / 1e6
                self.report.notes.append(
                    f"datastore of {count:,} queued builds: written in {seconds:.0f} s "
                    f"through record_submission, {size:,.0f} MB on disk"
                )
            else:
                url = self._postgresql_datastore(count)
            self.datastores[engine, count] = url
        return self.datastores[engine, count]

    def _postgresql_datastore(self, count: int) -> str:
        """The SQLite datastore of `count` builds copied into a new PostgreSQL database, as
        `buildfarm db migrate-from` copies it (one COPY per table, the waiting_on triggers off:
        the counts are copied), then vacuumed and analyzed as autovacuum soon would: the same
        builds, ids and order on both engines. Writing it through record_submission, as the
        SQLite one is, would take hours at 100,000 builds: each inserted row fires the
        statement-level waiting_on trigger, which rescans the queue (see the submit group)."""
        from buildfarm.datastore.copy import copy_datastore

        source = self.datastore(count)
        name = f"datastore_{count}"
        print(f"copying the datastore of {count:,} queued builds into PostgreSQL ...",
              flush=True)
        began = time.perf_counter()
        copy_datastore(source, self.pg().create(name))
        copied = time.perf_counter() - began
        self.pg().vacuum_analyze(name)
        analyzed = time.perf_counter() - began - copied
        self.report.notes.append(
            f"datastore of {count:,} queued builds (PostgreSQL): the SQLite one copied by "
            f"migrate-from's copy_datastore in {copied:.0f} s, VACUUM (ANALYZE) "
            f"{analyzed:.0f} s, {self.pg().size(name) / 1e6:,.0f} MB on disk"
        )
        return self.pg().url_of(name)

    def sqlite_path(self, count: int) -> Path:
        """The file of the SQLite datastore of `count` queued builds, made on first use."""
        return Path(self.datastore(count)[len("sqlite://") :])

    # -- the groups

    def startup(self) -> None:
        import bench_cli

        floor = bench_cli.interpreter_seconds() * 1000
        empty = bench_cli.env_for(None)
        for label, args in (("buildfarm --help", ["--help"]),
                            ("buildfarm builds list (empty datastore)", ["builds", "list"])):
            seconds = bench_cli.command_seconds(args, empty) * 1000
            self.report.add(Figure(f"start-up: {label}", seconds, "ms", target=("<=", 150),
                                   peer=floor, peer_name="python -c pass"))

    def submit(self) -> None:
        """`buildfarm submit -` of 100,000 derivations into each engine's datastore; on
        PostgreSQL the peer is the same submission into SQLite, when this run measured it."""
        import bench_submit

        small = 10_000
        seconds = bench_submit.read_seconds(self.work, small)
        self.report.add(Figure(
            f"derivation reader: read and parse {small:,} .drv files", seconds, "s",
            note=f"{small / seconds:,.0f} derivations/s",
        ))
        done_small = bench_submit.submit_from_stdin(self.work, small)
        self.report.add(Figure(
            f"submit of {small:,} derivations from stdin", done_small["seconds"], "s",
            target=("<=", 10), note=f"{done_small['rate']:,.0f} derivations/s",
        ))
        count = 100_000
        done: dict[str, dict[str, float]] = {}
        for engine in self.engines:
            print(f"submit of {count:,} derivations{self.suffix(engine)} ...", flush=True)
            url = None if engine == "sqlite" else self.pg().create("submit")
            done[engine] = bench_submit.submit_from_stdin(self.work, count, url)
            if url is not None:
                self.pg().drop("submit")
            peer = done.get("sqlite") if engine != "sqlite" else None
            self.report.add(Figure(
                f"submit of {count:,} derivations from stdin{self.suffix(engine)}",
                done[engine]["seconds"], "s", target=("<=", 60),
                peer=peer["seconds"] if peer else None,
                peer_name="the same into SQLite" if peer else "",
                note=f"{done[engine]['rate']:,.0f} derivations/s",
            ))
        self._closure(done["sqlite"]["seconds"] if "sqlite" in done else None)

    def _closure(self, plain: float | None) -> None:
        """submit --closure of the same 100,000 derivations, named by their tops only; the peer
        is `submit -` of all of them, in the same run."""
        import bench_submit

        count = 100_000
        print(f"submit --closure of the tops of {count:,} derivations ...", flush=True)
        done = bench_submit.submit_closure(self.work, count)
        self.report.add(Figure(
            f"submit --closure of {done['tops']:,} tops, {count:,} derivations in all",
            done["seconds"], "s", target=("<=", 60), peer=plain,
            peer_name="submit - of all of them" if plain else "",
            note=f"{done['cpu']:.0f} s of CPU; {count / done['seconds']:,.0f} derivations/s",
        ))

    def _scratch_copy(self, count: int, engine: str) -> str:
        """A copy of the datastore of `count` builds, for a group that changes it (the other
        groups get the untouched datastore)."""
        source = self.datastore(count, engine)
        if engine == "sqlite":
            path = Path(source[len("sqlite://") :])
            scratch = path.with_name("scheduler.db")
            shutil.copy(path, scratch)
            return sqlite_url(scratch)
        return self.pg().create("scheduler", template=f"datastore_{count}")

    def _drop_scratch(self, url: str) -> None:
        if engine_of(url) == "sqlite":
            Path(url[len("sqlite://") :]).unlink()
        else:
            self.pg().drop("scheduler")

    def scheduler(self) -> None:
        for engine in self.engines:
            self._scheduler(engine)

    def _scheduler(self, engine: str) -> None:
        import bench_scheduler

        results = {}
        on = self.suffix(engine)
        for count in self.sizes:
            scratch = self._scratch_copy(count, engine)
            print(f"allocation decisions at {count:,} queued builds{on} ...", flush=True)
            result = bench_scheduler.simulate(scratch, 1000,
                                              reference_samples=3 if count < 1_000_000 else 1)
            self._drop_scratch(scratch)
            results[count] = result
            if not result["agreed"]:
                self.report.notes.append(
                    f"at {count:,}{on}: the scheduler's first choice differed from the direct "
                    "query's (a bug: the run is not valid)")
            targets = {100_000: (5, 20), 1_000_000: (10, None)}.get(count, (None, None))
            p50_target = ("<=", float(targets[0])) if targets[0] else None
            p99_target = ("<=", float(targets[1])) if targets[1] else None
            self.report.add(Figure(
                f"allocation decision p50, {count:,} queued{on}", result["p50"] * 1000, "ms",
                target=p50_target, peer=result["reference"] * 1000,
                peer_name="direct NOT EXISTS query in priority order (first build only)",
                note=f"{result['decisions']} decisions",
            ))
            self.report.add(Figure(
                f"allocation decision p99, {count:,} queued{on}", result["p99"] * 1000, "ms",
                target=p99_target, note=f"max {result['max'] * 1000:.1f} ms",
            ))
            if result["completion_p50"] is not None:
                self.report.add(Figure(
                    f"completion bookkeeping p50 / p99, {count:,} queued{on}",
                    result["completion_p50"] * 1000, "ms",
                    note=f"p99 {result['completion_p99'] * 1000:.1f} ms, max "
                         f"{result['completion_max'] * 1000:.0f} ms: a success recounts its "
                         "dependants",
                ))
        low, high = min(results), max(results)
        growth = results[high]["p50"] / results[low]["p50"]
        self.report.add(Figure(
            f"allocation p50 growth, {low:,} -> {high:,} queued ({high // low:,}x the queue)"
            f"{on}",
            growth, "x", target=("<=", 10.0),
            note="linear would be " + f"{high // low:,}x; curve: " + ", ".join(
                f"{c:,}: {r['p50'] * 1000:.2f} ms" for c, r in sorted(results.items())),
        ))

    def queries(self) -> None:
        for engine in self.engines:
            self._queries(engine)

    def _queries(self, engine: str) -> None:
        import bench_cli

        big = self.datastore(self.biggest, engine)
        small = self.datastore(self.sizes[0], engine)
        ours, peer = bench_cli.list_and_show(big), bench_cli.list_and_show(small)
        for key, label in (("list", "builds list --limit 50"),
                           ("list_json", "builds list --limit 50 --json"),
                           ("list_state", "builds list --limit 50 --state queued"),
                           ("show", "builds show UUID")):
            self.report.add(Figure(
                f"{label}, {self.biggest:,} builds (whole command){self.suffix(engine)}",
                ours[key] * 1000, "ms",
                target=("<=", 200.0), peer=peer[key] * 1000,
                peer_name=f"the same at {self.sizes[0]:,} builds",
            ))

    def queue(self) -> None:
        import bench_queue

        count = self.biggest
        path = self.work / "queue" / "buildfarm.db"
        path.parent.mkdir(parents=True)
        print(f"a datastore of {count:,} queued builds, in bulk ...", flush=True)
        seconds = bench_queue.make_datastore(sqlite_url(path), count)
        self.report.notes.append(f"queue group: {count:,} queued builds written in bulk in "
                                 f"{seconds:.0f} s (bench_queue.make_datastore)")
        print(f"why queued builds wait, {count:,} queued ...", flush=True)
        found = bench_queue.measure(sqlite_url(path))
        self.report.add(Figure(
            f"buildfarm queue: the queue by reason and system, {count:,} queued",
            found["summary"] * 1000, "ms", target=("<=", 1000.0), peer=found["depth"] * 1000,
            peer_name="queue depth per system (scheduler.queue_depth), same datastore",
            note=f"{found['groups']} groups",
        ))
        self.report.add(Figure(
            f"one queued build's reason p50, {count:,} queued",
            found["reason_p50"] * 1000, "ms", target=("<=", 50.0),
            peer=found["lookup_p50"] * 1000, peer_name="reading the build by UUID (get_build)",
            note=f"p99 {found['reason_p99'] * 1000:.1f} ms, max "
                 f"{found['reason_max'] * 1000:.1f} ms; reasons: {', '.join(found['reasons'])}",
        ))
        shutil.rmtree(path.parent)

    def memory(self) -> None:
        import bench_memory
        from testbed import Testbed

        seconds = 20.0 if self.quick else 60.0
        results = {}
        with Testbed(self.work) as bed:
            hosts = bed.add_hosts(4)
            for count in (self.sizes[0], self.biggest):
                copy = self.work / f"memory-{count}" / "buildfarm.db"
                copy.parent.mkdir()
                shutil.copy(self.sqlite_path(count), copy)
                print(f"coordinator memory at {count:,} queued builds ...", flush=True)
                results[count] = bench_memory.coordinator_memory(copy, hosts, seconds)
                shutil.rmtree(copy.parent)
        ours, peer = results[self.biggest], results[self.sizes[0]]
        self.report.add(Figure(
            f"coordinator peak RSS, {self.biggest:,} queued, 16 machines", ours["peak"], "MB",
            target=("<=", 250.0), peer=peer["peak"],
            peer_name=f"the same at {self.sizes[0]:,} queued",
            note=f"{ours['connected']} machines connected, {seconds:.0f} s of work",
        ))

    def graph(self) -> None:
        import bench_graph

        bench_graph.graph_builds(self.report, self.work)

    def e2e(self) -> None:
        import bench_e2e

        builds = 100 if self.quick else 200
        bench_e2e.trivial_builds(self.report, self.work, builds=builds, host_count=4, slots=4,
                                 nix_target=5, floor_target=1.5)
        bench_e2e.trivial_builds(self.report, self.work, builds=builds, host_count=2, slots=4,
                                 nix_target=5, floor_target=1.5)

    def transfer(self) -> None:
        import bench_transfer
        from testbed import Testbed

        size_mb = 500
        with Testbed(self.work) as bed:
            (host,) = bed.add_hosts(1)
            pull = bench_transfer.sftp_versus_cat(host, self.work, size_mb,
                                                  rounds=3 if self.quick else 5)
            self.report.add(Figure(
                f"SFTP pull (Remote.fetch) of a {size_mb} MB output", pull["fetch"], "MB/s",
                target=(">=", 0.8), target_of="ratio", peer=pull["cat"],
                peer_name="cat over an exec channel of the same connection",
                note="rounds " + ", ".join(f"{r:.0f}" for r in pull["fetch_rounds"]) + " vs "
                     + ", ".join(f"{r:.0f}" for r in pull["cat_rounds"]),
            ))
            self.report.add(Figure(
                "coordinator CPU per GB pulled: SFTP vs cat", pull["fetch_cpu"], "s",
                peer=pull["cat_cpu"], peer_name="cat",
            ))
            files = 100_000
            many = bench_transfer.many_files(host, self.work, files)
            network = many["export-outputs"] + many["fetch-outputs"]
            self.report.add(Figure(
                f"{files:,}-file output: export + fetch (one command, one file)", network, "s",
                target=("<=", 1.5), target_of="ratio", peer=many["peer"],
                peer_name="nix-store --export | cat over one ssh",
                note=f"nar {many['nar'] / 1e6:.1f} MB; export {many['export-outputs']:.2f} s, "
                     f"fetch {many['fetch-outputs']:.2f} s",
            ))
            self.report.add(Figure(
                f"{files:,}-file output: verify + store + publish on the coordinator",
                many["verify-outputs"], "s",
                note="reading the nar's entries, hashing, compressing, signing: local work",
            ))

    def substitutes(self) -> None:
        import bench_substitutes

        bench_substitutes.inputs_from_servers(self.report, self.work,
                                              leaves=10 if self.quick else 20)

    def web(self) -> None:
        import web

        count = self.biggest
        path = self.work / f"web-{count}" / "buildfarm.db"
        print(f"making an aged datastore of {count:,} builds for buildfarm web ...", flush=True)
        web.make_datastore(path, count, path.parent / "logs")
        inventory = path.parent / "inventory.yaml"
        web.write_inventory(inventory)
        pages = web.measure(path, inventory, repeat=3 if self.quick else 5)
        slowest = max(pages, key=lambda page: page[1])
        worst = max(pages, key=lambda page: page[2])
        self.report.add(Figure(
            f"buildfarm web: slowest median of {len(pages)} pages and API calls, "
            f"{count:,} builds", slowest[1], "ms", target=("<=", web.TARGET_MS),
            note=f"{slowest[0]}; worst single answer {worst[2]:.0f} ms ({worst[0]})",
        ))


def write_markdown(report: Report, mode: str, engine: str, began: float) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8")
    info = machine()
    block = "\n".join([
        MARK_BEGIN,
        f"Run: `bash benchmarks/run{' --quick' if mode == 'quick' else ''}"
        f"{'' if engine == 'sqlite' else f' --engine {engine}'}` "
        f"({mode}), {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, "
        f"{(time.time() - began) / 60:.0f} minutes; load average at the end "
        f"{os.getloadavg()[0]:.2f}.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".",
        "",
        table(report.figures),
        "",
        *[f"- {note}" for note in report.notes],
        MARK_END,
    ])
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory")
    parser.add_argument("--quick", action="store_true", help="up to 100,000 builds")
    parser.add_argument("--only", action="append", choices=GROUPS, default=[],
                        help="run only this group (repeat)")
    parser.add_argument("--engine", choices=tuple(ENGINE_CHOICES), default="sqlite",
                        help="datastore engine(s) of the submit, scheduler and queries groups")
    parser.add_argument("--write", action="store_true", help="put the table in BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    began = time.time()
    sys.path.insert(0, str(ROOT / "tests"))
    # Bytecode as an installed package has it (the environment may forbid writing it).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "buildfarm")],
                   check=True, stdout=subprocess.DEVNULL)
    engines = ENGINE_CHOICES[args.engine]
    server = PostgresServer.from_environment() if "postgresql" in engines else None
    if "postgresql" in engines and server is None:
        parser.error("--engine postgresql needs a server: run me through benchmarks/run")
    report = Report()
    suite = Suite(args.work, args.quick, report, engines=engines, server=server)
    print("machine: " + json.dumps(machine()), flush=True)
    if server is not None:
        report.notes.append(
            f"PostgreSQL {server.version()}: a throwaway server on a Unix socket "
            "(scripts/pg-server.sh: fsync, synchronous_commit and full_page_writes off, "
            "other settings Debian's defaults), a scratch database per datastore")
        print(report.notes[-1], flush=True)
    for group in args.only or GROUPS:
        print(f"== {group}", flush=True)
        getattr(suite, group)()
    print()
    print(table(report.figures))
    for note in report.notes:
        print(f"- {note}")
    if args.json is not None:
        args.json.write_text(report.to_json(), encoding="utf-8")
    if args.write:
        write_markdown(report, "quick" if args.quick else "full", args.engine, began)


if __name__ == "__main__":
    main()
