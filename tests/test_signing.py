"""Keys and signatures, checked byte for byte against libgcrypt (what Guix signs with, through
ctypes), against the `cryptography` package's Ed25519, and against Nix itself (`nix store sign`)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest
from guix_emulator import gcrypt
from guix_emulator.gcrypt import GCRYSEXP_FMT_ADVANCED, GCRYSEXP_FMT_CANON, GcryptError, Sexp
from guix_emulator.pki import hash_data, signature_sexp
from hypothesis import given, settings
from hypothesis import strategies as st

from buildfarm.errors import BuildfarmError, UsageError
from buildfarm.formats import sexp, signing
from buildfarm.formats.signing import SignatureError, SigningKey

DATA = Path(__file__).parent / "data"
SEEDS = [hashlib.sha256(b"seed %d" % i).digest() for i in range(6)]
DIGESTS = [hashlib.sha256(b"digest %d" % i).digest() for i in range(6)]


# --- libgcrypt through ctypes (the Guix emulator's binding: tests/guix_emulator/gcrypt.py) ------


@pytest.fixture(scope="module")
def libgcrypt() -> None:
    needs.libgcrypt()


def gcry(text: bytes | str) -> Sexp:
    """libgcrypt's reading of TEXT (GcryptError if it refuses it)."""
    parsed = Sexp.parse(text)
    assert parsed is not None, text
    return parsed


def found(parsed: Sexp, token: str) -> Sexp:
    sub = parsed.find(token)
    assert sub is not None, (parsed.text(), token)
    return sub


# --- Keys ---------------------------------------------------------------------------------------


def test_public_key_is_the_ed25519_public_key() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    for seed in SEEDS:
        expected = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw)
        assert SigningKey(seed).public_bytes == expected


def test_key_files_match_libgcrypt_and_libgcrypt_accepts_our_private_key(
    libgcrypt: None,
) -> None:
    for seed in SEEDS:
        key = SigningKey(seed)
        public, private = key.guix_public_sexp(), key.guix_private_sexp()
        assert gcry(public).text() == public
        assert gcry(private).text() == private
        # gcry_pk_testkey recomputes q from d: our scalar and point encoding agree with it.
        assert gcrypt.key_status(gcry(private)) == "Success"
        assert public.startswith("(public-key \n (ecc \n  (curve Ed25519)\n  (q #")
        assert public.endswith("#)\n  )\n )\n")
        assert guix_q(public) == key.public_bytes


def test_key_layout_of_guix_archive_generate_key(libgcrypt: None) -> None:
    """Keys made the way `guix archive --generate-key` makes them: our arithmetic finds the same
    q from d, and our printer writes the same files."""
    for _ in range(4):
        pair = gcrypt.generate_key(gcry("(genkey (ecdsa (curve Ed25519) (flags rfc6979)))"))
        public_text = found(pair, "public-key").printed(GCRYSEXP_FMT_ADVANCED)
        private_text = found(pair, "private-key").printed(GCRYSEXP_FMT_ADVANCED)
        private = sexp.parse(private_text)
        assert private[0] == b"private-key" and isinstance(private[1], tuple)
        d_list = sexp.find_token(private, b"d")
        assert d_list is not None and isinstance(d_list[1], bytes)
        q = signing.encode_point(signing._mul_base(int.from_bytes(d_list[1], "big")))
        ours = (b"public-key", (b"ecc", (b"curve", b"Ed25519"), (b"q", q)))
        assert sexp.advanced(ours) == public_text
        assert sexp.advanced(private) == private_text
        assert signing.guix_public_key_from_sexp(public_text) == q


def guix_q(text: str) -> bytes:
    return signing.guix_public_key_from_sexp(text)


def test_nix_key_forms() -> None:
    key = SigningKey(SEEDS[0])
    name, public = signing.parse_nix_key(key.nix_public("cache.example.org-1"))
    assert (name, public) == ("cache.example.org-1", key.public_bytes)
    name, secret = signing.parse_nix_key(key.nix_secret("cache.example.org-1"))
    assert secret == key.seed + key.public_bytes
    with pytest.raises(SignatureError):
        key.nix_public("bad:name")
    with pytest.raises(SignatureError):
        signing.parse_nix_key("no-colon")


def test_seed_must_be_32_bytes_and_is_not_shown() -> None:
    with pytest.raises(SignatureError):
        SigningKey(b"short")
    key = SigningKey.generate()
    assert key.seed.hex() not in repr(key)
    assert key != SigningKey.generate()


def test_save_and_load(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = signing.save_key(key, tmp_path / "state")
    assert path.stat().st_mode & 0o777 == 0o600
    assert signing.load_key(path) == key
    assert signing.load_key(tmp_path / "state") == key
    with pytest.raises(UsageError, match="already exists"):
        signing.save_key(SigningKey.generate(), tmp_path / "state")
    other = SigningKey.generate()
    signing.save_key(other, tmp_path / "state", overwrite=True)
    assert signing.load_key(path) == other
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [signing.SECRET_KEY_FILE]


def test_load_refuses_readable_missing_or_bad_files(tmp_path: Path) -> None:
    path = signing.save_key(SigningKey.generate(), tmp_path)
    path.chmod(0o644)
    with pytest.raises(SignatureError, match="should be secret"):
        signing.load_key(path)
    with pytest.raises(SignatureError, match="no signing key"):
        signing.load_key(tmp_path / "nothing")
    path.chmod(0o600)
    path.write_text("not base64!\n")
    with pytest.raises(SignatureError):
        signing.load_key(path)
    key = SigningKey(SEEDS[1])
    path.write_text(key.nix_secret("n") + "\n")
    assert signing.load_key(path) == key
    path.write_text("n:" + base64.b64encode(key.seed + SigningKey(SEEDS[2]).public_bytes).decode())
    with pytest.raises(SignatureError, match="does not match"):
        signing.load_key(path)


def test_public_key_from_any_syntax() -> None:
    key = SigningKey(SEEDS[3])
    q = key.public_bytes
    canonical = b"(10:public-key(3:ecc(5:curve7:Ed25519)(1:q32:" + q + b")))"
    assert signing.guix_public_key_from_sexp(canonical) == q
    assert signing.guix_public_key_from_sexp(key.guix_public_sexp()) == q
    one_line = f'(public-key (ecc (curve "Ed25519") (q |{base64.b64encode(q).decode()}|)))'
    assert signing.guix_public_key_from_sexp(one_line) == q
    for bad in [
        key.guix_private_sexp(),
        "(public-key (ecc (curve NIST-P256) (q #00#)))",
        f"(public-key (rsa (n #{q.hex()}#) (e #010001#)))",
        "(public-key (ecc (curve Ed25519) (q #0102#)))",
        "(public-key",
        "",
    ]:
        with pytest.raises(SignatureError) as caught:
            signing.guix_public_key_from_sexp(bad)
        assert isinstance(caught.value, BuildfarmError)


# --- Guix signatures against libgcrypt ----------------------------------------------------------


def libgcrypt_signature(key: SigningKey, digest: bytes) -> bytes:
    """A Guix signature made entirely by libgcrypt, as guix/pki.scm `signature-sexp` builds it."""
    signature = signature_sexp(hash_data(digest), gcry(key.guix_private_sexp()),
                               gcry(key.guix_public_sexp()))
    printed = signature.printed(GCRYSEXP_FMT_ADVANCED)
    if not printed.isascii():
        # libgcrypt printed an atom with raw bytes 0xA1-0xFF; we write that atom #HEX#
        # (ASCII, read identically): compare with libgcrypt's own reading of ours instead.
        return sexp.advanced(sexp.parse(printed), ascii_only=True)
    return printed


def test_signatures_are_byte_for_byte_libgcrypt(libgcrypt: None) -> None:
    for seed, digest in zip(SEEDS, DIGESTS, strict=True):
        key = SigningKey(seed)
        ours = key.sign_guix(digest)
        assert ours == libgcrypt_signature(key, digest)
        assert ours.endswith(b" )\n") and b"(flags rfc6979)" in ours


@settings(deadline=None, max_examples=25)
@given(seed=st.binary(min_size=32, max_size=32), digest=st.binary(min_size=32, max_size=32))
def test_random_signatures_are_libgcrypts(libgcrypt: None, seed: bytes, digest: bytes) -> None:
    key = SigningKey(seed)
    assert key.sign_guix(digest) == libgcrypt_signature(key, digest)


def test_each_side_verifies_the_other(libgcrypt: None) -> None:
    for seed, digest in zip(SEEDS, DIGESTS, strict=True):
        key = SigningKey(seed)
        ours = key.sign_guix(digest)
        public = gcry(key.guix_public_sexp())
        assert gcrypt.verify(found(gcry(ours), "sig-val"), hash_data(digest), public)
        signing.verify_guix(libgcrypt_signature(key, digest), digest, [key.public_bytes])


def test_a_signature_libgcrypt_prints_with_raw_bytes_verifies(libgcrypt: None) -> None:
    """libgcrypt prints an atom whose bytes it deems printable as a quoted string, bytes
    0xA1-0xFF as they are (sexp.c suitable_encoding): here the signed hash. That is not UTF-8,
    and it is what `guix archive --export` writes; it is read as libgcrypt reads it."""
    key = SigningKey(SEEDS[0])
    digest = b"g" + bytes(range(0xA1, 0xA1 + 31))
    printed = signature_sexp(hash_data(digest), gcry(key.guix_private_sexp()),
                             gcry(key.guix_public_sexp())).printed(GCRYSEXP_FMT_ADVANCED)
    assert b'(hash sha256 "g\xa1\xa2\xa3' in printed
    with pytest.raises(UnicodeDecodeError):
        printed.decode("utf-8")
    signing.verify_guix(printed, digest, [key.public_bytes])
    with pytest.raises(SignatureError) as caught:
        signing.verify_guix(printed, DIGESTS[0], [key.public_bytes])
    assert caught.value.reason == "hash-mismatch"
    assert key.sign_guix(digest) == sexp.advanced(sexp.parse(printed), ascii_only=True)


def flip_s(text: bytes) -> bytes:
    value = sexp.parse(text)
    s_list = sexp.find_token(value, b"s")
    assert s_list is not None and isinstance(s_list[1], bytes)
    flipped = bytes([s_list[1][0] ^ 0x01]) + s_list[1][1:]
    return text.replace(s_list[1].hex().upper().encode(), flipped.hex().upper().encode())


def test_a_flipped_bit_is_rejected_by_both(libgcrypt: None) -> None:
    key, digest = SigningKey(SEEDS[0]), DIGESTS[0]
    public = gcry(key.guix_public_sexp())
    bad = flip_s(key.sign_guix(digest))
    assert gcrypt.verify_status(found(gcry(bad), "sig-val"), hash_data(digest), public) \
        == "Bad signature"
    with pytest.raises(SignatureError) as caught:
        signing.verify_guix(bad, digest, [key.public_bytes])
    assert caught.value.reason == "invalid"
    assert str(caught.value).startswith("invalid signature: (signature \n (data \n")
    # A different digest inside the signature, announced as the signed one: libgcrypt and we
    # both find the signature does not match it.
    other = bytes([digest[0] ^ 0x80]) + digest[1:]
    forged = key.sign_guix(digest).replace(digest.hex().upper().encode(),
                                           other.hex().upper().encode())
    assert gcrypt.verify_status(found(gcry(forged), "sig-val"), hash_data(other), public) \
        == "Bad signature"
    with pytest.raises(SignatureError) as caught:
        signing.verify_guix(forged, other, [key.public_bytes])
    assert caught.value.reason == "invalid"


def test_verification_statuses_in_guix_order() -> None:
    key, other = SigningKey(SEEDS[0]), SigningKey(SEEDS[1])
    digest = DIGESTS[0]
    good = key.sign_guix(digest)
    signing.verify_guix(good, digest, [other.public_bytes, key.public_bytes])
    signing.verify_guix(good, digest, iter([key.public_bytes]))

    with pytest.raises(SignatureError) as caught:
        signing.verify_guix(good, digest, [other.public_bytes])
    assert caught.value.reason == "unauthorized"
    assert str(caught.value) == "unauthorized public key: " + key.guix_public_sexp().rstrip()

    # Unauthorized comes before a hash mismatch, which comes before an invalid signature.
    with pytest.raises(SignatureError) as caught:
        signing.verify_guix(flip_s(good), DIGESTS[1], [other.public_bytes])
    assert caught.value.reason == "unauthorized"
    with pytest.raises(SignatureError) as caught:
        signing.verify_guix(flip_s(good), DIGESTS[1], [key.public_bytes])
    assert caught.value.reason == "hash-mismatch"
    assert "Trojan horse" in str(caught.value)

    signature = sexp.parse(good)
    for mangled, reason in [
        (tuple(item for item in signature if sexp.find_token(item, b"public-key") is None),
         "corrupt"),
        (tuple(item for item in signature if sexp.find_token(item, b"data") is None), "corrupt"),
        (tuple(item for item in signature if sexp.find_token(item, b"sig-val") is None),
         "invalid"),
    ]:
        with pytest.raises(SignatureError) as caught:
            signing.verify_guix(sexp.advanced(mangled), digest, [key.public_bytes])
        assert caught.value.reason == reason
    for garbage in [b"", b"(signature", b"not an s-expression", b"(a) (b)", b"\xff(\xfe)"]:
        with pytest.raises(SignatureError) as caught:
            signing.verify_guix(garbage, digest, [key.public_bytes])
        assert caught.value.reason == "corrupt"


def test_signing_needs_a_sha256_digest() -> None:
    with pytest.raises(SignatureError):
        SigningKey(SEEDS[0]).sign_guix(b"\x00" * 20)


def _variants(r: bytes, s: bytes, digest: bytes) -> dict[str, tuple[sexp.Sexp, sexp.Sexp]]:
    rs = ((b"r", r), (b"s", s))
    hash_list = (b"hash", b"sha256", digest)

    def data(*items: sexp.Sexp) -> sexp.Sexp:
        return (b"data", *items)

    standard = data((b"flags", b"rfc6979"), hash_list)
    ecdsa = (b"sig-val", (b"ecdsa", *rs))
    return {
        "as-guix": (ecdsa, standard),
        "no-flags": (ecdsa, data(hash_list)),
        "empty-flags": (ecdsa, data((b"flags",), hash_list)),
        "raw": (ecdsa, data((b"flags", b"raw"), hash_list)),
        "no-blinding-only": (ecdsa, data((b"flags", b"no-blinding"), hash_list)),
        "rfc6979-no-blinding": (ecdsa, data((b"flags", b"rfc6979", b"no-blinding"), hash_list)),
        "eddsa-flag": (ecdsa, data((b"flags", b"eddsa"), hash_list)),
        "pkcs1-flag": (ecdsa, data((b"flags", b"pkcs1"), hash_list)),
        "unknown-flag": (ecdsa, data((b"flags", b"rfc6979", b"bogus"), hash_list)),
        "sha512-name": (ecdsa, data((b"flags", b"rfc6979"), (b"hash", b"sha512", digest))),
        "upper-name": (ecdsa, data((b"flags", b"rfc6979"), (b"hash", b"SHA256", digest))),
        "unknown-hash": (ecdsa, data((b"flags", b"rfc6979"), (b"hash", b"foo", digest))),
        "hash-extra": (ecdsa, data((b"flags", b"rfc6979"), (*hash_list, b"x"))),
        "extra-data": (ecdsa, data((b"flags", b"rfc6979"), hash_list, (b"foo", b"bar"))),
        "ecc-name": ((b"sig-val", (b"ecc", *rs)), standard),
        "eddsa-name": ((b"sig-val", (b"eddsa", *rs)), standard),
        "rsa-name": ((b"sig-val", (b"rsa", (b"s", s))), standard),
        "swapped": ((b"sig-val", (b"ecdsa", rs[1], rs[0])), standard),
        "nested-r": ((b"sig-val", (b"ecdsa", (b"x", rs[0]), rs[1])), standard),
        "leading-zero": ((b"sig-val", (b"ecdsa", (b"r", b"\x00" + r), rs[1])), standard),
        "sig-flags": ((b"sig-val", (b"flags", b"foo"), (b"ecdsa", *rs)), standard),
        "r-plus-n": ((b"sig-val", (b"ecdsa", (b"r", (int.from_bytes(r, "big") + signing.N)
                                              .to_bytes(33, "big")), rs[1])), standard),
        "r-empty": ((b"sig-val", (b"ecdsa", (b"r", b""), rs[1])), standard),
    }


def test_structural_variants_are_judged_like_gcry_pk_verify(libgcrypt: None) -> None:
    key, digest = SigningKey(SEEDS[4]), DIGESTS[4]
    signed = sexp.parse(key.sign_guix(digest))
    r_list, s_list = sexp.find_token(signed, b"r"), sexp.find_token(signed, b"s")
    assert r_list is not None and s_list is not None
    assert isinstance(r_list[1], bytes) and isinstance(s_list[1], bytes)
    public_sexp = sexp.parse(key.guix_public_sexp())
    public = gcry(key.guix_public_sexp())
    outcomes = {}
    for name, (sig_val, data) in _variants(r_list[1], s_list[1], digest).items():
        theirs = gcrypt.verify(gcry(sexp.advanced(sig_val)), gcry(sexp.advanced(data)), public)
        try:
            signing.verify_guix(sexp.advanced((b"signature", data, sig_val, public_sexp)),
                                digest, [key.public_bytes])
            ours = True
        except SignatureError as error:
            assert error.reason == "invalid", name
            ours = False
        outcomes[name] = (ours, theirs)
    assert {name for name, (ours, theirs) in outcomes.items() if ours != theirs} == set()
    assert outcomes["as-guix"] == (True, True) and outcomes["eddsa-name"] == (False, False)


# --- Nix ----------------------------------------------------------------------------------------


def test_nix_signature_is_plain_ed25519() -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = SigningKey(SEEDS[2])
    fingerprint = signing.narinfo_fingerprint(
        "/nix/store/b929rzxqin9xa830zfpbfbgx8wajdhdn-top",
        "17b1gfk75b5qawgl2phjcj0fqwqxfgyh2rhjgj5fyyhaflcq9j2f", 192,
        ["/nix/store/5qn9lblnzjgza2vb23kwaclrcxnska2z-dep"])
    sig = key.sign_nix(fingerprint)
    assert len(sig) == 64
    Ed25519PublicKey.from_public_bytes(key.public_bytes).verify(sig, fingerprint)
    assert signing.verify_nix(fingerprint, sig, key.public_bytes)
    tampered = fingerprint.replace(b";192;", b";193;")
    with pytest.raises(InvalidSignature):
        Ed25519PublicKey.from_public_bytes(key.public_bytes).verify(sig, tampered)
    assert not signing.verify_nix(tampered, sig, key.public_bytes)
    assert not signing.verify_nix(fingerprint, sig, SigningKey(SEEDS[3]).public_bytes)
    assert not signing.verify_nix(fingerprint, sig[:63], key.public_bytes)
    assert not signing.verify_nix(fingerprint, sig, key.public_bytes[:31])


def test_fingerprint_layout() -> None:
    nar_hash = "17b1gfk75b5qawgl2phjcj0fqwqxfgyh2rhjgj5fyyhaflcq9j2f"
    refs = ["/nix/store/zzz-b", "/nix/store/aaa-a", "/nix/store/zzz-b"]
    assert signing.narinfo_fingerprint("/nix/store/x-top", nar_hash, 5, refs) == (
        b"1;/nix/store/x-top;sha256:" + nar_hash.encode() + b";5;/nix/store/aaa-a,/nix/store/zzz-b")
    assert signing.narinfo_fingerprint("/nix/store/x-top", "sha256:" + nar_hash, 5, []) == (
        b"1;/nix/store/x-top;sha256:" + nar_hash.encode() + b";5;")
    for args in [("/nix/store/x", nar_hash, 0, []), ("/nix/store/x", "abc", 5, []),
                 ("/nix/store/x", nar_hash, 5, ["aaa-a"]), ("x", nar_hash, 5, [])]:
        with pytest.raises(SignatureError):
            signing.narinfo_fingerprint(*args)


@pytest.fixture
def nix_store(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    """A private chroot store (never the machine's /nix: every call passes --store)."""
    if shutil.which("nix-store") is None or shutil.which("nix") is None:
        needs.unavailable("Nix is not installed", "install the Debian package nix-bin")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "nix.conf").write_text(
        "sandbox = false\nsubstituters =\nexperimental-features = nix-command\n"
        "build-users-group =\n")
    env = dict(os.environ, NIX_CONF_DIR=str(conf), HOME=str(tmp_path / "home"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), NIX_PATH="")
    yield env, f"local?root={tmp_path / 'root'}"


def test_nix_agrees_on_keys_fingerprints_and_signatures(
    nix_store: tuple[dict[str, str], str], tmp_path: Path,
) -> None:
    env, store = nix_store

    def run(*args: str, stdin: bytes | None = None) -> str:
        result = subprocess.run([args[0], "--store", store, *args[1:]], env=env, input=stdin,
                                capture_output=True, check=True, timeout=120)
        return result.stdout.decode()

    run("nix-store", "--generate-binary-cache-key", "test-cache-1", str(tmp_path / "sk"),
        str(tmp_path / "pk"))
    (tmp_path / "sk").chmod(0o600)
    key = signing.load_key(tmp_path / "sk")  # Nix's secret-key file
    assert (tmp_path / "pk").read_text().strip() == key.nix_public("test-cache-1")

    run("nix-store", "--import", stdin=(DATA / "nix" / "top-closure.export").read_bytes())
    top = "/nix/store/b929rzxqin9xa830zfpbfbgx8wajdhdn-top"
    run("nix", "store", "sign", "--key-file", str(tmp_path / "sk"), top)
    info = json.loads(run("nix", "path-info", "--json", "--sigs", top))
    info = info[0] if isinstance(info, list) else info[top]  # Nix >= 2.19: keyed by path
    nar_hash = run("nix-store", "-q", "--hash", top).strip()
    nar_size = int(run("nix-store", "-q", "--size", top))
    references = run("nix-store", "-q", "--references", top).split()
    assert references  # the fingerprint covers a reference
    fingerprint = signing.narinfo_fingerprint(top, nar_hash, nar_size, references)
    sig = key.sign_nix(fingerprint)
    assert info["signatures"] == ["test-cache-1:" + base64.b64encode(sig).decode()]


# --- Guix narinfos ------------------------------------------------------------------------------

NARINFO_TOP = (
    "StorePath: /gnu/store/b929rzxqin9xa830zfpbfbgx8wajdhdn-top\n"
    "NarHash: sha256:17b1gfk75b5qawgl2phjcj0fqwqxfgyh2rhjgj5fyyhaflcq9j2f\n"
    "NarSize: 192\n"
    "References: 5qn9lblnzjgza2vb23kwaclrcxnska2z-dep\n"
    "Deriver: mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv\n"
)
NARINFO_TAIL = "URL: nar/gzip/b929rzxqin9xa830zfpbfbgx8wajdhdn-top\nCompression: gzip\n"


def test_narinfo_signature_round_trip(libgcrypt: None) -> None:
    key, other = SigningKey(SEEDS[0]), SigningKey(SEEDS[1])
    line = signing.guix_narinfo_signature_line(key, NARINFO_TOP, "farm.example.org")
    assert line.startswith("Signature: 1;farm.example.org;") and "\n" not in line
    narinfo = NARINFO_TOP + line + "\n" + NARINFO_TAIL
    signing.verify_guix_narinfo(narinfo, [key.public_bytes])

    # What is inside is libgcrypt's signature of sha256(text above "Signature:").
    text = base64.b64decode(line.split(";")[2])
    digest = hashlib.sha256(NARINFO_TOP.encode()).digest()
    assert text == libgcrypt_signature(key, digest)

    # URL, Compression and FileSize are not signed.
    signing.verify_guix_narinfo(narinfo + "FileSize: 99\n", [key.public_bytes])
    cases = [
        (narinfo, [other.public_bytes], "unauthorized"),
        (narinfo.replace("NarSize: 192", "NarSize: 193"), [key.public_bytes], "hash-mismatch"),
        (NARINFO_TOP + NARINFO_TAIL, [key.public_bytes], "unsigned"),
        (narinfo.replace("References: ", "Refs: "), [key.public_bytes], "unsigned"),
        (narinfo.replace("Signature: 1;", "Signature: 2;"), [key.public_bytes], "corrupt"),
        (narinfo.replace("Signature: 1;", "Signature: 1;x;"), [key.public_bytes], "corrupt"),
        (NARINFO_TOP + "Signature: 1;h;AAAA!\n", [key.public_bytes], "corrupt"),
        (NARINFO_TOP + "Signature: 1;h;"
         + base64.b64encode(flip_s(text)).decode() + "\n", [key.public_bytes],
         "invalid"),
    ]
    for case, authorized, reason in cases:
        with pytest.raises(SignatureError) as caught:
            signing.verify_guix_narinfo(case, authorized)
        assert caught.value.reason == reason, case


def test_narinfo_accepts_a_libgcrypt_canonical_signature(libgcrypt: None) -> None:
    """Verification reads any syntax, e.g. a one-line form a different publisher may use."""
    key = SigningKey(SEEDS[5])
    digest = hashlib.sha256(NARINFO_TOP.encode()).digest()
    one_line = b" ".join(libgcrypt_signature(key, digest).split())
    assert b"\n" not in one_line
    narinfo = NARINFO_TOP + "Signature: 1;h;" + base64.b64encode(one_line).decode() + "\n"
    signing.verify_guix_narinfo(narinfo, [key.public_bytes])


# --- libgcrypt's own reader and printer agree with buildfarm.formats.sexp ---------------------

SEXP_ATOMS = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"sha256", b"Ed25519", b"12", b"\x00", b"a\x00", b"\xa1\xff", b"x y", b'"',
                     b"\\", b"\x7f\x80", b":", b"a\xe9b"]),
)
SEXP_TREES = st.recursive(SEXP_ATOMS, lambda inner: st.lists(inner, max_size=4).map(tuple),
                          max_leaves=16)


@settings(deadline=None, max_examples=300)
@given(st.lists(SEXP_TREES, min_size=1, max_size=4).map(tuple))
def test_printers_match_gcry_sexp_sprint(libgcrypt: None, value: tuple[sexp.Sexp, ...]) -> None:
    ours = sexp.advanced(value)
    parsed = gcry(ours)  # libgcrypt reads our advanced text...
    assert parsed.printed(GCRYSEXP_FMT_ADVANCED) == ours  # ...and prints it the same,
    assert parsed.printed(GCRYSEXP_FMT_CANON) == sexp.canonical(value)


@pytest.mark.parametrize(
    "text",
    [
        '(a "\\x41\\101\\n\\t\\"\\\\\\\'")', '(a "one\\\ntwo")', '(a "one\\\r\ntwo")',
        "(a |aGk|)", '(a 9"hi")', "(a 5#6869#)", "(a # 68 6\n9 #)", '(a "\\777")',
        "(a [3:foo]3:bar)", "((a)(b c)())", "(a(b)c)", "(x-y.z/w_v:u*t+s=r 12:abcdefghijkl)",
    ],
)
def test_parse_agrees_with_libgcrypt(libgcrypt: None, text: str) -> None:
    assert sexp.canonical(sexp.parse(text)) == gcry(text).printed(GCRYSEXP_FMT_CANON)


@pytest.mark.parametrize(
    "text",
    ["(a", "(a))", "(a #123#)", "(a #12x4#)", "(a #1234)", '(a "abc)', '(a "\\q")',
     '(a "\\x4")', '(a "\\12")', "(a 0:)", "(a 05:abcde)", "(a 9:abc)", "(a 123)", "(a 12 :ab)",
     "(a |a!b|)", "(a |YWJj)", "(a [[3:foo]])", "(a ])", "(a [3:foo)", "(a & b)", "(a {b})",
     "(a %s)", "(a \x01)"],
)
def test_both_refuse_malformed_text(libgcrypt: None, text: str) -> None:
    with pytest.raises(GcryptError):
        gcry(text)
    with pytest.raises(sexp.SexpError):
        sexp.parse(text)


@settings(deadline=None, max_examples=400)
@given(st.lists(st.sampled_from(list(b'()  ab12:#"\\|[]xF\n=+/Y\x00\x01\xff%&{7')), max_size=14))
def test_random_text_is_read_like_libgcrypt(libgcrypt: None, middle: list[int]) -> None:
    text = b"(" + bytes(middle) + b")"
    try:
        ours: bytes | None = sexp.canonical(sexp.parse(text))
    except sexp.SexpError as error:
        if "after the s-expression" in str(error):
            return  # libgcrypt reads on past the first list; we refuse such text
        ours = None
    try:
        parsed = Sexp.parse(text)
        theirs: bytes | None = None if parsed is None else parsed.printed(GCRYSEXP_FMT_CANON)
    except GcryptError:
        theirs = None
    assert ours == theirs
