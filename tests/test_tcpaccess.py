"""The TCP listener's access rules (prewarm.tcpaccess), decided from the request alone; the daemon
serving them over real TCP is tested in test_web.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prewarm.config import is_loopback, parse_http_address
from prewarm.tcpaccess import TcpAccess

LOOPBACK = TcpAccess("127.0.0.1", 8765)
KEYED = TcpAccess("0.0.0.0", 8765, api_key="k" * 24)
OK = {"host": "127.0.0.1:8765"}


def test_the_page_and_the_api_pass_on_loopback_with_a_right_host() -> None:
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765"):
        for path in ("/", "/static/app.js", "/v1/chat/completions", "/health", "/prewarm/status"):
            assert LOOPBACK.refusal(path, {"host": host}) is None, (host, path)


@given(st.text(min_size=0, max_size=40))
def test_any_other_host_is_refused_on_loopback(host: str) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example:8765."""
    refused = LOOPBACK.refusal("/v1/models", {"host": host})
    assert (refused is None) == (host in LOOPBACK.allowed_hosts())
    if refused is not None:
        assert refused.status == 403


@given(st.text(min_size=1, max_size=40))
def test_a_request_from_another_origin_is_refused(origin: str) -> None:
    refused = LOOPBACK.refusal("/v1/chat/completions", {**OK, "origin": origin})
    assert (refused is None) == (origin == "http://127.0.0.1:8765")


def test_the_control_endpoints_stay_on_the_unix_socket() -> None:
    assert LOOPBACK.refusal("/prewarm/reload", OK) is not None
    assert LOOPBACK.refusal("/prewarm/anything", OK) is not None


@given(st.text(max_size=60))
def test_with_a_key_only_the_exact_bearer_token_passes(given_key: str) -> None:
    headers = {"host": "example.org:8765", "authorization": f"Bearer {given_key}"}
    refused = KEYED.refusal("/v1/models", headers)
    assert (refused is None) == (given_key == "k" * 24)
    if refused is not None:
        assert refused.status == 401


def test_with_a_key_the_page_itself_loads_to_ask_for_it() -> None:
    for path in ("/", "/static/app.js", "/static/style.css"):
        assert KEYED.refusal(path, {"host": "example.org:8765"}) is None
    for path in ("/health", "/prewarm/status", "/static/../x", "/v1/models"):
        assert KEYED.refusal(path, {"host": "example.org:8765"}) is not None, path


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:8000", ("127.0.0.1", 8000)), ("[::1]:8000", ("::1", 8000)), ("localhost:1", ("localhost", 1))],
)
def test_http_addresses_parse(value: str, expected: tuple[str, int]) -> None:
    assert parse_http_address(value) == expected


@pytest.mark.parametrize("value", ["8000", ":8000", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x"])
def test_bad_http_addresses_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_http_address(value)


def test_loopback_is_an_address_not_a_name_that_may_resolve_anywhere() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.9.9.9") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("my-host")
