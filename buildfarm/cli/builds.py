"""Commands about builds: submit, builds list/show/cancel/priority/retry, log."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from buildfarm.cli.group import BUILD_STATES, BuildfarmGroup, _open, cli
from buildfarm.cli.params import COUNT, PRIORITY, PRIORITY_MAX, PRIORITY_MIN, RETRIES, TEXT
from buildfarm.errors import UsageError

PATH_MAX = 4096  # bytes of a file name read from stdin, its line break included

if TYPE_CHECKING:
    from buildfarm.datastore.builds import LogState


def _read_paths(paths: Sequence[str]) -> list[str]:
    """The files named, '-' standing for one name per line of stdin (whatever bytes they are:
    file names; a line longer than a file name can be, or with a NUL, is refused)."""
    files: list[str] = []
    for path in paths:
        if path != "-":
            files.append(path)
            continue
        number = 0
        while line := sys.stdin.buffer.readline(PATH_MAX + 1):
            number += 1
            if len(line) > PATH_MAX or b"\0" in line:
                raise UsageError(f"stdin line {number}: not a file name (longer than {PATH_MAX} "
                                 "bytes, or a NUL byte)")
            if name := line.strip():
                files.append(os.fsdecode(name))
    return files


@cli.command()
@click.argument("derivations", nargs=-1, required=True, metavar="DRV...")
@click.option("--uuid", metavar="UUID", help="Use this UUID for the build (one DRV only).")
@click.option(
    "--priority", type=PRIORITY, default=0, show_default=True,
    help=f"Higher runs first ({PRIORITY_MIN} to {PRIORITY_MAX}).",
)
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the build (repeat).")
@click.option(
    "--closure",
    is_flag=True,
    help="Also submit a build of every input derivation of DRV's closure that can be read "
    "(from the store, or beside DRV) and is neither queued, running nor failed, and whose "
    "outputs are not in the output store; with DRV's tags and priority.",
)
@click.option(
    "--ignore-if-built",
    is_flag=True,
    help="Print the UUID of an existing queued, running or succeeded build of the same "
    "derivation (or of one with the same outputs, when the output store holds them) instead "
    "of adding one.",
)
@click.option(
    "--ignore-if-queued",
    is_flag=True,
    help="Print the UUID of an existing queued or running build of the same derivation "
    "instead of adding one.",
)
@click.option(
    "--ignore-if-failed",
    is_flag=True,
    help="As --ignore-if-built, and a derivation whose latest build failed keeps that build: "
    "its failure is remembered, not retried (`builds retry` retries it).",
)
@click.option("--defer-until", metavar="ISO-8601", help="Do not start before this time.")
@click.option(
    "--retries", type=RETRIES, metavar="N",
    help="Try a failed builder again up to N times (0 to 100), on another machine when there "
    "is one; a build that then succeeds is flaky. Default: the inventory's build_retries.",
)
@click.option(
    "--machine-tag", "machine_tags", multiple=True, metavar="KEY=VALUE",
    help="Build only on machines whose inventory tags include this one (repeat: all of them).",
)
@click.option(
    "--derivation-substitute-urls", "substitute_urls", multiple=True, metavar="URL",
    help="Fetch each DRV the coordinator's Nix store lacks, with the missing items of its "
    "closure, from these substitute servers (repeat, or separate by spaces; tried in order), "
    "each narinfo signed by a trusted key (see --trusted-keys), before recording it.",
)
@click.option(
    "--trusted-keys", "keys_file", metavar="FILE",
    help="Public keys (NAME:BASE64, one per line) trusted to sign what "
    "--derivation-substitute-urls fetches, beside the farm's own. Default: "
    "CONFIG_DIR/trusted-keys (~/.config/buildfarm/trusted-keys).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def submit(
    ctx: click.Context,
    derivations: tuple[str, ...],
    uuid: str | None,
    priority: int,
    tags: tuple[str, ...],
    closure: bool,
    ignore_if_built: bool,
    ignore_if_queued: bool,
    ignore_if_failed: bool,
    defer_until: str | None,
    retries: int | None,
    machine_tags: tuple[str, ...],
    substitute_urls: tuple[str, ...],
    keys_file: str | None,
    as_json: bool,
) -> None:
    """Queue a build of each DRV and print its UUID ('-' reads paths from stdin).

    A build whose input's latest build failed (and that nothing else provides) ends
    dependency-failed at once, naming the failed build at the bottom of the chain."""
    from buildfarm import submission

    options = submission.SubmitOptions(
        priority=priority,
        tags=tuple(submission.parse_tag(t) for t in tags),
        uuid=submission.parse_uuid(uuid) if uuid is not None else None,
        ignore_if_built=ignore_if_built,
        ignore_if_queued=ignore_if_queued,
        ignore_if_failed=ignore_if_failed,
        closure=closure,
        defer_until=submission.parse_time(defer_until) if defer_until is not None else None,
        retries=retries,
        machine_tags=tuple(submission.parse_machine_tag(t) for t in machine_tags),
    )
    files = _read_paths(derivations)
    urls = [url for text in substitute_urls for url in text.split()]
    if urls:
        from buildfarm import substitutes
        from buildfarm.cli.group import _settings
        from buildfarm.config import default_config_dir

        settings = _settings(ctx)
        fetched = substitutes.fetch_derivations(
            files, urls, keys_file or os.path.join(default_config_dir(), "trusted-keys"),
            settings.state_dir)
        if fetched:
            click.echo(f"fetched {fetched} store item(s) from substitute servers", err=True)
    results = submission.submit(files, options, connect=lambda: _open(ctx, create=True),
                                store_dirs=_store_dirs(ctx))
    targets = [r for r in results if r.target]
    if as_json:
        from buildfarm.render import print_json

        print_json([{"uuid": r.uuid, "derivation": r.derivation, "created": r.created,
                     "state": r.state if r.created else None} for r in targets])
    else:
        sys.stdout.write("".join(f"{r.uuid}\n" for r in targets))
    for result in targets:
        if result.created and result.reason is not None:
            click.echo(f"build {result.uuid} failed at once: {result.reason}", err=True)
    inputs = len(results) - len(targets)
    if closure:
        click.echo(f"{inputs} build(s) of inputs submitted with it", err=True)


def _store_dirs(ctx: click.Context) -> frozenset[str] | None:
    """The store directories of the inventory's machines (None without an inventory, or with
    one that does not load: the coordinator keeps the one it has, and so may submissions)."""
    import os

    from buildfarm import inventory
    from buildfarm.cli.group import _settings
    from buildfarm.errors import InventoryError

    path = _settings(ctx).inventory_path
    if not os.path.exists(path):
        return None
    try:
        machines = inventory.load(path).machines
    except InventoryError as e:
        click.echo(f"warning: store directories not checked: {e}", err=True)
        return None
    return frozenset(m.store_directory for m in machines)


@cli.group(cls=BuildfarmGroup)
def builds() -> None:
    """List, inspect, cancel and reprioritise builds."""


@builds.command("list")
@click.option("--state", type=click.Choice(BUILD_STATES), help="Only builds in this state.")
@click.option(
    "--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only builds with this tag."
)
@click.option("--system", type=TEXT, metavar="SYSTEM", help="Only builds for this system.")
@click.option("--flaky", is_flag=True,
              help="Only flaky builds: succeeded after their builder had failed (submit "
              "--retries).")
@click.option(
    "--limit", type=COUNT, default=50, show_default=True, metavar="N",
    help=f"At most N (1 to {PRIORITY_MAX}).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def builds_list(
    ctx: click.Context,
    state: str | None,
    tags: tuple[str, ...],
    system: str | None,
    flaky: bool,
    limit: int,
    as_json: bool,
) -> None:
    """List builds, newest first."""
    from buildfarm.datastore import builds as queries
    from buildfarm.render import print_json, print_table
    from buildfarm.submission import parse_tag

    tag_filters = [parse_tag(t) for t in tags]
    _open(ctx)
    rows = queries.list_builds(state=state, tags=tag_filters, system=system, limit=limit,
                               flaky=flaky)
    if as_json:
        print_json(rows)
    else:
        print_table(rows, ("uuid", "state", "system", "priority", "derivation", "tags"))


@builds.command("show")
@click.argument("uuid")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def builds_show(ctx: click.Context, uuid: str, as_json: bool) -> None:
    """Show one build: derivation, outputs, inputs and attempts."""
    from buildfarm.datastore import builds as queries
    from buildfarm.render import one_line, plain, print_fields, print_json

    _open(ctx)
    info = queries.show_build(uuid)
    if as_json:
        print_json(info)
        return
    # A reason or detail is a machine's message: its escape sequences (colours) are dropped;
    # the values are shown as they are, escaped where they hold control characters.
    cause = info["cause"]
    checked = {True: "yes: a rebuild was identical", False: "no: a rebuild differed",
               None: None}[info["reproducible"]]
    print_fields(
        [(k, plain(info[k]) if k == "reason" and info[k] else info[k])
         for k in ("uuid", "state", "reason")]
        + [("cause", f"build {cause['build']} ({cause['derivation']})" if cause else None)]
        + [(k, info[k]) for k in ("derivation", "system", "priority", "tags")]
        + [("machine tags", info["machine_tags"] or None), ("reproducible", checked)]
        + [("flaky", f"yes: succeeded after {info['builder_failures']} builder failure(s)"
            if info["flaky"] else None)]
        + [("retries", f"{info['builder_failures']} of {info['retries']}"
            if info["retries"] else None)]
        + [("created", info["created_at"]), ("ended", info["ended_at"])]
        + [("waiting", info["waiting"]["summary"] if info["waiting"] else None)]
        + [(f"output {name}", path) for name, path in info["outputs"].items()]
        + [("input", f"{i['derivation']} ({i['state'] or 'no build'})") for i in info["inputs"]]
    )
    for number, attempt in enumerate(info["attempts"], 1):
        result = attempt["result"] or f"running ({attempt['step']})"
        line = f"attempt {number}: {attempt['machine']} {attempt['started_at']} {result}"
        if attempt["setup_failure"]:
            line += f" {attempt['setup_failure']}"
        if attempt["detail"]:
            line += f": {plain(attempt['detail'])}"
        if attempt["check"]:
            line += f" (rebuilt with --check: {attempt['check']})"
        print(one_line(line))
        for path in attempt["missing_inputs"]:
            print(f"  missing {one_line(path)}")
        for item in attempt["input_sources"]:
            source = {"machine": "already on the machine",
                      "pushed": "pushed"}.get(item["source"], f"from {item['source']}")
            print(one_line(f"  input {item['path']} {source}"))


def _filters(func: Any) -> Any:
    """The options that choose builds by what they are (datastore/selection.py)."""
    options = [
        click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
                     help="Only builds with this tag (repeat: all of them)."),
        click.option("--system", type=TEXT, metavar="SYSTEM", help="Only builds for this system."),
        click.option("--state", type=click.Choice(("queued", "running")),
                     help="Only queued, or only running, builds (default: both)."),
        click.option("--name", type=TEXT, metavar="GLOB",
                     help="Only builds whose derivation's name (NAME of /STORE/HASH-NAME.drv) "
                     "matches GLOB (*, ?, [...]; quote it for the shell)."),
        click.option("--dry-run", is_flag=True, help="Say what would change; change nothing."),
        click.option("--ignore-if-required-by-another", "spare_required", is_flag=True,
                     help="Leave alone a build that a queued or running build not chosen "
                     "needs (directly, or through other builds left alone)."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print JSON: the builds changed and those left alone."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filter(tags: Sequence[str], system: str | None, state: str | None,
            name: str | None) -> Any:
    from buildfarm.datastore.selection import Filter
    from buildfarm.submission import parse_tag

    return Filter(tuple(parse_tag(t) for t in tags), system, state, name)


def _report(outcome: Any, verb: str, dry_run: bool, as_json: bool) -> None:
    """How many builds a filtered command changed (the list with --json)."""
    if as_json:
        from buildfarm.render import print_json

        print_json({"dry_run": dry_run, "changed": [c.json() for c in outcome.changed],
                    "spared": [c.json() for c in outcome.spared], "raised": outcome.raised})
        return
    count = len(outcome.changed)
    line = f"{'would have ' if dry_run else ''}{verb} {count} build{'s' * (count != 1)}"
    if outcome.spared:
        line += f"; {len(outcome.spared)} left alone: a build not chosen needs them"
    if outcome.raised:
        line += f"; {outcome.raised} builds they need raised to that priority"
    click.echo(line)


@builds.command("cancel")
@click.argument("uuids", nargs=-1, metavar="[UUID...]")
@_filters
@click.pass_context
def builds_cancel(ctx: click.Context, uuids: tuple[str, ...], tags: tuple[str, ...],
                  system: str | None, state: str | None, name: str | None, dry_run: bool,
                  spare_required: bool, as_json: bool) -> None:
    """Cancel queued or running builds: those named by UUID, or every one the filters choose
    (--tag, --system, --state, --name; all must hold), in one transaction. With filters it
    prints how many it canceled.

    By UUID (or a unique prefix of one), every build named that can be canceled is; those that
    cannot (unknown, or already ended) are named in one line on standard error, and the exit
    status is then 1."""
    from buildfarm.datastore import builds as queries
    from buildfarm.datastore import selection

    which = _filter(tags, system, state, name)
    if uuids and (which.given() or dry_run or spare_required or as_json):
        raise UsageError("name builds by UUID or choose them with filters, not both")
    _open(ctx)
    if not uuids:
        outcome = selection.cancel_matching(which, dry_run=dry_run,
                                            spare_required=spare_required)
        _report(outcome, "canceled", dry_run, as_json)
        return
    canceled, refused = queries.cancel_builds(uuids)
    for uuid in canceled:
        click.echo(f"canceled {uuid}")
    if len(refused) == 1:
        raise UsageError(refused[0])
    if refused:
        raise UsageError(f"{len(refused)} builds not canceled: " + "; ".join(refused))


@builds.command("priority")
@click.argument("words", nargs=-1, required=True, metavar="[UUID] PRIORITY")
@_filters
@click.pass_context
def builds_priority(ctx: click.Context, words: tuple[str, ...], tags: tuple[str, ...],
                    system: str | None, state: str | None, name: str | None, dry_run: bool,
                    spare_required: bool, as_json: bool) -> None:
    """Change the priority of a queued or running build, and say from what to what, or of
    every one the filters choose (PRIORITY: a whole number from -2147483648 to 2147483647;
    higher runs first; write `--` before a negative one); the queued or running builds they
    need get at least as much."""
    from buildfarm.datastore import builds as queries
    from buildfarm.datastore import selection

    which = _filter(tags, system, state, name)
    filtered = which.given() or dry_run or spare_required or as_json
    if len(words) != (1 if filtered else 2):
        raise UsageError("give a UUID and a PRIORITY, or filters and a PRIORITY")
    priority = PRIORITY.convert(words[-1], click.Argument(["priority"]), ctx)
    _open(ctx)
    if filtered:
        outcome = selection.prioritise_matching(which, priority, dry_run=dry_run,
                                                spare_required=spare_required)
        _report(outcome, f"set priority {priority} on", dry_run, as_json)
        return
    full, before, raised = queries.set_priority(words[0], priority)
    if before == priority:
        click.echo(f"build {full}: priority already {priority}")
    else:
        click.echo(f"build {full}: priority {before} -> {priority}")
    if raised:
        click.echo(f"{raised} build(s) it needs raised to priority {priority}")


@builds.command("retry")
@click.argument("uuids", nargs=-1, required=True, metavar="UUID...")
@click.option(
    "--dependants",
    is_flag=True,
    help="Also queue again the builds its failure made dependency-failed.",
)
@click.pass_context
def builds_retry(ctx: click.Context, uuids: tuple[str, ...], dependants: bool) -> None:
    """Queue failed builds again: a failure is remembered until it is retried on purpose.
    Each keeps its UUID and its attempts; exit status 1 if one could not be retried."""
    from buildfarm.datastore import builds as queries

    _open(ctx)
    retried, refused = queries.retry_builds(uuids, dependants=dependants)
    for uuid in retried:
        click.echo(f"queued again {uuid}")
    for line in refused:
        click.echo(line, err=True)
    if refused:
        ctx.exit(1)


FOLLOW_POLL = 0.5  # seconds between looks at a build that has no log to follow yet


@cli.command()
@click.argument("uuid")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing while the build runs, and wait for a build that has not "
              "started yet (or is tried again).")
@click.pass_context
def log(ctx: click.Context, uuid: str, follow: bool) -> None:
    """Print the build log of a build's latest attempt.

    The log is shown without escape sequences (colours, titles, hyperlinks) or any other
    control character but newline and tab; the stored and published log keeps them. A build
    that has no log says why: not yet (queued, or its attempt has not reached its build step),
    or never (canceled before it ran, failed without running its builder)."""
    import time

    from buildfarm.datastore import builds as queries
    from buildfarm.datastore.models import FINAL_STATES
    from buildfarm.errors import NotFoundError

    _open(ctx)
    state = queries.log_state(uuid)
    shown: int | None = None  # the attempt whose log was printed last
    while True:
        if state.path is not None and state.attempt != shown:
            if shown is not None:
                click.echo(f"buildfarm: build {state.uuid} was tried again; its new log:",
                           err=True)
            shown = state.attempt
            _print_log(state, follow)
            if not follow:
                return
        elif not follow or state.state in FINAL_STATES:
            if shown is None:
                raise NotFoundError(state.why_none())
            return
        else:
            time.sleep(FOLLOW_POLL)
        state = queries.log_state(state.uuid)


def _print_log(state: LogState, follow: bool) -> None:
    """One attempt's log as plain text, and (`follow`) what it gets until the attempt ends."""
    from buildfarm.datastore import builds as queries
    from buildfarm.logs import read_log
    from buildfarm.render import PlainText

    def done() -> bool:
        now = queries.log_state(state.uuid)
        return not (now.running and now.attempt == state.attempt)

    assert state.path is not None
    text = PlainText()
    out = sys.stdout.buffer
    for chunk in read_log(state.path, follow=follow and state.running, done=done):
        out.write(text.feed(chunk).encode())
        out.flush()
    out.write(text.feed(b"", final=True).encode())
    out.flush()
