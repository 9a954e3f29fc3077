"""Every request head is screened here before routing: framing, size, handshakes.

Tornado's HTTP/1 parser checks ``Content-Length`` and ``Transfer-Encoding``
only when it starts reading the body, which is after a streaming handler's
``prepare()`` has run, and so after the head was relayed to the local app.
A non-streaming handler (the WebSocket ones) gets its body buffered whole
before ``prepare()``. So the head is judged first, by ``relay.head_problem``.
A refused request is answered here (400, 414 or 431) and its connection taken
from Tornado: nothing after the head is parsed (its framing is void, so the
rest could only be misread as another request), and the connection closes
after a short lingering read, so that the answer is not lost to a reset.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tornado import gen, httputil, iostream
from tornado.http1connection import HTTP1Connection

from .. import protocol, relay

if TYPE_CHECKING:
    from .metrics import Metrics

access_log = logging.getLogger("backstream.access")

#: Tornado reads a header block up to this size; past it, it gives up reading the
#: head and ``limits.PublicConnection`` answers 431 (then a bounded lingering read).
HARD_HEADER_LIMIT = 256 * 1024
#: After a refusal, what the caller still sends is read and dropped, up to this much...
LINGER_BYTES = 1024 * 1024
#: ... for at most this many seconds, before the connection is closed.
LINGER_SECONDS = 2.0

#: Characters of a refused request's path in its log line (a 414's may be huge).
LOGGED_PATH = 200

_closing: set[asyncio.Task[None]] = set()


def is_tunnel_client(headers: httputil.HTTPHeaders) -> bool:
    return protocol.CLIENT_HEADER in headers


def is_peer_link(headers: httputil.HTTPHeaders) -> bool:
    return protocol.PEER_HEADER in headers


def is_websocket_upgrade(headers: httputil.HTTPHeaders) -> bool:
    return headers.get("Upgrade", "").lower() == "websocket"


def is_handshake(headers: httputil.HTTPHeaders, peers: bool) -> bool:
    """Whether the request is routed to a WebSocket handler (``make_app``'s rules), which
    Tornado feeds a body whole before ``prepare()``. ``peers``: ``--redis`` (peer links)."""
    return (
        is_tunnel_client(headers)
        or (peers and is_peer_link(headers))
        or is_websocket_upgrade(headers)
    )


class ScreenedConnection(HTTP1Connection):
    """One request of a public connection; its raw head is checked before Tornado parses it.

    Tornado accepts lines that end in a bare LF, and answers its own parse errors
    (line folding, control bytes) with a bare 400 and an immediate close. Here each
    becomes ``problem``, which ``HeadScreen`` answers like any other refused head.
    """

    #: Why the raw head is refused (known once it is parsed), or None.
    problem: str | None = None
    #: Called once the head is complete; True means it came too late (answered already).
    on_head: Callable[[], bool] | None = None
    #: The whole head was read (a failed read after it is not the head's).
    head_read = False

    def _parse_headers(self, data: bytes) -> tuple[str, httputil.HTTPHeaders]:
        self.head_read = True
        on_head = self.on_head
        if on_head is not None:
            self.on_head = None
            if on_head():
                raise iostream.StreamClosedError()  # answered 408 already: ends the loop
        self.problem = relay.raw_head_problem(data)
        try:
            return super()._parse_headers(data)
        except httputil.HTTPInputError:
            # Its message may quote a header value (a secret): never relayed, never logged.
            self.problem = self.problem or "a malformed header line"
            text = data.decode("latin-1").lstrip("\r\n")
            return text.partition("\n")[0].rstrip("\r"), httputil.HTTPHeaders()


class HeadScreen(httputil.HTTPMessageDelegate):
    """Passes acceptable requests on to ``inner``; answers the others itself."""

    __slots__ = ("inner", "connection", "refused", "metrics", "max_target", "peers")

    def __init__(
        self,
        inner: httputil.HTTPMessageDelegate,
        connection: httputil.HTTPConnection,
        metrics: Metrics | None = None,
        max_target: int = relay.MAX_TARGET,
        peers: bool = False,
    ) -> None:
        self.inner = inner
        self.connection = connection
        self.refused = False
        self.metrics = metrics
        #: Longest request target, else 414 (``--max-target``; 0: no limit).
        self.max_target = max_target
        #: Peer links are served (``--redis``): their handshakes take no body either.
        self.peers = peers

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        handshake = is_handshake(headers, self.peers)
        raw = self.connection.problem if isinstance(self.connection, ScreenedConnection) else None
        if raw is not None:
            problem: tuple[int, str] | None = (400, f"bad request: {raw}")
        else:
            pairs = list(headers.get_all())
            problem = relay.head_problem(
                start_line.method,
                start_line.path,
                pairs,
                handshake=handshake,
                max_target=self.max_target,
            )
        if problem is None or not isinstance(self.connection, HTTP1Connection):
            return self.inner.headers_received(start_line, headers)
        self.refused = True
        status, reason = problem
        access_log.info(
            "%s %s stream=- status=%d error=%r",
            start_line.method,
            start_line.path.partition("?")[0][:LOGGED_PATH],
            status,
            reason,
        )
        if self.metrics is not None:  # before routing: no tunnel to count it for
            self.metrics.other.count(status)
        body = (reason + "\n").encode()
        answer = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        task = asyncio.ensure_future(answer_and_close(self.connection.detach(), answer))
        _closing.add(task)
        task.add_done_callback(_closing.discard)
        return None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return None if self.refused else self.inner.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.inner.on_connection_close()


async def answer_and_close(
    stream: iostream.IOStream,
    answer: bytes,
    limit: int = LINGER_BYTES,
    seconds: float = LINGER_SECONDS,
) -> None:
    """Write ``answer``, then read and drop what the caller still sends, then close.

    Closing a socket with unread bytes sends a reset, which can destroy the
    answer before the caller read it; so the write side is shut first and the
    rest is drained, bounded in bytes (``limit``) and ``seconds`` (a "lingering close").
    The write counts against ``seconds`` too: a caller that never reads must not hold
    the socket, which Tornado no longer counts as a connection.
    """
    deadline = asyncio.get_running_loop().time() + seconds
    try:
        await gen.with_timeout(
            deadline, stream.write(answer), quiet_exceptions=iostream.StreamClosedError
        )
        stream.socket.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < limit:
            chunk = await gen.with_timeout(
                deadline,
                stream.read_bytes(64 * 1024, partial=True),
                quiet_exceptions=iostream.StreamClosedError,
            )
            drained += len(chunk)
    except (iostream.StreamClosedError, TimeoutError, OSError):
        pass
    finally:
        stream.close()
