"""`buildfarm publish`: the output store served over HTTP as a Guix/Nix substitute server.

The output store is already laid out the way `guix publish` answers (store.py), so this is a
static file server (aiohttp: sendfile, HEAD, single-range requests) with three additions:
narinfos and logs get the content types Guix and Nix expect; a narinfo or log that was never
published (an output stored before publishing existed, or by a coordinator without a key) is
published on first request from the datastore's record; anything else is a plain 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from buildfarm.errors import ArchiveError, NoDatastoreError, UsageError
from buildfarm.formats import narinfo as ni
from buildfarm.formats.compression import TYPES
from buildfarm.outputs.store import CACHE_INFO, OutputStore

T = TypeVar("T")
logger = logging.getLogger("buildfarm.publish")
DEFAULT_LISTEN = "0.0.0.0:8080"  # guix publish's default
# How long a client may remember that a narinfo is missing (`guix publish --negative-ttl`):
# without it, Guix keeps a 404 for its %narinfo-negative-ttl (10 minutes, guix/substitutes.scm),
# though the output may be published as soon as its build ends.
DEFAULT_NEGATIVE_TTL = 60
NAR_CONTENT_TYPE = "application/x-nix-archive"
LOG_HEADERS = {"Content-Type": "text/plain; charset=utf-8", "Content-Encoding": "gzip"}
DEFAULT_STORE_DIR = "/gnu/store"  # nix-cache-info's StoreDir before anything is stored
KNOWN_STORE_DIRS = ("/gnu/store", "/nix/store")


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR:PORT`, `[IPV6]:PORT` or `:PORT` (every address); port 0 picks a free one."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {text!r}: expected ADDRESS:PORT, e.g. 127.0.0.1:8080")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"--listen {text!r}: {host!r} is not an IP address") from None
    return host, int(port)


def inside(root: str, *parts: str) -> str:
    """ROOT/PARTS... when it is a regular file reached through no symbolic link; else
    FileNotFoundError (answered 404). The output store never makes a link, so a link in it was
    put there by someone else, and may lead anywhere: to the signing key, to /etc."""
    path = root
    for part in parts:
        path = os.path.join(path, part)
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise FileNotFoundError(errno.ENOENT, "a symbolic link in the output store", path)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise FileNotFoundError(errno.ENOENT, "not a regular file", path)
    return path


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


@dataclass(frozen=True, slots=True)
class Found:
    """A stored output's record, as publishing on request needs it."""

    path: str
    nar_hash: str
    nar_size: int
    references: tuple[str, ...]
    deriver: str
    file: str  # its nar, relative to the output store
    system: str | None
    log_file: str | None


def found(path: str) -> Found | None:
    """The record of stored output `path` (by the unique index), with its build's system and
    log."""
    from buildfarm.datastore.models import Derivation, StoredOutput

    row = StoredOutput.get_or_none(StoredOutput.path == path)
    if row is None:
        return None
    drv = Derivation.get_or_none(Derivation.path == row.deriver) if row.deriver else None
    return Found(row.path, row.nar_hash, row.nar_size, tuple(row.refs.split()), row.deriver,
                 row.file, drv.system if drv is not None else None, finished_log(row.deriver))


class PathIndex:
    """Hash part -> stored output path, grown from the records added since the last look.

    Clients ask for many narinfos a cache lacks; each miss costs one primary-key range query
    for new records, never a scan, on either engine."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}
        self.store_dirs: set[str] = set()
        self._last_id = 0

    def refresh(self) -> None:
        from buildfarm.datastore.models import StoredOutput

        query = (StoredOutput.select(StoredOutput.id, StoredOutput.path)
                 .where(StoredOutput.id > self._last_id).order_by(StoredOutput.id))
        for row in query:
            self._last_id = max(self._last_id, row.id)
            with contextlib.suppress(ArchiveError):
                self.paths[ni.hash_part(row.path)] = row.path
                self.store_dirs.add(row.path.rsplit("/", 1)[0])

    def lookup(self, hash_part: str) -> str | None:
        if hash_part not in self.paths:
            self.refresh()
        return self.paths.get(hash_part)


def finished_log(drv_path: str) -> str | None:
    """The log of the newest attempt of a build of `drv_path` that succeeded or failed (a
    failed build's log is published too), if it still exists."""
    from buildfarm.datastore.models import FAILURE, SUCCESS, Attempt, Build, Derivation

    if not drv_path:
        return None
    row = (
        Attempt.select(Attempt.log_path)
        .join(Build)
        .join(Derivation)
        .where((Derivation.path == drv_path) & Attempt.result.in_([SUCCESS, FAILURE])
               & Attempt.log_path.is_null(False))
        .order_by(Attempt.id.desc())
        .first()
    )
    if row is None or not os.path.exists(row.log_path):
        return None
    return str(row.log_path)


class Publication:
    """The HTTP side; datastore work runs in one thread of its own, as in the coordinator."""

    def __init__(self, store: OutputStore, db_url: str | None,
                 negative_ttl: int = DEFAULT_NEGATIVE_TTL) -> None:
        self.store = store
        self.db_url = db_url
        self.negative_ttl = negative_ttl
        self.index = PathIndex()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish-db")
        self._datastore: Any = None

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def open(self) -> None:
        if self.db_url is not None:
            from buildfarm.datastore import open_datastore

            try:
                self._datastore = await self._in_thread(
                    functools.partial(open_datastore, self.db_url, create=False)
                )
            except NoDatastoreError as e:
                # Nothing was ever stored, so nothing waits to be published on request: what
                # `run` stores from now on it publishes itself.
                logger.warning("%s; serving the output store's files only", e)
                self.db_url = None
                return
            await self._in_thread(self.index.refresh)

    async def close(self) -> None:
        if self._datastore is not None:
            await self._in_thread(self._datastore.close)  # that thread's connection
        self._executor.shutdown(wait=True)

    def application(self) -> web.Application:
        app = web.Application(middlewares=[_missing_is_404])
        app.on_response_prepare.append(_no_sniffing)
        app.router.add_get("/nix-cache-info", self.cache_info)
        app.router.add_get("/signing-key.pub", self.signing_key)
        app.router.add_get(f"/{{hash:[{ni.NIX32}]{{32}}}}.narinfo", self.narinfo)
        app.router.add_get("/nar/{name}", self.nar)
        app.router.add_get(f"/nar/{{kind:{'|'.join(TYPES)}}}/{{name}}", self.nar)
        app.router.add_get("/log/{name}", self.log)
        return app

    # -- handlers

    async def cache_info(self, request: web.Request) -> web.StreamResponse:
        path = os.path.join(self.store.root, CACHE_INFO)
        if not os.path.lexists(path) and not await self._in_thread(self._write_cache_info):
            # Nothing stored yet: what guix publish answers.
            return web.Response(text=ni.nix_cache_info(DEFAULT_STORE_DIR),
                                content_type="text/plain")
        return web.FileResponse(inside(self.store.root, CACHE_INFO),
                                headers={"Content-Type": "text/plain"})

    async def signing_key(self, request: web.Request) -> web.StreamResponse:
        if self.store.publisher is None:
            raise web.HTTPNotFound()
        return web.Response(text=self.store.publisher.key.guix_public_sexp(),
                            content_type="text/plain")

    async def narinfo(self, request: web.Request) -> web.StreamResponse:
        hash_part = request.match_info["hash"]
        name = f"{hash_part}.narinfo"
        if (not os.path.lexists(os.path.join(self.store.root, name))
                and not await self._in_thread(self._publish, hash_part)):
            raise web.HTTPNotFound(text=f"no narinfo for {hash_part}",
                                   headers={"Cache-Control": f"max-age={self.negative_ttl}"})
        return web.FileResponse(inside(self.store.root, name),
                                headers={"Content-Type": ni.CONTENT_TYPE})

    async def nar(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        kind = request.match_info.get("kind")
        if not ni.BASENAME.fullmatch(name):
            raise web.HTTPNotFound()
        path = inside(self.store.root, "nar", *([kind] if kind else []), name)
        return web.FileResponse(path, headers={"Content-Type": NAR_CONTENT_TYPE})

    async def log(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not ni.BASENAME.fullmatch(name):
            raise web.HTTPNotFound()
        if not os.path.lexists(os.path.join(self.store.log_dir, name)):
            published = await self._in_thread(self._publish_log, name)
            if published is None:
                raise web.HTTPNotFound(text=f"no log for {name}")
            name = os.path.basename(published)
        return web.FileResponse(inside(self.store.root, "log", name), headers=LOG_HEADERS)

    # -- publishing on first request (datastore thread)

    def _write_cache_info(self) -> bool:
        """nix-cache-info with the store directory of the stored outputs, if there are any."""
        if self.db_url is None:
            return False
        self.index.refresh()
        if not self.index.store_dirs:
            return False
        self.store.ensure_cache_info(min(self.index.store_dirs))
        return True

    def _publish(self, hash_part: str) -> bool:
        if self.db_url is None or self.store.publisher is None:
            return False
        path = self.index.lookup(hash_part)
        record = found(path) if path is not None else None
        if record is None:
            return False
        try:
            self.store.publish(record.path, record.nar_hash, record.nar_size, record.references,
                               record.deriver, file=record.file, system=record.system,
                               log_file=record.log_file)
        except (ArchiveError, FileNotFoundError):
            return False  # its nar is gone (being collected): not published
        return True

    def _publish_log(self, name: str) -> str | None:
        """log/<drv basename> for a derivation or for one of its outputs."""
        drv: str | None = None
        if name.endswith(".drv"):
            if self.db_url is not None:
                self.index.refresh()
                # A failed derivation may be of a store no stored output is in.
                dirs = sorted(self.index.store_dirs | set(KNOWN_STORE_DIRS))
                drv = next((f"{d}/{name}" for d in dirs
                            if finished_log(f"{d}/{name}") is not None), None)
        else:
            output = f"{DEFAULT_STORE_DIR}/{name}"  # only the hash part names the narinfo
            info = self.store.read_narinfo(output)
            if info is None and self._publish(name[:32]):
                info = self.store.read_narinfo(output)
            drv = info.deriver if info is not None else None
        if drv is None:
            return None
        path = self.store.log_path(drv)
        if os.path.exists(path):
            return path
        log_file = finished_log(drv) if self.db_url is not None else None
        if log_file is None or not self.store.publish_log(drv, log_file):
            return None
        return path


async def _no_sniffing(request: web.Request, response: web.StreamResponse) -> None:
    """Logs are text a builder chose: no browser may take one for HTML or a script."""
    response.headers["X-Content-Type-Options"] = "nosniff"


@web.middleware
async def _missing_is_404(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except (FileNotFoundError, ArchiveError):
        raise web.HTTPNotFound() from None


async def serve(
    store: OutputStore,
    db_url: str | None,
    host: str,
    port: int,
    on_ready: Callable[[str], None],
    stop: asyncio.Event | None = None,
    negative_ttl: int = DEFAULT_NEGATIVE_TTL,
) -> None:
    """Serve until SIGINT/SIGTERM (or `stop` is set); `on_ready` gets the URL once listening."""
    publication = Publication(store, db_url, negative_ttl)
    await publication.open()
    runner = web.AppRunner(publication.application(), access_log=None, handle_signals=False)
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
        await runner.cleanup()
        await publication.close()
