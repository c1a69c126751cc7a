"""`guix gc` ([GC] guix/scripts/gc.scm): --delete and the reference queries.

Deletion follows the daemon's gcDeleteSpecific ([GCC] nix/libstore/gc.cc) and is done by
`nix-store --delete`, one path at a time as the daemon's loop goes.
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
    invalid_paths,
    nix_error,
    nix_store,
    path_infos,
    valid_infos,
)

GC_ACTIONS = {"delete": ("D", "delete"), "references": ("references",),
              "requisites": ("R", "requisites"), "referrers": ("referrers",),
              "derivers": ("derivers",)}
GC_OPTIONS = (
    *HELP_VERSION, *(Opt(names, key) for key, names in GC_ACTIONS.items()),
    *unsupported(
        (("C", "collect-garbage"), OPTIONAL), (("F", "free-space"), REQUIRED),
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
    actions = [key for key, _, _ in parsed.options if key in GC_ACTIONS]
    if not actions:
        raise NotEmulated("guix gc without -D/--references/-R/--referrers/--derivers")
    paths = parsed.operands  # in alist order: the last argument first, as [GC] walks them
    if actions[-1] == "delete":
        delete_paths([direct_store_path(p) for p in paths])
        return 0
    relatives = {"references": references, "requisites": requisites, "referrers": referrers,
                 "derivers": derivers}[actions[-1]]
    for path in paths:
        for item in relatives(store_directory(symlink_target(path))):
            sys.stdout.write(f"{item}\n")
            sys.stdout.flush()
    return 0
