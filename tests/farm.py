"""A coordinator's state directory and inventory, driven through the real command line.

Shared by the tests that run `buildfarm run` on the test bed (test_run.py, test_hooks_flow.py,
the fault suite test_faults*.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import Host, instantiate, inventory_yaml, nix_expr_trivial

RUN_TIMEOUT = 180


@dataclass(frozen=True)
class EventRow:
    """One row of the datastore's event table."""

    id: int
    name: str
    payload: dict[str, Any]
    delivered: bool


@dataclass(frozen=True)
class AttemptRow:
    """One row of the datastore's attempt table."""

    id: int
    machine: str
    result: str | None
    step: str
    detail: str | None


class Farm:
    """`buildfarm` commands on one state directory, inventory and hooks directory."""

    def __init__(self, state: Path, inventory: Path, hooks_dir: Path | None = None) -> None:
        self.state = state
        self.inventory = inventory
        self.env = {
            **os.environ,
            "BUILDFARM_STATE_DIR": str(state),
            "BUILDFARM_INVENTORY": str(inventory),
            "BUILDFARM_HOOKS_DIR": str(hooks_dir or state / "no-hooks"),
        }
        self.env.pop("BUILDFARM_DB", None)
        self.env.pop("BUILDFARM_TRACE_HOOKS", None)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "buildfarm", *args],
            env=self.env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )
        if check:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def submit(self, *drvs: str, extra: tuple[str, ...] = ()) -> list[str]:
        return self.cli("submit", *drvs, *extra).stdout.split()

    def show(self, uuid: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self.cli("builds", "show", uuid, "--json").stdout)
        return info

    def builds(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(
            self.cli("builds", "list", "--json", "--limit", "1000").stdout
        )
        return rows

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("run", "--no-ui", "--exit-when-idle", *args, check=False)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "buildfarm", "run", "--no-ui", *args],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def write_inventory(self, hosts: list[Host], **overrides: Any) -> None:
        self.inventory.write_text(inventory_yaml(hosts, "nix", **overrides))

    def background(self, *args: str) -> Background:
        """`buildfarm run --no-ui ARGS` left running; its output is collected as it comes."""
        return Background(self.start(*args))

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Rows of a query on the SQLite datastore (read directly: the coordinator may run)."""
        with sqlite3.connect(self.state / "buildfarm.db", timeout=60) as db:
            return db.execute(sql, params).fetchall()

    def stored_nar(self, store_path: str) -> Path:
        """The nar of a stored output, where its record says (read directly)."""
        (file,) = self.rows("SELECT file FROM stored_output WHERE path = ?", store_path)
        return self.state / "outputs" / file[0]

    def attempts(self, build: str) -> list[AttemptRow]:
        """The attempts of a build, oldest first (read directly)."""
        found = self.rows(
            "SELECT a.id, a.machine, a.result, a.step, a.detail FROM attempt a"
            " JOIN build b ON b.id = a.build_id WHERE b.uuid = ? ORDER BY a.id",
            build,
        )
        return [AttemptRow(*row) for row in found]

    def steps(self, attempt_id: int) -> list[str]:
        """The names of an attempt's steps, in order."""
        found = self.rows(
            "SELECT name FROM attempt_step WHERE attempt_id = ? ORDER BY id", attempt_id
        )
        return [name for (name,) in found]

    def state_of(self, build: str) -> str:
        ((found,),) = self.rows("SELECT state FROM build WHERE uuid = ?", build)
        return str(found)

    def wait_for_state(self, build: str, wanted: str, timeout: float = 120.0) -> None:
        wait_for(f"build {build} {wanted}", lambda: self.state_of(build) == wanted, timeout)

    def events(self) -> list[EventRow]:
        """The datastore's events, oldest first (read directly: the coordinator may run)."""
        with sqlite3.connect(self.state / "buildfarm.db", timeout=60) as db:
            rows = db.execute(
                "SELECT id, name, payload, delivered_at FROM event ORDER BY id"
            ).fetchall()
        return [EventRow(i, n, json.loads(p), d is not None) for i, n, p, d in rows]


class Background:
    """A coordinator running in the background, its output lines collected by a thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self._lines.append(line)

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def count(self, fragment: str) -> int:
        """How many lines so far contain `fragment`."""
        with self._lock:
            return sum(fragment in line for line in self._lines)

    def wait_line(self, fragment: str, count: int = 1, timeout: float = 120.0) -> None:
        """Wait until `count` lines contain `fragment` (fails the test if it exits first)."""

        def seen() -> bool:
            if self.count(fragment) >= count:
                return True
            assert self.process.poll() is None, f"run exited:\n{self.output}"
            return False

        wait_for(f"{count} line(s) with {fragment!r} in:\n{self.output}", seen, timeout)

    def stop(self, timeout: float = 60.0) -> str:
        """SIGTERM, wait at most `timeout` seconds for the exit, and return the whole output."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"run did not stop within {timeout:g}s:\n{self.output}") from None
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.output


@contextlib.contextmanager
def running(farm: Farm, *args: str) -> Iterator[Background]:
    """`buildfarm run ARGS` in the background for the `with` block; then SIGTERM, and it
    must exit 0 without a traceback."""
    run = farm.background(*args)
    try:
        yield run
    finally:
        out = run.stop()
        assert run.process.returncode == 0, out
        assert "Traceback" not in out, out


@contextlib.contextmanager
def publishing(farm: Farm) -> Iterator[str]:
    """`buildfarm publish` of the farm's output store on a free port of 127.0.0.1, for the
    `with` block; yields its URL (no final /)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "buildfarm", "publish", "--listen", "127.0.0.1:0"],
        env=farm.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "buildfarm publish: serving DIR at URL"
        assert " at http://127.0.0.1:" in line, (line, process.poll())
        yield line.rsplit(" at ", 1)[1].strip().rstrip("/")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert "Traceback" not in err, err


def check_stored(farm: Farm, build: str, host: Host) -> None:
    """The build's output is in the output store whole, with the nar hash the machine that
    built it reports, and no transfer is left behind in the store's tmp/."""
    from buildfarm.formats import nar

    out = farm.show(build)["outputs"]["out"]
    ((nar_hash, file),) = farm.rows("SELECT nar_hash, file FROM stored_output WHERE path = ?", out)
    data = (farm.state / "outputs" / file).read_bytes()
    assert "sha256:" + nar.nix_base32_encode(hashlib.sha256(data).digest()) == nar_hash
    assert nar_hash == host.run(f"nix-store --query --hash {out}").stdout.decode().strip()
    assert list((farm.state / "outputs" / "tmp").iterdir()) == []


def wait_for(
    what: str, check: Callable[[], bool], timeout: float = 120.0, interval: float = 0.2
) -> None:
    """Poll `check` until it holds; fail the test with `what` if it does not in time."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(interval)


def gated_build(tag: str, gate: Path) -> str:
    """A build that runs until the file `gate` exists (put it where the test bed's hosts can
    see it: in the test bed's directory). Its builder's command line holds "run TAG"."""
    script = f"echo run {tag}; while [ ! -e {gate} ]; do /bin/sleep 0.1; done; echo {tag} > $out"
    return instantiate(nix_expr_trivial(f"gated-{tag}", script))


def token() -> str:
    return uuidlib.uuid4().hex[:12]


def chain(levels: int, tag: str, leaf_script: str | None = None) -> list[str]:
    """A dependency chain: level 0 is the leaf; each level reads the one below."""
    expr = nix_expr_trivial(f"leaf-{tag}", leaf_script or f"echo leaf-{tag} > $out")
    drvs = [instantiate(expr)]
    for level in range(1, levels):
        expr = nix_expr_trivial(
            f"level{level}-{tag}",
            f"read x < $dep; echo \"level{level} on $x\" > $out",
            attrs={"dep": expr},
        )
        drvs.append(instantiate(expr))
    return drvs
