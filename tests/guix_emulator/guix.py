"""A test double of GNU Guix's `guix` command, doing the work with a real Nix store.

Guix cannot be installed where the tests run, yet the coordinator's guix backend must be tested
by running its exact command lines over real SSH.  This program answers them the way Guix
(1.4-era, Millak/guix sources) does: same stdout, stderr lines and exit status, each message
quoting its source.  [B] guix/scripts/build.scm, [A] guix/scripts/archive.scm, [GC]
guix/scripts/gc.scm, [UI] guix/ui.scm, [SC] guix/scripts.scm, [ST] guix/status.scm, [S]
guix/store.scm, [D] guix/derivations.scm, [AU] guix/scripts/authenticate.scm, [PKI] guix/pki.scm,
[37] Guile's srfi-37.scm, and the daemon's nix/libstore/ [BC] build.cc, [LS] local-store.cc,
[GCC] gc.cc, [SA] store-api.cc.  The builds, queries, exports and imports themselves are done by
`nix-store` on the host's store (NIX_STORE_DIR, default /nix/store).

Emulator details, which real Guix does not have:
- Guix's signing-key.sec holds the ECDSA scalar d; buildfarm signs from an Ed25519 seed, so the
  key pair also needs `signing-key.secret` (buildfarm.signing.save_key's file) in the config
  directory ($GUIX_CONFIGURATION_DIRECTORY, default /etc/guix).  `--generate-key` writes it.
- Build logs are Nix's: "View build log at" names $GUIX_LOG_DIRECTORY or $NIX_LOG_DIR/drvs/..
  (default /nix/var/log/nix).  No colours (Guix colours only a terminal).
- The daemon's informational lines (e.g. "[0.00 MiB] deleting '...'") are not reproduced; only
  its error-level lines are.  `gc --derivers` lists the registered deriver when it is valid.
- Real Guix options this program does not emulate exit with status 2 and a "guix-emulator:"
  line, so a test can never mistake them for Guix behaviour.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, NoReturn

from buildfarm import derivation, sexp
from buildfarm.errors import ArchiveError, BuildfarmError
from buildfarm.nar import read_bundle, write_bundle
from buildfarm.signing import SignatureError, SigningKey, load_key, save_key, verify_guix

VERSION = "1.4.0"
STORE = os.environ.get("NIX_STORE_DIR", "/nix/store")
TRY = "Try `guix --help' for more information.\n"  # [UI] show-guix-usage
GUIX_COMMANDS = frozenset(  # guix/scripts/*.scm: real commands this program does not emulate
    "authenticate challenge container copy deploy describe discover download edit environment "
    "git graph hash help home import install lint locate offload pack package perform-download "
    "processes publish pull refresh remove repl search shell show size style substitute system "
    "time-machine upgrade weather".split())


class Leave(Exception):
    """[UI] `leave`: "guix CMD: error: MESSAGE" on stderr and exit status 1."""


class NotEmulated(Exception):
    """A real Guix feature this double does not implement (exit status 2)."""


def say(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def config_dir() -> str:
    return os.environ.get("GUIX_CONFIGURATION_DIRECTORY", "/etc/guix")


def show_version(command: str) -> int:
    # [UI] show-version-and-exit
    sys.stdout.write(
        f"{command} (GNU Guix) {VERSION}\nCopyright (C) 2022 the Guix authors\n"
        "License GPLv3+: GNU GPL version 3 or later <http://gnu.org/licenses/gpl.html>\n"
        "This is free software: you are free to change and redistribute it.\n"
        "There is NO WARRANTY, to the extent permitted by law.\n")
    return 0


# --- Command lines: SRFI-37 `args-fold` as Guile implements it [37], errors as [SC] ---------

NONE, REQUIRED, OPTIONAL = 0, 1, 2
Check = Callable[[str, str], object]


@dataclass(frozen=True)
class Opt:
    names: tuple[str, ...]  # one-character names are short options
    key: str
    arg: int = NONE
    check: Check | None = None  # converts the argument, or leaves (called while parsing)


def number(name: str, value: str) -> int:
    try:  # [UI] string->number*
        return int(value)
    except ValueError:
        raise Leave(f"{value}: invalid number") from None


def count(name: str, value: str) -> int:
    try:  # [B] %standard-build-options, -c/-M
        return int(value)
    except ValueError:
        raise Leave(f"not a number: '{name}' option argument: {value}") from None


def not_emulated(name: str, value: str | None = None) -> NoReturn:
    raise NotEmulated(f"option '{'-' if len(name) == 1 else '--'}{name}' is not emulated")


@dataclass
class Parsed:
    options: list[tuple[str, object, str]] = field(default_factory=list)  # key, value, name
    operands: list[str] = field(default_factory=list)

    def last(self, key: str, default: object = None) -> object:
        found = [value for k, value, _ in self.options if k == key]
        return found[-1] if found else default

    def has(self, key: str) -> bool:
        return any(k == key for k, _, _ in self.options)


def parse_args(argv: Sequence[str], options: Sequence[Opt], into: Parsed | None = None) -> Parsed:
    result = into or Parsed()
    short = {n: o for o in options for n in o.names if len(n) == 1}
    long = {n: o for o in options for n in o.names if len(n) > 1}

    def take(opt: Opt, name: str, value: str | None) -> None:
        if opt.key == "not-emulated":
            not_emulated(name)
        converted = opt.check(name, value) if opt.check and value is not None else value
        result.options.append((opt.key, converted, name))

    def unrecognized(name: str) -> NoReturn:
        raise Leave(f"{name}: unrecognized option")  # [SC] parse-command-line (hint omitted)

    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            result.operands.append(arg)
        elif arg == "--":
            result.operands.extend(argv[i:])
            break
        elif arg.startswith("--"):
            start = 2  # [37] long-option: a name may contain '=', try each one in turn
            while True:
                index = arg.find("=", start)
                name = arg[2:index] if index >= 0 else arg[2:]
                opt = long.get(name)
                if opt is not None:
                    break
                if index < 0:
                    unrecognized(name)
                start = index + 1
            value = arg[index + 1:] if index >= 0 else None
            if opt.arg == REQUIRED and value is None:  # [37] + [SC] args-fold*: no "--x VALUE"
                raise Leave(f"invalid argument: Missing required argument after `--{name}'")
            if opt.arg == NONE and value is not None:
                raise Leave(f"invalid argument: Extraneous argument after `--{name}'")
            take(opt, name, value)
        else:
            position = 1
            while position < len(arg):
                char = arg[position]
                found = short.get(char)
                if found is None:
                    unrecognized(char)
                if found.arg == NONE:
                    take(found, char, None)
                    position += 1
                    continue
                if position + 1 < len(arg):
                    value = arg[position + 1:]
                elif i < len(argv):
                    value, i = argv[i], i + 1
                elif found.arg == REQUIRED:
                    raise Leave(f"invalid argument: Missing required argument after `-{char}'")
                else:
                    value = None
                take(found, char, value)
                break
    return result


HELP_VERSION = (Opt(("h", "help"), "help"), Opt(("V", "version"), "version"))
NOT_EMULATED_BUILD = (  # [B] %standard-build-options we do not emulate
    Opt(("L", "load-path"), "not-emulated", REQUIRED), Opt(("substitute-urls",), "not-emulated",
                                                           REQUIRED),
    Opt(("debug",), "debug", REQUIRED, number))
BUILD_OPTIONS = (
    Opt(("K", "keep-failed"), "keep-failed"), Opt(("k", "keep-going"), "keep-going"),
    Opt(("rounds",), "rounds", REQUIRED, number), Opt(("fallback",), "fallback"),
    Opt(("no-substitutes",), "no-substitutes"), Opt(("no-grafts",), "no-grafts"),
    Opt(("no-offload", "no-build-hook"), "no-offload"),
    Opt(("max-silent-time",), "max-silent-time", REQUIRED, number),
    Opt(("timeout",), "timeout", REQUIRED, number),
    Opt(("c", "cores"), "cores", REQUIRED, count), Opt(("M", "max-jobs"), "max-jobs", REQUIRED,
                                                       count),
    *NOT_EMULATED_BUILD)


def parse_command_line(argv: Sequence[str], options: Sequence[Opt], build_options: bool,
                       command: str) -> Parsed:
    """[SC] parse-command-line: GUIX_BUILD_OPTIONS first, then the command line.

    Operands are returned in Guix's alist order, i.e. the last one first (`alist-cons`)."""
    parsed = Parsed()
    if build_options:
        parse_args(os.environ.get("GUIX_BUILD_OPTIONS", "").split(), options, parsed)
    parse_args(argv, options, parsed)
    for _, _, name in parsed.options:
        if name == "no-build-hook":
            say(f"guix {command}: warning: '--no-build-hook' is deprecated; use "
                "'--no-offload' instead\n")
    parsed.operands.reverse()
    return parsed


# --- The store, through nix-store ----------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_QUOTED_PATH = re.compile(r"'(/[^']*)'")


def nix_store(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["nix-store", *args], input=input, capture_output=True, check=False)


def quote(path: str) -> str:
    return f"`{path}'"


def guix_quotes(message: str) -> str:
    """Nix quotes paths 'like this'; the Guix daemon `like this' ([SA] showPaths)."""
    return _QUOTED_PATH.sub(lambda m: f"`{m.group(1)}'", message)


def nix_error(stderr: bytes) -> str:
    lines = _ANSI.sub("", stderr.decode("utf-8", "replace")).splitlines()
    errors = [line[7:] for line in lines if line.startswith("error: ")]
    message = errors[-1] if errors else (lines[-1] if lines else "nix-store failed")
    return guix_quotes(message.rstrip("."))


def in_store(path: str) -> bool:
    return path.startswith(STORE + "/") and len(path) > len(STORE) + 1


def assert_store_path(path: str) -> None:
    # [SA] assertStorePath (isStorePath: in the store, no '/' after the item name)
    if not in_store(path) or "/" in path[len(STORE) + 1:]:
        raise Leave(f"path `{path}' is not in the store")


def invalid_paths(paths: Iterable[str]) -> set[str]:
    """The paths `valid-path?` answers #f for (anything Nix would not even parse included)."""
    unique = list(dict.fromkeys(paths))
    bad = {p for p in unique if not derivation.is_store_path(p)}
    candidates = [p for p in unique if p not in bad]
    for start in range(0, len(candidates), 500):
        done = nix_store("--check-validity", "--print-invalid", *candidates[start:start + 500])
        if done.returncode:
            raise Leave(nix_error(done.stderr))
        bad.update(done.stdout.decode().split())
    return bad


@dataclass(frozen=True)
class PathInfo:
    references: tuple[str, ...]
    deriver: str


def path_infos(paths: Iterable[str]) -> dict[str, PathInfo]:
    """References and deriver of valid paths, from `nix-store --dump-db PATHS`."""
    wanted = list(dict.fromkeys(paths))
    infos: dict[str, PathInfo] = {}
    for start in range(0, len(wanted), 500):
        done = nix_store("--dump-db", *wanted[start:start + 500])
        if done.returncode:
            raise Leave(nix_error(done.stderr))
        lines = done.stdout.decode().split("\n")
        at = 0
        while at + 4 < len(lines) and lines[at]:  # path, hash, size, deriver, count, refs...
            refs = int(lines[at + 4])
            infos[lines[at]] = PathInfo(tuple(sorted(lines[at + 5:at + 5 + refs])), lines[at + 3])
            at += 5 + refs
    return infos


def valid_infos(roots: Sequence[str]) -> dict[str, PathInfo]:
    """PathInfo of `roots`, checked as the daemon's `references` RPC checks its argument."""
    for root in roots:
        assert_store_path(root)  # readStorePath
    invalid = invalid_paths(roots)
    for root in roots:
        if root in invalid:
            raise Leave(f"path `{root}' is not valid")  # [LS] queryValidPathId
    return path_infos(roots)


def closure_infos(roots: Sequence[str]) -> dict[str, PathInfo]:
    """PathInfo of every path reachable from `roots` (which must be valid store items)."""
    infos = valid_infos(roots)
    frontier = [r for p in infos.values() for r in p.references if r not in infos]
    while frontier:
        fetched = path_infos(dict.fromkeys(frontier))
        infos.update(fetched)
        frontier = [r for p in fetched.values() for r in p.references if r not in infos]
    return infos


# --- guix build ---------------------------------------------------------------------------

BUILD_COMMAND_OPTIONS = (
    *HELP_VERSION, Opt(("n", "dry-run"), "dry-run"), Opt(("d", "derivations"), "derivations"),
    Opt(("v", "verbosity"), "verbosity", REQUIRED, number), Opt(("q", "quiet"), "quiet"),
    *(Opt(names, "not-emulated", arg) for names, arg in (
        (("S", "source"), NONE), (("sources",), OPTIONAL), (("check",), NONE),
        (("repair",), NONE), (("s", "system"), REQUIRED), (("target",), REQUIRED),
        (("e", "expression"), REQUIRED), (("f", "file"), REQUIRED), (("m", "manifest"), REQUIRED),
        (("r", "root"), REQUIRED), (("log-file",), NONE))),
    *BUILD_OPTIONS)


def verbosity_of(parsed: Parsed) -> int:
    level = 3  # [B] %default-options; -q and -v replace the value, the last one wins
    for key, value, _ in parsed.options:
        if key == "quiet":
            level = 0
        elif key == "verbosity":
            assert isinstance(value, int)
            level = value
    return level


def read_drv(path: str) -> derivation.Derivation:
    try:
        return derivation.read(path)
    except BuildfarmError as error:
        raise Leave(str(error)) from None


def build_plan(tops: Sequence[tuple[str, derivation.Derivation]]) -> list[str]:
    """[D] derivation-build-plan (no substitutes): the .drv files to build, in Guix's order."""
    drvs = dict(tops)
    queue = list(drvs)
    while queue:
        for path, _ in drvs[queue.pop()].input_drvs:
            if path not in drvs:
                drvs[path] = read_drv(path)
                queue.append(path)
    invalid = invalid_paths(o.path for d in drvs.values() for o in d.outputs)
    plan: list[str] = []
    visited: set[tuple[str, tuple[str, ...]]] = set()
    work = deque((p, tuple(o.name for o in d.outputs)) for p, d in tops)
    while work:
        key = work.popleft()
        path, outputs = key
        if key in visited:
            continue
        visited.add(key)
        paths = drvs[path].output_paths
        if all(paths.get(name) not in invalid for name in outputs):
            continue  # input-built?
        plan.append(path)
        work.extendleft(reversed(drvs[path].input_drvs))  # (append deps rest)
    return plan


def derivation_log_file(drv: str) -> str | None:
    # [S] derivation-log-file, rooted at Nix's log directory on this host
    root = os.environ.get("GUIX_LOG_DIRECTORY") or os.environ.get("NIX_LOG_DIR",
                                                                   "/nix/var/log/nix")
    base = os.path.basename(drv)
    log = f"{root}/drvs/{base[:2]}/{base[2:]}"
    return next((c for c in (log + ".gz", log + ".bz2", log) if os.path.exists(c)), None)


_BUILDER_FAILED = re.compile(r"builder for '([^']+)' (failed.*)$")
_TIMED_OUT = re.compile(
    r"building of '([^'!]+)(?:![^']*)?' from \.drv file timed out after (\d+) seconds"
    r"( of silence)?$")
_DEPENDENCIES = re.compile(r"(\d+) dependencies of derivation '([^']+)' failed to build$")
_MISSING = re.compile(r"cannot build missing derivation '([^']+)'$")
_SUMMARY = re.compile(r"build of .* failed$")


class BuildReport:
    """Turns `nix-store --realise --log-format internal-json` events into Guix's stderr: the
    daemon's lines ([BC]) and the client's status lines at a verbosity ([ST] print-build-event)."""

    def __init__(self, verbosity: int, drvs: dict[str, derivation.Derivation]) -> None:
        self.verbosity = verbosity
        self.drvs = drvs
        self.ids: dict[int, str] = {}
        self.building: list[str] = []  # most recently started first, as [ST] build-status
        self.reasons: set[str] = set()  # failed, reason printed, build-failed still due
        self.pending: set[str] = set()  # stopped without its outputs, reason not seen yet
        self.failed: set[str] = set()
        self.errors: list[str] = []

    def derivation(self, path: str) -> derivation.Derivation:
        if path not in self.drvs:
            self.drvs[path] = read_drv(path)
        return self.drvs[path]

    def daemon(self, line: str) -> None:
        if self.verbosity >= 1:
            say(line + "\n")

    def line(self, raw: str) -> None:
        if not raw.startswith("@nix "):
            if raw.startswith("error: "):
                self.error(_ANSI.sub("", raw)[7:])
            return
        try:
            event = json.loads(raw[5:])
        except ValueError:
            return
        action, ident = event.get("action"), event.get("id")
        if action == "start" and event.get("type") == 105:  # actBuild: "@ build-started"
            drv = event["fields"][0]
            self.ids[ident] = drv
            self.building.insert(0, drv)
            if self.verbosity >= 1:
                say(f"building {drv}...\n")  # [ST]
        elif action == "result" and event.get("type") == 101 and ident in self.ids:
            if self.verbosity >= 3:
                say(f"{event['fields'][0]}\n")  # builder output, print-log? at level 3
        elif action == "stop" and ident in self.ids:
            self.stopped(self.ids.pop(ident))
        elif action == "msg" and event.get("level") == 0:
            self.error(_ANSI.sub("", event.get("msg", "")).removeprefix("error: "))

    def stopped(self, drv: str) -> None:
        self.building.remove(drv)
        if drv in self.reasons:
            self.build_failed(drv)
        elif not invalid_paths(o.path for o in self.derivation(drv).outputs):
            if self.verbosity >= 3:
                say(f"successfully built {drv}\n")  # [ST] build-succeeded, print-log?
            if self.building and self.verbosity >= 1:
                plural = len(self.building) > 1
                say(f"The following build{'s are' if plural else ' is'} still in progress:\n"
                    + "".join(f"  {d}\n" for d in self.building) + "\n")
        else:
            self.pending.add(drv)

    def build_failed(self, drv: str) -> None:
        # [BC] "@ build-failed", shown by [ST]
        self.reasons.discard(drv)
        self.pending.discard(drv)
        if self.verbosity >= 1:
            log = derivation_log_file(drv)
            say(f"build of {drv} failed\n" + (f"View build log at '{log}'.\n" if log else
                                             f"Could not find build log for '{drv}'.\n"))

    def fail(self, drv: str, line: str, build_failed: bool) -> None:
        self.daemon(line)
        self.failed.add(drv)
        if build_failed:
            if drv in self.pending:
                self.build_failed(drv)
            else:
                self.reasons.add(drv)

    def error(self, message: str) -> None:
        first = message.splitlines()[0] if message else ""
        if m := _BUILDER_FAILED.match(first):  # [BC] buildDone
            self.fail(m[1], f"builder for `{m[1]}' {guix_quotes(m[2])}", True)
        elif m := _TIMED_OUT.match(first):  # [BC] waitForInput; goal name "building of `%1%'"
            self.fail(m[1], f"building of `{m[1]}' timed out after {m[2]} seconds{m[3] or ''}",
                      True)
        elif m := _DEPENDENCIES.match(first):  # [BC] inputsRealised
            self.fail(m[2], f"cannot build derivation `{m[2]}': {m[1]} dependencies couldn't "
                      "be built", False)
        elif m := _MISSING.match(first):  # [BC] haveDerivation
            self.fail(m[1], f"cannot build missing derivation ‘{m[1]}’", False)
        elif not _SUMMARY.match(first):
            self.errors.append(guix_quotes(first))

    def finish(self) -> None:
        for drv in sorted(self.pending):
            self.build_failed(drv)


def terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def realise(targets: list[str], parsed: Parsed, report: BuildReport) -> None:
    """[B] build-derivations through the daemon, done by nix-store --realise."""
    command = ["nix-store", "--realise", "--log-format", "internal-json"]
    flags = {"keep-going": "--keep-going", "keep-failed": "--keep-failed",
             "fallback": "--fallback"}
    command += [flag for key, flag in flags.items() if parsed.has(key)]
    settings = {"max-silent-time": "max-silent-time", "timeout": "timeout", "cores": "cores",
                "max-jobs": "max-jobs"}
    for key, setting in settings.items():
        if parsed.has(key):
            command += ["--option", setting, str(parsed.last(key))]
    if parsed.has("rounds"):
        command += ["--option", "repeat", str(max(0, int(str(parsed.last("rounds"))) - 1))]
    if parsed.has("no-substitutes"):
        command += ["--option", "substitute", "false"]
    process = subprocess.Popen([*command, *targets], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        for raw in process.stderr:
            report.line(raw.decode("utf-8", "replace").rstrip("\n"))
        status = process.wait()
    finally:
        terminate(process)
    report.finish()
    failed = sorted(t for t in targets if t in report.failed)
    if failed:  # [BC] buildPaths: showPaths of the failed top-level goals
        raise Leave(f"build of {', '.join(map(quote, failed))} failed")
    if status:
        raise Leave(report.errors[-1] if report.errors else "build failed")


def cmd_build(argv: Sequence[str]) -> int:
    parsed = parse_command_line(argv, BUILD_COMMAND_OPTIONS, True, "build")
    if parsed.has("help"):
        sys.stdout.write("Usage: guix build [OPTION]... PACKAGE-OR-DERIVATION...\nBuild the "
                         "given PACKAGE-OR-DERIVATION and return their output paths.\n")
        return 0
    if parsed.has("version"):
        return show_version("guix build")
    verbosity = verbosity_of(parsed)
    drvs: list[tuple[str, derivation.Derivation]] = []  # [B] options->things-to-build
    for spec in parsed.operands:
        if spec.endswith(".drv"):
            if os.path.exists(spec):  # a missing .drv "can be substituted down the road"
                path = os.path.realpath(spec)
                drvs.append((path, read_drv(path)))
        elif not in_store(spec):
            raise Leave(f"{spec}: unknown package")  # (gnu packages) specification->package
    # Non-.drv store items only ask the daemon to substitute them: a no-op here either way
    # (valid, or no substituter: ecNoSubstituters is not a failure in [BC] buildPaths).
    missing = [s for s in parsed.operands if in_store(s) and s.endswith(".drv")
               and not os.path.exists(s)]
    if parsed.has("derivations"):
        sys.stdout.write("".join(f"{path}\n" for path, _ in drvs))
        return 0
    for path, _ in drvs:
        assert_store_path(path)
    plan = build_plan(drvs)
    if plan and verbosity >= 1:  # [UI] show-what-to-build, three-space indent
        mood = "would" if parsed.has("dry-run") else "will"
        noun = "derivation" if len(plan) == 1 else "derivations"
        say(f"The following {noun} {mood} be built:\n" + "".join(f"   {d}\n" for d in plan)
            + ("\n" if verbosity == 1 else ""))
    if plan and parsed.has("dry-run"):
        return 0  # [UI] build-notifier: no `continue' when dry-run and something to build
    if plan or missing:
        realise([p for p, _ in drvs] + missing, parsed, BuildReport(verbosity, dict(drvs)))
    for _, drv in drvs:  # [UI] show-derivation-outputs, derivation-output-names order
        sys.stdout.write("".join(f"{o.path}\n" for o in drv.outputs))
    return 0


# --- guix archive -------------------------------------------------------------------------

ARCHIVE_OPTIONS = (
    *HELP_VERSION, Opt(("export",), "export"), Opt(("r", "recursive"), "recursive"),
    Opt(("import",), "import"), Opt(("missing",), "missing"),
    Opt(("generate-key",), "generate-key", OPTIONAL), Opt(("authorize",), "authorize"),
    Opt(("v", "verbosity"), "verbosity", REQUIRED, number), Opt(("n", "dry-run"), "dry-run"),
    *(Opt(names, "not-emulated", arg) for names, arg in (
        (("x", "extract"), REQUIRED), (("t", "list"), NONE), (("S", "source"), NONE),
        (("e", "expression"), REQUIRED), (("s", "system"), REQUIRED),
        (("target",), REQUIRED))),
    *BUILD_OPTIONS)


def write_atomically(path: str, text: str) -> None:
    """guix/utils.scm with-atomic-file-output: a temporary file renamed over PATH."""
    fd, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                                     dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="latin-1") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def generate_key(parameters: object) -> int:
    # [A] generate-key-pair
    if parameters is not None:
        raise NotEmulated("--generate-key=PARAMETERS is not emulated (only the default)")
    directory = config_dir()
    public, secret = (os.path.join(directory, f"signing-key.{e}") for e in ("pub", "sec"))
    if os.path.exists(public) or os.path.exists(secret):
        raise Leave(f"key pair exists under '{directory}'; remove it first")
    say("Please wait while gathering entropy to generate the key pair;\nthis may take time...\n")
    key = SigningKey.generate()
    old = os.umask(0o266)  # "Create the following files as #o400."
    try:
        os.makedirs(directory, exist_ok=True)
        write_atomically(public, key.guix_public_sexp())
        write_atomically(secret, key.guix_private_sexp())
        os.chmod(public, 0o444)
        save_key(key, directory)  # emulator detail: the seed buildfarm signs with
    finally:
        os.umask(old)
    return 0


_GCRYPT_ERRORS = (  # libgpg-error's texts for what libgcrypt's sexp reader reports
    ("parenthes", "Unmatched parentheses in S-expression"), ("unmatched", "Unmatched "
     "parentheses in S-expression"), ("hex", "Bad hexadecimal character in S-expression"),
    ("escape", "Bad quotation in S-expression"), ("unterminated", "Bad quotation in "
                                                  "S-expression"),
    ("length", "Invalid length specifier in S-expression"))


def read_acl(path: str) -> list[sexp.Sexp]:
    """[PKI] current-acl and acl->public-keys: the authorized public keys as s-expressions."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as stream:
        try:
            acl = sexp.parse(stream.read())
        except sexp.SexpError as error:
            raise Leave(f"invalid access-control list: {error.reason}") from None
    keys: list[sexp.Sexp] = []
    for entry in acl[1:] if acl[0] == b"acl" else [b"bad"]:
        match entry:
            case (b"entry", subject, (b"tag", (b"guix", b"import"))):
                keys.append(subject)
            case _:
                raise Leave("invalid access-control list")
    return keys


def authorize_key() -> int:
    # [A] authorize-key, [PKI] public-keys->acl and write-acl
    text = sys.stdin.buffer.read()
    try:
        key = sexp.parse(text)
    except sexp.SexpError as error:
        reason = next((m for k, m in _GCRYPT_ERRORS if k in error.reason.lower()),
                      "Bad character in S-expression")
        raise Leave(f"failed to read public key: gcrypt: {reason}") from None
    if key[0] != b"public-key":
        raise Leave("s-expression does not denote a public key")
    path = os.path.join(config_dir(), "acl")
    keys = list(dict.fromkeys([key, *read_acl(path)]))  # delete-duplicates keeps the first
    acl = (b"acl", *((b"entry", k, (b"tag", (b"guix", b"import"))) for k in keys))
    os.makedirs(config_dir(), exist_ok=True)
    write_atomically(path, sexp.advanced(acl).decode("latin-1"))
    os.chmod(path, 0o644)
    return 0


def missing_paths() -> int:
    # [A] --missing: read-line on stdin, `valid-path?` on each line, invalid ones in order
    text = sys.stdin.read()
    lines = text.split("\n")
    if text.endswith("\n") or not text:
        lines.pop()
    for line in lines:
        assert_store_path(line)  # the daemon's readStorePath
    invalid = invalid_paths(lines)
    sys.stdout.write("".join(f"{line}\n" for line in lines if line in invalid))
    return 0


def signing_key() -> SigningKey:
    """The key the daemon signs exports with ([LS] exportPath, checkSecrecy; [AU])."""
    secret = os.path.join(config_dir(), "signing-key.sec")
    try:
        mode = os.stat(secret).st_mode
    except OSError as error:
        raise Leave(f"getting status of `{secret}': {error.strerror}") from None
    if mode & 0o077:
        raise Leave(f"file `{secret}' should be secret (inaccessible to everybody else)!")
    public = secret[:-4] + ".pub"
    try:  # [AU] load-key-pair; its format string keeps "~%", hence the blank line
        with open(public, "rb") as stream:
            q = sexp.find_token(sexp.parse(stream.read()), b"q")
    except OSError as error:
        raise Leave(f"failed to load key pair at '{secret}': {error.strerror}\n") from None
    try:
        key = load_key(os.path.join(config_dir(), "signing-key.secret"))
    except SignatureError as error:
        raise NotEmulated(f"cannot sign: {error} (see the emulator's docstring)") from None
    if q is None or q[1:] != (key.public_bytes,):
        raise NotEmulated(f"signing-key.secret does not match {public}")
    return key


def export_paths(files: list[str], recursive: bool) -> int:
    # [A] export-from-store, [S] export-paths and topologically-sorted
    if not files:
        say("guix archive: warning: no arguments specified; creating an empty archive\n")
    infos = closure_infos(files)
    ordered: list[str] = []
    visited: set[str] = set()

    def visit(path: str) -> None:  # depth first, references before the path
        visited.add(path)
        for reference in infos[path].references:
            if reference not in visited:
                visit(reference)
        ordered.append(path)

    for path in files:
        if path not in visited:
            visit(path)
    if not recursive:
        ordered = [p for p in ordered if p in files]
    key = signing_key() if ordered else None

    def items() -> Iterator[tuple[IO[bytes], str, list[str], str, Callable[[bytes], str]]]:
        assert key is not None
        for path in ordered:
            done = nix_store("--export", path)
            if done.returncode:
                raise Leave(nix_error(done.stderr))
            spool = tempfile.SpooledTemporaryFile(max_size=1 << 24)
            (item,) = read_bundle(io.BytesIO(done.stdout), lambda i: spool)
            spool.seek(0)
            yield spool, item.path, list(item.references), item.deriver, key.sign_guix

    output = sys.stdout.buffer
    write_bundle(output, items())
    output.flush()
    return 0


_BUNDLE_ERRORS = (  # buildfarm.nar's reasons -> the daemon's messages ([LS], archive.cc)
    ("item marker", "input doesn't look like something created by `nix-store --export'"),
    ("export magic", "normalized archive cannot be imported; wrong format"),
    ("nar magic", "bad archive: input doesn't look like a Nix archive"),
    ("truncated", "unexpected end-of-file"))


def check_signature(item_path: str, signature: str | None, signed: bytes,
                    acl: list[sexp.Sexp]) -> None:
    """[LS] importPath + [AU] validate-signature, in their order."""
    if signature is None:
        raise Leave(f"imported archive of `{item_path}' lacks a signature")
    try:
        parsed = sexp.parse(signature)
    except sexp.SexpError:  # `guix authenticate` dies on a gcry-error; the daemon sees EOF
        raise Leave("unexpected EOF reading an integer") from None
    text = sexp.advanced(parsed).decode("latin-1")  # canonical-sexp->string, ends in "\n"
    subject = sexp.find_token(parsed, b"public-key")
    data = sexp.find_token(parsed, b"data")
    if subject is None or data is None:
        raise Leave(f"corrupt signature data: {text}")
    if subject not in acl:
        raise Leave(f"unauthorized public key: {sexp.advanced(subject).decode('latin-1')}")
    hashed = sexp.find_token(data, b"hash")
    claimed = hashed[2] if hashed is not None and len(hashed) > 2 else None
    q = sexp.find_token(subject, b"q")
    try:
        if not isinstance(claimed, bytes) or q is None or not isinstance(q[1], bytes):
            raise SignatureError("invalid", "")
        verify_guix(signature, claimed, [q[1]])  # ECDSA check of the hash it carries
    except SignatureError:
        raise Leave(f"invalid signature: {text}") from None
    if claimed != signed:  # [LS] printHash(hash) != hash2
        raise Leave("signed hash doesn't match actual contents of imported archive; archive "
                    "could be corrupt, or someone is trying to import a Trojan horse")


def import_paths() -> int:
    # [S] import-paths -> [LS] importPaths: each item checked, then imported, in turn
    acl = read_acl(os.path.join(config_dir(), "acl"))
    with tempfile.TemporaryDirectory(prefix="guix-import-") as spool:
        accepted: list[tuple[str, str, tuple[str, ...], str]] = []
        files: list[IO[bytes]] = []

        def sink(index: int) -> IO[bytes]:
            files.append(open(os.path.join(spool, str(index)), "w+b"))  # noqa: SIM115
            return files[-1]

        problem: str | None = None
        try:
            for index, item in enumerate(read_bundle(sys.stdin.buffer, sink,
                                                     trailing_ok=True)):
                check_signature(item.path, item.signature, item.signed_sha256, acl)
                accepted.append((os.path.join(spool, str(index)), item.path, item.references,
                                 item.deriver))
        except Leave as error:
            problem = str(error)
        except ArchiveError as error:
            text = str(error)
            m = re.search(r"'([^']*)' is not a store path", text)
            problem = (f"path `{m[1]}' is not in the store" if m else next(
                (msg for k, msg in _BUNDLE_ERRORS if k in text), f"bad archive: {text}"))
        finally:
            for stream in files:
                stream.close()
        derivers = {d for _, _, _, d in accepted if d}
        valid = derivers - invalid_paths(derivers)
        earlier: set[str] = set()
        items = []
        for nar, path, references, deriver in accepted:  # deriver kept only if valid [LS]
            kept = deriver if deriver in valid or deriver in earlier else ""
            items.append((open(nar, "rb"), path, list(references), kept, None))  # noqa: SIM115
            earlier.add(path)
        if items:
            with tempfile.TemporaryFile() as bundle:
                write_bundle(bundle, items)
                for stream, *_ in items:
                    stream.close()
                bundle.seek(0)
                done = subprocess.run(["nix-store", "--import"], stdin=bundle,
                                      capture_output=True, check=False)
            if done.returncode:
                raise Leave(nix_error(done.stderr))
    if problem is not None:
        raise Leave(problem)
    return 0


def cmd_archive(argv: Sequence[str]) -> int:
    parsed = parse_command_line(argv, ARCHIVE_OPTIONS, True, "archive")
    if parsed.has("help"):
        sys.stdout.write("Usage: guix archive [OPTION]... PACKAGE...\nExport/import one or "
                         "more packages from/to the store.\n")
        return 0
    if parsed.has("version"):
        return show_version("guix archive")
    if parsed.has("generate-key"):
        return generate_key(parsed.last("generate-key"))
    if parsed.has("authorize"):
        return authorize_key()
    if parsed.has("export"):
        files = list(reversed(parsed.operands))  # [A] fold2 restores the command-line order
        for spec in parsed.operands:
            if not in_store(spec):
                raise Leave(f"{spec}: unknown package")
        return export_paths(files, parsed.has("recursive"))
    if parsed.has("import"):
        return import_paths()
    if parsed.has("missing"):
        return missing_paths()
    raise Leave("either '--export' or '--import' must be specified")


# --- guix gc ------------------------------------------------------------------------------

GC_ACTIONS = {"delete": ("D", "delete"), "references": ("references",),
              "requisites": ("R", "requisites"), "referrers": ("referrers",),
              "derivers": ("derivers",)}
GC_OPTIONS = (
    *HELP_VERSION, *(Opt(names, key) for key, names in GC_ACTIONS.items()),
    *(Opt(names, "not-emulated", arg) for names, arg in (
        (("C", "collect-garbage"), OPTIONAL), (("F", "free-space"), REQUIRED),
        (("d", "delete-generations"), OPTIONAL), (("optimize",), NONE), (("verify",), OPTIONAL),
        (("list-roots",), NONE), (("list-busy",), NONE), (("list-dead",), NONE),
        (("list-live",), NONE), (("list-failures",), NONE), (("clear-failures",), NONE),
        (("vacuum-database",), NONE))))


def symlink_target(path: str) -> str:
    # [GC] symlink-target: follow links, the target taken as written
    while os.path.islink(path):
        path = os.readlink(path)
    return path


def store_directory(path: str) -> str:
    m = re.match(re.escape(STORE) + "/([^/]+)", path)  # [GC] store-directory
    return f"{STORE}/{m[1]}" if m else path


def direct_store_path(path: str) -> str:
    prefix = len(STORE) + 35  # [S] direct-store-path
    slash = path.find("/", prefix) if len(path) > prefix else -1
    return path[:slash] if slash >= 0 else path


def references(path: str) -> list[str]:
    return list(valid_infos([path])[path].references)


def requisites(path: str) -> list[str]:
    infos = closure_infos([path])
    result: list[str] = []  # [S] fold-path with cons: breadth first, consed
    seen: set[str] = set()
    queue = deque([path])
    while queue:
        item = queue.popleft()
        if item not in seen:
            seen.add(item)
            queue.extend(infos[item].references)
            result.insert(0, item)
    return result


def referrers(path: str) -> list[str]:
    assert_store_path(path)
    done = nix_store("--query", "--referrers", path)
    return sorted(done.stdout.decode().split()) if done.returncode == 0 else []


def derivers(path: str) -> list[str]:
    assert_store_path(path)
    if path in invalid_paths([path]):
        return []
    deriver = path_infos([path])[path].deriver
    return [deriver] if deriver and not invalid_paths([deriver]) else []


def delete_paths(paths: list[str]) -> None:
    # [GC] delete-paths -> [GCC] collectGarbage (gcDeleteSpecific), one path at a time
    say("finding garbage collector roots...\n")
    for path in paths:
        assert_store_path(path)
        done = nix_store("--delete", path)
        if done.returncode:
            message = nix_error(done.stderr)
            if re.match(r"cannot delete path `[^']*' since it is still alive", message, re.I):
                raise Leave(f"cannot delete path `{path}' since it is still alive")
            raise Leave(message)
    say("deleting unused links...\n")


def cmd_gc(argv: Sequence[str]) -> int:
    parsed = parse_command_line(argv, GC_OPTIONS, False, "gc")
    if parsed.has("help"):
        sys.stdout.write("Usage: guix gc [OPTION]... PATHS...\nInvoke the garbage collector.\n")
        return 0
    if parsed.has("version"):
        return show_version("guix gc")
    actions = [key for key, _, _ in parsed.options if key in GC_ACTIONS]
    if not actions:
        raise NotEmulated("guix gc without -D/--references/-R/--referrers/--derivers")
    paths = parsed.operands  # in alist order: the last argument first, as [GC] walks them
    if actions[-1] == "delete":
        delete_paths([direct_store_path(p) for p in paths])
        return 0
    relatives = {"references": references, "requisites": requisites, "referrers": referrers,
                 "derivers": derivers}[actions[-1]]
    for path in paths:
        for item in relatives(store_directory(symlink_target(path))):
            sys.stdout.write(f"{item}\n")
            sys.stdout.flush()
    return 0


# --- guix -----------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "build": cmd_build, "archive": cmd_archive, "gc": cmd_gc}


def main(argv: Sequence[str]) -> int:
    """[UI] run-guix and run-guix-command."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    args = list(argv[1:])
    if not args:
        say("guix: missing command name\n" + TRY)
        return 1
    first = args[0]
    if first in ("-h", "--help"):
        sys.stdout.write("Usage: guix OPTION | COMMAND ARGS...\nRun COMMAND with ARGS, if "
                         "given.\n")
        return 0
    if first in ("-V", "--version"):
        return show_version("guix")
    if first.startswith("-"):
        say(f"guix: unrecognized option '{first}'\n" + TRY)
        return 1
    command = COMMANDS.get(first)
    try:
        if command is None:
            if first in GUIX_COMMANDS:
                raise NotEmulated(f"command 'guix {first}' is not emulated")
            say(f"guix: {first}: command not found\n" + TRY)  # hint omitted
            return 1
        return command(args[1:])
    except Leave as error:
        say(f"guix {first}: error: {error}\n")
        return 1
    except NotEmulated as error:
        say(f"guix-emulator: {error}\n")
        return 2
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
