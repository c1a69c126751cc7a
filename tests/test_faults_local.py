"""Fault suite, coordinator side: a full output store, hooks that misbehave, a build that floods
its log, and hostile names (RELIABILITY.md, faults 5, 8, 9 and 10).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from farm import AttemptRow, Farm, check_stored, running, token, wait_for
from testbed import NIX_CONF, Host, Testbed, instantiate, nix_expr_trivial, nix_string

# Bytes the flooding build prints: 256 MiB in CI (Nix itself passes a build log on at about
# 60 MB/s here); the long run prints 4 GiB (RELIABILITY.md).
FLOOD_BYTES = int(os.environ.get("BUILDFARM_FAULT_LOG_BYTES", str(256 << 20)))


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Farm:
    return Farm(tmp_path / "state", tmp_path / "inventory.yaml", tmp_path / "hooks")


def add_hook(farm: Farm, event: str, name: str, script: str) -> None:
    directory = Path(farm.env["BUILDFARM_HOOKS_DIR"]) / f"{event}.d"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


# --- 5. a full output store ----------------------------------------------------------------


@pytest.mark.parametrize(("size", "steps"), [
    ("8m", {"fetch-outputs"}),  # the fetched bundle does not fit
    ("24m", {"verify-outputs"}),  # the bundle fits, the nar taken out of it does not
    ("44m", {"verify-outputs"}),  # the nar fits, not its compressed copies: while publishing
])
def test_a_full_output_store_fails_attempts_cleanly_and_they_are_retried_later(
    farm: Farm, hosts: list[Host], size: str, steps: set[str]
) -> None:
    """The output store is a small tmpfs and the output 16 MiB of random bytes, so the disk
    fills while the output is fetched, stored or published: the attempt fails on the
    coordinator's side and ends interrupted, nothing partial is left, the machine is not
    blamed, the coordinator keeps running, and the build waits before it is tried again;
    once there is room, it succeeds."""
    outputs = farm.state / "outputs"
    outputs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(outputs)],
                   check=True)
    try:
        tag = token()
        script = f"echo {tag}; /usr/bin/head -c 16777216 /dev/urandom > $out"
        (build,) = farm.submit(instantiate(nix_expr_trivial(f"full-{tag}", script)))
        farm.write_inventory(hosts[:1])
        with running(farm, "--grace", "0") as run:
            wait_for("an attempt failed on the full disk", lambda: bool(full(farm, build)))
            run.wait_line(f"build {build} interrupted on {hosts[0].name}")
            assert run.process.poll() is None
            ((failures,),) = farm.rows(
                "SELECT failures FROM machine_state WHERE name = ?", hosts[0].name
            )
            assert failures == 0  # a full disk here says nothing about the machine
            ((retry_after, ended_at),) = farm.rows(
                "SELECT b.retry_after, a.ended_at FROM build b JOIN attempt a"
                " ON a.build_id = b.id WHERE b.uuid = ?", build,
            )
            assert farm.state_of(build) == "queued" and retry_after > ended_at
        (failed,) = farm.attempts(build)  # not tried again at once
        assert failed.result == "interrupted" and failed.step in steps, failed
        assert (failed.detail or "").startswith("coordinator: "), failed
        assert farm.rows("SELECT path FROM stored_output") == []
        assert list(outputs.glob("*.narinfo")) == []  # nothing is offered
        left = sorted(str(p.relative_to(outputs / "nar"))
                      for p in (outputs / "nar").rglob("*") if p.is_file())
        if size == "44m":
            # Renamed into place before the disk filled, so whole (RELIABILITY.md): the nar,
            # no compressed copy; no record names it, so the next start removes it.
            (nar,) = left
            assert "/" not in nar and (outputs / "nar" / nar).stat().st_size > 16 << 20
        else:
            assert left == []
        assert list((outputs / "tmp").iterdir()) == []
        # Room for the fetched bundle, the nar and its compressed copies.
        subprocess.run(["mount", "-o", "remount,size=256m", str(outputs)], check=True)
        done = farm.run()
        assert done.returncode == 0, done.stdout
        assert farm.state_of(build) == "succeeded"
        ((started,),) = farm.rows("SELECT MAX(started_at) FROM attempt")
        assert started >= retry_after
        check_stored(farm, build, hosts[0])
    finally:
        subprocess.run(["umount", "--lazy", str(outputs)], check=False)


def full(farm: Farm, build: str) -> list[AttemptRow]:
    return [a for a in farm.attempts(build) if "No space left on device" in (a.detail or "")]


# --- 9. hooks that misbehave ---------------------------------------------------------------


def test_misbehaving_hooks_leave_the_coordinator_unaffected(
    farm: Farm, hosts: list[Host]
) -> None:
    """Every event runs a hook that hangs, one that crashes, one that floods its output and
    one that exits non-zero: builds go on meanwhile, every event is still delivered, each
    misbehaviour is reported, the hanging hook is killed, and `run` exits normally."""
    tag = token()
    record = farm.state.parent / "delivered.txt"
    for event in ("build-submitted", "build-success"):
        add_hook(farm, event, "10-hang", f"exec /bin/sh -c '/bin/sleep 3600' hang-{tag}\n")
        add_hook(farm, event, "20-crash", "kill -SEGV $$\n")
        add_hook(farm, event, "30-flood", f"/usr/bin/yes flood-{tag} | /usr/bin/head -c 50M\n")
        add_hook(farm, event, "40-fail", "echo failing on purpose; exit 7\n")
        add_hook(farm, event, "50-record", f'echo "$BUILDFARM_EVENT_ID" >> {record}\n')
    drvs = [instantiate(nix_expr_trivial(f"h{n}-{tag}", f"echo {n} > $out")) for n in range(2)]
    builds = farm.submit(*drvs)
    farm.write_inventory(hosts)
    done = farm.run("--hook-timeout", "3")
    assert done.returncode == 0, done.stdout
    assert "Traceback" not in done.stdout
    for build in builds:
        assert farm.state_of(build) == "succeeded"
    events = farm.events()
    assert all(e.delivered for e in events)
    hooked = {e.id for e in events if e.name in ("build-submitted", "build-success")}
    assert len(hooked) == 2 * len(builds)
    assert {int(line) for line in record.read_text().split()} == hooked
    out = done.stdout
    assert "hook build-success/10-hang: killed after the 3s timeout" in out
    assert "hook build-success/20-crash: crashed (SIGSEGV)" in out
    assert "hook build-success/30-flood: (more output not logged)" in out
    assert "hook build-success/40-fail: exited with status 7" in out
    # The builds did not wait for the hooks: each started before the hooks of its
    # build-submitted event were through (they take the 3 s of the hanging one, at least).
    for started, delivered in farm.rows(
        "SELECT b.started_at, e.delivered_at FROM build b JOIN event e ON e.build_id = b.id"
        " WHERE e.name = 'build-submitted'"
    ):
        assert started < delivered
    leftover = subprocess.run(["pgrep", "-f", f"hang-{tag}"], capture_output=True)
    assert leftover.returncode == 1, leftover.stdout


# --- 10. a log flood -----------------------------------------------------------------------


def test_a_build_flooding_its_log_is_capped_and_still_finishes(
    farm: Farm, testbed: Testbed, private_nix: Path
) -> None:
    """The builder prints FLOOD_BYTES of log; `run --max-log-size 1M` keeps the
    first MiB, says how much it dropped, and the build succeeds."""
    # Nix keeps its own bzip2 copy of every build log unless told not to: on a machine of the
    # test bed that would be the slow part, so this one has keep-build-log off.
    conf = testbed.directory / f"nix-conf-{token()}"
    conf.mkdir(mode=0o755)
    (conf / "nix.conf").write_text(NIX_CONF + "keep-build-log = false\n")
    (conf / "nix.conf").chmod(0o644)
    host = testbed.add_host(env={"NIX_CONF_DIR": str(conf)})
    try:
        tag = token()
        line = f"flood {tag} " + "x" * 1000
        script = (
            f"/usr/bin/yes {shlex.quote(line)} | /usr/bin/head -c {FLOOD_BYTES}; "
            f"echo end of flood {tag}; echo {tag} > $out"
        )
        (build,) = farm.submit(instantiate(nix_expr_trivial(f"flood-{tag}", script)))
        farm.write_inventory([host])
        done = farm.run("--max-log-size", "1M")
        assert done.returncode == 0, done.stdout
        assert farm.state_of(build) == "succeeded"
        log = farm.cli("log", build).stdout
        kept, _, note = log.rpartition("\n[buildfarm: log truncated: ")
        assert len(kept.encode()) <= 1 << 20
        assert kept.startswith(f"flood {tag} ") or f"flood {tag} " in kept[:4096]
        dropped = int(note.split()[0])
        assert dropped >= FLOOD_BYTES - (1 << 20)
        ((log_path,),) = farm.rows(
            "SELECT a.log_path FROM attempt a JOIN build b ON b.id = a.build_id"
            " WHERE b.uuid = ?", build,
        )
        assert os.path.getsize(log_path) < 1 << 20  # compressed, and capped before that
    finally:
        testbed.remove_host(host)


# --- 8. hostile names, end to end ----------------------------------------------------------


def test_hostile_names_never_reach_a_shell_nor_leave_the_state_directory(
    farm: Farm, hosts: list[Host], testbed: Testbed, tmp_path: Path
) -> None:
    """Shell metacharacters, quotes and newlines in a derivation's environment, the directory
    it is submitted from, tag values and a --uuid: each is refused with a one-line error or
    passed along verbatim; no shell ever runs them, on the coordinator or the machine."""
    canary_dir = testbed.directory / f"canary-{token()}"
    canary_dir.mkdir()
    canary_dir.chmod(0o1777)  # the machine's user could create the canary too
    canary = canary_dir / "pwned"
    touch = f"touch {canary}"
    hostile = f"$({touch}) `{touch}` ;{touch}; |{touch} && {touch} '\"\\ * ? ~ > <"
    tag = token()
    expr = nix_expr_trivial(
        f"hostile?=+-._{tag}", 'printf %s "$evil" > $out', attrs={"evil": nix_string(hostile)}
    )
    drv = instantiate(expr)
    # A file name cannot hold the canary's path: this one names it through the environment.
    farm.env["BUILDFARM_FAULT_CANARY"] = str(canary)
    by_name = "touch $BUILDFARM_FAULT_CANARY"
    odd_dir = tmp_path / f"dir $({by_name}) `{by_name}`;{by_name};'\"\n end"
    odd_dir.mkdir()
    submitted = odd_dir / os.path.basename(drv)
    submitted.write_bytes(Path(drv).read_bytes())
    add_hook(farm, "build-success", "50-payload", f"cat > {tmp_path / 'payload.json'}\n")
    farm.write_inventory(hosts[:1])

    refused = [
        farm.cli("submit", str(submitted), "--tag", f"note=line\n{hostile}", check=False),
        farm.cli("submit", str(submitted), "--uuid", hostile, check=False),
        farm.cli("submit", str(submitted), "--tag", f"{hostile}=x", check=False),
    ]
    for done in refused:
        assert done.returncode == 1, done
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    # A derivation file that is not named like a store path gets its path from its name, which
    # must make a valid store path: no '/', '..', newline or '$(' goes into the state.
    named = Path(drv).read_bytes().replace(
        f'("name","hostile?=+-._{tag}")'.encode(), b'("name","../../x $(' + touch.encode()
        + b')\\n")'
    )
    assert named != Path(drv).read_bytes()
    loose = tmp_path / "loose-derivation"
    loose.write_bytes(named)
    done = farm.cli("submit", str(loose), check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done
    assert "makes no valid store path" in done.stderr

    (build,) = farm.submit(str(submitted), extra=("--tag", f"note={hostile}"))
    done = farm.run()
    assert done.returncode == 0, done.stdout
    assert farm.state_of(build) == "succeeded"
    out = farm.show(build)["outputs"]["out"]
    assert hosts[0].local_path(out).read_text() == hostile
    payload = json.loads((tmp_path / "payload.json").read_text())
    assert payload["build"]["tags"] == {"note": hostile}
    assert not canary.exists()
    # Everything the coordinator wrote is under the state directory (or is the hook's file).
    outside = {p.name for p in tmp_path.iterdir()} - {
        "state", "inventory.yaml", "hooks", "payload.json", odd_dir.name, "loose-derivation"
    }
    assert outside == set()
    assert os.listdir(odd_dir) == [submitted.name]
    assert [b["uuid"] for b in farm.builds()] == [build]
