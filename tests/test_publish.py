"""Publishing: the output store's substitute layout, the HTTP server over it, the key commands."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from engines import ScratchDatabase

from buildfarm.cli import cli
from buildfarm.datastore import open_datastore
from buildfarm.datastore.attempts import OutputRecord, record_outputs
from buildfarm.datastore.models import Attempt, Build, Derivation
from buildfarm.errors import ArchiveError
from buildfarm.formats import narinfo as ni
from buildfarm.formats.compression import Compression
from buildfarm.formats.nar import nix_base32_encode
from buildfarm.formats.signing import SigningKey, verify_guix_narinfo
from buildfarm.outputs.publish import Publication, parse_listen
from buildfarm.outputs.store import OutputStore, Publisher

DATA = Path(__file__).parent / "data" / "nix"
KEY = SigningKey(bytes(range(32)))
TOP = "/nix/store/b929rzxqin9xa830zfpbfbgx8wajdhdn-top"
DEP = "/nix/store/5qn9lblnzjgza2vb23kwaclrcxnska2z-dep"
TOP_DRV = "/nix/store/mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv"
LOG_TEXT = b"building top\nall good\n"


def reported() -> dict[str, tuple[str, int | None]]:
    """What the machine says of each output: `sha256:<nix32>` and the size (path-info.json)."""
    infos = json.loads((DATA / "path-info.json").read_text())
    return {
        i["path"]: ("sha256:" + nix_base32_encode(base64.b64decode(i["narHash"][7:])),
                    i["narSize"])
        for i in infos
    }


def sha256_nix32(data: bytes) -> str:
    return nix_base32_encode(hashlib.sha256(data).digest())


def publisher() -> Publisher:
    return Publisher(KEY, "farm-1", host="farm.example.org")


def write_log(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(LOG_TEXT))
    return path


def import_sample(store: OutputStore, tmp_path: Path, **kwargs: Any) -> list[OutputRecord]:
    return store.import_bundle(str(DATA / "top-closure.export"), [DEP, TOP], reported(), TOP_DRV,
                               **kwargs)


@pytest.fixture
def published(tmp_path: Path) -> tuple[OutputStore, list[OutputRecord]]:
    store = OutputStore(str(tmp_path / "outputs"), publisher())
    log = write_log(tmp_path / "logs" / "ab" / "ab-1.log.gz")
    records = import_sample(store, tmp_path, system="x86_64-linux", log_file=str(log))
    return store, records


# --- the layout ---------------------------------------------------------------------------------


def test_import_publishes_every_output(published: tuple[OutputStore, list[OutputRecord]]) -> None:
    store, records = published
    record = next(r for r in records if r.path == TOP)
    # The nar, named by the output's hash part and its own sha256 (content-addressed).
    assert record.file == f"nar/b929rzxqin9xa830zfpbfbgx8wajdhdn-{record.nar_hash[7:]}"
    nar = (Path(store.root) / record.file).read_bytes()
    text = (Path(store.root) / "b929rzxqin9xa830zfpbfbgx8wajdhdn.narinfo").read_text()
    info = ni.parse(text)
    assert (info.store_path, info.nar_hash, info.nar_size) == (TOP, record.nar_hash, len(nar))
    assert info.references == (DEP,) and info.deriver == TOP_DRV and info.system == "x86_64-linux"
    assert [f.compression for f in info.files] == ["gzip", "zstd"]  # Nix takes the last
    gz, zst = (Path(store.root, f.url) for f in info.files)
    assert gzip.decompress(gz.read_bytes()) == nar
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zst.read_bytes()) == nar
    assert [f.file_size for f in info.files] == [gz.stat().st_size, zst.stat().st_size]
    # Named by the output's hash part and the file's own sha256 (content-addressed).
    assert [f.url for f in info.files] == [
        f"nar/{kind}/b929rzxqin9xa830zfpbfbgx8wajdhdn-{sha256_nix32(path.read_bytes())}"
        for kind, path in (("gzip", gz), ("zstd", zst))
    ]
    assert [store.compressed_path(TOP, k) for k in ("gzip", "zstd")] == [str(gz), str(zst)]
    verify_guix_narinfo(text, [KEY.public_bytes])
    assert ni.verify_nix_sigs(info, [KEY.nix_public("farm-1")])
    assert text.split("Signature: 1;")[1].startswith("farm.example.org;")
    assert (Path(store.root) / "nix-cache-info").read_text() == ni.nix_cache_info("/nix/store")
    log = Path(store.root) / "log" / os.path.basename(TOP_DRV)
    assert gzip.decompress(log.read_bytes()) == LOG_TEXT
    assert list(Path(store.root, "tmp").iterdir()) == []  # nothing left half-written
    dep = store.read_narinfo(DEP)
    # The other item of the bundle keeps its own deriver, and gets neither system nor log.
    assert dep is not None and dep.references == () and dep.system is None
    assert dep.deriver == "/nix/store/pld6g8hnp87b9d7yvkidbf4zi7hvm33k-dep.drv"
    assert sorted(os.listdir(Path(store.root) / "log")) == [os.path.basename(TOP_DRV)]


def test_publishing_again_keeps_files_a_rebuild_replaces_them(
    published: tuple[OutputStore, list[OutputRecord]],
) -> None:
    store, records = published
    record = next(r for r in records if r.path == TOP)
    compressed = Path(store.compressed_path(TOP, "zstd"))
    narinfo = Path(store.narinfo_path(TOP))
    before = (compressed.stat().st_ino, narinfo.stat().st_ino)
    again = store.publish(TOP, record.nar_hash, record.nar_size, record.references,
                          record.deriver, file=record.file, system="x86_64-linux")
    assert (compressed.stat().st_ino, narinfo.stat().st_ino) == before
    assert again == ni.parse(narinfo.read_text())

    # A rebuild whose nar differs: new compressed nars, under new names; the old ones go.
    content = Path(store.stored_nar(record.file)).read_bytes().replace(b"dep", b"DEP")
    other = "sha256:" + sha256_nix32(content)
    nar = Path(store.nar_path(TOP, other))
    nar.write_bytes(content)
    store.publish(TOP, other, len(content), record.references, record.deriver,
                  file=os.path.relpath(nar, store.root))
    rebuilt = Path(store.compressed_path(TOP, "zstd"))
    assert rebuilt != compressed and not compressed.exists()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(
        rebuilt.read_bytes()) == nar.read_bytes()
    info = store.read_narinfo(TOP)
    assert info is not None and info.nar_hash == other and info.system is None


class CheckedStore(OutputStore):
    """An output store that checks, before and after every file it writes, that the narinfo
    on disk and the files it names agree (what a reader could see at that instant)."""

    checks = 0

    def consistent(self, path: str) -> None:
        text = Path(self.narinfo_path(path)).read_text()
        info = ni.parse(text)
        for file in info.files:
            data = Path(self.root, file.url).read_bytes()  # exists
            assert len(data) == file.file_size, (file, text)
            nar = (gzip.decompress(data) if file.compression == "gzip" else
                   zstandard.ZstdDecompressor().decompressobj().decompress(data))
            assert (len(nar), "sha256:" + sha256_nix32(nar)) == (info.nar_size, info.nar_hash)
        self.checks += 1

    def _compress(self, path: str, source: str, compression: Compression) -> ni.NarFile:
        self.consistent(path)
        made = super()._compress(path, source, compression)
        self.consistent(path)
        return made

    def _write_file(self, target: str, data: bytes) -> None:
        if target.endswith(".narinfo"):
            self.consistent(TOP)
        super()._write_file(target, data)
        if target.endswith(".narinfo"):
            self.consistent(TOP)


def test_a_rebuild_that_differs_is_never_seen_half_published(
    published: tuple[OutputStore, list[OutputRecord]],
) -> None:
    """At every step of publishing a different nar under the same store path, the narinfo on
    disk names files that exist and match its FileSize and NarHash; afterwards only the files
    the new narinfo names are left."""
    first, records = published
    record = next(r for r in records if r.path == TOP)
    store = CheckedStore(first.root, publisher())
    original = Path(store.stored_nar(record.file)).read_bytes()
    versions = [original.replace(b"dep", b"DEP"), original.replace(b"dep", b"Dep"), original]
    seen: list[set[str]] = []
    for content in versions:
        nar_hash = "sha256:" + sha256_nix32(content)
        nar = Path(store.nar_path(TOP, nar_hash))
        nar.write_bytes(content)
        info = store.publish(TOP, nar_hash, len(content), record.references, record.deriver,
                             file=os.path.relpath(nar, store.root))
        store.consistent(TOP)
        named = {str(Path(store.root, f.url)) for f in info.files}
        on_disk = {str(p) for p in Path(store.root, "nar").glob(f"*/{ni.hash_part(TOP)}-*")}
        assert on_disk == named and len(named) == 2  # no stale file left
        seen.append(named)
    assert store.checks >= 3 * 6
    assert seen[0].isdisjoint(seen[1]) and seen[1].isdisjoint(seen[2])
    # Back to the first nar: the very files the first publication made, by the same names.
    assert seen[2] == {store.compressed_path(TOP, k) for k in ("gzip", "zstd")}
    assert list(Path(store.root, "tmp").iterdir()) == []


def test_only_the_configured_compressions_are_published(
    published: tuple[OutputStore, list[OutputRecord]],
) -> None:
    first, records = published
    record = next(r for r in records if r.path == DEP)
    for published_file in first.files_of(DEP, record.file)[:-1]:  # all but the nar
        os.unlink(published_file)
    nar = Path(first.stored_nar(record.file)).read_bytes()

    def publish(*compressions: Compression) -> list[str]:
        store = OutputStore(first.root, Publisher(KEY, "farm-1", compressions=compressions))
        store.publish(DEP, record.nar_hash, len(nar), (), record.deriver, file=record.file)
        text = Path(store.narinfo_path(DEP)).read_text()
        lines = [line for line in text.splitlines()
                 if line.startswith(("URL:", "Compression:", "FileSize:"))]
        files = sorted(str(p.relative_to(store.root)) for p in Path(store.root, "nar").glob(
            f"*/{ni.hash_part(DEP)}-*"))
        assert files == sorted(f.url for f in ni.parse(text).files)  # nothing else of DEP's
        return lines

    zstd_only = publish(Compression("zstd", 19))
    assert [line.split(":")[0] for line in zstd_only] == ["URL", "Compression", "FileSize"]
    assert zstd_only[1] == "Compression: zstd"
    url = zstd_only[0].removeprefix("URL: ")
    data = Path(first.root, url).read_bytes()
    assert zstd_only[2] == f"FileSize: {len(data)}"
    assert zstandard.ZstdDecompressor().decompressobj().decompress(data) == nar

    # Another choice for the same nar: the zstd nar is kept, gzip added first, as asked.
    both = publish(Compression("gzip", 9), Compression("zstd", 3))
    assert [both[1], both[4]] == ["Compression: gzip", "Compression: zstd"]
    assert both[3] == zstd_only[0]
    assert gzip.decompress(Path(first.root, both[0].removeprefix("URL: ")).read_bytes()) == nar

    # gzip only: the zstd nar goes once the narinfo no longer names it.
    assert publish(Compression("gzip", 1)) == both[:3]
    assert not Path(first.root, url).exists()


def test_without_a_publisher_nothing_is_published(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path / "outputs"))
    records = import_sample(store, tmp_path)
    assert all(Path(store.stored_nar(r.file)).exists() for r in records)
    assert not Path(store.narinfo_path(TOP)).exists()
    assert not Path(store.root, "nar", "gzip").exists()


def files_in(root: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def corrupted_top() -> bytes:
    """The sample export with one byte of top's file contents changed: still a well-formed
    bundle whose nar is whole, but not the nar the machine reported."""
    export = (DATA / "top-closure.export").read_bytes()
    top_nar = (DATA / "b929rzxqin9xa830zfpbfbgx8wajdhdn-top.nar").read_bytes()
    at = export.index(top_nar) + top_nar.index(b"contents") + 16  # "contents", then the size
    return export[:at] + bytes([export[at] ^ 0x20]) + export[at + 1:]


@pytest.mark.parametrize("case", ["hash", "size", "contents", "missing", "extra"])
def test_an_output_unlike_what_the_machine_reported_is_never_kept(
    tmp_path: Path, case: str
) -> None:
    """The fetched bundle is checked against the hash and size the machine reported for each
    output: one mismatch and nothing at all is kept or published."""
    store = OutputStore(str(tmp_path / "outputs"), publisher())
    said = reported()
    bundle, expected = tmp_path / "fetched.bundle", [DEP, TOP]
    bundle.write_bytes((DATA / "top-closure.export").read_bytes())
    if case == "hash":
        said[TOP] = (said[DEP][0], said[TOP][1])
    elif case == "size":
        said[TOP] = (said[TOP][0], (said[TOP][1] or 0) + 8)
    elif case == "contents":
        bundle.write_bytes(corrupted_top())
    elif case == "missing":
        expected = [DEP, TOP, f"/nix/store/{'0' * 32}-other"]
    else:
        expected = [TOP]
    before = files_in(store.root)
    with pytest.raises(ArchiveError, match="corrupt transfer" if case in (
            "hash", "size", "contents") else "the bundle holds"):
        store.import_bundle(str(bundle), expected, said, TOP_DRV)
    assert files_in(store.root) == before


def test_an_unknown_size_is_not_checked_but_the_hash_is(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path / "outputs"))
    said = {path: (nar_hash, None) for path, (nar_hash, _) in reported().items()}
    records = store.import_bundle(str(DATA / "top-closure.export"), [DEP, TOP], said, TOP_DRV)
    assert [r.nar_size for r in records] == [reported()[DEP][1], reported()[TOP][1]]
    (tmp_path / "corrupt.bundle").write_bytes(corrupted_top())
    with pytest.raises(ArchiveError, match="corrupt transfer"):
        OutputStore(str(tmp_path / "other")).import_bundle(
            str(tmp_path / "corrupt.bundle"), [DEP, TOP], said, TOP_DRV)


def test_a_failed_publication_leaves_no_narinfo(tmp_path: Path) -> None:
    """The narinfo is written last: if compressing fails, no narinfo names a missing nar."""
    store = OutputStore(str(tmp_path / "outputs"), Publisher(
        KEY, "farm-1", compressions=(Compression("gzip", 3), Compression("lzma", 1))))
    with pytest.raises(Exception, match="compression"):
        import_sample(store, tmp_path)
    assert list(Path(store.root).glob("*.narinfo")) == []
    assert list(Path(store.root, "tmp").iterdir()) == []


def test_remove_and_disk_usage(published: tuple[OutputStore, list[OutputRecord]]) -> None:
    store, records = published
    file = next(r.file for r in records if r.path == TOP)
    usage = store.disk_usage(TOP, file)
    files = [Path(p) for p in store.files_of(TOP, file) if Path(p).exists()]
    assert usage == sum(f.stat().st_size for f in files) and len(files) == 4
    assert store.remove(TOP, file) == usage
    assert not any(f.exists() for f in files)
    assert store.remove(TOP, file) == 0


# --- the HTTP server ----------------------------------------------------------------------------


def serve(publication: Publication, check: Callable[[TestClient[Any, Any]], Awaitable[None]]
          ) -> None:
    async def main() -> None:
        await publication.open()
        try:
            async with TestClient(TestServer(publication.application())) as client:
                await check(client)
        finally:
            await publication.close()

    asyncio.run(main())


def test_http_serves_the_layout(published: tuple[OutputStore, list[OutputRecord]]) -> None:
    store, records = published
    base = os.path.basename(TOP)
    raw_url = next(r.file for r in records if r.path == TOP)  # nar/<hash part>-<nar hash>
    nar = Path(store.stored_nar(raw_url)).read_bytes()
    zst = Path(store.compressed_path(TOP, "zstd")).read_bytes()
    gz_url, zst_url = (f.url for f in ni.parse(Path(store.narinfo_path(TOP)).read_text()).files)

    async def check(client: TestClient[Any, Any]) -> None:
        response = await client.get("/nix-cache-info")
        assert response.status == 200
        assert await response.text() == "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 100\n"

        response = await client.get("/b929rzxqin9xa830zfpbfbgx8wajdhdn.narinfo")
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/x-nix-narinfo"
        assert ni.parse(await response.text()).store_path == TOP

        response = await client.get(f"/{zst_url}")
        assert response.status == 200 and await response.read() == zst
        response = await client.get(f"/{raw_url}")
        assert response.status == 200 and await response.read() == nar
        response = await client.head(f"/{gz_url}")
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == os.path.getsize(
            store.compressed_path(TOP, "gzip"))

        # Range requests (resumed downloads).
        response = await client.get(f"/{raw_url}", headers={"Range": "bytes=8-23"})
        assert response.status == 206 and await response.read() == nar[8:24]
        assert response.headers["Content-Range"] == f"bytes 8-23/{len(nar)}"
        response = await client.get(f"/{raw_url}", headers={"Range": "bytes=-16"})
        assert response.status == 206 and await response.read() == nar[-16:]
        response = await client.get(f"/{raw_url}", headers={"Range": f"bytes={len(nar)}-"})
        assert response.status == 416

        # Logs: gzip as stored, Content-Encoding gzip (as guix publish), by .drv or output.
        for name in (os.path.basename(TOP_DRV), base):
            response = await client.get(f"/log/{name}", auto_decompress=False)
            assert response.status == 200, name
            assert response.headers["Content-Encoding"] == "gzip"
            assert response.headers["Content-Type"].startswith("text/plain")
            assert gzip.decompress(await response.read()) == LOG_TEXT

        response = await client.get("/signing-key.pub")
        assert await response.text() == KEY.guix_public_sexp()

    serve(Publication(store, None), check)


@pytest.mark.parametrize("path", [
    "/00000000000000000000000000000000.narinfo",
    "/b929rzxqin9xa830zfpbfbgx8wajdhdn.narinfo.tmp",
    "/nar/00000000000000000000000000000000-missing",
    "/nar/gzip/00000000000000000000000000000000-missing",
    "/nar/lzip/b929rzxqin9xa830zfpbfbgx8wajdhdn-top",
    "/nar/gzip/b929rzxqin9xa830zfpbfbgx8wajdhdn-top",  # the name before content addressing
    "/nar/b929rzxqin9xa830zfpbfbgx8wajdhdn-top",  # the nar's name before content addressing
    "/nar/..%2F..%2Fnix-cache-info",
    "/nar/gzip/..",
    "/tmp/x",
    "/log/00000000000000000000000000000000-x.drv",
    "/log/..%2Fnar%2Fb929rzxqin9xa830zfpbfbgx8wajdhdn-top",
    "/",
    "/nix-cache-info/x",
])
def test_http_missing_is_404_without_traceback(
    published: tuple[OutputStore, list[OutputRecord]], path: str,
) -> None:
    store, _ = published

    async def check(client: TestClient[Any, Any]) -> None:
        response = await client.get(path)
        assert response.status == 404, path
        assert "Traceback" not in await response.text()

    serve(Publication(store, None), check)


def test_http_publishes_records_on_first_request(tmp_path: Path, database: ScratchDatabase
                                                 ) -> None:
    """Outputs stored without a key (or before publishing existed) are published from their
    datastore record when a client first asks."""
    url = database.url
    bare = OutputStore(str(tmp_path / "outputs"))
    records = import_sample(bare, tmp_path)
    log = write_log(tmp_path / "logs" / "cd" / "cd-1.log.gz")
    with open_datastore(url):
        now = time.time()
        record_outputs(records, now)
        drv = Derivation.create(path=TOP_DRV, system="x86_64-linux", contents=b"",
                                created_at=now)
        build = Build.create(uuid="cd", derivation=drv, system="x86_64-linux",
                             state="succeeded", created_at=now)
        Attempt.create(build=build, machine="m", started_at=now, result="failure",
                       log_path=str(write_log(tmp_path / "failed.log.gz")))
        Attempt.create(build=build, machine="m", started_at=now, result="success",
                       log_path=str(log))
    store = OutputStore(bare.root, publisher())
    assert not Path(store.narinfo_path(TOP)).exists()

    async def check(client: TestClient[Any, Any]) -> None:
        # An output's log: found through its narinfo, published by this very request.
        response = await client.get(f"/log/{os.path.basename(TOP)}", auto_decompress=False)
        assert response.status == 200
        assert gzip.decompress(await response.read()) == LOG_TEXT  # not the failed attempt's
        response = await client.get("/b929rzxqin9xa830zfpbfbgx8wajdhdn.narinfo")
        assert response.status == 200
        info = ni.parse(await response.text())
        assert info.system == "x86_64-linux" and info.references == (DEP,)
        assert ni.verify_nix_sigs(info, [KEY.nix_public("farm-1")])
        response = await client.get(f"/{info.files[-1].url}")
        assert response.status == 200
        # The dependency's derivation never built here: no log, but its narinfo is published.
        response = await client.get(f"/log/{os.path.basename(DEP)}")
        assert response.status == 404
        response = await client.get("/00000000000000000000000000000000.narinfo")
        assert response.status == 404
        response = await client.get("/nix-cache-info")
        assert await response.text() == ni.nix_cache_info("/nix/store")

    assert not Path(store.root, "nix-cache-info").exists()
    serve(Publication(store, url), check)
    assert Path(store.narinfo_path(TOP)).exists() and Path(store.narinfo_path(DEP)).exists()


def test_a_failed_builds_log_is_published_on_request(
    tmp_path: Path, database: ScratchDatabase
) -> None:
    """A derivation whose build failed has no output, but its log is served all the same
    (the coordinator publishes it when the build fails; this is for logs it did not)."""
    failed_drv = "/gnu/store/4y0a1zaxbh5cyxvfk2mhsjsqpqxz2a8m-broken-1.0.drv"
    store = OutputStore(str(tmp_path / "outputs"), publisher())
    with open_datastore(database.url):
        now = time.time()
        drv = Derivation.create(path=failed_drv, system="x86_64-linux", contents=b"",
                                created_at=now)
        build = Build.create(uuid="ef", derivation=drv, system="x86_64-linux", state="failed",
                             created_at=now)
        Attempt.create(build=build, machine="m", started_at=now, result="failure",
                       log_path=str(write_log(tmp_path / "logs" / "ef-1.log.gz")))

    async def check(client: TestClient[Any, Any]) -> None:
        response = await client.get(f"/log/{os.path.basename(failed_drv)}",
                                    auto_decompress=False)
        assert response.status == 200
        assert gzip.decompress(await response.read()) == LOG_TEXT

    serve(Publication(store, database.url), check)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen(":0") == ("0.0.0.0", 0)
    assert parse_listen("[::1]:81") == ("::1", 81)
    for bad in ("8080", "host:80", "1.2.3.4:99999", "1.2.3.4:x"):
        with pytest.raises(Exception, match="listen"):
            parse_listen(bad)


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("BUILDFARM_DB", "BUILDFARM_INVENTORY", "BUILDFARM_HOOKS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def cli_run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_key_generate_and_show(state: Path) -> None:
    code, _, err = cli_run("key", "show")
    assert code == 1 and "buildfarm key generate" in err and "Traceback" not in err
    code, out, _ = cli_run("key", "generate", "--name", "farm.example.org-1")
    assert code == 0
    secret = state / "signing-key.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    code, nix, _ = cli_run("key", "show", "--format", "nix")
    assert code == 0 and nix.startswith("farm.example.org-1:") and nix.strip() in out
    code, guix, _ = cli_run("key", "show")
    assert code == 0 and guix.startswith("(public-key \n (ecc \n  (curve Ed25519)")
    assert (state / "signing-key.pub").read_text() == guix
    # An existing key is kept unless --force.
    code, _, err = cli_run("key", "generate")
    assert code == 1 and "already exists" in err
    code, _, _ = cli_run("key", "generate", "--force")
    assert code == 0
    assert cli_run("key", "show", "--format", "nix")[1] != nix
    assert cli_run("key", "show", "--format", "nix")[1].startswith("farm.example.org-1:")
    code, _, err = cli_run("key", "generate", "--force", "--name", "bad:name")
    assert code == 1 and "key name" in err


def test_key_name_defaults_to_the_host_name_and_sticks(state: Path) -> None:
    from buildfarm.formats.keys import default_key_name, key_name

    assert cli_run("key", "generate")[0] == 0
    assert key_name(state) == default_key_name()
    (state / "signing-key.name").write_text("renamed-1\n")
    assert cli_run("key", "show", "--format", "nix")[1].startswith("renamed-1:")


@pytest.fixture
def server(state: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    assert cli_run("key", "generate", "--name", "farm-1")[0] == 0
    with publishing(state) as running:
        yield running


@contextlib.contextmanager
def publishing(state: Path, *args: str, **env_vars: str
               ) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`buildfarm publish` on a free port, in a process of its own."""
    env = {**os.environ, "BUILDFARM_STATE_DIR": str(state), **env_vars}
    process = subprocess.Popen(
        [sys.executable, "-m", "buildfarm", "publish", "--listen", "127.0.0.1:0", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=60), "publish printed nothing"
        line = process.stdout.readline()
        assert " at http://127.0.0.1:" in line, (line, process.stderr)
        yield process, line.rsplit(" at ", 1)[1].strip()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)  # waits, and closes the pipes


def test_http_serves_no_symbolic_link_and_forbids_sniffing(
    published: tuple[OutputStore, list[OutputRecord]], tmp_path: Path
) -> None:
    """The store never makes a link, so a link in it was put there by someone else: served, it
    gave away whatever it named (the signing key, /etc/passwd), even one inside the store. Every
    link, as the file asked for or as a directory on the way, is a 404. Every answer forbids
    sniffing: a log is text a builder chose, and must never be taken for HTML."""
    store, records = published
    root = Path(store.root)
    secret = tmp_path / "signing-key.secret"
    secret.write_text("SECRET-SEED\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    fake = "1" * 32
    real_narinfo = Path(store.narinfo_path(TOP))
    (root / f"{fake}.narinfo").symlink_to(secret)
    (root / "nar" / f"{fake}-x").symlink_to(secret)
    (root / "log" / f"{fake}-x.drv").symlink_to(secret)
    (root / "nar" / "gzip").rename(elsewhere / "gzip")
    (root / "nar" / "gzip").symlink_to(elsewhere / "gzip")  # a directory on the way
    inner = root / f"{'2' * 32}.narinfo"
    inner.symlink_to(real_narinfo)  # inside the store, to a file it serves itself
    gz_url = ni.parse(real_narinfo.read_text()).files[0].url
    refused = [f"/{fake}.narinfo", f"/nar/{fake}-x", f"/log/{fake}-x.drv", f"/{gz_url}",
               f"/{'2' * 32}.narinfo"]

    async def check(client: TestClient[Any, Any]) -> None:
        for path in refused:
            response = await client.get(path)
            assert response.status == 404, path
            assert "SECRET" not in await response.text()
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        for path in ("/nix-cache-info", f"/{ni.hash_part(TOP)}.narinfo", f"/{records[-1].file}",
                     f"/log/{Path(TOP_DRV).name}"):
            response = await client.get(path)
            assert response.status == 200, path
            assert response.headers["X-Content-Type-Options"] == "nosniff"

    serve(Publication(store, None), check)


def test_publish_command_serves_and_stops_on_sigterm(
    server: tuple[subprocess.Popen[str], str],
) -> None:
    process, url = server
    assert url.endswith("/")
    with urllib.request.urlopen(url + "nix-cache-info", timeout=30) as response:
        assert response.read().decode().startswith("StoreDir: ")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url + "00000000000000000000000000000000.narinfo", timeout=30)
    caught.value.close()
    assert caught.value.code == 404
    assert caught.value.headers["Cache-Control"] == "max-age=60"  # --negative-ttl's default
    with urllib.request.urlopen(url + "signing-key.pub", timeout=30) as response:
        assert response.read().decode().startswith("(public-key")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_publish_without_a_key_says_how_to_make_one(state: Path) -> None:
    code, _, err = cli_run("publish", "--listen", "127.0.0.1:0")
    assert code == 1 and "buildfarm key generate" in err
    code, _, err = cli_run("publish", "--listen", "nowhere")
    assert code == 1 and "ADDRESS:PORT" in err
    code, _, err = cli_run("publish", "--negative-ttl", "soon")
    assert code == 1 and "invalid duration 'soon'" in err


def test_a_missing_narinfo_is_remembered_for_the_negative_ttl_only(
    published: tuple[OutputStore, list[OutputRecord]], state: Path,
) -> None:
    """Guix's client keeps a 404 for a narinfo for the response's `Cache-Control: max-age`,
    else for 10 minutes (guix/substitutes.scm %narinfo-negative-ttl); `guix publish
    --negative-ttl` sends it with a missing narinfo's 404 only (guix/scripts/publish.scm
    not-found), and so does `buildfarm publish`."""
    store, _ = published
    missing = "/00000000000000000000000000000000.narinfo"

    async def check(client: TestClient[Any, Any]) -> None:
        response = await client.get(missing)
        assert response.status == 404 and response.headers["Cache-Control"] == "max-age=5"
        for found in (f"/{ni.hash_part(TOP)}.narinfo", "/nix-cache-info"):
            response = await client.get(found)
            assert response.status == 200 and "Cache-Control" not in response.headers, found
        response = await client.get("/nar/gzip/00000000000000000000000000000000-missing")
        assert response.status == 404 and "Cache-Control" not in response.headers

    serve(Publication(store, None, negative_ttl=5), check)

    assert cli_run("key", "generate", "--name", "farm-1")[0] == 0
    with publishing(state, "--negative-ttl", "5m") as (_, url), pytest.raises(
            urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url + missing[1:], timeout=30)
    caught.value.close()
    assert caught.value.code == 404 and caught.value.headers["Cache-Control"] == "max-age=300"


@pytest.mark.parametrize(("values", "error"), [
    (["lzip"], "unsupported compression 'lzip': use one of gzip, zstd"),
    (["gzip:10"], "gzip levels go from 1 to 9"),
    (["zstd:fast"], "invalid compression level 'fast'"),
    (["zstd", "gzip", "zstd:3"], "compression 'zstd' given twice: give each type once"),
])
def test_a_bad_compression_is_one_line_and_exit_1(state: Path, values: list[str], error: str
                                                  ) -> None:
    options = [arg for value in values for arg in ("--compression", value)]
    for command in (["run", "--exit-when-idle", "--no-ui"], ["publish", "--listen", ":0"]):
        code, out, err = cli_run(*command, *options)
        assert (code, out, err) == (1, "", f"Error: {error}\n"), command
    # The variable both commands read, with its values separated by spaces.
    result = CliRunner(env={"BUILDFARM_COMPRESSIONS": " ".join(values)}).invoke(
        cli, ["publish"], catch_exceptions=False)
    assert (result.exit_code, result.stderr) == (1, f"Error: {error}\n")
    assert not (state / "outputs").exists()  # nothing done


def test_publish_publishes_on_request_in_the_compressions_of_its_variable(
    state: Path, database: ScratchDatabase,
) -> None:
    """An output stored without a narinfo, published by `buildfarm publish` when first asked
    for, in BUILDFARM_COMPRESSIONS's compressions only."""
    assert cli_run("key", "generate", "--name", "farm-1")[0] == 0
    records = import_sample(OutputStore(str(state / "outputs")), state)
    with open_datastore(database.url):
        record_outputs(records, time.time())
    with publishing(state, BUILDFARM_DB=database.url, BUILDFARM_COMPRESSIONS="zstd:1") as (_, url):
        with urllib.request.urlopen(f"{url}{ni.hash_part(TOP)}.narinfo", timeout=30) as response:
            info = ni.parse(response.read().decode())
        assert [f.compression for f in info.files] == ["zstd"]
        with urllib.request.urlopen(url + info.files[0].url, timeout=30) as response:
            data = response.read()
    assert len(data) == info.files[0].file_size
    assert records[-1].path == TOP
    nar = Path(state / "outputs" / records[-1].file).read_bytes()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(data) == nar
    assert not (state / "outputs" / "nar" / "gzip").exists()
