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
from farm import Farm, token, wait_for
from testbed import Host, Testbed, instantiate, nix_expr_trivial


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


def test_a_killed_coordinator_loses_nothing(farm: Farm, hosts: list[Host]) -> None:
    """SIGKILL mid-build: the next run closes the attempt as interrupted and builds it again."""
    tag = token()
    script = f"echo run {tag}; /bin/sleep 2; echo ok > $out"
    drv = instantiate(nix_expr_trivial(f"crash-{tag}", script))
    farm.write_inventory(hosts[:1])
    (build,) = farm.submit(drv)
    coordinator = farm.start()
    try:
        wait_for("the remote build", lambda: remote_running(tag))
    finally:
        coordinator.send_signal(signal.SIGKILL)
        coordinator.communicate(timeout=30)
    assert farm.show(build)["state"] == "running"
    wait_for("the orphaned builder to finish", lambda: not remote_running(tag), timeout=30)
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


def test_inventory_reload_on_sighup(farm: Farm, hosts: list[Host], tmp_path: Path) -> None:
    """A machine added and SIGHUP'd takes builds; a broken file keeps the old inventory; a
    removed machine finishes its running build and takes no more."""
    first, second = hosts
    tag = token()
    farm.write_inventory([first], max_builds=1)
    (slow,) = farm.submit(slow_build(tag, 60))
    coordinator = farm.start()
    try:
        wait_for("the slow build on the first machine", lambda: remote_running(tag))
        quick_drv = instantiate(nix_expr_trivial(f"quick-{tag}", f"echo {tag} > $out"))
        (quick,) = farm.submit(quick_drv)
        farm.inventory.write_text("machines:\n  - name: [broken\n")
        coordinator.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert farm.show(quick)["state"] == "queued"
        farm.write_inventory([first, second], max_builds=1)
        coordinator.send_signal(signal.SIGHUP)
        wait_for("the quick build", lambda: farm.show(quick)["state"] == "succeeded")
        assert [a["machine"] for a in farm.show(quick)["attempts"]] == [second.name]
        # Remove the first machine: its build keeps running, new builds go elsewhere.
        farm.write_inventory([second], max_builds=1)
        coordinator.send_signal(signal.SIGHUP)
        another = instantiate(nix_expr_trivial(f"another-{tag}", f"echo 2 {tag} > $out"))
        (later,) = farm.submit(another)
        wait_for("the later build", lambda: farm.show(later)["state"] == "succeeded")
        assert farm.show(later)["attempts"][0]["machine"] == second.name
        assert farm.show(slow)["state"] == "running"
        assert remote_running(tag)
        farm.cli("builds", "cancel", slow)
        wait_for("the slow build to stop", lambda: not remote_running(tag), timeout=30)
    finally:
        coordinator.send_signal(signal.SIGTERM)
        out, _ = coordinator.communicate(timeout=60)
    assert coordinator.returncode == 0, out
    assert "inventory not reloaded, keeping the old one:" in out
    assert f"machine {second.name} added" in out
    assert f"machine {first.name} removed: finishing its running builds" in out
