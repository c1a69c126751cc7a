"""The inventory's fields: for each machine field (and the top-level build_retries) its kind,
limits, example and the check of its text, as the parser in inventory.py reads them and the
inventory man page describes them. Checks return the hint for a bad value, or None; the parser
places it at the value's FILE:LINE:COLUMN."""

from __future__ import annotations

import base64
import binascii
import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SYSTEM_RE = re.compile(r"[a-z0-9_]+-[a-z0-9_]+")
_FEATURE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# A machine tag: submit's tag key, and a value of one printable word (builds keep the tags they
# need as KEY=VALUE words joined by spaces).
TAG_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}")
TAG_VALUE_RE = re.compile(r"[!-~]{1,128}")
_NAME_MAX = 64
_HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-ed448",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_TRANSPORTS = ("ssh", "local")
_MAX_SLOTS = 1024  # max_builds, max_sessions
_DAY = 86400  # connect_timeout, keepalive_interval, answer_timeout
# max_silent_time, timeout: what the stores take (Guix's daemon reads them into an unsigned int,
# Nix's into a time_t), as a signed 32-bit number of seconds (68 years) for both.
_MAX_SECONDS = 2**31 - 1
_STORES = ("guix", "nix")
STORE_DIRS = {"guix": "/gnu/store", "nix": "/nix/store"}  # each store's usual directory


def show(text: str) -> str:
    """A user's text, quoted and cut short, safe inside a one-line message."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _check_name(value: str) -> str | None:
    if not _NAME_RE.fullmatch(value):
        return "use letters, digits, '.', '_' and '-', starting with a letter or digit"
    if len(value) > _NAME_MAX:
        return f"use at most {_NAME_MAX} characters"
    return None


def _check_host(value: str) -> str | None:
    if not value.strip():
        return "write a host name or address, e.g. host: build1.example.org"
    if any(c.isspace() for c in value):
        return "a host name has no spaces"
    if "@" in value:
        return "put the user name in user: and only the host in host:"
    if value.count(":") == 1:
        return "put the port number in port: and only the host in host:"
    if value.startswith("[") or "/" in value:
        return "write a bare host name or address, e.g. host: 2001:db8::1"
    return None


def _check_user(value: str) -> str | None:
    if not value or any(c.isspace() or c in "@:/" for c in value):
        return "write a login name, or remove user: to use the current user or ~/.ssh/config"
    return None


def _check_path(value: str) -> str | None:
    if not value.strip() or "\0" in value:
        return "write a file path, e.g. ~/.ssh/id_ed25519"
    return None


def _check_host_key(value: str) -> str | None:
    example = "write the key as '<type> <base64>', e.g. 'ssh-ed25519 AAAAC3Nza...'"
    parts = value.split()
    if len(parts) < 2:
        return example + " (see ssh-keyscan HOST)"
    if parts[0] not in _HOST_KEY_TYPES:
        if parts[1] in _HOST_KEY_TYPES:
            return "drop the host name in front of the key type"
        close = difflib.get_close_matches(parts[0], _HOST_KEY_TYPES, n=1)
        if close:
            return f"unknown key type {show(parts[0])}; did you mean {close[0]!r}?"
        return f"unknown key type {show(parts[0])}; use one of: " + ", ".join(_HOST_KEY_TYPES)
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return "the key data is not valid base64; " + example
    kind = parts[0].encode()
    if blob[:4] != len(kind).to_bytes(4, "big") or blob[4 : 4 + len(kind)] != kind:
        return f"the key data does not match the type {parts[0]}; copy it from ssh-keyscan"
    return None


def _check_store_dir(value: str) -> str | None:
    segments = value.split("/")
    if (not value.startswith("/") or value == "/" or value.endswith("/")
            or any(s in ("", ".", "..") for s in segments[1:])
            or any(not c.isprintable() or c.isspace() for c in value)):
        return "write an absolute directory without a trailing slash, e.g. store_dir: /gnu/store"
    return None


def _check_url(value: str) -> str | None:
    if re.fullmatch(r"(?:https?|file)://\S+", value):
        return None
    return "write an http://, https:// or file:// URL without spaces, e.g. http://farm:8080"


def _check_system(value: str) -> str | None:
    if SYSTEM_RE.fullmatch(value):
        return None
    return "write a system as arch-kernel, e.g. x86_64-linux or aarch64-linux"


def _check_feature(value: str) -> str | None:
    if _FEATURE_RE.fullmatch(value):
        return None
    return "write a feature as one word, e.g. kvm or big-parallel"


@dataclass(frozen=True, slots=True)
class Field:
    """How to read one machine field: its kind, limits, and an example for hints."""

    kind: str  # "str" | "int" | "float" | "bool" | "list" | "map"
    example: str
    optional: bool = False
    check: Callable[[str], str | None] | None = None  # for "str" and each "list" item
    choices: tuple[str, ...] = ()  # for "str": the only values allowed
    minimum: float | None = None
    exclusive: bool = False  # minimum itself is not allowed
    maximum: int | None = None
    nonempty: bool = False  # for "list"
    in_defaults: bool = True


FIELDS: dict[str, Field] = {
    "name": Field("str", "name: x86-a", check=_check_name, in_defaults=False),
    "host": Field("str", "host: build1.example.org", True, _check_host, in_defaults=False),
    "port": Field("int", "port: 22", minimum=1, maximum=65535),
    "user": Field("str", "user: buildfarm", True, _check_user),
    "identity": Field("str", "identity: ~/.ssh/id_ed25519", True, _check_path),
    "known_hosts": Field("str", "known_hosts: ~/.ssh/known_hosts", True, _check_path),
    "host_key": Field("str", "host_key: 'ssh-ed25519 AAAA...'", True, _check_host_key),
    "transport": Field("str", "transport: ssh", choices=_TRANSPORTS),
    "systems": Field("list", "systems: [x86_64-linux]", check=_check_system, nonempty=True),
    "max_builds": Field("int", "max_builds: 4", minimum=1, maximum=_MAX_SLOTS),
    "features": Field("list", "features: [kvm, big-parallel]", check=_check_feature),
    "tags": Field("map", "tags: {site: paris, gpu: a100}"),
    "speed": Field("float", "speed: 2.0", minimum=0, exclusive=True),
    "store": Field("str", "store: guix", choices=_STORES),
    "store_dir": Field("str", "store_dir: /gnu/store", True, _check_store_dir),
    "overload_threshold": Field("float", "overload_threshold: 0.8", True, minimum=0,
                                 exclusive=True),
    "max_sessions": Field("int", "max_sessions: 8", minimum=1, maximum=_MAX_SLOTS),
    "connect_timeout": Field("float", "connect_timeout: 10", minimum=0, exclusive=True,
                              maximum=_DAY),
    "keepalive_interval": Field("float", "keepalive_interval: 15", minimum=0, maximum=_DAY),
    "answer_timeout": Field("float", "answer_timeout: 120", minimum=0, exclusive=True,
                             maximum=_DAY),
    "max_silent_time": Field("int", "max_silent_time: 3600", True, minimum=1,
                              maximum=_MAX_SECONDS),
    "timeout": Field("int", "timeout: 86400", True, minimum=1, maximum=_MAX_SECONDS),
    "substitute_urls": Field("list", "substitute_urls: [http://farm.example.org:8080]",
                              check=_check_url),
    "enabled": Field("bool", "enabled: true"),
}

PATH_FIELDS = ("identity", "known_hosts")
KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "list": "a list",
    "map": "a mapping",
}
BUILD_RETRIES = Field("int", "build_retries: 2", minimum=0, maximum=100)
