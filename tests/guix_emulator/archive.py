"""`guix archive` ([A] guix/scripts/archive.scm): export, import, missing, keys and ACL.

Exports are Nix's exports re-written with Guix's signature on each item, the way the Guix daemon
signs them ([LS] exportPath, [AU] guix/scripts/authenticate.scm).  Imports are checked the way
the Guix daemon checks them -- a signature is always required, by a key in the ACL ([PKI]
guix/pki.scm) -- and then handed, unsigned, to `nix-store --import`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import BinaryIO, cast

from buildfarm.errors import ArchiveError
from buildfarm.formats import sexp
from buildfarm.formats.nar import Signature, read_bundle, write_bundle
from buildfarm.formats.signing import SignatureError, SigningKey, load_key, save_key, verify_guix
from guix_emulator.options import (
    BUILD_OPTIONS,
    HELP_VERSION,
    NONE,
    OPTIONAL,
    REQUIRED,
    Leave,
    NotEmulated,
    Opt,
    config_dir,
    number,
    parse_command_line,
    say,
    show_version,
    unsupported,
)
from guix_emulator.store import (
    assert_store_path,
    closure_infos,
    in_store,
    invalid_paths,
    nix_error,
)

ExportItem = tuple[BinaryIO, str, Sequence[str], str, Signature]

ARCHIVE_OPTIONS = (
    *HELP_VERSION, Opt(("export",), "export"), Opt(("r", "recursive"), "recursive"),
    Opt(("import",), "import"), Opt(("missing",), "missing"),
    Opt(("generate-key",), "generate-key", OPTIONAL), Opt(("authorize",), "authorize"),
    Opt(("v", "verbosity"), "verbosity", REQUIRED, number), Opt(("n", "dry-run"), "dry-run"),
    *unsupported(
        (("x", "extract"), REQUIRED), (("t", "list"), NONE), (("S", "source"), NONE),
        (("e", "expression"), REQUIRED), (("s", "system"), REQUIRED), (("target",), REQUIRED)),
    *BUILD_OPTIONS)


def write_atomically(path: str, text: str) -> None:
    """guix/utils.scm with-atomic-file-output: a temporary file renamed over PATH."""
    fd, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                                     dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="latin-1") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def generate_key(parameters: object) -> int:
    # [A] generate-key-pair
    if parameters is not None:
        raise NotEmulated("--generate-key=PARAMETERS is not emulated (only the default)")
    directory = config_dir()
    public, secret = (os.path.join(directory, f"signing-key.{e}") for e in ("pub", "sec"))
    if os.path.exists(public) or os.path.exists(secret):
        raise Leave(f"key pair exists under '{directory}'; remove it first")
    say("Please wait while gathering entropy to generate the key pair;\nthis may take time...\n")
    key = SigningKey.generate()
    old = os.umask(0o266)  # "Create the following files as #o400."
    try:
        os.makedirs(directory, exist_ok=True)
        write_atomically(public, key.guix_public_sexp())
        write_atomically(secret, key.guix_private_sexp())
        os.chmod(public, 0o444)
        save_key(key, directory)  # emulator detail: the seed buildfarm signs with
    finally:
        os.umask(old)
    return 0


_GCRYPT_ERRORS = {  # libgpg-error's texts for what libgcrypt's s-expression reader reports
    "unmatched": "Unmatched parentheses in S-expression",
    "hex": "Bad hexadecimal character in S-expression",
    "escape": "Bad quotation in S-expression",
    "unterminated": "Bad quotation in S-expression",
    "length": "Invalid length specifier in S-expression",
}


def read_acl(path: str) -> list[sexp.Sexp]:
    """[PKI] current-acl and acl->public-keys: the authorized public keys as s-expressions."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as stream:
        try:
            acl = sexp.parse(stream.read())
        except sexp.SexpError as error:
            raise Leave(f"invalid access-control list: {error.reason}") from None
    keys: list[sexp.Sexp] = []
    for entry in acl[1:] if acl[0] == b"acl" else [b"bad"]:
        match entry:
            case (b"entry", subject, (b"tag", (b"guix", b"import"))):
                keys.append(subject)
            case _:
                raise Leave("invalid access-control list")
    return keys


def authorize_key() -> int:
    # [A] authorize-key, [PKI] public-keys->acl and write-acl
    text = sys.stdin.buffer.read()
    try:
        key = sexp.parse(text)
    except sexp.SexpError as error:
        reason = next((m for k, m in _GCRYPT_ERRORS.items() if k in error.reason.lower()),
                      "Bad character in S-expression")
        raise Leave(f"failed to read public key: gcrypt: {reason}") from None
    if key[0] != b"public-key":
        raise Leave("s-expression does not denote a public key")
    path = os.path.join(config_dir(), "acl")
    keys = list(dict.fromkeys([key, *read_acl(path)]))  # delete-duplicates keeps the first
    acl: list[sexp.Sexp] = [b"acl"]
    acl += [(b"entry", k, (b"tag", (b"guix", b"import"))) for k in keys]
    os.makedirs(config_dir(), exist_ok=True)
    write_atomically(path, sexp.advanced(tuple(acl)).decode("latin-1"))
    os.chmod(path, 0o644)
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


def signing_key() -> SigningKey:
    """The key the daemon signs exports with ([LS] exportPath, checkSecrecy; [AU])."""
    secret = os.path.join(config_dir(), "signing-key.sec")
    try:
        mode = os.stat(secret).st_mode
    except OSError as error:
        raise Leave(f"getting status of `{secret}': {error.strerror}") from None
    if mode & 0o077:
        raise Leave(f"file `{secret}' should be secret (inaccessible to everybody else)!")
    public = secret[:-4] + ".pub"
    try:  # [AU] load-key-pair; its format string keeps "~%", hence the blank line
        with open(public, "rb") as stream:
            q = sexp.find_token(sexp.parse(stream.read()), b"q")
    except OSError as error:
        raise Leave(f"failed to load key pair at '{secret}': {error.strerror}\n") from None
    except sexp.SexpError as error:
        raise NotEmulated(f"cannot read {public}: {error}") from None
    try:
        key = load_key(os.path.join(config_dir(), "signing-key.secret"))
    except SignatureError as error:
        raise NotEmulated(f"cannot sign: {error} (see the emulator's docstring)") from None
    if q is None or q[1:] != (key.public_bytes,):
        raise NotEmulated(f"signing-key.secret does not match {public}")
    return key


def export_paths(files: list[str], recursive: bool) -> int:
    # [A] export-from-store, [S] export-paths and topologically-sorted
    if not files:
        say("guix archive: warning: no arguments specified; creating an empty archive\n")
    infos = closure_infos(files)
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
    key = signing_key() if ordered else None
    output = sys.stdout.buffer
    write_bundle(output, (_nix_export(path, key) for path in ordered if key is not None))
    output.flush()
    return 0


def _nix_export(path: str, key: SigningKey) -> ExportItem:
    """One item as `nix-store --export` writes it (its nar spooled), to be signed by `key`."""
    spool = cast(BinaryIO, tempfile.TemporaryFile())  # noqa: SIM115 (write_bundle reads it)
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(["nix-store", "--export", path], stdout=subprocess.PIPE,
                                   stderr=errors)
        assert process.stdout is not None
        try:
            items = list(read_bundle(cast(BinaryIO, process.stdout), lambda _: spool))
        except ArchiveError:
            items = []
        finally:
            process.stdout.close()
        if process.wait() or len(items) != 1:
            errors.seek(0)
            raise Leave(nix_error(errors.read()))
    spool.seek(0)
    return spool, items[0].path, items[0].references, items[0].deriver, key.sign_guix


_BUNDLE_ERRORS = (  # buildfarm.formats.nar's reasons -> the daemon's messages ([LS], archive.cc)
    ("item marker", "input doesn't look like something created by `nix-store --export'"),
    ("export magic", "normalized archive cannot be imported; wrong format"),
    ("nar magic", "bad archive: input doesn't look like a Nix archive"),
    ("truncated", "unexpected end-of-file"))


def check_signature(item_path: str, signature: str | None, signed: bytes,
                    acl: list[sexp.Sexp]) -> None:
    """[LS] importPath + [AU] validate-signature, in their order."""
    if signature is None:
        raise Leave(f"imported archive of `{item_path}' lacks a signature")
    try:
        parsed = sexp.parse(signature)
    except sexp.SexpError:  # `guix authenticate` dies on a gcry-error; the daemon sees EOF
        raise Leave("unexpected EOF reading an integer") from None
    text = sexp.advanced(parsed).decode("latin-1")  # canonical-sexp->string, ends in "\n"
    subject = sexp.find_token(parsed, b"public-key")
    data = sexp.find_token(parsed, b"data")
    if subject is None or data is None:
        raise Leave(f"corrupt signature data: {text}")
    if subject not in acl:
        raise Leave(f"unauthorized public key: {sexp.advanced(subject).decode('latin-1')}")
    hashed = sexp.find_token(data, b"hash")
    claimed = hashed[2] if hashed is not None and len(hashed) > 2 else None
    q = sexp.find_token(subject, b"q")
    try:
        if not isinstance(claimed, bytes) or q is None or len(q) < 2 or not isinstance(
                q[1], bytes):
            raise SignatureError("invalid", "")
        verify_guix(signature, claimed, [q[1]])  # ECDSA check of the hash it carries
    except SignatureError:
        raise Leave(f"invalid signature: {text}") from None
    if claimed != signed:  # [LS] printHash(hash) != hash2
        raise Leave("signed hash doesn't match actual contents of imported archive; archive "
                    "could be corrupt, or someone is trying to import a Trojan horse")


def import_paths() -> int:
    # [S] import-paths -> [LS] importPaths: each item checked, then imported, in turn
    acl = read_acl(os.path.join(config_dir(), "acl"))
    accepted: list[tuple[str, str, tuple[str, ...], str]] = []  # nar file, path, refs, deriver
    problem: str | None = None
    with tempfile.TemporaryDirectory(prefix="guix-import-") as spool:
        files: list[BinaryIO] = []

        def sink(index: int) -> BinaryIO:
            files.append(open(os.path.join(spool, str(index)), "wb"))  # noqa: SIM115
            return files[-1]

        try:
            for index, item in enumerate(read_bundle(sys.stdin.buffer, sink, trailing_ok=True)):
                check_signature(item.path, item.signature, item.signed_sha256, acl)
                accepted.append((files[index].name, item.path, item.references, item.deriver))
        except Leave as error:
            problem = str(error)
        except ArchiveError as error:
            problem = _bundle_error(str(error))
        finally:
            for stream in files:
                stream.close()
        if accepted:  # what the daemon imported before it stopped
            _nix_import(accepted)
    if problem is not None:
        raise Leave(problem)
    return 0


def _bundle_error(text: str) -> str:
    m = re.search(r"'([^']*)' is not a store path", text)
    if m:
        return f"path `{m[1]}' is not in the store"  # readStorePath
    return next((msg for key, msg in _BUNDLE_ERRORS if key in text), f"bad archive: {text}")


def _nix_import(accepted: list[tuple[str, str, tuple[str, ...], str]]) -> None:
    derivers = {deriver for *_, deriver in accepted if deriver}
    valid = derivers - invalid_paths(derivers)

    def items() -> Iterator[ExportItem]:
        for nar, path, references, deriver in accepted:
            # [LS] importPath registers the deriver only if it is valid (or imported before)
            kept = deriver if deriver in valid else ""
            with open(nar, "rb") as stream:
                yield stream, path, references, kept, None
            valid.add(path)

    with tempfile.TemporaryFile() as bundle:
        write_bundle(cast(BinaryIO, bundle), items())
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
