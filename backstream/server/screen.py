"""Every request head is screened here before routing: framing, size, handshakes.

Tornado's HTTP/1 parser checks ``Content-Length`` and ``Transfer-Encoding``
only when it starts reading the body, which is after a streaming handler's
``prepare()`` has run, and so after the head was relayed to the local app.
A non-streaming handler (the WebSocket ones) gets its body buffered whole
before ``prepare()``. So the head is judged first, by ``relay.head_problem``:
a refused request is answered here (400 or 431), none of its body is read,
and the connection is closed after the answer, since its framing is void.
"""

from __future__ import annotations

import http
import logging
from collections.abc import Awaitable

from tornado import httputil

from .. import protocol, relay

access_log = logging.getLogger("backstream.access")

#: Tornado reads a header block up to this size; past it the connection is cut
#: unanswered (reading more to answer would be what the attack wants).
HARD_HEADER_LIMIT = 256 * 1024


class HeadScreen(httputil.HTTPMessageDelegate):
    """Passes acceptable requests on to ``inner``; answers the others itself."""

    __slots__ = ("inner", "connection", "refused")

    def __init__(
        self, inner: httputil.HTTPMessageDelegate, connection: httputil.HTTPConnection
    ) -> None:
        self.inner = inner
        self.connection = connection
        self.refused = False

    def headers_received(
        self,
        start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        assert isinstance(start_line, httputil.RequestStartLine)
        handshake = (
            protocol.CLIENT_HEADER in headers or headers.get("Upgrade", "").lower() == "websocket"
        )
        pairs = list(headers.get_all())
        problem = relay.head_problem(start_line.method, start_line.path, pairs, handshake=handshake)
        if problem is None:
            return self.inner.headers_received(start_line, headers)
        self.refused = True
        status, reason = problem
        # Tornado must read no body: its framing is void, or it is not wanted.
        for name in ("Content-Length", "Transfer-Encoding"):
            if name in headers:
                del headers[name]
        body = (reason + "\n").encode()
        answer = httputil.HTTPHeaders()
        answer.add("Content-Type", "text/plain; charset=utf-8")
        answer.add("Content-Length", str(len(body)))
        answer.add("Connection", "close")
        line = httputil.ResponseStartLine("HTTP/1.1", status, http.HTTPStatus(status).phrase)
        self.connection.write_headers(line, answer, body)
        self.connection.finish()  # the read is not finished: Tornado closes after writing
        access_log.info(
            "%s %s stream=- status=%d error=%r",
            start_line.method,
            start_line.path.partition("?")[0],
            status,
            reason,
        )
        return None

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return None if self.refused else self.inner.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.inner.on_connection_close()
