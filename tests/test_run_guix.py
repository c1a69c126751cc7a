"""`buildfarm run` end to end with `store: guix` machines, over real SSH.

Guix cannot be installed here: each guix host runs tests/guix_emulator (Guix's messages, exit
codes and signatures, a real Nix store underneath) as the unprivileged test user, with its own
Guix key pair and an ACL that authorizes the coordinator's key (or, in one test, does not).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from farm import Farm, chain, publishing, running, token, wait_for
from testbed import (
    Host,
    Testbed,
    current_system,
    instantiate,
    inventory_yaml,
    nix_expr_trivial,
)

from buildfarm.formats import nar
from buildfarm.formats.signing import (
    SigningKey,
    guix_public_key_from_sexp,
    save_key,
    verify_guix,
)

FULL_STEPS = [
    "push-derivations", "push-inputs", "dry-run", "build",
    "export-outputs", "fetch-outputs", "verify-outputs",
]


@pytest.fixture(scope="module")
def coordinator_key() -> SigningKey:
    """The key every coordinator of this module signs its pushes with."""
    return SigningKey.generate()


@pytest.fixture(scope="module")
def guix_bed(testbed: Testbed, coordinator_key: SigningKey) -> Iterator[Testbed]:
    """A test bed of this module's own: guix hosts a and b, which authorize the coordinator's
    key, and nix host c. (The session's ``testbed`` is requested for its availability checks.)
    """
    del testbed
    bed = Testbed()
    try:
        for name in ("guix-a", "guix-b"):
            bed.add_guix_host(name, authorized=[coordinator_key.guix_public_sexp()])
        bed.add_host("nix-c")
        for host in bed.hosts:
            # A fresh Nix store makes its gcroots symlinks on first use; two commands doing
            # that at once may fail ("creating symlink ... File exists"), as any new machine.
            host.run("nix-store --dump-db")
        yield bed
    finally:
        bed.close()


@pytest.fixture
def machines(guix_bed: Testbed) -> dict[str, Host]:
    guix_bed.ensure_running()
    return {host.name: host for host in guix_bed.hosts}


@pytest.fixture
def farm(tmp_path: Path, private_nix: Path, coordinator_key: SigningKey) -> Farm:
    state = tmp_path / "state"
    save_key(coordinator_key, state)  # as `buildfarm run` would have generated it
    return Farm(state, tmp_path / "inventory.yaml")


def write_inventory(farm: Farm, hosts: Mapping[Host, Mapping[str, Any]]) -> None:
    """One machine per host, each with its own `store:` and overrides."""
    entries: list[Any] = []
    for host, overrides in hosts.items():
        entries += yaml.safe_load(inventory_yaml([host], host.store, **overrides))["machines"]
    farm.inventory.write_text(yaml.safe_dump({"machines": entries}, sort_keys=False))


def stored_output(farm: Farm, path: str) -> dict[str, Any]:
    """The output store's record of `path` (read straight from the SQLite datastore)."""
    with sqlite3.connect(farm.state / "buildfarm.db") as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM stored_output WHERE path = ?", (path,)).fetchone()
    assert row is not None, f"{path} is not in the output store"
    return dict(row)


def build_log_exists(host: Host, drv: str) -> bool:
    """Whether `host` ran the builder of `drv` (Nix keeps a log of each build it ran)."""
    base = os.path.basename(drv)
    logs = host.nix_dir / "var" / "log" / "nix" / "drvs" / base[:2]
    return any(logs.glob(base[2:] + "*"))


def test_chain_across_guix_machines_pushes_a_signed_leaf(
    farm: Farm, machines: dict[str, Host], coordinator_key: SigningKey
) -> None:
    tag = token()
    leaf, top = chain(2, tag)
    first, second = machines["guix-a"], machines["guix-b"]
    write_inventory(farm, {first: {}})
    (leaf_build,) = farm.submit(leaf)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    leaf_info = farm.show(leaf_build)
    assert leaf_info["state"] == "succeeded", (leaf_info, done.stdout)
    (leaf_attempt,) = leaf_info["attempts"]
    assert leaf_attempt["machine"] == first.name
    assert [s["name"] for s in leaf_attempt["steps"]] == FULL_STEPS
    # The .drv went to the machine in a bundle the coordinator signed (its import demands it).
    assert first.local_path(leaf).exists()
    leaf_out = leaf_info["outputs"]["out"]
    assert first.local_path(leaf_out).read_text() == f"leaf-{tag}\n"
    assert farm.stored_nar(leaf_out).exists()
    assert not second.local_path(leaf_out).exists()
    # The output store keeps guix-a's own signature of what it exported.
    record = stored_output(farm, leaf_out)
    assert record["deriver"] == leaf
    signed = nar.export_trailer(leaf_out, record["refs"].split(), record["deriver"])
    digest = hashlib.sha256(farm.stored_nar(leaf_out).read_bytes() + signed).digest()
    assert first.guix_public_key is not None
    first_key = guix_public_key_from_sexp(first.guix_public_key)
    verify_guix(record["signature"].encode(), digest, [first_key])

    write_inventory(farm, {second: {}})
    (top_build,) = farm.submit(top)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    info = farm.show(top_build)
    assert info["state"] == "succeeded", (info, done.stdout)
    (attempt,) = info["attempts"]
    assert attempt["machine"] == second.name
    assert [s["name"] for s in attempt["steps"]] == FULL_STEPS
    # guix-b authorizes only the coordinator's key, not guix-a's: the leaf's output reached it
    # re-signed by the coordinator, from the output store; it was not rebuilt there.
    assert first_key != coordinator_key.public_bytes
    assert second.local_path(leaf_out).read_text() == f"leaf-{tag}\n"
    assert not build_log_exists(second, leaf)
    assert build_log_exists(second, top)
    top_out = info["outputs"]["out"]
    assert second.local_path(top_out).read_text() == f"level1 on leaf-{tag}\n"
    assert farm.stored_nar(top_out).exists()
    assert f"build {top_build} succeeded (on {second.name})" in done.stdout


def test_failing_builder_on_guix_ends_failed_with_its_log(
    farm: Farm, machines: dict[str, Host]
) -> None:
    tag = token()
    drv = instantiate(nix_expr_trivial(f"fails-{tag}", f"echo about to fail {tag}; exit 3"))
    write_inventory(farm, {machines["guix-a"]: {}})
    (build,) = farm.submit(drv)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    info = farm.show(build)
    assert info["state"] == "failed", (info, done.stdout)
    (attempt,) = info["attempts"]
    assert attempt["result"] == "failure"
    # `guix build` exits 1 on every daemon error: the builder's own exit code is recorded.
    assert attempt["exit_status"] == 3
    assert info["reason"] == f"builder for {drv} failed with exit code 3"
    log = farm.cli("log", build).stdout
    lines = log.splitlines()
    assert f"about to fail {tag}" in lines
    # Guix's own status lines, as `guix build` printed them on the machine.
    for line in (f"building {drv}...", f"builder for `{drv}' failed with exit code 3",
                 f"build of {drv} failed", f"guix build: error: build of `{drv}' failed"):
        assert line in lines, (line, log)
    assert f"build {build} failed" in done.stdout


def test_max_silent_time_stops_a_silent_guix_build(
    farm: Farm, machines: dict[str, Host]
) -> None:
    tag = token()
    drv = instantiate(nix_expr_trivial(
        f"silent-{tag}", f"echo going quiet {tag}; /bin/sleep 120; echo x > $out"))
    write_inventory(farm, {machines["guix-b"]: {"max_silent_time": 1}})
    (build,) = farm.submit(drv)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    info = farm.show(build)
    assert info["state"] == "failed", (info, done.stdout)
    assert info["reason"] == "timed out after 1 seconds of silence"
    log = farm.cli("log", build).stdout
    assert f"going quiet {tag}" in log
    assert f"building of `{drv}' timed out after 1 seconds of silence" in log.splitlines()


def run_until_an_attempt_ends(farm: Farm, build: str) -> str:
    """Run the coordinator until the build's first attempt has ended, stop it; its output."""
    coordinator = farm.start()
    try:
        wait_for("an attempt that ends", lambda: coordinator.poll() is not None or any(
            a["result"] for a in farm.show(build)["attempts"]))
    finally:
        coordinator.send_signal(signal.SIGTERM)
        out, _ = coordinator.communicate(timeout=60)
    assert coordinator.returncode == 0, out
    return out


def test_a_machine_that_does_not_trust_the_coordinator_is_at_fault(
    farm: Farm, guix_bed: Testbed, coordinator_key: SigningKey
) -> None:
    tag = token()
    drv = instantiate(nix_expr_trivial(f"untrusted-{tag}", f"echo {tag} > $out"))
    stranger = SigningKey.generate()
    host = next((h for h in guix_bed.hosts if h.name == "guix-untrusting"), None)
    if host is None:
        host = guix_bed.add_guix_host("guix-untrusting",
                                      authorized=[stranger.guix_public_sexp()])
    guix_bed.ensure_running()
    write_inventory(farm, {host: {}})
    (build,) = farm.submit(drv)
    out = run_until_an_attempt_ends(farm, build)
    assert "Traceback" not in out and "internal error" not in out, out
    info = farm.show(build)
    assert info["state"] == "queued", info  # requeued, to be tried again later
    attempt = info["attempts"][0]
    # Not "missing inputs" naming nothing, retried for ever: the machine's fault, and what to do.
    assert (attempt["result"], attempt["setup_failure"], attempt["missing_inputs"]) == (
        "interrupted", None, [])
    assert attempt["detail"].startswith(
        "store command failed: 1 derivation(s) could not be imported: guix archive: error: "
        "unauthorized public key: (public-key")
    assert attempt["detail"].endswith("the machine does not authorize the coordinator's key: "
                                      "see `buildfarm machines test` for where to authorize it")
    assert [s["name"] for s in attempt["steps"]] == ["push-derivations"]
    shown = farm.cli("builds", "show", build).stdout
    assert "unauthorized public key" in shown
    assert f"build {build} interrupted on {host.name}: store command failed: " in out
    assert not host.local_path(drv).exists()
    assert coordinator_key.public_bytes != stranger.public_bytes


def test_mixed_nix_and_guix_farm(farm: Farm, machines: dict[str, Host]) -> None:
    """A chain that crosses stores both ways, plus independent builds on each machine.

    Nix hosts offer the `benchmark` and `big-parallel` features by default; the inventory gives
    each machine one, so the derivations requiring it can only go there.
    """
    tag = token()
    nix_host, guix_host = machines["nix-c"], machines["guix-a"]
    write_inventory(farm, {nix_host: {"features": ["benchmark"]},
                           guix_host: {"features": ["big-parallel"]}})
    on_nix, on_guix = '[ "benchmark" ]', '[ "big-parallel" ]'
    leaf = nix_expr_trivial(f"mixed-leaf-{tag}", f"echo leaf-{tag} > $out",
                            attrs={"requiredSystemFeatures": on_nix})
    middle = nix_expr_trivial(f"mixed-middle-{tag}", 'read x < $dep; echo "middle $x" > $out',
                              attrs={"dep": leaf, "requiredSystemFeatures": on_guix})
    top = nix_expr_trivial(f"mixed-top-{tag}", 'read x < $dep; echo "top $x" > $out',
                           attrs={"dep": middle, "requiredSystemFeatures": on_nix})
    chain_drvs = [instantiate(e) for e in (leaf, middle, top)]
    free = [instantiate(nix_expr_trivial(f"mixed-{n}-{tag}", f"echo {n} > $out"))
            for n in range(4)]
    pinned = {
        instantiate(nix_expr_trivial(f"mixed-{where}-{tag}", f"echo {where} > $out",
                                     attrs={"requiredSystemFeatures": features})): host
        for where, features, host in (("n", on_nix, nix_host), ("g", on_guix, guix_host))
    }
    builds = farm.submit(*chain_drvs, *free, *pinned)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    infos = {build: farm.show(build) for build in builds}
    for build, info in infos.items():
        assert info["state"] == "succeeded", (build, info, done.stdout)
        assert len(info["attempts"]) == 1, info
    by_drv = {info["derivation"]: info for info in infos.values()}
    expected = {**dict(zip(chain_drvs, (nix_host, guix_host, nix_host), strict=True)), **pinned}
    for drv, host in expected.items():
        assert by_drv[drv]["attempts"][0]["machine"] == host.name, (drv, by_drv[drv])
    for drv in free:
        assert by_drv[drv]["attempts"][0]["machine"] in (nix_host.name, guix_host.name)
    leaf_out, middle_out, top_out = (by_drv[d]["outputs"]["out"] for d in chain_drvs)
    # nix -> guix: the leaf's output went to the guix machine signed by the coordinator.
    assert guix_host.local_path(leaf_out).read_text() == f"leaf-{tag}\n"
    assert not build_log_exists(guix_host, chain_drvs[0])
    # guix -> nix: the middle's output went to the nix machine.
    assert nix_host.local_path(middle_out).read_text() == f"middle leaf-{tag}\n"
    assert not build_log_exists(nix_host, chain_drvs[1])
    assert nix_host.local_path(top_out).read_text() == f"top middle leaf-{tag}\n"
    for info in infos.values():
        assert farm.stored_nar(info["outputs"]["out"]).exists()


def test_a_rebuild_on_a_guix_machine_that_holds_the_outputs_uses_guix_build_check(
    farm: Farm, machines: dict[str, Host]
) -> None:
    """Built once on guix-a; submitted again with guix-a the only machine: `guix build --check`
    builds it again beside the output it keeps, and the attempt records identical (a
    derivation whose output changes records differs)."""
    tag = token()
    same = instantiate(nix_expr_trivial(f"gsame-{tag}", f"echo {tag} > $out"))
    varies = instantiate(nix_expr_trivial(
        f"gvaries-{tag}", "/bin/cat /proc/sys/kernel/random/uuid > $out"))
    host = machines["guix-a"]
    write_inventory(farm, {host: {}})
    first = farm.submit(same, varies)
    assert farm.run().returncode == 0
    assert [farm.show(b)["state"] for b in first] == ["succeeded", "succeeded"]
    outputs = [farm.show(b)["outputs"]["out"] for b in first]
    kept = [host.local_path(out).read_text() for out in outputs]
    again = farm.submit(same, varies)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    for build, expected in zip(again, ("identical", "differs"), strict=True):
        info = farm.show(build)
        assert info["state"] == "succeeded", (info, done.stdout)
        (attempt,) = info["attempts"]
        assert attempt["check"] == expected, attempt
    assert [host.local_path(out).read_text() for out in outputs] == kept
    log = farm.cli("log", again[1]).stdout
    assert f"may not be deterministic: output `{outputs[1]}' differs" in log, log


# --- what a real Guix farm hits: substitutes, locales, collections, offloading -----------------


@pytest.fixture
def extra_host(guix_bed: Testbed) -> Iterator[Callable[..., Host]]:
    """Guix hosts made for one test (removed after it): extra_host(name, **add_guix_host)."""
    made: list[Host] = []

    def make(name: str, **options: Any) -> Host:
        host = guix_bed.add_guix_host(f"{name}-{token()[:6]}", **options)
        made.append(host)
        return host

    yield make
    for host in made:
        guix_bed.remove_host(host)


def restart_with(host: Host, **env: str) -> None:
    """The machine's daemon and SSH commands see `env` from now on (sshd restarted)."""
    host.env.update(env)
    host.stop()
    host.start()


def attempt_log(farm: Farm, build: str) -> list[str]:
    return farm.cli("log", build).stdout.splitlines()


def test_the_target_is_built_never_downloaded(
    farm: Farm, machines: dict[str, Host], extra_host: Callable[..., Host],
    coordinator_key: SigningKey,
) -> None:
    """A machine whose daemon substitutes from the farm's own server, which has the outputs
    of the very derivation asked for (an earlier build): a rebuild is built there, not
    downloaded (guix build --no-substitutes), and recorded so."""
    tag = token()
    drv = instantiate(nix_expr_trivial(f"rebuilt-{tag}", f"echo rebuilt {tag} > $out"))
    write_inventory(farm, {machines["guix-b"]: {}})
    (first,) = farm.submit(drv)
    assert farm.run().returncode == 0
    assert farm.show(first)["state"] == "succeeded"
    host = extra_host("guix-subst", authorized=[coordinator_key.guix_public_sexp()])
    with publishing(farm) as url:
        restart_with(host, GUIX_EMULATOR_DAEMON_SUBSTITUTE_URLS=url)
        write_inventory(farm, {host: {}})
        (again,) = farm.submit(drv)
        done = farm.run()
    assert done.returncode == 0, done.stdout
    info = farm.show(again)
    assert info["state"] == "succeeded", (info, done.stdout)
    (attempt,) = info["attempts"]
    assert attempt["machine"] == host.name and "build" in [s["name"] for s in attempt["steps"]]
    assert build_log_exists(host, drv)  # its builder ran there
    log = attempt_log(farm, again)
    assert f"building {drv}..." in log and not any("substituting" in line for line in log)


def test_inputs_come_from_substitute_servers_and_say_so(
    farm: Farm, machines: dict[str, Host]
) -> None:
    """substitute_urls: the machine downloads the input the farm's server (buildfarm publish)
    has, after an unreachable server; the coordinator pushes none of it; the attempt's log has
    the download and the build page says where the input came from. A Nix machine likewise
    (Nix's substituter, trusting the farm's key for the command)."""
    tag = token()
    leaf, top = chain(2, tag)
    write_inventory(farm, {machines["guix-a"]: {}})
    (leaf_build,) = farm.submit(leaf)
    assert farm.run().returncode == 0
    leaf_out = farm.show(leaf_build)["outputs"]["out"]
    unreachable = "http://127.0.0.1:1"
    with publishing(farm) as url:
        for host in (machines["guix-b"], machines["nix-c"]):
            write_inventory(farm, {host: {"substitute_urls": [unreachable, url]}})
            (build,) = farm.submit(top)
            done = farm.run()
            assert done.returncode == 0, done.stdout
            info = farm.show(build)
            assert info["state"] == "succeeded", (info, done.stdout)
            (attempt,) = info["attempts"]
            steps = {s["name"]: s["detail"] for s in attempt["steps"]}
            assert steps["substitute-inputs"] == f"1 input(s) asked of {unreachable} {url}"
            assert steps["push-inputs"] == "skipped: every input output is on the machine"
            assert attempt["input_sources"] == [{"path": leaf_out, "source": url}]
            assert host.local_path(leaf_out).read_text() == f"leaf-{tag}\n"
            assert not build_log_exists(host, leaf)
            log = attempt_log(farm, build)
            if host.store == "guix":
                assert f"substituting {leaf_out}..." in log
                assert any(line.startswith(f"downloading from {url}/nar/gzip/") for line in log)
                assert "guix substitute: warning: 127.0.0.1: connection failed: Connection " \
                       "refused" in log
            else:
                assert f"copying path '{leaf_out}' from '{url}'..." in log
            shown = farm.cli("builds", "show", build).stdout.splitlines()
            assert f"  input {leaf_out} from {url}" in shown
    # Already there, the input is neither downloaded nor pushed, and said so.
    write_inventory(farm, {machines["guix-a"]: {"substitute_urls": [unreachable]}})
    (built_here,) = farm.submit(top)
    farm.run()
    (attempt,) = farm.show(built_here)["attempts"]
    assert attempt["input_sources"] == [{"path": leaf_out, "source": "machine"}]


def test_a_translated_machine_cannot_hide_missing_inputs(
    farm: Farm, extra_host: Callable[..., Host], coordinator_key: SigningKey
) -> None:
    """A machine in German (LANG and LANGUAGE for SSH commands, as Guix System's .bashrc can
    give them): Guix's plan is translated unless the command says otherwise. The input that
    is nowhere is still reported missing, not built by the machine on the side."""
    tag = token()
    leaf, top = chain(2, tag)
    host = extra_host("guix-de", authorized=[coordinator_key.guix_public_sexp()],
                      env={"LANG": "de_DE.UTF-8", "LANGUAGE": "de"})
    write_inventory(farm, {host: {}})
    (build,) = farm.submit(top)
    out = run_until_an_attempt_ends(farm, build)
    attempt = farm.show(build)["attempts"][0]
    assert (attempt["result"], attempt["setup_failure"]) == ("setup-failure", "missing-inputs"), (
        attempt, out)
    leaf_out = subprocess.run(["nix-store", "-q", "--outputs", leaf], capture_output=True,
                              text=True, check=True).stdout.strip()
    assert attempt["missing_inputs"] == [leaf_out, leaf]  # and what the plan would build
    assert not build_log_exists(host, leaf) and not build_log_exists(host, top)


def test_a_collection_on_the_machine_takes_nothing_an_attempt_needs(
    farm: Farm, machines: dict[str, Host], extra_host: Callable[..., Host],
    coordinator_key: SigningKey, guix_bed: Testbed,
) -> None:
    """A machine that collects garbage (`guix gc`) right before each build and each export,
    the worst moments: what the attempt pushed (the .drv, the input) and built is held by its
    GC roots, so nothing is built again nor lost; the roots go when it ends."""
    tag = token()
    leaf, top = chain(2, tag)
    write_inventory(farm, {machines["guix-a"]: {}})
    (leaf_build,) = farm.submit(leaf)
    assert farm.run().returncode == 0
    wrapper_dir = guix_bed.directory / f"gc-guix-{tag}"
    wrapper_dir.mkdir(mode=0o755)
    real = guix_bed.guix_bin_dir() / "guix"
    (wrapper_dir / "guix").write_text(
        "#!/bin/sh\ncase \" $* \" in\n"
        "  *' build --no-grafts --no-substitutes '*|*' archive --export '*)\n"
        f"    {real} gc > /dev/null 2>&1 || exit 99 ;;\nesac\nexec {real} \"$@\"\n")
    (wrapper_dir / "guix").chmod(0o755)
    host = extra_host("guix-gc", authorized=[coordinator_key.guix_public_sexp()],
                      env={"PATH": f"{wrapper_dir}:/usr/local/bin:/usr/bin:/bin"})
    write_inventory(farm, {host: {}})
    (build,) = farm.submit(top)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    info = farm.show(build)
    assert info["state"] == "succeeded", (info, done.stdout)
    assert len(info["attempts"]) == 1
    assert not build_log_exists(host, leaf)  # the input pushed was not collected, nor rebuilt
    leaf_out = farm.show(leaf_build)["outputs"]["out"]
    assert farm.stored_nar(info["outputs"]["out"]).exists()
    roots = host.nix_dir / "var" / "nix" / "profiles" / "per-user" / host.user
    assert [list(d.iterdir()) for d in roots.iterdir()] == [[]]  # the attempt's went
    # Nothing holds them now: the next collection takes them.
    host.run("guix gc")
    assert not host.local_path(leaf_out).exists()


def test_a_machine_with_machines_scm_does_not_offload_farm_builds(
    farm: Farm, extra_host: Callable[..., Host], coordinator_key: SigningKey
) -> None:
    """guix build offloads by default (guix/scripts/build.scm `(offload? . #t)`) when the
    machine has /etc/guix/machines.scm: the farm's builds stay where the farm sent them."""
    host = extra_host("guix-offloader", authorized=[coordinator_key.guix_public_sexp()])
    (host.guix_dir / "machines.scm").write_text(
        f'(list (build-machine (name "far") (host-name "far.example.org") '
        f'(systems (list "{current_system()}")) (host-key "ssh-ed25519 AAAA") (user "b")))\n')
    tag = token()
    drv = instantiate(nix_expr_trivial(f"stays-{tag}", f"echo {tag} > $out"))
    write_inventory(farm, {host: {}})
    (build,) = farm.submit(drv)
    done = farm.run()
    assert done.returncode == 0, done.stdout
    assert farm.show(build)["state"] == "succeeded"
    log = attempt_log(farm, build)
    assert f"building {drv}..." in log
    assert not any(line.startswith("offloading build of") for line in log), log


@pytest.fixture
def small_disk_host(guix_bed: Testbed, coordinator_key: SigningKey) -> Iterator[Host]:
    """A Guix host whose /nix is a 16 MiB file system of its own (a tmpfs)."""
    host = guix_bed.add_guix_host(f"guix-full-{token()[:6]}", start=False,
                                  authorized=[coordinator_key.guix_public_sexp()])
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=755", "tmpfs",
                              str(host.nix_dir)], capture_output=True, check=False)
    assert mounted.returncode == 0, mounted.stderr
    try:
        owner = guix_bed.account
        for path in (host.nix_dir, host.store_dir, host.nix_dir / "var",
                     host.nix_dir / "var" / "nix"):
            path.mkdir(mode=0o755, exist_ok=True)
            os.chown(path, owner.pw_uid, owner.pw_gid)
        host.guix_daemon(True)
        host.start()
        host.run("nix-store --dump-db")
        yield host
    finally:
        host.stop()
        subprocess.run(["umount", "-l", str(host.nix_dir)], check=False)
        guix_bed.remove_host(host)


def test_a_machine_at_fault_is_backed_off_and_the_build_goes_elsewhere(
    farm: Farm, machines: dict[str, Host], small_disk_host: Host,
) -> None:
    """Guix's client exits 1 for every daemon error: a daemon that is down, or a full disk,
    is not the build's failure. The attempt is the machine's fault, the machine is paused
    (its failure recorded), and the build succeeds on the other machine, never failed."""
    down = machines["guix-a"]
    tag = token()
    plain = instantiate(nix_expr_trivial(f"plain-{tag}", f"echo {tag} > $out"))
    big = instantiate(nix_expr_trivial(
        f"big-{tag}", "/bin/dd if=/dev/zero of=$out bs=1M count=24"))
    down.guix_daemon(False)
    try:
        for first, drv in ((down, plain), (small_disk_host, big)):
            # The faulty machine alone first, then the other one too (the inventory reloaded).
            write_inventory(farm, {first: {}})
            (build,) = farm.submit(drv)
            with running(farm) as run:
                wait_for("the first attempt's end", lambda: any(
                    a.result for a in farm.attempts(build)))  # noqa: B023
                write_inventory(farm, {first: {}, machines["guix-b"]: {}})
                run.process.send_signal(signal.SIGHUP)
                farm.wait_for_state(build, "succeeded")
            # The faulty machine, back after its pause, may have been tried again first.
            *faulty, good = farm.show(build)["attempts"]
            assert faulty
            assert good["machine"] == machines["guix-b"].name
            assert f"interrupted on {first.name}: store command failed: " in run.output
            expected = ("failed to connect to `/nix/var/nix/daemon-socket/socket'"
                        if first is down else "No space left on device")
            ((failures, last_error),) = farm.rows(
                "SELECT failures, last_error FROM machine_state WHERE name = ?", first.name)
            assert failures >= 1 and expected in last_error, last_error
            for attempt in faulty:
                assert (attempt["machine"], attempt["result"]) == (first.name, "interrupted")
                assert attempt["detail"].startswith("store command failed: ")
                assert expected in attempt["detail"], attempt
    finally:
        down.guix_daemon(True)
