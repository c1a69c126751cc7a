"""One attempt's decisions (coordinator/attempt.py), against a scripted machine
(tests/scripted_store.py: Nix's and Guix's own answers, from a model of the machine's store):
what is pushed, when inputs are reported missing, whose each failure is. The end-to-end runs
(test_run.py, test_run_guix.py, test_faults*.py) make the same decisions against real stores.

The coordinator's side is real: an SQLite datastore with the sample derivations top and dep
(top needs dep's output), the output store, the signing key.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import needs
import pytest
from engines import ScratchDatabase
from guix_emulator.gcrypt import Sexp
from guix_emulator.serialization import Source, read_export_item
from scripted_store import Item, Recipe, ScriptedStore, text_nar

from buildfarm import submission
from buildfarm.backends import get_backend
from buildfarm.coordinator import scheduler
from buildfarm.coordinator.attempt import (
    AttemptRun,
    BuildFailed,
    SetupFailed,
    StoreCommandFailed,
    TransferFailed,
)
from buildfarm.datastore import attempts as records
from buildfarm.datastore import builds, open_datastore
from buildfarm.datastore.models import (
    DIFFERS,
    IDENTICAL,
    MISSING_INPUTS,
    OUTPUTS_PRESENT,
    StoredOutput,
)
from buildfarm.errors import ProtocolError, RemoteError
from buildfarm.formats import nar
from buildfarm.formats.signing import SigningKey, verify_guix
from buildfarm.inventory import Machine
from buildfarm.outputs.store import OutputStore

DATA = Path(__file__).parent / "data" / "nix"
DEP_FILE = DATA / "pld6g8hnp87b9d7yvkidbf4zi7hvm33k-dep.drv"
TOP_FILE = DATA / "mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv"
DEP_DRV = "/nix/store/" + DEP_FILE.name
TOP_DRV = "/nix/store/" + TOP_FILE.name
DEP_OUT = "/nix/store/5qn9lblnzjgza2vb23kwaclrcxnska2z-dep"
TOP_OUT = "/nix/store/b929rzxqin9xa830zfpbfbgx8wajdhdn-top"
DEP_ITEM = Item(text_nar(b"dep output\n"), (), DEP_DRV)
LIB = "/nix/store/" + "l" * 32 + "-lib"  # what dep's output refers to, in the layered case
LIB_ITEM = Item(text_nar(b"lib\n"))
LAYERED_DEP_ITEM = Item(DEP_ITEM.nar, (LIB,), DEP_DRV)
TOP_ITEM = Item(text_nar(f"top output on {DEP_OUT}\n".encode()), (DEP_OUT,), TOP_DRV)
SLOT = scheduler.Slot("m", ("x86_64-linux",), frozenset())
ALL_STEPS = ["push-derivations", "push-inputs", "dry-run", "build", "export-outputs",
             "fetch-outputs", "verify-outputs"]
# Machines: a Guix one, a Nix one driven by commands, a Nix one through its store sessions.
KINDS = ["guix", "nix", "nix-session"]


@dataclass
class Coordinator:
    """The coordinator's side of one attempt of top: datastore, output store, key."""

    tmp: Path
    outputs: OutputStore
    key: SigningKey
    attempt_id: int = 0
    build_uuid: str = ""
    check: str | None = None

    def machine(self, kind: str) -> ScriptedStore:
        return ScriptedStore(kind.removesuffix("-session"),
                             authorized=[self.key.guix_public_sexp()])

    def hold(self, path: str, item: Item, deriver: str) -> list[records.OutputRecord]:
        """Put `item` in the output store, as a fetched output is."""
        bundle = self.tmp / "held.bundle"
        bundle.write_bytes(ScriptedStore("nix", items={path: item}).export([path]))
        return self.outputs.import_bundle(str(bundle), [path], {path: (item.nar_hash,
                                                                        len(item.nar))}, deriver)

    def attempt(self, kind: str, store: ScriptedStore, may_move: bool = False, *,
                running: Sequence[int] = (), **machine: Any) -> list[records.OutputRecord]:
        """Run the attempt of top on `store` (a machine with the inventory fields `machine`;
        `may_move`: another machine could take it); what it stored, or its exception. What a
        rebuild with --check found: `self.check`. `running`: the other attempts on the
        machine."""
        backend = kind.removesuffix("-session")

        async def db(call: Callable[..., Any], *args: Any) -> Any:
            return call(*args)

        run = AttemptRun(
            attempt_id=self.attempt_id, build_uuid=self.build_uuid, drv_path=TOP_DRV,
            machine=Machine(name="m", host="h", store=backend, **machine), remote=store,
            backend=get_backend(backend), outputs=self.outputs, db=db, key=self.key,
            log_path=str(self.tmp / "top.log.gz"), max_log_bytes=1 << 20,
            sessions=store.sessions() if kind.endswith("-session") else None,
            may_move=may_move,
            running=lambda: [*running, self.attempt_id],
            trusted_keys=(self.key.nix_public("farm-1"),),
        )
        try:
            return asyncio.run(run.run())
        finally:
            self.check = run.check_result

    def input_sources(self) -> dict[str, str]:
        (attempt,) = builds.show_build(self.build_uuid)["attempts"]
        return {i["path"]: i["source"] for i in attempt["input_sources"]}

    def steps(self) -> list[tuple[str, str | None]]:
        (attempt,) = builds.show_build(self.build_uuid)["attempts"]
        return [(s["name"], s["detail"]) for s in attempt["steps"]]


def coordinator(tmp_path: Path, database: ScratchDatabase, *, dep_output: bool,
                dep_known: bool = True, layered: bool = False) -> Iterator[Coordinator]:
    """Top submitted (with dep, if `dep_known`: its .drv then known to the coordinator, and its
    build already succeeded), the attempt of top started; dep's output held if `dep_output`
    (`layered`: referring to LIB, held too)."""
    needs.libgcrypt()
    with open_datastore(database.url):
        side = Coordinator(tmp_path, OutputStore(str(tmp_path / "outputs")),
                           SigningKey.generate())
        files = [DEP_FILE, TOP_FILE]
        if not dep_known:  # top.drv alone: its input's .drv file is not beside it
            (tmp_path / "alone").mkdir()
            files = [Path(shutil.copy(TOP_FILE, tmp_path / "alone"))]
        submitted = submission.submit([str(f) for f in files], submission.SubmitOptions())
        if dep_known:
            dep_attempt = scheduler.allocate(SLOT)
            assert dep_attempt is not None and dep_attempt.build.uuid == submitted[0].uuid
            held = side.hold(DEP_OUT, DEP_ITEM, DEP_DRV) if dep_output and not layered else []
            if layered:
                held = side.hold(LIB, LIB_ITEM, "") + side.hold(DEP_OUT, LAYERED_DEP_ITEM,
                                                                DEP_DRV)
            records.succeed(dep_attempt.id, held, None)
        attempt = scheduler.allocate(SLOT)
        assert attempt is not None and attempt.build.uuid == submitted[-1].uuid
        side.attempt_id, side.build_uuid = attempt.id, attempt.build.uuid
        yield side


@pytest.fixture
def side(tmp_path: Path, database: ScratchDatabase) -> Iterator[Coordinator]:
    yield from coordinator(tmp_path, database, dep_output=True)


@pytest.fixture
def layered(tmp_path: Path, database: ScratchDatabase) -> Iterator[Coordinator]:
    """dep's output, held, refers to LIB, held too."""
    yield from coordinator(tmp_path, database, dep_output=True, layered=True)


@pytest.fixture
def bare(tmp_path: Path, database: ScratchDatabase) -> Iterator[Coordinator]:
    """dep's build succeeded, but its output is nowhere: not in the output store."""
    yield from coordinator(tmp_path, database, dep_output=False)


@pytest.fixture
def alone(tmp_path: Path, database: ScratchDatabase) -> Iterator[Coordinator]:
    """Only top was submitted, and dep.drv could not be read: the coordinator does not know
    what top's inputs are made by."""
    yield from coordinator(tmp_path, database, dep_output=False, dep_known=False)


def machine_with(side: Coordinator, kind: str, *paths: str) -> ScriptedStore:
    """A machine whose store holds `paths` (.drv files of top and dep, their outputs), and
    knows how to build top."""
    store = side.machine(kind)
    for path in paths:
        if path.endswith(".drv"):
            store.add_derivation(path, (DEP_FILE if path == DEP_DRV else TOP_FILE).read_bytes())
        else:
            store.items[path] = {DEP_OUT: DEP_ITEM, TOP_OUT: TOP_ITEM}[path]
    store.recipes[TOP_DRV] = Recipe({TOP_OUT: TOP_ITEM}, log=b"building top\n")
    return store


def fetched(kind: str) -> list[str]:
    """How the outputs come back: a store session sends small ones itself."""
    if kind == "nix-session":
        return ["session hash", "session export"]
    return ["hash", "export"]  # the nar's size first, to bound the export (Guix: no size)


def rooted(kind: str, commands: list[str]) -> list[str]:
    """An attempt by commands holds GC roots from the survey on and drops them at its end."""
    if kind == "nix-session":
        return commands
    return [commands[0], "roots", *commands[1:], "unroot"]


def failure(kind: str, command: str) -> str:
    """A store's error line for `command`: Nix 2.8's when its database is out of reach, Guix's
    client's when the daemon is down (guix/store.scm open-connection), or `guix hash`'s when
    the file is not there (guix/scripts/hash.scm)."""
    if kind.startswith("nix"):
        return "error: opening lock file '/nix/var/nix/db/big-lock': Permission denied"
    if command == "hash":
        return f"guix hash: error: {TOP_OUT} No such file or directory"
    program = {"missing": "archive", "export": "archive", "dry-run": "build"}[command]
    return (f"guix {program}: error: failed to connect to `/var/guix/daemon-socket/socket': "
            "Connection refused")


# --- what is pushed --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_machine_that_has_everything_gets_nothing_and_builds(
    side: Coordinator, kind: str
) -> None:
    store = machine_with(side, kind, DEP_DRV, TOP_DRV, DEP_OUT)
    (stored,) = side.attempt(kind, store)
    assert (stored.path, stored.nar_hash, stored.references) == (
        TOP_OUT, TOP_ITEM.nar_hash, (DEP_OUT,))
    assert Path(side.outputs.stored_nar(stored.file)).read_bytes() == TOP_ITEM.nar
    assert store.imported == []
    session = "session " if kind == "nix-session" else ""
    assert store.commands == rooted(kind, [f"{session}missing", f"{session}build",
                                           *fetched(kind)])
    # The export was bounded by the nar's size and the reference count's longest (4,104 bytes
    # a path, up to 2^20 of them, unknown without a session); Guix says no nar size.
    bound = len(TOP_ITEM.nar) + 40 + (2 + (1 << 20)) * 4104 + 65536 + 8
    assert store.fetch_limits == {"guix": [None], "nix": [bound], "nix-session": []}[kind]
    assert store.roots == {}
    steps = side.steps()
    assert [name for name, _ in steps] == [
        s for s in ALL_STEPS if kind != "nix-session" or s != "export-outputs"]
    skipped = {name: detail for name, detail in steps if (detail or "").startswith("skipped")}
    assert skipped == {
        "push-inputs": "skipped: every input output is on the machine",
        "dry-run": "skipped: every input output is on the machine",
    }


@pytest.mark.parametrize("kind", KINDS)
def test_only_what_the_machine_lacks_is_pushed(side: Coordinator, kind: str) -> None:
    """The machine has dep.drv: top.drv goes in one bundle, dep's output (held by the output
    store) in another; a Guix machine checks the coordinator's signature on each."""
    store = machine_with(side, kind, DEP_DRV)
    side.attempt(kind, store)
    assert store.imported == [[TOP_DRV], [DEP_OUT]]
    assert store.items[TOP_DRV].nar == text_nar(TOP_FILE.read_bytes())
    assert store.items[DEP_OUT] == DEP_ITEM  # its nar, references and deriver
    assert "dry-run" not in store.commands  # every input is known to be there now


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("has_lib", [True, False])
def test_an_input_goes_with_what_it_refers_to_that_the_machine_lacks(
    layered: Coordinator, kind: str, has_lib: bool
) -> None:
    store = machine_with(layered, kind, DEP_DRV, TOP_DRV)
    if has_lib:
        store.items[LIB] = LIB_ITEM
    layered.attempt(kind, store)
    assert store.imported == [[DEP_OUT] if has_lib else [LIB, DEP_OUT]]
    assert store.items[DEP_OUT] == LAYERED_DEP_ITEM


def test_a_guix_machine_that_does_not_trust_the_coordinator_is_at_fault(
    side: Coordinator
) -> None:
    """Not missing inputs (with no paths, retried for ever): the machine's fault, which says
    what to do."""
    store = machine_with(side, "guix", DEP_DRV, DEP_OUT)
    store.authorized = [SigningKey.generate().guix_public_sexp()]
    with pytest.raises(StoreCommandFailed) as caught:
        side.attempt("guix", store)
    detail = str(caught.value)
    assert detail.startswith(
        "1 derivation(s) could not be imported: guix archive: error: unauthorized public key: "
        "(public-key (ecc (curve Ed25519) (q #")
    assert detail.endswith("; the machine does not authorize the coordinator's key: see "
                           "`buildfarm machines test` for where to authorize it")
    assert store.imported == [] and TOP_DRV not in store.items


# --- what is kept ------------------------------------------------------------------------------

# A key libgcrypt made (genkey, as `guix archive --generate-key` does), and an output of top
# whose export that key signs with an atom (s) libgcrypt prints as raw bytes 0xA1-0xFF: found
# by trying contents, for such signatures are rare. Not UTF-8, they must be kept as written.
RAW_SIGNING_KEY = Path(__file__).parent / "data" / "guix" / "raw-bytes-signing-key.sexp"
RAW_TOP_ITEM = Item(text_nar(f"top output on {DEP_OUT}, signed with raw bytes: 10936\n".encode()),
                    (DEP_OUT,), TOP_DRV)


def test_a_guix_signature_of_raw_bytes_is_kept_as_written_and_the_output_pushed_on(
    side: Coordinator
) -> None:
    store = machine_with(side, "guix", DEP_DRV, TOP_DRV, DEP_OUT)
    store.key = Sexp.parse(RAW_SIGNING_KEY.read_bytes())
    store.recipes[TOP_DRV] = Recipe({TOP_OUT: RAW_TOP_ITEM})
    (stored,) = side.attempt("guix", store)
    # What the machine wrote, read by the emulator: libgcrypt's raw bytes, not UTF-8.
    exported = Source(io.BytesIO(store.export([TOP_OUT])))
    assert exported.read_int() == 1
    written = read_export_item(exported).signature
    assert written is not None and b'(s "' in written and max(written) >= 0xA1
    with pytest.raises(UnicodeDecodeError):
        written.decode("utf-8")
    assert stored.signature == written
    records.succeed(side.attempt_id, [stored], None)
    row = StoredOutput.get(StoredOutput.path == TOP_OUT)
    assert row.signature == written  # through the datastore, byte for byte
    public = store.key.find("public-key")
    q = public.find("q").nth_data(1) if public is not None else None
    assert q is not None
    signed = RAW_TOP_ITEM.nar + nar.export_trailer(TOP_OUT, (DEP_OUT,), TOP_DRV)
    verify_guix(row.signature, hashlib.sha256(signed).digest(), [q])

    # Pushed on to another Guix machine, signed by the coordinator: its libgcrypt accepts it.
    other = side.machine("guix")
    other.items[DEP_OUT] = DEP_ITEM
    bundle = side.outputs.output_bundle([row], side.key)
    try:
        assert other.import_bundle(Path(bundle).read_bytes()) is None
    finally:
        os.unlink(bundle)
    assert other.items[TOP_OUT] == RAW_TOP_ITEM


# --- when inputs are reported missing -----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_an_input_nobody_holds_is_reported_missing_after_the_dry_run(
    bare: Coordinator, kind: str
) -> None:
    """dep's output is neither on the machine nor in the output store: the dry run says dep
    would be built first; the missing inputs reported are dep's output and every derivation
    the machine would build (dep), for the hook to submit at once."""
    store = machine_with(bare, kind, DEP_DRV, TOP_DRV)
    with pytest.raises(SetupFailed) as caught:
        bare.attempt(kind, store)
    assert (caught.value.kind, caught.value.paths, caught.value.detail) == (
        MISSING_INPUTS, (DEP_OUT, DEP_DRV), "1 input derivation(s) would be built first")
    assert "build" not in store.commands and "session build" not in store.commands
    assert [name for name, _ in bare.steps()] == ["push-derivations", "push-inputs", "dry-run"]


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_missing_behind_outputs_already_there_are_seen(bare: Coordinator, kind: str
                                                              ) -> None:
    """top's outputs are on the machine (a copy, not referring to dep's output), dep's output
    nowhere: a plain plan would not look into top's inputs; the rebuild's plan (Guix --check,
    Nix the inputs' own) names dep, and dep is reported missing before the rebuild with
    --check, which would build it itself."""
    store = machine_with(bare, kind, DEP_DRV, TOP_DRV)
    store.items[TOP_OUT] = Item(text_nar(b"top output, copied\n"), (), TOP_DRV)
    with pytest.raises(SetupFailed) as caught:
        bare.attempt(kind, store)
    assert (caught.value.kind, caught.value.paths, caught.value.detail) == (
        MISSING_INPUTS, (DEP_OUT, DEP_DRV), "1 input derivation(s) would be built first")
    assert "check" not in store.commands and "build" not in store.commands
    assert TOP_OUT in store.items


@pytest.mark.parametrize("kind", KINDS)
def test_a_dry_run_with_nothing_else_to_build_goes_on(alone: Coordinator, kind: str) -> None:
    """The coordinator cannot tell whether top's inputs are there (dep.drv unknown to it): the
    dry run is asked, finds only top to build, and the build goes on."""
    store = machine_with(alone, kind, DEP_DRV, TOP_DRV, DEP_OUT)
    (stored,) = alone.attempt(kind, store)
    assert stored.path == TOP_OUT
    assert "dry-run" in store.commands and ("dry-run", None) in alone.steps()


@pytest.mark.parametrize("kind", ["nix", "nix-session"])
def test_what_the_store_does_not_know_how_to_build_is_missing(
    alone: Coordinator, kind: str
) -> None:
    """Nix lists what it can neither build nor substitute under "don't know how to build these
    paths": those are missing inputs too."""
    store = machine_with(alone, kind, DEP_DRV, TOP_DRV, DEP_OUT)
    store.answer("dry-run", 0, f"this derivation will be built:\n  {TOP_DRV}\n"
                               f"don't know how to build these paths:\n  {DEP_DRV}\n")
    with pytest.raises(SetupFailed) as caught:
        alone.attempt(kind, store)
    assert (caught.value.kind, caught.value.paths, caught.value.detail) == (
        MISSING_INPUTS, (DEP_DRV,), "1 input derivation(s) would be built first")
    assert "build" not in store.commands and "session build" not in store.commands


@pytest.mark.parametrize("kind", ["guix", "nix"])
def test_a_dry_run_that_fails_is_the_machines_fault(alone: Coordinator, kind: str) -> None:
    """Not a missing-inputs setup failure with no paths: the machine failed a command."""
    store = machine_with(alone, kind, DEP_DRV, TOP_DRV, DEP_OUT)
    message = failure(kind, "dry-run")
    store.answer("dry-run", 1, message + "\n")
    with pytest.raises(StoreCommandFailed) as caught:
        alone.attempt(kind, store)
    assert str(caught.value) == f"dry run failed: {message}"
    assert "build" not in store.commands


@pytest.mark.parametrize(("kind", "plan"), [
    ("guix", "Folgende Ableitung würde erstellt:\n   {top}\n"),  # po/guix/de.po
    ("guix", "La dérivation suivante serait compilée :\n   {top}\n"),  # po/guix/fr.po
    ("guix", ""),
    ("nix", ""),
])
def test_a_plan_in_words_not_understood_is_not_nothing_to_build(
    alone: Coordinator, kind: str, plan: str
) -> None:
    """A dry run's plan always names the target: one that does not (a translated one, an
    empty one) was not read, and the build does not go on (the machine is backed off)."""
    store = machine_with(alone, kind, DEP_DRV, TOP_DRV)  # dep's output is missing
    store.answer("dry-run", 0, plan.format(top=TOP_DRV))
    with pytest.raises(ProtocolError, match="could not read the plan"):
        alone.attempt(kind, store)
    assert "build" not in store.commands


# --- outputs already on the machine ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("same", [True, False])
def test_outputs_on_the_machine_are_built_again_with_check_and_compared(
    side: Coordinator, kind: str, same: bool
) -> None:
    """No other machine to go to: nothing is deleted; the build runs again with --check (a
    command, also on a Nix machine with sessions: the serve protocol builds in normal mode),
    and the outputs the machine holds are fetched, identical or not."""
    store = machine_with(side, kind, DEP_DRV, TOP_DRV, DEP_OUT, TOP_OUT)
    rebuilt = TOP_ITEM if same else Item(text_nar(b"top output, this time\n"), (DEP_OUT,))
    store.recipes[TOP_DRV] = Recipe({TOP_OUT: rebuilt}, log=b"building top again\n")
    (stored,) = side.attempt(kind, store)
    assert side.check == (IDENTICAL if same else DIFFERS)
    assert (stored.path, stored.nar_hash) == (TOP_OUT, TOP_ITEM.nar_hash)
    assert store.items[TOP_OUT] == TOP_ITEM  # the machine's, untouched
    assert "check" in store.commands and "build" not in store.commands
    assert "session build" not in store.commands
    assert ("build", "with --check: compared with the outputs on the machine") in side.steps()
    assert b"building top again\n" in gzip.decompress((side.tmp / "top.log.gz").read_bytes())


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_on_the_machine_send_the_build_to_another_that_may_lack_them(
    side: Coordinator, kind: str
) -> None:
    store = machine_with(side, kind, DEP_DRV, TOP_DRV, DEP_OUT, TOP_OUT)
    with pytest.raises(SetupFailed) as caught:
        side.attempt(kind, store, may_move=True)
    assert (caught.value.kind, caught.value.paths) == (OUTPUTS_PRESENT, (TOP_OUT,))
    assert store.commands == ["session missing" if kind == "nix-session" else "missing"]
    assert side.steps() == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_rebuild_with_check_whose_builder_fails_fails_the_build(
    side: Coordinator, kind: str
) -> None:
    store = machine_with(side, kind, DEP_DRV, TOP_DRV, DEP_OUT, TOP_OUT)
    store.recipes[TOP_DRV] = Recipe({}, log=b"about to fail\n", exit_code=2)
    with pytest.raises(BuildFailed) as caught:
        side.attempt(kind, store)
    assert caught.value.reason == f"builder for {TOP_DRV} failed with exit code 2"
    assert side.check is None


# --- whose failure is it ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_builder_that_fails_fails_the_build(side: Coordinator, kind: str) -> None:
    store = machine_with(side, kind, DEP_DRV, TOP_DRV, DEP_OUT)
    store.recipes[TOP_DRV] = Recipe({}, log=b"about to fail\n", exit_code=3)
    with pytest.raises(BuildFailed) as caught:
        side.attempt(kind, store)
    # The builder's exit status, from the daemon's message: not the build command's (every
    # Guix error exits 1, any Nix build failure 100).
    assert (caught.value.exit_status, caught.value.reason) == (
        3, f"builder for {TOP_DRV} failed with exit code 3")
    assert b"about to fail\n" in gzip.decompress((side.tmp / "top.log.gz").read_bytes())


@pytest.mark.parametrize(("kind", "command", "error"), [
    ("nix", "missing", StoreCommandFailed),
    ("guix", "missing", StoreCommandFailed),
    ("nix-session", "missing", StoreCommandFailed),
    ("nix", "export", TransferFailed),
    ("guix", "export", TransferFailed),
    ("nix-session", "export", TransferFailed),
    ("nix", "hash", TransferFailed),
    ("guix", "hash", TransferFailed),
    ("nix-session", "hash", TransferFailed),
    ("nix-session", "build", StoreCommandFailed),
])
def test_a_store_that_fails_a_query_or_a_transfer_is_retried_later(
    side: Coordinator, kind: str, command: str, error: type[Exception]
) -> None:
    """Not the build's failure: the attempt is interrupted and the build tried again."""
    store = machine_with(side, kind, DEP_DRV, TOP_DRV, DEP_OUT)
    message = failure(kind, command)
    store.answer(command, 1, message + "\n")
    with pytest.raises(error) as caught:
        side.attempt(kind, store)
    assert message in str(caught.value)
    assert not list(Path(side.outputs.nar_dir).glob(TOP_OUT[11:43] + "-*"))


@pytest.mark.parametrize("kind", KINDS)
def test_a_transfer_unlike_what_the_machine_reported_is_not_kept(
    side: Coordinator, kind: str
) -> None:
    store = machine_with(side, kind, DEP_DRV, TOP_DRV, DEP_OUT)
    store.recipes[TOP_DRV] = Recipe({TOP_OUT: TOP_ITEM})
    real_export = store.export
    store.export = lambda paths: real_export(paths).replace(b"top output", b"TOP OUTPUT")
    # The machine's own answer is wrong: a ProtocolError, which backs the machine off.
    with pytest.raises(ProtocolError, match=r"^m: .*corrupt transfer"):
        side.attempt(kind, store)
    assert not list(Path(side.outputs.nar_dir).glob(TOP_OUT[11:43] + "-*"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["missing", "import", "build", "export"])
def test_a_lost_connection_is_the_machines_failure(
    side: Coordinator, kind: str, command: str
) -> None:
    """RemoteError goes up as it is: the coordinator backs the machine off."""
    store = machine_with(side, kind, TOP_DRV, DEP_OUT)  # dep.drv to push
    store.lost.add(command)
    with pytest.raises(RemoteError, match=f"connection lost during {command}"):
        side.attempt(kind, store)


# --- the builder's failure, or the machine's ----------------------------------------------------


# Guix's words for failures that are not the builder's (nix/libstore/build.cc, guix/ui.scm).
MACHINE_SIDE = {
    "daemon down": "guix build: error: failed to connect to `/var/guix/daemon-socket/socket': "
                   "Connection refused",
    "wrong system": f"while setting up the build environment: a `aarch64-linux' is required "
                    f"to build `{TOP_DRV}', but I am a `x86_64-linux'\nbuilder for `{TOP_DRV}' "
                    f"failed with exit code 1\nguix build: error: build of `{TOP_DRV}' failed",
    "substitutes": f"guix build: error: some substitutes for the outputs of derivation "
                   f"`{TOP_DRV}' failed (usually happens due to networking issues); try "
                   "`--fallback' to build derivation from source ",
    "full disk": "guix build: error: writing to file: No space left on device",
    "missing .drv": f"cannot build missing derivation \u2018{TOP_DRV}\u2019\nguix build: error: "
                    f"build of `{TOP_DRV}' failed",
}


@pytest.mark.parametrize("fault", sorted(MACHINE_SIDE))
def test_a_build_that_fails_on_the_machines_side_is_not_the_builds(
    side: Coordinator, fault: str
) -> None:
    """Every daemon error exits 1 (guix/ui.scm): only the builder's own failure fails the
    build; the rest is retried elsewhere."""
    store = machine_with(side, "guix", DEP_DRV, TOP_DRV, DEP_OUT)
    store.answer("build", 1, MACHINE_SIDE[fault] + "\n")
    with pytest.raises(StoreCommandFailed, match=r"^the build did not run: "):
        side.attempt("guix", store)
    assert not list(Path(side.outputs.nar_dir).glob(TOP_OUT[11:43] + "-*"))


# --- garbage collection on the machine ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["guix", "nix"])
@pytest.mark.parametrize("before", ["build", "export"])
def test_a_collection_between_steps_takes_nothing_the_attempt_needs(
    side: Coordinator, kind: str, before: str
) -> None:
    """What it pushed (top.drv, dep's output) and what it built are held by GC roots until
    the attempt ends; roots of attempts no longer running go, its own go at its end."""
    store = machine_with(side, kind, DEP_DRV)
    store.roots["99"] = {DEP_DRV}  # an attempt of a coordinator that died
    store.collect_before.add(before)
    (stored,) = side.attempt(kind, store, running=[7])
    assert stored.path == TOP_OUT
    assert store.imported == [[TOP_DRV], [DEP_OUT]]
    assert store.roots == {}
    held = {TOP_DRV, DEP_DRV, DEP_OUT, TOP_OUT}
    assert held <= set(store.items)
    assert store.commands.count("roots") == 1 and store.commands[-1] == "unroot"


@pytest.mark.parametrize(("kind", "before"), [
    ("guix", "check"), ("guix", "export"), ("nix", "check"), ("nix", "export"),
    ("nix-session", "check"),  # a session exports on its own channel
])
def test_outputs_a_rebuild_compares_with_are_held(side: Coordinator, kind: str,
                                                  before: str) -> None:
    """Outputs already on the machine are rooted with the rest, up front (also beside a store
    session, which holds only what it imported or built): a collection before the rebuild with
    --check or the export takes none of them."""
    store = machine_with(side, kind, DEP_DRV, TOP_DRV, DEP_OUT, TOP_OUT)
    store.collect_before.add(before)
    (stored,) = side.attempt(kind, store)
    assert stored.path == TOP_OUT and side.check == IDENTICAL
    assert store.commands.count("roots") == 1 and store.commands[-1] == "unroot"


def waits_for_the_collector(coordinator: Coordinator, kind: str, command: str,
                            present: Sequence[str]) -> None:
    """A collection holds the GC lock for as long as it runs: a command that waits on it past
    its time is a busy machine (tried again later), not a dead connection; any other command
    that outlives its time is still taken for one."""
    for said, error, match in ((b"waiting for the big garbage collector lock...\n",
                                StoreCommandFailed, "garbage collector past its time"),
                               (b"something else\n", RemoteError, "still running after")):
        store = machine_with(coordinator, kind, *present)
        store.stall[command] = said
        with pytest.raises(error, match=match):
            coordinator.attempt(kind, store)
        assert command in store.commands


@pytest.mark.parametrize("kind", ["guix", "nix"])
@pytest.mark.parametrize("command", ["missing", "import", "roots", "export"])
def test_a_command_that_waits_for_the_collector_is_the_machines_fault(
    side: Coordinator, kind: str, command: str
) -> None:
    present = (DEP_DRV, DEP_OUT) if command == "import" else (DEP_DRV, TOP_DRV, DEP_OUT)
    waits_for_the_collector(side, kind, command, present)


@pytest.mark.parametrize("kind", ["guix", "nix"])
def test_a_dry_run_that_waits_for_the_collector_is_the_machines_fault(
    alone: Coordinator, kind: str
) -> None:
    waits_for_the_collector(alone, kind, "dry-run", (DEP_DRV, TOP_DRV, DEP_OUT))


# --- inputs from substitute servers ------------------------------------------------------------

FARM = "http://farm.example.org:8080"
UPSTREAM = "https://ci.example.org"


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_a_server_offers_are_downloaded_not_pushed(
    layered: Coordinator, kind: str
) -> None:
    """dep's output (referring to LIB) is on the farm's server; nothing is pushed but the .drv
    files, and the attempt says where each input came from."""
    store = machine_with(layered, kind, DEP_DRV)
    store.servers = {UPSTREAM: {}, FARM: {DEP_OUT: LAYERED_DEP_ITEM, LIB: LIB_ITEM}}
    layered.attempt(kind, store, substitute_urls=(UPSTREAM, FARM))
    assert store.imported == [[TOP_DRV]]
    assert store.items[DEP_OUT] == LAYERED_DEP_ITEM and LIB in store.items
    assert layered.input_sources() == {DEP_OUT: FARM}
    steps = dict(layered.steps())
    assert steps["substitute-inputs"] == f"1 input(s) asked of {UPSTREAM} {FARM}"
    assert steps["push-inputs"] == "skipped: every input output is on the machine"
    log = gzip.decompress((layered.tmp / "top.log.gz").read_bytes()).decode()
    assert log.index(DEP_OUT) < log.index("building top")  # the step's output, then the build


@pytest.mark.parametrize("kind", KINDS)
def test_what_no_server_offers_is_pushed(layered: Coordinator, kind: str) -> None:
    """The server has LIB but not dep's output: only the inputs are asked for, so dep's output
    is pushed with LIB, and so recorded."""
    store = machine_with(layered, kind, DEP_DRV)
    store.servers = {FARM: {LIB: LIB_ITEM}}
    layered.attempt(kind, store, substitute_urls=(FARM,))
    assert store.imported == [[TOP_DRV], [LIB, DEP_OUT]]
    assert layered.input_sources() == {DEP_OUT: "pushed"}
    assert "substitute" in store.commands


@pytest.mark.parametrize("kind", KINDS)
def test_without_substitute_urls_nothing_is_downloaded(side: Coordinator, kind: str) -> None:
    store = machine_with(side, kind, DEP_DRV)
    store.servers = {FARM: {DEP_OUT: DEP_ITEM}}
    side.attempt(kind, store)
    assert "substitute" not in store.commands
    assert store.imported == [[TOP_DRV], [DEP_OUT]]
    assert side.input_sources() == {DEP_OUT: "pushed"}
    assert "substitute-inputs" not in dict(side.steps())


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_already_there_are_said_to_be(side: Coordinator, kind: str) -> None:
    store = machine_with(side, kind, DEP_DRV, TOP_DRV, DEP_OUT)
    side.attempt(kind, store, substitute_urls=(FARM,))
    assert "substitute" not in store.commands
    assert side.input_sources() == {DEP_OUT: "machine"}
