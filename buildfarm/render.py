"""Output for people (rich tables on a terminal, plain aligned text elsewhere) and for scripts,
and the text a display may show of what others wrote (build logs, machines' messages)."""

from __future__ import annotations

import codecs
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Styles = Mapping[str, Callable[[Any], str | None]]
"""Column -> the rich style of a value in it (e.g. "green"), used only when colour is on."""

# What would let a value act on a terminal or split a line: the C0 controls (newline and tab
# too), DEL, the C1 controls, and Unicode's line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` safe on one line of a terminal or of a line-oriented format: each character
    `_UNSAFE` matches is written as its escape (\\n, \\t, \\x1b, \\u2028), so that what a
    submitter or a machine wrote can neither drive the terminal nor forge a line."""
    return _UNSAFE.sub(lambda m: repr(m[0])[1:-1], text)


# What no display shows of a text it did not write (ECMA-48): control sequences (CSI, 7- or
# 8-bit), strings (OSC, DCS, SOS, PM, APC: to their terminator, BEL or ST, or to the end),
# the other escape sequences, and every other control character but newline and tab. A log
# keeps its bytes; only what is shown of it is plain.
_SEQUENCES = (
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d-\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]"
)
_CONTROLS = re.compile(_SEQUENCES + r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# A sequence a chunk boundary may have cut: held back until the next chunk completes it.
_UNFINISHED = re.compile(
    r"(?:(?:\x1b\[|\x9b)[0-?]*[ -/]*"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d-\x9f])[^\x07\x1b\x9c]*\x1b?"
    r"|\x1b[ -/]*)\Z"
)
HOLD_LIMIT = 4096  # characters of an unfinished sequence held back at most


def plain(text: str) -> str:
    """`text` without escape sequences and control characters (but newline and tab)."""
    return _CONTROLS.sub("", text)


class PlainText:
    """A log's bytes, chunk by chunk, as plain text: decoded as UTF-8 (bad bytes replaced),
    without what plain() removes, even when a chunk ends inside a sequence."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""

    def feed(self, data: bytes, final: bool = False) -> str:
        """The plain text of `data` and what was held back before it; `final`: nothing
        follows, so an unfinished sequence at the end is dropped, not held."""
        text = self._held + self._decoder.decode(data, final)
        self._held = ""
        cut = _UNFINISHED.search(text)
        if cut is not None and (final or len(text) - cut.start() <= HOLD_LIMIT):
            text, self._held = text[: cut.start()], "" if final else text[cut.start():]
        return plain(text)

    @property
    def pending(self) -> int:
        """Bytes fed but not yet returned (held back, or a character not yet complete)."""
        return len(self._decoder.getstate()[0]) + len(self._held.encode("utf-8", "replace"))


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, ensure_ascii=False)
    sys.stdout.write("\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        text = " ".join(f"{k}={v}" for k, v in value.items())
    elif isinstance(value, list | tuple):
        text = " ".join(str(v) for v in value)
    else:
        text = str(value)
    return one_line(text)


def use_colour() -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set to anything (no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def print_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], styles: Styles | None = None
) -> None:
    """A rich table on a terminal; tab-separated lines with a header elsewhere (for grep/cut).
    Cells are text, never rich markup, and one line each (`one_line`)."""
    if not sys.stdout.isatty():
        print("\t".join(c.upper() for c in columns))
        for row in rows:
            print("\t".join(_cell(row.get(c)) for c in columns))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    colour = use_colour()
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column.upper().replace("_", " "), overflow="fold")
    for row in rows:
        cells = []
        for column in columns:
            style = (styles or {}).get(column)
            chosen = style(row.get(column)) if style is not None and colour else None
            cells.append(Text(_cell(row.get(column)), style=chosen or ""))
        table.add_row(*cells)
    Console(no_color=not colour, highlight=False).print(table)


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        print(f"{key + ':':<{width + 1}} {_cell(value)}")
