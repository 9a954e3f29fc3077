"""Public WebSockets, carried as a stream to the client and on to the local app.

The upgrade is decided by the local app: the server forwards the handshake as
a REQUEST with the upgrade flag, the client opens a WebSocket to the app, and
only if the app accepted (101) does the server accept the public upgrade, with
the subprotocol the app chose. A refusal (say 403 or 404) is passed back as is.
Each message then travels as DATA fragments of at most 256 KiB, under the
same flow control as bodies: a message of any size up to ``--ws-max-message``
crosses, other streams keep moving while it does, and a slow reader on either
side pauses the other. The receiving side writes each fragment on at once as a
frame of a fragmented message (``protocol.MessageTracker``), so it holds a
window at most; the sending side holds the one whole message Tornado hands
over. A larger one closes the WebSocket with 1009 and a reason, at both ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from tornado import httputil, iostream
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .. import errors, heap, protocol, relay, websocket_writer
from .admission import admit, destination
from .gate import Gate
from .screen import answer_and_close
from .stream import ServerStream
from .tunnel import Tunnels

log = logging.getLogger("backstream.server")
access_log = logging.getLogger("backstream.access")

_lingering: set[asyncio.Task[None]] = set()


class PassthroughHandler(WebSocketHandler):
    stream: ServerStream | None = None
    app_subprotocol: str | None = None
    pump: asyncio.Task[None] | None = None
    #: The close code and reason this side sent (one at most), Tornado's 1009 included.
    sent_close: Sequence[tuple[int | None, str | None]] = ()
    #: The caller's close frame arrived (else, if it closed first, its connection dropped).
    peer_closed: Sequence[bool] = ()

    def initialize(
        self,
        tunnels: Tunnels,
        timeout: float,
        no_client_code: int = 503,
        gate: Gate | None = None,
        trusted: tuple[relay.Network, ...] = (),
        domain: str = "",
        ws_max_message: int = protocol.DEFAULT_WEBSOCKET_MESSAGE,
    ) -> None:
        self.ws_max_message = ws_max_message
        self.tunnels = tunnels
        self.timeout = timeout
        self.no_client_code = no_client_code
        self.gate = gate
        self.trusted = trusted
        self.domain = domain
        self.tunnel_name = "-"

    @property
    def max_message_size(self) -> int:
        return self.ws_max_message

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
            self._answer(errors.StreamError(text, status=status, reason=text))
            return
        try:
            target, name = destination(request, self.domain)
            self.tunnel_name = name or "-"
            tunnel = await admit(
                request, target, name, self.tunnels, self.gate, self.no_client_code
            )
        except errors.StreamError as e:
            self._answer(e)
            return
        trusted = relay.is_trusted(request.remote_ip or "", self.trusted)
        self.stream = stream = tunnel.relay_request(
            request, target, 0, self.timeout, upgrade=True, trusted=trusted
        )
        stream.messages = protocol.MessageTracker(self.ws_max_message)
        try:
            head = await stream.response_head()
            if head.status != 101:
                # The body's end is the client's to send: bounded like the head.
                await asyncio.wait_for(self._relay_refusal(stream, head), self.timeout or None)
                return
        except errors.StreamError as e:
            if not stream.closed:
                stream.reset(e)
            self._answer(e)
            return
        except TimeoutError:
            error = errors.UpstreamTimeout(f"refusal body not complete within {self.timeout:g}s")
            stream.reset(error)
            self._answer(error)
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
        self._headers = httputil.HTTPHeaders()  # the app's headers, not beside Tornado's defaults
        for name, value in head.headers:
            if name.lower() != "content-length":
                self.add_header(name, value)
        self.finish(b"".join(body))

    def _answer(self, error: errors.StreamError) -> None:
        """Refuse the upgrade with the error's status; its reason is the body."""
        status = error.status
        access_log.info(
            "WEBSOCKET %s status=%d error=%r tunnel=%s",
            self.request.path,
            status,
            error.log_message,
            self.tunnel_name,
        )
        self.set_status(status, type(error).reason if status == type(error).status else None)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(error.reason + "\n")

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return self.app_subprotocol if self.app_subprotocol in subprotocols else None

    def open(self, *args: str, **kwargs: str) -> None:
        self.set_nodelay(True)
        stream = self.stream
        assert stream is not None and self.ws_connection is not None
        access_log.info(
            "WEBSOCKET %s stream=%d status=101 open tunnel=%s",
            self.request.path,
            stream.id,
            self.tunnel_name,
        )
        self.sent_close = websocket_writer.record_sent_close(self.ws_connection)
        self.peer_closed = websocket_writer.record_peer_close(self.ws_connection)
        self._linger_after_too_big(self.ws_connection)
        self.pump = asyncio.ensure_future(self._pump_from_app(stream))

    def _linger_after_too_big(self, connection: Any) -> None:
        """After Tornado's own 1009, let the close frame reach the caller.

        Tornado drops the connection right after sending it, while the caller is
        still sending the rest of its message: the reset that unread data causes
        would often destroy the close frame. So the socket is shut for writing
        and drained for a moment first, as after a refused request.
        """
        abort = connection._abort
        lingering: list[bool] = []

        def lingering_abort() -> None:
            stream = connection.stream
            if lingering:
                return  # already draining: Tornado aborts again when the stream closes
            too_big = self.sent_close and self.sent_close[0][0] == 1009
            if not too_big or stream is None or stream.closed() or stream.reading():
                abort()  # not Tornado's own 1009 from its frame reader (which read nothing more)
                return
            lingering.append(True)
            connection.client_terminated = connection.server_terminated = True
            # The rest of the refused message may follow: drain up to twice the limit,
            # for as long as Tornado waits for a closing handshake.
            drain = answer_and_close(stream, b"", limit=2 * self.ws_max_message, seconds=5.0)
            task = asyncio.ensure_future(drain)
            _lingering.add(task)
            task.add_done_callback(_lingering.discard)

        connection._abort = lingering_abort

    async def _pump_from_app(self, stream: ServerStream) -> None:
        """Local app -> public caller, a fragment at a time (write() is the backpressure)."""
        try:
            while (fragment := await stream.read_fragment()) is not None:
                # Uncopied (text stays the UTF-8 the app sent), as one frame of its message.
                await websocket_writer.write_binary(
                    self.ws_connection,
                    (fragment.data,),
                    text=fragment.text,
                    opens=fragment.first,
                    final=fragment.final,
                )
                stream.consumed(len(fragment.data))
                if (meter := stream.tunnel.meter) is not None:
                    meter.sent.inc(len(fragment.data))
                if fragment.final and fragment.size >= heap.TRIM_THRESHOLD:
                    heap.release_free_memory()
            code, reason = stream.close_info
        except errors.StreamError as e:
            code, reason = 1011, e.reason
        except (WebSocketClosedError, iostream.StreamClosedError):
            return
        self.close(code, reason)

    async def on_message(self, message: str | bytes) -> None:
        stream = self.stream
        if stream is None:
            return
        data = message.encode("utf-8") if isinstance(message, str) else message
        if (meter := stream.tunnel.meter) is not None:
            meter.received.inc(len(data))
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
        # The close this side started (1009 and its reason included), else the caller's
        # (no code stays no code), else its connection dropped: 1006 cannot be sent.
        if self.sent_close:
            code, reason = self.sent_close[0]
        elif self.peer_closed:
            code, reason = self.close_code, self.close_reason
        else:
            code, reason = protocol.GOING_AWAY, "the caller's connection dropped"
        payload = protocol.close_payload(code, reason)
        stream.tunnel.send(protocol.Data(stream.id, payload, end_stream=True).encode())
        stream.fail(errors.Cancelled("public websocket closed"))  # wakes the pump
        stream.close()
        access_log.info(
            "WEBSOCKET %s stream=%d closed code=%s tunnel=%s",
            self.request.path,
            stream.id,
            self.close_code,
            self.tunnel_name,
        )
