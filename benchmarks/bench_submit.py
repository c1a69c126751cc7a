"""`buildfarm submit -` of a whole graph of .drv files named on stdin, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from datastores import engine_of
from graphs import generate

_written: dict[Path, list[str]] = {}  # the .drv files generate() wrote, by directory


def drv_files(work: Path, count: int) -> list[str]:
    """The `count` generated .drv files of this run (written on first use)."""
    directory = work / f"drvs-{count}"
    files = _written.get(directory) or generate(directory, count)
    _written[directory] = files
    return files


def read_seconds(work: Path, count: int) -> float:
    """Seconds the derivation reader takes to read and parse `count` .drv files."""
    from buildfarm.formats import derivation

    files = drv_files(work, count)
    began = time.perf_counter()
    for file in files:
        derivation.read(file)
    return time.perf_counter() - began


def submit_from_stdin(work: Path, count: int, datastore: str | None = None) -> dict[str, float]:
    """Seconds `buildfarm submit -` takes for `count` .drv files (reading, parsing, recording
    derivations, builds and events in one transaction), into the datastore at URL `datastore`
    (None: the default SQLite datastore of a new state directory)."""
    files = drv_files(work, count)
    name = "submit" if datastore is None else f"submit-{engine_of(datastore)}"
    state = work / f"state-{name}-{count}"
    env = {**os.environ, "BUILDFARM_STATE_DIR": str(state)}
    env.pop("BUILDFARM_DB", None)
    if datastore is not None:
        env["BUILDFARM_DB"] = datastore
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "buildfarm", "submit", "-"],
                          input="\n".join(files), env=env, capture_output=True, text=True,
                          check=True)
    seconds = time.perf_counter() - began
    if len(done.stdout.split()) != count:
        raise RuntimeError(f"submit printed {len(done.stdout.split())} UUIDs for {count} files")
    return {"seconds": seconds, "rate": count / seconds}
