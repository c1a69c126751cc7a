"""The .drv reader/writer against real Nix files, Guix-layout files, and hostile input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildfarm.errors import DerivationError
from buildfarm.formats import derivation
from buildfarm.formats.derivation import Derivation, DerivationOutput

DATA = Path(__file__).parent / "data"
NIX_DRVS = sorted((DATA / "nix").glob("*.drv"))
GUIX_DRVS = sorted((DATA / "guix").glob("*.drv"))
ALL_DRVS = NIX_DRVS + GUIX_DRVS
SHOW = json.loads((DATA / "nix" / "show-derivation.json").read_text())
TRUTH = json.loads((DATA / "guix" / "truth.json").read_text())

TOP = DATA / "nix" / "mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv"
MULTI = DATA / "nix" / "wvggxvb799fi9m2yy2dyhr04plggbrll-multi.drv"
GREP = DATA / "guix" / "63j9givlcpv1rd53sw8jz38aysmjkhhr-grep-3.8.drv"
HELLO = DATA / "nix" / "76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"


def test_samples_present() -> None:
    assert len(NIX_DRVS) == 6
    assert len(GUIX_DRVS) == 3


@pytest.mark.parametrize("path", NIX_DRVS, ids=lambda p: p.name)
def test_nix_sample_matches_show_derivation(path: Path) -> None:
    drv = derivation.read(path)
    truth = SHOW["/nix/store/" + path.name]
    assert [o.name for o in drv.outputs] == list(truth["outputs"])
    for out in drv.outputs:
        want = truth["outputs"][out.name]
        assert out.path == want["path"]
        assert out.hash_algo == want.get("hashAlgo", "")
        assert out.hash == want.get("hash", "")
        assert out.fixed == ("hashAlgo" in want)
    assert dict(drv.input_drvs) == {k: tuple(v) for k, v in truth["inputDrvs"].items()}
    assert list(drv.input_srcs) == truth["inputSrcs"]
    assert drv.system == truth["system"]
    assert drv.builder == truth["builder"]
    assert list(drv.args) == truth["args"]
    assert drv.env_dict == truth["env"]
    assert [k for k, _ in drv.env] == sorted(truth["env"])
    assert drv.store_dir == "/nix/store"
    assert drv.output_paths == {k: v["path"] for k, v in truth["outputs"].items()}
    assert drv.references == tuple(sorted([*truth["inputDrvs"], *truth["inputSrcs"]]))


@pytest.mark.parametrize("path", GUIX_DRVS, ids=lambda p: p.name)
def test_guix_sample_matches_truth(path: Path) -> None:
    drv = derivation.read(path)
    truth = TRUTH[path.name]
    assert drv.output_paths == truth["outputs"]
    assert drv.system == truth["system"]
    assert drv.store_dir == "/gnu/store"
    assert [o.hash_algo for o in drv.outputs if o.fixed] == truth.get("fixed", [])
    for out in drv.outputs:
        assert len(out.hash) == (64 if out.fixed else 0)
    if "input_drvs" in truth:
        assert drv.input_drvs == tuple((k, tuple(v)) for k, v in truth["input_drvs"].items())
        assert list(drv.input_srcs) == truth["input_srcs"]
        assert drv.builder == truth["builder"]
        assert [k for k, _ in drv.env] == truth["env_keys"]
        assert drv.references == tuple(sorted([*truth["input_drvs"], *truth["input_srcs"]]))


def test_escapes_decoded() -> None:
    env = derivation.read(TOP).env_dict
    assert env["extraAttr"] == 'some value with "quotes" and\nnewline'
    multi = derivation.read(MULTI)
    assert multi.env_dict["backslash"] == "c:\\dir"
    assert multi.env_dict["tab"] == "a\tb"
    assert multi.env_dict["emptyStr"] == ""
    assert multi.input_srcs == ("/nix/store/liypicklc6zr1yhr90xp1bgal9blx2zg-builder.sh",)


@pytest.mark.parametrize("path", ALL_DRVS, ids=lambda p: p.name)
def test_byte_exact_round_trip(path: Path) -> None:
    data = path.read_bytes()
    assert derivation.serialize(derivation.parse(data, str(path))) == data


def test_required_features() -> None:
    drv = derivation.read(HELLO)
    assert drv.required_features == frozenset()
    env = (*drv.env, ("requiredSystemFeatures", " kvm  big-parallel\n"))
    featured = Derivation(drv.outputs, drv.input_drvs, drv.input_srcs, drv.system,
                          drv.builder, drv.args, env)
    assert featured.required_features == frozenset({"kvm", "big-parallel"})


def test_read_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.drv"
    with pytest.raises(DerivationError) as exc:
        derivation.read(missing)
    assert exc.value.source == str(missing)
    assert exc.value.offset == 0
    assert "No such file" in exc.value.reason
    assert str(missing) in str(exc.value)


def test_read_names_source_in_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.drv"
    bad.write_bytes(b"Derive([")
    with pytest.raises(DerivationError) as exc:
        derivation.read(bad)
    assert exc.value.source == str(bad)
    assert str(exc.value).startswith(f"{bad}: byte 8: ")


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhhr-grep-3.8.drv", True),
        ("/nix/store/b929rzxqin9xa830zfpbfbgx8wajdhdn-top", True),
        ("/a/b/c/b929rzxqin9xa830zfpbfbgx8wajdhdn-x+y_z?=1", True),
        ("/gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhhr-", False),  # empty name
        ("/gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhhr-.hidden", False),
        ("/gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhhe-grep", False),  # 'e' not nix-base32
        ("/gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhh-grep", False),  # 31 chars
        ("gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhhr-grep", False),  # relative
        ("/63j9givlcpv1rd53sw8jz38aysmjkhhr-grep", False),  # no store dir
        ("/gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhhr-grep/bin/grep", False),
        ("/gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhhr-gr ep", False),
        ("/gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhhr-" + "a" * 211, True),
        ("/gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhhr-" + "a" * 212, False),
    ],
)
def test_is_store_path(path: str, ok: bool) -> None:
    assert derivation.is_store_path(path) is ok


def test_store_path_name() -> None:
    name = derivation.store_path_name("/gnu/store/63j9givlcpv1rd53sw8jz38aysmjkhhr-grep-3.8.drv")
    assert name == "grep-3.8.drv"
    with pytest.raises(ValueError, match="not a store path"):
        derivation.store_path_name("/tmp/x")


# --- malformed input -------------------------------------------------------------------------

def _error(data: bytes, source: str = "x.drv") -> DerivationError:
    with pytest.raises(DerivationError) as exc:
        derivation.parse(data, source)
    err = exc.value
    assert err.source == source
    assert 0 <= err.offset <= len(data)
    assert str(err) == f"{source}: byte {err.offset}: {err.reason}"
    return err


def test_empty() -> None:
    err = _error(b"")
    assert err.offset == 0
    assert "truncated" in err.reason


@pytest.mark.parametrize("path", [TOP, MULTI, GREP], ids=lambda p: p.name)
def test_truncated_at_every_offset(path: Path) -> None:
    data = path.read_bytes()
    for cut in range(len(data)):
        err = _error(data[:cut], source=path.name)
        # The error is at the cut (ran out of input) or before it (e.g. a path cut short).
        assert err.offset <= cut


def test_truncated_mid_utf8() -> None:
    data = derivation.serialize(_sample_with_env(("k", "é")))
    cut = data.index("é".encode()) + 1
    err = _error(data[:cut])
    assert err.offset == cut - 1
    assert "UTF-8" in err.reason


def _sample_with_env(*extra: tuple[str, str]) -> Derivation:
    drv = derivation.read(HELLO)
    return Derivation(drv.outputs, drv.input_drvs, drv.input_srcs, drv.system,
                      drv.builder, drv.args, (*drv.env, *extra))


def _replace(path: Path, old: bytes, new: bytes) -> tuple[bytes, int]:
    data = path.read_bytes()
    assert data.count(old) >= 1
    return data.replace(old, new, 1), data.index(old)


@pytest.mark.parametrize(
    ("old", "new", "delta", "reason"),
    [
        (b"and\\nnewline", b"and\\qnewline", 3, "bad escape"),
        (b"and\\nnewline", b"and\nnewline", 3, "unescaped control character"),
        (b"and\\nnewline", b"and\tnewline", 3, "unescaped control character"),
        (b"\"x86_64-linux\",", b"\"x86_64-linux\";", 14, "expected ','"),
        (b"Derive(", b"Derivf(", 5, "expected 'e'"),
        (b"-dep.drv\"", b"-dep.dr\"", -44, "does not end in .drv"),
        (b"/nix/store/b929", b"nix/store/b929", -1, "not an absolute store path"),
        (b"[\"out\"]", b"[\"out\",]", 7, "expected '\"'"),
        (b"[\"out\"]", b"[\"out\"}", 6, "expected ',' or ']'"),
    ],
)
def test_bad_bytes_located(old: bytes, new: bytes, delta: int, reason: str) -> None:
    data, at = _replace(TOP, old, new)
    err = _error(data)
    assert reason in err.reason
    assert err.offset == at + delta


def test_trailing_garbage() -> None:
    data = TOP.read_bytes()
    for junk in (b"\n", b" ", b"x", b")"):
        err = _error(data + junk)
        assert err.offset == len(data)
        assert "trailing data" in err.reason


def test_nul_and_binary() -> None:
    data = TOP.read_bytes()
    err = _error(data[:40] + b"\x00" + data[40:])
    assert err.offset == 40
    assert "NUL" in err.reason
    err = _error(data[:50] + b"\xff\xfe" + data[50:])
    assert err.offset == 50
    assert "UTF-8" in err.reason
    _error(bytes(range(256)))
    _error(b"\x7fELF\x02\x01\x01" + bytes(100))


def test_non_ascii_offsets_are_bytes() -> None:
    data = derivation.serialize(_sample_with_env(("kéy", "vālue\\")))
    assert derivation.parse(data).env_dict["kéy"] == "vālue\\"
    bad = data.replace(b'\\\\"', b'\\x"')
    err = _error(bad)
    assert bad[err.offset:err.offset + 2] == b"\\x"


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        (b'"",""', b'"md5","abc"', "out"),  # hello's output made fixed: accepted
        (b'"",""', b'"sha257","ab"', "unknown hash algorithm"),
        (b'"",""', b'"sha256","ABCD"', "not lowercase base16"),
        (b'"",""', b'"","ab"', "unknown hash algorithm"),
        (b'[("out","/nix', b'[("","/nix', "empty output name"),
        (b'"x86_64-linux","/bin/sh"', b'"x86_64-linux"', "expected '\"' (a string), found '['"),
    ],
)
def test_output_validation(old: bytes, new: bytes, reason: str) -> None:
    data = HELLO.read_bytes().replace(old, new, 1)
    if reason == "out":
        assert derivation.parse(data).outputs[0].fixed
        return
    assert reason in _error(data).reason


def test_structural_validation() -> None:
    hello = HELLO.read_bytes()
    out = b'("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")'
    assert "at least one output" in _error(hello.replace(out, b"", 1)).reason
    dup = hello.replace(out, out + b"," + out, 1)
    assert "duplicate output" in _error(dup).reason
    src = b'["/gnu/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-x"]'
    other_dir = hello.replace(b"[],[],", b"[]," + src + b",", 1)
    assert "not in the store directory /nix/store" in _error(other_dir).reason
    dup_env = hello.replace(b'("name","hello")', b'("name","hello"),("name","x")', 1)
    assert "duplicate environment variable" in _error(dup_env).reason
    multi = MULTI.read_bytes()
    inp = b'("/nix/store/2fnl5ny8f78xxb7i6kpd5ncbvmvfdhr2-fixed.txt.drv",["out"])'
    assert "duplicate input derivation" in _error(multi.replace(inp, inp + b"," + inp)).reason
    escaped_names = multi.replace(b'["out"])', b'["o\\"ut"])', 1)
    assert derivation.parse(escaped_names).input_drvs[0][1] == ('o"ut',)


# --- properties ------------------------------------------------------------------------------

_B32 = "0123456789abcdfghijklmnpqrsvwxyz"
_NAME_CHARS = "abcxyzABZ0129+-._?="
_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                 max_size=30) | st.text('"\\\n\r\tx', max_size=10)


@st.composite
def _store_paths(draw: st.DrawFn, store: str, suffix: str = "") -> str:
    digest = draw(st.text(_B32, min_size=32, max_size=32))
    first = draw(st.sampled_from("aZ0+-_?="))
    rest = draw(st.text(_NAME_CHARS, max_size=20))
    return f"{store}/{digest}-{first}{rest}{suffix}"


@st.composite
def _derivations(draw: st.DrawFn) -> Derivation:
    store = draw(st.sampled_from(["/gnu/store", "/nix/store", "/a/b/c"]))
    names = draw(st.lists(_texts.filter(bool), min_size=1, max_size=4, unique=True))
    outputs = []
    for name in names:
        path = draw(_store_paths(store))
        if draw(st.booleans()):
            algo = draw(st.sampled_from(["sha256", "r:sha256", "sha1", "text:sha512"]))
            digest = draw(st.text("0123456789abcdef", min_size=1, max_size=64))
            outputs.append(DerivationOutput(name, path, algo, digest))
        else:
            outputs.append(DerivationOutput(name, path, "", ""))
    drv_paths = draw(st.lists(_store_paths(store, ".drv"), max_size=4, unique=True))
    input_drvs = tuple(
        (p, tuple(draw(st.lists(_texts, min_size=0, max_size=3)))) for p in drv_paths
    )
    keys = draw(st.lists(_texts, max_size=6, unique=True))
    return Derivation(
        outputs=tuple(outputs),
        input_drvs=input_drvs,
        input_srcs=tuple(draw(st.lists(_store_paths(store), max_size=4))),
        system=draw(_texts),
        builder=draw(_texts),
        args=tuple(draw(st.lists(_texts, max_size=5))),
        env=tuple((k, draw(_texts)) for k in keys),
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_derivations())
def test_round_trip_property(drv: Derivation) -> None:
    data = derivation.serialize(drv)
    assert derivation.parse(data) == drv
    assert derivation.serialize(derivation.parse(data)) == data


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_derivation_error(data: bytes) -> None:
    try:
        derivation.parse(data, "junk")
    except DerivationError as e:
        assert 0 <= e.offset <= len(data)


@settings(max_examples=500)
@given(
    st.sampled_from([TOP.read_bytes(), MULTI.read_bytes(), GREP.read_bytes()]),
    st.lists(st.tuples(st.integers(0, 10_000), st.binary(min_size=0, max_size=3),
                       st.integers(0, 3)), min_size=1, max_size=4),
)
def test_mutated_samples(data: bytes, edits: list[tuple[int, bytes, int]]) -> None:
    buf = bytearray(data)
    for at, insert, delete in edits:
        at %= len(buf) + 1
        buf[at:at + delete] = insert
    mutated = bytes(buf)
    try:
        drv = derivation.parse(mutated, "mutated")
    except DerivationError as e:
        assert 0 <= e.offset <= len(mutated)
    else:
        # Whatever parses is canonical: writing it back gives the same bytes.
        assert derivation.serialize(drv) == mutated
