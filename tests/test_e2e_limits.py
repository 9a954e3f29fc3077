"""Issue 10, "Limits": every limit of the public server, end to end, with small values.

Real processes on 127.0.0.1 (``backstream serve``, ``backstream client``, the local app
of ``tests/local_app.py``) and, where the exact bytes that reach the origin matter,
``tests/raw_origin.py`` (a raw TCP origin in a thread of this process recording every
byte it receives). Limits are set small by flag (or environment variable) so that
each test takes a few seconds; every wait below is bounded in time and count.

The pure rules behind them (``relay.raw_head_problem``, ``relay.head_problem``,
``relay.strip_hop_by_hop``) are checked directly at the end.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import OriginTunnel
from harness import (
    TIMEOUTS,
    LocalApp,
    ProcessPool,
    Server,
    assert_short_text,
    first_response,
    raw_request,
    request,
    run_cli,
    wait_until,
)
from raw_origin import RawOrigin

from backstream import relay

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
#: Slack on top of a timeout for "it happened in time" (two CPUs, tests run in parallel).
SLACK = 2.5


# -- helpers -----------------------------------------------------------------------------


def read_until_eof(sock: socket.socket, deadline: float) -> tuple[bytes, float]:
    """Everything ``sock`` receives until EOF (or a reset); (bytes, monotonic time of EOF)."""
    out = bytearray()
    while True:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return bytes(out), time.monotonic()
        if not chunk:
            return bytes(out), time.monotonic()
        out += chunk


def connect(srv: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUTS.request)


@pytest.fixture(scope="module")
def origin_tunnel(module_procs: ProcessPool) -> Iterator[OriginTunnel]:
    """One server (with a 1 KiB --max-target) and client relaying to one raw origin."""
    origin = RawOrigin()
    try:
        srv = module_procs.server("--max-target", "1K")
        cli = module_procs.client(srv, origin.url, "--name", "limits")
        yield OriginTunnel(srv, cli, origin)
    finally:
        origin.close()


#: Routes a request of the module's tunnel (it has a name, the server no --domain).
TUNNEL = b"Backstream-Tunnel: limits\r\n"


def sentinel(t: OriginTunnel, name: str) -> None:
    """A request answered by the origin: what the server relayed before it is there now."""
    r = request(t.server, "GET", f"/sentinel-{name}", [("Backstream-Tunnel", "limits")])
    assert (r.status, r.body) == (200, b"ok"), (r.status, r.body[:300])


@pytest.fixture
def request_id(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")


# -- 414: the request target -------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_long_target_gets_414_before_the_origin(
    procs: ProcessPool, raw_origin: RawOrigin, how: str
) -> None:
    """A target over --max-target (BACKSTREAM_MAX_TARGET) is answered 414 with a short
    text body and never reaches the origin; one at the limit is relayed."""
    if how == "flag":
        srv = procs.server("--max-target", "1K")
    else:
        srv = procs.server(env={"BACKSTREAM_MAX_TARGET": "1K"})
    procs.client(srv, raw_origin.url)
    long_target = b"/long?" + b"q" * 1100
    data = b"GET " + long_target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    r = first_response(raw_request(srv, data))
    assert_short_text(r, 414, "target longer than 1024 bytes")
    assert r.header("Connection") == "close", r.headers
    assert raw_origin.total_bytes() == 0, raw_origin.raw()

    fits = "/fits?" + "q" * (1024 - len("/fits?"))
    ok = request(srv, "GET", fits)
    assert (ok.status, ok.body) == (200, b"ok"), (ok.status, ok.body[:300])
    assert [x.target for x in raw_origin.requests()] == [fits]
    lines = [line for line in srv.lines if "status=414" in line]
    assert len(lines) == 1 and "backstream.access" in lines[0], lines
    assert len(lines[0]) < 600, lines[0]  # the huge path is not logged whole


def test_default_max_target_is_8k(procs: ProcessPool, raw_origin: RawOrigin) -> None:
    """Without the flag, 8 KiB targets pass and longer ones get 414."""
    srv = procs.server()
    procs.client(srv, raw_origin.url)
    at_limit = "/d?" + "q" * (8192 - 3)
    assert request(srv, "GET", at_limit).status == 200
    over = (at_limit + "q").encode()
    r = first_response(
        raw_request(srv, b"GET " + over + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )
    assert_short_text(r, 414)
    assert [x.target for x in raw_origin.requests()] == [at_limit]


# -- 408: request heads, and idle connections ----------------------------------------------


def test_slowloris_head_gets_408_within_the_header_timeout(
    procs: ProcessPool, raw_origin: RawOrigin
) -> None:
    """A head that keeps trickling but is not complete within --header-timeout gets
    408 with Connection: close, then the connection is closed; nothing is relayed."""
    srv = procs.server("--header-timeout", "1", "--idle-timeout", "30")
    procs.client(srv, raw_origin.url)
    with connect(srv) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /slowloris HTTP/1.1\r\nHost: x\r\n")
        received = b""
        for i in range(40):  # one header line every 0.1 s: progress does not extend it
            if time.monotonic() - started > 1 + SLACK:
                break
            try:
                sock.sendall(f"X-Trickle-{i}: y\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.1)
            try:
                received = sock.recv(65536)
            except TimeoutError:
                continue
            break
        rest, eof_at = read_until_eof(sock, time.monotonic() + 5)
        received += rest
    r = first_response(received)
    assert_short_text(r, 408, "head timed out")
    assert r.header("Connection") == "close", r.headers
    assert eof_at - started < 1 + SLACK + 2.5, eof_at - started  # + the lingering close
    assert raw_origin.total_bytes() == 0, raw_origin.raw()
    srv.wait_for(r"backstream\.access.*status=408 error='request head not complete within 1s'")


def test_silent_connections_are_closed_quietly(procs: ProcessPool, raw_origin: RawOrigin) -> None:
    """A new connection that sends nothing is closed after --header-timeout, a
    kept-alive one after --idle-timeout, without an answer; a kept-alive connection
    whose next request comes in time (past a header-timeout check) is served."""
    srv = procs.server("--header-timeout", "1", "--idle-timeout", "3")
    procs.client(srv, raw_origin.url)
    with connect(srv) as fresh:
        started = time.monotonic()
        data, eof_at = read_until_eof(fresh, started + 10)
    assert data == b""
    assert 0.8 < eof_at - started < 1 + SLACK, eof_at - started

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUTS.request)
    try:
        assert request(srv, "GET", "/first", conn=conn).body == b"ok"
        time.sleep(1.6)  # idle past one header-timeout check: still within --idle-timeout
        assert request(srv, "GET", "/second", conn=conn).body == b"ok"
        sock = conn.sock
        assert sock is not None
        idle_from = time.monotonic()
        data, eof_at = read_until_eof(sock, idle_from + 10)
    finally:
        conn.close()
    assert data == b""
    assert 2.8 < eof_at - idle_from < 3 + SLACK, eof_at - idle_from
    assert [x.target for x in raw_origin.requests()] == ["/first", "/second"]
    assert srv.count(r"status=408") == 0, srv.tail()


def test_idle_timeout_from_the_environment(procs: ProcessPool, local_app: LocalApp) -> None:
    """BACKSTREAM_IDLE_TIMEOUT and BACKSTREAM_HEADER_TIMEOUT set the same limits."""
    srv = procs.server(env={"BACKSTREAM_IDLE_TIMEOUT": "1", "BACKSTREAM_HEADER_TIMEOUT": "1"})
    procs.client(srv, local_app)
    with connect(srv) as sock:
        sock.sendall(b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        data, eof_at = read_until_eof(sock, started + 10)
    assert first_response(data).status == 200
    assert eof_at - started < 1 + SLACK, eof_at - started
    with connect(srv) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /anything HTTP/1.1\r\n")
        data, eof_at = read_until_eof(sock, started + 10)
    assert_short_text(first_response(data), 408)


# -- 408: request bodies -------------------------------------------------------------------


def test_stalled_body_gets_408_and_the_upload_is_reset(
    procs: ProcessPool, local_app: LocalApp
) -> None:
    """A body that stops arriving for --body-timeout gets 408 (Connection: close); the
    tunnel stream is reset, so the local app's transfer ends too."""
    srv = procs.server("--body-timeout", "1")
    procs.client(srv, local_app)
    with connect(srv) as sock:
        sock.sendall(
            b"POST /upload?notify=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
            + b"b" * 1000
        )
        local_app.wait_for(r'upload-data "/upload\?notify=1"', TIMEOUTS.request)
        started = time.monotonic()
        data, eof_at = read_until_eof(sock, started + 10)
    r = first_response(data)
    assert_short_text(r, 408, "body timed out")
    assert r.header("Connection") == "close", r.headers
    assert eof_at - started < 1 + SLACK, eof_at - started
    local_app.wait_for(r'closed POST "/upload\?notify=1"', TIMEOUTS.request)
    srv.wait_for(r"backstream\.access: POST /upload stream=\d+ status=408 error='no request body")


def test_slow_upload_that_keeps_moving_is_not_cut(procs: ProcessPool, local_app: LocalApp) -> None:
    """The body timeout is an idle time, not a total: 12 pieces 0.4 s apart (4.8 s in
    all, --body-timeout 1) arrive whole."""
    srv = procs.server("--body-timeout", "1")
    procs.client(srv, local_app)
    piece = b"m" * 4096

    def pieces() -> Iterator[bytes]:
        for _ in range(12):
            yield piece
            time.sleep(0.4)

    r = request(srv, "POST", "/upload", [("Content-Length", str(12 * len(piece)))], pieces())
    assert r.status == 200, (r.status, r.body[:300])
    assert r.json()["len"] == 12 * len(piece)


class SlowReader:
    """An origin that reads a request head, then nothing for ``pause`` seconds, then
    the body (``Content-Length``), and answers 200: the tunnel's credit runs out."""

    def __init__(self, pause: float) -> None:
        self.pause = pause
        self.stop = threading.Event()
        self.received: list[int] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buf = b""
        deadline = time.monotonic() + 60
        while b"\r\n\r\n" not in buf and time.monotonic() < deadline:
            try:
                buf += conn.recv(65536)
            except TimeoutError:
                continue
        head, _, body = buf.partition(b"\r\n\r\n")
        found = re.search(rb"(?i)content-length: *(\d+)", head)
        length = int(found.group(1)) if found else 0
        self.stop.wait(self.pause)
        got = len(body)
        while got < length and time.monotonic() < deadline and not self.stop.is_set():
            try:
                chunk = conn.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                break
            got += len(chunk)
        self.received.append(got)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


def test_waiting_for_credit_is_not_caller_idleness(procs: ProcessPool) -> None:
    """While the server waits for the tunnel's credit (the origin does not read for
    3 s), the caller is not idle: a 16 MiB upload with --body-timeout 1 succeeds."""
    origin = SlowReader(pause=3.0)
    try:
        srv = procs.server("--body-timeout", "1")
        procs.client(srv, origin.url)
        size = 16 * MIB
        body = (b"c" * MIB for _ in range(size // MIB))
        r = request(srv, "POST", "/credit", [("Content-Length", str(size))], body)
        assert (r.status, r.body) == (200, b"ok"), (r.status, r.body[:300])
        assert origin.received == [size]
        assert srv.count(r"status=408") == 0, srv.tail()
    finally:
        origin.close()


# -- 503: connections, streams, clients ----------------------------------------------------


def test_connections_beyond_the_limit_get_503(procs: ProcessPool, local_app: LocalApp) -> None:
    """With --max-connections 5, a sixth public connection gets a short 503 with
    Retry-After: 1 and is closed; once one of the five closes, new ones are served."""
    srv = procs.server("--max-connections", "5")
    procs.client(srv, local_app)  # upgraded: the tunnel does not count
    held = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUTS.request)]
    held += [
        http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUTS.request)
        for _ in range(4)
    ]
    try:
        for i, conn in enumerate(held):
            assert request(srv, "GET", f"/anything?held={i}", conn=conn).status == 200
        data = raw_request(srv, b"GET /sixth HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r = first_response(data)
        assert_short_text(r, 503, "too many connections")
        assert r.header("Retry-After") == "1", r.headers
        assert r.header("Connection") == "close", r.headers
        assert local_app.count(r'hit GET "/sixth"') == 0
        srv.wait_for(
            r"backstream\.access: - - stream=- status=503 error='the server has its "
            r"maximum of 5 connections open'"
        )
        held.pop().close()

        def served() -> bool:
            data = raw_request(srv, b"GET /later HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return first_response(data).status == 200

        wait_until(served, timeout=10, interval=0.1)
    finally:
        for conn in held:
            conn.close()


@pytest.mark.parametrize("members", [1, 2])
def test_streams_beyond_the_limit_get_503_tunnel_busy(
    procs: ProcessPool, local_app: LocalApp, members: int
) -> None:
    """With --max-streams 2, once every client of the tunnel has 2 requests in flight
    the next request gets 503 "tunnel busy" at once (not a queue); afterwards the
    tunnel serves again."""
    srv = procs.server("--max-streams", "2")
    for _ in range(members):
        procs.client(srv, local_app)
    wait_until(lambda: srv.count(r"client connected") == members)
    slots = 2 * members
    with ThreadPoolExecutor(slots) as pool:
        slow = [pool.submit(request, srv, "GET", f"/slow?delay=4&n={i}") for i in range(slots)]
        wait_until(lambda: local_app.stats()["slow_inflight"] == slots, timeout=10)
        t0 = time.monotonic()
        busy = request(srv, "GET", "/anything?busy=1")
        assert time.monotonic() - t0 < 2, "answered at once, not queued"
        assert busy.status == 503, (busy.status, busy.body[:300])
        assert b"tunnel is busy" in busy.body, busy.body
        assert [f.result(timeout=TIMEOUTS.request).status for f in slow] == [200] * slots
    assert local_app.count(r'hit GET "/anything\?busy=1"') == 0
    assert request(srv, "GET", "/anything?after=1").status == 200
    srv.wait_for(r"status=503 error='tunnel \(default\): every client has 2 streams in flight'")


def test_clients_beyond_the_limit_are_refused_with_503(procs: ProcessPool) -> None:
    """With --max-clients 1 a second client's handshake gets 503 with a clear body; it
    logs it and retries with backoff, and connects once the first one left."""
    app_a, app_b = procs.local_app(), procs.local_app()
    srv = procs.server("--max-clients", "1")
    first = procs.client(srv, app_a)
    second = procs.client(srv, app_b, "--max-backoff", "1", wait=False)
    second.wait_for(r"status=503 this server has its maximum of 1 clients connected", 20)
    second.wait_for(r"reconnecting in", 10)
    assert second.connected_count() == 0
    assert request(srv, "GET", "/anything").status == 200
    assert (app_a.hits(), app_b.hits()) == (1, 0)
    first.kill()
    second.wait_connected(timeout=TIMEOUTS.reconnect)
    wait_until(lambda: request(srv, "GET", "/anything").status == 200, timeout=10)
    assert app_b.hits() >= 1
    srv.wait_for(r"refused tunnel client .*status=503: this server has its maximum of 1")


def test_limit_flags_are_documented_with_defaults() -> None:
    """Each limit has a flag whose help names its default; a bad value exits 2."""
    out = run_cli("serve", "--help").stdout
    text = " ".join(out.split())
    for flag, default in [
        ("--max-target", "8K"),
        ("--header-timeout", "10"),
        ("--idle-timeout", "60"),
        ("--body-timeout", "30"),
        ("--max-connections", "10000"),
        ("--max-streams", "1000"),
        ("--max-clients", "1000"),
    ]:
        assert re.search(re.escape(flag) + r" \S+ .*?\(default: " + re.escape(default), text), flag
    bad = run_cli("serve", "--max-connections", "-3")
    assert bad.returncode == 2 and "whole number" in bad.stderr, bad.stderr


# -- framing that never reaches the origin ---------------------------------------------------

MALFORMED = {
    "obs-fold-space": b"X-Folded: a\r\n b\r\n",
    "obs-fold-tab": b"X-Folded: a\r\n\tb\r\n",
    "nul-in-value": b"X-Nul: a\x00b\r\n",
    "cr-in-value": b"X-Cr: a\rb\r\n",
    "lf-in-value": b"X-Lf: a\nb\r\n",
    "two-hosts": b"Host: y\r\n",
}


@pytest.mark.parametrize("line", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_head_gets_400_and_nothing_reaches_the_origin(
    origin_tunnel: OriginTunnel, line: bytes, request_id: str
) -> None:
    """obs-fold, NUL/CR/LF in a value, several Host headers: 400 with a short text
    body, and the origin receives not one byte of it."""
    t = origin_tunnel
    marker = f"/malformed-{request_id}".encode()
    before = t.origin.total_bytes()
    head = b"GET " + marker + b" HTTP/1.1\r\nHost: x\r\n" + TUNNEL + line
    r = first_response(raw_request(t.server, head + b"Connection: close\r\n\r\n"))
    assert_short_text(r, 400)
    sentinel(t, request_id)
    assert not any(marker in conn for conn in t.origin.raw()), t.origin.raw()
    assert t.origin.total_bytes() > before  # the sentinel only
    assert t.server.count(r"Traceback|Uncaught exception") == 0, t.server.tail()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /bare-lf HTTP/1.1\nHost: x\nBackstream-Tunnel: limits\nConnection: close\n\n",
        b"GET /bare-lf-last HTTP/1.1\r\nHost: x\r\nBackstream-Tunnel: limits\r\n"
        b"Connection: close\r\n\n",
        b"GET /bare-lf-start HTTP/1.1\nHost: x\r\nBackstream-Tunnel: limits\r\n"
        b"Connection: close\r\n\r\n",
    ],
    ids=["all", "last-line", "request-line"],
)
def test_bare_lf_line_endings_get_400(
    origin_tunnel: OriginTunnel, head: bytes, request_id: str
) -> None:
    """Lines ending in a bare LF (RFC 9112 2.2): 400, nothing relayed."""
    t = origin_tunnel
    target = head.split(b" ")[1]
    r = first_response(raw_request(t.server, head))
    assert_short_text(r, 400, "LF without CR")
    sentinel(t, request_id)
    assert not any(target in conn for conn in t.origin.raw()), t.origin.raw()


def test_connection_header_cannot_strip_credentials_or_forwarding(
    origin_tunnel: OriginTunnel,
) -> None:
    """``Connection`` may name the caller's own hop-by-hop headers (X-Hop is dropped),
    but never Authorization, Cookie, Host or the forwarding headers the server adds."""
    t = origin_tunnel
    named = "Authorization, Cookie, Host, X-Forwarded-For, X-Forwarded-Host, Via, X-Hop"
    r = request(
        t.server,
        "GET",
        "/connection-named",
        [
            ("Host", "app.example"),
            ("Backstream-Tunnel", "limits"),
            ("Authorization", "Bearer app-token"),
            ("Cookie", "session=1"),
            ("X-Hop", "1"),
            ("Connection", named),
        ],
    )
    assert (r.status, r.body) == (200, b"ok"), (r.status, r.body[:300])
    got = next(x for x in t.origin.requests() if x.target == "/connection-named")
    assert got.header_all("Authorization") == ["Bearer app-token"], got.headers
    assert got.header_all("Cookie") == ["session=1"], got.headers
    assert got.header_all("Host") == ["app.example"], got.headers
    assert got.header_all("X-Forwarded-For") == ["127.0.0.1"], got.headers
    assert got.header_all("X-Forwarded-Host") == ["app.example"], got.headers
    assert got.header_all("X-Forwarded-Proto") == ["http"], got.headers
    assert got.header_all("Via") == [relay.VIA], got.headers
    assert got.header_all("X-Hop") == [] and got.header_all("Connection") == [], got.headers


def test_tunnel_credentials_are_never_forwarded(origin_tunnel: OriginTunnel) -> None:
    """Proxy-Authorization, Backstream-Tunnel and Backstream-Token never reach the app."""
    t = origin_tunnel
    r = request(
        t.server,
        "GET",
        "/tunnel-credentials",
        [
            ("Backstream-Tunnel", "limits"),
            ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
            ("Backstream-Token", "tunnel-secret"),
            ("Connection", "keep-alive"),
        ],
    )
    assert (r.status, r.body) == (200, b"ok"), (r.status, r.body[:300])
    raw = b"".join(t.origin.raw())
    assert b"/tunnel-credentials" in raw
    for secret in (b"cHJveHk6c2VjcmV0", b"tunnel-secret", b"Backstream-Tunnel", b"Proxy-Auth"):
        assert secret.lower() not in raw.lower(), (secret, raw[-600:])


# -- the pure rules ------------------------------------------------------------------------

HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    ("head", "problem"),
    [
        (HEAD + b"\r\n", None),
        (b"\r\n" + HEAD + b"\r\n", None),  # an empty line before the request: ignored
        (HEAD + b"X-Obs: \xe9t\xe9\tok\r\n\r\n", None),  # obs-text and HTAB are allowed
        (b"GET / HTTP/1.1\nHost: x\r\n\r\n", "LF without CR"),
        (HEAD + b"\n", "LF without CR"),
        (HEAD + b"X: a\rb\r\n\r\n", "CR not followed by LF"),
        (HEAD + b"X: a\r\n b\r\n\r\n", "folding"),
        (HEAD + b" X: a\r\n\r\n", "folding"),
        (HEAD + b"X: a\x00b\r\n\r\n", "control character"),
        (HEAD + b"X: a\x7fb\r\n\r\n", "control character"),
        (b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", "control character"),
    ],
)
def test_raw_head_problem(head: bytes, problem: str | None) -> None:
    found = relay.raw_head_problem(head)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found, found


def test_head_problem_target_and_hosts() -> None:
    pairs = [("Host", "x")]
    assert relay.head_problem("GET", "/" + "a" * 8191, pairs, handshake=False) is None
    assert relay.head_problem("GET", "/" + "a" * 8192, pairs, handshake=False) == (
        414,
        "request target longer than 8192 bytes",
    )
    assert relay.head_problem("GET", "/" * 9000, pairs, handshake=False, max_target=0) is None
    two = [("Host", "x"), ("host", "y")]
    assert relay.head_problem("GET", "/", two, handshake=False) == (
        400,
        "more than one Host header",
    )


def test_connection_named_headers_keep_protected_ones() -> None:
    headers = [
        ("Connection", "authorization, COOKIE, host, forwarded, via, x-forwarded-for, x-hop"),
        ("Authorization", "a"),
        ("Cookie", "c"),
        ("Host", "h"),
        ("Forwarded", "for=1.2.3.4"),
        ("Via", "1.0 other"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Hop", "dropped"),
        ("Proxy-Authorization", "dropped"),
    ]
    kept = relay.strip_hop_by_hop(headers)
    assert [name for name, _ in kept] == [
        "Authorization",
        "Cookie",
        "Host",
        "Forwarded",
        "Via",
        "X-Forwarded-For",
    ]
