"""What a submission records (datastore/submissions.py, dependencies.py): --closure, reuse of
existing builds and of held outputs, priorities inherited by inputs, failures remembered with
their root cause, retries on purpose, and two submitters racing for one derivation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from engines import ScratchDatabase

from buildfarm.coordinator import scheduler
from buildfarm.datastore import Datastore, builds, open_datastore
from buildfarm.datastore import attempts as records
from buildfarm.datastore.models import Build, Event, StoredOutput
from buildfarm.formats import derivation as drvmod
from buildfarm.submission import ReadDerivation, SubmitOptions, Submitted, text_store_path

SLOT = scheduler.Slot("m", ("x86_64-linux",), frozenset())


@pytest.fixture
def store(database: ScratchDatabase) -> Iterator[Datastore]:
    with open_datastore(database.url) as opened:
        yield opened


def make_drv(name: str, inputs: Sequence[tuple[ReadDerivation, str]] = (),
             outputs: Sequence[str] = ("out",), out_name: str | None = None) -> ReadDerivation:
    """A derivation; `out_name` gives its outputs another derivation's paths (the same outputs
    from another .drv, as a changed fixed-output input makes)."""
    paths = {o: f"/gnu/store/{'1' * 32}-{out_name or name}-{o}" for o in outputs}
    drv = drvmod.Derivation(
        outputs=tuple(drvmod.DerivationOutput(o, p, "", "") for o, p in sorted(paths.items())),
        input_drvs=tuple(sorted((i.path, (o,)) for i, o in inputs)),
        input_srcs=(),
        system="x86_64-linux",
        builder="/bin/sh",
        args=(),
        env=(("name", name),),
    )
    contents = drvmod.serialize(drv)
    return ReadDerivation(text_store_path("/gnu/store", f"{name}.drv", contents, drv.references),
                          drv, contents)


def submit(targets: Sequence[ReadDerivation], inputs: Sequence[ReadDerivation] = (),
           **options: object) -> list[Submitted]:
    return builds.record_submission(list(targets), list(inputs), SubmitOptions(**options),
                                    time.time())  # type: ignore[arg-type]


def run_one(expected: str, *, fail: bool = False) -> None:
    """The scheduler's next build must be `expected`'s; it succeeds (or fails)."""
    attempt = scheduler.allocate(SLOT)
    assert attempt is not None and attempt.build.uuid == expected
    if fail:
        records.fail(attempt.id, 1, "builder failed with exit code 1", None)
    else:
        records.succeed(attempt.id, [], None)


def state(uuid: str) -> tuple[str, str | None, int]:
    build = Build.get(Build.uuid == uuid)
    return build.state, build.reason, build.priority


def test_closure_submits_what_is_not_built_with_the_tags_and_priority(store: Datastore) -> None:
    leaf = make_drv("leaf")
    held = make_drv("held")
    queued = make_drv("queued")
    multi = make_drv("multi", [(leaf, "out")], outputs=("out", "dev"))
    top = make_drv("top", [(multi, "dev"), (held, "out"), (queued, "out")])
    (already,) = submit([queued])
    StoredOutput.create(path=held.drv.output_paths["out"], nar_hash="sha256:x", nar_size=1,
                        file="nar/x", created_at=0, last_used_at=0)
    done = submit([top], [multi, leaf, held, queued], closure=True, priority=4,
                  tags=(("job", "j"),))
    assert [(r.derivation, r.created, r.target) for r in done] == [
        (top.path, True, True), (leaf.path, True, False), (multi.path, True, False)]
    for result in done:
        build = Build.get(Build.uuid == result.uuid)
        assert (build.priority, {t.key: t.value for t in build.tags}) == (4, {"job": "j"})
    assert state(already.uuid)[2] == 4  # a queued input gets the priority of what needs it
    assert Build.select().count() == 4  # nothing for the held input
    # Each after its inputs (the oldest first among equals).
    for uuid in (already.uuid, done[1].uuid, done[2].uuid, done[0].uuid):
        run_one(uuid)


def test_ignore_if_built_matches_by_outputs_whatever_derivation_made_them(
    store: Datastore,
) -> None:
    original = make_drv("tool")
    twin = make_drv("tool-fetched-otherwise", out_name="tool")  # another .drv, same outputs
    assert twin.path != original.path and twin.drv.output_paths == original.drv.output_paths
    (first,) = submit([original])
    run_one(first.uuid)
    StoredOutput.create(path=original.drv.output_paths["out"], nar_hash="sha256:x", nar_size=1,
                        file="nar/x", created_at=0, last_used_at=0)
    (reused,) = submit([twin], ignore_if_built=True)
    assert (reused.uuid, reused.created) == (first.uuid, False)
    (again,) = submit([twin])  # without the option: built on purpose
    assert again.created


def test_raising_a_priority_raises_what_the_build_needs(store: Datastore) -> None:
    base = make_drv("base")
    mid = make_drv("mid", [(base, "out")])
    top = make_drv("top", [(mid, "out")])
    (b,) = submit([base])
    (m,) = submit([mid], priority=2)
    (t,) = submit([top], priority=1)
    assert [state(x.uuid)[2] for x in (b, m, t)] == [2, 2, 1]  # mid raised base at submission
    assert builds.set_priority(t.uuid[:8], 7) == (t.uuid, 1, 2)  # a prefix names it too
    assert [state(x.uuid)[2] for x in (b, m, t)] == [7, 7, 7]
    assert builds.set_priority(t.uuid, 0) == (t.uuid, 7, 0)  # lowered: the inputs keep theirs
    assert [state(x.uuid)[2] for x in (b, m, t)] == [7, 7, 0]


def test_a_failure_is_remembered_and_named_as_the_root_cause(store: Datastore) -> None:
    """root fails; then mid and top, submitted with --closure, end dependency-failed at once,
    both naming root's build; retrying root with its dependants queues all three again."""
    root = make_drv("root")
    mid = make_drv("mid", [(root, "out")])
    top = make_drv("top", [(mid, "out")])
    (r,) = submit([root])
    run_one(r.uuid, fail=True)
    done = submit([top], [mid, root], closure=True)
    assert [(x.derivation, x.state) for x in done] == [(top.path, "failed"), (mid.path, "failed")]
    cause = f"dependency-failed: {root.path} (build {r.uuid})"
    assert state(done[1].uuid)[1] == cause
    assert state(done[0].uuid)[1] == f"{cause} via {mid.path}"
    assert builds.show_build(done[0].uuid)["cause"] == {"build": r.uuid, "derivation": root.path}
    names = [e.name for e in Event.select().order_by(Event.id)][-4:]
    assert sorted(names) == ["build-failure", "build-failure", "build-submitted",
                             "build-submitted"]
    assert scheduler.allocate(SLOT) is None
    # Failing on purpose again: submit without an option retries root, not the others.
    assert submit([root], ignore_if_failed=True)[0].uuid == r.uuid
    retried, refused = builds.retry_builds([r.uuid], dependants=True)
    assert (sorted(retried), refused) == (sorted([r.uuid, done[0].uuid, done[1].uuid]), [])
    run_one(r.uuid)
    run_one(done[1].uuid)
    run_one(done[0].uuid)


def test_retrying_a_build_another_failure_still_blocks(store: Datastore) -> None:
    left, right = make_drv("left"), make_drv("right")
    top = make_drv("top", [(left, "out"), (right, "out")])
    (lb,), (rb,) = submit([left]), submit([right])
    (tb,) = submit([top])
    run_one(lb.uuid, fail=True)
    assert state(tb.uuid)[0] == "failed"
    run_one(rb.uuid, fail=True)
    retried, refused = builds.retry_builds([tb.uuid, "not-a-uuid", lb.uuid])
    assert retried == [lb.uuid]
    assert refused[0].startswith(f"build {tb.uuid} is dependency-failed: retry what it waits "
                                 f"for, build {lb.uuid}")
    assert refused[1] == ("'not-a-uuid' is not a build UUID, nor its first 8 or more "
                          "characters")
    assert state(tb.uuid)[0] == "failed"  # without --dependants, the top stays as it is
    # Retried with left's dependants, the top would still wait on right's failure: it ends
    # dependency-failed again at once, naming that one, and the retry says so.
    run_one(lb.uuid, fail=True)
    retried, refused = builds.retry_builds([lb.uuid], dependants=True)
    assert retried == [lb.uuid, tb.uuid]
    assert refused == [f"build {tb.uuid} ended dependency-failed at once: an input it needs "
                       "still failed"]
    assert state(tb.uuid)[1] == f"dependency-failed: {right.path} (build {rb.uuid})"
    assert state(lb.uuid)[0] == "queued"


def test_racing_submitters_make_one_build(database: ScratchDatabase, tmp_path: Path) -> None:
    """Eight processes run the hook's `submit --ignore-if-failed` of the same derivations at the
    same moment, round after round: each derivation gets exactly one build, and every process
    prints its UUID. The check and the insert are one transaction."""
    drvs = [make_drv(f"raced-{n}") for n in range(5)]
    files = []
    for item in drvs:
        file = tmp_path / item.path.rsplit("/", 1)[1]
        file.write_bytes(item.contents)
        files.append(str(file))
    script = textwrap.dedent(
        f"""
        import os, pathlib, sys, time
        from buildfarm.datastore import open_datastore
        from buildfarm.submission import SubmitOptions, submit
        open_datastore({database.url!r})
        for n, file in enumerate({files!r}):
            gate = pathlib.Path({str(tmp_path)!r}) / f"gate-{{n}}"
            pathlib.Path(f"{{gate}}.{{sys.argv[1]}}").touch()
            while not gate.exists():
                time.sleep(0.002)
            (done,) = submit([file], SubmitOptions(ignore_if_failed=True))
            print(done.uuid, done.created, flush=True)
        """
    )
    workers = [subprocess.Popen([sys.executable, "-c", script, str(n)], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for n in range(8)]
    for n in range(len(files)):
        ready = [tmp_path / f"gate-{n}.{w}" for w in range(8)]
        deadline = time.monotonic() + 120
        while not all(p.exists() for p in ready):
            for worker in workers:
                if worker.poll() is not None:
                    raise AssertionError(f"a submitter died: {worker.communicate()[1]}")
            assert time.monotonic() < deadline
            time.sleep(0.002)
        (tmp_path / f"gate-{n}").touch()
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0 and err == "", err
        outputs.append(out.split("\n")[:-1])
    for n in range(len(files)):
        printed = [out[n].split() for out in outputs]
        assert len({uuid for uuid, _ in printed}) == 1, printed
        assert sorted(created for _, created in printed) == ["False"] * 7 + ["True"]
    assert database.scalar("SELECT COUNT(*) FROM build") == len(files)


def test_a_failed_rebuild_of_held_outputs_blocks_nothing(store: Datastore) -> None:
    """X built and held; a rebuild of X fails while Y, which needs X, waits for it: Y goes on
    (the farm holds X's outputs), and so does a Y submitted later."""
    x = make_drv("x")
    y = make_drv("y", [(x, "out")])
    (first,) = submit([x])
    run_one(first.uuid)
    StoredOutput.create(path=x.drv.output_paths["out"], nar_hash="sha256:x", nar_size=1,
                        file="nar/x", created_at=0, last_used_at=0)
    (rebuild,) = submit([x])
    (waiting,) = submit([y])
    assert scheduler.allocate(SLOT).build.uuid == rebuild.uuid  # type: ignore[union-attr]
    attempt = Build.get(Build.uuid == rebuild.uuid).attempts.get()
    assert records.fail(attempt.id, 1, "builder failed with exit code 1", None) == []
    assert state(waiting.uuid)[0] == "queued"
    (later,) = submit([y])
    assert later.state == "queued"
    run_one(waiting.uuid)
