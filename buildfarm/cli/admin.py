"""Administration: the datastore (db), the signing key (key), the output store (outputs)."""

from __future__ import annotations

import os
import sys

import click

from buildfarm.cli.group import BuildfarmGroup, _open, _settings, cli


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
    database = connect(url, create=False)
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
    from buildfarm.formats import keys
    from buildfarm.formats.signing import SECRET_KEY_FILE

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
    from buildfarm.formats import keys

    state_dir = _settings(ctx).state_dir
    if as_json:
        from buildfarm.render import print_json

        guix = keys.public_key(state_dir, "guix")  # first: without a key, key_name writes nothing
        print_json({"name": keys.key_name(state_dir), "guix": guix,
                    "nix": keys.public_key(state_dir, "nix").strip()})
        return
    sys.stdout.write(keys.public_key(state_dir, form))


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
    from buildfarm.outputs import gc
    from buildfarm.outputs.store import OutputStore

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
