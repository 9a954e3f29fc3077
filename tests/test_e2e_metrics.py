"""Server metrics and health (issue 11), end to end: ``serve --metrics-addr``.

Real servers, clients and local apps on 127.0.0.1. The metrics port is scraped
with an HTTP client and parsed with ``prometheus_client.parser``, the way
Prometheus reads it; every count is asserted as the difference between two
scrapes, so nothing depends on what the server counted before. Tunnel
handshakes that only need the server's answer are made by the test itself
(``handshake``/``hold``), which is much cheaper than a client process.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import (
    TIMEOUTS,
    Client,
    ProcessPool,
    Response,
    Server,
    raw_request,
    request,
    run_cli,
    stream_request,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from tornado import httpclient
from tornado.websocket import websocket_connect

from backstream.protocol import CLIENT_HEADER, PROTOCOL_VERSION

pytestmark = pytest.mark.timeout(120)

DOMAIN = "tunnel.test"
METRICS_URL = re.compile(r"metrics url=http://127\.0\.0\.1:(\d+)/metrics")
#: A tunnel handshake as the client sends it (RFC 6455 section 1.3 sample key).
TUNNEL_HANDSHAKE = [
    (CLIENT_HEADER, str(PROTOCOL_VERSION)),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- helpers -----------------------------------------------------------------------------


def metrics_server(procs: ProcessPool, *args: str, env: dict[str, str] | None = None) -> Server:
    """A server with ``--metrics-addr 127.0.0.1:0`` (unless ``env`` gives one), once
    its metrics port is listening."""
    flags = () if env and "BACKSTREAM_METRICS_ADDR" in env else ("--metrics-addr", "127.0.0.1:0")
    srv = procs.server(*flags, *args, env=env)
    metrics_port(srv)
    return srv


def metrics_port(srv: Server) -> int:
    """The metrics port ``srv`` logged (``metrics url=...``)."""
    return int(srv.wait_for(METRICS_URL).group(1))


def metrics_get(srv: Server, path: str) -> Response:
    return request(("127.0.0.1", metrics_port(srv)), "GET", path)


def scrape(srv: Server) -> Samples:
    """Every sample of ``/metrics``, by name and sorted labels."""
    r = metrics_get(srv, "/metrics")
    assert r.status == 200, (r.status, r.body[:300])
    assert (r.header("Content-Type") or "").startswith("text/plain"), r.headers
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent, as for a series not created yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_of(samples: Samples, tunnel: str, code: str) -> float:
    return value(samples, "backstream_requests_total", tunnel=tunnel, code=code)


def tunnels_in(samples: Samples) -> set[str]:
    """The tunnel labels of ``backstream_requests_total``."""
    return {
        dict(labels)["tunnel"] for name, labels in samples if name == "backstream_requests_total"
    }


def via(
    srv: Server,
    name: str | None,
    method: str = "GET",
    path: str = "/anything",
    body: bytes | None = None,
) -> Response:
    """A request to tunnel ``name`` by Host (``None``: the bare domain, the default tunnel)."""
    host = f"{name}.{DOMAIN}" if name is not None else DOMAIN
    return request(srv, method, path, [("Host", host)], body)


def _handshake_headers(
    srv: Server, name: str | None, auth: str | None, version: str | None = None
) -> list[tuple[str, str]]:
    headers = [("Host", srv.netloc), *TUNNEL_HANDSHAKE]
    if version is not None:
        headers[1] = (CLIENT_HEADER, version)
    if name is not None:
        headers.append(("Backstream-Name", name))
    if auth is not None:
        headers.append(("Authorization", auth))
    return headers


def handshake(
    srv: Server, name: str | None, *, auth: str | None = None, version: str | None = None
) -> int:
    """One tunnel handshake from the test, closed at once; returns its status."""
    conn, resp = stream_request(srv, "GET", "/", _handshake_headers(srv, name, auth, version))
    try:
        if resp.status != 101:
            resp.read()
        return resp.status
    finally:
        conn.close()


@contextmanager
def hold(srv: Server, name: str | None, *, auth: str | None = None) -> Iterator[None]:
    """A granted tunnel handshake (101) kept open until the block ends."""
    conn, resp = stream_request(srv, "GET", "/", _handshake_headers(srv, name, auth))
    try:
        assert resp.status == 101, (resp.status, resp.read())
        yield
    finally:
        conn.close()


async def _websocket_status(srv: Server, path: str) -> int:
    """Open a public WebSocket to ``path`` and close it; the status of the upgrade."""
    req = httpclient.HTTPRequest(
        f"ws://127.0.0.1:{srv.port}{path}",
        connect_timeout=TIMEOUTS.connect,
        request_timeout=TIMEOUTS.connect,
    )
    try:
        conn = await websocket_connect(req)
    except httpclient.HTTPClientError as e:
        return e.code
    await asyncio.wait_for(conn.read_message(), TIMEOUTS.request)  # the app's greeting
    conn.write_message(b"x" * 1000, binary=True)
    await asyncio.wait_for(conn.read_message(), TIMEOUTS.request)  # its echo
    conn.close(1000)
    return 101


async def _clean_tunnel_client(srv: Server) -> None:
    """A tunnel client that connects and leaves with a closing handshake (code 1000)."""
    req = httpclient.HTTPRequest(
        f"ws://127.0.0.1:{srv.port}/",
        headers=dict(TUNNEL_HANDSHAKE[:1]),
        connect_timeout=TIMEOUTS.connect,
        request_timeout=TIMEOUTS.connect,
    )
    conn = await websocket_connect(req)
    conn.close(1000, "done")
    await asyncio.wait_for(conn.read_message(), TIMEOUTS.request)  # None once closed


# -- what is counted ---------------------------------------------------------------------


def test_requests_and_bytes_are_counted_while_traffic_flows(procs: ProcessPool) -> None:
    """A bounded loop of requests runs in a thread while the test scrapes: every scrape
    parses and no counter goes down; at the end each counter moved by exactly what was
    sent: 2xx and 4xx from the local app under the tunnel's name, 404 for an unknown
    name and a request refused before routing (ambiguous framing, 400) under ``other``,
    503 for the default tunnel (no client) under ``-``; body bytes at least what went
    each way, one duration per HTTP request. The public port forwards ``/metrics`` to
    the local app like any path."""
    app = procs.local_app()
    srv = metrics_server(procs, "--domain", DOMAIN)
    procs.client(srv, app, "--name", "app")
    before = scrape(srv)
    ok, missing, uploads, downloads, unknown, no_client = 20, 5, 4, 3, 3, 2
    upload_size, download_size = 30_000, 50_000
    failures: list[str] = []

    def traffic() -> None:
        try:
            for i in range(ok):
                assert via(srv, "app", path=f"/anything?i={i}").status == 200
            for _ in range(missing):
                assert via(srv, "app", path="/status/404").status == 404
            for _ in range(uploads):
                r = via(srv, "app", "POST", "/upload", b"u" * upload_size)
                assert r.status == 200 and r.json()["len"] == upload_size
            for _ in range(downloads):
                r = via(srv, "app", path=f"/download?size={download_size}")
                assert r.status == 200 and len(r.body) == download_size
            for _ in range(unknown):
                assert via(srv, "nobody").status == 404
            for _ in range(no_client):
                assert via(srv, None).status == 503
        except BaseException as e:  # reported by the main thread
            failures.append(repr(e))

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    previous = before
    for _ in range(200):  # scrapes while the traffic flows, bounded in count and time
        current = scrape(srv)
        for key, old in previous.items():
            if key[0].endswith("_total") and key in current:
                assert current[key] >= old, (key, old, current[key])
        previous = current
        worker.join(0.02)
        if not worker.is_alive():
            break
    worker.join(TIMEOUTS.request)
    assert not worker.is_alive() and not failures, failures
    smuggled = raw_request(
        srv,
        f"POST / HTTP/1.1\r\nHost: app.{DOMAIN}\r\nContent-Length: 3\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n".encode(),
    )
    assert smuggled.startswith(b"HTTP/1.1 400 "), smuggled[:100]

    after = scrape(srv)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    app_total = ok + missing + uploads + downloads
    assert delta("backstream_requests_total", tunnel="app", code="2xx") == app_total - missing
    assert delta("backstream_requests_total", tunnel="app", code="4xx") == missing
    assert delta("backstream_requests_total", tunnel="other", code="4xx") == unknown + 1
    assert delta("backstream_requests_total", tunnel="-", code="5xx") == no_client
    assert tunnels_in(after) <= {"app", "other", "-"}, tunnels_in(after)
    assert delta("backstream_received_bytes_total", tunnel="app") >= uploads * upload_size
    assert delta("backstream_sent_bytes_total", tunnel="app") >= downloads * download_size
    count = "backstream_request_duration_seconds_count"
    assert delta(count, tunnel="app") == app_total
    assert delta("backstream_request_duration_seconds_bucket", tunnel="app", le="+Inf") == (
        app_total
    )
    assert delta("backstream_request_duration_seconds_sum", tunnel="app") > 0
    assert value(after, "backstream_build_info", version="0.1.0") == 1
    assert value(after, "process_resident_memory_bytes") > 0

    # The public port is the local app's, /metrics included; the metrics port is not.
    r = via(srv, "app", path="/metrics")
    assert r.status == 200 and r.json()["uri"] == "/metrics", r.body[:200]
    assert b"backstream_" not in r.body
    app.wait_for(r'hit GET "/metrics"')
    assert metrics_get(srv, "/anything").status == 404


def test_websocket_upgrades_are_counted(procs: ProcessPool) -> None:
    """A public WebSocket the local app accepts counts as one ``1xx`` request (its
    101), one it refuses (403) as ``4xx``, under the tunnel they went to; the
    streams-in-flight gauge is back to 0 once they are closed."""
    app = procs.local_app()
    srv = metrics_server(procs)
    procs.client(srv, app)
    before = scrape(srv)
    assert asyncio.run(_websocket_status(srv, "/ws/echo")) == 101
    assert asyncio.run(_websocket_status(srv, "/ws/echo?again=1")) == 101
    assert asyncio.run(_websocket_status(srv, "/ws/refuse")) == 403
    after = scrape(srv)
    assert requests_of(after, "-", "1xx") - requests_of(before, "-", "1xx") == 2
    assert requests_of(after, "-", "4xx") - requests_of(before, "-", "4xx") == 1
    for name in ("backstream_received_bytes_total", "backstream_sent_bytes_total"):
        assert value(after, name, tunnel="-") - value(before, name, tunnel="-") >= 2 * 1000
    wait_until(lambda: value(scrape(srv), "backstream_streams_in_flight", tunnel="-") == 0)


def test_gauges_follow_clients_and_streams(procs: ProcessPool) -> None:
    """Connected clients and tunnels go up as clients connect and down as they leave;
    a named tunnel whose client left is counted as reserved (``--name-grace``); a
    request held open by the local app is one stream in flight; connects and
    disconnects are counted, a killed client as ``lost``, one that closes the
    WebSocket as ``closed``."""
    app = procs.local_app()
    srv = metrics_server(procs)
    start = scrape(srv)
    assert value(start, "backstream_clients_connected") == 0
    assert value(start, "backstream_tunnels_connected") == 0

    procs.client(srv, app)
    named = procs.client(srv, app, "--name", "named")
    now = scrape(srv)
    assert value(now, "backstream_clients_connected") == 2
    assert value(now, "backstream_tunnels_connected") == 2
    assert value(now, "backstream_tunnels_reserved") == 0
    connects = "backstream_client_connects_total"
    assert value(now, connects) - value(start, connects) == 2

    conn, resp = stream_request(srv, "GET", "/drip?token=held")
    try:
        assert resp.status == 200 and resp.readline() == b"first\n"
        held = scrape(srv)
        assert value(held, "backstream_streams_in_flight", tunnel="-") == 1
        app.release("held")
        assert resp.read() == b"last\n"
    finally:
        conn.close()
    wait_until(lambda: value(scrape(srv), "backstream_streams_in_flight", tunnel="-") == 0)

    named.kill()

    def named_left() -> Samples | None:
        samples = scrape(srv)
        return samples if value(samples, "backstream_clients_connected") == 1 else None

    gone = wait_until(named_left)
    assert value(gone, "backstream_tunnels_connected") == 1
    assert value(gone, "backstream_tunnels_reserved") == 1  # "named" is kept for its owner
    lost = ("backstream_client_disconnects_total", (("reason", "lost"),))
    assert gone[lost] - start[lost] == 1

    asyncio.run(_clean_tunnel_client(srv))
    closed = ("backstream_client_disconnects_total", (("reason", "closed"),))
    wait_until(lambda: scrape(srv)[closed] - start[closed] == 1)
    final = scrape(srv)
    assert value(final, connects) - value(start, connects) == 3
    assert value(final, "backstream_clients_connected") == 1


CLIENT_POLICY = """\
package auth.client

import rego.v1

default allow := false

allow if input.header.Authorization in {"Bearer token-a", "Bearer token-b"}
"""

SERVER_POLICY = """\
package auth.server

import rego.v1

default allow := false

allow if not startswith(input.path, "/private")
"""


def test_policy_decisions_and_client_refusals(procs: ProcessPool, tmp_path: Path) -> None:
    """Each ``auth.client`` and ``auth.server`` decision is counted by result; each
    refused tunnel handshake by reason: a protocol version mismatch, an invalid
    name (both before any policy), a token the policy denies, a name held by other
    credentials (409), a server holding ``--max-tunnels`` names (503)."""
    (tmp_path / "client.rego").write_text(CLIENT_POLICY, encoding="utf-8")
    (tmp_path / "server.rego").write_text(SERVER_POLICY, encoding="utf-8")
    srv = metrics_server(procs, "-p", str(tmp_path), "--max-tunnels", "2")
    before = scrape(srv)
    a, b = "Bearer token-a", "Bearer token-b"
    with hold(srv, "x", auth=a), hold(srv, "y", auth=a):
        assert handshake(srv, "x", auth=a, version="999") == 400
        assert handshake(srv, "-bad-", auth=a) == 400
        assert handshake(srv, "x", auth="Bearer wrong") == 403
        assert handshake(srv, "x", auth=b) == 409
        assert handshake(srv, "z", auth=a) == 503
        for _ in range(3):  # allowed, then no client for the default tunnel
            assert request(srv, "GET", "/open").status == 503
        for _ in range(2):
            assert request(srv, "GET", "/private/x").status == 403
        after = scrape(srv)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    decisions = "backstream_policy_decisions_total"
    assert delta(decisions, package="auth.client", result="allow") == 4  # x, y, 409, 503
    assert delta(decisions, package="auth.client", result="deny") == 1
    assert delta(decisions, package="auth.client", result="error") == 0
    assert delta(decisions, package="auth.server", result="allow") == 3
    assert delta(decisions, package="auth.server", result="deny") == 2
    refusals = "backstream_client_refusals_total"
    expected = {
        "version": 1,
        "bad_name": 1,
        "denied": 1,
        "name_in_use": 1,
        "server_full": 1,
        "policy_error": 0,
        "token": 0,
    }
    assert {reason: delta(refusals, reason=reason) for reason in expected} == expected
    assert delta("backstream_client_connects_total") == 2
    assert delta("backstream_requests_total", tunnel="-", code="5xx") == 3
    assert delta("backstream_requests_total", tunnel="-", code="4xx") == 2


def test_tunnel_labels_above_the_cap_fold_into_other(procs: ProcessPool) -> None:
    """With ``--metrics-max-tunnels 1`` the first name gets series of its own and the
    second counts as ``other``; once the first name is released (``--name-grace 0``)
    its series go at the next scrape and the slot is free for another name."""
    app = procs.local_app()
    srv = metrics_server(
        procs, "--domain", DOMAIN, "--name-grace", "0", "--metrics-max-tunnels", "1"
    )
    first = procs.client(srv, app, "--name", "first")
    procs.client(srv, app, "--name", "second")
    before = scrape(srv)
    for _ in range(3):
        assert via(srv, "first").status == 200
    for _ in range(2):
        assert via(srv, "second").status == 200
    after = scrape(srv)
    assert requests_of(after, "first", "2xx") - requests_of(before, "first", "2xx") == 3
    assert requests_of(after, "other", "2xx") - requests_of(before, "other", "2xx") == 2
    assert "second" not in tunnels_in(after)
    assert value(after, "backstream_streams_in_flight", tunnel="first") == 0

    first.kill()
    wait_until(lambda: "first" not in tunnels_in(scrape(srv)))
    assert via(srv, "second").status == 200
    last = scrape(srv)
    assert requests_of(last, "second", "2xx") == 1
    assert requests_of(last, "other", "2xx") == requests_of(after, "other", "2xx")


# -- health ------------------------------------------------------------------------------


def test_health_and_readiness(procs: ProcessPool) -> None:
    """``/healthz`` is 200 ``ok``; ``/readyz`` is 200 once the server listens, and
    with ``--ready-needs-client`` (here from its environment variable) 503 with a
    reason until a tunnel client is connected, and again once it left. The address
    comes from ``BACKSTREAM_METRICS_ADDR`` as well as from the flag."""
    plain = metrics_server(procs, env={"BACKSTREAM_METRICS_ADDR": "127.0.0.1:0"})
    r = metrics_get(plain, "/healthz")
    assert (r.status, r.body) == (200, b"ok\n")
    r = metrics_get(plain, "/readyz")
    assert (r.status, r.body) == (200, b"ok\n")
    port = ("127.0.0.1", metrics_port(plain))
    r = request(port, "GET", "/metrics", [("Accept-Encoding", "gzip")])
    assert r.header("Content-Encoding") == "gzip"  # as Prometheus asks for it
    families = text_string_to_metric_families(gzip.decompress(r.body).decode())
    assert "backstream_requests" in {family.name for family in families}

    app = procs.local_app()
    srv = metrics_server(procs, env={"BACKSTREAM_READY_NEEDS_CLIENT": "true"})
    assert metrics_get(srv, "/healthz").status == 200
    r = metrics_get(srv, "/readyz")
    assert r.status == 503 and r.body == b"no tunnel client connected\n", (r.status, r.body)
    cli: Client = procs.client(srv, app)
    wait_until(lambda: metrics_get(srv, "/readyz").status == 200)
    cli.kill()
    wait_until(lambda: metrics_get(srv, "/readyz").status == 503)


def test_ready_needs_client_requires_the_metrics_port() -> None:
    """``--ready-needs-client`` alone is a mistake (there is no /readyz): exit code 2."""
    result = run_cli("serve", "-a", "127.0.0.1:0", "--ready-needs-client")
    assert result.returncode == 2, result
    assert "--ready-needs-client needs --metrics-addr" in result.stderr
    result = run_cli("serve", "-a", "127.0.0.1:0", "--metrics-addr", "nowhere")
    assert result.returncode == 2, result


def test_metrics_port_taken_is_a_clear_error(procs: ProcessPool) -> None:
    """A metrics address that cannot be bound ends the server with one line, exit 1."""
    srv = metrics_server(procs)
    taken = f"127.0.0.1:{metrics_port(srv)}"
    result = run_cli("serve", "-a", "127.0.0.1:0", "--metrics-addr", taken)
    assert result.returncode == 1, result
    assert "for metrics" in result.stderr and "Traceback" not in result.stderr
