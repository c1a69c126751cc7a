"""`buildfarm web`: the aiohttp application, its handlers, and serve().

Read-only: it never writes the datastore. Datastore reads run in one thread of their own (peewee
is synchronous), as in the coordinator and `buildfarm publish`; log files are read in worker
threads. Every response carries a Content-Security-Policy that allows no inline script or
style, so even markup that slipped through escaping could not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from buildfarm.datastore.builds import log_state
from buildfarm.errors import BuildfarmError, NotFoundError, UsageError
from buildfarm.inventory import Inventory
from buildfarm.inventory import load as load_inventory

from . import logview, pages, queries
from .api import ENDPOINTS
from .assets import ASSETS, etag
from .conceal import conceal_reach
from .events import KEEPALIVE, RETRY_MS, EventHub, frame
from .listing import Filters, list_builds

logger = logging.getLogger("buildfarm.web")
T = TypeVar("T")
DEFAULT_LISTEN = "127.0.0.1:8081"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def to_json(value: Any) -> str:
    """JSON with <, > and & escaped, so that no reader can mistake it for markup."""
    text = json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(text=to_json(value), status=status, content_type="application/json")


def html_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


class InventoryView:
    """The inventory for systems and slots, read again when its file changes; optional."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._inventory: Inventory | None = None

    def get(self) -> Inventory | None:
        if not self.path:
            return None
        try:
            status = os.stat(self.path)
        except OSError:
            return self._inventory
        stamp = (status.st_mtime, status.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._inventory = load_inventory(self.path)
            except BuildfarmError as e:
                logger.warning("inventory not read, keeping the previous one: %s", e)
        return self._inventory


class WebApp:
    """The pages, the JSON API and the event stream of one datastore."""

    def __init__(self, db_url: str, inventory_path: str | None = None) -> None:
        self._db_url = db_url
        self.inventory = InventoryView(inventory_path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="web-db")
        self._datastore: Any = None
        self.hub = EventHub(self.db)

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def open(self) -> None:
        from buildfarm.datastore import open_datastore

        self._datastore = await self.db(
            functools.partial(open_datastore, self._db_url, create=False)
        )
        await self.hub.start()

    async def close(self) -> None:
        await self.hub.close()
        if self._datastore is not None:
            await self.db(self._datastore.close)
        self.close_executor()

    def close_executor(self) -> None:
        self._executor.shutdown(wait=True)

    def application(self) -> web.Application:
        app = web.Application(middlewares=[_errors])
        app.on_response_prepare.append(_secure)
        routes = {
            "overview": self.api_overview, "builds": self.api_builds, "build": self.api_build,
            "log": self.log, "log_stream": self.log_stream, "machines": self.api_machines,
            "machine": self.api_machine, "events": self.events, "api": self.api_index,
        }
        for endpoint in ENDPOINTS:
            app.router.add_get(endpoint.path, routes[endpoint.name])
        app.router.add_get("/", self.overview)
        app.router.add_get("/builds", self.builds)
        app.router.add_get("/builds/{uuid}", self.build)
        app.router.add_get("/builds/{uuid}/log", self.log)
        app.router.add_get("/builds/{uuid}/log/stream", self.log_stream)
        app.router.add_get("/machines", self.machines)
        app.router.add_get("/machines/{name}", self.machine)
        app.router.add_get("/static/{name}", self.static)
        return app

    # -- data, shared by a page and its API twin

    def _concealed(self, data: T) -> T:
        """What a page or the API shows: machines' errors without how machines are reached."""
        concealed: T = conceal_reach(data, self.inventory.get())
        return concealed

    async def _overview(self) -> dict[str, Any]:
        return self._concealed(await self.db(queries.overview, self.inventory.get()))

    async def _builds(self, request: web.Request) -> dict[str, Any]:
        q = request.query
        filters = Filters.parse(q.get("state"), q.get("system"), q.getall("tag", []),
                                q.get("name"))
        try:
            limit = int(q.get("limit", "50"))
        except ValueError:
            raise UsageError("limit must be a number") from None
        data = await self.db(functools.partial(
            list_builds, filters, after=q.get("after") or None, before=q.get("before") or None,
            limit=limit))
        data["query"] = filters.query()
        return data

    async def _machine(self, request: web.Request) -> dict[str, Any]:
        return self._concealed(await self.db(queries.machine_detail, request.match_info["name"],
                                             self.inventory.get()))

    async def _machines(self) -> list[dict[str, Any]]:
        return self._concealed(await self.db(queries.machines, self.inventory.get()))

    async def _build(self, uuid: str) -> dict[str, Any]:
        return self._concealed(await self.db(queries.build_detail, uuid))

    # -- pages

    async def overview(self, request: web.Request) -> web.StreamResponse:
        return html_response(pages.overview_page(await self._overview()))

    async def builds(self, request: web.Request) -> web.StreamResponse:
        data = await self._builds(request)
        inventory = self.inventory.get()
        systems = set(await self.db(queries.systems))
        if inventory is not None:
            systems.update(s for m in inventory.machines for s in m.systems)
        return html_response(pages.builds_page(data, sorted(systems)))

    async def build(self, request: web.Request) -> web.StreamResponse:
        data = await self._build(request.match_info["uuid"])
        state = await self.db(log_state, data["uuid"])
        log: dict[str, Any] | None = None
        if state.path is not None:
            with contextlib.suppress(OSError):
                log = await asyncio.to_thread(logview.tail, state.path)
                log["running"] = state.running
        return html_response(pages.build_page(data, log, state.why_none()))

    async def machines(self, request: web.Request) -> web.StreamResponse:
        return html_response(pages.machines_page(await self._machines()))

    async def machine(self, request: web.Request) -> web.StreamResponse:
        return html_response(pages.machine_page(await self._machine(request)))

    async def static(self, request: web.Request) -> web.StreamResponse:
        found = ASSETS.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        content_type, text = found
        tag = etag(text)
        headers = {"ETag": tag, "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == tag:
            return web.Response(status=304, headers=headers)
        return web.Response(text=text, content_type=content_type, headers=headers)

    # -- the JSON API

    async def api_overview(self, request: web.Request) -> web.StreamResponse:
        return json_response(await self._overview())

    async def api_builds(self, request: web.Request) -> web.StreamResponse:
        data = await self._builds(request)
        del data["query"]
        return json_response(data)

    async def api_build(self, request: web.Request) -> web.StreamResponse:
        return json_response(await self._build(request.match_info["uuid"]))

    async def api_machines(self, request: web.Request) -> web.StreamResponse:
        return json_response(await self._machines())

    async def api_machine(self, request: web.Request) -> web.StreamResponse:
        return json_response(await self._machine(request))

    async def api_index(self, request: web.Request) -> web.StreamResponse:
        if "text/html" in request.headers.get("Accept", ""):
            return html_response(pages.api_page(ENDPOINTS))
        return json_response([
            {"method": e.method, "path": e.path, "description": e.description,
             "parameters": dict(e.parameters), "content_type": e.content_type}
            for e in ENDPOINTS
        ])

    # -- logs and event streams

    async def _log_file(self, request: web.Request) -> tuple[str, str]:
        """The build's UUID and its newest log, or NotFoundError saying why it has none."""
        state = await self.db(log_state, request.match_info["uuid"])
        if state.path is None:
            raise NotFoundError(state.why_none())
        return state.uuid, state.path

    async def log(self, request: web.Request) -> web.StreamResponse:
        _, path = await self._log_file(request)
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                               "Cache-Control": "no-store"})
        blocks = logview.whole(path)
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the client went away
            while (block := await asyncio.to_thread(next, blocks, None)) is not None:
                await response.write(block)
            await response.write_eof()
        blocks.close()
        return response

    async def log_stream(self, request: web.Request) -> web.StreamResponse:
        uuid, path = await self._log_file(request)
        offset = _position(request, "offset")

        async def running() -> bool:
            """Whether the log is still being written: the attempt that writes it runs."""
            now = await self.db(log_state, uuid)
            return now.running and now.path == path

        response = await _event_stream(request)
        with contextlib.suppress(ConnectionResetError):  # the client went away
            async for end, text in logview.follow(path, offset, running):
                await response.write(
                    f"id: {end}\nevent: chunk\ndata: {json.dumps(text)}\n\n".encode())
            await response.write(b"event: end\ndata: {}\n\n")
        return response

    async def events(self, request: web.Request) -> web.StreamResponse:
        position = _position(request, "last_event_id", default=None)
        if position is None:
            position = self.hub.newest
        response = await _event_stream(request)
        with contextlib.suppress(ConnectionResetError):  # the client went away
            while not self.hub.closed:
                rows = await self.hub.rows_after(position)
                if rows:
                    await response.write(b"".join(frame(row) for row in rows))
                    position = rows[-1][0]
                    continue
                before = self.hub.newest
                await self.hub.wait(KEEPALIVE)
                if self.hub.newest == before and not self.hub.closed:
                    await response.write(b": keepalive\n\n")
        return response


def _position(request: web.Request, parameter: str, default: int | None = 0) -> Any:
    """A stream's resume point: the Last-Event-ID header, else the query parameter."""
    text = request.headers.get("Last-Event-ID") or request.query.get(parameter)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{parameter} must be a number, not {text!r}") from None
    if value < 0:
        raise UsageError(f"{parameter} must not be negative")
    return value


async def _event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",
    })
    await response.prepare(request)
    await response.write(f"retry: {RETRY_MS}\n\n".encode())
    return response


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api") or request.path == "/events"


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A user's mistake gets its message (escaped, like everything); anything else gets a
    generic 500, with the details in the server's log only (they may name the datastore)."""
    try:
        return await handler(request)
    except NotFoundError as e:
        status, message = 404, str(e)
    except UsageError as e:
        status, message = 400, str(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        status, message = e.status, e.reason
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        logger.exception("%s %s", request.method, request.path)
        status, message = 500, "internal error (see the server's log)"
    if _wants_json(request):
        return json_response({"error": message, "status": status}, status)
    return html_response(pages.error_page(status, message), status)


def parse_listen(text: str) -> tuple[str, int]:
    from buildfarm.outputs.publish import parse_listen as parse

    return parse(text)


async def serve(
    db_url: str,
    inventory_path: str | None,
    host: str,
    port: int,
    on_ready: Callable[[str], None],
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (or `stop` is set); `on_ready` gets the URL once listening."""
    from buildfarm.outputs.publish import url_of

    webapp = WebApp(db_url, inventory_path)
    await webapp.open()
    runner = web.AppRunner(webapp.application(), access_log=None, handle_signals=False,
                           shutdown_timeout=2.0)
    await runner.setup()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        bound = runner.addresses[0]
        on_ready(url_of(host, int(bound[1])))
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await webapp.hub.close()  # ends the event streams, so that cleanup does not wait
        await runner.cleanup()
        await webapp.close()
