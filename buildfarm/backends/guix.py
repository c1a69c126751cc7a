"""Guix machines: `guix archive`, `guix build`, `guix gc`, `guix hash`, and how to read them.

Sources of every parsed string are cited from Guix itself (Millak/guix, wahjava/guix 3652bbe6):
guix/ui.scm (show-what-to-build, show-version-and-exit), guix/status.scm, guix/scripts/{build,
archive,gc,hash}.scm and the daemon in nix/libstore/build.cc. Guix's client exits 1 on every
daemon error (guix/ui.scm call-with-error-handling), so failures are told apart by their messages
only; and those messages are translated (N_ and G_ in ui.scm and status.scm; the client also
passes its LC_MESSAGES to the daemon as the "locale" option, which `guix substitute` uses:
guix/store.scm set-build-options, guix/scripts/substitute.scm), so every command runs under
LC_ALL=C.UTF-8 with LANGUAGE empty (gettext reads LANGUAGE before the locale otherwise; Guix
System's skeleton .bashrc sources /etc/profile even for SSH commands).
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
    check_urls,
    classify_failure,
    decode,
    differs_on_check,
    first_line,
    is_nix32_sha256,
    parse_path_lines,
    parse_plan,
    require_target,
    shell_drop_gc_roots,
    shell_export_to_temp,
    shell_gc_roots,
    shell_redirect,
    strip_ansi,
)
from buildfarm.errors import RemoteError, UsageError

_I = re.IGNORECASE
GUIX = ("env", "LC_ALL=C.UTF-8", "LANGUAGE=", "guix")
# The client's state directory (guix/config.scm %state-directory), where the daemon keeps
# profiles, and with them the roots a user may add (buildfarm.backends.base.shell_gc_roots).
STATE_DIR = "${GUIX_STATE_DIRECTORY:-/var/guix}"
# `guix hash -S nar` came with Guix 1.4.0 (commit 05c96259 "guix hash: Add 'serializer'
# option", 2021-11-18; 1.3.0 was released in May 2021).
MINIMUM_VERSION = (1, 4, 0)

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

# guix/status.scm print-build-event at the default verbosity (3: print-urls? and print-log?):
# (G_ "substituting ~a...") for 'substituter-started, then (G_ "downloading from ~a ...") with
# the nar's URL for 'download-started.
_SUBSTITUTING = re.compile(r"^substituting (?P<path>/\S+)\.\.\.$", re.M)
_DOWNLOADING = re.compile(r"^downloading from (?P<url>\S+) \.\.\.$", re.M)


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
        return Command((*GUIX, "archive", "--missing"), stdin=stdin)

    def parse_missing(self, stdout: bytes) -> list[str]:
        # guix/scripts/archive.scm: (format #t "~{~a~%~}" missing)
        return parse_path_lines(stdout, "guix archive --missing")

    def import_bundle(self) -> Command:
        # guix/scripts/archive.scm --import: the bundle comes on stdin; nothing on stdout.
        return Command((*GUIX, "archive", "--import"))

    def export(self, paths: Sequence[str]) -> Command:
        # guix/scripts/archive.scm --export: the bundle goes to stdout, signed with
        # /etc/guix/signing-key.sec; without -r only the named items are written.
        return Command((*GUIX, "archive", "--export", *check_paths(paths)))

    def export_to_file(self, paths: Sequence[str], file: str) -> Command:
        return shell_redirect((*GUIX, "archive", "--export"), check_paths(paths), file)

    def export_to_temp(self, paths: Sequence[str]) -> Command:
        return shell_export_to_temp((*GUIX, "archive", "--export"), check_paths(paths))

    def dry_run(
        self, drv: str, *, rebuild: bool = False, inputs: Sequence[tuple[str, Sequence[str]]] = ()
    ) -> Command:
        # The plan of what the build itself would do: no substitutes (--no-substitutes: the
        # substitution oracle then answers #f, guix/ui.scm show-what-to-build), nothing
        # offloaded. guix/derivations.scm derivation-build-plan does not look into a
        # derivation whose outputs are valid, unless in check mode ("In 'check' mode, assume
        # that DRV is not built"): `rebuild` (the outputs are there) asks with --check, so the
        # plan still names the inputs that are missing. `inputs` is for stores without one.
        (checked,) = check_paths((drv,), "derivation")
        check = ("--check",) if rebuild else ()
        return Command((*GUIX, "build", "--dry-run", "--no-grafts", "--no-substitutes",
                        "--no-offload", *check, checked))

    def dry_run_names_target(self, rebuild: bool) -> bool:
        return True

    def parse_dry_run(self, stdout: bytes, stderr: bytes, target: str | None = None) -> DryRun:
        # The plan is on stderr. When nothing is needed guix goes on with a no-op build and
        # prints the output paths on stdout, which says nothing about the plan; the dry runs
        # above always plan `target` itself, so a plan that does not name it was not read.
        what = "guix build --dry-run"
        plan = parse_plan(decode(stderr, what), _PLAN_HEADERS, what)
        return require_target(plan, target, what)

    def delete(self, paths: Sequence[str]) -> Command:
        # guix/scripts/gc.scm -D/--delete: prints nothing on stdout; a live path fails with
        # "cannot delete path `X' since it is still alive" (nix/libstore/gc.cc).
        checked = check_paths(paths)
        if not checked:
            raise UsageError("nothing to delete: give at least one store path")
        return Command((*GUIX, "gc", "--delete", *checked))

    def build(
        self, drv: str, *, max_silent_time: int | None, timeout: int | None, check: bool = False
    ) -> Command:
        # guix/scripts/build.scm %standard-build-options: "--max-silent-time" and "--timeout"
        # take seconds (sent to the daemon as build-max-silent-time / build-timeout); %options:
        # "--check" sets build-mode to (build-mode check): rebuild, compare, keep the outputs.
        # Substitutes are on by default (%default-options `(substitutes? . #t)`; the daemon
        # tries them before building, nix/libstore/build.cc haveDerivation), and so is
        # offloading (`(offload? . #t)`: a machine with /etc/guix/machines.scm would send the
        # build elsewhere): the farm's build is built here, from the inputs it was given.
        (checked,) = check_paths((drv,), "derivation")
        argv = [*GUIX, "build", "--no-grafts", "--no-substitutes", "--no-offload",
                *(["--check"] if check else [])]
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

    def substitute(
        self, paths: Sequence[str], urls: Sequence[str], trusted_keys: Sequence[str] = ()
    ) -> Command:
        # guix/scripts/build.scm: store items that are not derivations are handed to the
        # daemon, which substitutes each (nix/libstore/build.cc buildPaths: a SubstitutionGoal;
        # one no server offers ends ecNoSubstituters, which is not a failure). --keep-going: one
        # that fails does not stop the others. "--substitute-urls" is split on whitespace
        # (string-tokenize) and replaces the daemon's list for this client; what a server
        # offers is accepted when its narinfo is signed by a key of the machine's ACL
        # (guix/scripts/substitute.scm valid-narinfo?), so `trusted_keys` is not needed.
        del trusted_keys
        checked = check_paths(paths)
        if not checked:
            raise UsageError("nothing to substitute: give at least one store path")
        return Command((*GUIX, "build", "--no-grafts", "--no-offload", "--keep-going",
                        f"--substitute-urls={' '.join(check_urls(urls))}", *checked))

    def parse_substituted(self, log: bytes) -> dict[str, str]:
        """Where each substituted path was downloaded from (its nar's URL), by the log of
        `substitute`."""
        return _downloads(strip_ansi(decode(log, "guix build")))

    def gc_roots(self, farm: str, attempt: str, keep: Sequence[str],
                 paths: Sequence[str]) -> Command:
        return shell_gc_roots(STATE_DIR, farm, attempt, keep, paths)

    def drop_gc_roots(self, farm: str, attempt: str) -> Command:
        return shell_drop_gc_roots(STATE_DIR, farm, attempt)

    def nar_hash(self, path: str) -> Command:
        # No Guix command prints the stored NarHash; guix/scripts/hash.scm recomputes it:
        # -S/--serializer=nar, -H/--hash=ALGORITHM, -f/--format=nix-base32, one line per FILE.
        (checked,) = check_paths((path,))
        return Command(
            (*GUIX, "hash", "--serializer=nar", "--hash=sha256", "--format=nix-base32", checked)
        )

    def parse_nar_hash(self, stdout: bytes) -> tuple[str, int | None]:
        # guix/scripts/hash.scm: (format #t "~a~%" hash) — the bare nix-base32 digest, no size.
        line = first_line(stdout, "guix hash")
        if not is_nix32_sha256(line):
            raise RemoteError(f"guix hash: expected a nix-base32 SHA-256, got {line[:200]!r}")
        return f"sha256:{line}", None

    def version(self) -> Command:
        return Command((*GUIX, "--version"))

    def parse_version(self, stdout: bytes) -> str:
        line = first_line(stdout, "guix --version")
        match = _VERSION.fullmatch(line)
        if match is None:
            raise RemoteError(f"guix --version: unexpected answer {line[:200]!r}")
        return match["version"]

    def version_problem(self, version: str) -> str | None:
        """Why this Guix is too old for the farm, or None. A `guix pull`ed Guix names its
        commit instead of a release (guix/describe.scm): taken as recent enough."""
        release = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(?:[-.+].*)?", version)
        if release is None:
            return None
        found = tuple(int(part or 0) for part in release.groups())
        if found < MINIMUM_VERSION:
            return (f"Guix {version} is older than 1.4.0, the first with `guix hash -S nar`, "
                    "which the farm uses to check what the machine sends")
        return None

    def parse_build_outputs(self, stdout: bytes) -> list[str]:
        # guix/ui.scm show-derivation-outputs: (format #t "~{~a~%~}" output-paths).
        return parse_path_lines(stdout, "guix build")


def _downloads(text: str) -> dict[str, str]:
    """Each "substituting PATH..." line with the "downloading from URL ..." that follows it."""
    found: dict[str, str] = {}
    starts = list(_SUBSTITUTING.finditer(text))
    for index, start in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(text)
        url = _DOWNLOADING.search(text, start.end(), end)
        if url is not None:
            found[start["path"]] = url["url"]
    return found
