"""argparse ``type=`` checkers whose errors name what is accepted.

argparse prefixes the option (``argument --workers: expected an integer >= 1, got '0'``), so
every bad value is reported with the option, the value and what the option accepts, the way
pipedap.settings reports a bad variable.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from pipedap import units


def integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def seconds(text: str) -> float:
    """A number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A slow-down like 0.3 or 30% (>= 0)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 like 0.3 or 30%, got {text!r}")
    return value


def _quantity(parse: Callable[[str], float], accepted: str, *, zero_ok: bool) -> Callable[[str], str]:
    """A checker of text that ``parse`` reads as a number > 0 (or >= 0); the text is kept as written."""
    def check(text: str) -> str:
        try:
            value = parse(text)
            ok = value >= 0 if zero_ok else value > 0
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return text
    return check


rate = _quantity(units.parse_bandwidth, "a rate > 0 like 500mbit, 10gbit or 1.25GB/s", zero_ok=False)
duration = _quantity(units.parse_duration, "a duration >= 0 like 50us, 1ms or 0.1s", zero_ok=True)


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"expected an existing file, got {text!r} (not found)")
    return text
