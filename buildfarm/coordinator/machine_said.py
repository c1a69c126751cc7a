"""What a machine said, read for people: the telling line of a store command's error output,
which program said it, where a download came from, what to do about an import it refused."""

from __future__ import annotations

from collections.abc import Sequence

from buildfarm.backends import Command


def program(command: Command) -> str:
    """A command's program and subcommand, e.g. "guix archive" (past `env VAR=VALUE`)."""
    words = [w for w in command.argv if w != "env" and "=" not in w]
    return " ".join(words[:2]) if words[:1] == ["guix"] else (words or ["?"])[0]


def import_problem(what: str, error: str) -> str:
    problem = f"{what} could not be imported: {error}"
    if "unauthorized public key" in error:
        problem += ("; the machine does not authorize the coordinator's key: see `buildfarm "
                    "machines test` for where to authorize it")
    return problem


def server_of(url: str | None, servers: Sequence[str]) -> str:
    """Which of `servers` a nar URL (or a server's own URL) belongs to: the longest prefix."""
    if url is not None:
        matches = [s for s in servers if url.rstrip("/").startswith(s.rstrip("/"))]
        if matches:
            return max(matches, key=len)
    return servers[0] if len(servers) == 1 else "a substitute server"


def first_error(stderr: bytes) -> str:
    """The telling part of a store command's stderr: its last error line with the lines that
    continue it (Guix prints keys and signatures over several lines), else its last line."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        if "error:" in lines[index]:
            return " ".join(lines[index:])[:1000]
    return lines[-1][:1000] if lines else "no message"
