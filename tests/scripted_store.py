"""A build machine's store, scripted, for tests of the coordinator's decisions (test_attempt.py).

`ScriptedStore` stands where `Remote` does (and, for a Nix machine, where its store sessions
do): it answers the commands the guix and nix backends build from a small model of the
machine's store (valid paths with their nars, what building each derivation does) in the words
the real stores answer with. Nix's answers are those Debian 12's Nix 2.8.0 gave in the test bed
(quoted below); Guix's are the Guix emulator's, taken from Guix's source. Bundles are read and
written with the emulator's code, and a Guix machine checks the signature of what it imports
against its ACL with libgcrypt (the emulator's pki): nothing here is the coordinator's code.

Being the boundary, it also lets a test script what no real machine does on demand: any kind
of command may be answered with a given status and message (`answer`), the store left as it
was, drop the connection (`lost`), or outlive its time after printing something (`stall`);
a garbage collection may run before any kind of command (`collect_before`), deleting what no
GC root (`roots`, made by the attempt's root commands) keeps alive. Substitute servers
(`servers`: URL -> the items it offers) answer substitutions. Every command is logged by kind
(`commands`), every accepted import by its paths (`imported`).
"""

from __future__ import annotations

import hashlib
import io
import shlex
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from guix_emulator import pki
from guix_emulator.archive import trailer
from guix_emulator.derivation import parse_derivation
from guix_emulator.gcrypt import Sexp, generate_key
from guix_emulator.hash import nix_base32_encode
from guix_emulator.options import Leave
from guix_emulator.serialization import (
    ARCHIVE_VERSION_1,
    ArchiveError,
    Source,
    read_export_item,
    write_int,
    write_string,
)

from buildfarm.errors import ProtocolError, RemoteError
from buildfarm.ssh.remote import CommandTimeoutError, RunResult
from buildfarm.ssh.store_session import PathInfo, SessionFailed

KINDS = ("missing", "import", "dry-run", "build", "check", "export", "hash", "substitute",
         "roots", "unroot")
ENV = ["env", "LC_ALL=C.UTF-8", "LANGUAGE="]


def text_nar(contents: bytes) -> bytes:
    """The nar of a regular file holding `contents` ([SER] write-file)."""
    return b"".join([
        write_string(ARCHIVE_VERSION_1), write_string(b"("), write_string(b"type"),
        write_string(b"regular"), write_string(b"contents"), write_int(len(contents)),
        contents, bytes(-len(contents) % 8), write_string(b")")])


@dataclass(frozen=True)
class Item:
    """A valid store path: its nar, references and deriver."""

    nar: bytes
    references: tuple[str, ...] = ()
    deriver: str = ""

    @property
    def nar_hash(self) -> str:
        return "sha256:" + nix_base32_encode(hashlib.sha256(self.nar).digest())


@dataclass(frozen=True)
class Recipe:
    """What running the builder of a derivation does: its log, then its outputs, or its
    exit code when it fails."""

    outputs: dict[str, Item]
    log: bytes = b""
    exit_code: int = 0


@dataclass
class ScriptedStore:
    kind: str  # "nix" or "guix"
    authorized: Sequence[str] = ()  # a Guix machine's ACL: public-key s-expressions
    items: dict[str, Item] = field(default_factory=dict)
    recipes: dict[str, Recipe] = field(default_factory=dict)
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # scripted, by kind
    lost: set[str] = field(default_factory=set)  # kinds of command the connection drops
    commands: list[str] = field(default_factory=list)
    imported: list[list[str]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # the machine's temporary files
    fetch_limits: list[int | None] = field(default_factory=list)  # what each fetch allowed
    # A Guix machine's key pair, as libgcrypt's genkey makes it: made on first use if not given.
    key: Sexp | None = field(default=None, repr=False)
    servers: dict[str, dict[str, Item]] = field(default_factory=dict)  # substitute servers
    stall: dict[str, bytes] = field(default_factory=dict)  # kind -> what it says, then hangs
    collect_before: set[str] = field(default_factory=set)  # kinds a collection precedes
    roots: dict[str, set[str]] = field(default_factory=dict)  # attempt -> paths it roots

    # --- the model ----------------------------------------------------------------------

    def add_derivation(self, path: str, text: bytes) -> None:
        drv = parse_derivation(text, path)
        references = tuple(sorted({p for p, _ in drv.inputs} | set(drv.sources)))
        self.items[path] = Item(text_nar(text), references)

    def answer(self, kind: str, status: int, stderr: str) -> None:
        """Answer every command of `kind` (one of KINDS) so from now on, changing nothing."""
        assert kind in KINDS, kind
        self.answers[kind] = (status, stderr.encode())

    def _inputs(self, drv: str) -> list[tuple[str, tuple[str, ...]]]:
        text = _nar_contents(self.items[drv].nar)
        return list(parse_derivation(text, drv).inputs)

    def _outputs(self, drv: str) -> dict[str, str]:
        return dict(parse_derivation(_nar_contents(self.items[drv].nar), drv).outputs)

    def collect(self) -> list[str]:
        """A garbage collection: every item not reachable from a root goes (what it deleted)."""
        alive: set[str] = set()
        todo = [p for paths in self.roots.values() for p in paths if p in self.items]
        while todo:
            path = todo.pop()
            if path not in alive:
                alive.add(path)
                todo.extend(r for r in self.items[path].references if r in self.items)
        dead = [p for p in self.items if p not in alive]
        for path in dead:
            del self.items[path]
        return dead

    # --- Remote ---------------------------------------------------------------------------

    async def run(self, argv: Sequence[str], *, input: bytes | None = None,
                  timeout: float | None = None, check: bool = False) -> RunResult:
        kind, operands = self._classify(argv)
        return self._answer(argv, kind, lambda: self._handle(kind, operands, input or b""))

    async def run_streaming(
        self, argv: Sequence[str], *, stdin: AsyncIterator[bytes] | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        timeout: float | None = None, silence_timeout: float | None = None,
    ) -> RunResult:
        data = b"".join([chunk async for chunk in stdin]) if stdin is not None else b""
        kind, operands = self._classify(argv)
        result = self._answer(argv, kind, lambda: self._handle(kind, operands, data))
        out, err = result.stdout, result.stderr
        if on_stdout is not None:
            on_stdout(out)
            out = b""
        if on_stderr is not None:
            on_stderr(err)
            err = b""
        return RunResult(result.argv, result.exit_status, out, err)

    async def fetch(self, remote_path: str, local_path: str, *,
                    progress: Callable[[int], None] | None = None,
                    limit: int | None = None) -> int:
        data = self.files[remote_path]
        self.fetch_limits.append(limit)
        if limit is not None and len(data) > limit:  # as Remote.fetch refuses it
            raise ProtocolError(f"{remote_path} is {len(data)} bytes, more than the {limit}")
        with open(local_path, "wb") as stream:
            stream.write(data)
        if progress is not None:
            progress(len(data))
        return len(data)

    async def remove(self, remote_path: str) -> None:
        self.files.pop(remote_path, None)

    def _classify(self, argv: Sequence[str]) -> tuple[str, list[str]]:
        words = list(argv)
        if words[:2] == ["sh", "-c"] and words[3] in ("export", "nar-hash"):
            return ("export" if words[3] == "export" else "hash"), words[4:]
        if words[:2] == ["sh", "-c"] and words[3].startswith("buildfarm-"):
            return ("roots" if "mkdir" in words[2] else "unroot"), words[4:]
        if self.kind == "guix":
            assert words[:3] == ENV, f"a Guix command not in the C locale: {shlex.join(words)}"
            words = words[3:]
        shapes = {
            "nix": [(["nix-store", "--check-validity", "--print-invalid"], "missing"),
                    (["nix-store", "--import"], "import"),
                    (["nix-store", "--realise", "--dry-run", "--option", "substitute", "false",
                      "--option", "builders", ""], "dry-run"),
                    (["nix-store", "--realise", "--keep-going", "--option", "substituters"],
                     "substitute"),
                    (["nix-store", "--realise", "--check"], "check"),
                    (["nix-store", "--realise"], "build")],
            "guix": [(["guix", "archive", "--missing"], "missing"),
                     (["guix", "archive", "--import"], "import"),
                     (["guix", "build", "--dry-run", "--no-grafts", "--no-substitutes",
                       "--no-offload"], "dry-run"),
                     (["guix", "build", "--no-grafts", "--no-offload", "--keep-going"],
                      "substitute"),
                     (["guix", "build", "--no-grafts", "--no-substitutes", "--no-offload",
                       "--check"], "check"),
                     (["guix", "build", "--no-grafts", "--no-substitutes", "--no-offload"],
                      "build"),
                     (["guix", "hash", "--serializer=nar"], "hash")],
        }[self.kind]
        for prefix, kind in shapes:
            if words[:len(prefix)] == prefix:
                rest = words[len(prefix):]
                if kind in ("build", "check"):  # the options, then the derivation
                    if self.kind == "nix":
                        assert rest[1:7] == ["--option", "substitute", "false", "--option",
                                             "builders", ""], rest
                    rest = [w for w in rest if w.startswith("/")]
                    rest = rest[:1]
                elif kind == "hash":
                    rest = rest[-1:]
                elif kind == "substitute":
                    urls = rest[0].removeprefix("--substitute-urls=")
                    rest = [urls, *(w for w in rest[1:] if w.startswith("/"))]
                elif kind == "dry-run":
                    rest = [w for w in rest if w.startswith("/") or w == "--check"]
                return kind, rest
        raise AssertionError(f"a command no {self.kind} backend runs: {shlex.join(words)}")

    def _answer(self, argv: Sequence[str], kind: str,
                handle: Callable[[], tuple[int, bytes, bytes]]) -> RunResult:
        self.commands.append(kind)
        if kind in self.collect_before:
            self.collect()
        if kind in self.lost:
            raise RemoteError(f"machine: connection lost during {kind}")
        if kind in self.stall:
            raise CommandTimeoutError(
                f"machine: {shlex.join(argv)} still running after 120s (timeout); killed it",
                reason="timeout", result=RunResult(tuple(argv), None, b"", self.stall[kind]))
        if kind in self.answers:
            status, stderr = self.answers[kind]
            return RunResult(tuple(argv), status, b"", stderr)
        status, out, err = handle()
        return RunResult(tuple(argv), status, out, err)

    def _handle(self, kind: str, operands: list[str], data: bytes) -> tuple[int, bytes, bytes]:
        if kind == "missing":
            paths = data.decode().splitlines() if self.kind == "guix" else operands
            return 0, "".join(f"{p}\n" for p in paths if p not in self.items).encode(), b""
        if kind == "import":
            problem = self.import_bundle(data)
            return (0, b"", b"") if problem is None else (1, b"", self._error("archive", problem))
        if kind == "roots":
            attempt, *_keep = operands
            self.roots.setdefault(attempt, set()).update(data.decode().split())
            for other in [a for a in self.roots if a not in operands]:
                del self.roots[other]
            return 0, b"", b""
        if kind == "unroot":
            self.roots.pop(operands[0], None)
            return 0, b"", b""
        handler = {"dry-run": self._dry_run, "build": self._build, "check": self._check_build,
                   "export": self._export, "hash": self._hash,
                   "substitute": self._substitute}[kind]
        return handler(operands)

    def _error(self, command: str, message: str) -> bytes:
        """How each store reports an error: "error: M" (Nix 2.8), "guix CMD: error: M"."""
        prefix = "error: " if self.kind == "nix" else f"guix {command}: error: "
        return f"{prefix}{message}\n".encode()

    def _quote(self, path: str) -> str:
        return f"'{path}'" if self.kind == "nix" else f"`{path}'"

    # --- the commands -------------------------------------------------------------------

    def import_bundle(self, data: bytes) -> str | None:
        """Import each item in turn (a Guix machine checks its signature first); the error
        that stopped it, or None. Items before a bad one stay imported, as in both daemons."""
        acl = [key for key in (Sexp.parse(k) for k in self.authorized) if key is not None]
        source, done = Source(io.BytesIO(data)), []
        try:
            while (marker := source.read_int()) != 0:
                if marker != 1:
                    return "input doesn't look like something created by `nix-store --export'"
                nar = io.BytesIO()
                source.copy = nar.write
                item = read_export_item(source)
                source.copy = None
                if self.kind == "guix":
                    pki.check_import(item, acl)
                for reference in item.references:
                    if reference not in self.items and reference != item.path:
                        return f"path {self._quote(reference)} is not valid"
                self.items[item.path] = Item(nar.getvalue(), item.references, item.deriver)
                done.append(item.path)
        except (ArchiveError, Leave) as error:
            return str(error)
        finally:
            if done:
                self.imported.append(done)
        return None

    def _nix_plan(self, build: list[str], unknown: list[str]) -> bytes:
        """Nix 2.8 printMissing, as captured in the test bed."""
        text = ""
        if build:
            text += ("this derivation will be built:\n" if len(build) == 1
                     else f"these {len(build)} derivations will be built:\n")
            text += "".join(f"  {d}\n" for d in build)
        if unknown:
            text += "don't know how to build these paths:\n"
            text += "".join(f"  {p}\n" for p in unknown)
        return text.encode()

    def plan(self, drv: str, wanted_outputs: Sequence[str] | None = None,
             check: bool = False) -> tuple[list[str], list[str]]:
        """What realising `drv` needs: the derivations to build (dependencies first) and the
        paths the store cannot build (an invalid .drv: Nix's queryMissing "unknown"). With
        `check` (Guix's check mode), `drv` counts as not built."""
        build: list[str] = []
        unknown: list[str] = []

        def visit(path: str, wanted: Sequence[str] | None) -> None:
            if path not in self.items:
                if path not in unknown:
                    unknown.append(path)
                return
            outputs = self._outputs(path)
            names = list(outputs) if wanted is None else wanted
            built = all(outputs[n] in self.items for n in names)
            if path in build or (built and not (check and path == drv)):
                return
            for input_drv, input_outputs in self._inputs(path):
                visit(input_drv, input_outputs)
            build.append(path)

        visit(drv, wanted_outputs)
        return build, unknown

    def _dry_run(self, operands: list[str]) -> tuple[int, bytes, bytes]:
        check = "--check" in operands
        targets = [o for o in operands if o != "--check"]
        if len(targets) > 1 or "!" in targets[0]:  # Nix: the inputs of a rebuild, DRV!OUTS
            build, unknown = [], []
            for target in targets:
                path, _, names = target.partition("!")
                more_build, more_unknown = self.plan(path, names.split(","))
                build += [d for d in more_build if d not in build]
                unknown += [d for d in more_unknown if d not in unknown]
            return 0, b"", self._nix_plan(build, unknown)
        (drv,) = targets
        build, unknown = self.plan(drv, check=check)
        if self.kind == "nix":
            return 0, b"", self._nix_plan(build, unknown)
        if drv in unknown:  # the emulator: the missing .drv is asked for and fails
            return 1, b"", (f"cannot build missing derivation ‘{drv}’\n"  # noqa: RUF001
                            + f"guix build: error: build of `{drv}' failed\n").encode()
        if not build:  # a no-op build: the outputs on stdout
            return 0, "".join(f"{p}\n" for p in self._outputs(drv).values()).encode(), b""
        noun = "derivation" if len(build) == 1 else "derivations"
        text = f"The following {noun} would be built:\n" + "".join(
            f"   {d}\n" for d in reversed(build))
        return 0, b"", text.encode()

    def _build(self, operands: list[str]) -> tuple[int, bytes, bytes]:
        (drv,) = operands
        build, unknown = self.plan(drv)
        if unknown:  # the .drv is gone: Guix's haveDerivation, Nix 2.8's wording
            if self.kind == "nix":
                return 1, b"", f"error: cannot build missing derivation '{unknown[0]}'\n".encode()
            return 1, b"", (f"cannot build missing derivation \u2018{unknown[0]}\u2019\n"
                            f"guix build: error: build of `{drv}' failed\n").encode()
        assert build[-1:] in ([drv], []), (build, unknown)
        assert build[:-1] == [], f"the test did not provide the inputs of {drv}: {build}"
        recipe = self.recipes[drv]
        if self.kind == "nix":  # as Nix 2.8 printed it in the test bed
            err = (f"this derivation will be built:\n  {drv}\nbuilding '{drv}'...\n".encode()
                   + recipe.log)
        else:
            err = (f"The following derivation will be built:\n   {drv}\n"
                   f"building {drv}...\n".encode() + recipe.log)
        if recipe.exit_code:
            if self.kind == "nix":
                return 100, b"", err + (f"error: builder for '{drv}' failed with exit code "
                                        f"{recipe.exit_code}\n").encode()
            return 1, b"", err + (
                f"builder for `{drv}' failed with exit code {recipe.exit_code}\n"
                f"build of {drv} failed\nCould not find build log for '{drv}'.\n"
                f"guix build: error: build of `{drv}' failed\n").encode()
        for path, item in recipe.outputs.items():
            self.items[path] = Item(item.nar, item.references, drv)
        out = "".join(f"{p}\n" for p in self._outputs(drv).values()).encode()
        return 0, out, err + (f"successfully built {drv}\n".encode() if self.kind == "guix"
                              else b"")

    def _check_build(self, operands: list[str]) -> tuple[int, bytes, bytes]:
        """A build with --check: the outputs must all be valid; it builds again and compares,
        changing nothing. Messages: Nix 2.8's (captured in the test bed: a difference exits
        104), Guix's daemon's ([BC] outputsSubstituted, registerOutputs; its client exits 1)."""
        (drv,) = operands
        outputs = self._outputs(drv)
        quoted = self._quote(drv)
        if any(p not in self.items for p in outputs.values()):
            return 1, b"", self._error("build", (
                f"some outputs of {quoted} are not valid, so checking is not possible"))
        recipe = self.recipes[drv]
        err = recipe.log
        if recipe.exit_code:
            status = 100 if self.kind == "nix" else 1
            return status, b"", err + self._error("build", (
                f"builder for {quoted} failed with exit code {recipe.exit_code}"))
        for path, item in recipe.outputs.items():
            if item.nar != self.items[path].nar:
                return (104 if self.kind == "nix" else 1), b"", err + self._error("build", (
                    f"derivation {quoted} may not be deterministic: output "
                    f"{self._quote(path)} differs"))
        return 0, "".join(f"{p}\n" for p in outputs.values()).encode(), err

    def _substitute(self, operands: list[str]) -> tuple[int, bytes, bytes]:
        """Each path from the first server offering it, its references first (Guix:
        guix/status.scm's lines at verbosity 3; Nix 2.8: "copying path '…' from '…'...", and
        exit 1 with "don't know how to build" for a path no server offers)."""
        urls, *paths = operands
        said: list[str] = []
        lacking: list[str] = []

        def fetch(path: str) -> bool:
            if path in self.items:
                return True
            url = next((u for u in urls.split() if path in self.servers.get(u, {})), None)
            if url is None:
                return False
            item = self.servers[url][path]
            if not all(fetch(r) for r in item.references if r != path):
                return False
            if self.kind == "guix":
                said.append(f"substituting {path}...\ndownloading from {url}/nar/gzip/"
                            f"{path.rsplit('/', 1)[1]} ...\n")
            else:
                said.append(f"copying path '{path}' from '{url}'...\n")
            self.items[path] = item
            return True

        for path in paths:
            if not fetch(path):
                lacking.append(path)
        if self.kind == "nix" and lacking:
            said.append("don't know how to build these paths:\n"
                        + "".join(f"  {p}\n" for p in lacking)
                        + f"error: build of '{lacking[0]}' failed\n")
            return 1, b"", "".join(said).encode()
        return 0, b"", "".join(said).encode()

    def _export(self, paths: list[str]) -> tuple[int, bytes, bytes]:
        name = f"/tmp/buildfarm.{len(self.files):010d}"
        invalid = [p for p in paths if p not in self.items]
        if invalid:  # Nix 2.8 in the test bed: the file was made, then the export failed
            self.files[name] = b""
            return 1, f"{name}\n".encode(), self._error("archive", (
                f"path {self._quote(invalid[0])} is not valid"))
        self.files[name] = self.export(paths)
        return 0, f"{name}\n".encode(), b""

    def export(self, paths: Sequence[str]) -> bytes:
        """The export bundle of `paths`, in that order: signed on a Guix machine."""
        out = io.BytesIO()
        for path in paths:
            item = self.items[path]
            after = trailer(path, item.references, item.deriver)
            out.write(write_int(1) + item.nar + after)
            if self.kind == "nix":
                out.write(write_int(0))
                continue
            digest = hashlib.sha256(item.nar + after).digest()
            out.write(write_int(1) + write_string(self._sign(digest).encode("latin-1")))
        out.write(write_int(0))
        return out.getvalue()

    def _sign(self, digest: bytes) -> str:
        if self.key is None:
            parameters = Sexp.parse(pki.DEFAULT_KEY_PARAMETERS)
            assert parameters is not None
            self.key = generate_key(parameters)
        secret, public = self.key.find("private-key"), self.key.find("public-key")
        assert secret is not None and public is not None
        return pki.signature_sexp(pki.hash_data(digest), secret, public).text()

    def _hash(self, operands: list[str]) -> tuple[int, bytes, bytes]:
        (path,) = operands
        item = self.items.get(path)
        if item is None:
            return 1, b"", self._error("hash", f"path {self._quote(path)} is not valid")
        if self.kind == "nix":  # `nix-store --query --hash` then `--size`
            return 0, f"{item.nar_hash}\n{len(item.nar)}\n".encode(), b""
        return 0, f"{item.nar_hash.removeprefix('sha256:')}\n".encode(), b""

    # --- a Nix machine's store sessions (`nix-store --serve --write`) ----------------------

    def sessions(self) -> ScriptedSessions:
        assert self.kind == "nix"
        return ScriptedSessions(self)


class ScriptedSessions:
    """Stands for StoreSessions: always one session to give."""

    def __init__(self, store: ScriptedStore) -> None:
        self.store = store
        self.taken = 0

    async def take(self) -> ScriptedSession:
        self.taken += 1
        return ScriptedSession(self.store)

    def give_back(self, session: ScriptedSession) -> None:
        pass


class ScriptedSession:
    """Stands for StoreSession: the same model, answered in the serve protocol's terms."""

    def __init__(self, store: ScriptedStore) -> None:
        self.store = store
        self.closed = False

    def _check(self, kind: str) -> None:
        self.store.commands.append(f"session {kind}")
        if kind in self.store.lost:
            raise RemoteError(f"machine: connection lost during {kind}")
        if kind in self.store.answers:
            raise SessionFailed(self.store.answers[kind][1].decode().strip())

    async def query_valid(self, paths: Sequence[str], timeout: float) -> set[str]:
        self._check("missing")
        return {p for p in paths if p in self.store.items}

    async def import_paths(self, bundle: AsyncIterator[bytes], timeout: float) -> None:
        self._check("import")
        problem = self.store.import_bundle(b"".join([chunk async for chunk in bundle]))
        if problem is not None:
            raise SessionFailed(f"nix-store --serve: error: {problem}")

    async def build(self, drv: str, *, max_silent_time: int | None, timeout: int | None,
                    on_log: Callable[[bytes], None], safety_timeout: float | None,
                    safety_silence: float | None) -> tuple[int, str]:
        self._check("build")
        status, _, stderr = self.store._build([drv])
        on_log(stderr)
        if status:
            return status, f"builder for '{drv}' failed with exit code " \
                           f"{self.store.recipes[drv].exit_code}"
        return 0, ""

    async def path_infos(self, paths: Sequence[str], timeout: float) -> dict[str, PathInfo]:
        self._check("hash")
        return {p: PathInfo(self.store.items[p].nar_hash, len(self.store.items[p].nar),
                            self.store.items[p].references, self.store.items[p].deriver or None)
                for p in paths if p in self.store.items}

    async def export_paths(self, infos: dict[str, PathInfo], timeout: float,
                           progress: Callable[[int], None] | None = None) -> bytes:
        self._check("export")
        return self.store.export(sorted(infos))

    async def close(self, *, kill: bool = False) -> None:
        self.closed = True


def _nar_contents(nar: bytes) -> bytes:
    """The contents of a regular file's nar (text_nar's inverse)."""
    start = len(text_nar(b"")) - len(write_string(b")"))  # after the contents' size
    size = int.from_bytes(nar[start - 8:start], "little")
    return nar[start:start + size]
