"""The command line over the core: exit codes, messages, and that bad input writes nothing.

Every test that touches a datastore uses the `database` fixture, so it runs on each engine."""

from __future__ import annotations

import json
import shutil
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from engines import ScratchDatabase

from buildfarm.cli import cli

DATA = Path(__file__).parent / "data"
HELLO = DATA / "nix" / "76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
TOP = DATA / "nix" / "mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv"
DEP_PATH = "/nix/store/pld6g8hnp87b9d7yvkidbf4zi7hvm33k-dep.drv"
GREP = DATA / "guix" / "63j9givlcpv1rd53sw8jz38aysmjkhhr-grep-3.8.drv"


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: ScratchDatabase) -> Path:
    """The state directory; BUILDFARM_DB names the test's datastore on the engine under test."""
    for var in ("BUILDFARM_INVENTORY", "BUILDFARM_HOOKS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BUILDFARM_DB", database.url)
    return tmp_path / "state"


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def ok(*args: str, input: str | None = None) -> str:
    result = run(*args, input=input)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def fails(*args: str, input: str | None = None) -> str:
    """A user mistake: exit 1 and exactly one line on stderr, no traceback."""
    result = run(*args, input=input)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def walk(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from walk(command, (*prefix, name))


def test_every_command_has_help(state: Path) -> None:
    commands = list(walk(cli))
    assert ("submit",) in commands and ("builds", "show") in commands
    for path in [(), *commands]:
        out = ok(*path, "--help")
        assert "Usage:" in out
        command: click.Command = cli
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        assert command.help, f"{' '.join(path)} has no help text"


def test_submit_prints_one_uuid_per_derivation(state: Path) -> None:
    out = ok("submit", str(HELLO), str(GREP))
    uuids = out.split()
    assert len(uuids) == 2
    for u in uuids:
        assert str(uuidlib.UUID(u)) == u
    listed = json.loads(ok("builds", "list", "--json"))
    assert {b["uuid"] for b in listed} == set(uuids)
    by_uuid = {b["uuid"]: b for b in listed}
    assert by_uuid[uuids[0]]["derivation"] == "/nix/store/" + HELLO.name
    assert by_uuid[uuids[1]]["derivation"] == "/gnu/store/" + GREP.name
    assert all(b["state"] == "queued" for b in listed)


def test_show_json_has_the_documented_fields(state: Path) -> None:
    (u,) = ok("submit", str(TOP), "--priority", "7", "--tag", "job=nightly").split()
    info = json.loads(ok("builds", "show", u, "--json"))
    for key in ("uuid", "derivation", "system", "state", "priority", "tags", "outputs",
                "created_at", "attempts"):
        assert key in info
    assert info["uuid"] == u
    assert info["priority"] == 7
    assert info["tags"] == {"job": "nightly"}
    assert info["outputs"] == {"out": "/nix/store/b929rzxqin9xa830zfpbfbgx8wajdhdn-top"}
    assert info["system"] == "x86_64-linux"
    assert info["attempts"] == []
    assert info["inputs"] == [
        {"derivation": DEP_PATH, "outputs": ["out"], "build": None, "state": None}
    ]
    text = ok("builds", "show", u)
    assert u in text and "nightly" in text


def test_readable_input_derivations_are_recorded_without_builds(
    state: Path, database: ScratchDatabase
) -> None:
    ok("submit", str(TOP))
    paths = {r[0] for r in database.rows("SELECT path FROM derivation")}
    assert paths == {"/nix/store/" + TOP.name, DEP_PATH}
    assert database.scalar("SELECT COUNT(*) FROM build") == 1
    assert database.scalar("SELECT COUNT(*) FROM event WHERE name = 'build-submitted'") == 1


def test_a_copy_outside_the_store_gets_its_store_path(state: Path, tmp_path: Path) -> None:
    copy = tmp_path / "hello-copy.drv"
    shutil.copy(HELLO, copy)
    (u,) = ok("submit", str(copy)).split()
    info = json.loads(ok("builds", "show", u, "--json"))
    assert info["derivation"] == "/nix/store/" + HELLO.name


def test_stdin_paths(state: Path) -> None:
    out = ok("submit", "-", input=f"{HELLO}\n\n{TOP}\n")
    assert len(out.split()) == 2


def test_uuid_tags_defer_and_filters(state: Path) -> None:
    chosen = "6f1c2d57-2b47-4e0b-a7c6-5c0a8a5b9e10"
    ok("submit", str(HELLO), "--uuid", chosen.upper(), "--tag", "a=1", "--tag", "b=two words",
       "--defer-until", "2030-01-01T00:00:00+00:00")
    ok("submit", str(GREP), "--tag", "a=2")
    info = json.loads(ok("builds", "show", chosen, "--json"))
    assert info["tags"] == {"a": "1", "b": "two words"}
    assert info["defer_until"] == "2030-01-01T00:00:00+00:00"
    assert [b["uuid"] for b in json.loads(ok("builds", "list", "--tag", "a=1", "--json"))] == [
        chosen
    ]
    assert json.loads(ok("builds", "list", "--tag", "a=1", "--tag", "b=x", "--json")) == []
    guix = json.loads(ok("builds", "list", "--system", "x86_64-linux", "--json"))
    assert len(guix) == 2
    assert len(json.loads(ok("builds", "list", "--limit", "1", "--json"))) == 1
    plain = ok("builds", "list")
    assert plain.splitlines()[0].split("\t")[:2] == ["UUID", "STATE"]


def test_ignore_if_built_reuses_the_queued_build(state: Path) -> None:
    (first,) = ok("submit", str(HELLO)).split()
    (again,) = ok("submit", str(HELLO), "--ignore-if-built").split()
    assert again == first
    (third,) = ok("submit", str(HELLO)).split()
    assert third != first


def test_ignore_if_queued_reuses_a_queued_or_running_build_only(
    state: Path, database: ScratchDatabase
) -> None:
    """What the missing-inputs hook relies on: no second build of an input while one is queued
    or running, a new one once it has ended (succeeded or not)."""
    (first,) = ok("submit", str(HELLO)).split()
    assert ok("submit", str(HELLO), "--ignore-if-queued").split() == [first]
    assert ok("submit", str(HELLO), str(HELLO), "--ignore-if-queued").split() == [first, first]
    database.execute("UPDATE build SET state = 'running'")
    assert ok("submit", str(HELLO), "--ignore-if-queued").split() == [first]
    database.execute("UPDATE build SET state = 'succeeded'")
    (after,) = ok("submit", str(HELLO), "--ignore-if-queued").split()
    assert after != first
    assert ok("submit", str(HELLO), "--ignore-if-built").split() == [first]  # the oldest
    names = [r[0] for r in database.rows("SELECT name FROM event ORDER BY id")]
    assert names == ["build-submitted", "build-submitted"]


def test_cancel_and_priority(state: Path, database: ScratchDatabase) -> None:
    (u,) = ok("submit", str(HELLO)).split()
    assert ok("builds", "priority", u, "42") == f"build {u}: priority 0 -> 42\n"
    assert ok("builds", "priority", u, "42") == f"build {u}: priority already 42\n"
    assert json.loads(ok("builds", "show", u, "--json"))["priority"] == 42
    assert ok("builds", "cancel", u).strip() == f"canceled {u}"
    info = json.loads(ok("builds", "show", u, "--json"))
    assert info["state"] == "canceled"
    assert "cannot be canceled: it is canceled" in fails("builds", "cancel", u)
    assert "canceled" in fails("builds", "priority", u, "1")
    names = [r[0] for r in database.rows("SELECT name FROM event ORDER BY id")]
    assert names == ["build-submitted", "build-canceled"]


def test_priority_says_which_inputs_it_raised(state: Path, database: ScratchDatabase) -> None:
    (top,) = ok("submit", str(TOP), "--closure").split()
    (dep,) = [u for (u,) in database.rows("SELECT uuid FROM build") if u != top]
    assert ok("builds", "priority", top, "5") == (
        f"build {top}: priority 0 -> 5\n1 build(s) it needs raised to priority 5\n")
    assert json.loads(ok("builds", "show", dep, "--json"))["priority"] == 5
    assert ok("builds", "priority", top, "2") == f"build {top}: priority 5 -> 2\n"
    assert json.loads(ok("builds", "show", dep, "--json"))["priority"] == 5


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("submit", "/nonexistent/x.drv"), "/nonexistent/x.drv: No such file or directory"),
        (("submit", str(DATA / "nix" / "hello.nix")), "hello.nix: byte 0"),
        (("submit", str(DATA / "nix" / "b929rzxqin9xa830zfpbfbgx8wajdhdn-top.nar")), "binary"),
        (("submit", str(DATA)), "is a directory"),
        (("submit", str(HELLO), "--tag", "novalue"), "bad tag 'novalue'"),
        (("submit", str(HELLO), "--tag", "=x"), "bad tag"),
        # A machine tag follows the inventory's grammar: a tag key, one word of printable ASCII.
        (("submit", str(HELLO), "--machine-tag", "gpu=two words"), "bad machine tag "
         "'gpu=two words': the value is one word"),
        (("submit", str(HELLO), "--machine-tag", "-gpu=yes"), "bad tag '-gpu=yes'"),
        (("submit", str(HELLO), "--defer-until", "next tuesday"), "bad date 'next tuesday'"),
        (("submit", str(HELLO), "--uuid", "not-a-uuid"), "is not a UUID"),
        (("submit", str(HELLO), str(TOP), "--uuid", str(uuidlib.uuid4())), "exactly one"),
        (("builds", "show", "00000000-0000-0000-0000-000000000000"), "no build with UUID"),
        (("builds", "show", "zzz"), "is not a build UUID"),
        (("builds", "cancel", "00000000-0000-0000-0000-000000000000"), "no build with UUID"),
        (("builds", "priority", "00000000-0000-0000-0000-000000000000", "3"), "no build"),
        (("builds", "list", "--tag", "x"), "bad tag"),
        # Values past what the datastore and the clock can hold, and bytes that are not text.
        (("submit", str(HELLO), "--priority", "99999999999999999999"), "--priority must be a "
         "whole number from -2147483648 to 2147483647, not '99999999999999999999'"),
        (("builds", "priority", "00000000-0000-0000-0000-000000000000", "2147483648"),
         "PRIORITY must be a whole number from -2147483648 to 2147483647"),
        (("builds", "list", "--limit", "99999999999999999999"), "--limit must be a whole number "
         "from 1 to 2147483647"),
        (("submit", str(HELLO), "--tag", "k=\udcff"), "bad tag 'k': a byte that is not UTF-8 at "
         "character 1"),
        (("submit", str(HELLO), "--tag", "k=a\x1b]0;title\x07"), "bad tag 'k': the control "
         "character '\\x1b' at character 2"),
        (("builds", "list", "--system", "x\udcff"), "--system: a byte that is not UTF-8"),
        (("submit", str(HELLO), "--defer-until", "0001-01-01"), "bad date '0001-01-01': use ISO "
         "8601 from 1970 to 9999"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    state: Path, database: ScratchDatabase, args: tuple[str, ...], needle: str
) -> None:
    (existing,) = ok("submit", str(GREP)).split()
    before = database.dump()
    line = fails(*args)
    assert needle in line
    assert line.startswith("Error: ")
    assert database.dump() == before
    assert json.loads(ok("builds", "show", existing, "--json"))["state"] == "queued"


def test_malformed_and_truncated_derivations_write_nothing(
    state: Path, database: ScratchDatabase, tmp_path: Path
) -> None:
    ok("submit", str(GREP))
    before = database.dump()
    truncated = tmp_path / "trunc.drv"
    truncated.write_bytes(HELLO.read_bytes()[:100])
    line = fails("submit", str(HELLO), str(truncated))
    assert str(truncated) in line and "byte " in line
    empty = tmp_path / "empty.drv"
    empty.write_bytes(b"")
    assert "byte 0" in fails("submit", str(empty))
    assert database.dump() == before


def test_duplicate_uuid_writes_nothing(state: Path, database: ScratchDatabase) -> None:
    chosen = str(uuidlib.uuid4())
    ok("submit", str(HELLO), "--uuid", chosen)
    before = database.dump()
    assert "already exists" in fails("submit", str(GREP), "--uuid", chosen)
    assert database.dump() == before


def test_cancel_cancels_what_it_can_and_names_the_rest(state: Path) -> None:
    first, ended, other = ok("submit", str(HELLO), str(GREP), str(TOP)).split()
    ok("builds", "cancel", ended)
    unknown = "00000000-0000-0000-0000-000000000000"
    result = run("builds", "cancel", first, ended, unknown, first)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == f"canceled {first}\n"
    (line,) = result.stderr.strip().splitlines()
    assert line == (f"Error: 2 builds not canceled: build {ended} cannot be canceled: it is "
                    f"canceled; no build with UUID {unknown}")
    states = {b["uuid"]: b["state"] for b in json.loads(ok("builds", "list", "--json"))}
    assert states == {first: "canceled", ended: "canceled", other: "queued"}
    assert ok("builds", "cancel", other[:8]) == f"canceled {other}\n"


def test_a_uuid_prefix_names_a_build_wherever_a_uuid_does(
    state: Path, database: ScratchDatabase
) -> None:
    twins = ("6f1c2d57-2b47-4e0b-a7c6-5c0a8a5b9e10", "6f1c2d57-9a00-4e0b-a7c6-5c0a8a5b9e10")
    ok("submit", str(HELLO), "--uuid", twins[0])
    ok("submit", str(GREP), "--uuid", twins[1])
    for prefix in ("6f1c2d57-2b", "6F1C2D572B47", "6f1c2d57-2b47-4e0b-a7c6-5c0a8a5b"):
        assert json.loads(ok("builds", "show", prefix, "--json"))["uuid"] == twins[0]
    assert ok("builds", "priority", "6f1c2d579a", "3").startswith(f"build {twins[1]}: ")
    before = database.dump()
    assert fails("builds", "show", "6f1c2d57") == (
        f"Error: 6f1c2d57 starts the UUIDs of several builds ({twins[0]}, {twins[1]}, …): "
        "give more of it")
    assert fails("builds", "cancel", "6f1c2d57-") == fails("builds", "cancel", "6f1c2d57")
    assert fails("log", "6f1c2d57-3") == "Error: no build's UUID starts with 6f1c2d57-3"
    assert "first 8 or more characters" in fails("builds", "show", "6f1c2d5")
    assert "not a build UUID" in fails("builds", "priority", "6f1c2d57-2x", "1")
    assert database.dump() == before


@pytest.mark.sqlite_only  # SQLite URLs and the default file; test_postgresql.py has the rest
def test_global_options_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BUILDFARM_STATE_DIR", raising=False)
    db = tmp_path / "elsewhere.db"
    monkeypatch.setenv("BUILDFARM_DB", f"sqlite://{db}")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    ok("submit", str(HELLO))
    assert db.exists()
    assert not (tmp_path / "home" / ".local" / "state" / "buildfarm" / "buildfarm.db").exists()
    other = tmp_path / "other.db"
    ok("--db", f"sqlite://{other}", "submit", str(HELLO))
    assert len(json.loads(ok("--db", f"sqlite://{other}", "builds", "list", "--json"))) == 1
    assert "unknown datastore URL" in fails("--db", "mysql://x", "builds", "list")


def test_python_dash_m_entry_point(state: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "buildfarm", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("buildfarm, version ")
