from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prewarm.errors import UsageError
from prewarm.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("4.5GiB", int(4.5 * 2**30)),
        ("500MB", 500 * 10**6),
        ("123", 123),
        ("1kib", 1024),
        ("2 TB", 2 * 10**12),
        ("7B", 7),
        (" 10MiB ", 10 * 2**20),
    ],
)
def test_parse_size_accepts_what_people_write(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0", "0.0001B", "five", "5 G B", "1e9"])
def test_parse_size_rejects_with_a_hint(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(text)
    assert text.strip() in str(info.value) or "zero" in str(info.value)


@given(st.integers(min_value=1, max_value=10**15))
def test_plain_bytes_round_trip(n: int) -> None:
    assert parse_size(str(n)) == n


def test_format_size() -> None:
    assert format_size(15_231_233_024) == "15.23 GB"
    assert format_size(999) == "999 B"
