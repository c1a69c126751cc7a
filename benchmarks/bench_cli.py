"""Command start-up and the commands people run against a big datastore.

Every figure is the wall time of a whole command, as a user waits for it (interpreter start,
imports, opening the datastore, the query, printing), the median of several runs.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def env_for(database: Path | None) -> dict[str, str]:
    env = {**os.environ}
    for name in ("BUILDFARM_DB", "BUILDFARM_INVENTORY", "BUILDFARM_HOOKS_DIR"):
        env.pop(name, None)
    if database is None:
        env["BUILDFARM_STATE_DIR"] = tempfile.mkdtemp(prefix="cli-state-")
    else:
        env["BUILDFARM_STATE_DIR"] = str(database.parent)
        env["BUILDFARM_DB"] = f"sqlite://{database}"
    return env


def some_build(database: Path) -> str:
    """The UUID of a build with inputs, from the middle of the datastore."""
    with sqlite3.connect(database) as db:
        (count,) = db.execute("SELECT MAX(id) FROM build").fetchone()
        row = db.execute(
            "SELECT b.uuid FROM build AS b WHERE b.id >= ? AND EXISTS (SELECT 1 FROM "
            "derivation_input AS i WHERE i.derivation_id = b.derivation_id) LIMIT 1",
            (count // 2,),
        ).fetchone()
    return str(row[0])


def list_and_show(database: Path) -> dict[str, float]:
    """`builds list --limit 50` and `builds show UUID` on `database`, whole commands."""
    env = env_for(database)
    uuid = some_build(database)
    return {
        "list": command_seconds(["builds", "list", "--limit", "50"], env),
        "list_json": command_seconds(["builds", "list", "--limit", "50", "--json"], env),
        "list_failed": command_seconds(["builds", "list", "--limit", "50", "--state", "failed"],
                                       env),
        "show": command_seconds(["builds", "show", uuid], env),
    }
