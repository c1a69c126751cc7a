"""The coordinator's own store, when it has one: where input sources come from.

A derivation's input sources (builder scripts, patches, module trees) are store items that only
exist where the derivation was made. When a machine lacks them and the coordinator's own store
holds them, they are sent with the derivation, as `guix offload` does. The nars are made here
(nar.dump_path) and signed with the coordinator's key, so Guix machines accept them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import BinaryIO

from buildfarm.formats import nar
from buildfarm.formats.signing import SigningKey


def _references_command(path: str) -> list[str] | None:
    if shutil.which("guix"):
        return ["guix", "gc", "--references", path]
    if shutil.which("nix-store"):
        return ["nix-store", "--query", "--references", path]
    return None


async def _references(path: str) -> list[str] | None:
    command = _references_command(path)
    if command is None:
        return None
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        return None
    return [line for line in out.decode().splitlines() if line and line != path]


async def closure(paths: Sequence[str]) -> list[tuple[str, list[str]]] | None:
    """`paths` and what they reference in the local store, references first; None when the
    local store does not hold them all."""
    order: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    stack: list[tuple[str, bool]] = [(p, False) for p in reversed(paths)]
    refs: dict[str, list[str]] = {}
    while stack:
        path, expanded = stack.pop()
        if expanded:
            order.append((path, refs[path]))
            continue
        if path in seen:
            continue
        seen.add(path)
        if not os.path.lexists(path):
            return None
        found = await _references(path)
        if found is None:
            return None
        refs[path] = found
        stack.append((path, True))
        stack.extend((r, False) for r in found if r not in seen)
    return order


def bundle(items: Sequence[tuple[str, list[str]]], directory: str, key: SigningKey | None) -> str:
    """An export bundle of local store items in a temporary file under `directory`."""
    fd, target = tempfile.mkstemp(dir=directory, suffix=".bundle")
    with os.fdopen(fd, "w+b") as out, contextlib.ExitStack() as buffers:
        entries: list[tuple[BinaryIO, str, Sequence[str], str, nar.Signature]] = []
        for path, references in items:
            buffer = buffers.enter_context(tempfile.TemporaryFile(dir=directory))
            nar.dump_path(path, buffer)
            buffer.seek(0)
            signature = None if key is None else key.sign_guix
            entries.append((buffer, path, references, "", signature))
        nar.write_bundle(out, entries)
    return target
