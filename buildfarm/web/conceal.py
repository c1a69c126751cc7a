"""What the pages and the API say of errors: never how a machine is reached.

The coordinator's messages name a machine's user, address, port, key file and known_hosts file
(buildfarm.ssh.connect: "authentication failed for USER@ADDRESS:PORT; is the public key of
KEYFILE ..."), because its operator needs them at the terminal. The pages are read by anyone the
reverse proxy lets in, so before they show a machine's last error or an attempt's detail, each
of those is replaced by "(hidden)": the inventory's own values, and whatever else has the shape
of one (USER@HOST, an address, a host name, a file outside the store).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from buildfarm.inventory import Inventory

HIDDEN = "(hidden)"
# Keys of the pages' data whose text comes from such messages.
CONCEALED_KEYS = frozenset({"last_error", "detail"})
_STOP = r"\s;,()'\"<>"
# A store path stays (it says what was missing, not how the machine is reached).
_STORE_PATH = re.compile(r"(?:/[^/\s]+)+/[0-9a-df-np-sv-z]{32}-[^\s;,()'\"]*\Z")
_USER_AT_HOST = re.compile(rf"[^{_STOP}@]+@[^{_STOP}]+")  # USER@HOST[:PORT]
_SHAPES = (
    re.compile(r"\[[0-9A-Fa-f:.%\w]*\](?::\d+)?"),  # [IPv6]:PORT
    re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?(?![\w.])"),  # IPv4[:PORT]
    re.compile(r"(?<![\w./-])[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?::\d+)?"
               r"(?![\w./-])"),  # host.name[:PORT]
    re.compile(r"(?<![\w.-])[A-Za-z][\w.-]*:\d+(?![\d:])"),  # host:PORT
    re.compile(r"(?<=resolve host )[^\s:;,]+"),  # a bare host name
    re.compile(r"-p \d+ [^\s;,()]+"),  # ssh-keyscan -p PORT HOST
)
# A file: / or ~/ or ./ and more, not ending in the punctuation after it.
_PATH = re.compile(rf"(?<![\w.:])(?:~|\.{{1,2}})?/[^{_STOP}]*[^{_STOP}:.]")
_REPEATED = re.compile(rf"{re.escape(HIDDEN)}(?:[:@ ]?{re.escape(HIDDEN)}|:\d+)+")


def _word(value: str) -> str:
    """`value` as a whole word of a message (not a part of a longer one)."""
    before = r"(?<![\w.-])" if value[0].isalnum() else ""
    after = r"(?![\w-])" if value[-1].isalnum() else ""
    return before + re.escape(value) + after


def concealer(inventory: Inventory | None) -> Callable[[str], str]:
    """A function that conceals how the inventory's machines (and any other) are reached; the
    machines' names stay."""
    machines = inventory.machines if inventory is not None else ()
    names = {m.name for m in machines}
    known: set[str] = set()
    for m in machines:  # its user shows only as USER@HOST, a shape below
        known.update(v for v in (m.host, m.identity, m.known_hosts, m.host_key) if v)
        known.update((f":{m.port}", f"-p {m.port}"))
    words = sorted(known - names, key=len, reverse=True)
    exact = re.compile("|".join(map(_word, words))) if words else None

    def hide(match: re.Match[str]) -> str:
        return match[0] if match[0] in names or _STORE_PATH.match(match[0]) else HIDDEN

    def conceal(text: str) -> str:
        text = _USER_AT_HOST.sub(HIDDEN, text)
        if exact is not None:
            text = exact.sub(HIDDEN, text)
        for shape in (_PATH, *_SHAPES):
            text = shape.sub(hide, text)
        return _REPEATED.sub(HIDDEN, text)

    return conceal


def conceal_reach(data: Any, inventory: Inventory | None) -> Any:
    """`data` (what a page or the API shows) with every text under CONCEALED_KEYS concealed."""
    conceal = concealer(inventory)

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: conceal(v) if k in CONCEALED_KEYS and isinstance(v, str) else walk(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(data)
