"""Peer links: a public request for a tunnel held by another instance is relayed to it.

One WebSocket per pair of instances, opened on demand by the instance where
public requests arrive, authenticated with the cluster secret, carrying the
tunnel protocol's own frames. On the arriving side the link is a ``Tunnel``
(``PeerLink``): its streams are ordinary ``ServerStream`` objects, so flow
control, timeouts, WebSockets and the response checks are the same as for a
local client; the policy was evaluated there, once. On the holding side
(``PeerHandler``) each stream is spliced onto a local client's tunnel
(``Splice``): frames pass with their stream ids changed, and credit is passed
through end to end, so the hop holds a window per stream at most. What a
client sends is checked at the splice (credit, order), so a hostile client
loses its own tunnel, never the link that others share.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from typing import Any

from tornado import httpclient
from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.websocket import WebSocketClientConnection, WebSocketHandler, websocket_connect

from .. import errors, protocol, routing
from .cluster import Cluster
from .stream import ServerStream
from .tunnel import Tunnel, Tunnels

log = logging.getLogger("backstream.server")

#: Handshake header of a peer link: ``INSTANCE TIMESTAMP SIGNATURE``.
PEER_HEADER = protocol.PEER_HEADER
#: How far a peer's clock and the handshake's age may be off, in seconds.
MAX_SKEW = 30.0
CONNECT_TIMEOUT = 5.0
_STAMP = re.compile(r"[0-9a-f]{16}\.[0-9]{1,12}")
#: Seconds a peer that could not be reached is passed over when another holds the name.
RETRY_AFTER = 1.0
#: The tunnel name travels to the holding instance as this header of the request head.
_ROUTE_HEADER = routing.TUNNEL_HEADER.lower()


def signature(secret: str, instance: str, timestamp: str) -> str:
    message = f"backstream-peer\n{instance}\n{timestamp}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def peer_header(secret: str, instance: str) -> str:
    """``INSTANCE NONCE.TIMESTAMP SIGNATURE``: each handshake's own, valid once."""
    stamp = f"{secrets.token_hex(8)}.{int(time.time())}"
    return f"{instance} {stamp} {signature(secret, instance, stamp)}"


#: Signatures accepted within the last ``MAX_SKEW`` seconds: a replayed one is refused.
_seen: dict[str, float] = {}


def verify(secret: str, value: str) -> str | None:
    """The peer instance id if ``value`` is a fresh, valid signature never seen before."""
    parts = value.split()
    if len(parts) != 3 or not _STAMP.fullmatch(parts[1]):
        return None
    instance, stamp, given = parts
    now = time.time()
    if abs(now - int(stamp.partition(".")[2])) > MAX_SKEW:
        return None
    expected = signature(secret, instance, stamp)
    if not hmac.compare_digest(given.encode(), expected.encode()) or given in _seen:
        return None
    for old in [s for s, at in _seen.items() if at < now - 2 * MAX_SKEW]:
        del _seen[old]
    _seen[given] = now
    return instance


# -- the arriving side ------------------------------------------------------------


class PeerLink(Tunnel):
    """The link to one other instance, seen as a tunnel whose streams go there."""

    def __init__(self, url: str, conn: WebSocketClientConnection) -> None:
        super().__init__(None, url, name="")  # type: ignore[arg-type]
        self.url = url
        self.conn = conn

    def connection(self) -> Any:
        return self.conn.protocol

    def _route(self, frame: protocol.Frame) -> None:
        """A frame the holder relayed from its client; a bad one fails its stream only.

        The holder checks its client's order and credit, but not everything a
        ``ServerStream`` does (a WebSocket message's text flag, say): one
        client's mistake must not close the link every other stream shares.
        """
        try:
            super()._route(frame)
        except errors.ProtocolError as e:
            stream = self.streams.get(frame.stream_id)
            if stream is None:
                raise
            stream.reset(errors.InvalidResponse(f"from the tunnel client, via {self.url}: {e}"))


class PeerRoute:
    """A tunnel name held on the instance behind ``link``: what ``admit`` returns for it."""

    __slots__ = ("link", "name")

    def __init__(self, link: PeerLink, name: str) -> None:
        self.link = link
        self.name = name

    def relay_request(
        self,
        request: HTTPServerRequest,
        target: str,
        body_length: int,
        timeout: float,
        *,
        upgrade: bool = False,
        trusted: bool = False,
    ) -> ServerStream:
        return self.link.relay_request(
            request, target, body_length, timeout, upgrade=upgrade, trusted=trusted, via=self.name
        )


class RemoteTunnels:
    """The tunnels other instances hold: looked up in the cluster, reached over peer links."""

    def __init__(self, cluster: Cluster, links: PeerLinks) -> None:
        self.cluster = cluster
        self.links = links

    async def route(self, name: str) -> PeerRoute | None:
        """A route to ``name`` on another instance, None if no other instance holds it."""
        urls = await self.cluster.holders(name)
        return await self.links.route(name, urls) if urls else None


class PeerLinks:
    """This instance's open links to the others, by advertised URL."""

    def __init__(self, instance: str, secret: str) -> None:
        self.instance = instance
        self.secret = secret
        self._links: dict[str, PeerLink] = {}
        self._opening: dict[str, asyncio.Future[PeerLink]] = {}
        self._turn = 0
        #: URL -> until when it is passed over (it could not be reached).
        self._failed: dict[str, float] = {}

    def open_links(self) -> list[PeerLink]:
        return [link for link in self._links.values() if link.open]

    async def route(self, name: str, urls: list[str]) -> PeerRoute:
        """A route to ``name`` through one of the instances at ``urls``, in turn.

        One that cannot be reached is passed over for ``RETRY_AFTER`` seconds
        while another holds the name; with none left, 502.
        """
        self._turn += 1
        now = time.monotonic()
        ordered = urls[self._turn % len(urls) :] + urls[: self._turn % len(urls)]
        reachable = [u for u in ordered if self._failed.get(u, 0.0) <= now] or ordered
        error: errors.StreamError | None = None
        for url in reachable:
            link = self._links.get(url)
            if link is not None and link.open:
                return PeerRoute(link, name)
            try:
                return PeerRoute(await self._link(url), name)
            except errors.ClientLost as e:
                self._failed[url] = time.monotonic() + RETRY_AFTER
                error = e
        assert error is not None
        raise error

    async def _link(self, url: str) -> PeerLink:
        opening = self._opening.get(url)
        if opening is None:
            opening = self._opening[url] = asyncio.ensure_future(self._connect(url))
            opening.add_done_callback(lambda _: self._opening.pop(url, None))
        return await asyncio.shield(opening)

    async def _connect(self, url: str) -> PeerLink:
        link: PeerLink | None = None

        def on_message(message: str | bytes | None) -> None:
            if link is None:
                return
            if message is None:
                self._lost(link, "peer link closed")
                return
            try:
                if isinstance(message, str):
                    raise errors.ProtocolError("text message on a peer link")
                link.receive(message)
            except errors.ProtocolError as e:
                log.error("protocol error on the peer link to %s: %s", url, e)
                link.conn.close(1002, "protocol error")
                self._lost(link, f"protocol error: {e}")

        headers = HTTPHeaders()
        headers.add(protocol.CLIENT_HEADER, str(protocol.PROTOCOL_VERSION))
        headers.add(PEER_HEADER, peer_header(self.secret, self.instance))
        ws_url = url.replace("http", "ws", 1).rstrip("/") + "/"
        request = httpclient.HTTPRequest(
            ws_url,
            headers=headers,
            connect_timeout=CONNECT_TIMEOUT,
            request_timeout=CONNECT_TIMEOUT,
        )
        try:
            conn = await websocket_connect(
                request,
                on_message_callback=on_message,
                ping_interval=5.0,
                ping_timeout=5.0,
                max_message_size=protocol.MAX_MESSAGE,
            )
        except (OSError, TimeoutError, httpclient.HTTPError) as e:
            raise errors.ClientLost(
                f"peer instance {url} unreachable: {e}", reason="Tunnel instance unreachable"
            ) from None
        if conn.protocol is not None:
            conn.protocol.set_nodelay(True)
        link = PeerLink(url, conn)
        self._links[url] = link
        log.info("peer link open url=%s", url)
        return link

    def _lost(self, link: PeerLink, why: str) -> None:
        if self._links.get(link.url) is link:
            del self._links[link.url]
            log.warning("peer link lost url=%s streams=%d: %s", link.url, len(link.streams), why)
        link.closed(why)

    def close(self) -> None:
        for link in list(self._links.values()):
            link.conn.close()
            self._lost(link, "shutting down")


# -- the holding side ------------------------------------------------------------


class Splice:
    """One peer stream carried by a local client's tunnel: frames pass, ids change.

    It sits in the client tunnel's stream table, so the tunnel routes the
    client's frames here; the peer's frames come from ``PeerHandler``.
    """

    __slots__ = (
        "handler",
        "out",
        "peer_id",
        "tunnel",
        "id",
        "upgrade",
        "client_credit",
        "peer_credit",
        "responded",
        "messages",
        "response_ended",
        "request_ended",
        "closed",
    )

    def __init__(
        self, handler: PeerHandler, out: Tunnel, head: protocol.RequestHead, tunnel: Tunnel
    ) -> None:
        self.handler = handler
        #: The peer link's sending half.
        self.out = out
        self.peer_id = head.stream_id
        self.tunnel = tunnel
        self.id = tunnel.attach(self)
        self.upgrade = head.upgrade
        #: What the client may still send before the peer grants more (checked here).
        self.client_credit = protocol.INITIAL_WINDOW
        #: What the peer may still send, as the client granted it.
        self.peer_credit = protocol.INITIAL_WINDOW
        self.responded = self.response_ended = self.closed = False
        #: A WebSocket's messages as the client frames them (checked here, see on_data).
        self.messages = protocol.MessageTracker(limit=1 << 62) if head.upgrade else None
        self.request_ended = head.body_length == 0 and not head.upgrade

    # -- frames from the client, routed by its tunnel ------------------------------

    def on_response(self, head: protocol.ResponseHead) -> None:
        if self.responded:
            raise errors.ProtocolError(f"second RESPONSE on stream {self.id}")
        self.responded = True
        self.response_ended = head.end_stream
        head.stream_id = self.peer_id
        self.out.send(head.encode())
        self._maybe_done()

    def on_data(self, frame: protocol.Data) -> None:
        if not self.responded or self.response_ended:
            raise errors.ProtocolError(f"DATA out of order on stream {self.id}")
        if len(frame.data) > self.client_credit:
            raise errors.ProtocolError(f"DATA beyond the window on stream {self.id}")
        if self.messages is not None and not frame.end_stream:
            self.messages.feed(frame)  # a text flag changing within a message: this tunnel closes
        self.client_credit -= len(frame.data)
        self.response_ended = frame.end_stream
        frame.stream_id = self.peer_id
        self.out.send(*frame.parts())
        self._maybe_done()

    def on_window(self, increment: int) -> None:
        if self.peer_credit + increment > protocol.MAX_WINDOW:
            raise errors.ProtocolError("WINDOW overflows the flow-control window")
        self.peer_credit += increment
        self.out.send(protocol.Window(self.peer_id, increment).encode())

    def fail(self, error: errors.StreamError) -> None:
        """The client reset the stream or its tunnel closed: tell the peer."""
        if not self.closed:
            reset = protocol.Reset(self.peer_id, error.reset_code, error.log_message)
            self.out.send(reset.encode())
            self.close()

    def wake(self) -> None:
        """Nothing waits here for the tunnel's send queue: credit bounds what passes."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.tunnel.forget(self.id)
            self.handler.splices.pop(self.peer_id, None)

    # -- frames from the peer ------------------------------------------------------

    def from_peer(self, frame: protocol.Frame) -> None:
        if isinstance(frame, protocol.Data):
            self.peer_credit -= len(frame.data)
            self.request_ended = self.request_ended or frame.end_stream
            frame.stream_id = self.id
            self.tunnel.send(*frame.parts())
            self._maybe_done()
        elif isinstance(frame, protocol.Window):
            self.client_credit = min(self.client_credit + frame.increment, protocol.MAX_WINDOW)
            frame.stream_id = self.id
            self.tunnel.send(frame.encode())
        elif isinstance(frame, protocol.Reset):
            frame.stream_id = self.id
            self.tunnel.send(frame.encode())
            self.close()
        else:
            raise errors.ProtocolError(f"unexpected {type(frame).__name__} on a peer link")

    def _maybe_done(self) -> None:
        # A WebSocket ends with the first close from either side; a request with both ends.
        if self.upgrade and (self.response_ended or self.request_ended):
            self.close()
        elif self.response_ended and self.request_ended:
            self.close()


class PeerHandler(WebSocketHandler):
    """Accepts peer links from other instances and splices their streams onto local tunnels."""

    peer = ""
    out: Tunnel | None = None

    def initialize(self, tunnels: Tunnels, secret: str) -> None:
        self.tunnels = tunnels
        self.secret = secret
        self.splices: dict[int, Splice] = {}

    def prepare(self) -> None:
        peer = verify(self.secret, self.request.headers.get(PEER_HEADER, ""))
        if peer is None:
            log.warning("refused peer link remote=%s: bad signature", self.request.remote_ip)
            self.set_status(403)
            self.finish("peer link refused\n")
            return
        self.peer = peer

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self, *args: str, **kwargs: str) -> None:
        self.set_nodelay(True)
        # Only its sending half is used: batching and the send queue of a tunnel.
        self.out = Tunnel(self, self.request.remote_ip or "", name="")  # type: ignore[arg-type]
        log.info("peer link accepted peer=%s remote=%s", self.peer, self.request.remote_ip)

    def on_message(self, message: str | bytes) -> None:
        try:
            if isinstance(message, str):
                raise errors.ProtocolError("text message on a peer link")
            for frame in protocol.decode_all(message):
                self._route(frame)
        except errors.ProtocolError as e:
            log.error("protocol error on the peer link from %s: %s", self.peer, e)
            self.close(1002, "protocol error")

    def _route(self, frame: protocol.Frame) -> None:
        if isinstance(frame, protocol.RequestHead):
            self._start(frame)
            return
        splice = self.splices.get(frame.stream_id)
        if splice is not None:
            splice.from_peer(frame)
        # else: a frame racing with the stream's end here: harmless

    def _start(self, head: protocol.RequestHead) -> None:
        assert self.out is not None
        if head.stream_id in self.splices:
            raise errors.ProtocolError(f"stream {head.stream_id} opened twice")
        names = [v for n, v in head.headers if n.lower() == _ROUTE_HEADER]
        name = names[0] if names else ""
        try:
            tunnel = self.tunnels.pick(name)
        except errors.StreamError as e:  # the client left meanwhile: the peer answers it
            self.out.send(protocol.Reset(head.stream_id, e.reset_code, e.log_message).encode())
            return
        splice = self.splices[head.stream_id] = Splice(self, self.out, head, tunnel)
        head.headers = [(n, v) for n, v in head.headers if n.lower() != _ROUTE_HEADER]
        head.stream_id = splice.id
        tunnel.send(head.encode())

    def on_close(self) -> None:
        if self.out is not None:
            self.out.closed("peer link closed")
        error = errors.Cancelled("peer link closed")
        for splice in list(self.splices.values()):
            reset = protocol.Reset(splice.id, error.reset_code, error.log_message)
            splice.tunnel.send(reset.encode())
            splice.close()
        if self.peer:
            log.info("peer link closed peer=%s", self.peer)
