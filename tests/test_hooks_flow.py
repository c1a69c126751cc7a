"""Hooks on the real test bed, through `buildfarm run`: the shipped missing-inputs hook builds a
chain from its top, a failing leaf ends it, hooks that hang are killed while builds go on, and an
event survives a coordinator killed before (or while) its hook runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from farm import Farm, chain, token, wait_for
from testbed import Host, Testbed, instantiate, nix_expr_trivial, process_state

from buildfarm.coordinator import hooks

SHIPPED = Path(__file__).parent.parent / "hooks.d"


@pytest.fixture
def hooks_dir(tmp_path: Path) -> Path:
    """A copy of the shipped hooks, to which a test adds its own."""
    target = tmp_path / "hooks.d"
    shutil.copytree(SHIPPED, target)
    return target


@pytest.fixture
def farm(
    tmp_path: Path, testbed: Testbed, private_nix: Path, hooks_dir: Path
) -> Iterator[Farm]:
    yield Farm(tmp_path / "state", tmp_path / "inventory.yaml", hooks_dir)


def add_hook(hooks_dir: Path, event: str, name: str, body: str) -> None:
    directory = hooks_dir / f"{event}.d"
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def check_events(farm: Farm) -> None:
    """Every event was delivered and carries exactly what hooks.EVENTS declares."""
    declared = {e.name: e for e in hooks.EVENTS}
    for event in farm.events():
        assert event.delivered, event
        assert set(event.payload) == {"event", "build", *declared[event.name].fields}, event
        assert set(event.payload["build"]) == set(hooks.BUILD_FIELDS), event


def stop(process: subprocess.Popen[str], how: int = signal.SIGTERM) -> str:
    if process.poll() is None:
        process.send_signal(how)
    out, _ = process.communicate(timeout=120)
    return out


def kill_orphan(pid_file: Path) -> None:
    """A hook the killed coordinator left behind (it leads its own session) is killed by pid."""
    pid = int(pid_file.read_text())
    if process_state(pid) not in ("", "Z"):
        os.kill(pid, signal.SIGKILL)
    wait_for(f"hook {pid} to die", lambda: process_state(pid) in ("", "Z"), 10)


def test_a_three_level_chain_builds_from_its_top(farm: Farm, hosts: list[Host]) -> None:
    """Only the top is submitted, nothing is prebuilt: the shipped build-missing-inputs hook
    submits the levels below (all the machine would build, from the top's dry run), and each of
    the three builds once, in dependency order."""
    leaf, middle, top = chain(3, token())
    farm.write_inventory(hosts)
    farm.env["BUILDFARM_TRACE_HOOKS"] = "1"
    (top_build,) = farm.submit(top, extra=("--priority", "5", "--tag", "job=chain"))
    done = farm.run()
    assert done.returncode == 0, done.stdout

    listed = farm.builds()
    assert sorted(b["derivation"] for b in listed) == sorted([leaf, middle, top]), listed
    uuid = {b["derivation"]: b["uuid"] for b in listed}
    assert uuid[top] == top_build
    infos = {drv: farm.show(uuid[drv]) for drv in (leaf, middle, top)}
    for drv, info in infos.items():
        assert info["state"] == "succeeded", (drv, info, done.stdout)
        successes = [a for a in info["attempts"] if a["result"] == "success"]
        assert len(successes) == 1, info["attempts"]
        assert info["priority"] == 5 and info["tags"] == {"job": "chain"}
    # The missing-inputs hook submitted the middle and the leaf for the top.
    hook = "hook build-missing-inputs/50-submit-missing-inputs"
    assert f"{hook}: submitted {uuid[middle]} {middle} for {top_build}" in done.stdout
    assert f"{hook}: submitted {uuid[leaf]} {leaf} for {top_build}" in done.stdout

    # In dependency order: each level's successful attempt started after the one below
    # succeeded (events are numbered in commit order).
    events = farm.events()
    succeeded = {e.payload["build"]["uuid"]: e for e in events if e.name == "build-success"}
    assert set(succeeded) == set(uuid.values())

    def started(drv: str) -> int:
        attempt = succeeded[uuid[drv]].payload["attempt"]
        (event,) = [e for e in events if e.name == "build-started"
                    and e.payload["attempt"] == attempt]
        return event.id

    assert succeeded[uuid[leaf]].id < started(middle)
    assert succeeded[uuid[middle]].id < started(top)
    out = infos[top]["outputs"]["out"]
    (success,) = [a for a in infos[top]["attempts"] if a["result"] == "success"]
    (built_on,) = [h for h in hosts if h.name == success["machine"]]
    assert built_on.local_path(out).exists()

    for drv in (leaf, middle, top):
        assert f"hook build-success/50-log: build {uuid[drv]} succeeded: {drv}" in done.stdout
    traces = [line for line in done.stdout.splitlines() if " trace: event=" in line]
    assert sum("event=build-success " in line for line in traces) == 3
    assert all(" exit=0 time=" in line for line in traces), traces
    check_events(farm)


def test_a_failing_leaf_ends_the_chain_dependency_failed(farm: Farm, hosts: list[Host]) -> None:
    tag = token()
    leaf, middle, top = chain(3, tag, leaf_script=f"echo leaf {tag} fails; exit 1")
    farm.write_inventory(hosts)
    (top_build,) = farm.submit(top)
    done = farm.run()
    assert done.returncode == 0, done.stdout  # it went idle: nothing is resubmitted forever

    listed = farm.builds()
    assert sorted(b["derivation"] for b in listed) == sorted([leaf, middle, top]), listed
    by_drv = {b["derivation"]: b for b in listed}
    assert by_drv[top]["uuid"] == top_build
    assert all(b["state"] == "failed" for b in listed), listed
    assert not by_drv[leaf]["reason"].startswith("dependency-failed")
    # Both name the root cause: the leaf and its build (the top also the input it waited for).
    root = f"dependency-failed: {leaf} (build {by_drv[leaf]['uuid']})"
    assert by_drv[middle]["reason"] == root
    assert by_drv[top]["reason"] in (root, f"{root} via {middle}")
    leaf_info = farm.show(by_drv[leaf]["uuid"])
    assert [a["result"] for a in leaf_info["attempts"]] == ["failure"]
    for drv in (middle, top):
        results = [a["result"] for a in farm.show(by_drv[drv]["uuid"])["attempts"]]
        assert "success" not in results and "failure" not in results, results
    for b in listed:
        line = f"hook build-failure/50-log: build {b['uuid']} failed: {b['derivation']}: "
        assert line + b["reason"] in done.stdout
    check_events(farm)


def test_a_hook_past_its_timeout_is_killed_while_builds_go_on(
    farm: Farm, hosts: list[Host], hooks_dir: Path, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    add_hook(
        hooks_dir, "build-started", "10-hang",
        f'/bin/sleep 1000 & echo $! > {pids}/"$BUILDFARM_BUILD_UUID"-child\n'
        f'echo $$ > {pids}/"$BUILDFARM_BUILD_UUID"\n'
        "echo about to hang\n"
        "exec /bin/sleep 1000\n",
    )
    tag = token()
    drvs = [instantiate(nix_expr_trivial(f"t{n}-{tag}", f"echo {n} > $out")) for n in range(3)]
    farm.write_inventory(hosts)
    farm.env["BUILDFARM_TRACE_HOOKS"] = "1"
    builds = farm.submit(*drvs)
    done = farm.run("--hook-timeout", "2", "--hook-parallelism", "3")
    assert done.returncode == 0, done.stdout
    for build in builds:
        assert farm.show(build)["state"] == "succeeded"
        assert f"hook build-success/50-log: build {build} succeeded" in done.stdout
        for pid_file in (pids / build, pids / f"{build}-child"):
            assert process_state(int(pid_file.read_text())) in ("", "Z")
    lines = done.stdout.splitlines()
    assert sum(line.endswith("hook build-started/10-hang: about to hang") for line in lines) == 3
    killed = [line for line in lines if "hook build-started/10-hang: killed after the 2s timeout"
              in line]
    assert len(killed) == 3, done.stdout
    hung = [line for line in lines if "trace: event=build-started" in line]
    assert len(hung) == 3 and all(" exit=none " in line for line in hung)
    check_events(farm)


def test_a_slow_hook_does_not_delay_allocation(
    farm: Farm, hosts: list[Host], hooks_dir: Path, tmp_path: Path
) -> None:
    """A build-started hook that waits until the test releases it (its timeout an hour):
    every build starts and succeeds while the first hook still waits."""
    marks = tmp_path / "marks"
    release = tmp_path / "release"
    add_hook(
        hooks_dir, "build-started", "10-slow",
        f'echo "start $BUILDFARM_BUILD_UUID" >> {marks}\n'
        f"while [ ! -e {release} ]; do /bin/sleep 0.1; done\n"
        f'echo "end $BUILDFARM_BUILD_UUID" >> {marks}\n',
    )
    tag = token()
    drvs = [instantiate(nix_expr_trivial(f"s{n}-{tag}", f"echo {n} > $out")) for n in range(3)]
    farm.write_inventory(hosts[:1], max_builds=1)
    builds = farm.submit(*drvs)
    coordinator = farm.start("--exit-when-idle", "--hook-timeout", "3600",
                             "--hook-parallelism", "1")
    try:
        wait_for(
            "every build to succeed",
            lambda: all(farm.show(b)["state"] == "succeeded" for b in builds),
        )
        seen = marks.read_text().splitlines()
        assert seen[:1] and seen[0].startswith("start "), seen
        assert not any(line.startswith("end ") for line in seen), seen  # still waiting
        release.touch()
        out, _ = coordinator.communicate(timeout=120)
    finally:
        release.touch()
        if coordinator.poll() is None:
            stop(coordinator)
    assert coordinator.returncode == 0, out
    lines = out.splitlines()
    succeeded = [i for i, line in enumerate(lines) if " succeeded (on " in line]
    assert len(succeeded) == 3
    success_hooks = [i for i, line in enumerate(lines) if "hook build-success/50-log" in line]
    assert len(success_hooks) == 3
    assert max(succeeded) < min(success_hooks)  # each waited behind its build's slow hook
    assert sorted(marks.read_text().split()).count("end") == 3
    check_events(farm)


def test_an_event_recorded_before_a_sigkill_is_delivered_after_restart(
    farm: Farm, hosts: list[Host], hooks_dir: Path, tmp_path: Path
) -> None:
    """The coordinator is killed after the build succeeded but before its build-success hook
    ran (the build's build-started hook holds it back): the next run delivers it."""
    release = tmp_path / "release"
    record = tmp_path / "success"
    add_hook(
        hooks_dir, "build-started", "10-block",
        f"echo $$ > {tmp_path}/blocker\nwhile [ ! -e {release} ]; do /bin/sleep 0.1; done\n",
    )
    add_hook(hooks_dir, "build-success", "20-record",
             f'echo "$BUILDFARM_BUILD_UUID $BUILDFARM_EVENT_ID" >> {record}\n')
    tag = token()
    drv = instantiate(nix_expr_trivial(f"k-{tag}", f"echo {tag} > $out"))
    farm.write_inventory(hosts[:1])
    (build,) = farm.submit(drv)
    coordinator = farm.start()
    try:
        wait_for("the build to succeed", lambda: farm.show(build)["state"] == "succeeded")
        wait_for("the blocking hook", (tmp_path / "blocker").exists)
    finally:
        out = stop(coordinator, signal.SIGKILL)
    assert coordinator.returncode == -signal.SIGKILL
    assert f"build {build} succeeded" in out
    kill_orphan(tmp_path / "blocker")
    assert not record.exists()
    pending = [e for e in farm.events() if not e.delivered]
    assert [e.name for e in pending] == ["build-started", "build-success"], pending

    release.touch()
    done = farm.run()
    assert done.returncode == 0, done.stdout
    (line,) = record.read_text().splitlines()
    assert line == f"{build} {pending[1].id}"
    assert f"hook build-success/50-log: build {build} succeeded" in done.stdout
    check_events(farm)


def test_an_event_whose_hook_was_killed_midway_is_delivered_again(
    farm: Farm, hosts: list[Host], hooks_dir: Path, tmp_path: Path
) -> None:
    """At least once: the coordinator dies while the hook runs; the next run runs it again."""
    release = tmp_path / "release"
    runs = tmp_path / "runs"
    add_hook(
        hooks_dir, "build-success", "10-slow",
        f'echo "run $BUILDFARM_EVENT_ID" >> {runs}\necho $$ > {tmp_path}/pid\n'
        f"while [ ! -e {release} ]; do /bin/sleep 0.1; done\n"
        f'echo "done $BUILDFARM_EVENT_ID" >> {runs}\n',
    )
    tag = token()
    drv = instantiate(nix_expr_trivial(f"m-{tag}", f"echo {tag} > $out"))
    farm.write_inventory(hosts[:1])
    (build,) = farm.submit(drv)
    coordinator = farm.start()
    try:
        wait_for("the hook to start", (tmp_path / "pid").exists)
    finally:
        stop(coordinator, signal.SIGKILL)
    kill_orphan(tmp_path / "pid")
    (event,) = [e for e in farm.events() if e.name == "build-success"]
    assert not event.delivered
    assert farm.show(build)["state"] == "succeeded"

    release.touch()
    done = farm.run()
    assert done.returncode == 0, done.stdout
    assert runs.read_text().splitlines() == [f"run {event.id}", f"run {event.id}",
                                             f"done {event.id}"]
    check_events(farm)


def test_hooks_list_shows_the_shipped_hooks(farm: Farm) -> None:
    listed = json.loads(farm.cli("hooks", "list", "--json").stdout)
    scripts = {e["event"]: [os.path.basename(s) for s in e["scripts"]] for e in listed["events"]}
    assert scripts == {
        "build-submitted": [],
        "build-started": [],
        "build-success": ["50-log"],
        "build-failure": ["50-log"],
        "build-missing-inputs": ["50-submit-missing-inputs"],
        "build-canceled": [],
    }
