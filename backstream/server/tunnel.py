"""Tunnel clients on the server: the WebSocket handler and the registry.

A ``Tunnel`` is one connected client: it numbers the streams it carries,
routes incoming frames to them, and fails them all with 502 the moment the
WebSocket closes. ``Tunnels`` groups them in pools by name (``""`` is the
default tunnel); each public request goes to exactly one member of a pool,
the one with the fewest streams in flight. A pool belongs to the credentials
of its first member: a client presenting other credentials is refused (409),
so that nobody can join a tunnel and receive a share of its traffic.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import itertools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tornado.httputil import HTTPServerRequest
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .. import errors, protocol, relay, routing, websocket_writer
from ..auth.token import TOKEN_HEADER
from ..auth.token import matches as token_matches
from .gate import Gate
from .stream import MAX_UNSENT, ServerStream

if TYPE_CHECKING:
    from .metrics import Metrics, Series
    from .peers import RemoteTunnels

log = logging.getLogger("backstream.server")

_tunnel_ids = itertools.count(1)

#: Handshake headers each WebSocket connection makes for itself.
HANDSHAKE_HEADERS = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions")
#: Tornado answered any Expect itself; the tunnel and token headers are for the server alone.
_NEVER_RELAYED = ("Expect", routing.TUNNEL_HEADER, TOKEN_HEADER)


def credential_of(authorization: Iterable[str]) -> bytes:
    """A digest of a handshake's ``Authorization`` values: compared, never stored or logged."""
    return hashlib.sha256("\n".join(authorization).encode("utf-8", "replace")).digest()


class Tunnel:
    """One connected client and the streams in flight on it."""

    def __init__(
        self, handler: TunnelHandler, remote: str, name: str = "", credential: bytes = b""
    ) -> None:
        self.id = next(_tunnel_ids)
        self.remote = remote
        self.handler = handler
        self.name = name
        self.credential = credential
        #: Streams in flight by id: ``ServerStream`` objects, or a peer link's splices.
        self.streams: dict[int, Any] = {}
        self._next_stream_id = 1
        self._batch = protocol.Batch()
        self.open = True
        #: Bytes written to the WebSocket's stream and not yet sent.
        self.unsent = 0
        #: Streams waiting for ``unsent`` to fall to ``MAX_UNSENT``.
        self.stalled: set[ServerStream] = set()
        #: The server's metrics (``--metrics-addr``), or None.
        self.metrics: Metrics | None = None

    @property
    def meter(self) -> Series | None:
        """This tunnel's metric series (for WebSocket messages), None without metrics."""
        return self.metrics.series(self.name) if self.metrics is not None else None

    def open_stream(self, timeout: float) -> ServerStream:
        stream = ServerStream(self, 0, timeout)
        stream.id = self.attach(stream)
        return stream

    def attach(self, stream: Any) -> int:
        """Give ``stream`` the next id and route that id's frames to it."""
        stream_id = self._next_stream_id
        self._next_stream_id = stream_id + 1 if stream_id < 0xFFFFFFFF else 1
        self.streams[stream_id] = stream
        return stream_id

    def connection(self) -> Any:
        """The WebSocket protocol object frames are written to."""
        return self.handler.ws_connection

    def relay_request(
        self,
        request: HTTPServerRequest,
        target: str,
        body_length: int,
        timeout: float,
        *,
        upgrade: bool = False,
        trusted: bool = False,
        via: str | None = None,
    ) -> ServerStream:
        """Open a stream for a public request and send its head to the client.

        ``trusted``: the request came through a proxy named by ``--trust-forwarded``.
        ``via``: the tunnel name, for a peer link (the holding instance routes on it).
        """
        # A WebSocket's handshake headers are made anew by the client's own
        # connection to the local app.
        drop = (*HANDSHAKE_HEADERS, *_NEVER_RELAYED[1:]) if upgrade else _NEVER_RELAYED
        headers = relay.strip_hop_by_hop(request.headers.get_all(), drop=drop)
        remote, host = request.remote_ip or "", request.host or ""
        headers = relay.add_forwarded(
            headers, remote=remote, scheme=request.protocol, host=host, trusted=trusted
        )
        if via is not None:
            headers.append((routing.TUNNEL_HEADER, via))
        stream = self.open_stream(timeout)
        stream.upgrade = upgrade
        stream.body_open = body_length != 0
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
                size = sum(map(len, pieces))
                written = websocket_writer.write_binary(self.connection(), pieces)
                self.unsent += size
                written.add_done_callback(functools.partial(self._sent, size))
        except WebSocketClosedError:
            self.closed("connection lost while sending")

    def _sent(self, size: int, written: asyncio.Future[None]) -> None:
        if not written.cancelled():
            written.exception()  # a closed stream is handled by on_close
        self.unsent -= size
        if self.stalled and self.unsent <= MAX_UNSENT:
            for stream in self.stalled:
                stream.wake()
            self.stalled.clear()

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
        self.stalled.clear()
        for stream in list(self.streams.values()):
            stream.fail(errors.ClientLost(f"tunnel {self.id} closed: {why}"))
        self.streams.clear()


class Pool:
    """The tunnels serving one name, owned by the credentials of the first to connect."""

    __slots__ = ("name", "owner", "members", "_turn", "expiry")

    def __init__(self, name: str, owner: bytes) -> None:
        self.name = name
        self.owner = owner
        self.members: list[Tunnel] = []
        self._turn = 0
        #: While no member is connected: the timer that frees the name.
        self.expiry: asyncio.TimerHandle | None = None

    def admits(self, credential: bytes) -> bool:
        return hmac.compare_digest(self.owner, credential)

    def pick(self, max_streams: int = 0) -> Tunnel | None:
        """The member with the fewest streams in flight (ties in turn), or None.

        A member whose tunnel is closing, or whose client stopped reading
        (``MAX_UNSENT`` queued), or that has ``max_streams`` streams open
        (0: no limit), gets nothing new: not even a request head.
        """
        members = self.members
        limit = max_streams or 1 << 62
        if len(members) == 1:
            only = members[0]
            usable = only.open and only.unsent <= MAX_UNSENT and len(only.streams) < limit
            return only if usable else None
        if not members:
            return None
        count = len(members)
        turn = self._turn % count
        best: Tunnel | None = None
        best_at = 0
        for i in range(count):
            at = (turn + i) % count
            member = members[at]
            if not member.open or member.unsent > MAX_UNSENT or len(member.streams) >= limit:
                continue
            if best is None or len(member.streams) < len(best.streams):
                best, best_at = member, at
        # the next scan starts after the one chosen, so tied members take turns
        self._turn = best_at + 1
        return best


class Tunnels:
    """The connected clients by name; each public request goes to exactly one.

    A name whose last client left stays reserved for its owner for ``grace``
    seconds, so that a client reconnecting after a network drop gets it back
    and nobody else can take it in the gap.
    """

    def __init__(
        self,
        *,
        grace: float = 60.0,
        max_names: int = 1000,
        max_clients: int = 0,
        max_streams: int = 0,
    ) -> None:
        self._pools: dict[str, Pool] = {}
        self.grace = grace
        self.max_names = max_names
        #: Clients connected at once (``--max-clients``; 0: no limit), beyond it 503.
        self.max_clients = max_clients
        #: Streams in flight per client (``--max-streams``; 0: no limit), beyond it 503.
        self.max_streams = max_streams
        #: The names other instances hold (``--redis``), or None.
        self.remote: RemoteTunnels | None = None
        self._releases: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return sum(len(pool.members) for pool in self._pools.values())

    def pools(self) -> list[Pool]:
        """Every name held, reserved ones included (read by the metrics at scrape time)."""
        return list(self._pools.values())

    def refusal(self, name: str, credential: bytes) -> tuple[int, str] | None:
        """(status, reason) if a client with ``credential`` may not join ``name``, or None."""
        if self.max_clients and len(self) >= self.max_clients:
            return 503, f"this server has its maximum of {self.max_clients} clients connected"
        pool = self._pools.get(name)
        if pool is None:
            if len(self._pools) >= self.max_names:
                return 503, f"this server holds its maximum of {self.max_names} tunnels"
            return None
        if pool.admits(credential):
            return None
        return 409, f"name {name} is in use" if name else "the tunnel is in use"

    def taken(self, name: str) -> bool:
        return name in self._pools

    def close_members(self, name: str, code: int, reason: str) -> None:
        """Disconnect every client of ``name`` here (the cluster gave it to another owner)."""
        pool = self._pools.get(name)
        for member in list(pool.members) if pool is not None else []:
            member.handler.close(code, reason)

    def held(self, name: str) -> bool:
        """Whether a client of ``name`` is connected here."""
        pool = self._pools.get(name)
        return pool is not None and bool(pool.members)

    def abandon_remotely(self, name: str, credential: bytes) -> None:
        """A claim whose client never connected here: withdraw it from the cluster."""
        if self.remote is None or self.held(name):
            return
        task = asyncio.ensure_future(self.remote.cluster.abandon(name, credential))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def release_remotely(self, name: str) -> None:
        """No client of ``name`` is left here: tell the cluster (its reservation starts)."""
        if self.remote is None or self.held(name):
            return
        task = asyncio.ensure_future(self.remote.cluster.release(name))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def add(self, tunnel: Tunnel) -> None:
        """Join ``tunnel`` to its name's pool; check ``refusal`` first."""
        pool = self._pools.get(tunnel.name)
        if pool is None:
            pool = self._pools[tunnel.name] = Pool(tunnel.name, tunnel.credential)
        if pool.expiry is not None:
            pool.expiry.cancel()
            pool.expiry = None
        pool.members.append(tunnel)

    def remove(self, tunnel: Tunnel) -> None:
        pool = self._pools.get(tunnel.name)
        if pool is None or tunnel not in pool.members:
            return
        pool.members.remove(tunnel)
        if not pool.members:
            if self.grace > 0:
                loop = asyncio.get_running_loop()
                pool.expiry = loop.call_later(self.grace, self._expire, pool)
            else:
                self._expire(pool)

    def _expire(self, pool: Pool) -> None:
        if not pool.members and self._pools.get(pool.name) is pool:
            del self._pools[pool.name]
            if pool.name:
                log.info("name released tunnel_name=%s: no client for %gs", pool.name, self.grace)

    def pick(self, name: str, no_client_code: int = 503) -> Tunnel:
        """The tunnel for a request to ``name``; raises NoClient or UnknownTunnel."""
        pool = self._pools.get(name)
        tunnel = pool.pick(self.max_streams) if pool is not None else None
        if tunnel is not None:
            return tunnel
        if pool is not None and any(member.open for member in pool.members):
            limit = self.max_streams
            if limit and all(len(m.streams) >= limit for m in pool.members if m.open):
                raise errors.NoClient(
                    f"tunnel {name or '(default)'}: every client has {limit} streams in flight",
                    reason="The tunnel is busy",
                )
            raise errors.NoClient(
                f"tunnel {name or '(default)'}: every client has {MAX_UNSENT} bytes unsent",
                reason="The tunnel client is not keeping up",
            )
        if pool is None and name:
            message = f"no tunnel named {name}"
            raise errors.UnknownTunnel(message, reason=message)
        raise errors.NoClient(
            f"no client connected for tunnel {name or '(default)'}", status=no_client_code
        )


#: Registry refusals (``Tunnels.refusal``) by status, as metric reasons.
_REGISTRY_REFUSALS = {409: "name_in_use", 503: "server_full"}


class TunnelHandler(WebSocketHandler):
    """Accepts tunnel clients (requests with a ``Backstream-Client`` header)."""

    tunnels: Tunnels
    tunnel: Tunnel | None = None
    credential = b""
    name = ""
    #: This handshake claimed its name in the cluster (``--redis``).
    claimed = False
    #: Why this tunnel went away, when this side knows better than the close code.
    gone: str | None = None

    def initialize(
        self,
        tunnels: Tunnels,
        gate: Gate | None = None,
        domain: str = "",
        public_url: str = "",
        metrics: Metrics | None = None,
        token: str = "",
    ) -> None:
        self.tunnels = tunnels
        self.gate = gate
        self.token = token
        self.domain = domain
        self.public_url = public_url
        self.metrics = metrics

    async def prepare(self) -> None:
        request = self.request
        problem = protocol.check_version(request.headers.get(protocol.CLIENT_HEADER))
        if problem is not None:
            log.warning("refused tunnel client remote=%s: %s", request.remote_ip, problem)
            self._refuse(400, problem, "version")
            return
        if self.token and not token_matches(request.headers.get(TOKEN_HEADER), self.token):
            log.warning(
                "refused tunnel client remote=%s status=401: missing or wrong token",
                request.remote_ip,
            )
            self._refuse(401, "missing or wrong token", "token")
            return
        asked = request.headers.get(routing.NAME_HEADER, "").strip()
        try:
            name = routing.check_name(asked) if asked else ""
            if self.gate is not None:
                target = relay.origin_form(request.uri or "/")
                await self.gate.check_client(request, target, name)
        except errors.StreamError as e:
            self._refuse(e.status, e.reason, "denied" if e.status == 403 else "policy_error")
            return
        except ValueError as e:
            log.warning("refused tunnel client remote=%s status=400: %s", request.remote_ip, e)
            self._refuse(400, str(e), "bad_name")
            return
        if not name and self.domain:
            name = routing.random_name()
            while self.tunnels.taken(name):  # 50 random bits: practically never
                name = routing.random_name()
        self.name = name
        self.credential = credential_of(request.headers.get_list("Authorization"))
        if self._refused_by_registry() or await self._refused_by_cluster():
            return
        # Sent with the 101: the client learns its name and where it is reached.
        self.set_header(routing.NAME_HEADER, name)
        self.set_header(
            routing.URL_HEADER,
            routing.public_url(
                name, self.domain, self.public_url, request.protocol, request.host or ""
            ),
        )

    def _refused_by_registry(self) -> bool:
        refusal = self.tunnels.refusal(self.name, self.credential)
        if refusal is None:
            return False
        status, reason = refusal
        log.warning(
            "refused tunnel client remote=%s tunnel_name=%s status=%d: %s",
            self.request.remote_ip,
            self.name or "-",
            status,
            reason,
        )
        self._refuse(status, reason, _REGISTRY_REFUSALS.get(status, "name_in_use"))
        return True

    async def _refused_by_cluster(self) -> bool:
        remote = self.tunnels.remote
        if remote is None:
            return False
        try:
            if await remote.cluster.claim(self.name, self.credential):
                self.claimed = True  # released again if the upgrade does not happen
                return False
        except errors.StreamError as e:
            log.warning("refused tunnel client remote=%s status=503: %s", self.request.remote_ip, e)
            self._refuse(503, e.reason, "cluster_unavailable")
            return True
        reason = f"name {self.name} is in use" if self.name else "the tunnel is in use"
        log.warning(
            "refused tunnel client remote=%s tunnel_name=%s status=409: %s (in the cluster)",
            self.request.remote_ip,
            self.name or "-",
            reason,
        )
        self._refuse(409, reason, "name_in_use")
        return True

    def _refuse(self, status: int, message: str, reason: str) -> None:
        """Answer the handshake with an error instead of upgrading.

        ``reason``: the refusal's label in ``backstream_client_refusals_total``.
        """
        if self.metrics is not None:
            self.metrics.refused(reason)
        self.clear_header(routing.NAME_HEADER)
        self.clear_header(routing.URL_HEADER)
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(message + "\n")

    def check_origin(self, origin: str) -> bool:
        # Tunnel clients are programs, not browsers; auth.client decides who may connect.
        return True

    def open(self, *args: str, **kwargs: str) -> None:
        refusal = self.tunnels.refusal(self.name, self.credential)
        if refusal is not None:  # another owner connected while this one was upgrading
            log.warning("refused tunnel client remote=%s: %s", self.request.remote_ip, refusal[1])
            if self.metrics is not None:
                self.metrics.refused(_REGISTRY_REFUSALS.get(refusal[0], "name_in_use"))
            self.close(4000 + refusal[0], refusal[1][:120])
            if self.claimed:
                self.tunnels.abandon_remotely(self.name, self.credential)
            return
        self.set_nodelay(True)
        self.tunnel = Tunnel(self, self.request.remote_ip or "", self.name, self.credential)
        self.tunnels.add(self.tunnel)
        if self.metrics is not None:
            self.metrics.connects.inc()
            self.tunnel.metrics = self.metrics
        log.info(
            "client connected tunnel=%d tunnel_name=%s remote=%s clients=%d",
            self.tunnel.id,
            self.name or "-",
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
            self.gone = "protocol_error"
            tunnel.closed(f"protocol error: {e}")
            self.close(1002, "protocol error")

    def on_finish(self) -> None:
        # Tornado's get() may still refuse the upgrade (400, 426) after the claim.
        if self.claimed and self.get_status() != 101:
            self.claimed = False
            self.tunnels.abandon_remotely(self.name, self.credential)

    def on_close(self) -> None:
        tunnel = self.tunnel
        if tunnel is None:  # gone before open(): nothing holds the name here
            if self.claimed:
                self.tunnels.abandon_remotely(self.name, self.credential)
            return
        self.tunnels.remove(tunnel)
        self.tunnels.release_remotely(tunnel.name)
        in_flight = len(tunnel.streams)
        tunnel.closed(f"code={self.close_code} reason={self.close_reason!r}")
        if self.metrics is not None:
            # Without a close frame from the client, the connection was lost.
            self.metrics.disconnected(
                self.gone or ("closed" if self.close_code is not None else "lost")
            )
        log.info(
            "client disconnected tunnel=%d tunnel_name=%s in_flight=%d clients=%d",
            tunnel.id,
            tunnel.name or "-",
            in_flight,
            len(self.tunnels),
        )
