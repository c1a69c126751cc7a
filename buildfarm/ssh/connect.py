"""Opening the one SSH connection to a machine: its host key always checked (known_hosts, or
the inventory's `host_key` pin), the inventory's user, port and identity, the user's ssh config
for the rest, keepalives, and one clear line for each way it can fail."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

import asyncssh

from buildfarm.errors import RemoteError
from buildfarm.inventory import Machine

KEEPALIVE_COUNT_MAX = 3
# AES-GCM is hardware-accelerated on any build machine worth the name: about twice the SFTP
# throughput of the default chacha20-poly1305 (testbed.md).
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                   "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr"]
OnLost = Callable[[asyncssh.SSHClientConnection, Exception | None], None]


class _HostKeyCheck:
    """What a handshake learned about the machine's host key, for a useful message."""

    def __init__(self) -> None:
        self.known = False
        self.offered: asyncssh.SSHKey | None = None


class _Client(asyncssh.SSHClient):
    def __init__(self, on_lost: OnLost, check: _HostKeyCheck) -> None:
        self._on_lost, self._check = on_lost, check
        self._conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._on_lost(self._conn, exc)

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self._check.offered = key  # called only for a key that known_hosts does not trust
        return False


async def open_connection(m: Machine, on_lost: OnLost) -> asyncssh.SSHClientConnection:
    """Connect and log in; `on_lost` hears when the connection ends. RemoteError says, in one
    line naming the machine, why it cannot (host key, login, name, refused, no answer)."""
    check = _HostKeyCheck()
    where = f"{m.host}:{m.port}"
    known_hosts: Any
    if m.host_key:  # a pin: that key and no other
        try:
            known_hosts = ([asyncssh.import_public_key(m.host_key)], [], [])
        except (ValueError, asyncssh.KeyImportError) as exc:
            raise RemoteError(f"{m.name}: host_key is not a public key line: {exc}") from None
        check.known = True
    else:
        path = os.path.expanduser(m.known_hosts or "~/.ssh/known_hosts")
        try:
            table = asyncssh.read_known_hosts(path)
        except (OSError, ValueError) as exc:
            raise RemoteError(
                f"{m.name}: cannot read known_hosts {path}: {describe(exc)}; create it "
                f"(ssh-keyscan -p {m.port} {m.host} >> {path}) or set host_key"
            ) from None

        def known_hosts(host: str, addr: str, port: int | None) -> Any:
            found = table.match(host, addr, port)
            check.known = bool(found[0] or found[1])
            return found

    keys: Any = [os.path.expanduser(m.identity)] if m.identity else ()
    # The user's ssh config fills what the inventory leaves open (user, keys, proxies).
    ssh_config = os.path.expanduser("~/.ssh/config")
    config: Any = [ssh_config] if os.path.isfile(ssh_config) else None
    try:
        return await asyncio.wait_for(asyncssh.connect(
            m.host or "localhost", m.port, client_keys=keys,
            username=m.user if m.user is not None else (),
            agent_path=None if m.identity else (), known_hosts=known_hosts, config=config,
            connect_timeout=m.connect_timeout, keepalive_interval=m.keepalive_interval,
            keepalive_count_max=KEEPALIVE_COUNT_MAX, encryption_algs=ENCRYPTION_ALGS,
            client_factory=lambda: _Client(on_lost, check),
        ), m.connect_timeout + 1.0)
    except asyncssh.HostKeyNotVerifiable:
        raise RemoteError(_host_key_message(m, check)) from None
    except asyncssh.PermissionDenied:
        raise RemoteError(
            f"{m.name}: authentication failed for {m.user or '(local user)'}@{where}; "
            f"is the public key of {m.identity or 'your default key'} in the machine's "
            "authorized_keys?"
        ) from None
    except socket.gaierror as exc:
        raise RemoteError(f"{m.name}: cannot resolve host {m.host}: {exc.strerror}") from None
    except ConnectionRefusedError:
        raise RemoteError(f"{m.name}: connection refused by {where}; is sshd running there?"
                          ) from None
    except TimeoutError:
        raise RemoteError(
            f"{m.name}: no answer from {where} within {m.connect_timeout:g}s (connect_timeout)"
        ) from None
    except (OSError, asyncssh.Error) as exc:
        raise RemoteError(f"{m.name}: cannot connect to {where}: {describe(exc)}") from None


def _host_key_message(m: Machine, check: _HostKeyCheck) -> str:
    offered = ""
    if check.offered is not None:
        offered = (f" (it offered {check.offered.get_algorithm()} "
                   f"{check.offered.get_fingerprint()})")
    source = ("the inventory's host_key pin" if m.host_key
              else m.known_hosts or "~/.ssh/known_hosts")
    if not check.known:
        return (
            f"host key for {m.name} ({m.host}:{m.port}) is unknown: {source} has no entry for "
            f"it{offered}; add it (ssh-keyscan -p {m.port} {m.host}) or set host_key"
        )
    return (
        f"host key for {m.name} ({m.host}:{m.port}) does not match {source}{offered}; "
        "if the machine was reinstalled, update known_hosts / host_key"
    )


def describe(exc: BaseException) -> str:
    """An OS or SSH error in a few words, for messages that already name the machine."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncssh.Error) and exc.reason:
        return exc.reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__
