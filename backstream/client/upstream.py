"""One relayed request on the client: a curl transfer to the local app.

Tornado's ``CurlAsyncHTTPClient`` runs the transfer; ``prepare_curl_callback``
(which runs last) takes over the libcurl callbacks so that:

* the request body is read from the stream's queue, and the transfer pauses
  (``READFUNC_PAUSE``) while the queue is empty;
* the response head is sent as soon as its blank line arrives, before any body;
* each response chunk is sent only when the stream has credit, and libcurl is
  paused (``WRITEFUNC_PAUSE``) until the server grants more;
* the exact request target is sent with ``CURLOPT_REQUEST_TARGET`` on a
  connection to the destination's origin, so no target can change the host.

libcurl calls these from inside ``socket_action``; they only queue frames
(the tunnel flushes them from the IOLoop) and never re-enter the client.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Any

import pycurl
from tornado.curl_httpclient import CurlError
from tornado.httpclient import HTTPRequest, HTTPResponse

from .. import errors, protocol, redact, relay
from ..config import ClientConfig
from .curl import UpstreamClient

if TYPE_CHECKING:
    from ..har import HarEntry
    from . import ClientTunnel
    from .inspector import Record

log = logging.getLogger("backstream.client")

#: Headers libcurl would add on its own; an empty ``Name:`` line suppresses them.
_CURL_DEFAULTS = ("Accept", "User-Agent", "Expect", "Pragma", "Content-Type")
#: The transfer itself decides these (Content-Length too, when there is a body).
_NOT_FORWARDED = ("host", "transfer-encoding", "expect")
#: libcurl errors that mean "the local app could not be reached or broke off".
_TIMEOUTS = {pycurl.E_OPERATION_TIMEDOUT}


def public_locations(
    config: ClientConfig, request: protocol.Headers, headers: protocol.Headers
) -> protocol.Headers:
    """``headers`` with the redirects to the destination pointed at the public origin.

    Only when the app saw another Host than the caller's (``--host-header rewrite``
    or a value): with ``preserve`` it built its URLs from the public one already.
    """
    if config.host_header == "preserve":
        return headers
    local = config.dst_origin + config.dst_base_path
    return relay.rewrite_locations(headers, local, relay.public_origin(request))


def curl_header_lines(
    headers: list[tuple[str, str]], host: str, body_length: int, method: str
) -> list[bytes]:
    """``HTTPHEADER`` lines: the request's own headers, nothing curl invents."""
    lines = [b"Host: " + host.encode("latin-1")]
    present = set()
    for name, value in headers:
        key = name.lower()
        present.add(key)
        if key in _NOT_FORWARDED or (key == "content-length" and body_length != 0):
            continue
        # "Name:" would remove the header in libcurl; "Name;" sends it empty.
        line = f"{name}: {value}" if value else f"{name};"
        lines.append(line.encode("latin-1", "replace"))
    for name in _CURL_DEFAULTS:
        if name.lower() not in present:
            lines.append(name.encode() + b":")
    if body_length < 0 and method == "POST":
        lines.append(b"Transfer-Encoding: chunked")
    return lines


def human_size(n: int) -> str:
    """``1234`` -> ``1.2 kB`` (decimal units, as ngrok and browsers show sizes)."""
    if n < 1000:
        return f"{n} B"
    size = n / 1000
    for unit in ("kB", "MB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


class Exchange:
    """Relays one stream: request frames in, a curl transfer, response frames out."""

    def __init__(
        self,
        tunnel: ClientTunnel,
        head: protocol.RequestHead,
        config: ClientConfig,
        har: HarEntry | None,
        record: Record | None = None,
    ) -> None:
        self.tunnel = tunnel
        self.head = head
        self.id = head.stream_id
        self.config = config
        self.har = har
        #: The inspector's record of this request (None without the inspector).
        self.record = record
        #: A warning already told why this stream failed: no request line then.
        self.warned = False
        self.send_window = protocol.SendWindow()
        self.recv_window = protocol.RecvWindow()
        self.upload: collections.deque[bytes] = collections.deque()
        self.upload_done = head.body_length == 0
        self.curl: pycurl.Curl | None = None
        self.http_client: UpstreamClient | None = None
        self.request: HTTPRequest | None = None
        self.read_paused = False
        self.write_paused = False
        self.cancelled = False
        self.head_sent = False
        self.end_sent = False
        self.status = 0
        self.reason = ""
        self.response_headers: list[tuple[str, str]] = []
        #: Bytes of the response head so far (bounded like a request head).
        self.head_size = 0
        #: The response's Content-Length (0 when it has no body), None if unknown.
        self.response_length: int | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.monotonic()

    # -- the transfer -------------------------------------------------------------

    async def run(self, http_client: UpstreamClient) -> None:
        config = self.config
        if log.isEnabledFor(logging.DEBUG):
            masked = redact.current().mask_headers(self.head.headers)
            shown = "; ".join(f"{n}: {v}" for n, v in masked)
            log.debug(
                "stream=%d %s %s headers: %s",
                self.id,
                self.head.method,
                self._shown_target(),
                shown,
            )
        self.http_client = http_client
        timer = self.tunnel.loop.call_later(config.timeout, self._on_timeout)
        # UpstreamClient sets up the transfer itself: libcurl's defaults (no
        # redirects, no decompression, certificate checks, no total timeout: the
        # head has --timeout, a body may stream for ever) plus _prepare_curl.
        self.request = request = HTTPRequest(
            config.dst_origin + "/",
            method=self.head.method,
            connect_timeout=config.timeout,
            validate_cert=not config.dst_insecure,
            ca_certs=config.dst_ca or None,
            prepare_curl_callback=self._prepare_curl,
        )
        try:
            response = await http_client.fetch(request, raise_error=False)
        except CurlError as e:
            self._finished(None, e)
        except errors.Cancelled:  # by _prepare_curl: cancelled while queued
            self._done("cancelled")
        else:
            self._finished(response, None)
        finally:
            timer.cancel()
            self.curl = None

    def _finished(self, response: HTTPResponse | None, error: CurlError | None) -> None:
        if self.cancelled:
            self._done("cancelled")
            return
        if response is None or error is not None:
            if error is not None and error.errno in _TIMEOUTS:
                failure: errors.StreamError = errors.UpstreamTimeout(f"local app: {error}")
            else:
                failure = errors.UpstreamUnreachable(f"local app: {error}")
            self.tunnel.send(
                protocol.Reset(self.id, failure.reset_code, failure.log_message).encode()
            )
            log.warning(
                "stream=%d %s %s failed: %s", self.id, self.head.method, self._shown_target(), error
            )
            self.warned = True
            self._done(failure.log_message)
            return
        if not self.head_sent:  # a response without a head (should not happen)
            self.status, self.reason = response.code, response.reason
            self._send_head()
        if not self.end_sent:
            self.tunnel.send(protocol.Data(self.id, b"", end_stream=True).encode())
        self._done(None)

    def _done(self, error: str | None) -> None:
        self.tunnel.forget(self.id)
        if self.har is not None:
            self.har.finish(error)
        if self.record is not None:
            self.record.finish(error)
        if not self.warned and log.isEnabledFor(logging.INFO):
            # One line per request, as ngrok's console: "GET /hook 200 12 ms 1.2 kB".
            log.info(
                "%s %s %s %.0f ms %s stream=%d%s",
                self.head.method,
                redact.current().mask_target(self.head.target),
                self.status or "-",
                (time.monotonic() - self.started) * 1000,
                human_size(self.bytes_out),
                self.id,
                " cancelled" if error else "",
            )

    def _shown_target(self) -> str:
        """The target as log lines show it: credentials in its query masked."""
        return redact.current().mask_target(self.head.target)

    def _prepare_curl(self, curl: Any) -> None:
        if self.cancelled:  # cancelled while queued behind --max-concurrency
            raise errors.Cancelled("cancelled before the transfer started")
        self.curl = curl
        head, config = self.head, self.config
        host = relay.upstream_host(config.host_header, head.host, config.dst_netloc)
        target = relay.upstream_target(config.dst_base_path, head.target)
        curl.setopt(pycurl.REQUEST_TARGET, target.encode("latin-1", "replace"))
        curl.setopt(
            pycurl.HTTPHEADER, curl_header_lines(head.headers, host, head.body_length, head.method)
        )
        curl.setopt(pycurl.HEADERFUNCTION, self._on_header_line)
        curl.setopt(pycurl.WRITEFUNCTION, self._on_body)
        curl.setopt(pycurl.BUFFERSIZE, protocol.MAX_CHUNK)
        curl.setopt(pycurl.TCP_NODELAY, 1)
        if head.body_length != 0:
            curl.setopt(pycurl.UPLOAD_BUFFERSIZE, protocol.MAX_CHUNK)
            curl.setopt(pycurl.READFUNCTION, self._read_body)
            curl.setopt(pycurl.SEEKFUNCTION, lambda offset, origin: pycurl.SEEKFUNC_CANTSEEK)
            if head.method == "POST":
                curl.setopt(pycurl.POST, 1)
                curl.setopt(pycurl.POSTFIELDSIZE_LARGE, head.body_length)
            else:
                curl.setopt(pycurl.UPLOAD, 1)
                curl.setopt(pycurl.INFILESIZE_LARGE, head.body_length)
                if head.method != "PUT":
                    curl.setopt(pycurl.CUSTOMREQUEST, head.method)

    # -- libcurl callbacks (inside socket_action: queue only) -----------------------

    def _on_header_line(self, line: bytes) -> int | None:
        self.head_size += len(line)
        if self.head_size > relay.MAX_HEADER_BLOCK:
            return self._refuse_head(f"response head over {relay.MAX_HEADER_BLOCK} bytes")
        text = line.decode("latin-1").rstrip("\r\n")
        if text.startswith("HTTP/"):
            parts = text.split(" ", 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
            self.reason = parts[2].strip() if len(parts) > 2 else ""
            self.response_headers = []
            self.head_size = len(line)
        elif not text:
            if self.status >= 200 or self.status == 101:
                problem = protocol.headers_problem(self.response_headers)
                if problem is not None:
                    return self._refuse_head(problem)
                self._send_head()
            # 1xx interim responses (100 Continue, 103) are not relayed
        elif text[0] in " \t" and self.response_headers:  # obsolete line folding
            name, value = self.response_headers[-1]
            self.response_headers[-1] = (name, value + " " + text.strip())
        else:
            name, _, value = text.partition(":")
            self.response_headers.append((name.strip(), value.strip()))
        return None

    def _refuse_head(self, problem: str) -> int:
        """Fail this stream alone with 502: its head cannot be written on HTTP/1.1."""
        if not self.cancelled:
            error = errors.InvalidResponse(f"local app: {problem}")
            log.warning(
                "stream=%d %s %s: %s", self.id, self.head.method, self._shown_target(), error
            )
            self.tunnel.send(protocol.Reset(self.id, error.reset_code, error.log_message).encode())
            self.cancelled = True
            self.warned = True
        return 0  # libcurl aborts the transfer; _finished() sees it cancelled

    def _send_head(self) -> None:
        if self.head_sent or self.cancelled:
            return
        self.head_sent = True
        # These responses never have a body: end the stream with the head.
        self.end_sent = self.head.method == "HEAD" or self.status in (204, 304)
        headers = public_locations(
            self.config, self.head.headers, relay.strip_hop_by_hop(self.response_headers)
        )
        head = protocol.ResponseHead(self.id, self.status, self.reason, headers, self.end_sent)
        self.tunnel.send(head.encode())
        if self.har is not None:
            self.har.response(self.status, self.reason, self.response_headers)
        if self.record is not None:
            self.record.response(self.status, self.reason, self.response_headers)
        self.response_length = 0 if self.end_sent else relay.content_length(headers)
        self._check_upload_needed()

    def _check_upload_needed(self) -> None:
        """Once the whole response is in, an upload the local app stopped reading
        would keep the transfer, and its --max-concurrency slot, for ever."""
        if self.bytes_out == self.response_length and self.head.body_length != 0:
            self.tunnel.loop.call_soon(self._end_unread_upload)  # getinfo() not from libcurl

    def _end_unread_upload(self) -> None:
        curl, client, request = self.curl, self.http_client, self.request
        if self.cancelled or curl is None or client is None or request is None:
            return
        if not client.running(curl, request):
            return  # the transfer completed: the app read the whole body
        uploaded = curl.getinfo(pycurl.SIZE_UPLOAD_T)
        if self.head.body_length > 0:  # curl stops reading at the length: END may come later
            complete = uploaded >= self.head.body_length
        else:
            complete = self.upload_done and not self.upload and uploaded >= self.bytes_in
        if complete:
            return
        if not self.end_sent:
            self.end_sent = True
            self.tunnel.send(protocol.Data(self.id, b"", end_stream=True).encode())
        self.cancel("the local app answered without reading the whole request body")

    def _on_body(self, chunk: bytes) -> int | None:
        if self.cancelled:
            return 0  # libcurl aborts the transfer
        if not self.send_window.spend(len(chunk)):
            self.write_paused = True
            return pycurl.WRITEFUNC_PAUSE  # type: ignore[no-any-return]
        self.bytes_out += len(chunk)
        self.tunnel.send(*protocol.Data(self.id, chunk).parts())
        if self.har is not None:
            self.har.response_body(chunk)
        if self.record is not None:
            self.record.response_body(chunk)
        if self.bytes_out == self.response_length:
            self._check_upload_needed()
        return None

    def _read_body(self, size: int) -> bytes | int:
        if self.cancelled:
            return pycurl.READFUNC_ABORT  # type: ignore[no-any-return]
        if not self.upload:
            if self.upload_done:
                return b""
            self.read_paused = True
            return pycurl.READFUNC_PAUSE  # type: ignore[no-any-return]
        chunk = self.upload[0]
        if len(chunk) <= size:
            self.upload.popleft()
        else:
            self.upload[0] = chunk[size:]
            chunk = chunk[:size]
        increment = self.recv_window.consume(len(chunk))
        if increment:
            self.tunnel.send(protocol.Window(self.id, increment).encode())
        return chunk

    # -- frames from the server -----------------------------------------------------

    def on_request_data(self, frame: protocol.Data) -> None:
        if self.upload_done:
            raise errors.ProtocolError(f"request DATA after the end of stream {self.id}")
        self.recv_window.receive(len(frame.data))
        if frame.data:
            self.bytes_in += len(frame.data)
            self.upload.append(frame.data)
            if self.har is not None:
                self.har.request_body(frame.data)
            if self.record is not None:
                self.record.request_body(frame.data)
        if frame.end_stream:
            self.upload_done = True
        if self.read_paused:
            self.read_paused = False
            self._unpause()

    def on_window(self, increment: int) -> None:
        self.send_window.grant(increment)
        if self.write_paused:
            self.write_paused = False
            self._unpause()

    def cancel(self, why: str) -> None:
        """Abort the transfer (server reset, tunnel lost, timeout); sends nothing."""
        if self.cancelled:
            return
        self.cancelled = True
        log.debug("stream=%d cancelled: %s", self.id, why)
        if self.curl is not None and self.http_client is not None and self.request is not None:
            self.http_client.abort(self.curl, self.request, why)

    def _unpause(self) -> None:
        curl = self.curl
        if curl is None:
            return
        try:
            curl.pause(pycurl.PAUSE_CONT)
        except pycurl.error:
            pass  # the transfer already failed; Tornado reports it

    def _on_timeout(self) -> None:
        if self.head_sent or self.cancelled:
            return
        error = errors.UpstreamTimeout(f"no response head within {self.config.timeout:g}s")
        log.warning("stream=%d %s %s: %s", self.id, self.head.method, self._shown_target(), error)
        self.tunnel.send(protocol.Reset(self.id, error.reset_code, error.log_message).encode())
        self.warned = True
        self.cancel("timeout")
