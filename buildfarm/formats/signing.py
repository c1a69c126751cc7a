"""Signing keys and signatures exactly as Guix and Nix make and check them.

One 32-byte Ed25519 seed serves both. Nix signs narinfo fingerprints with plain Ed25519. Guix
signs with ECDSA over the Ed25519 curve (libgcrypt, RFC 6979 nonces), which no Ed25519 library
can do, so that part is done here with integer arithmetic: the Guix private scalar is
d = clamp(SHA512(seed)[:32]) mod n, whose public point encodes to the Ed25519 public key.
The arithmetic is not constant-time; it only ever runs on the coordinator's own machine.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from buildfarm.errors import BuildfarmError, UsageError
from buildfarm.formats import sexp

SECRET_KEY_FILE = "signing-key.secret"
"""File name `save_key` writes in its directory: one line, the base64 seed."""


class SignatureError(BuildfarmError):
    """A key or signature that is malformed, unauthorized or does not verify.

    `reason` is one of "corrupt", "unauthorized", "hash-mismatch", "invalid", "unsigned",
    "key" (Guix's signature statuses plus a missing signature and a bad key).
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


# --- The Ed25519 curve: -x^2 + y^2 = 1 + d x^2 y^2 over GF(2^255 - 19) -------------------------

P = 2**255 - 19
N = 2**252 + 27742317777372353535851937790883648493  # order of the base point
_D = -121665 * pow(121666, -1, P) % P
_D2 = 2 * _D % P
_SQRT_M1 = pow(2, (P - 1) // 4, P)

_Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, xy = T/Z
_Cached = tuple[int, int, int]  # an affine point as (y - x, y + x, 2d·x·y)
_IDENTITY: _Point = (0, 1, 1, 0)


def _add(p: _Point, q: _Point) -> _Point:
    """add-2008-hwcd-3 (complete for a = -1)."""
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = t1 * _D2 * t2 % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _add_cached(p: _Point, q: _Cached) -> _Point:
    """Add an affine point given in cached form (one multiplication fewer, no Z2)."""
    x1, y1, z1, t1 = p
    a = (y1 - x1) * q[0] % P
    b = (y1 + x1) * q[1] % P
    c = t1 * q[2] % P
    d = 2 * z1 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _double(p: _Point) -> _Point:
    """dbl-2008-hwcd with a = -1."""
    x1, y1, z1, _ = p
    a = x1 * x1 % P
    b = y1 * y1 % P
    c = 2 * z1 * z1 % P
    e = ((x1 + y1) * (x1 + y1) - a - b) % P
    g = b - a
    f = g - c
    h = -a - b
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _affine(p: _Point) -> tuple[int, int]:
    inverse = pow(p[2], -1, P)
    return p[0] * inverse % P, p[1] * inverse % P


def _recover_x(y: int, sign: int) -> int | None:
    """RFC 8032 §5.1.3: the x with parity `sign` on the curve at y, or None."""
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, -1, P) % P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * _SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    return P - x if x & 1 != sign else x


_GY = 4 * pow(5, -1, P) % P
_GX = _recover_x(_GY, 0) or 0
_G: _Point = (_GX, _GY, 1, _GX * _GY % P)


def encode_point(p: _Point) -> bytes:
    """RFC 8032 point encoding: y little-endian, the parity of x in the top bit."""
    x, y = _affine(p)
    return (y | (x & 1) << 255).to_bytes(32, "little")


def decode_point(data: bytes) -> _Point | None:
    if len(data) != 32:
        return None
    value = int.from_bytes(data, "little")
    y = value & ((1 << 255) - 1)
    x = _recover_x(y, value >> 255)
    if x is None:
        return None
    return (x, y, 1, x * y % P)


@functools.cache
def _base_table() -> tuple[tuple[_Cached, ...], ...]:
    """j·16^i·G for i < 64, 1 <= j < 16, affine and cached: a fixed-base multiplication is then
    at most 64 additions and no doublings."""
    rows: list[tuple[_Cached, ...]] = []
    base = _G
    for _ in range(64):
        multiples = [base]
        for _ in range(14):
            multiples.append(_add(multiples[-1], base))
        cached = []
        for point in multiples:
            x, y = _affine(point)
            cached.append(((y - x) % P, (y + x) % P, _D2 * x * y % P))
        rows.append(tuple(cached))
        base = _add(multiples[-1], base)  # 16 times the previous base
    return tuple(rows)


def _mul_base(scalar: int) -> _Point:
    table = _base_table()
    result = _IDENTITY
    scalar %= N
    for row in table:
        digit = scalar & 15
        if digit:
            result = _add_cached(result, row[digit - 1])
        scalar >>= 4
        if not scalar:
            break
    return result


def _mul(scalar: int, point: _Point) -> _Point:
    """Fixed 4-bit window multiplication of any point."""
    multiples = [_IDENTITY, point]
    for _ in range(14):
        multiples.append(_add(multiples[-1], point))
    result = _IDENTITY
    for shift in range(((scalar.bit_length() + 3) // 4 - 1) * 4, -1, -4):
        result = _double(_double(_double(_double(result))))
        digit = (scalar >> shift) & 15
        if digit:
            result = _add(result, multiples[digit])
    return result


# --- ECDSA over Ed25519 as libgcrypt does it --------------------------------------------------

_QBITS = 253  # bit length of N


def _hash_to_int(digest: bytes) -> int:
    """libgcrypt's `_gcry_dsa_normalize_hash`: the leftmost 253 bits."""
    value = int.from_bytes(digest, "big")
    excess = len(digest) * 8 - _QBITS
    return value >> excess if excess > 0 else value


def _rfc6979_nonces(secret: int, digest: bytes) -> Iterable[int]:
    """RFC 6979 §3.2 with HMAC-SHA256, q = N: the first nonce, then the retries."""

    def mac(key: bytes, data: bytes) -> bytes:
        return hmac.new(key, data, hashlib.sha256).digest()

    x = secret.to_bytes(32, "big")
    z = _hash_to_int(digest)
    h1 = (z - N if z >= N else z).to_bytes(32, "big")
    v = b"\x01" * 32
    k = mac(b"\x00" * 32, v + b"\x00" + x + h1)
    v = mac(k, v)
    k = mac(k, v + b"\x01" + x + h1)
    v = mac(k, v)
    while True:
        v = mac(k, v)  # 32 bytes of HMAC output cover the 253 bits of N
        candidate = int.from_bytes(v, "big") >> (256 - _QBITS)
        if 0 < candidate < N:
            yield candidate
        k = mac(k, v + b"\x00")
        v = mac(k, v)


def _ecdsa_sign(secret: int, digest: bytes) -> tuple[int, int]:
    e = _hash_to_int(digest)
    for nonce in _rfc6979_nonces(secret, digest):
        x, _ = _affine(_mul_base(nonce))
        r = x % N
        if not r:
            continue
        s = pow(nonce, -1, N) * (e + r * secret) % N
        if s:
            return r, s
    raise AssertionError("unreachable")  # pragma: no cover


def _ecdsa_verify(public: bytes, digest: bytes, r: int, s: int) -> bool:
    point = decode_point(public)
    if point is None or not (0 < r < N and 0 < s < N):
        return False
    w = pow(s, -1, N)
    total = _add(_mul_base(_hash_to_int(digest) * w % N), _mul(r * w % N, point))
    if total[2] % P == 0:
        return False
    x, _ = _affine(total)
    return x % N == r


# --- Keys -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _derive(seed: bytes) -> tuple[int, bytes]:
    """The Guix scalar d and the public key (Ed25519 public key == Guix q) of a seed."""
    scalar = int.from_bytes(hashlib.sha512(seed).digest()[:32], "little")
    scalar = (scalar & ((1 << 254) - 8)) | (1 << 254)
    d = scalar % N
    return d, encode_point(_mul_base(d))


def _mpi(value: int) -> bytes:
    """An unsigned MPI as libgcrypt prints it: minimal big-endian bytes."""
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _public_key_sexp(public: bytes) -> sexp.Sexp:
    return (b"public-key", (b"ecc", (b"curve", b"Ed25519"), (b"q", public)))


def _text(value: sexp.Sexp) -> str:
    """Advanced format, always ASCII (for messages): the rare atom libgcrypt would print with
    raw bytes 0xA1-0xFF is written #HEX#, which reads the same."""
    return sexp.advanced(value, ascii_only=True).decode("ascii")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An Ed25519 seed: signs Guix archives and narinfos (ECDSA) and Nix narinfos (Ed25519)."""

    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, bytes) or len(self.seed) != 32:
            raise SignatureError("key", "a signing key seed is exactly 32 bytes")

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(32))

    @property
    def public_bytes(self) -> bytes:
        """The 32-byte Ed25519 public key, which is also Guix's `q`."""
        return _derive(self.seed)[1]

    @property
    def guix_scalar(self) -> int:
        return _derive(self.seed)[0]

    def guix_public_sexp(self) -> str:
        """signing-key.pub as `guix archive --generate-key` writes it."""
        return _text(_public_key_sexp(self.public_bytes))

    def guix_private_sexp(self) -> str:
        """signing-key.sec as `guix archive --generate-key` writes it (q and d)."""
        ecc = (b"ecc", (b"curve", b"Ed25519"), (b"q", self.public_bytes),
               (b"d", _mpi(self.guix_scalar)))
        return _text((b"private-key", ecc))

    def nix_public(self, name: str) -> str:
        """The `trusted-public-keys` form, `name:base64(pk)`."""
        return f"{_nix_key_name(name)}:{base64.b64encode(self.public_bytes).decode('ascii')}"

    def nix_secret(self, name: str) -> str:
        """The `secret-key-files` form, `name:base64(seed‖pk)` (libsodium's secret key)."""
        both = base64.b64encode(self.seed + self.public_bytes).decode("ascii")
        return f"{_nix_key_name(name)}:{both}"

    def sign_guix(self, digest: bytes) -> bytes:
        """Guix's signature s-expression over a SHA-256 digest, in advanced format (ASCII: an
        atom libgcrypt would print as raw bytes is written #HEX#, which reads the same)."""
        if len(digest) != 32:
            raise SignatureError("corrupt", f"a SHA-256 digest is 32 bytes, not {len(digest)}")
        r, s = _ecdsa_sign(self.guix_scalar, digest)
        signature = (
            b"signature",
            (b"data", (b"flags", b"rfc6979"), (b"hash", b"sha256", digest)),
            (b"sig-val", (b"ecdsa", (b"r", _mpi(r)), (b"s", _mpi(s)))),
            _public_key_sexp(self.public_bytes),
        )
        return sexp.advanced(signature, ascii_only=True)

    def sign_nix(self, fingerprint: bytes) -> bytes:
        """The 64-byte Ed25519 signature that goes (base64) in a narinfo `Sig:` line."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(fingerprint)


def _nix_key_name(name: str) -> str:
    if not name or ":" in name or any(c.isspace() for c in name):
        raise SignatureError("key", f"invalid Nix key name {name!r}")
    return name


def parse_nix_key(text: str) -> tuple[str, bytes]:
    """`name:base64` (a Nix public or secret key) -> (name, decoded bytes)."""
    name, colon, encoded = text.strip().partition(":")
    try:
        if not colon or not name:
            raise ValueError("no name")
        return name, base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        raise SignatureError("key", "a Nix key has the form NAME:BASE64") from None


def save_key(key: SigningKey, directory: str | os.PathLike[str], *,
             overwrite: bool = False) -> Path:
    """Write the seed to DIRECTORY/signing-key.secret with mode 0600 (atomically); return it."""
    path = Path(directory) / SECRET_KEY_FILE
    if path.exists() and not overwrite:
        raise UsageError(f"a signing key already exists at '{path}'; remove it first")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new state directory: private
    temporary = path.with_name(f".{SECRET_KEY_FILE}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as stream:
            stream.write(base64.b64encode(key.seed).decode("ascii") + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def load_key(path: str | os.PathLike[str]) -> SigningKey:
    """Read a key written by `save_key` (a file or its directory), or a Nix secret-key file.

    Like Guix, refuse a key file that others can read.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SECRET_KEY_FILE
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise SignatureError("key", f"no signing key at '{path}'") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SignatureError("key", f"cannot read signing key '{path}': {error}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SignatureError(
            "key", f"file '{path}' should be secret (inaccessible to everybody else)!")
    if ":" in text:  # a Nix secret key, name:base64(seed‖pk)
        _, raw = parse_nix_key(text)
        if len(raw) != 64:
            raise SignatureError("key", f"'{path}': a Nix secret key holds 64 bytes")
        key = SigningKey(raw[:32])
        if key.public_bytes != raw[32:]:
            raise SignatureError("key", f"'{path}': the public half does not match the seed")
        return key
    try:
        seed = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise SignatureError("key", f"'{path}' does not hold a base64 seed") from None
    if len(seed) != 32:
        raise SignatureError("key", f"'{path}' does not hold a 32-byte seed")
    return SigningKey(seed)


def guix_public_key_from_sexp(text: str | bytes) -> bytes:
    """q out of `(public-key (ecc (curve Ed25519) (q #..#)))` in any libgcrypt syntax."""
    try:
        value = sexp.parse(text)
    except sexp.SexpError as error:
        raise SignatureError("key", f"not a public key: {error}") from None
    match value:
        case (b"public-key", (b"ecc", (b"curve", b"Ed25519"), (b"q", bytes(q)))) if len(q) == 32:
            return q
    raise SignatureError("key", "s-expression does not denote a public key (Ed25519 expected)")


def guix_acl_keys(text: str | bytes) -> list[bytes]:
    """The Ed25519 keys (q) an /etc/guix/acl authorizes: `(acl (entry PUBLIC-KEY (tag (guix
    import))) ...)` (Guix guix/pki.scm acl->public-keys); other entries are skipped."""
    try:
        value = sexp.parse(text)
    except sexp.SexpError as error:
        raise SignatureError("key", f"not an access-control list: {error}") from None
    if isinstance(value, bytes) or not value or value[0] != b"acl":
        raise SignatureError("key", "not an access-control list: (acl ...) expected")
    keys: list[bytes] = []
    for entry in value[1:]:
        match entry:
            case (b"entry", (b"public-key", (b"ecc", (b"curve", b"Ed25519"), (b"q", bytes(q)))),
                  (b"tag", (b"guix", b"import"))) if len(q) == 32:
                keys.append(q)
    return keys


# --- Guix verification ------------------------------------------------------------------------

_HASH_MISMATCH = (
    "signed hash doesn't match actual contents of imported archive; archive could be corrupt, "
    "or someone is trying to import a Trojan horse"
)
# What libgcrypt 1.10 accepts around an ECDSA verification (checked with ctypes); rarer
# shapes that libgcrypt also accepts (OIDs as hash names, the `pss` flag) are refused here.
_DATA_FLAGS = frozenset({b"rfc6979", b"raw", b"no-blinding", b"param", b"comp", b"nocomp",
                         b"transient-key", b"no-keytest"})
_HASH_NAMES = frozenset({b"sha1", b"md5", b"sha256", b"ripemd160", b"rmd160", b"sha384",
                         b"sha512", b"sha224", b"sha3-224", b"sha3-256", b"sha3-384",
                         b"sha3-512", b"sm3", b"sha512-224", b"sha512-256"})
_ECDSA_NAMES = frozenset({b"ecdsa", b"ecc", b"ecdh"})


def verify_guix(signature_sexp: bytes, digest: bytes, authorized: Iterable[bytes]) -> None:
    """Check a Guix signature over `digest` made by one of the `authorized` public keys (q).

    The signature is bytes, not text: `guix authenticate` writes what libgcrypt prints, and
    libgcrypt prints an atom (the signed hash, r or s) whose bytes it deems printable as a
    quoted string, raw bytes 0xA1-0xFF included; that is not UTF-8.

    The checks and their order are Guix's `%signature-status`: corrupt (no `data` or
    `public-key`), unauthorized public key (structural match with an ACL entry), hash mismatch
    (`(hash ALGO VALUE)` against `digest`), invalid signature (libgcrypt's `gcry_pk_verify`).
    """
    try:
        signature = sexp.parse(signature_sexp)
    except sexp.SexpError as error:
        raise SignatureError("corrupt", f"corrupt signature data: {error}") from None
    subject = sexp.find_token(signature, b"public-key")
    data = sexp.find_token(signature, b"data")
    if subject is None or data is None:
        raise SignatureError("corrupt", f"corrupt signature data: {_text(signature).rstrip()}")
    if all(subject != _public_key_sexp(bytes(q)) for q in authorized):
        raise SignatureError("unauthorized", f"unauthorized public key: {_text(subject).rstrip()}")
    hash_list = sexp.find_token(data, b"hash")
    if hash_list is None or len(hash_list) < 3 or hash_list[2] != digest:
        raise SignatureError("hash-mismatch", _HASH_MISMATCH)
    if not _gcry_verify(signature, data, subject, digest):
        raise SignatureError("invalid", f"invalid signature: {_text(signature).rstrip()}")


def _gcry_verify(
    signature: sexp.Sexp, data: tuple[sexp.Sexp, ...], subject: tuple[sexp.Sexp, ...],
    digest: bytes,
) -> bool:
    """What `gcry_pk_verify` decides for the shapes Guix produces (ECDSA, rfc6979 data)."""
    sig_val = sexp.find_token(signature, b"sig-val")
    if sig_val is None:
        return False
    algorithms = [item for item in sig_val[1:3] if isinstance(item, tuple) and item]
    if algorithms and algorithms[0][0] == b"flags":  # libgcrypt skips a flags list here
        algorithms = algorithms[1:]
    if not algorithms or algorithms[0][0] not in _ECDSA_NAMES:
        return False
    algorithm = algorithms[0]
    flags = sexp.find_token(data, b"flags")
    if flags is None or not {b"rfc6979", b"raw"} & set(flags[1:]):
        return False  # libgcrypt: "Conflicting use"
    if any(flag not in _DATA_FLAGS for flag in flags[1:]):
        return False
    hash_list = sexp.find_token(data, b"hash")
    if hash_list is None or len(hash_list) != 3 or not isinstance(hash_list[1], bytes):
        return False
    if hash_list[1].lower() not in _HASH_NAMES:
        return False
    numbers = []
    for name in (b"r", b"s"):
        found = sexp.find_token(algorithm, name)
        if found is None or len(found) < 2 or not isinstance(found[1], bytes):
            return False
        numbers.append(int.from_bytes(found[1], "big"))
    match subject:  # (public-key (ecc (curve Ed25519) (q Q))), as the ACL match checked
        case (_, (_, _, (_, bytes(public)))):
            return _ecdsa_verify(public, digest, numbers[0], numbers[1])
    return False


# --- Narinfo ----------------------------------------------------------------------------------

_NIX32_ALPHABET = frozenset("0123456789abcdfghijklmnpqrsvwxyz")


def narinfo_fingerprint(
    store_path: str, nar_hash_nix32: str, nar_size: int, references: Iterable[str],
) -> bytes:
    """What Nix signs for a narinfo: `1;PATH;sha256:NIX32;SIZE;REF,REF` (full paths, sorted)."""
    nar_hash = nar_hash_nix32.removeprefix("sha256:")
    if len(nar_hash) != 52 or not set(nar_hash) <= _NIX32_ALPHABET:
        raise SignatureError("corrupt", f"not a nix-base32 SHA-256: {nar_hash_nix32!r}")
    if nar_size <= 0:
        raise SignatureError(
            "corrupt", f"cannot calculate fingerprint of path '{store_path}' because its size "
            "is not known")
    paths = sorted(set(references))
    for path in (store_path, *paths):
        if not path.startswith("/"):
            raise SignatureError("corrupt", f"a fingerprint needs full store paths, not {path!r}")
    text = f"1;{store_path};sha256:{nar_hash};{nar_size};{','.join(paths)}"
    return text.encode("utf-8")


def verify_nix(fingerprint: bytes, sig: bytes, public: bytes) -> bool:
    """Whether `sig` is the Ed25519 signature of `fingerprint` by `public` (32 bytes)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(public) != 32 or len(sig) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(sig, fingerprint)
    except InvalidSignature:
        return False
    return True


def guix_narinfo_signature_line(key: SigningKey, signed_text: str, host: str) -> str:
    """`Signature: 1;HOST;BASE64` (no newline) for the narinfo text above it, as `guix publish`
    signs it: the SHA-256 of the UTF-8 text, the signature s-expression in advanced format."""
    if ";" in host or "\n" in host:
        raise SignatureError("key", f"invalid host name for a narinfo signature: {host!r}")
    digest = hashlib.sha256(signed_text.encode("utf-8")).digest()
    encoded = base64.b64encode(key.sign_guix(digest)).decode("ascii")
    return f"Signature: 1;{host};{encoded}"


_SIGNED_FIELDS = ("StorePath", "NarHash", "References")


def verify_guix_narinfo(narinfo_text: str, authorized: Iterable[bytes]) -> None:
    """Guix's `valid-narinfo?`, raising SignatureError with the reason it is not valid."""
    index = narinfo_text.find("Signature:")
    if index < 0:
        raise SignatureError("unsigned", "narinfo lacks a signature")
    signed = narinfo_text[:index]
    names = {line.partition(":")[0] for line in signed.splitlines() if ": " in line}
    missing = [name for name in _SIGNED_FIELDS if name not in names]
    if missing:
        raise SignatureError(
            "unsigned", f"narinfo signature does not cover {', '.join(missing)}")
    value = next((line[len("Signature: "):] for line in narinfo_text.splitlines()
                  if line.startswith("Signature: ")), "")
    parts = value.split(";")
    if len(parts) != 3:
        raise SignatureError("corrupt", f"invalid format of the signature field: {value}")
    version, _host, encoded = parts
    if not version.strip().isdigit() or int(version) != 1:
        raise SignatureError("corrupt", f"unsupported signature version: {version}")
    try:
        signature = base64.b64decode(encoded.strip(), validate=True)
        signature.decode("utf-8")  # Guix reads it with utf8->string
    except (binascii.Error, UnicodeDecodeError):
        raise SignatureError("corrupt", "signature is not valid base64 UTF-8") from None
    verify_guix(signature, hashlib.sha256(signed.encode("utf-8")).digest(), authorized)

