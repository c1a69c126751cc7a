"""`buildfarm run` end to end on the real test bed: SSH hosts with private Nix stores."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from farm import Farm, chain, running, token, wait_for
from testbed import Host, Testbed, instantiate, inventory_yaml, nix_expr_trivial


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Iterator[Farm]:
    yield Farm(tmp_path / "state", tmp_path / "inventory.yaml")


def test_chain_across_machines_pushes_the_leaf_output(farm: Farm, hosts: list[Host]) -> None:
    leaf, top = chain(2, token())
    first, second = hosts
    farm.write_inventory([first])
    (leaf_build,) = farm.submit(leaf)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    leaf_info = farm.show(leaf_build)
    assert leaf_info["state"] == "succeeded", leaf_info
    assert leaf_info["attempts"][0]["machine"] == first.name
    leaf_out = leaf_info["outputs"]["out"]
    assert farm.stored_nar(leaf_out).exists()
    assert not second.local_path(leaf_out).exists()

    farm.write_inventory([second])
    (top_build,) = farm.submit(top)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    info = farm.show(top_build)
    assert info["state"] == "succeeded", (info, done.stdout)
    assert info["attempts"][0]["machine"] == second.name
    steps = [s["name"] for s in info["attempts"][0]["steps"]]
    assert steps == ["push-derivations", "push-inputs", "dry-run", "build", "fetch-outputs",
                     "verify-outputs"]
    # A small output comes back on the store session, without a file on the machine.
    assert info["attempts"][0]["steps"][4]["detail"] == "streamed by the store session"
    # The leaf's output went to the second machine from the output store, not rebuilt there.
    assert second.local_path(leaf_out).read_text().startswith("leaf-")
    top_out = info["outputs"]["out"]
    assert farm.stored_nar(top_out).exists()
    assert f"build {top_build} succeeded (on {second.name})" in done.stdout


def test_failing_builder_ends_failed_with_its_log(farm: Farm, hosts: list[Host]) -> None:
    tag = token()
    drv = instantiate(nix_expr_trivial(f"fails-{tag}", f"echo about to fail {tag}; exit 3"))
    farm.write_inventory(hosts)
    (build,) = farm.submit(drv)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    info = farm.show(build)
    assert info["state"] == "failed"
    (attempt,) = info["attempts"]
    assert attempt["result"] == "failure"
    # The builder's exit status, beside the daemon's message naming it (nix-store exits 100).
    assert info["reason"] == f"builder for {drv} failed with exit code 3"
    assert attempt["exit_status"] == 3
    log = farm.cli("log", build).stdout
    assert f"about to fail {tag}" in log
    assert f"build {build} failed" in done.stdout


def test_priorities_on_a_one_slot_machine(farm: Farm, hosts: list[Host]) -> None:
    tag = token()
    drvs = [instantiate(nix_expr_trivial(f"p{n}-{tag}", f"echo {n} > $out")) for n in range(4)]
    farm.write_inventory(hosts[:1], max_builds=1)
    priorities = [0, 5, 1, 9]
    builds = [
        farm.submit(d, extra=("--priority", str(p)))[0]
        for d, p in zip(drvs, priorities, strict=True)
    ]
    done = farm.run()
    assert done.returncode == 0, done.stdout
    started = {b: farm.show(b)["attempts"][0]["started_at"] for b in builds}
    order = [b for _, b in sorted(zip(priorities, builds, strict=True), reverse=True)]
    started_order = sorted(builds, key=lambda b: (started[b], order.index(b)))
    assert started_order == order
    lines = [line for line in done.stdout.splitlines() if " started on " in line]
    assert [line.split()[3] for line in lines] == order


def test_cancel_stops_the_remote_build(farm: Farm, hosts: list[Host]) -> None:
    tag = token()
    drv = instantiate(nix_expr_trivial(f"slow-{tag}", f"echo start {tag}; /bin/sleep 300"))
    farm.write_inventory(hosts[:1])
    (build,) = farm.submit(drv)
    run = farm.background()
    try:
        wait_for("the remote build", lambda: _remote_sleep(tag))
        farm.cli("builds", "cancel", build)
        wait_for("the remote build to end with its cancel", lambda: not _remote_sleep(tag))
        # The coordinator records the interruption once its kill of the remote group is done.
        wait_for("the canceled attempt to close",
                 lambda: farm.show(build)["attempts"][-1]["result"] is not None)
    finally:
        out = run.stop()
    assert run.process.returncode == 0, out
    info = farm.show(build)
    assert info["state"] == "canceled"
    assert [a["result"] for a in info["attempts"]] == ["interrupted"]


def _remote_sleep(tag: str) -> bool:
    """Is the build's shell (its argv names the tag) still running on the test host?"""
    done = subprocess.run(["pgrep", "-f", f"start {tag}"], capture_output=True, text=True)
    return done.returncode == 0


def test_an_unreachable_machine_does_not_stop_the_others(
    farm: Farm, hosts: list[Host], testbed: Testbed
) -> None:
    tag = token()
    drvs = [instantiate(nix_expr_trivial(f"u{n}-{tag}", f"echo {n} > $out")) for n in range(3)]
    text = inventory_yaml(hosts[:1], "nix")
    text += (
        "  - name: gone\n    host: 127.0.0.1\n    port: 1\n    systems: [x86_64-linux]\n"
        "    store: nix\n    connect_timeout: 2\n"
    )
    farm.inventory.write_text(text)
    builds = farm.submit(*drvs)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    for build in builds:
        info = farm.show(build)
        assert info["state"] == "succeeded"
        assert {a["machine"] for a in info["attempts"]} == {hosts[0].name}
    assert "machine gone unavailable" in done.stdout


def test_a_changed_host_key_is_refused(farm: Farm, hosts: list[Host], tmp_path: Path) -> None:
    tag = token()
    drv = instantiate(nix_expr_trivial(f"k-{tag}", f"echo {tag} > $out"))
    bad_known_hosts = tmp_path / "known_hosts"
    other_key = hosts[1].known_hosts_line().split(" ", 1)[1]
    bad_known_hosts.write_text(f"[127.0.0.1]:{hosts[0].port} {other_key}\n")
    farm.write_inventory(hosts[:1], known_hosts=str(bad_known_hosts))
    (build,) = farm.submit(drv)
    run = farm.background()
    try:
        run.wait_line(f"machine {hosts[0].name} unavailable: host key")
    finally:
        out = run.stop()
    assert run.process.returncode == 0, out
    info = farm.show(build)
    assert info["state"] == "queued" and info["attempts"] == []
    assert not hosts[0].local_path(info["outputs"]["out"]).exists()


def test_input_sources_come_from_the_coordinators_store(farm: Farm, hosts: list[Host]) -> None:
    """A builder script made with builtins.toFile exists only where the derivation was made."""
    tag = token()
    script = f'builtins.toFile "script-{tag}.sh" "echo from a source file {tag} > $out"'
    drv = instantiate(
        f'derivation {{ name = "src-{tag}"; system = builtins.currentSystem; '
        f'builder = "/bin/sh"; args = [ ({script}) ]; }}'
    )
    farm.write_inventory(hosts[:1])
    (build,) = farm.submit(drv)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    info = farm.show(build)
    assert info["state"] == "succeeded", (info, done.stdout)
    out = info["outputs"]["out"]
    assert hosts[0].local_path(out).read_text() == f"from a source file {tag}\n"


def test_a_rebuild_over_outputs_alive_on_the_only_machine_compares_them(
    farm: Farm, hosts: list[Host]
) -> None:
    """A rebuild of a derivation whose output is alive on the only machine (a store session
    holds it, and a dependant refers to it) deletes nothing: it builds again with --check and
    records whether the result was identical. A derivation whose output changes from one build
    to the next is told apart, its output still the one stored."""
    tag = token()
    same = instantiate(nix_expr_trivial(f"same-{tag}", f"echo {tag} > $out"))
    varies = instantiate(nix_expr_trivial(
        f"varies-{tag}", "/bin/cat /proc/sys/kernel/random/uuid > $out"))
    user = instantiate(nix_expr_trivial(
        f"user-{tag}", "read x < $dep; echo \"uses $x\" > $out",
        attrs={"dep": nix_expr_trivial(f"same-{tag}", f"echo {tag} > $out")}))
    farm.write_inventory(hosts[:1], max_builds=2)
    first = farm.submit(same, varies, user, extra=("--closure",))
    done = farm.run()
    assert done.returncode == 0, done.stdout
    assert all(farm.show(b)["state"] == "succeeded" for b in first), done.stdout
    stored = {b: farm.show(b)["outputs"]["out"] for b in first[:2]}
    before = {b: farm.rows("SELECT nar_hash FROM stored_output WHERE path = ?", out)
              for b, out in stored.items()}

    again = farm.submit(same, varies)  # no --ignore-if-built: rebuilds on purpose
    done = farm.run()
    assert done.returncode == 0, done.stdout
    for build, expected in zip(again, ("identical", "differs"), strict=True):
        info = farm.show(build)
        assert info["state"] == "succeeded", (info, done.stdout)
        (attempt,) = info["attempts"]  # one attempt: nothing to delete, nothing failed
        assert attempt["check"] == expected
        assert info["reproducible"] is (expected == "identical")
        build_step = next(step for step in attempt["steps"] if step["name"] == "build")
        assert build_step["detail"] == "with --check: compared with the outputs on the machine"
        assert f"build {build} succeeded (on {hosts[0].name}, checked: {expected})" in done.stdout
    # The machine kept its output; so did the output store.
    for build, out in stored.items():
        assert hosts[0].local_path(out).exists()
        assert farm.rows("SELECT nar_hash FROM stored_output WHERE path = ?", out) == before[build]
    text = farm.cli("builds", "show", again[1]).stdout
    assert "reproducible: no: a rebuild differed" in text and "--check: differs" in text


def test_a_rebuild_moves_to_a_machine_that_lacks_the_outputs(
    farm: Farm, hosts: list[Host]
) -> None:
    """Two machines, the output alive on the one the scheduler prefers: the rebuild goes to the
    other and builds there for real, after one setup failure (outputs-present, not counted
    against the build, no wait)."""
    tag = token()
    drv = instantiate(nix_expr_trivial(f"moves-{tag}", f"echo {tag} > $out"))
    holder, other = hosts
    farm.write_inventory([holder])
    (first,) = farm.submit(drv)
    assert farm.run().returncode == 0
    out = farm.show(first)["outputs"]["out"]
    assert holder.local_path(out).exists() and not other.local_path(out).exists()
    machines = [  # the holder is faster: the scheduler offers it the build first
        *yaml.safe_load(inventory_yaml([holder], "nix", speed=8.0))["machines"],
        *yaml.safe_load(inventory_yaml([other], "nix"))["machines"],
    ]
    farm.inventory.write_text(yaml.safe_dump({"machines": machines}))
    with running(farm) as run:
        run.wait_line(f"machine {holder.name} connected")
        run.wait_line(f"machine {other.name} connected")
        (rebuild,) = farm.submit(drv)
        farm.wait_for_state(rebuild, "succeeded")
    info = farm.show(rebuild)
    results = [(a["machine"], a["result"], a["setup_failure"]) for a in info["attempts"]]
    assert results == [(holder.name, "setup-failure", "outputs-present"),
                       (other.name, "success", None)], results
    assert info["attempts"][-1]["check"] is None and info["reproducible"] is None
    ((fruitless, retry_after),) = farm.rows(
        "SELECT fruitless_attempts, retry_after FROM build WHERE uuid = ?", rebuild)
    assert (fruitless, retry_after) == (0, None)
    assert other.local_path(out).exists()
