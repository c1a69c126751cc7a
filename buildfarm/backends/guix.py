"""Guix machines: `guix archive`, `guix build`, `guix gc`, `guix hash`, and how to read them.

Sources of every parsed string are cited from Guix itself (Millak/guix): guix/ui.scm
(show-what-to-build, show-version-and-exit), guix/scripts/{build,archive,gc,hash}.scm and the
daemon in nix/libstore/build.cc. Guix's client exits 1 on every daemon error (guix/ui.scm
call-with-error-handling), so failures are told apart by their messages only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from buildfarm.backends.base import (
    Command,
    DryRun,
    FailureKind,
    PlanHeader,
    check_paths,
    check_seconds,
    classify_failure,
    decode,
    differs_on_check,
    first_line,
    is_nix32_sha256,
    parse_path_lines,
    parse_plan,
    shell_export_to_temp,
    shell_redirect,
)
from buildfarm.errors import RemoteError, UsageError

_I = re.IGNORECASE

# guix/ui.scm show-what-to-build (Millak/guix 0099dbaf), written to stderr, with "would" under
# --dry-run and "will" otherwise:
#   (N_ "The following derivation would be built:~%" "The following derivations would be built:~%")
#   then (format … "~{  ~a~%~}" build) — two-space indent (older Guix: lowercase "the following",
#   three- or four-space indent, so any indent is accepted);
#   (G_ "~:[~,1h MB would be downloaded:~%~;~]") or, when a download size is unknown,
#   (N_ "~:[The following file would be downloaded:~%~;~]" "… files …"), then "~{  ~a~%~}";
#   (N_ "~:[The following graft would be made:~%~{   ~a~%~}~;~]" "… grafts …");
#   (N_ "~:[The following profile hook would be built:~%~{   ~a~%~}~;~]" "… hooks …").
# Graft and profile-hook derivations are built too, so they count as builds.
_PLAN_HEADERS = (
    PlanHeader(re.compile(r"the following derivations? (?:would|will) be built:", _I), "build"),
    PlanHeader(re.compile(r"the following grafts? (?:would|will) be made:", _I), "build"),
    PlanHeader(re.compile(r"the following profile hooks? (?:would|will) be built:", _I), "build"),
    PlanHeader(
        re.compile(r"[0-9][0-9.,'\u00a0\u202f]* MB (?:would|will) be downloaded:", _I),
        "download",
    ),
    PlanHeader(re.compile(r"the following files? (?:would|will) be downloaded:", _I), "download"),
)

# guix/ui.scm show-version-and-exit: (simple-format #t "~a (~a) ~a~%" command
# %guix-package-name %guix-version), i.e. "guix (GNU Guix) 1.4.0".
_VERSION = re.compile(r"\S+ \((?P<package>[^)]*Guix[^)]*)\) (?P<version>\S+)")


class GuixBackend:
    """Argv builders and parsers for a machine running the Guix daemon."""

    name = "guix"
    # A Guix daemon refuses unsigned archives even from trusted users
    # (nix/nix-daemon/nix-daemon.cc: importPaths(true, …), "Unlike Nix").
    signed_imports = True

    def missing(self, paths: Sequence[str]) -> Command:
        # guix/scripts/archive.scm --missing: reads newline-separated file names from stdin
        # (read-line) and prints the invalid ones in input order.
        checked = check_paths(paths)
        for path in checked:
            if "\n" in path or "\r" in path:
                raise UsageError(f"store path {path!r} contains a line break")
        stdin = "".join(f"{path}\n" for path in checked).encode()
        return Command(("guix", "archive", "--missing"), stdin=stdin)

    def parse_missing(self, stdout: bytes) -> list[str]:
        # guix/scripts/archive.scm: (format #t "~{~a~%~}" missing)
        return parse_path_lines(stdout, "guix archive --missing")

    def import_bundle(self) -> Command:
        # guix/scripts/archive.scm --import: the bundle comes on stdin; nothing on stdout.
        return Command(("guix", "archive", "--import"))

    def export(self, paths: Sequence[str]) -> Command:
        # guix/scripts/archive.scm --export: the bundle goes to stdout, signed with
        # /etc/guix/signing-key.sec; without -r only the named items are written.
        return Command(("guix", "archive", "--export", *check_paths(paths)))

    def export_to_file(self, paths: Sequence[str], file: str) -> Command:
        return shell_redirect(("guix", "archive", "--export"), check_paths(paths), file)

    def export_to_temp(self, paths: Sequence[str]) -> Command:
        return shell_export_to_temp(("guix", "archive", "--export"), check_paths(paths))

    def dry_run(self, drv: str) -> Command:
        (checked,) = check_paths((drv,), "derivation")
        return Command(("guix", "build", "--dry-run", "--no-grafts", checked))

    def parse_dry_run(self, stdout: bytes, stderr: bytes) -> DryRun:
        # The plan is on stderr. When nothing is needed guix goes on with a no-op build and
        # prints the output paths on stdout, which says nothing about the plan.
        what = "guix build --dry-run"
        return parse_plan(decode(stderr, what), _PLAN_HEADERS, what)

    def delete(self, paths: Sequence[str]) -> Command:
        # guix/scripts/gc.scm -D/--delete: prints nothing on stdout; a live path fails with
        # "cannot delete path `X' since it is still alive" (nix/libstore/gc.cc).
        checked = check_paths(paths)
        if not checked:
            raise UsageError("nothing to delete: give at least one store path")
        return Command(("guix", "gc", "--delete", *checked))

    def build(
        self, drv: str, *, max_silent_time: int | None, timeout: int | None, check: bool = False
    ) -> Command:
        # guix/scripts/build.scm %standard-build-options: "--max-silent-time" and "--timeout"
        # take seconds (sent to the daemon as build-max-silent-time / build-timeout); %options:
        # "--check" sets build-mode to (build-mode check): rebuild, compare, keep the outputs.
        (checked,) = check_paths((drv,), "derivation")
        argv = ["guix", "build", "--no-grafts", *(["--check"] if check else [])]
        silent = check_seconds(max_silent_time, "max-silent-time")
        total = check_seconds(timeout, "timeout")
        if silent is not None:
            argv.append(f"--max-silent-time={silent}")
        if total is not None:
            argv.append(f"--timeout={total}")
        argv.append(checked)
        return Command(tuple(argv))

    def classify_build_failure(
        self, exit_status: int | None, log_tail: bytes
    ) -> tuple[FailureKind, str]:
        # Every daemon error ends the client with exit status 1 (guix/ui.scm), so only the
        # messages matter; see buildfarm.backends for the daemon strings.
        return classify_failure(exit_status, log_tail)

    def check_differs(self, exit_status: int | None, log_tail: bytes) -> bool:
        # The client exits 1 on every daemon error: only the message tells (buildfarm.backends
        # .base._NOT_DETERMINISTIC).
        return differs_on_check(log_tail)

    def nar_hash(self, path: str) -> Command:
        # No Guix command prints the stored NarHash; guix/scripts/hash.scm recomputes it:
        # -S/--serializer=nar, -H/--hash=ALGORITHM, -f/--format=nix-base32, one line per FILE.
        (checked,) = check_paths((path,))
        return Command(
            (
                "guix",
                "hash",
                "--serializer=nar",
                "--hash=sha256",
                "--format=nix-base32",
                checked,
            )
        )

    def parse_nar_hash(self, stdout: bytes) -> tuple[str, int | None]:
        # guix/scripts/hash.scm: (format #t "~a~%" hash) — the bare nix-base32 digest, no size.
        line = first_line(stdout, "guix hash")
        if not is_nix32_sha256(line):
            raise RemoteError(f"guix hash: expected a nix-base32 SHA-256, got {line[:200]!r}")
        return f"sha256:{line}", None

    def version(self) -> Command:
        return Command(("guix", "--version"))

    def parse_version(self, stdout: bytes) -> str:
        line = first_line(stdout, "guix --version")
        match = _VERSION.fullmatch(line)
        if match is None:
            raise RemoteError(f"guix --version: unexpected answer {line[:200]!r}")
        return match["version"]

    def parse_build_outputs(self, stdout: bytes) -> list[str]:
        # guix/ui.scm show-derivation-outputs: (format #t "~{~a~%~}" output-paths).
        return parse_path_lines(stdout, "guix build")
