"""`buildfarm machines test`: can a machine do what a build needs? Log in, run the store tool,
(on Guix) check its version, daemon, signing key and ACL, import an archive from the
coordinator, export it back (like `guix offload test`).

Every machine is tested at once, each on a fresh connection; a failed check says what to fix.
The test item is a small text file made for the test, removed from the machine afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import secrets
import shlex
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from buildfarm.backends import Backend, get_backend
from buildfarm.errors import ArchiveError, RemoteError
from buildfarm.formats import nar
from buildfarm.formats.signing import SignatureError, SigningKey, guix_acl_keys
from buildfarm.inventory import Machine
from buildfarm.machines.status import (
    STORE_DIRS,
    STORE_PROGRAMS,
    close_quietly,
    command_problem,
    reason,
)
from buildfarm.outputs.store import regular_file_nar
from buildfarm.render import one_line
from buildfarm.ssh.remote import Remote, RunResult

TEST_ITEM_NAME = "buildfarm-machine-test"

# --- machines test --------------------------------------------------------------------------

# The checks, in the order they run; each needs the ones before it.
CHECKS: dict[str, str] = {
    "login": "An SSH connection and login with the inventory's settings, host key checked "
    "(nothing to do for transport: local).",
    "store": "The store tool runs from a non-interactive SSH command (sshd gives those no login "
    "shell): guix --version, or nix-store --version.",
    "version": "Guix is 1.4.0 or later (`guix hash -S nar`, which checks what the machine "
    "sends, came with 1.4.0); a pulled Guix, which names its commit, is taken as recent.",
    "daemon": "The Guix daemon answers (guix archive --missing).",
    "signing-key": "The machine has a signing key (/etc/guix/signing-key.pub and .sec), which "
    "its exports are signed with.",
    "authorized": "The machine's ACL (/etc/guix/acl) authorizes the coordinator's key, which "
    "signs what it pushes; on Guix System, through the system configuration (authorized-keys "
    "of guix-service-type), which a reconfiguration keeps.",
    "push": "The machine imports an archive from the coordinator (guix archive --import or "
    "nix-store --import) holding a small text file made for the test — signed with the "
    "coordinator's key for Guix, which refuses unsigned or unauthorized archives — and then "
    "holds it as a valid store item.",
    "pull": "The machine exports that item into a file (guix archive --export or nix-store "
    "--export), the coordinator fetches the file over SFTP, as it fetches build outputs (but "
    "a Nix machine's small ones, which its store session sends), and finds the nar hash of "
    "what it sent.",
}


# The checks of each kind of machine.
CHECKS_FOR: dict[str, tuple[str, ...]] = {
    "guix": ("login", "store", "version", "daemon", "signing-key", "authorized", "push", "pull"),
    "nix": ("login", "store", "push", "pull"),
}
# On Guix System the ACL is made from the system configuration at each activation
# (gnu/services/base.scm substitute-key-authorization; a hand-edited one is moved to acl.bak).
_GUIX_SYSTEM_FIX = (
    "add the key to the system configuration, which rebuilds /etc/guix/acl at each "
    "reconfiguration (a key added by `guix archive --authorize` is dropped then): put the "
    "output of `buildfarm key show --format guix` in a file beside config.scm, e.g. farm.pub, "
    "and in guix-configuration write (authorized-keys (cons (local-file \"farm.pub\") "
    "%default-authorized-guix-keys)), then run `sudo guix system reconfigure config.scm`"
)
_ACL_SCRIPT = (
    'd="${GUIX_CONFIGURATION_DIRECTORY:-/etc/guix}"; '
    '[ -d /run/current-system ] && echo "system"; '
    '[ -L "$d/acl" ] && echo "link $(readlink "$d/acl")"; '
    'for f in signing-key.pub signing-key.sec acl; do [ -e "$d/$f" ] && echo "has $f"; done; '
    'echo "dir $d"; echo ---; [ -r "$d/acl" ] && cat "$d/acl"; exit 0'
)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None


@dataclass(frozen=True, slots=True)
class TestReport:
    """The checks one machine passed, up to the first it failed."""

    __test__ = False  # not a pytest class
    machine: str
    checks: tuple[Check, ...]
    expected: tuple[str, ...] = tuple(CHECKS)  # the checks of its kind of machine

    @property
    def ok(self) -> bool:
        return len(self.checks) == len(self.expected) and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.machine,
            "ok": self.ok,
            "checks": [
                {"name": c.name, "ok": c.ok, "detail": c.detail, "fix": c.fix}
                for c in self.checks
            ],
        }


class _Failed(Exception):
    def __init__(self, detail: str, fix: str | None) -> None:
        super().__init__(detail)
        self.detail, self.fix = detail, fix


def ssh_command(machine: Machine) -> str:
    """How an operator logs in to the machine, for the fixes we suggest."""
    if machine.transport == "local":
        return "sh -c"
    port = f"-p {machine.port} " if machine.port != 22 else ""
    user = f"{machine.user}@" if machine.user else ""
    return f"ssh {port}{user}{machine.host}"


def _login_problem(message: str, machine: Machine) -> tuple[str, str]:
    """(what happened, what to fix) from a connection error of buildfarm.ssh."""
    if "connection refused" in message:
        return message.split("; ", 1)[0], (
            f"start sshd on {machine.host}, or correct port {machine.port} in the inventory")
    if "; " in message:  # buildfarm.ssh's messages end with what to do
        detail, fix = message.split("; ", 1)
        return detail, fix
    if "no answer" in message:
        return message, (f"check that {machine.host} is up and that port {machine.port} is "
                         "reachable from here; on a slow link, raise connect_timeout")
    return message, (f"check host and port of {machine.name} in the inventory, then try "
                     f"{ssh_command(machine)}")


class _MachineTest:
    """The checks of one machine, on one connection."""

    def __init__(self, machine: Machine, key: SigningKey | None, key_problem: str | None,
                 timeout: float) -> None:
        self.machine = machine
        self.key, self.key_problem = key, key_problem
        self.timeout = timeout
        self.remote = Remote(machine)
        self.backend: Backend = get_backend(machine.store)
        self.item: str | None = None
        self.contents = b""
        self.checks: list[Check] = []
        self.current = "login"
        self.version = ""
        self.guix_files: _GuixFiles | None = None

    async def run(self) -> TestReport:
        checks = self.checks
        every = {"login": self.login, "store": self.store, "version": self.version_check,
                 "daemon": self.daemon, "signing-key": self.signing_key,
                 "authorized": self.authorized, "push": self.push, "pull": self.pull}
        expected = CHECKS_FOR[self.machine.store]
        try:
            for name in expected:
                step = every[name]
                self.current = name
                try:
                    detail = await step()
                except _Failed as e:
                    checks.append(Check(name, False, e.detail, e.fix))
                    break
                except RemoteError as e:
                    why = reason(e, self.machine)
                    fix = "check that the machine stays reachable, then test it again"
                    if name == "login":
                        why, fix = _login_problem(why, self.machine)
                    checks.append(Check(name, False, why, fix))
                    break
                except Exception as e:  # a bug must not hide the other machines
                    checks.append(Check(name, False, f"internal error: {e!r}",
                                        "report this as a bug of buildfarm"))
                    break
                checks.append(Check(name, True, detail))
        finally:
            await self.cleanup()
            await close_quietly(self.remote)
        return TestReport(self.machine.name, tuple(checks), expected)

    async def command(self, argv: Sequence[str], input: bytes | None = None) -> RunResult:
        return await self.remote.run(argv, input=input, timeout=self.timeout)

    async def login(self) -> str:
        m = self.machine
        await self.remote.connect()
        if m.transport == "local":
            return "transport: local (no SSH)"
        return f"logged in as {m.user or 'the current user'} at {m.host}:{m.port}"

    async def store(self) -> str:
        command = self.backend.version()
        result = await self.command(command.argv)
        program = STORE_PROGRAMS[self.machine.store]
        tool = "guix" if self.machine.store == "guix" else "nix-store"
        if result.exit_status == 127:
            raise _Failed(
                f"{tool}: command not found in a non-interactive SSH command",
                f"install {program} on {self.machine.name}, or make `{tool}` reachable from "
                f"commands run by `{ssh_command(self.machine)} {tool} --version` (sshd runs "
                "them without a login shell, so ~/.profile is not read): link it into "
                "/usr/local/bin, or set PATH in ~/.ssh/environment (with PermitUserEnvironment "
                "yes in sshd_config) or in ~/.bashrc",
            )
        if not result.ok:
            raise _Failed(command_problem(result),
                          f"run {tool} --version on the machine and fix what it says")
        self.version = self.backend.parse_version(result.stdout)
        return f"{program} {self.version}"

    async def version_check(self) -> str:
        problem = self.backend.version_problem(self.version)
        if problem is not None:
            raise _Failed(problem, f"update Guix on {self.machine.name}: `guix pull` as the "
                          "user whose guix the daemon runs (root on a foreign distribution, "
                          "then `sudo systemctl restart guix-daemon`), or `sudo guix system "
                          "reconfigure` on Guix System after a pull")
        return f"Guix {self.version} has `guix hash -S nar`"

    async def daemon(self) -> str:
        command = self.backend.missing([])
        result = await self.command(command.argv, input=command.stdin)
        if not result.ok:
            raise _Failed(command_problem(result), (
                f"start the Guix daemon on {self.machine.name}: `sudo systemctl start "
                "guix-daemon` on a foreign distribution, `sudo herd start guix-daemon` on Guix "
                "System; for a daemon elsewhere, set GUIX_DAEMON_SOCKET for SSH commands"))
        return "the daemon answers (guix archive --missing)"

    async def files(self) -> _GuixFiles:
        if self.guix_files is None:
            result = await self.command(["sh", "-c", _ACL_SCRIPT])
            self.guix_files = _GuixFiles.read(result.stdout.decode(errors="replace"))
        return self.guix_files

    async def signing_key(self) -> str:
        files = await self.files()
        missing = [f for f in ("signing-key.pub", "signing-key.sec") if f not in files.present]
        if missing:
            fix = ("on Guix System, reconfigure with generate-substitute-key? #t (the default "
                   "of guix-configuration)" if files.guix_system else
                   f"make it, as root: {ssh_command(self.machine)} sudo guix archive "
                   "--generate-key")
            raise _Failed(f"no {' nor '.join(missing)} in {files.directory}: the machine cannot "
                          "sign what it exports", fix)
        return f"{files.directory}/signing-key.pub"

    async def authorized(self) -> str:
        m, files = self.machine, await self.files()
        if self.key is None:
            raise _Failed(self.key_problem or "the coordinator has no signing key",
                          "make the coordinator's key: buildfarm key generate")
        acl = f"{files.directory}/acl"
        managed = files.link is not None and files.link.startswith(("/gnu/store/", "/nix/store/"))
        try:
            keys = guix_acl_keys(files.acl) if files.acl.strip() else []
        except SignatureError as e:
            raise _Failed(f"{acl} cannot be read: {e}", f"check {acl} on {m.name}") from None
        if self.key.public_bytes in keys:
            if files.guix_system and not managed:
                return (f"{acl} authorizes the coordinator's key, but by hand: the next system "
                        "reconfiguration drops it (to acl.bak); " + _GUIX_SYSTEM_FIX)
            return f"{acl} authorizes the coordinator's key" + (
                " (from the system configuration)" if managed else "")
        if managed or files.guix_system:
            raise _Failed(f"{acl} (made by the system configuration) does not authorize the "
                          "coordinator's key", _GUIX_SYSTEM_FIX)
        raise _Failed(
            f"{acl} does not authorize the coordinator's key",
            "authorize it, as root (the ACL belongs to root): buildfarm key show --format guix "
            f"| {ssh_command(m)} sudo guix archive --authorize")

    async def push(self) -> str:
        m = self.machine
        signed = self.backend.signed_imports
        if signed and self.key is None:
            raise _Failed(
                self.key_problem or "the coordinator has no signing key",
                "make the coordinator's key (buildfarm key generate), then authorize it: "
                f"buildfarm key show --format guix | {ssh_command(m)} guix archive --authorize",
            )
        store_dir = await self.store_dir()
        from buildfarm.submission import text_store_path

        self.contents = (
            f"buildfarm machines test\nmachine: {m.name}\ncoordinator: {socket.gethostname()}\n"
            f"nonce: {secrets.token_hex(16)}\n"
        ).encode()
        path = text_store_path(store_dir, TEST_ITEM_NAME, self.contents, ())
        bundle = io.BytesIO()
        signer = self.key.sign_guix if signed and self.key is not None else None
        nar.write_bundle(bundle, [(regular_file_nar(self.contents), path, (), "", signer)])
        command = self.backend.import_bundle()
        result = await self.command(command.argv, input=bundle.getvalue())
        self.item = path  # clean it up even if the import half worked
        if not result.ok:
            if signed:
                fix = ("authorize the coordinator's key, as root: buildfarm key show --format "
                       f"guix | {ssh_command(m)} sudo guix archive --authorize")
            else:
                fix = (f"let {m.user or 'the login user'} import archives: add it to "
                       "trusted-users in the machine's nix.conf (or use a single-user store it "
                       "owns)")
            raise _Failed(f"the import failed: {command_problem(result)}", fix)
        missing = self.backend.missing([path])
        check = await self.command(missing.argv, input=missing.stdin)
        if not check.ok or self.backend.parse_missing(check.stdout):
            raise _Failed(f"imported {path}, but the store does not hold it afterwards",
                          "check the machine's store and daemon")
        return f"imported {path}" + (" (signed with the coordinator's key)" if signed else "")

    async def store_dir(self) -> str:
        script = 'for d in ${NIX_STORE_DIR:+"$NIX_STORE_DIR"} "$@"; do ' \
                 '[ -d "$d" ] && { echo "$d"; exit 0; }; done; exit 1'
        result = await self.command(["sh", "-c", script, "sh", *STORE_DIRS[self.machine.store]])
        if not result.ok:
            looked = " or ".join(STORE_DIRS[self.machine.store])
            raise _Failed(f"no store directory ({looked}) on the machine",
                          f"install {STORE_PROGRAMS[self.machine.store]} on the machine")
        return result.stdout.decode().strip()

    async def pull(self) -> str:
        assert self.item is not None
        remote_file = await self.remote.mktemp()
        try:
            command = self.backend.export_to_file([self.item], remote_file)
            result = await self.command(command.argv, input=command.stdin)
            if not result.ok:
                export = shlex.join(self.backend.export([self.item]).argv)
                raise _Failed(f"the export failed: {command_problem(result)}",
                              f"run `{export}` on the machine and fix what it says")
            with tempfile.TemporaryDirectory(prefix="buildfarm-test-") as directory:
                local = os.path.join(directory, "bundle")
                try:
                    size = await self.remote.fetch(remote_file, local)
                except RemoteError as e:
                    raise _Failed(
                        f"cannot fetch the exported file over SFTP: {reason(e, self.machine)}",
                        "enable SFTP in the machine's sshd_config (Subsystem sftp ...)",
                    ) from None
                return f"fetched {size} bytes over SFTP: " + self.verify(local)
        finally:
            with contextlib.suppress(RemoteError, OSError):
                await self.remote.remove(remote_file)

    def verify(self, bundle_file: str) -> str:
        want = hashlib.sha256(regular_file_nar(self.contents)).digest()
        try:
            with open(bundle_file, "rb") as stream:
                items = list(nar.read_bundle(stream, max_items=2))
        except ArchiveError as e:
            raise _Failed(f"the machine's archive is not valid: {e}", None) from None
        if [i.path for i in items] != [self.item] or items[0].nar_sha256 != want:
            raise _Failed("the machine's archive does not hold what was sent (nar hash differs)",
                          "check the machine's store for corruption (guix gc --verify=contents "
                          "or nix-store --verify --check-contents)")
        signed = " (signed by the machine)" if items[0].signature else ""
        return f"nar hash sha256:{nar.nix_base32_encode(want)} matches{signed}"

    async def cleanup(self) -> None:
        if self.item is None:
            return
        with contextlib.suppress(RemoteError):
            await self.command(self.backend.delete([self.item]).argv)


@dataclass(frozen=True, slots=True)
class _GuixFiles:
    """What _ACL_SCRIPT found: Guix's configuration directory, its files, the ACL."""

    directory: str
    present: frozenset[str]
    guix_system: bool
    link: str | None  # where the ACL links to, if it is a symbolic link
    acl: str

    @classmethod
    def read(cls, text: str) -> _GuixFiles:
        head, _, acl = text.partition("---\n")
        lines = head.splitlines()
        words = [line.split(" ", 1) for line in lines]
        found = {w[0]: w[1] for w in words if len(w) == 2 and w[0] in ("link", "dir")}
        return cls(found.get("dir", "/etc/guix"),
                   frozenset(w[1] for w in words if len(w) == 2 and w[0] == "has"),
                   "system" in lines, found.get("link"), acl)


async def test_all(machines: Sequence[Machine], key: SigningKey | None,
                   key_problem: str | None = None) -> list[TestReport]:
    """Test every machine at once, in the order given."""

    async def one(machine: Machine) -> TestReport:
        limit = 6 * machine.connect_timeout + 60
        work = _MachineTest(machine, key, key_problem, timeout=max(30.0, machine.connect_timeout))
        try:
            return await asyncio.wait_for(work.run(), limit)
        except TimeoutError:
            stuck = Check(work.current, False, f"no end within {limit:g}s",
                          "check that the machine is responsive")
            return TestReport(machine.name, (*work.checks, stuck), CHECKS_FOR[machine.store])

    return list(await asyncio.gather(*(one(m) for m in machines)))


def report_lines(reports: Sequence[TestReport], colour: bool) -> list[str]:
    """What people read: a verdict per machine, then each check with what to fix."""
    import click

    def paint(text: str, ok: bool) -> str:
        return click.style(text, fg="green" if ok else "red", bold=not ok) if colour else text

    lines: list[str] = []
    width = max(map(len, CHECKS))
    for report in reports:
        lines.append(f"{report.machine}: " + paint("ok" if report.ok else "FAILED", report.ok))
        for check in report.checks:
            verdict = paint("ok" if check.ok else "FAILED", check.ok)
            lines.append(f"  {check.name:<{width}}  {verdict}  {one_line(check.detail)}")
            if check.fix:
                lines.append(f"  {'':<{width}}  fix: {one_line(check.fix)}")
        skipped = [n for n in report.expected if n not in {c.name for c in report.checks}]
        if skipped:
            lines.append(f"  {'':<{width}}  not run: {', '.join(skipped)}")
    failed = sum(not r.ok for r in reports)
    lines.append(f"{len(reports) - failed} of {len(reports)} machine(s) passed")
    return lines
