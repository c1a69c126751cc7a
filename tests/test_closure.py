"""The closures pushed to machines (datastore/closure.py): .drv closures, input outputs and stored
outputs, each item after what it needs, read level by level."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import pytest
from engines import ScratchDatabase

from buildfarm.datastore import Datastore, closure, open_datastore
from buildfarm.datastore.builds import record_submission
from buildfarm.datastore.models import StoredOutput
from buildfarm.formats import derivation as drvmod
from buildfarm.submission import ReadDerivation, SubmitOptions, text_store_path


@pytest.fixture
def store(database: ScratchDatabase) -> Iterator[Datastore]:
    with open_datastore(database.url) as opened:
        yield opened


def make_drv(name: str, inputs: Sequence[tuple[str, tuple[str, ...]]] = (),
             outputs: Sequence[str] = ("out",)) -> ReadDerivation:
    paths = {o: f"/gnu/store/{'1' * 32}-{name}-{o}" for o in outputs}
    drv = drvmod.Derivation(
        outputs=tuple(drvmod.DerivationOutput(o, p, "", "") for o, p in sorted(paths.items())),
        input_drvs=tuple(sorted(inputs)),
        input_srcs=(),
        system="x86_64-linux",
        builder="/bin/sh",
        args=(),
        env=(("name", name),),
    )
    contents = drvmod.serialize(drv)
    return ReadDerivation(text_store_path("/gnu/store", f"{name}.drv", contents, drv.references),
                          drv, contents)


def record(*drvs: ReadDerivation) -> None:
    record_submission(list(drvs), [], SubmitOptions(), time.time())


def test_derivations_come_after_their_inputs_once_each(store: Datastore) -> None:
    base = make_drv("base")
    left = make_drv("left", [(base.path, ("out",))])
    right = make_drv("right", [(base.path, ("out",))])
    unknown = "/gnu/store/" + "2" * 32 + "-never-read.drv"
    top = make_drv("top", [(left.path, ("out",)), (right.path, ("out",)), (unknown, ("out",))])
    record(base, left, right, top)
    order = [k.path for k in closure.derivations(top.path)]
    assert sorted(order) == sorted([base.path, left.path, right.path, top.path])
    assert order[-1] == top.path and order[0] == base.path
    assert {k.path: k.contents for k in closure.derivations(top.path)}[left.path] == left.contents
    # The depth-first post-order of a walk that takes the inputs from the last one back.
    expected: list[str] = []

    def visit(item: ReadDerivation) -> None:
        for path, _ in reversed(item.drv.input_drvs):
            known = {d.path: d for d in (base, left, right)}.get(path)
            if known is not None and known.path not in expected:
                visit(known)
        expected.append(item.path)

    visit(top)
    assert order == expected
    assert closure.derivations(unknown) == []


def test_input_outputs_and_whether_they_are_all_known(store: Datastore) -> None:
    lib = make_drv("lib", outputs=("out", "dev", "doc"))
    app = make_drv("app", [(lib.path, ("dev", "out"))])
    record(lib, app)
    paths, complete = closure.input_outputs(app.path)
    assert paths == sorted([lib.drv.output_paths["dev"], lib.drv.output_paths["out"]])
    assert complete
    unknown = "/gnu/store/" + "3" * 32 + "-unread.drv"
    other = make_drv("other", [(lib.path, ("out",)), (unknown, ("out",))])
    record(other)
    assert closure.input_outputs(other.path) == ([lib.drv.output_paths["out"]], False)
    assert closure.derivations_of([lib.drv.output_paths["doc"], "/gnu/store/x-none"]) == {
        lib.drv.output_paths["doc"]: lib.path
    }


def test_stored_closure_puts_references_first(store: Datastore) -> None:
    def stored(name: str, refs: Sequence[str]) -> str:
        path = f"/gnu/store/{'4' * 32}-{name}"
        StoredOutput.create(path=path, refs=" ".join(refs), nar_hash="sha256:x", nar_size=1,
                            file=f"nar/{name}", created_at=0.0, last_used_at=0.0)
        return path

    glibc = stored("glibc", [f"/gnu/store/{'4' * 32}-glibc"])  # refers to itself
    gcc = stored("gcc-lib", [glibc, "/gnu/store/not-stored"])
    app = stored("app", [gcc, glibc])
    order = [s.path for s in closure.stored_closure([app, "/gnu/store/absent"])]
    assert order == [glibc, gcc, app]
    assert [s.path for s in closure.stored_closure([gcc, app])] == [glibc, gcc, app]
