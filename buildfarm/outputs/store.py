"""The output store: verified nars of built outputs, written atomically, pushed back as inputs,
and published as a substitute cache any plain web server can serve.

Layout under the state directory's `outputs/`, the URLs `guix publish` uses:
  nar/<hash>-<nar hash>                 each output's nar, uncompressed, named by the output's
                                        hash part and the nar's sha256 (nix-base32); its
                                        record's `file` (older stores: nar/<store basename>)
  nar/<gzip|zstd>/<hash>-<file hash>    the same nar compressed, named by the output's hash
                                        part and the sha256 (nix-base32) of the file itself
  <hash>.narinfo                        signed for Guix (`Signature:`) and Nix (`Sig:`)
  nix-cache-info                        StoreDir, WantMassQuery, Priority
  log/<drv basename>                    the gzip build log of its newest attempt that
                                        succeeded or failed (the bytes as the build wrote them)
  tmp/                                  transfers and files being written (never served)
Every file is written under a temporary name, fsynced and renamed; an output's narinfo is
written last, so a crash leaves at worst orphan files (`buildfarm outputs gc` removes them),
never a narinfo naming a missing nar. No nar is rewritten in place: a rebuild whose nar differs
gets new file names, the old compressed ones go once the new narinfo has replaced the old one,
and the old nar once the new record has replaced the old one (`remove_superseded`), so a reader
sees either narinfo, and the datastore either record, with the very files it describes. A
coordinator killed in between leaves a nar no record names, which `sweep_unrecorded` removes
at the next start. The metadata lives in the datastore.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import socket
import struct
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import unquote

from buildfarm.datastore.attempts import OutputRecord
from buildfarm.datastore.models import StoredOutput
from buildfarm.errors import ArchiveError
from buildfarm.formats import derivation as drvmod
from buildfarm.formats import nar
from buildfarm.formats import narinfo as ni
from buildfarm.formats.compression import DEFAULT_COMPRESSIONS, TYPES, Compression, compress
from buildfarm.formats.signing import SigningKey, load_key

CACHE_INFO = "nix-cache-info"
_NAR_HASH = re.compile(f"sha256:([{ni.NIX32}]{{52}})")


def _str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def regular_file_nar(contents: bytes) -> bytes:
    """The nar of one non-executable regular file (how a .drv is stored)."""
    return b"".join(
        _str(t)
        for t in (b"nix-archive-1", b"(", b"type", b"regular", b"contents", contents, b")")
    )


def _fsync_rename(tmp: str, final: str) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    _fsync_directory(os.path.dirname(final))


def _fsync_directory(path: str) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _sha256_nix32(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return nar.nix_base32_encode(digest.digest())


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class Publisher:
    """Who signs the narinfos and which compressed nars are made."""

    key: SigningKey = field(repr=False)
    key_name: str
    host: str = field(default_factory=socket.gethostname)
    compressions: tuple[Compression, ...] = DEFAULT_COMPRESSIONS

    @classmethod
    def load(cls, state_dir: str, compressions: Sequence[Compression] = DEFAULT_COMPRESSIONS
             ) -> Publisher:
        """The coordinator's key (STATE_DIR/signing-key.secret) and its Nix key name."""
        from buildfarm.formats.keys import key_name

        return cls(load_key(state_dir), key_name(state_dir), compressions=tuple(compressions))


class OutputStore:
    """Files of the output store; the caller records metadata in the datastore. With a
    `publisher`, every output stored is also published (compressed nars, signed narinfo)."""

    def __init__(self, root: str, publisher: Publisher | None = None) -> None:
        self.root = root
        self.publisher = publisher
        self.nar_dir = os.path.join(root, "nar")
        self.tmp_dir = os.path.join(root, "tmp")
        self.log_dir = os.path.join(root, "log")
        os.makedirs(self.nar_dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)
        # Store path -> the nars its record named before an import replaced them.
        self._superseded: dict[str, set[str]] = {}

    def nar_path(self, store_path: str, nar_hash: str) -> str:
        """Where the nar of `store_path` whose hash is `nar_hash` ("sha256:<nix-base32>") is
        kept: named by its content, so a rebuild's nar is written beside the one recorded."""
        match = _NAR_HASH.fullmatch(nar_hash)
        if match is None:
            raise ArchiveError(f"not a nix-base32 SHA-256 nar hash: {nar_hash!r}")
        return os.path.join(self.nar_dir, f"{ni.hash_part(store_path)}-{match[1]}")

    def _legacy_nar_path(self, store_path: str) -> str:
        """Where stores before content-named nars kept an output's nar: nar/<store basename>."""
        return os.path.join(self.nar_dir, os.path.basename(store_path))

    def stored_nar(self, file: str) -> str:
        """The nar a record's `file` names (relative to the output store)."""
        return os.path.join(self.root, file)

    def compressed_path(self, store_path: str, kind: str) -> str:
        """The `kind` compressed nar the narinfo of `store_path` names."""
        info = self.read_narinfo(store_path)
        for file in info.files if info is not None else ():
            path = self.file_of_url(file.url)
            if file.compression == kind and path is not None:
                return path
        raise ArchiveError(f"{store_path}: no {kind} nar published")

    def file_of_url(self, url: str) -> str | None:
        """The file a narinfo's `URL:` names (`nar/<name>` or `nar/<kind>/<name>`), or None
        if it names nothing this store writes."""
        parts = url.split("/")
        name = unquote(parts[-1])
        if parts[0] != ni.NAR_PATH or not ni.BASENAME.fullmatch(name):
            return None
        if len(parts) == 2:
            return os.path.join(self.nar_dir, name)
        if len(parts) == 3 and parts[1] in TYPES:
            return os.path.join(self.nar_dir, parts[1], name)
        return None

    def narinfo_path(self, store_path: str) -> str:
        return os.path.join(self.root, f"{ni.hash_part(store_path)}.narinfo")

    def log_path(self, drv_path: str) -> str:
        """Where the log of `drv_path` is published (Nix and Guix ask for log/<drv basename>)."""
        if not drvmod.is_store_path(drv_path):
            raise ArchiveError(f"not a store path: {drv_path!r}")
        return os.path.join(self.log_dir, os.path.basename(drv_path))

    def files_of(self, store_path: str, file: str) -> list[str]:
        """Every file of one output whose record names the nar `file`, in the order they are
        removed: narinfo first, then the compressed nars it names, then the nar."""
        source = self.stored_nar(file)
        return [self.narinfo_path(store_path), *self._named_by(store_path, source), source]

    def _named_by(self, store_path: str, source: str) -> list[str]:
        info = self.read_narinfo(store_path)
        named = [self.file_of_url(f.url) for f in info.files] if info is not None else []
        return list(dict.fromkeys(p for p in named if p is not None and p != source))

    def disk_usage(self, store_path: str, file: str) -> int:
        return sum(_size(path) or 0 for path in self.files_of(store_path, file))

    def remove(self, store_path: str, file: str) -> int:
        """Delete an output's files (narinfo first, so it never names a missing nar); return
        the bytes freed."""
        freed = 0
        for path in self.files_of(store_path, file):
            size = _size(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                freed += size or 0
        return freed

    def read_narinfo(self, store_path: str) -> ni.Narinfo | None:
        try:
            with open(self.narinfo_path(store_path), encoding="utf-8") as handle:
                return ni.parse(handle.read())
        except (FileNotFoundError, UnicodeDecodeError, ArchiveError):
            return None

    # -- publishing

    def publish(
        self,
        path: str,
        nar_hash: str,
        nar_size: int,
        references: Sequence[str],
        deriver: str | None,
        *,
        file: str,
        system: str | None = None,
        log_file: str | None = None,
    ) -> ni.Narinfo:
        """Write the compressed nars, the log and then the signed narinfo of a stored output
        whose nar is `file` (its record's); then remove the compressed nars the narinfo it
        replaced named and this one does not.

        Compressed nars a current narinfo already describes are kept, so publishing again is
        cheap; a different nar hash (a rebuild that differs) makes new ones, under new names."""
        publisher = self.publisher
        if publisher is None:
            raise ArchiveError("the output store has no signing key to publish with")
        for compression in publisher.compressions:
            if compression.type not in TYPES:
                raise ArchiveError(f"unknown compression {compression.type!r}")
        source = self.stored_nar(file)
        if _size(source) is None:
            raise ArchiveError(f"{path}: its nar is not in the output store")
        current = self.read_narinfo(path)
        ready: dict[str, ni.NarFile] = {}
        if current is not None and current.nar_hash == nar_hash:
            for named in current.files:
                existing = self.file_of_url(named.url)
                if (existing is not None and existing != source and named.compression not in ready
                        and _size(existing) == named.file_size):
                    ready[named.compression] = named
        todo = [c for c in publisher.compressions if c.type not in ready]
        if todo:
            # zlib and zstd release the GIL: each compression gets a core of its own.
            with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                futures = [pool.submit(self._compress, path, source, c) for c in todo]
                ready.update({c.type: f.result() for c, f in zip(todo, futures, strict=True)})
        info = ni.Narinfo(
            store_path=path,
            nar_hash=nar_hash,
            nar_size=nar_size,
            references=tuple(sorted(references)),
            deriver=deriver or None,
            system=system,
            files=tuple(ready[c.type] for c in publisher.compressions),
        )
        info = ni.sign(info, publisher.key, publisher.key_name, publisher.host)
        self.ensure_cache_info(info.store_dir)
        if log_file is not None and deriver:
            self.publish_log(deriver, log_file)
        text = info.render().encode("utf-8")
        if current is None or current.render().encode("utf-8") != text:
            self._write_file(self.narinfo_path(path), text)
        if current is not None:
            # Only now that no narinfo names them: a reader never meets a missing nar.
            kept = {self.file_of_url(f.url) for f in info.files}
            for named in current.files:
                old = self.file_of_url(named.url)
                if old is not None and old not in kept and old != source:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(old)
        return info

    def publish_log(self, drv_path: str, log_file: str) -> bool:
        """Publish a gzip build log as log/<drv basename> (a hard link, else a copy)."""
        target = self.log_path(drv_path)
        if not os.path.exists(log_file):
            return False
        with contextlib.suppress(FileNotFoundError):
            if os.path.samefile(log_file, target):
                return True
        os.makedirs(self.log_dir, exist_ok=True)
        temporary = self.temp_path("log")
        try:
            try:
                os.link(log_file, temporary)
            except OSError:
                shutil.copyfile(log_file, temporary)
            _fsync_rename(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return True

    def _compress(self, path: str, source: str, compression: Compression) -> ni.NarFile:
        """Compress the nar of `path` to nar/<kind>/<hash part>-<sha256 of the file>."""
        directory = os.path.join(self.nar_dir, compression.type)
        os.makedirs(directory, exist_ok=True)
        temporary = self.temp_path(compression.type)
        try:
            with open(source, "rb") as inp, open(temporary, "wb") as out:
                size = compress(inp, out, compression)
                out.flush()
                os.fsync(out.fileno())
            name = f"{ni.hash_part(path)}-{_sha256_nix32(temporary)}"
            os.replace(temporary, os.path.join(directory, name))
            _fsync_directory(directory)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return ni.NarFile(f"{ni.NAR_PATH}/{compression.type}/{name}", compression.type, size)

    def _write_file(self, target: str, data: bytes) -> None:
        temporary = self.temp_path(os.path.basename(target))
        try:
            with open(temporary, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
            _fsync_directory(os.path.dirname(target))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    def ensure_cache_info(self, store_dir: str) -> None:
        path = os.path.join(self.root, CACHE_INFO)
        if not os.path.exists(path):
            self._write_file(path, ni.nix_cache_info(store_dir).encode("utf-8"))

    def store_dir(self) -> str | None:
        """The StoreDir of the published cache (None before anything was published)."""
        try:
            with open(os.path.join(self.root, CACHE_INFO), encoding="utf-8") as handle:
                for line in handle:
                    name, _, value = line.partition(": ")
                    if name == "StoreDir":
                        return value.strip()
        except FileNotFoundError:
            pass
        return None

    def published_files(self) -> Iterator[tuple[str, str]]:
        """(kind, path) of every published or stored file: "nar", "narinfo", "log", or a
        compression name; for finding files no datastore record accounts for."""
        for kind, directory in (
            ("nar", self.nar_dir), ("log", self.log_dir),
            *((t, os.path.join(self.nar_dir, t)) for t in TYPES),
        ):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(directory):
                    if entry.is_file(follow_symlinks=False):
                        yield kind, entry.path
        for entry in os.scandir(self.root):
            if entry.name.endswith(".narinfo") and entry.is_file(follow_symlinks=False):
                yield "narinfo", entry.path

    def temp_path(self, name: str) -> str:
        return os.path.join(self.tmp_dir, f"{uuid.uuid4().hex}-{name}")

    def clean_temporary(self) -> None:
        """Transfers a dead coordinator left half-done are never used: remove them."""
        for name in os.listdir(self.tmp_dir):
            os.unlink(os.path.join(self.tmp_dir, name))

    @staticmethod
    def _write_bundle(
        items: Sequence[tuple[BinaryIO | bytes, str, Sequence[str], str]],
        key: SigningKey | None, out: BinaryIO,
    ) -> None:
        """An export bundle written to `out`, each item signed with `key` if given."""
        signed: list[tuple[BinaryIO | bytes, str, Sequence[str], str, bytes | None]] = []
        for source, path, references, deriver in items:
            signature = None
            if key is not None:
                digest = hashlib.sha256()
                if isinstance(source, bytes):
                    digest.update(source)
                else:
                    while block := source.read(1 << 20):
                        digest.update(block)
                    source.seek(0)
                digest.update(nar.export_trailer(path, references, deriver))
                signature = key.sign_guix(digest.digest())
            signed.append((source, path, references, deriver, signature))
        nar.write_bundle(out, signed)

    def derivation_bundle(
        self, derivations: Sequence[tuple[str, bytes]], key: SigningKey | None
    ) -> bytes:
        """An export bundle of `.drv` files, in memory: they are small."""
        items: list[tuple[BinaryIO | bytes, str, Sequence[str], str]] = []
        for path, contents in derivations:
            references = drvmod.parse(contents, source=path).references
            items.append((regular_file_nar(contents), path, references, ""))
        out = io.BytesIO()
        self._write_bundle(items, key, out)
        return out.getvalue()

    def output_bundle(self, stored: Sequence[StoredOutput], key: SigningKey | None) -> str:
        """An export bundle of stored outputs, in a temporary file: they may be large."""
        handles = [open(self.stored_nar(s.file), "rb") for s in stored]  # noqa: SIM115
        try:
            fd, target = tempfile.mkstemp(dir=self.tmp_dir, suffix=".bundle")
            with os.fdopen(fd, "wb") as out:
                self._write_bundle(
                    [
                        (handle, s.path, s.refs.split(), s.deriver)
                        for handle, s in zip(handles, stored, strict=True)
                    ],
                    key, out,
                )
            return target
        finally:
            for handle in handles:
                handle.close()

    def import_bundle(
        self,
        bundle_file: str | BinaryIO,
        expected: Sequence[str],
        reported: dict[str, tuple[str, int | None]],
        deriver: str,
        *,
        system: str | None = None,
        log_file: str | None = None,
    ) -> list[OutputRecord]:
        """Read a bundle fetched from a machine; keep each expected output whose nar hash and
        size match what the machine reported; nothing is kept if anything is wrong.

        With a publisher, each output kept is then published (signed narinfo written last)
        before this returns, that is before the datastore records the success."""
        temps: list[str] = []
        opened: list[BinaryIO] = []

        def sink(index: int) -> BinaryIO:
            path = self.temp_path(f"{index}.nar")
            temps.append(path)
            opened.append(open(path, "wb"))  # noqa: SIM115 - closed below
            return opened[-1]

        records: list[OutputRecord] = []
        finals: list[tuple[str, str]] = []
        try:
            try:
                if isinstance(bundle_file, str):
                    with open(bundle_file, "rb") as stream:
                        items = list(nar.read_bundle(stream, sink))
                else:
                    items = list(nar.read_bundle(bundle_file, sink))
            finally:
                for handle in opened:
                    handle.close()
            got = {item.path for item in items}
            if got != set(expected):
                raise ArchiveError(
                    f"the bundle holds {sorted(got)}, expected {sorted(expected)}"
                )
            for item, temp in zip(items, temps, strict=True):
                nar_hash = "sha256:" + nar.nix_base32_encode(item.nar_sha256)
                want_hash, want_size = reported[item.path]
                if nar_hash != want_hash or (want_size is not None and want_size != item.nar_size):
                    raise ArchiveError(
                        f"{item.path}: nar hash {nar_hash} (size {item.nar_size}) does not match "
                        f"the machine's {want_hash} (size {want_size}): corrupt transfer"
                    )
                final = self.nar_path(item.path, nar_hash)
                finals.append((temp, final))
                records.append(
                    OutputRecord(
                        path=item.path,
                        deriver=item.deriver or deriver,
                        nar_hash=nar_hash,
                        nar_size=item.nar_size,
                        references=tuple(item.references),
                        signature=item.signature,
                        file=os.path.relpath(final, self.root),
                    )
                )
            for record, (temp, final) in zip(records, finals, strict=True):
                # What the record being replaced names (at the last start, or after the last
                # success, its narinfo and record agreed): it goes once the new one is recorded.
                current = self.read_narinfo(record.path)
                older = {self._legacy_nar_path(record.path)}
                if current is not None:
                    with contextlib.suppress(ArchiveError):
                        older.add(self.nar_path(record.path, current.nar_hash))
                self._superseded[record.path] = older - {final}
                _fsync_rename(temp, final)
            if self.publisher is not None:
                for record in records:
                    # The system and log are those of `deriver`'s build.
                    ours = record.deriver == deriver
                    self.publish(
                        record.path, record.nar_hash, record.nar_size, record.references,
                        record.deriver, file=record.file, system=system if ours else None,
                        log_file=log_file if ours else None,
                    )
            return records
        finally:
            for temp in temps:
                if os.path.exists(temp):
                    os.unlink(temp)

    def remove_superseded(self, records: Sequence[OutputRecord]) -> None:
        """Once `records` are recorded: remove the nars the records they replaced named."""
        for record in records:
            keep = self.stored_nar(record.file)
            for old in self._superseded.pop(record.path, set()) - {keep}:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(old)

    def sweep_unrecorded(self) -> list[str]:
        """At start, before any import (the run lock held; in the datastore's thread): remove
        the nars no record names, which a coordinator killed between an import and its record,
        or before it removed what that record replaced, left; where such a nar's narinfo
        describes another than its record, publish the record's again. Returns the nars
        removed."""
        recorded = list(StoredOutput.select())
        named = {os.path.normpath(self.stored_nar(row.file)) for row in recorded}
        by_hash = {ni.hash_part(row.path): row for row in recorded}
        removed = []
        for entry in os.scandir(self.nar_dir):
            if not entry.is_file(follow_symlinks=False) or os.path.normpath(entry.path) in named:
                continue
            row = by_hash.get(entry.name[:32])
            info = self.read_narinfo(row.path) if row is not None else None
            if row is not None and info is not None and info.nar_hash != row.nar_hash \
                    and self.publisher is not None:
                with contextlib.suppress(ArchiveError):  # its own nar is gone: gc's to judge
                    self.publish(row.path, row.nar_hash, row.nar_size, row.refs.split(),
                                 row.deriver, file=row.file, system=info.system)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.path)
        return removed
