"""`buildfarm submit -` of a whole graph of .drv files named on stdin, as a user runs it."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from datastores import engine_of
from graphs import distribution, generate

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


def submit_closure(work: Path, count: int) -> dict[str, float]:
    """Seconds `buildfarm submit --closure -` takes for the tops of the `count` generated
    derivations (those nothing needs): it reads every input .drv beside them, and queues a
    build of each; the CPU seconds it used."""
    files = drv_files(work, count)
    needed = {path for item in distribution(count) for path, _ in item.drv.input_drvs}
    tops = [f for f in files if f"/gnu/store/{os.path.basename(f)}" not in needed]
    state = work / f"state-closure-{count}"
    env = {**os.environ, "BUILDFARM_STATE_DIR": str(state)}
    env.pop("BUILDFARM_DB", None)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "buildfarm", "submit", "--closure", "-"],
                          input="\n".join(tops), env=env, capture_output=True, text=True,
                          check=True)
    seconds = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    inputs = f"{count - len(tops)} build(s) of inputs submitted with it\n"
    if len(done.stdout.split()) != len(tops) or done.stderr != inputs:
        raise RuntimeError(f"submit --closure printed {len(done.stdout.split())} UUIDs for "
                           f"{len(tops)} tops: {done.stderr[-1000:]}")
    return {"seconds": seconds, "cpu": cpu, "tops": len(tops)}
