#!/usr/bin/python3
"""`nix-store` on a hostile test machine: the real one (/usr/bin/nix-store), except that while
$HOME/misbehave names a misbehaviour it does that instead. Installed as bin/nix-store first on
the machine's PATH; it never imports buildfarm.

Cues for `nix-store --serve`, which answer the coordinator's first query (the paths the machine
has) as no real store would. The wire format and numbers are Nix's: src/libstore/serve-protocol.hh
(SERVE_MAGIC_1 0x390c9deb, SERVE_MAGIC_2 0x5452eecb, cmdQueryValidPaths = 1) and
src/nix-store/nix-store.cc (opServe: the greeting is the magic and the protocol version, an
answer to cmdQueryValidPaths is a set of store paths); integers are 64-bit little-endian, a
string is its length, its bytes and zero padding to 8 (src/libutil/serialise.cc):
    huge-count      2^24 strings of 1 MiB each (the coordinator asked about a few paths)
    endless-string  one string 2^40 bytes long
    stall           the greeting, then silence
Cues for other commands:
    corrupt-nar     `--export`: the real bundle, with the length of the first file in it
                    rewritten to 2^62 bytes (a nar that ends long before what it declares)
    export-padded   `--export`: the real bundle, then PADDING bytes of zeros (a file far
                    larger than the nars the machine reported)
    endless-output  anything else (e.g. --check-validity): bytes on stdout without end
Every misbehaviour sends at most LIMIT bytes, then stops (sleeps), so that a coordinator that
does not defend itself fails its test instead of taking the test machine down.
"""

import os
import struct
import subprocess
import sys
import time

REAL = "/usr/bin/nix-store"
SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_VERSION = 0x390C9DEB, 0x5452EECB, 0x206
LIMIT = 1 << 30
PADDING = 64 << 20
MIB = b"x" * (1 << 20)


def cue() -> str:
    try:
        with open(os.path.join(os.environ["HOME"], "misbehave"), encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def read_exactly(size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            sys.exit(0)  # the coordinator hung up
        data += chunk
    return data


def flood(first: bytes, chunk: bytes) -> None:
    """`first`, then `chunk` over and over up to LIMIT bytes, then silence."""
    sent = 0
    try:
        write(first)
        while sent < LIMIT:
            write(chunk)
            sent += len(chunk)
    except BrokenPipeError:
        sys.exit(0)  # the coordinator closed the session: what it should do
    time.sleep(3600)


def serve(misbehaviour: str) -> None:
    magic, _client_version = struct.unpack("<QQ", read_exactly(16))
    if magic != SERVE_MAGIC_1:
        sys.exit(1)
    write(u64(SERVE_MAGIC_2) + u64(SERVE_VERSION))
    command = struct.unpack("<Q", read_exactly(8))[0]
    if misbehaviour == "stall" or command != 1:
        time.sleep(3600)
    if misbehaviour == "huge-count":
        flood(u64(1 << 24), u64(len(MIB)) + MIB)
    else:  # endless-string
        flood(u64(1) + u64(1 << 40), MIB)


def corrupt_export(argv: list[str]) -> None:
    """The real export, with the first file's length in it rewritten to 2^62."""
    done = subprocess.run([REAL, *argv], stdout=subprocess.PIPE, check=False)
    if done.returncode != 0:
        sys.exit(done.returncode)
    real = done.stdout
    marker = u64(8) + b"contents"
    at = real.find(marker)
    if at >= 0:
        end = at + len(marker)
        real = real[:end] + u64(1 << 62) + real[end + 8:]
    write(real)


def main() -> None:
    misbehaviour, argv = cue(), sys.argv[1:]
    if argv[:1] == ["--serve"] and misbehaviour in ("huge-count", "endless-string", "stall"):
        serve(misbehaviour)
    elif argv[:1] == ["--export"] and misbehaviour == "corrupt-nar":
        corrupt_export(argv)
    elif argv[:1] == ["--export"] and misbehaviour == "export-padded":
        done = subprocess.run([REAL, *argv], check=False)
        if done.returncode != 0:
            sys.exit(done.returncode)
        zeros = bytes(1 << 20)
        for _ in range(PADDING >> 20):
            write(zeros)
    elif argv[:1] not in (["--serve"], ["--export"]) and misbehaviour == "endless-output":
        flood(b"", MIB)
    else:
        os.execv(REAL, [REAL, *argv])


main()
