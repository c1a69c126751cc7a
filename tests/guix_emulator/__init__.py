"""A test double of the `guix` command (see guix.py): Guix's messages, Nix's store underneath.

`install_emulator` puts a `guix` on a test build host's PATH.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

EMULATOR = Path(__file__).resolve().with_name("guix.py")
PROJECT = EMULATOR.parents[2]  # the directory holding the buildfarm package


def install_emulator(bin_dir: Path, python: str = sys.executable) -> Path:
    """Write an executable `bin_dir/guix` that runs the emulator with `python`; return it.

    The emulator needs only the standard library and buildfarm, which the wrapper puts on
    PYTHONPATH: any Python >= 3.11 the host's user may run will do (e.g. /usr/bin/python3 when
    the virtualenv's interpreter is not readable by that user).
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "guix"
    wrapper.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(PROJECT))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        f'export PYTHONPATH\nexec {shlex.quote(python)} {shlex.quote(str(EMULATOR))} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper
