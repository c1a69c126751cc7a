"""Command start-up and the commands people run against a big datastore.

Every figure is the wall time of a whole command, as a user waits for it (interpreter start,
imports, opening the datastore, the query, printing), the median of several runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datastores import engine_of, scalar
from figures import median


def command_seconds(args: list[str], env: dict[str, str], runs: int = 7) -> float:
    """Median wall seconds of `buildfarm ARGS` (it must succeed), after one run untimed (it
    may create the datastore)."""
    times = []
    subprocess.run([sys.executable, "-m", "buildfarm", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "buildfarm", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - began)
    return median(times)


def interpreter_seconds(runs: int = 7) -> float:
    """Median wall seconds of the bare interpreter (`python -c pass`): the floor."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - began)
    return median(times)


def env_for(datastore: str | None) -> dict[str, str]:
    """The environment of a command on the datastore at URL `datastore` (None: the default
    datastore of an empty state directory)."""
    env = {**os.environ}
    for name in ("BUILDFARM_DB", "BUILDFARM_INVENTORY", "BUILDFARM_HOOKS_DIR"):
        env.pop(name, None)
    if datastore is not None and engine_of(datastore) == "sqlite":
        env["BUILDFARM_STATE_DIR"] = str(Path(datastore[len("sqlite://") :]).parent)
    else:
        env["BUILDFARM_STATE_DIR"] = tempfile.mkdtemp(prefix="cli-state-")
    if datastore is not None:
        env["BUILDFARM_DB"] = datastore
    return env


def some_build(datastore: str) -> str:
    """The UUID of a build with inputs, from the middle of the datastore at URL `datastore`."""
    count = scalar(datastore, "SELECT MAX(id) FROM build")
    uuid = scalar(
        datastore,
        "SELECT b.uuid FROM build AS b WHERE b.id >= ? AND EXISTS (SELECT 1 FROM "
        "derivation_input AS i WHERE i.derivation_id = b.derivation_id) LIMIT 1",
        count // 2,
    )
    return str(uuid)


def list_and_show(datastore: str) -> dict[str, float]:
    """`builds list --limit 50` and `builds show UUID` on the datastore at URL `datastore`,
    whole commands."""
    env = env_for(datastore)
    uuid = some_build(datastore)
    return {
        "list": command_seconds(["builds", "list", "--limit", "50"], env),
        "list_json": command_seconds(["builds", "list", "--limit", "50", "--json"], env),
        "list_state": command_seconds(["builds", "list", "--limit", "50", "--state", "queued"],
                                       env),
        "show": command_seconds(["builds", "show", uuid], env),
    }
