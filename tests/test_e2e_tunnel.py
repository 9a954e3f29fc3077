"""Issue 2, the tunnel endpoint itself: version handshake, misbehaving tunnel peers,
request body limits. Talks to the server's WebSocket directly where needed."""

from __future__ import annotations

import asyncio

import pytest
from harness import (
    TIMEOUTS,
    ProcessPool,
    Server,
    pattern_chunks,
    request,
)
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

pytestmark = pytest.mark.timeout(90)

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _handshake(srv: Server, version: str | None) -> tuple[int, bytes]:
    headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", WS_KEY),
    ]
    if version is not None:
        headers.append(("Backstream-Client", version))
    r = request(srv, "GET", "/", headers, timeout=10)
    return r.status, r.body


def test_protocol_version_mismatch_refused_with_clear_message(server: Server) -> None:
    code, body = _handshake(server, "99")
    assert code == 400, (code, body)
    assert b"version" in body.lower(), body
    assert b"99" in body, body


async def _garbage_tunnel(url: str, payloads: list[bytes]) -> str:
    conn = await websocket_connect(
        HTTPRequest(url, headers={"Backstream-Client": "1"}, connect_timeout=10)
    )
    for p in payloads:
        await conn.write_message(p, binary=True)
    # the server must close this tunnel (protocol error), not crash
    msg = await asyncio.wait_for(_drain(conn), TIMEOUTS.request)
    return msg


async def _drain(conn: object) -> str:
    while True:
        m = await conn.read_message()  # type: ignore[attr-defined]
        if m is None:
            return f"closed code={conn.close_code}"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "payloads",
    [
        [b"\x00"],
        [b"\xff" * 64],
        [b"garbage frame that is not a frame at all" * 10],
        [b"\x01\x00\x00\x00\x01" + b"\x00" * 3],
    ],
    ids=["one-byte", "ff", "text", "short-header"],
)
def test_garbage_tunnel_peer_dropped_server_keeps_serving(
    procs: ProcessPool, payloads: list[bytes]
) -> None:
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)
    ws_url = srv.url.replace("http://", "ws://") + "/"
    try:
        outcome = asyncio.run(_garbage_tunnel(ws_url, payloads))
    except HTTPClientError as e:  # refused at handshake: acceptable too
        outcome = f"refused {e.code}"
    print(f"garbage tunnel peer: {outcome}")
    assert srv.alive()
    statuses = [request(srv, "GET", f"/after-garbage/{i}").status for i in range(6)]
    assert statuses == [200] * 6
    assert app.hits() == 6
    assert "Traceback" not in srv.output()


def test_max_body_size_413(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server("--max-body-size", "1M")
    procs.client(srv, app)
    assert request(srv, "POST", "/upload", [], b"x" * 1000).status == 200
    size = 4 * 1024 * 1024
    try:
        r = request(srv, "POST", "/upload", [("Content-Length", str(size))], pattern_chunks(size))
        status = r.status
        print(f"Content-Length over the limit: {r.status} {r.body[:80]!r}")
    except (ConnectionError, OSError) as e:  # the server may cut the upload short
        status = 413
        print(f"Content-Length over the limit: connection cut ({e!r})")
    assert status == 413
    try:
        r = request(srv, "POST", "/upload", [], pattern_chunks(size))  # chunked
        status = r.status
    except (ConnectionError, OSError):
        status = 413
    assert status == 413
    assert request(srv, "GET", "/still-ok").status == 200


def test_max_body_size_content_length_never_forwarded(procs: ProcessPool) -> None:
    """With a Content-Length already over the limit the app never sees the request."""
    app = procs.local_app()
    srv = procs.server("--max-body-size", "1M")
    procs.client(srv, app)
    size = 4 * 1024 * 1024
    try:
        request(srv, "POST", "/upload", [("Content-Length", str(size))], pattern_chunks(size))
    except (ConnectionError, OSError):
        pass
    assert app.hits() == 0


class _FakeServer:
    """A one-answer HTTP server on 127.0.0.1: every request gets ``response``."""

    def __init__(self, response: bytes) -> None:
        import socket
        import threading

        self.response = response
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests += 1
                conn.sendall(self.response)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_client_of_another_protocol_version_exits_with_clear_error(
    procs: ProcessPool,
) -> None:
    """A server answering the handshake with the version-mismatch refusal: the client
    prints one clear error and exits (it does not retry for ever)."""
    body = b"protocol version mismatch: server speaks 2, client sent '1'; upgrade the older side\n"
    fake = _FakeServer(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    try:
        cli = procs.client(f"http://127.0.0.1:{fake.port}", "http://127.0.0.1:9", wait=False)
        rc = cli.wait_exit(TIMEOUTS.request)
    finally:
        fake.close()
    out = cli.output()
    print(f"client exit code {rc}; {fake.requests} handshake(s); output:\n{out}")
    assert rc != 0
    assert "Traceback" not in out
    assert "version" in out.lower()
    assert fake.requests <= 2, "the client kept retrying a version mismatch"
