"""Bad peers on the tunnel: a malformed frame closes one tunnel, never the server.

A hand-rolled tunnel client (Tornado's WebSocket client on 127.0.0.1) plays
the misbehaving peer next to a real ``backstream client``.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from harness import TIMEOUTS, ProcessPool, Server, request
from tornado import httpclient
from tornado.websocket import WebSocketClientConnection, websocket_connect

from backstream import protocol


async def _connect(server: Server, version: str = "1") -> WebSocketClientConnection:
    req = httpclient.HTTPRequest(
        f"ws://127.0.0.1:{server.port}/",
        headers={protocol.CLIENT_HEADER: version},
        connect_timeout=TIMEOUTS.connect,
    )
    return await websocket_connect(req)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 3,  # truncated header
        struct.pack("!BBII", 99, 0, 1, 0),  # unknown frame type
        struct.pack("!BBII", 2, 0, 1, 2) + b"{}",  # RESPONSE on a stream never opened
        struct.pack("!BBII", 3, 0, 1, 1000) + b"short",  # length beyond the message
    ],
)
def test_malformed_frame_closes_only_that_tunnel(procs: ProcessPool, garbage: bytes) -> None:
    app = procs.local_app()
    srv = procs.server()
    good = procs.client(srv, app)

    async def misbehave() -> tuple[int | None, str | None]:
        ws = await _connect(srv)
        srv.wait_for(r"client connected tunnel=\d+ .*clients=2")
        await ws.write_message(garbage, binary=True)
        message = await asyncio.wait_for(ws.read_message(), TIMEOUTS.request)
        assert message is None, "the server must close the tunnel, not answer"
        return ws.close_code, ws.close_reason

    code, reason = asyncio.run(misbehave())
    assert code == 1002 and reason == "protocol error"
    srv.wait_for(r"protocol error, closing tunnel=\d+")
    # The server and the well-behaved client carry on.
    assert srv.alive() and good.alive()
    for i in range(5):
        resp = request(srv, "GET", f"/after-garbage/{i}")
        assert resp.status == 200, resp.body
    assert good.count(r"disconnected") == 0


def test_text_message_on_the_tunnel_is_a_protocol_error(procs: ProcessPool) -> None:
    srv = procs.server()

    async def send_text() -> int | None:
        ws = await _connect(srv)
        await ws.write_message("hello")
        assert await asyncio.wait_for(ws.read_message(), TIMEOUTS.request) is None
        return ws.close_code

    assert asyncio.run(send_text()) == 1002
    assert srv.alive()


def test_other_protocol_version_is_refused_before_the_upgrade(procs: ProcessPool) -> None:
    srv = procs.server()

    async def connect_v2() -> httpclient.HTTPClientError:
        with pytest.raises(httpclient.HTTPClientError) as info:
            await _connect(srv, version="2")
        return info.value

    error = asyncio.run(connect_v2())
    assert error.code == 400
    assert error.response is not None
    body = error.response.body.decode()
    assert "server speaks 1" in body and "'2'" in body
    assert srv.count(r"client connected") == 0
    # With no tunnel, the public side says so.
    assert request(srv, "GET", "/").status == 503
