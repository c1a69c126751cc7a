"""The command line: parse, call the core, render. No logic of its own lives here."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from buildfarm import __version__
from buildfarm.config import Settings
from buildfarm.errors import BuildfarmError

BUILD_STATES = ("queued", "running", "succeeded", "failed", "canceled")


class BuildfarmGroup(click.Group):
    """Turns every error a user can cause into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BuildfarmError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except Exception as e:
            # peewee is imported only by commands that open a datastore.
            peewee = sys.modules.get("peewee")
            if peewee is None or not isinstance(e, peewee.DatabaseError):
                raise
            raise click.ClickException(f"datastore error: {e}") from None


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.find_object(Settings)  # type: ignore[assignment]
    return settings


# Commands that open only the datastore of --db (never another): see _load_peewee.
_QUICK_COMMANDS = frozenset({"submit", "builds", "log"})


def _load_peewee(url: str) -> None:
    """Import peewee for the datastore at `url`. peewee imports psycopg whenever it is
    installed (70 ms, half of a short command's run): a command on an SQLite datastore never
    uses it, so it is hidden while peewee loads (for _QUICK_COMMANDS only, which open no other
    datastore)."""
    if "peewee" in sys.modules or not url.startswith("sqlite:") or "psycopg" in sys.modules:
        return
    sys.modules["psycopg"] = None  # type: ignore[assignment]  # `import psycopg` fails
    try:
        import peewee  # noqa: F401
    finally:
        del sys.modules["psycopg"]


def _open(ctx: click.Context) -> Any:
    from buildfarm.datastore import open_datastore

    store = open_datastore(_settings(ctx).db_url)
    ctx.call_on_close(store.close)
    return store


@click.group(cls=BuildfarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="BUILDFARM_DB",
    metavar="URL",
    help="Datastore URL [default: sqlite:///STATE_DIR/buildfarm.db; env: BUILDFARM_DB].",
)
@click.option(
    "--inventory",
    envvar="BUILDFARM_INVENTORY",
    metavar="PATH",
    help="Machine inventory (YAML) [default: ~/.config/buildfarm/inventory.yaml; "
    "env: BUILDFARM_INVENTORY].",
)
@click.option(
    "--hooks-dir",
    envvar="BUILDFARM_HOOKS_DIR",
    metavar="DIR",
    help="Directory of hook scripts [default: ~/.config/buildfarm/hooks.d; "
    "env: BUILDFARM_HOOKS_DIR].",
)
@click.option(
    "--state-dir",
    envvar="BUILDFARM_STATE_DIR",
    metavar="DIR",
    help="Datastore, logs and output store [default: ~/.local/state/buildfarm; "
    "env: BUILDFARM_STATE_DIR].",
)
@click.version_option(__version__, prog_name="buildfarm")
@click.pass_context
def cli(
    ctx: click.Context,
    db: str | None,
    inventory: str | None,
    hooks_dir: str | None,
    state_dir: str | None,
) -> None:
    """Coordinate builds of Guix (and Nix) derivations across machines reached over SSH."""
    if ctx.invoked_subcommand in _QUICK_COMMANDS:
        _load_peewee(db or "sqlite:")  # the default datastore is SQLite
    ctx.obj = Settings.resolve(
        state_dir=state_dir, db_url=db, inventory_path=inventory, hooks_dir=hooks_dir
    )


def _read_paths(paths: Sequence[str]) -> list[str]:
    files: list[str] = []
    for path in paths:
        if path == "-":
            files.extend(line.strip() for line in sys.stdin if line.strip())
        else:
            files.append(path)
    return files


@cli.command()
@click.argument("derivations", nargs=-1, required=True, metavar="DRV...")
@click.option("--uuid", metavar="UUID", help="Use this UUID for the build (one DRV only).")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the build (repeat).")
@click.option(
    "--ignore-if-built",
    is_flag=True,
    help="Print the UUID of an existing queued, running or succeeded build of the same "
    "derivation instead of adding one.",
)
@click.option(
    "--ignore-if-queued",
    is_flag=True,
    help="Print the UUID of an existing queued or running build of the same derivation "
    "instead of adding one.",
)
@click.option("--defer-until", metavar="ISO-8601", help="Do not start before this time.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def submit(
    ctx: click.Context,
    derivations: tuple[str, ...],
    uuid: str | None,
    priority: int,
    tags: tuple[str, ...],
    ignore_if_built: bool,
    ignore_if_queued: bool,
    defer_until: str | None,
    as_json: bool,
) -> None:
    """Queue a build of each DRV and print its UUID ('-' reads paths from stdin)."""
    from buildfarm import submission

    options = submission.SubmitOptions(
        priority=priority,
        tags=tuple(submission.parse_tag(t) for t in tags),
        uuid=submission.parse_uuid(uuid) if uuid is not None else None,
        ignore_if_built=ignore_if_built,
        ignore_if_queued=ignore_if_queued,
        defer_until=submission.parse_time(defer_until) if defer_until is not None else None,
    )
    files = _read_paths(derivations)
    _open(ctx)
    results = submission.submit(files, options)
    if as_json:
        from buildfarm.render import print_json

        print_json(
            [{"uuid": r.uuid, "derivation": r.derivation, "created": r.created} for r in results]
        )
    else:
        sys.stdout.write("".join(f"{r.uuid}\n" for r in results))


@cli.group(cls=BuildfarmGroup)
def builds() -> None:
    """List, inspect, cancel and reprioritise builds."""


@builds.command("list")
@click.option("--state", type=click.Choice(BUILD_STATES), help="Only builds in this state.")
@click.option(
    "--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only builds with this tag."
)
@click.option("--system", metavar="SYSTEM", help="Only builds for this system.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most N."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def builds_list(
    ctx: click.Context,
    state: str | None,
    tags: tuple[str, ...],
    system: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List builds, newest first."""
    from buildfarm.datastore import builds as queries
    from buildfarm.render import print_json, print_table
    from buildfarm.submission import parse_tag

    tag_filters = [parse_tag(t) for t in tags]
    _open(ctx)
    rows = queries.list_builds(state=state, tags=tag_filters, system=system, limit=limit)
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
    from buildfarm.render import print_fields, print_json

    _open(ctx)
    info = queries.show_build(uuid)
    if as_json:
        print_json(info)
        return
    print_fields(
        [
            (k, info[k])
            for k in ("uuid", "state", "reason", "derivation", "system", "priority", "tags")
        ]
        + [("created", info["created_at"]), ("ended", info["ended_at"])]
        + [(f"output {name}", path) for name, path in info["outputs"].items()]
        + [("input", f"{i['derivation']} ({i['state'] or 'no build'})") for i in info["inputs"]]
    )
    for number, attempt in enumerate(info["attempts"], 1):
        result = attempt["result"] or f"running ({attempt['step']})"
        line = f"attempt {number}: {attempt['machine']} {attempt['started_at']} {result}"
        if attempt["setup_failure"]:
            line += f" {attempt['setup_failure']}"
        if attempt["detail"]:
            line += f": {attempt['detail']}"
        print(line)
        for path in attempt["missing_inputs"]:
            print(f"  missing {path}")


@builds.command("cancel")
@click.argument("uuids", nargs=-1, required=True, metavar="UUID...")
@click.pass_context
def builds_cancel(ctx: click.Context, uuids: tuple[str, ...]) -> None:
    """Cancel queued or running builds."""
    from buildfarm.datastore import builds as queries

    _open(ctx)
    for uuid in queries.cancel_builds(uuids):
        click.echo(f"canceled {uuid}")


@builds.command("priority")
@click.argument("uuid")
@click.argument("priority", type=int)
@click.pass_context
def builds_priority(ctx: click.Context, uuid: str, priority: int) -> None:
    """Change the priority of a queued or running build."""
    from buildfarm.datastore import builds as queries

    _open(ctx)
    queries.set_priority(uuid, priority)


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
@click.option("--exit-when-idle", is_flag=True, help="Stop when nothing is queued or running.")
@click.option("--no-ui", is_flag=True, help="One log line per event instead of the live view.")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds running builds get to finish on SIGINT/SIGTERM before they are stopped.",
)
@click.option(
    "--hook-timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds a hook may run before it is killed.",
)
@click.option(
    "--hook-workers",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Hooks running at once.",
)
@click.option(
    "--hook-parallelism",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Hooks of one event running at once.",
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
    "--metrics",
    "metrics_address",
    metavar="ADDRESS:PORT",
    help="Serve Prometheus metrics at http://ADDRESS:PORT/metrics (port 0 picks a free port; "
    "the URL is printed at start).",
)
@click.pass_context
def run(
    ctx: click.Context,
    exit_when_idle: bool,
    no_ui: bool,
    grace: float,
    hook_timeout: float,
    hook_workers: int,
    hook_parallelism: int,
    max_log_size: str,
    metrics_address: str | None,
) -> None:
    """Run the coordinator: allocate queued builds to machines and build them."""
    import asyncio

    from buildfarm.coordinator import Coordinator, LineReporter, Reporter, RunOptions
    from buildfarm.gc import parse_size

    settings = _settings(ctx)
    inventory = _load_inventory(settings)
    options = RunOptions(
        exit_when_idle=exit_when_idle,
        grace=grace,
        hook_timeout=hook_timeout,
        hook_workers=hook_workers,
        hook_parallelism=hook_parallelism,
        max_log_bytes=parse_size(max_log_size),
    )
    metrics = None
    if metrics_address is not None:
        from buildfarm.metrics import Metrics, parse_address

        metrics = Metrics(*parse_address(metrics_address))
    live = None
    reporter: Reporter
    if no_ui or not sys.stdout.isatty():
        reporter = LineReporter()
    else:
        from buildfarm.ui import LiveReporter

        reporter = live = LiveReporter()
    try:
        asyncio.run(Coordinator(settings, inventory, options, reporter, metrics).serve())
    finally:
        if live is not None:
            live.stop()


@cli.command()
@click.argument("uuid")
@click.option("--follow", "-f", is_flag=True, help="Keep printing while the build runs.")
@click.pass_context
def log(ctx: click.Context, uuid: str, follow: bool) -> None:
    """Print the build log of a build's latest attempt."""
    from buildfarm.datastore import builds as queries
    from buildfarm.logs import read_log

    _open(ctx)
    path, running = queries.latest_log(uuid)

    def done() -> bool:
        return not queries.latest_log(uuid)[1]

    out = sys.stdout.buffer
    for chunk in read_log(path, follow=follow and running, done=done):
        out.write(chunk)
        out.flush()


@cli.group(cls=BuildfarmGroup)
def hooks() -> None:
    """The hook scripts in the hooks directory and the events that fire them."""


@hooks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def hooks_list(ctx: click.Context, as_json: bool) -> None:
    """Show which scripts fire on which events, in the order they run."""
    from buildfarm.hooks import EVENTS, scripts
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


def main() -> None:
    cli(prog_name="buildfarm")


@cli.group("db", cls=BuildfarmGroup)
def db_group() -> None:
    """The datastore: its schema version, migrations, and copying one into another."""


@db_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def db_status(ctx: click.Context, as_json: bool) -> None:
    """Show the datastore's URL, engine and schema version (without migrating it)."""
    from buildfarm.datastore import connect, describe, migrations
    from buildfarm.render import print_fields, print_json

    url = _settings(ctx).db_url
    database = connect(url)
    try:
        info = {
            "url": describe(url),
            "engine": migrations.engine_of(database),
            "schema_version": migrations.applied_version(database),
            "latest_version": migrations.LATEST,
        }
    finally:
        database.close()
    if as_json:
        print_json(info)
    else:
        print_fields(list(info.items()))


@db_group.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Apply pending schema migrations (every command also does this when it opens it)."""
    from buildfarm.datastore import connect, migrations, open_datastore

    url = _settings(ctx).db_url
    database = connect(url)
    try:
        before = migrations.applied_version(database)
    finally:
        database.close()
    store = open_datastore(url)
    ctx.call_on_close(store.close)
    after = migrations.applied_version(store.db)
    if after == before:
        click.echo(f"schema version {after}: up to date")
    else:
        click.echo(f"schema version {before} -> {after}")


@db_group.command("migrate-from")
@click.argument("source", metavar="SOURCE-URL")
@click.pass_context
def db_migrate_from(ctx: click.Context, source: str) -> None:
    """Copy the datastore at SOURCE-URL (e.g. sqlite:///old.db) into the empty one --db names.

    Every row keeps its id; row counts and a sample of rows are compared before the copy is
    committed, and nothing is written to the target if anything differs. The source is only
    read: a coordinator may keep running on it, but builds it records after the copy starts
    are not copied.
    """
    from buildfarm.datastore import describe
    from buildfarm.datastore.copy import copy_datastore

    target = _settings(ctx).db_url
    click.echo(f"copying {describe(source)} into {describe(target)}", err=True)
    report = copy_datastore(
        source, target, progress=lambda table, rows: click.echo(f"  {table}: {rows}", err=True)
    )
    compared = sum(t.compared for t in report.tables)
    click.echo(
        f"copied {report.rows} rows in {len(report.tables)} tables at schema version "
        f"{report.source_version}; counts equal, {compared} sampled rows equal; "
        f"target now at schema version {report.target_version}"
    )


# --- signing key, substitute server, output store (issue 5) ----------------------------------


@cli.group(cls=BuildfarmGroup)
def key() -> None:
    """The coordinator's signing key: it signs narinfos and archives pushed to Guix machines."""


@key.command("generate")
@click.option("--name", metavar="NAME", help="Nix key name [default: HOSTNAME-1].")
@click.option(
    "--force", is_flag=True,
    help="Replace an existing key (machines and clients must then authorize the new one).",
)
@click.pass_context
def key_generate(ctx: click.Context, name: str | None, force: bool) -> None:
    """Make an Ed25519 key pair in the state directory (the secret key is mode 0600)."""
    from buildfarm import keys
    from buildfarm.signing import SECRET_KEY_FILE

    state_dir = _settings(ctx).state_dir
    made = keys.generate(state_dir, name=name, force=force)
    click.echo(f"signing key written to {os.path.join(state_dir, SECRET_KEY_FILE)}")
    click.echo(f"Nix public key: {made.nix_public(keys.key_name(state_dir))}")


@key.command("show")
@click.option(
    "--format", "form", type=click.Choice(["guix", "nix"]), default="guix", show_default=True,
    help="guix: the s-expression `guix archive --authorize` reads; "
    "nix: NAME:BASE64 for trusted-public-keys.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the name and both forms.")
@click.pass_context
def key_show(ctx: click.Context, form: str, as_json: bool) -> None:
    """Print the public key for Guix (`| guix archive --authorize`) or Nix."""
    from buildfarm import keys

    state_dir = _settings(ctx).state_dir
    if as_json:
        from buildfarm.render import print_json

        print_json({"name": keys.key_name(state_dir), "guix": keys.public_key(state_dir, "guix"),
                    "nix": keys.public_key(state_dir, "nix").strip()})
        return
    sys.stdout.write(keys.public_key(state_dir, form))


@cli.command()
@click.option(
    "--listen", default="0.0.0.0:8080", show_default=True, metavar="ADDRESS:PORT",
    help="Where to listen (port 0 picks a free port; the URL is printed at start).",
)
@click.pass_context
def publish(ctx: click.Context, listen: str) -> None:
    """Serve the output store as a Guix and Nix substitute server (narinfos, nars, logs)."""
    import asyncio

    from buildfarm import keys
    from buildfarm.outputs import OutputStore, Publisher
    from buildfarm.publish import parse_listen, serve

    host, port = parse_listen(listen)
    settings = _settings(ctx)
    keys.public_key(settings.state_dir, "nix")  # a missing key fails here, with the remedy
    store = OutputStore(settings.outputs_dir, Publisher.load(settings.state_dir))

    def ready(url: str) -> None:
        click.echo(f"buildfarm publish: serving {settings.outputs_dir} at {url}")
        sys.stdout.flush()

    asyncio.run(serve(store, settings.db_url, host, port, ready))


@cli.group(cls=BuildfarmGroup)
def outputs() -> None:
    """The output store: built outputs kept to push to machines and to publish."""


@outputs.command("gc")
@click.option("--older-than", metavar="DURATION", help="Remove outputs unused for this long "
              "(e.g. 12h, 30d, 2w).")
@click.option("--max-size", metavar="SIZE", help="Remove least recently used outputs until "
              "the store fits (e.g. 500M, 20G).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def outputs_gc(
    ctx: click.Context, older_than: str | None, max_size: str | None, dry_run: bool,
    as_json: bool,
) -> None:
    """Remove stored outputs by age and/or total size, keeping inputs of queued or running
    builds and the references of every output kept."""
    from buildfarm import gc
    from buildfarm.outputs import OutputStore

    policy = gc.GcPolicy(
        older_than=gc.parse_duration(older_than) if older_than is not None else None,
        max_size=gc.parse_size(max_size) if max_size is not None else None,
    )
    _open(ctx)
    result = gc.collect(OutputStore(_settings(ctx).outputs_dir), policy, dry_run=dry_run)
    if as_json:
        from dataclasses import asdict

        from buildfarm.render import print_json

        print_json(asdict(result))
        return
    verb = "would remove" if dry_run else "removed"
    for removal in result.removed:
        click.echo(f"{verb} {removal.path} ({gc.format_size(removal.size)}, {removal.reason})")
    for path in result.orphans:
        click.echo(f"{verb} {path} (no record)")
    click.echo(
        f"{verb} {len(result.removed)} output(s) and {len(result.orphans)} stray file(s), "
        f"{gc.format_size(result.freed)}; kept {result.kept} output(s), "
        f"{gc.format_size(result.kept_bytes)} ({result.protected} needed by queued or "
        "running builds)"
    )


# --- machines (issue 6) -------------------------------------------------------------------------


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

    from buildfarm import machines as probing
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
    from buildfarm.machine_test import report_lines, test_all
    from buildfarm.render import print_json, use_colour
    from buildfarm.signing import load_key

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


# --- web front end and event stream (issue 10) ------------------------------------------------


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
