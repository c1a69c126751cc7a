"""Fault suite, coordinator side: `buildfarm run` killed at random moments, and many clients
submitting at once while it works (RELIABILITY.md, faults 1 and 7).

The counts are the CI share; raise them for a long run, e.g. ``BUILDFARM_FAULT_KILLS=200
BUILDFARM_FAULT_BUILDS=500 BUILDFARM_FAULT_SEED=3 bash scripts/test tests/test_faults_crash.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import needs
import pytest
import zstandard
from engines import ScratchDatabase
from farm import Farm, gated_build, running, token, wait_for
from guix_emulator.gcrypt import Sexp
from guix_emulator.pki import narinfo_signed
from testbed import Host, Testbed, instantiate_all, nix_expr_trivial

from buildfarm.formats import nar, narinfo
from buildfarm.formats.keys import key_name
from buildfarm.formats.signing import load_key

BUILDS = int(os.environ.get("BUILDFARM_FAULT_BUILDS", "100"))
KILLS = int(os.environ.get("BUILDFARM_FAULT_KILLS", "20"))
SEED = int(os.environ.get("BUILDFARM_FAULT_SEED", "8"))
CLIENTS = int(os.environ.get("BUILDFARM_FAULT_CLIENTS", "8"))
SUBMISSIONS = int(os.environ.get("BUILDFARM_FAULT_SUBMISSIONS", "1000"))
SUBMIT_BATCH = int(os.environ.get("BUILDFARM_FAULT_SUBMIT_BATCH", "20"))
BUSY_BUILDS = 40  # what `run` builds meanwhile
# Moments (seconds after the start of `run`) at which it is killed: before it has even opened
# the datastore, up to well into allocation, building and fetching.
KILL_WINDOW = (0.1, 2.0)
FINAL_STATES = {"succeeded", "failed", "canceled"}
STATES = {"queued", "running", *FINAL_STATES}

HOOK = """#!/bin/sh
cat >/dev/null
echo "$BUILDFARM_EVENT_ID $BUILDFARM_EVENT $BUILDFARM_BUILD_UUID" >> {log}
"""


@pytest.fixture
def farm(
    tmp_path: Path, testbed: Testbed, private_nix: Path, database: ScratchDatabase
) -> Farm:
    """A farm on the datastore engine under test (these tests run on every engine)."""
    needs.libgcrypt()  # the narinfos' Guix signatures are checked with it
    farm = Farm(tmp_path / "state", tmp_path / "inventory.yaml", tmp_path / "hooks")
    farm.env["BUILDFARM_DB"] = database.url
    return farm


def install_recording_hooks(farm: Farm, events: list[str]) -> Path:
    """A hook per event that appends "ID EVENT UUID" to a file: what was delivered."""
    log = farm.state.parent / "delivered.txt"
    assert farm.env["BUILDFARM_HOOKS_DIR"]
    for event in events:
        directory = Path(farm.env["BUILDFARM_HOOKS_DIR"]) / f"{event}.d"
        directory.mkdir(parents=True, exist_ok=True)
        script = directory / "50-record"
        script.write_text(HOOK.format(log=log))
        script.chmod(0o755)
    return log


def check_consistent(
    farm: Farm, database: ScratchDatabase, submitted: set[str], *, finished: bool
) -> dict[str, str]:
    """What must hold at any moment, even right after a SIGKILL: returns uuid -> state.

    Every submission is there, once; each build is in one known state, with at most one open
    attempt (exactly one when running) and at most one success (exactly one when succeeded);
    each recorded output's nar is whole and matches its hash; every nar file in the store is a
    whole nar; each build has one build-submitted event, and one build-success event exactly
    when it succeeded.
    """
    builds = dict(database.rows("SELECT uuid, state FROM build"))  # type: ignore[arg-type]
    assert set(builds) == submitted, "submissions lost or invented"
    assert set(builds.values()) <= STATES
    attempts = database.rows(
        "SELECT b.uuid, a.result FROM attempt a JOIN build b ON b.id = a.build_id",
    )
    open_attempts = Counter(u for u, result in attempts if result is None)
    successes = Counter(u for u, result in attempts if result == "success")
    for uuid, state in builds.items():
        assert open_attempts[uuid] == (1 if state == "running" else 0), (uuid, state)
        assert successes[uuid] == (1 if state == "succeeded" else 0), (uuid, state)
        if finished:
            assert state == "succeeded", (uuid, state)
    # Outputs: each recorded one is complete; no file of the store is a partial nar; each
    # published narinfo names whole files (and, once recorded, the recorded hash).
    stored = database.rows("SELECT path, nar_hash, nar_size, file FROM stored_output")
    outputs_dir = farm.state / "outputs"
    recorded, recorded_files = {}, set()
    for path, nar_hash, nar_size, file in stored:
        nar_file = outputs_dir / str(file)
        recorded[str(path)] = str(nar_hash)
        recorded_files.add(nar_file.name)
        data = nar_file.read_bytes()
        digest = "sha256:" + nar.nix_base32_encode(hashlib.sha256(data).digest())
        assert (digest, len(data)) == (nar_hash, nar_size), path
    nar_dir = outputs_dir / "nar"
    for entry in nar_dir.iterdir() if nar_dir.exists() else ():
        if entry.is_file() and entry.name not in recorded_files:  # those matched their hash
            assert_whole_nar(entry)
    for info_file in outputs_dir.glob("*.narinfo"):
        check_narinfo(info_file, outputs_dir, recorded)
    succeeded_outputs = database.rows(
        "SELECT o.path FROM build b JOIN derivation_output o ON o.derivation_id = b.derivation_id"
        " WHERE b.state = 'succeeded'",
    )
    assert {str(p) for (p,) in succeeded_outputs} <= set(recorded)
    events = database.rows(
        "SELECT e.name, b.uuid FROM event e JOIN build b ON b.id = e.build_id"
    )
    submitted_events = Counter(u for name, u in events if name == "build-submitted")
    success_events = Counter(u for name, u in events if name == "build-success")
    for uuid, state in builds.items():
        assert submitted_events[uuid] == 1, uuid
        assert success_events[uuid] == (1 if state == "succeeded" else 0), uuid
    return builds  # type: ignore[return-value]


def check_narinfo(info_file: Path, outputs_dir: Path, recorded: dict[str, str]) -> None:
    """A published narinfo is whole and signed (for Guix, checked with libgcrypt; for Nix) and
    names whole compressed nars with its hash, the recorded one once recorded (the coordinator
    publishes before it records)."""
    text = info_file.read_text()
    info = narinfo.parse(text)
    key = load_key(outputs_dir.parent)
    public = Sexp.parse(key.guix_public_sexp())
    assert public is not None and narinfo_signed(text, [public]), info_file
    assert narinfo.verify_nix_sigs(info, [key.nix_public(key_name(outputs_dir.parent))])
    assert recorded.get(info.store_path, info.nar_hash) == info.nar_hash, info_file
    assert info.files, info_file
    for published in info.files:
        blob = (outputs_dir / unquote(published.url)).read_bytes()
        assert published.file_size in (None, len(blob)), published
        unpacked = (gzip.decompress(blob) if published.compression == "gzip" else
                    zstandard.ZstdDecompressor().decompress(blob, max_output_size=info.nar_size))
        digest = "sha256:" + nar.nix_base32_encode(hashlib.sha256(unpacked).digest())
        assert (digest, len(unpacked)) == (info.nar_hash, info.nar_size), published


def assert_whole_nar(path: Path) -> None:
    """The file is one complete nar and nothing else (a truncated one raises ArchiveError)."""
    with open(path, "rb") as stream, tempfile.TemporaryDirectory() as scratch:
        nar.restore_nar(stream, os.path.join(scratch, "x"), source=str(path))
        assert stream.read(1) == b"", f"{path}: bytes after the nar"


def crash_script(n: int, tag: str) -> str:
    """Builds of varied length; every tenth output is 4 MiB, so that kills also land while
    outputs are exported, fetched and stored."""
    if n % 10 == 0:
        return f"echo {tag}; /usr/bin/head -c 4194304 /dev/urandom > $out"
    return f"/bin/sleep 0.{n % 7}; echo {n} {tag} > $out"


def test_coordinator_killed_at_random_moments_loses_nothing(
    farm: Farm, hosts: list[Host], database: ScratchDatabase
) -> None:
    """SIGKILL `run` KILLS times at seeded random moments while BUILDS builds go through."""
    rng = random.Random(SEED)
    tag = token()
    members = " ".join(f"({nix_expr_trivial(f'crash{n}-{tag}', crash_script(n, tag))})"
                       for n in range(BUILDS))
    drvs = instantiate_all(f"[ {members} ]")
    assert len(drvs) == BUILDS
    farm.write_inventory(hosts)
    hooked = ["build-submitted", "build-success"]
    delivered_log = install_recording_hooks(farm, hooked)
    submitted = set(farm.submit(*drvs))
    assert len(submitted) == BUILDS
    kills: list[str] = []
    hit: Counter[str] = Counter()  # the steps open attempts were at when `run` died
    for number in range(KILLS):
        delay = rng.uniform(*KILL_WINDOW)
        last = database.scalar("SELECT COALESCE(MAX(id), 0) FROM attempt")
        run = farm.background()
        # Every other kill counts from the first attempt's start, so that half of them land
        # in the middle of attempts; the others may land anywhere, start-up included.
        if number % 2 and database.scalar(
            "SELECT COUNT(*) FROM build WHERE state IN ('queued', 'running')"
        ):
            run.wait_line(" started on ")
        time.sleep(delay)
        steps = [str(step) for (step,) in database.rows(
            "SELECT step FROM attempt WHERE result IS NULL AND id > ?", last)]
        run.process.send_signal(signal.SIGKILL)
        out = run.stop()
        assert run.process.returncode == -signal.SIGKILL, out
        assert "Traceback" not in out, out
        states = check_consistent(farm, database, submitted, finished=False)
        hit.update(steps)
        kills.append(f"{delay:.2f}s, attempts at {sorted(steps)}: {Counter(states.values())}")
    done = farm.run()
    assert done.returncode == 0, done.stdout
    assert "Traceback" not in done.stdout, done.stdout
    check_consistent(farm, database, submitted, finished=True)
    # Every event is delivered: marked so, and each one ran its hook at least once.
    events = database.rows("SELECT id, name, delivered_at FROM event")
    assert all(delivered is not None for _, _, delivered in events)
    seen = {int(line.split()[0]) for line in delivered_log.read_text().splitlines()}
    assert {int(str(i)) for i, name, _ in events if name in hooked} <= seen
    # Transfers in flight when killed were cleaned away at the next start.
    assert list((farm.state / "outputs" / "tmp").iterdir()) == []
    print("\n".join(kills))
    print(f"steps hit: {dict(hit)}")


# --- 7. concurrent clients -----------------------------------------------------------------

# One client: the real command line, called in-process once per batch (so that 1,000
# submissions cost no interpreter start-ups), recording what a user would have seen.
CLIENT = """
import json, os, sys, time
from click.testing import CliRunner
from buildfarm.cli import cli

files, batch, halfway, go = json.load(open(sys.argv[1])), int(sys.argv[2]), *sys.argv[3:5]
runner, uuids, errors = CliRunner(), [], []
for start in range(0, len(files), batch):
    if start and start // batch == len(files) // batch // 2:  # halfway: say so, wait for go
        open(halfway, "w").close()
        while not os.path.exists(go):
            time.sleep(0.05)
    result = runner.invoke(cli, ["submit", *files[start:start + batch]])
    if result.exit_code != 0 or result.stderr:
        errors.append(f"exit {result.exit_code}: {result.stderr}{result.exception!r}")
    uuids += result.stdout.split()
json.dump({"uuids": uuids, "errors": errors}, sys.stdout)
"""


def write_queued_derivations(directory: Path, count: int, tag: str) -> list[str]:
    """`count` derivation files for a system no machine has: they stay queued, so the
    coordinator's work is the builds the test gives it, not these."""
    from buildfarm.formats.derivation import Derivation, DerivationOutput, serialize

    files = []
    for n in range(count):
        name = f"queued-{tag}-{n}"
        digest = nar.nix_base32_encode(hashlib.sha256(name.encode()).digest()[:20])
        out = f"/nix/store/{digest}-{name}"
        drv = Derivation(
            outputs=(DerivationOutput("out", out, "", ""),),
            input_drvs=(), input_srcs=(), system="fault-test-system", builder="/bin/sh",
            args=("-c", "exit 1"), env=(("name", name), ("out", out), ("system", "x")),
        )
        drv_digest = nar.nix_base32_encode(hashlib.sha256(out.encode()).digest()[:20])
        path = directory / f"{drv_digest}-{name}.drv"
        path.write_bytes(serialize(drv))
        files.append(str(path))
    return files


def test_concurrent_clients_submit_while_run_works(
    farm: Farm, hosts: list[Host], testbed: Testbed, database: ScratchDatabase, tmp_path: Path
) -> None:
    """CLIENTS processes each submit SUBMISSIONS builds, SUBMIT_BATCH per command, while
    `run` builds and delivers events: every command succeeds (no "database is locked" or any
    other error reaches a user), and every build is recorded once. One build ends, and its
    event is delivered, while every client is halfway (each waits there until then)."""
    tag = token()
    members = " ".join(
        f"({nix_expr_trivial(f'busy{n}-{tag}', f'/bin/sleep 0.{n % 8}; echo {n} > $out')})"
        for n in range(BUSY_BUILDS)
    )
    busy = set(farm.submit(*instantiate_all(f"[ {members} ]")))
    gate = testbed.directory / f"gate-{tag}"
    (meanwhile,) = farm.submit(gated_build(tag, gate))
    drv_dir = tmp_path / "derivations"
    drv_dir.mkdir()
    # Thousands of small files: on a tmpfs, their writing is not what the test waits for.
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(drv_dir)], check=True)
    lists = []
    for client in range(CLIENTS):
        files = write_queued_derivations(drv_dir, SUBMISSIONS, f"{tag}-{client}")
        lists.append(tmp_path / f"client-{client}.json")
        lists[-1].write_text(json.dumps(files))
    farm.write_inventory(hosts)
    try:
        submit_concurrently(farm, database, lists, busy | {meanwhile}, (meanwhile, gate))
    finally:
        gate.touch()
        subprocess.run(["umount", "--lazy", str(drv_dir)], check=False)


def submit_concurrently(
    farm: Farm, database: ScratchDatabase, lists: list[Path], busy: set[str],
    meanwhile: tuple[str, Path],
) -> None:
    """The clients submit `lists` while `run` builds `busy`; the gated build `meanwhile` is let
    end, and its event delivered, while every client waits halfway."""
    build, gate = meanwhile
    go = gate.with_name(gate.name + "-clients")
    with running(farm) as run:
        run.wait_line("started on")  # the coordinator is at work
        began = time.time()
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(path), str(SUBMIT_BATCH), f"{path}.halfway",
                 str(go)],
                env=farm.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for path in lists
        ]
        wait_for("every client halfway", lambda: all(
            Path(f"{path}.halfway").exists() or client.poll() is not None
            for path, client in zip(lists, clients, strict=True)))
        gate.touch()
        wait_for("the gated build's success delivered", lambda: database.rows(
            "SELECT e.delivered_at IS NOT NULL FROM event e JOIN build b ON b.id = e.build_id"
            " WHERE b.uuid = ? AND e.name = 'build-success'", build) == [(True,)])
        go.touch()
        reports = []
        for client in clients:
            out, err = client.communicate(timeout=3600)
            assert client.returncode == 0 and not err, err
            reports.append(json.loads(out))
        finished = time.time()
        for build in busy:
            wait_for(f"build {build}", lambda b=build: database.rows(  # type: ignore[misc]
                "SELECT state FROM build WHERE uuid = ?", b) == [("succeeded",)])
    errors = [e for r in reports for e in r["errors"]]
    assert errors == []
    submitted = [u for r in reports for u in r["uuids"]]
    assert len(submitted) == len(set(submitted)) == CLIENTS * SUBMISSIONS
    recorded = {u for (u,) in database.rows("SELECT uuid FROM build")}
    assert recorded == set(submitted) | busy
    queued = database.scalar("SELECT COUNT(*) FROM build WHERE state = 'queued'")
    assert queued == CLIENTS * SUBMISSIONS
    events = database.scalar("SELECT COUNT(*) FROM event WHERE name = 'build-submitted'")
    assert events == len(recorded)
    # The coordinator wrote meanwhile: builds ended, events of the new builds were delivered.
    ended = database.rows("SELECT ended_at FROM build WHERE state = 'succeeded'")
    assert any(began < t < finished for (t,) in ended)
    delivered = database.rows("SELECT delivered_at FROM event WHERE delivered_at IS NOT NULL")
    assert any(began < t < finished for (t,) in delivered)
