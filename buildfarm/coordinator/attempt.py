"""One attempt of one build on one machine: the steps of ARCHITECTURE.md, "The life of one build",
step 3 (survey, push, substitute inputs, dry run, build, fetch and verify the outputs).

Every step is recorded on the attempt before it starts. The steps only talk to the machine and
the output store; how an attempt ends is decided by the exception it raises (or not): only the
builder's own failure is the build's (BuildFailed); whatever else the machine fails at is its
own (StoreCommandFailed), and the build is tried again. What the attempt puts in a machine's
store by command is held there by GC roots until it ends (a Nix store session holds its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import os
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from buildfarm.backends import Backend, Command, builder_exit_code
from buildfarm.backends.base import BUILDER_FAILURES
from buildfarm.coordinator import localstore
from buildfarm.coordinator import machine_said as said
from buildfarm.datastore import attempts as records
from buildfarm.datastore import closure
from buildfarm.datastore.models import DIFFERS, IDENTICAL, MISSING_INPUTS, OUTPUTS_PRESENT
from buildfarm.errors import ArchiveError, ProtocolError, RemoteError
from buildfarm.formats import derivation as drvmod
from buildfarm.formats import nar
from buildfarm.formats.signing import SigningKey
from buildfarm.inventory import Machine
from buildfarm.logs import LogWriter
from buildfarm.outputs.store import OutputStore
from buildfarm.ssh.remote import CommandTimeoutError, Remote, RunResult
from buildfarm.ssh.store_session import PathInfo, SessionFailed, StoreSession, StoreSessions

T = TypeVar("T")
# What an attempt pushes to a machine: the .drv closure, input sources from the coordinator's
# own store, input outputs from the output store.
PUSH_KINDS = ("derivations", "sources", "inputs")
TRANSFER = 3600.0  # seconds an import or export may take
# Outputs (total nar bytes) a store session sends back on its own channel, held in memory;
# larger ones are exported into a file on the machine and pulled over SFTP, resumably.
STREAM_LIMIT = 4 << 20
# What a daemon prints while a garbage collection holds its lock (Guix nix/libstore/gc.cc
# openGCLock; Nix 2.8 the same): a command waiting past its time is a busy machine, not a
# dead connection.
GC_LOCK_WAIT = b"waiting for the big garbage collector lock..."
# Where an input came from (AttemptInput.source), when not from a substitute server.
ON_THE_MACHINE, PUSHED = "machine", "pushed"
SUBSTITUTION_LOG_LIMIT = 4 << 20  # bytes of the substitution's output read for its sources


class SetupFailed(Exception):
    """The machine could not start the build (missing inputs, or its outputs are already there
while another machine lacks them): the build goes back to the queue."""

    def __init__(self, kind: str, paths: Sequence[str], detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.paths = tuple(paths)
        self.detail = detail


class BuildFailed(Exception):
    """The builder ran and failed (or timed out); `exit_status` is the builder's own, when the
    store reported it (not the build command's: Nix's is 100 whatever the builder's)."""

    def __init__(self, exit_status: int | None, reason: str) -> None:
        super().__init__(reason)
        self.exit_status = exit_status
        self.reason = reason


class TransferFailed(Exception):
    """The outputs could not be exported or hashed on the machine: retried later, elsewhere.
    Outputs that come back malformed or unlike what the machine reported are a ProtocolError:
    the machine is backed off."""


class StoreCommandFailed(Exception):
    """The machine failed a store command (a query, an import, a dry run, or a build whose
    builder did not fail: its daemon, its disk, its keys, its locale...) while it is still
    reachable: not the build's doing. The build is tried again, elsewhere if another machine
    takes it first, and the machine pauses."""


DbCall = Callable[..., Awaitable[Any]]


@dataclass
class AttemptRun:
    """Everything one attempt needs; `db` runs a datastore function in the datastore thread."""

    attempt_id: int
    build_uuid: str
    drv_path: str
    machine: Machine
    remote: Remote
    backend: Backend
    outputs: OutputStore
    db: DbCall
    key: SigningKey
    log_path: str
    max_log_bytes: int
    on_step: Callable[[str], None] | None = None
    on_progress: Callable[[int], None] | None = None  # bytes of the outputs fetched so far
    # Bytes pushed to the machine, as they are sent: (kind, bytes) with kind one of PUSH_KINDS.
    on_pushed: Callable[[str, int], None] | None = None
    system: str | None = None  # the build's, for the published narinfo's System line
    # Another machine could take the build: if this one holds its outputs already, it moves.
    may_move: bool = False
    sessions: StoreSessions | None = None  # a Nix machine's store sessions
    session: StoreSession | None = None  # the one this attempt uses, when one was free
    # The attempts running on the machine now (this one included): their GC roots stay.
    running: Callable[[], Collection[int]] = tuple
    # Public keys a Nix machine trusts for this attempt's substitutions (the farm's own).
    trusted_keys: tuple[str, ...] = ()
    # What survey() found.
    known: list[closure.KnownDerivation] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    inputs_complete: bool = False
    outputs_paths: list[str] = field(default_factory=list)
    absent: set[str] = field(default_factory=set)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # recorded with the next step
    # Every output is on the machine already: the build runs again with --check and compares.
    check: bool = False
    check_result: str | None = None  # IDENTICAL or DIFFERS once the check build ran
    sources_of: dict[str, str] = field(default_factory=dict)  # input -> where it came from
    origins: list[tuple[str, str]] = field(default_factory=list)  # recorded with the next step
    rooted: bool = False  # the attempt holds GC roots on the machine
    log: LogWriter | None = None  # the attempt's log, from its first step that writes one

    async def step(self, name: str, detail: str | None = None, log_path: str | None = None) -> None:
        skipped, self.skipped = self.skipped, []
        origins, self.origins = self.origins, []
        await self.db(functools.partial(
            records.step, self.attempt_id, name, detail, skipped=skipped, log_path=log_path,
            inputs=origins,
        ))
        if self.on_step is not None:
            self.on_step(name)

    def skip(self, name: str, why: str) -> None:
        """A step with nothing to do: recorded with the next one, saving a transaction."""
        self.skipped.append((name, why))

    async def _ask(self, command: Command, timeout: float | None = None) -> RunResult:
        """Run a store command, which the machine has `timeout` (by default its answer_timeout)
        to answer. One that waits past it for the store's garbage collector (which holds its
        lock for as long as it runs) is the machine's failure, not a dead connection."""
        try:
            return await self.remote.run(command.argv, input=command.stdin,
                                         timeout=timeout or self.machine.answer_timeout)
        except CommandTimeoutError as e:
            raise _gc_lock_failure(e, command, e.result.stderr) from None

    async def missing(self, paths: Sequence[str]) -> list[str]:
        if not paths:
            return []
        if self.session is not None:
            try:
                valid = await self.session.query_valid(paths, self.machine.answer_timeout)
            except SessionFailed as e:
                raise StoreCommandFailed(str(e)) from None
            return [p for p in paths if p not in valid]
        command = self.backend.missing(paths)
        result = await self._ask(command)
        if not result.ok:
            error = said.first_error(result.stderr)
            program = said.program(command)
            raise StoreCommandFailed(error if error.startswith(program) else f"{program}: {error}")
        return self.backend.parse_missing(result.stdout)

    async def import_bundle(self, bundle: str | bytes, what: str, kind: str) -> None:
        """Import a bundle (a file's name, or the bundle itself) into the machine's store;
        `kind` (of PUSH_KINDS) names what it holds for on_pushed."""
        on_pushed = self.on_pushed

        def sent(size: int) -> None:
            if on_pushed is not None:
                on_pushed(kind, size)

        if self.session is not None:
            try:
                await self.session.import_paths(_chunks(bundle, sent), TRANSFER)
            except SessionFailed as e:
                raise StoreCommandFailed(f"{what} could not be imported: {e}") from None
            return
        command = self.backend.import_bundle()
        try:
            result = await self.remote.run_streaming(
                command.argv, stdin=_chunks(bundle, sent), timeout=TRANSFER
            )
        except CommandTimeoutError as e:
            raise _gc_lock_failure(e, command, e.result.stderr) from None
        if not result.ok:
            raise StoreCommandFailed(said.import_problem(what, said.first_error(result.stderr)))

    async def hold(self, paths: Iterable[str]) -> None:
        """GC roots on the machine for `paths` (valid or to be), until the attempt ends: a
        collection (a cron `guix gc`, or one run by hand) must not take what this one pushed,
        built or still needs, nor the outputs a rebuild with --check compares with (a root
        keeps its closure alive). A store session holds what it imported or built (temporary
        roots), but not the outputs a check finds there."""
        wanted = sorted(set(paths))
        if not wanted or (self.session is not None and not self.check):
            return
        keep = sorted({str(a) for a in self.running()} | {str(self.attempt_id)})
        command = self.backend.gc_roots(self._farm(), str(self.attempt_id), keep, wanted)
        result = await self._ask(command)
        if not result.ok:
            raise StoreCommandFailed(
                f"cannot add GC roots on the machine: {said.first_error(result.stderr)}")
        self.rooted = True

    async def release(self) -> None:
        if self.rooted:
            command = self.backend.drop_gc_roots(self._farm(), str(self.attempt_id))
            with contextlib.suppress(RemoteError, OSError, StoreCommandFailed):
                await self._ask(command)
            self.rooted = False

    def _farm(self) -> str:
        """This farm's name among GC roots (two farms may share a machine): its key's."""
        return hashlib.sha256(self.key.public_bytes).hexdigest()[:12]

    # The steps, in order. One store query up front tells what the machine lacks among the
    # .drv closure, its sources, the input outputs and the outputs; later steps use its answer.

    async def survey(self) -> None:
        """What the machine lacks, and what to do when it holds the outputs already: move to a
        machine that lacks them, or (with none) build again without deleting anything and
        compare, as `guix build --check` does. (Some outputs of several are rebuilt by a plain
        build: the store rebuilds the others beside the valid ones and keeps those.)"""
        self.known, (self.inputs, self.inputs_complete), outputs = await self.db(
            _what_the_datastore_knows, self.drv_path
        )
        self.outputs_paths = sorted(outputs.values())
        sources: set[str] = set()
        for item in self.known:
            sources.update(drvmod.parse(item.contents, source=item.path).input_srcs)
        self.sources = sorted(sources)
        everything = [k.path for k in self.known] + self.sources + self.inputs + self.outputs_paths
        self.absent = set(await self.missing(sorted(set(everything))))
        self.sources_of = {p: ON_THE_MACHINE for p in self.inputs if p not in self.absent}
        if self.outputs_paths and not self.absent & set(self.outputs_paths):
            if self.may_move:
                raise SetupFailed(OUTPUTS_PRESENT, self.outputs_paths,
                                  "its outputs are on this machine already: moving to one "
                                  "that lacks them")
            self.check = True

    async def push_derivations(self) -> None:
        """Make sure the .drv closure is in the machine's store."""
        await self.step("push-derivations")
        absent_sources = [s for s in self.sources if s in self.absent]
        if absent_sources:
            await self.push_sources(absent_sources)
        if self.drv_path in self.absent and self.drv_path not in {k.path for k in self.known}:
            raise SetupFailed(MISSING_INPUTS, [self.drv_path], "derivation text unknown")
        to_push = [k for k in self.known if k.path in self.absent]
        if to_push:
            bundle = self.outputs.derivation_bundle(
                [(k.path, k.contents) for k in to_push], self._signer()
            )
            await self.import_bundle(bundle, f"{len(to_push)} derivation(s)", "derivations")

    async def push_sources(self, sources: Sequence[str]) -> None:
        """Send input sources from the coordinator's own store, or fail: nothing else has them."""
        items = await localstore.closure(sources)
        if items is None:
            raise SetupFailed(
                MISSING_INPUTS, sources, "input sources missing on the machine and not in the "
                "coordinator's store"
            )
        lacking = set(await self.missing([path for path, _ in items]))
        wanted = [(path, refs) for path, refs in items if path in lacking]
        bundle = await asyncio.to_thread(
            localstore.bundle, wanted, self.outputs.tmp_dir, self._signer()
        )
        try:
            await self.import_bundle(bundle, f"{len(wanted)} input source(s)", "sources")
        finally:
            os.unlink(bundle)

    async def substitute_inputs(self) -> None:
        """The inputs the machine lacks are downloaded from its substitute servers, where one
        has them (`guix build --substitute-urls`, `nix-store --realise`); what none offers is
        pushed next. The output goes to the attempt's log."""
        urls = self.machine.substitute_urls
        wanted = [p for p in self.inputs if p in self.absent]
        if not urls or not wanted:
            return
        await self.step("substitute-inputs", f"{len(wanted)} input(s) asked of "
                        f"{' '.join(urls)}", log_path=self.log_path)
        log, output = self._log(), bytearray()

        def out(data: bytes) -> None:
            log.write(data)
            if len(output) < SUBSTITUTION_LOG_LIMIT:
                output.extend(data)

        command = self.backend.substitute(wanted, urls, self.trusted_keys)
        try:
            await self.remote.run_streaming(command.argv, on_stdout=out, on_stderr=out,
                                            timeout=TRANSFER)
        except CommandTimeoutError as e:
            raise _gc_lock_failure(e, command, log.tail) from None
        # Its exit status says little (Nix exits 1 when a server lacks one): what is valid now
        # says what it did.
        lacking = set(await self.missing(wanted))
        downloads = self.backend.parse_substituted(bytes(output))
        for path in wanted:
            if path not in lacking:
                self.absent.discard(path)
                self.sources_of[path] = said.server_of(downloads.get(path), urls)

    async def push_inputs(self) -> list[str]:
        """Push the input outputs the output store holds and the machine lacks; return the rest."""
        missing = [p for p in self.inputs if p in self.absent]
        if not missing:
            self.origins = sorted(self.sources_of.items())
            self.skip("push-inputs", "skipped: every input output is on the machine")
            return []
        await self.step("push-inputs")
        held = await self.db(closure.stored_closure, missing)
        lacking = set(await self.missing([h.path for h in held]))
        to_push = [h for h in held if h.path in lacking]
        if to_push:
            bundle = self.outputs.output_bundle(to_push, self._signer())
            try:
                await self.import_bundle(bundle, f"{len(to_push)} input output(s)", "inputs")
            finally:
                os.unlink(bundle)
        pushed = {h.path for h in to_push}
        held_here = {h.path for h in held}
        for path in missing:
            if path in pushed:
                self.sources_of[path] = PUSHED
            elif path in held_here:  # it reached the machine meanwhile
                self.sources_of[path] = ON_THE_MACHINE
        self.origins = sorted(self.sources_of.items())
        return [p for p in missing if p not in pushed]

    async def dry_run(self, unavailable: Sequence[str]) -> None:
        """Ask the store what it would build, unless every input is known to be present. Every
        derivation it would build is reported missing, not only the direct inputs: the
        missing-inputs hook submits them all at once. When the outputs are there already (a
        rebuild with --check), a plain plan would not look into the inputs: the plan asked is a
        rebuild's (Guix --check; the input derivations', on Nix)."""
        if self.inputs_complete and not unavailable:
            self.skip("dry-run", "skipped: every input output is on the machine")
            return
        inputs = self._input_derivations() if self.check else ()
        names_target = self.backend.dry_run_names_target(self.check)
        if self.check and not inputs and not names_target:
            self.skip("dry-run", "skipped: no input derivation")
            return
        await self.step("dry-run")
        command = self.backend.dry_run(self.drv_path, rebuild=self.check, inputs=inputs)
        result = await self._ask(command)
        if not result.ok:
            raise StoreCommandFailed(f"dry run failed: {said.first_error(result.stderr)}")
        plan = self.backend.parse_dry_run(
            result.stdout, result.stderr, self.drv_path if names_target else None)
        others = [d for d in (*plan.would_build, *plan.unknown) if d != self.drv_path]
        if others:
            raise SetupFailed(
                MISSING_INPUTS, list(dict.fromkeys([*unavailable, *others])),
                f"{len(others)} input derivation(s) would be built first",
            )

    def _input_derivations(self) -> list[tuple[str, tuple[str, ...]]]:
        """The target's input derivations and the outputs it wants of each, from its .drv."""
        for item in self.known:
            if item.path == self.drv_path:
                return list(drvmod.parse(item.contents, source=item.path).input_drvs)
        return []

    def _log(self) -> LogWriter:
        if self.log is None:
            self.log = LogWriter(self.log_path, self.max_log_bytes)
        return self.log

    async def build(self) -> None:
        log = self._log()
        try:
            detail = "with --check: compared with the outputs on the machine"
            await self.step("build", detail if self.check else None, log_path=self.log_path)
            if self.session is not None and not self.check:
                await self._build_in_session(self.session, log)
                return
            result = await self._build_by_command(log)
        finally:
            log.close()
        if self.check and (result.ok or self.backend.check_differs(result.exit_status, log.tail)):
            self.check_result = IDENTICAL if result.ok else DIFFERS
            return
        if not result.ok:
            self._failed(result.exit_status, log.tail)

    def _failed(self, status: int | None, log_tail: bytes) -> None:
        """The builder's own failure fails the build; anything else is the machine's."""
        kind, reason = self.backend.classify_build_failure(status, log_tail)
        if kind in BUILDER_FAILURES:
            raise BuildFailed(builder_exit_code(log_tail), reason)
        raise StoreCommandFailed(f"the build did not run: {reason}")

    async def _build_by_command(self, log: LogWriter) -> RunResult:
        machine = self.machine
        command = self.backend.build(
            self.drv_path, max_silent_time=machine.max_silent_time, timeout=machine.timeout,
            check=self.check,
        )
        try:
            return await self.remote.run_streaming(
                command.argv,
                on_stdout=log.write,
                on_stderr=log.write,
                # The store enforces both limits; these are the coordinator's safety net.
                timeout=_safety_net(machine.timeout),
                silence_timeout=_safety_net(machine.max_silent_time),
            )
        except CommandTimeoutError as e:
            raise _gc_lock_failure(e, command, log.tail) from None

    async def _build_in_session(self, session: StoreSession, log: LogWriter) -> None:
        machine = self.machine
        try:
            status, message = await session.build(
                self.drv_path, max_silent_time=machine.max_silent_time, timeout=machine.timeout,
                on_log=log.write,
                safety_timeout=_safety_net(machine.timeout),
                safety_silence=_safety_net(machine.max_silent_time),
            )
        except SessionFailed as e:
            raise StoreCommandFailed(str(e)) from None
        if status:
            log.write(f"error: {message}\n".encode(errors="replace"))
            self._failed(status, log.tail)

    async def fetch_outputs(self, outputs: Sequence[str]) -> list[records.OutputRecord]:
        """Export on the machine, pull over SFTP, verify, store atomically. A store session
        sends small outputs itself: no export command, no temporary file, no SFTP. The nar
        hashes and sizes are asked first: an export larger than those nars can make it is
        refused before it is pulled (unbounded if a size is unknown: RELIABILITY.md)."""
        references: list[int | None] = [None] * len(outputs)
        if self.session is not None:
            infos = await self._session_infos(outputs)
            # A nar size of 0 is unknown (a path registered by an old Nix): the hash still
            # checks the transfer, but there is no length to read the stream to.
            reported = {p: (info.nar_hash, info.nar_size or None) for p, info in infos.items()}
            references = [len(info.references) for info in infos.values()]
            sizes = [info.nar_size for info in infos.values()]
            if 0 not in sizes and sum(sizes) <= STREAM_LIMIT:
                return await self._stream_outputs(self.session, infos, reported)
        else:
            reported = {p: await self._reported_hash(p) for p in outputs}
        await self.step("export-outputs")
        local_file = self.outputs.temp_path(f"attempt-{self.attempt_id}.bundle")
        remote_file = ""
        try:
            command = self.backend.export_to_temp(outputs)
            result = await self._ask(command, TRANSFER)
            remote_file = result.stdout.decode(errors="replace").partition("\n")[0]
            if not result.ok or not remote_file.startswith("/"):
                raise TransferFailed(f"export failed: {said.first_error(result.stderr)}")
            await self.step("fetch-outputs")
            nar_sizes = [reported[p][1] for p in outputs]
            limit = nar.max_bundle_size(zip(nar_sizes, references, strict=True))
            await self.remote.fetch(remote_file, local_file, progress=self.on_progress,
                                    limit=limit)
            await self.step("verify-outputs")
            return await self._store(local_file, outputs, reported)
        finally:
            if os.path.exists(local_file):
                os.unlink(local_file)
            if remote_file.startswith("/"):
                await _quietly(self.remote.remove(remote_file))

    async def _stream_outputs(
        self, session: StoreSession, infos: dict[str, PathInfo],
        reported: dict[str, tuple[str, int | None]],
    ) -> list[records.OutputRecord]:
        await self.step("fetch-outputs", "streamed by the store session")
        try:
            bundle = await session.export_paths(infos, TRANSFER, self.on_progress)
        except SessionFailed as e:
            raise TransferFailed(f"export failed: {e}") from None
        await self.step("verify-outputs")
        try:
            return await self._store(io.BytesIO(bundle), list(infos), reported)
        except ProtocolError:
            # What it sent was not what it described: whatever follows on its stream is
            # suspect too, so the session ends.
            await session.close(kill=True)
            raise

    async def _store(
        self, bundle: str | BinaryIO, outputs: Sequence[str],
        reported: dict[str, tuple[str, int | None]],
    ) -> list[records.OutputRecord]:
        try:
            return await asyncio.to_thread(
                self.outputs.import_bundle, bundle, outputs, reported, self.drv_path,
                system=self.system, log_file=self.log_path,
            )
        except ArchiveError as e:  # malformed, or unlike what the machine reported
            raise ProtocolError(f"{self.machine.name}: {e}") from None

    async def _session_infos(self, paths: Sequence[str]) -> dict[str, PathInfo]:
        assert self.session is not None
        try:
            infos = await self.session.path_infos(paths, self.machine.answer_timeout)
        except SessionFailed as e:
            raise TransferFailed(f"cannot hash the outputs: {e}") from None
        lacking = [p for p in paths if p not in infos]
        if lacking:
            raise TransferFailed(f"cannot hash {lacking[0]}: not valid on the machine")
        return {p: infos[p] for p in paths}

    async def _reported_hash(self, path: str) -> tuple[str, int | None]:
        command = self.backend.nar_hash(path)
        result = await self._ask(command, TRANSFER)
        if not result.ok:
            raise TransferFailed(f"cannot hash {path}: {said.first_error(result.stderr)}")
        return self.backend.parse_nar_hash(result.stdout)

    def _signer(self) -> SigningKey | None:
        return self.key if self.backend.signed_imports else None

    async def run(self) -> list[records.OutputRecord]:
        if self.sessions is not None:
            self.session = await self.sessions.take()
        try:
            await self.survey()
            await self.hold([*(k.path for k in self.known), *self.sources, *self.inputs,
                             *self.outputs_paths])
            await self.push_derivations()
            await self.substitute_inputs()
            unavailable = await self.push_inputs()
            await self.dry_run(unavailable)
            await self.build()
            return await self.fetch_outputs(self.outputs_paths)
        finally:
            if self.log is not None:
                self.log.close()
            await self.release()
            if self.sessions is not None and self.session is not None:
                self.sessions.give_back(self.session)


def _what_the_datastore_knows(
    drv_path: str,
) -> tuple[list[closure.KnownDerivation], tuple[list[str], bool], dict[str, str]]:
    """For the survey, in one call to the datastore thread: the .drv closure we hold, the
    input outputs (and whether we know them all), the outputs by name."""
    return (closure.derivations(drv_path), closure.input_outputs(drv_path),
            records.output_paths(drv_path))


def _gc_lock_failure(error: CommandTimeoutError, command: Command, output: bytes) -> Exception:
    """A command that timed out: the machine's failure when it was waiting for the garbage
    collector's lock (`output`: what it printed so far), else the timeout as it is."""
    if GC_LOCK_WAIT in output:
        return StoreCommandFailed(
            f"{said.program(command)} waited for the store's garbage collector past its time "
            "(\"waiting for the big garbage collector lock...\"): tried again later")
    return error


async def _chunks(
    bundle: str | bytes, sent: Callable[[int], None] | None = None, size: int = 1 << 20
) -> Any:
    """The blocks of a file (named by `bundle`) or of `bundle` itself; `sent` is told each
    block's size as it is taken to be sent."""
    with open(bundle, "rb") if isinstance(bundle, str) else io.BytesIO(bundle) as handle:
        while True:
            block = handle.read(size)
            if not block:
                return
            if sent is not None:
                sent(len(block))
            yield block


async def _quietly(awaitable: Awaitable[T]) -> None:
    with contextlib.suppress(RemoteError, OSError):
        await awaitable


def _safety_net(limit: int | None) -> int | None:
    """The coordinator's own bound past a limit the store enforces (a minute more), or none."""
    return None if limit is None else limit + 60
