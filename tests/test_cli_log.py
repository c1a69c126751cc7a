"""`buildfarm log` and what the command line shows of text others wrote: logs and messages are
shown without escape sequences; a build without a log says why; `--follow` waits for a build
that has not started; a reader that stops reading ends a command quietly.

The builds' attempts are made through the datastore's own API (as test_web.py does), on every
engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from engines import ScratchDatabase
from test_cli import GREP, HELLO, TOP, fails, ok, run
from test_web import make_drv, submit

from buildfarm.datastore import open_datastore
from buildfarm.logs import LogWriter

# What builders print: colours, a terminal title, a hyperlink, a bell, a carriage return.
COLOURED = (b"\x1b[1;31merror:\x1b[0m it broke \x1b]0;title\x07here\n"
            b"\x1b]8;;http://example.org\x1b\\link\x1b]8;;\x1b\\ \x07done\r\n\ttabbed\n")
PLAIN = "error: it broke here\nlink done\n\ttabbed\n"


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: ScratchDatabase) -> Path:
    for var in ("BUILDFARM_INVENTORY", "BUILDFARM_HOOKS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BUILDFARM_DB", database.url)
    return tmp_path / "state"


def start(database: ScratchDatabase, step: str, log: Path | None = None) -> int:
    """Allocate the next queued build to machine m1 and start `step` (with its log); the
    attempt's id."""
    from buildfarm.coordinator import scheduler
    from buildfarm.datastore import attempts as records

    with open_datastore(database.url):
        attempt = scheduler.allocate(scheduler.Slot("m1", ("x86_64-linux",), frozenset()))
        assert attempt is not None
        records.step(attempt.id, step, log_path=str(log) if log else None)
        return int(attempt.id)


def end(database: ScratchDatabase, attempt_id: int, how: str, *args: object) -> None:
    from buildfarm.datastore import attempts as records

    with open_datastore(database.url):
        getattr(records, how)(attempt_id, *args)


def test_log_and_show_print_plain_text(state: Path, database: ScratchDatabase) -> None:
    (build,) = ok("submit", str(HELLO)).split()
    log = state / "logs" / "hello.log.gz"
    attempt = start(database, "build", log)
    writer = LogWriter(str(log))
    writer.write(COLOURED)
    writer.close()
    end(database, attempt, "fail", 1, "builder failed \x1b[31mred\x1b[0m", str(log))
    assert ok("log", build) == PLAIN
    shown = ok("builds", "show", build)
    assert "\x1b" not in shown and "builder failed red" in shown
    # The stored log and the JSON keep what the builder wrote.
    import gzip

    assert gzip.decompress(log.read_bytes()) == COLOURED
    assert "\x1b[31m" in json.loads(ok("builds", "show", build, "--json"))["reason"]


def test_a_build_without_a_log_says_why(state: Path, database: ScratchDatabase) -> None:
    with open_datastore(database.url):
        lib = make_drv("lib-1")
        app = make_drv("app-1", (lib.path,))
        (lib_build,) = submit(lib)
        (app_build,) = submit(app)
    (queued,) = ok("submit", str(GREP)).split()
    (canceled,) = ok("submit", str(TOP)).split()
    ok("builds", "cancel", canceled)
    assert fails("log", queued) == f"Error: build {queued} has no log yet: it is queued"
    assert fails("log", canceled) == (
        f"Error: build {canceled} has no log: it was canceled before it ran")
    attempt = start(database, "push-inputs")  # lib, the one ready
    assert fails("log", lib_build) == (
        f"Error: build {lib_build} has no log yet: its attempt is at step push-inputs (the log "
        "begins with the build step)")
    end(database, attempt, "fail", 2, "builder failed", None)
    assert fails("log", app_build) == (
        f"Error: build {app_build} has no log: it failed without running its builder: "
        f"dependency-failed: {lib.path} (build {lib_build})")


def test_follow_waits_for_a_queued_build_to_start(
    state: Path, database: ScratchDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`log --follow` on a queued build: it looks, finds no log, waits; the build starts and
    writes its log in two parts; all of it is printed, and the command ends with the build."""
    from buildfarm.datastore import builds

    (build,) = ok("submit", str(HELLO)).split()
    looked = threading.Event()
    real = builds.log_state

    def observed(uuid: str) -> builds.LogState:
        found = real(uuid)
        if found.path is None:
            looked.set()
        return found

    monkeypatch.setattr(builds, "log_state", observed)
    log = state / "logs" / "follow.log.gz"
    failures: list[BaseException] = []

    def the_build() -> None:
        try:
            assert looked.wait(60), "log --follow never looked for the log"
            attempt = start(database, "build", log)
            writer = LogWriter(str(log))
            writer.write(b"first part \x1b[32mgreen\x1b[0m\n")
            writer.flush()
            writer.write(b"second part\n")
            writer.close()
            end(database, attempt, "succeed", [], str(log))
        except BaseException as e:  # reported by the test
            failures.append(e)

    worker = threading.Thread(target=the_build)
    worker.start()
    try:
        result = run("log", "--follow", build)
    finally:
        worker.join(120)
    assert not failures, failures
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout == "first part green\nsecond part\n"


def test_a_reader_that_stops_reading_ends_the_command_quietly(
    state: Path, database: ScratchDatabase
) -> None:
    with open_datastore(database.url):
        for start_at in range(0, 3000, 1000):
            submit(*(make_drv(f"many-{n}") for n in range(start_at, start_at + 1000)))
    (one,) = ok("submit", str(HELLO)).split()
    # A reader that reads the first line of a long listing, then goes away (`| head -1`).
    with subprocess.Popen(
        [sys.executable, "-m", "buildfarm", "builds", "list", "--limit", "3000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline().startswith(b"UUID\tSTATE")
        process.stdout.close()
        errors = process.stderr.read().decode()
        assert process.wait(60) == 141 and errors == ""
    # One gone before anything is written: the short output fails at the last flush.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run([sys.executable, "-m", "buildfarm", "builds", "show", one],
                              stdout=writer, stderr=subprocess.PIPE, timeout=60, check=False)
    finally:
        os.close(writer)
    assert done.returncode == 141 and done.stderr == b""
