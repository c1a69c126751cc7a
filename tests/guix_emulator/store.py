"""The store as the Guix daemon's RPCs see it, answered by Nix's `nix-store`.

Messages follow the daemon ([SA] nix/libstore/store-api.cc, [LS] local-store.cc): Guix quotes
paths `like this', where Nix writes 'like this'.  Every store query the commands make is a
function here, and so are the daemon's own conditions: one that is down (`open_connection`)
and the garbage collector's lock (`gc_lock`, `add_temp_roots`).  A full disk needs no
emulation: on a store whose file system is full, Nix underneath fails as the daemon would
("writing to file: No space left on device", libutil/util.cc SysError).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from guix_emulator.i18n import G_
from guix_emulator.options import STORE, Leave, say, state_dir

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_QUOTED_PATH = re.compile(r"'(/[^']*)'")
# What Nix 2.8's parseStorePath accepts (src/libstore/path.cc checkName): anything else it
# refuses outright, where Guix's daemon just answers "not valid".
_NIX_STORE_PATH = re.compile(
    re.escape(STORE) + r"/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]{1,211}")


def daemon_socket() -> str | None:
    """[S] %daemon-socket-uri: GUIX_DAEMON_SOCKET, else %state-directory/daemon-socket/socket."""
    state = state_dir()
    return os.environ.get("GUIX_DAEMON_SOCKET") or (
        f"{state}/daemon-socket/socket" if state else None)


def open_connection() -> None:
    """[S] open-connection: a socket that is not there raises &store-connection-error, which
    [UI] call-with-error-handling reports as (G_ "failed to connect to `~a': ~a~%") with
    strerror; the exit status is 1.  Emulator detail: a daemon is running when its socket
    path exists (the test bed puts a file there; a test removes it to stop the daemon)."""
    socket = daemon_socket()
    if socket is not None and not os.path.exists(socket):
        raise Leave(G_("failed to connect to `{}': {}").format(socket,
                                                              os.strerror(errno.ENOENT)))


@contextlib.contextmanager
def gc_lock(exclusive: bool = False) -> Iterator[None]:
    """[GCC] LocalStore::openGCLock: a read lock (a write lock for the collector) on
    %state-directory/gc.lock, a POSIX record lock ([PL] nix/libstore/pathlocks.cc lockFile:
    fcntl F_SETLK, then F_SETLKW); when it is not granted at once, the daemon says so
    (printMsg lvlError, which the client shows) and waits."""
    state = state_dir()
    if state is None:
        yield
        return
    fd = os.open(os.path.join(state, "gc.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        kind = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.lockf(fd, kind | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            say("waiting for the big garbage collector lock...\n")
            fcntl.lockf(fd, kind)
        yield
    finally:
        os.close(fd)


def add_temp_roots() -> None:
    """[GCC] addTempRoot, the first time a connection adds one (imports, exports, builds): it
    creates the connection's temporary-roots file under the GC lock, read-locked, so it waits
    for a collection in progress."""
    with gc_lock():
        pass


def nix_store(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["nix-store", *args], input=input, capture_output=True, check=False)


def quote(path: str) -> str:
    return f"`{path}'"


def guix_quotes(message: str) -> str:
    """Nix quotes paths 'like this'; the Guix daemon `like this' ([SA] showPaths)."""
    return _QUOTED_PATH.sub(lambda m: f"`{m.group(1)}'", message)


def nix_error(stderr: bytes) -> str:
    lines = ANSI.sub("", stderr.decode("utf-8", "replace")).splitlines()
    errors = [line[7:] for line in lines if line.startswith("error: ")]
    message = errors[-1] if errors else (lines[-1] if lines else "nix-store failed")
    return guix_quotes(message.rstrip("."))


def in_store(path: str) -> bool:
    return path.startswith(STORE + "/") and len(path) > len(STORE) + 1


def assert_store_path(path: str) -> None:
    # [SA] assertStorePath (isStorePath: in the store, no '/' after the item name)
    if not in_store(path) or "/" in path[len(STORE) + 1:]:
        raise Leave(f"path `{path}' is not in the store")


def invalid_paths(paths: Iterable[str]) -> set[str]:
    """The paths `valid-path?` answers #f for (anything Nix would not even parse included)."""
    unique = list(dict.fromkeys(paths))
    bad = {p for p in unique if not _NIX_STORE_PATH.fullmatch(p)}
    candidates = [p for p in unique if p not in bad]
    for start in range(0, len(candidates), 500):
        done = nix_store("--check-validity", "--print-invalid", *candidates[start:start + 500])
        if done.returncode:
            raise Leave(nix_error(done.stderr))
        bad.update(done.stdout.decode().split())
    return bad


@dataclass(frozen=True)
class PathInfo:
    references: tuple[str, ...]
    deriver: str
    nar_sha256: str  # base16, as the daemon's printHash writes it


def path_infos(paths: Iterable[str]) -> dict[str, PathInfo]:
    """References, deriver and nar hash of valid paths, from `nix-store --dump-db PATHS`."""
    wanted = list(dict.fromkeys(paths))
    infos: dict[str, PathInfo] = {}
    for start in range(0, len(wanted), 500):
        done = nix_store("--dump-db", *wanted[start:start + 500])
        if done.returncode:
            raise Leave(nix_error(done.stderr))
        lines = done.stdout.decode().split("\n")
        at = 0
        while at + 4 < len(lines) and lines[at]:  # path, hash, size, deriver, count, refs...
            refs = int(lines[at + 4])
            infos[lines[at]] = PathInfo(tuple(sorted(lines[at + 5:at + 5 + refs])),
                                        lines[at + 3], lines[at + 1])
            at += 5 + refs
    return infos


def valid_infos(roots: Sequence[str]) -> dict[str, PathInfo]:
    """PathInfo of `roots`, checked as the daemon's `references` RPC checks its argument."""
    for root in roots:
        assert_store_path(root)  # readStorePath
    invalid = invalid_paths(roots)
    for root in roots:
        if root in invalid:
            raise Leave(f"path `{root}' is not valid")  # [LS] queryValidPathId
    return path_infos(roots)


def closure_infos(roots: Sequence[str]) -> dict[str, PathInfo]:
    """PathInfo of every path reachable from `roots` (which must be valid store items)."""
    infos = valid_infos(roots)
    frontier = [r for p in infos.values() for r in p.references if r not in infos]
    while frontier:
        fetched = path_infos(dict.fromkeys(frontier))
        infos.update(fetched)
        frontier = [r for p in fetched.values() for r in p.references if r not in infos]
    return infos
