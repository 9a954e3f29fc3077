"""The public side: every method on every path, relayed through a tunnel.

With ``@stream_request_body``, ``prepare()`` runs as soon as the headers are
in, so authorization and the choice of tunnel happen before any body byte is
read; the body then flows to the client chunk by chunk, with backpressure from
the stream's credit, and the response flows back the same way.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tornado import httputil, iostream
from tornado.web import RequestHandler, stream_request_body

from .. import errors, protocol, relay
from .gate import Gate
from .stream import ServerStream
from .tunnel import Tunnels

log = logging.getLogger("backstream.server")
access_log = logging.getLogger("backstream.access")


class _AnyMethod:
    """Lets Tornado route any method token (PURGE, PROPFIND, ...) to the relay."""

    def __contains__(self, method: object) -> bool:
        return True


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
    ) -> None:
        self.tunnels = tunnels
        self.no_client_code = no_client_code
        self.timeout = timeout
        self.max_body_size = max_body_size
        self.gate = gate
        self.started = time.monotonic()
        self.body_length = 0
        self.body_received = 0
        self.body_sent = 0

    def __getattr__(self, name: str) -> Any:
        # Tornado calls getattr(self, method.lower()) once the body is in.
        if name == self.request.method.lower():
            return self.relay
        raise AttributeError(name)

    def set_default_headers(self) -> None:
        # The response is the local app's: no Tornado defaults.
        self.clear_header("Server")
        self.clear_header("Content-Type")
        self.clear_header("Date")

    def compute_etag(self) -> None:
        return None

    async def prepare(self) -> None:
        request = self.request
        # The head and the body go out as separate writes: without this,
        # Nagle's algorithm holds the body for the caller's delayed ACK (40 ms).
        request.connection.stream.set_nodelay(True)  # type: ignore[union-attr]
        try:
            if self.gate is not None:
                await self.gate.check_public(request)
            target = relay.origin_form(request.uri or "")
            body_length = _body_length(request.headers)
            if self.max_body_size and body_length > self.max_body_size:
                raise errors.BodyTooLarge(f"Content-Length {body_length} > {self.max_body_size}")
            tunnel = self.tunnels.pick()
            if tunnel is None:
                raise errors.NoClient("no tunnel client connected", status=self.no_client_code)
        except errors.StreamError as e:
            self.fail(e)
            return
        except ValueError as e:
            self.fail(errors.StreamError(str(e), status=400))
            return
        headers = relay.strip_hop_by_hop(request.headers.get_all(), drop=("Expect",))
        host = request.host or ""
        headers = relay.add_forwarded(
            headers, remote=request.remote_ip or "", scheme=request.protocol, host=host
        )
        self.body_length = body_length
        self.stream = stream = tunnel.open_stream(self.timeout)
        tunnel.send(
            protocol.RequestHead(
                stream.id,
                request.method or "GET",
                target,
                headers,
                body_length,
                request.remote_ip or "",
                request.protocol,
                host,
            ).encode()
        )

    async def data_received(self, chunk: bytes) -> None:
        stream = self.stream
        if stream is None or self._finished:
            return
        self.body_received += len(chunk)
        if self.max_body_size and self.body_received > self.max_body_size:
            stream.reset(errors.BodyTooLarge(f"body exceeded {self.max_body_size} bytes"))
            self.fail(errors.BodyTooLarge(f"body exceeded {self.max_body_size} bytes"))
            return
        await stream.send_body(chunk)

    async def relay(self, *args: str) -> None:
        stream = self.stream
        if stream is None or self._finished:
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
            while (data := await stream.read()) is not None:
                self.write(data)
                self.body_sent += len(data)
                if not stream.complete():  # the last piece goes out with finish()
                    await self.flush()
                stream.consumed(len(data))
        except errors.StreamError as e:
            self.fail(e)
            return
        except iostream.StreamClosedError:
            stream.reset(errors.Cancelled("public caller went away"))
            return
        finally:
            stream.close()
        self.finish()

    get = head = post = delete = patch = put = options = relay

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
            self.request.connection.close()  # type: ignore[union-attr]
            self._finished = True
            self.on_finish()
            return
        self.clear()
        self.set_status(error.status, error.reason if error.status == type(error).status else None)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(error.reason + "\n")

    def on_connection_close(self) -> None:
        if self.stream is not None and not self.stream.closed:
            self.stream.reset(errors.Cancelled("public caller went away"))

    def on_finish(self) -> None:
        stream_id = self.stream.id if self.stream is not None else "-"
        elapsed = (time.monotonic() - self.started) * 1000
        if self.error is not None:
            access_log.info(
                "%s %s stream=%s status=%d error=%r in=%d out=%d ms=%.1f",
                self.request.method,
                self.request.path,
                stream_id,
                self.get_status(),
                self.error.log_message,
                self.body_received,
                self.body_sent,
                elapsed,
            )
        elif access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s stream=%s status=%d in=%d out=%d ms=%.1f",
                self.request.method,
                self.request.path,
                stream_id,
                self.get_status(),
                self.body_received,
                self.body_sent,
                elapsed,
            )


def _body_length(headers: httputil.HTTPHeaders) -> int:
    """0 for no body, N for Content-Length N, -1 for a chunked body."""
    if "Transfer-Encoding" in headers:
        return -1
    value = headers.get("Content-Length")
    if value is None:
        return 0
    return int(value)  # Tornado has already validated it
