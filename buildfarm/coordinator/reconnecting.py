"""The datastore seen from `run`'s datastore thread: a call made again on a new connection
while a PostgreSQL server is away, so a server restart costs a pause, not the run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from buildfarm.errors import DatastoreError

T = TypeVar("T")
# How long run waits for a lost server to come back (retrying each datastore call on a new
# connection) before it gives up; the delays between tries.
DATASTORE_OUTAGE_LIMIT = 600.0
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


class DatastoreLost(DatastoreError):
    """The PostgreSQL server stayed away longer than DATASTORE_OUTAGE_LIMIT."""


def reconnecting(call: Callable[[], T], notify: Callable[[str], None],
                  give_up: Callable[[], bool]) -> T:
    """In the datastore thread: `call`, made again on a new connection while a PostgreSQL
    server is away. A lost connection means the server rolled the transaction back."""
    import peewee as pw

    from buildfarm.datastore import postgresql
    from buildfarm.datastore.models import database_proxy

    began, tries = time.monotonic(), 0
    while True:
        try:
            result = call()
        except (pw.OperationalError, pw.InterfaceError) as e:
            db = database_proxy.obj
            if not postgresql.connection_lost(db, e):
                raise
            postgresql.drop_connection(db)
            message = postgresql.one_line(e)
            if give_up() or time.monotonic() - began > DATASTORE_OUTAGE_LIMIT:
                raise DatastoreLost(f"lost the datastore: {message}") from None
            if not tries:
                notify(f"datastore connection lost ({message}): reconnecting")
            time.sleep(RECONNECT_DELAYS[min(tries, len(RECONNECT_DELAYS) - 1)])
            tries += 1
            continue
        if tries:
            notify("datastore connection back")
        return result
