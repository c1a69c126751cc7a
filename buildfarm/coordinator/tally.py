"""Builds and attempts that ended since the coordinator started, counted apart.

A build ends once (succeeded, failed or canceled); an attempt is one try on one machine, and a
build may take several (setup failures and interruptions send it back to the queue). Builds are
counted from the events recorded as they end: every way a build ends (its attempt's result, an
input's failure, a user's cancel) writes one in the same transaction, so none is missed or
counted twice whichever part of the code ended it. Attempts are counted as the coordinator
sees them end. The live view and the metrics show both.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from buildfarm.datastore.events import ENDINGS
from buildfarm.datastore.models import CANCELED

RATE_WINDOW = 60.0  # seconds: "builds finished in the last minute"


class Tally:
    """The counts; `position` is the last event read (None until the coordinator starts)."""

    def __init__(self) -> None:
        self.builds: collections.Counter[str] = collections.Counter()  # by final state
        self.attempts: collections.Counter[str] = collections.Counter()  # by result
        self.position: int | None = None
        self._finished: collections.deque[float] = collections.deque()  # when, recent ones

    def add_events(self, rows: Iterable[tuple[int, str, float]]) -> None:
        """Events (id, name, created_at) recorded after `position`, oldest first."""
        for event_id, name, created_at in rows:
            self.position = event_id
            state = ENDINGS.get(name)
            if state is None:
                continue
            self.builds[state] += 1
            if state != CANCELED:
                self._finished.append(created_at)
                self._forget_before(created_at - RATE_WINDOW)

    def add_attempt(self, result: str) -> None:
        self.attempts[result] += 1

    def finished_last_minute(self, now: float) -> int:
        """Builds that succeeded or failed in the last RATE_WINDOW seconds: a count, never an
        extrapolation from the first few seconds."""
        self._forget_before(now - RATE_WINDOW)
        return len(self._finished)

    def _forget_before(self, moment: float) -> None:
        while self._finished and self._finished[0] < moment:
            self._finished.popleft()
