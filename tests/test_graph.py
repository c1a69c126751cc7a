"""A whole dependency graph built right (issue 18), on the test bed through `buildfarm run`: a
generated graph of 304 derivations (tests/buildgraph.py: 10 layers, diamonds, out+dev
derivations, a directory tree with a symlink and an executable, a 24 MB output, one failing
derivation in the middle), built from its tops only with the shipped hooks, with
`submit --closure`, and with the coordinator SIGKILLed mid-graph and started again.

Each time: every derivation the unblocked tops need succeeded exactly once; none succeeded
twice; the failing one failed exactly once; every dependant of it that got a build ends
dependency-failed naming it and its build; nothing is left queued or running; `run
--exit-when-idle` exits.
"""

from __future__ import annotations

import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from buildgraph import Graph, instantiate_graph
from farm import Farm, token, wait_for
from testbed import Host, Testbed

SHIPPED = Path(__file__).parent.parent / "hooks.d"


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Iterator[Farm]:
    hooks = tmp_path / "hooks.d"
    shutil.copytree(SHIPPED, hooks)
    yield Farm(tmp_path / "state", tmp_path / "inventory.yaml", hooks)


def check_graph(farm: Farm, graph: Graph, submitted: list[str], output: str) -> dict[str, int]:
    """The invariants of the module docstring, from the datastore; returns the counts the
    benchmark reports (builds, attempts)."""
    name_of = {drv: name for name, drv in graph.drvs.items()}
    rows = farm.rows(
        "SELECT b.id, b.uuid, d.path, b.state, b.reason FROM build AS b"
        " JOIN derivation AS d ON d.id = b.derivation_id")
    builds = {uuid: (name_of[path], state, reason) for _, uuid, path, state, reason in rows}
    attempts = farm.rows(
        "SELECT b.uuid, a.result FROM attempt AS a JOIN build AS b ON b.id = a.build_id")
    successes = Counter(builds[uuid][0] for uuid, result in attempts if result == "success")
    failures = Counter(builds[uuid][0] for uuid, result in attempts if result == "failure")
    states = Counter(state for _, state, _ in builds.values())
    assert states["queued"] == 0 and states["running"] == 0, (states, output[-3000:])

    failing = graph.failing
    blocked = graph.dependants(failing)
    unblocked_tops = [t for t in submitted if t not in blocked and t != failing]
    needed = graph.closure(unblocked_tops)
    assert failing not in needed
    missing = sorted(n for n in needed if successes[n] != 1)
    assert not missing, ([(n, successes[n]) for n in missing], output[-3000:])
    twice = sorted(n for n, count in successes.items() if count > 1)
    assert not twice, twice
    assert failures == Counter({failing: 1}), failures
    (failed_uuid,) = [u for u, (name, _, _) in builds.items() if name == failing]
    root = f"dependency-failed: {graph.drvs[failing]} (build {failed_uuid})"
    for uuid, (name, state, reason) in builds.items():
        if name in blocked:
            assert state == "failed" and reason is not None and reason.startswith(root), (
                name, state, reason)
            assert not any(result in ("success", "failure")
                           for u, result in attempts if u == uuid), name
    # Every blocked top that was submitted has its build, failed for that reason.
    assert {t for t in submitted if t in blocked} <= {name for name, _, _ in builds.values()}
    return {"builds": len(builds), "attempts": len(attempts)}


def test_tops_only_with_the_shipped_hooks(farm: Farm, hosts: list[Host]) -> None:
    """Only the tops are submitted; the missing-inputs hook brings in the rest."""
    graph = instantiate_graph(token())
    assert len(graph.nodes) >= 300 and graph.diamonds() > 10
    farm.write_inventory(hosts)
    tops = graph.tops()
    farm.submit(*(graph.drvs[t] for t in tops), extra=("--tag", "graph=tops"))
    done = farm.run()
    assert done.returncode == 0, done.stdout[-3000:]
    check_graph(farm, graph, tops, done.stdout)
    assert "nothing queued or running: exiting" in done.stdout


def test_closure_submitted_at_once(farm: Farm, hosts: list[Host]) -> None:
    """`submit --closure` queues every derivation up front: each is built once, in order, and
    the failure's dependants end dependency-failed when it fails."""
    graph = instantiate_graph(token())
    farm.write_inventory(hosts)
    tops = graph.tops()
    submitted = farm.cli("submit", "--closure", "--priority", "3",
                         *(graph.drvs[t] for t in tops))
    assert len(submitted.stdout.split()) == len(tops)
    assert submitted.stderr == f"{len(graph.nodes) - len(tops)} build(s) of inputs submitted " \
        "with it\n"
    done = farm.run()
    assert done.returncode == 0, done.stdout[-3000:]
    counts = check_graph(farm, graph, tops, done.stdout)
    assert counts["builds"] == len(graph.nodes)
    # One attempt per build that ran: no setup failure, no retry.
    assert counts["attempts"] == len(graph.nodes) - len(graph.dependants(graph.failing))
    assert set(farm.rows("SELECT DISTINCT priority FROM build")) == {(3,)}


def test_the_coordinator_killed_mid_graph_and_started_again(
    farm: Farm, hosts: list[Host]
) -> None:
    """Tops only, with the hooks; `run` is SIGKILLed once 60 builds have succeeded (attempts,
    hooks and their events in flight), then started again until it is idle."""
    graph = instantiate_graph(token())
    farm.write_inventory(hosts)
    tops = graph.tops()
    farm.submit(*(graph.drvs[t] for t in tops))
    coordinator = farm.background()
    try:
        wait_for("60 builds to succeed", lambda: farm.rows(
            "SELECT COUNT(*) FROM build WHERE state = 'succeeded'")[0][0] >= 60, timeout=300)
    finally:
        coordinator.process.send_signal(signal.SIGKILL)
        coordinator.process.wait(60)
    first = coordinator.stop()
    assert coordinator.process.returncode == -signal.SIGKILL
    assert farm.rows("SELECT COUNT(*) FROM build WHERE state IN ('queued', 'running')")[0][0]
    done = farm.run()
    assert done.returncode == 0, done.stdout[-3000:]
    check_graph(farm, graph, tops, first + done.stdout)
