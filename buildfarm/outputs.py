"""The output store: verified nars of built outputs, written atomically, pushed back as inputs.

Layout under the state directory's `outputs/`: `nar/<store basename>` holds each output's nar
(the path `guix publish` serves uncompressed nars under), `tmp/` holds transfers in flight. The
metadata (hash, size, references, deriver, signature) lives in the datastore.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import uuid
from collections.abc import Sequence
from typing import BinaryIO

from buildfarm import derivation as drvmod
from buildfarm import nar
from buildfarm.datastore.attempts import OutputRecord
from buildfarm.datastore.models import StoredOutput
from buildfarm.errors import ArchiveError
from buildfarm.signing import SigningKey


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
    directory = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class OutputStore:
    """Files of the output store; the caller records metadata in the datastore."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.nar_dir = os.path.join(root, "nar")
        self.tmp_dir = os.path.join(root, "tmp")
        os.makedirs(self.nar_dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)

    def nar_path(self, store_path: str) -> str:
        name = os.path.basename(store_path)
        if not drvmod.is_store_path(store_path) or name in ("", ".", ".."):
            raise ArchiveError(f"not a store path: {store_path!r}")
        return os.path.join(self.nar_dir, name)

    def temp_path(self, name: str) -> str:
        return os.path.join(self.tmp_dir, f"{uuid.uuid4().hex}-{name}")

    def clean_temporary(self) -> None:
        """Transfers a dead coordinator left half-done are never used: remove them."""
        for name in os.listdir(self.tmp_dir):
            os.unlink(os.path.join(self.tmp_dir, name))

    def _write_bundle(
        self, items: Sequence[tuple[BinaryIO | bytes, str, Sequence[str], str]],
        key: SigningKey | None,
    ) -> str:
        """An export bundle in a temporary file, each item signed with `key` if given."""
        signed: list[tuple[BinaryIO | bytes, str, Sequence[str], str, str | None]] = []
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
        fd, target = tempfile.mkstemp(dir=self.tmp_dir, suffix=".bundle")
        with os.fdopen(fd, "wb") as out:
            nar.write_bundle(out, signed)
        return target

    def derivation_bundle(
        self, derivations: Sequence[tuple[str, bytes]], key: SigningKey | None
    ) -> str:
        items: list[tuple[BinaryIO | bytes, str, Sequence[str], str]] = []
        for path, contents in derivations:
            references = drvmod.parse(contents, source=path).references
            items.append((regular_file_nar(contents), path, references, ""))
        return self._write_bundle(items, key)

    def output_bundle(self, stored: Sequence[StoredOutput], key: SigningKey | None) -> str:
        handles = [open(self.nar_path(s.path), "rb") for s in stored]  # noqa: SIM115
        try:
            return self._write_bundle(
                [
                    (handle, s.path, s.refs.split(), s.deriver)
                    for handle, s in zip(handles, stored, strict=True)
                ],
                key,
            )
        finally:
            for handle in handles:
                handle.close()

    def import_bundle(
        self,
        bundle_file: str,
        expected: Sequence[str],
        reported: dict[str, tuple[str, int | None]],
        deriver: str,
    ) -> list[OutputRecord]:
        """Read a bundle fetched from a machine; keep each expected output whose nar hash and
        size match what the machine reported; nothing is kept if anything is wrong."""
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
                with open(bundle_file, "rb") as stream:
                    items = list(nar.read_bundle(stream, sink))
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
                final = self.nar_path(item.path)
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
            for temp, final in finals:
                _fsync_rename(temp, final)
            return records
        finally:
            for temp in temps:
                if os.path.exists(temp):
                    os.unlink(temp)
