"""A test double of the `guix` command (see guix.py): Guix's messages, Nix's store underneath.

`install_emulator` puts a `guix` on a test build host's PATH; `copy_sources` copies what it runs
to a place the host's (unprivileged) user can read.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

EMULATOR = Path(__file__).resolve().with_name("guix.py")
PROJECT = EMULATOR.parents[2]  # the directory holding the buildfarm package
_EMULATOR_IN_PROJECT = EMULATOR.relative_to(PROJECT)  # tests/guix_emulator/guix.py


def install_emulator(
    bin_dir: Path, python: str = sys.executable, project: Path = PROJECT
) -> Path:
    """Write an executable `bin_dir/guix` that runs the emulator with `python`; return it.

    The emulator needs only the standard library and buildfarm, which the wrapper puts on
    PYTHONPATH: any Python >= 3.11 the host's user may run will do (e.g. /usr/bin/python3 when
    the virtualenv's interpreter is not readable by that user). `project` is where the wrapper
    finds `buildfarm/` and `tests/guix_emulator/` (e.g. a `copy_sources` copy).
    """
    emulator = project / _EMULATOR_IN_PROJECT
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "guix"
    wrapper.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(project))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        f'export PYTHONPATH\nexec {shlex.quote(python)} {shlex.quote(str(emulator))} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def copy_sources(target: Path) -> Path:
    """Copy the buildfarm package and the emulator under `target` (world-readable); return it.

    For hosts whose user cannot read the repository (CI may clone it under /root): pass the
    result to `install_emulator(..., project=target)`.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PROJECT / "buildfarm", target / "buildfarm", ignore=ignore)
    shutil.copytree(EMULATOR.parent, target / _EMULATOR_IN_PROJECT.parent, ignore=ignore)
    for path in (target, *target.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target
