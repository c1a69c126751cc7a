"""What both store backends share: the `Backend` protocol, the `Command` a backend asks the
coordinator to run, and the readers of answers Guix and Nix give alike (plans, build failures,
path lists). Guix's daemon is a fork of Nix's, so most of what a backend reads is read here.
Every parser raises `RemoteError` on output it cannot read, never anything else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from buildfarm.errors import ProtocolError, RemoteError, UsageError

# Kinds returned by `Backend.classify_build_failure`: the builder's own failure ("failed"), its
# timeouts ("timeout", "silent"), or anything else, which is the machine's ("machine": a daemon
# that is down, a full disk, a platform it cannot build for, a substitute that failed, ...).
FailureKind = Literal["failed", "timeout", "silent", "machine"]
FAILURE_KINDS: frozenset[str] = frozenset({"failed", "timeout", "silent", "machine"})
BUILDER_FAILURES: frozenset[str] = frozenset({"failed", "timeout", "silent"})


@dataclass(frozen=True, slots=True)
class Command:
    """One program to run on a machine: argv words (never a shell string) and optional stdin."""

    argv: tuple[str, ...]
    stdin: bytes | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise UsageError("a command needs at least a program name")
        for word in self.argv:
            if not isinstance(word, str):
                raise UsageError(f"command word {word!r} is not a string")
            if "\0" in word:
                raise UsageError(f"command word {word!r} contains a NUL byte")


@dataclass(frozen=True, slots=True)
class DryRun:
    """What the store says a build would do before the build itself runs."""

    would_build: tuple[str, ...]  # .drv paths
    would_download: tuple[str, ...]  # store paths
    # Paths the store can neither build nor substitute (Nix's "don't know how to build").
    unknown: tuple[str, ...] = ()


class Backend(Protocol):
    """The store commands of one kind of machine (guix.py and nix.py name each command)."""

    @property
    def name(self) -> str: ...

    @property
    def signed_imports(self) -> bool: ...

    def missing(self, paths: Sequence[str]) -> Command: ...
    def parse_missing(self, stdout: bytes) -> list[str]: ...
    def import_bundle(self) -> Command: ...
    def export(self, paths: Sequence[str]) -> Command: ...
    def export_to_file(self, paths: Sequence[str], file: str) -> Command: ...
    def export_to_temp(self, paths: Sequence[str]) -> Command: ...
    def dry_run(
        self, drv: str, *, rebuild: bool = False, inputs: Sequence[tuple[str, Sequence[str]]] = ()
    ) -> Command: ...
    def dry_run_names_target(self, rebuild: bool) -> bool: ...
    def parse_dry_run(self, stdout: bytes, stderr: bytes, target: str | None = None) -> DryRun: ...
    def delete(self, paths: Sequence[str]) -> Command: ...
    def build(
        self, drv: str, *, max_silent_time: int | None, timeout: int | None, check: bool = False
    ) -> Command: ...
    def classify_build_failure(
        self, exit_status: int | None, log_tail: bytes
    ) -> tuple[FailureKind, str]: ...
    def check_differs(self, exit_status: int | None, log_tail: bytes) -> bool: ...
    def substitute(
        self, paths: Sequence[str], urls: Sequence[str], trusted_keys: Sequence[str] = ()
    ) -> Command: ...
    def parse_substituted(self, log: bytes) -> dict[str, str]: ...
    def gc_roots(self, farm: str, attempt: str, keep: Sequence[str],
                 paths: Sequence[str]) -> Command: ...
    def drop_gc_roots(self, farm: str, attempt: str) -> Command: ...
    def nar_hash(self, path: str) -> Command: ...
    def parse_nar_hash(self, stdout: bytes) -> tuple[str, int | None]: ...
    def version(self) -> Command: ...
    def parse_version(self, stdout: bytes) -> str: ...
    def version_problem(self, version: str) -> str | None: ...
    def parse_build_outputs(self, stdout: bytes) -> list[str]: ...


# --------------------------------------------------------------------------------------------
# Helpers shared by both backends: argument checks, text decoding, path lists.

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
_NIX32 = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]{52}")


def check_paths(paths: Iterable[str], what: str = "store path") -> tuple[str, ...]:
    """Absolute paths only: a word starting with '-' could otherwise be read as an option."""
    if isinstance(paths, str):
        raise UsageError(f"expected a list of {what}s, got the single string {paths!r}")
    checked = tuple(paths)
    for path in checked:
        if not isinstance(path, str) or not path.startswith("/"):
            raise UsageError(f"{what} {path!r} is not an absolute path")
        if "\0" in path:
            raise UsageError(f"{what} {path!r} contains a NUL byte")
    return checked


def check_seconds(value: int | None, option: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{option} must be a whole number of seconds >= 0, not {value!r}")
    return value


def shell_redirect(program: Sequence[str], paths: Sequence[str], file: str) -> Command:
    """`program PATHS... > FILE` without building a shell string from data.

    FILE and every path reach sh as separate argv words ("$0" and "$@"), so no quoting of them
    is ever needed: spaces, quotes, `$(...)`, `;` and newlines stay literal.
    """
    if not isinstance(file, str) or not file or "\0" in file:
        raise UsageError(f"export file name {file!r} is not usable")
    script = "exec " + " ".join(program) + ' "$@" > "$0"'
    return Command(("sh", "-c", script, file, *paths))


def shell_export_to_temp(program: Sequence[str], paths: Sequence[str]) -> Command:
    """`program PATHS... > TMP` into a fresh temporary file whose name is printed first: one
    command where mktemp and the export would be two. Paths reach sh as "$@" words."""
    script = (
        'f=$(mktemp -t buildfarm.XXXXXXXXXX) || exit 1; printf "%s\\n" "$f"; exec '
        + " ".join(program) + ' "$@" > "$f"'
    )
    return Command(("sh", "-c", script, "export", *paths))


_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_token(value: str, what: str) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise UsageError(f"{what} {value!r} is not a plain name")
    return value


def _roots_base(state_dir: str) -> str:
    """Where a user may put GC roots of its own: the profiles directory of its user, which the
    daemon makes and gives to each user that connects (Guix nix/nix-daemon/nix-daemon.cc
    createUser; Nix src/libstore/local-store.cc createUser), and which the collector scans for
    roots, recursively (nix/libstore/gc.cc LocalStore::findRoots: "{gcroots,manifests,profiles}").
    `state_dir` is a shell expression; "$0" is the farm's directory there."""
    return f'"{state_dir}/profiles/per-user/${{USER:-$(id -un)}}/$0"'


def shell_gc_roots(state_dir: str, farm: str, attempt: str, keep: Sequence[str],
                   paths: Sequence[str]) -> Command:
    """GC roots for `paths` (on stdin), one symlink each in the attempt's own directory under
    the farm's; directories of the farm's other attempts not in `keep` (ended, or left by a
    coordinator that died) are removed first. A root to a path not yet valid is harmless: the
    collector roots what it points to once that is valid (gc.cc foundRoot)."""
    names = [_check_token(a, "attempt name") for a in (attempt, *keep)]
    checked = check_paths(paths)
    for path in checked:
        if any(c.isspace() or c in "'\"\\" for c in path):
            raise UsageError(f"store path {path!r} cannot be rooted: it has blanks or quotes")
    script = (
        f"b={_roots_base(state_dir)} && mkdir -p \"$b/$1\" && cd \"$b\" && "
        'for x in *; do case " $* " in *" $x "*) ;; *) rm -rf "./$x" ;; esac; done && '
        'cd "$1" && exec xargs sh -c \'exec ln -sf "$@" .\' ln'
    )
    stdin = "".join(f"{path}\n" for path in checked).encode()
    return Command(("sh", "-c", script, f"buildfarm-{_check_token(farm, 'farm name')}", *names),
                   stdin=stdin)


def shell_drop_gc_roots(state_dir: str, farm: str, attempt: str) -> Command:
    script = f'exec rm -rf {_roots_base(state_dir)}/"$1"'
    return Command(("sh", "-c", script, f"buildfarm-{_check_token(farm, 'farm name')}",
                    _check_token(attempt, "attempt name")))


def check_urls(urls: Sequence[str]) -> tuple[str, ...]:
    checked = tuple(urls)
    if not checked:
        raise UsageError("no substitute URL given")
    for url in checked:
        if not isinstance(url, str) or not url or any(c.isspace() for c in url) or \
                not re.match(r"(?:https?|file)://", url):
            raise UsageError(f"substitute URL {url!r} is not an http(s):// or file:// URL")
    return checked


def decode(data: bytes, what: str) -> str:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteError(f"{what}: expected bytes, got {type(data).__name__}")
    return strip_ansi(bytes(data).decode("utf-8", errors="replace"))


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def parse_path_lines(stdout: bytes, what: str) -> list[str]:
    """One absolute path per line (blank lines skipped), as `--missing`/`--realise` print."""
    paths: list[str] = []
    for line in decode(stdout, what).split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if not line.startswith("/") or line != line.strip():
            raise RemoteError(f"{what}: expected one store path per line, got {line[:200]!r}")
        paths.append(line)
    return paths


def is_nix32_sha256(text: str) -> bool:
    return _NIX32.fullmatch(text) is not None


def first_line(stdout: bytes, what: str) -> str:
    for line in decode(stdout, what).splitlines():
        if line.strip():
            return line.strip()
    raise RemoteError(f"{what}: no output")


# --------------------------------------------------------------------------------------------
# Dry-run plans: a header line, then one indented store path per line.


@dataclass(frozen=True, slots=True)
class PlanHeader:
    """A header that opens a list in a dry-run plan."""

    pattern: re.Pattern[str]  # matched against the stripped line; group "count" if it has one
    section: str  # "build", "download" or "unknown"


_PLAN_ITEM = re.compile(r"[ \t]+(/\S+)[ \t]*")


def parse_plan(text: str, headers: Sequence[PlanHeader], what: str) -> DryRun:
    """Collect the paths listed under each header; anything outside a list is ignored.

    A list ends at the first line that is not an indented path. A header with no paths under
    it, a count that disagrees with the list, or a build list naming a non-.drv path raises.
    """
    found: dict[str, list[str]] = {"build": [], "download": [], "unknown": []}
    current: tuple[str, str, int | None, list[str]] | None = None  # header, section, count, items

    def close() -> None:
        if current is None:
            return
        header, section, count, items = current
        if not items:
            raise RemoteError(f"{what}: {header!r} is followed by no store paths")
        if count is not None and count != len(items):
            raise RemoteError(f"{what}: {header!r} announces {count} paths but lists {len(items)}")
        for item in items:
            if section == "build" and not item.endswith(".drv"):
                raise RemoteError(f"{what}: {item!r} under {header!r} is not a .drv path")
            if item not in found[section]:
                found[section].append(item)

    for raw in text.splitlines():
        stripped = raw.strip()
        header = _match_header(stripped, headers)
        if header is not None:
            close()
            section, count = header
            current = (stripped, section, count, [])
            continue
        if current is not None:
            item = _PLAN_ITEM.fullmatch(raw)
            if item is not None:
                current[3].append(item.group(1))
                continue
            close()
            current = None
    close()
    return DryRun(tuple(found["build"]), tuple(found["download"]), tuple(found["unknown"]))


def require_target(plan: DryRun, target: str | None, what: str) -> DryRun:
    """`plan`, if it names `target` among the builds (the dry runs the coordinator asks for
    always do), else RemoteError: a plan in words not recognised (translated, or a new
    wording) must never pass for "nothing else to build"."""
    if target is not None and target not in plan.would_build:
        raise ProtocolError(f"{what}: could not read the plan, which should name {target} (an "
                          "unexpected wording or language?)")
    return plan


def _match_header(line: str, headers: Sequence[PlanHeader]) -> tuple[str, int | None] | None:
    for header in headers:
        match = header.pattern.fullmatch(line)
        if match is not None:
            count = match.groupdict().get("count")
            return header.section, int(count) if count is not None else None
    return None


# --------------------------------------------------------------------------------------------
# Build failures. Guix's daemon (nix/libstore/build.cc in Guix) and Nix's share these messages;
# each pattern cites where its text comes from. Guix sources: wahjava/guix 3652bbe6.

# Daemons quote paths as `X' (old Guix, Nix 1.x), \u2018X\u2019 (Guix since 2015) or 'X' (Nix 2).
_OPEN = "[`'\u2018\"]"
_CLOSE = "['\u2019\"]"
_QUOTED_DRV = _OPEN + "(?P<drv>[^'\u2019\"\\s]+)" + _CLOSE
# Guix nix/libstore/build.cc Worker::waitForInput: format("%1% timed out after %2% seconds of
# silence") and "%1% timed out after %2% seconds", where %1% is the goal's name, "building of
# `%1%'" (DerivationGoal's constructor). Nix 2.8 src/libstore/build/worker.cc: the same, with
# the name "building of '%s' from .drv file" ('X.drv!out'); newer Nix "building derivation
# '%s'". Only the daemon's line counts: a builder may print "timed out after" itself.
_GOAL = ("(?:building of|building derivation) " + _OPEN + "[^'\u2019\"\\s]+" + _CLOSE
         + r"(?: from \.drv file)? ")
_TIMED_OUT = re.compile(
    _GOAL + r"timed out after (?P<seconds>\d+) seconds(?P<silence> of silence)?"
)
# Guix nix/libstore/build.cc DerivationGoal::buildDone: BuildError(format("builder for `%1%'
# %2%") % drvPath % statusToString(status)); Nix 2.8 src/libstore/build/local-derivation-goal.cc:
# "builder for '%s' %s". statusToString (libutil/util.cc): "failed with exit code %1%", "failed
# due to signal %1% (%2%)", "died abnormally".
_STATUS = (
    r"(?P<status>failed with exit code (?P<code>\d+)"
    r"|failed due to signal (?P<signal>\d+)(?: \([^)\n]*\))?|died abnormally)"
)
_BUILDER_FOR = re.compile("builder for " + _QUOTED_DRV + " " + _STATUS)
# Nix >= 2.30 src/libstore/build/derivation-building-goal.cc fixupBuilderFailureErrorMessage:
#   "Cannot build '%s'.\nReason: builder %s."
_CANNOT_BUILD = re.compile(r"Cannot build '(?P<drv>[^'\s]+)'\.\s*Reason: builder " + _STATUS)
# Failures of a builder that never ran its code, or ran out of disk: the machine's, not the
# derivation's. Guix nix/libstore/build.cc DerivationGoal::startBuilder, in the child:
# "while setting up the build environment: " + e.what() (e.g. "a `aarch64-linux' is required to
# build `X', but I am a `x86_64-linux'"), then _exit(1), which buildDone reports as "builder for
# `X' failed with exit code 1"; buildDone's heuristic, when the store's or the build directory's
# file system has less than 8 MiB left: "note: build failure may have been caused by lack of free
# disk space" (Nix 2.8: the same words); and strerror(ENOSPC) in any line (libutil/util.cc
# SysError: "%1%: %2%" % strerror(errno), e.g. "writing to file: No space left on device").
_MACHINE_SIDE = re.compile(
    r"while setting up the build environment: (?P<why>.+)"
    r"|(?P<note>note: build failure may have been caused by lack of free disk space)"
    r"|(?P<enospc>.*No space left on device.*)"
)
# Guix nix/libstore/build.cc DerivationGoal::haveDerivation: "cannot build missing derivation
# \u2018%1%\u2019" (older Guix: `%1%'); Nix src/libstore/build/derivation-goal.cc: "... '%s'". The
# .drv was not in the machine's store: not the builder's doing.
_MISSING = re.compile("cannot build missing derivation " + _QUOTED_DRV, re.I)
_ERROR_LINE = re.compile(r"^\s*(?:[\w.-]+(?: [\w.-]+)?: )?error: (?P<message>.+)$", re.M)
# A rebuild with --check whose result differs from the output the store holds. Guix
# nix/libstore/build.cc DerivationGoal::registerOutputs (bmCheck): Error(format("derivation
# `%1%' may not be deterministic: output `%2%' differs") % drvPath % path) (with " from `%3%'"
# under --keep-failed); a plain Error, not a BuildError, so it reaches the client, which prints
# "guix build: error: ..." and exits 1. Nix 2.8 src/libstore/build/local-derivation-goal.cc:
# NotDeterministic("derivation '%s' may not be deterministic: output '%s' differs"); newer Nix
# (derivation-builder.cc): "derivation '%s' may not be deterministic: outputs differ".
_NOT_DETERMINISTIC = re.compile(
    "derivation " + _QUOTED_DRV + " may not be deterministic: output"
)


def differs_on_check(log_tail: bytes) -> bool:
    """Whether a build with --check ended because its result differs from the stored one."""
    text = strip_ansi(bytes(log_tail).decode("utf-8", errors="replace"))
    return _NOT_DETERMINISTIC.search(text) is not None

_REASON_LIMIT = 300


def classify_failure(
    exit_status: int | None,
    log_tail: bytes,
    *,
    failed_statuses: frozenset[int] = frozenset(),
    timeout_statuses: frozenset[int] = frozenset(),
) -> tuple[FailureKind, str]:
    """(kind, one-line reason) from the end of a build log and the command's exit status.

    Only the builder's own failure and the daemon's timeouts are the build's; the last of them
    in the log is the one reported. Anything else, and a builder that could not start or ran
    out of disk, is the machine's ("machine"), with its last error line as the reason."""
    if isinstance(log_tail, bytes | bytearray | memoryview):
        text = strip_ansi(bytes(log_tail).decode("utf-8", errors="replace"))
    else:
        text = ""
    status = "no exit status" if exit_status is None else f"exit status {exit_status}"
    machine_side = _last(_MACHINE_SIDE, text)
    if machine_side is not None:
        why = machine_side["why"] or machine_side["note"] or machine_side["enospc"]
        return "machine", _one_line(why.strip())
    missing = _last(_MISSING, text)
    if missing is not None:
        return "machine", f"cannot build missing derivation {missing['drv']}"
    ended = _last_of((_TIMED_OUT, _BUILDER_FOR, _CANNOT_BUILD), text)
    if ended is not None and ended.re is _TIMED_OUT:
        if ended["silence"]:
            return "silent", f"timed out after {ended['seconds']} seconds of silence"
        return "timeout", f"timed out after {ended['seconds']} seconds"
    if ended is not None:
        return "failed", _one_line(f"builder for {ended['drv']} {ended['status']}")
    error = _last(_ERROR_LINE, text)
    detail = error["message"].strip() if error is not None else None
    if exit_status is not None and exit_status in timeout_statuses:
        return "timeout", _one_line(f"{detail or 'build timed out'} ({status})")
    if exit_status is not None and exit_status in failed_statuses:
        return "failed", _one_line(
            f"{detail or 'build failed, builder exit code not reported'} ({status})"
        )
    if detail is not None:
        return "machine", _one_line(f"{detail} ({status})")
    return "machine", f"build command ended with {status}"


def builder_exit_code(log_tail: bytes) -> int | None:
    """The exit code of the builder itself, from the daemon's "builder for X failed with exit
    code N" at the end of a build log: not the client's own exit status (`nix-store
    --realise` exits 100 on any build failure, `guix build` 1). None when the builder did not
    exit (a signal, a timeout) or the message is not there."""
    text = strip_ansi(bytes(log_tail).decode("utf-8", errors="replace"))
    builder = _last_of((_BUILDER_FOR, _CANNOT_BUILD), text)
    if builder is None or builder["code"] is None:
        return None
    return int(builder["code"])


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    match = None
    for match in pattern.finditer(text):  # noqa: B007 - we want the last one
        pass
    return match


def _last_of(patterns: Iterable[re.Pattern[str]], text: str) -> re.Match[str] | None:
    best: re.Match[str] | None = None
    for pattern in patterns:
        match = _last(pattern, text)
        if match is not None and (best is None or match.start() > best.start()):
            best = match
    return best


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _REASON_LIMIT:
        text = text[: _REASON_LIMIT - 1] + "…"
    return text
