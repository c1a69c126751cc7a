"""Builds chosen by filter (datastore/selection.py): `builds cancel` and `builds priority` with
--tag, --system, --state, --name, --dry-run and --ignore-if-required-by-another, on generated
graphs on both engines, and through the command line."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from engines import ScratchDatabase
from test_submissions import make_drv, submit

from buildfarm.cli import cli
from buildfarm.datastore import Datastore, open_datastore
from buildfarm.datastore.models import Build, Derivation, DerivationInput, Event
from buildfarm.datastore.selection import Filter, cancel_matching, prioritise_matching
from buildfarm.docs.json_schemas import SCHEMAS, validate
from buildfarm.submission import ReadDerivation


@pytest.fixture
def store(database: ScratchDatabase) -> Iterator[Datastore]:
    with open_datastore(database.url) as opened:
        yield opened


def graph(seed: int, size: int = 200) -> list[ReadDerivation]:
    """`size` derivations in layers, each needing up to three of the ones before (diamonds)."""
    rng = random.Random(seed)
    made: list[ReadDerivation] = []
    for n in range(size):
        inputs = rng.sample(made[-30:], min(len(made), rng.randint(0, 3)))
        made.append(make_drv(f"pkg{n}-{seed}", [(i, "out") for i in inputs]))
    return made


def active_needs() -> list[tuple[str, str]]:
    """(state of a queued or running build, state of each build of an input it needs)."""
    needer = Build.alias()
    rows = (Build.select(needer.state, Build.state)
            .join(Derivation, on=(Derivation.id == Build.derivation))
            .join(DerivationInput, on=(DerivationInput.input_path == Derivation.path))
            .join(needer, on=(needer.derivation == DerivationInput.derivation))
            .where(needer.state.in_(["queued", "running"])).tuples())
    return list(rows)


def test_cancel_by_tag_spares_what_builds_left_alone_need(store: Datastore) -> None:
    """Two branches share a generated graph: cancelling the old branch's builds while sparing
    the required ones leaves every build of the new branch with all it needs, and cancels the
    rest; without sparing, everything tagged goes."""
    drvs = graph(1)
    rng = random.Random(2)
    old = [d for d in drvs if rng.random() < 0.7]
    new = [d for d in drvs if d not in old]
    submit(old, tags=(("branch", "old"),))
    submit(new, tags=(("branch", "new"),))
    Build.update(state="running").where(Build.id.in_(
        Build.select(Build.id).order_by(Build.id).limit(5))).execute()
    which = Filter(tags=(("branch", "old"),))
    dry = cancel_matching(which, dry_run=True)
    assert len(dry.changed) == len(old) and not dry.spared
    assert Build.select().where(Build.state == "canceled").count() == 0  # dry run: nothing

    done = cancel_matching(which, spare_required=True)
    assert done.spared and done.changed
    assert len(done.spared) + len(done.changed) == len(old)
    canceled = Build.select().where(Build.state == "canceled").count()
    assert canceled == len(done.changed)
    # The invariant: no queued or running build needs a canceled one.
    needs = active_needs()
    assert needs and all(state != "canceled" for _, state in needs)
    # Each spared build is needed by a queued or running build (else it would be canceled).
    spared_paths = {c.derivation for c in done.spared}
    needed_paths = {
        row.input_path for row in DerivationInput.select().join(
            Build, on=(Build.derivation == DerivationInput.derivation))
        .where(Build.state.in_(["queued", "running"]))}
    assert spared_paths <= needed_paths
    events = Event.select().where(Event.name == "build-canceled")
    payloads = [json.loads(e.payload)["build"] for e in events]
    assert sorted(p["uuid"] for p in payloads) == sorted(c.uuid for c in done.changed)
    assert all(p["tags"] == {"branch": "old"} and p["outputs"] for p in payloads)

    rest = cancel_matching(which)  # without sparing: the rest of the old branch goes too
    assert {c.uuid for c in rest.changed} == {c.uuid for c in done.spared}


def test_filters_combine(store: Datastore) -> None:
    drvs = [make_drv(f"hello-{n}") for n in range(3)] + [make_drv("grep-3.8")]
    submit(drvs, tags=(("job", "a"),))
    Build.update(state="running").where(Build.id == Build.select(Build.id).order_by(
        Build.id).limit(1)).execute()
    names = lambda outcome: sorted(c.derivation.rsplit("-", 1)[-1] for c in outcome.changed)  # noqa: E731
    assert names(cancel_matching(Filter(name="hello-*"), dry_run=True)) == [
        "0.drv", "1.drv", "2.drv"]
    assert names(cancel_matching(Filter(name="hello-*", state="queued"), dry_run=True)) == [
        "1.drv", "2.drv"]
    assert cancel_matching(Filter(system="aarch64-linux"), dry_run=True).changed == []
    assert cancel_matching(Filter(tags=(("job", "b"),)), dry_run=True).changed == []
    done = prioritise_matching(Filter(tags=(("job", "a"),), name="grep-*"), 9)
    assert [c.priority for c in done.changed] == [9]
    assert Build.select().where(Build.priority == 9).count() == 1


def test_priority_by_filter_raises_the_inputs(store: Datastore) -> None:
    leaf = make_drv("leaf")
    top = make_drv("top", [(leaf, "out")])
    submit([leaf], tags=(("k", "leaf"),))
    submit([top], tags=(("k", "top"),))
    done = prioritise_matching(Filter(tags=(("k", "top"),)), 50)
    assert (len(done.changed), done.raised) == (1, 1)
    assert sorted(b.priority for b in Build.select()) == [50, 50]
    spared = prioritise_matching(Filter(tags=(("k", "leaf"),)), 1, spare_required=True)
    assert spared.changed == [] and len(spared.spared) == 1  # top still needs it


def cli_run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      database: ScratchDatabase) -> None:
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BUILDFARM_DB", database.url)
    for var in ("BUILDFARM_INVENTORY", "BUILDFARM_HOOKS_DIR"):
        monkeypatch.delenv(var, raising=False)
    with open_datastore(database.url):
        leaf = make_drv("leaf")
        submit([leaf], tags=(("branch", "old"),))
        submit([make_drv("top", [(leaf, "out")])], tags=(("branch", "new"),))
        submit([make_drv("alone")], tags=(("branch", "old"),))
    code, out, err = cli_run("builds", "cancel", "--tag", "branch=old", "--dry-run")
    assert (code, out) == (0, "would have canceled 2 builds\n"), err
    code, out, err = cli_run("builds", "cancel", "--tag", "branch=old",
                             "--ignore-if-required-by-another", "--json")
    report = json.loads(out)
    assert validate(report, SCHEMAS["builds cancel"].shape) == []
    assert [c["derivation"].rsplit("-", 1)[-1] for c in report["changed"]] == ["alone.drv"]
    assert [c["derivation"].rsplit("-", 1)[-1] for c in report["spared"]] == ["leaf.drv"]
    assert report["changed"][0]["state"] == "canceled" and report["dry_run"] is False
    code, out, err = cli_run("builds", "priority", "--system", "x86_64-linux", "--", "-3")
    assert (code, out) == (0, "set priority -3 on 2 builds\n"), err
    code, out, err = cli_run("builds", "priority", "--name", "top", "--json", "7")
    report = json.loads(out)
    assert validate(report, SCHEMAS["builds priority"].shape) == []
    assert [c["priority"] for c in report["changed"]] == [7] and report["raised"] == 1
    # Bad uses: one line, exit status 1, nothing changed.
    for args, needle in [
        (("builds", "cancel"), "at least one of --tag"),
        (("builds", "cancel", "--state", "failed"), "is not one of"),
        (("builds", "priority", "--tag", "branch=new"), "Missing argument"),
        (("builds", "priority", "--tag", "branch=new", "1", "2"), "give a UUID and a PRIORITY"),
        (("builds", "priority", "--tag", "branch=new", "x"), "PRIORITY must be a whole number"),
        (("builds", "cancel", "--tag", "bad"), "bad tag"),
        (("builds", "cancel", "00000000-0000-0000-0000-000000000000", "--tag", "a=b"),
         "not both"),
    ]:
        code, out, err = cli_run(*args)
        assert code in (1, 2) and needle in err, (args, err)
    with open_datastore(database.url):
        assert sorted(b.state for b in Build.select()) == ["canceled", "queued", "queued"]
        assert sorted(b.priority for b in Build.select()) == [0, 7, 7]  # not the canceled
