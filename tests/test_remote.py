"""buildfarm.ssh.remote on real sshd hosts (the test bed) and on the local transport.

What is checked: argv reaches the machine verbatim, whatever it holds; channels stay under
max_sessions however many calls wait; host keys are always checked, with a message that says
what to do; dead, silent and stalled machines fail within a bound and are backed off, and come
back once reachable; fetch resumes a partial file; streamed output arrives while the command runs;
a timeout or a cancel leaves no process of the command's group alive on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import random
import shlex
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest
from testbed import Host, Testbed

from buildfarm.errors import ProtocolError, RemoteError
from buildfarm.inventory import Machine
from buildfarm.ssh import transfer
from buildfarm.ssh.remote import CommandTimeoutError, Remote, RunResult

BOUND = 30.0  # an upper bound for anything that should fail "quickly"; never a measurement
PWNED = f"/tmp/pwned-{uuid.uuid4().hex}"  # created only if an argument reached a shell

HOSTILE = [
    "it's",
    'say "hi"',
    f"$(touch {PWNED})",
    "`id`",
    f"a; touch {PWNED}",
    "line one\nline two",
    "  spaces  around  ",
    "",
    "--looks-like-an-option",
    "back\\slash \\n",
    "*",
    "${HOME}",
    "tab\there | pipe & amp > redirect",
    "ünïcödé ✓",
]


class _ShortestBackoff(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


class _LongestBackoff(random.Random):
    """Full jitter that always picks the longest delay, so back-off tests are deterministic."""

    def uniform(self, a: float, b: float) -> float:
        return b


def machine_for(bed_host: Host, **overrides: object) -> Machine:
    machine = Machine(
        name=bed_host.name,
        host=bed_host.address,
        port=bed_host.port or 22,
        user=bed_host.user,
        identity=str(bed_host.client_key),
        known_hosts=str(bed_host.known_hosts),
    )
    return dataclasses.replace(machine, **overrides)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def opened(machine: Machine, **options: object) -> AsyncIterator[Remote]:
    remote = Remote(machine, **options)  # type: ignore[arg-type]
    try:
        yield remote
    finally:
        await remote.close()


def alive_in_group(host: Host, pgid: int) -> list[str]:
    """Processes of group ``pgid`` on ``host`` that are not zombies (ps run over plain ssh)."""
    done = host.run("ps -e -o pgid=,pid=,stat=,args=", check=True)
    alive = []
    for line in done.stdout.decode().splitlines():
        fields = line.split(None, 3)
        if len(fields) >= 3 and fields[0] == str(pgid) and not fields[2].startswith("Z"):
            alive.append(line.strip())
    return alive


@pytest.fixture
def spare_host(testbed: Testbed) -> Iterator[Host]:
    """A host of its own, for tests that stop or freeze it."""
    host = testbed.add_host()
    try:
        yield host
    finally:
        testbed.remove_host(host)


def _remove_on(host: Host, paths: list[str]) -> None:
    """Clean up after a test that failed half-way (the hosts' /tmp is the machine's)."""
    if paths:
        host.run("rm -rf -- " + " ".join(shlex.quote(path) for path in paths), check=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- commands ---------------------------------------------------------------------------------


@pytest.mark.testbed
def test_run_passes_hostile_arguments_verbatim(hosts: list[Host]) -> None:
    async def scenario() -> None:
        async with opened(machine_for(hosts[0])) as remote:
            for argument in HOSTILE:
                result = await remote.run(["printf", "%s", argument])
                assert result == RunResult(("printf", "%s", argument), 0, argument.encode(), b"")
            together = await remote.run(["sh", "-c", 'printf "%s\\0" "$@"', "sh", *HOSTILE])
            assert together.stdout.split(b"\0")[:-1] == [a.encode() for a in HOSTILE]
            piped = await remote.run(["cat"], input=b"\0binary\xffinput\n" * 1000)
            assert piped.ok and piped.stdout == b"\0binary\xffinput\n" * 1000

    asyncio.run(scenario())
    assert hosts[0].run(f"test ! -e {PWNED}", check=False).returncode == 0


@pytest.mark.testbed
def test_run_reports_exit_status_and_check_raises(hosts: list[Host]) -> None:
    async def scenario() -> None:
        async with opened(machine_for(hosts[0])) as remote:
            result = await remote.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (result.exit_status, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
            assert not result.ok
            with pytest.raises(RemoteError, match=r"exited with status 3: err"):
                await remote.run(["sh", "-c", "echo err >&2; exit 3"], check=True)
            missing = await remote.run(["no-such-command-here"])
            assert missing.exit_status == 127

    asyncio.run(scenario())


# Holds its channel until $1/release exists; prints how many of its kind ran when it started.
HELD = ('mkdir "$1/$$"; ls "$1" | grep -c "^[0-9]"; '
        'while [ ! -e "$1/release" ]; do sleep 0.05; done; rmdir "$1/$$"; echo "$2"')


async def held_calls(remote: Remote, calls: int, testbed: Testbed, peak: int) -> list[RunResult]:
    """`calls` HELD commands at once; released once `peak` of them run together (their
    directory, in the test bed's, is seen from here and from the host)."""
    directory = testbed.directory / f"calls-{uuid.uuid4().hex}"
    directory.mkdir(mode=0o777)
    directory.chmod(0o777)
    results = asyncio.gather(*(remote.run(["sh", "-c", HELD, "sh", str(directory), str(i)])
                               for i in range(calls)))
    deadline = time.monotonic() + BOUND  # against hanging only
    while sum(1 for p in directory.iterdir() if p.name.isdigit()) < peak:
        assert time.monotonic() < deadline, f"never {peak} at once"
        await asyncio.sleep(0.05)
    (directory / "release").touch()
    return list(await asyncio.wait_for(results, BOUND))


@pytest.mark.testbed
def test_channels_stay_under_max_sessions(hosts: list[Host], testbed: Testbed) -> None:
    """12 calls at once with max_sessions=4: all succeed, 3 commands at a time at most (the
    4th channel is kept for kills), and 3 do run together; each counts its running peers."""

    async def scenario() -> None:
        async with opened(machine_for(hosts[0], max_sessions=4)) as remote:
            results = await held_calls(remote, 12, testbed, 3)
            assert all(result.ok for result in results)
            assert max(int(result.stdout.split()[0]) for result in results) == 3

    asyncio.run(scenario())


@pytest.mark.testbed
def test_many_calls_against_the_servers_session_limit_all_succeed(
    hosts: list[Host], testbed: Testbed
) -> None:
    """150 calls at once, each holding its channel until 63 run together, on sshd's MaxSessions
    64 with max_sessions=64: sshd refuses the 65th channel, so they all pass only if we queue
    them (and ride out sshd's brief "open failed" when a slot was freed a moment ago)."""

    async def scenario() -> None:
        async with opened(machine_for(hosts[1], max_sessions=64)) as remote:
            results = await held_calls(remote, 150, testbed, 63)
            assert [result.stdout.split()[-1] for result in results] == [
                str(i).encode() for i in range(150)]
            assert max(int(result.stdout.split()[0]) for result in results) == 63

    asyncio.run(scenario())


# --- host keys --------------------------------------------------------------------------------


def _other_key_line() -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key.export_public_key().decode().strip()


@pytest.mark.testbed
def test_a_wrong_pinned_host_key_is_refused(hosts: list[Host]) -> None:
    host = hosts[0]
    machine = machine_for(host, known_hosts=None, host_key=_other_key_line())

    async def scenario() -> None:
        async with opened(machine) as remote:
            with pytest.raises(RemoteError) as caught:
                await remote.run(["true"])
            message = str(caught.value)
            assert f"host key for {host.name} (127.0.0.1:{host.port}) does not match" in message
            assert "host_key pin" in message
            assert "update known_hosts / host_key" in message
            assert "ssh-ed25519 SHA256:" in message  # what the machine offered
        async with opened(dataclasses.replace(machine, host_key=host.host_key_line)) as remote:
            assert (await remote.run(["echo", "pinned"])).stdout == b"pinned\n"

    asyncio.run(scenario())


@pytest.mark.testbed
def test_a_known_hosts_entry_with_another_key_is_refused(hosts: list[Host], tmp_path: Path) -> None:
    host = hosts[0]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{host.port} {_other_key_line()}\n")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")

    async def scenario() -> None:
        async with opened(machine_for(host, known_hosts=str(wrong))) as remote:
            with pytest.raises(RemoteError, match=r"does not match .*known_hosts") as caught:
                await remote.connect()
            assert f"host key for {host.name} " in str(caught.value)
            assert "if the machine was reinstalled, update known_hosts" in str(caught.value)
        async with opened(machine_for(host, known_hosts=str(empty))) as remote:
            with pytest.raises(RemoteError, match=r"is unknown: .* has no entry for it"):
                await remote.connect()
        async with opened(machine_for(host, known_hosts=str(tmp_path / "absent"))) as remote:
            with pytest.raises(RemoteError, match=r"cannot read known_hosts"):
                await remote.connect()

    asyncio.run(scenario())


# --- failures, back-off, recovery ---------------------------------------------------------------


@pytest.mark.testbed
def test_refused_and_silent_ports_fail_with_a_reason_and_back_off(hosts: list[Host]) -> None:
    host = hosts[0]
    silent = socket.socket()  # accepts TCP (backlog) but never speaks SSH
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)

    async def attempt(port: int) -> str:
        remote = Remote(machine_for(host, port=port, connect_timeout=0.5),
                        backoff_base=60.0, rng=_LongestBackoff())
        with pytest.raises(RemoteError) as caught:
            await asyncio.wait_for(remote.run(["true"]), BOUND)
        assert remote.failures == 1
        until = remote.backed_off_until
        assert until is not None
        with pytest.raises(RemoteError, match=r"backed off until .* after 1 failure"):
            await remote.run(["true"])  # fails fast: no second attempt is made
        assert remote.failures == 1 and remote.backed_off_until == until
        await remote.close()
        return str(caught.value)

    async def scenario() -> None:
        port = _free_port()
        refused = await attempt(port)
        assert refused == (
            f"{host.name}: connection refused by 127.0.0.1:{port}; is sshd running there?"
        )
        port = silent.getsockname()[1]
        timed_out = await attempt(port)
        assert timed_out == (
            f"{host.name}: no answer from 127.0.0.1:{port} within 0.5s (connect_timeout)"
        )

    try:
        asyncio.run(scenario())
    finally:
        silent.close()


@pytest.mark.testbed
def test_unknown_host_and_wrong_user_say_so(hosts: list[Host]) -> None:
    async def scenario() -> None:
        remote = Remote(machine_for(hosts[0], host="no-such-host.invalid"))
        with pytest.raises(RemoteError, match=r"cannot resolve host no-such-host\.invalid"):
            await asyncio.wait_for(remote.connect(), BOUND)
        remote = Remote(machine_for(hosts[0], user="root"))
        with pytest.raises(RemoteError, match=r"authentication failed for root@127\.0\.0\.1"):
            await asyncio.wait_for(remote.connect(), BOUND)

    asyncio.run(scenario())


@pytest.mark.testbed
def test_backoff_grows_then_a_success_resets_it(spare_host: Host) -> None:
    host = spare_host

    async def scenario() -> None:
        async with opened(machine_for(host), backoff_base=0.2, rng=_LongestBackoff()) as remote:
            assert (await remote.run(["echo", "up"])).stdout == b"up\n"
            host.stop()
            with pytest.raises(RemoteError):
                await asyncio.wait_for(remote.run(["true"]), BOUND)
            with pytest.raises(RemoteError):  # reconnect refused (or the loss noticed now)
                await asyncio.wait_for(_after_backoff(remote, ["true"]), BOUND)
            assert remote.failures >= 2  # (failing fast meanwhile: test_refused_and_silent_...)
            host.start()
            result = await asyncio.wait_for(_after_backoff(remote, ["echo", "back"]), BOUND)
            assert result.stdout == b"back\n"
            assert remote.failures == 0 and remote.backed_off_until is None

    asyncio.run(scenario())


async def _after_backoff(remote: Remote, argv: list[str]) -> RunResult:
    while (until := remote.backed_off_until) is not None:
        await asyncio.sleep(max(0.01, until - time.time()))
    return await remote.run(argv)


@pytest.mark.testbed
def test_a_stalled_machine_fails_calls_within_a_bound(spare_host: Host) -> None:
    host = spare_host
    machine = machine_for(host, keepalive_interval=0.2, connect_timeout=1.0)

    async def scenario() -> None:
        async with opened(machine, backoff_base=0.01) as remote:
            started = asyncio.Event()
            build = asyncio.ensure_future(remote.run_streaming(
                ["sh", "-c", "echo started; exec sleep 300"],
                on_stdout=lambda chunk: started.set(),
            ))
            await asyncio.wait_for(started.wait(), BOUND)
            host.pause()
            try:
                with pytest.raises(RemoteError, match="not responding to keepalive"):
                    await asyncio.wait_for(build, BOUND)
                assert remote.failures >= 1
                with pytest.raises(RemoteError):  # a new connection, past the back-off
                    await asyncio.wait_for(_after_backoff(remote, ["true"]), BOUND)
            finally:
                host.resume()

    asyncio.run(scenario())


# --- files ------------------------------------------------------------------------------------


@pytest.mark.testbed
def test_fetch_round_trip_and_resume(hosts: list[Host], tmp_path: Path) -> None:
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 12345)  # many SFTP blocks, odd tail

    async def scenario() -> None:
        async with opened(machine_for(hosts[0])) as remote:
            remote_path = await remote.mktemp()
            other = await remote.mktemp()
            created.extend([remote_path, other])
            assert remote_path != other and remote_path.startswith("/")
            await remote.run(["sh", "-c", 'cat > "$1"', "sh", remote_path], input=data,
                             check=True)

            whole = tmp_path / "whole"
            seen: list[int] = []
            assert await remote.fetch(remote_path, str(whole), progress=seen.append) == len(data)
            assert whole.read_bytes() == data
            assert seen == sorted(seen) and seen[-1] == len(data)

            # A partial file is trusted as the beginning: only the rest is transferred. A marked
            # prefix shows the bytes already there were kept, not fetched again.
            partial = tmp_path / "partial"
            prefix = b"#" * 1_000_003
            partial.write_bytes(prefix)
            seen.clear()
            assert await remote.fetch(remote_path, str(partial), progress=seen.append) == len(data)
            assert partial.read_bytes() == prefix + data[len(prefix):]
            assert seen[0] > len(prefix) and seen[-1] == len(data)

            honest = tmp_path / "honest"
            honest.write_bytes(data[:2_000_000])
            await remote.fetch(remote_path, str(honest))
            assert hashlib.sha256(honest.read_bytes()).digest() == hashlib.sha256(data).digest()

            complete = await remote.fetch(remote_path, str(honest))  # nothing left to do
            assert complete == len(data) and honest.read_bytes() == data

            await remote.remove(remote_path)
            await remote.remove(other)
            await remote.remove(remote_path)  # already gone: fine
            gone = await remote.run(["test", "-e", remote_path])
            assert gone.exit_status == 1
            with pytest.raises(RemoteError, match=rf"{hosts[0].name}: cannot fetch {remote_path}"):
                await remote.fetch(remote_path, str(tmp_path / "never"))

    created: list[str] = []
    try:
        asyncio.run(scenario())
    finally:
        _remove_on(hosts[0], created)


# --- streaming, timeouts, cancel ------------------------------------------------------------------


@pytest.mark.testbed
def test_a_file_that_shrinks_during_a_fetch_leaves_a_valid_prefix(
    hosts: list[Host], tmp_path: Path
) -> None:
    """Reads past the new end come back short or at end of file: the fetch says the file
    shrank, the local file holds exactly the bytes still there, and a later fetch resumes."""
    host, data = hosts[0], random.Random(8).randbytes(32 * 1024 * 1024)
    # 32 reads of 255 KiB are in flight when the first block is written, all before the cut;
    # the read that spans the cut is sent after it and comes back short.
    cut = 9 * 1024 * 1024 + 1000

    async def scenario() -> None:
        async with opened(machine_for(host)) as remote:
            path = await remote.mktemp()
            created.append(path)
            await remote.run(["sh", "-c", 'cat > "$1"', "sh", path], input=data, check=True)
            seen: list[int] = []

            def progress(offset: int) -> None:
                if not seen:  # blocks the event loop: no reply is read meanwhile
                    host.run(f"truncate -s {cut} {shlex.quote(path)}")
                seen.append(offset)

            target = tmp_path / "cut"
            with pytest.raises(RemoteError, match=rf"{path} shrank during the transfer "
                                                  rf"\({cut} of {len(data)} bytes\)"):
                await remote.fetch(path, str(target), progress=progress)
            assert target.read_bytes() == data[:cut]
            assert seen == sorted(seen) and seen[-1] == cut

            await remote.run(["sh", "-c", 'cat > "$1"', "sh", path], input=data, check=True)
            again = tmp_path / "again"  # two fetches share the SFTP channel
            assert await asyncio.gather(remote.fetch(path, str(target)),
                                        remote.fetch(path, str(again))) == [len(data)] * 2
            assert target.read_bytes() == data and again.read_bytes() == data

    created: list[str] = []
    try:
        asyncio.run(scenario())
    finally:
        _remove_on(host, created)


@pytest.mark.testbed
def test_run_streaming_delivers_chunks_while_the_command_runs(hosts: list[Host]) -> None:
    """The command only finishes once the test has seen its first line: proof of streaming."""

    async def scenario() -> None:
        async with opened(machine_for(hosts[0])) as remote:
            flag = (await remote.run(["mktemp", "-u"], check=True)).stdout.decode().strip()
            chunks: list[bytes] = []
            errors: list[bytes] = []
            touched: list[asyncio.Task[RunResult]] = []

            def on_stdout(chunk: bytes) -> None:
                chunks.append(chunk)
                if not touched:
                    touched.append(asyncio.ensure_future(remote.run(["touch", flag])))

            script = ('echo first; echo to-stderr >&2; '
                      'while [ ! -e "$1" ]; do sleep 0.02; done; echo second; rm "$1"')
            result = await asyncio.wait_for(
                remote.run_streaming(["sh", "-c", script, "sh", flag],
                                     on_stdout=on_stdout, on_stderr=errors.append),
                BOUND,
            )
            assert result.ok and result.stdout == b"" and result.stderr == b""
            assert b"".join(chunks) == b"first\nsecond\n"
            assert b"".join(errors) == b"to-stderr\n"
            assert (await touched[0]).ok

    asyncio.run(scenario())


@pytest.mark.testbed
def test_run_streaming_feeds_stdin_from_an_async_iterator(hosts: list[Host]) -> None:
    blocks = [os.urandom(100_000) for _ in range(30)]

    async def feed() -> AsyncIterator[bytes]:
        for block in blocks:
            yield block

    async def scenario() -> None:
        async with opened(machine_for(hosts[0])) as remote:
            result = await remote.run_streaming(["sha256sum"], stdin=feed())
            expected = hashlib.sha256(b"".join(blocks)).hexdigest()
            assert result.ok and result.stdout.split()[0].decode() == expected

    asyncio.run(scenario())


GROUP_SCRIPT = 'sleep 300 & sh -c "sleep 301" & echo "$$"; wait'


@pytest.mark.testbed
def test_cancel_kills_the_whole_remote_process_group(hosts: list[Host]) -> None:
    host = hosts[0]

    async def scenario() -> int:
        async with opened(machine_for(host), kill_grace=1.0) as remote:
            pids: list[int] = []
            ready = asyncio.Event()

            def on_stdout(chunk: bytes) -> None:
                pids.append(int(chunk))
                ready.set()

            task = asyncio.ensure_future(
                remote.run_streaming(["sh", "-c", GROUP_SCRIPT], on_stdout=on_stdout)
            )
            await asyncio.wait_for(ready.wait(), BOUND)
            assert len(alive_in_group(host, pids[0])) >= 3  # sh, sleep, sh, sleep
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return pids[0]

    pgid = asyncio.run(scenario())
    assert alive_in_group(host, pgid) == []


@pytest.mark.testbed
def test_timeout_and_silence_kill_the_group_and_say_why(hosts: list[Host]) -> None:
    host = hosts[1]

    async def scenario() -> list[int]:
        groups = []
        async with opened(machine_for(host), kill_grace=0.5) as remote:
            with pytest.raises(CommandTimeoutError) as caught:
                await remote.run_streaming(["sh", "-c", GROUP_SCRIPT], timeout=1.0)
            assert caught.value.reason == "timeout"
            assert "still running after 1s (timeout); killed it" in str(caught.value)
            groups.append(int(caught.value.result.stdout))

            with pytest.raises(CommandTimeoutError) as caught:
                await remote.run_streaming(
                    ["sh", "-c", 'echo "$$"; trap "" TERM; exec sleep 300'],
                    silence_timeout=0.5,
                )
            assert caught.value.reason == "silence"  # and TERM ignored: KILL after the grace
            assert "silent for 0.5s (silence_timeout)" in str(caught.value)
            groups.append(int(caught.value.result.stdout))

            with pytest.raises(CommandTimeoutError):
                await remote.run(["sh", "-c", GROUP_SCRIPT], timeout=0.5)
            out = await remote.run(["echo", "still usable"], timeout=10)
            assert out.stdout == b"still usable\n"
        return groups

    for pgid in asyncio.run(scenario()):
        assert alive_in_group(host, pgid) == []


@pytest.mark.testbed
def test_a_single_session_machine_still_does_everything(hosts: list[Host], tmp_path: Path) -> None:
    """max_sessions=1: no channel kept for SFTP or kills; calls queue and a cancel still kills."""
    host = hosts[0]

    async def scenario() -> int:
        async with opened(machine_for(host, max_sessions=1), kill_grace=0.5) as remote:
            path = await remote.mktemp()
            created.append(path)
            results = await asyncio.gather(
                remote.run(["sh", "-c", 'printf data > "$1"', "sh", path], check=True),
                *(remote.run(["echo", str(i)]) for i in range(5)),
            )
            assert [r.stdout for r in results[1:]] == [f"{i}\n".encode() for i in range(5)]
            assert await remote.fetch(path, str(tmp_path / "data")) == 4
            await remote.remove(path)

            pids: list[int] = []
            ready = asyncio.Event()

            def on_stdout(chunk: bytes) -> None:
                pids.append(int(chunk))
                ready.set()

            task = asyncio.ensure_future(
                remote.run_streaming(["sh", "-c", GROUP_SCRIPT], on_stdout=on_stdout)
            )
            await asyncio.wait_for(ready.wait(), BOUND)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await remote.run(["echo", "after"])).stdout == b"after\n"
            return pids[0]

    created: list[str] = []
    try:
        pgid = asyncio.run(scenario())
    finally:
        _remove_on(host, created)
    assert (tmp_path / "data").read_bytes() == b"data"
    assert alive_in_group(host, pgid) == []


# --- local transport ------------------------------------------------------------------------------

LOCAL = Machine(name="here", host=None, transport="local")


def _alive_locally(pgid: int) -> list[int]:
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            alive.append(int(entry))
    return alive


def test_local_transport_runs_commands_verbatim() -> None:
    async def scenario() -> None:
        async with opened(LOCAL) as remote:
            await remote.connect()
            for argument in HOSTILE:
                assert (await remote.run(["printf", "%s", argument])).stdout == argument.encode()
            assert (await remote.run(["cat"], input=b"abc")).stdout == b"abc"
            failed = await remote.run(["sh", "-c", "echo e >&2; exit 4"])
            assert (failed.exit_status, failed.stderr) == (4, b"e\n")
            missing = await remote.run(["no-such-command-here"])
            assert missing.exit_status == 127 and b"no-such-command-here" in missing.stderr
            with pytest.raises(RemoteError, match="here: no-such-command-here exited with"):
                await remote.run(["no-such-command-here"], check=True)

    asyncio.run(scenario())


def test_local_transport_streams_and_kills_its_group() -> None:
    async def scenario() -> list[int]:
        groups = []
        async with opened(LOCAL, kill_grace=0.5) as remote:
            chunks: list[bytes] = []
            streamed = await remote.run_streaming(
                ["sh", "-c", "echo a; echo b >&2"], on_stdout=chunks.append
            )
            assert streamed.ok and b"".join(chunks) == b"a\n" and streamed.stderr == b"b\n"

            ready = asyncio.Event()
            pids: list[int] = []

            def on_stdout(chunk: bytes) -> None:
                pids.append(int(chunk))
                ready.set()

            task = asyncio.ensure_future(
                remote.run_streaming(["sh", "-c", GROUP_SCRIPT], on_stdout=on_stdout)
            )
            await asyncio.wait_for(ready.wait(), BOUND)
            assert len(_alive_locally(pids[0])) >= 3
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            groups.append(pids[0])

            with pytest.raises(CommandTimeoutError) as caught:
                await remote.run_streaming(["sh", "-c", GROUP_SCRIPT], silence_timeout=0.3)
            groups.append(int(caught.value.result.stdout))
        return groups

    for pgid in asyncio.run(scenario()):
        assert _alive_locally(pgid) == []


def test_local_transport_files(tmp_path: Path) -> None:
    data = os.urandom(3_000_000)

    async def scenario() -> None:
        async with opened(LOCAL) as remote:
            source = await remote.mktemp()
            try:
                Path(source).write_bytes(data)
                target = tmp_path / "copy"
                target.write_bytes(b"x" * 1000)
                seen: list[int] = []
                assert await remote.fetch(source, str(target), progress=seen.append) == len(data)
                assert target.read_bytes() == b"x" * 1000 + data[1000:]
                assert seen[-1] == len(data)
            finally:
                await remote.remove(source)
            assert not os.path.exists(source)
            await remote.remove(source)
            with pytest.raises(RemoteError, match="here: cannot copy"):
                await remote.fetch(source, str(tmp_path / "never"))

    asyncio.run(scenario())


@pytest.mark.parametrize("transport", ["ssh", "local"])
def test_fetch_refuses_a_file_larger_than_its_limit(
    hosts: list[Host], tmp_path: Path, transport: str,
) -> None:
    """A file one byte over the limit is refused before any of it is read (nothing local is
    created), with both sizes; at the limit it is fetched whole. A local copy also stops at the
    limit when the file grows after it was measured."""
    data = os.urandom(1_000_003)
    machine = LOCAL if transport == "local" else machine_for(hosts[0])

    async def scenario() -> None:
        async with opened(machine) as remote:
            source = await remote.mktemp()
            created.append(source)
            await remote.run(["sh", "-c", 'cat > "$1"', "sh", source], input=data, check=True)
            never = tmp_path / "never"
            with pytest.raises(ProtocolError, match=rf"^{machine.name}: {source} is {len(data)} "
                               rf"bytes, more than the {len(data) - 1} it can legitimately hold"):
                await remote.fetch(source, str(never), limit=len(data) - 1)
            assert not never.exists()
            whole = tmp_path / "whole"
            assert await remote.fetch(source, str(whole), limit=len(data)) == len(data)
            assert whole.read_bytes() == data
            await remote.remove(source)

    created: list[str] = []
    try:
        asyncio.run(scenario())
    finally:
        if transport == "ssh":
            _remove_on(hosts[0], created)


def test_a_local_copy_stops_at_its_limit(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(b"y" * 5000)
    assert asyncio.run(transfer.copy_local(str(source), str(target), None, limit=4096)) == 4096
    assert target.read_bytes() == b"y" * 4096


def test_note_failure_backs_off_and_note_success_resets() -> None:
    async def scenario() -> None:
        remote = Remote(LOCAL, backoff_base=10.0, backoff_max=25.0, rng=_LongestBackoff())
        assert remote.backed_off_until is None and remote.failures == 0
        for delay in (10, 20, 25, 25):  # doubling, capped at backoff_max
            before = time.time()
            remote.note_failure("disk on fire")
            after = time.time()
            until = remote.backed_off_until
            assert until is not None and before + delay <= until <= after + delay
        with pytest.raises(RemoteError, match=r"here: backed off until .* after 4 failure\(s\); "
                                              r"last: disk on fire"):
            await remote.run(["true"])
        remote.note_success()
        assert remote.backed_off_until is None and remote.failures == 0
        assert (await remote.run(["true"])).ok
        await remote.close()

    asyncio.run(scenario())


def test_a_backoff_is_at_least_half_its_ceiling() -> None:
    """The shortest jitter still backs a machine off for half the doubling delay: a backoff of
    next to nothing let a misbehaving machine connect again at once."""
    remote = Remote(LOCAL, backoff_base=10.0, backoff_max=25.0, rng=_ShortestBackoff())
    for delay in (5, 10, 12.5):
        before = time.time()
        remote.note_failure("disk on fire")
        until = remote.backed_off_until
        assert until is not None and until >= before + delay


def test_run_result_ok() -> None:
    assert RunResult(("x",), 0, b"", b"").ok
    assert not RunResult(("x",), 1, b"", b"").ok
    assert not RunResult(("x",), None, b"", b"").ok
