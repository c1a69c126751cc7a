#!/usr/bin/python3
"""The sftp subsystem of a hostile test machine: OpenSSH's own sftp-server, with its replies
passed through, except that while $HOME/misbehave names a misbehaviour it does that to the
first reply carrying file data (or to every file's attributes). Installed as the host's
`Subsystem sftp`; it never imports buildfarm.

Packets, from draft-ietf-secsh-filexfer-02 (what OpenSSH's sftp-server speaks, its sftp.h):
a 4-byte big-endian length, then a type byte (SSH_FXP_DATA = 103), a 4-byte request id and
the rest; a DATA reply's rest is a 4-byte data length and the data.
    sftp-oversized  the first DATA reply is replaced by one of 512 MiB (the read asked for at
                    most 255 KiB: a reply longer than its read)
    sftp-stall      the first DATA reply, and everything after it, is never sent
    sftp-claims-huge  every ATTRS reply (SSH_FXP_ATTRS = 105: flags, then the 8-byte size if
                    SSH_FILEXFER_ATTR_SIZE = 1 is set) says the file is 2^40 bytes
While a misbehaviour is cued, the length of the data of every DATA reply sent is appended,
one line each, to $HOME/sftp-sent: what the coordinator was given to write.
"""

import os
import struct
import subprocess
import sys
import threading
import time

REAL = "/usr/lib/openssh/sftp-server"
DATA, ATTRS, ATTR_SIZE = 103, 105, 1
OVERSIZED = 512 << 20
CLAIMED = 1 << 40


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


def forward_requests(sink: int) -> None:
    while data := os.read(0, 65536):
        view = memoryview(data)
        while view:
            view = view[os.write(sink, view):]
    os.close(sink)


def read_exactly(source: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(source, size - len(data))
        if not chunk:
            sys.exit(0)
        data += chunk
    return data


def main() -> None:
    misbehaviour = cue()
    server = subprocess.Popen([REAL], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert server.stdin is not None and server.stdout is not None
    threading.Thread(target=forward_requests, args=(server.stdin.fileno(),), daemon=True).start()
    source = server.stdout.fileno()
    while True:
        (length,) = struct.unpack(">I", read_exactly(source, 4))
        body = read_exactly(source, length)
        if body[0] == DATA and misbehaviour == "sftp-stall":
            time.sleep(3600)
        if body[0] == DATA and misbehaviour == "sftp-oversized":
            header = struct.pack(">IBII", 9 + OVERSIZED, DATA, *struct.unpack(">I", body[1:5]),
                                 OVERSIZED)
            zeros, sent = bytes(1 << 20), 0
            try:
                write(header)
                while sent < OVERSIZED:
                    write(zeros)
                    sent += len(zeros)
            except BrokenPipeError:
                sys.exit(0)  # the coordinator closed the channel: what it should do
            time.sleep(3600)
        if body[0] == ATTRS and misbehaviour == "sftp-claims-huge" and len(body) >= 17 and (
                struct.unpack_from(">I", body, 5)[0] & ATTR_SIZE):
            body = body[:9] + struct.pack(">Q", CLAIMED) + body[17:]
        if body[0] == DATA and misbehaviour:
            with open(os.path.join(os.environ["HOME"], "sftp-sent"), "a", encoding="utf-8") as f:
                f.write(f"{struct.unpack_from('>I', body, 5)[0]}\n")
        write(struct.pack(">I", length) + body)


main()
