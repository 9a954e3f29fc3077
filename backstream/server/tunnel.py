"""Tunnel clients on the server: the WebSocket handler and the registry.

A ``Tunnel`` is one connected client: it numbers the streams it carries,
routes incoming frames to them, and fails them all with 502 the moment the
WebSocket closes. ``Tunnels`` hands each public request to exactly one tunnel,
round robin.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from tornado.httputil import HTTPServerRequest
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .. import errors, protocol, relay, websocket_writer
from .gate import Gate
from .stream import ServerStream

log = logging.getLogger("backstream.server")

_tunnel_ids = itertools.count(1)

#: Handshake headers each WebSocket connection makes for itself.
HANDSHAKE_HEADERS = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions")


class Tunnel:
    """One connected client and the streams in flight on it."""

    def __init__(self, handler: TunnelHandler, remote: str) -> None:
        self.id = next(_tunnel_ids)
        self.remote = remote
        self.handler = handler
        self.streams: dict[int, ServerStream] = {}
        self._next_stream_id = 1
        self._batch = protocol.Batch()
        self.open = True

    def open_stream(self, timeout: float) -> ServerStream:
        stream_id = self._next_stream_id
        self._next_stream_id = stream_id + 1 if stream_id < 0xFFFFFFFF else 1
        stream = ServerStream(self, stream_id, timeout)
        self.streams[stream_id] = stream
        return stream

    def relay_request(
        self,
        request: HTTPServerRequest,
        target: str,
        body_length: int,
        timeout: float,
        *,
        upgrade: bool = False,
    ) -> ServerStream:
        """Open a stream for a public request and send its head to the client."""
        # Tornado answered any Expect itself; a WebSocket's handshake headers are
        # made anew by the client's own connection to the local app.
        drop = HANDSHAKE_HEADERS if upgrade else ("Expect",)
        headers = relay.strip_hop_by_hop(request.headers.get_all(), drop=drop)
        remote, host = request.remote_ip or "", request.host or ""
        headers = relay.add_forwarded(headers, remote=remote, scheme=request.protocol, host=host)
        stream = self.open_stream(timeout)
        stream.upgrade = upgrade
        method = request.method or "GET"
        self.send(
            protocol.RequestHead(
                stream.id,
                method,
                target,
                headers,
                body_length,
                remote,
                request.protocol,
                host,
                upgrade,
            ).encode()
        )
        return stream

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    def send(self, *frame: bytes) -> None:
        """Queue a frame; everything queued in one loop turn leaves as one message."""
        if not self.open:
            return
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.add(*frame)

    def _flush(self) -> None:
        messages = self._batch.messages()
        if not self.open:
            return
        try:
            for pieces in messages:
                websocket_writer.write_binary(self.handler.ws_connection, pieces)
        except WebSocketClosedError:
            self.closed("connection lost while sending")

    def receive(self, message: bytes) -> None:
        """Route the frames of one message; a protocol violation raises ProtocolError."""
        for frame in protocol.decode_all(message):
            self._route(frame)

    def _route(self, frame: protocol.Frame) -> None:
        stream = self.streams.get(frame.stream_id)
        if stream is None:
            if frame.stream_id >= self._next_stream_id:
                raise errors.ProtocolError(f"frame for stream {frame.stream_id}, never opened")
            return  # a frame racing with our own reset or close: harmless
        if isinstance(frame, protocol.Data):
            stream.on_data(frame)
        elif isinstance(frame, protocol.Window):
            stream.on_window(frame.increment)
        elif isinstance(frame, protocol.ResponseHead):
            stream.on_response(frame)
        elif isinstance(frame, protocol.Reset):
            stream.fail(errors.error_for_reset(frame.code, frame.message))
            stream.close()
        else:
            raise errors.ProtocolError(f"unexpected {type(frame).__name__} from a client")

    def closed(self, why: str) -> None:
        """The WebSocket is gone: every stream in flight fails with 502 now."""
        if not self.open:
            return
        self.open = False
        for stream in list(self.streams.values()):
            stream.fail(errors.ClientLost(f"tunnel {self.id} closed: {why}"))
        self.streams.clear()


class Tunnels:
    """The connected clients; each public request goes to exactly one."""

    def __init__(self) -> None:
        self._tunnels: list[Tunnel] = []
        self._turn = 0

    def __len__(self) -> int:
        return len(self._tunnels)

    def add(self, tunnel: Tunnel) -> None:
        self._tunnels.append(tunnel)

    def remove(self, tunnel: Tunnel) -> None:
        if tunnel in self._tunnels:
            self._tunnels.remove(tunnel)

    def pick(self) -> Tunnel | None:
        """The next tunnel in round-robin order, or None when none is connected."""
        if not self._tunnels:
            return None
        self._turn = (self._turn + 1) % len(self._tunnels)
        return self._tunnels[self._turn]


class TunnelHandler(WebSocketHandler):
    """Accepts tunnel clients (requests with a ``Backstream-Client`` header)."""

    tunnels: Tunnels
    tunnel: Tunnel | None = None

    def initialize(self, tunnels: Tunnels, gate: Gate | None = None) -> None:
        self.tunnels = tunnels
        self.gate = gate

    async def prepare(self) -> None:
        problem = protocol.check_version(self.request.headers.get(protocol.CLIENT_HEADER))
        if problem is not None:
            log.warning("refused tunnel client remote=%s: %s", self.request.remote_ip, problem)
            self._refuse(400, problem)
            return
        if self.gate is not None:
            try:
                await self.gate.check_client(self.request)
            except errors.StreamError as e:
                self._refuse(e.status, e.reason)

    def _refuse(self, status: int, message: str) -> None:
        """Answer the handshake with an error instead of upgrading."""
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(message + "\n")

    def check_origin(self, origin: str) -> bool:
        # Tunnel clients are programs, not browsers; auth.client decides who may connect.
        return True

    def open(self, *args: str, **kwargs: str) -> None:
        self.set_nodelay(True)
        self.tunnel = Tunnel(self, self.request.remote_ip or "")
        self.tunnels.add(self.tunnel)
        log.info(
            "client connected tunnel=%d remote=%s clients=%d",
            self.tunnel.id,
            self.tunnel.remote,
            len(self.tunnels),
        )

    def on_message(self, message: str | bytes) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            return
        try:
            if isinstance(message, str):
                raise errors.ProtocolError("text message on the tunnel")
            tunnel.receive(message)
        except errors.ProtocolError as e:
            log.error("protocol error, closing tunnel=%d: %s", tunnel.id, e)
            tunnel.closed(f"protocol error: {e}")
            self.close(1002, "protocol error")

    def on_close(self) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            return
        self.tunnels.remove(tunnel)
        in_flight = len(tunnel.streams)
        tunnel.closed(f"code={self.close_code} reason={self.close_reason!r}")
        log.info(
            "client disconnected tunnel=%d in_flight=%d clients=%d",
            tunnel.id,
            in_flight,
            len(self.tunnels),
        )
