"""Build events as server-sent events: the event table, followed by id.

The hooks and this stream read the same rows (written in the transaction of the change they
report), so a dashboard sees exactly what a hook sees, in the same order. One task polls the
table for rows after the newest it has seen and keeps the latest of them in memory; every
client is served from that buffer, or from the datastore by primary key when it asks for older
events (a client that resumes with Last-Event-ID after a long absence). A client therefore gets
every event after the one it names, once, in id order, however often it reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from buildfarm.datastore.events import newest_id

from . import queries

POLL = 0.25  # seconds between looks at the event table
BUFFER = 10_000  # newest events kept in memory
PAGE = 500  # events read from the datastore at a time
KEEPALIVE = 15.0  # seconds between comments on a quiet stream
RETRY_MS = 2000

Row = tuple[int, str, str]
Db = Callable[..., Awaitable[Any]]


def frame(row: Row) -> bytes:
    """One event as the text/event-stream format has it: id, event name, data lines."""
    event_id, name, payload = row
    data = "".join(f"data: {line}\n" for line in payload.splitlines() or [""])
    return f"id: {event_id}\nevent: {name}\n{data}\n".encode()


class EventHub:
    """The newest events, fed by one polling task, shared by every client."""

    def __init__(self, db: Db, poll: float = POLL) -> None:
        self._db = db
        self._poll = poll
        self.newest = 0  # the highest event id read so far
        self._base = 0  # every event with id in (base, newest] is in the buffer
        self._buffer: collections.deque[Row] = collections.deque()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    async def start(self) -> None:
        self.newest = self._base = await self._db(newest_id)
        self._task = asyncio.create_task(self._follow(), name="web-events")

    async def close(self) -> None:
        self.closed = True
        self._wake()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _follow(self) -> None:
        while not self.closed:
            try:
                rows = await self._db(queries.events_after, self.newest, PAGE)
            except Exception:  # a datastore hiccup: try again at the next poll
                rows = []
            if rows:
                self._buffer.extend(rows)
                while len(self._buffer) > BUFFER:
                    self._base = self._buffer.popleft()[0]
                self.newest = rows[-1][0]
                self._wake()
            if len(rows) < PAGE:
                await asyncio.sleep(self._poll)

    def buffered_after(self, position: int) -> list[Row] | None:
        """The events after `position` that are in memory, or None when some before them are
        not (the client must read those from the datastore)."""
        if position < self._base:
            return None
        if position >= self.newest:
            return []
        # Ids grow along the buffer: skip from the end back to the position.
        index = len(self._buffer)
        while index > 0 and self._buffer[index - 1][0] > position:
            index -= 1
        return list(itertools.islice(self._buffer, index, None))

    async def rows_after(self, position: int) -> list[Row]:
        rows = self.buffered_after(position)
        if rows is None:
            rows = await self._db(queries.events_after, position, PAGE)
        return rows

    async def wait(self, timeout: float) -> None:
        """Until new events arrive, the hub closes, or `timeout` seconds pass."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

