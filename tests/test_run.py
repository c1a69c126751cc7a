"""`buildfarm run` end to end on the real test bed: SSH hosts with private Nix stores."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from farm import Farm, chain, gated_build, token, wait_for
from testbed import Host, Testbed, instantiate, inventory_yaml, nix_expr_trivial


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Iterator[Farm]:
    yield Farm(tmp_path / "state", tmp_path / "inventory.yaml")


def stored_nar(state: Path, store_path: str) -> Path:
    return state / "outputs" / "nar" / os.path.basename(store_path)


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
    assert stored_nar(farm.state, leaf_out).exists()
    assert not second.local_path(leaf_out).exists()

    farm.write_inventory([second])
    (top_build,) = farm.submit(top)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    info = farm.show(top_build)
    assert info["state"] == "succeeded", (info, done.stdout)
    assert info["attempts"][0]["machine"] == second.name
    steps = [s["name"] for s in info["attempts"][0]["steps"]]
    assert steps == ["push-derivations", "push-inputs", "dry-run", "delete-outputs", "build",
                     "fetch-outputs", "verify-outputs"]
    # A small output comes back on the store session, without a file on the machine.
    assert info["attempts"][0]["steps"][5]["detail"] == "streamed by the store session"
    # The leaf's output went to the second machine from the output store, not rebuilt there.
    assert second.local_path(leaf_out).read_text().startswith("leaf-")
    top_out = info["outputs"]["out"]
    assert stored_nar(farm.state, top_out).exists()
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


# nix-store, except that a refused --delete leaves $HOME/delete-refused behind.
TELLING_NIX_STORE = """#!/bin/sh
if [ "$1" = --delete ]; then
    /usr/bin/nix-store "$@" && exit 0
    status=$?
    touch "$HOME/delete-refused"
    exit $status
fi
exec /usr/bin/nix-store "$@"
"""


def test_a_rebuild_deletes_outputs_a_reused_store_session_held(
    farm: Farm, testbed: Testbed
) -> None:
    """A build's store session roots its output until the session ends, and sessions are reused:
    the session that built X goes on to serve a build C that runs until the test lets it end. A
    rebuild of X on that machine must delete X's output, which C's session holds: its delete is
    refused, it waits for that session to come back (and end) and deletes then, instead of
    failing its attempt."""
    tag = token()
    bin_dir = testbed.directory / f"telling-bin-{tag}"
    bin_dir.mkdir(mode=0o755)
    (bin_dir / "nix-store").write_text(TELLING_NIX_STORE)
    (bin_dir / "nix-store").chmod(0o755)
    host = testbed.add_host(env={"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"})
    gate = testbed.directory / f"gate-{tag}"
    again = instantiate(nix_expr_trivial(f"again-{tag}", f"echo {tag} > $out"))
    farm.write_inventory([host], max_builds=2)
    (first,) = farm.submit(again)
    run = farm.background()
    try:
        farm.wait_for_state(first, "succeeded")
        (held,) = farm.submit(gated_build(tag, gate))  # takes the session that built `again`
        wait_for("the gated build to run", lambda: any(
            a.step == "build" and a.result is None for a in farm.attempts(held)))
        (rebuild,) = farm.submit(again)
        wait_for("the rebuild's delete to be refused",
                 lambda: (host.home_dir / "delete-refused").exists())
        gate.touch()
        farm.wait_for_state(rebuild, "succeeded")
        farm.wait_for_state(held, "succeeded")
    finally:
        gate.touch()
        output = run.stop()
        testbed.remove_host(host)
    (attempt,) = farm.attempts(rebuild)  # one attempt: the delete did not fail
    assert attempt.result == "success", (attempt, output)
    steps = [s["name"] for s in farm.show(rebuild)["attempts"][0]["steps"]]
    assert "delete-outputs" in steps
    assert [a.result for a in farm.attempts(held)] == ["success"]
