"""The public side: every method on every path, relayed through a tunnel.

With ``@stream_request_body``, ``prepare()`` runs as soon as the headers are
in, so authorization and the choice of tunnel happen before any body byte is
read; the body then flows to the client chunk by chunk, with backpressure from
the stream's credit, and the response flows back the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from tornado import httputil, iostream
from tornado.web import RequestHandler, stream_request_body

from .. import errors, relay
from .admission import admit, destination
from .gate import Gate
from .limits import IdleTimer
from .stream import ServerStream
from .tunnel import Tunnels

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("backstream.server")
access_log = logging.getLogger("backstream.access")

#: Body bytes read and dropped from a refused request before answering (see ``refuse``).
LINGER_BYTES = 8 * 1024 * 1024
#: ... and for at most this many seconds in all, however slowly it trickles in.
LINGER_SECONDS = 10.0


class _AnyMethod:
    """Lets Tornado route any method token (PURGE, PROPFIND, ...) to the relay."""

    def __contains__(self, method: object) -> bool:
        return True


class _RelayedMethod(str):
    """A method token whose ``lower()`` names the relay.

    Tornado calls ``getattr(handler, request.method.lower())()`` once the body
    is in: a request with method ``FINISH``, ``FLUSH`` or ``PREPARE`` would call
    those handler methods instead of relaying. The value is unchanged.
    """

    __slots__ = ()

    def lower(self) -> str:
        return "relay"


@stream_request_body
class PublicHandler(RequestHandler):
    SUPPORTED_METHODS = _AnyMethod()  # type: ignore[assignment]

    stream: ServerStream | None = None
    error: errors.StreamError | None = None
    #: Cuts a request whose body stops coming (``--body-timeout``), while it is read.
    body_idle: IdleTimer | None = None

    def initialize(
        self,
        tunnels: Tunnels,
        no_client_code: int,
        timeout: float,
        max_body_size: int,
        gate: Gate | None = None,
        trusted: tuple[relay.Network, ...] = (),
        domain: str = "",
        metrics: Metrics | None = None,
        body_timeout: float = 0.0,
    ) -> None:
        self.tunnels = tunnels
        self.body_timeout = body_timeout
        self.no_client_code = no_client_code
        self.timeout = timeout
        self.max_body_size = max_body_size
        self.gate = gate
        self.trusted = trusted
        self.domain = domain
        self.metrics = metrics
        self.started = time.monotonic()
        self.target = ""
        self.tunnel_name = "-"
        #: The tunnel the request is routed to (``""``: the default), None until known.
        self.route: str | None = None
        self.body_length = 0
        self.body_received = 0
        self.body_sent = 0

    def clear(self) -> None:
        # The response is the local app's: none of Tornado's default headers,
        # not even built and removed again (its Date header is a formatdate call).
        self._headers = httputil.HTTPHeaders()
        self._write_buffer = []
        self._status_code = 200
        self._reason = "OK"

    def compute_etag(self) -> None:
        return None

    async def prepare(self) -> None:
        request = self.request
        request.method = _RelayedMethod(request.method or "")
        # Heads and bodies often go out as separate writes: without this, Nagle's
        # algorithm holds the second one for the caller's delayed ACK (40 ms).
        # Per request, since Tornado turns it off again after each response.
        request.connection.stream.set_nodelay(True)  # type: ignore[union-attr]
        try:
            # HeadScreen refused invalid framing already: this cannot raise.
            self.body_length = body_length = relay.body_length(request.headers.get_all())
            target, name = destination(request, self.domain)
            self.target, self.tunnel_name, self.route = target, name or "-", name
            tunnel = await admit(
                request, target, name, self.tunnels, self.gate, self.no_client_code
            )
            if self.max_body_size and body_length > self.max_body_size:
                raise errors.BodyTooLarge(f"Content-Length {body_length} > {self.max_body_size}")
        except errors.StreamError as e:
            await self.refuse(e)
            self._watch_body()
            return
        trusted = relay.is_trusted(request.remote_ip or "", self.trusted)
        self.stream = tunnel.relay_request(
            request, target, body_length, self.timeout, trusted=trusted
        )
        self._watch_body()

    def _watch_body(self) -> None:
        """From now on Tornado reads the body: time out when it stops coming."""
        if self.body_timeout > 0 and self.body_length != 0 and not self._finished:
            self.body_idle = IdleTimer(self.body_timeout, self._body_stalled)

    def _body_stalled(self) -> None:
        """No body byte for ``body_timeout`` seconds (credit waits not counted): 408.

        The stream is reset, so the local app's transfer ends too; the connection
        is closed (the rest of the body could not be told from a next request).
        """
        self.body_idle = None
        if self._finished or self.request.connection.stream.closed():  # type: ignore[union-attr]
            return
        error = errors.RequestTimeout(f"no request body byte for {self.body_timeout:g}s")
        if self.stream is None:  # refused and answered already, its body stopped coming
            self.error = self.error or error
            self._close_connection()
            return
        self.fail(error)

    async def refuse(self, error: errors.StreamError) -> None:
        """Answer a request refused at header time, at once.

        When a modest body follows, the answer is sent whole but the exchange
        ends only once that body has been read and dropped ("lingering
        close"): a client that sends its whole body before reading would
        otherwise get a connection reset instead of the answer. Nothing of it
        is ever forwarded.
        """
        lingers = (
            self.body_length == -1 or 0 < self.body_length <= LINGER_BYTES
        ) and "Expect" not in self.request.headers
        if not lingers:
            self.fail(error)
            return
        self.error = error
        self._write_error(error)
        await self.flush()
        # The answer is out: draining is a courtesy with a total deadline, so that
        # a body dripping a byte at a time cannot hold the connection for ever.
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self._end_drain)

    def _end_drain(self) -> None:
        if not self._finished:
            self._close_connection()

    async def data_received(self, chunk: bytes) -> None:
        stream = self.stream
        self.body_received += len(chunk)
        idle = self.body_idle
        if idle is not None:
            idle.touch()
        if stream is None or self._finished:
            if not self._finished and self.body_received > LINGER_BYTES:
                self._close_connection()  # refused, and too much body to drain
            return
        if self.max_body_size and self.body_received > self.max_body_size:
            self.fail(errors.BodyTooLarge(f"body exceeded {self.max_body_size} bytes"))
            return
        if idle is None:
            await stream.send_body(chunk)
        else:  # waiting for the tunnel's credit is not the caller's idleness
            await idle.during(stream.send_body(chunk))

    async def relay(self, *args: str) -> None:
        self._stop_body_idle()  # the whole body is in
        stream = self.stream
        if self._finished:
            return
        if stream is None:  # refused in prepare(); the answer went out, the body is drained
            self.finish()
            return
        if self.body_length:
            stream.end_body()
        try:
            head = await stream.response_head()
            self.set_status(head.status, head.reason or None)
            for name, value in head.headers:
                self.add_header(name, value)
            if head.end_stream or not stream.complete():
                # Send the head now: the caller may act on it before any body
                # (server-sent events, long polls), and Tornado must not
                # rewrite the headers of a body-less response in finish().
                await self.flush()
            # The server, not the client, decides what follows the head.
            no_body = self.request.method == "HEAD" or head.status in (204, 304)
            promised = 0 if no_body else relay.content_length(head.headers)
            while (chunks := await stream.read()) is not None:
                size = 0
                for chunk in chunks:  # flush() joins them: one copy, not two
                    if promised is not None and self.body_sent + size + len(chunk) > promised:
                        chunk = chunk[: promised - self.body_sent - size]
                    self.write(chunk)
                    size += len(chunk)
                self.body_sent += size
                if self.body_sent == promised:
                    break  # complete: finish now rather than wait for the end frame
                if not stream.complete():  # the last piece goes out with finish()
                    await self.flush()
                stream.consumed(size)
            if promised is not None and self.body_sent < promised:
                raise errors.ClientLost(
                    f"response ended after {self.body_sent} of {promised} bytes"
                )
        except errors.StreamError as e:
            self.fail(e)
            return
        except iostream.StreamClosedError:
            stream.reset(errors.Cancelled("public caller went away"))
            return
        finally:
            stream.close()
        self.finish()

    def fail(self, error: errors.StreamError) -> None:
        """Answer with the error's status, or cut the connection if the head went out."""
        self.error = error
        if self.stream is not None and not self.stream.closed:
            self.stream.reset(error)
        if self._finished:
            return
        if self._headers_written:
            log.log(
                logging.INFO if isinstance(error, errors.Cancelled) else logging.WARNING,
                "relay failed mid-response stream=%s: %s",
                self.stream and self.stream.id,
                error.log_message,
            )
            self._close_connection()
            return
        self._write_error(error)
        self.finish()

    def _write_error(self, error: errors.StreamError) -> None:
        self.clear()
        standard = error.status == type(error).status
        self.set_status(error.status, type(error).reason if standard else None)
        body = (error.reason + "\n").encode()
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        if isinstance(error, errors.RequestTimeout):  # Tornado closes it once written
            self.set_header("Connection", "close")
        self.set_header("Content-Length", len(body))
        self.write(body)

    def _close_connection(self) -> None:
        """End the exchange by closing the connection (the response is complete or void)."""
        self.request.connection.close()  # type: ignore[union-attr]
        self._finished = True
        self.on_finish()

    def _stop_body_idle(self) -> None:
        if self.body_idle is not None:
            self.body_idle.cancel()
            self.body_idle = None

    def on_connection_close(self) -> None:
        # Tornado's own fails the body future its request task waits on: without
        # it, each caller gone mid-upload kept its handler, task and stream for ever.
        super().on_connection_close()
        self._stop_body_idle()
        if self.stream is not None and not self.stream.closed:
            self.stream.reset(errors.Cancelled("public caller went away"))
        elif self.stream is None and self.error is not None and not self._finished:
            self.on_finish()  # refused and answered; the caller left while we drained its body

    def on_finish(self) -> None:
        self._stop_body_idle()
        stream_id = self.stream.id if self.stream is not None else "-"
        seconds = time.monotonic() - self.started
        elapsed = seconds * 1000
        if self.metrics is not None:
            self.metrics.finished(
                self.route, self.get_status(), self.body_received, self.body_sent, seconds
            )
        # The forwarded path (no query: it may hold tokens), or "-" for a target
        # that was refused (it may be anything, "user:password@host" included).
        path = self.target.partition("?")[0] or "-"
        if self.error is not None:
            access_log.info(
                "%s %s stream=%s status=%d error=%r in=%d out=%d ms=%.1f tunnel=%s",
                self.request.method,
                path,
                stream_id,
                self.get_status(),
                self.error.log_message,
                self.body_received,
                self.body_sent,
                elapsed,
                self.tunnel_name,
            )
        else:
            access_log.info(
                "%s %s stream=%s status=%d in=%d out=%d ms=%.1f tunnel=%s",
                self.request.method,
                path,
                stream_id,
                self.get_status(),
                self.body_received,
                self.body_sent,
                elapsed,
                self.tunnel_name,
            )


