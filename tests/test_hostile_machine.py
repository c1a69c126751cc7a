"""Hostile machines (RELIABILITY.md, "Hostile inputs"): a build machine whose `nix-store` and
sftp-server misbehave on cue (tests/hostile/) cannot fill the coordinator's memory, hang an
attempt, or keep a build from finishing. For each misbehaviour: the coordinator's peak memory
stays bounded, the attempt ends with a message naming the machine and what it did, the machine
is backed off, and the build then succeeds on a healthy machine.

The hostile machine is preferred (speed 100), so that each build is tried there first; a build
is submitted once both machines are connected. Its answer_timeout is 3 s.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from farm import Farm, running, token
from testbed import Host, Testbed, instantiate, inventory_yaml, nix_expr_trivial

from buildfarm.coordinator.attempt import STREAM_LIMIT

HOSTILE = Path(__file__).parent / "hostile"
ANSWER_TIMEOUT = 3
# The coordinator's peak resident memory, in KiB, at most: it runs at about 80 MB, collects at
# most 64 MiB of a command's output, and the misbehaviours offer it from 512 MiB to 1 GiB.
PEAK_RSS = 300 * 1024


@pytest.fixture(scope="module")
def hostile(testbed: Testbed) -> Iterator[Host]:
    """A test host whose nix-store and sftp subsystem are tests/hostile/'s, behaving until a
    test writes a cue into $HOME/misbehave."""
    bin_dir = testbed.directory / f"hostile-bin-{token()}"
    bin_dir.mkdir(mode=0o755)
    for script, name in (("nix_store.py", "nix-store"), ("sftp_server.py", "sftp-server")):
        shutil.copy(HOSTILE / script, bin_dir / name)
        (bin_dir / name).chmod(0o755)
    host = testbed.add_host(env={"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"},
                            sftp=str(bin_dir / "sftp-server"))
    try:
        yield host
    finally:
        testbed.remove_host(host)


def peak_rss(pid: int) -> int:
    """The process's peak resident set so far (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def misbehave(
    tmp_path: Path, hostile: Host, healthy: Host, cue: str, *, big: bool = False,
    **overrides: object,
) -> tuple[Farm, str, str, int]:
    """Run one build with `cue` on the hostile machine; the farm, the build, the coordinator's
    output and its peak RSS (KiB)."""
    farm = Farm(tmp_path / "state", tmp_path / "inventory.yaml")
    machines = []
    for host, fields in ((hostile, {"speed": 100, "answer_timeout": ANSWER_TIMEOUT, **overrides}),
                         (healthy, {})):
        machines += yaml.safe_load(inventory_yaml([host], "nix", max_builds=1, **fields))[
            "machines"]
    farm.inventory.write_text(yaml.safe_dump({"machines": machines}, sort_keys=False))
    tag = token()
    size = STREAM_LIMIT + 4096 if big else 4096  # exported and pulled over SFTP, or streamed
    drv = instantiate(nix_expr_trivial(
        f"hostile-{cue}-{tag}", f"/usr/bin/head -c {size} /dev/urandom > $out"))
    (hostile.home_dir / "misbehave").write_text(cue)
    try:
        with running(farm) as run:
            for host in (hostile, healthy):
                run.wait_line(f"machine {host.name} connected")
            (build,) = farm.submit(drv)
            try:
                farm.wait_for_state(build, "succeeded")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{farm.attempts(build)}\n{run.output}") from None
            peak = peak_rss(run.process.pid)
    finally:
        (hostile.home_dir / "misbehave").unlink()
    return farm, build, run.output, peak


@pytest.mark.parametrize(("cue", "big", "overrides", "said"), [
    # nix-store --serve answers the first query with 2^24 strings of 1 MiB (1.5 GB in 10 s)
    ("huge-count", False, {}, "broke the nix-store --serve protocol: 16777216 strings answering "
     "a query ("),
    ("endless-string", False, {}, "broke the nix-store --serve protocol: a string of "
     "1099511627776 bytes where at most"),
    ("stall", False, {}, f"nix-store --serve did not answer within {ANSWER_TIMEOUT}s "
     "(answer_timeout)"),
    # A 512 MiB reply to a read of 255 KiB (a 50 MiB one was all held in memory).
    ("sftp-oversized", True, {}, "the SFTP server sent a data reply of 536870912 bytes to a "
     "read of 261120; its SFTP channel is closed"),
    ("sftp-stall", True, {}, f"the SFTP server did not answer within {ANSWER_TIMEOUT}s "
     "(answer_timeout); its SFTP channel is closed"),
    # An export whose first file claims 2^62 bytes.
    ("corrupt-nar", True, {}, "truncated"),
    # Without store sessions (max_sessions 1) the first query is a command: endless stdout.
    ("endless-output", False, {"max_sessions": 1}, "nix-store printed more than 64 MiB on "
     "stdout; killed it"),
])
def test_a_hostile_machine_is_backed_off_and_the_build_finishes_elsewhere(
    tmp_path: Path, hostile: Host, hosts: list[Host], cue: str, big: bool,
    overrides: dict[str, object], said: str,
) -> None:
    healthy = hosts[0]
    farm, build, output, peak = misbehave(tmp_path, hostile, healthy, cue, big=big, **overrides)
    first, *others = farm.attempts(build)
    assert (first.machine, first.result) == (hostile.name, "interrupted"), first
    assert (first.detail or "").startswith(f"machine misbehaved: {hostile.name}: "), first
    assert said in (first.detail or ""), first
    assert [(a.machine, a.result) for a in others] == [(healthy.name, "success")]
    assert f"build {build} interrupted on {hostile.name}: " in output
    assert f"; {hostile.name} backed off until " in output, output
    assert peak < PEAK_RSS, f"coordinator peak RSS {peak} KiB ({cue})"
    print(f"{cue}: coordinator peak RSS {peak / 1024:.0f} MiB")


@pytest.mark.parametrize(("cue", "claimed"), [
    # The sftp-server says the export is 2^40 bytes long (it is not).
    ("sftp-claims-huge", 1 << 40),
    # The export is 64 MiB longer than the nar the machine reported (it is, on its disk).
    ("export-padded", None),
])
def test_an_export_larger_than_its_nars_is_refused_before_it_is_pulled(
    tmp_path: Path, hostile: Host, hosts: list[Host], cue: str, claimed: int | None,
) -> None:
    """The export of one output whose nar is a bit over STREAM_LIMIT bytes (a file of
    STREAM_LIMIT + 4096 bytes and no references) can hold that nar and at most about 80 KiB
    more (its store path, deriver and signature at their longest, and markers: the bundle
    format, formats/nar.py); a longer export is refused before a byte of it is read."""
    healthy = hosts[0]
    sent = hostile.home_dir / "sftp-sent"
    sent.unlink(missing_ok=True)
    farm, build, output, peak = misbehave(tmp_path, hostile, healthy, cue, big=True)
    first, *others = farm.attempts(build)
    assert (first.machine, first.result) == (hostile.name, "interrupted"), first
    found = re.fullmatch(
        rf"machine misbehaved: {re.escape(hostile.name)}: (/\S+) is (\d+) bytes, more than the "
        r"(\d+) it can legitimately hold; refused it", first.detail or "")
    assert found is not None, first
    size, limit = int(found[2]), int(found[3])
    assert STREAM_LIMIT + 4096 < limit <= STREAM_LIMIT + 4096 + 96 * 1024, limit
    padded = (64 << 20) + STREAM_LIMIT + 4096 < size <= (64 << 20) + limit  # real one + 64 MiB
    assert size == claimed if claimed is not None else padded, size
    assert [(a.machine, a.result) for a in others] == [(healthy.name, "success")]
    assert f"; {hostile.name} backed off until " in output, output
    # What the coordinator could have written into its store's tmp/: nothing of the export.
    given = sum(int(line) for line in sent.read_text().split()) if sent.exists() else 0
    assert given <= limit, f"the hostile sftp-server sent {given} bytes of data"
    assert list((farm.state / "outputs" / "tmp").iterdir()) == []
    assert peak < PEAK_RSS, f"coordinator peak RSS {peak} KiB ({cue})"
    print(f"{cue}: coordinator peak RSS {peak / 1024:.0f} MiB, {given} bytes of data sent")
