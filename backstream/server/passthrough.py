"""Public WebSockets, carried as a stream to the client and on to the local app.

The upgrade is decided by the local app: the server forwards the handshake as
a REQUEST with the upgrade flag, the client opens a WebSocket to the app, and
only if the app accepted (101) does the server accept the public upgrade, with
the subprotocol the app chose. A refusal (say 403 or 404) is passed back as is.
Each message then travels as one DATA frame, under the same flow control as
bodies: a slow reader on either side pauses the other. A message larger than
``MAX_WEBSOCKET_MESSAGE`` (1 MiB) closes the WebSocket with 1009 "message too
big" on the side that received it; splitting messages across frames would
lift that limit, at the price of holding whole messages on both sides.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .. import errors, protocol, relay
from .admission import admit, destination
from .gate import Gate
from .stream import ServerStream
from .tunnel import Tunnels

log = logging.getLogger("backstream.server")
access_log = logging.getLogger("backstream.access")


class PassthroughHandler(WebSocketHandler):
    stream: ServerStream | None = None
    app_subprotocol: str | None = None
    pump: asyncio.Task[None] | None = None

    def initialize(
        self,
        tunnels: Tunnels,
        timeout: float,
        no_client_code: int = 503,
        gate: Gate | None = None,
        trusted: tuple[relay.Network, ...] = (),
        domain: str = "",
    ) -> None:
        self.tunnels = tunnels
        self.timeout = timeout
        self.no_client_code = no_client_code
        self.gate = gate
        self.trusted = trusted
        self.domain = domain

    @property
    def max_message_size(self) -> int:
        return protocol.MAX_WEBSOCKET_MESSAGE

    def check_origin(self, origin: str) -> bool:
        # The local app sees the Origin header and decides, as it would without a tunnel.
        return True

    async def prepare(self) -> None:
        request = self.request
        # Judged before relaying, so the local app never opens a WebSocket that
        # Tornado's get() would then refuse on the public side.
        problem = relay.websocket_handshake_problem(
            request.method or "", list(request.headers.get_all())
        )
        if problem is not None:
            status, text = problem
            if status == 426:
                self.set_header("Sec-WebSocket-Version", "13")
            self._answer(status, text + "\n", errors.StreamError(text, status=status))
            return
        try:
            target, name = destination(request, self.domain)
            tunnel = await admit(
                request, target, name, self.tunnels, self.gate, self.no_client_code
            )
        except errors.StreamError as e:
            self._answer(e.status, e.reason + "\n", e)
            return
        trusted = relay.is_trusted(request.remote_ip or "", self.trusted)
        self.stream = stream = tunnel.relay_request(
            request, target, 0, self.timeout, upgrade=True, trusted=trusted
        )
        try:
            head = await stream.response_head()
            if head.status != 101:
                await self._relay_refusal(stream, head)
                return
        except errors.StreamError as e:
            if not stream.closed:
                stream.reset(e)
            self._answer(e.status, e.reason + "\n", e)
            return
        for name, value in head.headers:
            if name.lower() == "sec-websocket-protocol":
                self.app_subprotocol = value.strip()

    async def _relay_refusal(self, stream: ServerStream, head: protocol.ResponseHead) -> None:
        """The local app did not upgrade: pass its answer back as it is.

        The body is held whole, so no credit is granted back: a client can
        send one window of it at most.
        """
        body: list[bytes] = []
        while (chunks := await stream.read()) is not None:
            body.extend(chunks)
        stream.close()
        self.set_status(head.status, head.reason or None)
        for name, value in head.headers:
            if name.lower() != "content-length":
                self.add_header(name, value)
        self.finish(b"".join(body))

    def _answer(self, status: int, text: str, error: errors.StreamError) -> None:
        access_log.info(
            "WEBSOCKET %s status=%d error=%r", self.request.path, status, error.log_message
        )
        self.set_status(status, type(error).reason if status == type(error).status else None)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(text)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return self.app_subprotocol if self.app_subprotocol in subprotocols else None

    def open(self, *args: str, **kwargs: str) -> None:
        self.set_nodelay(True)
        stream = self.stream
        assert stream is not None
        access_log.info("WEBSOCKET %s stream=%d status=101 open", self.request.path, stream.id)
        self.pump = asyncio.ensure_future(self._pump_from_app(stream))

    async def _pump_from_app(self, stream: ServerStream) -> None:
        """Local app -> public caller, one message at a time (write() is the backpressure)."""
        try:
            while (frame := await stream.read_message()) is not None:
                message: Any = frame.data.decode("utf-8", "replace") if frame.text else frame.data
                await self.write_message(message, binary=not frame.text)
                stream.consumed(len(frame.data))
            code, reason = stream.close_info
        except errors.StreamError as e:
            code, reason = 1011, e.reason
        except WebSocketClosedError:
            return
        self.close(code, reason)

    async def on_message(self, message: str | bytes) -> None:
        stream = self.stream
        if stream is None:
            return
        data = message.encode("utf-8") if isinstance(message, str) else message
        try:
            await stream.send_message(data, text=isinstance(message, str))
        except errors.StreamError:
            self.close(1011, "tunnel lost")

    def on_finish(self) -> None:
        # Tornado's get() may still refuse the upgrade after prepare() relayed it:
        # then the client must close the WebSocket it opened to the local app.
        stream = self.stream
        if stream is not None and not stream.closed and self.ws_connection is None:
            stream.reset(errors.Cancelled("public upgrade refused"))

    def on_close(self) -> None:
        stream = self.stream
        if stream is None or stream.closed:
            return
        payload = protocol.close_payload(self.close_code, self.close_reason)
        stream.tunnel.send(protocol.Data(stream.id, payload, end_stream=True).encode())
        stream.fail(errors.Cancelled("public websocket closed"))  # wakes the pump
        stream.close()
        access_log.info(
            "WEBSOCKET %s stream=%d closed code=%s", self.request.path, stream.id, self.close_code
        )
