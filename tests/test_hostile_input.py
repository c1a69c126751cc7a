"""Hostile and careless input from users (RELIABILITY.md, "Hostile inputs"): a value that cannot
be stored or shown is refused with one line and exit status 1 before anything is written; a
derivation file is read within bounds (size, item counts, memory) whatever it holds; what is
stored is shown escaped on terminals and in line-oriented output and exactly in --json;
commands that record nothing never create a datastore; the state directory is private.

The Hypothesis properties run BUILDFARM_FUZZ_EXAMPLES examples each, a tenth of them (they go
through the whole command line and a datastore each time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from engines import ScratchDatabase
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from buildfarm.cli import cli
from buildfarm.datastore import opened
from buildfarm.errors import DerivationError
from buildfarm.formats import derivation
from buildfarm.submission import SubmitOptions, submit

DATA = Path(__file__).parent / "data"
HELLO = DATA / "nix" / "76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
NOBODY = "00000000-0000-0000-0000-000000000000"
EXAMPLES = max(20, int(os.environ.get("BUILDFARM_FUZZ_EXAMPLES", "300")) // 10)
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
# What must never reach a terminal from stored values: every control character but the
# newline and tab the output's own layout uses, and Unicode's line and paragraph separators.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
# Values a submitter may try: any text, plus lone surrogates (bytes that are not UTF-8 in an
# argument) and the controls that move a terminal or split a line.
NASTY = st.text(alphabet=st.one_of(
    st.characters(), st.sampled_from(["\udcff", "\udc80", "\x1b", "\n", "\r", "\x9b", "\u2028"])
), max_size=30)


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def ok(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def fails(*args: str, input: str | None = None) -> str:
    """One line on stderr, exit status 1, no traceback."""
    result = run(*args, input=input)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def hello_with(path: Path, **changes: object) -> Path:
    """HELLO with some fields replaced, written to `path` (its store path then comes from its
    name, as for any .drv outside the store)."""
    drv = dataclasses.replace(derivation.read(HELLO), **changes)  # type: ignore[arg-type]
    path.write_bytes(derivation.serialize(drv))
    return path


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: ScratchDatabase) -> Path:
    """BUILDFARM_DB names the test's datastore on the engine under test."""
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BUILDFARM_DB", database.url)
    return tmp_path / "state"


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state directory that does not exist yet, and the default (SQLite) datastore in it."""
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("BUILDFARM_DB", raising=False)
    return tmp_path / "state"


# --- what is stored is shown escaped, and exactly in --json ---------------------------------

FORGED_ROW = f"\n{NOBODY}\tsucceeded\tx86_64-linux\t0\t/nix/store/forged.drv\t-"
HOSTILE_SYSTEM = "x86_64-linux" + FORGED_ROW + "\x1b]0;owned\x07\x1b[2J\x9b31m\u2028"
HOSTILE_TAG = "a\x1b[2Jb\nc\td\x07"  # (PostgreSQL's text holds no NUL)


def test_stored_values_are_escaped_on_terminals_and_exact_in_json(
    state: Path, database: ScratchDatabase, tmp_path: Path
) -> None:
    """A derivation's `system` (any string in a .drv) sets the terminal's title, clears the
    screen and forges a `builds list` row; a tag value recorded before tags were checked holds
    the same. Every line-oriented output writes them escaped; --json keeps them exact."""
    hostile = hello_with(tmp_path / "hostile.drv", system=HOSTILE_SYSTEM)
    with opened(database.url):
        (built,) = submit([str(hostile)], SubmitOptions(tags=(("note", HOSTILE_TAG),)))
    listed = ok("builds", "list")
    assert not RAW_CONTROL.search(listed), listed
    header, row = listed.splitlines()  # exactly one row: nothing forged
    assert len(row.split("\t")) == len(header.split("\t")) == 6
    assert row.split("\t")[2] == "x86_64-linux\\n" + FORGED_ROW[1:].replace("\t", "\\t") + (
        "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u2028")
    shown = ok("builds", "show", built.uuid)
    assert not RAW_CONTROL.search(shown), shown
    assert all(re.match(r"[a-z][a-z ]*: ", line) for line in shown.splitlines()), shown
    assert "note=a\\x1b[2Jb\\nc\\td\\x07" in shown
    info = json.loads(ok("builds", "show", built.uuid, "--json"))
    assert (info["system"], info["tags"]) == (HOSTILE_SYSTEM, {"note": HOSTILE_TAG})
    assert json.loads(ok("builds", "list", "--json"))[0]["system"] == HOSTILE_SYSTEM


# --- values past what can be stored: refused in one line, nothing written ---------------------


@PROPERTY
@given(value=st.one_of(st.integers().map(str), NASTY))
@example(value="99999999999999999999")
@example(value="-2147483649")
@example(value="2147483647")
def test_a_priority_is_stored_exactly_or_refused_in_one_line(fresh: Path, value: str) -> None:
    result = run("submit", str(HELLO), "--priority", value)
    if result.exit_code == 0:
        info = json.loads(ok("builds", "show", result.stdout.strip(), "--json"))
        assert str(info["priority"]) == str(int(value))
        assert -(2**31) <= info["priority"] <= 2**31 - 1
    else:
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "--priority must be a whole number from -2147483648 to 2147483647" in result.stderr


@PROPERTY
@given(value=st.integers(-(2**31), 2**31 - 1))
def test_every_priority_in_the_documented_range_is_taken(fresh: Path, value: int) -> None:
    (uuid,) = ok("submit", str(HELLO), "--priority", str(value)).split()
    assert json.loads(ok("builds", "show", uuid, "--json"))["priority"] == value
    ok("builds", "priority", "--", uuid, str(value))  # "--": a negative number is no option


def count_builds(state: Path) -> int:
    return len(json.loads(ok("builds", "list", "--json", "--limit", "100000"))) if (
        state.exists()) else 0


@PROPERTY
@given(value=NASTY)
@example(value="\udcff")
@example(value="\x1b]0;title\x07")
@example(value="x" * 1025)
def test_a_tag_value_is_stored_exactly_or_refused_in_one_line(fresh: Path, value: str) -> None:
    before = count_builds(fresh)
    result = run("submit", str(HELLO), "--tag", f"k={value}")
    if result.exit_code == 0:
        info = json.loads(ok("builds", "show", result.stdout.strip(), "--json"))
        assert info["tags"] == {"k": value}
        assert not RAW_CONTROL.search(value) and "\n" not in value and "\t" not in value
    else:
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("Error: bad tag 'k': ")
        assert count_builds(fresh) == before


@PROPERTY
@given(value=st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")),
                     max_size=1024))
def test_every_tag_value_of_printable_text_is_taken(fresh: Path, value: str) -> None:
    (uuid,) = ok("submit", str(HELLO), "--tag", f"k={value}").split()
    assert json.loads(ok("builds", "show", uuid, "--json"))["tags"] == {"k": value}


ZONES = [None, UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))]


@PROPERTY
@given(moment=st.datetimes(timezones=st.sampled_from(ZONES)))
@example(moment=datetime(1, 1, 1))
@example(moment=datetime(9999, 12, 31, 23, 59, 59))
@example(moment=datetime(1969, 12, 31, 12, 0, tzinfo=timezone(timedelta(hours=-12))))
def test_a_date_is_stored_exactly_or_refused_in_one_line(fresh: Path, moment: datetime) -> None:
    result = run("submit", str(HELLO), "--defer-until", moment.isoformat())
    if result.exit_code == 0:
        (uuid,) = result.stdout.split()
        rows = json.loads(ok("builds", "list", "--json"))
        assert any(r["uuid"] == uuid for r in rows)
        # The range is of instants: 1969-12-31T12:00-12:00 is 1970-01-01 00:00 UTC, accepted.
        assert 1970 <= moment.astimezone(UTC).year <= 9999
    else:
        assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "use ISO 8601 from 1970 to 9999" in result.stderr
        assert not (1971 <= moment.year <= 9998)  # only the very edges depend on the zone


# --- derivation files: bounded whatever they hold ---------------------------------------------


def test_a_file_that_is_no_regular_file_is_refused_at_once(fresh: Path, tmp_path: Path) -> None:
    """/dev/zero was read until MemoryError, a FIFO was waited on forever: each is refused at
    once (a separate process, so that a hang fails the test instead of blocking it)."""
    fifo = tmp_path / "fifo.drv"
    os.mkfifo(fifo)
    for file, what in ((fifo, "not a regular file but a FIFO"),
                       ("/dev/zero", "not a regular file but a character device")):
        done = subprocess.run([sys.executable, "-m", "buildfarm", "submit", str(file)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stderr == f"Error: {file}: byte 0: {what}\n"
    assert not fresh.exists()


def test_a_derivation_larger_than_the_limit_is_refused(fresh: Path, tmp_path: Path) -> None:
    huge = tmp_path / "huge.drv"
    with open(huge, "wb") as sparse:
        sparse.truncate(derivation.MAX_SIZE + 1)
    line = fails("submit", str(huge))
    assert line == f"Error: {huge}: byte {derivation.MAX_SIZE}: larger than 32 MiB, the most a " \
        "derivation may be"
    line = fails("submit", "-", input="\0" * 5000 + "\n")
    assert line == "Error: stdin line 1: not a file name (longer than 4096 bytes, or a NUL byte)"
    assert not fresh.exists()


@pytest.mark.parametrize("value", ["\\" * 15_000_000, '\n"\t' * 5_000_000, "x" * 30_000_000])
def test_parsing_holds_a_few_times_the_file_whatever_its_escapes(value: str) -> None:
    """A file of backslash escapes took 90 times its size (Python's regex engine kept a frame
    per escape, and unescaping made a string per escape)."""
    data = derivation.serialize(dataclasses.replace(
        derivation.read(HELLO), env=(("big", value),)
    ))
    assert len(data) <= derivation.MAX_SIZE
    tracemalloc.start()
    try:
        parsed = derivation.parse(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parsed.env == (("big", value),)
    assert peak < 4 * len(data), (peak, len(data))


def peak_rss_kib(*argv: str) -> int:
    """The peak RSS of a command that succeeds, in KiB, measured by a small Python between: a
    child's ru_maxrss counts the memory of the process it was forked from (fork copies it, exec
    keeps the mark), and pytest late in the suite holds hundreds of MiB (431 were seen)."""
    probe = ("import resource, subprocess, sys\n"
             "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL,"
             " stderr=subprocess.PIPE)\n"
             "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
             " repr(done.stderr))")
    result = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                            text=True, check=True)
    status, peak, stderr = result.stdout.split(" ", 2)
    assert status == "0", stderr
    return int(peak)


def test_a_submission_of_the_largest_derivation_stays_in_bounded_memory(
    fresh: Path, tmp_path: Path
) -> None:
    """`submit` of a derivation of escapes just under the limit (30 MiB) takes 138 MiB more
    than a small one (41 MiB) does: the file, its parsed strings, the row. It took 2.7 GB
    before the parser was fixed. Eight times the file is allowed."""
    hello = derivation.read(HELLO)
    small = hello_with(tmp_path / "small.drv", env=(*hello.env, ("big", "\\" * 16)))
    big = hello_with(tmp_path / "big.drv", env=(*hello.env, ("big", "\\" * 16_000_000)))
    submit = (sys.executable, "-m", "buildfarm", "submit")
    baseline = peak_rss_kib(*submit, str(small))
    peak = peak_rss_kib(*submit, str(big))
    allowed = 8 * big.stat().st_size // 1024
    assert peak - baseline < allowed, f"peak RSS {peak} KiB, {baseline} KiB for a small one"


@pytest.mark.parametrize("field", ["args", "env", "input_srcs"])
def test_lists_hold_at_most_max_items(field: str, tmp_path: Path) -> None:
    """Each item costs about a hundred bytes of objects however short its text: a file of
    28 MiB of empty arguments took 1.2 GB to parse."""
    source = derivation.read(HELLO)

    def items(count: int) -> tuple[object, ...]:
        if field == "env":
            return tuple((f"k{i}", "") for i in range(count))
        if field == "input_srcs":
            return tuple(f"/nix/store/{i:032d}-s".replace("0", "a") for i in range(count))
        return ("",) * count

    at_limit = dataclasses.replace(source, **{field: items(derivation.MAX_ITEMS)})
    data = derivation.serialize(at_limit)
    assert len(getattr(derivation.parse(data), field)) == derivation.MAX_ITEMS
    over = derivation.serialize(dataclasses.replace(source, **{field: items(derivation.MAX_ITEMS
                                                                            + 1)}))
    with pytest.raises(DerivationError, match=f"more than {derivation.MAX_ITEMS} items in the "):
        derivation.parse(over)


# --- commands that record nothing create nothing ----------------------------------------------

READ_ONLY = [
    ("builds", "list"),
    ("builds", "list", "--json"),
    ("builds", "show", NOBODY),
    ("log", NOBODY),
    ("builds", "cancel", NOBODY),
    ("builds", "priority", NOBODY, "3"),
    ("db", "status"),
    ("outputs", "gc", "--older-than", "1d", "--dry-run"),
]


@pytest.mark.parametrize("args", READ_ONLY, ids=" ".join)
def test_a_command_that_records_nothing_creates_no_datastore(
    fresh: Path, args: tuple[str, ...]
) -> None:
    line = fails(*args)
    assert line == (f"Error: no datastore at {fresh}/buildfarm.db: nothing was submitted there "
                    "yet (`buildfarm submit` creates it)")
    assert not fresh.exists()


@pytest.mark.parametrize("args", [("key", "show"), ("key", "show", "--json"),
                                  ("key", "show", "--format", "nix")], ids=" ".join)
def test_showing_a_key_that_does_not_exist_writes_nothing(
    fresh: Path, args: tuple[str, ...]
) -> None:
    assert "no signing key in" in fails(*args)
    assert not fresh.exists()  # --json recorded the default key name first


def test_a_datastore_url_naming_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    """It used to make the directory and the file and print an empty list."""
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    line = fails("--db", f"sqlite://{missing}", "builds", "list")
    assert line.startswith(f"Error: no datastore at {missing}: ")
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.postgresql_only
def test_a_command_that_records_nothing_creates_no_schema(
    state: Path, database: ScratchDatabase
) -> None:
    for args in READ_ONLY:
        if args == ("db", "status"):  # it reads the schema version, and says it is 0
            assert "schema_version: 0" in ok(*args)
            continue
        assert fails(*args).startswith("Error: no datastore in postgresql://"), args
    assert database.tables() == []


@pytest.mark.parametrize("args", [
    ("submit", str(DATA / "nix" / "hello.nix")),
    ("submit", str(HELLO), "--priority", "2147483648"),
    ("submit", str(HELLO), "--tag", "k=\x1b[2J"),
    ("submit", str(HELLO), "--defer-until", "0001-01-01"),
    ("submit", str(HELLO), str(HELLO), "--uuid", NOBODY),
    ("submit", "/dev/zero"),
    ("submit", str(DATA)),
], ids=lambda args: " ".join(a.rsplit("/", 1)[-1] for a in args))
def test_a_rejected_submission_leaves_no_trace(fresh: Path, args: tuple[str, ...]) -> None:
    fails(*args)
    assert not fresh.exists()


# --- the state directory is private ---------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_state_directory_and_the_datastore_are_private(
    fresh: Path, tmp_path: Path
) -> None:
    ok("submit", str(HELLO))
    assert mode(fresh) == 0o700
    assert mode(fresh / "buildfarm.db") == 0o600
    # An existing state directory open to others is closed by `run`, which owns it.
    fresh.chmod(0o755)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("machines: []\n")
    done = subprocess.run(
        [sys.executable, "-m", "buildfarm", "--inventory", str(inventory), "--hooks-dir",
         str(tmp_path / "no-hooks"), "run", "--no-ui", "--exit-when-idle"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert mode(fresh) == 0o700
    assert mode(fresh / "signing-key.secret") == 0o600


# --- datastore passwords never shown ---------------------------------------------------------

SECRET = "TopSecret9"


@pytest.mark.parametrize("url", [
    f"postgres:/u:{SECRET}@127.0.0.1/db",  # not a URL buildfarm knows: only its scheme is shown
    f"postgresql://u:{SECRET} Pass@127.0.0.1/db",  # libpq quoted the password back
    f"postgresql://u:Pa@{SECRET}@127.0.0.1/db",  # libpq took the rest for the host name
    f"postgresql://u:Pa%zz{SECRET}@127.0.0.1/db",
    f"postgresql://u:{SECRET}@[::1/db",
    f"postgresql://127.0.0.1/db?password={SECRET}&port=x",
    f"postgresql://u:{SECRET}@127.0.0.1:99999/db",
    f"postgresql://u:{SECRET}@127.0.0.1:1/db",  # nothing listens: the driver's own message
])
def test_a_datastore_password_is_never_shown(fresh: Path, url: str) -> None:
    for args in (("builds", "list"), ("submit", str(HELLO)), ("db", "status")):
        line = fails("--db", url, *args)
        assert SECRET not in line and "Secret" not in line, line
        assert line.startswith(("Error: unknown datastore URL scheme 'postgres:'",
                                "Error: bad PostgreSQL URL postgresql://",
                                "Error: cannot open datastore postgresql://")), line


@PROPERTY
@given(password=st.text(min_size=1, max_size=30).filter(lambda p: "*" not in p))
def test_a_password_is_redacted_however_it_is_written(password: str) -> None:
    from urllib.parse import quote

    from buildfarm.datastore import postgresql

    encoded = quote(password, safe="")
    url = f"postgresql://farm:{encoded}@db.example.org:5432/buildfarm"
    assert postgresql.redact(url) == "postgresql://farm:***@db.example.org:5432/buildfarm"
    assert postgresql.without_password(url) == "postgresql://farm@db.example.org:5432/buildfarm"
    assert postgresql.conninfo(url) == url  # which notes its password for scrub()
    scrubbed = postgresql.scrub(f"failed for {password!r} ({encoded})")
    assert password not in scrubbed and encoded not in scrubbed, scrubbed
