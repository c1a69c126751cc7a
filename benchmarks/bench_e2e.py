"""Trivial real builds over emulated hosts: buildfarm, Nix's own remote building, and the floor.

Each of the three gets fresh derivations of the same kind (`echo N > $out`, unique names, so no
host has their outputs) on the same hosts, one after the other in the same run:
  - buildfarm: `buildfarm submit` then `buildfarm run --exit-when-idle` (timed: the run, from
    process start to exit: start-up and connecting to every host included), with the
    coordinator's CPU time from its rusage;
  - Nix: `nix-store --realise DRV... --max-jobs 0 --builders 'ssh://h1 SYSTEM - SLOTS ; ...'`
    with NIX_SSHOPTS naming an ssh_config (port, key, known_hosts) — Nix's own remote building;
  - the floor: on every host at once, the bare store commands for its share of the derivations
    (`nix-store --import` of the .drv, `--realise`, `--export` of the output to a file) with
    SLOTS in parallel (xargs -P), timed by the hosts' own clocks: what any coordinator needs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from figures import Figure, Report

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from testbed import (  # noqa: E402
    Host,
    Testbed,
    current_system,
    instantiate_all,
    inventory_yaml,
    nix_expr_trivial,
)

RUN_TIMEOUT = 900.0  # seconds a `buildfarm run` of the trivial builds may take at most


def trivial_derivations(count: int, tag: str) -> list[str]:
    """`count` independent trivial derivations in the coordinator's (private) store."""
    exprs = " ".join(
        f"({nix_expr_trivial(f'bench-{tag}-{n}', f'echo {n} {tag} > $out')})" for n in range(count)
    )
    paths = instantiate_all(f"[ {exprs} ]")
    if len(paths) != count:
        raise RuntimeError(f"nix-instantiate made {len(paths)} derivations, not {count}")
    return paths


def _buildfarm(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "buildfarm", *args], env=env,
                          capture_output=True, text=True, check=True)


def run_buildfarm(hosts: list[Host], drvs: list[str], slots: int, work: Path) -> dict[str, float]:
    """Wall seconds and coordinator CPU seconds of `buildfarm run` for `drvs`."""
    state = work / f"state-{uuid.uuid4().hex[:8]}"
    state.mkdir(parents=True)
    inventory = state / "inventory.yaml"
    inventory.write_text(inventory_yaml(hosts, "nix", max_builds=slots), encoding="utf-8")
    env = {**os.environ, "BUILDFARM_STATE_DIR": str(state), "BUILDFARM_INVENTORY": str(inventory),
           "BUILDFARM_HOOKS_DIR": str(state / "no-hooks")}
    env.pop("BUILDFARM_DB", None)
    _buildfarm(["submit", *drvs], env)
    began = time.perf_counter()
    # BUILDFARM_BENCH_PROFILE=DIR: the coordinator runs under cProfile, one file per run in DIR
    # (read with `python -m pstats FILE`); its figures are then not comparable.
    profile = os.environ.get("BUILDFARM_BENCH_PROFILE")
    profiler = ["-m", "cProfile", "-o", f"{profile}/run-{state.name}.prof"] if profile else []
    process = subprocess.Popen(
        [sys.executable, *profiler, "-m", "buildfarm", "run", "--no-ui", "--exit-when-idle"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert process.stdout is not None
    timer = threading.Timer(RUN_TIMEOUT, process.kill)  # a stuck run must not hang the suite
    timer.start()
    try:
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"buildfarm run exited {process.returncode}:\n{output[-3000:]}")
    rows = json.loads(_buildfarm(["builds", "list", "--json", "--limit", "100000"], env).stdout)
    states = {r["state"] for r in rows}
    if states != {"succeeded"} or len(rows) != len(drvs):
        raise RuntimeError(f"buildfarm: {len(rows)} builds in states {states}:\n{output[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime}


def ssh_config(hosts: list[Host], path: Path) -> Path:
    """An ssh_config naming each host (Nix 2.8 takes no port in a builder URI)."""
    blocks = [
        f"Host {h.name}\n  HostName {h.address}\n  Port {h.port}\n  User {h.user}\n"
        f"  IdentityFile {h.client_key}\n  IdentitiesOnly yes\n  IdentityAgent none\n"
        f"  UserKnownHostsFile {h.known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n"
        for h in hosts
    ]
    path.write_text("".join(blocks), encoding="utf-8")
    return path


def run_nix(hosts: list[Host], drvs: list[str], slots: int, work: Path) -> dict[str, float]:
    """Wall seconds of Nix's own remote building of `drvs` over `hosts`."""
    config = ssh_config(hosts, work / "ssh_config")
    builders = " ; ".join(f"ssh://{h.name} {current_system()} - {slots} 1" for h in hosts)
    env = {**os.environ, "NIX_SSHOPTS": f"-F {config}"}
    began = time.perf_counter()
    done = subprocess.run(
        ["nix-store", "--realise", *drvs, "--max-jobs", "0", "--builders", builders],
        env=env, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"nix-store --realise exited {done.returncode}: {done.stderr[-2000:]}")
    return {"wall": wall}


_FLOOR_SCRIPT = r"""
cd "$1"
began=$(date +%s.%N)
ls | grep '\.bundle$' | xargs -P "$2" -I{} sh -c '
    drv=$(nix-store --import < "$1") &&
    out=$(nix-store --realise "$drv" 2>/dev/null) &&
    nix-store --export "$out" > "$1.export"' sh {}
status=$?
ended=$(date +%s.%N)
echo "$began $ended"
exit $status
"""


def run_floor(hosts: list[Host], drvs: list[str], slots: int, work: Path) -> dict[str, float]:
    """Seconds from the first host starting to the last finishing the bare store commands."""
    shares: list[list[str]] = [drvs[n::len(hosts)] for n in range(len(hosts))]
    directories = []
    for host, share in zip(hosts, shares, strict=True):
        directory = host.testbed.directory / f"floor-{uuid.uuid4().hex[:8]}-{host.name}"
        directory.mkdir(mode=0o777)
        directory.chmod(0o777)  # the hosts' commands run as bftest and write the exports here
        for n, drv in enumerate(share):
            with open(directory / f"{n:05d}.bundle", "wb") as bundle:
                subprocess.run(["nix-store", "--export", drv], stdout=bundle, check=True)
            (directory / f"{n:05d}.bundle").chmod(0o644)
        directories.append(directory)
    command = f"sh -c {shlex.quote(_FLOOR_SCRIPT)} floor"
    processes = [
        subprocess.Popen([*h.ssh_argv(), f"{command} {shlex.quote(str(d))} {slots}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
        for h, d in zip(hosts, directories, strict=True)
    ]
    spans = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"floor script exited {process.returncode}: {err[-2000:]}")
        began, ended = (float(x) for x in out.split()[-2:])
        spans.append((began, ended))
    return {"wall": max(e for _, e in spans) - min(b for b, _ in spans)}


def trivial_builds(report: Report, work: Path, *, builds: int, host_count: int, slots: int,
                   nix_target: float, floor_target: float) -> dict[str, Any]:
    """The three runs on `host_count` fresh hosts; adds the figures to `report`."""
    with Testbed(work) as bed:
        hosts = bed.add_hosts(host_count)
        tag = uuid.uuid4().hex[:8]
        ours = run_buildfarm(hosts, trivial_derivations(builds, f"bf{tag}"), slots, work)
        nix = run_nix(hosts, trivial_derivations(builds, f"nix{tag}"), slots, work)
        floor = run_floor(hosts, trivial_derivations(builds, f"floor{tag}"), slots, work)
    shape = f"{builds} trivial builds, {host_count} hosts x {slots} slots"
    report.add(Figure(
        f"buildfarm wall time vs Nix remote building ({shape})", ours["wall"], "s",
        target=("<=", 1 / nix_target), target_of="ratio", peer=nix["wall"],
        peer_name="nix-store -r --builders",
    ))
    report.add(Figure(
        f"buildfarm wall time vs the floor ({shape})", ours["wall"], "s",
        target=("<=", floor_target), target_of="ratio", peer=floor["wall"],
        peer_name="bare import/realise/export on the hosts",
    ))
    report.add(Figure(
        f"coordinator CPU per build ({shape})", ours["cpu"] / builds * 1000, "ms",
        note=f"{ours['cpu']:.2f} s CPU for {builds} builds",
    ))
    return {"buildfarm": ours, "nix": nix, "floor": floor}
