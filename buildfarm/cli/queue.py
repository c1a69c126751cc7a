"""`buildfarm queue`: the queued builds by why they are not running, and by system."""

from __future__ import annotations

import click

from buildfarm.cli.group import _open, cli


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def queue(ctx: click.Context, as_json: bool) -> None:
    """Show the queue by reason and system: how many builds, the oldest, and what holds them.

    Reasons: deferred (submit --defer-until); waiting-for-inputs (builds of their inputs are
    queued or running); backed-off (after attempts that made no progress, or before a retry
    of a failed builder); no-machine (no machine of the inventory serves their system,
    features or machine tags); machines-unavailable (every machine that could is busy, down,
    paused or overloaded: DETAIL names them); no-coordinator (buildfarm run is not running, or
    has not recorded its machines); starts-next (a machine that can take them has a free slot).
    What the machines offer and do is what buildfarm run last recorded. builds show UUID gives
    one build's reason, with the builds or machines it waits for."""
    from buildfarm.datastore import waiting
    from buildfarm.render import print_json, print_table

    _open(ctx)
    groups = waiting.summary()
    if as_json:
        print_json([g.json() for g in groups])
        return
    rows = [{**g.json(), "builds": g.count} for g in groups]
    print_table(rows, ("reason", "system", "builds", "oldest", "detail"))
