"""Issue 13, end to end: attacks from the public side, each one a regression test.

Real processes on 127.0.0.1 (``backstream serve``, ``backstream client``, the local app)
and, where the exact bytes that reach the origin matter, ``tests/raw_origin.py``: a raw
TCP origin in a thread of this process that records every byte it receives, so "the
request never reached the origin" is checked as "the origin received zero bytes".

Each test's docstring names the issue item it proves ("#13 item N").
"""

from __future__ import annotations

import asyncio
import json
import re
import selectors
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cluster_harness import instance, redis
from conftest import OriginTunnel
from harness import (
    TIMEOUTS,
    Client,
    LocalApp,
    ProcessPool,
    Server,
    assert_short_text,
    first_response,
    raw_request,
    request,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from raw_origin import RawOrigin
from test_e2e_metrics import metrics_port
from tornado import httpclient
from tornado.websocket import websocket_connect

from backstream.server.peers import PEER_HEADER

pytestmark = pytest.mark.timeout(120)

#: A valid WebSocket handshake (RFC 6455 section 1.3 sample key), minus the request line.
WS_HANDSHAKE = (
    "Upgrade: websocket\r\n"
    "Connection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n"
)
MIB = 1024 * 1024


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def origin_tunnel(module_procs: ProcessPool) -> Iterator[OriginTunnel]:
    """One server and client relaying to one raw origin, shared by read-only tests
    (both with their metrics, for ``streams_in_flight``)."""
    origin = RawOrigin()
    try:
        srv = module_procs.server("--metrics-addr", "127.0.0.1:0")
        cli = module_procs.client(srv, origin.url, "--inspect", "127.0.0.1:0")
        srv.wait_for(r"client connected")  # its line in, before tests count theirs
        yield OriginTunnel(srv, cli, origin)
    finally:
        origin.close()


# -- helpers -----------------------------------------------------------------------------


def _response_complete(data: bytes) -> bool:
    """Whether ``data`` holds one whole response (framed by Content-Length or chunked)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) > 1 and parts[1] in ("101", "204", "304"):
        return True
    fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if fields.get("content-length", "").isdigit():
        return len(body) >= int(fields["content-length"])
    if "chunked" in fields.get("transfer-encoding", "").lower():
        return body.endswith(b"0\r\n\r\n")
    return False  # framed by EOF


def converse(
    target: Server | LocalApp | int,
    head: bytes,
    body: Iterable[bytes] = (),
    timeout: float = TIMEOUTS.request,
) -> bytes:
    """Send ``head`` then the ``body`` pieces while reading; return what came back.

    ``target``: a process, or a port on 127.0.0.1. Reading goes on while sending, the
    way a careful HTTP client works: it returns as soon as one complete response is in
    (or at EOF, a connection reset, or the deadline), and sending stops at the first
    EPIPE/ECONNRESET: a server may answer and close before the body is over. Nothing
    here waits longer than ``timeout``.
    """
    port = target if isinstance(target, int) else target.port
    deadline = time.monotonic() + timeout
    out = bytearray()
    pieces = iter(body)
    pending = memoryview(head)
    sending = True
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock,
        selectors.DefaultSelector() as sel,
    ):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while not _response_complete(bytes(out)):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for _, mask in sel.select(min(left, 1.0)):
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        data = None
                    except (ConnectionResetError, ConnectionAbortedError):
                        return bytes(out)
                    if data == b"":
                        return bytes(out)
                    if data:
                        out += data
                if sending and mask & selectors.EVENT_WRITE:
                    if not pending:
                        piece = next(pieces, None)
                        if piece is None:
                            sending = False
                            sel.modify(sock, selectors.EVENT_READ)
                            continue
                        pending = memoryview(piece)
                    try:
                        pending = pending[sock.send(pending) :]
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                        sending = False
                        sel.modify(sock, selectors.EVENT_READ)
    return bytes(out)


def streams_in_flight(srv: Server, cli: Client) -> tuple[float, float]:
    """Streams open on the server (its metrics port) and on the client (its inspector)."""
    client_port = int(cli.wait_for(r"inspector url=http://127\.0\.0\.1:(\d+)").group(1))
    return (
        gauge(metrics_port(srv), "backstream_streams_in_flight"),
        gauge(client_port, "backstream_client_streams_open"),
    )


def gauge(port: int, name: str) -> float:
    """The sum of a gauge's samples on the ``/metrics`` page of ``port``."""
    page = metrics_page(port)
    assert f"# TYPE {name} gauge" in page, page[:300]
    families = text_string_to_metric_families(page)
    return sum(x.value for family in families for x in family.samples if x.name == name)


def metrics_page(port: int) -> str:
    r = request(("127.0.0.1", port), "GET", "/metrics")
    assert r.status == 200, (r.status, r.body[:300])
    return r.text()


def no_stream_left(srv: Server, cli: Client) -> None:
    """Every stream ended, on both sides (counted, not guessed)."""
    try:
        wait_until(lambda: streams_in_flight(srv, cli) == (0, 0))
    except AssertionError:
        raise AssertionError(
            f"streams left (server, client): {streams_in_flight(srv, cli)}"
        ) from None


def app_headers(j: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in j["headers"] if k.lower() == name.lower()]


def wait_sentinel(t: OriginTunnel, name: str) -> None:
    """A plain request through the same tunnel, answered by the origin: whatever the
    server relayed before it has had every chance to reach the origin by now."""
    r = request(t.server, "GET", f"/sentinel-{name}")
    assert (r.status, r.body) == (200, b"ok"), (r.status, r.body[:300])


# -- item 1: absolute-form targets and auth.server ----------------------------------------

CLIENT_ALLOW_ALL = "package auth.client\nimport rego.v1\ndefault allow := true\n"
SERVER_NO_ADMIN = (
    "package auth.server\nimport rego.v1\ndefault allow := false\n"
    'allow if not startswith(input.path, "/admin")\n'
)


def test_absolute_form_target_is_checked_as_its_path(
    procs: ProcessPool, raw_origin: RawOrigin, tmp_path: Path
) -> None:
    """#13 item 1: auth.server sees the path of an absolute-form target, not the URL."""
    (tmp_path / "client.rego").write_text(CLIENT_ALLOW_ALL)
    (tmp_path / "server.rego").write_text(SERVER_NO_ADMIN)
    srv = procs.server("-p", str(tmp_path))
    procs.client(srv, raw_origin.url)

    denied = first_response(
        raw_request(srv, b"GET http://x/admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )
    assert denied.status == 403, (denied.status, denied.body[:300])

    allowed = first_response(
        raw_request(srv, b"GET http://x/ok?a=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )
    assert (allowed.status, allowed.body) == (200, b"ok")
    # The /admin request came first: had it been relayed, the origin would hold it too.
    assert [r.target for r in raw_origin.requests()] == ["/ok?a=1"]

    ws = first_response(
        converse(srv, f"GET http://x/admin/ws HTTP/1.1\r\nHost: x\r\n{WS_HANDSHAKE}\r\n".encode())
    )
    assert ws.status == 403, (ws.status, ws.body[:300])
    assert [r.target for r in raw_origin.requests()] == ["/ok?a=1"]


# -- item 2: tunnel ownership without policies ---------------------------------------------


def test_a_second_owner_cannot_join_the_tunnel(procs: ProcessPool) -> None:
    """#13 item 2: without policies, the first client's credentials own the tunnel."""
    app_a, app_b, app_c = procs.local_app(), procs.local_app(), procs.local_app()
    srv = procs.server()
    procs.client(srv, app_a, "-H", "Authorization: Bearer alpha")
    cli_b = procs.client(srv, app_b, "-H", "Authorization: Bearer beta", wait=False)
    outcome = cli_b.wait_for(r"status=409|connected to server url=", TIMEOUTS.connect)
    assert "status=409" in outcome.group(0), cli_b.tail()
    assert cli_b.wait_exit(TIMEOUTS.exit) == 2

    for i in range(20):
        r = request(srv, "GET", f"/anything?n={i}")
        assert r.status == 200, (r.status, r.body[:300])
    assert (app_a.hits(), app_b.hits()) == (20, 0)

    procs.client(srv, app_c, "-H", "Authorization: Bearer alpha")  # same owner: accepted
    for i in range(40):
        assert request(srv, "GET", f"/anything?m={i}").status == 200
        if app_c.hits() > 0 and app_a.hits() > 20:
            break
    assert app_a.hits() > 20 and app_c.hits() > 0, (app_a.hits(), app_c.hits())
    output = srv.output()
    assert "alpha" not in output and "beta" not in output, output


# -- item 3: bodies on handshake and upgrade requests --------------------------------------

PIECE = b"\0" * MIB
HUGE = 128  # MiB announced/streamed


def test_bodies_on_handshake_and_upgrade_requests_are_refused(
    procs: ProcessPool, local_app: LocalApp
) -> None:
    """#13 item 3: a body on a tunnel handshake or a WebSocket upgrade is refused with 400
    at header time, and never buffered (the server's RSS stays flat)."""
    srv = procs.server()
    procs.client(srv, local_app)
    host = f"Host: {srv.netloc}\r\n"

    rss0, peak0 = srv.rss_kib(), srv.peak_rss_kib()
    head = (
        f"POST /x HTTP/1.1\r\n{host}Backstream-Client: 1\r\nContent-Length: {HUGE * MIB}\r\n\r\n"
    ).encode()
    handshake = first_response(converse(srv, head, (PIECE for _ in range(HUGE))))
    grown = (srv.rss_kib() - rss0, srv.peak_rss_kib() - peak0)
    assert max(grown) < 32 * 1024, f"server RSS grew by {grown} KiB (now, peak)"
    assert handshake.status == 400, (handshake.status, handshake.body[:300])

    rss0, peak0 = srv.rss_kib(), srv.peak_rss_kib()
    head = (
        f"GET /ws/echo HTTP/1.1\r\n{host}{WS_HANDSHAKE}Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunks = [b"%x\r\n" % len(PIECE) + PIECE + b"\r\n"] * HUGE + [b"0\r\n\r\n"]
    upgrade = first_response(converse(srv, head, chunks))
    grown = (srv.rss_kib() - rss0, srv.peak_rss_kib() - peak0)
    assert max(grown) < 32 * 1024, f"server RSS grew by {grown} KiB (now, peak)"
    assert upgrade.status == 400, (upgrade.status, upgrade.body[:300])

    assert local_app.hits() == 0
    assert local_app.count(r"ws-open") == 0


def test_bodies_on_peer_link_handshakes_are_refused(procs: ProcessPool) -> None:
    """#13 item 3, the peer door of ``--redis``: a body on a request carrying the peer
    header is refused with 400 at header time, before its signature is checked, and
    never buffered (the server's RSS stays flat)."""
    srv = instance(procs, redis(procs))
    rss0, peak0 = srv.rss_kib(), srv.peak_rss_kib()
    head = (
        f"POST /x HTTP/1.1\r\nHost: {srv.netloc}\r\n{PEER_HEADER}: junk\r\n"
        f"Content-Length: {HUGE * MIB}\r\n\r\n"
    ).encode()
    peer = first_response(converse(srv, head, (PIECE for _ in range(HUGE))))
    grown = (srv.rss_kib() - rss0, srv.peak_rss_kib() - peak0)
    assert max(grown) < 32 * 1024, f"server RSS grew by {grown} KiB (now, peak)"
    assert_short_text(peer, 400, "must not have a body")
    assert srv.count(r"refused peer link") == 0, srv.tail()  # the screen's 400, not prepare()'s


# -- items 5 and 6: request framing ---------------------------------------------------------

FRAMING = {
    "cl-and-te": b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-chunked-identity": b"Transfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "te-chunked-twice": (
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    ),
    "te-identity": b"Transfer-Encoding: identity\r\n\r\nabc",
    "te-gzip-chunked": b"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "cl-list": b"Content-Length: 3, 3\r\n\r\nabc",
    "cl-twice-unequal": b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-hex": b"Content-Length: 0x3\r\n\r\nabc",
    "cl-negative": b"Content-Length: -1\r\n\r\nabc",
    "cl-plus": b"Content-Length: +3\r\n\r\nabc",
}


@pytest.fixture
def request_id(request: pytest.FixtureRequest) -> str:
    """A short id unique to this test case, for targets and markers."""
    return re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")


@pytest.mark.parametrize("tail", FRAMING.values(), ids=FRAMING.keys())
def test_ambiguous_framing_is_refused_before_the_origin(
    origin_tunnel: OriginTunnel, tail: bytes, request_id: str
) -> None:
    """#13 items 5 and 6: a request whose body framing is ambiguous or unsupported is
    answered with one 400 (short text) and not one byte of it reaches the origin."""
    t = origin_tunnel
    marker = f"/framing-{request_id}"
    before, mark = t.origin.total_bytes(), t.server.mark()
    head = f"POST {marker} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
    r = first_response(raw_request(t.server, head + tail))
    assert t.origin.total_bytes() == before, t.origin.raw()
    assert_short_text(r, 400)
    assert not r.after.startswith(b"HTTP/"), r.after[:300]
    assert b"HTTP/1." not in r.after, r.after[:300]

    t.server.wait_for(re.escape(marker), start=mark)
    wait_sentinel(t, request_id)
    assert not any(marker.encode() in conn for conn in t.origin.raw()), t.origin.raw()
    logged = [line for line in t.server.lines[mark:] if "/sentinel-" not in line]
    assert len(logged) == 1 and "status=400" in logged[0], logged  # one access line, no more


# -- item 9: methods named like Tornado's RequestHandler methods ---------------------------

HANDLER_METHODS = [
    "FINISH",
    "PREPARE",
    "FLUSH",
    "ON_FINISH",
    "CLEAR",
    "RELAY",
    "WRITE",
    "RENDER",
    "SEND_ERROR",
    "INITIALIZE",
    "ON_CONNECTION_CLOSE",
    "DATA_RECEIVED",
]


@pytest.mark.parametrize("method", HANDLER_METHODS)
def test_handler_method_names_are_relayed_as_methods(
    origin_tunnel: OriginTunnel, method: str
) -> None:
    """#13 item 9: a method token that names a RequestHandler method (FINISH, PREPARE,
    ...) is relayed like any custom method: the origin's answer, exactly one request."""
    t = origin_tunnel
    target = f"/method/{method}"
    r = request(t.server, method, target)
    assert (r.status, r.body) == (200, b"ok"), (r.status, r.body[:300])
    seen = [x for x in t.origin.requests() if x.method == method]
    assert [x.target for x in seen] == [target], [(x.method, x.target) for x in seen]
    no_stream_left(t.server, t.client)


# -- item 9: an origin that answers before reading the body ---------------------------------

EARLY_PIECE = b"e" * (64 * 1024)
#: 4 MiB: more than the stream's credit, so the body is still flowing when the answer is
#: complete, and larger than the socket buffers between curl and the origin, so that the upload
#: really is stuck. (A body that fits in them, say 256 KiB, is "sent" in full: curl
#: then reuses the connection, and the next request waits on an origin that never
#: reads again; no proxy can tell, and that request ends with the server's 504.)
EARLY_BODIES = {"4MiB": 4 * MIB}


@pytest.mark.parametrize("size", EARLY_BODIES.values(), ids=EARLY_BODIES.keys())
def test_early_answer_frees_the_concurrency_slot(
    procs: ProcessPool, raw_origin: RawOrigin, size: int
) -> None:
    """#13 item 9: an origin that answers before reading the request body (and never
    reads it) does not keep a --max-concurrency slot once its response is complete."""
    raw_origin.answer_early("/early")
    srv = procs.server("--timeout", "5", "--metrics-addr", "127.0.0.1:0")
    cli = procs.client(srv, raw_origin.url, "--max-concurrency", "4", "--inspect", "127.0.0.1:0")
    head = f"POST /early HTTP/1.1\r\nHost: {srv.netloc}\r\nContent-Length: {size}\r\n\r\n"

    def post(_: int) -> bytes:
        pieces = (EARLY_PIECE for _ in range(size // len(EARLY_PIECE)))
        return converse(srv, head.encode(), pieces, timeout=TIMEOUTS.request)

    with ThreadPoolExecutor(6) as pool:  # 4 take every slot, 2 wait for one to be freed
        answers = [first_response(data) for data in pool.map(post, range(6))]
    assert [(a.status, a.body) for a in answers] == [(200, b"ok")] * 6
    assert [r.target for r in raw_origin.requests()] == ["/early"] * 6

    after = request(srv, "GET", "/after", timeout=TIMEOUTS.request)
    assert (after.status, after.body) == (200, b"ok"), (after.status, after.body[:300])
    no_stream_left(srv, cli)


# -- item 11: refused WebSocket upgrades never open one at the app ---------------------------


def _bad_upgrades(netloc: str) -> list[tuple[bytes, tuple[int, ...]]]:
    key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    host = f"Host: {netloc}\r\n"
    post = (
        f"POST /ws/echo HTTP/1.1\r\n{host}{WS_HANDSHAKE}Content-Length: 0\r\n\r\n",
        (405, 400),
    )
    no_key = (
        f"GET /ws/echo HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n",
        (400,),
    )
    old_version = (
        f"GET /ws/echo HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"{key}Sec-WebSocket-Version: 8\r\n\r\n",
        (426,),
    )
    no_upgrade_token = (
        f"GET /ws/echo HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: keep-alive\r\n"
        f"{key}Sec-WebSocket-Version: 13\r\n\r\n",
        (400,),
    )
    kinds = [post, no_key, old_version, no_upgrade_token]
    return [(kinds[i % 4][0].encode(), kinds[i % 4][1]) for i in range(20)]


def test_refused_upgrades_open_no_websocket_at_the_app(
    procs: ProcessPool, local_app: LocalApp
) -> None:
    """#13 item 11: an upgrade the server refuses (wrong method, missing key, old
    version, no upgrade token) never opens a WebSocket to the local app."""
    srv = procs.server()
    procs.client(srv, local_app)
    for head, expected in _bad_upgrades(srv.netloc):
        r = first_response(converse(srv, head))
        assert r.status >= 400, (head, r.status, r.body[:300])
        assert r.status in expected, (head, r.status, r.body[:300])
    assert local_app.count(r"ws-open") == 0, local_app.tail()

    async def valid() -> None:
        req = httpclient.HTTPRequest(
            f"ws://{srv.netloc}/ws/echo",
            connect_timeout=TIMEOUTS.connect,
            request_timeout=TIMEOUTS.connect,
        )
        conn = await websocket_connect(req)
        try:
            greeting = await asyncio.wait_for(conn.read_message(), TIMEOUTS.request)
            assert greeting is not None and json.loads(greeting)["uri"] == "/ws/echo"
        finally:
            conn.close()

    asyncio.run(valid())
    local_app.wait_for(r"ws-open", timeout=TIMEOUTS.request)
    assert local_app.count(r"ws-open") == 1, local_app.tail()


# -- item 13: X-Forwarded-* only from trusted proxies ---------------------------------------

SPOOFED = [
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-For", "6.6.6.6"),
    ("Forwarded", "for=6.6.6.6;host=evil.example"),
]

TRUST = {
    "untrusted": ((), None, False),
    "flag-trusted": (("--trust-forwarded", "127.0.0.0/8"), None, True),
    "env-trusted": ((), {"BACKSTREAM_TRUST_FORWARDED": "127.0.0.1/32"}, True),
    "flag-other-net": (("--trust-forwarded", "10.0.0.0/8"), None, False),
    "env-other-net": ((), {"BACKSTREAM_TRUST_FORWARDED": "10.0.0.0/8"}, False),
}


@pytest.mark.parametrize(("args", "env", "trusted"), TRUST.values(), ids=TRUST.keys())
def test_forwarded_headers_only_from_trusted_proxies(
    procs: ProcessPool,
    local_app: LocalApp,
    args: tuple[str, ...],
    env: dict[str, str] | None,
    trusted: bool,
) -> None:
    """#13 item 13: X-Forwarded-* and Forwarded from the caller are replaced unless the
    caller's address is in --trust-forwarded (or BACKSTREAM_TRUST_FORWARDED)."""
    srv = procs.server(*args, env=env)
    procs.client(srv, local_app)
    r = request(srv, "GET", "/anything", SPOOFED)
    assert r.status == 200, (r.status, r.body[:300])
    j = r.json()
    seen = {
        name: app_headers(j, name)
        for name in ("X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-For", "Forwarded")
    }
    if trusted:
        assert seen == {
            "X-Forwarded-Host": ["evil.example"],
            "X-Forwarded-Proto": ["https"],
            "X-Forwarded-For": ["6.6.6.6, 127.0.0.1"],
            "Forwarded": ["for=6.6.6.6;host=evil.example"],
        }, j["headers"]
    else:
        assert seen == {
            "X-Forwarded-Host": [srv.netloc],
            "X-Forwarded-Proto": ["http"],
            "X-Forwarded-For": ["127.0.0.1"],
            "Forwarded": [],
        }, j["headers"]


# -- item 14: secrets in request targets and headers never reach a log ---------------------

SECRETS = ("SECRETCOOKIE1", "SECRETTOKEN1", "SECRETTOKEN2", "SECRETKEY3")
SECRET_QUERY = "?access_token=SECRETTOKEN1&token=SECRETTOKEN2&api_key=SECRETKEY3"
COOKIE = b"Cookie: session=SECRETCOOKIE1\r\n"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_of_malformed_and_valid_requests_stay_out_of_logs(
    procs: ProcessPool, local_app: LocalApp, fmt: str
) -> None:
    """#13 item 14: at --log-level debug, neither the server nor the client logs a
    cookie or a token from the query string, whatever the request and log format."""
    logging_args = ("--log-level", "debug", "--log-format", fmt)
    srv = procs.server(*logging_args)
    cli = procs.client(srv, local_app, *logging_args)
    bad = f"GET /s{SECRET_QUERY} HTTP/1.1\r\nHost: x\r\n".encode() + COOKIE
    malformed = {
        "control byte": bad + b"X-Bad: a\x01b\r\nConnection: close\r\n\r\n",
        "cl and te": (
            f"POST /s{SECRET_QUERY} HTTP/1.1\r\nHost: x\r\n".encode()
            + COOKIE
            + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"0\r\n\r\n"
        ),
        "no colon": bad + b"ThisHeaderLineHasNoColon\r\nConnection: close\r\n\r\n",
    }
    for name, data in malformed.items():
        r = first_response(raw_request(srv, data))
        assert r.status == 400, (name, r.status, r.body[:300])
    valid = (
        f"GET /anything{SECRET_QUERY} HTTP/1.1\r\nHost: x\r\n".encode()
        + COOKIE
        + b"Connection: close\r\n\r\n"
    )
    r = first_response(raw_request(srv, valid))
    assert r.status == 200, (r.status, r.body[:300])
    assert local_app.hits() == 1

    # Stop both, so that every line they ever wrote has been read.
    for p in (cli, srv):
        p.terminate()
        p.wait_exit(TIMEOUTS.exit)
    for p in (srv, cli):
        output = p.output()
        assert output, p
        leaked = [s for s in SECRETS if s in output]
        assert not leaked, f"{p!r} logged {leaked}:\n{output}"


# -- the metrics port takes no bodies -------------------------------------------------------


def test_metrics_port_never_buffers_a_body(procs: ProcessPool) -> None:
    """The metrics port (scrapes and probes: GET only) refuses a 10 MiB POST before
    buffering it: Tornado's 400, or a close; the server's RSS stays flat."""
    srv = procs.server("--metrics-addr", "127.0.0.1:0")
    port = metrics_port(srv)
    rss0, peak0 = srv.rss_kib(), srv.peak_rss_kib()
    head = f"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MIB}\r\n\r\n"
    answer = converse(port, head.encode(), (PIECE for _ in range(10)))
    grown = (srv.rss_kib() - rss0, srv.peak_rss_kib() - peak0)
    assert max(grown) < 4 * 1024, f"server RSS grew by {grown} KiB (now, peak)"
    assert not answer or first_response(answer).status in (400, 413), answer[:300]
    assert "backstream_streams_in_flight" in metrics_page(port)


# -- item 15: a header block over 64 KiB ----------------------------------------------------


def test_header_block_over_64k_gets_431(procs: ProcessPool, local_app: LocalApp) -> None:
    """#13 item 15: a header block over 64 KiB is answered 431 with a short text body
    (not a connection reset), and never relayed; 40 KiB of headers still work. Past
    Tornado's own limit (256 KiB: 300 KB, 1 MB) too: the answer is read while sending."""
    srv = procs.server()
    procs.client(srv, local_app)
    big = b"X-Big: " + b"abcdefghij" * 7000 + b"\r\n"  # one 70,000-byte value
    data = b"GET /too-big HTTP/1.1\r\nHost: x\r\n" + big + b"Connection: close\r\n\r\n"
    try:
        raw = raw_request(srv, data)
    except ConnectionResetError:
        pytest.fail("connection reset instead of a 431 response")
    assert_short_text(first_response(raw), 431)
    for size in (300_000, 1_000_000):
        big = b"X-Big: " + b"a" * size + b"\r\n"
        data = b"GET /too-big HTTP/1.1\r\nHost: x\r\n" + big + b"Connection: close\r\n\r\n"
        assert_short_text(first_response(converse(srv, data)), 431)

    fill = [(f"X-Fill-{i}", "abcdefghij" * 1000) for i in range(4)]  # 40 KB of headers
    r = request(srv, "GET", "/anything?headers=40k", fill)
    assert r.status == 200, (r.status, r.body[:300])
    assert app_headers(r.json(), "X-Fill-3") == ["abcdefghij" * 1000]
    assert local_app.count(r'hit \S+ "/too-big') == 0, local_app.tail()
    assert local_app.hits() == 1
