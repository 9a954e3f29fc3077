"""Pure proxy rules: header filtering, forwarding headers, targets, masking."""

from __future__ import annotations

import pytest

from backstream import relay
from backstream.client import backoff_delay
from backstream.client.upstream import curl_header_lines
from backstream.config import parse_addr, server_ws_url, split_destination
from backstream.errors import ConfigError
from backstream.logs import mask_secrets


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    headers = [
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("Keep-Alive", "timeout=5"),
        ("X-Secret-Hop", "1"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Trailer", "X"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic x"),
        ("Proxy-Connection", "close"),
        ("X-Kept", "1"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
    assert relay.strip_hop_by_hop(headers) == [
        ("X-Kept", "1"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


def test_forwarded_headers_append_to_what_a_load_balancer_set() -> None:
    headers = relay.add_forwarded(
        [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "https"), ("Via", "1.1 lb")],
        remote="127.0.0.1",
        scheme="http",
        host="tunnel.test",
    )
    assert headers == [
        ("X-Forwarded-For", "203.0.113.9, 127.0.0.1"),
        ("X-Forwarded-Proto", "https"),
        ("Via", "1.1 lb, 1.1 backstream"),
        ("X-Forwarded-Host", "tunnel.test"),
    ]


def test_forwarded_headers_when_none_were_set() -> None:
    headers = relay.add_forwarded([], remote="10.0.0.1", scheme="https", host="h:1")
    assert headers == [
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "h:1"),
        ("Via", "1.1 backstream"),
    ]


@pytest.mark.parametrize(
    "target, expected",
    [
        ("/a%2Fb?x=1&x=&y", "/a%2Fb?x=1&x=&y"),
        ("//evil.example/x", "//evil.example/x"),
        ("/..%2f..%2fetc", "/..%2f..%2fetc"),
        ("http://other:1/p?q=1", "/p?q=1"),
        ("https://other", "/"),
    ],
)
def test_origin_form_never_carries_a_host(target: str, expected: str) -> None:
    assert relay.origin_form(target) == expected


@pytest.mark.parametrize("target", ["*", "@evil.example/x", "", "evil.example:80"])
def test_targets_that_are_not_paths_are_refused(target: str) -> None:
    with pytest.raises(ValueError):
        relay.origin_form(target)


def test_base_path_prefixes_the_target() -> None:
    assert relay.upstream_target("/app", "/x?y=1") == "/app/x?y=1"
    assert relay.upstream_target("", "/x") == "/x"
    assert relay.upstream_target("/app/", "/") == "/app/"


def test_curl_header_lines_suppress_curl_defaults_and_keep_empty_values() -> None:
    lines = curl_header_lines(
        [("Host", "public"), ("X-Empty", ""), ("Content-Length", "3"), ("Accept", "a/b")],
        "127.0.0.1:3000",
        3,
        "POST",
    )
    assert lines[0] == b"Host: 127.0.0.1:3000"
    assert b"X-Empty;" in lines
    assert b"Accept: a/b" in lines
    assert b"User-Agent:" in lines and b"Expect:" in lines and b"Content-Type:" in lines
    assert not any(line.startswith(b"Content-Length") for line in lines)


def test_chunked_post_asks_curl_for_chunked_encoding() -> None:
    assert b"Transfer-Encoding: chunked" in curl_header_lines([], "h", -1, "POST")
    assert b"Transfer-Encoding: chunked" not in curl_header_lines([], "h", 10, "POST")


def test_masking() -> None:
    assert relay.mask_headers([("Authorization", "Bearer x"), ("X", "y")]) == [
        ("Authorization", "***"),
        ("X", "y"),
    ]
    line = "headers=[('Authorization', 'Bearer abc.def'), ('Cookie', 'sid=1')] token Basic dXNlcg=="
    masked = mask_secrets(line)
    assert "abc.def" not in masked and "sid=1" not in masked and "dXNlcg" not in masked


def test_header_flag_parsing() -> None:
    assert relay.parse_header_line("Authorization: Bearer t") == ("Authorization", "Bearer t")
    with pytest.raises(ValueError):
        relay.parse_header_line("no colon")
    with pytest.raises(ValueError):
        relay.parse_header_line("Bad Name: x")


def test_backoff_grows_is_capped_and_jittered() -> None:
    assert backoff_delay(0, rand=1.0) == 0.5
    assert backoff_delay(0, rand=0.0) == 0.25
    assert backoff_delay(3, rand=1.0) == 4.0
    assert backoff_delay(50, rand=1.0) == 30.0
    assert 15.0 <= backoff_delay(50, rand=0.0) <= 30.0


def test_urls_and_addresses() -> None:
    assert server_ws_url("https://t.example") == "wss://t.example"
    assert server_ws_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080"
    assert split_destination("http://localhost:3000/app/") == ("http://localhost:3000", "/app")
    assert parse_addr("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_addr("[::1]:0") == ("::1", 0)
    for bad in ("ftp://x", "http://"):
        with pytest.raises(ConfigError):
            server_ws_url(bad)
    with pytest.raises(ConfigError):
        parse_addr("nohost")
    with pytest.raises(ConfigError):
        split_destination("http://h:99999")
