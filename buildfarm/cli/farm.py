"""Commands that run the farm or look at it: run, hooks, machines, publish, web."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from buildfarm.cli.group import BuildfarmGroup, _open, _settings, cli
from buildfarm.cli.params import DAY, TEXT, WORKERS, Seconds
from buildfarm.config import Settings
from buildfarm.errors import BuildfarmError


def compression_option(command: Any) -> Any:
    """--compression, shared by the commands that publish outputs (they should agree)."""
    return click.option(
        "--compression",
        "compressions",
        multiple=True,
        envvar="BUILDFARM_COMPRESSIONS",
        metavar="TYPE[:LEVEL]",
        help="Publish each output's nar in this compression: gzip (levels 1-9, default 3) or "
        "zstd (1-22, default 10). Repeat it for several, listed in narinfos in that order "
        "(Nix takes the last) [default: gzip:3 then zstd:10; env: BUILDFARM_COMPRESSIONS, "
        "separated by spaces].",
    )(command)


def _load_inventory(settings: Settings) -> Any:
    import os

    from buildfarm import inventory
    from buildfarm.errors import InventoryError

    path = settings.inventory_path
    if not os.path.exists(path):
        raise InventoryError(
            f"no inventory at {path}: start from inventory.example.yaml "
            f"(cp inventory.example.yaml {path}), or pass --inventory / BUILDFARM_INVENTORY"
        )
    return inventory.load(path)


@cli.command()
@click.option(
    "--exit-when-idle",
    is_flag=True,
    help="Stop when nothing can make progress (nothing queued, or no machine can take what "
    "is), saying what is stuck and why.",
)
@click.option("--no-ui", is_flag=True, help="One log line per event instead of the live view.")
@click.option(
    "--grace",
    type=Seconds(0, DAY),
    default=30.0,
    show_default=True,
    help="Seconds running builds get to finish on SIGINT/SIGTERM before they are stopped "
    "(0 to 86400).",
)
@click.option(
    "--hook-timeout",
    type=Seconds(0.1, DAY),
    default=60.0,
    show_default=True,
    help="Seconds a hook may run before it is killed (0.1 to 86400).",
)
@click.option(
    "--hook-workers",
    type=WORKERS,
    default=4,
    show_default=True,
    help="Hooks running at once (1 to 1024).",
)
@click.option(
    "--hook-parallelism",
    type=WORKERS,
    default=2,
    show_default=True,
    help="Hooks of one event running at once (1 to 1024).",
)
@click.option(
    "--hook-env",
    "hook_env",
    multiple=True,
    type=TEXT,
    metavar="NAME",
    help="Pass this variable of the coordinator's environment on to hooks (repeat it); they "
    "get only what buildfarm-hooks(7) lists otherwise.",
)
@click.option(
    "--max-log-size",
    metavar="SIZE",
    default="64M",
    show_default=True,
    help="Keep at most this much of each build log (e.g. 64M, 1G); the rest is counted, "
    "not kept.",
)
@click.option(
    "--load-interval",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    default=20.0,
    show_default=True,
    help="Seconds between two reads of each connected machine's load average (for "
    "overload_threshold, for choosing the least loaded machine, and for the live view).",
)
@click.option(
    "--retry-limit",
    type=click.IntRange(min=1, max=1000),
    default=8,
    show_default=True,
    help="Attempts in a row that make no progress (setup failures, lost connections, failed "
    "transfers) before a build ends failed with the last one's reason.",
)
@click.option(
    "--retry-delay",
    type=click.FloatRange(min=0, max=3600),
    default=2.0,
    show_default=True,
    help="Seconds a build waits after its first setup failure in a row; the wait doubles "
    "after each (with jitter), up to 10 minutes. (A failure of the machine's own pauses that "
    "machine instead.)",
)
@click.option(
    "--metrics",
    "metrics_address",
    metavar="ADDRESS:PORT",
    help="Serve Prometheus metrics at http://ADDRESS:PORT/metrics (port 0 picks a free port; "
    "the URL is printed at start).",
)
@compression_option
@click.pass_context
def run(
    ctx: click.Context,
    exit_when_idle: bool,
    no_ui: bool,
    grace: float,
    hook_timeout: float,
    hook_workers: int,
    hook_parallelism: int,
    hook_env: tuple[str, ...],
    max_log_size: str,
    load_interval: float,
    retry_limit: int,
    retry_delay: float,
    metrics_address: str | None,
    compressions: tuple[str, ...],
) -> None:
    """Run the coordinator: allocate queued builds to machines and build them."""
    import asyncio

    from buildfarm.coordinator.live import LineReporter, LiveReporter
    from buildfarm.coordinator.options import RunOptions
    from buildfarm.coordinator.service import Coordinator, Reporter
    from buildfarm.datastore.attempts import Retry
    from buildfarm.formats.compression import parse_compressions
    from buildfarm.outputs.gc import parse_size

    chosen = parse_compressions(compressions)
    settings = _settings(ctx)
    inventory = _load_inventory(settings)
    options = RunOptions(
        exit_when_idle=exit_when_idle,
        grace=grace,
        hook_timeout=hook_timeout,
        hook_workers=hook_workers,
        hook_parallelism=hook_parallelism,
        hook_env=hook_env,
        max_log_bytes=parse_size(max_log_size),
        compressions=chosen,
        load_interval=load_interval,
        retry=Retry(first_delay=retry_delay, max_delay=max(retry_delay, 600.0),
                    limit=retry_limit),
    )
    metrics = None
    if metrics_address is not None:
        from buildfarm.coordinator.metrics import Metrics, parse_address

        metrics = Metrics(*parse_address(metrics_address))
    live = None
    reporter: Reporter
    if no_ui or not sys.stdout.isatty():
        reporter = LineReporter()
    else:
        reporter = live = LiveReporter()
    try:
        asyncio.run(Coordinator(settings, inventory, options, reporter, metrics).serve())
    finally:
        if live is not None:
            live.stop()


@cli.group(cls=BuildfarmGroup)
def hooks() -> None:
    """The hook scripts in the hooks directory and the events that fire them."""


@hooks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def hooks_list(ctx: click.Context, as_json: bool) -> None:
    """Show which scripts fire on which events, in the order they run."""
    from buildfarm.coordinator.hooks import EVENTS, scripts
    from buildfarm.render import print_json, print_table

    hooks_dir = _settings(ctx).hooks_dir
    rows = [
        {"event": e.name, "scripts": scripts(hooks_dir, e.name), "when": e.when} for e in EVENTS
    ]
    if as_json:
        print_json({"hooks_dir": hooks_dir, "events": rows})
        return
    print(f"hooks directory: {hooks_dir}")
    print_table(
        [{**r, "scripts": [os.path.basename(s) for s in r["scripts"]] or "-"} for r in rows],
        ("event", "scripts", "when"),
    )


@cli.command()
@click.option(
    "--listen", default="0.0.0.0:8080", show_default=True, metavar="ADDRESS:PORT",
    help="Where to listen (port 0 picks a free port; the URL is printed at start).",
)
@compression_option
@click.option(
    "--negative-ttl", default="60s", show_default=True, metavar="DURATION",
    help="How long clients may remember that a narinfo is missing (e.g. 30s, 5m, 0).",
)
@click.pass_context
def publish(
    ctx: click.Context, listen: str, compressions: tuple[str, ...], negative_ttl: str
) -> None:
    """Serve the output store as a Guix and Nix substitute server (narinfos, nars, logs).

    Outputs stored before publishing existed, or by a coordinator without a key, are
    published on first request, in the compressions --compression names (give it the same
    value as `buildfarm run`, or set BUILDFARM_COMPRESSIONS for both). A missing narinfo is
    answered 404 with `Cache-Control: max-age` set to --negative-ttl, as `guix publish
    --negative-ttl` does: Guix would otherwise keep the answer for 10 minutes or more, though
    the output may be published as soon as its build ends."""
    import asyncio

    from buildfarm.formats import keys
    from buildfarm.formats.compression import parse_compressions
    from buildfarm.outputs.gc import parse_duration
    from buildfarm.outputs.publish import parse_listen, serve
    from buildfarm.outputs.store import OutputStore, Publisher

    chosen = parse_compressions(compressions)
    host, port = parse_listen(listen)
    ttl = int(parse_duration(negative_ttl))
    settings = _settings(ctx)
    keys.public_key(settings.state_dir, "nix")  # a missing key fails here, with the remedy
    store = OutputStore(settings.outputs_dir, Publisher.load(settings.state_dir, chosen))

    def ready(url: str) -> None:
        click.echo(f"buildfarm publish: serving {settings.outputs_dir} at {url}")
        sys.stdout.flush()

    asyncio.run(serve(store, settings.db_url, host, port, ready, negative_ttl=ttl))


@cli.group(cls=BuildfarmGroup, invoke_without_command=True, subcommand_metavar="[test [NAME]...]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def machines(ctx: click.Context, as_json: bool) -> None:
    """Show every inventory machine, as a fresh probe finds it and as the coordinator sees it.

    The probe says whether the machine is reachable (or why not), and its store version,
    cores, load, free disk in the store and clock skew. From the datastore come the builds the
    running coordinator has there, its slots, and its failures and backoff. All machines are
    probed at once, so an unreachable one costs at most its connect_timeout. Disabled machines
    are listed, not probed.
    """
    if ctx.invoked_subcommand is not None:
        return
    import asyncio
    import time

    import peewee

    from buildfarm.machines import status as probing
    from buildfarm.render import print_json, print_table

    inventory = _load_inventory(_settings(ctx))
    seen: dict[str, probing.Seen] = {}
    try:
        _open(ctx)
        seen = probing.coordinator_view([m.name for m in inventory.machines])
    except (BuildfarmError, peewee.DatabaseError) as e:
        click.echo(f"buildfarm: datastore not read (builds and backoff unknown): {e}", err=True)
    found = asyncio.run(probing.probe_all([m for m in inventory.machines if m.enabled]))
    probes = {p.name: p for p in found}
    now = time.time()
    rows = [probing.status(m, probes.get(m.name), seen.get(m.name), now)
            for m in inventory.machines]
    if as_json:
        print_json(rows)
        return
    print_table([probing.table_row(r) for r in rows], probing.COLUMNS,
                {"state": probing.STATE_STYLES.get})


@machines.command("test")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def machines_test(ctx: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Check that machines can do what builds need, and say what to fix.

    Each machine (every enabled one, or those named) is tested at once: log in, run the store
    tool, import an archive from the coordinator, export it back. Exits with status 1 if any
    machine fails a check.
    """
    import asyncio

    from buildfarm.errors import UsageError
    from buildfarm.formats.signing import load_key
    from buildfarm.machines.checks import report_lines, test_all
    from buildfarm.render import print_json, use_colour

    settings = _settings(ctx)
    inventory = _load_inventory(settings)
    chosen = [m for m in inventory.machines if m.enabled]
    if names:
        known = {m.name: m for m in inventory.machines}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"no machine {unknown[0]!r} in {inventory.path}; machines: "
                             + (", ".join(known) or "none"))
        chosen = [known[n] for n in dict.fromkeys(names)]
    key, key_problem = None, None
    try:
        key = load_key(settings.state_dir)
    except BuildfarmError as e:
        key_problem = str(e)
    reports = asyncio.run(test_all(chosen, key, key_problem))
    if as_json:
        print_json([r.to_json() for r in reports])
    else:
        for line in report_lines(reports, use_colour()):
            click.echo(line, color=True)
    if not all(r.ok for r in reports):
        ctx.exit(1)


@cli.command()
@click.option(
    "--listen", default="127.0.0.1:8081", show_default=True, metavar="ADDRESS:PORT",
    help="Where to listen (loopback by default; port 0 picks a free port; the URL is printed "
    "at start).",
)
@click.pass_context
def web(ctx: click.Context, listen: str) -> None:
    """Serve the read-only web pages, the JSON API (/api) and the build event stream (/events).

    The pages show the queue, the machines, running builds, each build with its attempts and
    live log, and each machine; /events streams the same events the hooks get, as server-sent
    events. The web server only reads the datastore and may run beside `buildfarm run`.
    """
    import asyncio

    from buildfarm.web.app import parse_listen, serve

    host, port = parse_listen(listen)
    settings = _settings(ctx)

    def ready(url: str) -> None:
        click.echo(f"buildfarm web: serving at {url}")
        sys.stdout.flush()

    asyncio.run(serve(settings.db_url, settings.inventory_path, host, port, ready))
