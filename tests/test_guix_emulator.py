"""The `guix` test double against a real (private) Nix store: Guix's exact lines and statuses.

Every expected line below is Guix's, from its source (see tests/guix_emulator/guix.py); the
store work is real: builds, exports, imports and deletions go through nix-store. What the
emulator writes is checked against Nix (its nars, its imports) and against buildfarm's readers,
an independent implementation: the emulator itself imports nothing of buildfarm.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import io
import os
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from guix_emulator import PACKAGE, install_emulator
from substitutes import SubstituteServer, substitute_server
from testbed import current_system, instantiate, nix_expr_trivial

from buildfarm.formats import derivation, nar
from buildfarm.formats.signing import guix_public_key_from_sexp, verify_guix

LOG_DIR = Path("/nix/var/log/nix/drvs")
HASH_MISMATCH = (
    "guix archive: error: signed hash doesn't match actual contents of imported archive; "
    "archive could be corrupt, or someone is trying to import a Trojan horse"
)


@dataclass(frozen=True)
class Result:
    status: int
    out: bytes
    err: str

    @property
    def stdout(self) -> str:
        return self.out.decode()

    @property
    def lines(self) -> list[str]:
        return self.err.splitlines()


Guix = Callable[..., Result]


@pytest.fixture
def guix(tmp_path: Path) -> Guix:
    """Run the installed emulator: guix("build", drv, stdin=b"", config=dir)."""
    program = install_emulator(tmp_path / "bin")

    def run(*args: str, stdin: bytes = b"", config: Path | None = None,
            env: Mapping[str, str] | None = None) -> Result:
        environment = {**os.environ, **(env or {})}
        environment["GUIX_CONFIGURATION_DIRECTORY"] = str(config or tmp_path / "no-config")
        environment.pop("GUIX_BUILD_OPTIONS", None)
        done = subprocess.run([str(program), *args], input=stdin, capture_output=True,
                              env=environment, check=False)
        return Result(done.returncode, done.stdout, done.stderr.decode())

    return run


@pytest.fixture
def store(private_nix: Path) -> Callable[..., str]:
    """Make derivations with names unique to this test: store("dep", "echo hi > $out")."""
    token = uuid.uuid4().hex[:10]

    def make(name: str, script: str, **attrs: str) -> str:
        return instantiate(nix_expr_trivial(f"{name}-{token}", script, attrs=attrs))

    return make


def expr(name: str, script: str, **attrs: str) -> str:
    return nix_expr_trivial(name, script, attrs=attrs)


def outputs(drv: str) -> list[str]:
    done = subprocess.run(["nix-store", "-q", "--outputs", drv], capture_output=True,
                          text=True, check=True)
    return done.stdout.split()


def invalid(*paths: str) -> list[str]:
    done = subprocess.run(["nix-store", "--check-validity", "--print-invalid", *paths],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def nix_dump(path: str) -> bytes:
    return subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True).stdout


def log_line(drv: str) -> str:
    base = os.path.basename(drv)
    log = LOG_DIR / base[:2] / base[2:]
    found = next(p for p in (Path(f"{log}.gz"), Path(f"{log}.bz2"), log) if p.exists())
    return f"View build log at '{found}'."


def input_drv(drv: str) -> str:
    """The (only) input derivation of a .drv file."""
    ((path, _),) = derivation.read(drv).input_drvs
    return path


def top_and_dep(store: Callable[..., str], script: str = "echo dependency > $out") -> tuple[
        str, str]:
    top = store("top", "echo $dep > $out", dep=expr(f"dep-{uuid.uuid4().hex[:8]}", script))
    return top, input_drv(top)


def keys(guix: Guix, tmp_path: Path) -> tuple[Path, Path]:
    """Host A with a key pair, host B authorizing it."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert guix("archive", "--generate-key", config=a).status == 0
    public = (a / "signing-key.pub").read_bytes()
    assert guix("archive", "--authorize", stdin=public, config=b).status == 0
    return a, b


# --- the command line, no store needed --------------------------------------------------------


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, at any depth (lazy imports count); relative ones as '.'."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append("." if node.level else node.module or "")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                node.func, "id", None)) in ("import_module", "__import__"):
            names.append("<dynamic import>")
    return names


def test_the_emulator_imports_only_the_standard_library_and_itself() -> None:
    """A double built from the code it judges shares its bugs: the emulator must not import
    buildfarm (nor anything else outside the standard library, which could)."""
    allowed = set(sys.stdlib_module_names) | {"guix_emulator", "."}
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 10, files
    for path in files:
        for name in imported_modules(path):
            assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_version_unknown_commands_and_bad_options(guix: Guix) -> None:
    version = guix("--version")
    assert (version.status, version.stdout.splitlines()[0]) == (0, "guix (GNU Guix) 1.4.0")
    assert guix("build", "-V").stdout.splitlines()[0] == "guix build (GNU Guix) 1.4.0"
    missing = guix("frobnicate")
    assert (missing.status, missing.lines) == (
        1, ["guix: frobnicate: command not found", "Try `guix --help' for more information."])
    assert guix("--frob").lines == [
        "guix: unrecognized option '--frob'", "Try `guix --help' for more information."]
    cases = {
        ("build", "--frob"): "guix build: error: frob: unrecognized option",
        ("build", "-nZ"): "guix build: error: Z: unrecognized option",
        ("build", "--max-silent-time", "5"):
            "guix build: error: invalid argument: Missing required argument after "
            "`--max-silent-time'",
        ("build", "--timeout=soon"): "guix build: error: soon: invalid number",
        ("build", "--cores=many"):
            "guix build: error: not a number: 'cores' option argument: many",
        ("build", "--no-grafts=yes"):
            "guix build: error: invalid argument: Extraneous argument after `--no-grafts'",
        ("archive",): "guix archive: error: either '--export' or '--import' must be specified",
        ("build", "hello"): "guix build: error: hello: unknown package",
    }
    for args, line in cases.items():
        result = guix(*args)
        assert (result.status, result.lines, result.out) == (1, [line], b""), args
    emulated_not = guix("pull")
    assert emulated_not.status == 2
    assert emulated_not.lines == ["guix-emulator: command 'guix pull' is not emulated"]


def test_install_emulator_writes_an_executable_wrapper(tmp_path: Path) -> None:
    wrapper = install_emulator(tmp_path / "deep" / "bin", python="/usr/bin/python3")
    assert wrapper == tmp_path / "deep" / "bin" / "guix"
    assert os.access(wrapper, os.X_OK)
    tests = Path(__file__).resolve().parent
    assert wrapper.read_text().splitlines() == [
        "#!/bin/sh", f'exec /usr/bin/python3 {tests}/guix_emulator/guix.py "$@"']
    # Run with no PYTHONPATH and from elsewhere: it finds its own modules, and only those.
    done = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True,
                          check=False, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert (done.returncode, done.stdout.splitlines()[0]) == (0, "guix (GNU Guix) 1.4.0")


# --- guix build -------------------------------------------------------------------------------


def test_dry_run_prints_guix_plan_on_stderr_and_nothing_on_stdout(
    guix: Guix, store: Callable[..., str]
) -> None:
    top, dep = top_and_dep(store)
    dry = guix("build", "--dry-run", "--no-grafts", top)
    assert (dry.status, dry.out) == (0, b"")
    assert dry.lines == ["The following derivations would be built:", f"   {top}", f"   {dep}"]
    assert invalid(*outputs(top)) == outputs(top)  # nothing was built
    single = store("single", "echo one > $out")
    assert guix("build", "-n", single).lines == [
        "The following derivation would be built:", f"   {single}"]
    assert guix("build", "-n", "-q", single).lines == []


def test_build_streams_the_log_and_prints_outputs_then_dry_run_is_a_no_op(
    guix: Guix, store: Callable[..., str]
) -> None:
    top, dep = top_and_dep(store)
    built = guix("build", "--no-grafts", "--max-silent-time=60", "--timeout=600", top)
    (out,) = outputs(top)
    assert (built.status, built.stdout) == (0, f"{out}\n")
    assert built.lines == [
        "The following derivations will be built:", f"   {top}", f"   {dep}",
        f"building {dep}...", f"successfully built {dep}",
        f"building {top}...", f"successfully built {top}",
    ]
    again = guix("build", "--dry-run", "--no-grafts", top)
    assert (again.status, again.stdout, again.err) == (0, f"{out}\n", "")


def test_outputs_follow_the_derivation_file_order(guix: Guix, store: Callable[..., str]) -> None:
    token = uuid.uuid4().hex[:8]
    multi = instantiate(
        f'derivation {{ name = "multi-{token}"; outputs = [ "out" "dev" "bin" ];'
        ' system = builtins.currentSystem; builder = "/bin/sh";'
        ' args = [ "-c" "echo builder says hi; echo a > $out; echo b > $dev; echo c > $bin" ]; }')
    built = guix("build", multi)
    ordered = sorted(outputs(multi), key=lambda p: (not p.endswith("-bin"),
                                                    not p.endswith("-dev")))
    assert built.stdout == "".join(f"{p}\n" for p in ordered)  # bin, dev, out
    assert "builder says hi" in built.lines
    quiet = guix("build", "-q", multi)
    assert (quiet.status, quiet.err, quiet.stdout) == (0, "", built.stdout)


def test_failing_builder_gives_the_daemon_and_client_lines(
    guix: Guix, store: Callable[..., str]
) -> None:
    bad = store("bad", "echo about to fail; exit 3")
    failed = guix("build", "--no-grafts", bad)
    assert (failed.status, failed.out) == (1, b"")
    assert failed.lines == [
        "The following derivation will be built:", f"   {bad}",
        f"building {bad}...",
        "about to fail",
        f"builder for `{bad}' failed with exit code 3",
        f"build of {bad} failed",
        log_line(bad),
        f"guix build: error: build of `{bad}' failed",
    ]


def test_a_failed_dependency_fails_the_requested_derivation(
    guix: Guix, store: Callable[..., str]
) -> None:
    top, dep = top_and_dep(store, "exit 1")
    failed = guix("build", top)
    assert (failed.status, failed.out) == (1, b"")
    assert failed.lines == [
        "The following derivations will be built:", f"   {top}", f"   {dep}",
        f"building {dep}...",
        f"builder for `{dep}' failed with exit code 1",
        f"build of {dep} failed",
        log_line(dep),
        f"cannot build derivation `{top}': 1 dependencies couldn't be built",
        f"guix build: error: build of `{top}' failed",
    ]


def test_silence_and_total_timeouts(guix: Guix, store: Callable[..., str]) -> None:
    slow = store("silent", "echo started; /bin/sleep 120; echo x > $out")
    silent = guix("build", "--max-silent-time=1", slow)
    assert (silent.status, silent.out) == (1, b"")
    assert silent.lines[-5:] == [
        "started",
        f"building of `{slow}' timed out after 1 seconds of silence",
        f"build of {slow} failed",
        log_line(slow),
        f"guix build: error: build of `{slow}' failed",
    ]
    total = guix("build", "--timeout=1", slow)
    assert total.status == 1
    assert f"building of `{slow}' timed out after 1 seconds" in total.lines
    assert total.lines[-1] == f"guix build: error: build of `{slow}' failed"


def test_missing_derivation(guix: Guix, private_nix: Path) -> None:
    drv = f"/nix/store/{'0' * 32}-nowhere-{uuid.uuid4().hex[:8]}.drv"
    for args in (("build", drv), ("build", "--dry-run", drv)):
        result = guix(*args)
        assert (result.status, result.out) == (1, b"")
        assert result.lines == [
            f"cannot build missing derivation ‘{drv}’",  # noqa: RUF001
            f"guix build: error: build of `{drv}' failed",
        ]


# --- guix archive -----------------------------------------------------------------------------


def test_missing_lists_invalid_paths_in_input_order(guix: Guix, store: Callable[..., str]) -> None:
    built = store("present", "echo here > $out")
    (out,) = outputs(built)
    assert guix("build", built).status == 0
    gone = f"/nix/store/{'1' * 32}-gone"
    also = f"/nix/store/{'2' * 32}-also-gone"
    result = guix("archive", "--missing", stdin=f"{also}\n{out}\n{gone}\n{also}\n".encode())
    assert (result.status, result.stdout, result.err) == (0, f"{also}\n{gone}\n{also}\n", "")
    bad = guix("archive", "--missing", stdin=f"{gone}\n/tmp/x\n".encode())
    assert (bad.status, bad.out, bad.lines) == (
        1, b"", ["guix archive: error: path `/tmp/x' is not in the store"])
    blank = guix("archive", "--missing", stdin=f"{gone}\n\n".encode())
    assert blank.lines == ["guix archive: error: path `' is not in the store"]


def test_generate_key_and_authorize(guix: Guix, tmp_path: Path) -> None:
    a = tmp_path / "a"
    made = guix("archive", "--generate-key", config=a)
    assert (made.status, made.out) == (0, b"")
    assert made.lines == ["Please wait while gathering entropy to generate the key pair;",
                          "this may take time..."]
    public = (a / "signing-key.pub").read_text()
    assert public.startswith("(public-key \n (ecc \n  (curve Ed25519)\n  (q #")
    assert public.endswith("#)\n  )\n )\n")
    assert (a / "signing-key.sec").read_text().startswith("(private-key \n (ecc \n")
    assert (a / "signing-key.pub").stat().st_mode & 0o777 == 0o444
    assert (a / "signing-key.sec").stat().st_mode & 0o777 == 0o400
    again = guix("archive", "--generate-key", config=a)
    assert (again.status, again.lines) == (
        1, [f"guix archive: error: key pair exists under '{a}'; remove it first"])
    b = tmp_path / "b"
    for _ in range(2):  # authorizing twice keeps one entry
        assert guix("archive", "--authorize", stdin=public.encode(), config=b).status == 0
    indented = "".join(f"  {line}\n" for line in public.splitlines())
    assert (b / "acl").read_text() == (
        f"(acl \n (entry \n{indented}  (tag \n   (guix import)\n   )\n  )\n )\n")
    assert (b / "acl").stat().st_mode & 0o777 == 0o644
    junk = guix("archive", "--authorize", stdin=b"(foo bar)", config=b)
    assert (junk.status, junk.lines) == (
        1, ["guix archive: error: s-expression does not denote a public key"])


def test_export_import_round_trip_between_two_hosts(
    guix: Guix, store: Callable[..., str], tmp_path: Path
) -> None:
    a, b = keys(guix, tmp_path)
    top, dep = top_and_dep(store)
    (out,) = outputs(top)
    assert guix("build", top).status == 0
    (dep_out,) = outputs(dep)
    exported = guix("archive", "--export", "-r", out, config=a)
    assert (exported.status, exported.err) == (0, "")
    q = guix_public_key_from_sexp((a / "signing-key.pub").read_text())
    nars: dict[int, io.BytesIO] = {}
    items = list(nar.read_bundle(io.BytesIO(exported.out), lambda i: nars.setdefault(
        i, io.BytesIO())))
    assert [item.path for item in items] == [dep_out, out]  # references first
    for index, item in enumerate(items):
        assert nars[index].getvalue() == nix_dump(item.path)  # the nar is Nix's, byte for byte
        assert item.signature is not None
        verify_guix(item.signature, item.signed_sha256, [q])
    only = guix("archive", "--export", out, config=a)
    assert [i.path for i in nar.read_bundle(io.BytesIO(only.out))] == [out]

    deleted = guix("gc", "--delete", dep_out)  # takes its unrooted referrer along
    assert (deleted.status, deleted.lines) == (
        0, ["finding garbage collector roots...", "deleting unused links..."])
    assert guix("archive", "--missing", stdin=f"{out}\n".encode()).stdout == f"{out}\n"

    imported = guix("archive", "--import", stdin=exported.out, config=b)
    assert (imported.status, imported.out, imported.err) == (0, b"", "")
    assert guix("archive", "--missing", stdin=f"{dep_out}\n{out}\n".encode()).stdout == ""
    assert Path(out).read_text() == f"{dep_out}\n"
    assert guix("gc", "--references", out).stdout == f"{dep_out}\n"
    assert guix("gc", "--requisites", out).stdout == f"{dep_out}\n{out}\n"
    assert guix("gc", "--referrers", dep_out).stdout == f"{out}\n"


def test_export_errors_and_the_empty_archive(guix: Guix, store: Callable[..., str],
                                             tmp_path: Path) -> None:
    empty = guix("archive", "--export", config=tmp_path)
    assert (empty.status, empty.out, empty.lines) == (0, bytes(8), [
        "guix archive: warning: no arguments specified; creating an empty archive"])
    gone = f"/nix/store/{'3' * 32}-never-built"
    invalid = guix("archive", "--export", gone, config=tmp_path)
    assert (invalid.status, invalid.out, invalid.lines) == (
        1, b"", [f"guix archive: error: path `{gone}' is not valid"])
    drv = store("export-me", "echo x > $out")
    no_key = guix("archive", "--export", drv, config=tmp_path / "keyless")
    assert (no_key.status, no_key.lines) == (1, [
        f"guix archive: error: getting status of `{tmp_path}/keyless/signing-key.sec': "
        "No such file or directory"])
    # The daemon checks the key once the item is written up to its signature marker, and the
    # client has passed those bytes on ([LS] exportPath, checkSecrecy).
    one = struct.pack("<Q", 1)
    assert no_key.out.startswith(one + nix_dump(drv)) and no_key.out.endswith(one)
    assert drv.encode() in no_key.out


def test_unsigned_unauthorized_and_tampered_imports_are_refused(
    guix: Guix, store: Callable[..., str], tmp_path: Path
) -> None:
    a, b = keys(guix, tmp_path)
    marker = uuid.uuid4().hex
    drv = store("payload", f"echo {marker} > $out")
    assert guix("build", drv).status == 0
    (out,) = outputs(drv)
    signed = guix("archive", "--export", out, config=a).out
    unsigned = subprocess.run(["nix-store", "--export", out], capture_output=True,
                              check=True).stdout
    assert guix("gc", "-D", out).status == 0

    refused = guix("archive", "--import", stdin=unsigned, config=b)
    assert (refused.status, refused.out, refused.lines) == (1, b"", [
        f"guix archive: error: imported archive of `{out}' lacks a signature"])

    stranger = guix("archive", "--import", stdin=signed, config=tmp_path / "stranger")
    public = (a / "signing-key.pub").read_text()
    assert stranger.status == 1
    assert stranger.err == f"guix archive: error: unauthorized public key: {public}\n"

    tampered = signed.replace(marker.encode(), marker.upper().encode())
    assert tampered != signed
    corrupt = guix("archive", "--import", stdin=tampered, config=b)
    assert (corrupt.status, corrupt.lines) == (1, [HASH_MISMATCH])

    item = next(nar.read_bundle(io.BytesIO(signed)))
    assert item.signature is not None
    r_line = next(line for line in item.signature.splitlines() if line.startswith(b"   (r #"))
    forged_r = r_line[:-3] + (b"0" if r_line[-3:-2] != b"0" else b"1") + r_line[-2:]
    forged = signed.replace(r_line, forged_r)
    invalid = guix("archive", "--import", stdin=forged, config=b)
    assert invalid.status == 1
    assert invalid.err.startswith("guix archive: error: invalid signature: (signature \n")

    junk = guix("archive", "--import", stdin=b"\x07" + bytes(7), config=b)
    assert junk.lines == ["guix archive: error: input doesn't look like something created by "
                          "`nix-store --export'"]
    assert guix("archive", "--missing", stdin=f"{out}\n".encode()).stdout == f"{out}\n"
    accepted = guix("archive", "--import", stdin=signed, config=b)
    assert (accepted.status, accepted.err) == (0, "")


# --- guix gc and guix hash ------------------------------------------------------------------


def test_gc_refuses_to_delete_a_live_path(guix: Guix, store: Callable[..., str]) -> None:
    top, dep = top_and_dep(store)
    assert guix("build", top).status == 0
    (out,), (dep_out,) = outputs(top), outputs(dep)
    root = Path("/nix/var/nix/gcroots") / f"emulator-test-{uuid.uuid4().hex}"
    root.symlink_to(out)
    try:
        live = guix("gc", "--delete", dep_out)
        assert (live.status, live.out, live.lines) == (1, b"", [
            "finding garbage collector roots...",
            f"guix gc: error: cannot delete path `{dep_out}' since it is still alive",
        ])
    finally:
        root.unlink()
    not_store = guix("gc", "-D", "/tmp/elsewhere")
    assert not_store.lines == ["finding garbage collector roots...",
                               "guix gc: error: path `/tmp/elsewhere' is not in the store"]
    assert guix("gc", "--derivers", out).stdout == f"{top}\n"
    done = guix("gc", "-D", f"{dep_out}/sub/file")  # direct-store-path strips the rest
    assert done.status == 0
    missing = guix("archive", "--missing", stdin=f"{dep_out}\n{out}\n".encode())
    assert missing.stdout == f"{dep_out}\n{out}\n"


def test_hash_of_the_nar_matches_nix(guix: Guix, store: Callable[..., str]) -> None:
    drv = store("hash-me", "echo hashed > $out")
    assert guix("build", drv).status == 0
    (out,) = outputs(drv)
    nix = subprocess.run(["nix-store", "-q", "--hash", out], capture_output=True, text=True,
                         check=True).stdout.strip()
    result = guix("hash", "--serializer=nar", "--hash=sha256", "--format=nix-base32", out)
    assert (result.status, result.err, f"sha256:{result.stdout}") == (0, "", f"{nix}\n")
    flat = guix("hash", "-f", "hex", out)
    assert flat.stdout == f"{hashlib.sha256(Path(out).read_bytes()).hexdigest()}\n"
    nowhere = guix("hash", "/nonexistent/file")
    assert nowhere.lines == ["guix hash: error: /nonexistent/file No such file or directory"]


# --- substitutes, the daemon's conditions, languages, offloading -------------------------------


@pytest.fixture
def served(tmp_path: Path, private_nix: Path) -> Iterator[SubstituteServer]:
    """A real substitute server: buildfarm's own output store and publish server."""
    del private_nix
    with substitute_server(tmp_path / "served") as server:
        yield server


def authorizing(guix: Guix, config: Path, server: SubstituteServer) -> Path:
    """A configuration directory whose ACL authorizes the server's key."""
    done = guix("archive", "--authorize", stdin=server.key.guix_public_sexp().encode(),
                config=config)
    assert done.status == 0, done.err
    return config


def built_then_served(guix: Guix, store: Callable[..., str], server: SubstituteServer
                      ) -> tuple[str, str, str, str]:
    """top and dep built here, their outputs served, then deleted here: (top, dep, top's
    output, dep's output), none of the outputs valid."""
    top, dep = top_and_dep(store)
    assert guix("build", top).status == 0
    (top_out,), (dep_out,) = outputs(top), outputs(dep)
    server.offer([dep_out, top_out])
    subprocess.run(["nix-store", "--delete", top_out, dep_out], capture_output=True, check=True)
    assert invalid(top_out, dep_out) == [top_out, dep_out]
    return top, dep, top_out, dep_out


def nar_url(server: SubstituteServer, path: str) -> str:
    """The gzip nar the server's narinfo of `path` names."""
    info = server.store.read_narinfo(path)
    assert info is not None
    (url,) = [f.url for f in info.files if f.compression == "gzip"]
    return f"{server.url}/{url}"


def nar_line(server: SubstituteServer, path: str) -> str:
    return f"downloading from {nar_url(server, path)} ..."


def test_substitutes_come_before_building_and_say_where_they_come_from(
    guix: Guix, store: Callable[..., str], served: SubstituteServer, tmp_path: Path
) -> None:
    """[D] derivation-build-plan with the substitution oracle, [UI] show-what-to-build's
    download list, [ST] the download lines; nothing is built."""
    top, _, top_out, dep_out = built_then_served(guix, store, served)
    config = authorizing(guix, tmp_path / "config", served)
    urls = f"--substitute-urls={served.url}"
    plan = guix("build", "--dry-run", urls, top, config=config)
    assert (plan.status, plan.out) == (0, b"")
    assert plan.lines[0].endswith(" MB would be downloaded:")
    assert plan.lines[1:] == [f"  {top_out}", f"  {dep_out}"]
    assert invalid(top_out, dep_out) == [top_out, dep_out]
    done = guix("build", urls, top, config=config)
    assert (done.status, done.stdout) == (0, f"{top_out}\n")
    assert done.lines[3:] == [
        f"substituting {dep_out}...", nar_line(served, dep_out),
        f"substituting {top_out}...", nar_line(served, top_out)]
    assert invalid(top_out, dep_out) == []
    assert not any(line.startswith("building ") for line in done.lines)


def test_no_substitutes_and_unauthorized_servers_mean_building(
    guix: Guix, store: Callable[..., str], served: SubstituteServer, tmp_path: Path
) -> None:
    top, dep, top_out, _ = built_then_served(guix, store, served)
    urls = f"--substitute-urls={served.url}"
    stranger = tmp_path / "unauthorized"  # its ACL: its own key only ([PKI] ensure-acl)
    assert guix("archive", "--generate-key", config=stranger).status == 0
    for args, config in (((urls, top), stranger),
                         (("--no-substitutes", urls, top), authorizing(guix, tmp_path / "c",
                                                                        served))):
        plan = guix("build", "--dry-run", *args, config=config)
        assert plan.lines == ["The following derivations would be built:", f"   {top}",
                              f"   {dep}"]
    built = guix("build", "--no-substitutes", urls, top, config=tmp_path / "c")
    assert built.status == 0 and f"building {top}..." in built.lines
    assert not any("substituting" in line for line in built.lines)
    assert invalid(top_out) == []


def test_a_failing_substitute_fails_the_build_unless_fallback(
    guix: Guix, store: Callable[..., str], served: SubstituteServer, tmp_path: Path
) -> None:
    """[SU] process-substitution: the nar's download fails (404), no other URL has it; [BC]
    outputsSubstituted: without --fallback the build stops with its hint; with it, it builds."""
    top, dep, top_out, dep_out = built_then_served(guix, store, served)
    nar = nar_url(served, dep_out)
    served.break_nars()
    config = authorizing(guix, tmp_path / "config", served)
    urls = f"--substitute-urls={served.url}"
    failed = guix("build", urls, top, config=config)
    assert (failed.status, failed.out) == (1, b"")
    nar = nar_url(served, dep_out)
    assert failed.lines[3:] == [
        f"substituting {dep_out}...",
        nar_line(served, dep_out),
        f"guix substitute: warning: download from '{nar}' failed: 404, \"Not Found\"",
        f"retrying download of '{dep_out}' with other substitute URLs...",
        nar_line(served, dep_out),
        f"guix substitute: warning: download from '{nar}' failed: 404, \"Not Found\"",
        f"guix substitute: error: failed to find alternative substitute for '{dep_out}'",
        f"substitution of {dep_out} failed",
        f"guix build: error: some substitutes for the outputs of derivation `{top}' failed "
        "(usually happens due to networking issues); try `--fallback' to build derivation "
        "from source ",
    ]
    assert invalid(top_out, dep_out) == [top_out, dep_out]
    fallen_back = guix("build", "--fallback", urls, top, config=config)
    assert fallen_back.status == 0, fallen_back.err
    assert f"building {dep}..." in fallen_back.lines and f"building {top}..." in fallen_back.lines
    assert invalid(top_out, dep_out) == []


def test_store_items_are_substituted_and_a_failure_named(
    guix: Guix, store: Callable[..., str], served: SubstituteServer, tmp_path: Path
) -> None:
    """[B] store items are handed to the daemon ([BC] buildPaths: SubstitutionGoals); one no
    server offers is no failure (ecNoSubstituters); with --keep-going one that fails does not
    stop the others, and [BC] names it."""
    _, _, top_out, dep_out = built_then_served(guix, store, served)
    config = authorizing(guix, tmp_path / "config", served)
    urls = f"--substitute-urls={served.url}"
    nowhere = f"/nix/store/{'3' * 32}-nowhere"
    done = guix("build", "--keep-going", urls, nowhere, top_out, config=config)
    assert (done.status, done.out) == (0, b"")
    assert invalid(top_out, dep_out, nowhere) == [nowhere]
    subprocess.run(["nix-store", "--delete", top_out, dep_out], capture_output=True, check=True)
    served.break_nars()
    failed = guix("build", "--keep-going", urls, top_out, config=config)
    assert failed.status == 1
    assert failed.lines[-2:] == [f"substitution of {dep_out} failed",
                                 f"guix build: error: build of `{top_out}' failed"]


def test_a_daemon_that_is_down(guix: Guix, store: Callable[..., str], tmp_path: Path) -> None:
    """[S] open-connection, [UI]: "failed to connect to `SOCKET': STRERROR", exit 1, for
    every command that talks to the daemon; key operations and hashes do not."""
    drv = store("unbuilt", "echo x > $out")
    state = tmp_path / "state"
    state.mkdir()
    env = {"GUIX_STATE_DIRECTORY": str(state)}
    socket = state / "daemon-socket" / "socket"
    line = f"failed to connect to `{socket}': No such file or directory"
    for command, stdin in ((("build", drv), b""), (("build", "-n", drv), b""),
                           (("archive", "--missing"), f"{drv}\n".encode()),
                           (("archive", "--import"), b""), (("gc", "--references", drv), b"")):
        done = guix(*command, stdin=stdin, env=env)
        assert (done.status, done.out, done.lines) == (
            1, b"", [f"guix {command[0]}: error: {line}"]), command
    assert guix("archive", "--generate-key", config=tmp_path / "k", env=env).status == 0
    socket.parent.mkdir()
    socket.touch()
    assert guix("archive", "--missing", stdin=f"{drv}\n".encode(), env=env).status == 0


def test_messages_in_the_users_language(guix: Guix, store: Callable[..., str],
                                        tmp_path: Path) -> None:
    """glibc's rule ([i18n]): LC_ALL, LC_MESSAGES, LANG; "C" ignores LANGUAGE; LANGUAGE first
    otherwise. The words are Guix's catalogues'; daemon errors stay English."""
    drv = store("translated", "echo x > $out")
    cases = {
        (("LANG", "de_DE.UTF-8"),): "Folgende Ableitung würde erstellt:",
        (("LC_ALL", "fr_FR.UTF-8"), ("LANG", "de_DE.UTF-8")):
            "La dérivation suivante serait compilée :",
        (("LANG", "de_DE.UTF-8"), ("LANGUAGE", "fr")): "La dérivation suivante serait compilée :",
        (("LC_ALL", "C"), ("LANGUAGE", "de")): "The following derivation would be built:",
        (("LC_ALL", "C.UTF-8"), ("LANGUAGE", ""), ("LANG", "de_DE.UTF-8")):
            "The following derivation would be built:",
    }
    clean = {k: "" for k in ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE")}
    for settings, header in cases.items():
        done = guix("build", "--dry-run", drv, env={**clean, **dict(settings)})
        assert done.lines == [header, f"   {drv}"], settings
    state = tmp_path / "state"
    state.mkdir()
    down = guix("build", drv, env={**clean, "LANG": "de_DE.UTF-8",
                                   "GUIX_STATE_DIRECTORY": str(state)})
    assert down.lines == [f"guix build: Fehler: Verbindung zu „{state}/daemon-socket/socket“ "
                          "fehlgeschlagen: No such file or directory"]


def test_the_gc_lock_makes_the_daemon_wait(guix: Guix, store: Callable[..., str],
                                           tmp_path: Path) -> None:
    """[GCC] openGCLock: while a collection holds the lock, what adds temporary roots says
    "waiting for the big garbage collector lock..." and waits; it goes on once released."""
    drv = store("locked", "echo x > $out")
    state = tmp_path / "state"
    (state / "daemon-socket").mkdir(parents=True)
    (state / "daemon-socket" / "socket").touch()
    lock = os.open(state / "gc.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(lock, fcntl.LOCK_EX)  # as the collector holds it ([PL] lockFile, fcntl)
    environment = {**os.environ, "GUIX_STATE_DIRECTORY": str(state),
                   "GUIX_CONFIGURATION_DIRECTORY": str(tmp_path / "none")}
    program = install_emulator(tmp_path / "bin")
    waiting = subprocess.Popen([str(program), "build", drv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=environment)
    try:
        assert waiting.stderr is not None
        lines = [waiting.stderr.readline().decode() for _ in range(3)]
        assert lines[-1] == "waiting for the big garbage collector lock...\n", lines
        assert waiting.poll() is None
    finally:
        os.close(lock)  # the collection ends
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert out.decode() == "".join(f"{p}\n" for p in outputs(drv))


def test_offloading_with_a_machines_file_unless_no_offload(
    guix: Guix, store: Callable[..., str], tmp_path: Path
) -> None:
    """[B] (offload? . #t) by default: with /etc/guix/machines.scm the build hook takes the
    build ([ST] "offloading build of ~a to '~a'"); --no-offload keeps it here."""
    config = tmp_path / "config"
    config.mkdir()
    plain = store("here", "echo here > $out")
    done = guix("build", plain, config=config)
    assert done.status == 0 and not any("offloading" in line for line in done.lines)
    (config / "machines.scm").write_text(
        f'(list (build-machine (name "far") (host-name "far.example.org") '
        f'(systems (list "{current_system()}")) (host-key "ssh-ed25519 AAAA") (user "b")))\n')
    for name, options, offloaded in (("hooked", (), True), ("kept", ("--no-offload",), False)):
        drv = store(name, f"echo {name} > $out")
        done = guix("build", *options, drv, config=config)
        assert done.status == 0, done.err
        line = f"offloading build of {drv} to 'far.example.org'"
        assert (line in done.lines) == offloaded, done.lines


def test_check_plans_and_builds_the_derivation_again(guix: Guix,
                                                     store: Callable[..., str]) -> None:
    """[D] derivation-build-plan in check mode: the requested derivation counts as not built,
    so the plan goes on into its inputs."""
    top = store("copies", "read x < $dep; echo $x > $out",  # no reference to dep's output
                dep=expr(f"dep-{uuid.uuid4().hex[:8]}", "echo dep > $out"))
    dep = input_drv(top)
    assert guix("build", top).status == 0
    subprocess.run(["nix-store", "--delete", *outputs(dep)], capture_output=True, check=True)
    plan = guix("build", "--dry-run", top)
    assert (plan.status, plan.err, plan.stdout) == (0, "", f"{outputs(top)[0]}\n")
    checked = guix("build", "--dry-run", "--check", top)
    assert checked.lines == ["The following derivations would be built:", f"   {top}",
                             f"   {dep}"]
    assert guix("build", dep).status == 0
    rebuilt = guix("build", "--check", top)
    assert rebuilt.status == 0, rebuilt.err
    assert f"building {top}..." in rebuilt.lines
