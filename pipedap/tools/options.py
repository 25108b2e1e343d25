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


def rate(text: str) -> str:
    """A link rate like 500mbit, 10gbit or 1.25GB/s (kept as written; parse with units.parse_bandwidth)."""
    try:
        ok = units.parse_bandwidth(text) > 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected a rate > 0 like 500mbit, 10gbit or 1.25GB/s, got {text!r}")
    return text


def duration(text: str) -> str:
    """A duration like 50us, 1ms or 0.1s (kept as written; parse with units.parse_duration)."""
    try:
        ok = units.parse_duration(text) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected a duration >= 0 like 50us, 1ms or 0.1s, got {text!r}")
    return text


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"expected an existing file, got {text!r} (not found)")
    return text
