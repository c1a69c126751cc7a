"""The scheduler: which queued build a free slot gets, and the `waiting_on` counts (kept by the
datastore's triggers) that let it answer from an index at any queue length.

The reference is the scheduling rule (ARCHITECTURE.md, "The life of one build", step 2: the first
queued build in priority order with no queued or running input build), written as the direct query
the scheduler used before the counts existed: after every kind of state change, on every engine, the
scheduler must offer exactly the builds that query finds, in the same order.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence

import pytest
from engines import ScratchDatabase

from buildfarm.coordinator import scheduler
from buildfarm.datastore import Datastore, builds, open_datastore
from buildfarm.datastore import attempts as records
from buildfarm.datastore.models import MISSING_INPUTS, Build, database_proxy
from buildfarm.formats import derivation as drvmod
from buildfarm.submission import ReadDerivation, SubmitOptions, text_store_path

X86, ARM = "x86_64-linux", "aarch64-linux"
ACTIVE = "('queued', 'running')"


@pytest.fixture
def store(database: ScratchDatabase) -> Iterator[Datastore]:
    with open_datastore(database.url) as opened:
        yield opened


def make_drv(
    name: str, inputs: Sequence[ReadDerivation] = (), system: str = X86, features: str = ""
) -> ReadDerivation:
    out = f"/gnu/store/{'0' * 32}-{name}"
    env = {"name": name, "out": out, "system": system, "builder": "/bin/sh"}
    if features:
        env["requiredSystemFeatures"] = features
    drv = drvmod.Derivation(
        outputs=(drvmod.DerivationOutput("out", out, "", ""),),
        input_drvs=tuple(sorted((i.path, ("out",)) for i in inputs)),
        input_srcs=(),
        system=system,
        builder="/bin/sh",
        args=("-c", "true"),
        env=tuple(sorted(env.items())),
    )
    contents = drvmod.serialize(drv)
    path = text_store_path("/gnu/store", f"{name}.drv", contents, drv.references)
    return ReadDerivation(path, drv, contents)


def queue(*drvs: ReadDerivation, priority: int = 0, now: float | None = None,
          defer_until: float | None = None,
          machine_tags: tuple[tuple[str, str], ...] = ()) -> list[str]:
    options = SubmitOptions(priority=priority, defer_until=defer_until,
                            machine_tags=machine_tags)
    done = builds.record_submission(list(drvs), [], options, time.time() if now is None else now)
    return [s.uuid for s in done]


def uuid_of(build_id: int) -> str:
    return str(Build.get_by_id(build_id).uuid)


def offered(slot: scheduler.Slot, now: float) -> list[str]:
    return [uuid_of(i) for i in scheduler.candidate_ids(slot, now)]


def reference(slot: scheduler.Slot, now: float) -> list[str]:
    """The scheduling rule (ARCHITECTURE.md step 2), as one direct query (linear in the queue:
    the tests' yardstick)."""
    db = database_proxy.obj
    p = db.param
    systems = ", ".join([p] * len(slot.systems))
    rows = db.execute_sql(
        "SELECT b.uuid, b.required_features, b.machine_tags FROM build AS b "
        f"WHERE b.state = 'queued' AND b.system IN ({systems}) "
        f"AND (b.defer_until IS NULL OR b.defer_until <= {p}) "
        f"AND (b.retry_after IS NULL OR b.retry_after <= {p}) "
        "AND NOT EXISTS (SELECT 1 FROM derivation_input AS i "
        "JOIN derivation AS d ON d.path = i.input_path "
        "JOIN build AS ib ON ib.derivation_id = d.id "
        f"WHERE i.derivation_id = b.derivation_id AND ib.state IN {ACTIVE}) "
        "ORDER BY b.priority DESC, b.created_at, b.id",
        (*slot.systems, now, now),
    ).fetchall()
    return [uuid for uuid, required, tags in rows
            if set(required.split()) <= slot.features and set(tags.split()) <= slot.tags]


def miscounted() -> list[tuple[str, int, int]]:
    """Active builds whose waiting_on differs from a count made from scratch."""
    rows = database_proxy.obj.execute_sql(
        "SELECT b.uuid, b.waiting_on, (SELECT COUNT(*) FROM derivation_input AS i "
        "JOIN derivation AS d ON d.path = i.input_path "
        "JOIN build AS ib ON ib.derivation_id = d.id "
        f"WHERE i.derivation_id = b.derivation_id AND ib.state IN {ACTIVE}) "
        f"FROM build AS b WHERE b.state IN {ACTIVE}"
    ).fetchall()
    return [(u, int(kept), int(real)) for u, kept, real in rows if kept != real]


def test_priority_then_age_then_submission_order(store: Datastore) -> None:
    slot = scheduler.Slot("m", (X86,), frozenset())
    old = queue(make_drv("old"), now=100.0)
    high = queue(make_drv("high"), priority=5, now=300.0)
    a, b = queue(make_drv("a"), make_drv("b"), now=200.0)
    assert offered(slot, 1000.0) == [*high, *old, a, b] == reference(slot, 1000.0)


def test_a_queued_or_running_input_blocks_until_it_ends(store: Datastore) -> None:
    slot = scheduler.Slot("m", (X86,), frozenset())
    dep = make_drv("dep")
    (top,) = queue(make_drv("top", [dep]))
    assert offered(slot, time.time()) == [top]  # no build of its input: it may start
    (dep_build,) = queue(dep)  # an input build submitted later blocks it
    assert offered(slot, time.time()) == [dep_build]
    attempt = scheduler.allocate(slot)
    assert attempt is not None and attempt.build.uuid == dep_build
    assert attempt.build.derivation.path == dep.path  # loaded with the attempt
    assert offered(slot, time.time()) == []  # running still blocks
    records.succeed(attempt.id, [], None)
    assert offered(slot, time.time()) == [top]
    assert miscounted() == []


def test_two_builds_of_one_derivation_never_run_at_once(store: Datastore) -> None:
    slot = scheduler.Slot("m", (X86,), frozenset())
    drv = make_drv("twice")
    first, second = queue(drv, now=100.0) + queue(drv, now=200.0)
    (other,) = queue(make_drv("other"), now=300.0)
    attempt = scheduler.allocate(slot)
    assert attempt is not None and attempt.build.uuid == first
    following = scheduler.allocate(slot)  # the twin waits; the next build goes instead
    assert following is not None and following.build.uuid == other
    assert scheduler.allocate(slot) is None
    records.succeed(attempt.id, [], None)
    last = scheduler.allocate(slot)
    assert last is not None and last.build.uuid == second


def test_systems_and_features(store: Datastore) -> None:
    plain, kvm, big = make_drv("plain"), make_drv("kvm", features="kvm"), make_drv(
        "big", features="big-parallel kvm")
    arm = make_drv("arm", system=ARM)
    uuids = dict(zip(("plain", "kvm", "big", "arm"), queue(plain, kvm, big, arm), strict=True))
    now = time.time() + 1
    cases = {
        scheduler.Slot("m", (X86,), frozenset()): ["plain"],
        scheduler.Slot("m", (X86,), frozenset({"kvm"})): ["plain", "kvm"],
        scheduler.Slot("m", (ARM, X86), frozenset({"kvm", "big-parallel"})):
            ["plain", "kvm", "big", "arm"],
        # More features than are listed as ranges of their own: filtered row by row.
        scheduler.Slot("m", (X86,), frozenset({"kvm", *(f"f{n}" for n in range(8))})):
            ["plain", "kvm"],
    }
    for slot, names in cases.items():
        assert offered(slot, now) == [uuids[n] for n in names] == reference(slot, now), slot


def test_machine_tags(store: Datastore) -> None:
    """A build with machine tags goes only to a slot whose machine carries them all, beside
    its features; past MAX_FEATURE_SETS pairs, rows are filtered one by one."""
    uuids = {
        "plain": queue(make_drv("plain"), now=1.0)[0],
        "gpu": queue(make_drv("gpu"), machine_tags=(("gpu", "a100"),), now=2.0)[0],
        "paris-gpu": queue(make_drv("paris-gpu"), now=3.0,
                           machine_tags=(("site", "paris"), ("gpu", "a100")))[0],
        "kvm-gpu": queue(make_drv("kvm-gpu", features="kvm"), now=4.0,
                         machine_tags=(("gpu", "a100"),))[0],
        "other-gpu": queue(make_drv("other-gpu"), machine_tags=(("gpu", "h100"),), now=5.0)[0],
    }
    assert Build.get(Build.uuid == uuids["paris-gpu"]).machine_tags == "gpu=a100 site=paris"
    now = time.time() + 1
    many = frozenset({"gpu=a100", *(f"t{n}=x" for n in range(8))})
    cases = {
        scheduler.Slot("m", (X86,), frozenset()): ["plain"],
        scheduler.Slot("m", (X86,), frozenset(), tags=frozenset({"gpu=a100"})): ["plain", "gpu"],
        scheduler.Slot("m", (X86,), frozenset({"kvm"}),
                       tags=frozenset({"gpu=a100", "site=paris"})):
            ["plain", "gpu", "paris-gpu", "kvm-gpu"],
        scheduler.Slot("m", (X86,), frozenset({"kvm"}), tags=many): ["plain", "gpu", "kvm-gpu"],
    }
    for slot, names in cases.items():
        assert offered(slot, now) == [uuids[n] for n in names] == reference(slot, now), slot


def test_feature_sets_are_every_subset_in_submission_spelling() -> None:
    assert scheduler.feature_sets(frozenset()) == [""]
    assert scheduler.feature_sets(frozenset({"kvm", "big-parallel"})) == [
        "", "big-parallel", "kvm", "big-parallel kvm"]
    assert scheduler.feature_sets(frozenset(f"f{n}" for n in range(7))) is None


def test_deferred_and_backed_off_builds_wait_for_their_time(store: Datastore) -> None:
    slot = scheduler.Slot("m", (X86,), frozenset())
    now = time.time()
    (later,) = queue(make_drv("later"), defer_until=now + 100)
    (soon,) = queue(make_drv("soon"))
    attempt = scheduler.allocate(slot, now)
    assert attempt is not None and attempt.build.uuid == soon
    records.setup_failure(attempt.id, "could-not-delete-outputs", [], "busy", 50.0)
    assert offered(slot, now + 10) == []
    assert offered(slot, now + 60) == [soon]
    assert offered(slot, now + 200) == [later, soon] == reference(slot, now + 200)


def test_many_pages_of_ready_builds_come_in_order(store: Datastore) -> None:
    slot = scheduler.Slot("m", (X86, ARM), frozenset())
    rng = random.Random(7)
    for n in range(300):
        system = X86 if n % 3 else ARM
        queue(make_drv(f"p{n}", system=system), priority=rng.randint(0, 3), now=float(n % 17))
    assert offered(slot, 1000.0) == reference(slot, 1000.0)
    assert len(offered(slot, 1000.0)) == 300


def test_counts_made_by_the_migration_for_an_existing_queue(database: ScratchDatabase) -> None:
    with open_datastore(database.url, upto=2):
        # As a version of that schema wrote them (today's submissions use later columns).
        dep = make_drv("dep")
        db = database_proxy.obj
        for n, item in enumerate((dep, make_drv("top", [dep]), make_drv("other", [dep]))):
            db.execute_sql(
                "INSERT INTO derivation (id, path, system, contents, created_at) "
                "VALUES (?, ?, ?, ?, 0)".replace("?", db.param), (n + 1, item.path, X86, b""))
            for input_path, names in item.drv.input_drvs:
                db.execute_sql(
                    "INSERT INTO derivation_input (derivation_id, input_path, outputs) "
                    "VALUES (?, ?, ?)".replace("?", db.param), (n + 1, input_path, names[0]))
            db.execute_sql(
                "INSERT INTO build (uuid, derivation_id, system, state, created_at) "
                "VALUES (?, ?, ?, 'queued', 0)".replace("?", db.param), (f"u{n}", n + 1, X86))
    with open_datastore(database.url):
        counts = dict(database_proxy.obj.execute_sql(
            "SELECT d.path, b.waiting_on FROM build AS b JOIN derivation AS d "
            "ON d.id = b.derivation_id").fetchall())
        assert sorted(counts.values()) == [0, 1, 1]
        assert miscounted() == []


def test_statements_of_many_rows_keep_the_counts(store: Datastore) -> None:
    """One statement that inserts, requeues, ends or deletes a build and the builds that need
    it together (PostgreSQL's statement triggers see the whole statement at once)."""
    slot = scheduler.Slot("m", (X86,), frozenset())
    base = make_drv("base")
    mid = make_drv("mid", [base])
    queue(base, mid, make_drv("top", [base, mid]))
    db = database_proxy.obj
    copies = (
        "INSERT INTO build (uuid, derivation_id, system, required_features, state, priority, "
        "created_at) SELECT uuid || '-again', derivation_id, system, required_features, "
        "'queued', 7, created_at + 1 FROM build"
    )
    for statement in (
        copies,
        "UPDATE build SET state = 'canceled' WHERE priority <> 7",
        "UPDATE build SET state = 'canceled'",
        "UPDATE build SET state = 'queued'",
        "UPDATE build SET state = 'running' WHERE priority = 7",
        "UPDATE build SET state = 'succeeded' WHERE priority <> 7",
        "DELETE FROM build WHERE priority = 7",
    ):
        with database_proxy.atomic():
            db.execute_sql(statement)
        assert miscounted() == [], statement
        assert offered(slot, time.time()) == reference(slot, time.time()), statement


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_sequence_of_changes_keeps_the_counts_and_the_rule(
    store: Datastore, seed: int
) -> None:
    """Random graphs, submissions in any order, and every way a build changes state."""
    rng = random.Random(seed)
    slot = scheduler.Slot("m", (X86, ARM), frozenset({"kvm"}))
    drvs: list[ReadDerivation] = []
    for n in range(40):
        inputs = rng.sample(drvs, min(len(drvs), rng.choice((0, 1, 1, 2, 3))))
        system = inputs[0].drv.system if inputs else rng.choice((X86, X86, ARM))
        inputs = [i for i in inputs if i.drv.system == system]
        drvs.append(make_drv(f"d{seed}-{n}", inputs, system, rng.choice(("", "", "kvm"))))
    running: list[int] = []
    now = 1000.0
    for _step in range(120):
        now += rng.choice((0.0, 1.0, 30.0))
        action = rng.random()
        if action < 0.3:
            chosen = rng.sample(drvs, rng.randint(1, 4))
            queue(*chosen, priority=rng.randint(0, 2), now=now,
                  defer_until=now + 20 if rng.random() < 0.1 else None)
        elif action < 0.55:
            attempt = scheduler.allocate(slot, now)
            if attempt is not None:
                running.append(attempt.id)
        elif running:
            attempt_id = running.pop(rng.randrange(len(running)))
            outcome = rng.random()
            if outcome < 0.4:
                records.succeed(attempt_id, [], None)
            elif outcome < 0.6:
                records.fail(attempt_id, 1, "failed", None)
            elif outcome < 0.75:
                records.setup_failure(attempt_id, MISSING_INPUTS, [], "missing", 10.0)
            elif outcome < 0.9:
                records.interrupt(attempt_id, "connection lost")
            else:
                build = Build.select().where(Build.state == "running").first()
                if build is not None:
                    builds.cancel_builds([build.uuid])
                records.interrupt(attempt_id, "canceled")
        if rng.random() < 0.05:
            records.recover()
            running.clear()
        if rng.random() < 0.1:
            queued = Build.select().where(Build.state == "queued").first()
            if queued is not None:
                builds.set_priority(queued.uuid, rng.randint(0, 3))
        assert miscounted() == []
        assert offered(slot, now) == reference(slot, now)
