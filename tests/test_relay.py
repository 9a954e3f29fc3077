"""Pure proxy rules: header filtering, forwarding headers, targets, masking."""

from __future__ import annotations

import re

import pytest

from backstream import protocol, redact, relay, routing
from backstream.client import backoff_delay
from backstream.client.upstream import curl_header_lines
from backstream.config import ClientConfig, parse_addr, server_ws_url, split_destination
from backstream.errors import ConfigError
from backstream.har import HarRecorder

mask_secrets = redact.Redactor().mask_text


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


def test_forwarded_headers_append_to_what_a_trusted_load_balancer_set() -> None:
    headers = relay.add_forwarded(
        [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "https"), ("Via", "1.1 lb")],
        remote="127.0.0.1",
        scheme="http",
        host="tunnel.test",
        trusted=True,
    )
    assert headers == [
        ("X-Forwarded-For", "203.0.113.9, 127.0.0.1"),
        ("X-Forwarded-Proto", "https"),
        ("Via", "1.1 lb, 1.1 backstream"),
        ("X-Forwarded-Host", "tunnel.test"),
    ]


def test_forwarded_headers_from_an_untrusted_caller_are_replaced() -> None:
    headers = relay.add_forwarded(
        [
            ("X-Forwarded-For", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Port", "443"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Kept", "1"),
        ],
        remote="127.0.0.1",
        scheme="http",
        host="tunnel.test",
    )
    assert headers == [
        ("X-Kept", "1"),
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "tunnel.test"),
        ("Via", "1.1 backstream"),
    ]


def test_trusted_networks() -> None:
    networks = relay.parse_networks("10.0.0.0/8, 127.0.0.1 ::1")
    assert relay.is_trusted("10.1.2.3", networks)
    assert relay.is_trusted("127.0.0.1", networks)
    assert relay.is_trusted("::1", networks)
    assert not relay.is_trusted("127.0.0.2", networks)
    assert not relay.is_trusted("not-an-ip", networks)
    assert not relay.is_trusted("10.1.2.3", ())
    with pytest.raises(ValueError, match="'10.0.0.0/33'"):
        relay.parse_networks("10.0.0.0/33")


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([], 0),
        ([("Content-Length", "12")], 12),
        ([("Content-Length", " 0 ")], 0),
        ([("Transfer-Encoding", "chunked")], -1),
        ([("transfer-encoding", "Chunked")], -1),
    ],
)
def test_body_length(headers: list[tuple[str, str]], expected: int) -> None:
    assert relay.body_length(headers) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Length", "3"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "chunked, identity")],
        [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "identity")],
        [("Transfer-Encoding", "gzip, chunked")],
        [("Content-Length", "3, 3")],
        [("Content-Length", "3"), ("Content-Length", "4")],
        [("Content-Length", "0x3")],
        [("Content-Length", "-1")],
        [("Content-Length", "+3")],
        [("Content-Length", "")],
        [("Content-Length", "9" * 20)],
    ],
)
def test_ambiguous_framing_is_refused(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError):
        relay.body_length(headers)


def test_head_problems() -> None:
    assert relay.head_problem("GET", "/", [("Host", "h")], handshake=False) is None
    big = [("X-Big", "a" * relay.MAX_HEADER_BLOCK)]
    too_large = relay.head_problem("GET", "/", big, handshake=False)
    assert too_large is not None and too_large[0] == 431
    framing = relay.head_problem("GET", "/", [("Content-Length", "x")], handshake=False)
    assert framing is not None and framing[0] == 400
    body = relay.head_problem("GET", "/", [("Content-Length", "1")], handshake=True)
    assert body == (400, "a WebSocket handshake must not have a body")
    assert relay.head_problem("GET", "/", [("Content-Length", "0")], handshake=True) is None


_HANDSHAKE = [
    ("Upgrade", "websocket"),
    ("Connection", "keep-alive, Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]


@pytest.mark.parametrize(
    "method, drop, add, status",
    [
        ("GET", None, None, None),
        ("POST", None, None, 405),
        ("GET", "Connection", ("Connection", "keep-alive"), 400),
        ("GET", "Sec-WebSocket-Version", ("Sec-WebSocket-Version", "8"), 426),
        ("GET", "Sec-WebSocket-Key", None, 400),
    ],
)
def test_websocket_handshake_problems(
    method: str, drop: str | None, add: tuple[str, str] | None, status: int | None
) -> None:
    headers = [(n, v) for n, v in _HANDSHAKE if n != drop] + ([add] if add else [])
    problem = relay.websocket_handshake_problem(method, headers)
    assert (problem[0] if problem else None) == status


def test_response_framing_belongs_to_the_server() -> None:
    headers = relay.response_headers(
        200, [("Transfer-Encoding", "chunked"), ("Content-Length", "5")], upgrade=False
    )
    assert headers == [("Content-Length", "5")]
    for status, upgrade in ((101, False), (100, False), (103, True)):
        with pytest.raises(ValueError, match="not a final response"):
            relay.response_headers(status, [], upgrade=upgrade)
    assert relay.response_headers(101, [], upgrade=True) == []
    for lengths in (["5", "6"], ["5, 5"], ["x"]):
        with pytest.raises(ValueError, match="Content-Length"):
            relay.response_headers(200, [("Content-Length", v) for v in lengths], upgrade=False)


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
    assert redact.Redactor().mask_headers([("Authorization", "Bearer x"), ("X", "y")]) == [
        ("Authorization", "***"),
        ("X", "y"),
    ]
    line = "headers=[('Authorization', 'Bearer abc.def'), ('Cookie', 'sid=1')] token Basic dXNlcg=="
    masked = mask_secrets(line)
    assert "abc.def" not in masked and "sid=1" not in masked and "dXNlcg" not in masked


def test_query_tokens_are_masked_in_any_url_a_line_quotes() -> None:
    line = "Uncaught exception GET /cb?code=1&access_token=t1&api_key=k2;sig=s3 uri='/x?token=t4'"
    masked = mask_secrets(line)
    assert masked == (
        "Uncaught exception GET /cb?code=1&access_token=***&api_key=***;sig=*** uri='/x?token=***'"
    )
    assert mask_secrets("stream=1 status=200 token=abc") == "stream=1 status=200 token=abc"


def test_query_names_are_compared_decoded() -> None:
    line = "GET /cb?access%5Ftoken=t1&%74oken=t2&Api%5fKey=t3&a%5Fb=kept&x=%74oken"
    masked = "GET /cb?access%5Ftoken=***&%74oken=***&Api%5fKey=***&a%5Fb=kept&x=%74oken"
    assert mask_secrets(line) == masked


def test_har_comment_is_masked() -> None:
    recorder = HarRecorder("", unmasked=False, body_limit=10)
    head = protocol.RequestHead(1, "GET", "/x", [])
    entry = recorder.start(head, ClientConfig("ws://s", "http://127.0.0.1:1"))
    error = "cannot reach http://u:pw1@h/x?token=t1 with Authorization: Bearer t2"
    comment = recorder.document(entry, error)["log"]["entries"][0]["comment"]
    assert comment == "relay failed: cannot reach http://***@h/x?token=*** with Authorization: ***"
    unmasked = HarRecorder("", unmasked=True, body_limit=10)
    assert unmasked.document(entry, error)["log"]["entries"][0]["comment"].endswith(error)


@pytest.mark.parametrize(
    "line, hidden, kept",
    [
        ('Authorization: Digest username="bob", response="abcd"', ["bob", "abcd"], []),
        ("{'Cookie': 'a=\"q1\"; b=q2', 'X-Other': 'keep'}", ["q1", "q2"], ["keep"]),
        ('{"cookie": "a=\\"q3\\"", "x": "keep"}', ["q3"], ["keep"]),
        (
            "headers: Authorization: Bearer t1; Host: h; X-Api-Key: k1; Cookie: a=1; b=c1",
            ["t1", "k1", "c1"],
            ["Host: h"],
        ),
        ("x-auth-token=t2 x-amz-security-token: t3", ["t2", "t3"], []),
        # a value that starts with a quoted token is masked to its header's end
        ('headers: Cookie: "q4"; sid=c2; Host: h', ["q4", "c2"], ["Host: h"]),
        ('headers: Set-Cookie: a="x; B: c"; sid=c3; X-V: v', ["c3", "B: c"], ["X-V: v"]),
        ("[('Cookie', '\"q5\"; sid=c4'), ('X-V', 'v')]", ["q5", "c4"], ["('X-V', 'v')"]),
    ],
)
def test_quoted_and_listed_secrets_are_masked_whole(
    line: str, hidden: list[str], kept: list[str]
) -> None:
    masked = mask_secrets(line)
    assert not [h for h in hidden if h in masked], masked
    assert all(k in masked for k in kept), masked


@pytest.mark.parametrize("name", redact.DEFAULT_HEADERS)
def test_every_default_header_is_masked_in_any_line(name: str) -> None:
    """Proxy-Authorization and Backstream-Token never reach the client's lines, but a
    server line or error text could quote them."""
    title = "-".join(part.capitalize() for part in name.split("-"))
    assert mask_secrets(f"headers: {title}: s1; X: v") == f"headers: {title}: ***; X: v"
    assert mask_secrets(f"[('{title}', 's2')]") == f"[('{title}', '***')]"


def test_mask_lists_grow_but_keep_their_defaults() -> None:
    r = redact.Redactor(["X-Custom"], ["Session"])
    assert r.mask_headers([("x-custom", "v"), ("Cookie", "c"), ("X", "y")]) == [
        ("x-custom", "***"),
        ("Cookie", "***"),
        ("X", "y"),
    ]
    assert r.mask_target("/p?session=s&token=t&a=1") == "/p?session=***&token=***&a=1"
    assert r.mask_query([("SESSION", "s"), ("a", "1")]) == [("SESSION", "***"), ("a", "1")]
    assert redact.Redactor().mask_target("/p?session=s") == "/p?session=s"


@pytest.mark.parametrize(
    "path, normalized",
    [
        ("/anything", "/anything"),
        ("//anything", "/anything"),
        ("/%61nything", "/anything"),
        ("/a/b/../c", "/a/c"),
        ("/a/./b/", "/a/b/"),
        ("/..", "/"),
        ("/a/..", "/"),
        ("/a/.", "/a/"),
        ("/../../admin", "/admin"),
        ("/x/%2e%2E/admin", "/admin"),
        ("/x/..%2fadmin", "/x/..%2Fadmin"),  # an encoded slash stays one
        ("/x%252e%252e/", "/x%252e%252e/"),  # decoded once only
        ("/%7Euser/%20", "/~user/%20"),
        ("/", "/"),
        # ";params" are stripped from each segment (Tomcat, Spring), before dots resolve
        ("/admin;jsessionid=1", "/admin"),
        ("/a;v=1/b;c", "/a/b"),
        ("/x/..;/admin", "/admin"),
        ("/;/admin", "/admin"),
        ("/.;/admin", "/admin"),
        ("/x/.;/admin", "/x/admin"),
        ("/webhooks/%2e%2e;/admin", "/admin"),
        ("/webhooks/.;/../admin", "/admin"),
        ("/a%3bb", "/a%3Bb"),  # an encoded ";" is not a parameter
        ("/a//../b", "/b"),  # slashes are merged first (RFC 3986 would give /a/b)
    ],
)
def test_normalize_path(path: str, normalized: str) -> None:
    assert relay.normalize_path(path) == normalized


def test_client_address_behind_trusted_proxies() -> None:
    trusted = relay.parse_networks("10.0.0.0/8")

    def address(peer: str, values: list[str]) -> str:
        return relay.client_address(peer, relay.forwarded_chain("x-forwarded-for", values), trusted)

    assert address("10.0.0.1", ["6.6.6.6, 203.0.113.9"]) == "203.0.113.9"
    assert address("10.0.0.1", ["203.0.113.9", "10.0.0.2"]) == "203.0.113.9"
    assert address("1.2.3.4", ["9.9.9.9"]) == "1.2.3.4"  # untrusted peer
    assert address("10.0.0.1", []) == "10.0.0.1"
    assert address("10.0.0.1", ["10.0.0.5, 10.0.0.6"]) == "10.0.0.5"
    assert address("10.0.0.1", ["[2001:db8::1]:80"]) == "2001:db8::1"
    assert address("10.0.0.1", ["1.2.3.4:567"]) == "1.2.3.4"
    forwarded = relay.forwarded_chain(
        "forwarded", ['for=192.0.2.60;proto=http, for="[2001:db8::17]:4711"']
    )
    assert forwarded == ["192.0.2.60", "[2001:db8::17]:4711"]
    assert relay.client_address("10.0.0.1", forwarded, trusted) == "2001:db8::17"


def test_forwarded_reads_quoted_strings_whole() -> None:
    """RFC 7239 values may be quoted strings: a "," or ";" inside one separates nothing."""
    assert relay.forwarded_for(['for="1.2.3.4, 5.6.7.8"']) == ["1.2.3.4, 5.6.7.8"]
    assert relay.forwarded_for(['by="a;for=9.9.9.9, x";for=1.2.3.4, For=_hidden']) == [
        "1.2.3.4",
        "_hidden",
    ]
    assert relay.forwarded_for([r'for="\[::1\]:80"']) == ["[::1]:80"]  # quoted-pairs
    assert relay.forwarded_for(['for="unclosed, for=2.2.2.2']) == ['"unclosed, for=2.2.2.2']
    # One quoted entry is one (invalid) address, never the two it seems to list.
    trusted = relay.parse_networks("10.0.0.0/8")
    chain = relay.forwarded_chain("forwarded", ['for="6.6.6.6, 10.1.2.3"'])
    assert relay.client_address("10.0.0.1", chain, trusted) == "6.6.6.6, 10.1.2.3"


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


# -- tunnel names and routing (backstream/routing.py) ----------------------------------------


@pytest.mark.parametrize("name", ["a", "myapp", "my-app-2", "MyApp", "x" * 63, " app "])
def test_valid_names_are_lower_cased(name: str) -> None:
    assert routing.check_name(name) == name.strip().lower()


@pytest.mark.parametrize("name", ["", "-a", "a-", "a_b", "a.b", "x" * 64, "é", "a b"])
def test_invalid_names_say_what_a_name_is(name: str) -> None:
    with pytest.raises(ValueError, match="invalid tunnel name"):
        routing.check_name(name)


def test_random_names_are_valid_and_distinct() -> None:
    names = {routing.random_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all(re.fullmatch(r"[a-z2-7]{10}", n) and routing.check_name(n) == n for n in names)


@pytest.mark.parametrize(
    "host, header, domain, expected",
    [
        ("myapp.tunnel.test", None, "tunnel.test", "myapp"),
        ("MyApp.Tunnel.Test:8080", None, "tunnel.test", "myapp"),
        ("myapp.tunnel.test.", None, "tunnel.test", "myapp"),
        ("myapp.tunnel.test.:80", None, "tunnel.test", "myapp"),
        ("tunnel.test", None, "tunnel.test", ""),
        ("other.example", None, "tunnel.test", ""),
        ("eviltunnel.test", None, "tunnel.test", ""),
        ("a.b.tunnel.test", None, "tunnel.test", "a.b"),
        ("[::1]:8080", None, "tunnel.test", ""),
        ("myapp.tunnel.test", None, "", ""),
        ("anything", "MyApp", "", "myapp"),
        ("other.tunnel.test", "myapp", "tunnel.test", "myapp"),
    ],
)
def test_route(host: str, header: str | None, domain: str, expected: str) -> None:
    assert routing.route(host, header, domain) == expected


def test_route_refuses_an_invalid_tunnel_header() -> None:
    with pytest.raises(ValueError, match="invalid tunnel name"):
        routing.route("h", "-bad", "")


@pytest.mark.parametrize(
    "name, domain, public, scheme, host, url",
    [
        ("myapp", "tunnel.test", "", "http", "127.0.0.1:41234", "http://myapp.tunnel.test:41234"),
        ("myapp", "tunnel.test", "", "http", "tunnel.test", "http://myapp.tunnel.test"),
        (
            "myapp",
            "t.example",
            "https://t.example",
            "http",
            "10.0.0.5:8080",
            "https://myapp.t.example",
        ),
        (
            "myapp",
            "t.example",
            "https://t.example:8443",
            "http",
            "x",
            "https://myapp.t.example:8443",
        ),
        ("", "t.example", "https://t.example", "http", "x", "https://t.example"),
        ("myapp", "", "", "http", "127.0.0.1:1", "http://127.0.0.1:1"),
        ("myapp", "", "https://t.example", "http", "x", "https://t.example"),
    ],
)
def test_public_url(name: str, domain: str, public: str, scheme: str, host: str, url: str) -> None:
    assert routing.public_url(name, domain, public, scheme, host) == url


def test_domain_is_normalized() -> None:
    assert routing.normalize_domain("Tunnel.Example.COM.") == "tunnel.example.com"
    with pytest.raises(ValueError):
        routing.normalize_domain("bad_domain.com")


def test_upstream_host_modes() -> None:
    assert relay.upstream_host("preserve", "public.example", "127.0.0.1:3000") == "public.example"
    assert relay.upstream_host("preserve", "", "127.0.0.1:3000") == "127.0.0.1:3000"
    assert relay.upstream_host("rewrite", "public.example", "127.0.0.1:3000") == "127.0.0.1:3000"
    assert relay.upstream_host("app.internal", "public.example", "x:1") == "app.internal"


def test_redirects_under_the_destination_move_to_the_public_origin() -> None:
    local, public = "http://127.0.0.1:3000/app", "https://pub.example"
    headers = [
        ("Location", "http://127.0.0.1:3000/app/items?x=1"),
        ("Content-Location", "HTTP://127.0.0.1:3000/app"),
        ("Refresh", "5; url=http://127.0.0.1:3000/app/next"),
        ("Location", "http://127.0.0.1:3000/other"),  # outside the base path: kept
        ("Location", "http://127.0.0.1:3000/apple"),  # a longer name, not under /app
        ("Link", "<http://127.0.0.1:3000/app/x>"),  # not a redirect header
        ("Location", "http://127.0.0.1:3000/app/login?next_url=http://127.0.0.1:3000/app/x"),
        ("Refresh", "0;URL = http://127.0.0.1:3000/app/y"),
    ]
    assert relay.rewrite_locations(headers, local, public) == [
        ("Location", "https://pub.example/items?x=1"),
        ("Content-Location", "https://pub.example/"),
        ("Refresh", "5; url=https://pub.example/next"),
        ("Location", "http://127.0.0.1:3000/other"),
        ("Location", "http://127.0.0.1:3000/apple"),
        ("Link", "<http://127.0.0.1:3000/app/x>"),
        # the target is rewritten, a URL in its query is not the target
        ("Location", "https://pub.example/login?next_url=http://127.0.0.1:3000/app/x"),
        ("Refresh", "0;URL = https://pub.example/y"),
    ]
    forwarded = [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "pub.example")]
    assert relay.public_origin(forwarded) == public
    assert relay.public_origin([]) == ""


def test_redirects_to_the_destination_under_https_move_too() -> None:
    """An app trusting ``X-Forwarded-Proto: https`` names the destination with https."""
    local, public = "http://127.0.0.1:3000", "https://pub.example"
    headers = [
        ("Location", "https://127.0.0.1:3000/items"),
        ("Content-Location", "HTTPS://127.0.0.1:3000"),
        ("Refresh", "0; url=https://127.0.0.1:3000/next"),
        ("Location", "https://127.0.0.1:3001/items"),  # another port: another origin
        ("Location", "ftp://127.0.0.1:3000/items"),
    ]
    assert relay.rewrite_locations(headers, local, public) == [
        ("Location", "https://pub.example/items"),
        ("Content-Location", "https://pub.example/"),
        ("Refresh", "0; url=https://pub.example/next"),
        ("Location", "https://127.0.0.1:3001/items"),
        ("Location", "ftp://127.0.0.1:3000/items"),
    ]
    https_app = [("Location", "http://app:8443/x")]  # -d https://...: http moves as well
    assert relay.rewrite_locations(https_app, "https://app:8443", public) == [
        ("Location", "https://pub.example/x")
    ]


def test_a_quoted_refresh_url_keeps_its_quotes() -> None:
    local, public = "http://127.0.0.1:3000", "http://pub.example"
    headers = [
        ("Refresh", '3; url="http://127.0.0.1:3000/a"'),
        ("Refresh", "3;url='http://127.0.0.1:3000/b?x=1' "),
        ("Refresh", '3; url="http://elsewhere/c"'),
    ]
    assert relay.rewrite_locations(headers, local, public) == [
        ("Refresh", '3; url="http://pub.example/a"'),
        ("Refresh", "3;url='http://pub.example/b?x=1' "),
        ("Refresh", '3; url="http://elsewhere/c"'),
    ]


@pytest.mark.timeout(30)  # a hang guard: the old pattern took hours on these lines
def test_masking_does_not_backtrack_on_hostile_lines() -> None:
    """An unclosed quote before a long run of backslashes once took exponential time:
    any request path reaches the access log, so one request could stall the server."""
    redactor = redact.Redactor()
    for line in (
        'GET /authorization:"' + "\\" * 50_000 + " x",
        "GET /cookie='" + "\\'" * 20_000,
        "GET /" + "authorization:" * 5_000,
        "GET /cookie: " + '"a\\' * 20_000,
        "GET /'cookie': '" + "\\'" * 20_000,
        "GET /?" + "%61%63" * 20_000,
    ):
        assert redactor.mask_text(line).startswith("GET /")
