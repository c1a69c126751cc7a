"""Inputs from substitute servers: what the coordinator pushes with and without them.

One farm, one run: LEAVES leaves (each a MB-sized output of random bytes) are built on a first
host and kept in the output store, which `buildfarm publish` serves. Then TOPS derivations,
each reading every leaf, are built twice, each time on a fresh, empty host: once without
`substitute_urls` (every input pushed by the coordinator), once with the farm's publish address
(the machine downloads the inputs). The bytes pushed are the coordinator's own count
(`buildfarm_pushed_bytes_total` of `run --metrics`, by kind: derivations, sources, inputs), read
once every build has ended, before the coordinator stops.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from figures import Figure, Report

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from testbed import Host, Testbed, instantiate_all, inventory_yaml, nix_expr_trivial  # noqa: E402

RUN_TIMEOUT = 900.0
_PUSHED = re.compile(r'^buildfarm_pushed_bytes_total\{kind="([^"]+)",machine="[^"]+"\} (\S+)$',
                     re.M)


class Farm:
    def __init__(self, state: Path) -> None:
        self.state = state
        state.mkdir(parents=True)
        self.inventory = state / "inventory.yaml"
        self.env = {**os.environ, "BUILDFARM_STATE_DIR": str(state),
                    "BUILDFARM_INVENTORY": str(self.inventory),
                    "BUILDFARM_HOOKS_DIR": str(state / "no-hooks")}
        self.env.pop("BUILDFARM_DB", None)

    def cli(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "buildfarm", *args], env=self.env,
                              capture_output=True, text=True, check=True).stdout

    def machines(self, hosts: Mapping[Host, Mapping[str, Any]]) -> None:
        import yaml

        entries: list[Any] = []
        for host, fields in hosts.items():
            entries += yaml.safe_load(inventory_yaml([host], "nix", max_builds=2,
                                                     **fields))["machines"]
        self.inventory.write_text(yaml.safe_dump({"machines": entries}, sort_keys=False))

    def build(self, drvs: list[str]) -> dict[str, float]:
        """Submit and run `drvs` to their end; the bytes pushed, by kind, and the wall time."""
        builds = self.cli("submit", *drvs).split()
        port = _free_port()
        began = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "buildfarm", "run", "--no-ui", "--metrics",
             f"127.0.0.1:{port}"], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while True:
                rows = json.loads(self.cli("builds", "list", "--json", "--limit", "10000"))
                mine = [r for r in rows if r["uuid"] in builds]
                if all(r["state"] in ("succeeded", "failed") for r in mine):
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"run ended or hung: {process.poll()}")
                time.sleep(0.5)
            wall = time.perf_counter() - began
            if {r["state"] for r in mine} != {"succeeded"}:
                raise RuntimeError(f"builds ended {[r['state'] for r in mine]}")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
                text = reply.read().decode()
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=120)
        pushed: dict[str, float] = {"wall": wall}
        for kind, value in _PUSHED.findall(text):
            pushed[kind] = pushed.get(kind, 0.0) + float(value)
        return pushed

    @contextmanager
    def publishing(self) -> Iterator[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "buildfarm", "publish", "--listen", "127.0.0.1:0"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert process.stdout is not None
            yield process.stdout.readline().rsplit(" at ", 1)[1].strip().rstrip("/")
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def graph(tag: str, leaves: int, tops: int, megabytes: int) -> tuple[list[str], list[str]]:
    """`leaves` derivations of `megabytes` MB of random bytes each, and `tops` that read them
    all (in the coordinator's private store)."""
    leaf_exprs = [nix_expr_trivial(
        f"input-{tag}-{n}", f"/usr/bin/head -c {megabytes * 1_000_000} /dev/urandom > $out")
        for n in range(leaves)]
    attrs = {f"in{n}": expr for n, expr in enumerate(leaf_exprs)}
    reads = " ".join(f"$in{n}" for n in range(leaves))
    top_exprs = [nix_expr_trivial(f"top-{tag}-{n}",
                                  f"/bin/cat {reads} | /usr/bin/sha256sum > $out", attrs=attrs)
                 for n in range(tops)]
    leaf_drvs = instantiate_all("[ " + " ".join(f"({e})" for e in leaf_exprs) + " ]")
    top_drvs = instantiate_all("[ " + " ".join(f"({e})" for e in top_exprs) + " ]")
    return leaf_drvs, top_drvs


def inputs_from_servers(report: Report, work: Path, *, leaves: int = 20, tops: int = 4,
                        megabytes: int = 2) -> dict[str, dict[str, float]]:
    """The two runs described above; adds the figures to `report`."""
    farm = Farm(work / f"substitutes-{uuid.uuid4().hex[:8]}")
    with Testbed(work) as bed:
        first, without, with_urls = bed.add_hosts(3)
        tag = uuid.uuid4().hex[:8]
        leaf_drvs, top_drvs = graph(tag, leaves, tops, megabytes)
        farm.machines({first: {}})
        farm.build(leaf_drvs)
        results = {}
        with farm.publishing() as url:
            for name, host, fields in (("without", without, {}),
                                       ("with", with_urls, {"substitute_urls": [url]})):
                farm.machines({host: fields})
                results[name] = farm.build(top_drvs)  # the same tops: a new build of each
    shape = f"{tops} builds reading {leaves} inputs of {megabytes} MB, on an empty machine"
    ours, peer = results["with"], results["without"]
    report.add(Figure(
        f"bytes the coordinator pushes, inputs from the farm's server ({shape})",
        ours.get("inputs", 0.0) / 1e6, "MB", target=("<=", 0.05), target_of="ratio",
        peer=peer.get("inputs", 0.0) / 1e6, peer_name="without substitute_urls (all pushed)",
        note=f"all kinds: {sum(v for k, v in ours.items() if k != 'wall') / 1e6:.2f} MB vs "
             f"{sum(v for k, v in peer.items() if k != 'wall') / 1e6:.2f} MB; wall "
             f"{ours['wall']:.1f} s vs {peer['wall']:.1f} s",
    ))
    return results
