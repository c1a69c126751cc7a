"""The test bed itself: real sshd hosts with separate, private Nix stores, and nothing leaks out.

Other tests trust these hosts to behave like separate build machines; this module checks that
they do (a real build over asyncssh on each), that they are separate from each other, from the
coordinator side and from the machine's own /nix, and that stop/kill/pause/start work.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import socket
import uuid
from pathlib import Path

import asyncssh
import pytest
import testbed as testbed_module
import yaml
from testbed import (
    NIX_CONF,
    TEST_USER,
    Host,
    Testbed,
    TestbedError,
    current_system,
    instantiate,
    nix_expr_trivial,
    process_state,
    real_nix_dir,
)

from buildfarm.inventory import parse


def _token() -> str:
    return uuid.uuid4().hex[:12]


async def _build_on(host: Host, expr: str) -> tuple[str, str, str]:
    """Instantiate and realise ``expr`` on ``host`` over one connection: (drv, output, content)."""
    async with asyncssh.connect(**host.connect_options()) as conn:
        drv = (await conn.run(f"nix-instantiate -E {shlex.quote(expr)}", check=True)).stdout
        assert isinstance(drv, str)
        drv = drv.strip().splitlines()[-1]
        out = (await conn.run(f"nix-store --realise {drv}", check=True)).stdout
        assert isinstance(out, str)
        out = out.strip()
        content = (await conn.run(f"cat {out}", check=True)).stdout
        assert isinstance(content, str)
        return drv, out, content


async def _invalid_on(host: Host, *paths: str) -> set[str]:
    async with asyncssh.connect(**host.connect_options()) as conn:
        done = await conn.run(
            "nix-store --check-validity --print-invalid " + " ".join(paths), check=True
        )
        assert isinstance(done.stdout, str)
        return set(done.stdout.split())


async def _run_on(host: Host, command: str) -> str:
    async with asyncssh.connect(**host.connect_options()) as conn:
        done = await conn.run(command, check=True)
        assert isinstance(done.stdout, str)
        return done.stdout


def test_each_host_builds_in_its_own_store(hosts: list[Host]) -> None:
    first, second = hosts
    token = _token()
    expr_a = nix_expr_trivial(f"smoke-a-{token}", f"echo built on a {token} > $out")
    expr_b = nix_expr_trivial(f"smoke-b-{token}", f"echo built on b {token} > $out")

    drv_a, out_a, content_a = asyncio.run(_build_on(first, expr_a))
    drv_b, out_b, content_b = asyncio.run(_build_on(second, expr_b))

    assert content_a == f"built on a {token}\n"
    assert content_b == f"built on b {token}\n"
    # What one host built is in its own store only.
    assert first.local_path(out_a).read_text() == content_a
    assert not second.local_path(out_a).exists()
    assert not first.local_path(out_b).exists()
    assert asyncio.run(_invalid_on(second, drv_a, out_a)) == {drv_a, out_a}
    assert asyncio.run(_invalid_on(first, drv_b, out_b)) == {drv_b, out_b}
    assert asyncio.run(_invalid_on(first, drv_a, out_a)) == set()
    # ... and neither in the coordinator's (private) store nor in the machine's own.
    real = real_nix_dir()
    assert real is not None
    for path in (drv_a, out_a, drv_b, out_b):
        assert not os.path.lexists(path)
        assert not (real / path.removeprefix("/nix/")).exists()


def test_remote_commands_run_as_the_test_user_with_the_test_nix_conf(
    hosts: list[Host], testbed: Testbed
) -> None:
    output = asyncio.run(_run_on(hosts[0], "id -un; printenv NIX_CONF_DIR"))
    user, conf_dir = output.split("\n")[:2]
    assert user == TEST_USER and pwd.getpwnam(user).pw_shell == "/bin/sh"
    assert Path(conf_dir) == testbed.nix_conf_dir
    assert (Path(conf_dir) / "nix.conf").read_text() == NIX_CONF
    # The OpenSSH client helper reaches the same account, checking the same known_hosts.
    assert hosts[1].run("id -un; cat", input=b"stdin\n").stdout == b"bftest\nstdin\n"


def test_the_coordinator_side_uses_a_private_nix(private_nix: Path) -> None:
    real = real_nix_dir()
    assert real is not None
    assert not os.path.samestat(os.stat(private_nix), os.stat(real))

    drv = instantiate(nix_expr_trivial(f"coordinator-{_token()}", "echo x > $out"))

    assert drv.startswith("/nix/store/") and drv.endswith(".drv")
    assert Path(drv).is_file()
    assert not (real / drv.removeprefix("/nix/")).exists()
    one, two = (nix_expr_trivial(name, "echo > $out") for name in ("one", "two"))
    with pytest.raises(TestbedError, match="one derivation"):
        instantiate(f"[ ({one}) ({two}) ]")


def test_special_characters_survive_the_nix_expression(hosts: list[Host]) -> None:
    tricky = f"quote\" backslash\\ dollar-brace ${{x}} {_token()}"
    expr = nix_expr_trivial("tricky", f"/bin/echo {shlex.quote(tricky)} > $out")

    assert asyncio.run(_build_on(hosts[0], expr))[2] == tricky + "\n"


def test_a_dependency_is_built_first_and_visible_to_the_script(hosts: list[Host]) -> None:
    token = _token()
    dep = nix_expr_trivial(f"dep-{token}", f"echo dep {token} > $out")
    top = nix_expr_trivial(
        f"top-{token}", "read line < $dep; echo \"top sees $line\" > $out", attrs={"dep": dep}
    )

    assert asyncio.run(_build_on(hosts[1], top))[2] == f"top sees dep {token}\n"


def test_a_stopped_host_refuses_connections_and_comes_back_with_its_store(
    hosts: list[Host],
) -> None:
    host = hosts[1]
    _, out, _ = asyncio.run(_build_on(host, nix_expr_trivial(f"keep-{_token()}", "echo > $out")))
    port, old_pid = host.port, host.pid

    host.stop()

    assert not host.running
    with pytest.raises(OSError):
        asyncio.run(_run_on(host, "true"))

    host.start()

    assert host.port == port and host.pid != old_pid
    assert asyncio.run(_invalid_on(host, out)) == set()


def test_kill_drops_open_connections_and_pause_freezes_every_process(hosts: list[Host]) -> None:
    host = hosts[0]

    async def killed_under_an_open_connection() -> None:
        async with asyncssh.connect(**host.connect_options()) as conn:
            assert (await conn.run("echo up", check=True)).stdout == "up\n"
            host.kill()
            with pytest.raises((asyncssh.Error, OSError)):
                await conn.run("true", check=True)

    asyncio.run(killed_under_an_open_connection())
    assert host.pid is None
    host.start()

    host.pause()
    members = host.members()
    states = {process_state(pid) for pid in members}
    host.resume()

    assert host.pid in members
    assert states == {"T"}
    assert asyncio.run(_run_on(host, "echo back")) == "back\n"


def test_closing_a_testbed_ends_its_processes_and_removes_its_files(testbed: Testbed) -> None:
    del testbed  # only for the skip/fail logic: this test makes a bed of its own
    with Testbed() as bed:
        host, removed = bed.add_host("lonely"), bed.add_host("removed")
        pid = host.pid
        assert asyncio.run(_run_on(host, "echo hi")) == "hi\n"
        removed_pid, removed_dir = removed.pid, removed.directory
        bed.remove_host(removed)
        assert bed.hosts == [host]
        assert bed.known_hosts.read_text() == host.known_hosts_line() + "\n"
        directory = bed.directory

    for gone in (pid, removed_pid):
        assert gone is not None and not Path(f"/proc/{gone}").exists()
    assert not directory.exists() and not removed_dir.exists()


def test_a_port_taken_meanwhile_is_retried_with_another(
    testbed: Testbed, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        free_port = testbed_module._free_port
        monkeypatch.setattr(testbed_module, "_free_port", lambda: next(ports, None) or free_port())

        host = testbed.add_host("retried")
        try:
            assert host.running and host.port != taken
            assert f"Bind to port {taken}" in host.log_path.read_text()
            assert asyncio.run(_run_on(host, "echo ok")) == "ok\n"
        finally:
            testbed.remove_host(host)


def test_inventory_names_every_host_with_its_key_and_port(hosts: list[Host]) -> None:
    bed = hosts[0].testbed
    text = bed.inventory_yaml(hosts, max_builds=3, known_hosts=None)

    machines = yaml.safe_load(text)["machines"]

    assert text.startswith(f"machines:\n  - name: {hosts[0].name}\n    host: ")

    assert [m["name"] for m in machines] == [h.name for h in hosts]
    first = machines[0]
    assert first["host"] == "127.0.0.1" and first["port"] == hosts[0].port
    assert first["user"] == TEST_USER and first["identity"] == str(hosts[0].client_key)
    assert first["systems"] == [current_system()] and first["store"] == "nix"
    assert first["max_builds"] == 3 and "known_hosts" not in first


def test_buildfarm_reads_the_inventory_the_testbed_writes(hosts: list[Host]) -> None:
    inventory = parse(hosts[0].testbed.inventory_yaml(hosts, max_builds=3))

    machine = inventory.machine(hosts[1].name)
    assert (machine.host, machine.port, machine.user) == ("127.0.0.1", hosts[1].port, TEST_USER)
    assert machine.known_hosts == str(hosts[1].known_hosts)
    assert machine.store == "nix" and machine.max_builds == 3
