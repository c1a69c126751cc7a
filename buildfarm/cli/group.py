"""The `buildfarm` group and what its commands share: global options resolved into Settings,
one-line errors, the datastore they open."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from buildfarm import __version__
from buildfarm.config import Settings
from buildfarm.errors import BuildfarmError
from buildfarm.render import one_line

BUILD_STATES = ("queued", "running", "succeeded", "failed", "canceled")


# The exit status of a command whose reader went away (`buildfarm builds list | head`): that
# of a program SIGPIPE ended, as most commands that print end then.
CLOSED_PIPE_STATUS = 128 + 13


class BuildfarmGroup(click.Group):
    """Turns every error a user can cause into one line on stderr and exit status 1, and a
    reader that stops reading into a quiet exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a reader gone shows here, not in the interpreter's last flush
            return result
        except BrokenPipeError:
            _discard_stdout()
            ctx.exit(CLOSED_PIPE_STATUS)
        except BuildfarmError as e:
            raise click.ClickException(one_line(str(e))) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(one_line(f"{where}{e.strerror or e}")) from None
        except Exception as e:
            # peewee is imported only by commands that open a datastore.
            peewee = sys.modules.get("peewee")
            if peewee is None or not isinstance(e, peewee.DatabaseError):
                raise
            from buildfarm.datastore.postgresql import scrub

            raise click.ClickException(one_line(scrub(f"datastore error: {e}"))) from None


def _discard_stdout() -> None:
    """What is left to print goes nowhere: the reader has gone."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's captured output)
        pass


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


def _open(ctx: click.Context, *, create: bool = False) -> Any:
    """The datastore of --db, open until the command ends. Only the commands that record what
    a user gives (submit) `create` it: the others fail on one that does not exist."""
    from buildfarm.datastore import open_datastore

    store = open_datastore(_settings(ctx).db_url, create=create)
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
