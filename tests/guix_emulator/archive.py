"""`guix archive` ([A] guix/scripts/archive.scm): export, import, missing, keys and ACL.

Exports are written the way the Guix daemon writes them ([LS] exportPath): each item's nar made
from the store item on disk, its trailer, and its signature from `guix authenticate` (pki.py).
Imports are read and checked the way the daemon does ([LS] importPaths, importPath): a signature
is always required, by a key in the ACL; each item the daemon would have accepted is then handed,
unsigned, to `nix-store --import`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import BinaryIO

from guix_emulator import pki
from guix_emulator.gcrypt import GcryptError, Sexp
from guix_emulator.i18n import G_
from guix_emulator.options import (
    BUILD_OPTIONS,
    HELP_VERSION,
    NONE,
    OPTIONAL,
    REQUIRED,
    Leave,
    NotEmulated,
    Opt,
    number,
    parse_command_line,
    say,
    show_version,
    unsupported,
)
from guix_emulator.serialization import (
    EXPORT_MAGIC,
    ArchiveError,
    Source,
    read_export_item,
    write_file,
    write_int,
    write_string,
)
from guix_emulator.store import (
    PathInfo,
    add_temp_roots,
    assert_store_path,
    closure_infos,
    in_store,
    invalid_paths,
    nix_error,
    open_connection,
)

ARCHIVE_OPTIONS = (
    *HELP_VERSION, Opt(("export",), "export"), Opt(("r", "recursive"), "recursive"),
    Opt(("import",), "import"), Opt(("missing",), "missing"),
    Opt(("generate-key",), "generate-key", OPTIONAL), Opt(("authorize",), "authorize"),
    Opt(("v", "verbosity"), "verbosity", REQUIRED, number), Opt(("n", "dry-run"), "dry-run"),
    *unsupported(
        (("x", "extract"), REQUIRED), (("t", "list"), NONE), (("S", "source"), NONE),
        (("e", "expression"), REQUIRED), (("s", "system"), REQUIRED), (("target",), REQUIRED)),
    *BUILD_OPTIONS)


def generate_key(parameters: object) -> int:
    if parameters is not None:
        raise NotEmulated("--generate-key=PARAMETERS is not emulated (only the default)")
    pki.generate_key_pair()
    return 0


def authorize_key() -> int:
    # [A] authorize-key: the key is read before the ACL, and checked after
    try:
        key = Sexp.parse(sys.stdin.buffer.read())
    except GcryptError as error:
        raise Leave(f"failed to read public key: {error.source}: {error.text}") from None
    acl = pki.current_acl()
    if key is None or key.nth_data(0) != b"public-key":
        raise Leave("s-expression does not denote a public key")
    pki.write_acl([key, *acl])
    return 0


def missing_paths() -> int:
    # [A] --missing: read-line on stdin, `valid-path?` on each line, invalid ones in order
    text = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if text.endswith("\n") or not text:
        lines.pop()
    for line in lines:
        assert_store_path(line)  # the daemon's readStorePath
    invalid = invalid_paths(lines)
    output = "".join(f"{line}\n" for line in lines if line in invalid)
    sys.stdout.buffer.write(output.encode("utf-8", "surrogateescape"))
    return 0


def export_paths(files: list[str], recursive: bool) -> int:
    # [A] export-from-store, [S] export-paths and topologically-sorted
    if not files:
        say(f"guix archive: {G_('warning: ')}no arguments specified; creating an empty "
            "archive\n")
    infos = closure_infos(files)
    add_temp_roots()  # [LS] exportPath: addTempRoot(path)
    ordered: list[str] = []  # depth first, a path after its references
    visited: set[str] = set()
    for root in files:
        if root in visited:
            continue
        visited.add(root)
        stack = [(root, iter(infos[root].references))]
        while stack:
            path, references = stack[-1]
            reference = next((r for r in references if r not in visited), None)
            if reference is None:
                stack.pop()
                ordered.append(path)
            else:
                visited.add(reference)
                stack.append((reference, iter(infos[reference].references)))
    if not recursive:
        ordered = [p for p in ordered if p in files]
    output = sys.stdout.buffer
    try:
        for path in ordered:
            output.write(write_int(1))  # [S] export-paths writes each item's marker
            export_path(path, infos[path], output)
        output.write(write_int(0))
    finally:
        output.flush()
    return 0


def export_path(path: str, info: PathInfo, output: BinaryIO) -> None:
    """[LS] exportPath: the nar (checked against the stored hash), the trailer, the signature.
    What was written before a failure stays written, as the daemon's tunnel sent it on."""
    hasher = hashlib.sha256()

    def write(data: bytes) -> None:
        output.write(data)
        hasher.update(data)

    write_file(path, write)
    stored, actual = info.nar_sha256, hasher.hexdigest()
    if actual != stored and stored.strip("0"):
        raise Leave(f"hash of path `{path}' has changed from `{stored}' to `{actual}'!")
    write(trailer(path, info.references, info.deriver))
    signed = hasher.digest()
    write(write_int(1))
    check_secrecy(pki.key_files()[1])
    write(write_string(pki.sign_hash(signed).encode("latin-1")))


def trailer(path: str, references: Sequence[str], deriver: str) -> bytes:
    """[LS] exportPath: what follows an item's nar, up to its signature marker."""
    return (write_int(EXPORT_MAGIC) + write_string(path.encode()) + write_int(len(references))
            + b"".join(write_string(r.encode()) for r in references)
            + write_string(deriver.encode()))


def check_secrecy(path: str) -> None:
    """[LS] checkSecrecy."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise Leave(f"getting status of `{path}': {error.strerror}") from None
    if mode & 0o077:
        raise Leave(f"file `{path}' should be secret (inaccessible to everybody else)!")


Accepted = tuple[str, str, tuple[str, ...], str]  # nar file, path, references, deriver


def import_paths() -> int:
    """[S] import-paths -> [LS] importPaths: each item read, checked and imported in turn;
    the items before a bad one stay imported."""
    acl: list[Sexp] | None = None  # read when `guix authenticate` starts, on first use
    accepted: list[Accepted] = []
    problem: str | None = None
    source = Source(sys.stdin.buffer)
    with tempfile.TemporaryDirectory(prefix="guix-import-") as spool:
        try:
            while (marker := source.read_int()) != 0:
                if marker != 1:
                    raise Leave("input doesn't look like something created by "
                                "`nix-store --export'")
                nar_file = os.path.join(spool, str(len(accepted)))
                with open(nar_file, "wb") as nar:
                    source.copy = nar.write
                    item = read_export_item(source)
                    source.copy = None
                if acl is None and item.signature is not None:
                    acl = pki.current_acl()
                pki.check_import(item, acl or [])
                accepted.append((nar_file, item.path, item.references, item.deriver))
        except (Leave, ArchiveError) as error:
            problem = str(error)
        if accepted:
            nix_import(accepted)
    if problem is not None:
        raise Leave(problem)
    return 0


def nix_import(accepted: list[Accepted]) -> None:
    """The accepted items as one unsigned Nix export, imported by `nix-store --import`."""
    add_temp_roots()  # [LS] importPath: addTempRoot of each item
    derivers = {deriver for *_, deriver in accepted if deriver}
    valid = derivers - invalid_paths(derivers)
    with tempfile.TemporaryFile() as bundle:
        for nar_file, path, references, deriver in accepted:
            # [LS] importPath registers the deriver only if it is valid (or imported before)
            kept = deriver if deriver in valid else ""
            bundle.write(write_int(1))
            with open(nar_file, "rb") as nar:
                while block := nar.read(1 << 20):
                    bundle.write(block)
            bundle.write(trailer(path, references, kept) + write_int(0))
            valid.add(path)
        bundle.write(write_int(0))
        bundle.seek(0)
        done = subprocess.run(["nix-store", "--import"], stdin=bundle, capture_output=True,
                              check=False)
    if done.returncode:
        raise Leave(nix_error(done.stderr))


def cmd_archive(argv: Sequence[str]) -> int:
    parsed = parse_command_line(argv, ARCHIVE_OPTIONS, True, "archive")
    if parsed.has("help"):
        sys.stdout.write("Usage: guix archive [OPTION]... PACKAGE...\nExport/import one or "
                         "more packages from/to the store.\n")
        return 0
    if parsed.has("version"):
        return show_version("guix archive")
    if parsed.has("generate-key"):
        return generate_key(parsed.last("generate-key"))
    if parsed.has("authorize"):
        return authorize_key()
    open_connection()  # [A] guix-archive: with-store, after the key operations
    if parsed.has("export"):
        files = list(reversed(parsed.operands))  # [A] fold2 restores the command-line order
        for spec in parsed.operands:
            if not in_store(spec):
                raise Leave(f"{spec}: unknown package")
        return export_paths(files, parsed.has("recursive"))
    if parsed.has("import"):
        return import_paths()
    if parsed.has("missing"):
        return missing_paths()
    raise Leave("either '--export' or '--import' must be specified")
