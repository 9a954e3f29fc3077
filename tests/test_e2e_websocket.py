"""WebSocket passthrough: a public WebSocket reaches the local app through the tunnel.

A real Tornado WebSocket client talks to a real ``backstream serve``; a real
``backstream client`` opens the WebSocket to the local app (``/ws/echo``).
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from harness import TIMEOUTS, LocalApp, ProcessPool, Server, open_raw_websocket
from tornado import httpclient
from tornado.websocket import WebSocketClientConnection, websocket_connect


async def _open(
    server: Server | LocalApp, path: str, subprotocols: list[str] | None = None, **headers: str
) -> WebSocketClientConnection:
    request = httpclient.HTTPRequest(
        f"ws://127.0.0.1:{server.port}{path}",
        headers={k.replace("_", "-"): v for k, v in headers.items()},
        connect_timeout=TIMEOUTS.connect,
        request_timeout=TIMEOUTS.connect,
    )
    return await websocket_connect(request, subprotocols=subprotocols)


async def _read(conn: WebSocketClientConnection) -> str | bytes | None:
    return await asyncio.wait_for(conn.read_message(), TIMEOUTS.request)


def test_messages_round_trip_text_and_binary(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)
    binary = bytes(range(256)) * 1000  # 256 KB, every byte value

    async def talk() -> None:
        conn = await _open(srv, "/ws/echo?room=a%2Fb&x=", Cookie="sid=1")
        greeting = json.loads(str(await _read(conn)))
        assert greeting["uri"] == "/ws/echo?room=a%2Fb&x="
        names = [name.lower() for name, _ in greeting["headers"]]
        assert "cookie" in names and "x-forwarded-for" in names
        await conn.write_message("héllo ✓")
        assert await _read(conn) == "héllo ✓"
        await conn.write_message(binary, binary=True)
        assert await _read(conn) == binary
        for i in range(50):  # many small messages keep their order
            await conn.write_message(f"m{i}")
        assert [await _read(conn) for _ in range(50)] == [f"m{i}" for i in range(50)]
        conn.close(4002, "bye")

    asyncio.run(talk())
    app.wait_for(r'ws-closed "/ws/echo\?room=a%2Fb&x=" code=4002', timeout=TIMEOUTS.request)


def test_subprotocol_is_the_one_the_app_chose(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)

    async def negotiate() -> str | None:
        conn = await _open(srv, "/ws/echo", subprotocols=["nope", "superchat", "chat"])
        chosen = conn.selected_subprotocol
        conn.close()
        return chosen

    assert asyncio.run(negotiate()) == "superchat"


def test_app_closing_closes_the_public_websocket(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)

    async def close_from_app() -> None:
        conn = await _open(srv, "/ws/echo")
        await _read(conn)  # greeting
        await conn.write_message("close")
        assert await _read(conn) is None
        assert (conn.close_code, conn.close_reason) == (4001, "asked to close")

    asyncio.run(close_from_app())


def test_a_close_without_a_code_passes_through_both_ways(procs: ProcessPool) -> None:
    """No status code stays no code (the far end reads 1005), exactly as directly."""
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)

    async def app_closes(target: Server | LocalApp) -> tuple[int | None, str | None]:
        conn = await _open(target, "/ws/echo?nocode=app")
        await _read(conn)  # greeting
        await conn.write_message("close-nocode")
        assert await _read(conn) is None
        return conn.close_code, conn.close_reason

    async def caller_closes(target: Server | LocalApp, tag: str) -> None:
        conn = await _open(target, f"/ws/echo?nocode={tag}")
        await _read(conn)
        conn.close()
        assert await _read(conn) is None

    assert asyncio.run(app_closes(app)) == (None, None)
    assert asyncio.run(app_closes(srv)) == (None, None)  # not 1000
    asyncio.run(caller_closes(app, "direct"))
    asyncio.run(caller_closes(srv, "tunnel"))
    for tag in ("direct", "tunnel"):
        app.wait_for(rf'ws-closed "/ws/echo\?nocode={tag}" code=None reason=null', TIMEOUTS.request)


def test_a_dropped_connection_reaches_the_other_end_as_going_away(procs: ProcessPool) -> None:
    """A side that drops with no close frame (1006, never sent): the other gets 1001 and why."""
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)

    async def app_drops() -> tuple[int | None, str | None]:
        conn = await _open(srv, "/ws/echo?drop=app")
        await _read(conn)
        await conn.write_message("drop")
        assert await _read(conn) is None
        return conn.close_code, conn.close_reason

    assert asyncio.run(app_drops()) == (1001, "the local app's connection dropped")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUTS.request) as sock:
        open_raw_websocket(sock, "/ws/echo?drop=caller")
    # closed without a close frame
    app.wait_for(
        r'ws-closed "/ws/echo\?drop=caller" code=1001 reason="the caller\'s connection dropped"',
        TIMEOUTS.request,
    )


def test_app_refusing_the_upgrade_is_passed_back(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)

    async def refused() -> httpclient.HTTPClientError:
        with pytest.raises(httpclient.HTTPClientError) as info:
            await _open(srv, "/ws/refuse")
        return info.value

    error = asyncio.run(refused())
    assert error.code == 403
    assert error.response is not None
    assert error.response.headers.get("X-Refused") == "yes"
    assert error.response.body == b"no websockets for you\n"


def test_no_client_and_lost_client(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server()

    async def without_client() -> int:
        with pytest.raises(httpclient.HTTPClientError) as info:
            await _open(srv, "/ws/echo")
        return info.value.code

    assert asyncio.run(without_client()) == 503

    client = procs.client(srv, app)

    async def lose_client() -> None:
        conn = await _open(srv, "/ws/echo")
        await _read(conn)
        client.kill()
        assert await _read(conn) is None  # closed by the server, not left hanging
        assert conn.close_code == 1011

    asyncio.run(lose_client())


def test_policy_applies_to_websocket_upgrades(procs: ProcessPool, tmp_path: Path) -> None:
    (tmp_path / "p.rego").write_text(
        "package auth.server\n\nimport rego.v1\n\ndefault allow := false\n\n"
        'allow if input.header["X-Ws-Token"] == "letmein"\n'
    )
    (tmp_path / "c.rego").write_text("package auth.client\n\ndefault allow := true\n")
    app = procs.local_app()
    srv = procs.server("-p", str(tmp_path))
    procs.client(srv, app)

    async def denied() -> int:
        with pytest.raises(httpclient.HTTPClientError) as info:
            await _open(srv, "/ws/echo")
        return info.value.code

    async def allowed() -> None:
        conn = await _open(srv, "/ws/echo", X_Ws_Token="letmein")
        assert await _read(conn) is not None
        conn.close()

    assert asyncio.run(denied()) == 403
    assert app.count(r"ws-open") == 0
    asyncio.run(allowed())
    app.wait_for(r"ws-open", timeout=TIMEOUTS.request)
