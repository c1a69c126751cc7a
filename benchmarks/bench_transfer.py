"""Pulling outputs back: SFTP next to `cat` over the same SSH connection, and a 100,000-file
output through the whole export / fetch / verify / store path.

Throughput over loopback is bound by the coordinator's CPU (decrypting, copying), so both the
MB/s and the coordinator's CPU seconds per GB are reported; the rounds alternate the two ways.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from buildfarm.inventory import load
from buildfarm.ssh.remote import Remote

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from testbed import Host, inventory_yaml  # noqa: E402


def remote_for(host: Host, work: Path) -> Remote:
    path = work / f"inventory-{host.name}.yaml"
    machines = yaml.safe_load(inventory_yaml([host], "nix"))
    path.write_text(yaml.safe_dump(machines), encoding="utf-8")
    return Remote(load(str(path)).machine(host.name))


async def _pull_rounds(remote: Remote, size_mb: int, rounds: int, work: Path) -> dict[str, Any]:
    await remote.connect()
    source = await remote.mktemp()
    size = size_mb * 1024 * 1024
    await remote.run(["dd", "if=/dev/urandom", f"of={source}", "bs=1M", f"count={size_mb}"],
                     check=True, timeout=600)
    fetch_rates, cat_rates, fetch_cpu, cat_cpu = [], [], [], []
    try:
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            target = os.path.join(scratch, "pulled")
            for _ in range(rounds):
                if os.path.exists(target):
                    os.unlink(target)
                began, cpu = time.perf_counter(), time.process_time()
                got = await remote.fetch(source, target)
                fetch_rates.append(got / (time.perf_counter() - began) / 1e6)
                fetch_cpu.append((time.process_time() - cpu) / size * 1e9)
                if got != size or os.path.getsize(target) != size:
                    raise RuntimeError(f"fetch got {got} bytes of {size}")
                os.unlink(target)
                with open(target, "wb") as out:
                    began, cpu = time.perf_counter(), time.process_time()
                    result = await remote.run_streaming(
                        ["cat", source], on_stdout=lambda data: _write(out, data))
                    cat_rates.append(size / (time.perf_counter() - began) / 1e6)
                    cat_cpu.append((time.process_time() - cpu) / size * 1e9)
                if not result.ok or os.path.getsize(target) != size:
                    raise RuntimeError(f"cat failed: {result.stderr!r}")
    finally:
        await remote.remove(source)
        await remote.close()
    return {
        "fetch": statistics.median(fetch_rates), "cat": statistics.median(cat_rates),
        "fetch_rounds": fetch_rates, "cat_rounds": cat_rates,
        "fetch_cpu": statistics.median(fetch_cpu), "cat_cpu": statistics.median(cat_cpu),
    }


def sftp_versus_cat(host: Host, work: Path, size_mb: int, rounds: int) -> dict[str, Any]:
    """MB/s of Remote.fetch and of `cat` over one connection, medians of `rounds`."""
    return asyncio.run(_pull_rounds(remote_for(host, work), size_mb, rounds, work))


def many_files_drv(files: int, tag: str) -> str:
    """A derivation whose output is a directory of `files` small files."""
    from testbed import instantiate, nix_expr_trivial

    script = (
        "/bin/mkdir $out && cd $out && "
        f"/usr/bin/seq -f 'file-%g-{tag}' 1 {files} | /usr/bin/xargs /usr/bin/touch && "
        f"/usr/bin/seq 1 {files} > $out/index"
    )
    return instantiate(nix_expr_trivial(f"many-{files}-{tag}", script))


def many_files(host: Host, work: Path, files: int) -> dict[str, float]:
    """A build of a `files`-file output with buildfarm; its export, fetch and verify steps
    against the same output exported and streamed by one `nix-store --export | cat`."""
    import json
    import sqlite3
    import subprocess

    tag = uuid.uuid4().hex[:8]
    drv = many_files_drv(files, tag)
    state = work / f"state-many-{tag}"
    state.mkdir()
    inventory = state / "inventory.yaml"
    inventory.write_text(inventory_yaml([host], "nix", max_builds=1), encoding="utf-8")
    env = {**os.environ, "BUILDFARM_STATE_DIR": str(state), "BUILDFARM_INVENTORY": str(inventory),
           "BUILDFARM_HOOKS_DIR": str(state / "no-hooks")}
    env.pop("BUILDFARM_DB", None)

    def buildfarm(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "buildfarm", *args], env=env,
                              capture_output=True, text=True, check=True)
        return done.stdout

    (build,) = buildfarm("submit", drv).split()
    buildfarm("run", "--no-ui", "--exit-when-idle")
    info = json.loads(buildfarm("builds", "show", build, "--json"))
    if info["state"] != "succeeded":
        raise RuntimeError(f"the {files}-file build ended {info['state']}")
    with sqlite3.connect(state / "buildfarm.db") as db:
        spans = dict(db.execute(
            "SELECT name, ended_at - started_at FROM attempt_step WHERE name IN "
            "('export-outputs', 'fetch-outputs', 'verify-outputs')").fetchall())
    out = info["outputs"]["out"]
    began = time.perf_counter()
    piped = subprocess.run([*host.ssh_argv(), f"nix-store --export {out} | cat"],
                           capture_output=True, check=True)
    peer = time.perf_counter() - began
    with sqlite3.connect(state / "buildfarm.db") as db:
        (file,) = db.execute("SELECT file FROM stored_output WHERE path = ?", (out,)).fetchone()
    nar_size = os.path.getsize(state / "outputs" / file)
    return {"ours": sum(spans.values()), "peer": peer, "bytes": float(len(piped.stdout)),
            "nar": float(nar_size), **spans}


def _write(out: Any, data: bytes) -> None:
    out.write(data)
