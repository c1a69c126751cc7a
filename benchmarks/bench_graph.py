"""A whole dependency graph (tests/buildgraph.py: 304 real derivations, one failing in the
middle) built three ways on the same hosts in the same run, each with derivations of its own
(no host has their outputs):
  - buildfarm from the tops only, with the shipped hooks (the missing-inputs hook brings in
    the rest);
  - buildfarm with `submit --closure` (the hooks installed too, as the README says);
  - Nix's own remote building: `nix-store -r TOPS --keep-going --max-jobs 0 --builders ...`.
Timed from the submission to `run --exit-when-idle`'s exit (buildfarm) or nix-store's exit;
buildfarm's attempts are counted from its datastore.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench_e2e import RUN_TIMEOUT, ssh_config
from figures import Figure, Report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from buildgraph import Graph, instantiate_graph  # noqa: E402
from testbed import Host, Testbed, current_system, inventory_yaml  # noqa: E402


def _wanted(graph: Graph) -> set[str]:
    """The derivations every unblocked top needs: each must be built."""
    blocked = graph.dependants(graph.failing) | {graph.failing}
    return graph.closure(t for t in graph.tops() if t not in blocked)


def run_buildfarm(hosts: list[Host], slots: int, work: Path, *, closure: bool) -> dict[str, Any]:
    graph = instantiate_graph(uuid.uuid4().hex[:12])
    state = work / f"state-graph-{uuid.uuid4().hex[:8]}"
    state.mkdir(parents=True)
    (state / "inventory.yaml").write_text(inventory_yaml(hosts, "nix", max_builds=slots))
    shutil.copytree(ROOT / "hooks.d", state / "hooks.d")
    env = {**os.environ, "BUILDFARM_STATE_DIR": str(state),
           "BUILDFARM_INVENTORY": str(state / "inventory.yaml"),
           "BUILDFARM_HOOKS_DIR": str(state / "hooks.d"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("BUILDFARM_DB", None)
    tops = [graph.drvs[t] for t in graph.tops()]
    command = [sys.executable, "-m", "buildfarm"]
    began = time.perf_counter()
    subprocess.run([*command, "submit", *(["--closure"] if closure else []), *tops], env=env,
                   check=True, capture_output=True)
    done = subprocess.run([*command, "run", "--no-ui", "--exit-when-idle"], env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"buildfarm run exited {done.returncode}:\n{done.stdout[-3000:]}")
    with sqlite3.connect(state / "buildfarm.db") as db:
        succeeded = dict(db.execute(
            "SELECT d.path, COUNT(*) FROM attempt AS a JOIN build AS b ON b.id = a.build_id"
            " JOIN derivation AS d ON d.id = b.derivation_id WHERE a.result = 'success'"
            " GROUP BY d.path").fetchall())
        builds, attempts, left = db.execute(
            "SELECT (SELECT COUNT(*) FROM build), (SELECT COUNT(*) FROM attempt),"
            " (SELECT COUNT(*) FROM build WHERE state IN ('queued', 'running'))").fetchone()
    wrong = [n for n in _wanted(graph) if succeeded.get(graph.drvs[n]) != 1]
    if wrong or left or any(count > 1 for count in succeeded.values()):
        raise RuntimeError(f"buildfarm: {len(wrong)} needed derivations not built once, "
                           f"{left} builds left:\n{done.stdout[-3000:]}")
    return {"wall": wall, "builds": builds, "attempts": attempts,
            "derivations": len(graph.nodes)}


def run_nix(hosts: list[Host], slots: int, work: Path) -> dict[str, Any]:
    graph = instantiate_graph(uuid.uuid4().hex[:12])
    config = ssh_config(hosts, work / "ssh_config")
    builders = " ; ".join(f"ssh://{h.name} {current_system()} - {slots} 1" for h in hosts)
    env = {**os.environ, "NIX_SSHOPTS": f"-F {config}"}
    tops = [graph.drvs[t] for t in graph.tops()]
    began = time.perf_counter()
    done = subprocess.run(
        ["nix-store", "--realise", *tops, "--keep-going", "--max-jobs", "0",
         "--builders", builders],
        env=env, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        timeout=RUN_TIMEOUT,
    )
    wall = time.perf_counter() - began
    outputs = subprocess.run(
        ["nix-store", "--query", "--outputs", *(graph.drvs[n] for n in _wanted(graph))],
        capture_output=True, text=True, check=True).stdout.split()
    invalid = subprocess.run(["nix-store", "--check-validity", "--print-invalid", *outputs],
                             capture_output=True, text=True, check=True).stdout.split()
    # --keep-going builds all it can, then exits non-zero for the failing derivation (Nix 2.8
    # exits 1 when, as here, the failure came from a remote builder).
    if done.returncode == 0 or invalid:
        raise RuntimeError(f"nix-store -r exited {done.returncode}, {len(invalid)} wanted "
                           f"outputs missing: {done.stderr[-2000:]}")
    return {"wall": wall}


def graph_builds(report: Report, work: Path, *, host_count: int = 3, slots: int = 2) -> None:
    with Testbed(work) as bed:
        hosts = bed.add_hosts(host_count)
        closure = run_buildfarm(hosts, slots, work, closure=True)
        print(f"  buildfarm, --closure: {closure}", flush=True)
        tops = run_buildfarm(hosts, slots, work, closure=False)
        print(f"  buildfarm, tops only: {tops}", flush=True)
        nix = run_nix(hosts, slots, work)
        print(f"  nix-store -r: {nix}", flush=True)
    shape = f"{closure['derivations']} derivations, {host_count} hosts x {slots} slots"
    peer = "nix-store -r TOPS --keep-going --builders"
    for label, ours, target, attempts_target in (
        ("submit --closure", closure, 0.25, 1.05), ("tops only + hooks", tops, 0.4, 2.0),
    ):
        report.add(Figure(
            f"graph ({shape}), {label}: buildfarm wall time vs Nix remote building",
            ours["wall"], "s", target=("<=", target), target_of="ratio", peer=nix["wall"],
            peer_name=peer,
        ))
        report.add(Figure(
            f"graph ({shape}), {label}: attempts per derivation",
            ours["attempts"] / ours["derivations"], "x", target=("<=", attempts_target),
            note=f"{ours['attempts']} attempts, {ours['builds']} builds",
        ))
