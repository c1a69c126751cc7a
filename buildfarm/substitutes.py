"""`submit --derivation-substitute-urls`: a derivation the coordinator's store lacks is fetched,
with every store item it refers to that is missing too (its input derivations, their sources),
from substitute servers (narinfo, then nar), each narinfo's signature checked against the
trusted keys and each nar against the hash the narinfo gives, then imported into the
coordinator's Nix store in one `nix-store --import`: references first, nothing imported unless
everything was fetched and checked.

The trusted keys (Nix's NAME:BASE64 public keys) are the farm's own (STATE_DIR's signing key:
another farm's `buildfarm key show --format nix`) and those of the trusted-keys file
(CONFIG_DIR/trusted-keys, or submit --trusted-keys FILE), one per line, '#' starting a
comment: what Nix's trusted-public-keys would hold. A narinfo no trusted key signed is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from buildfarm.errors import BuildfarmError, UsageError
from buildfarm.formats import nar
from buildfarm.formats import narinfo as ni
from buildfarm.formats.keys import key_name
from buildfarm.formats.signing import load_key, parse_nix_key

MAX_NARINFO = 1 << 20
MAX_NAR = 32 << 20  # as a .drv read from a file; the items of a .drv closure are small
MAX_ITEMS = 100_000
TIMEOUT = 30.0


class SubstituteError(BuildfarmError):
    """A substitute server did not give what was asked, or gave it unsigned or altered."""


@dataclass(frozen=True, slots=True)
class Fetched:
    path: str
    nar: bytes
    references: tuple[str, ...]
    deriver: str


def trusted_keys(keys_file: str, state_dir: str) -> dict[str, bytes]:
    """Key name -> public key: the farm's own, and the keys file's (missing: none)."""
    keys: dict[str, bytes] = {}
    if os.path.exists(os.path.join(state_dir, "signing-key.secret")):
        keys[key_name(state_dir)] = load_key(state_dir).public_bytes
    try:
        with open(keys_file, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                try:
                    name, public = parse_nix_key(text)
                except BuildfarmError as e:
                    raise UsageError(f"{keys_file}:{number}: {e}") from None
                keys[name] = public
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{keys_file}: cannot read the trusted keys: {e}") from None
    return keys


def _get(url: str, limit: int) -> bytes | None:
    """The body at `url` (None for 404), at most `limit` bytes."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            body: bytes = response.read(limit + 1)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise SubstituteError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise SubstituteError(f"{url}: {reason}") from None
    if len(body) > limit:
        raise SubstituteError(f"{url}: more than {limit} bytes")
    return body


def zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError


def _decompress(data: bytes, compression: str, url: str) -> bytes:
    """At most MAX_NAR + 1 bytes of the decompressed nar, whatever the data claims."""
    try:
        if compression in ("none", ""):
            return data
        if compression == "gzip":
            return gzip.GzipFile(fileobj=io.BytesIO(data)).read(MAX_NAR + 1)
        if compression == "xz":
            return lzma.LZMADecompressor().decompress(data, MAX_NAR + 1)
        if compression == "zstd":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
            return bytes(reader.read(MAX_NAR + 1))
    except (OSError, EOFError, lzma.LZMAError, ValueError, zstd_error()) as e:
        raise SubstituteError(f"{url}: not valid {compression} data: {e}") from None
    raise SubstituteError(f"{url}: unknown compression {compression!r}")


def fetch_one(path: str, urls: Sequence[str], keys: dict[str, bytes]) -> Fetched:
    """One store item from the first server that has it: narinfo signed by a trusted key, nar
    whose hash and size are the narinfo's."""
    name = ni.hash_part(path)
    for base in urls:
        text = _get(f"{base.rstrip('/')}/{name}.narinfo", MAX_NARINFO)
        if text is None:
            continue
        where = f"{base.rstrip('/')}/{name}.narinfo"
        try:
            info = ni.parse(text.decode())
        except (BuildfarmError, UnicodeDecodeError) as e:
            raise SubstituteError(f"{where}: not a narinfo: {e}") from None
        if info.store_path != path:
            raise SubstituteError(f"{where}: describes {info.store_path}, not {path}")
        if not ni.verify_nix_sigs(info, keys):
            raise SubstituteError(f"{where}: no signature by a trusted key (trusted: "
                                  f"{', '.join(sorted(keys)) or 'none'})")
        if info.nar_size > MAX_NAR:
            raise SubstituteError(f"{where}: a nar of {info.nar_size} bytes is too big for a "
                                  "derivation's closure")
        for file in info.files:
            url = urllib.parse.urljoin(base.rstrip("/") + "/", file.url)
            data = _get(url, MAX_NAR)
            if data is None:
                continue
            body = _decompress(data, file.compression, url)
            digest = "sha256:" + nar.nix_base32_encode(hashlib.sha256(body).digest())
            if len(body) != info.nar_size or digest != info.nar_hash:
                raise SubstituteError(f"{url}: the nar's hash or size is not the narinfo's")
            refs = tuple(r for r in info.references if r != path)
            return Fetched(path, body, refs, info.deriver or "")
        raise SubstituteError(f"{where}: none of its nars could be downloaded")
    raise SubstituteError(f"{path}: no substitute server has it ({', '.join(urls)})")


def fetch_closure(paths: Iterable[str], urls: Sequence[str], keys: dict[str, bytes]
                  ) -> list[Fetched]:
    """Every item of the closure of `paths` missing from this host, references first."""
    fetched: dict[str, Fetched] = {}
    todo = [p for p in dict.fromkeys(paths) if not os.path.lexists(p)]
    seen = set(todo)
    while todo:
        if len(seen) > MAX_ITEMS:
            raise SubstituteError(f"more than {MAX_ITEMS} store items to fetch")
        item = fetch_one(todo.pop(), urls, keys)
        fetched[item.path] = item
        for ref in item.references:
            if ref not in seen and not os.path.lexists(ref):
                seen.add(ref)
                todo.append(ref)
    ordered: list[Fetched] = []
    done: set[str] = set()
    for root in sorted(fetched):
        stack = [(root, False)]
        while stack:  # depth first, an item after its references
            path, expanded = stack.pop()
            if path in done or path not in fetched:
                continue
            if expanded:
                done.add(path)
                ordered.append(fetched[path])
                continue
            stack.append((path, True))
            stack.extend((ref, False) for ref in fetched[path].references if ref not in done)
    return ordered


def import_items(items: Sequence[Fetched]) -> None:
    """Into the coordinator's Nix store, in one `nix-store --import` (all or nothing)."""
    if not items:
        return
    out = io.BytesIO()
    nar.write_bundle(out, [(i.nar, i.path, i.references, i.deriver, None) for i in items])
    try:
        done = subprocess.run(["nix-store", "--import"], input=out.getvalue(),
                              capture_output=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SubstituteError(f"nix-store --import: {e}") from None
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
        raise SubstituteError(f"nix-store --import: {last}")


def fetch_derivations(paths: Sequence[str], urls: Sequence[str], keys_file: str,
                      state_dir: str) -> int:
    """Fetch what the coordinator's store lacks of the closures of `paths`; how many items."""
    for url in urls:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
            raise UsageError(f"--derivation-substitute-urls {url!r}: use http(s):// or file://")
    items = fetch_closure(paths, urls, trusted_keys(keys_file, state_dir))
    import_items(items)
    return len(items)
