"""Byte sizes and times for people: one parser, one formatter."""
from __future__ import annotations

import time

import pytest

from vramancer.errors import BadInputError
from vramancer.units import GiB, KiB, MiB, TiB, format_bytes, iso_time, parse_bytes


@pytest.mark.parametrize("n, long, compact", [
    (0, "0 B", "0"),
    (512, "512 B", "512"),
    (KiB, "1.0 KiB", "1.0K"),
    (212 * KiB, "212.0 KiB", "212.0K"),
    (int(47.25 * MiB), "47.2 MiB", "47.2M"),
    (3 * GiB // 2, "1.5 GiB", "1.5G"),
    (2 * TiB, "2.0 TiB", "2.0T"),
    (-3 * MiB, "-3.0 MiB", "-3.0M"),
])
def test_format_bytes_long_and_compact(n, long, compact):
    assert format_bytes(n) == long
    assert format_bytes(n, compact=True) == compact


def test_format_bytes_precision():
    assert format_bytes(10 * GiB + GiB // 3, 2) == "10.33 GiB"
    assert format_bytes(758 * MiB, 0, compact=True) == "758M"


@pytest.mark.parametrize("text, n", [("10GiB", 10 * GiB), ("500MB", 500 * 10**6), ("1.5G", 3 * GiB // 2), (7, 7),
                                     ("  64 KiB ", 64 * KiB)])
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("bad", ["ten", "10XB", "1.5 parsecs", -1, True])
def test_parse_bytes_refuses(bad):
    with pytest.raises(BadInputError):
        parse_bytes(bad)


def test_iso_time_is_local_time_with_milliseconds():
    t = 1_700_000_000.25
    assert iso_time(t) == time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(1_700_000_000)) + ".250"
    # 999.6 ms rounds up into the next second, never ".1000"
    assert iso_time(1_700_000_000.9996) == time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(1_700_000_001)) + ".000"
