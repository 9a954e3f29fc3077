"""WebSocket passthrough under load: ordering, big messages, close in both directions,
plain HTTP beside a WebSocket. Complements ``test_e2e_websocket.py``; uses the local
app's ``/ws/echo`` endpoint (greets with a JSON line, then echoes; "close" -> 4001)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import Tunnel
from harness import (
    TIMEOUTS,
    LocalApp,
    ProcessPool,
    open_raw_websocket,
    pattern_chunks,
    pattern_sha256,
    request,
)
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    async def guarded() -> Any:
        return await asyncio.wait_for(coro_fn(), TIMEOUTS.request)

    return asyncio.run(guarded())


async def connect(tunnel: Tunnel, path: str) -> WebSocketClientConnection:
    conn = await websocket_connect(
        HTTPRequest(f"ws://{tunnel.server.netloc}{path}", connect_timeout=10),
        max_message_size=64 * 1024 * 1024,
    )
    greeting = await conn.read_message()
    assert isinstance(greeting, str) and json.loads(greeting)["uri"] == path
    return conn


def test_thousand_messages_keep_their_order(tunnel: Tunnel) -> None:
    async def go() -> list[Any]:
        conn = await connect(tunnel, "/ws/echo?order=1")
        for i in range(1000):
            await conn.write_message(f"m{i}", binary=bool(i % 2))
        got = [await conn.read_message() for _ in range(1000)]
        conn.close()
        return got

    expected = [f"m{i}".encode() if i % 2 else f"m{i}" for i in range(1000)]
    assert run(go) == expected


@pytest.mark.parametrize("size", [3 * MiB, 20 * MiB], ids=["3MiB", "20MiB"])
def test_large_messages_cross_whole_both_ways(tunnel: Tunnel, size: int) -> None:
    """Far larger than a stream's window (2 MiB): it travels in fragments, whole."""
    data = b"".join(pattern_chunks(size))

    async def go() -> Any:
        conn = await connect(tunnel, f"/ws/echo?big={size}")
        await conn.write_message(data, binary=True)
        echoed = await conn.read_message()
        conn.close()
        return echoed

    assert run(go) == data


def _app_saw_close(app: LocalApp, uri: str, code: int, reason: str | None, mark: int) -> None:
    """The local app logged the close of ``uri`` with exactly this code and reason."""
    pattern = f'ws-closed "{re.escape(uri)}" code={code} reason={re.escape(json.dumps(reason))}$'
    app.wait_for(pattern, timeout=15, start=mark)


def test_message_over_the_limit_closes_both_ends_with_1009(procs: ProcessPool) -> None:
    """Not silently cut: 1009 with a reason reaches the caller and the local app.

    The caller's message is over the server's limit (``BACKSTREAM_WS_MAX_MESSAGE``):
    Tornado's own 1009 on the public side, relayed to the app.
    """
    app = procs.local_app()
    srv = procs.server(env={"BACKSTREAM_WS_MAX_MESSAGE": "1M"})
    procs.client(srv, app, "--ws-max-message", "2M")
    tunnel = Tunnel(srv, None, app)  # type: ignore[arg-type]
    mark = app.mark()

    async def go() -> tuple[Any, int | None, str | None]:
        conn = await connect(tunnel, "/ws/echo?too-big=1")
        await conn.write_message(b"x" * (MiB + 1), binary=True)
        message = await conn.read_message()
        return message, conn.close_code, conn.close_reason

    message, code, reason = run(go)
    assert (message, code) == (None, 1009) and reason, reason
    _app_saw_close(app, "/ws/echo?too-big=1", 1009, reason, mark)


def test_caller_message_over_the_client_limit_closes_both_ends_with_1009(
    procs: ProcessPool,
) -> None:
    """The caller's message passes the server's limit but not the client's: 1009 at both ends.

    The client's message tracker refuses it before the local app gets it whole,
    and sends the same code and reason both ways.
    """
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app, "--ws-max-message", "1M")
    tunnel = Tunnel(srv, None, app)  # type: ignore[arg-type]
    mark = app.mark()

    async def go() -> tuple[Any, int | None, str | None]:
        conn = await connect(tunnel, "/ws/echo?client-too-big=1")
        await conn.write_message(b"y" * (MiB + 1), binary=True)  # the server takes 64 MiB
        message = await conn.read_message()
        return message, conn.close_code, conn.close_reason

    message, code, reason = run(go)
    assert (message, code, reason) == (None, 1009, f"message too big (limit {MiB} bytes)")
    _app_saw_close(app, "/ws/echo?client-too-big=1", 1009, reason, mark)


def test_64mib_message_byte_exact_with_bounded_memory(procs: ProcessPool) -> None:
    """64 MiB (the default limit) crosses byte-exact, each process holding it about twice.

    Measured: both grow by 2.1x the message (133 MiB), idle or with both cores busy,
    which is Tornado's frame reader holding the message it reads twice (its read
    buffer, then the bytes it returns). What each side writes on is written fragment
    by fragment as it arrives, a window at most: when it held whole messages, the
    client's send and the echo overlapped under CPU contention and it reached 2.9x.
    """
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(srv, app)
    tunnel = Tunnel(srv, cli, app)
    data = b"".join(pattern_chunks(64 * MiB))
    before = {p.name: p.peak_rss_kib() for p in (srv, cli)}

    async def go() -> Any:
        conn = await connect(tunnel, "/ws/echo?huge=1")
        await conn.write_message(data, binary=True)
        echoed = await conn.read_message()
        conn.close()
        return echoed

    assert run(go) == data
    growth = {p.name: (p.peak_rss_kib() - before[p.name]) / 1024 for p in (srv, cli)}
    assert all(mib <= 2.5 * 64 for mib in growth.values()), growth


def test_caller_close_reaches_the_app(tunnel: Tunnel) -> None:
    mark = tunnel.app.mark()

    async def go() -> None:
        conn = await connect(tunnel, "/ws/echo?closer=caller")
        await conn.write_message("x")
        assert await conn.read_message() == "x"
        conn.close(4002, "caller leaves")

    run(go)
    tunnel.app.wait_for(r'ws-closed "/ws/echo\?closer=caller"', timeout=15, start=mark)


def test_plain_http_flows_beside_an_open_websocket(tunnel: Tunnel) -> None:
    async def go() -> tuple[int, Any]:
        conn = await connect(tunnel, "/ws/echo?beside=1")
        await conn.write_message("ping")
        loop = asyncio.get_running_loop()
        r = await loop.run_in_executor(None, lambda: request(tunnel.server, "GET", "/beside"))
        echoed = await conn.read_message()
        conn.close()
        return r.status, echoed

    assert run(go) == (200, "ping")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), MiB))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def _read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """The next (unmasked) data frame from the server: its first byte (FIN, opcode) and
    payload. Pings and pongs, which may come between fragments, are skipped."""
    while True:
        first, length = _recv_exactly(sock, 2)
        if length == 126:
            length = int.from_bytes(_recv_exactly(sock, 2), "big")
        elif length == 127:
            length = int.from_bytes(_recv_exactly(sock, 8), "big")
        payload = _recv_exactly(sock, length)
        if first & 0x0F not in (0x9, 0xA):
            return first, payload


def test_plain_http_answers_while_a_big_message_crosses(procs: ProcessPool) -> None:
    """A GET on the same tunnel answers while a 48 MiB echo is in flight on another stream.

    The caller takes the echo's first frame, then reads nothing more until the GET
    has answered: the rest of the echo waits in the tunnel for credit, so the GET
    went by it (ordering, not timing). Then the echo arrives whole.
    """
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)
    size = 48 * MiB
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUTS.request) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        open_raw_websocket(sock, "/ws/echo?crossing=1")
        assert _read_frame(sock)[0] == 0x81  # the greeting: one text frame
        # One binary frame, masked with a zero key (so the payload goes as it is).
        sock.sendall(b"\x82\xff" + size.to_bytes(8, "big") + b"\0\0\0\0")
        for chunk in pattern_chunks(size, MiB):
            sock.sendall(chunk)
        first, data = _read_frame(sock)
        assert first == 0x02, hex(first)  # the echo's first fragment: binary, FIN not set
        echoed = hashlib.sha256(data)
        received = len(data)

        beside = request(srv, "GET", "/beside")  # the caller reads nothing meanwhile
        assert beside.status == 200, beside.status
        assert received < size  # the echo was still crossing when the GET answered

        while not first & 0x80:  # continuation frames up to the one with FIN
            first, data = _read_frame(sock)
            assert first & 0x0F == 0, hex(first)
            echoed.update(data)
            received += len(data)
    assert (received, echoed.hexdigest()) == (size, pattern_sha256(size))


def test_ten_websockets_at_once(tunnel: Tunnel) -> None:
    async def one(i: int) -> list[Any]:
        conn = await connect(tunnel, f"/ws/echo?n={i}")
        out = []
        for j in range(20):
            await conn.write_message(f"{i}-{j}")
            out.append(await conn.read_message())
        conn.close()
        return out

    async def go() -> list[list[Any]]:
        return list(await asyncio.gather(*(one(i) for i in range(10))))

    assert run(go) == [[f"{i}-{j}" for j in range(20)] for i in range(10)]


def test_a_caller_that_stops_reading_costs_the_server_a_window(procs: ProcessPool) -> None:
    """The app's echo of 48 MiB to a caller that reads nothing: the server holds a window.

    The server writes each fragment on as it comes and grants its credit only
    once the caller's socket took it, so it never holds the whole message
    (when it rebuilt whole messages it held all 48 MiB here). The client holds
    the message Tornado handed it, waiting for credit.
    """
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(srv, app)
    size = 48 * MiB
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUTS.request) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(
            b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        before = {p.name: p.rss_kib() for p in (srv, cli)}
        # One binary frame, masked with a zero key (so the payload goes as it is).
        sock.sendall(b"\x82\xff" + size.to_bytes(8, "big") + b"\0\0\0\0")
        chunk = b"z" * MiB
        for _ in range(size // MiB):
            sock.sendall(chunk)
        # The echo crosses the tunnel until the caller's socket is full, then waits.
        time.sleep(3)
        growth = {p.name: (p.rss_kib() - before[p.name]) / 1024 for p in (srv, cli)}
    assert growth["client"] > 40, growth  # the echo came back and waits there for credit
    assert growth["server"] < 16, f"the server grew while its caller read nothing: {growth}"
