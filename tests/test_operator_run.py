"""Operator controls with `buildfarm run` on the real test bed: retries of builder failures and
flaky builds, machine tags, and why a queued build is waiting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from farm import Farm, chain, gated_build, token, wait_for
from testbed import Host, Testbed, current_system, instantiate, inventory_yaml, nix_expr_trivial


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Iterator[Farm]:
    yield Farm(tmp_path / "state", tmp_path / "inventory.yaml")


def marks_dir(testbed: Testbed, tag: str) -> Path:
    """A directory every host's builder may write (the test bed's own is root's)."""
    marks = testbed.directory / f"marks-{tag}"
    marks.mkdir()
    marks.chmod(0o777)
    return marks


def fails_first(tag: str, marks: Path, times: int = 1) -> str:
    """A derivation whose builder fails its first `times` runs (on any machine), then
    succeeds: a flaky test suite."""
    checks = "".join(
        f"if [ ! -e {marks}/failed{n} ]; then echo failing {n} > {marks}/failed{n}; "
        f"echo flaky {tag} failure {n}; exit 1; fi; " for n in range(times))
    return instantiate(nix_expr_trivial(f"flaky-{tag}", checks + f"echo {tag} > $out"))


def test_a_flaky_builder_is_tried_again_elsewhere_and_marked(
    farm: Farm, hosts: list[Host], testbed: Testbed
) -> None:
    tag = token()
    marks = marks_dir(testbed, tag)
    flaky = fails_first(tag, marks)
    always = instantiate(nix_expr_trivial(f"always-{tag}", f"echo always {tag}; exit 1"))
    never = instantiate(nix_expr_trivial(f"never-{tag}", f"echo never {tag}; exit 1"))
    farm.write_inventory(hosts, max_builds=1)
    farm.inventory.write_text("build_retries: 1\n" + farm.inventory.read_text())
    (flaky_build,) = farm.submit(flaky)  # the inventory's build_retries: 1
    (always_build,) = farm.submit(always, extra=("--retries", "2"))
    (never_build,) = farm.submit(never, extra=("--retries", "0"))
    done = farm.run("--retry-delay", "0.2")
    assert done.returncode == 0, done.stdout

    info = farm.show(flaky_build)
    assert info["state"] == "succeeded", (info, done.stdout)
    assert (info["flaky"], info["builder_failures"], info["retries"]) == (True, 1, None)
    first, second = info["attempts"]
    assert (first["result"], second["result"]) == ("failure", "success")
    assert first["machine"] != second["machine"]  # tried again on the other machine
    assert first["log"] and first["log"] != second["log"]  # each attempt keeps its log
    assert f"build {flaky_build} failed (on {first['machine']})" in done.stdout
    assert "trying again (retry 1)" in done.stdout
    assert "flaky: its builder failed before" in done.stdout
    shown = farm.cli("builds", "show", flaky_build).stdout
    assert "flaky" in shown and "succeeded after 1 builder failure(s)" in shown

    info = farm.show(always_build)
    assert info["state"] == "failed" and not info["flaky"]
    assert [a["result"] for a in info["attempts"]] == ["failure"] * 3
    assert info["builder_failures"] == 3
    info = farm.show(never_build)
    assert info["state"] == "failed" and len(info["attempts"]) == 1  # 0 wins over the default

    flaky_rows = json.loads(farm.cli("builds", "list", "--flaky", "--json").stdout)
    assert [row["uuid"] for row in flaky_rows] == [flaky_build]
    # A failed build is announced once, when it ends: no build-failure event for a retry.
    failures = [e.payload["build"]["uuid"] for e in farm.events() if e.name == "build-failure"]
    assert sorted(failures) == sorted([always_build, never_build])


def test_a_tagged_build_waits_for_the_only_tagged_machine_and_says_why(
    farm: Farm, hosts: list[Host], testbed: Testbed
) -> None:
    """Machine tags restrict builds to the machines carrying them, while `builds show` and
    `buildfarm queue` say why each queued build waits: the tagged machine busy, no machine
    carrying a tag, run stopped."""
    tag = token()
    tagged, plain_host = hosts
    gate = testbed.directory / f"gate-{tag}"
    machines = yaml.safe_load(inventory_yaml(hosts, max_builds=1))
    machines["machines"][0]["tags"] = {"gpu": "a100"}
    farm.inventory.write_text(yaml.safe_dump(machines))
    gpu = ("--machine-tag", "gpu=a100")
    (first,) = farm.submit(gated_build(tag, gate), extra=gpu)
    (second,) = farm.submit(
        instantiate(nix_expr_trivial(f"second-{tag}", f"echo {tag} > $out")), extra=gpu)
    (nowhere,) = farm.submit(
        instantiate(nix_expr_trivial(f"nowhere-{tag}", f"echo {tag} > $out")),
        extra=("--machine-tag", "gpu=h100"))
    (plain,) = farm.submit(instantiate(nix_expr_trivial(f"plain-{tag}", f"echo {tag} > $out")))
    run = farm.background()
    try:
        run.wait_line(f"build {first} started on {tagged.name}")
        farm.wait_for_state(plain, "succeeded")
        assert farm.show(plain)["attempts"][0]["machine"] == plain_host.name

        def second_waits() -> bool:
            waiting = farm.show(second)["waiting"]
            return waiting is not None and waiting["reason"] == "machines-unavailable"

        wait_for("the second tagged build waiting for the busy machine", second_waits)
        waiting = farm.show(second)["waiting"]
        assert waiting["machines"] == [
            {"name": tagged.name, "status": "busy", "until": None, "error": None}]
        assert f"{tagged.name} busy (1/1)" in farm.cli("builds", "show", second).stdout
        assert farm.show(nowhere)["waiting"]["summary"] == (
            f"no machine in the inventory for {current_system()} carries the machine tags "
            "gpu=h100")
        groups = json.loads(farm.cli("queue", "--json").stdout)
        assert {(g["reason"], g["count"]) for g in groups} == {
            ("machines-unavailable", 1), ("no-machine", 1)}
        gate.touch()
        farm.wait_for_state(second, "succeeded")
    finally:
        gate.touch()
        out = run.stop()
    assert run.process.returncode == 0, out
    assert [a["machine"] for b in (first, second) for a in farm.show(b)["attempts"]] == [
        tagged.name, tagged.name]
    assert farm.show(second)["machine_tags"] == {"gpu": "a100"}
    (late,) = farm.submit(instantiate(nix_expr_trivial(f"late-{tag}", f"echo {tag} > $out")))
    assert farm.show(late)["waiting"]["reason"] == "no-coordinator"
    assert farm.show(nowhere)["waiting"]["reason"] == "no-machine"
    rows = json.loads(farm.cli("machines", "--json").stdout)
    assert [row["tags"] for row in rows] == [{"gpu": "a100"}, {}]


def test_cancel_by_filter_stops_what_runs_and_spares_what_others_need(
    farm: Farm, hosts: list[Host], testbed: Testbed
) -> None:
    """On a running farm: the builds of an old branch are canceled by tag, sparing the input a
    build of the new branch needs; a running one among them is stopped on its machine."""
    tag = token()
    gate = testbed.directory / f"gate-{tag}"
    leaf, top = chain(2, tag)
    farm.write_inventory(hosts[:1], max_builds=1)
    (gated,) = farm.submit(gated_build(tag, gate), extra=("--tag", "branch=old"))
    (leaf_build,) = farm.submit(leaf, extra=("--tag", "branch=old"))
    (top_build,) = farm.submit(top, extra=("--tag", "branch=new"))
    run = farm.background()
    try:
        run.wait_line(f"build {gated} started")
        done = farm.cli("builds", "cancel", "--tag", "branch=old",
                        "--ignore-if-required-by-another")
        assert done.stdout == "canceled 1 build; 1 left alone: a build not chosen needs them\n"
        run.wait_line(f"build {gated} canceled: stopping it")
        farm.wait_for_state(top_build, "succeeded")
    finally:
        gate.touch()
        out = run.stop()
    assert run.process.returncode == 0, out
    assert farm.state_of(gated) == "canceled" and farm.state_of(leaf_build) == "succeeded"
    assert [a.result for a in farm.attempts(gated)] == ["interrupted"]
