"""The `run` service's lifecycle: one per datastore, stopping, restarting after a crash, views."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from farm import Farm, check_stored, gated_build, token, wait_for
from testbed import Host, Testbed, instantiate, inventory_yaml, nix_expr_trivial


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Farm:
    return Farm(tmp_path / "state", tmp_path / "inventory.yaml")


def remote_running(tag: str) -> bool:
    """Is a builder whose command line names `tag` still running (on any test host)?"""
    return subprocess.run(["pgrep", "-f", f"run {tag}"], capture_output=True).returncode == 0


def slow_build(tag: str, seconds: int = 300) -> str:
    return instantiate(nix_expr_trivial(f"slow-{tag}", f"echo run {tag}; /bin/sleep {seconds}"))


def test_without_an_inventory_run_says_where_it_looked(farm: Farm) -> None:
    done = farm.cli("run", "--no-ui", check=False)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert f"no inventory at {farm.inventory}" in done.stderr
    assert "inventory.example.yaml" in done.stderr


def test_a_broken_inventory_is_one_line_with_its_position(farm: Farm) -> None:
    farm.inventory.write_text("machines:\n  - name: a\n    hots: x\n")
    done = farm.cli("run", "--no-ui", check=False)
    assert done.returncode == 1
    assert f"{farm.inventory}:3:5:" in done.stderr
    assert "Traceback" not in done.stderr


def test_only_one_coordinator_per_datastore(farm: Farm, hosts: list[Host]) -> None:
    farm.write_inventory(hosts[:1])
    first = farm.start()
    try:
        wait_for("the first coordinator", lambda: _lock_taken(farm))
        second = farm.cli("run", "--no-ui", "--exit-when-idle", check=False)
        assert second.returncode == 1
        assert "already using this datastore" in second.stderr
        assert second.stderr.count("\n") == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 0


def _lock_taken(farm: Farm) -> bool:
    lock = farm.state / "buildfarm.db.run-lock"
    return lock.exists() and lock.read_text().strip().isdigit()


def test_stopping_gives_a_grace_period_then_stops_and_requeues(
    farm: Farm, hosts: list[Host]
) -> None:
    tag = token()
    farm.write_inventory(hosts[:1])
    (build,) = farm.submit(slow_build(tag))
    coordinator = farm.start("--grace", "1")
    try:
        wait_for("the remote build", lambda: remote_running(tag))
        coordinator.send_signal(signal.SIGTERM)
    finally:
        out, _ = coordinator.communicate(timeout=60)
    assert coordinator.returncode == 0, out
    assert "waiting up to 1s" in out
    wait_for("the remote build to stop", lambda: not remote_running(tag), timeout=20)
    info = farm.show(build)
    assert info["state"] == "queued"
    assert [a["result"] for a in info["attempts"]] == ["interrupted"]
    assert "coordinator stopping" in info["attempts"][0]["detail"]


def test_sigint_stops_allocating_and_lets_running_builds_finish(
    farm: Farm, hosts: list[Host], testbed: Testbed
) -> None:
    """SIGINT: no new build starts, the running one gets the grace period (an hour: it ends
    long before), and `run` exits once it has ended."""
    tag = token()
    gate = testbed.directory / f"gate-{tag}"
    farm.write_inventory(hosts[:1], max_builds=2)
    (build,) = farm.submit(gated_build(tag, gate))
    run = farm.background("--grace", "3600")
    try:
        wait_for("the gated build", lambda: remote_running(tag))
        run.process.send_signal(signal.SIGINT)
        run.wait_line("stopping: waiting up to 3600s for 1 running build(s) (interrupt again")
        (late,) = farm.submit(instantiate(nix_expr_trivial(f"late-{tag}", f"echo {tag} > $out")))
        gate.touch()
        run.process.wait(timeout=120)  # by itself: the build ended
    finally:
        gate.touch()
        out = run.stop()
    assert run.process.returncode == 0, out
    assert [a["result"] for a in farm.show(build)["attempts"]] == ["success"]
    assert farm.state_of(build) == "succeeded"
    assert farm.show(late)["attempts"] == [], out  # a free slot, but no allocation after SIGINT


def test_a_second_sigint_stops_at_once(farm: Farm, hosts: list[Host], testbed: Testbed) -> None:
    """The second SIGINT ends the grace period: the build, whose gate never opens and whose
    grace would last an hour, is stopped on the machine and requeued."""
    tag = token()
    gate = testbed.directory / f"gate-{tag}"
    farm.write_inventory(hosts[:1])
    (build,) = farm.submit(gated_build(tag, gate))
    run = farm.background("--grace", "3600")
    try:
        wait_for("the gated build", lambda: remote_running(tag))
        run.process.send_signal(signal.SIGINT)
        run.wait_line("stopping: waiting up to 3600s")
        assert remote_running(tag) and run.process.poll() is None
        run.process.send_signal(signal.SIGINT)
        run.process.wait(timeout=120)  # a deadline against hanging only: the grace is an hour
    finally:
        out = run.stop()
        gate.touch()
    assert run.process.returncode == 0, out
    wait_for("the remote build to stop", lambda: not remote_running(tag))
    assert farm.state_of(build) == "queued"
    (attempt,) = farm.show(build)["attempts"]
    assert (attempt["result"], attempt["detail"]) == ("interrupted", "coordinator stopping")


def test_a_killed_coordinator_loses_nothing(
    farm: Farm, hosts: list[Host], testbed: Testbed
) -> None:
    """SIGKILL mid-build: the next run closes the attempt as interrupted and builds it again."""
    tag = token()
    gate = testbed.directory / f"gate-{tag}"
    farm.write_inventory(hosts[:1])
    (build,) = farm.submit(gated_build(tag, gate))
    coordinator = farm.start()
    try:
        wait_for("the remote build", lambda: remote_running(tag))
    finally:
        coordinator.send_signal(signal.SIGKILL)
        coordinator.communicate(timeout=30)
        gate.touch()
    assert farm.show(build)["state"] == "running"
    wait_for("the orphaned builder to finish", lambda: not remote_running(tag))
    done = farm.run()
    assert done.returncode == 0, done.stdout
    assert "1 attempt(s) left running by a previous run requeued" in done.stdout
    info = farm.show(build)
    assert info["state"] == "succeeded"
    assert [a["result"] for a in info["attempts"]] == ["interrupted", "success"]


def test_the_live_view_on_a_terminal(farm: Farm, hosts: list[Host]) -> None:
    tag = token()
    farm.write_inventory(hosts[:1])
    farm.submit(instantiate(nix_expr_trivial(f"tty-{tag}", f"echo {tag} > $out")))
    leader, follower = pty.openpty()
    env = {**farm.env, "TERM": "xterm", "COLUMNS": "120", "LINES": "40"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "buildfarm", "run", "--exit-when-idle"],
        env=env, stdin=follower, stdout=follower, stderr=follower,
    )
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + 120
    while process.poll() is None or select.select([leader], [], [], 0)[0]:
        assert time.monotonic() < deadline, screen.decode(errors="replace")
        if select.select([leader], [], [], 0.2)[0]:
            try:
                screen += os.read(leader, 65536)
            except OSError:
                break
    os.close(leader)
    process.wait(timeout=30)
    text = screen.decode(errors="replace")
    assert process.returncode == 0, text
    assert "MACHINE" in text.upper() and hosts[0].name in text
    assert "\x1b[" in text  # drawn with terminal control sequences
    assert "succeeded" in text
    # Builds and attempts apart: one build, one attempt.
    assert "builds: 1 succeeded, 0 failed; 1 in the last minute   attempts: 1" in text


def test_inventory_reload_on_sighup(farm: Farm, hosts: list[Host]) -> None:
    """Reloads on a file change (no signal) and on SIGHUP (file unchanged to the coordinator):
    a broken file keeps the old inventory; a removed machine takes no new build though it has
    free slots, and finishes the one it runs; an added machine takes builds."""
    first, second = hosts
    tag = token()
    gate = Path(f"/tmp/buildfarm-gate-{tag}")  # the gated build ends once this file exists
    gated_script = (f"echo run {tag}; while [ ! -e {gate} ]; do /bin/sleep 0.2; done; "
                    f"echo gated {tag} > $out")

    def quick(n: int) -> str:
        return instantiate(nix_expr_trivial(f"quick{n}-{tag}", f"echo {n} {tag} > $out"))

    def machines_of(build: str) -> list[str]:
        return [a.machine for a in farm.attempts(build)]

    farm.write_inventory([first], max_builds=3)
    (gated,) = farm.submit(instantiate(nix_expr_trivial(f"gated-{tag}", gated_script)))
    run = farm.background()
    try:
        wait_for("the gated build on the first machine", lambda: remote_running(tag))
        # A broken file, no signal: reported, and the first machine still takes builds.
        farm.inventory.write_text("machines:\n  - name: [broken\n")
        run.wait_line("inventory not reloaded, keeping the old one:")
        (one,) = farm.submit(quick(1))
        farm.wait_for_state(one, "succeeded")
        assert machines_of(one) == [first.name]
        # The file edited, no signal: the first machine removed, the second added (one slot).
        # Of two builds the second machine can run one at a time; the first, with two free
        # slots, takes neither.
        farm.inventory.write_text(
            inventory_yaml([second], "nix", max_builds=1) + "# the first machine removed\n"
        )
        run.wait_line(f"machine {second.name} added")
        assert f"machine {first.name} removed: finishing its running builds" in run.output
        two, three = farm.submit(quick(2), quick(3))
        farm.wait_for_state(two, "succeeded")
        farm.wait_for_state(three, "succeeded")
        assert machines_of(two) == machines_of(three) == [second.name]
        # The removed machine's build goes on, then succeeds there; then it is dropped.
        assert farm.state_of(gated) == "running" and remote_running(tag)
        assert f"machine {first.name} retired" not in run.output
        gate.touch()
        farm.wait_for_state(gated, "succeeded")
        assert [(a.machine, a.result) for a in farm.attempts(gated)] == [(first.name, "success")]
        check_stored(farm, gated, first)
        run.wait_line(f"machine {first.name} retired: its builds have ended")
        # SIGHUP with a file the coordinator cannot tell from the one it read (same size and
        # modification time): the first machine back, the second removed.
        replace_unnoticed(farm.inventory, inventory_yaml([first], "nix", max_builds=1))
        run.process.send_signal(signal.SIGHUP)
        run.wait_line(f"machine {first.name} added")
        (four,) = farm.submit(quick(4))
        farm.wait_for_state(four, "succeeded")
        assert machines_of(four) == [first.name]
        run.wait_line(f"machine {second.name} retired: its builds have ended")
    finally:
        gate.touch()
        try:
            out = run.stop()
        finally:
            gate.unlink(missing_ok=True)
    assert run.process.returncode == 0, out
    assert "Traceback" not in out, out


def replace_unnoticed(path: Path, text: str) -> None:
    """Replace a file in one rename by one of the same size and modification time (padded with
    a YAML comment), so only a signal can make the coordinator read it again."""
    before = path.stat()
    padding = before.st_size - len(text.encode()) - 2
    assert padding >= 0, "the new text must not be longer than the old"
    fresh = path.with_suffix(".new")
    fresh.write_text(f"{text}#{'x' * padding}\n")
    os.utime(fresh, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert fresh.stat().st_size == before.st_size
    os.replace(fresh, path)


def test_the_live_view_counts_builds_and_attempts_apart(tmp_path: Path) -> None:
    """A build ends once; its attempts may be many (setup failures, interruptions). The
    summary counts builds from the events that end them, and the rate is a count over the
    last minute, never an extrapolation of the first seconds."""
    from buildfarm.config import Settings
    from buildfarm.coordinator.live import LineReporter, summary_line
    from buildfarm.coordinator.options import RunOptions
    from buildfarm.coordinator.service import Coordinator
    from buildfarm.inventory import Inventory

    settings = Settings.resolve(state_dir=str(tmp_path), hooks_dir=str(tmp_path / "hooks"))
    coordinator = Coordinator(settings, Inventory("x", ()), RunOptions(), LineReporter())
    now = time.time()
    coordinator.tally.add_events([
        (1, "build-submitted", now - 300), (2, "build-started", now - 299),
        (3, "build-success", now - 200),  # more than a minute ago
        (4, "build-success", now - 10), (5, "build-failure", now - 5),
        (6, "build-failure", now - 5),  # a dependant, failed with its input
        (7, "build-canceled", now - 1),
    ])
    for result in ("setup-failure", "setup-failure", "interrupted", "success", "success",
                   "failure"):
        coordinator.tally.add_attempt(result)
    assert summary_line(coordinator, now) == (
        "builds: 2 succeeded, 2 failed, 1 canceled; 3 in the last minute   "
        "attempts: 6 (2 setup failures, 1 interrupted)")
