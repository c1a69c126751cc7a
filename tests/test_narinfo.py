"""Narinfo format, pinned to Guix's and Nix's own code.

Guix: the expected texts are built the way Guix's tests/publish.scm builds them from
guix/scripts/publish.scm (`narinfo-string`, `store-item->recutils`, /nix-cache-info), and the
signatures are checked with libgcrypt (what Guix verifies with, through ctypes) and with the port
of guix/narinfo.scm's `valid-narinfo?`. Nix: narinfos written and signed by Nix 2.8 itself
(`nix copy --to file://…?secret-key=…`) must be read, re-signed byte for byte and verified.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from pathlib import Path

import needs
import pytest
from guix_emulator.gcrypt import Sexp
from guix_emulator.pki import narinfo_signed

from buildfarm.errors import ArchiveError
from buildfarm.formats import narinfo as ni
from buildfarm.formats.signing import SignatureError, SigningKey, load_key, verify_guix_narinfo

KEY = SigningKey(hashlib.sha256(b"narinfo test key").digest())
OTHER = SigningKey(hashlib.sha256(b"another key").digest())
TOP = "/gnu/store/b929rzxqin9xa830zfpbfbgx8wajdhdn-top"
DEP = "/gnu/store/5qn9lblnzjgza2vb23kwaclrcxnska2z-dep"
TOP_HASH = "sha256:17b1gfk75b5qawgl2phjcj0fqwqxfgyh2rhjgj5fyyhaflcq9j2f"


def libgcrypt_accepts(narinfo_text: str, public_sexp: str) -> bool:
    """What Guix does with a narinfo's Signature (guix/narinfo.scm valid-narinfo?, on
    libgcrypt: the Guix emulator's), for the authorized public key."""
    needs.libgcrypt()
    public = Sexp.parse(public_sexp)
    assert public is not None
    return narinfo_signed(narinfo_text, [public])


def guix_signature(unsigned_info: str) -> str:
    """publish.scm: (base64-encode (string->utf8 (canonical-sexp->string (signed-string info))))."""
    digest = hashlib.sha256(unsigned_info.encode("utf-8")).digest()
    return base64.b64encode(KEY.sign_guix(digest)).decode()


# --- Guix ---------------------------------------------------------------------------------------


def test_uncompressed_narinfo_is_what_guix_publish_writes() -> None:
    """tests/publish.scm, "/*.narinfo" (guix publish -C0)."""
    nar_size = 192
    unsigned_info = (
        f"StorePath: {TOP}\n"
        f"NarHash: {TOP_HASH}\n"
        f"NarSize: {nar_size}\n"
        f"References: {DEP.rsplit('/', 1)[1]}\n"
    )
    expected = (
        f"{unsigned_info}Signature: 1;farm.example.org;{guix_signature(unsigned_info)}\n"
        f"URL: nar/{TOP.rsplit('/', 1)[1]}\nCompression: none\nFileSize: {nar_size}\n"
    )
    info = ni.Narinfo(TOP, TOP_HASH, nar_size, references=(DEP,),
                      files=(ni.NarFile(ni.nar_url(TOP, "none"), "none", nar_size),))
    signed = ni.sign(info, KEY, "farm-1", "farm.example.org")
    assert signed.signed_text() == unsigned_info
    # Guix's layout is ours with the Nix Sig: line left out.
    assert replace(signed, sigs=()).render() == expected
    assert libgcrypt_accepts(expected, KEY.guix_public_sexp())
    assert not libgcrypt_accepts(expected, OTHER.guix_public_sexp())


def test_plus_sign_is_uri_encoded_in_urls() -> None:
    """tests/publish.scm, "/*.narinfo with properly encoded '+' sign" (uri-encode)."""
    item = "/gnu/store/0123456789abcdfghijklmnpqrsvwxyz-fake-gtk+"
    assert ni.nar_url(item, "none") == "nar/0123456789abcdfghijklmnpqrsvwxyz-fake-gtk%2B"
    assert ni.nar_url(item, "gzip") == "nar/gzip/0123456789abcdfghijklmnpqrsvwxyz-fake-gtk%2B"
    assert ni.nar_url(item, "zstd", "///foo/bar//chbouib/") == (
        "foo/bar/chbouib/zstd/0123456789abcdfghijklmnpqrsvwxyz-fake-gtk%2B")
    assert ni.uri_encode("a-b_c.d~e=f?g") == "a-b_c.d~e%3Df%3Fg"


def test_compressed_triples_follow_the_signature_in_order() -> None:
    """tests/publish.scm, "with cache, lzip + gzip": StorePath … Signature, then URL/Compression/
    FileSize for each compression in the order they were asked for."""
    base = TOP.rsplit("/", 1)[1]
    info = ni.sign(
        ni.Narinfo(TOP, TOP_HASH, 192, references=(DEP,),
                   deriver="/gnu/store/mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv",
                   system="x86_64-linux",
                   files=(ni.NarFile(f"nar/gzip/{base}", "gzip", 140),
                          ni.NarFile(f"nar/zstd/{base}", "zstd", 130))),
        KEY, "farm-1", "farm.example.org",
    )
    lines = info.render().splitlines()
    names = [line.split(": ", 1)[0] for line in lines]
    assert names == ["StorePath", "NarHash", "NarSize", "References", "System", "Deriver",
                     "Signature", "Sig", "URL", "Compression", "FileSize", "URL",
                     "Compression", "FileSize"]
    # What Guix wrote while it wrote System (publish.scm before 1.2): "~aSystem: ~a~%Deriver: ~a~%".
    assert info.signed_text().endswith(
        "System: x86_64-linux\nDeriver: mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv\n")
    text = info.render()
    verify_guix_narinfo(text, [KEY.public_bytes])
    assert libgcrypt_accepts(text, KEY.guix_public_sexp())
    # URL/Compression/FileSize are outside the signed part ("Sign only normative fields").
    verify_guix_narinfo(text.replace("FileSize: 140", "FileSize: 1"), [KEY.public_bytes])
    for tampered in (text.replace("NarSize: 192", "NarSize: 191"),
                     text.replace("x86_64-linux", "i686-linux"),
                     text.replace("References: 5qn9", "References: 6qn9")):
        with pytest.raises(SignatureError) as caught:
            verify_guix_narinfo(tampered, [KEY.public_bytes])
        assert caught.value.reason == "hash-mismatch"
        assert not libgcrypt_accepts(tampered, KEY.guix_public_sexp())


def test_guix_reads_every_triple() -> None:
    """guix/narinfo.scm read-narinfo: URL, Compression and FileSize are multi-valued."""
    info = ni.sign(ni.Narinfo(TOP, TOP_HASH, 192, files=(
        ni.NarFile("nar/gzip/x", "gzip", 10), ni.NarFile("nar/zstd/x", "zstd", 9))),
        KEY, "k-1", "h")
    parsed = ni.parse(info.render())
    assert parsed == info
    assert [f.compression for f in parsed.files] == ["gzip", "zstd"]


def test_empty_references_and_no_deriver() -> None:
    """publish.scm: "References: ~a~%" with nothing after the space; no Deriver line unknown."""
    info = ni.Narinfo(TOP, TOP_HASH, 192, files=(ni.NarFile("nar/x", "none", 192),))
    assert "References: \n" in info.signed_text()
    assert "Deriver" not in info.signed_text() and "System" not in info.signed_text()
    assert ni.parse(ni.sign(info, KEY, "k-1", "h").render()).references == ()


def test_nix_cache_info_is_guix_publishs() -> None:
    """tests/publish.scm, "/nix-cache-info"."""
    assert ni.nix_cache_info("/gnu/store") == (
        "StoreDir: /gnu/store\nWantMassQuery: 0\nPriority: 100\n")


def test_signature_host_cannot_break_the_field() -> None:
    with pytest.raises(SignatureError):
        ni.sign(ni.Narinfo(TOP, TOP_HASH, 1), KEY, "k-1", "evil;host")
    with pytest.raises(SignatureError):
        ni.sign(ni.Narinfo(TOP, TOP_HASH, 1), KEY, "bad name", "h")


# --- Nix ----------------------------------------------------------------------------------------

# Written by Nix 2.8: nix copy --to 'file://…?compression=zstd&secret-key=sk' with this key, for
# tests/data/nix/top-closure.export.
NIX_SECRET = ("test-cache-1:ZZetnV9DkN2x2gZfJOPc46J66CGXWnDlbXrjp2jKxyfwT03Fzk0RvHFbdSkN9CPD8Mh8W"
              "UlOD73/CY7GKN2EKQ==")
NIX_PUBLIC = "test-cache-1:8E9Nxc5NEbxxW3UpDfQjw/DIfFlJTg+9/wmOxijdhCk="
TOP_SIG = ("+9RBfvIDUnIm41zPUM6tdgwRGDaFw0bvjOH4YbjbrObq57QcRdBdeyeLjQGBAqotuYfEZCVW6oyWHjHmvH"
           "FEBQ==")
DEP_SIG = ("ShVq1uTohCktBATUpE/P9dRFrC9POY7HOl7aUYnfzOrs4Etb166FN4UPQr+wqk03y9g/hzYUCZI3yRfYyc"
           "bJCw==")
NIX_TOP = "".join(line + "\n" for line in (
    "StorePath: /nix/store/b929rzxqin9xa830zfpbfbgx8wajdhdn-top",
    "URL: nar/08nbj07884aqcs0ywiv52ln2gdld8hc1l04mhxxwwrvdpmpl004q.nar.zst",
    "Compression: zstd",
    "FileHash: sha256:08nbj07884aqcs0ywiv52ln2gdld8hc1l04mhxxwwrvdpmpl004q",
    "FileSize: 146",
    "NarHash: sha256:17b1gfk75b5qawgl2phjcj0fqwqxfgyh2rhjgj5fyyhaflcq9j2f",
    "NarSize: 192",
    "References: 5qn9lblnzjgza2vb23kwaclrcxnska2z-dep",
    "Deriver: mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv",
    f"Sig: test-cache-1:{TOP_SIG}",
))
NIX_DEP = "".join(line + "\n" for line in (
    "StorePath: /nix/store/5qn9lblnzjgza2vb23kwaclrcxnska2z-dep",
    "URL: nar/0k7v1habjhn1b3lhl4h1rwvlr8kfmwmf2bmx9c695b0asarp2yz2.nar.zst",
    "Compression: zstd",
    "FileHash: sha256:0k7v1habjhn1b3lhl4h1rwvlr8kfmwmf2bmx9c695b0asarp2yz2",
    "FileSize: 91",
    "NarHash: sha256:1vagcg4r6l6x6w0lj246c0cg1mvd3h5rsaizhfw68mw4sxpdh6cp",
    "NarSize: 128",
    "References: ",
    "Deriver: pld6g8hnp87b9d7yvkidbf4zi7hvm33k-dep.drv",
    f"Sig: test-cache-1:{DEP_SIG}",
))


@pytest.fixture
def nix_key(tmp_path: Path) -> SigningKey:
    path = tmp_path / "sk"
    path.write_text(NIX_SECRET + "\n")
    path.chmod(0o600)
    return load_key(path)


@pytest.mark.parametrize("text", [NIX_TOP, NIX_DEP])
def test_nix_narinfos_are_read_and_signed_byte_for_byte(text: str, nix_key: SigningKey) -> None:
    info = ni.parse(text)
    assert info.deriver is not None and info.deriver.endswith(".drv")
    assert info.files[-1].compression == "zstd" and info.files[-1].file_size in (146, 91)
    assert ni.verify_nix_sigs(info, [NIX_PUBLIC])
    # Our signature of the same path info is Nix's, byte for byte (Ed25519 is deterministic).
    ours = ni.sign(info, nix_key, "test-cache-1", "h")
    assert ours.sigs == info.sigs
    assert nix_key.nix_public("test-cache-1") == NIX_PUBLIC


def test_nix_refuses_tampered_or_unknown_keys() -> None:
    info = ni.parse(NIX_TOP)
    assert not ni.verify_nix_sigs(ni.parse(NIX_TOP.replace("NarSize: 192", "NarSize: 193")),
                                  [NIX_PUBLIC])
    assert not ni.verify_nix_sigs(ni.parse(NIX_TOP.replace("References: 5qn9", "References: 6qn9")),
                                  [NIX_PUBLIC])
    assert not ni.verify_nix_sigs(info, [NIX_PUBLIC.replace("test-cache-1", "other-1")])
    assert not ni.verify_nix_sigs(info, [OTHER.nix_public("test-cache-1")])
    assert not ni.verify_nix_sigs(info, {})


def test_our_narinfo_carries_both_signatures() -> None:
    info = ni.sign(ni.parse(NIX_TOP), KEY, "farm-1", "farm.example.org")
    text = info.render()
    again = ni.parse(text)
    assert ni.verify_nix_sigs(again, [KEY.nix_public("farm-1")])
    verify_guix_narinfo(text, [KEY.public_bytes])
    assert libgcrypt_accepts(text, KEY.guix_public_sexp())


@pytest.mark.parametrize(("text", "message"), [
    (NIX_TOP.replace("URL: ", "URI: "), "URL"),
    (NIX_TOP.replace("NarSize: 192", "NarSize: 0"), "zero"),
    (NIX_TOP.replace("NarSize: 192", "NarSize: x"), "number"),
    (NIX_TOP.replace("StorePath: ", "Path: "), "StorePath"),
    (NIX_TOP.replace("StorePath: /nix/store/b929", "StorePath: /nix/store/B929"), "store path"),
    ("junk\n" + NIX_TOP, "line 1"),
])
def test_malformed_narinfos_are_refused(text: str, message: str) -> None:
    with pytest.raises(ArchiveError, match=message):
        ni.parse(text)


def test_missing_compression_means_bzip2_for_nix() -> None:
    text = "".join(line + "\n" for line in NIX_TOP.splitlines() if not line.startswith("Compr"))
    assert ni.parse(text).files[0].compression == "bzip2"


def test_hash_part() -> None:
    assert ni.hash_part(TOP) == "b929rzxqin9xa830zfpbfbgx8wajdhdn"
    with pytest.raises(ArchiveError):
        ni.hash_part("/gnu/store/short-name")
