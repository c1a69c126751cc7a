"""Nix machines: `nix-store` commands and how to read them.

Sources of every parsed string are cited from NixOS/nix: src/libmain/shared.cc (printMissing,
printVersion), src/nix-store/nix-store.cc and src/libstore/build/*.cc. Checked against Nix 2.8
(Debian 12's nix-bin) by tests/test_backends.py, and against newer wording from the source.
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

# src/libmain/shared.cc printMissing (Nix >= 2.4), on stderr:
#   "this derivation will be built:" / "these %d derivations will be built:",
#   "this path will be fetched (%.2f MiB download, %.2f MiB unpacked):" /
#   "these %d paths will be fetched (…):" (newer Nix: "(%s download, %s unpacked)" via
#   renderSize), "don't know how to build these paths%s:" with " (may be caused by read-only
#   store access)"; each followed by printMsg(lvl, "  %s", path). Nix <= 2.3 printed
#   "these derivations will be built:" and "these paths will be fetched (…):" without a count.
_PLAN_HEADERS = (
    PlanHeader(re.compile(r"this derivation will be built:"), "build"),
    PlanHeader(re.compile(r"these (?:(?P<count>\d+) )?derivations will be built:"), "build"),
    PlanHeader(re.compile(r"this path will be fetched(?: \([^)]*\))?:"), "download"),
    PlanHeader(
        re.compile(r"these (?:(?P<count>\d+) )?paths will be fetched(?: \([^)]*\))?:"),
        "download",
    ),
    PlanHeader(
        re.compile(
            r"don't know how to build these paths"
            r"(?: \(may be caused by read-only store access\))?:"
        ),
        "unknown",
    ),
)

# src/libmain/shared.cc printVersion: fmt("%1% (Nix) %2%", programName, nixVersion), e.g.
# "nix-store (Nix) 2.8.0" (Lix prints "(Lix, like Nix)").
_VERSION = re.compile(r"\S+ \((?P<package>[^)]*Nix[^)]*)\) (?P<version>\S+)")

# src/libstore/build/worker.cc Worker::exitStatus (Nix 2.8 and newer ExitStatusFlags): 0x60 |
# 0x04 build failure (100), | 0x01 timed out (101), | 0x02 hash mismatch (102), | 0x08 check
# mismatch (104); other errors exit 1.
_FAILED_STATUSES = frozenset(s for s in range(0x60, 0x70) if s & 0x0E and not s & 0x01)
_TIMEOUT_STATUSES = frozenset(s for s in range(0x60, 0x70) if s & 0x01)
_CHECK_STATUSES = frozenset(s for s in range(0x60, 0x70) if s & 0x08 and not s & 0x05)

# src/libstore/globals.hh: the state directory (NIX_STATE_DIR, by default /nix/var/nix), where
# profiles are kept, and with them the roots a user may add (base.shell_gc_roots).
STATE_DIR = "${NIX_STATE_DIR:-/nix/var/nix}"
# src/libstore/substitution-goal.cc (Nix 2.8) PathSubstitutionGoal::tryToRun: printInfo
# "copying path '%s' from '%s'..." with the store path and the substituter's URI.
_COPYING = re.compile(r"^copying path '(?P<path>/[^']+)' from '(?P<url>[^']+)'\.\.\.$", re.M)
# Never substitute the outputs of the build, nor hand it to another machine: Nix's settings
# "substitute" (use substituters at all) and "builders" (remote builders; empty: none),
# src/libstore/globals.hh.
_BUILD_HERE = ("--option", "substitute", "false", "--option", "builders", "")

# One remote command for both numbers: src/nix-store/nix-store.cc refuses two query types at
# once ("query type '--size' conflicts with earlier flag").
_NAR_HASH_SCRIPT = 'nix-store --query --hash "$1" && exec nix-store --query --size "$1"'


class NixBackend:
    """Argv builders and parsers for a machine with a Nix store."""

    name = "nix"
    # Nix imports unsigned bundles (nix-store --import) for trusted users.
    signed_imports = False

    def missing(self, paths: Sequence[str]) -> Command:
        # src/nix-store/nix-store.cc opCheckValidity: --print-invalid prints each invalid path
        # on its own line instead of failing.
        return Command(("nix-store", "--check-validity", "--print-invalid", *check_paths(paths)))

    def parse_missing(self, stdout: bytes) -> list[str]:
        return parse_path_lines(stdout, "nix-store --check-validity")

    def import_bundle(self) -> Command:
        return Command(("nix-store", "--import"))

    def export(self, paths: Sequence[str]) -> Command:
        return Command(("nix-store", "--export", *check_paths(paths)))

    def export_to_file(self, paths: Sequence[str], file: str) -> Command:
        return shell_redirect(("nix-store", "--export"), check_paths(paths), file)

    def export_to_temp(self, paths: Sequence[str]) -> Command:
        return shell_export_to_temp(("nix-store", "--export"), check_paths(paths))

    def dry_run(
        self, drv: str, *, rebuild: bool = False, inputs: Sequence[tuple[str, Sequence[str]]] = ()
    ) -> Command:
        # src/libstore/misc.cc queryMissing does not look into a derivation whose outputs are
        # valid (and ignores --check): for a rebuild (`rebuild`: the outputs are there) the plan
        # asked is that of the inputs `inputs` (derivation, output names), each as
        # "DRV!OUT,OUT" (src/libstore/derived-path.cc DerivedPath::parse).
        (checked,) = check_paths((drv,), "derivation")
        if not rebuild:
            return Command(("nix-store", "--realise", "--dry-run", *_BUILD_HERE, checked))
        wanted = []
        for input_drv, outputs in inputs:
            (path,) = check_paths((input_drv,), "derivation")
            if not outputs or any(not re.fullmatch(r"[A-Za-z0-9+._?=-]+", o) for o in outputs):
                raise UsageError(f"output names {list(outputs)!r} of {path} are not usable")
            wanted.append(f"{path}!{','.join(outputs)}")
        if not wanted:
            raise UsageError(f"{checked} has no input derivation to ask about")
        return Command(("nix-store", "--realise", "--dry-run", *_BUILD_HERE, *wanted))

    def dry_run_names_target(self, rebuild: bool) -> bool:
        return not rebuild

    def parse_dry_run(self, stdout: bytes, stderr: bytes, target: str | None = None) -> DryRun:
        # opRealise prints the plan (printMissing) on stderr and returns before building.
        what = "nix-store --dry-run"
        return require_target(parse_plan(decode(stderr, what), _PLAN_HEADERS, what), target, what)

    def delete(self, paths: Sequence[str]) -> Command:
        checked = check_paths(paths)
        if not checked:
            raise UsageError("nothing to delete: give at least one store path")
        return Command(("nix-store", "--delete", *checked))

    def build(
        self, drv: str, *, max_silent_time: int | None, timeout: int | None, check: bool = False
    ) -> Command:
        # src/libstore/globals.hh: settings "max-silent-time" (alias build-max-silent-time) and
        # "timeout" (alias build-timeout), both in seconds, 0 = no limit. src/nix-store/
        # nix-store.cc opRealise: --check builds again and compares with the valid outputs
        # (bmCheck), which stay as they are.
        (checked,) = check_paths((drv,), "derivation")
        argv = ["nix-store", "--realise", *(["--check"] if check else []), checked,
                *_BUILD_HERE]
        silent = check_seconds(max_silent_time, "max-silent-time")
        total = check_seconds(timeout, "timeout")
        if silent is not None:
            argv += ["--option", "max-silent-time", str(silent)]
        if total is not None:
            argv += ["--option", "timeout", str(total)]
        return Command(tuple(argv))

    def classify_build_failure(
        self, exit_status: int | None, log_tail: bytes
    ) -> tuple[FailureKind, str]:
        return classify_failure(
            exit_status,
            log_tail,
            failed_statuses=_FAILED_STATUSES,
            timeout_statuses=_TIMEOUT_STATUSES,
        )

    def check_differs(self, exit_status: int | None, log_tail: bytes) -> bool:
        # Worker::exitStatus: 0x60 | 0x08 (104) when a --check found a difference (checked
        # against Nix 2.8 on the test bed: "error: derivation '…' may not be deterministic:
        # output '…' differs", exit 104).
        return exit_status in _CHECK_STATUSES or differs_on_check(log_tail)

    def substitute(
        self, paths: Sequence[str], urls: Sequence[str], trusted_keys: Sequence[str] = ()
    ) -> Command:
        # Realising a path that is not a derivation substitutes it; --keep-going goes on past
        # one that fails (the command then exits 1, as it does for a path no server offers:
        # "don't know how to build these paths"). "substituters" replaces the machine's list
        # for this command; "narinfo-cache-negative-ttl" 0 forgets that a server lacked a path
        # (the farm's own server gains outputs all the time);
        # "extra-trusted-public-keys" adds to the keys it trusts (src/libstore/globals.hh; a
        # setting's "extra-" form appends, src/libutil/config.cc). Both need a trusted user
        # (or a store of its own), as importing does.
        checked = check_paths(paths)
        if not checked:
            raise UsageError("nothing to substitute: give at least one store path")
        argv = ["nix-store", "--realise", "--keep-going", "--option", "substituters",
                " ".join(check_urls(urls)), "--option", "narinfo-cache-negative-ttl", "0"]
        keys = [k for k in trusted_keys if k]
        for key in keys:
            if any(c.isspace() for c in key) or ":" not in key:
                raise UsageError(f"public key {key!r} is not NAME:BASE64")
        if keys:
            argv += ["--option", "extra-trusted-public-keys", " ".join(keys)]
        return Command((*argv, *checked))

    def parse_substituted(self, log: bytes) -> dict[str, str]:
        text = strip_ansi(decode(log, "nix-store --realise"))
        return {m["path"]: m["url"] for m in _COPYING.finditer(text)}

    def gc_roots(self, farm: str, attempt: str, keep: Sequence[str],
                 paths: Sequence[str]) -> Command:
        return shell_gc_roots(STATE_DIR, farm, attempt, keep, paths)

    def drop_gc_roots(self, farm: str, attempt: str) -> Command:
        return shell_drop_gc_roots(STATE_DIR, farm, attempt)

    def nar_hash(self, path: str) -> Command:
        (checked,) = check_paths((path,))
        return Command(("sh", "-c", _NAR_HASH_SCRIPT, "nar-hash", checked))

    def parse_nar_hash(self, stdout: bytes) -> tuple[str, int | None]:
        # src/nix-store/nix-store.cc opQuery qHash: narHash.to_string(Base32, true), i.e.
        # "sha256:<nix-base32>"; qSize: the decimal nar size.
        lines = [line.strip() for line in decode(stdout, "nix-store --query").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise RemoteError("nix-store --query --hash: no output")
        digest = lines[0]
        algorithm, _, encoded = digest.partition(":")
        if algorithm != "sha256" or not is_nix32_sha256(encoded):
            raise RemoteError(f"nix-store --query --hash: unexpected answer {digest[:200]!r}")
        if len(lines) == 1:
            return digest, None
        if len(lines) > 2 or not lines[1].isascii() or not lines[1].isdigit():
            raise RemoteError(f"nix-store --query --size: unexpected answer {lines[1][:200]!r}")
        return digest, int(lines[1])

    def version(self) -> Command:
        return Command(("nix-store", "--version"))

    def parse_version(self, stdout: bytes) -> str:
        line = first_line(stdout, "nix-store --version")
        match = _VERSION.fullmatch(line)
        if match is None:
            raise RemoteError(f"nix-store --version: unexpected answer {line[:200]!r}")
        return match["version"]

    def version_problem(self, version: str) -> str | None:
        return None

    def parse_build_outputs(self, stdout: bytes) -> list[str]:
        # src/nix-store/nix-store.cc opRealise: prints each output path on its own line.
        return parse_path_lines(stdout, "nix-store --realise")
