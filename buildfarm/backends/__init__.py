"""Store backends: the commands the coordinator runs on a machine, and how to read their answers.

A backend builds argv tuples and parses output; it never runs anything. The coordinator runs each
`Command` through its SSH layer (`buildfarm.ssh.remote`) and hands the bytes back to the parser.
Guix's daemon is a fork of Nix's, so both backends share what base.py reads (plans, build
failures); guix.py and nix.py supply only what differs (argv, plan headers, exit statuses).
"""

from __future__ import annotations

from buildfarm.backends.base import Backend, Command, DryRun, FailureKind, builder_exit_code

__all__ = ["Backend", "Command", "DryRun", "FailureKind", "builder_exit_code", "get_backend"]


def get_backend(name: str) -> Backend:
    """The backend for an inventory `store:` value ("guix" or "nix")."""
    if name == "guix":
        from buildfarm.backends.guix import GuixBackend

        return GuixBackend()
    if name == "nix":
        from buildfarm.backends.nix import NixBackend

        return NixBackend()
    raise ValueError(f"unknown store backend {name!r} (expected 'guix' or 'nix')")
