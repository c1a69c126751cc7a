"""Build logs: gzip files written while the build streams, readable (and followable) meanwhile."""

from __future__ import annotations

import gzip
import os
import time
import zlib
from collections.abc import Callable, Iterator

FLUSH_EVERY = 0.5  # seconds: how stale `buildfarm log --follow` may be
DEFAULT_MAX_LOG_BYTES = 64 * 1024 * 1024


def log_path(logs_dir: str, build_uuid: str, attempt_id: int) -> str:
    """Where an attempt's log lives; UUIDs and ids are safe file names."""
    return os.path.join(logs_dir, build_uuid[:2], f"{build_uuid}-{attempt_id}.log.gz")


class LogWriter:
    """Compresses a build log as it arrives; past `max_bytes` it keeps counting, not writing."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_LOG_BYTES) -> None:
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):  # a stat is cheaper than a failing mkdir
            os.makedirs(directory, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.written = 0
        self.dropped = 0
        self._raw = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=6, mtime=0)
        self._flushed = time.monotonic()
        self._tail = bytearray()

    def write(self, data: bytes) -> None:
        self._tail += data
        del self._tail[:-8192]
        room = self.max_bytes - self.written
        if room <= 0:
            self.dropped += len(data)
            return
        chunk = data[:room]
        self._gz.write(chunk)
        self.written += len(chunk)
        self.dropped += len(data) - len(chunk)
        if time.monotonic() - self._flushed >= FLUSH_EVERY:
            self.flush()

    @property
    def tail(self) -> bytes:
        """The last few KiB, for classifying a failure without reading the file back."""
        return bytes(self._tail)

    def flush(self) -> None:
        self._gz.flush(zlib.Z_SYNC_FLUSH)
        self._raw.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if self._gz.closed:
            return
        if self.dropped:
            self._gz.write(
                f"\n[buildfarm: log truncated: {self.dropped} more bytes not kept]\n".encode()
            )
        self._gz.close()
        self._raw.close()


def read_log(path: str, *, follow: bool = False, done: Callable[[], bool] | None = None,
             poll: float = 0.3) -> Iterator[bytes]:
    """Yield the decompressed log; with `follow`, keep reading until `done()` says the build ended
    and nothing more arrives."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as handle:
        while True:
            block = handle.read(65536)
            if block:
                out = decompressor.decompress(block)
                if out:
                    yield out
                continue
            if not follow or (done is not None and done()):
                # One last read: the writer may have finished between the two checks.
                rest = handle.read()
                if rest:
                    yield decompressor.decompress(rest)
                    continue
                return
            time.sleep(poll)
