"""Why a queued build is not running (datastore/waiting.py): every reason produced on both
engines, the queue summary agreeing with the reasons of its builds over a generated graph, and
`buildfarm queue` / `builds show` on the command line."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from engines import ScratchDatabase
from test_scheduler import ARM, X86, make_drv, queue

from buildfarm.cli import cli
from buildfarm.coordinator import scheduler
from buildfarm.datastore import Datastore, open_datastore, waiting
from buildfarm.datastore import attempts as records
from buildfarm.datastore.models import Build
from buildfarm.docs.json_schemas import SCHEMAS, validate

SLOT = scheduler.Slot("m", (X86,), frozenset())
STORE = "/gnu/store"


@pytest.fixture
def store(database: ScratchDatabase) -> Iterator[Datastore]:
    with open_datastore(database.url) as opened:
        yield opened


def machine(name: str, status: str = "free", *, systems: tuple[str, ...] = (X86,),
            features: frozenset[str] = frozenset(), tags: frozenset[str] = frozenset(),
            running: int = 0, until: float | None = None,
            error: str | None = None) -> waiting.MachineReport:
    return waiting.MachineReport(name, systems, features, tags, STORE, 2, running, status,
                                 until, error)


def why(uuid: str) -> waiting.Why | None:
    return waiting.why_waiting(Build.get(Build.uuid == uuid))


def test_every_reason(store: Datastore) -> None:
    now = time.time()
    (deferred,) = queue(make_drv("later"), defer_until=now + 3600)
    leaf = make_drv("leaf")
    (top,) = queue(make_drv("top", [leaf]))
    (leaf_build,) = queue(leaf)
    found = why(deferred)
    assert found is not None and found.reason == waiting.DEFERRED and found.until is not None
    found = why(top)
    assert found is not None and found.reason == waiting.INPUTS
    assert found.inputs == ({"build": leaf_build, "derivation": leaf.path, "state": "queued"},)
    assert found.summary == f"waiting for 1 input build(s): {leaf.path} (queued)"

    # No machine recorded yet: run has not run.
    found = why(leaf_build)
    assert found is not None and found.reason == waiting.NO_COORDINATOR

    # Backed off after a setup failure, with why; then waiting for its hooks.
    attempt = scheduler.allocate(SLOT)
    assert attempt is not None and attempt.build.uuid == leaf_build
    records.setup_failure(attempt.id, "missing-inputs", [f"{STORE}/{'1' * 32}-x"],
                          "1 input derivation(s) would be built first", 600.0)
    found = why(leaf_build)
    assert found is not None and found.reason == waiting.BACKED_OFF
    assert "setup failure on m (missing-inputs): 1 input derivation(s)" in found.summary
    assert "1 attempt(s) in a row without progress" in found.summary
    Build.update(retry_after=None).where(Build.uuid == leaf_build).execute()
    found = why(leaf_build)
    assert found is not None and found.reason == waiting.HOOKS

    # A build of the same derivation running.
    (twin,) = queue(make_drv("twin"))
    (twin2,) = queue(make_drv("twin"))
    Build.update(state="running").where(Build.uuid == twin).execute()
    found = why(twin2)
    assert found is not None and found.reason == waiting.TWIN and twin in found.summary

    # The machines run recorded.
    (plain,) = queue(make_drv("plain"))
    (arm,) = queue(make_drv("arm", system=ARM))
    (kvm,) = queue(make_drv("kvm", features="kvm"))
    (gpu,) = queue(make_drv("gpu"), machine_tags=(("gpu", "a100"),))
    waiting.record_machines([
        machine("a", "busy", running=2), machine("b", "down", until=now + 60, error="refused"),
        machine("c", "free", features=frozenset({"kvm"})),
    ], now)
    cases = {
        arm: (waiting.NO_MACHINE, f"no machine in the inventory builds for {ARM}"),
        gpu: (waiting.NO_MACHINE, f"no machine in the inventory for {X86} carries the machine "
              "tags gpu=a100"),
        plain: (waiting.NEXT, "ready: it starts at the next allocation unless builds of higher "
                "priority take the free slots (c)"),
    }
    for uuid, (reason, summary) in cases.items():
        found = why(uuid)
        assert found is not None and (found.reason, found.summary) == (reason, summary), uuid
    waiting.record_machines([
        machine("a", "busy", running=2), machine("b", "down", until=now + 60, error="refused"),
        machine("c", "paused", features=frozenset({"kvm"}), until=now + 30, error="boom"),
        machine("d", "free", systems=(ARM,)),
    ], now)
    found = why(kvm)
    assert found is not None and found.reason == waiting.UNAVAILABLE
    assert [m.name for m in found.machines] == ["c"] and found.until == now + 30
    found = why(plain)
    assert found is not None and found.reason == waiting.UNAVAILABLE
    assert [m.name for m in found.machines] == ["a", "b", "c"]
    assert "a busy (2/2); b down until" in found.summary and ": refused" in found.summary
    assert validate(found.json(), SCHEMAS["builds show"].shape.fields[-2].shape) == []
    waiting.record_machines([machine("d", "free", systems=(ARM,))], now)  # a, b, c removed
    found = why(plain)
    assert found is not None and found.reason == waiting.NO_MACHINE
    waiting.stopped(now + 1)
    found = why(arm)
    assert found is not None and found.reason == waiting.NO_COORDINATOR
    assert "is not running" in found.summary
    assert why(twin) is None  # running: no reason to give


def test_the_summary_counts_the_reasons_of_its_builds(store: Datastore) -> None:
    """Over a generated queue, the summary's groups are the builds' own reasons, counted (the
    reasons the summary folds into starts-next: hooks and a running twin, absent here)."""
    rng = random.Random(7)
    made: list = []
    now = time.time()
    for n in range(300):
        inputs = rng.sample(made[-20:], min(len(made), rng.randint(0, 2)))
        drv = make_drv(f"p{n}", inputs, system=rng.choice((X86, X86, ARM)),
                       features=rng.choice(("", "", "kvm")))
        made.append(drv)
        queue(drv, defer_until=now + 600 if rng.random() < 0.1 else None,
              machine_tags=(("gpu", "a100"),) if rng.random() < 0.1 else ())
    Build.update(retry_after=now + 600).where(
        Build.id.in_(Build.select(Build.id).order_by(Build.id.desc()).limit(15))).execute()
    waiting.record_machines([machine("a", "busy", running=2),
                             machine("k", "paused", features=frozenset({"kvm"}),
                                     tags=frozenset({"gpu=a100"}), until=now + 5),
                             machine("n", "free", systems=(ARM,))], now)
    expected: Counter[tuple[str, str]] = Counter()
    for build in Build.select().where(Build.state == "queued"):
        found = waiting.why_waiting(build, now)
        assert found is not None
        expected[found.reason, build.system] += 1
    groups = waiting.summary(now)
    got: Counter[tuple[str, str]] = Counter()
    for group in groups:
        got[group.reason, group.system] += group.count
    assert got == expected
    assert {r for r, _ in got} >= {waiting.DEFERRED, waiting.INPUTS, waiting.BACKED_OFF,
                                   waiting.NO_MACHINE, waiting.UNAVAILABLE, waiting.NEXT}
    assert [g.count for g in groups] == sorted((g.count for g in groups), reverse=True)


def test_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      database: ScratchDatabase) -> None:
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BUILDFARM_DB", database.url)
    for var in ("BUILDFARM_INVENTORY", "BUILDFARM_HOOKS_DIR"):
        monkeypatch.delenv(var, raising=False)
    with open_datastore(database.url):
        (arm,) = queue(make_drv("arm", system=ARM))
        queue(make_drv("arm2", system=ARM))
        waiting.record_machines([machine("a")], time.time())
    result = CliRunner().invoke(cli, ["queue", "--json"], catch_exceptions=False)
    groups = json.loads(result.stdout)
    assert validate(groups, SCHEMAS["queue"].shape) == []
    assert [(g["reason"], g["system"], g["count"]) for g in groups] == [
        ("no-machine", ARM, 2)]
    result = CliRunner().invoke(cli, ["queue"], catch_exceptions=False)
    assert result.stdout.splitlines()[1].startswith(f"no-machine\t{ARM}\t2\t")
    result = CliRunner().invoke(cli, ["builds", "show", arm], catch_exceptions=False)
    assert f"no machine in the inventory builds for {ARM}" in result.stdout
    info = json.loads(CliRunner().invoke(cli, ["builds", "show", arm, "--json"]).stdout)
    assert info["waiting"]["reason"] == "no-machine"
    assert validate(info, SCHEMAS["builds show"].shape) == []
