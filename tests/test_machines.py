"""`buildfarm machines` and `buildfarm machines test` on the test bed, with machines that are up,
down (nothing listens on their port), frozen (no answer), broken (no store tool) and Guix
machines that do and do not authorize the coordinator's key."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from farm import Farm, gated_build, token, wait_for
from testbed import Host, Testbed, current_system, inventory_yaml

from buildfarm.docs.json_schemas import SCHEMAS, validate
from buildfarm.formats.signing import SigningKey, save_key


def dead_port() -> int:
    """A loopback port where nothing listens (bound for a moment, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def entry(host: Host, store: str | None = None, **overrides: Any) -> dict[str, Any]:
    machine: dict[str, Any] = yaml.safe_load(
        inventory_yaml([host], store or host.store, **overrides)
    )["machines"][0]
    return machine


def dead_entry(template: Host, name: str = "dead", **overrides: Any) -> dict[str, Any]:
    return {**entry(template), "name": name, "port": dead_port(), **overrides}


def write(farm: Farm, *machines: dict[str, Any]) -> None:
    farm.inventory.write_text(yaml.safe_dump({"machines": list(machines)}, sort_keys=False))


def machines_json(farm: Farm) -> dict[str, dict[str, Any]]:
    done = farm.cli("machines", "--json")
    rows = json.loads(done.stdout)
    assert validate(rows, SCHEMAS["machines"].shape) == []
    return {row["name"]: row for row in rows}


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Farm:
    return Farm(tmp_path / "state", tmp_path / "inventory.yaml")


@pytest.fixture(scope="module")
def coordinator_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def guix_hosts(testbed: Testbed, coordinator_key: SigningKey) -> Iterator[dict[str, Host]]:
    """Two guix hosts: one authorizes the coordinator's key, the other does not."""
    made = {
        "trusting": testbed.add_guix_host(f"guix-t-{token()[:6]}",
                                          authorized=[coordinator_key.guix_public_sexp()]),
        "wary": testbed.add_guix_host(f"guix-w-{token()[:6]}", authorized=[]),
    }
    try:
        yield made
    finally:
        for host in made.values():
            testbed.remove_host(host)


def test_machines_shows_each_machine_with_the_reason_when_down(
    farm: Farm, hosts: list[Host]
) -> None:
    up = hosts[0]
    write(
        farm,
        entry(up),
        dead_entry(up, connect_timeout=3),
        {**entry(up), "name": "no-guix", "store": "guix"},  # reachable, but no guix there
        {**entry(up), "name": "off", "enabled": False},
    )
    rows = machines_json(farm)
    assert list(rows) == [up.name, "dead", "no-guix", "off"]
    good = rows[up.name]
    assert good["reachable"] is True and good["error"] is None, good
    assert good["store"] == "nix" and good["store_version"].startswith("2.")
    assert good["store_dir"] == "/nix/store"
    assert good["cores"] >= 1 and good["load"] >= 0 and good["free_disk"] > 0
    # The same clock, read during the probe: off by at most half of the probe's round trip.
    assert abs(good["clock_skew"]) <= good["probe_seconds"]
    assert (good["slots"], good["running"], good["backoff_until"]) == (2, 0, None)
    assert good["systems"] == [current_system()]

    dead = rows["dead"]
    assert dead["reachable"] is False
    assert "connection refused" in dead["error"] and "is sshd running there?" in dead["error"]
    assert dead["store_version"] is None and dead["cores"] is None

    broken = rows["no-guix"]
    assert broken["reachable"] is True
    assert "guix" in broken["error"] and "not found" in broken["error"]
    assert broken["store_version"] is None and broken["cores"] >= 1

    off = rows["off"]
    assert off["reachable"] is None and off["enabled"] is False
    assert off["error"] == "disabled in the inventory: not probed"

    table = farm.cli("machines").stdout.splitlines()  # not a terminal: tab-separated lines
    assert table[0].split("\t") == [
        "NAME", "STATE", "STORE", "SYSTEMS", "TAGS", "CORES", "LOAD", "FREE", "SKEW", "BUILDS",
        "BACKOFF", "NOTE",
    ]
    states = {line.split("\t")[0]: line.split("\t")[1] for line in table[1:]}
    assert states == {up.name: "up", "dead": "down", "no-guix": "broken", "off": "disabled"}
    assert "\x1b[" not in farm.cli("machines").stdout


def established_to(port: int) -> int:
    """Connections the kernel holds established to `port` on the loopback, taken by the server
    or still waiting in its queue (/proc/net/tcp, state 01)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines
               if line.split()[3] == "01" and int(line.split()[1].split(":")[1], 16) == port)


def test_frozen_machines_are_probed_at_once(farm: Farm, testbed: Testbed) -> None:
    """Machines are probed at once: three that never answer are all connected to together (one
    after the other, the second would be connected to only when the first's connect timeout,
    here ten minutes, ended its connection). A frozen machine's probe ends at its timeout."""
    frozen = [testbed.add_host(f"frozen{n}-{token()[:6]}") for n in range(3)]
    try:
        write(farm, *(entry(host, connect_timeout=600) for host in frozen))
        for host in frozen:
            host.pause()  # the kernel still accepts the connection; sshd never answers
        command = subprocess.Popen([sys.executable, "-m", "buildfarm", "machines", "--json"],
                                   env=farm.env, stdout=subprocess.DEVNULL)
        try:
            wait_for("a connection to each frozen machine at once", lambda: all(
                established_to(host._require_port()) for host in frozen))
        finally:
            command.kill()
            command.wait()
        write(farm, entry(frozen[0], connect_timeout=1))
        (row,) = machines_json(farm).values()
    finally:
        for host in frozen:
            testbed.remove_host(host)
    assert row["reachable"] is False
    assert "no answer from" in row["error"] and "within 1s (connect_timeout)" in row["error"]


def test_machines_shows_running_builds_and_backoff_from_the_coordinator(
    farm: Farm, hosts: list[Host]
) -> None:
    tag = token()
    up = hosts[0]
    write(farm, entry(up, max_builds=1), dead_entry(up))
    slow = gated_build(tag, farm.state.parent / "never")  # runs until it is canceled
    (build,) = farm.submit(slow)
    coordinator = farm.background()
    try:
        wait_for("the build to run", lambda: farm.show(build)["state"] == "running"
                 and farm.show(build)["attempts"][-1]["step"] == "build")
        wait_for("the dead machine's failure to be recorded",
                 lambda: machines_json(farm)["dead"]["failures"] >= 1)
        rows = machines_json(farm)
        farm.cli("builds", "cancel", build)
    finally:
        output = coordinator.stop()
    good, dead = rows[up.name], rows["dead"]
    assert (good["running"], good["slots"], good["running_builds"]) == (1, 1, [build]), output
    assert good["failures"] == 0 and good["last_error"] is None
    assert good["updated_at"] is not None
    assert dead["running"] == 0
    assert "connection refused" in dead["last_error"]
    # The backoff is random and short at first: when shown, it lies ahead (both are shown to
    # the second, so a backoff under a second may show the same second).
    assert dead["backoff_until"] is None or dead["backoff_until"] >= dead["updated_at"]


def test_machines_test_passes_good_machines_and_names_what_to_fix(
    farm: Farm, hosts: list[Host], guix_hosts: dict[str, Host], coordinator_key: SigningKey
) -> None:
    save_key(coordinator_key, farm.state)
    trusting, wary = guix_hosts["trusting"], guix_hosts["wary"]
    up = hosts[0]
    write(farm, entry(up), entry(trusting), entry(wary), dead_entry(up),
          {**entry(up), "name": "no-guix", "store": "guix"})
    done = farm.cli("machines", "test", "--json", check=False)
    assert done.returncode == 1, done.stderr
    reports = json.loads(done.stdout)
    assert validate(reports, SCHEMAS["machines test"].shape) == []
    results = {r["name"]: r for r in reports}
    for name, checks in ((up.name, ["login", "store", "push", "pull"]),
                         (trusting.name, ["login", "store", "version", "daemon", "signing-key",
                                          "authorized", "push", "pull"])):
        report = results[name]
        assert report["ok"], report
        assert [c["name"] for c in report["checks"]] == checks
        assert all(c["ok"] and c["fix"] is None for c in report["checks"])
    assert "signed with the coordinator's key" in results[trusting.name]["checks"][6]["detail"]
    assert "nar hash" in results[up.name]["checks"][3]["detail"]

    def failed(name: str) -> dict[str, Any]:
        report = results[name]
        assert not report["ok"]
        check: dict[str, Any] = report["checks"][-1]
        assert not check["ok"] and check["fix"], report
        return check

    acl = failed(wary.name)
    assert (acl["name"], acl["detail"]) == (
        "authorized", f"{wary.guix_dir}/acl does not authorize the coordinator's key")
    assert acl["fix"].startswith("authorize it, as root (the ACL belongs to root): buildfarm "
                                 "key show --format guix | ssh -p")
    assert acl["fix"].endswith("sudo guix archive --authorize")
    login = failed("dead")
    assert login["name"] == "login" and "connection refused" in login["detail"]
    assert login["fix"].startswith("start sshd on 127.0.0.1, or correct port ")
    store = failed("no-guix")
    assert (store["name"], store["detail"]) == (
        "store", "guix: command not found in a non-interactive SSH command")
    assert "install Guix" in store["fix"] and "~/.ssh/environment" in store["fix"]

    # The test item was removed from the machines it reached.
    for host in (up, trusting):
        assert not list(host.store_dir.glob("*-buildfarm-machine-test"))

    text = farm.cli("machines", "test", up.name, "dead", check=False)
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert lines[0] == f"{up.name}: ok" and "dead: FAILED" in lines
    assert any(line.strip().startswith("fix: start sshd on 127.0.0.1") for line in lines)
    assert lines[-1] == "1 of 2 machine(s) passed"
    assert farm.cli("machines", "test", up.name).returncode == 0


def test_machines_test_says_what_a_guix_machine_lacks_and_how_to_fix_it(
    farm: Farm, testbed: Testbed, coordinator_key: SigningKey
) -> None:
    """A Guix too old for `guix hash -S nar`, a daemon that is down, no signing key, and on
    Guix System an ACL made by the system configuration (a symbolic link into the store) with
    or without the coordinator's key: each check says what is wrong and where to fix it."""
    save_key(coordinator_key, farm.state)
    farm_key = coordinator_key.guix_public_sexp()
    old_bin = testbed.directory / f"old-guix-{token()[:6]}"
    old_bin.mkdir(mode=0o755)
    real = testbed.guix_bin_dir() / "guix"
    wrapper = old_bin / "guix"  # a machine that never pulled past 1.3.0
    wrapper.write_text('#!/bin/sh\nfor a; do [ "$a" = --version ] && { echo "guix (GNU Guix) '
                       f'1.3.0"; exit 0; }}; done\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    made = {
        "old": testbed.add_guix_host(f"guix-o-{token()[:6]}", authorized=[farm_key], env={
            "PATH": f"{old_bin}:/usr/local/bin:/usr/bin:/bin"}),
        "down": testbed.add_guix_host(f"guix-d-{token()[:6]}", authorized=[farm_key]),
        "keyless": testbed.add_guix_host(f"guix-k-{token()[:6]}", authorized=[farm_key]),
        "system": testbed.add_guix_host(f"guix-s-{token()[:6]}"),
        "system-ok": testbed.add_guix_host(f"guix-s-{token()[:6]}"),
    }
    try:
        made["down"].guix_daemon(False)
        (made["keyless"].guix_dir / "signing-key.sec").unlink()
        for name, keys in (("system", []), ("system-ok", [farm_key])):
            host = made[name]  # the ACL activation made: a file in the store, linked to
            entries = "".join(f"(entry {k} (tag (guix import)))" for k in keys)
            in_store = host.store_dir / f"{'4' * 32}-acl"
            in_store.write_text(f"(acl {entries})\n")
            (host.guix_dir / "acl").unlink()
            (host.guix_dir / "acl").symlink_to(f"/nix/store/{in_store.name}")
        write(farm, *(entry(host) for host in made.values()))
        done = farm.cli("machines", "test", "--json", check=False)
        assert done.returncode == 1
        reports = {r["name"]: r for r in json.loads(done.stdout)}
        last = {key: reports[host.name]["checks"][-1] for key, host in made.items()}
        assert (last["old"]["name"], last["old"]["ok"]) == ("version", False)
        assert "older than 1.4.0" in last["old"]["detail"] and "guix pull" in last["old"]["fix"]
        assert (last["down"]["name"], last["down"]["ok"]) == ("daemon", False)
        assert "failed to connect to `/nix/var/nix/daemon-socket/socket'" in last["down"][
            "detail"] and "start the Guix daemon" in last["down"]["fix"]
        keyless = last["keyless"]
        assert (keyless["name"], keyless["ok"]) == ("signing-key", False)
        assert keyless["detail"].startswith("no signing-key.sec in ")
        assert keyless["fix"].endswith("sudo guix archive --generate-key")
        system = last["system"]
        assert (system["name"], system["ok"]) == ("authorized", False)
        assert "made by the system configuration" in system["detail"]
        assert "(authorized-keys (cons (local-file \"farm.pub\")" in system["fix"]
        assert "guix system reconfigure" in system["fix"]
        assert reports[made["system-ok"].name]["ok"], reports[made["system-ok"].name]
        authorized = reports[made["system-ok"].name]["checks"][5]
        assert authorized["detail"].endswith("(from the system configuration)")
    finally:
        for host in made.values():
            testbed.remove_host(host)


def test_machines_test_without_a_key_says_how_to_make_one(
    farm: Farm, guix_hosts: dict[str, Host]
) -> None:
    write(farm, entry(guix_hosts["trusting"]))
    done = farm.cli("machines", "test", "--json", check=False)
    assert done.returncode == 1
    (report,) = json.loads(done.stdout)
    check = report["checks"][-1]
    assert check["name"] == "authorized" and "no signing key" in check["detail"]
    assert "buildfarm key generate" in check["fix"]


def test_machines_test_rejects_unknown_names(farm: Farm, hosts: list[Host]) -> None:
    write(farm, entry(hosts[0]))
    done = farm.cli("machines", "test", "nope", check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"Error: no machine 'nope' in {farm.inventory}; machines: {hosts[0].name}"
    )


def test_machines_test_prints_no_third_party_warning(
    farm: Farm, hosts: list[Host], coordinator_key: SigningKey
) -> None:
    """With every warning shown (PYTHONWARNINGS=default is `python -W default`), a command that
    connects with asyncssh prints nothing on stderr: cryptography deprecates the DSA types that
    asyncssh names, and buildfarm silences exactly that warning before asyncssh is imported."""
    save_key(coordinator_key, farm.state)
    write(farm, entry(hosts[0]))
    farm.env["PYTHONWARNINGS"] = "default"
    done = farm.cli("machines", "test")
    assert done.stdout.splitlines()[-1] == "1 of 1 machine(s) passed"
    assert done.stderr == ""
