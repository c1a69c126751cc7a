"""Keys, the ACL and signatures as Guix handles them ([PKI] guix/pki.scm, [AU]
guix/scripts/authenticate.scm, [NI] guix/narinfo.scm), on libgcrypt (gcrypt.py).

The daemon signs an export and checks an import by talking to `guix authenticate` ([LS]
signHash, verifySignature); `sign_hash` and `verify_signature` are those two requests, with the
agent's replies turned into the daemon's errors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile

from guix_emulator.gcrypt import GcryptError, Sexp, generate_key, sign, verify
from guix_emulator.options import Leave, NotEmulated, config_dir, say
from guix_emulator.serialization import ExportItem

DEFAULT_KEY_PARAMETERS = "(genkey (ecdsa (curve Ed25519) (flags rfc6979)))"  # [A]
_IMPORT_TAG = "(tag (guix import))"
# What the daemon says when `guix authenticate` died instead of replying ([LS] readInteger):
# the agent lets any error but a formatted message escape (e.g. a gcry-error reading a sexp).
AGENT_DIED = "unexpected EOF reading an integer"


def key_files() -> tuple[str, str]:
    """[PKI] %public-key-file and %private-key-file."""
    return (os.path.join(config_dir(), "signing-key.pub"),
            os.path.join(config_dir(), "signing-key.sec"))


def acl_file() -> str:
    return os.path.join(config_dir(), "acl")  # [PKI] %acl-file


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


def generate_key_pair() -> None:
    """[A] generate-key-pair with the default parameters."""
    public_file, secret_file = key_files()
    if os.path.exists(public_file) or os.path.exists(secret_file):
        raise Leave(f"key pair exists under '{config_dir()}'; remove it first")
    say("Please wait while gathering entropy to generate the key pair;\nthis may take time...\n")
    try:
        parameters = Sexp.parse(DEFAULT_KEY_PARAMETERS)
        assert parameters is not None
        pair = generate_key(parameters)
    except GcryptError as error:
        raise Leave(f"key generation failed: {error.source}: {error.text}") from None
    public, secret = pair.find("public-key"), pair.find("private-key")
    assert public is not None and secret is not None
    old = os.umask(0o266)  # "Create the following files as #o400."
    try:
        os.makedirs(config_dir(), exist_ok=True)
        write_atomically(public_file, public.text())
        write_atomically(secret_file, secret.text())
    finally:
        os.umask(old)
    os.chmod(public_file, 0o444)


def public_keys_to_acl(keys: list[Sexp]) -> Sexp:
    """[PKI] public-keys->acl: every key authorized for imports, duplicates dropped."""
    entries = "".join(f"(entry {key.text()} {_IMPORT_TAG})" for key in dict.fromkeys(keys))
    acl = Sexp.parse(f"(acl {entries})")
    assert acl is not None
    return acl


def acl_public_keys(acl: Sexp) -> list[Sexp]:
    """[PKI] acl->public-keys: the subjects of an (acl (entry KEY (tag (guix import)))...)."""
    tag = Sexp.parse(_IMPORT_TAG)
    keys: list[Sexp] = []
    entries = [acl.nth(i) for i in range(1, len(acl))] if acl.nth_data(0) == b"acl" else [None]
    for entry in entries:
        key = entry.nth(1) if entry is not None else None
        if (entry is None or len(entry) != 3 or entry.nth_data(0) != b"entry" or key is None
                or entry.nth(2) != tag):
            raise Leave("invalid access-control list")
        keys.append(key)
    return keys


def current_acl() -> list[Sexp]:
    """[PKI] current-acl, as its public keys; ensure-acl first writes an ACL authorizing the
    host's own public key when there is none."""
    path, public_file = acl_file(), key_files()[0]
    if not os.path.exists(path) and os.path.exists(public_file):
        with open(public_file, "rb") as stream:
            own = _read_sexp(stream.read(), "invalid public key")
        write_acl([own])
    if not os.path.exists(path):
        return []
    with open(path, "rb") as stream:
        acl = _read_sexp(stream.read(), "invalid access-control list")
    return acl_public_keys(acl)


def write_acl(keys: list[Sexp]) -> None:
    """[A] authorize-key's end: [PKI] write-acl, atomically, mode 0644."""
    os.makedirs(config_dir(), exist_ok=True)
    write_atomically(acl_file(), public_keys_to_acl(keys).text())
    os.chmod(acl_file(), 0o644)


def _read_sexp(data: bytes, what: str) -> Sexp:
    try:
        parsed = Sexp.parse(data)
    except GcryptError as error:
        raise Leave(f"{what}: {error.text}") from None
    if parsed is None:
        raise Leave(what)
    return parsed


def hash_data(sha256: bytes) -> Sexp:
    """[GG] bytevector->hash-data for an ECC key (its flag rfc6979)."""
    data = Sexp.parse(f"(data (flags rfc6979) (hash sha256 #{sha256.hex()}#))")
    assert data is not None
    return data


def sign_hash(sha256: bytes) -> str:
    """[LS] signHash: `guix authenticate`'s sign request with signing-key.sec ([AU]
    load-key-pair, sign-with-key; [PKI] signature-sexp); the signature's text."""
    secret_file = key_files()[1]
    try:
        with open(secret_file, "rb") as stream:
            secret_text = stream.read()
        with open(secret_file[:-4] + ".pub", "rb") as stream:
            public_text = stream.read()
    except OSError as error:  # [AU] its format string keeps "~%": the message ends in "\n"
        raise Leave(f"failed to load key pair at '{secret_file}': {error.strerror}\n") from None
    try:
        secret, public = Sexp.parse(secret_text), Sexp.parse(public_text)
        if secret is None or public is None:
            raise Leave(AGENT_DIED)
        if public.find("ecc") is None:  # [AU] sign-with-key: #:key-type (key-type public-key)
            raise NotEmulated("only ECC signing keys are emulated")
        return signature_sexp(hash_data(sha256), secret, public).text()
    except GcryptError:
        raise Leave(AGENT_DIED) from None


def signature_sexp(data: Sexp, secret_key: Sexp, public_key: Sexp) -> Sexp:
    """[PKI] signature-sexp: (signature DATA SIG-VAL PUBLIC-KEY), read back from its text."""
    signature = sign(data, secret_key)
    parsed = Sexp.parse(f"(signature {data.text()} {signature.text()} {public_key.text()})")
    assert parsed is not None
    return parsed


def check_import(item: ExportItem, acl: list[Sexp]) -> None:
    """[LS] importPath, once the item is read: a signature is required even from a trusted
    user, and the hash it signs must be the item's own."""
    if item.signature is None:
        raise Leave(f"imported archive of `{item.path}' lacks a signature")
    if verify_signature(item.signature, acl) != item.sha256:
        raise Leave("signed hash doesn't match actual contents of imported archive; archive "
                    "could be corrupt, or someone is trying to import a Trojan horse")


def verify_signature(signature_text: bytes, acl: list[Sexp]) -> bytes:
    """[LS] verifySignature: `guix authenticate`'s verify request ([AU] validate-signature,
    [PKI] signature-subject, signature-signed-data, authorized-key?, valid-signature?);
    the sha256 the signature carries."""
    try:
        signature = Sexp.parse(signature_text)
    except GcryptError:
        raise Leave(AGENT_DIED) from None
    if signature is None:
        raise Leave(AGENT_DIED)
    subject, data = signature.find("public-key"), signature.find("data")
    if subject is None or data is None:
        raise Leave(f"corrupt signature data: {signature.text()}")
    if subject not in acl:
        raise Leave(f"unauthorized public key: {subject.text()}")
    sig_val = signature.find("sig-val")
    if sig_val is None or not verify(sig_val, data, subject):
        raise Leave(f"invalid signature: {signature.text()}")
    hashed = data.find("hash")  # [GG] hash-data->bytevector
    digest = hashed.nth_data(2) if hashed is not None else None
    if digest is None:
        raise Leave(AGENT_DIED)  # bytevector->base16-string of #f: the agent dies
    return digest


def narinfo_signed(text: str, acl: list[Sexp]) -> bool:
    """[NI] guix/narinfo.scm valid-narinfo?: the "Signature: 1;HOST;BASE64" line signs the
    sha256 of the text above the first "Signature:", with a key of ACL ([PKI]
    %signature-status: valid-signature, and nothing else, is true)."""
    at = text.find("Signature:")
    if at < 0:
        return False
    version, _, rest = text[at:].split("\n", 1)[0].removeprefix("Signature:").strip().partition(";")
    _host, _, encoded = rest.partition(";")
    try:
        signature = Sexp.parse(base64.b64decode(encoded, validate=True))
    except (binascii.Error, GcryptError):
        return False
    if version != "1" or signature is None:
        return False
    subject, data = signature.find("public-key"), signature.find("data")
    if subject is None or data is None or subject not in acl:
        return False
    hashed = data.find("hash")
    if hashed is None or hashed.nth_data(2) != hashlib.sha256(text[:at].encode()).digest():
        return False
    sig_val = signature.find("sig-val")
    return sig_val is not None and verify(sig_val, data, subject)
