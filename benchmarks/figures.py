"""What every benchmark reports: figures with their target and a peer measured in the same run.

A figure is one measured number with the unit it is in; its target says which way is good
("<=" or ">="), and its peer is the number it is compared with (the other tool, the floor, or
the naive way), measured in the same run on the same machine, so the ratio means something even
when the machine is busy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Figure:
    """One line of the table. `target` is (comparison, value) or None (reported only); a
    target of kind "peer" compares `value` / `peer` instead of the value itself."""

    name: str
    value: float | None
    unit: str
    target: tuple[str, float] | None = None
    target_of: str = "value"  # "value" or "ratio"
    peer: float | None = None
    peer_name: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.peer is None or self.peer == 0:
            return None
        return self.value / self.peer

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        compared = self.ratio if self.target_of == "ratio" else self.value
        if compared is None:
            return False
        op, limit = self.target
        return compared <= limit if op == "<=" else compared >= limit


@dataclass
class Report:
    """Figures in the order measured, plus what the machine was."""

    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(f"  {_line(figure)}", flush=True)
        return figure

    def to_json(self) -> str:
        return json.dumps(
            {"machine": machine(), "figures": [asdict(f) for f in self.figures],
             "notes": self.notes},
            indent=2,
        )


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit in ("ms", "s", "MB", "MB/s", "x") or abs(value) < 1000:
        text = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    else:
        text = f"{value:,.0f}"
    return f"{text} {unit}".strip()


def _target_text(f: Figure) -> str:
    if f.target is None:
        return "-"
    op, limit = f.target
    if f.target_of == "ratio":
        return f"ratio {op} {limit:g}"
    return f"{op} {number(limit, f.unit)}"


def _line(f: Figure) -> str:
    verdict = {True: "met", False: "MISSED", None: ""}[f.met]
    ratio = f"{f.ratio:.2f}" if f.ratio is not None else "-"
    peer = f"{number(f.peer, f.unit)} ({f.peer_name})" if f.peer is not None else "-"
    return (f"{f.name}: {number(f.value, f.unit)}  target {_target_text(f)}  peer {peer}  "
            f"ratio {ratio}  {verdict}")


def table(figures: Sequence[Figure]) -> str:
    """A Markdown table: figure, value, target, peer, ratio, verdict."""
    rows = [
        "| figure | value | target | peer (same run) | ratio | |",
        "|---|---:|---|---|---:|---|",
    ]
    for f in figures:
        peer = f"{number(f.peer, f.unit)} — {f.peer_name}" if f.peer is not None else "-"
        ratio = f"{f.ratio:.2f}" if f.ratio is not None else "-"
        verdict = {True: "met", False: "**missed**", None: ""}[f.met]
        name = f.name + (f" ({f.note})" if f.note else "")
        rows.append(
            f"| {name} | {number(f.value, f.unit)} | {_target_text(f)} | {peer} | {ratio} "
            f"| {verdict} |"
        )
    return "\n".join(rows)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in 0..1)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """`with stopwatch() as elapsed:` ... `elapsed()` seconds (wall)."""
    began = time.perf_counter()
    ended: list[float] = []
    yield lambda: (ended[0] if ended else time.perf_counter()) - began
    ended.append(time.perf_counter())


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    info = {
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            total_kb = int(meminfo.readline().split()[1])
            info["memory"] = f"{total_kb / 1024 / 1024:.1f} GiB"
        with open("/etc/debian_version", encoding="utf-8") as debian:
            info["debian"] = debian.read().strip()
    except OSError:
        pass
    for program, argv in (("sqlite", None), ("nix", ["nix-store", "--version"]),
                          ("openssh", ["ssh", "-V"])):
        if argv is None:
            import sqlite3

            info[program] = sqlite3.sqlite_version
            continue
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            info[program] = (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            info[program] = "?"
    try:
        load = os.getloadavg()
        info["load at start"] = f"{load[0]:.2f}"
    except OSError:
        pass
    return info
