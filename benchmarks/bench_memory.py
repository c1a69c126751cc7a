"""The coordinator's resident memory with a big queue and 16 machines.

`buildfarm run` on a datastore of N queued builds, with an inventory of 16 machines (4 emulated
hosts, each named by 4 inventory entries, 4 slots each) that accept every system of the graph.
It connects to all 16, drains the N build-submitted events, allocates, and the machines refuse
the synthetic derivations (their outputs are not real Nix output paths): setup failures and
backed-off retries, i.e. steady work. Its peak resident set (VmHWM) after `seconds` is the
figure; the same with a small queue is the peer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from graphs import SYSTEMS

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from testbed import Host, inventory_yaml  # noqa: E402


def _status(pid: int, field: str) -> int:
    """A VmRSS/VmHWM line of /proc/PID/status, in kB."""
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def coordinator_memory(database: Path, hosts: list[Host], seconds: float,
                       machines: int = 16) -> dict[str, float]:
    """Peak and final RSS (MB) of `buildfarm run` on `database` for `seconds`."""
    state = database.parent
    per_host = max(1, machines // len(hosts))
    base = yaml.safe_load(inventory_yaml(hosts, "nix", max_builds=4))["machines"]
    # `per_host` machines per host: distinct names, the same sshd; said to serve the graph's
    # store (/gnu/store), so that builds are allocated to them (and refused by their Nix).
    entries = [
        {**entry, "name": f"{entry['name']}-{n}", "systems": [s for s, _ in SYSTEMS],
         "store_dir": "/gnu/store"}
        for entry in base
        for n in range(per_host)
    ]
    inventory = state / "inventory-memory.yaml"
    inventory.write_text(yaml.safe_dump({"machines": entries}, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "BUILDFARM_STATE_DIR": str(state), "BUILDFARM_DB": f"sqlite://{database}",
           "BUILDFARM_INVENTORY": str(inventory), "BUILDFARM_HOOKS_DIR": str(state / "no-hooks")}
    log = open(state / "memory-run.log", "w", encoding="utf-8")  # noqa: SIM115
    process = subprocess.Popen([sys.executable, "-m", "buildfarm", "run", "--no-ui"], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + seconds
        samples = []
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            samples.append(_status(process.pid, "VmRSS"))
        if process.poll() is not None:
            raise RuntimeError(f"buildfarm run exited {process.returncode}: see {log.name}")
        peak = _status(process.pid, "VmHWM")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
    with open(log.name, encoding="utf-8") as lines:
        connected = sum(1 for line in lines if " connected" in line)
    return {"peak": peak / 1024, "last": samples[-1] / 1024 if samples else 0.0,
            "connected": connected}
