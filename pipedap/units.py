"""Quantities users type: link rates ("500mbit"), durations ("50us") and byte sizes ("64k").

One place parses them (and formats durations back for ``tc``), so the planner, the testbed,
the settings and the benchmarks agree on spellings and error messages. A bad value raises
``ValueError`` naming the value and showing how to write one.

Rates are decimal (``1gbit`` = 1e9 bits/s, ``1MB/s`` = 1e6 bytes/s, as ``tc`` and networks count);
sizes are binary (``64k`` = 65536 bytes, ``16m`` = 16 MiB, as buffers are counted).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_BANDWIDTH_UNITS = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "bps": 1 / 8, "kbps": 1e3 / 8, "mbps": 1e6 / 8, "gbps": 1e9 / 8,
    "b/s": 1, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9,
}
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
}
_QUANTITY = re.compile(r"\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*")


def parse_bandwidth(text: str) -> float:
    """Bytes per second from "10gbit", "100mbit", "1.25GB/s" (bits: *bit, *bps; bytes: *B/s)."""
    return _parse_quantity(text, _BANDWIDTH_UNITS, "bandwidth", "10gbit, 500mbit or 1.25GB/s")


def parse_rate_bps(text: str) -> float:
    """Bits per second from a tc-style rate such as "500mbit" (any spelling :func:`parse_bandwidth` takes)."""
    return parse_bandwidth(text) * 8


def parse_duration(text: str) -> float:
    """Seconds from "50us", "1.5ms", "0.2s" or "100ns"."""
    return _parse_quantity(text, _DURATION_UNITS, "duration", "50us, 1ms or 0.1s")


def parse_size(text: str) -> int:
    """Bytes from "4", "64k", "16m", "1g" or "1.5MB" (binary units: k = 1024)."""
    return int(_parse_quantity(text, _SIZE_UNITS, "size", "4096, 64k, 16m or 1g"))


def format_duration(seconds: float) -> str:
    """`seconds` in the largest unit that keeps it at 1 or more ("20ms", "50us"); parse_duration reads it back."""
    for unit in ("s", "ms", "us"):
        if seconds >= _DURATION_UNITS[unit]:
            return f"{seconds / _DURATION_UNITS[unit]:g}{unit}"
    return f"{seconds / _DURATION_UNITS['ns']:g}ns"


def _parse_quantity(text: str, units: Mapping[str, float], what: str, examples: str) -> float:
    match = _QUANTITY.fullmatch(text)
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"cannot parse {what} {text!r}; write it like {examples}")
    try:
        value = float(match.group(1))
    except ValueError:  # "1.2.3"
        raise ValueError(f"cannot parse {what} {text!r}; write it like {examples}") from None
    return value * units[match.group(2).lower()]
