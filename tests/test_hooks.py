"""Hooks without the test bed: which scripts run, what they get, how they are run and reported,
the events' declared payloads, `buildfarm hooks list`, and the generated man page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from engines import ScratchDatabase
from testbed import process_state

from buildfarm.cli import cli
from buildfarm.coordinator import hooks, scheduler
from buildfarm.coordinator.hooks import HookRun, HookRunner, HookSettings
from buildfarm.datastore import Datastore, builds, open_datastore
from buildfarm.datastore import attempts as records
from buildfarm.datastore import events as event_rows
from buildfarm.datastore.models import MISSING_INPUTS, Build, Event
from buildfarm.docs import manpages
from buildfarm.submission import SubmitOptions, submit

DATA = Path(__file__).parent / "data" / "nix"
HELLO = DATA / "76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
TOP = DATA / "mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv"
DEP = DATA / "pld6g8hnp87b9d7yvkidbf4zi7hvm33k-dep.drv"
DEP_PATH = "/nix/store/pld6g8hnp87b9d7yvkidbf4zi7hvm33k-dep.drv"
DEP_OUT = "/nix/store/5qn9lblnzjgza2vb23kwaclrcxnska2z-dep"
SHIPPED = Path(__file__).parent.parent / "hooks.d"


def add_hook(hooks_dir: Path, event: str, name: str, body: str | bytes, mode: int = 0o755) -> Path:
    directory = hooks_dir / f"{event}.d"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def run(script: Path, payload: str = "{}", timeout: float = 60.0, **env: str) -> HookRun:
    return asyncio.run(hooks.run_script(str(script), payload, {**os.environ, **env}, timeout))


def wait_gone(pid: int) -> None:
    """Wait until `pid` has died (gone, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + 10
    while process_state(pid) not in ("", "Z"):
        assert time.monotonic() < deadline, f"process {pid} survived"
        time.sleep(0.05)


# -- which scripts run ---------------------------------------------------------------------------


def test_scripts_follow_run_parts_rules(tmp_path: Path) -> None:
    ok = [add_hook(tmp_path, "build-success", n, "exit 0\n") for n in ("B-upper", "a-lower")]
    ok.append(add_hook(tmp_path, "build-success", "10-first", "exit 0\n"))
    ok.append(add_hook(tmp_path, "build-success", "50-hook.sh", "exit 0\n"))
    for skipped in (".hidden", "20-backup~", "30-x.dpkg-old", "31-x.dpkg-dist", "40-x.rpmnew",
                    "41-x.rpmsave"):
        add_hook(tmp_path, "build-success", skipped, "exit 0\n")
    add_hook(tmp_path, "build-success", "60-not-executable", "exit 0\n", mode=0o644)
    (tmp_path / "build-success.d" / "70-directory").mkdir(mode=0o755)
    link = tmp_path / "build-success.d" / "80-link"
    link.symlink_to(ok[0])
    (tmp_path / "build-success.d" / "90-dangling").symlink_to(tmp_path / "nowhere")
    found = hooks.scripts(str(tmp_path), "build-success")
    names = [os.path.basename(p) for p in found]
    assert names == ["10-first", "50-hook.sh", "80-link", "B-upper", "a-lower"]
    assert found[0] == str(tmp_path / "build-success.d" / "10-first")


def test_no_directory_runs_nothing(tmp_path: Path) -> None:
    assert hooks.scripts(str(tmp_path), "build-failure") == []
    assert hooks.scripts(str(tmp_path / "missing"), "build-failure") == []
    (tmp_path / "build-failure.d").write_text("a file, not a directory")
    assert hooks.scripts(str(tmp_path), "build-failure") == []


# -- how one script runs -------------------------------------------------------------------------


def test_the_event_arrives_on_stdin_and_output_is_kept(tmp_path: Path) -> None:
    script = add_hook(tmp_path, "e", "h", 'cat > "$OUT"; echo "one"; echo "two" >&2\n')
    payload = json.dumps({"event": "e", "build": {"uuid": "u"}, "text": "é\n"})
    done = run(script, payload, OUT=str(tmp_path / "stdin"))
    assert done.exit_status == 0 and done.ok
    assert (tmp_path / "stdin").read_text() == payload
    assert done.output.splitlines() == ["one", "two"]


def test_a_hook_that_does_not_read_its_input(tmp_path: Path) -> None:
    script = add_hook(tmp_path, "e", "h", "echo first; /bin/sleep 0.2; echo second\n")
    done = run(script, json.dumps({"big": "x" * 4_000_000}))
    assert done.exit_status == 0
    assert done.output.split() == ["first", "second"]


def test_non_zero_exit_and_crash(tmp_path: Path) -> None:
    fails = run(add_hook(tmp_path, "e", "fails", "echo no; exit 3\n"))
    assert fails.exit_status == 3 and not fails.ok and fails.output == "no\n"
    assert hooks.describe_exit(fails, 60) == "exited with status 3"
    crashes = run(add_hook(tmp_path, "e", "crashes", "kill -SEGV $$\n"))
    assert crashes.exit_status == -11
    assert hooks.describe_exit(crashes, 60) == "crashed (SIGSEGV)"


def test_binary_output_is_made_printable(tmp_path: Path) -> None:
    script = add_hook(tmp_path, "e", "h", r"printf 'a\000b\377c\033[31mred\r\n'" + "\n")
    done = run(script)
    assert done.exit_status == 0
    assert done.output == "a?b\ufffdc?[31mred?\n"
    assert all(c.isprintable() or c == "\n" for c in done.output)


def test_flooding_output_is_drained_and_capped(tmp_path: Path) -> None:
    script = add_hook(tmp_path, "e", "h", "/usr/bin/yes flood | /usr/bin/head -c 20000000\n")
    done = run(script)
    assert done.exit_status == 0
    assert len(done.output.encode()) == hooks.MAX_OUTPUT
    assert done.dropped == 20_000_000 - hooks.MAX_OUTPUT


def test_the_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    script = add_hook(
        tmp_path, "e", "h",
        '/bin/sleep 1000 & echo $! > "$DIR/child"\necho started\nexec /bin/sleep 1000\n',
    )
    done = run(script, timeout=1.0, DIR=str(tmp_path))
    assert done.exit_status is None and not done.ok
    assert done.output == "started\n"
    assert hooks.describe_exit(done, 1.0) == "killed after the 1s timeout"
    wait_gone(int((tmp_path / "child").read_text()))


def test_leftovers_holding_the_output_are_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks, "LINGER", 0.3)
    script = add_hook(
        tmp_path, "e", "h", '/bin/sleep 1000 & echo $! > "$DIR/child"\necho bye\nexit 0\n'
    )
    done = run(script, timeout=60, DIR=str(tmp_path))
    assert done.exit_status == 0, done
    assert done.output == "bye\n"
    wait_gone(int((tmp_path / "child").read_text()))


# -- delivering events ---------------------------------------------------------------------------


@pytest.fixture
def store(database: ScratchDatabase) -> Iterator[Datastore]:
    """A datastore on the engine under test."""
    with open_datastore(database.url) as opened:
        yield opened


class Deliveries:
    """A HookRunner over the test's datastore, with what it reported."""

    def __init__(self, hooks_dir: Path, **settings: Any) -> None:
        self.lines: list[str] = []
        self.settings = HookSettings(
            hooks_dir=str(hooks_dir),
            environment={"BUILDFARM_DB": "sqlite:///the/db", "BUILDFARM_STATE_DIR": "/the/state"},
            **settings,
        )

    @staticmethod
    async def db(fn: Any, *args: Any) -> Any:
        return fn(*args)

    def runner(self) -> HookRunner:
        return HookRunner(self.settings, self.db, self.lines.append, asyncio.Event())

    @staticmethod
    async def until_idle(runner: HookRunner, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            runner.wake.clear()
            await runner.dispatch()
            if await runner.idle():
                return
            assert time.monotonic() < deadline, "deliveries did not end"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(runner.wake.wait(), 1.0)

    def deliver_all(self) -> HookRunner:
        async def go() -> HookRunner:
            runner = self.runner()
            await self.until_idle(runner)
            return runner

        return asyncio.run(go())


def a_build(path: Path = HELLO) -> Build:
    (submitted,) = submit([str(path)], SubmitOptions(priority=3, tags=(("job", "j1"),)))
    build: Build = Build.get(Build.uuid == submitted.uuid)
    return build


def pending_ids() -> list[int]:
    return [e.id for e in event_rows.pending(10_000)]


def test_every_script_runs_in_order_with_env_and_event(store: Datastore, tmp_path: Path) -> None:
    hooks_dir = tmp_path / "hooks"
    out = tmp_path / "out"
    out.mkdir()
    for name in ("20-second", "10-first"):
        add_hook(
            hooks_dir, "build-success", name,
            f'echo {name} >> "{out}/order"\nenv > "{out}/{name}.env"\ncat > "{out}/{name}.json"\n'
            f"echo hello from {name}\n",
        )
    build = a_build()
    event = event_rows.record(
        "build-success", build, machine="m1", attempt=7, log="/l.gz", outputs={"/p": "sha256:x"}
    )
    deliveries = Deliveries(hooks_dir)
    runner = deliveries.deliver_all()
    assert (out / "order").read_text().split() == ["10-first", "20-second"]
    env_lines = (out / "10-first.env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in env_lines if "=" in line)
    assert env["BUILDFARM_EVENT"] == "build-success"
    assert env["BUILDFARM_EVENT_ID"] == str(event.id)
    assert env["BUILDFARM_BUILD_UUID"] == build.uuid
    assert env["BUILDFARM_DERIVATION"] == build.derivation.path
    assert env["BUILDFARM_DB"] == "sqlite:///the/db"
    assert env["BUILDFARM_STATE_DIR"] == "/the/state"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    payload = json.loads((out / "20-second.json").read_text())
    assert payload == json.loads(Event.get_by_id(event.id).payload)
    assert payload["build"]["uuid"] == build.uuid and payload["machine"] == "m1"
    assert payload["build"]["tags"] == {"job": "j1"} and payload["build"]["priority"] == 3
    assert "hook build-success/10-first: hello from 10-first" in deliveries.lines
    assert "hook build-success/20-second: hello from 20-second" in deliveries.lines
    assert runner.runs == 2 and runner.failures == 0
    assert not any(line.startswith("trace: ") for line in deliveries.lines)  # not asked for
    assert event.id not in pending_ids()


def test_failing_hooks_are_reported_and_do_not_stop_the_others(
    store: Datastore, tmp_path: Path
) -> None:
    hooks_dir = tmp_path / "hooks"
    add_hook(hooks_dir, "build-failure", "10-exits", "echo failing; exit 4\n")
    add_hook(hooks_dir, "build-failure", "20-crashes", "kill -KILL $$\n")
    add_hook(hooks_dir, "build-failure", "30-cannot-run", b"\x7fELF\x00garbage")
    add_hook(hooks_dir, "build-failure", "40-hangs", "exec /bin/sleep 1000\n")
    add_hook(hooks_dir, "build-failure", "50-binary", r"printf '\033[2J\000x\n'" + "\n")
    add_hook(hooks_dir, "build-failure", "60-fine", f'echo ran > "{tmp_path}/fine"\n')
    event = event_rows.record("build-failure", a_build(), result={"reason": "r"})
    deliveries = Deliveries(hooks_dir, timeout=1.0, trace=True)
    runner = deliveries.deliver_all()
    lines = deliveries.lines
    assert "hook build-failure/10-exits: failing" in lines
    assert "hook build-failure/10-exits: exited with status 4" in lines
    assert "hook build-failure/20-crashes: crashed (SIGKILL)" in lines
    assert any(line.startswith("hook build-failure/30-cannot-run: cannot run: ") for line in lines)
    assert "hook build-failure/40-hangs: killed after the 1s timeout" in lines
    assert "hook build-failure/50-binary: ?[2J?x" in lines
    assert (tmp_path / "fine").read_text() == "ran\n"
    assert runner.runs == 6 and runner.failures == 4
    assert event.id not in pending_ids()  # every script ran: delivered, never again
    traces = [line for line in lines if line.startswith("trace: ")]
    assert len(traces) == 6
    assert traces[0].startswith(
        f"trace: event=build-failure script={hooks_dir}/build-failure.d/10-exits exit=4 time="
    )
    assert " exit=none time=" in traces[2] and " exit=none time=" in traces[3]


def test_events_of_one_build_in_order_others_beside(store: Datastore, tmp_path: Path) -> None:
    """A blocked hook holds back the later events of its build, not those of other builds."""
    hooks_dir = tmp_path / "hooks"
    log = tmp_path / "log"
    release = tmp_path / "release"
    slow, fast = a_build(HELLO), a_build(DEP)
    add_hook(
        hooks_dir, "build-started", "h",
        f'echo "start $BUILDFARM_BUILD_UUID" >> {log}\n'
        f'if [ "$BUILDFARM_BUILD_UUID" = "{slow.uuid}" ]; then\n'
        f"    while [ ! -e {release} ]; do /bin/sleep 0.05; done\n"
        "fi\n"
        f'echo "started-done $BUILDFARM_BUILD_UUID" >> {log}\n',
    )
    add_hook(hooks_dir, "build-success", "h", f'echo "success $BUILDFARM_BUILD_UUID" >> {log}\n')
    event_rows.record("build-started", slow, machine="m", attempt=1)
    event_rows.record("build-success", slow, machine="m", attempt=1, log=None, outputs={})
    event_rows.record("build-started", fast, machine="m", attempt=2)
    event_rows.record("build-success", fast, machine="m", attempt=2, log=None, outputs={})

    async def go() -> list[str]:
        runner = Deliveries(hooks_dir).runner()
        deadline = time.monotonic() + 60
        seen: list[str] = []
        while f"success {fast.uuid}" not in seen:
            assert time.monotonic() < deadline, seen
            await runner.dispatch()
            await asyncio.sleep(0.05)
            seen = log.read_text().splitlines() if log.exists() else []
        release.touch()
        await Deliveries.until_idle(runner)
        return seen

    before = asyncio.run(go())
    assert f"start {slow.uuid}" in before
    assert f"started-done {slow.uuid}" not in before and f"success {slow.uuid}" not in before
    after = log.read_text().splitlines()
    assert after.index(f"started-done {slow.uuid}") < after.index(f"success {slow.uuid}")
    assert not pending_ids()


def test_the_pool_and_per_event_limits_hold(store: Datastore, tmp_path: Path) -> None:
    """--hook-workers scripts at once at most, --hook-parallelism of one event name; both
    reached (the pool runs them in parallel). Each script runs until the test releases it, so
    which run together is decided by the runner, not by how long each takes."""
    hooks_dir = tmp_path / "hooks"
    running, release = tmp_path / "running", tmp_path / "release"
    release.mkdir()
    for event in ("build-started", "build-success"):
        (running / event).mkdir(parents=True)
        add_hook(
            hooks_dir, event, "h",
            f'touch "{running}/{event}/$$"\n'
            f'echo "$(ls "{running}"/*/ | grep -c "^[0-9]") $(ls "{running}/{event}" | wc -l)"'
            f' >> "{tmp_path}/{event}.counts"\n'
            f'while [ ! -e "{release}/$$" ] && [ ! -e "{release}/all" ]; do /bin/sleep 0.05; done\n'
            f'rm "{running}/{event}/$$"\n',
        )
    for _ in range(6):
        build = a_build()
        event_rows.record("build-started", build, machine="m", attempt=1)
        event_rows.record("build-success", build, machine="m", attempt=1, log=None, outputs={})

    def now_running(event: str = "*") -> list[str]:
        return [p.name for p in running.glob(f"{event}/*")]

    async def go() -> HookRunner:
        runner = Deliveries(hooks_dir, workers=3, per_event=2).runner()

        async def until(what: str, check: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 60  # against hanging only
            while not check():
                assert time.monotonic() < deadline, f"never: {what}"
                await runner.dispatch()
                await asyncio.sleep(0.05)

        # Two build-started scripts, the limit of one event; the successes wait for them.
        await until("two build-started scripts", lambda: len(now_running("build-started")) == 2)
        for pid in now_running("build-started"):
            (release / pid).touch()
        # Now two more build-started and those two builds' successes may run: the pool takes
        # three of the four.
        await until("three scripts held", lambda: len(
            [pid for pid in now_running() if not (release / pid).exists()]) == 3)
        (release / "all").touch()
        await Deliveries.until_idle(runner)
        return runner

    runner = asyncio.run(go())
    assert runner.runs == 12 and runner.failures == 0
    counts = [
        tuple(int(n) for n in line.split())
        for event in ("build-started", "build-success")
        for line in (tmp_path / f"{event}.counts").read_text().splitlines()
    ]
    assert len(counts) == 12
    assert max(everyone for everyone, _ in counts) == 3
    assert max(same for _, same in counts) == 2
    assert not pending_ids()


def test_an_interrupted_delivery_is_delivered_again(store: Datastore, tmp_path: Path) -> None:
    """At least once: a delivery stopped midway leaves the event pending for the next runner."""
    hooks_dir = tmp_path / "hooks"
    runs = tmp_path / "runs"
    add_hook(
        hooks_dir, "build-success", "h",
        f'echo $$ >> {runs}\n[ -e {tmp_path}/second ] || exec /bin/sleep 1000\n',
    )
    event = event_rows.record("build-success", a_build(), machine=None, attempt=None, log=None,
                              outputs={})
    deliveries = Deliveries(hooks_dir)

    async def interrupted() -> None:
        runner = deliveries.runner()
        await runner.dispatch()
        deadline = time.monotonic() + 30
        while not runs.exists():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await runner.drain(time.monotonic())

    asyncio.run(interrupted())
    assert pending_ids() == [event.id]
    wait_gone(int(runs.read_text()))
    (tmp_path / "second").touch()
    deliveries.deliver_all()
    assert len(runs.read_text().split()) == 2
    assert not pending_ids()


def test_events_no_script_fires_on_are_delivered_in_bulk(store: Datastore, tmp_path: Path) -> None:
    build = a_build()
    with store.atomic():
        for _ in range(1200):
            event_rows.record("build-started", build, machine="m", attempt=1)
    add_hook(tmp_path, "build-submitted", "h", f"echo x >> {tmp_path}/submitted\n")
    deliveries = Deliveries(tmp_path)
    deliveries.deliver_all()
    assert not pending_ids()
    assert (tmp_path / "submitted").read_text() == "x\n"  # the one build-submitted event


# -- what each event carries ---------------------------------------------------------------------


def check_payloads() -> set[str]:
    """Every recorded event has exactly the keys EVENTS declares; returns the names seen."""
    declared = {e.name: e for e in hooks.EVENTS}
    seen = set()
    for event in Event.select():
        payload = json.loads(event.payload)
        expected = {"event", "build", *declared[event.name].fields}
        assert set(payload) == expected, (event.name, payload)
        assert set(payload["build"]) == set(hooks.BUILD_FIELDS), payload
        assert payload["event"] == event.name
        seen.add(event.name)
    return seen


def test_recorded_events_match_the_declared_list(store: Datastore) -> None:
    slot = scheduler.Slot("m1", ("x86_64-linux",), frozenset())
    # build-submitted, build-started, build-success
    (dep,) = submit([str(DEP)], SubmitOptions())
    started = scheduler.allocate(slot)
    assert started is not None and started.build.uuid == dep.uuid
    records.succeed(started.id, [], "/logs/dep.log.gz")
    # build-missing-inputs
    (top,) = submit([str(TOP)], SubmitOptions())
    attempt = scheduler.allocate(slot)
    assert attempt is not None and attempt.build.uuid == top.uuid
    # Every missing input has a build: nothing to announce, the build waits for them.
    records.setup_failure(attempt.id, MISSING_INPUTS, [DEP_OUT], "missing", 0.0)
    assert not Event.select().where(Event.name == "build-missing-inputs").exists()
    Build.update(retry_after=None).execute()
    attempt = scheduler.allocate(slot)
    assert attempt is not None and attempt.build.uuid == top.uuid
    unknown = "/nix/store/" + "4" * 32 + "-made-by-no-known-derivation"
    records.setup_failure(attempt.id, MISSING_INPUTS, [DEP_OUT, unknown], "missing", 0.0)
    missing = Event.select().where(Event.name == "build-missing-inputs").get()
    assert json.loads(missing.payload)["missing_inputs"] == [
        {"path": DEP_OUT, "derivation": DEP_PATH}, {"path": unknown, "derivation": None},
    ]
    # Not tried again before the hooks heard of it.
    Build.update(retry_after=None).execute()
    assert scheduler.allocate(slot) is None
    event_rows.mark_delivered(missing.id)
    # build-failure, of the builder and of a queued dependant
    (dep2,) = submit([str(DEP)], SubmitOptions())
    attempt = scheduler.allocate(slot)
    assert attempt is not None and attempt.build.uuid == dep2.uuid
    dependants = records.fail(attempt.id, 1, "builder failed with exit code 1", "/logs/x.gz")
    assert dependants == [top.uuid]
    reason = f"dependency-failed: {DEP_PATH} (build {dep2.uuid})"
    assert builds.show_build(top.uuid)["reason"] == reason
    # build-canceled
    (hello,) = submit([str(HELLO)], SubmitOptions())
    builds.cancel_builds([hello.uuid])
    assert check_payloads() == set(hooks.EVENT_NAMES)


def test_a_running_build_whose_input_failed_meanwhile_ends_dependency_failed(
    store: Datastore,
) -> None:
    """No endless resubmission: the build ends failed, naming the failed input's build (its
    other missing inputs are still announced, so that the hook submits them)."""
    slot = scheduler.Slot("m1", ("x86_64-linux",), frozenset())
    (top,) = submit([str(TOP)], SubmitOptions())  # no build of its input: it may start
    top_attempt = scheduler.allocate(slot)
    assert top_attempt is not None and top_attempt.build.uuid == top.uuid
    (dep,) = submit([str(DEP)], SubmitOptions())
    dep_attempt = scheduler.allocate(slot)
    assert dep_attempt is not None and dep_attempt.build.uuid == dep.uuid
    assert records.fail(dep_attempt.id, 1, "failed", None) == []  # top runs: not touched yet
    unknown = "/nix/store/" + "4" * 32 + "-made-by-no-known-derivation"
    ended = records.setup_failure(top_attempt.id, MISSING_INPUTS, [DEP_OUT, unknown], "missing",
                                  0.0)
    assert ended == [top.uuid]
    info = builds.show_build(top.uuid)
    assert info["state"] == "failed"
    assert info["reason"] == f"dependency-failed: {DEP_PATH} (build {dep.uuid})"
    assert info["cause"] == {"build": dep.uuid, "derivation": DEP_PATH}
    names = [e.name for e in Event.select().order_by(Event.id)]
    assert names[-2:] == ["build-failure", "build-missing-inputs"]
    check_payloads()


def test_an_input_that_failed_before_the_build_was_submitted_is_remembered(
    store: Datastore,
) -> None:
    """A build whose input's latest build failed ends dependency-failed when it is submitted,
    without an attempt; `builds retry --dependants` retries both on purpose."""
    slot = scheduler.Slot("m1", ("x86_64-linux",), frozenset())
    (dep,) = submit([str(DEP)], SubmitOptions())
    dep_attempt = scheduler.allocate(slot)
    assert dep_attempt is not None and dep_attempt.build.uuid == dep.uuid
    records.fail(dep_attempt.id, 1, "failed", None)
    (top,) = submit([str(TOP)], SubmitOptions())
    reason = f"dependency-failed: {DEP_PATH} (build {dep.uuid})"
    assert (top.state, top.reason) == ("failed", reason)
    assert scheduler.allocate(slot) is None
    assert [e.name for e in Event.select().order_by(Event.id)][-2:] == [
        "build-submitted", "build-failure"]
    check_payloads()

    retried, refused = builds.retry_builds([top.uuid])
    assert retried == [] and refused == [
        f"build {top.uuid} is dependency-failed: retry what it waits for, build {dep.uuid} "
        f"({DEP_PATH}), with --dependants"]
    retried, refused = builds.retry_builds([dep.uuid], dependants=True)
    assert (retried, refused) == ([dep.uuid, top.uuid], [])
    again = scheduler.allocate(slot)
    assert again is not None and again.build.uuid == dep.uuid  # the top waits for it
    assert scheduler.allocate(slot) is None
    records.succeed(again.id, [], None)
    last = scheduler.allocate(slot)
    assert last is not None and last.build.uuid == top.uuid
    assert [a["result"] for a in builds.show_build(dep.uuid)["attempts"]] == ["failure", "success"]


# -- the shipped hooks ---------------------------------------------------------------------------


def shipped_payload(name: str, **fields: Any) -> str:
    build = {"uuid": "u-1", "derivation": "/nix/store/x-a.drv", "system": "x86_64-linux",
             "state": "failed", "priority": 2, "tags": {"k": "v"}, "outputs": {}}
    return json.dumps({"event": name, "build": build, **fields})


def test_shipped_log_hooks() -> None:
    env = {"BUILDFARM_BUILD_UUID": "u-1", "BUILDFARM_DERIVATION": "/nix/store/x-a.drv"}
    failure = run(
        SHIPPED / "build-failure.d" / "50-log",
        shipped_payload("build-failure", result={"exit_status": 1, "reason": "it broke"}),
        **env,
    )
    assert failure.exit_status == 0
    assert failure.output == "build u-1 failed: /nix/store/x-a.drv: it broke\n"
    success = run(SHIPPED / "build-success.d" / "50-log", shipped_payload("build-success"), **env)
    assert success.output == "build u-1 succeeded: /nix/store/x-a.drv\n"


def test_shipped_missing_inputs_hook_without_known_derivations() -> None:
    done = run(
        SHIPPED / "build-missing-inputs.d" / "50-submit-missing-inputs",
        shipped_payload("build-missing-inputs",
                        missing_inputs=[{"path": "/nix/store/y-src", "derivation": None}]),
    )
    assert done.exit_status == 0
    assert done.output == "no known derivation produces /nix/store/y-src: build it by hand\n"


def test_shipped_hooks_are_small_and_described() -> None:
    shipped = manpages.shipped_hooks(SHIPPED)
    assert {(h.event, h.name) for h in shipped} == {
        ("build-missing-inputs", "50-submit-missing-inputs"),
        ("build-success", "50-log"),
        ("build-failure", "50-log"),
    }
    for hook in shipped:
        assert len(hook.description) > 40
        assert len((SHIPPED / f"{hook.event}.d" / hook.name).read_text().splitlines()) <= 40


# -- buildfarm hooks list ------------------------------------------------------------------------


def test_hooks_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_hook(tmp_path, "build-success", "20-b", "exit 0\n")
    add_hook(tmp_path, "build-success", "10-a", "exit 0\n")
    add_hook(tmp_path, "build-success", "30-off", "exit 0\n", mode=0o644)
    add_hook(tmp_path, "build-failure", "x~", "exit 0\n")
    add_hook(tmp_path, "build-submitted", "notify", "exit 0\n")
    monkeypatch.setenv("BUILDFARM_HOOKS_DIR", str(tmp_path))
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(tmp_path / "state"))
    result = CliRunner().invoke(cli, ["hooks", "list", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert listed["hooks_dir"] == str(tmp_path)
    assert [e["event"] for e in listed["events"]] == list(hooks.EVENT_NAMES)
    scripts = {e["event"]: e["scripts"] for e in listed["events"]}
    assert scripts["build-success"] == [
        str(tmp_path / "build-success.d" / n) for n in ("10-a", "20-b")
    ]
    assert scripts["build-failure"] == [] and scripts["build-canceled"] == []
    assert scripts["build-submitted"] == [str(tmp_path / "build-submitted.d" / "notify")]
    table = CliRunner().invoke(
        cli, ["--hooks-dir", str(SHIPPED), "hooks", "list"], catch_exceptions=False
    )
    assert table.exit_code == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in table.stdout.splitlines()[2:]}
    assert table.stdout.splitlines()[0] == f"hooks directory: {SHIPPED}"
    assert rows["build-missing-inputs"][1] == "50-submit-missing-inputs"
    assert rows["build-success"][1] == "50-log"
    assert rows["build-started"][1] == "-"
    assert rows["build-started"][2] == hooks.EVENTS[1].when


# -- the man page --------------------------------------------------------------------------------


def test_the_man_page_is_generated_from_the_code() -> None:
    """Fails when hooks.EVENTS (or the rest of the declared lists) and the page drift apart:
    regenerate with `python -m buildfarm.docs.manpages`."""
    current = manpages.HOOKS_PAGE.read_text()
    assert current == manpages.hooks_page(manpages.shipped_hooks(SHIPPED)), (
        "man/buildfarm-hooks.7 is out of date: run `python -m buildfarm.docs.manpages`"
    )
    assert current.startswith('.\\" Generated by')
    assert manpages.main(["--check"]) == 0


def test_the_drift_check_notices_a_new_event(monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = manpages.shipped_hooks(SHIPPED)
    before = manpages.hooks_page(shipped)
    monkeypatch.setattr(
        hooks, "EVENTS", (*hooks.EVENTS, hooks.HookEvent("build-x", "never", ("machine",)))
    )
    assert manpages.hooks_page(shipped) != before
    assert manpages.main(["--check"]) == 1


def test_the_man_page_documents_everything_declared() -> None:
    rendered = subprocess.run(
        ["groff", "-man", "-Tascii", "-P-cbou", "-rLL=300n", str(manpages.HOOKS_PAGE)],
        capture_output=True, text=True, check=True,
    ).stdout
    text = " ".join(rendered.split())
    for word in (*hooks.EVENT_NAMES, *hooks.ENVIRONMENT, *hooks.PAYLOAD_FIELDS, "run-parts",
                 "BUILDFARM_TRACE_HOOKS=1", "--hook-timeout", "at least once", "50-log",
                 "50-submit-missing-inputs", "dependency-failed"):
        assert word in text, word


def test_the_man_page_is_clean_roff() -> None:
    done = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(manpages.HOOKS_PAGE)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_documented_defaults_are_the_run_defaults() -> None:
    from buildfarm.coordinator.options import RunOptions

    options = {p.name: p.default for p in cli.commands["run"].params}  # type: ignore[union-attr]
    defaults = manpages.DEFAULTS
    assert options["hook_timeout"] == RunOptions().hook_timeout == defaults.timeout
    assert options["hook_workers"] == RunOptions().hook_workers == defaults.workers
    assert options["hook_parallelism"] == RunOptions().hook_parallelism == defaults.per_event


def test_the_coordinator_passes_the_declared_environment(tmp_path: Path) -> None:
    from buildfarm.config import Settings
    from buildfarm.coordinator.live import LineReporter
    from buildfarm.coordinator.options import RunOptions
    from buildfarm.coordinator.service import Coordinator
    from buildfarm.inventory import Inventory

    settings = Settings.resolve(state_dir=str(tmp_path), hooks_dir=str(tmp_path / "h"))
    coordinator = Coordinator(settings, Inventory("x", ()), RunOptions(), LineReporter())
    given = coordinator.hooks.settings.environment
    env = hooks.hook_environment(coordinator.hooks.settings, 1, {"event": "e", "build": {}})
    added = {k for k in env if k.startswith("BUILDFARM_")} - set(os.environ)
    assert added == set(hooks.ENVIRONMENT)
    assert given["BUILDFARM_DB"] == settings.db_url
    assert given["BUILDFARM_STATE_DIR"] == settings.state_dir


def test_hooks_get_no_secret_of_the_coordinator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the datastore's password, not the coordinator's whole environment: only what
    buildfarm-hooks(7) lists, and what `run --hook-env` names."""
    from buildfarm.config import Settings
    from buildfarm.coordinator.live import LineReporter
    from buildfarm.coordinator.options import RunOptions
    from buildfarm.coordinator.service import Coordinator
    from buildfarm.inventory import Inventory

    monkeypatch.setenv("CLOUD_TOKEN", "tok-TopSecret9")
    monkeypatch.setenv("PGPASSWORD", "pg-TopSecret9")
    monkeypatch.setenv("LC_TIME", "C")
    url = "postgresql://farm:TopSecret9@db.example.org/buildfarm?password=TopSecret9&x=1"
    settings = Settings.resolve(state_dir=str(tmp_path), db_url=url)
    for asked, passed in (((), set()), (("PGPASSWORD",), {"PGPASSWORD"})):
        coordinator = Coordinator(settings, Inventory("x", ()), RunOptions(hook_env=asked),
                                  LineReporter())
        env = hooks.hook_environment(coordinator.hooks.settings, 1, {"event": "e", "build": {}})
        assert env["BUILDFARM_DB"] == "postgresql://farm@db.example.org/buildfarm?x=1"
        assert not any("TopSecret9" in value for key, value in env.items() if key not in passed)
        assert {"PATH", "HOME", "LC_TIME"} <= set(env)
        assert set(env) <= {*hooks.ENVIRONMENT, *hooks.PASSED_ON, "PATH", "LC_TIME", *passed}
