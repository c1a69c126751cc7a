"""Store sessions (`nix-store --serve --write`) against the real Nix stores of the test bed:
every operation an attempt uses, the build log on stderr, failure statuses, the safety timeout
and a cancel killing the build, a session that dies, and how many run at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from farm import token
from test_remote import BOUND, machine_for, opened
from testbed import Host, instantiate, nix_expr_trivial

from buildfarm.inventory import Machine
from buildfarm.ssh import store_session
from buildfarm.ssh.remote import CommandTimeoutError, Remote
from buildfarm.ssh.store_session import SessionFailed, StoreSession, StoreSessions, session_limit


def _local(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for at in range(0, len(data), 1000):  # several chunks, to exercise the streaming
        yield data[at:at + 1000]


async def _import_drv(session: StoreSession, drv: str) -> None:
    bundle = subprocess.run(["nix-store", "--export", drv], check=True, capture_output=True)
    await session.import_paths(_chunks(bundle.stdout), BOUND)


@contextlib.asynccontextmanager
async def _session(host: Host) -> AsyncIterator[StoreSession]:
    async with opened(machine_for(host)) as remote:
        session = await StoreSession.start(remote)
        try:
            yield session
        finally:
            await session.close()


async def _build(
    session: StoreSession, drv: str, *, timeout: int | None = None,
    safety_timeout: float | None = None,
) -> tuple[int, str, bytes]:
    """Build with the given limits; the store's status and message, and the log."""
    log = bytearray()
    status, message = await session.build(
        drv, max_silent_time=None, timeout=timeout, on_log=log.extend,
        safety_timeout=safety_timeout, safety_silence=None,
    )
    return status, message, bytes(log)


def _running(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


async def _gone(pattern: str) -> bool:
    deadline = time.monotonic() + BOUND
    while _running(pattern):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


@pytest.mark.usefixtures("private_nix")
def test_a_session_queries_imports_builds_and_hashes(hosts: list[Host]) -> None:
    tag = token()
    drv = instantiate(nix_expr_trivial(f"sess-{tag}", f"echo line {tag}; echo {tag} > $out"))
    out = _local("nix-store", "--query", "--outputs", drv)
    host = hosts[0]

    async def main() -> None:
        async with opened(machine_for(host)) as remote:
            session = await StoreSession.start(remote)
            try:
                assert await session.query_valid([drv, out], BOUND) == set()
                await _import_drv(session, drv)
                assert await session.query_valid([drv, out], BOUND) == {drv}
                status, message, log = await _build(session, drv)
                assert (status, message) == (0, "")
                assert f"line {tag}".encode() in log
                infos = await session.path_infos([out, drv + "-not-there"], BOUND)
                assert list(infos) == [out]
                expected = host.run(f"nix-store --query --hash {out}").stdout.decode().strip()
                size = host.run(f"nix-store --query --size {out}").stdout.decode().strip()
                assert infos[out].nar_hash == expected
                assert infos[out].nar_size == int(size)
                assert infos[out].deriver == drv
                # What `nix-store --export` writes, read to the length computed from the infos.
                seen: list[int] = []
                bundle = await session.export_paths(infos, BOUND, seen.append)
                assert bundle == host.run(f"nix-store --export {out}").stdout
                assert seen[-1] == len(bundle)
                assert session.usable
            finally:
                await session.close()
            assert not session.usable

    asyncio.run(main())
    assert host.local_path(out).read_text() == f"{tag}\n"


@pytest.mark.usefixtures("private_nix")
def test_a_failing_build_answers_nix_store_s_status(hosts: list[Host]) -> None:
    tag = token()
    drv = instantiate(nix_expr_trivial(f"sessfail-{tag}", f"echo dying {tag}; exit 3"))

    async def main() -> None:
        async with _session(hosts[0]) as session:
            await _import_drv(session, drv)
            status, message, log = await _build(session, drv)
            assert status == 100  # src/libstore/build/worker.cc: a builder failed
            assert drv in message
            assert f"dying {tag}".encode() in log
            assert session.usable  # a failed build leaves the session in a good state
            assert await session.query_valid([drv], BOUND) == {drv}

    asyncio.run(main())


@pytest.mark.usefixtures("private_nix")
def test_the_store_enforces_the_build_timeout(hosts: list[Host]) -> None:
    tag = token()
    drv = instantiate(nix_expr_trivial(f"sesstime-{tag}", f"echo slow {tag}; /bin/sleep 300"))

    async def main() -> None:
        async with _session(hosts[0]) as session:
            await _import_drv(session, drv)
            status, message, _ = await _build(session, drv, timeout=1)
            assert status == 101, message  # timed out
        assert await _gone(f"slow {tag}")

    asyncio.run(main())


@pytest.mark.usefixtures("private_nix")
@pytest.mark.parametrize("how", ["cancel", "safety-timeout"])
def test_a_cancel_or_the_safety_net_kills_the_build(hosts: list[Host], how: str) -> None:
    tag = token()
    drv = instantiate(nix_expr_trivial(f"sesskill-{tag}", f"echo start {tag}; /bin/sleep 300"))

    async def main() -> None:
        async with opened(machine_for(hosts[0])) as remote:
            session = await StoreSession.start(remote)
            await _import_drv(session, drv)
            build = asyncio.ensure_future(
                _build(session, drv, safety_timeout=2.0 if how == "safety-timeout" else None)
            )
            deadline = time.monotonic() + BOUND
            while not _running(f"start {tag}"):
                assert time.monotonic() < deadline, "the build never started"
                await asyncio.sleep(0.1)
            if how == "cancel":
                build.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await build
            else:
                with pytest.raises(CommandTimeoutError):
                    await build
            assert not session.usable
            assert await _gone(f"start {tag}"), "the build survived"
            # The connection is fine: a new session works.
            again = await StoreSession.start(remote)
            assert await again.query_valid([drv], BOUND) == {drv}
            await again.close()

    asyncio.run(main())


@pytest.mark.usefixtures("private_nix")
def test_a_bad_import_ends_the_session_with_nix_s_message(hosts: list[Host]) -> None:
    async def main() -> None:
        async with opened(machine_for(hosts[0])) as remote:
            session = await StoreSession.start(remote)
            # "1" announces a path, then garbage where a nar should start.
            with pytest.raises(SessionFailed) as caught:
                await session.import_paths(_chunks(b"\x01" + b"\0" * 7 + b"junk" * 50), BOUND)
            assert "nix-store --serve ended" in str(caught.value)
            assert not session.usable
            with pytest.raises(SessionFailed):
                await session.query_valid(["/nix/store/x"], BOUND)

    asyncio.run(main())


@pytest.mark.usefixtures("private_nix")
def test_sessions_are_reused_within_their_limit(
    hosts: list[Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with opened(machine_for(hosts[0])) as remote:
            sessions = StoreSessions(remote, limit=2)
            first, second = await sessions.take(), await sessions.take()
            assert first is not None and second is not None and first is not second
            assert await sessions.take() is None  # the limit: the attempt runs commands instead
            sessions.give_back(first)
            assert await sessions.take() is first
            await first.close(kill=True)  # broken: never handed out again
            sessions.give_back(first)
            third = await sessions.take()
            assert third is not None and third is not first and third.usable
            sessions.give_back(third)
            monkeypatch.setattr(store_session, "SESSION_IDLE", 0.0)
            sessions.prune()  # idle too long: ended
            fourth = await sessions.take()
            assert fourth is not None and fourth is not third
            monkeypatch.setattr(store_session, "SESSION_USES", 1)
            sessions.give_back(fourth)  # worn out: ended, not kept
            fifth = await sessions.take()
            assert fifth is not None and fifth is not fourth
            sessions.give_back(second)
            sessions.give_back(fifth)
            await sessions.close()
            for session in (first, second, third, fourth, fifth):
                assert not session.usable
            assert await sessions.take() is None

    asyncio.run(main())


@pytest.mark.parametrize("fake", [
    "echo \"nix-store: unrecognised flag '--serve'\" >&2; exit 1",  # not a Nix that serves
    "printf 'HTTP/1.0 400 Bad Request\\r\\n\\r\\n'; cat >/dev/null",  # not the protocol
])
def test_a_machine_that_cannot_serve_gets_no_sessions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: str
) -> None:
    """Asked once; a machine that does not speak the protocol runs commands for good."""
    (tmp_path / "nix-store").write_text(f"#!/bin/sh\n{fake}\n")
    (tmp_path / "nix-store").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    machine = dataclasses.replace(Machine(name="here", host="localhost"), transport="local")

    async def main() -> None:
        remote = Remote(machine)
        sessions = StoreSessions(remote, limit=4)
        with pytest.raises(SessionFailed):
            await StoreSession.start(remote)
        assert await sessions.take() is None
        (tmp_path / "nix-store").unlink()  # not asked again
        assert await sessions.take() is None
        await remote.close()

    asyncio.run(main())


def test_sessions_leave_channels_for_commands() -> None:
    assert session_limit(8, 4) == 4  # the default max_sessions: one session per slot
    assert session_limit(8, 8) == 5  # 6 channels for sessions and commands: one is kept
    assert session_limit(10, 8) == 7
    assert session_limit(4, 4) == 1
    assert session_limit(2, 4) == 1
    assert session_limit(1, 1) == 0
