"""The public side: every method on every path, relayed through a tunnel.

With ``@stream_request_body``, ``prepare()`` runs as soon as the headers are
in, so authorization and the choice of tunnel happen before any body byte is
read; the body then flows to the client chunk by chunk, with backpressure from
the stream's credit, and the response flows back the same way.
"""

from __future__ import annotations

import logging
import time

from tornado import httputil, iostream
from tornado.web import RequestHandler, stream_request_body

from .. import errors, relay
from .admission import admit, destination
from .gate import Gate
from .stream import ServerStream
from .tunnel import Tunnels

log = logging.getLogger("backstream.server")
access_log = logging.getLogger("backstream.access")

#: Body bytes read and dropped from a refused request before answering (see ``refuse``).
LINGER_BYTES = 8 * 1024 * 1024


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

    def initialize(
        self,
        tunnels: Tunnels,
        no_client_code: int,
        timeout: float,
        max_body_size: int,
        gate: Gate | None = None,
        trusted: tuple[relay.Network, ...] = (),
        domain: str = "",
    ) -> None:
        self.tunnels = tunnels
        self.no_client_code = no_client_code
        self.timeout = timeout
        self.max_body_size = max_body_size
        self.gate = gate
        self.trusted = trusted
        self.domain = domain
        self.started = time.monotonic()
        self.target = ""
        self.tunnel_name = "-"
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
            self.target, self.tunnel_name = target, name or "-"
            tunnel = await admit(
                request, target, name, self.tunnels, self.gate, self.no_client_code
            )
            if self.max_body_size and body_length > self.max_body_size:
                raise errors.BodyTooLarge(f"Content-Length {body_length} > {self.max_body_size}")
        except errors.StreamError as e:
            await self.refuse(e)
            return
        trusted = relay.is_trusted(request.remote_ip or "", self.trusted)
        self.stream = tunnel.relay_request(
            request, target, body_length, self.timeout, trusted=trusted
        )

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

    async def data_received(self, chunk: bytes) -> None:
        stream = self.stream
        self.body_received += len(chunk)
        if stream is None or self._finished:
            if not self._finished and self.body_received > LINGER_BYTES:
                self._close_connection()  # refused, and too much body to drain
            return
        if self.max_body_size and self.body_received > self.max_body_size:
            self.fail(errors.BodyTooLarge(f"body exceeded {self.max_body_size} bytes"))
            return
        await stream.send_body(chunk)

    async def relay(self, *args: str) -> None:
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
        self.set_header("Content-Length", len(body))
        self.write(body)

    def _close_connection(self) -> None:
        """End the exchange by closing the connection (the response is complete or void)."""
        self.request.connection.close()  # type: ignore[union-attr]
        self._finished = True
        self.on_finish()

    def on_connection_close(self) -> None:
        if self.stream is not None and not self.stream.closed:
            self.stream.reset(errors.Cancelled("public caller went away"))
        elif self.stream is None and self.error is not None and not self._finished:
            self.on_finish()  # refused and answered; the caller left while we drained its body

    def on_finish(self) -> None:
        stream_id = self.stream.id if self.stream is not None else "-"
        elapsed = (time.monotonic() - self.started) * 1000
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


