"""Narinfo files as `guix publish` writes them, signed for Guix and for Nix, read as both read them.

Layout (guix/scripts/publish.scm, `narinfo-string`): StorePath, NarHash, NarSize, References,
then, when known, System and Deriver (in the order Guix wrote them while it wrote System:
"System: ~a~%Deriver: ~a~%"), then `Signature: 1;HOST;BASE64` over all the text above it.  Nix's
`Sig:` lines follow (outside what Guix signs; Guix ignores the field), then one URL/Compression/
FileSize triple per compressed nar.  Guix reads every triple and picks one (guix/narinfo.scm);
Nix keeps the last one it reads, so the preferred compression for Nix goes last.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import quote

from buildfarm.errors import ArchiveError
from buildfarm.formats.signing import (
    SigningKey,
    guix_narinfo_signature_line,
    narinfo_fingerprint,
    verify_nix,
)

CONTENT_TYPE = "application/x-nix-narinfo"
NAR_PATH = "nar"
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
HASH_PART = re.compile(f"[{NIX32}]{{32}}")
# A store file name: 32 nix-base32 characters, '-', a name Nix accepts.
BASENAME = re.compile(f"[{NIX32}]{{32}}-[A-Za-z0-9+\\-_?=][A-Za-z0-9+\\-._?=]{{0,210}}")


@dataclass(frozen=True, slots=True)
class NarFile:
    """One published nar: where (relative to the cache), how compressed, how big."""

    url: str
    compression: str
    file_size: int | None = None


@dataclass(frozen=True, slots=True)
class Narinfo:
    """What a narinfo says; references and deriver are full store paths."""

    store_path: str
    nar_hash: str  # "sha256:<nix-base32>"
    nar_size: int
    references: tuple[str, ...] = ()
    deriver: str | None = None
    system: str | None = None
    signature: str | None = None  # Guix: "1;HOST;BASE64"
    sigs: tuple[str, ...] = ()  # Nix: "NAME:BASE64"
    files: tuple[NarFile, ...] = ()

    @property
    def store_dir(self) -> str:
        return self.store_path.rsplit("/", 1)[0]

    @property
    def hash_part(self) -> str:
        return hash_part(self.store_path)

    def signed_text(self) -> str:
        """The normative part, exactly the text Guix signs (everything above `Signature:`)."""
        references = " ".join(sorted(_basename(r) for r in self.references))
        text = (
            f"StorePath: {self.store_path}\n"
            f"NarHash: {self.nar_hash}\n"
            f"NarSize: {self.nar_size}\n"
            f"References: {references}\n"
        )
        if self.system:
            text += f"System: {self.system}\n"
        if self.deriver:
            text += f"Deriver: {_basename(self.deriver)}\n"
        return text

    def fingerprint(self) -> bytes:
        """What Nix signs: `1;PATH;NARHASH;NARSIZE;REFS` (signing.narinfo_fingerprint)."""
        return narinfo_fingerprint(self.store_path, self.nar_hash, self.nar_size, self.references)

    def render(self) -> str:
        text = self.signed_text()
        if self.signature is not None:
            text += f"Signature: {self.signature}\n"
        text += "".join(f"Sig: {sig}\n" for sig in self.sigs)
        for nar in self.files:
            text += f"URL: {nar.url}\nCompression: {nar.compression}\n"
            if nar.file_size is not None:
                text += f"FileSize: {nar.file_size}\n"
        return text


def hash_part(store_path: str) -> str:
    """The 32-character hash of a store path, which names its narinfo."""
    name = _basename(store_path)
    if not BASENAME.fullmatch(name):
        raise ArchiveError(f"not a store path: {store_path!r}")
    return name[:32]


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def uri_encode(segment: str) -> str:
    """Guile's `uri-encode` (what `encode-and-join-uri-path` applies to each segment): every
    byte but ASCII letters, digits and `-._~` as %XX, e.g. `gtk+` -> `gtk%2B`."""
    return quote(segment, safe="")


def nar_url(store_path: str, compression: str, nar_path: str = NAR_PATH) -> str:
    """`nar/<compression>/<basename>`, or `nar/<basename>` for `none` ([P] store-item->recutils)."""
    parts = [p for p in nar_path.split("/") if p]
    if compression != "none":
        parts.append(compression)
    parts.append(_basename(store_path))
    return "/".join(uri_encode(p) for p in parts)


def sign(info: Narinfo, key: SigningKey, key_name: str, host: str) -> Narinfo:
    """`info` with a Guix `Signature:` (host `host`) and a Nix `Sig:` (key name `key_name`)."""
    line = guix_narinfo_signature_line(key, info.signed_text(), host)
    name = key.nix_public(key_name).partition(":")[0]  # validates the name
    nix_sig = base64.b64encode(key.sign_nix(info.fingerprint())).decode("ascii")
    return replace(info, signature=line.removeprefix("Signature: "), sigs=(f"{name}:{nix_sig}",))


_SINGLE = ("StorePath", "NarHash", "NarSize", "References", "Deriver", "System", "Signature")


def parse(text: str) -> Narinfo:
    """Read a narinfo like Guix's `read-narinfo` (every URL/Compression/FileSize, in order) and
    check what Nix requires (StorePath, NarHash, a URL, a non-zero NarSize)."""
    fields: dict[str, str] = {}
    urls: list[str] = []
    compressions: list[str] = []
    sizes: list[int] = []
    sigs: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        name, colon, value = line.partition(": ")
        if not colon:
            raise ArchiveError(f"narinfo line {number} is not 'Name: value': {line!r}")
        if name == "URL":
            urls.append(value)
        elif name == "Compression":
            compressions.append(value)
        elif name == "FileSize":
            sizes.append(_integer(value, "FileSize"))
        elif name == "Sig":
            sigs.append(value)
        elif name in _SINGLE:
            fields.setdefault(name, value)
    for required in ("StorePath", "NarHash", "NarSize"):
        if required not in fields:
            raise ArchiveError(f"narinfo lacks {required}")
    if not urls or not urls[-1]:
        raise ArchiveError("narinfo lacks a URL")
    size = _integer(fields["NarSize"], "NarSize")
    if size <= 0:
        raise ArchiveError("narinfo NarSize is missing or zero")
    store_path = fields["StorePath"]
    store_dir = store_path.rsplit("/", 1)[0]
    hash_part(store_path)
    deriver = fields.get("Deriver")
    files = tuple(
        NarFile(
            url,
            compressions[i] if i < len(compressions) else "bzip2",  # Nix's default
            sizes[i] if i < len(sizes) else None,
        )
        for i, url in enumerate(urls)
    )
    return Narinfo(
        store_path=store_path,
        nar_hash=fields["NarHash"],
        nar_size=size,
        references=tuple(f"{store_dir}/{r}" for r in fields.get("References", "").split()),
        deriver=f"{store_dir}/{deriver}" if deriver and deriver != "unknown-deriver" else None,
        system=fields.get("System"),
        signature=fields.get("Signature"),
        sigs=tuple(sigs),
        files=files,
    )


def _integer(value: str, name: str) -> int:
    if not value.isdigit():
        raise ArchiveError(f"narinfo {name} is not a number: {value!r}")
    return int(value)


def verify_nix_sigs(info: Narinfo, trusted: Mapping[str, bytes] | Iterable[str]) -> bool:
    """Nix's check: some `Sig:` whose key name is trusted verifies over the fingerprint.

    `trusted` maps key names to 32-byte public keys, or lists `NAME:BASE64` strings."""
    if not isinstance(trusted, Mapping):
        keys: dict[str, bytes] = {}
        for text in trusted:
            name, _, encoded = text.strip().partition(":")
            try:
                keys[name] = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                continue
        trusted = keys
    fingerprint = info.fingerprint()
    for sig in info.sigs:
        name, _, encoded = sig.partition(":")
        public = trusted.get(name)
        if public is None:
            continue
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            continue
        if verify_nix(fingerprint, raw, public):
            return True
    return False


def nix_cache_info(store_dir: str) -> str:
    """`/nix-cache-info` exactly as `guix publish` serves it."""
    return f"StoreDir: {store_dir}\nWantMassQuery: 0\nPriority: 100\n"
