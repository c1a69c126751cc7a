"""`buildfarm submit -` of a whole graph of .drv files named on stdin, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from graphs import generate


def submit_from_stdin(work: Path, count: int) -> dict[str, float]:
    """Seconds `buildfarm submit -` takes for `count` .drv files (reading, parsing, recording
    derivations, builds and events in one transaction)."""
    files = generate(work / f"drvs-{count}", count)
    state = work / f"state-submit-{count}"
    env = {**os.environ, "BUILDFARM_STATE_DIR": str(state)}
    env.pop("BUILDFARM_DB", None)
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "buildfarm", "submit", "-"],
                          input="\n".join(files), env=env, capture_output=True, text=True,
                          check=True)
    seconds = time.perf_counter() - began
    if len(done.stdout.split()) != count:
        raise RuntimeError(f"submit printed {len(done.stdout.split())} UUIDs for {count} files")
    return {"seconds": seconds, "rate": count / seconds}
