"""Throwaway sshd "build hosts" with private Nix stores: real machines for the tests.

Each host is one sshd on 127.0.0.1 (own port chosen at run time, own host key) running in a mount
namespace of its own, where a per-host directory is bind-mounted over /nix: to Nix it is a separate
machine with an initially empty store. Remote commands run as the unprivileged account ``bftest``
(shell /bin/sh, single-user Nix, no daemon) and get the test bed's nix.conf through sshd's
``SetEnv NIX_CONF_DIR=...``; the machine's own /nix and /etc/nix are never used or changed.

Every process a host runs (sshd, its per-connection children, the builds) lives in the mount
namespace its ``unshare`` created, so stop()/kill()/pause() act on exactly those processes and
nothing is ever found or killed by name.

The coordinator side (nix-instantiate in the test process) must only run in the private /nix that
``scripts/test`` sets up; ``private_nix_problem()`` says whether that is the case.
"""

from __future__ import annotations

import contextlib
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from guix_emulator import copy_sources, install_emulator

TEST_USER = "bftest"
LOOPBACK = "127.0.0.1"
SSHD = "/usr/sbin/sshd"
DEFAULT_HOSTS = 2
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
NIX_CONF = """\
sandbox = false
substituters =
experimental-features = nix-command
build-users-group =
sandbox-paths = /bin /lib /lib64 /usr
"""

# Set by scripts/test; see private_nix_problem().
ENV_REQUIRED = "BUILDFARM_TESTBED"
ENV_PRIVATE_NIX = "BUILDFARM_TESTBED_NIX"
ENV_REAL_NIX_FD = "BUILDFARM_TESTBED_REAL_NIX_FD"

# Run by `unshare --mount` for each host: its own /nix and home, then sshd in the foreground.
_HOST_SCRIPT = 'mount --bind "$1" /nix && mount --bind "$2" "$3" && exec "$4" -D -e -f "$5"'
_NEEDED_PROGRAMS = (
    "unshare", "mount", "ssh", "ssh-keygen", "useradd", "usermod",
    "nix-instantiate", "nix-store",
)
_BIND_FAILURES = ("Address already in use", "Cannot bind any address")
# Runs the guix emulator on guix hosts: bftest may not read the virtualenv's interpreter.
GUIX_PYTHON = "/usr/bin/python3"


class TestbedError(RuntimeError):
    """The test bed could not do what was asked (a broken environment, not a product bug)."""

    __test__ = False


def testbed_problem() -> str | None:
    """Why no test bed can run in this process, or None if one can."""
    if os.geteuid() != 0:
        return "needs root (sshd hosts in private mount namespaces)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is missing (apt-get install openssh-server)"
    for program in _NEEDED_PROGRAMS:
        if shutil.which(program) is None:
            return f"`{program}` is not installed"
    return private_nix_problem()


def private_nix_problem() -> str | None:
    """Why the coordinator side may not use Nix here, or None if /nix is the run's private one.

    scripts/test runs pytest in a mount namespace with a temporary directory (named by
    BUILDFARM_TESTBED_NIX) bind-mounted over /nix and NIX_CONF_DIR pointing at its own nix.conf.
    Outside of that, nix-instantiate would write to the machine's own store.
    """
    private = os.environ.get(ENV_PRIVATE_NIX)
    if not private:
        return "pytest was not started by scripts/test (the tests need its private /nix)"
    try:
        same = os.path.samestat(os.stat("/nix"), os.stat(private))
    except OSError as error:
        return f"cannot check the private /nix: {error}"
    if not same:
        return f"/nix is not the private store {private}"
    if not os.environ.get("NIX_CONF_DIR"):
        return "NIX_CONF_DIR is not set to the test nix.conf"
    return None


def real_nix_dir() -> Path | None:
    """The machine's own /nix, seen from inside the private namespace (read-only use!).

    scripts/test opens /nix before it unshares and passes the descriptor; the /proc magic link
    resolves through that descriptor, not through this process's mounts.
    """
    fd = os.environ.get(ENV_REAL_NIX_FD)
    if not fd or not os.path.exists(f"/proc/self/fd/{fd}"):
        return None
    return Path(f"/proc/self/fd/{fd}")


def current_system() -> str:
    """The Nix system name of this machine (x86_64-linux, aarch64-linux, ...)."""
    machine = platform.machine()
    machine = {"amd64": "x86_64", "arm64": "aarch64", "i386": "i686"}.get(machine, machine)
    return f"{machine}-linux"


# --- coordinator-side Nix -----------------------------------------------------------------------


def nix_string(text: str) -> str:
    """``text`` as a Nix double-quoted string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return f'"{escaped}"'


def nix_expr_trivial(name: str, script: str, *, attrs: Mapping[str, str] | None = None) -> str:
    """A derivation that runs ``/bin/sh -c script`` (PATH is unset: use absolute paths).

    ``attrs`` adds attributes whose values are Nix expressions, inserted verbatim: pass another
    ``nix_expr_trivial(...)`` to make a dependency, visible to the script as ``$NAME``.
    """
    extra = "".join(f" {key} = {value};" for key, value in (attrs or {}).items())
    return (
        f"derivation {{ name = {nix_string(name)}; system = builtins.currentSystem;"
        f' builder = "/bin/sh"; args = [ "-c" {nix_string(script)} ];{extra} }}'
    )


def instantiate_all(expr: str) -> list[str]:
    """The .drv paths ``nix-instantiate -E expr`` writes into the coordinator's private store."""
    problem = private_nix_problem()
    if problem is not None:
        raise TestbedError(f"refusing to run nix-instantiate: {problem}")
    done = subprocess.run(
        ["nix-instantiate", "-E", expr], capture_output=True, text=True, check=False,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise TestbedError(f"nix-instantiate failed: {done.stderr.strip()}")
    # stdout only: Nix warns about --add-root on stderr.
    return [line for line in done.stdout.splitlines() if line.endswith(".drv")]


def instantiate(expr: str) -> str:
    """The one .drv path ``nix-instantiate -E expr`` makes (coordinator side)."""
    paths = instantiate_all(expr)
    if len(paths) != 1:
        raise TestbedError(f"expected one derivation, nix-instantiate printed {paths}")
    return paths[0]


# --- processes and the test account -------------------------------------------------------------


def _mount_namespace(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:  # gone, or a zombie
        return None


def _pids_in_namespace(namespace: str) -> list[int]:
    return [
        int(entry.name)
        for entry in os.scandir("/proc")
        if entry.name.isdigit() and _mount_namespace(entry.name) == namespace
    ]


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (T when stopped); "" if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )


def ensure_test_user() -> pwd.struct_passwd:
    """The ``bftest`` account (created if missing), unlocked so sshd accepts it with UsePAM no."""
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        done = _run([
            "useradd", "--system", "--create-home", "--home-dir", f"/var/lib/{TEST_USER}",
            "--shell", "/bin/sh", "--comment", "buildfarm test bed", TEST_USER,
        ])
        try:  # another test bed may have created it at the same moment
            entry = pwd.getpwnam(TEST_USER)
        except KeyError:
            raise TestbedError(f"useradd {TEST_USER} failed: {done.stderr.strip()}") from None
    if _shadow_password(TEST_USER) != "*":
        done = _run(["usermod", "-p", "*", TEST_USER])
        if done.returncode != 0:
            raise TestbedError(f"usermod -p '*' {TEST_USER} failed: {done.stderr.strip()}")
    home = Path(entry.pw_dir)
    if not home.is_dir():
        home.mkdir(mode=0o755, parents=True)
        os.chown(home, entry.pw_uid, entry.pw_gid)
    return entry


def _shadow_password(user: str) -> str | None:
    with open("/etc/shadow", encoding="utf-8") as shadow:
        for line in shadow:
            fields = line.split(":")
            if fields[0] == user and len(fields) > 1:
                return fields[1]
    return None


def _keygen(path: Path, comment: str) -> str:
    """Make an unencrypted ed25519 key pair at ``path``; return the public key line."""
    done = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    if done.returncode != 0:
        raise TestbedError(f"ssh-keygen failed: {done.stderr.strip()}")
    return path.with_name(path.name + ".pub").read_text(encoding="utf-8").strip()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


_SSHD_ACCEPTS: dict[str, bool] = {}


def _sshd_accepts(option: str, host_key: Path) -> bool:
    """Whether this sshd knows ``option`` (PerSourcePenalties exists from OpenSSH 9.8 on).

    Only a complaint that names the option counts as "no": should ``sshd -t`` fail for another
    reason, keeping the option makes the real start fail loudly instead of silently dropping it.
    """
    if option not in _SSHD_ACCEPTS:
        with tempfile.NamedTemporaryFile("w", suffix=".conf") as config:
            config.write(f"HostKey {host_key}\nPidFile none\n{option}\n")
            config.flush()
            done = _run([SSHD, "-t", "-f", config.name])
        _SSHD_ACCEPTS[option] = done.returncode == 0 or option.split()[0] not in done.stderr
    return _SSHD_ACCEPTS[option]


def _write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text, encoding="utf-8")
    temporary.chmod(mode)
    temporary.replace(path)


# --- hosts --------------------------------------------------------------------------------------


class Host:
    """One throwaway build machine: an sshd with a private /nix, reachable as bftest@127.0.0.1."""

    __test__ = False
    address = LOOPBACK
    user = TEST_USER

    def __init__(
        self, testbed: Testbed, name: str, env: Mapping[str, str] | None = None,
        sftp: str = "internal-sftp",
    ) -> None:
        self.testbed = testbed
        self.name = name
        self.sftp = sftp  # sshd's SFTP subsystem: its own, or a program
        # sshd SetEnv of this host only, over the test bed's (e.g. PATH for the guix emulator).
        self.env: dict[str, str] = dict(env or {})
        self.store = "nix"  # what its `store:` in an inventory is ("guix" for add_guix_host)
        self.guix_public_key: str | None = None  # a guix host's signing-key.pub
        self.directory = testbed.directory / name
        self.directory.mkdir(mode=0o755)
        self.host_key = self.directory / "ssh_host_ed25519_key"
        self.host_key_line = _keygen(self.host_key, f"{name}@buildfarm-testbed")
        # Single-user Nix as bftest: it must own its /nix (and gets a home of its own).
        for path in (self.nix_dir, self.store_dir, self.nix_dir / "var",
                     self.nix_dir / "var" / "nix", self.home_dir):
            path.mkdir()
            path.chmod(0o755)
            os.chown(path, testbed.account.pw_uid, testbed.account.pw_gid)
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._namespace: str | None = None
        self._load_namespace: str | None = None  # where /proc/loadavg is ours (set_load)

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address}:{self.port} pid={self.pid}>"

    # where things are, on the coordinator side
    @property
    def nix_dir(self) -> Path:
        """This host's /nix, as the test process sees it (its store is ``nix_dir / "store"``)."""
        return self.directory / "nix"

    @property
    def store_dir(self) -> Path:
        return self.nix_dir / "store"

    @property
    def home_dir(self) -> Path:
        return self.directory / "home"

    @property
    def log_path(self) -> Path:
        """sshd's own log (-e): connections, authentication failures, start-up errors."""
        return self.directory / "sshd.log"

    @property
    def client_key(self) -> Path:
        return self.testbed.client_key

    @property
    def known_hosts(self) -> Path:
        return self.testbed.known_hosts

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def guix_dir(self) -> Path:
        """A guix host's GUIX_CONFIGURATION_DIRECTORY (signing key pair, acl)."""
        return self.directory / "guix"

    def set_load(self, load: float) -> None:
        """What /proc/loadavg says on this host from now on: `load` as its 1-minute load
        average. The kernel's is the same for every host of the test bed; this gives the host
        its own, a file bind-mounted over it in the host's mount namespace (as lxcfs gives
        each container its own). Written in place at a fixed width, so no reader sees it
        empty."""
        if self.pid is None or self._namespace is None:
            raise TestbedError(f"{self.name} is not running")
        path = self.directory / "loadavg"
        handle = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(handle, f"{load:8.2f} 0.00 0.00 1/100 1\n".encode(), 0)
        finally:
            os.close(handle)
        if self._load_namespace != self._namespace:
            # --root: entering a mount namespace sets the root to the namespace's own, which
            # is not ours when the test bed runs in a chroot (a fresh machine's, say).
            done = _run(["nsenter", f"--target={self.pid}", "--mount", "--root", "--",
                         "mount", "--bind", str(path), "/proc/loadavg"])
            if done.returncode != 0:
                raise TestbedError(f"{self.name}: cannot set its load: {done.stderr.strip()}")
            self._load_namespace = self._namespace

    def authorize_guix_keys(self, keys: Sequence[str]) -> None:
        """Make the guix host's ACL authorize exactly ``keys`` (public-key s-expressions, as
        `buildfarm key show --format guix` prints them): `guix archive --authorize` of each,
        over an empty ACL."""
        _write_atomically(self.guix_dir / "acl", "(acl)\n", 0o644)
        for key in keys:
            self.guix_as_root("archive", "--authorize", stdin=key.encode())
        self._give_guix_files()

    def guix_daemon(self, running: bool) -> None:
        """Start or stop the emulated Guix daemon: its socket is there, or not."""
        socket = self.nix_dir / "var" / "nix" / "daemon-socket" / "socket"
        socket.parent.mkdir(mode=0o755, exist_ok=True)
        if running:
            socket.touch()
        else:
            socket.unlink(missing_ok=True)

    def guix_as_root(self, *args: str, stdin: bytes = b"") -> None:
        """Run the emulator on this host's configuration directory, as the test process."""
        guix = self.testbed.guix_bin_dir() / "guix"
        env = {**os.environ, "GUIX_CONFIGURATION_DIRECTORY": str(self.guix_dir)}
        done = subprocess.run([str(guix), *args], input=stdin, env=env, capture_output=True,
                              check=False)
        if done.returncode != 0:
            raise TestbedError(f"guix {' '.join(args)}: {done.stderr.decode(errors='replace')}")

    def _give_guix_files(self) -> None:
        for path in self.guix_dir.iterdir():
            os.chown(path, self.testbed.account.pw_uid, self.testbed.account.pw_gid)

    def local_path(self, store_path: str) -> Path:
        """Where the host's ``/nix/store/...`` path is, seen from the test process."""
        if not store_path.startswith("/nix/"):
            raise ValueError(f"not a /nix path: {store_path}")
        return self.nix_dir / store_path.removeprefix("/nix/")

    def known_hosts_line(self) -> str:
        return f"[{self.address}]:{self.port} {self.host_key_line}"

    # talking to it
    def connect_options(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for ``asyncssh.connect`` (host key checking on, no ~/.ssh use)."""
        options: dict[str, Any] = {
            "host": self.address,
            "port": self._require_port(),
            "username": self.user,
            "client_keys": [str(self.client_key)],
            "known_hosts": str(self.known_hosts),
            "agent_path": None,
            "config": [],
        }
        options.update(overrides)
        return options

    def ssh_argv(self) -> list[str]:
        """An OpenSSH client command line up to the remote command (append one string)."""
        return [
            "ssh", "-F", "/dev/null", "-p", str(self._require_port()),
            "-i", str(self.client_key),
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR", f"{self.user}@{self.address}",
        ]

    def run(
        self, command: str, *, input: bytes | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a shell command on the host over ssh (for setting up or checking a test)."""
        done = subprocess.run(
            [*self.ssh_argv(), command], input=input, capture_output=True, timeout=timeout,
            check=False, stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise TestbedError(
                f"{self.name}: `{command}` exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()}"
            )
        return done

    # its life
    def start(self) -> None:
        """Start sshd (again: same port, same host key, same store). No-op if running."""
        if self.running:
            return
        self.process = None
        fixed_port = self.port
        for _attempt in range(1 if fixed_port is not None else 8):
            port = fixed_port if fixed_port is not None else _free_port()
            outcome = self._spawn(port)
            if outcome is None:
                self.port = port
                self.testbed._write_known_hosts()
                return
            if fixed_port is not None or not any(m in outcome for m in _BIND_FAILURES):
                break
        raise TestbedError(f"{self.name}: sshd did not start:\n{outcome}")

    def stop(self) -> None:
        """Shut the machine down: sshd, its connections and whatever they run. Idempotent."""
        if self.process is None:
            return
        if self.paused:
            self.resume()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._kill_namespace()
        self.process = None

    def kill(self) -> None:
        """Crash the machine: SIGKILL sshd and every process it started, at once."""
        if self.process is None:
            return
        self._kill_namespace()
        self.process.wait()
        self.process = None
        self.paused = False

    def pause(self) -> None:
        """Freeze the machine (SIGSTOP to all its processes): connections hang, nothing fails."""
        if not self.running:
            raise TestbedError(f"{self.name} is not running")
        self.paused = True
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:  # wait until every process is stopped, and catch any that forked meanwhile
            running = [pid for pid in self.members() if process_state(pid) not in "Tt"]
            if not running:
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"{self.name}: processes {running} do not stop")
            _signal_all(running, signal.SIGSTOP)
            time.sleep(0.002)

    def resume(self) -> None:
        """Undo pause() (SIGCONT)."""
        if self.process is not None:
            _signal_all(self.members(), signal.SIGCONT)
        self.paused = False

    def _require_port(self) -> int:
        if self.port is None:
            raise TestbedError(f"{self.name} was never started: it has no port yet")
        return self.port

    def members(self) -> list[int]:
        """PIDs of every process this host runs now (sshd, its connections, their commands)."""
        if self._namespace is None:
            return []
        return _pids_in_namespace(self._namespace)

    def _kill_namespace(self) -> None:
        for _ in range(500):
            pids = self.members()
            if not pids:
                return
            _signal_all(pids, signal.SIGKILL)
            time.sleep(0.01)
        raise TestbedError(f"{self.name}: processes {self.members()} survive SIGKILL")

    def _write_config(self, port: int) -> Path:
        bed = self.testbed
        environment = {**bed.env, **self.env}
        setenv = " ".join(f'"{key}={value}"' for key, value in environment.items())
        lines = [
            f"ListenAddress {self.address}:{port}",
            f"HostKey {self.host_key}",
            "PidFile none",
            f"AuthorizedKeysFile {bed.authorized_keys_dir}/%u",
            f"AllowUsers {self.user}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin no",
            "MaxSessions 64",
            "MaxStartups 200",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowAgentForwarding no",
            "AllowTcpForwarding no",
            f"Subsystem sftp {self.sftp}",
            f"SetEnv {setenv}",
            "LogLevel INFO",
        ]
        # OpenSSH >= 9.8 refuses a source address for a while after failed or unauthenticated
        # connections; fault tests make plenty of those, all from 127.0.0.1.
        if _sshd_accepts("PerSourcePenalties no", self.host_key):
            lines.append("PerSourcePenalties no")
        path = self.directory / "sshd_config"
        _write_atomically(path, "\n".join(lines) + "\n")
        return path

    def _spawn(self, port: int) -> str | None:
        """Start sshd on ``port``; None once it listens, else what went wrong (its log)."""
        config = self._write_config(port)
        home = self.testbed.account.pw_dir
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            process = subprocess.Popen(
                [
                    "unshare", "--mount", "--propagation", "private",
                    "/bin/sh", "-c", _HOST_SCRIPT, "sh",
                    str(self.nix_dir), str(self.home_dir), home, SSHD, str(config),
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = self._log_since(offset)
            if "Server listening on" in text and process.poll() is None:
                break
            if process.poll() is not None:
                return text or f"exit status {process.returncode}"
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                return text + f"\n(not listening after {START_TIMEOUT:.0f} s)"
            time.sleep(0.005)
        namespace = _mount_namespace(process.pid)
        if namespace is None or namespace == _mount_namespace("self"):
            process.kill()
            process.wait()
            return f"sshd is not in a mount namespace of its own ({namespace})"
        self.process = process
        self._namespace = namespace
        self.paused = False
        return None

    def _log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


class Testbed:
    """A set of hosts sharing one client key, known_hosts file and test nix.conf."""

    __test__ = False

    def __init__(self, parent: Path | None = None, *, env: Mapping[str, str] | None = None):
        problem = testbed_problem()
        if problem is not None:
            raise TestbedError(problem)
        self.account = ensure_test_user()
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        # Everything here must be readable by bftest (sshd reads authorized keys as that user).
        self.directory = Path(tempfile.mkdtemp(prefix="testbed-", dir=parent))
        self.directory.chmod(0o755)
        self.hosts: list[Host] = []
        self.client_key = self.directory / "client_ed25519"
        self.client_key_line = _keygen(self.client_key, "buildfarm-testbed-client")
        self.authorized_keys_dir = self.directory / "authorized_keys"
        self.authorized_keys_dir.mkdir(mode=0o755)
        _write_atomically(self.authorized_keys_dir / TEST_USER, self.client_key_line + "\n")
        self.known_hosts = self.directory / "known_hosts"
        _write_atomically(self.known_hosts, "")
        self.nix_conf_dir = self.directory / "nix-conf"
        self.nix_conf_dir.mkdir(mode=0o755)
        _write_atomically(self.nix_conf_dir / "nix.conf", NIX_CONF)
        self.env = {"NIX_CONF_DIR": str(self.nix_conf_dir), **(env or {})}

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def add_host(
        self, name: str | None = None, *, start: bool = True, env: Mapping[str, str] | None = None,
        sftp: str = "internal-sftp",
    ) -> Host:
        """A new host with an empty store (started unless ``start=False``); ``env`` adds
        variables to its commands' environment (sshd SetEnv, over the test bed's); ``sftp`` is
        its SFTP subsystem (e.g. a script that runs /usr/lib/openssh/sftp-server)."""
        host = Host(self, name or f"host{len(self.hosts) + 1}", env, sftp)
        self.hosts.append(host)
        if start:
            host.start()
        return host

    def add_guix_host(
        self, name: str | None = None, *, authorized: Sequence[str] = (), start: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> Host:
        """A new host whose ``guix`` is the emulator (tests/guix_emulator) over its private
        Nix store: its own Guix signing key pair, made by `guix archive --generate-key`
        (``host.guix_public_key``), and an ACL authorizing the public keys ``authorized``
        (e.g. the coordinator's), in ``host.guix_dir``; its daemon's state is the Nix store's
        (GUIX_STATE_DIRECTORY=/nix/var/nix: gc.lock, gcroots, profiles), and it runs
        (``host.guix_daemon(False)`` stops it). ``env`` adds to its commands' environment.
        """
        host = self.add_host(name, start=False, env={
            "PATH": f"{self.guix_bin_dir()}:/usr/local/bin:/usr/bin:/bin", **(env or {}),
        })
        host.store = "guix"
        host.env["GUIX_CONFIGURATION_DIRECTORY"] = str(host.guix_dir)
        host.env["GUIX_STATE_DIRECTORY"] = "/nix/var/nix"
        host.guix_daemon(True)
        host.guix_dir.mkdir(mode=0o755)
        os.chown(host.guix_dir, self.account.pw_uid, self.account.pw_gid)
        host.guix_as_root("archive", "--generate-key")
        host.guix_public_key = (host.guix_dir / "signing-key.pub").read_text()
        host.authorize_guix_keys(authorized)
        if start:
            host.start()
        return host

    def guix_bin_dir(self) -> Path:
        """A directory holding the emulator's ``guix`` (installed on first use).

        The emulator's sources are copied into the test bed's directory, which bftest can read
        (the repository and the virtualenv may not be), and compiled there.
        """
        root = self.directory / "guix-emulator"
        bin_dir = root / "bin"
        if not (bin_dir / "guix").exists():
            source = copy_sources(root / "source")
            done = _run([GUIX_PYTHON, "-m", "compileall", "-q", str(source)])
            if done.returncode != 0:
                raise TestbedError(f"cannot compile the guix emulator: {done.stdout.strip()}")
            for path in source.rglob("*.pyc"):
                path.chmod(0o644)
            install_emulator(bin_dir, python=GUIX_PYTHON, root=source)
            root.chmod(0o755)
        return bin_dir

    def add_hosts(self, count: int) -> list[Host]:
        return [self.add_host() for _ in range(count)]

    def remove_host(self, host: Host) -> None:
        """Stop ``host`` and delete its directory (store included)."""
        host.stop()
        self.hosts.remove(host)
        self._write_known_hosts()
        shutil.rmtree(host.directory, ignore_errors=True)

    def ensure_running(self) -> None:
        """Bring every host back up after a test stopped, killed or paused it."""
        for host in self.hosts:
            if host.paused:
                host.resume()
            if not host.running:
                host.stop()  # reap what is left of a crashed sshd
                host.start()

    def close(self) -> None:
        """Stop every host and remove the test bed's directory."""
        errors = []
        for host in self.hosts:
            try:
                host.stop()
            except TestbedError as error:
                errors.append(str(error))
        shutil.rmtree(self.directory, ignore_errors=True)
        if errors:
            raise TestbedError("; ".join(errors))

    def inventory_yaml(
        self, hosts: Sequence[Host] | None = None, store: str = "nix", **machine_overrides: Any
    ) -> str:
        """A buildfarm inventory for ``hosts`` (default: all); see ``inventory_yaml()``."""
        return inventory_yaml(self.hosts if hosts is None else hosts, store, **machine_overrides)

    def write_inventory(
        self, path: Path, hosts: Sequence[Host] | None = None, store: str = "nix",
        **machine_overrides: Any,
    ) -> Path:
        path.write_text(self.inventory_yaml(hosts, store, **machine_overrides), encoding="utf-8")
        return path

    def _write_known_hosts(self) -> None:
        lines = [h.known_hosts_line() + "\n" for h in self.hosts if h.port is not None]
        _write_atomically(self.known_hosts, "".join(lines))


def inventory_yaml(hosts: Sequence[Host], store: str = "nix", **machine_overrides: Any) -> str:
    """The YAML inventory buildfarm reads, one machine per host.

    ``machine_overrides`` apply to every machine (e.g. ``max_builds=1``); an override of None
    drops that field (e.g. ``known_hosts=None`` to test ``host_key`` pinning instead).
    """
    machines = []
    for host in hosts:
        machine: dict[str, Any] = {
            "name": host.name,
            "host": host.address,
            "port": host._require_port(),
            "user": host.user,
            "identity": str(host.client_key),
            "known_hosts": str(host.known_hosts),
            "systems": [current_system()],
            "max_builds": 2,
            "store": store,
            # Every host's store is a Nix store, under a guix emulator too.
            "store_dir": "/nix/store" if store == "guix" else None,
        }
        machine.update(machine_overrides)
        machines.append({key: value for key, value in machine.items() if value is not None})
    return yaml.dump({"machines": machines}, Dumper=_InventoryDumper, sort_keys=False)


class _InventoryDumper(yaml.SafeDumper):
    """Indents list items under their key, as inventory.example.yaml does."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        del indentless
        super().increase_indent(flow, False)
