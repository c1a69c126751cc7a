"""Option types whose bad values are user mistakes: one line and exit status 1 (a UsageError),
like a bad tag or date, never a traceback from a number too large for the datastore or a
byte that is not UTF-8. Each range is documented in the option's help."""

from __future__ import annotations

import math
from typing import Any

import click

from buildfarm.errors import UsageError
from buildfarm.submission import check_text

# The datastore keeps a priority in a 32-bit integer column (PostgreSQL's INTEGER).
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
DAY = 86400.0


def _show(value: Any) -> str:
    """A rejected value, quoted and escaped (repr), cut short."""
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _name(param: click.Parameter | None) -> str:
    if param is None:
        return "the value"
    if isinstance(param, click.Option):
        return max(param.opts, key=len)
    return (param.name or "value").upper()


# click.ParamType is generic from click 8.2 on; 8.1, still supported, cannot be subscripted.
class Integer(click.ParamType):  # type: ignore[type-arg]
    """A whole number from `low` to `high`."""

    name = "integer"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number = value if isinstance(value, int) else int(str(value).strip(), 10)
        except ValueError:
            number = None
        if number is None or isinstance(number, bool) or not self.low <= number <= self.high:
            raise UsageError(f"{_name(param)} must be a whole number from {self.low} to "
                             f"{self.high}, not {_show(value)}")
        return number


class Seconds(click.ParamType):  # type: ignore[type-arg]
    """A number of seconds from `low` to `high` (finite)."""

    name = "seconds"

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not self.low <= number <= self.high:  # false for NaN too
            raise UsageError(f"{_name(param)} must be a number of seconds from {self.low:g} to "
                             f"{self.high:g}, not {_show(value)}")
        return number


class Text(click.ParamType):  # type: ignore[type-arg]
    """One line of text: valid UTF-8, no control character."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return check_text(str(value), _name(param))


PRIORITY = Integer(PRIORITY_MIN, PRIORITY_MAX)
COUNT = Integer(1, PRIORITY_MAX)  # --limit: as many as a 32-bit count holds
WORKERS = Integer(1, 1024)
RETRIES = Integer(0, 100)  # submit --retries (the inventory's build_retries has the same range)
TEXT = Text()
