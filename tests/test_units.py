"""Units users type: rates, durations and byte sizes, parsed and formatted in one place."""

from __future__ import annotations

import pytest

from pipedap import units


@pytest.mark.parametrize(
    ("text", "value"),
    [("1gbit", 1.25e8), ("10Gbit", 1.25e9), ("500mbit", 6.25e7), ("1.25GB/s", 1.25e9), ("8bps", 1.0)],
)
def test_parse_bandwidth(text, value):
    assert units.parse_bandwidth(text) == pytest.approx(value)


def test_parse_rate_bps_is_bits():
    assert units.parse_rate_bps("500mbit") == pytest.approx(5e8)
    assert units.parse_rate_bps("1MB/s") == pytest.approx(8e6)


def test_parse_duration_and_errors():
    assert units.parse_duration("50us") == pytest.approx(5e-5)
    assert units.parse_duration("1.5ms") == pytest.approx(1.5e-3)
    with pytest.raises(ValueError, match="cannot parse bandwidth '1 gigabit'"):
        units.parse_bandwidth("1 gigabit")
    with pytest.raises(ValueError, match="write it like 50us"):
        units.parse_duration("fast")
    with pytest.raises(ValueError, match="cannot parse duration '50'"):
        units.parse_duration("50")  # a bare number has no unit


@pytest.mark.parametrize(
    ("text", "value"),
    [("4", 4), ("64k", 64 << 10), ("16m", 16 << 20), ("16MB", 16 << 20), ("1g", 1 << 30), ("1.5k", 1536),
     (" 2MiB ", 2 << 20), ("100b", 100)],
)
def test_parse_size(text, value):
    assert units.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "16x", "1.2.3m", "-4"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="cannot parse size"):
        units.parse_size(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.02, "20ms"), (5e-5, "50us"), (2.0, "2s"), (1.5e-3, "1.5ms"), (1e-7, "100ns")]
)
def test_format_duration_reads_back(seconds, text):
    assert units.format_duration(seconds) == text
    assert units.parse_duration(text) == pytest.approx(seconds)
