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
        import peewee

        try:
            return super().invoke(ctx)
        except BuildfarmError as e:
            raise click.ClickException(str(e)) from None
        except peewee.DatabaseError as e:
            raise click.ClickException(f"datastore error: {e}") from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.find_object(Settings)  # type: ignore[assignment]
    return settings


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
@click.pass_context
def run(
    ctx: click.Context,
    exit_when_idle: bool,
    no_ui: bool,
    grace: float,
    hook_timeout: float,
    hook_workers: int,
    hook_parallelism: int,
) -> None:
    """Run the coordinator: allocate queued builds to machines and build them."""
    import asyncio

    from buildfarm.coordinator import Coordinator, LineReporter, Reporter, RunOptions

    settings = _settings(ctx)
    inventory = _load_inventory(settings)
    options = RunOptions(
        exit_when_idle=exit_when_idle,
        grace=grace,
        hook_timeout=hook_timeout,
        hook_workers=hook_workers,
        hook_parallelism=hook_parallelism,
    )
    live = None
    reporter: Reporter
    if no_ui or not sys.stdout.isatty():
        reporter = LineReporter()
    else:
        from buildfarm.ui import LiveReporter

        reporter = live = LiveReporter()
    try:
        asyncio.run(Coordinator(settings, inventory, options, reporter).serve())
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
