"""A substitute server for the tests: buildfarm's own output store, served by the server of
`buildfarm publish` (in a thread of the test process), signed with a key of the test's.

`offer(paths)` stores paths of the test's private Nix store (each exported by nix-store, with
the hash and size Nix reports) and publishes them; `break_nars()` removes the compressed nars,
so that their narinfos stay while the downloads fail (404).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from buildfarm.formats.signing import SigningKey
from buildfarm.outputs.publish import serve
from buildfarm.outputs.store import OutputStore, Publisher


class SubstituteServer:
    def __init__(self, root: Path, key: SigningKey) -> None:
        self.key = key
        self.store = OutputStore(str(root), Publisher(key, "farm-test-1", host="farm"))
        self.url = ""

    def offer(self, paths: Sequence[str]) -> None:
        """Store and publish `paths` (their references first, as the caller orders them)."""
        for path in paths:
            export = subprocess.run(["nix-store", "--export", path], capture_output=True,
                                    check=True).stdout
            nar_hash, size, deriver = (_query(option, path) for option in
                                       ("--hash", "--size", "--deriver"))
            bundle = Path(self.store.temp_path("offer.export"))
            bundle.write_bytes(export)
            try:
                self.store.import_bundle(str(bundle), [path], {path: (nar_hash, int(size))},
                                         "" if deriver == "unknown-deriver" else deriver)
            finally:
                bundle.unlink(missing_ok=True)

    def break_nars(self) -> None:
        for compressed in Path(self.store.nar_dir).glob("*/*"):
            compressed.unlink()


def _query(option: str, path: str) -> str:
    """nix-store refuses two query types at once."""
    return subprocess.run(["nix-store", "-q", option, path], capture_output=True, text=True,
                          check=True).stdout.strip()


@contextlib.contextmanager
def substitute_server(root: Path, key: SigningKey | None = None) -> Iterator[SubstituteServer]:
    """A running server on a free port of 127.0.0.1 (its URL in `.url`, without a final /)."""
    server = SubstituteServer(root, key or SigningKey.generate())
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def on_ready(url: str) -> None:
        server.url = url.rstrip("/")
        ready.set()

    async def main() -> None:
        await serve(server.store, None, "127.0.0.1", 0, on_ready, stop)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "the substitute server did not start"
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        loop.close()
