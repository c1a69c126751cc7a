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
was, or drop the connection (`lost`). Every command is logged by kind (`commands`), every
accepted import by its paths (`imported`).
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

from buildfarm.errors import RemoteError
from buildfarm.ssh.remote import RunResult
from buildfarm.ssh.store_session import PathInfo, SessionFailed

KINDS = ("missing", "import", "dry-run", "build", "check", "export", "hash")


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
    # A Guix machine's key pair, as libgcrypt's genkey makes it: made on first use if not given.
    key: Sexp | None = field(default=None, repr=False)

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
                    progress: Callable[[int], None] | None = None) -> int:
        data = self.files[remote_path]
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
        shapes = {
            "nix": [(["nix-store", "--check-validity", "--print-invalid"], "missing"),
                    (["nix-store", "--import"], "import"),
                    (["nix-store", "--realise", "--dry-run"], "dry-run"),
                    (["nix-store", "--realise", "--check"], "check"),
                    (["nix-store", "--realise"], "build")],
            "guix": [(["guix", "archive", "--missing"], "missing"),
                     (["guix", "archive", "--import"], "import"),
                     (["guix", "build", "--dry-run", "--no-grafts"], "dry-run"),
                     (["guix", "build", "--no-grafts", "--check"], "check"),
                     (["guix", "build", "--no-grafts"], "build"),
                     (["guix", "hash", "--serializer=nar"], "hash")],
        }[self.kind]
        for prefix, kind in shapes:
            if words[:len(prefix)] == prefix:
                rest = words[len(prefix):]
                if kind in ("build", "check"):  # the options, then the derivation
                    rest = [w for w in rest if w.startswith("/")]
                    rest = rest[:1]
                elif kind == "hash":
                    rest = rest[-1:]
                return kind, rest
        raise AssertionError(f"a command no {self.kind} backend runs: {shlex.join(words)}")

    def _answer(self, argv: Sequence[str], kind: str,
                handle: Callable[[], tuple[int, bytes, bytes]]) -> RunResult:
        self.commands.append(kind)
        if kind in self.lost:
            raise RemoteError(f"machine: connection lost during {kind}")
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
        handler = {"dry-run": self._dry_run, "build": self._build, "check": self._check_build,
                   "export": self._export, "hash": self._hash}[kind]
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

    def plan(self, drv: str) -> tuple[list[str], list[str]]:
        """What realising `drv` needs: the derivations to build (dependencies first) and the
        paths the store cannot build (an invalid .drv: Nix's queryMissing "unknown")."""
        build: list[str] = []
        unknown: list[str] = []

        def visit(path: str, wanted: Sequence[str] | None) -> None:
            if path not in self.items:
                if path not in unknown:
                    unknown.append(path)
                return
            outputs = self._outputs(path)
            names = list(outputs) if wanted is None else wanted
            if path in build or all(outputs[n] in self.items for n in names):
                return
            for input_drv, input_outputs in self._inputs(path):
                visit(input_drv, input_outputs)
            build.append(path)

        visit(drv, None)
        return build, unknown

    def _dry_run(self, operands: list[str]) -> tuple[int, bytes, bytes]:
        (drv,) = operands
        build, unknown = self.plan(drv)
        if self.kind == "nix":  # Nix 2.8 printMissing, as captured in the test bed
            text = ""
            if build:
                text += ("this derivation will be built:\n" if len(build) == 1
                         else f"these {len(build)} derivations will be built:\n")
                text += "".join(f"  {d}\n" for d in build)
            if unknown:
                text += "don't know how to build these paths:\n"
                text += "".join(f"  {p}\n" for p in unknown)
            return 0, b"", text.encode()
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
        assert not unknown and build[-1:] in ([drv], []), (build, unknown)
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
