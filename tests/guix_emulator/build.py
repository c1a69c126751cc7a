"""`guix build DRV...` ([B] guix/scripts/build.scm) on top of `nix-store --realise`.

The plan is Guix's ([D] derivation-build-plan, [UI] show-what-to-build), substitutes included
(substitute.py); the build's stderr is what Guix's client shows at a verbosity ([ST]
guix/status.scm) for the daemon's events ([BC] nix/libstore/build.cc), rebuilt from Nix's
`--log-format internal-json` events.  The daemon substitutes first, then builds what is left
([BC] DerivationGoal::haveDerivation, outputsSubstituted): substitutions are the emulator's
own, so Nix is always run with substitutes off.  Offloading ([BC] tryBuildHook, guix/scripts/
offload.scm) is emulated as far as the client can see: a build the hook would take is
announced as offloaded to the first machine of /etc/guix/machines.scm for its system, then
built here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence

from guix_emulator.derivation import Derivation, read_derivation
from guix_emulator.i18n import G_, N_
from guix_emulator.options import (
    BUILD_OPTIONS,
    HELP_VERSION,
    NONE,
    OPTIONAL,
    REQUIRED,
    Leave,
    Opt,
    Parsed,
    config_dir,
    number,
    parse_command_line,
    say,
    show_version,
    unsupported,
)
from guix_emulator.store import (
    ANSI,
    add_temp_roots,
    assert_store_path,
    guix_quotes,
    in_store,
    invalid_paths,
    open_connection,
    quote,
)
from guix_emulator.substitute import (
    Narinfo,
    Substituter,
    daemon_substitute_urls,
    substitute_items,
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


def build_plan(tops: Sequence[tuple[str, Derivation]], substituter: Substituter | None,
               check: bool = False) -> tuple[list[str], list[Narinfo]]:
    """[D] derivation-build-plan: the .drv files to build, in Guix's order, and the items to
    download, with `substituter` as the substitution oracle (None: --no-substitutes, the
    oracle answers #f).  In check mode the requested derivations count as not built."""
    drvs = dict(tops)
    queue = list(drvs)
    while queue:
        for path, _ in drvs[queue.pop()].inputs:
            if path not in drvs:
                drvs[path] = read_derivation(path)
                queue.append(path)
    invalid = invalid_paths(p for d in drvs.values() for p in d.output_paths)
    requested = {(p, tuple(name for name, _ in d.outputs)) for p, d in tops}
    plan: list[str] = []
    downloads: list[Narinfo] = []
    visited: set[tuple[str, tuple[str, ...]]] = set()
    work = deque((p, tuple(name for name, _ in d.outputs)) for p, d in tops)
    while work:
        key = work.popleft()
        path, outputs = key
        if key in visited:
            continue
        visited.add(key)
        paths = dict(drvs[path].outputs)
        wanted = [paths.get(name, "") for name in outputs]
        if not (check and key in requested) and all(p not in invalid for p in wanted):
            continue  # input-built?
        infos = [substituter.lookup(p) for p in wanted] if substituter is not None else []
        if infos and all(infos):  # input-substitutable-info
            found = [i for i in infos if i is not None]
            downloads.extend(i for i in found if i not in downloads)
            referenced = {r for i in found for r in i.references}
            # dependencies-of-substitutables: the inputs whose outputs they refer to
            work.extendleft(reversed([(p, o) for p, o in drvs[path].inputs
                                      if set(dict(drvs[p].outputs).values()) & referenced]))
            continue
        plan.append(path)
        work.extendleft(reversed(drvs[path].inputs))  # (append deps rest)
    return plan, downloads


def show_what_to_build(plan: list[str], downloads: list[Narinfo], dry_run: bool,
                       verbosity: int) -> None:
    """[UI] show-what-to-build (three-space indent, as 1.4-era Guix)."""
    if verbosity < 1:
        return
    mood = "would" if dry_run else "will"
    if plan:
        header = N_(f"The following derivation {mood} be built:",
                    f"The following derivations {mood} be built:", len(plan))
        say(header + "\n" + "".join(f"   {d}\n" for d in plan)
            + ("\n" if verbosity == 1 else ""))
    if downloads and verbosity >= 2:
        sizes = [info.download_size for info in downloads]
        if all(sizes):  # display-download-size?
            total = sum(size or 0 for size in sizes) / 1e6
            header = G_(f"{{}} MB {mood} be downloaded:").format(f"{total:.1f}")
        else:
            header = N_(f"The following file {mood} be downloaded:",
                        f"The following files {mood} be downloaded:", len(downloads))
        say(header + "\n" + "".join(f"  {info.path}\n" for info in downloads))


def offload_host(drv: Derivation, parsed: Parsed) -> str | None:
    """The machine the build hook would send `drv` to: none under --no-offload (or
    --keep-failed, [B] set-build-options-from-command-line), none without a machines.scm
    (guix/scripts/offload.scm build-machines: "Silently ignore missing file"), else the first
    machine of that file for its system.  Emulator detail: machines.scm is read for
    `(host-name "…")` and `(systems (list "…" …))` or `(system "…")` of each build-machine."""
    if parsed.has("no-offload") or parsed.has("keep-failed"):
        return None
    try:
        with open(os.path.join(config_dir(), "machines.scm"), encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        return None
    for machine in re.split(r"\(build-machine\b", text)[1:]:
        host = re.search(r'\(host-name\s+"([^"]+)"\)', machine)
        systems = re.findall(r'"([a-z0-9_]+-[a-z0-9_]+)"', machine)
        if host is not None and drv.system in systems:
            return host.group(1)
    return None


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

    def __init__(self, verbosity: int, drvs: dict[str, Derivation],
                 offload: Callable[[Derivation], str | None] = lambda _: None) -> None:
        self.verbosity = verbosity
        self.drvs = drvs
        self.offload = offload
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
                say(G_("building {}...").format(drv) + "\n")  # [ST]
            host = self.offload(self.derivation(drv))
            if host is not None and self.verbosity >= 1:  # "@ build-remote DRV HOST"
                say(G_("offloading build of {} to '{}'").format(drv, host) + "\n")
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
                say(G_("successfully built {}").format(drv) + "\n")  # [ST] print-log?
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
            say(G_("build of {} failed").format(drv) + "\n"
                + (G_("View build log at '{}'.").format(log) if log else
                   G_("Could not find build log for '{}'.").format(drv)) + "\n")

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
    """[B] build-derivations through the daemon, done by nix-store --realise (substitutes off:
    they were the emulator's to make, before)."""
    add_temp_roots()
    command = ["nix-store", "--realise", "--log-format", "internal-json",
               "--option", "substitute", "false"]
    flags = {"keep-going": "--keep-going", "keep-failed": "--keep-failed", "check": "--check"}
    command += [flag for key, flag in flags.items() if parsed.has(key)]
    settings = {"max-silent-time": "max-silent-time", "timeout": "timeout", "cores": "cores",
                "max-jobs": "max-jobs"}
    for key, setting in settings.items():
        if parsed.has(key):
            command += ["--option", setting, str(parsed.last(key))]
    if parsed.has("rounds"):
        command += ["--option", "repeat", str(max(0, int(str(parsed.last("rounds"))) - 1))]
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


def substitute_outputs(downloads: list[Narinfo], drvs: dict[str, Derivation],
                       substituter: Substituter, fallback: bool) -> bool:
    """[BC] DerivationGoal::haveDerivation for the derivations the plan downloads: a
    SubstitutionGoal per invalid output; then outputsSubstituted: when one failed (not merely
    had no substitute), without --fallback the build stops with the error below; with it, the
    derivation is built instead. Whether something is left to build."""
    by_output = {p: drv_path for drv_path, d in drvs.items() for p in d.output_paths}
    left = False
    for info in downloads:
        done = substituter.substitute(info.path)
        if done is not True:
            left = True
            if done is False and not fallback:
                drv = by_output.get(info.path, info.deriver)
                raise Leave(f"some substitutes for the outputs of derivation `{drv}' failed "
                            "(usually happens due to networking issues); try `--fallback' to "
                            "build derivation from source ")
    return left


def cmd_build(argv: Sequence[str]) -> int:
    parsed = parse_command_line(argv, BUILD_COMMAND_OPTIONS, True, "build")
    if parsed.has("help"):
        sys.stdout.write("Usage: guix build [OPTION]... PACKAGE-OR-DERIVATION...\nBuild the "
                         "given PACKAGE-OR-DERIVATION and return their output paths.\n")
        return 0
    if parsed.has("version"):
        return show_version("guix build")
    verbosity = verbosity_of(parsed)
    open_connection()  # [B] with-store
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
    # Store items that are not .drv files are substituted ([B] `items`), and so would be a
    # missing .drv; [UI] build-notifier shows no plan for either.
    items = [s for s in parsed.operands if in_store(s) and not s.endswith(".drv")]
    missing = [s for s in parsed.operands if in_store(s) and s.endswith(".drv")
               and not os.path.exists(s)]
    if parsed.has("derivations"):
        sys.stdout.write("".join(f"{path}\n" for path, _ in drvs))
        return 0
    for path in (*(p for p, _ in drvs), *items):
        assert_store_path(path)
    urls = None
    if not parsed.has("no-substitutes"):  # [B] --substitute-urls, else the daemon's own
        option = parsed.last("substitute-urls")
        urls = str(option).split() if option is not None else daemon_substitute_urls()
    substituter = Substituter(urls or [], verbosity) if urls is not None else None
    plan, downloads = build_plan(drvs, substituter, parsed.has("check"))
    show_what_to_build(plan, downloads, parsed.has("dry-run"), verbosity)
    if (plan or downloads) and parsed.has("dry-run"):
        return 0  # [UI] build-notifier: no `continue' when dry-run and something to do
    failed: list[str] = []
    if items and substituter is not None:
        failed = substitute_items(items, substituter, parsed.has("keep-going"))
    left = downloads and substituter is not None and substitute_outputs(
        downloads, dict(drvs), substituter, parsed.has("fallback"))
    if plan or missing or left or (parsed.has("check") and drvs):
        report = BuildReport(verbosity, dict(drvs), lambda d: offload_host(d, parsed))
        realise([p for p, _ in drvs] + missing, parsed, report)
    if failed:  # [BC] buildPaths: the failed goals, substitutions included
        raise Leave(f"build of {', '.join(map(quote, failed))} failed")
    for _, drv in drvs:  # [UI] show-derivation-outputs, derivation-output-names order
        sys.stdout.write("".join(f"{path}\n" for path in drv.output_paths))
    return 0
