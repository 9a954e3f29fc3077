"""WebSocket passthrough under load: ordering, big messages, close in both directions,
plain HTTP beside a WebSocket. Complements ``test_e2e_websocket.py``; uses the local
app's ``/ws/echo`` endpoint (greets with a JSON line, then echoes; "close" -> 4001)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import Tunnel
from harness import TIMEOUTS, pattern_chunks, request
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from backstream import protocol

pytestmark = pytest.mark.timeout(90)


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


def test_1mib_binary_message_intact(tunnel: Tunnel) -> None:
    """The documented limit per message (protocol.MAX_WEBSOCKET_MESSAGE) passes whole."""
    data = b"".join(pattern_chunks(protocol.MAX_WEBSOCKET_MESSAGE))

    async def go() -> Any:
        conn = await connect(tunnel, "/ws/echo?big=1")
        await conn.write_message(data, binary=True)
        echoed = await conn.read_message()
        conn.close()
        return echoed

    assert run(go) == data


def test_message_over_the_limit_is_refused_clearly(tunnel: Tunnel) -> None:
    """Larger messages are not silently cut: the WebSocket closes with 1009."""
    data = b"x" * (protocol.MAX_WEBSOCKET_MESSAGE + 1)

    async def go() -> tuple[Any, int | None]:
        conn = await connect(tunnel, "/ws/echo?too-big=1")
        await conn.write_message(data, binary=True)
        message = await conn.read_message()
        return message, conn.close_code

    assert run(go) == (None, 1009)


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
