"""Builds that cannot make progress end, or are reported, and never loop (issues 18 and 20):
every failure kind waits before a retry and counts toward a limit; a derivation no machine's
store serves is refused at submit; `run --exit-when-idle` exits when nothing can progress and
says what is stuck and why."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from farm import Farm, token
from testbed import Host, Testbed, instantiate, inventory_yaml

DATA = Path(__file__).parent / "data"
GREP = DATA / "guix" / "63j9givlcpv1rd53sw8jz38aysmjkhhr-grep-3.8.drv"  # a Guix derivation


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Iterator[Farm]:
    yield Farm(tmp_path / "state", tmp_path / "inventory.yaml")


def test_a_derivation_of_a_store_no_machine_serves_is_refused(
    farm: Farm, hosts: list[Host]
) -> None:
    farm.write_inventory(hosts)  # Nix machines only
    done = farm.cli("submit", str(GREP), check=False)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"Error: {GREP}: no machine of the inventory serves its store, "
                           "/gnu/store (theirs: /nix/store)\n")
    assert not (farm.state / "buildfarm.db").exists() or not farm.rows("SELECT * FROM build")


def test_a_store_command_that_always_fails_is_retried_after_waits_then_given_up(
    farm: Farm, hosts: list[Host]
) -> None:
    """The hot loop of issue 20 (a Guix derivation on a Nix machine: 202 attempts in 10 s):
    here the inventory says a Nix machine serves /gnu/store, so submit accepts it and the
    machine's store refuses every query. The machine is paused after each failure (1 s,
    doubling, jittered), so each retry waits, and after --retry-limit attempts the build ends
    failed with the store's reason."""
    machines = yaml.safe_load(inventory_yaml(hosts[:1], "nix", store_dir="/gnu/store"))
    farm.inventory.write_text(yaml.safe_dump(machines))
    (build,) = farm.submit(str(GREP))
    done = farm.run("--retry-limit", "4")
    assert done.returncode == 0, done.stdout
    info = farm.show(build)
    assert info["state"] == "failed"
    assert info["reason"].startswith("gave up after 4 attempts in a row that made no progress; "
                                     "the last: store command failed: "), info["reason"]
    assert "is not in the Nix store" in info["reason"]
    attempts = farm.rows(
        "SELECT a.started_at, a.ended_at, a.result FROM attempt AS a JOIN build AS b"
        " ON b.id = a.build_id WHERE b.uuid = ? ORDER BY a.id", build)
    assert [result for _, _, result in attempts] == ["interrupted"] * 4
    # Each retry waited at least 0.8 of 1 s, 2 s, 4 s after the attempt before it ended.
    for number, (previous, current) in enumerate(itertools.pairwise(attempts)):
        assert current[0] - previous[1] >= 0.8 * 2**number, attempts
    ((failures, last_error),) = farm.rows(
        "SELECT failures, last_error FROM machine_state WHERE name = ?", hosts[0].name)
    assert failures >= 1 and "is not in the Nix store" in last_error
    assert f"build {build} failed: gave up after 4 attempts" in done.stdout


def _drv_expr(name: str, system: str = "builtins.currentSystem", features: str = "",
              attrs: str = "") -> str:
    needs = f' requiredSystemFeatures = ["{features}"];' if features else ""
    return (f'derivation {{ name = "{name}"; system = {system}; builder = "/bin/sh"; '
            f'args = ["-c" "echo > $out"];{needs}{attrs} }}')


def test_exit_when_idle_says_what_is_stuck_and_why(farm: Farm, hosts: list[Host]) -> None:
    """A build for a system no machine builds, one needing a feature no machine offers, one
    only an unreachable machine could take, and one waiting for that one: run exits (it used
    to wait for ever) and names each group with its reason."""
    tag = token()
    other = "aarch64-linux" if os.uname().machine != "aarch64" else "x86_64-linux"
    foreign = instantiate(_drv_expr(f"foreign-{tag}", f'"{other}"'))
    parallel = instantiate(_drv_expr(f"parallel-{tag}", features="big-parallel"))
    kvm = _drv_expr(f"kvm-{tag}", features="kvm")
    waits = instantiate(_drv_expr(f"waits-{tag}", attrs=f" dep = {kvm};"))
    kvm_drv = instantiate(kvm)
    reachable = yaml.safe_load(inventory_yaml(hosts[:1], "nix"))["machines"]
    gone = yaml.safe_load(inventory_yaml(hosts[1:], "nix", features=["kvm"]))["machines"]
    gone[0]["port"] = 1  # nothing listens there
    farm.inventory.write_text(yaml.safe_dump({"machines": reachable + gone}))
    farm.submit(foreign, parallel)
    farm.submit(waits, extra=("--closure",))
    done = farm.run()
    assert done.returncode == 0, done.stdout
    lines = [line.split(" ", 2)[2] for line in done.stdout.splitlines()]
    store = "/nix/store"
    assert (f"stuck: 1 queued build(s) for {other} of {store}: no machine builds for that "
            f"system (e.g. {foreign})") in lines, done.stdout
    system = next(line.split()[5] for line in lines if "parallel-" in line)
    assert (f"stuck: 1 queued build(s) for {system} with features big-parallel of {store}: "
            f"no machine for that system offers those features (e.g. {parallel})") in lines
    unreachable = [line for line in lines if line.startswith(
        f"stuck: 1 queued build(s) for {system} with features kvm of {store}: machine "
        f"{hosts[1].name} is unreachable: ") and line.endswith(f"(e.g. {kvm_drv})")]
    assert len(unreachable) == 1, done.stdout
    assert "stuck: 1 queued build(s) wait for those" in lines
    assert lines[-1] == "nothing else can make progress: exiting"
