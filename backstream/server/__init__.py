"""The public server: one Tornado application, one handler per kind of request.

Requests that carry a ``Backstream-Client`` header are tunnel clients and go
to ``TunnelHandler`` (or, with a signed ``Backstream-Peer`` header under
``--redis``, to ``PeerHandler``: another instance of the cluster); public
WebSocket upgrades go to ``PassthroughHandler``; everything else is public
traffic for ``PublicHandler``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import signal
import socket
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING

from tornado import httputil
from tornado.netutil import bind_sockets
from tornado.routing import Matcher, Rule
from tornado.web import Application, RequestHandler

from .. import protocol, relay, tls
from ..auth import create_authorizer
from ..auth.none import NoAuth
from ..config import ServerConfig
from .gate import Gate
from .limits import ConnectionLimits
from .listener import Server
from .passthrough import PassthroughHandler
from .public import PublicHandler
from .screen import (
    HARD_HEADER_LIMIT,
    HeadScreen,
    is_peer_link,
    is_tunnel_client,
    is_websocket_upgrade,
)
from .tunnel import TunnelHandler, Tunnels

if TYPE_CHECKING:
    from .metrics import Metrics
    from .peers import RemoteTunnels

log = logging.getLogger("backstream.server")

#: Tornado buffers no more than this per read; bodies stream past it.
CHUNK_SIZE = 256 * 1024


class _Headers(Matcher):
    """Matches the requests whose headers pass ``test``: one of the predicates with
    which ``HeadScreen`` tells handshakes (no body) from the rest."""

    def __init__(self, test: Callable[[httputil.HTTPHeaders], bool]) -> None:
        self.test = test

    def match(self, request: httputil.HTTPServerRequest) -> dict[str, object] | None:
        return {} if self.test(request.headers) else None


class _ScreenedApplication(Application):
    """Routes only the request heads that ``HeadScreen`` lets through."""

    #: Counts the requests ``HeadScreen`` refuses (``--metrics-addr``).
    metrics: Metrics | None = None
    #: The longest request target, else 414 (``--max-target``).
    max_target = relay.MAX_TARGET
    #: Peer links are routed (``--redis``).
    peers = False

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        inner = super().start_request(server_conn, request_conn)
        return HeadScreen(inner, request_conn, self.metrics, self.max_target, self.peers)


def make_app(
    config: ServerConfig, tunnels: Tunnels, gate: Gate | None, metrics: Metrics | None = None
) -> Application:
    """The Tornado application relaying public requests to ``tunnels``."""
    relayed = {
        "gate": gate,
        "tunnels": tunnels,
        "timeout": config.timeout,
        "no_client_code": config.no_client_code,
        "trusted": config.trust_forwarded,
        "domain": config.domain,
    }
    public = {
        **relayed,
        "max_body_size": config.max_body_size,
        "metrics": metrics,
        "body_timeout": config.body_timeout,
    }
    app = _ScreenedApplication(
        [
            *_peer_rules(config, tunnels),
            Rule(
                _Headers(is_tunnel_client),
                TunnelHandler,
                {
                    "tunnels": tunnels,
                    "gate": gate,
                    "domain": config.domain,
                    "public_url": config.public_url,
                    "metrics": metrics,
                    "token": config.token,
                },
            ),
            Rule(
                _Headers(is_websocket_upgrade),
                PassthroughHandler,
                {**relayed, "ws_max_message": config.ws_max_message},
            ),
            Rule(_Anything(), PublicHandler, public),
        ],
        websocket_ping_interval=config.ping_interval or None,
        websocket_ping_timeout=config.ping_timeout or None,
        websocket_max_message_size=protocol.MAX_MESSAGE,
        log_function=_log_function(metrics),
    )
    app.metrics = metrics
    app.max_target = config.max_target
    app.peers = bool(config.redis)
    return app


def _peer_rules(config: ServerConfig, tunnels: Tunnels) -> list[Rule]:
    """With ``--redis``: the links from other instances, recognised by their signed header."""
    if not config.redis:
        return []
    from .peers import PeerHandler

    return [
        Rule(
            _Headers(is_peer_link),
            PeerHandler,
            {"tunnels": tunnels, "secret": config.cluster_secret},
        )
    ]


def _no_tornado_access_log(handler: object) -> None:
    """``backstream.access`` logs each request once, with its stream id."""


def _log_function(metrics: Metrics | None) -> Callable[[RequestHandler], None]:
    """Tornado calls this once per answered request: the place where WebSocket
    upgrades are counted, whatever answered them (the 101 included, sent by
    Tornado's ``finish()``). ``PublicHandler`` counts its own, in ``on_finish``."""
    if metrics is None:
        return _no_tornado_access_log

    def count_websocket(handler: RequestHandler) -> None:
        if isinstance(handler, PassthroughHandler):
            stream = handler.stream
            tunnel = stream.tunnel.name if stream is not None else None
            metrics.websocket_answered(handler.request, tunnel, handler.get_status())

    return count_websocket


class _Anything(Matcher):
    def match(self, request: httputil.HTTPServerRequest) -> dict[str, object] | None:
        return {}


async def run_server(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM."""
    authorizer = create_authorizer(
        config.auth, config.policy_paths, config.opa_url, config.opa_token
    )
    tunnels = Tunnels(
        grace=config.name_grace,
        max_names=config.max_tunnels,
        max_clients=config.max_clients,
        max_streams=config.max_streams,
    )
    metrics = None
    if config.metrics_addr is not None:
        from .metrics import Metrics  # prometheus_client is only imported when asked for

        metrics = Metrics(
            tunnels,
            max_tunnels=config.metrics_max_tunnels,
            domain=config.domain,
            ready_needs_client=config.ready_needs_client,
        )
    gate = (
        None
        if isinstance(authorizer, NoAuth)
        else Gate(
            authorizer,
            config.trust_forwarded,
            metrics=metrics,
            forwarded_header=config.forwarded_header,
        )
    )
    if gate is not None:
        await gate.warn_missing()
    app = make_app(config, tunnels, gate, metrics)
    tls_context = tls.server_context(*config.tls) if config.tls else None
    scheme = "https" if tls_context else "http"
    server = Server(
        app,
        chunk_size=CHUNK_SIZE,
        max_header_size=HARD_HEADER_LIMIT,
        # Bodies are streamed, never held: the limit is ours (413), not Tornado's.
        max_body_size=config.max_body_size or 1 << 62,
        # A backstop only: ConnectionLimits times heads and idle connections.
        idle_connection_timeout=max(3600.0, config.idle_timeout + config.header_timeout),
        ssl_options=tls_context,
    )
    server.limits = ConnectionLimits(
        max_connections=config.max_connections,
        header=config.header_timeout,
        idle=config.idle_timeout,
    )
    try:
        # Under --workers, every worker listens on the same port (the kernel spreads callers).
        sockets = bind_sockets(
            config.port, config.host, backlog=1024, reuse_port=config.worker >= 0
        )
    except OSError as e:
        raise OSError(
            e.errno, f"cannot listen on {config.host}:{config.port}: {e.strerror}"
        ) from None
    server.add_sockets(sockets)
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
        log.info("listening url=%s://%s:%d", scheme, shown, port)
    cluster = await _join_cluster(config, tunnels, server, scheme, port) if config.redis else None
    metrics_server = None
    if metrics is not None and config.metrics_addr is not None:
        from . import metrics as metrics_port

        metrics_host, metrics_at = config.metrics_addr
        if metrics_at and config.worker > 0:  # one port each: worker i on the port + i
            metrics_at += config.worker
        metrics_server = metrics_port.start(metrics_host, metrics_at, metrics)
        metrics.not_ready = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Task[None]] = set()
    if gate is None and not config.token:
        tasks.add(asyncio.ensure_future(_warn_while_open(config, tunnels)))

    def on_sighup() -> None:
        if tls_context is not None and config.tls is not None:
            renewed = tls.reload(*config.tls)
            if renewed is not None:  # read by Tornado for each new connection
                server.ssl_options = renewed
        if gate is not None:
            task = asyncio.ensure_future(gate.reload("SIGHUP"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if gate is not None and config.policy_reload:
        tasks.add(gate.watch(config.policy_reload))
    await stop.wait()
    log.info("shutting down")
    if metrics is not None:
        metrics.not_ready = "shutting down"
    server.stop()
    if metrics_server is not None:
        metrics_server.stop()
    for task in tasks:
        task.cancel()
    if cluster is not None:
        cluster.links.close()
        await cluster.cluster.close()
    await authorizer.close()


async def _join_cluster(
    config: ServerConfig, tunnels: Tunnels, server: Server, scheme: str, port: int
) -> RemoteTunnels:
    """Register this instance in Redis and make the other instances' tunnels reachable.

    A worker of ``--workers`` shares its public port with the others, so peers
    reach it on a port of its own, on the advertised host.
    """
    from .cluster import Cluster  # redis is only imported with --redis
    from .peers import PeerLinks, RemoteTunnels

    advertise = config.advertise or f"{scheme}://{_url_host(config.host)}:{port}"
    if config.worker >= 0:
        parts = urllib.parse.urlsplit(advertise)
        host = parts.hostname or config.host
        peer_sockets = bind_sockets(0, host, backlog=1024)
        server.add_sockets(peer_sockets)
        advertise = f"{parts.scheme}://{_url_host(host)}:{peer_sockets[0].getsockname()[1]}"
    instance = secrets.token_hex(6)
    cluster = Cluster(config.redis, instance, advertise, config.name_grace)
    remote = RemoteTunnels(cluster, PeerLinks(instance, config.cluster_secret))
    tunnels.remote = remote
    cluster.lost = lambda name: tunnels.close_members(name, 4409, "name owned elsewhere now")
    cluster.start()
    log.info("cluster instance=%s advertise=%s", instance, advertise)
    return remote


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


#: Seconds between reminders that an open server has clients connected.
OPEN_WARNING_EVERY = 60.0


async def _warn_while_open(config: ServerConfig, tunnels: Tunnels) -> None:
    """Say that anyone may attach a client: at start, then each minute clients are connected.

    Only a server reachable beyond loopback repeats it: on loopback only this
    machine's programs can connect.
    """
    log.warning(
        "no policy in force: anyone may connect as a tunnel client "
        "(require one with --token or -p/--policy)"
    )
    if _is_loopback(config.host):
        return
    while True:
        await asyncio.sleep(OPEN_WARNING_EVERY)
        if len(tunnels):
            log.warning(
                "no token and no policy: %d tunnel client(s) connected that anyone could be",
                len(tunnels),
            )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
