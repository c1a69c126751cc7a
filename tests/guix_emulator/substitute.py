"""Substitutes: what `guix substitute` ([SU] guix/scripts/substitute.scm, [SS]
guix/substitutes.scm, [NI] guix/narinfo.scm) does for the daemon ([BC] nix/libstore/build.cc
SubstitutionGoal), over real HTTP.

A path is looked up on each substitute URL in turn (`/HASH.narinfo`); the first narinfo whose
signature is valid for a key of the ACL wins ([SS] lookup-narinfos, [NI] valid-narinfo?); none
means "no substituter" (ecNoSubstituters), which is not a failure.  The references come first
([BC] SubstitutionGoal::tryNext: "To maintain the closure invariant, we first have to realise
the paths referenced by this one"); one that cannot be had leaves an incomplete closure, not a
failure either.  The nar is downloaded, decompressed, checked against the NarHash and
imported; a download that fails is tried on the other URLs ([SU] process-substitution/
fallback), and then the substitution has failed.

Emulator details: the compressions emulated are gzip and none (a Guix without guile-zstd or
guile-lzlib: [NI] narinfo-preferred-uris keeps only the ones it can decompress); no narinfo
cache (real Guix keeps lookups for %narinfo-ttl, and a 404 for %narinfo-negative-ttl, [SS]);
no progress bars.  The guix-daemon's own `--substitute-urls` (used when the client gives none)
is the environment variable GUIX_EMULATOR_DAEMON_SUBSTITUTE_URLS, empty by default.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field

from guix_emulator import pki
from guix_emulator.archive import nix_import
from guix_emulator.gcrypt import Sexp
from guix_emulator.hash import nix_base32_encode
from guix_emulator.i18n import G_
from guix_emulator.options import STORE, say
from guix_emulator.store import invalid_paths

TIMEOUT = 60  # seconds for one HTTP request
DECOMPRESSORS = {"gzip", "none"}


def daemon_substitute_urls() -> list[str]:
    return os.environ.get("GUIX_EMULATOR_DAEMON_SUBSTITUTE_URLS", "").split()


@dataclass(frozen=True)
class Narinfo:
    """[NI] <narinfo>: what a substitute server says about one store item."""

    url_base: str
    text: str
    path: str
    nar_hash: str  # "sha256:<nix-base32>"
    nar_size: int
    references: tuple[str, ...]
    deriver: str
    nars: tuple[tuple[str, str, int | None], ...]  # (URL, compression, file size)

    @property
    def download_size(self) -> int | None:
        """[UI] substitutable-download-size of the nar the client would fetch."""
        usable = [size for _, compression, size in self.nars if compression in DECOMPRESSORS]
        return usable[0] if usable else None


def parse_narinfo(text: str, url_base: str) -> Narinfo | None:
    """[NI] read-narinfo (fields "Key: value"; URL, Compression and FileSize repeat)."""
    fields: dict[str, str] = {}
    urls: list[str] = []
    compressions: list[str] = []
    sizes: list[int | None] = []
    for line in text.splitlines():
        key, colon, value = line.partition(": ")
        if not colon:
            continue
        if key == "URL":
            urls.append(value)
        elif key == "Compression":
            compressions.append(value)
        elif key == "FileSize":
            sizes.append(int(value) if value.isdigit() else None)
        else:
            fields.setdefault(key, value)
    try:
        path, nar_hash, nar_size = fields["StorePath"], fields["NarHash"], int(fields["NarSize"])
    except (KeyError, ValueError):
        return None
    references = tuple(f"{STORE}/{name}" for name in fields.get("References", "").split())
    deriver = f"{STORE}/{fields['Deriver']}" if fields.get("Deriver") else ""
    nars = tuple(
        (f"{url_base}/{url}", compressions[i] if i < len(compressions) else "bzip2",
         sizes[i] if i < len(sizes) else None)
        for i, url in enumerate(urls))
    return Narinfo(url_base, text, path, nar_hash, nar_size, references, deriver, nars)


@dataclass
class Substituter:
    """The daemon's substituter for one client: its URLs, the ACL, the client's verbosity."""

    urls: list[str]
    verbosity: int
    acl: list[Sexp] = field(default_factory=list)
    unreachable: set[str] = field(default_factory=set)
    narinfos: dict[str, Narinfo | None] = field(default_factory=dict)
    results: dict[str, bool | None] = field(default_factory=dict)  # one goal per path

    def __post_init__(self) -> None:
        self.urls = [url.rstrip("/") for url in self.urls]
        if self.urls:
            self.acl = pki.current_acl()

    def lookup(self, path: str) -> Narinfo | None:
        """[SS] lookup-narinfos over the URLs in order: the first valid narinfo."""
        if path not in self.narinfos:
            self.narinfos[path] = next(
                (info for url in self.urls if (info := self.fetch_narinfo(url, path))), None)
        return self.narinfos[path]

    def fetch_narinfo(self, url: str, path: str) -> Narinfo | None:
        hash_part = os.path.basename(path)[:32]
        try:
            with urllib.request.urlopen(f"{url}/{hash_part}.narinfo", timeout=TIMEOUT) as reply:
                text = reply.read().decode("utf-8", "replace")
        except urllib.error.HTTPError:
            return None  # a 404: not there; [SS] caches it as a negative lookup
        except OSError as error:
            host = urllib.request.urlparse(url).hostname or url
            if host not in self.unreachable:  # [SS] call-with-connection-error-handling
                self.unreachable.add(host)
                reason = getattr(error, "reason", error)
                strerror = getattr(reason, "strerror", None) or str(reason)
                self.warn(f"{host}: connection failed: {strerror}")
            return None
        info = parse_narinfo(text, url)
        if info is None or info.path != path or not pki.narinfo_signed(text, self.acl):
            return None  # [SS] lookup-narinfos keeps only narinfos that pass valid-narinfo?
        return info

    def warn(self, message: str) -> None:
        say(f"guix substitute: {G_('warning: ')}{message}\n")

    def substitute(self, path: str) -> bool | None:
        """[BC] the SubstitutionGoal of `path` (one per path: Worker::makeSubstitutionGoal):
        True once valid, False if it failed (ecFailed: its own download, or a reference's),
        None if no server offers it or a reference (ecNoSubstituters, ecIncompleteClosure)."""
        if path not in self.results:
            self.results[path] = self._substitute(path)
        return self.results[path]

    def _substitute(self, path: str) -> bool | None:
        if path not in invalid_paths([path]):
            return True
        info = self.lookup(path)
        if info is None:
            return None
        for reference in info.references:  # [BC] referencesValid
            if reference != path and (done := self.substitute(reference)) is not True:
                return done
        if self.verbosity >= 3:  # [ST] 'substituter-started, with print-log?
            say(G_("substituting {}...").format(path) + "\n")
        if self.download(info):
            return True
        say(G_("substitution of {} failed").format(path) + "\n")  # [ST] 'substituter-failed
        return False

    def download(self, info: Narinfo) -> bool:
        """[SU] process-substitution: its nar from the narinfo's server, else the same narinfo
        from any server ([SU] process-substitution/fallback)."""
        if self.fetch_nar(info):
            return True
        say(f"retrying download of '{info.path}' with other substitute URLs...\n")
        for url in self.urls:
            alternate = self.fetch_narinfo(url, info.path)
            if alternate is not None and self.fetch_nar(alternate):
                return True
        say(f"guix substitute: {G_('error: ')}failed to find alternative substitute for "
            f"'{info.path}'\n")
        return False

    def fetch_nar(self, info: Narinfo) -> bool:
        choices = [(u, c) for u, c, _ in info.nars if c in DECOMPRESSORS]
        if not choices:  # [SU] try-fetch with no choice left
            say(f"guix substitute: {G_('error: ')}no valid nar URLs for {info.path} at "
                f"{info.url_base}\n")
            return False
        url, compression = choices[0]
        if self.verbosity >= 2:  # [ST] 'download-started, print-urls?
            say(G_("downloading from {} ...").format(url) + "\n")
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
                data = reply.read()
        except urllib.error.HTTPError as error:
            self.warn(f"download from '{url}' failed: {error.code}, \"{error.reason}\"")
            return False
        except OSError:
            return False
        try:
            nar = gzip.decompress(data) if compression == "gzip" else data
        except (OSError, EOFError, zlib.error):
            nar = b""
        actual = "sha256:" + nix_base32_encode(hashlib.sha256(nar).digest())
        if actual != info.nar_hash:
            # [SU] download-nar writes "hash-mismatch"; [BC] SubstitutionGoal::finished traces
            # "@ hash-mismatch", which [ST] prints as below.
            say(G_("{} hash mismatch for {}:").format("sha256", info.path) + "\n"
                + f"  expected hash: {info.nar_hash.removeprefix('sha256:')}\n"
                + f"  actual hash:   {actual.removeprefix('sha256:')}\n")
            return False
        with tempfile.NamedTemporaryFile(prefix="guix-substitute-") as nar_file:
            nar_file.write(nar)
            nar_file.flush()
            nix_import([(nar_file.name, info.path, info.references, info.deriver)])
        return True


def substitute_items(items: list[str], substituter: Substituter, keep_going: bool) -> list[str]:
    """[BC] buildPaths for store items: a goal each; those that failed (not the ones no server
    offers). Without --keep-going the first failure stops the rest ([BC] Worker::run)."""
    failed: list[str] = []
    for item in items:
        if substituter.substitute(item) is False:
            failed.append(item)
            if not keep_going:
                break
    return failed

