"""A rebuild of a stored output whose nar differs, interrupted after each of its steps as a
coordinator killed there leaves it (outputs/store.py): the nar is written beside the recorded
one, the narinfo published, the record replaced, then the old nar removed. At every point the
record names a whole nar with its hash and the narinfo whole compressed nars with its own; the
next start (`sweep_unrecorded`) leaves only recorded nars, and a narinfo that describes its
record. Real output store, real datastore on every engine; bundles come from the test double."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from engines import ScratchDatabase
from scripted_store import Item, ScriptedStore, text_nar

from buildfarm.datastore import open_datastore
from buildfarm.datastore.attempts import record_outputs
from buildfarm.datastore.models import StoredOutput
from buildfarm.formats.nar import nix_base32_encode
from buildfarm.formats.signing import SigningKey
from buildfarm.outputs.store import OutputStore, Publisher

OUT = "/gnu/store/" + "b" * 32 + "-rebuilt"
DRV = "/gnu/store/" + "d" * 32 + "-rebuilt.drv"
FIRST, SECOND = Item(text_nar(b"first build\n")), Item(text_nar(b"second build, not alike\n"))
STEPS = ("nar written", "narinfo published", "record written")


@pytest.fixture
def store(tmp_path: Path, database: ScratchDatabase) -> Iterator[OutputStore]:
    with open_datastore(database.url):
        yield OutputStore(str(tmp_path / "outputs"), Publisher(SigningKey(bytes(32)), "farm-1"))


def nar_hash(data: bytes) -> str:
    return "sha256:" + nix_base32_encode(hashlib.sha256(data).digest())


def succeed(store: OutputStore, item: Item, stop: str | None = None) -> None:
    """The steps of an attempt's success with `item` as OUT, the coordinator killed after step
    `stop`: the import (which writes the nar, then publishes it), the record, the removal."""
    bundle = Path(store.root).parent / "fetched.bundle"
    bundle.write_bytes(ScriptedStore("nix", items={OUT: item}).export([OUT]))
    # Killed before publishing: as the same store without a publisher leaves it.
    importer = OutputStore(store.root, None) if stop == "nar written" else store
    records = importer.import_bundle(str(bundle), [OUT], {OUT: (item.nar_hash, len(item.nar))},
                                     DRV)
    if stop in ("nar written", "narinfo published"):
        return
    record_outputs(records, 0.0)
    if stop == "record written":
        return
    store.remove_superseded(records)


def nars(store: OutputStore) -> set[str]:
    return {entry.name for entry in os.scandir(store.nar_dir) if entry.is_file()}


def check(store: OutputStore, *, settled: bool) -> StoredOutput:
    """What holds at any moment; once `settled` (after a start's sweep, or a success), also
    that the narinfo describes the record and no nar but the recorded one is left."""
    row = StoredOutput.get(StoredOutput.path == OUT)
    data = Path(store.stored_nar(row.file)).read_bytes()
    assert (nar_hash(data), len(data)) == (row.nar_hash, row.nar_size)
    info = store.read_narinfo(OUT)
    assert info is not None and len(info.files) == 2
    for published in info.files:
        blob = Path(store.root, published.url).read_bytes()
        unpacked = (gzip.decompress(blob) if published.compression == "gzip" else
                    zstandard.ZstdDecompressor().decompressobj().decompress(blob))
        assert (nar_hash(unpacked), len(unpacked)) == (info.nar_hash, info.nar_size)
    if settled:
        assert info.nar_hash == row.nar_hash
        assert nars(store) == {os.path.basename(row.file)}
    return row


@pytest.mark.parametrize("stop", STEPS)
def test_a_rebuild_killed_after_any_step_leaves_record_narinfo_and_nars_consistent(
    store: OutputStore, stop: str
) -> None:
    succeed(store, FIRST)
    first = check(store, settled=True)
    assert first.file == f"nar/{'b' * 32}-{FIRST.nar_hash[7:]}"  # named by its content

    succeed(store, SECOND, stop)
    row = check(store, settled=False)
    assert row.nar_hash == (SECOND if stop == "record written" else FIRST).nar_hash
    assert len(nars(store)) == 2  # the new nar beside the old one

    # The next start: what no record names goes; the narinfo describes the record again.
    restarted = OutputStore(store.root, store.publisher)
    removed = restarted.sweep_unrecorded()
    assert len(removed) == 1 and os.path.basename(removed[0]) not in row.file
    assert check(restarted, settled=True).nar_hash == row.nar_hash
    assert restarted.sweep_unrecorded() == []

    # The build, tried again, succeeds.
    succeed(restarted, SECOND)
    assert check(restarted, settled=True).nar_hash == SECOND.nar_hash


def test_an_output_stored_before_nars_were_named_by_content_is_replaced_whole(
    store: OutputStore
) -> None:
    """Stores made before kept each nar as nar/<store basename>: its record still names it,
    and it goes once a rebuild's record has replaced that record."""
    succeed(store, FIRST)
    row = StoredOutput.get(StoredOutput.path == OUT)
    legacy = Path(store.nar_dir, os.path.basename(OUT))
    os.rename(store.stored_nar(row.file), legacy)
    StoredOutput.update(file=f"nar/{legacy.name}").execute()
    assert check(store, settled=True).file == f"nar/{legacy.name}"
    assert OutputStore(store.root, store.publisher).sweep_unrecorded() == []
    bundle = store.output_bundle([StoredOutput.get()], None)
    assert FIRST.nar in Path(bundle).read_bytes()
    os.unlink(bundle)

    succeed(store, SECOND)
    assert not legacy.exists()
    assert check(store, settled=True).nar_hash == SECOND.nar_hash
