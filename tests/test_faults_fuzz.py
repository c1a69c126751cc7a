"""Fault suite, hostile input (RELIABILITY.md, fault 8): the derivation reader, the export-bundle
reader and the output store fed random and mutated bytes raise only their documented errors;
names full of shell metacharacters, quotes and newlines never reach a shell unquoted and never
make a file outside the state directory.

BUILDFARM_FUZZ_EXAMPLES sets the examples per test (300 in CI). The long run, with the
inventory loader's fuzz tests (tests/test_inventory.py) too:
    BUILDFARM_FUZZ_EXAMPLES=100000 BUILDFARM_TEST_ENGINES=sqlite bash scripts/test -k fuzz
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from buildfarm.backends import Command, get_backend
from buildfarm.errors import ArchiveError, BuildfarmError, DerivationError, UsageError
from buildfarm.formats import derivation as drvmod
from buildfarm.formats import nar
from buildfarm.formats.derivation import Derivation, DerivationOutput
from buildfarm.outputs.store import OutputStore
from buildfarm.ssh.processes import GROUP_WRAPPER as _GROUP_WRAPPER
from buildfarm.submission import derivation_store_path

EXAMPLES = int(os.environ.get("BUILDFARM_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Each example of the shell test starts a few processes: a fifth of the examples.
SHELL_FUZZ = settings(FUZZ, max_examples=max(30, EXAMPLES // 5))
DATA = Path(__file__).parent / "data"
SAMPLE_DRVS = [p.read_bytes() for p in sorted((DATA / "nix").glob("*.drv"))]
SAMPLE_DRVS += [p.read_bytes() for p in sorted((DATA / "guix").glob("*.drv"))]
EXPORT = (DATA / "nix" / "top-closure.export").read_bytes()
NARS = [p.read_bytes() for p in sorted((DATA / "nix").glob("*.nar"))]
STORE = "/nix/store"

# What a shell would act on, plus ordinary characters and line breaks.
METACHARACTERS = "$`'\"\\;|&<>()*?[]{}~!#%=+-._/ \t\n\r"
HOSTILE = st.text(alphabet=st.sampled_from(list(METACHARACTERS + "abcXYZ019é")), min_size=1,
                  max_size=40)


def edits() -> st.SearchStrategy[list[tuple[int, bytes, int]]]:
    """Replace `delete` bytes at `at` with `insert`, a few times."""
    return st.lists(st.tuples(st.integers(0, 1 << 16), st.binary(max_size=8), st.integers(0, 8)),
                    min_size=1, max_size=4)


def mutate(data: bytes, changes: list[tuple[int, bytes, int]]) -> bytes:
    buf = bytearray(data)
    for at, insert, delete in changes:
        at %= len(buf) + 1
        buf[at:at + delete] = insert
    return bytes(buf)


def all_store_paths(drv: Derivation) -> list[str]:
    return [*drv.output_paths.values(), *(p for p, _ in drv.input_drvs), *drv.input_srcs]


# --- the derivation reader -----------------------------------------------------------------


def check_derivation(data: bytes, file: str) -> None:
    """Either a DerivationError with an offset inside the data, or a derivation whose every
    path is a valid store path and whose own store path, as `submit` computes it from the file
    name, is one too (or a UsageError saying why not)."""
    try:
        drv = drvmod.parse(data, file)
    except DerivationError as error:
        assert 0 <= error.offset <= len(data)
        assert str(error).startswith(file)
        return
    assert drvmod.serialize(drv) == data  # canonical: nothing is silently dropped or added
    for path in all_store_paths(drv):
        assert sound_store_path(path), path
    try:
        path = derivation_store_path(file, drv, data)
    except UsageError:
        return
    assert drvmod.is_store_path(path), path


@FUZZ
@given(st.binary(max_size=400), HOSTILE)
def test_fuzz_derivation_reader_random_bytes(data: bytes, file: str) -> None:
    check_derivation(data, file)


@FUZZ
@given(st.sampled_from(SAMPLE_DRVS), edits(), st.sampled_from(["x.drv", "a/b;c", "$(x)\n"]))
def test_fuzz_derivation_reader_mutated_samples(
    data: bytes, changes: list[tuple[int, bytes, int]], file: str
) -> None:
    check_derivation(mutate(data, changes), file)


@st.composite
def hostile_derivations(draw: st.DrawFn) -> Derivation:
    """Derivations whose free-form strings (name, env, args, builder, output names) are full
    of metacharacters; the store paths are valid ones."""
    digest = draw(st.text("0123456789abcdfghijklmnpqrsvwxyz", min_size=32, max_size=32))
    names = draw(st.lists(HOSTILE, min_size=1, max_size=3, unique=True))
    outputs = tuple(
        DerivationOutput(name, f"{STORE}/{digest[i:] + digest[:i]}-o{i}", "", "")
        for i, name in enumerate(names)
    )
    variables = draw(st.dictionaries(HOSTILE, HOSTILE, max_size=4))
    variables["name"] = draw(st.one_of(HOSTILE, st.just("fine-name")))  # `submit` names by it
    env = tuple(sorted(variables.items()))
    return Derivation(
        outputs=outputs, input_drvs=(), input_srcs=(), system=draw(HOSTILE),
        builder=draw(HOSTILE), args=tuple(draw(st.lists(HOSTILE, max_size=3))), env=env,
    )


@FUZZ
@given(hostile_derivations(), HOSTILE)
def test_fuzz_derivation_reader_hostile_strings(drv: Derivation, file: str) -> None:
    data = drvmod.serialize(drv)
    assert drvmod.parse(data, file) == drv
    check_derivation(data, file)


# --- the export-bundle reader and the output store -----------------------------------------


def read_all(data: bytes) -> list[nar.BundleItem]:
    sinks: list[io.BytesIO] = []

    def sink(index: int) -> io.BytesIO:
        sinks.append(io.BytesIO())
        return sinks[-1]

    return list(nar.read_bundle(io.BytesIO(data), sink))


def sound_store_path(path: str) -> bool:
    """A valid store path whose store directory leads nowhere else and holds no line break."""
    return drvmod.is_store_path(path) and "\n" not in path and not (
        {".", ".."} & set(path.split("/"))
    )


def check_bundle(data: bytes) -> None:
    try:
        items = read_all(data)
    except ArchiveError as error:
        assert str(error).startswith("export bundle: byte "), error
        return
    for item in items:
        for path in (item.path, *item.references, *([item.deriver] if item.deriver else [])):
            assert sound_store_path(path), path


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([b"", nar._u64(1), EXPORT[:200]]))
def test_fuzz_bundle_reader_random_bytes(junk: bytes, prefix: bytes) -> None:
    check_bundle(prefix + junk)


@FUZZ
@given(edits())
@example(changes=[(17153, b"\n", 1)])  # found by the long run: a line break in a store dir
def test_fuzz_bundle_reader_mutated_export(changes: list[tuple[int, bytes, int]]) -> None:
    check_bundle(mutate(EXPORT, changes))


@pytest.mark.parametrize("store_dir", ["/nix\nstore", "/nix/../st", "/nix/./sto", "/nix\x7fstore"])
def test_bundles_naming_odd_store_directories_are_refused(store_dir: str) -> None:
    """Found by the long fuzz run: a line break in the store directory of an item's path was
    accepted (so would ".." be). Same length as /nix/store: the bundle is otherwise intact."""
    assert len(store_dir) == len(STORE)
    with pytest.raises(ArchiveError, match="is not a store path"):
        read_all(EXPORT.replace(STORE.encode(), store_dir.encode(), 1))


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A directory for the output-store fuzzing: a tmpfs when possible (thousands of small
    files), removed at the end."""
    with tempfile.TemporaryDirectory() as directory:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", directory],
            capture_output=True, check=False,
        ).returncode == 0
        try:
            yield Path(directory)
        finally:
            if mounted:
                subprocess.run(["umount", "--lazy", directory], check=False)


def files_under(root: Path) -> set[str]:
    found = set()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(directory, name), root))
    return found


@FUZZ
@given(edits())
def test_fuzz_output_store_import_keeps_nothing_it_should_not(
    scratch: Path, changes: list[tuple[int, bytes, int]]
) -> None:
    """A corrupted bundle fetched from a machine: an ArchiveError, and the output store is
    left exactly as it was; or, when the nars still match what the machine reported (a change
    in an item's trailer, say), the outputs are stored under nar/ and nowhere else, each one
    the very nar the machine reported."""
    good = read_all(EXPORT)
    expected = [item.path for item in good]
    reported = {
        item.path: ("sha256:" + nar.nix_base32_encode(item.nar_sha256), item.nar_size)
        for item in good
    }
    store_root = scratch / "outputs"
    store = OutputStore(str(store_root))
    bundle = scratch / "fetched.bundle"
    bundle.write_bytes(mutate(EXPORT, changes))
    before = files_under(store_root)
    try:
        records = store.import_bundle(str(bundle), expected, reported, expected[0])
    except ArchiveError:
        assert files_under(store_root) == before
        return
    finally:
        assert os.listdir(store.tmp_dir) == []
    assert sorted(record.path for record in records) == sorted(expected)
    for record in records:
        kept = Path(store.stored_nar(record.file))
        assert kept.parent == store_root / "nar"
        data = kept.read_bytes()
        assert ("sha256:" + nar.nix_base32_encode(hashlib.sha256(data).digest()), len(data)) \
            == reported[record.path]
        store.remove(record.path, record.file)


@FUZZ
@given(st.sampled_from(NARS), edits())
def test_fuzz_nar_restore_stays_inside_its_directory(
    scratch: Path, data: bytes, changes: list[tuple[int, bytes, int]]
) -> None:
    """Unpacking a corrupted nar: an ArchiveError and nothing left, or files under the
    destination only (symlinks are made, never followed)."""
    area = Path(tempfile.mkdtemp(dir=scratch))
    try:
        dest = area / "dest"
        try:
            nar.restore_nar(io.BytesIO(mutate(data, changes)), dest)
        except ArchiveError:
            assert files_under(area) == set()
            return
        assert all(p == "dest" or p.startswith("dest/") for p in files_under(area))
    finally:
        subprocess.run(["rm", "-rf", str(area)], check=True)


@FUZZ
@given(HOSTILE)
def test_fuzz_output_store_paths_stay_inside_the_store(scratch: Path, name: str) -> None:
    """Whatever a store path holds, the files of the output store it names are inside it."""
    store = OutputStore(str(scratch / "paths"))
    root = os.path.realpath(store.root)
    for path in (f"{STORE}/{'a' * 32}-{name}", f"{STORE}/{name}", name):
        nar_of = functools.partial(store.nar_path, nar_hash="sha256:" + "0" * 52)
        for compute in (nar_of, store.narinfo_path, store.log_path):
            try:
                where = compute(path)
            except (ArchiveError, ValueError):
                continue
            assert "\n" not in where
            assert os.path.commonpath([os.path.realpath(where), root]) == root, where


# --- nothing reaches a shell unquoted ------------------------------------------------------

# A stand-in for nix-store and guix: prints each argument, then its stdin, NUL-terminated.
ECHO_ARGUMENTS = """#!/bin/sh
for word in "$@"; do printf '%s\\0' "$word"; done
if [ -n "$ECHO_STDIN" ]; then cat; printf '\\0'; fi
"""


@pytest.fixture(scope="module")
def fake_store_bin(scratch: Path) -> Path:
    bin_dir = scratch / "bin"
    bin_dir.mkdir()
    for name in ("nix-store", "guix"):
        (bin_dir / name).write_text(ECHO_ARGUMENTS)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_like_sshd(command: Command, bin_dir: Path, cwd: Path) -> bytes:
    """What a machine does with it: sshd hands the command string to the login shell
    (`sh -c`), which runs buildfarm/ssh/remote.py's process-group wrapper around the quoted argv."""
    done = subprocess.run(
        ["/bin/sh", "-c", _GROUP_WRAPPER + shlex.join(command.argv)], input=command.stdin,
        capture_output=True, cwd=cwd, check=False, timeout=30,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "ECHO_STDIN": "1" if command.stdin else ""},
    )
    assert done.returncode == 0, done.stderr
    pgid, _, rest = done.stdout.partition(b"\n")
    assert pgid.isdigit()
    return rest


def words(*items: str | bytes) -> bytes:
    return b"".join((i.encode() if isinstance(i, str) else i) + b"\0" for i in items)


def arguments(command: Command) -> list[str]:
    """The words the store program gets: past `env VAR=VALUE...` (Guix's locale) and itself."""
    argv = list(command.argv)
    if argv[0] == "env":
        argv = argv[1:]
        while "=" in argv[0]:
            argv = argv[1:]
    return argv[1:]


@SHELL_FUZZ
@given(st.lists(HOSTILE.map(lambda t: "/" + t), min_size=1, max_size=3), HOSTILE,
       st.sampled_from(["nix", "guix"]))
def test_fuzz_hostile_paths_reach_the_store_commands_verbatim(
    fake_store_bin: Path, scratch: Path, paths: list[str], file: str, store: str
) -> None:
    """Store paths and file names with metacharacters, quotes and line breaks arrive at the
    store command as the very words they were, or the backend refuses them (UsageError)."""
    backend = get_backend(store)
    cwd = Path(tempfile.mkdtemp(dir=scratch))
    try:
        with contextlib.suppress(UsageError):
            command = backend.missing(paths)
            got = run_like_sshd(command, fake_store_bin, cwd)
            assert got == words(*arguments(command), *([command.stdin] if command.stdin else []))
            assert command.stdin is None or command.stdin == "".join(
                f"{p}\n" for p in paths).encode()
        for command in (backend.delete(paths), backend.dry_run(paths[0]),
                        backend.build(paths[0], max_silent_time=10, timeout=20)):
            assert paths[0] in command.argv
            assert run_like_sshd(command, fake_store_bin, cwd) == words(*arguments(command))
        hashed = run_like_sshd(backend.nar_hash(paths[0]), fake_store_bin, cwd)
        asked = (["--query", "--hash", paths[0], "--query", "--size", paths[0]] if store == "nix"
                 else ["hash", "--serializer=nar", "--hash=sha256", "--format=nix-base32",
                       paths[0]])
        assert hashed == words(*asked)  # Nix's two queries run in turn, each on the very path
        target = f"out {file}".replace("/", "_")
        command = backend.export_to_file(paths, target)
        assert run_like_sshd(command, fake_store_bin, cwd) == b""  # all of it went to the file
        exported = (cwd / target).read_bytes().split(b"\0")[:-1]
        assert exported[-len(paths):] == [p.encode() for p in paths]
        assert os.listdir(cwd) == [target]  # and nothing else was created
    finally:
        subprocess.run(["rm", "-rf", str(cwd)], check=True)


def test_nul_bytes_are_refused_before_any_command_exists() -> None:
    for store in ("nix", "guix"):
        backend = get_backend(store)
        with pytest.raises(UsageError):
            backend.delete(["/nix/store/a\0b"])
        with pytest.raises(UsageError):
            backend.export_to_file(["/nix/store/ab"], "file\0name")
        with pytest.raises(BuildfarmError):
            Command(("nix-store", "a\0b"))
