"""A test double of the `guix` command (see guix.py): Guix's messages, Nix's store underneath.

It shares no code with buildfarm, the program it judges: its .drv reader, nars and export
bundles, keys, ACL and signatures (on libgcrypt, as Guix's own) are its own, read from Guix's
source. tests/test_guix_emulator.py checks that nothing here imports buildfarm.

`install_emulator` puts a `guix` on a test build host's PATH; `copy_sources` copies the emulator
to a place the host's (unprivileged) user can read.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def install_emulator(bin_dir: Path, python: str = sys.executable, root: Path = PACKAGE.parent
                     ) -> Path:
    """Write an executable `bin_dir/guix` that runs `root/guix_emulator/guix.py` with `python`.

    The emulator needs only the standard library and libgcrypt: any Python >= 3.11 the host's
    user may run will do (e.g. /usr/bin/python3 when the virtualenv's interpreter is not
    readable by that user). `root` is the directory holding `guix_emulator/` (by default the
    tests directory; or a `copy_sources` copy).
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "guix"
    program = root / PACKAGE.name / "guix.py"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(python)} {shlex.quote(str(program))} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def copy_sources(target: Path) -> Path:
    """Copy the emulator under `target` (world-readable); return `target`.

    For hosts whose user cannot read the repository (CI may clone it under /root): pass the
    result to `install_emulator(..., root=target)`.
    """
    shutil.copytree(PACKAGE, target / PACKAGE.name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in (target, *target.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target
