"""What every emulated command shares: Guix's error exits and its command-line parser.

Guix parses options with Guile's SRFI-37 `args-fold` ([37] Guile's srfi-37.scm) wrapped by
[SC] guix/scripts.scm `parse-command-line`; its errors are [UI] guix/ui.scm's `leave`.  Among
the quirks kept: a long option's argument must be attached (`--timeout=5`; `--timeout 5` is
"Missing required argument"), and operands come back last one first (`alist-cons`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

VERSION = "1.4.0"
STORE = os.environ.get("NIX_STORE_DIR", "/nix/store")


class Leave(Exception):
    """[UI] `leave`: "guix CMD: error: MESSAGE" on stderr and exit status 1."""


class NotEmulated(Exception):
    """A real Guix feature this double does not implement (exit status 2)."""


def say(text: str) -> None:
    """Write to stderr at once, as Guix's line-buffered error port does."""
    sys.stderr.write(text)
    sys.stderr.flush()


def config_dir() -> str:
    """The daemon's configuration directory (`settings.nixConfDir`)."""
    return os.environ.get("GUIX_CONFIGURATION_DIRECTORY", "/etc/guix")


def state_dir() -> str | None:
    """guix/config.scm %state-directory (GUIX_STATE_DIRECTORY, else /var/guix), when set.

    Emulator detail: on an emulated machine the test bed sets it to the Nix store's own state
    directory (the same layout: gc.lock, temproots, gcroots, profiles); unset, the emulator
    has no daemon state of its own, and the daemon is taken to be up, its GC lock free."""
    return os.environ.get("GUIX_STATE_DIRECTORY")


def show_version(command: str) -> int:
    # [UI] show-version-and-exit
    sys.stdout.write(
        f"{command} (GNU Guix) {VERSION}\nCopyright (C) 2022 the Guix authors\n"
        "License GPLv3+: GNU GPL version 3 or later <http://gnu.org/licenses/gpl.html>\n"
        "This is free software: you are free to change and redistribute it.\n"
        "There is NO WARRANTY, to the extent permitted by law.\n")
    return 0


NONE, REQUIRED, OPTIONAL = 0, 1, 2
Check = Callable[[str, str], object]


@dataclass(frozen=True)
class Opt:
    """One SRFI-37 `option`: its names, what it records, and whether it takes an argument."""

    names: tuple[str, ...]  # one-character names are short options
    key: str
    arg: int = NONE
    check: Check | None = None  # converts the argument, or leaves (called while parsing)


def number(name: str, value: str) -> int:
    try:  # [UI] string->number*
        return int(value)
    except ValueError:
        raise Leave(f"{value}: invalid number") from None


def count(name: str, value: str) -> int:
    try:  # [B] %standard-build-options, -c/-M
        return int(value)
    except ValueError:
        raise Leave(f"not a number: '{name}' option argument: {value}") from None


@dataclass
class Parsed:
    """The options seen, in command-line order, and the operands."""

    options: list[tuple[str, object, str]] = field(default_factory=list)  # key, value, name
    operands: list[str] = field(default_factory=list)

    def last(self, key: str, default: object = None) -> object:
        found = [value for k, value, _ in self.options if k == key]
        return found[-1] if found else default

    def has(self, key: str) -> bool:
        return any(k == key for k, _, _ in self.options)


def parse_args(argv: Sequence[str], options: Sequence[Opt], into: Parsed | None = None) -> Parsed:
    """[37] args-fold: short options grouped (-nq), long ones as --name or --name=VALUE."""
    result = into or Parsed()
    short = {n: o for o in options for n in o.names if len(n) == 1}
    long = {n: o for o in options for n in o.names if len(n) > 1}

    def take(opt: Opt, name: str, value: str | None) -> None:
        if opt.key == "not-emulated":
            dashes = "-" if len(name) == 1 else "--"
            raise NotEmulated(f"option '{dashes}{name}' is not emulated")
        converted = opt.check(name, value) if opt.check and value is not None else value
        result.options.append((opt.key, converted, name))

    def unrecognized(name: str) -> NoReturn:
        raise Leave(f"{name}: unrecognized option")  # [SC] parse-command-line (hint omitted)

    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            result.operands.append(arg)
        elif arg == "--":
            result.operands.extend(argv[i:])
            break
        elif arg.startswith("--"):
            start = 2  # [37] long-option: a name may contain '=', try each one in turn
            while True:
                index = arg.find("=", start)
                name = arg[2:index] if index >= 0 else arg[2:]
                opt = long.get(name)
                if opt is not None:
                    break
                if index < 0:
                    unrecognized(name)
                start = index + 1
            value = arg[index + 1:] if index >= 0 else None
            if opt.arg == REQUIRED and value is None:  # [37] + [SC] args-fold*: no "--x VALUE"
                raise Leave(f"invalid argument: Missing required argument after `--{name}'")
            if opt.arg == NONE and value is not None:
                raise Leave(f"invalid argument: Extraneous argument after `--{name}'")
            take(opt, name, value)
        else:
            position = 1
            while position < len(arg):
                char = arg[position]
                found = short.get(char)
                if found is None:
                    unrecognized(char)
                if found.arg == NONE:
                    take(found, char, None)
                    position += 1
                    continue
                if position + 1 < len(arg):
                    value = arg[position + 1:]
                elif i < len(argv):
                    value, i = argv[i], i + 1
                elif found.arg == REQUIRED:
                    raise Leave(f"invalid argument: Missing required argument after `-{char}'")
                else:
                    value = None
                take(found, char, value)
                break
    return result


def unsupported(*specs: tuple[tuple[str, ...], int]) -> tuple[Opt, ...]:
    """Real Guix options this double refuses with NotEmulated: (names, argument kind)."""
    return tuple(Opt(names, "not-emulated", arg) for names, arg in specs)


HELP_VERSION = (Opt(("h", "help"), "help"), Opt(("V", "version"), "version"))
BUILD_OPTIONS = (  # [B] %standard-build-options
    Opt(("K", "keep-failed"), "keep-failed"),
    Opt(("k", "keep-going"), "keep-going"),
    Opt(("rounds",), "rounds", REQUIRED, number),
    Opt(("fallback",), "fallback"),
    Opt(("no-substitutes",), "no-substitutes"),
    Opt(("no-grafts",), "no-grafts"),
    Opt(("no-offload", "no-build-hook"), "no-offload"),
    Opt(("max-silent-time",), "max-silent-time", REQUIRED, number),
    Opt(("timeout",), "timeout", REQUIRED, number),
    Opt(("debug",), "debug", REQUIRED, number),
    Opt(("c", "cores"), "cores", REQUIRED, count),
    Opt(("M", "max-jobs"), "max-jobs", REQUIRED, count),
    Opt(("substitute-urls",), "substitute-urls", REQUIRED),
    *unsupported((("L", "load-path"), REQUIRED),),
)


def parse_command_line(argv: Sequence[str], options: Sequence[Opt], build_options: bool,
                       command: str) -> Parsed:
    """[SC] parse-command-line: GUIX_BUILD_OPTIONS first, then the command line.

    Operands are returned in Guix's alist order, i.e. the last one first (`alist-cons`)."""
    parsed = Parsed()
    if build_options:
        parse_args(os.environ.get("GUIX_BUILD_OPTIONS", "").split(), options, parsed)
    parse_args(argv, options, parsed)
    for _, _, name in parsed.options:
        if name == "no-build-hook":
            from guix_emulator.i18n import G_

            say(f"guix {command}: {G_('warning: ')}'--no-build-hook' is deprecated; use "
                "'--no-offload' instead\n")
    parsed.operands.reverse()
    return parsed
