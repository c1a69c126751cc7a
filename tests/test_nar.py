"""nix-base32, nars and export bundles against the Nix 2.8 samples, plus hostile input."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import stat
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildfarm.errors import ArchiveError
from buildfarm.formats import nar

DATA = Path(__file__).parent / "data" / "nix"
TOP_NAR = (DATA / "b929rzxqin9xa830zfpbfbgx8wajdhdn-top.nar").read_bytes()
DIROUT_NAR = (DATA / "2dwb5nwwblwkchi2kd7bhi350s5341yw-dirout.nar").read_bytes()
EXPORT = (DATA / "top-closure.export").read_bytes()
PATH_INFO = {p["path"]: p for p in json.loads((DATA / "path-info.json").read_text())}
DEP = "/nix/store/5qn9lblnzjgza2vb23kwaclrcxnska2z-dep"
TOP = "/nix/store/b929rzxqin9xa830zfpbfbgx8wajdhdn-top"


# --- an independent nar encoder for crafting (also invalid) archives -------------------------

def _s(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + bytes(-len(data) % 8)


Node = Any  # ("file", bytes, exec) | ("link", bytes) | ("dir", [(name, Node), ...] in order)


def _node(n: Node) -> bytes:
    head = _s(b"(") + _s(b"type")
    if n[0] == "file":
        exe = _s(b"executable") + _s(b"") if n[2] else b""
        return head + _s(b"regular") + exe + _s(b"contents") + _s(n[1]) + _s(b")")
    if n[0] == "link":
        return head + _s(b"symlink") + _s(b"target") + _s(n[1]) + _s(b")")
    body = b"".join(
        _s(b"entry") + _s(b"(") + _s(b"name") + _s(name) + _s(b"node") + _node(child) + _s(b")")
        for name, child in n[1]
    )
    return head + _s(b"directory") + body + _s(b")")


def _nar(n: Node) -> bytes:
    return _s(b"nix-archive-1") + _node(n)


DIROUT_TREE: Node = ("dir", [
    (b"bin", ("dir", [(b"link", ("link", b"../share/doc/README")),
                      (b"tool", ("file", b"#!/bin/sh\n", True))])),
    (b"empty", ("file", b"", False)),
    (b"share", ("dir", [(b"doc", ("dir", [(b"README", ("file", b"readme\n", False))]))])),
])


def test_independent_encoder_matches_nix() -> None:
    assert _nar(DIROUT_TREE) == DIROUT_NAR


# --- nix-base32 ------------------------------------------------------------------------------

NIX32_VECTORS = [
    (hashlib.sha256(TOP_NAR).digest(), "17b1gfk75b5qawgl2phjcj0fqwqxfgyh2rhjgj5fyyhaflcq9j2f"),
    (hashlib.sha256(DIROUT_NAR).digest(), "0l95256pfgzvkfdfrf23jfddb6k5psxjchg363nkw5y930sxi2lg"),
    # fixed.txt: outputHash (base16, in the .drv) and the "ca" field (nix-base32, path-info)
    (bytes.fromhex("011d20d8b49c8e2421592a93483d911387ec1a1735aa272e98ae1361c337f422"),
     "08pl6z1n24xfk0p2gaim2wdfr1qkj4yli4rab4hj93lwnkc20781"),
]


@pytest.mark.parametrize(("digest", "text"), NIX32_VECTORS)
def test_nix_base32_vectors(digest: bytes, text: str) -> None:
    assert nar.nix_base32_encode(digest) == text
    assert nar.nix_base32_decode(text) == digest


def test_nix_base32_fixed_ca_matches_content() -> None:
    ca = PATH_INFO["/nix/store/d8gn8fr89wchdf2z6baib718012n8cla-fixed.txt"]["ca"]
    digest = hashlib.sha256(b"fixed-content\n").digest()
    assert ca == "fixed:sha256:" + nar.nix_base32_encode(digest)


def test_nix_base32_store_hash_part() -> None:
    part = "b929rzxqin9xa830zfpbfbgx8wajdhdn"
    raw = nar.nix_base32_decode(part)
    assert len(raw) == 20
    assert nar.nix_base32_encode(raw) == part


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("e" * 52, "character 'e'"),
        ("17b1gfk75b5qawgl2phjcj0fqwqxfgyh2rhjgj5fyyhaflcq9j2F", "character 'F'"),
        ("0" * 51, "length 51"),
        ("0", "length 1"),
        ("2" + "0" * 51, "spare bits"),
    ],
)
def test_nix_base32_rejects(text: str, reason: str) -> None:
    with pytest.raises(ArchiveError, match=reason):
        nar.nix_base32_decode(text)


def test_nix_base32_empty() -> None:
    assert nar.nix_base32_encode(b"") == ""
    assert nar.nix_base32_decode("") == b""


@given(st.binary(max_size=70))
def test_nix_base32_round_trip(data: bytes) -> None:
    text = nar.nix_base32_encode(data)
    assert len(text) == ((len(data) * 8 - 1) // 5 + 1 if data else 0)
    assert nar.nix_base32_decode(text) == data


# --- nar dump / restore ----------------------------------------------------------------------

@pytest.mark.parametrize("data", [TOP_NAR, DIROUT_NAR], ids=["top", "dirout"])
def test_restore_then_dump_is_identical(tmp_path: Path, data: bytes) -> None:
    dest = tmp_path / "out"
    digest, size = nar.restore_nar(io.BytesIO(data), dest)
    assert (digest, size) == (hashlib.sha256(data).digest(), len(data))
    assert nar.nar_bytes(dest) == data
    buf = io.BytesIO()
    assert nar.dump_path(dest, buf) == (digest, size)
    assert buf.getvalue() == data


def test_restored_tree_contents(tmp_path: Path) -> None:
    dest = tmp_path / "dirout"
    nar.restore_nar(io.BytesIO(DIROUT_NAR), dest)
    assert os.readlink(dest / "bin" / "link") == "../share/doc/README"
    assert (dest / "bin" / "link").read_text() == "readme\n"
    assert (dest / "bin" / "tool").stat().st_mode & 0o111 == 0o111
    assert (dest / "share" / "doc" / "README").stat().st_mode & 0o111 == 0
    assert (dest / "empty").stat().st_size == 0
    assert sorted(os.listdir(dest)) == ["bin", "empty", "share"]


def test_restore_reads_exactly_one_nar(tmp_path: Path) -> None:
    stream = io.BytesIO(TOP_NAR + b"rest")
    nar.restore_nar(stream, tmp_path / "x")
    assert stream.read() == b"rest"


def test_restore_refuses_existing_dest(tmp_path: Path) -> None:
    dest = tmp_path / "exists"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(FileExistsError):
        nar.restore_nar(io.BytesIO(DIROUT_NAR), dest)
    assert (dest / "keep").read_text() == "mine"
    assert os.listdir(dest) == ["keep"]


def test_dump_rejects_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ArchiveError, match="cannot archive this file type"):
        nar.nar_bytes(tmp_path)


def test_dump_sorts_bytewise(tmp_path: Path) -> None:
    for name in ["b", "B", "a", "é", "_", "a.b"]:
        (tmp_path / name).write_bytes(name.encode())
    data = nar.nar_bytes(tmp_path)
    names = sorted(os.fsencode(x) for x in os.listdir(tmp_path))
    tree = ("dir", [(n, ("file", n, False)) for n in names])
    assert data == _nar(tree)


def _bad_name_tree(name: bytes) -> Node:
    return ("dir", [(name, ("file", b"evil", False))])


@pytest.mark.parametrize(
    ("tree", "reason"),
    [
        (_bad_name_tree(b""), "invalid entry name b''"),
        (_bad_name_tree(b"."), "invalid entry name b'.'"),
        (_bad_name_tree(b".."), "invalid entry name b'..'"),
        (_bad_name_tree(b"../evil"), "invalid entry name"),
        (_bad_name_tree(b"a/b"), "invalid entry name"),
        (_bad_name_tree(b"a\0b"), "invalid entry name"),
        (_bad_name_tree(b"x" * 256), "at most 255"),
        (("dir", [(b"b", ("file", b"", False)), (b"a", ("file", b"", False))]), "unsorted"),
        (("dir", [(b"a", ("file", b"", False)), (b"a", ("file", b"", False))]), "duplicate"),
        (("link", b""), "invalid symlink target"),
        (("link", b"a\0b"), "invalid symlink target"),
    ],
)
def test_restore_rejects_bad_trees(tmp_path: Path, tree: Node, reason: str) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match=reason):
        nar.restore_nar(io.BytesIO(_nar(tree)), dest)
    assert not os.path.lexists(dest)
    assert os.listdir(tmp_path) == []


def test_restore_cannot_write_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = ("dir", [
        (b"link", ("link", str(outside).encode())),
        (b"link", ("dir", [(b"evil", ("file", b"pwned", False))])),
    ])
    with pytest.raises(ArchiveError, match="duplicate entry name b'link'"):
        nar.restore_nar(io.BytesIO(_nar(tree)), tmp_path / "dest")
    assert os.listdir(outside) == []
    assert not os.path.lexists(tmp_path / "dest")


def _restore_error(data: bytes, tmp_path: Path) -> str:
    with pytest.raises(ArchiveError) as exc:
        nar.restore_nar(io.BytesIO(data), tmp_path / "d", source="x.nar")
    assert not os.path.lexists(tmp_path / "d")
    return str(exc.value)


_HEAD = _s(b"nix-archive-1") + _s(b"(") + _s(b"type")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_s(b"nix-archive-2") + _node(("file", b"", False)),
         "x.nar: byte 0: expected 'nix-archive-1'"),
        (_HEAD + _s(b"fifo") + _s(b")"), "x.nar: byte 56: unknown node type b'fifo'"),
        (_HEAD + _s(b"regular") + _s(b"executable") + _s(b"x") + _s(b"contents") + _s(b""),
         "x.nar: byte 96: expected '' (executable marker), found b'x'"),
        (_HEAD + _s(b"regular") + _s(b"size"),
         "x.nar: byte 72: expected 'contents' in a regular file, found b'size'"),
        (TOP_NAR[:175] + b"\x01" + TOP_NAR[176:],
         "x.nar: byte 175: non-zero padding after file contents"),
        (b"\x0d" + bytes(7) + b"nix-archive-1\x00\x00\x01",
         "x.nar: byte 23: non-zero padding after nar magic"),
        (b"", "x.nar: byte 0: truncated"),
        (TOP_NAR[:100], "x.nar: byte 100: truncated file contents"),
        (struct.pack("<Q", 1 << 62) + TOP_NAR,
         "x.nar: byte 0: nar magic is 4611686018427387904 bytes"),
    ],
)
def test_restore_reports_what_and_where(tmp_path: Path, data: bytes, message: str) -> None:
    assert _restore_error(data, tmp_path).startswith(message)


def test_restore_truncated_everywhere(tmp_path: Path) -> None:
    for cut in range(len(DIROUT_NAR)):
        msg = _restore_error(DIROUT_NAR[:cut], tmp_path)
        offset = int(msg.split("byte ")[1].split(":")[0])
        assert offset <= cut, msg
        assert "truncated" in msg


# --- export bundles --------------------------------------------------------------------------

def _read_all(data: bytes, **kw: Any) -> tuple[list[nar.BundleItem], list[bytes]]:
    sinks: list[io.BytesIO] = []

    def sink(i: int) -> io.BytesIO:
        assert i == len(sinks)
        sinks.append(io.BytesIO())
        return sinks[-1]

    items = list(nar.read_bundle(io.BytesIO(data), sink, **kw))
    return items, [s.getvalue() for s in sinks]


def test_read_sample_export() -> None:
    items, nars = _read_all(EXPORT)
    assert [i.path for i in items] == [DEP, TOP]
    for item, data in zip(items, nars, strict=True):
        info = PATH_INFO[item.path]
        assert "sha256-" + base64.b64encode(item.nar_sha256).decode() == info["narHash"]
        assert item.nar_size == info["narSize"] == len(data)
        assert hashlib.sha256(data).digest() == item.nar_sha256
        assert list(item.references) == info["references"]
        assert item.deriver == info["deriver"]
        assert item.signature is None
    assert nars[1] == TOP_NAR


def test_signed_hash_covers_nar_through_deriver() -> None:
    items, _ = _read_all(EXPORT)
    start = 8
    for item in items:
        trailer = (struct.pack("<Q", 0x4558494E) + _s(item.path.encode())
                   + struct.pack("<Q", len(item.references))
                   + b"".join(_s(r.encode()) for r in item.references) + _s(item.deriver.encode()))
        assert trailer == nar.export_trailer(item.path, item.references, item.deriver)
        end = start + item.nar_size + len(trailer)
        assert item.signed_sha256 == hashlib.sha256(EXPORT[start:end]).digest()
        assert EXPORT[end:end + 8] == bytes(8)  # no signature
        start = end + 8 + 8  # signature marker, next item marker


def test_write_bundle_reproduces_export() -> None:
    items, nars = _read_all(EXPORT)
    out = io.BytesIO()
    nar.write_bundle(out, [(n, i.path, i.references, i.deriver, i.signature)
                           for i, n in zip(items, nars, strict=True)])
    assert out.getvalue() == EXPORT
    streamed = io.BytesIO()
    nar.write_bundle(streamed, [(io.BytesIO(n), i.path, list(reversed(i.references)), i.deriver,
                                 None) for i, n in zip(items, nars, strict=True)])
    assert streamed.getvalue() == EXPORT


def test_max_bundle_size_is_what_the_longest_legitimate_bundle_takes() -> None:
    """Items whose store path, references, deriver and signature are all at the longest
    read_bundle accepts (4096-byte paths, a 64 KiB signature) make a bundle exactly as long as
    max_bundle_size says, and read_bundle accepts it; the real export is shorter."""
    items, nars = _read_all(EXPORT)
    name = "-x" + "y" * 200
    store = "/" + "s" * (4096 - 2 - 32 - len(name))

    def path(i: int) -> str:
        return f"{store}/{nar.nix_base32_encode(hashlib.sha256(b'%d' % i).digest()[:20])}{name}"

    longest = [(n, path(i), [path(100 + 10 * i + r) for r in range(3 * i)], path(99 - i),
                b"s" * (1 << 16)) for i, n in enumerate(nars)]
    assert all(len(p) == 4096 for _, p, _, _, _ in longest)
    out = io.BytesIO()
    nar.write_bundle(out, longest)
    sizes = [(len(n), 3 * i) for i, n in enumerate(nars)]
    assert len(out.getvalue()) == nar.max_bundle_size(sizes)
    assert len(list(nar.read_bundle(io.BytesIO(out.getvalue())))) == len(nars)
    assert len(EXPORT) < nar.max_bundle_size([(i.nar_size, len(i.references)) for i in items])
    assert nar.max_bundle_size([(len(nars[0]), 0), (None, 0)]) is None


def test_write_bundle_signs_in_one_pass() -> None:
    items, nars = _read_all(EXPORT)
    seen: list[bytes] = []

    def signer(digest: bytes) -> bytes:
        seen.append(digest)
        return b"(signature %s)\n" % digest.hex().encode()

    out = io.BytesIO()
    nar.write_bundle(out, [(n, i.path, i.references, i.deriver, signer)
                           for i, n in zip(items, nars, strict=True)])
    assert seen == [i.signed_sha256 for i in items]
    signed, _ = _read_all(out.getvalue())
    assert [i.signature for i in signed] == [b"(signature %s)\n" % d.hex().encode() for d in seen]
    assert [i.signed_sha256 for i in signed] == seen
    assert [i.nar_sha256 for i in signed] == [i.nar_sha256 for i in items]


def test_write_bundle_validates() -> None:
    with pytest.raises(ArchiveError, match=r"nar of /nix/store/.*: byte 0: truncated"):
        nar.write_bundle(io.BytesIO(), [(b"", TOP, [], "", None)])
    with pytest.raises(ArchiveError, match="trailing data after the nar"):
        nar.write_bundle(io.BytesIO(), [(TOP_NAR + b"x", TOP, [], "", None)])
    with pytest.raises(ArchiveError, match="'relative' is not a store path"):
        nar.write_bundle(io.BytesIO(), [(TOP_NAR, TOP, ["relative"], "", None)])


def _bundle_error(data: bytes, **kw: Any) -> tuple[int, str]:
    with pytest.raises(ArchiveError) as exc:
        _read_all(data, **kw)
    msg = str(exc.value)
    assert msg.startswith("export bundle: byte ")
    return int(msg.split("byte ")[1].split(":")[0]), msg


def _patched(offset: int, new: bytes) -> bytes:
    return EXPORT[:offset] + new + EXPORT[offset + len(new):]


@pytest.mark.parametrize(
    ("data", "offset", "reason"),
    [
        (_patched(0, struct.pack("<Q", 2)), 0, "expected item marker 1 or end marker 0, found 2"),
        (_patched(16, b"nix-archive-2"), 8, "expected 'nix-archive-1'"),
        (_patched(29, b"\x01"), 29, "non-zero padding after nar magic"),
        (_patched(0x88, b"NIXF"), 0x88, "expected export magic"),
        (_patched(0x98, b"X"), 0x90, "store path 'Xnix/store/"),
        (_patched(0x110, struct.pack("<Q", 7)), 0x110, "expected signature marker 0 or 1, found 7"),
        (_patched(0x60, struct.pack("<Q", 1 << 40)), len(EXPORT), "truncated file contents"),
        (_patched(0x1d8, b"X"), 0x1d0, "expected ')' (node end)"),
        (EXPORT + b"\0", len(EXPORT), "trailing data after the end of the bundle"),
    ],
)
def test_corrupt_bundles(data: bytes, offset: int, reason: str) -> None:
    assert len(data) >= len(EXPORT)
    at, msg = _bundle_error(data)
    assert reason in msg
    assert at == offset


def test_trailing_ok_and_max_items() -> None:
    items, _ = _read_all(EXPORT + b"more", trailing_ok=True)
    assert len(items) == 2
    assert len(_read_all(EXPORT, max_items=2)[0]) == 2
    at, msg = _bundle_error(EXPORT, max_items=1)
    assert "more than 1 items" in msg
    assert at == 8 + 128 + 136 + 8  # marker, nar, trailer, signature marker


def test_bundle_truncated_everywhere() -> None:
    for cut in range(len(EXPORT)):
        at, msg = _bundle_error(EXPORT[:cut])
        assert at <= cut
        assert "truncated" in msg


def test_signature_marker_and_bytes() -> None:
    sig_bundle = io.BytesIO()
    nar.write_bundle(sig_bundle, [(TOP_NAR, TOP, [], "", b"sig")])
    data = sig_bundle.getvalue()
    assert _read_all(data)[0][0].signature == b"sig"
    # libgcrypt prints an atom of raw bytes 0xA1-0xFF as they are: not UTF-8, still read.
    raw = data.replace(_s(b"sig"), _s(b'(s "\xc0\xf0\xeai")'))
    assert _read_all(raw)[0][0].signature == b'(s "\xc0\xf0\xeai")'


def test_deep_nesting_does_not_recurse() -> None:
    depth = 5000
    enter = _s(b"(") + _s(b"type") + _s(b"directory") + _s(b"entry") + _s(b"(") + _s(b"name")
    leave = _s(b")") + _s(b")")  # the entry, then the directory
    deep = (_s(b"nix-archive-1") + (enter + _s(b"d") + _s(b"node")) * depth
            + _node(("file", b"leaf", False)) + leave * depth)
    out = io.BytesIO()
    nar.write_bundle(out, [(deep, TOP, [], "", None)])
    items, nars = _read_all(out.getvalue())
    assert nars == [deep]
    assert items[0].nar_size == len(nars[0])


# --- properties ------------------------------------------------------------------------------

_names = st.text(st.sampled_from("abcXYZ019-_.é ~"), min_size=1, max_size=8).filter(
    lambda n: n not in (".", "..")
)
_leaves = st.one_of(
    st.tuples(st.just("file"), st.binary(max_size=40), st.booleans()),
    st.tuples(st.just("link"), st.text(st.sampled_from("ab/.é"), min_size=1, max_size=12)),
)
_trees = st.recursive(
    _leaves,
    lambda children: st.dictionaries(_names, children, max_size=4).map(lambda d: ("dir", d)),
    max_leaves=12,
)


def _create(path: str, tree: Any) -> None:
    if tree[0] == "file":
        with open(path, "wb") as f:
            f.write(tree[1])
        os.chmod(path, 0o755 if tree[2] else 0o644)
    elif tree[0] == "link":
        os.symlink(tree[1], path)
    else:
        os.mkdir(path)
        for name, child in tree[1].items():
            _create(os.path.join(path, name), child)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_tree_round_trip(tree: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        _create(src, tree)
        first = io.BytesIO()
        digest, size = nar.dump_path(src, first)
        assert (digest, size) == (hashlib.sha256(first.getvalue()).digest(), len(first.getvalue()))
        dest = os.path.join(tmp, "dest")
        assert nar.restore_nar(io.BytesIO(first.getvalue()), dest) == (digest, size)
        assert nar.nar_bytes(dest) == first.getvalue()
        if tree[0] == "file":
            assert bool(os.stat(dest).st_mode & stat.S_IXUSR) == tree[2]


@settings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from([b"", struct.pack("<Q", 1) + _s(b"nix-archive-1")]))
def test_random_bytes_raise_only_archive_error(junk: bytes, prefix: bytes) -> None:
    with contextlib.suppress(ArchiveError):
        _read_all(prefix + junk)
    with tempfile.TemporaryDirectory() as tmp:
        dest = os.path.join(tmp, "d")
        try:
            nar.restore_nar(io.BytesIO(prefix[8:] + junk), dest)
        except ArchiveError:
            assert not os.path.lexists(dest)


@settings(max_examples=300)
@given(st.lists(st.one_of(st.none(), st.binary(max_size=600)), min_size=1, max_size=3))
def test_any_signature_bytes_round_trip_exactly(signatures: list[bytes | None]) -> None:
    """A signature is carried as the bytes the machine wrote, whatever they are (libgcrypt's
    raw atoms, NUL, invalid UTF-8): read back as written, and written back byte for byte."""
    items, nars = _read_all(EXPORT)
    chosen = [signatures[i % len(signatures)] for i in range(len(items))]
    out = io.BytesIO()
    nar.write_bundle(out, [(n, i.path, i.references, i.deriver, sig)
                           for i, n, sig in zip(items, nars, chosen, strict=True)])
    again, again_nars = _read_all(out.getvalue())
    assert [i.signature for i in again] == chosen
    assert again_nars == nars
    rewritten = io.BytesIO()
    nar.write_bundle(rewritten, [(n, i.path, i.references, i.deriver, i.signature)
                                 for i, n in zip(again, again_nars, strict=True)])
    assert rewritten.getvalue() == out.getvalue()


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 2000), st.binary(min_size=1, max_size=8)),
                min_size=1, max_size=3))
def test_mutated_export(edits: list[tuple[int, bytes]]) -> None:
    buf = bytearray(EXPORT)
    for at, new in edits:
        at %= len(buf)
        buf[at:at + len(new)] = new
    data = bytes(buf)
    try:
        items, nars = _read_all(data)
    except ArchiveError:
        return
    # Whatever is accepted is canonical: writing it back gives the same bytes.
    out = io.BytesIO()
    nar.write_bundle(out, [(n, i.path, i.references, i.deriver, i.signature)
                           for i, n in zip(items, nars, strict=True)])
    if all(list(i.references) == sorted(set(i.references)) for i in items):
        assert out.getvalue() == data
