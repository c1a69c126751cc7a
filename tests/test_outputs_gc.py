"""`buildfarm outputs gc`: by age and size, keeping inputs of queued or running builds and the
closure of whatever stays; records and files both go; --dry-run changes nothing."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from engines import ScratchDatabase

from buildfarm.cli import cli
from buildfarm.datastore import open_datastore
from buildfarm.datastore.models import (
    Build,
    Derivation,
    DerivationInput,
    DerivationOutput,
    StoredOutput,
)
from buildfarm.errors import UsageError
from buildfarm.formats.signing import SigningKey
from buildfarm.outputs import gc
from buildfarm.outputs.store import OutputStore, Publisher

NOW = 1_800_000_000.0
DAY = 86400.0
S = "/nix/store/"


def p(name: str) -> str:
    """A store path whose hash part is made of `name`'s first letter."""
    return f"{S}{(name[0] * 32)}-{name}"


def item(name: str, age_days: float, size: int = 100, refs: tuple[str, ...] = ()) -> gc.Item:
    return gc.Item(p(name), tuple(p(r) for r in refs), "", NOW - age_days * DAY, size)


def names(removals: list[gc.Removal]) -> list[tuple[str, str]]:
    return [(r.path.rsplit("-", 1)[1], r.reason) for r in removals]


# --- the plan -----------------------------------------------------------------------------------


def test_by_age_keeps_the_young_and_what_they_reference() -> None:
    items = [item("aold", 40), item("bold", 35, refs=("aold",)), item("cyoung", 1, refs=("dmid",)),
             item("dmid", 50)]
    removed = gc.plan(items, [], gc.GcPolicy(older_than=30 * DAY, now=NOW))
    # dmid is old but cyoung, which stays, refers to it; bold goes before aold (its referrer).
    assert names(removed) == [("bold", "age"), ("aold", "age")]


def test_by_size_least_recently_used_first() -> None:
    items = [item("anew", 1, 300), item("bmid", 5, 300), item("cold", 9, 300),
             item("dvery", 20, 300, refs=("cold",))]
    removed = gc.plan(items, [], gc.GcPolicy(max_size=650, now=NOW))
    # dvery is the oldest removable; cold becomes removable once dvery is gone.
    assert names(removed) == [("dvery", "size"), ("cold", "size")]
    assert gc.plan(items, [], gc.GcPolicy(max_size=1200, now=NOW)) == []
    everything = gc.plan(items, [], gc.GcPolicy(max_size=0, now=NOW))
    assert len(everything) == 4


def test_inputs_of_queued_or_running_builds_and_their_closure_stay() -> None:
    items = [item("ainput", 90, refs=("blib",)), item("blib", 90), item("cother", 90)]
    removed = gc.plan(items, [p("ainput"), p("zunknown")],
                      gc.GcPolicy(older_than=DAY, max_size=0, now=NOW))
    assert names(removed) == [("cother", "age")]


def test_age_and_size_together() -> None:
    items = [item("aold", 40, 10), item("bmid", 10, 500), item("cnew", 1, 500)]
    removed = gc.plan(items, [], gc.GcPolicy(older_than=30 * DAY, max_size=600, now=NOW))
    assert names(removed) == [("aold", "age"), ("bmid", "size")]


def test_self_references_do_not_pin() -> None:
    items = [item("aself", 40, refs=("aself",))]
    assert names(gc.plan(items, [], gc.GcPolicy(older_than=DAY, now=NOW))) == [("aself", "age")]


def test_a_policy_needs_a_limit_and_limits_parse() -> None:
    with pytest.raises(UsageError):
        gc.GcPolicy()
    assert gc.parse_size("500M") == 500 << 20
    assert gc.parse_size("1.5G") == 3 << 29
    assert gc.parse_size("20GiB") == 20 << 30
    assert gc.parse_size("1234") == 1234
    assert gc.parse_duration("12h") == 12 * 3600
    assert gc.parse_duration("2w") == 14 * DAY
    assert gc.parse_duration("90") == 90
    for bad in ("x", "-1G", "1Q"):
        with pytest.raises(UsageError):
            gc.parse_size(bad)
    with pytest.raises(UsageError):
        gc.parse_duration("3 fortnights")
    assert gc.format_size(1536) == "1.5 KiB"


# --- against the datastore and the files --------------------------------------------------------

KEY = SigningKey(bytes(range(32)))


@pytest.fixture
def farm(tmp_path: Path, database: ScratchDatabase) -> tuple[OutputStore, str]:
    url = database.url
    store = OutputStore(str(tmp_path / "state" / "outputs"), Publisher(KEY, "farm-1"))
    return store, url


ZERO = "sha256:" + "0" * 52  # the nar hash the outputs below are published with


def nar_of(store: OutputStore, path: str) -> str:
    """The nar file of an output added below, as its record names it."""
    return os.path.relpath(store.nar_path(path, ZERO), store.root)


def add_output(store: OutputStore, name: str, age_days: float, refs: tuple[str, ...] = (),
               size: int = 1000) -> str:
    """A stored output with its nar, compressed nars, narinfo, log and datastore record."""
    path = p(name)
    nar = Path(store.root, nar_of(store, path))
    nar.write_bytes(os.urandom(size))
    drv = f"{path}.drv"
    log = Path(store.root).parent / "logs" / f"{name}.log.gz"
    log.parent.mkdir(exist_ok=True)
    log.write_bytes(gzip.compress(name.encode()))
    store.publish(path, ZERO, size, [p(r) for r in refs], drv, file=nar_of(store, path),
                  log_file=str(log))
    StoredOutput.create(path=path, deriver=drv, nar_hash=ZERO, nar_size=size,
                        refs=" ".join(p(r) for r in refs), file=nar_of(store, path),
                        created_at=NOW - age_days * DAY, last_used_at=NOW - age_days * DAY)
    return path


def queue_build_needing(input_path: str, state: str = "queued") -> None:
    now = time.time()
    producer = Derivation.create(path=f"{S}{'q' * 32}-producer.drv", system="x86_64-linux",
                                 contents=b"", created_at=now)
    DerivationOutput.create(derivation=producer, name="out", path=input_path)
    consumer = Derivation.create(path=f"{S}{'r' * 32}-consumer.drv", system="x86_64-linux",
                                 contents=b"", created_at=now)
    DerivationInput.create(derivation=consumer, input_path=producer.path, outputs="out")
    Build.create(uuid="b1", derivation=consumer, system="x86_64-linux", state=state,
                 created_at=now)


def test_collect_removes_records_and_files(farm: tuple[OutputStore, str]) -> None:
    store, url = farm
    with open_datastore(url):
        old = add_output(store, "aold", 40)
        needed = add_output(store, "bneeded", 40, refs=("clib",))
        lib = add_output(store, "clib", 40)
        young = add_output(store, "dyoung", 1)
        queue_build_needing(needed, "running")
        policy = gc.GcPolicy(older_than=30 * DAY, now=NOW)

        dry = gc.collect(store, policy, dry_run=True)
        assert [r.path for r in dry.removed] == [old]
        assert dry.dry_run and dry.freed == store.disk_usage(old, nar_of(store, old)) > 1000
        assert Path(store.narinfo_path(old)).exists()
        assert StoredOutput.select().count() == 4

        result = gc.collect(store, policy)
        assert [r.path for r in result.removed] == [old]
        assert (result.kept, result.protected) == (3, 1)
        assert result.freed == dry.freed + len(gzip.compress(b"aold"))  # its log went too
        assert {s.path for s in StoredOutput.select()} == {needed, lib, young}
        assert not any(os.path.exists(f) for f in store.files_of(old, nar_of(store, old)))
        assert not os.path.exists(store.log_path(f"{old}.drv"))
        for kept in (needed, lib, young):
            assert all(os.path.exists(f) for f in store.files_of(kept, nar_of(store, kept)))
            assert os.path.exists(store.log_path(f"{kept}.drv"))


def test_a_failed_builds_log_stays_until_older_than_the_age_limit(
    farm: tuple[OutputStore, str], tmp_path: Path
) -> None:
    """A failed build has no output to account for its published log: the log stays while the
    derivation's build is failed, until it is older than --older-than (never by size)."""
    store, url = farm
    with open_datastore(url):
        logs = {}
        for name, age in (("xrecent", 1), ("yancient", 40)):
            drv = Derivation.create(path=f"{p(name)}.drv", system="x86_64-linux", contents=b"",
                                    created_at=NOW)
            Build.create(uuid=name, derivation=drv, system="x86_64-linux", state="failed",
                         created_at=NOW)
            source = tmp_path / f"{name}.log.gz"
            source.write_bytes(gzip.compress(name.encode()))
            assert store.publish_log(drv.path, str(source))
            logs[name] = store.log_path(drv.path)
            os.utime(logs[name], (NOW - age * DAY, NOW - age * DAY))
        by_size = gc.collect(store, gc.GcPolicy(max_size=0, now=NOW))
        assert by_size.orphans == () and all(os.path.exists(f) for f in logs.values())
        by_age = gc.collect(store, gc.GcPolicy(older_than=30 * DAY, now=NOW))
        assert by_age.orphans == (logs["yancient"],)
        assert os.path.exists(logs["xrecent"]) and not os.path.exists(logs["yancient"])


def test_stray_files_go_once_old_enough(farm: tuple[OutputStore, str]) -> None:
    store, url = farm
    with open_datastore(url):
        kept = add_output(store, "akept", 1)
        # An import a crash interrupted: nar and compressed nar written, no record.
        stray = p("bstray")
        Path(store.root, nar_of(store, stray)).write_bytes(b"x" * 10)
        store.publish(stray, ZERO, 10, [], None, file=nar_of(store, stray))
        files = [f for f in store.files_of(stray, nar_of(store, stray)) if os.path.exists(f)]
        assert len(files) == 4
        # Just written: it may be an import in flight, so it stays.
        fresh = gc.collect(store, gc.GcPolicy(older_than=30 * DAY, now=time.time()))
        assert fresh.orphans == () and all(os.path.exists(f) for f in files)
        for f in files:
            os.utime(f, (time.time() - 2 * 3600, time.time() - 2 * 3600))
        result = gc.collect(store, gc.GcPolicy(older_than=30 * DAY, now=time.time()))
        assert sorted(result.orphans) == sorted(files)
        assert not any(os.path.exists(f) for f in files)
        assert os.path.exists(store.narinfo_path(kept))


def test_compressed_nars_no_narinfo_names_go_once_old_enough(farm: tuple[OutputStore, str]
                                                            ) -> None:
    """A publication a crash interrupted leaves compressed nars the narinfo does not name."""
    store, url = farm
    with open_datastore(url):
        kept = add_output(store, "akept", 1)
        named = store.files_of(kept, nar_of(store, kept))
        stray = Path(store.root, "nar", "zstd", f"{'a' * 32}-{'0' * 52}")
        stray.write_bytes(b"half a publication")
        hours_ago = time.time() - 2 * 3600
        for path in (stray, *map(Path, named)):
            os.utime(path, (hours_ago, hours_ago))
        result = gc.collect(store, gc.GcPolicy(older_than=30 * DAY, now=time.time()))
        assert result.orphans == (str(stray),) and not stray.exists()
        assert all(os.path.exists(f) for f in named) and len(named) == 4


def test_cli(farm: tuple[OutputStore, str], monkeypatch: pytest.MonkeyPatch) -> None:
    store, url = farm
    state = Path(store.root).parent
    for var in ("BUILDFARM_INVENTORY", "BUILDFARM_HOOKS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(state))
    monkeypatch.setenv("BUILDFARM_DB", url)
    with open_datastore(url):
        old = add_output(store, "aold", 400)
        young = add_output(store, "byoung", 0)
        StoredOutput.update(last_used_at=time.time()).where(StoredOutput.path == young).execute()
    runner = CliRunner()
    result = runner.invoke(cli, ["outputs", "gc"])
    assert result.exit_code == 1 and "--older-than" in result.stderr
    result = runner.invoke(cli, ["outputs", "gc", "--older-than", "soon"])
    assert result.exit_code == 1 and "invalid duration" in result.stderr
    result = runner.invoke(cli, ["outputs", "gc", "--older-than", "30d", "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert f"would remove {old} (" in result.stdout and young not in result.stdout
    assert os.path.exists(store.stored_nar(nar_of(store, old)))
    result = runner.invoke(cli, ["outputs", "gc", "--max-size", "1G", "--older-than", "30d"])
    assert result.exit_code == 0, result.stderr
    assert f"removed {old} (" in result.stdout and "kept 1 output(s)" in result.stdout
    assert not os.path.exists(store.stored_nar(nar_of(store, old)))
    assert os.path.exists(store.stored_nar(nar_of(store, young)))
    result = runner.invoke(cli, ["outputs", "gc", "--max-size", "0", "--json"])
    assert result.exit_code == 0 and '"reason": "size"' in result.stdout
    assert not os.path.exists(store.stored_nar(nar_of(store, young)))
