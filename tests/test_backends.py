"""The store backends: argv builders and output parsers, checked against real stores and texts.

Real-store tests run every Command against a real Nix store (and a Guix emulator built on it).
Each command runs in a mount namespace of its own where a per-test directory is bind-mounted on
/nix, so the machine's own store is never touched, whoever runs the tests.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import needs
import pytest
from guix_emulator import install_emulator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildfarm.backends import Backend, Command, DryRun, get_backend
from buildfarm.backends.base import FAILURE_KINDS
from buildfarm.backends.guix import GuixBackend
from buildfarm.backends.nix import NixBackend
from buildfarm.errors import RemoteError, UsageError

GUIX = GuixBackend()
NIX = NixBackend()
BACKENDS: list[Backend] = [GUIX, NIX]

NIX_CONF = """\
sandbox = false
substituters =
experimental-features = nix-command
build-users-group =
sandbox-paths = /bin /lib /lib64 /usr
"""

G = "/gnu/store/"
DRV_A = G + "4ya1zaxbh5cyxvfk2mhsjsqpqxz2a8mj-a-1.0.drv"
DRV_B = G + "8yghd5kkjpk9ajmq3fbsbbl9wrmalpd5-b-1.0.drv"
OUT_C = G + "ph1a1kbhk5sbjl2x4vk39nnk7r8lbknd-c-2.1"
OUT_D = G + "zzz1kbhk5sbjl2x4vk39nnk7r8lbk000-d-0.1"
N = "/nix/store/"
NIX_A = N + "h0qb3wmwhkx4nsnnlp5janwnw1bz9ng8-a.drv"
NIX_B = N + "qikiw63j9vxs37ydbfp6nhkyp7g2c9i9-b.drv"
NIX_OUT = N + "i2150qc9fzhfqkkhx2055c8cvyhycj0m-b"
NIX32 = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"

HOSTILE_PATHS = [
    "/nix/store/aaaa-with space",
    "/nix/store/bbbb-'single'\"double\"",
    "/nix/store/cccc-$(touch /tmp/pwned)`id`",
    "/nix/store/dddd-semi;colon && rm -rf / ; echo",
    "/nix/store/eeee-new\nline",
    "/nix/store/ffff-glob*?[x]~{a,b}",
    "/nix/store/gggg-back\\slash\t-tab",
    "/nix/store/hhhh--option=1",
]


# --- get_backend and Command -----------------------------------------------------------------


def test_get_backend_knows_both_stores_and_nothing_else() -> None:
    assert isinstance(get_backend("guix"), GuixBackend)
    assert isinstance(get_backend("nix"), NixBackend)
    assert get_backend("guix").signed_imports is True
    assert get_backend("nix").signed_imports is False
    assert [get_backend(n).name for n in ("guix", "nix")] == ["guix", "nix"]
    for name in ("Guix", "", "lix", "nix "):
        with pytest.raises(ValueError, match="unknown store backend"):
            get_backend(name)


def test_command_refuses_empty_or_nul_argv() -> None:
    with pytest.raises(UsageError):
        Command(())
    with pytest.raises(UsageError, match="NUL"):
        Command(("guix", "a\0b"))


# --- dry-run plans ------------------------------------------------------------------------------


def guix_plan(*lines: str) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


def test_guix_plan_singular_and_plural_with_current_two_space_indent() -> None:
    one = guix_plan("The following derivation would be built:", f"  {DRV_A}")
    assert GUIX.parse_dry_run(b"", one) == DryRun((DRV_A,), ())
    two = guix_plan("The following derivations would be built:", f"  {DRV_A}", f"  {DRV_B}")
    assert GUIX.parse_dry_run(b"", two) == DryRun((DRV_A, DRV_B), ())


def test_guix_plan_older_lowercase_and_wider_indents() -> None:
    old = guix_plan("the following derivations would be built:", f"    {DRV_A}", f"    {DRV_B}")
    assert GUIX.parse_dry_run(b"", old).would_build == (DRV_A, DRV_B)
    older = guix_plan("The following derivation would be built:", f"   {DRV_B}")
    assert GUIX.parse_dry_run(b"", older).would_build == (DRV_B,)


def test_guix_plan_downloads_by_size_and_by_file_list() -> None:
    sized = guix_plan(
        "substitute: updating substitutes from 'https://ci.guix.gnu.org'... 100.0%",
        "The following derivation would be built:",
        f"  {DRV_B}",
        "12.3 MB would be downloaded:",
        f"  {OUT_C}",
        f"  {OUT_D}",
    )
    assert GUIX.parse_dry_run(b"", sized) == DryRun((DRV_B,), (OUT_C, OUT_D))
    unsized = guix_plan("The following file would be downloaded:", f"  {OUT_C}")
    assert GUIX.parse_dry_run(b"", unsized) == DryRun((), (OUT_C,))
    many = guix_plan("The following files would be downloaded:", f"  {OUT_C}", f"  {OUT_D}")
    assert GUIX.parse_dry_run(b"", many) == DryRun((), (OUT_C, OUT_D))
    grouped = guix_plan("1,234.5 MB would be downloaded:", f"  {OUT_D}")
    assert GUIX.parse_dry_run(b"", grouped).would_download == (OUT_D,)


def test_guix_plan_counts_grafts_and_profile_hooks_as_builds() -> None:
    text = guix_plan(
        "The following derivation would be built:",
        f"  {DRV_A}",
        "The following graft would be made:",
        f"   {DRV_B}",
        "The following profile hooks would be built:",
        f"   {G}11111111111111111111111111111111-hook.drv",
        f"   {G}22222222222222222222222222222222-hook.drv",
    )
    assert GUIX.parse_dry_run(b"", text).would_build == (
        DRV_A,
        DRV_B,
        G + "11111111111111111111111111111111-hook.drv",
        G + "22222222222222222222222222222222-hook.drv",
    )


def test_guix_plan_will_wording_colour_and_stdout_outputs_are_handled() -> None:
    coloured = (
        f"\x1b[1;33mThe following derivation will be built:\x1b[0m\n"
        f"  \x1b[2m{DRV_A[:44]}\x1b[0m{DRV_A[44:]}\n"
    ).encode()
    assert GUIX.parse_dry_run(b"", coloured).would_build == (DRV_A,)
    # Nothing to do: guix goes on and prints the outputs on stdout, which is not a plan.
    assert GUIX.parse_dry_run(f"{OUT_C}\n".encode(), b"") == DryRun((), ())


def test_guix_plan_that_cannot_be_read_raises() -> None:
    with pytest.raises(RemoteError, match="followed by no store paths"):
        GUIX.parse_dry_run(b"", guix_plan("The following derivation would be built:"))
    with pytest.raises(RemoteError, match="followed by no store paths"):
        GUIX.parse_dry_run(b"", guix_plan("3.0 MB would be downloaded:", "done"))
    with pytest.raises(RemoteError, match=r"not a \.drv"):
        GUIX.parse_dry_run(b"", guix_plan("The following derivation would be built:", f"  {OUT_C}"))


def test_a_plan_that_does_not_name_the_target_was_not_read() -> None:
    """The coordinator's dry runs always plan the target itself (under --check when its
    outputs are there): a plan in another language, or an empty one, cannot pass for "nothing
    else to build". German and French are Guix's own catalogues (po/guix/de.po, fr.po)."""
    english = guix_plan("The following derivations would be built:", f"  {DRV_B}", f"  {DRV_A}")
    assert GUIX.parse_dry_run(b"", english, DRV_A).would_build == (DRV_B, DRV_A)
    german = guix_plan("Folgende Ableitungen würden erstellt:", f"  {DRV_B}", f"  {DRV_A}")
    french = guix_plan("Les dérivations suivantes seraient compilées :", f"  {DRV_B}",
                       f"  {DRV_A}")
    for translated in (german, french, b""):
        assert GUIX.parse_dry_run(b"", translated) == DryRun((), ())  # no target: no check
        with pytest.raises(RemoteError, match="could not read the plan"):
            GUIX.parse_dry_run(b"", translated, DRV_A)
    with pytest.raises(RemoteError, match="could not read the plan"):
        NIX.parse_dry_run(b"", b"", NIX_A)
    assert NIX.parse_dry_run(b"", f"this derivation will be built:\n  {NIX_A}\n".encode(),
                             NIX_A).would_build == (NIX_A,)
    assert GUIX.dry_run_names_target(rebuild=True) and GUIX.dry_run_names_target(rebuild=False)
    assert NIX.dry_run_names_target(rebuild=False) and not NIX.dry_run_names_target(rebuild=True)


def test_nix_plan_singular_plural_and_fetches() -> None:
    # Nix 2.8 wording, as printed by tests below against the real nix-store.
    one = b"this derivation will be built:\n  " + NIX_A.encode() + b"\n"
    assert NIX.parse_dry_run(b"", one) == DryRun((NIX_A,), ())
    two = (
        f"these 2 derivations will be built:\n  {NIX_A}\n  {NIX_B}\n"
        f"this path will be fetched (0.01 MiB download, 0.05 MiB unpacked):\n  {NIX_OUT}\n"
    ).encode()
    assert NIX.parse_dry_run(b"", two) == DryRun((NIX_A, NIX_B), (NIX_OUT,))
    newer = (
        f"these 2 paths will be fetched (1.2 KiB download, 3.4 MiB unpacked):\n"
        f"  {NIX_OUT}\n  {NIX_OUT}x\n"
    ).encode()
    assert NIX.parse_dry_run(b"", newer).would_download == (NIX_OUT, NIX_OUT + "x")
    old = f"these derivations will be built:\n  {NIX_A}\n".encode()  # Nix <= 2.3
    assert NIX.parse_dry_run(b"", old).would_build == (NIX_A,)
    assert NIX.parse_dry_run(b"", b"") == DryRun((), ())


def test_nix_plan_unknown_paths_and_bad_counts() -> None:
    unknown = (
        "don't know how to build these paths (may be caused by read-only store access):\n"
        f"  {NIX_A}\n"
    ).encode()
    assert NIX.parse_dry_run(b"", unknown) == DryRun((), (), (NIX_A,))
    with pytest.raises(RemoteError, match="announces 3 paths but lists 2"):
        NIX.parse_dry_run(
            b"", f"these 3 derivations will be built:\n  {NIX_A}\n  {NIX_B}\n".encode()
        )
    with pytest.raises(RemoteError, match="followed by no store paths"):
        NIX.parse_dry_run(b"", b"this derivation will be built:\nwarning: x\n")


# --- build failures ------------------------------------------------------------------------------


def test_guix_failures_from_the_daemon_and_client_messages() -> None:
    failed = (
        f"building {DRV_A}...\n"
        f"builder for `{DRV_A}' failed with exit code 3\n"
        f"build of {DRV_A} failed\n"
        f"View build log at '/var/log/guix/drvs/4y/a1zaxbh5cyxvfk2mhsjsqpqxz2a8mj-a-1.0.drv.gz'.\n"
        f"guix build: error: build of `{DRV_A}' failed\n"
    ).encode()
    assert GUIX.classify_build_failure(1, failed) == (
        "failed",
        f"builder for {DRV_A} failed with exit code 3",
    )
    silent = f"building of `{DRV_A}' timed out after 5 seconds of silence\n".encode()
    assert GUIX.classify_build_failure(1, silent) == (
        "silent",
        "timed out after 5 seconds of silence",
    )
    timeout = f"building of `{DRV_A}' timed out after 60 seconds\n".encode()
    assert GUIX.classify_build_failure(1, timeout) == ("timeout", "timed out after 60 seconds")
    missing = f"cannot build missing derivation \u2018{DRV_B}\u2019\n".encode()
    assert GUIX.classify_build_failure(1, missing) == (
        "machine",
        f"cannot build missing derivation {DRV_B}",
    )
    # No builder ran and failed: whatever failed is not the derivation's doing.
    client_only = f"guix build: error: build of `{DRV_A}', `{DRV_B}' failed\n".encode()
    kind, reason = GUIX.classify_build_failure(1, client_only)
    assert kind == "machine" and DRV_A in reason and DRV_B in reason
    signal = f"builder for `{DRV_A}' failed due to signal 9 (Killed)\n".encode()
    assert GUIX.classify_build_failure(1, signal) == (
        "failed",
        f"builder for {DRV_A} failed due to signal 9 (Killed)",
    )


def test_guix_other_failures_are_the_machines_and_quote_the_error_line() -> None:
    tail = b"guix build: error: failed to connect to `/var/guix/daemon-socket/socket'\n"
    kind, reason = GUIX.classify_build_failure(1, tail)
    assert kind == "machine"
    assert reason == "failed to connect to `/var/guix/daemon-socket/socket' (exit status 1)"
    assert GUIX.classify_build_failure(None, b"") == (
        "machine",
        "build command ended with no exit status",
    )


# Guix's own words (nix/libstore/build.cc, guix/ui.scm), each failing the build with exit 1.
MACHINE_FAULTS = {
    "daemon down": "guix build: error: failed to connect to `/var/guix/daemon-socket/socket': "
                   "Connection refused\n",
    "full disk": f"building {DRV_A}...\nnote: build failure may have been caused by lack of "
                 f"free disk space\nbuilder for `{DRV_A}' failed with exit code 1\n"
                 f"build of {DRV_A} failed\nguix build: error: build of `{DRV_A}' failed\n",
    "no space": "guix build: error: writing to file: No space left on device\n",
    "wrong system": f"building {DRV_A}...\nwhile setting up the build environment: a "
                    f"`aarch64-linux' is required to build `{DRV_A}', but I am a "
                    f"`x86_64-linux'\nbuilder for `{DRV_A}' failed with exit code 1\n"
                    f"guix build: error: build of `{DRV_A}' failed\n",
    "substitute": f"guix build: error: some substitutes for the outputs of derivation `{DRV_A}' "
                  "failed (usually happens due to networking issues); try `--fallback' to "
                  "build derivation from source \n",
}


@pytest.mark.parametrize("fault", sorted(MACHINE_FAULTS))
def test_guix_daemon_and_machine_failures_are_the_machines(fault: str) -> None:
    kind, reason = GUIX.classify_build_failure(1, MACHINE_FAULTS[fault].encode())
    assert kind == "machine", (fault, reason)
    expected = {
        "daemon down": "failed to connect to `/var/guix/daemon-socket/socket': Connection "
                       "refused (exit status 1)",
        "full disk": "note: build failure may have been caused by lack of free disk space",
        "no space": "guix build: error: writing to file: No space left on device",
        "wrong system": f"a `aarch64-linux' is required to build `{DRV_A}', but I am a "
                        "`x86_64-linux'",
    }
    assert reason == expected.get(fault, reason)
    assert "--fallback" in reason or fault != "substitute"


def test_a_builders_own_timed_out_line_is_not_the_daemons() -> None:
    """A test suite may print "timed out after 30 seconds"; only the daemon's line, which
    names the goal, is a timeout, and the last of the daemon's verdicts is the one."""
    tail = (f"FAIL: test-net (timed out after 30 seconds)\nerror: timed out after 30 seconds\n"
            f"builder for `{DRV_A}' failed with exit code 2\n"
            f"guix build: error: build of `{DRV_A}' failed\n").encode()
    assert GUIX.classify_build_failure(1, tail) == (
        "failed", f"builder for {DRV_A} failed with exit code 2")
    nix = (f"timed out after 5 seconds of silence\nerror: builder for '{NIX_A}' failed with "
           "exit code 2\n").encode()
    assert NIX.classify_build_failure(100, nix)[0] == "failed"
    daemon = (f"builder for `{DRV_B}' failed with exit code 1\n"
              f"building of `{DRV_A}' timed out after 30 seconds\n").encode()
    assert GUIX.classify_build_failure(1, daemon) == ("timeout", "timed out after 30 seconds")
    nix_silent = (f"error: building of '{NIX_A}!out' from .drv file timed out after 5 seconds "
                  "of silence\n").encode()
    assert NIX.classify_build_failure(101, nix_silent) == (
        "silent", "timed out after 5 seconds of silence")


def test_nix_failures_in_2_8_and_newer_wording() -> None:
    newer = (
        f"\x1b[31;1merror:\x1b[0m Cannot build '\x1b[35;1m{NIX_A}\x1b[0m'.\n"
        f"       Reason: \x1b[31;1mbuilder failed with exit code 2\x1b[0m.\n"
        f"       Output paths:\n         {NIX_OUT}\n"
    ).encode()
    assert NIX.classify_build_failure(100, newer) == (
        "failed",
        f"builder for {NIX_A} failed with exit code 2",
    )
    middle = f"error: builder for '{NIX_A}' failed with exit code 1;\n       last 10 log lines:\n"
    assert NIX.classify_build_failure(100, middle.encode())[1].endswith("exit code 1")
    assert NIX.classify_build_failure(100, b"") == (
        "failed",
        "build failed, builder exit code not reported (exit status 100)",
    )
    kind, reason = NIX.classify_build_failure(102, b"error: hash mismatch in fixed-output\n")
    assert (kind, reason) == ("failed", "hash mismatch in fixed-output (exit status 102)")
    assert NIX.classify_build_failure(101, b"")[0] == "timeout"
    dep = (f"error: Cannot build '{NIX_B}'.\n       Reason: 1 dependency failed.\n").encode()
    assert NIX.classify_build_failure(1, dep) == (
        "machine",
        f"Cannot build '{NIX_B}'. (exit status 1)",
    )


def test_the_last_builder_failure_is_the_one_reported() -> None:
    tail = (
        f"builder for '{NIX_A}' failed with exit code 1\n"
        f"builder for '{NIX_B}' failed with exit code 7\n"
    ).encode()
    assert (
        NIX.classify_build_failure(100, tail)[1] == f"builder for {NIX_B} failed with exit code 7"
    )


def test_the_builders_exit_code_not_the_build_commands() -> None:
    """nix-store --realise exits 100 and guix build 1 whatever the builder's status: the one
    recorded is the builder's, read from the daemon's message (any quoting, any colour)."""
    from buildfarm.backends import builder_exit_code

    for tail, code in (
        (f"builder for `{DRV_A}' failed with exit code 3\nguix build: error: build of "
         f"`{DRV_A}' failed\n", 3),
        (f"\x1b[31;1merror:\x1b[0m builder for '\x1b[35;1m{NIX_A}\x1b[0m' failed with "
         "exit code 1\n", 1),
        (f"error: Cannot build '{NIX_A}'.\n       Reason: builder failed with exit code 2.\n", 2),
        (f"builder for '{NIX_A}' failed with exit code 1\nbuilder for '{NIX_B}' failed with "
         "exit code 7\n", 7),
        (f"builder for `{DRV_A}' failed due to signal 9 (Killed)\n", None),
        (f"building of `{DRV_A}' timed out after 5 seconds of silence\n", None),
        ("", None),
    ):
        assert builder_exit_code(tail.encode()) == code, tail


def test_reasons_are_one_short_line() -> None:
    noise = ("error: " + "x" * 5000 + "\n").encode()
    for backend in BACKENDS:
        kind, reason = backend.classify_build_failure(1, noise)
        assert kind == "machine" and "\n" not in reason and len(reason) <= 300


# --- simple parsers ------------------------------------------------------------------------------


def test_path_lists() -> None:
    for backend in BACKENDS:
        assert backend.parse_missing(b"") == []
        assert backend.parse_missing(f"{OUT_C}\n{OUT_D}\n".encode()) == [OUT_C, OUT_D]
        assert backend.parse_build_outputs(f"{OUT_C}\n".encode()) == [OUT_C]
        for garbage in (b"error: x\n", b"relative/path\n", b" /gnu/store/x\n"):
            with pytest.raises(RemoteError, match="one store path per line"):
                backend.parse_missing(garbage)
            with pytest.raises(RemoteError, match="one store path per line"):
                backend.parse_build_outputs(garbage)


def test_nar_hash_answers() -> None:
    assert NIX.parse_nar_hash(f"sha256:{NIX32}\n120\n".encode()) == (f"sha256:{NIX32}", 120)
    assert NIX.parse_nar_hash(f"sha256:{NIX32}\n".encode()) == (f"sha256:{NIX32}", None)
    assert GUIX.parse_nar_hash(f"{NIX32}\n".encode()) == (f"sha256:{NIX32}", None)
    bad_nix = [b"", b"sha1:abc\n", f"sha256:{NIX32}\nbig\n".encode(), f"{NIX32}\n1\n".encode()]
    for stdout in bad_nix:
        with pytest.raises(RemoteError):
            NIX.parse_nar_hash(stdout)
    for stdout in (b"", f"sha256:{NIX32}\n".encode(), b"e" * 52 + b"\n", b"zz\n"):
        with pytest.raises(RemoteError):
            GUIX.parse_nar_hash(stdout)


def test_versions() -> None:
    guix = b"guix (GNU Guix) 1.4.0\nCopyright (C) 2022 the Guix authors\nLicense GPLv3+\n"
    assert GUIX.parse_version(guix) == "1.4.0"
    assert GUIX.parse_version(b"guix (GNU Guix) 4a7c1e0e3b20d5b1\n") == "4a7c1e0e3b20d5b1"
    assert NIX.parse_version(b"nix-store (Nix) 2.8.0\n") == "2.8.0"
    assert NIX.parse_version(b"nix-store (Lix, like Nix) 2.91.1\n") == "2.91.1"
    for backend, wrong in ((GUIX, b"nix-store (Nix) 2.8.0\n"), (NIX, guix), (NIX, b"")):
        with pytest.raises(RemoteError):
            backend.parse_version(wrong)


# --- parsers never raise anything but RemoteError -----------------------------------------------

_FRAGMENTS = [
    "The following derivation would be built:",
    "the following derivations will be built:",
    "these 2 derivations will be built:",
    "this derivation will be built:",
    "this path will be fetched (1 MiB download, 2 MiB unpacked):",
    "don't know how to build these paths:",
    "12.3 MB would be downloaded:",
    "The following files would be downloaded:",
    f"  {DRV_A}",
    f"  {OUT_C}",
    f"   {NIX_A}",
    "sha256:" + NIX32,
    NIX32,
    "120",
    "guix (GNU Guix) 1.4.0",
    "nix-store (Nix) 2.8.0",
    f"builder for `{DRV_A}' failed with exit code 3",
    f"Cannot build '{NIX_A}'.",
    "Reason: builder failed with exit code 9.",
    "timed out after 7 seconds of silence",
    "cannot build missing derivation \u2018x\u2019",
    "guix build: error: build of `x' failed",
    "error: ",
    "\x1b[31;1m",
    "",
]
_TEXTS = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from(_FRAGMENTS) | st.text(max_size=30), max_size=12).map(
        lambda lines: "\n".join(lines).encode("utf-8", errors="surrogatepass")
    ),
)


def _only_remote_errors(call: Callable[[], Any]) -> None:
    with contextlib.suppress(RemoteError):
        call()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_TEXTS, other=_TEXTS, status=st.none() | st.integers(-1, 300))
def test_parsers_raise_only_remote_error(data: bytes, other: bytes, status: int | None) -> None:
    for backend in BACKENDS:
        _only_remote_errors(functools.partial(backend.parse_missing, data))
        _only_remote_errors(functools.partial(backend.parse_dry_run, other, data))
        _only_remote_errors(functools.partial(backend.parse_nar_hash, data))
        _only_remote_errors(functools.partial(backend.parse_version, data))
        _only_remote_errors(functools.partial(backend.parse_build_outputs, data))
        kind, reason = backend.classify_build_failure(status, data)
        assert kind in FAILURE_KINDS
        assert reason and "\n" not in reason


# --- quoting: every path stays one argv word ----------------------------------------------------


def _builders(backend: Backend, paths: Sequence[str]) -> dict[str, Command]:
    one = paths[0]
    return {
        "export": backend.export(paths),
        "delete": backend.delete(paths),
        "dry_run": backend.dry_run(one),
        "build": backend.build(one, max_silent_time=5, timeout=60),
        "nar_hash": backend.nar_hash(one),
    }


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_hostile_paths_stay_one_argv_word_each(backend: Backend) -> None:
    for name, command in _builders(backend, HOSTILE_PATHS).items():
        paths = HOSTILE_PATHS if name in ("export", "delete") else HOSTILE_PATHS[:1]
        for path in paths:
            assert command.argv.count(path) == 1, (name, path)
        assert all(isinstance(word, str) for word in command.argv)
    listed = backend.missing([p for p in HOSTILE_PATHS if "\n" not in p])
    if backend is GUIX:
        assert listed.stdin is not None
        assert listed.stdin.decode().split("\n")[:-1] == [p for p in HOSTILE_PATHS if "\n" not in p]
        with pytest.raises(UsageError, match="line break"):
            backend.missing(HOSTILE_PATHS)
    else:
        assert listed.argv[3:] == tuple(p for p in HOSTILE_PATHS if "\n" not in p)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_arguments_that_could_be_options_or_nothing_are_refused(backend: Backend) -> None:
    for bad in ("-rf", "relative/x", ""):
        with pytest.raises(UsageError, match="not an absolute path"):
            backend.export([bad])
        with pytest.raises(UsageError, match="not an absolute path"):
            backend.build(bad, max_silent_time=None, timeout=None)
    with pytest.raises(UsageError, match="single string"):
        backend.delete("/gnu/store/x")
    with pytest.raises(UsageError, match="nothing to delete"):
        backend.delete([])
    with pytest.raises(UsageError, match="seconds"):
        backend.build(DRV_A, max_silent_time=-1, timeout=None)
    with pytest.raises(UsageError, match="seconds"):
        backend.build(DRV_A, max_silent_time=None, timeout=True)


ENV = ("env", "LC_ALL=C.UTF-8", "LANGUAGE=")


def test_build_options() -> None:
    """Every Guix command in C.UTF-8 with LANGUAGE empty (what the parsers read is English);
    the build neither substitutes nor offloads; a Nix build likewise."""
    assert GUIX.build(DRV_A, max_silent_time=None, timeout=None).argv == (
        *ENV, "guix", "build", "--no-grafts", "--no-substitutes", "--no-offload", DRV_A,
    )  # fmt: skip
    assert GUIX.build(DRV_A, max_silent_time=30, timeout=3600).argv == (
        *ENV, "guix", "build", "--no-grafts", "--no-substitutes", "--no-offload",
        "--max-silent-time=30", "--timeout=3600", DRV_A,
    )  # fmt: skip
    assert NIX.build(NIX_A, max_silent_time=30, timeout=0).argv == (
        "nix-store", "--realise", NIX_A, "--option", "substitute", "false",
        "--option", "builders", "",
        "--option", "max-silent-time", "30", "--option", "timeout", "0",
    )  # fmt: skip
    dry = (*ENV, "guix", "build", "--dry-run", "--no-grafts", "--no-substitutes", "--no-offload")
    assert GUIX.dry_run(DRV_A).argv == (*dry, DRV_A)
    assert GUIX.dry_run(DRV_A, rebuild=True).argv == (*dry, "--check", DRV_A)
    assert NIX.dry_run(NIX_A).argv == (
        "nix-store", "--realise", "--dry-run", "--option", "substitute", "false",
        "--option", "builders", "", NIX_A)
    rebuild = NIX.dry_run(NIX_A, rebuild=True, inputs=[(NIX_B, ["out", "dev"])])
    assert rebuild.argv[-1:] == (f"{NIX_B}!out,dev",)
    with pytest.raises(UsageError, match="no input derivation"):
        NIX.dry_run(NIX_A, rebuild=True)
    with pytest.raises(UsageError, match="output names"):
        NIX.dry_run(NIX_A, rebuild=True, inputs=[(NIX_B, ["out;rm"])])
    for backend in BACKENDS:
        for command in (backend.missing([OUT_C]), backend.import_bundle(), backend.export([OUT_C]),
                        backend.delete([OUT_C]), backend.nar_hash(OUT_C), backend.version()):
            assert command.argv[:4] == (*ENV, "guix") if backend is GUIX else (
                command.argv[0] in ("nix-store", "sh"))
    assert GUIX.nar_hash(OUT_C).argv[3:5] == ("guix", "hash")
    assert "exec env LC_ALL=C.UTF-8 LANGUAGE= guix archive" in GUIX.export_to_temp([OUT_C]).argv[2]


def test_substitution_commands_and_where_each_path_came_from() -> None:
    urls = ["http://farm.example.org:8080", "https://ci.guix.gnu.org"]
    assert GUIX.substitute([OUT_C, OUT_D], urls).argv == (
        *ENV, "guix", "build", "--no-grafts", "--no-offload", "--keep-going",
        "--substitute-urls=http://farm.example.org:8080 https://ci.guix.gnu.org", OUT_C, OUT_D)
    assert NIX.substitute([NIX_OUT], urls[:1], ["farm-1:" + "A" * 44]).argv == (
        "nix-store", "--realise", "--keep-going", "--option", "substituters", urls[0],
        "--option", "narinfo-cache-negative-ttl", "0",
        "--option", "extra-trusted-public-keys", "farm-1:" + "A" * 44, NIX_OUT)
    for bad in ([], ["ftp://x"], ["http://a b"], [""]):
        with pytest.raises(UsageError, match="substitute URL"):
            GUIX.substitute([OUT_C], bad)
    with pytest.raises(UsageError, match="nothing to substitute"):
        NIX.substitute([], urls)
    # guix/status.scm at verbosity 3: "substituting ~a..." then "downloading from ~a ...".
    guix_log = (f"substituting {OUT_C}...\n"
                f"downloading from http://farm.example.org:8080/nar/gzip/{OUT_C[12:]} ...\n"
                f"substituting {OUT_D}...\nsubstitution of {OUT_D} failed\n").encode()
    assert GUIX.parse_substituted(guix_log) == {
        OUT_C: f"http://farm.example.org:8080/nar/gzip/{OUT_C[12:]}"}
    # Nix 2.8 PathSubstitutionGoal::tryToRun.
    nix_log = f"copying path '{NIX_OUT}' from 'http://127.0.0.1:8080'...\n".encode()
    assert NIX.parse_substituted(nix_log) == {NIX_OUT: "http://127.0.0.1:8080"}


def test_gc_roots_commands() -> None:
    for backend, state in ((GUIX, "${GUIX_STATE_DIRECTORY:-/var/guix}"),
                           (NIX, "${NIX_STATE_DIR:-/nix/var/nix}")):
        roots = backend.gc_roots("f00d", "17", ["12", "17"], [OUT_C, OUT_D])
        assert roots.argv[:2] == ("sh", "-c") and state in roots.argv[2]
        assert roots.argv[3:] == ("buildfarm-f00d", "17", "12", "17")
        assert roots.stdin == f"{OUT_C}\n{OUT_D}\n".encode()
        assert backend.drop_gc_roots("f00d", "17").argv[3:] == ("buildfarm-f00d", "17")
        for bad in ("../x", "a b", "", "-rf"):
            with pytest.raises(UsageError, match="plain name"):
                backend.gc_roots("f00d", bad, [], [OUT_C])
            with pytest.raises(UsageError, match="plain name"):
                backend.drop_gc_roots(bad, "1")
        with pytest.raises(UsageError, match="cannot be rooted"):
            backend.gc_roots("f00d", "1", [], ["/gnu/store/x y"])


def test_guix_versions_older_than_1_4_are_refused() -> None:
    assert GUIX.version_problem("1.4.0") is None
    assert GUIX.version_problem("1.4.0rc2") is None
    assert GUIX.version_problem("1.5.0") is None
    assert GUIX.version_problem("4a7c1e0e3b20d5b1a2f2") is None  # a pulled Guix: a commit
    problem = GUIX.version_problem("1.3.0")
    assert problem is not None and "guix hash -S nar" in problem
    assert GUIX.version_problem("1.2") is not None and NIX.version_problem("2.3") is None


def _fake_program(bin_dir: Path, name: str) -> None:
    """A stand-in for guix/nix-store that prints its arguments NUL-terminated."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text('#!/bin/sh\nfor a in "$@"; do printf \'%s\\0\' "$a"; done\n')
    script.chmod(0o755)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("through_ssh_quoting", [False, True], ids=["argv", "ssh-string"])
def test_export_to_file_writes_exactly_the_named_file(
    backend: Backend, through_ssh_quoting: bool, tmp_path: Path
) -> None:
    """Run the command as exec would, and as `ssh host "$(shlex.join(argv))"` would."""
    bin_dir = tmp_path / "bin"
    _fake_program(bin_dir, "guix" if backend is GUIX else "nix-store")
    workdir = tmp_path / "work"
    workdir.mkdir()
    target = workdir / "out $(touch pwned); 'x' \"y\"\nz.bundle"
    command = backend.export_to_file(HOSTILE_PATHS, str(target))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    argv = ["sh", "-c", shlex.join(command.argv)] if through_ssh_quoting else list(command.argv)
    done = subprocess.run(argv, env=env, cwd=workdir, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b""
    assert sorted(p.name for p in workdir.iterdir()) == [target.name]
    words = target.read_bytes().split(b"\0")[:-1]
    program = ["archive", "--export"] if backend is GUIX else ["--export"]
    assert [w.decode() for w in words] == [*program, *HOSTILE_PATHS]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
@pytest.mark.parametrize("through_ssh_quoting", [False, True], ids=["argv", "ssh-string"])
def test_export_to_temp_names_the_file_it_wrote(
    backend: Backend, through_ssh_quoting: bool, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    _fake_program(bin_dir, "guix" if backend is GUIX else "nix-store")
    workdir, tmp = tmp_path / "work", tmp_path / "tmp"
    workdir.mkdir()
    tmp.mkdir()
    command = backend.export_to_temp(HOSTILE_PATHS)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp)}
    argv = ["sh", "-c", shlex.join(command.argv)] if through_ssh_quoting else list(command.argv)
    done = subprocess.run(argv, env=env, cwd=workdir, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    (written,) = tmp.iterdir()
    assert done.stdout == f"{written}\n".encode()
    assert written.name.startswith("buildfarm.")
    assert list(workdir.iterdir()) == []
    words = written.read_bytes().split(b"\0")[:-1]
    program = ["archive", "--export"] if backend is GUIX else ["--export"]
    assert [w.decode() for w in words] == [*program, *HOSTILE_PATHS]


# --- real stores --------------------------------------------------------------------------------

_ISOLATE = 'mount --bind "$0" /nix && exec "$@"'


@dataclass
class Store:
    """A private Nix store: every command runs with `nix_dir` bind-mounted on /nix."""

    nix_dir: Path
    env: dict[str, str]

    def run(
        self, argv: Sequence[str], stdin: bytes | None = None, *, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        full = ["unshare", "-m", "--propagation", "private", "sh", "-c", _ISOLATE]
        return subprocess.run(
            [*full, str(self.nix_dir), *argv],
            input=stdin if stdin is not None else b"",
            capture_output=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def run_command(
        self, command: Command, *, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        return self.run(command.argv, command.stdin, timeout=timeout)

    def check(self, argv: Sequence[str], stdin: bytes | None = None) -> bytes:
        done = self.run(argv, stdin)
        assert done.returncode == 0, (argv, done.stderr.decode(errors="replace"))
        return done.stdout

    def instantiate(self, expr: str) -> str:
        out = self.check(["nix-instantiate", "-E", expr]).decode()
        (drv,) = [line for line in out.splitlines() if line.endswith(".drv")]
        return drv

    def outputs(self, drv: str) -> list[str]:
        return self.check(["nix-store", "--query", "--outputs", drv]).decode().split()


def _store_problem() -> str | None:
    if os.geteuid() != 0:
        return "real-store tests need root (private mount namespaces)"
    for program in ("unshare", "nix-store", "nix-instantiate"):
        if shutil.which(program) is None:
            return f"`{program}` is not installed"
    if not os.path.isdir("/nix"):
        return "/nix does not exist to mount a private store on"
    return None


def _make_store(root: Path, extra_env: Mapping[str, str] | None = None) -> Store:
    problem = _store_problem()
    if problem is not None:
        needs.unavailable(problem)
    for sub in ("nix", "conf", "home"):
        (root / sub).mkdir(parents=True, exist_ok=sub == "nix")
    (root / "conf" / "nix.conf").write_text(NIX_CONF)
    home = root / "home"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "NIX_CONF_DIR": str(root / "conf"),
        "LC_ALL": "C.UTF-8",
        **(extra_env or {}),
    }
    store = Store(root / "nix", env)
    probe = store.run(["nix-store", "--version"])
    if probe.returncode != 0:
        needs.unavailable(f"cannot run Nix in a private mount namespace: {probe.stderr.decode()}")
    return store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return _make_store(tmp_path / "store")


def nix_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def derivation(name: str, script: str, **inputs: str) -> str:
    """A /bin/sh derivation; `inputs` are other derivation expressions, seen as $NAME."""
    extra = "".join(f" {key} = {value};" for key, value in inputs.items())
    nonce = nix_str(uuid.uuid4().hex)
    return (
        f"derivation {{ name = {nix_str(name)}; system = builtins.currentSystem;"
        f' builder = "/bin/sh"; args = [ "-c" {nix_str(script)} ]; nonce = {nonce};{extra} }}'
    )


def chain() -> str:
    """b depends on a and keeps a reference to a's output."""
    a = derivation("a", "echo a > $out")
    return derivation("b", "echo $a > $out", a=a)


@dataclass
class Machine:
    """A backend together with the store its commands run against."""

    backend: Backend
    store: Store

    def run(self, command: Command, *, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return self.store.run_command(command, timeout=timeout)

    def ok(self, command: Command) -> subprocess.CompletedProcess[bytes]:
        done = self.run(command)
        assert done.returncode == 0, (command.argv, done.stderr.decode(errors="replace"))
        return done


@pytest.fixture
def nix_machine(store: Store) -> Machine:
    return Machine(NIX, store)


def _guix_machine(root: Path) -> Machine:
    needs.libgcrypt()
    bin_dir = root / "guix-bin"
    bin_dir.mkdir(parents=True)
    guix = install_emulator(bin_dir)
    config = root / "guix-config"
    config.mkdir()
    # The daemon's state is the Nix store's own (emulator: a running daemon has its socket).
    env = {"GUIX_CONFIGURATION_DIRECTORY": str(config), "GUIX_STATE_DIRECTORY": "/nix/var/nix"}
    store = _make_store(root / "store", env)
    socket = store.nix_dir / "var" / "nix" / "daemon-socket" / "socket"
    socket.parent.mkdir(parents=True)
    socket.touch()
    store.env["PATH"] = f"{guix.parent}:{store.env['PATH']}"
    return Machine(GUIX, store)


@pytest.fixture
def guix_machine(tmp_path: Path) -> Machine:
    return _guix_machine(tmp_path / "guix")


@pytest.fixture(params=["nix", "guix"])
def machine(request: pytest.FixtureRequest, tmp_path: Path) -> Machine:
    if request.param == "nix":
        return Machine(NIX, _make_store(tmp_path / "store"))
    return _guix_machine(tmp_path / "guix")


def test_version_of_the_real_store(machine: Machine) -> None:
    version = machine.backend.parse_version(machine.ok(machine.backend.version()).stdout)
    assert version and version[0].isdigit()


def test_missing_lists_only_invalid_paths(machine: Machine) -> None:
    drv = machine.store.instantiate(derivation("m", "echo m > $out"))
    absent = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-absent"
    backend = machine.backend
    done = machine.ok(backend.missing([drv, absent]))
    assert backend.parse_missing(done.stdout) == [absent]
    assert backend.parse_missing(machine.ok(backend.missing([drv])).stdout) == []
    assert backend.parse_missing(machine.ok(backend.missing([])).stdout) == []


def test_dry_run_plural_then_singular_then_empty(machine: Machine) -> None:
    backend, store = machine.backend, machine.store
    b = store.instantiate(chain())
    (a,) = [line for line in store.check(["nix-store", "-q", "--references", b]).decode().split()
            if line.endswith(".drv")]  # fmt: skip
    plan = backend.parse_dry_run(*_out_err(machine.ok(backend.dry_run(b))))
    # The list keeps the store's order: Nix prints dependencies first (shared.cc reverses a
    # topological sort), Guix its build plan's order.
    assert sorted(plan.would_build) == sorted([a, b]) and plan.would_download == ()
    if backend is NIX:
        assert plan.would_build == (a, b)

    machine.ok(backend.build(a, max_silent_time=None, timeout=None))
    plan = backend.parse_dry_run(*_out_err(machine.ok(backend.dry_run(b))))
    assert plan == DryRun((b,), ())

    built = machine.ok(backend.build(b, max_silent_time=60, timeout=600))
    outputs = backend.parse_build_outputs(built.stdout)
    assert outputs == store.outputs(b)
    assert backend.parse_missing(machine.ok(backend.missing(outputs)).stdout) == []
    plan = backend.parse_dry_run(*_out_err(machine.ok(backend.dry_run(b))))
    assert plan == DryRun((), ())


def _out_err(done: subprocess.CompletedProcess[bytes]) -> tuple[bytes, bytes]:
    return done.stdout, done.stderr


def test_failing_builder_is_classified_with_its_exit_code(machine: Machine) -> None:
    drv = machine.store.instantiate(derivation("f", "echo about to fail; exit 3"))
    done = machine.run(machine.backend.build(drv, max_silent_time=None, timeout=None))
    assert done.returncode != 0
    if machine.backend is NIX:
        assert done.returncode == 100
    kind, reason = machine.backend.classify_build_failure(done.returncode, done.stderr)
    assert kind == "failed"
    assert drv in reason and "exit code 3" in reason


def test_silent_builder_hits_max_silent_time(machine: Machine) -> None:
    drv = machine.store.instantiate(derivation("s", "exec /bin/sleep 100"))
    command = machine.backend.build(drv, max_silent_time=1, timeout=None)
    done = machine.run(command, timeout=90)
    assert done.returncode != 0
    kind, reason = machine.backend.classify_build_failure(done.returncode, done.stderr)
    assert (kind, reason) == ("silent", "timed out after 1 seconds of silence")


def test_chatty_builder_hits_timeout(machine: Machine) -> None:
    drv = machine.store.instantiate(derivation("t", "while :; do echo tick; /bin/sleep 0.2; done"))
    done = machine.run(machine.backend.build(drv, max_silent_time=30, timeout=1), timeout=90)
    assert done.returncode != 0
    if machine.backend is NIX:
        assert done.returncode == 101
    kind, reason = machine.backend.classify_build_failure(done.returncode, done.stderr)
    assert (kind, reason) == ("timeout", "timed out after 1 seconds")


def test_missing_derivation_is_classified(machine: Machine) -> None:
    absent = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-gone.drv"
    done = machine.run(machine.backend.build(absent, max_silent_time=None, timeout=None))
    assert done.returncode != 0
    kind, reason = machine.backend.classify_build_failure(done.returncode, done.stderr)
    assert (kind, reason) == ("machine", f"cannot build missing derivation {absent}")


def test_a_rebuild_dry_run_names_the_inputs_that_are_missing(machine: Machine) -> None:
    """b's output is there, a's (which b copied, not referred to) is not: the plain dry run
    plans nothing, but the rebuild's (Guix: --check; Nix: the inputs' own) names a."""
    backend, store = machine.backend, machine.store
    a = derivation("a", "echo a > $out")
    b = store.instantiate(derivation("b", "read x < $a; echo $x > $out", a=a))
    (a_drv,) = [p for p in store.check(["nix-store", "-q", "--references", b]).decode().split()
                if p.endswith(".drv")]  # fmt: skip
    built = backend.parse_build_outputs(
        machine.ok(backend.build(b, max_silent_time=None, timeout=None)).stdout)
    machine.ok(backend.delete(store.outputs(a_drv)))
    assert backend.parse_missing(machine.ok(backend.missing(built)).stdout) == []
    with pytest.raises(RemoteError, match="could not read the plan"):
        backend.parse_dry_run(*_out_err(machine.ok(backend.dry_run(b))), target=b)
    rebuild = backend.dry_run(b, rebuild=True, inputs=[(a_drv, ["out"])])
    target = b if backend.dry_run_names_target(rebuild=True) else None
    plan = backend.parse_dry_run(*_out_err(machine.ok(rebuild)), target=target)
    assert a_drv in plan.would_build and (b in plan.would_build) == (target is not None)


def test_gc_roots_keep_paths_through_a_collection(machine: Machine, tmp_path: Path) -> None:
    """Roots in the user's profiles directory hold paths through a collection (Nix's
    nix-store --gc; the emulator's `guix gc`), until the attempt drops them; an attempt's
    roots go when another starts without keeping them."""
    backend, store = machine.backend, machine.store
    files = []
    for name in ("kept", "other", "late"):
        (tmp_path / name).write_text(f"{name} {uuid.uuid4().hex}\n")
        files.append(store.check(["nix-store", "--add", str(tmp_path / name)]).decode().strip())
    kept, other, late = files
    machine.ok(backend.gc_roots("f00d", "1", ["1"], [kept, other]))
    machine.ok(backend.gc_roots("f00d", "2", ["1", "2"], [late]))
    machine.ok(backend.drop_gc_roots("f00d", "1"))
    machine.ok(backend.gc_roots("f00d", "3", ["3"], [other]))  # 2 ended long ago
    collect = ["guix", "gc"] if backend is GUIX else ["nix-store", "--gc"]
    done = store.run(collect)
    assert done.returncode == 0, done.stderr
    assert backend.parse_missing(machine.ok(backend.missing(files)).stdout) == [kept, late]
    if backend is GUIX:
        assert done.stderr.decode().splitlines()[-1].startswith("guix gc: freed ")


@pytest.fixture(params=["nix", "guix"])
def full_machine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Machine]:
    """A machine whose store is a 16 MiB file system of its own (a tmpfs)."""
    root = tmp_path / request.param
    (root / "store" / "nix").mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs",
                              str(root / "store" / "nix")], capture_output=True, check=False)
    if mounted.returncode:
        needs.unavailable(f"cannot mount a tmpfs: {mounted.stderr.decode()}")
    try:
        yield (Machine(NIX, _make_store(root / "store")) if request.param == "nix"
               else _guix_machine(root))
    finally:
        subprocess.run(["umount", "-l", str(root / "store" / "nix")], check=False)


def test_a_full_disk_is_the_machines_fault(full_machine: Machine) -> None:
    """The builder writes more than the store's file system holds, which also holds the build
    logs: the daemon cannot write the log (libutil SysError "writing to file: No space left on
    device", Nix 2.8 as Guix's daemon), and the failure is the machine's, to be tried
    elsewhere, not the derivation's."""
    machine = full_machine
    drv = machine.store.instantiate(derivation(
        "big", "/bin/dd if=/dev/zero of=$out bs=1M count=64"))
    done = machine.run(machine.backend.build(drv, max_silent_time=None, timeout=None))
    assert done.returncode != 0
    log = done.stderr.decode(errors="replace")
    assert "No space left on device" in log, log
    kind, reason = machine.backend.classify_build_failure(done.returncode, done.stderr)
    assert kind == "machine", reason
    last = log.splitlines()[-1]
    assert last == ("guix build: " if machine.backend is GUIX else "") + (
        "error: writing to file: No space left on device"), log


def test_delete_outputs(machine: Machine) -> None:
    backend, store = machine.backend, machine.store
    drv = store.instantiate(derivation("d", "echo d > $out"))
    outputs = backend.parse_build_outputs(
        machine.ok(backend.build(drv, max_silent_time=None, timeout=None)).stdout
    )
    assert backend.parse_missing(machine.ok(backend.missing(outputs)).stdout) == []
    machine.ok(backend.delete(outputs))
    assert backend.parse_missing(machine.ok(backend.missing(outputs)).stdout) == outputs


def test_nar_hash_matches_the_nar(machine: Machine) -> None:
    backend, store = machine.backend, machine.store
    drv = store.instantiate(
        derivation("h", "/bin/mkdir $out; echo hi > $out/f; /bin/ln -s f $out/l")
    )
    (output,) = backend.parse_build_outputs(
        machine.ok(backend.build(drv, max_silent_time=None, timeout=None)).stdout
    )
    answer = machine.run(backend.nar_hash(output))
    assert answer.returncode == 0, answer.stderr
    digest, size = backend.parse_nar_hash(answer.stdout)
    nar = store.check(["nix-store", "--dump", output])
    expected = store.check(["nix-hash", "--type", "sha256", "--base32", output]).decode().strip()
    assert digest == f"sha256:{expected}"
    assert nar.startswith(b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1")
    if backend is NIX:
        assert size == len(nar)
    else:
        assert size is None


def test_nix_export_and_import_move_a_closure(tmp_path: Path) -> None:
    source = Machine(NIX, _make_store(tmp_path / "one"))
    target = Machine(NIX, _make_store(tmp_path / "two"))
    b = source.store.instantiate(chain())
    outputs = NIX.parse_build_outputs(
        source.ok(NIX.build(b, max_silent_time=None, timeout=None)).stdout
    )
    closure = source.store.check(["nix-store", "-qR", *outputs]).decode().split()
    assert len(closure) == 2  # b's output refers to a's

    # To a file with an awkward name (as the coordinator does before fetching it over SFTP)...
    bundle = tmp_path / "bundle dir" / "it's $(a) bundle;.nar"
    bundle.parent.mkdir()
    source.ok(NIX.export_to_file(closure, str(bundle)))
    assert bundle.read_bytes() == source.ok(NIX.export(closure)).stdout
    # ...and into another store through stdin.
    assert NIX.parse_missing(target.ok(NIX.missing(closure)).stdout) == closure
    target.ok(Command(NIX.import_bundle().argv, stdin=bundle.read_bytes()))
    assert NIX.parse_missing(target.ok(NIX.missing(closure)).stdout) == []
    assert NIX.parse_nar_hash(target.ok(NIX.nar_hash(outputs[0])).stdout) == NIX.parse_nar_hash(
        source.ok(NIX.nar_hash(outputs[0])).stdout
    )


def test_nix_import_without_references_fails_and_names_them(tmp_path: Path) -> None:
    source = Machine(NIX, _make_store(tmp_path / "one"))
    target = Machine(NIX, _make_store(tmp_path / "two"))
    b = source.store.instantiate(chain())
    (out_b,) = NIX.parse_build_outputs(
        source.ok(NIX.build(b, max_silent_time=None, timeout=None)).stdout
    )
    (out_a,) = source.store.check(["nix-store", "--query", "--references", out_b]).split()
    bundle = source.ok(NIX.export([out_b])).stdout
    done = target.run(Command(NIX.import_bundle().argv, stdin=bundle))
    assert (done.returncode, done.stderr.decode()) == (
        1, f"error: path '{out_a.decode()}' is not valid\n")
    assert NIX.parse_missing(target.ok(NIX.missing([out_b])).stdout) == [out_b]


def test_guix_signed_export_imports_where_the_key_is_authorized(tmp_path: Path) -> None:
    source = _guix_machine(tmp_path / "one")
    target = _guix_machine(tmp_path / "two")
    source.ok(Command(("guix", "archive", "--generate-key")))
    public_key = Path(source.store.env["GUIX_CONFIGURATION_DIRECTORY"], "signing-key.pub")
    target.ok(Command(("guix", "archive", "--authorize"), stdin=public_key.read_bytes()))

    b = source.store.instantiate(chain())
    outputs = GUIX.parse_build_outputs(
        source.ok(GUIX.build(b, max_silent_time=None, timeout=None)).stdout
    )
    closure = source.store.check(["nix-store", "-qR", *outputs]).decode().split()
    bundle = tmp_path / "a dir" / "guix $(x) 'bundle'.nar"
    bundle.parent.mkdir()
    source.ok(GUIX.export_to_file(closure, str(bundle)))
    assert bundle.stat().st_size > 0

    assert sorted(GUIX.parse_missing(target.ok(GUIX.missing(closure)).stdout)) == sorted(closure)
    # The Guix daemon refuses an unsigned bundle (Nix's own export of the same paths)...
    unsigned = source.store.check(["nix-store", "--export", *closure])
    refused = target.run(Command(GUIX.import_bundle().argv, stdin=unsigned))
    assert refused.returncode == 1 and b"lacks a signature" in refused.stderr
    # ...and takes the signed one.
    target.ok(Command(GUIX.import_bundle().argv, stdin=bundle.read_bytes()))
    assert GUIX.parse_missing(target.ok(GUIX.missing(closure)).stdout) == []
