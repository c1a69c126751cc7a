"""`guix build DRV...` ([B] guix/scripts/build.scm) on top of `nix-store --realise`.

The plan is Guix's ([D] derivation-build-plan, [UI] show-what-to-build); the build's stderr is
what Guix's client shows at a verbosity ([ST] guix/status.scm) for the daemon's events ([BC]
nix/libstore/build.cc), rebuilt from Nix's `--log-format internal-json` events.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Sequence

from guix_emulator.derivation import Derivation, read_derivation
from guix_emulator.options import (
    BUILD_OPTIONS,
    HELP_VERSION,
    NONE,
    OPTIONAL,
    REQUIRED,
    Leave,
    Opt,
    Parsed,
    number,
    parse_command_line,
    say,
    show_version,
    unsupported,
)
from guix_emulator.store import (
    ANSI,
    assert_store_path,
    guix_quotes,
    in_store,
    invalid_paths,
    quote,
)

BUILD_COMMAND_OPTIONS = (
    *HELP_VERSION, Opt(("n", "dry-run"), "dry-run"), Opt(("d", "derivations"), "derivations"),
    Opt(("v", "verbosity"), "verbosity", REQUIRED, number), Opt(("q", "quiet"), "quiet"),
    Opt(("check",), "check"),
    *unsupported(
        (("S", "source"), NONE), (("sources",), OPTIONAL),
        (("repair",), NONE), (("s", "system"), REQUIRED), (("target",), REQUIRED),
        (("e", "expression"), REQUIRED), (("f", "file"), REQUIRED), (("m", "manifest"), REQUIRED),
        (("r", "root"), REQUIRED), (("log-file",), NONE)),
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


def build_plan(tops: Sequence[tuple[str, Derivation]], check: bool = False) -> list[str]:
    """[D] derivation-build-plan with no substitutes (the oracle answers #f for every item):
    the .drv files to build, in Guix's order; in check mode ("assume that DRV is not built")
    the tops are built whatever their state."""
    drvs = dict(tops)
    queue = list(drvs)
    while queue:
        for path, _ in drvs[queue.pop()].inputs:
            if path not in drvs:
                drvs[path] = read_derivation(path)
                queue.append(path)
    invalid = invalid_paths(p for d in drvs.values() for p in d.output_paths)
    plan: list[str] = []
    visited: set[tuple[str, tuple[str, ...]]] = set()
    work = deque((p, tuple(name for name, _ in d.outputs)) for p, d in tops)
    while work:
        key = work.popleft()
        path, outputs = key
        if key in visited:
            continue
        visited.add(key)
        paths = dict(drvs[path].outputs)
        top = check and any(path == p for p, _ in tops)
        if not top and all(paths.get(name) not in invalid for name in outputs):
            continue  # input-built?
        plan.append(path)
        work.extendleft(reversed(drvs[path].inputs))  # (append deps rest)
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
# Nix's messages of check mode, and the daemon's [BC] registerOutputs and outputsSubstituted:
# "derivation `%1%' may not be deterministic: output `%2%' differs", "some outputs of `%1%'
# are not valid, so checking is not possible" (plain Errors: the client prints them as is).
_NOT_DETERMINISTIC = re.compile(
    r"derivation '([^']+)' may not be deterministic: output '([^']+)' differs$")
_NOT_CHECKABLE = re.compile(
    r"some outputs of '([^']+)' are not valid, so checking is not possible$")


class BuildReport:
    """Turns `nix-store --realise --log-format internal-json` events into Guix's stderr: the
    daemon's lines ([BC]) and the client's status lines at a verbosity ([ST] print-build-event)."""

    def __init__(self, verbosity: int, drvs: dict[str, Derivation]) -> None:
        self.verbosity = verbosity
        self.drvs = drvs
        self.ids: dict[int, str] = {}
        self.building: list[str] = []  # most recently started first, as [ST] build-status
        self.reasons: set[str] = set()  # failed, reason printed, build-failed still due
        self.pending: set[str] = set()  # stopped without its outputs, reason not seen yet
        self.failed: set[str] = set()
        self.errors: list[str] = []

    def derivation(self, path: str) -> Derivation:
        if path not in self.drvs:
            self.drvs[path] = read_derivation(path)
        return self.drvs[path]

    def daemon(self, line: str) -> None:
        if self.verbosity >= 1:
            say(line + "\n")

    def line(self, raw: str) -> None:
        if not raw.startswith("@nix "):
            if raw.startswith("error: "):
                self.error(ANSI.sub("", raw)[7:])
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
            self.error(ANSI.sub("", event.get("msg", "")).removeprefix("error: "))

    def stopped(self, drv: str) -> None:
        self.building.remove(drv)
        if drv in self.reasons:
            self.build_failed(drv)
        elif not invalid_paths(self.derivation(drv).output_paths):
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
        # The first line; Nix may go on with ";\n       last 10 log lines: ...".
        first = (message.splitlines()[0] if message else "").removesuffix(";")
        if m := _BUILDER_FAILED.match(first):  # [BC] buildDone
            self.fail(m[1], f"builder for `{m[1]}' {guix_quotes(m[2])}", True)
        elif m := _TIMED_OUT.match(first):  # [BC] waitForInput; goal name "building of `%1%'"
            self.fail(m[1], f"building of `{m[1]}' timed out after {m[2]} seconds{m[3] or ''}",
                      True)
        elif m := _DEPENDENCIES.match(first):  # [BC] inputsRealised
            self.fail(m[2], f"cannot build derivation `{m[2]}': {m[1]} dependencies couldn't "
                      "be built", False)
        elif m := _MISSING.match(first):  # [BC] haveDerivation
            self.fail(m[1], f"cannot build missing derivation ‘{m[1]}’", False)  # noqa: RUF001
        elif m := _NOT_DETERMINISTIC.match(first):
            self.errors.append(f"derivation `{m[1]}' may not be deterministic: output `{m[2]}' "
                               "differs")
        elif m := _NOT_CHECKABLE.match(first):
            self.errors.append(f"some outputs of `{m[1]}' are not valid, so checking is not "
                               "possible")
        elif not _SUMMARY.match(first):
            self.errors.append(guix_quotes(first))

    def finish(self) -> None:
        """Builds that stopped without their outputs and without a reason we know: failed,
        unless another build failed first (then Nix cancelled them, as the daemon cancels the
        other goals, with no "@ build-failed" for them)."""
        for drv in sorted(self.pending):
            if not self.failed:
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
             "fallback": "--fallback", "check": "--check"}
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
    # [B] options->things-to-build walks the operands in alist order, i.e. the last one
    # first: that is the order of the plan's top level and of the outputs on stdout.
    drvs: list[tuple[str, Derivation]] = []
    for spec in parsed.operands:
        if spec.endswith(".drv"):
            if os.path.exists(spec):  # a missing .drv "can be substituted down the road"
                path = os.path.realpath(spec)
                drvs.append((path, read_derivation(path)))
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
    plan = build_plan(drvs, parsed.has("check"))
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
        sys.stdout.write("".join(f"{path}\n" for path in drv.output_paths))
    return 0
