"""Output for scripts and people: every --json output has exactly the shape its man page
documents (json_schemas.SCHEMAS); colour only on a terminal, never with NO_COLOR; no live view
and no terminal codes when the output is not a terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from engines import ScratchDatabase

from buildfarm.cli import cli
from buildfarm.coordinator import scheduler
from buildfarm.datastore import attempts as records
from buildfarm.datastore import open_datastore
from buildfarm.docs.command_pages import has_json, walk
from buildfarm.docs.json_schemas import SCHEMAS, Shape, obj, string, validate
from buildfarm.docs.json_schemas import F as Field
from buildfarm.docs.json_schemas import list_of as list_shape
from buildfarm.inventory import local_system

DATA = Path(__file__).parent / "data"
HELLO = DATA / "nix" / "76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
TOP = DATA / "nix" / "mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv"
SGR = re.compile(r"\x1b\[([0-9;]*)m")
TESTED_ELSEWHERE = {
    "machines", "machines test",  # tests/test_machines.py, on the test bed
    "builds cancel", "builds priority",  # tests/test_bulk_select.py
    "queue",  # tests/test_waiting.py
}


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: ScratchDatabase) -> Path:
    for var in ("BUILDFARM_INVENTORY", "BUILDFARM_HOOKS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BUILDFARM_HOOKS_DIR", str(tmp_path / "hooks"))
    monkeypatch.setenv("BUILDFARM_DB", database.url)
    return tmp_path / "state"


def json_of(*args: str) -> Any:
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def conforms(command: str, value: Any) -> None:
    assert validate(value, SCHEMAS[command].shape) == [], command


def colours(text: str) -> list[str]:
    """The colour parameters of the SGR sequences in `text` (bold and dim are not colours)."""
    found = []
    for match in SGR.finditer(text):
        numbers = [int(p) for p in match[1].split(";") if p]
        for index, number in enumerate(numbers):
            if index and numbers[index - 1] in (38, 48):
                continue
            if 30 <= number <= 49 or 90 <= number <= 107:
                found.append(match[0])
    return found


def with_attempts(url: str) -> None:
    """Give the queued builds a setup failure (with missing inputs) and then a failure, so that
    builds show has attempts, steps and missing inputs to print."""
    store = open_datastore(url)
    try:
        slot = scheduler.Slot("m1", (local_system(), "x86_64-linux"), frozenset())
        first = scheduler.allocate(slot)
        assert first is not None
        records.step(first.id, "push-derivations")
        records.setup_failure(first.id, "missing-inputs", ["/nix/store/" + "a" * 32 + "-x"],
                              "1 input derivation(s) would be built first", 0.0)
        second = scheduler.allocate(slot, now=time.time() + 1)
        assert second is not None
        records.step(second.id, "build")
        records.fail(second.id, 1, "builder failed with exit code 1", None)
    finally:
        store.close()


# --- --json ---------------------------------------------------------------------------------


def test_every_json_command_has_a_declared_shape_and_back() -> None:
    root = click.Context(cli, info_name="buildfarm")
    with_json = {" ".join(path) for path, command, _ in walk(cli, root) if has_json(command)}
    assert with_json == set(SCHEMAS)


def test_every_list_and_show_command_takes_json() -> None:
    root = click.Context(cli, info_name="buildfarm")
    for path, command, _ in walk(cli, root):
        if path and path[-1] in ("list", "show", "status", "machines"):
            assert has_json(command), " ".join(path)


def test_json_outputs_have_their_documented_shape(state: Path, database: ScratchDatabase) -> None:
    tested = set()
    submitted = json_of("submit", str(HELLO), str(TOP), "--tag", "job=nightly")
    conforms("submit", submitted)
    tested.add("submit")
    with_attempts(database.url)
    listed = json_of("builds", "list")
    conforms("builds list", listed)
    tested.add("builds list")
    shown = [json_of("builds", "show", row["uuid"]) for row in listed]
    for info in shown:
        conforms("builds show", info)
    tested.add("builds show")
    attempts = [a for info in shown for a in info["attempts"]]  # the shape was exercised
    assert {a["result"] for a in attempts} == {"setup-failure", "failure"}
    assert any(a["missing_inputs"] and a["steps"] for a in attempts)
    assert any(info["inputs"] for info in shown)
    conforms("hooks list", json_of("hooks", "list"))
    tested.add("hooks list")
    conforms("db status", json_of("db", "status"))
    tested.add("db status")
    CliRunner().invoke(cli, ["key", "generate"], catch_exceptions=False)
    key = json_of("key", "show")
    conforms("key show", key)
    plain = CliRunner().invoke(cli, ["key", "show", "--format", "nix"]).stdout
    assert key["nix"] == plain.strip() and key["nix"].startswith(key["name"] + ":")
    tested.add("key show")
    conforms("outputs gc", json_of("outputs", "gc", "--dry-run", "--older-than", "1d"))
    tested.add("outputs gc")
    assert tested | TESTED_ELSEWHERE == set(SCHEMAS)


def test_the_checker_notices_a_drifting_shape() -> None:
    shape: Shape = list_shape(obj(Field("a", string(), "A."), Field("b", string(True), "B.")))
    assert validate([{"a": "x", "b": None}], shape) == []
    assert validate([{"a": "x"}], shape) == ["$[0]: missing key 'b'"]
    assert validate([{"a": "x", "b": "y", "c": 1}], shape) == ["$[0]: undeclared key 'c'"]
    assert validate([{"a": None, "b": 1}], shape) == [
        "$[0].a: null, expected string", "$[0].b: int, expected string or null"]
    assert validate({"a": "x"}, shape) == ["$: dict, expected list of objects"]


# --- colour, terminals and NO_COLOR ---------------------------------------------------------


def on_terminal(argv: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as stdin, stdout and stderr; its exit status and
    everything it wrote."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(argv, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    screen = b""
    deadline = time.monotonic() + timeout
    while process.poll() is None or select.select([leader], [], [], 0)[0]:
        assert time.monotonic() < deadline, screen.decode(errors="replace")
        if select.select([leader], [], [], 0.1)[0]:
            try:
                screen += os.read(leader, 65536)
            except OSError:
                break
    os.close(leader)
    return process.wait(), screen.decode(errors="replace")


@pytest.fixture
def local_farm(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a farm whose one machine is this host (transport: local), with Nix
    as its store tool: probing it needs no network."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "machines:\n  - name: here\n    transport: local\n    store: nix\n"
        "  - name: off\n    transport: local\n    enabled: false\n"
    )
    env = {key: value for key, value in os.environ.items()
           if key not in ("NO_COLOR", "BUILDFARM_DB")}
    env.update(BUILDFARM_STATE_DIR=str(tmp_path / "state"), BUILDFARM_INVENTORY=str(inventory),
               BUILDFARM_HOOKS_DIR=str(tmp_path / "hooks"), TERM="xterm-256color",
               COLUMNS="160", LINES="40")
    yield env


BUILDFARM = [sys.executable, "-m", "buildfarm"]


def test_tables_are_coloured_on_a_terminal_unless_no_color(local_farm: dict[str, str]) -> None:
    status, screen = on_terminal([*BUILDFARM, "machines"], local_farm)
    assert status == 0, screen
    assert "here" in screen and "up" in screen
    assert colours(screen), screen  # "up" in green
    status, plain = on_terminal([*BUILDFARM, "machines"], {**local_farm, "NO_COLOR": "1"})
    assert status == 0, plain
    assert "here" in plain and colours(plain) == [], plain
    # NO_COLOR set but empty does not count (no-color.org).
    status, empty = on_terminal([*BUILDFARM, "machines"], {**local_farm, "NO_COLOR": ""})
    assert colours(empty)


def test_no_terminal_codes_when_not_on_a_terminal(local_farm: dict[str, str]) -> None:
    done = subprocess.run([*BUILDFARM, "machines"], env=local_farm, capture_output=True,
                          text=True, check=True)
    assert "\x1b" not in done.stdout
    assert done.stdout.splitlines()[0].startswith("NAME\tSTATE\t")
    done = subprocess.run([*BUILDFARM, "run", "--exit-when-idle"], env=local_farm,
                          capture_output=True, text=True, check=True)
    assert "\x1b" not in done.stdout + done.stderr  # one line per event, no live view
    assert "coordinator started with machines: here" in done.stdout


def test_the_live_view_honours_no_color(local_farm: dict[str, str]) -> None:
    argv = [*BUILDFARM, "run", "--exit-when-idle"]
    status, screen = on_terminal(argv, local_farm)
    assert status == 0, screen
    assert "MACHINES" in screen.upper() and colours(screen), screen
    status, plain = on_terminal(argv, {**local_farm, "NO_COLOR": "1"})
    assert status == 0, plain
    assert "MACHINES" in plain.upper() and "\x1b[" in plain  # still a live view
    assert colours(plain) == [], plain


# --- what a display shows of text others wrote ---------------------------------------------

# ECMA-48 as builders and tools use it: SGR colours, a cursor move, a title (OSC ended by BEL),
# a hyperlink (OSC ended by ST), a charset switch (ESC ( B), 8-bit CSI, DCS, and control
# characters; then what is left of it.
WRITTEN = ("\x1b[1;31mred\x1b[0m \x1b[2K\x1b[10;5Hmoved \x1b]0;a title\x07titled "
           "\x1b]8;;http://example.org\x1b\\link\x1b]8;;\x1b\\ \x1b(Bascii \x9b31mcsi8 "
           "\x1bPq#0;2\x1b\\dcs \x07bell\x08back\x00nul\x7fdel\x85nel\rret\r\ncrlf\n"
           "\ttab \u00e9t\u00e9\n")
SHOWN = "red moved titled link ascii csi8 dcs bellbacknuldelnelret\ncrlf\n\ttab \u00e9t\u00e9\n"


def test_plain_removes_escape_sequences_and_control_characters() -> None:
    from buildfarm.render import plain

    assert plain(WRITTEN) == SHOWN
    assert plain("no codes at all\n\t") == "no codes at all\n\t"
    assert plain("\x1b]0;a title that never ends") == ""


def test_plain_text_of_a_log_cut_anywhere_is_the_same() -> None:
    """However the bytes are cut (inside a sequence, inside a UTF-8 character), the text shown
    is the same, and what is held back is counted as pending."""
    from buildfarm.render import PlainText

    data = WRITTEN.encode()
    for size in (1, 2, 3, 5, 8, 13, len(data)):
        text = PlainText()
        shown = ""
        for start in range(0, len(data), size):
            shown += text.feed(data[start:start + size])
            assert 0 <= text.pending <= start + size
        shown += text.feed(b"", final=True)
        assert shown == SHOWN, size
    text = PlainText()
    assert text.feed(b"ok \x1b[3") == "ok "
    assert text.pending == 3
    assert text.feed(b"1mred") == "red" and text.pending == 0
    assert text.feed(b" \x1b]0;half a title", final=True) == " "  # the log ended there


def test_a_sequence_that_never_ends_is_not_held_forever() -> None:
    from buildfarm.render import HOLD_LIMIT, PlainText

    text = PlainText()
    assert text.feed(b"a\x1b]0;" + b"x" * (HOLD_LIMIT // 2)) == "a"
    assert text.pending > 0
    assert text.feed(b"x" * HOLD_LIMIT) == ""  # too long to hold: dropped, not kept
    assert text.pending == 0
    assert text.feed(b"\x07after") == "after"
