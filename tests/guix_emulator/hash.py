"""`guix hash [-S nar] [-H ALGO] [-f FORMAT] FILE...` ([H] guix/scripts/hash.scm).

The coordinator asks a Guix machine for a store item's nar hash this way (no Guix command
prints the stored NarHash).  The nar is serialization.py's, Guix's `file-hash*`.
"""

from __future__ import annotations

import base64
import hashlib
import sys
from collections.abc import Callable, Sequence

from guix_emulator.options import (
    HELP_VERSION,
    NONE,
    REQUIRED,
    Leave,
    NotEmulated,
    Opt,
    parse_command_line,
    say,
    show_version,
    unsupported,
)
from guix_emulator.serialization import ArchiveError, write_file

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"  # guix/base32.scm %nix-base32-charset


def nix_base32_encode(digest: bytes) -> str:
    """guix/base32.scm bytevector->nix-base32-string: the bits of the little-endian number,
    five at a time, most significant group first."""
    value = int.from_bytes(digest, "little")
    length = (len(digest) * 8 + 4) // 5
    return "".join(NIX_BASE32[(value >> (5 * i)) & 31] for i in reversed(range(length)))


_ALGORITHMS = {  # (gcrypt hash) lookup-hash-algorithm names that hashlib also has
    "md5": "md5", "sha1": "sha1", "sha224": "sha224", "sha256": "sha256", "sha384": "sha384",
    "sha512": "sha512", "sha3-224": "sha3_224", "sha3-256": "sha3_256", "sha3-384": "sha3_384",
    "sha3-512": "sha3_512", "blake2b-512": "blake2b", "blake2s-256": "blake2s"}
_FORMATS: dict[str, Callable[[bytes], str]] = {
    "nix-base32": nix_base32_encode, "base16": bytes.hex, "hex": bytes.hex,
    "hexadecimal": bytes.hex, "base64": lambda digest: base64.b64encode(digest).decode("ascii")}


def algorithm(name: str, value: str) -> str:
    if value not in _ALGORITHMS:
        raise Leave(f"{value}: unknown hash algorithm")
    return _ALGORITHMS[value]


def output_format(name: str, value: str) -> str:
    if value == "base32":
        raise NotEmulated("--format=base32 is not emulated")
    if value not in _FORMATS:
        raise Leave(f"unsupported hash format: {value}")
    return value


def serializer(name: str, value: str) -> str:
    if value == "git":
        raise NotEmulated("--serializer=git is not emulated")
    if value not in ("none", "nar"):
        raise Leave(f"unsupported serializer type: {value}")
    return value


HASH_OPTIONS = (
    *HELP_VERSION, Opt(("H", "hash"), "hash", REQUIRED, algorithm),
    Opt(("f", "format"), "format", REQUIRED, output_format),
    Opt(("S", "serializer"), "serializer", REQUIRED, serializer),
    Opt(("r", "recursive"), "recursive"), *unsupported((("x", "exclude-vcs"), NONE)))


def file_hash(path: str, name: str, nar: bool) -> bytes:
    try:  # [H] file-hash: a system error is "FILE STRERROR"
        hasher = hashlib.new(name)
        if nar:
            write_file(path, hasher.update)
            return hasher.digest()
        with open(0 if path == "-" else path, "rb", closefd=path != "-") as stream:
            while chunk := stream.read(1 << 20):
                hasher.update(chunk)
        return hasher.digest()
    except OSError as error:
        raise Leave(f"{path} {error.strerror}") from None
    except ArchiveError as error:
        raise Leave(str(error)) from None


def cmd_hash(argv: Sequence[str]) -> int:
    parsed = parse_command_line(argv, HASH_OPTIONS, False, "hash")
    if parsed.has("help"):
        sys.stdout.write("Usage: guix hash [OPTION] FILE\nReturn the cryptographic hash of "
                         "FILE.\n")
        return 0
    if parsed.has("version"):
        return show_version("guix hash")
    nar = False
    for key, value, name in parsed.options:  # the last -S/-r wins
        if key == "recursive":
            if name != "r":
                say("guix hash: warning: '--recursive' is deprecated, use '--serializer=nar' "
                    "instead\n")
            nar = True
        elif key == "serializer":
            nar = value == "nar"
    files = list(reversed(parsed.operands))  # [H] (reverse opts): command-line order
    if not files:
        raise Leave("no arguments specified")
    name = str(parsed.last("hash", "sha256"))
    encode = _FORMATS[str(parsed.last("format", "nix-base32"))]
    for path in files:
        sys.stdout.write(f"{encode(file_hash(path, name, nar))}\n")
        sys.stdout.flush()
    return 0
