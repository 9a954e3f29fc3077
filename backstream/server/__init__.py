"""The public server: one Tornado application, two handlers.

Requests that carry a ``Backstream-Client`` header are tunnel clients and go
to ``TunnelHandler``; everything else is public traffic for ``PublicHandler``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from tornado import httputil
from tornado.netutil import bind_sockets
from tornado.routing import Matcher, Rule
from tornado.web import Application

from .. import protocol
from ..auth import create_authorizer
from ..auth.none import NoAuth
from ..config import ServerConfig
from .gate import Gate
from .listener import Server
from .passthrough import PassthroughHandler
from .public import PublicHandler
from .screen import HARD_HEADER_LIMIT, HeadScreen
from .tunnel import TunnelHandler, Tunnels

log = logging.getLogger("backstream.server")

#: Tornado buffers no more than this per read; bodies stream past it.
CHUNK_SIZE = 256 * 1024


class _HasClientHeader(Matcher):
    def match(self, request: httputil.HTTPServerRequest) -> dict[str, object] | None:
        return {} if protocol.CLIENT_HEADER in request.headers else None


class _ScreenedApplication(Application):
    """Routes only the request heads that ``HeadScreen`` lets through."""

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        return HeadScreen(super().start_request(server_conn, request_conn), request_conn)


def make_app(config: ServerConfig, tunnels: Tunnels, gate: Gate | None) -> Application:
    """The Tornado application relaying public requests to ``tunnels``."""
    relayed = {
        "gate": gate,
        "tunnels": tunnels,
        "timeout": config.timeout,
        "no_client_code": config.no_client_code,
        "trusted": config.trust_forwarded,
        "domain": config.domain,
    }
    public = {**relayed, "max_body_size": config.max_body_size}
    return _ScreenedApplication(
        [
            Rule(
                _HasClientHeader(),
                TunnelHandler,
                {
                    "tunnels": tunnels,
                    "gate": gate,
                    "domain": config.domain,
                    "public_url": config.public_url,
                },
            ),
            Rule(
                _IsWebSocketUpgrade(),
                PassthroughHandler,
                {**relayed, "ws_max_message": config.ws_max_message},
            ),
            Rule(_Anything(), PublicHandler, public),
        ],
        websocket_ping_interval=config.ping_interval or None,
        websocket_ping_timeout=config.ping_timeout or None,
        websocket_max_message_size=protocol.MAX_MESSAGE,
        log_function=_no_tornado_access_log,
    )


def _no_tornado_access_log(handler: object) -> None:
    """``backstream.access`` logs each request once, with its stream id."""


class _IsWebSocketUpgrade(Matcher):
    def match(self, request: httputil.HTTPServerRequest) -> dict[str, object] | None:
        upgrade = request.headers.get("Upgrade", "")
        return {} if upgrade.lower() == "websocket" else None


class _Anything(Matcher):
    def match(self, request: httputil.HTTPServerRequest) -> dict[str, object] | None:
        return {}


async def run_server(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM."""
    authorizer = create_authorizer(
        config.auth, config.policy_paths, config.opa_url, config.opa_token
    )
    gate = None if isinstance(authorizer, NoAuth) else Gate(authorizer, config.trust_forwarded)
    if gate is not None:
        await gate.warn_missing()
    tunnels = Tunnels(grace=config.name_grace, max_names=config.max_tunnels)
    app = make_app(config, tunnels, gate)
    server = Server(
        app,
        chunk_size=CHUNK_SIZE,
        max_header_size=HARD_HEADER_LIMIT,
        # Bodies are streamed, never held: the limit is ours (413), not Tornado's.
        max_body_size=config.max_body_size or 1 << 62,
        idle_connection_timeout=3600,
    )
    try:
        sockets = bind_sockets(config.port, config.host, backlog=1024)
    except OSError as e:
        raise OSError(
            e.errno, f"cannot listen on {config.host}:{config.port}: {e.strerror}"
        ) from None
    server.add_sockets(sockets)
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
        log.info("listening url=http://%s:%d", shown, port)
    if gate is None:
        log.warning("no policy in force: anyone may connect as a tunnel client")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Task[None]] = set()
    if gate is not None:

        def on_sighup() -> None:
            task = asyncio.ensure_future(gate.reload("SIGHUP"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        if config.policy_reload:
            tasks.add(gate.watch(config.policy_reload))
    await stop.wait()
    log.info("shutting down")
    server.stop()
    for task in tasks:
        task.cancel()
    await authorizer.close()
