"""Limits of the public listener: connections at once, and time for heads and bodies.

Tornado's own ``header_timeout`` covers the wait for a request head from the
end of the previous response, so it cannot tell an idle keep-alive connection
from one that trickles a head (slowloris), and it closes both unanswered; its
``body_timeout`` is a total, which a slow big upload that keeps moving would
hit. So each public connection runs Tornado's request loop here
(``PublicConnection``) with one timer per request head (``HeadDeadline``):

- a head that started but is not complete within ``header`` seconds is answered
  ``408`` with ``Connection: close``, then the connection is closed after a
  bounded lingering read (Tornado's read of the head drains it meanwhile);
- a connection that sent no byte of a request is closed quietly: a new one
  after ``header`` seconds, a kept-alive one after ``idle`` seconds.

Whether a head started is read from the stream's read buffer when the timer
fires: nothing is done per byte. The check runs every ``header`` seconds on an
idle connection, so a head is given at most ``header`` seconds from its first
byte (less if that byte came between two checks), never more.

``IdleTimer`` is the request body's: it fires when no body byte came for
``body`` seconds, not counting the time the server itself waits (for flow-control
credit from the tunnel). Connections beyond ``max_connections`` get a short
``503`` with ``Retry-After: 1`` before any byte of theirs is parsed. A head that
outgrows Tornado's ``max_header_size`` gets ``431``, where Tornado would close
the connection unanswered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tornado import httputil, iostream
from tornado.http1connection import HTTP1ConnectionParameters, HTTP1ServerConnection
from tornado.log import gen_log

from .screen import LINGER_SECONDS, ScreenedConnection, answer_and_close

log = logging.getLogger("backstream.server")
access_log = logging.getLogger("backstream.access")

T = TypeVar("T")

#: A connection refused for the connection limit is drained of at most this much...
REFUSED_LINGER_BYTES = 64 * 1024
#: ... for at most this many seconds.
REFUSED_LINGER_SECONDS = 1.0

_closing: set[asyncio.Task[None]] = set()


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """The limits of ``listener.Server``; 0 turns one off."""

    #: Public connections at once; beyond it 503 (``--max-connections``).
    max_connections: int = 10000
    #: Seconds a request head may take (``--header-timeout``).
    header: float = 10.0
    #: Seconds a kept-alive connection may wait for its next request (``--idle-timeout``).
    idle: float = 60.0


def _answer(status: str, reason: str, *extra: str) -> bytes:
    body = (reason + "\n").encode()
    head = "".join(
        (
            f"HTTP/1.1 {status}\r\n",
            "Content-Type: text/plain; charset=utf-8\r\n",
            f"Content-Length: {len(body)}\r\n",
            *(line + "\r\n" for line in extra),
            "Connection: close\r\n\r\n",
        )
    )
    return head.encode() + body


def refuse_connection(stream: iostream.IOStream, limit: int) -> None:
    """Answer a connection beyond ``limit`` with 503 and close it (lingering)."""
    reason = f"the server has its maximum of {limit} connections open"
    access_log.info("- - stream=- status=503 error=%r", reason)
    answer = _answer(
        "503 Service Unavailable", "Too many connections, retry later", "Retry-After: 1"
    )
    # One deadline for it all: over TLS the write waits for a handshake the
    # caller may never finish, and this connection is not counted any more.
    task = asyncio.ensure_future(_bounded(stream, answer))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def _bounded(stream: iostream.IOStream, answer: bytes) -> None:
    drain = answer_and_close(stream, answer, REFUSED_LINGER_BYTES, REFUSED_LINGER_SECONDS)
    try:
        await asyncio.wait_for(drain, 2 * REFUSED_LINGER_SECONDS)
    except TimeoutError:
        stream.close()


class HeadDeadline:
    """The time one connection has for its next request head: one timer per request.

    ``first``: the connection's first request (it has ``header`` seconds for its
    first byte too), else a kept-alive connection (``idle`` seconds for it).
    """

    __slots__ = ("stream", "header", "until", "expired", "_loop", "_handle")

    def __init__(self, stream: iostream.IOStream, header: float, idle: float, first: bool) -> None:
        self.stream = stream
        self.header = header
        self.expired = False
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        wait = (header or idle) if first else idle
        #: When a connection that sent nothing of a request is closed.
        self.until = now + wait if wait else float("inf")
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(
            min(now + header, self.until) if header else self.until, self._check
        )

    def head_complete(self) -> bool:
        """The head is in: stop the timer. True if it came too late (answered 408 already)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        return self.expired

    def _check(self) -> None:
        self._handle = None
        stream = self.stream
        if stream.closed() or not stream.reading():
            return  # closed, or the head is complete and about to be parsed
        now = self._loop.time()
        if stream._read_buffer_size:  # a head started and is not complete
            if self.header:
                self._too_late()
            return  # no header timeout: it may take its time
        if now >= self.until:
            log.debug("closing an idle connection remote=%s", _remote(stream))
            stream.close()
            return
        due = min(now + self.header, self.until) if self.header else self.until
        self._handle = self._loop.call_at(due, self._check)

    def _too_late(self) -> None:
        self.expired = True
        reason = f"request head not complete within {self.header:g}s"
        access_log.info("- - stream=- status=408 error=%r", reason)
        stream = self.stream
        try:
            written = stream.write(_answer("408 Request Timeout", "Request head timed out"))
        except iostream.StreamClosedError:
            return
        written.add_done_callback(self._answered)

    def _answered(self, written: asyncio.Future[None]) -> None:
        """Shut the write side and let Tornado's read of the head drain the rest, a while."""
        stream = self.stream
        if written.cancelled() or written.exception() is not None or stream.socket is None:
            stream.close()
            return
        try:
            stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            stream.close()
            return
        self._loop.call_later(LINGER_SECONDS, stream.close)


def _remote(stream: iostream.IOStream) -> str:
    try:
        return str(stream.socket.getpeername()[0]) if stream.socket is not None else "-"
    except OSError:
        return "-"


class PublicConnection(HTTP1ServerConnection):
    """Tornado's HTTP/1 request loop (6.6), with a ``HeadDeadline`` for each request
    and a ``ScreenedConnection`` (the raw head checked) for each request."""

    def __init__(
        self,
        stream: iostream.IOStream,
        params: HTTP1ConnectionParameters | None,
        context: object | None,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(stream, params, context)
        self.limits = limits
        #: The request whose head is being read, and its timer.
        self.reading: ScreenedConnection | None = None
        self.deadline: HeadDeadline | None = None
        self._close_fd = stream.close_fd
        stream.close_fd = self._close_fd_or_answer  # type: ignore[method-assign]

    def _close_fd_or_answer(self) -> None:
        """Tornado closes a connection whose head outgrew ``max_header_size`` at once,
        unanswered (``UnsatisfiableReadError``): keep its socket for a 431 instead, then
        close after a bounded lingering read (``answer_and_close``)."""
        stream, conn, deadline = self.stream, self.reading, self.deadline
        sock = stream.socket
        if (
            sock is None
            or conn is None
            or conn.head_read  # a chunk-size line of the body, say
            or (deadline is not None and deadline.expired)  # answered 408 already
            or not isinstance(stream.error, iostream.UnsatisfiableReadError)
        ):
            self._close_fd()
            return
        stream.socket = None  # type: ignore[assignment]  # closed for Tornado, kept here
        size = self.params.max_header_size
        reason = f"request head larger than {size} bytes"
        access_log.info("- - stream=- status=431 error=%r", reason)
        tls = isinstance(stream, iostream.SSLIOStream)  # its handshake is done: a no-op
        kept = iostream.SSLIOStream(sock) if tls else iostream.IOStream(sock)
        answer = _answer("431 Request Header Fields Too Large", reason)
        task = asyncio.ensure_future(answer_and_close(kept, answer))
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _server_request_loop(self, delegate: httputil.HTTPServerConnectionDelegate) -> None:
        header, idle = self.limits.header, self.limits.idle
        first = True
        try:
            while True:
                conn = ScreenedConnection(self.stream, False, self.params, self.context)
                deadline = None
                if header or idle:
                    deadline = HeadDeadline(self.stream, header, idle, first)
                    conn.on_head = deadline.head_complete
                first = False
                self.reading, self.deadline = conn, deadline
                request_delegate = delegate.start_request(self, conn)
                try:
                    ret = await conn.read_response(request_delegate)
                except (
                    iostream.StreamClosedError,
                    iostream.UnsatisfiableReadError,
                    asyncio.CancelledError,
                ):
                    return
                except Exception:
                    gen_log.error("Uncaught exception", exc_info=True)
                    conn.close()
                    return
                finally:
                    self.reading = self.deadline = None
                    if deadline is not None:
                        deadline.head_complete()  # the request ended before its head, maybe
                if not ret:
                    return
                await asyncio.sleep(0)
        finally:
            delegate.on_close(self)


class IdleTimer:
    """Calls ``expired()`` once ``touch()`` was not called for ``seconds``.

    Time spent in ``during(work)`` (the server's own wait) does not count. One
    timer per ``seconds`` however often it is touched.
    """

    __slots__ = ("seconds", "expired", "last", "held", "_loop", "_handle")

    def __init__(self, seconds: float, expired: Callable[[], None]) -> None:
        self.seconds = seconds
        self.expired = expired
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self.held = False
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(
            self.last + seconds, self._check
        )

    def touch(self) -> None:
        self.last = self._loop.time()

    async def during(self, work: Awaitable[T]) -> T:
        """Await ``work`` (a wait of the server's, not the caller's) with the clock held."""
        self.held = True
        try:
            return await work
        finally:
            self.held = False
            self.last = self._loop.time()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        now = self._loop.time()
        due = now + self.seconds if self.held else self.last + self.seconds
        if due <= now:
            self._handle = None
            self.expired()
            return
        self._handle = self._loop.call_at(due, self._check)
