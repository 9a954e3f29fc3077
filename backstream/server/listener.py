"""Tornado's HTTPServer, with an accept loop that survives running out of descriptors.

Tornado's accept handler lets ``EMFILE`` escape: the listening socket stays
readable, so the IOLoop calls it again at once and logs a traceback each
time, a busy loop that fills the log. Here accepting pauses for a moment
instead, and the condition is logged once per ``LOG_EVERY`` seconds.

Each accepted connection is served by ``limits.PublicConnection`` (a timer for
each request head, the raw head checked), or refused with 503 beyond
``limits.max_connections`` served at once.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from tornado import iostream
from tornado.httpserver import HTTPServer, _HTTPRequestContext
from tornado.ioloop import IOLoop

from .limits import ConnectionLimits, PublicConnection, refuse_connection

log = logging.getLogger("backstream.server")

#: Seconds accepting pauses when the process or system is out of resources.
PAUSE = 0.1
#: Seconds between two log lines about it.
LOG_EVERY = 10.0
#: Connections accepted per wake-up, so that a flood cannot starve the loop.
BURST = 128
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Server(HTTPServer):
    #: Connections at once and the time for request heads (set before serving).
    limits = ConnectionLimits()

    def handle_stream(self, stream: iostream.IOStream, address: tuple[Any, ...]) -> None:
        # HTTPServer.handle_stream, with our connection class; upgraded (WebSocket)
        # connections leave ``_connections`` once detached.
        limit = self.limits.max_connections
        if limit and len(self._connections) >= limit:
            refuse_connection(stream, limit)
            return
        context = _HTTPRequestContext(stream, address, self.protocol, self.trusted_downstream)
        conn = PublicConnection(stream, self.conn_params, context, self.limits)
        self._connections.add(conn)
        conn.start_serving(self)

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        # TCPServer.add_sockets with our accept handler; stop() uses the same two maps.
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = Acceptor(sock, self._handle_connection).remove


class Acceptor:
    """Calls ``callback(connection, address)`` for each connection accepted on ``sock``."""

    def __init__(self, sock: socket.socket, callback: Callable[[socket.socket, Any], None]):
        self.sock = sock
        self.callback = callback
        self.loop = IOLoop.current()
        self.listening = True
        self.removed = False
        self.missed = 0
        self.logged = -LOG_EVERY
        self.loop.add_handler(sock, self._on_readable, IOLoop.READ)

    def _on_readable(self, fd: Any, events: int) -> None:
        for _ in range(BURST):
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno not in _EXHAUSTED:
                    raise
                self._pause(e)
                return
            self.callback(connection, address)

    def _pause(self, error: OSError) -> None:
        self.missed += 1
        now = time.monotonic()
        if now - self.logged >= LOG_EVERY:
            log.error(
                "cannot accept connections: %s; retrying every %gs (%d times since last said)",
                error.strerror,
                PAUSE,
                self.missed,
            )
            self.logged, self.missed = now, 0
        self.loop.remove_handler(self.sock)
        self.listening = False
        self.loop.call_later(PAUSE, self._resume)

    def _resume(self) -> None:
        if not self.removed and not self.listening:
            self.listening = True
            self.loop.add_handler(self.sock, self._on_readable, IOLoop.READ)

    def remove(self) -> None:
        """Stop accepting (``TCPServer.stop``)."""
        if self.listening:
            self.loop.remove_handler(self.sock)
            self.listening = False
        self.removed = True
