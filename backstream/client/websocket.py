"""One public WebSocket on the client: a WebSocket to the local app.

The server forwards the public handshake as a REQUEST with the upgrade flag;
this opens the same WebSocket to the local app (same path, headers and
subprotocols) and answers 101 only if the app accepted, or else relays the
app's refusal. Messages then flow both ways as DATA fragments, paced by the
stream's credit: a message from the app is sent fragment by fragment as
credit comes, and each of the server's fragments is written on to the app at
once as a frame of a fragmented message (``protocol.MessageTracker``), its
credit granted once the app's socket has taken it: a stream holds a window at
most, never a whole message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from tornado import httpclient, iostream
from tornado.httputil import HTTPHeaders
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from .. import errors, heap, protocol, redact, relay, websocket_writer
from ..config import ClientConfig
from .upstream import public_locations

if TYPE_CHECKING:
    from . import ClientTunnel

log = logging.getLogger("backstream.client")

#: Headers websocket_connect writes itself (or that belong to the public hop).
_NOT_FORWARDED = {"host", "sec-websocket-protocol", "content-length"}


class WebSocketExchange:
    """Relays one WebSocket stream between the tunnel and the local app."""

    def __init__(self, tunnel: ClientTunnel, head: protocol.RequestHead, config: ClientConfig):
        self.tunnel = tunnel
        self.head = head
        self.id = head.stream_id
        self.config = config
        self.send_window = protocol.SendWindow()
        self.recv_window = protocol.RecvWindow()
        self.conn: WebSocketClientConnection | None = None
        self.messages = protocol.MessageTracker(config.ws_max_message)
        #: A message from the server was over the limit: the rest of it is dropped.
        self.discarding = False
        #: The closing DATA went to the server (once per stream, whoever closed first).
        self.close_sent = False
        self.sent_close: list[tuple[int | None, str | None]] = []
        #: The app's close frame arrived (else, if it closed first, its connection dropped).
        self.peer_closed: list[bool] = []
        self.cancelled = False
        self._credit: asyncio.Future[None] | None = None

    def _url(self) -> str:
        origin = self.config.dst_origin.replace("http", "ws", 1)
        return origin + relay.upstream_target(self.config.dst_base_path, self.head.target)

    async def run(self, http_client: Any = None) -> None:
        try:
            await self._run()
        finally:  # however it ended, the stream is over here
            self.tunnel.forget(self.id)

    async def _run(self) -> None:
        head, config = self.head, self.config
        headers = [(n, v) for n, v in head.headers if n.lower() not in _NOT_FORWARDED]
        host = relay.upstream_host(config.host_header, head.host, config.dst_netloc)
        headers.append(("Host", host))
        subprotocols = [
            p.strip()
            for n, v in head.headers
            if n.lower() == "sec-websocket-protocol"
            for p in v.split(",")
            if p.strip()
        ]
        request = httpclient.HTTPRequest(
            self._url(),
            headers=http_headers(headers),
            connect_timeout=config.timeout,
            request_timeout=config.timeout,
            validate_cert=not config.dst_insecure,
            ca_certs=config.dst_ca or None,
        )
        try:
            conn = await websocket_connect(
                request,
                subprotocols=subprotocols or None,
                max_message_size=config.ws_max_message,
            )
        except httpclient.HTTPClientError as e:
            if not self.cancelled:  # else the stream is over: reset, or its tunnel closed
                self._relay_refusal(e)
            return
        except (TimeoutError, OSError, iostream.StreamClosedError) as e:
            if self.cancelled:
                return
            error = errors.UpstreamUnreachable(f"local app websocket: {e}")
            self.tunnel.send(protocol.Reset(self.id, error.reset_code, error.log_message).encode())
            target = redact.current().mask_target(head.target)
            log.warning("stream=%d websocket %s failed: %s", self.id, target, e)
            return
        if self.cancelled:  # the caller left while the app was accepting
            conn.close()
            return
        self.conn = conn
        if conn.protocol is not None:
            self.sent_close = websocket_writer.record_sent_close(conn.protocol)
            self.peer_closed = websocket_writer.record_peer_close(conn.protocol)
        accepted = []
        if conn.selected_subprotocol:
            accepted.append(("Sec-WebSocket-Protocol", conn.selected_subprotocol))
        self.tunnel.send(
            protocol.ResponseHead(self.id, 101, "Switching Protocols", accepted).encode()
        )
        await self._pump_from_app(conn)

    async def _pump_from_app(self, conn: WebSocketClientConnection) -> None:
        while not self.cancelled:
            message = await conn.read_message()
            if self.cancelled:
                return
            if message is None:
                # The close this side started (1009 and its reason included), else the app's
                # (no code stays no code), else its connection dropped: 1006 cannot be sent.
                if self.sent_close:
                    code, reason = self.sent_close[0]
                elif self.peer_closed:
                    code, reason = conn.close_code, conn.close_reason
                else:
                    code, reason = protocol.GOING_AWAY, "the local app's connection dropped"
                self._send_close(code, reason)
                return
            text = isinstance(message, str)
            data = message.encode("utf-8") if isinstance(message, str) else message
            for fragment in protocol.fragments(self.id, data, text):
                while not self.send_window.spend(len(fragment.data)):
                    self._credit = asyncio.get_running_loop().create_future()
                    await self._credit
                    if self.cancelled:
                        return
                self.tunnel.send(*fragment.parts())

    def _send_close(self, code: int | None, reason: str | None) -> None:
        if not self.close_sent:
            self.close_sent = True
            payload = protocol.close_payload(code, reason)
            self.tunnel.send(protocol.Data(self.id, payload, end_stream=True).encode())

    def _relay_refusal(self, e: httpclient.HTTPClientError) -> None:
        response = e.response
        headers = relay.strip_hop_by_hop(response.headers.get_all()) if response else []
        headers = public_locations(self.config, self.head.headers, headers)
        body = (response.body or b"")[: protocol.INITIAL_WINDOW] if response else b""
        reason = response.reason if response else ""
        self.tunnel.send(protocol.ResponseHead(self.id, e.code, reason or "", headers).encode())
        self.tunnel.send(protocol.Data(self.id, body, end_stream=True).encode())
        self.tunnel.forget(self.id)

    # -- frames from the server -----------------------------------------------------

    def on_request_data(self, frame: protocol.Data) -> None:
        self.recv_window.receive(len(frame.data))
        conn = self.conn
        if conn is None:
            if frame.end_stream:  # the caller left before the app's WebSocket opened
                self.cancel("the caller closed before the upgrade")
            return
        if frame.end_stream:  # the caller's side closed: pass it on, and stop relaying
            conn.close(*protocol.parse_close(frame.data))
            self.close_sent = self.cancelled = True
            self._wake()  # a pump waiting for credit that will never come
            return
        if self.discarding:
            return
        try:
            fragment = self.messages.feed(frame)
        except protocol.MessageTooBig as e:  # both ends get 1009; the rest is dropped
            self.discarding = True
            self._send_close(1009, str(e))
            conn.close(1009, str(e))
            return
        try:  # masked into its only copy
            written = websocket_writer.write_binary(
                conn.protocol,
                (fragment.data,),
                text=fragment.text,
                opens=fragment.first,
                final=fragment.final,
            )
        except WebSocketClosedError:  # the app's socket is gone; read_message ends the stream
            return
        written.add_done_callback(lambda f: self._fragment_written(f, fragment))

    def _fragment_written(self, written: asyncio.Future[None], fragment: protocol.Fragment) -> None:
        if written.cancelled() or written.exception() is not None:
            return  # the app's socket is gone; read_message ends the stream
        self._grant(len(fragment.data))
        if fragment.final and fragment.size >= heap.TRIM_THRESHOLD:
            heap.release_free_memory()

    def _grant(self, size: int) -> None:
        increment = self.recv_window.consume(size) if size else 0
        # Once either close went by, the server sends no more: no credit for a stream that ended.
        if increment and not self.cancelled and not self.close_sent:
            self.tunnel.send(protocol.Window(self.id, increment).encode())

    def on_window(self, increment: int) -> None:
        self.send_window.grant(increment)
        self._wake()

    def cancel(self, why: str) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        log.debug("stream=%d websocket cancelled: %s", self.id, why)
        if self.conn is not None:  # the caller is gone with the tunnel or its stream
            self.conn.close(protocol.GOING_AWAY, protocol.close_reason(why))
        self._wake()

    def _wake(self) -> None:
        if self._credit is not None and not self._credit.done():
            self._credit.set_result(None)


def http_headers(pairs: list[tuple[str, str]]) -> HTTPHeaders:
    """Tornado's header object from ordered pairs, every repeated value kept."""
    headers = HTTPHeaders()
    for name, value in pairs:
        headers.add(name, value)
    return headers
