"""Fault suite, machine side: machines that die, stall, change their host key or corrupt what
they send, while `buildfarm run` works (RELIABILITY.md, faults 2, 3, 4 and 6).

Each fault is injected on the real test bed: sshd hosts killed (SIGKILL to every process of the
host), frozen (SIGSTOP), reached through a relay that stops forwarding, re-keyed, or given a
`nix-store` that flips a byte of what it exports.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from farm import AttemptRow, Farm, check_stored, gated_build, running, token, wait_for
from testbed import Host, Testbed, instantiate, inventory_yaml, nix_expr_trivial

from buildfarm.coordinator.attempt import STREAM_LIMIT

BIG = 2 * STREAM_LIMIT  # bytes of an output too big for a store session: fetched over SFTP
KEEPALIVE = 1.0  # the inventory's keepalive_interval in the stall tests: the stall timeout knob


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Farm:
    return Farm(tmp_path / "state", tmp_path / "inventory.yaml")


def wait_for_step(farm: Farm, build: str, step: str) -> AttemptRow:
    """The open attempt of `build` once it is at `step` (polled quickly: transfers are short)."""
    found: list[AttemptRow] = []

    def at_step() -> bool:
        found[:] = [a for a in farm.attempts(build) if a.result is None and a.step == step]
        return bool(found)

    wait_for(f"build {build} at step {step}", at_step, interval=0.01)
    return found[0]


def machine_state(farm: Farm, name: str) -> tuple[int, float | None, str | None]:
    """failures, backoff_until, last_error of a machine as the coordinator recorded them."""
    found = farm.rows(
        "SELECT failures, backoff_until, last_error FROM machine_state WHERE name = ?", name
    )
    return found[0] if found else (0, None, None)


def write_inventory(farm: Farm, entries: list[tuple[Host, dict[str, Any]]]) -> None:
    """An inventory with per-machine overrides (inventory_yaml applies its own to all)."""
    machines = []
    for host, overrides in entries:
        machines += yaml.safe_load(inventory_yaml([host], "nix", **overrides))["machines"]
    farm.inventory.write_text(yaml.safe_dump({"machines": machines}, sort_keys=False))


def big_build(tag: str, before: str = "true") -> str:
    """A build whose output takes an SFTP fetch: `before` runs first."""
    script = f"echo run {tag}; {before}; /usr/bin/head -c {BIG} /dev/urandom > $out"
    return instantiate(nix_expr_trivial(f"big-{tag}", script))


def remote_running(fragment: str) -> bool:
    """Is a process whose command line holds `fragment` running (on any test host)?"""
    return subprocess.run(["pgrep", "-f", fragment], capture_output=True).returncode == 0


def slow_build(tag: str, seconds: int = 3) -> str:
    return instantiate(nix_expr_trivial(
        f"slow-{tag}", f"echo run {tag}; /bin/sleep {seconds}; echo {tag} > $out"
    ))


# --- 2. a machine lost mid-build and mid-transfer ------------------------------------------


# An SFTP server that serves only once $HOME/sftp-open exists, having said in $HOME/sftp-asked
# that a client waits: a fetch that stays in flight until the test lets it go.
GATED_SFTP = """#!/bin/sh
touch "$HOME/sftp-asked"
while [ ! -e "$HOME/sftp-open" ]; do /bin/sleep 0.05; done
exec /usr/lib/openssh/sftp-server
"""


@pytest.fixture
def gated_hosts(testbed: Testbed) -> Iterator[list[Host]]:
    """Two hosts whose SFTP waits for the test (see GATED_SFTP)."""
    server = testbed.directory / f"gated-sftp-{token()}"
    server.write_text(GATED_SFTP)
    server.chmod(0o755)
    made = [testbed.add_host(f"gated{n}-{token()[:6]}", sftp=str(server)) for n in range(2)]
    try:
        yield made
    finally:
        for host in made:
            testbed.remove_host(host)


@pytest.mark.parametrize("step", ["build", "fetch-outputs"])
def test_a_machine_lost_mid_step_is_retried_elsewhere_and_comes_back(
    farm: Farm, request: pytest.FixtureRequest, testbed: Testbed, step: str
) -> None:
    """sshd and everything the machine runs are SIGKILLed while the build runs there (or while
    its output is being fetched: the fetch held in flight by the machine's SFTP server): the
    attempt ends interrupted, the build succeeds on the other machine, the lost one is backed
    off, and it is used again once its sshd is back."""
    tag = token()
    hosts: list[Host] = request.getfixturevalue("hosts" if step == "build" else "gated_hosts")
    gate = testbed.directory / f"gate-{tag}"  # the build runs until this file exists
    script = f"while [ ! -e {gate} ]; do /bin/sleep 0.1; done" if step == "build" else "true"
    (build,) = farm.submit(big_build(tag, script))
    farm.write_inventory(hosts, max_builds=1)
    by_name = {h.name: h for h in hosts}
    try:
        with running(farm) as run:
            if step == "build":
                victim = by_name[wait_for_step(farm, build, step).machine]
                wait_for("the builder", lambda: remote_running(f"run {tag}"))
            else:
                wait_for("a fetch", lambda: any(
                    (h.home_dir / "sftp-asked").exists() for h in hosts))
                (victim,) = [h for h in hosts if (h.home_dir / "sftp-asked").exists()]
                (attempt,) = farm.attempts(build)
                assert (attempt.machine, attempt.step) == (victim.name, "fetch-outputs")
            (other,) = [h for h in hosts if h is not victim]
            killed_at = time.time()
            victim.kill()
            gate.touch()  # now the retry may build, and fetch on a gated host
            for host in hosts:
                (host.home_dir / "sftp-open").touch()
            farm.wait_for_state(build, "succeeded")
            lost, retried = farm.attempts(build)
            assert (lost.machine, lost.result) == (victim.name, "interrupted")
            assert (lost.detail or "").startswith("connection lost:"), lost
            assert farm.steps(lost.id)[-1] == step
            assert (retried.machine, retried.result) == (other.name, "success")
            check_stored(farm, build, other)
            # Backed off: reconnecting fails, the coordinator counts the failures and waits.
            run.wait_line(f"machine {victim.name} unavailable")
            failures, until, error = machine_state(farm, victim.name)
            assert failures >= 1 and error, (failures, error)
            assert until is not None and until > killed_at, until  # left alone until then
            if step != "build":
                return
            # It comes back when its sshd does: with the other machine gone, a new build can
            # only succeed there.
            other.kill()
            victim.start()
            # The breaker retries it within its longest backoff (buildfarm/ssh/remote.py: 300 s),
            # however many failures it counted meanwhile; usually within seconds.
            run.wait_line(f"machine {victim.name} connected", count=2, timeout=330)
            (again,) = farm.submit(slow_build(tag, 0))
            farm.wait_for_state(again, "succeeded")
            assert farm.attempts(again)[-1].machine == victim.name
    finally:
        testbed.ensure_running()


# --- 3. a stalled machine ------------------------------------------------------------------


class StallingRelay:
    """A TCP relay to a host that can stop forwarding while keeping every connection open:
    a link that stalls, as opposed to one that breaks."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self.forwarding.wait()
                if self.closed:
                    return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def stall(self) -> None:
        self.forwarding.clear()

    def resume(self) -> None:
        self.forwarding.set()

    def close(self) -> None:
        self.closed = True
        self.forwarding.set()
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.mark.parametrize("how", ["sigstop", "relay"])
def test_a_stalled_machine_is_detected_within_the_stall_timeout(
    farm: Farm, hosts: list[Host], testbed: Testbed, tmp_path: Path, how: str
) -> None:
    """The machine stops answering mid-build without closing anything (its sshd and builds
    SIGSTOPped, or the relay it is reached through stops forwarding). The keepalives go
    unanswered (keepalive_interval K: after about 3 K; how long is a benchmark's business, not
    a test's), the attempt ends interrupted, the build succeeds elsewhere, and nothing waits
    forever: the coordinator still stops on SIGTERM."""
    tag = token()
    stalled_host, other = hosts
    relay = StallingRelay(stalled_host.port or 0)
    known_hosts = tmp_path / "relay_known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{relay.port} {stalled_host.host_key_line}\n")
    common = {"max_builds": 1, "keepalive_interval": KEEPALIVE, "connect_timeout": 3}
    reach: dict[str, Any] = {}
    if how == "relay":
        reach = {"port": relay.port, "known_hosts": str(known_hosts)}
    write_inventory(farm, [(stalled_host, {**common, **reach}), (other, common)])
    gate = testbed.directory / f"gate-{tag}"  # both builds run until the stall is seen
    builds = farm.submit(gated_build(f"{tag}-a", gate), gated_build(f"{tag}-b", gate))
    try:
        with running(farm) as run:
            placed = {wait_for_step(farm, b, "build").machine: b for b in builds}
            victim = placed[stalled_host.name]
            if how == "sigstop":
                stalled_host.pause()
            else:
                relay.stall()
            wait_for("the stalled attempt to end",
                     lambda: farm.attempts(victim)[0].result is not None)
            gate.touch()
            stalled = farm.attempts(victim)[0]
            assert stalled.result == "interrupted" and stalled.machine == stalled_host.name
            assert (stalled.detail or "").startswith("connection lost:"), stalled
            for build in builds:
                farm.wait_for_state(build, "succeeded")
            assert farm.attempts(victim)[-1].machine == other.name
            run.wait_line(f"build {victim} interrupted on {stalled_host.name}")
    finally:
        gate.touch()
        relay.close()
        testbed.ensure_running()


# --- 4. a changed host key -----------------------------------------------------------------


def test_a_machine_whose_host_key_changed_is_refused(
    farm: Farm, hosts: list[Host], testbed: Testbed, tmp_path: Path
) -> None:
    """The machine was "reinstalled": same address, new host key. The coordinator refuses it
    with a message naming it and its address, never authenticates there, and builds elsewhere."""
    rekeyed = testbed.add_host()
    try:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(
            f"{rekeyed.known_hosts_line()}\n{hosts[0].known_hosts_line()}\n"
        )
        rekeyed.stop()
        for path in (rekeyed.host_key, rekeyed.host_key.with_name(rekeyed.host_key.name + ".pub")):
            path.unlink()
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(rekeyed.host_key)],
            check=True, capture_output=True,
        )
        rekeyed.start()
        log_start = rekeyed.log_path.stat().st_size
        tag = token()
        (build,) = farm.submit(slow_build(tag, 0))
        overrides = {"known_hosts": str(known_hosts)}
        write_inventory(farm, [(rekeyed, overrides), (hosts[0], overrides)])
        done = farm.run()
        assert done.returncode == 0, done.stdout
        assert (
            f"machine {rekeyed.name} unavailable: host key for {rekeyed.name} "
            f"(127.0.0.1:{rekeyed.port}) does not match {known_hosts}"
        ) in done.stdout
        assert farm.state_of(build) == "succeeded"
        assert {a.machine for a in farm.attempts(build)} == {hosts[0].name}
        # Nothing ran there: no login was accepted, its store is still empty.
        with open(rekeyed.log_path, "rb") as log:
            log.seek(log_start)
            sshd_log = log.read().decode(errors="replace")
        assert "Accepted" not in sshd_log, sshd_log
        assert list(rekeyed.store_dir.iterdir()) == []
    finally:
        testbed.remove_host(rekeyed)


# --- 6. a corrupt transfer -----------------------------------------------------------------

# nix-store, except that while $HOME/corrupt exists, what it exports has bytes changed inside
# the file contents (the bundle still reads; only the hash check can tell): one byte of an
# `--export`, and every "corruptme" on the stdout of a store session (`--serve`: its answers
# carry store paths, and the paths of the test do not hold that word).
CORRUPTING_NIX_STORE = """#!/bin/sh
if [ "$1" = --export ] && [ -e "$HOME/corrupt" ]; then
    tmp=$(mktemp) || exit 1
    /usr/bin/nix-store "$@" > "$tmp" || { rm -f "$tmp"; exit 1; }
    printf X | dd of="$tmp" bs=1 seek=200 conv=notrunc 2>/dev/null
    cat "$tmp"
    status=$?
    rm -f "$tmp"
    exit $status
fi
if [ "$1" = --serve ] && [ -e "$HOME/corrupt" ]; then
    /usr/bin/nix-store "$@" | /usr/bin/python3 -c '
import os
while data := os.read(0, 65536):
    data = data.replace(b"corruptme", b"Xorruptme")
    while data:
        data = data[os.write(1, data):]
'
    exit
fi
exec /usr/bin/nix-store "$@"
"""


def corrupt(farm: Farm, build: str) -> list[AttemptRow]:
    return [a for a in farm.attempts(build) if "corrupt transfer" in (a.detail or "")]


# A small output comes back on the store session; a large one through a file and SFTP.
@pytest.mark.parametrize("size", [4096, STREAM_LIMIT + 4096])
def test_a_corrupt_transfer_is_detected_not_stored_and_retried(
    farm: Farm, testbed: Testbed, private_nix: Path, size: int
) -> None:
    bin_dir = testbed.directory / f"corrupting-bin-{token()}"
    bin_dir.mkdir(mode=0o755)
    wrapper = bin_dir / "nix-store"
    wrapper.write_text(CORRUPTING_NIX_STORE)
    wrapper.chmod(0o755)
    host = testbed.add_host(env={"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"})
    flag = host.home_dir / "corrupt"
    flag.write_text("")
    try:
        tag = token()
        script = f"/usr/bin/yes corruptme-{tag} | /usr/bin/head -c {size} > $out"
        (build,) = farm.submit(instantiate(nix_expr_trivial(f"corrupt-{tag}", script)))
        farm.write_inventory([host])
        with running(farm, "--grace", "0"):
            wait_for("two corrupt transfers", lambda: len(corrupt(farm, build)) >= 2)
        for failed in farm.attempts(build):
            assert failed.result == "interrupted", failed
            assert failed in corrupt(farm, build) or failed.detail == "coordinator stopping"
        for failed in corrupt(farm, build):
            steps = farm.steps(failed.id)
            assert steps[-1] == "verify-outputs"
            assert ("export-outputs" in steps) == (size > STREAM_LIMIT)
        # Nothing of it was kept.
        assert farm.rows("SELECT path FROM stored_output") == []
        outputs = farm.state / "outputs"
        assert [p for p in (outputs / "nar").iterdir() if p.is_file()] == []
        assert list((outputs / "tmp").iterdir()) == []
        flag.unlink()
        done = farm.run()
        assert done.returncode == 0, done.stdout
        assert farm.state_of(build) == "succeeded"
        check_stored(farm, build, host)
    finally:
        testbed.remove_host(host)
