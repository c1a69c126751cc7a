"""The live terminal view of `run`: machines, running builds, queue, recent events."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from buildfarm.datastore.models import CANCELED, FAILED, INTERRUPTED, SETUP_FAILURE, SUCCEEDED
from buildfarm.render import one_line, plain

if TYPE_CHECKING:
    from buildfarm.coordinator.service import Coordinator


def _elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h"


class LiveReporter:
    """A rich Live display, redrawn on every loop turn and every event. What machines and
    submitters wrote is shown as text (rich.text.Text, never markup), one line each."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console()
        self.events: deque[str] = deque(maxlen=8)
        self.live = Live(console=self.console, auto_refresh=False, transient=False)
        self.live.start()
        self._last: Coordinator | None = None

    def event(self, line: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {one_line(plain(line))}")
        if self._last is not None:
            self.update(self._last)

    def update(self, coordinator: Coordinator) -> None:
        self._last = coordinator
        self.live.update(self._render(coordinator), refresh=True)

    def stop(self) -> None:
        self.live.stop()

    def _render(self, c: Coordinator) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        machines = Table(title="machines", box=None, header_style="bold", title_justify="left")
        for column in ("name", "state", "slots", "load", "note"):
            machines.add_column(column.upper())
        for slots in c.machines.values():
            if slots.ready:
                state = "[green]up[/]"
            elif slots.connecting is not None:
                state = "[yellow]connecting[/]"
            else:
                state = "[red]down[/]"
            busy = len(slots.running)
            bar = "■" * busy + "□" * max(0, slots.machine.max_builds - busy)
            load = f"{slots.load:.2f}" if slots.load is not None else "-"
            machines.add_row(Text(slots.machine.name), state, bar, load,
                             Text(one_line(plain(slots.last_error or ""))))
        running = Table(title="running", box=None, header_style="bold", title_justify="left")
        for column in ("build", "machine", "step", "elapsed", "derivation"):
            running.add_column(column.upper())
        now = time.time()
        for slots in c.machines.values():
            for run in slots.running.values():
                step = run.step
                if run.transferred:
                    step += f" {run.transferred / 1e6:.1f} MB"
                running.add_row(
                    run.build_uuid[:8], slots.machine.name, step,
                    _elapsed(now - run.started), run.drv_path.rsplit("/", 1)[-1],
                )
        queued = " ".join(f"{system}:{n}" for system, n in sorted(c.queue_depth.items()))
        summary = Text(f"queued {queued or 0}   {summary_line(c, now)}")
        return Group(machines, running, summary, Text("\n".join(self.events), style="dim"))


def summary_line(c: Coordinator, now: float) -> str:
    """Builds that ended and attempts that ended since the start, counted apart: a build may
    take several attempts (setup failures, interruptions), and ends once."""
    tally = c.tally
    builds = f"builds: {tally.builds[SUCCEEDED]} succeeded, {tally.builds[FAILED]} failed"
    if tally.builds[CANCELED]:
        builds += f", {tally.builds[CANCELED]} canceled"
    builds += f"; {tally.finished_last_minute(now)} in the last minute"
    attempts = sum(tally.attempts.values())
    others = [f"{tally.attempts[result]} {words}" for result, words in
              ((SETUP_FAILURE, "setup failures"), (INTERRUPTED, "interrupted"))
              if tally.attempts[result]]
    return f"{builds}   attempts: {attempts}" + (f" ({', '.join(others)})" if others else "")


class LineReporter:
    """One log line per event (no terminal, or --no-ui); if its reader goes away, the
    coordinator goes on without printing."""

    def __init__(self) -> None:
        self.quiet = False

    def event(self, line: str) -> None:
        if self.quiet:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            # Escape sequences a machine's message holds dropped, what is left escaped.
            print(f"{stamp} {one_line(plain(line))}", flush=True)
        except BrokenPipeError:
            self.quiet = True

    def update(self, coordinator: Coordinator) -> None:
        pass
