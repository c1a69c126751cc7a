"""`guix gc` ([GC] guix/scripts/gc.scm): collecting garbage, --delete and the reference queries.

Deletion follows the daemon's gcDeleteSpecific ([GCC] nix/libstore/gc.cc) and is done by
`nix-store --delete`, one path at a time as the daemon's loop goes.  A collection
([GCC] collectGarbage, gcDeleteDead) holds the GC lock and is done by `nix-store --gc`, whose
roots are the daemon's: %state-directory/gcroots and /profiles, recursively ([GCC] findRoots),
and the temporary roots of the connections alive.
"""

from __future__ import annotations

import os
import re
import sys
from collections import deque
from collections.abc import Sequence

from guix_emulator.options import (
    HELP_VERSION,
    NONE,
    OPTIONAL,
    REQUIRED,
    STORE,
    Leave,
    NotEmulated,
    Opt,
    parse_command_line,
    say,
    show_version,
    unsupported,
)
from guix_emulator.store import (
    assert_store_path,
    closure_infos,
    gc_lock,
    invalid_paths,
    nix_error,
    nix_store,
    open_connection,
    path_infos,
    valid_infos,
)

GC_ACTIONS = {"collect-garbage": ("C", "collect-garbage"), "delete": ("D", "delete"),
              "references": ("references",),
              "requisites": ("R", "requisites"), "referrers": ("referrers",),
              "derivers": ("derivers",)}
GC_OPTIONS = (
    *HELP_VERSION,
    *(Opt(names, key, OPTIONAL if key == "collect-garbage" else NONE)
      for key, names in GC_ACTIONS.items()),
    *unsupported(
        (("F", "free-space"), REQUIRED),
        (("d", "delete-generations"), OPTIONAL), (("optimize",), NONE), (("verify",), OPTIONAL),
        (("list-roots",), NONE), (("list-busy",), NONE), (("list-dead",), NONE),
        (("list-live",), NONE), (("list-failures",), NONE), (("clear-failures",), NONE),
        (("vacuum-database",), NONE)))


def symlink_target(path: str) -> str:
    # [GC] symlink-target: follow links, the target taken as written
    while os.path.islink(path):
        path = os.readlink(path)
    return path


def store_directory(path: str) -> str:
    m = re.match(re.escape(STORE) + "/([^/]+)", path)  # [GC] store-directory
    return f"{STORE}/{m[1]}" if m else path


def direct_store_path(path: str) -> str:
    prefix = len(STORE) + 35  # [S] direct-store-path
    slash = path.find("/", prefix) if len(path) > prefix else -1
    return path[:slash] if slash >= 0 else path


def references(path: str) -> list[str]:
    return list(valid_infos([path])[path].references)


def requisites(path: str) -> list[str]:
    infos = closure_infos([path])
    result: list[str] = []  # [S] fold-path with cons: breadth first, consed
    seen: set[str] = set()
    queue = deque([path])
    while queue:
        item = queue.popleft()
        if item not in seen:
            seen.add(item)
            queue.extend(infos[item].references)
            result.insert(0, item)
    return result


def referrers(path: str) -> list[str]:
    assert_store_path(path)
    done = nix_store("--query", "--referrers", path)
    return sorted(done.stdout.decode().split()) if done.returncode == 0 else []


def derivers(path: str) -> list[str]:
    assert_store_path(path)
    if path in invalid_paths([path]):
        return []
    deriver = path_infos([path])[path].deriver
    return [deriver] if deriver and not invalid_paths([deriver]) else []


def collect_garbage(minimum: object) -> None:
    """[GC] collect-garbage, then (info (G_ "freed ~,2h MiBs~%")); [GCC] collectGarbage holds
    the GC lock for writing throughout, and says what it does (printMsg lvlError)."""
    if minimum is not None:
        raise NotEmulated("guix gc --collect-garbage=MIN is not emulated")
    with gc_lock(exclusive=True):
        say("finding garbage collector roots...\ndeleting garbage...\n")
        done = nix_store("--gc")
    if done.returncode:
        raise Leave(nix_error(done.stderr))
    freed = re.search(r"([0-9.]+) MiB freed", done.stdout.decode() + done.stderr.decode())
    say(f"guix gc: freed {float(freed[1]) if freed else 0.0:.2f} MiBs\n")


def delete_paths(paths: list[str]) -> None:
    """[GC] delete-paths -> [GCC] collectGarbage with gcDeleteSpecific.

    The daemon deletes each path together with its referrers unless one of them reaches a GC
    root (tryToDelete, canReachRoot); Nix refuses a path whose referrers are not deleted with
    it, so each path goes to `nix-store --delete` with its whole referrer closure.
    """
    say("finding garbage collector roots...\n")
    for path in paths:
        assert_store_path(path)
        doomed = [path]
        if not invalid_paths([path]):
            closure = nix_store("--query", "--referrers-closure", path)
            if closure.returncode:
                raise Leave(nix_error(closure.stderr))
            doomed = closure.stdout.decode().split()
        done = nix_store("--delete", *doomed)
        if done.returncode:
            message = nix_error(done.stderr)
            if re.match(r"cannot delete path `[^']*' since it is still alive", message, re.I):
                raise Leave(f"cannot delete path `{path}' since it is still alive")
            raise Leave(message)
    say("deleting unused links...\n")


def cmd_gc(argv: Sequence[str]) -> int:
    parsed = parse_command_line(argv, GC_OPTIONS, False, "gc")
    if parsed.has("help"):
        sys.stdout.write("Usage: guix gc [OPTION]... PATHS...\nInvoke the garbage collector.\n")
        return 0
    if parsed.has("version"):
        return show_version("guix gc")
    # [GC] %default-options: (action . collect-garbage)
    actions = [key for key, _, _ in parsed.options if key in GC_ACTIONS] or ["collect-garbage"]
    open_connection()  # [GC] guix-gc: with-store
    paths = parsed.operands  # in alist order: the last argument first, as [GC] walks them
    if actions[-1] == "collect-garbage":
        collect_garbage(parsed.last("collect-garbage"))
        return 0
    if actions[-1] == "delete":
        with gc_lock(exclusive=True):
            delete_paths([direct_store_path(p) for p in paths])
        return 0
    relatives = {"references": references, "requisites": requisites, "referrers": referrers,
                 "derivers": derivers}[actions[-1]]
    for path in paths:
        for item in relatives(store_directory(symlink_target(path))):
            sys.stdout.write(f"{item}\n")
            sys.stdout.flush()
    return 0
