"""The command line: parse, call the core, render. No logic of its own lives here.

The commands live in builds.py (submit, builds, log), farm.py (run, hooks, machines, publish,
web) and admin.py (db, key, outputs); group.py holds the group and what they share.
"""

from __future__ import annotations

from buildfarm.cli import admin, builds, farm, queue  # noqa: F401  (each registers its commands)
from buildfarm.cli.group import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="buildfarm")
