"""The inspector's web side: the page, its JSON API, replays and ``/metrics``.

One Tornado ``Application`` on its own port (loopback by default), in the
client's IOLoop. The page (``inspector_static/``: plain HTML, JS and CSS, no
build step, nothing from the internet) uses only the API below, which is
also for scripts:

    GET  /api/requests                newest first (?q=, ?method=, ?status=2xx, ?limit=)
    GET  /api/requests/ID             heads and bodies, rendered by type
    GET  /api/requests/ID/body/SIDE   the kept bytes of the request or response body
    GET  /api/requests/ID/har         HAR 1.2
    GET  /api/requests/ID/curl        a curl command line
    POST /api/requests/ID/replay      send it again to the local app, maybe edited
    GET  /api/events                  Server-Sent Events: each new or finished request
    GET  /metrics                     the client's counters (Prometheus text format)

A replay goes straight to the ``-d`` destination through the client's own
curl client, the way a relayed request does (same target, headers and Host
rules), never through the server. Whoever can load the page can replay, so
the API refuses a ``Host`` it does not serve (DNS rebinding) and replays that
are not ``application/json`` (which a cross-site form cannot send).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import os
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pycurl
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from tornado import netutil, web
from tornado.curl_httpclient import CurlError
from tornado.httpclient import HTTPRequest
from tornado.httpserver import HTTPServer

from .. import protocol, redact, relay
from ..errors import ConfigError
from . import inspector as views
from .curl import UpstreamClient
from .inspector import DURATION_BUCKETS, Inspector, Record, ReplayError
from .upstream import curl_header_lines

log = logging.getLogger("backstream.client")

STATIC = os.path.join(os.path.dirname(__file__), "inspector_static")
#: Ports tried after a busy one before giving up.
PORT_TRIES = 100
#: Bytes of events queued for a page that does not read them before it is dropped
#: (it reconnects by itself and reloads the list).
EVENTS_BACKLOG = 4 * 1024 * 1024
#: The page's only sources: itself.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


class InspectorWeb:
    """What every handler needs, and the listening server."""

    def __init__(self, inspector: Inspector, http_client: UpstreamClient) -> None:
        self.inspector = inspector
        self.http_client = http_client
        self.config = inspector.config
        self.allowed_hosts: frozenset[str] | None = None
        self.server: HTTPServer | None = None
        self.url = ""
        self.registry = CollectorRegistry()
        self.registry.register(ClientCollector(inspector))
        ProcessCollector(registry=self.registry)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def start_inspector(inspector: Inspector, http_client: UpstreamClient) -> InspectorWeb:
    """Listen on ``--inspect`` (the next free port if taken) and log the page's URL."""
    web_ = InspectorWeb(inspector, http_client)
    assert inspector.config.inspect_addr is not None
    host, port = inspector.config.inspect_addr
    sockets, port = bind(host, port)
    app = make_app(web_)
    web_.server = HTTPServer(app, xheaders=False)
    web_.server.add_sockets(sockets)
    shown = f"[{host}]" if ":" in host else host
    web_.url = f"http://{shown}:{port}"
    web_.allowed_hosts = allowed_hosts(host, port)
    log.info("inspector url=%s", web_.url)
    if not is_loopback(host):
        log.warning(
            "the inspector listens on %s, beyond this machine: whoever reaches it sees "
            "the relayed requests and can replay them to the local app",
            web_.url,
        )
    return web_


def bind(host: str, port: int) -> tuple[list[Any], int]:
    """Sockets on ``port`` or the first free one after it (any port for 0)."""
    candidates = [0] if port == 0 else range(port, min(port + PORT_TRIES, 65536))
    for candidate in candidates:
        try:
            sockets = netutil.bind_sockets(candidate, address=host)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                continue
            raise ConfigError(f"inspector: cannot listen on {host}:{candidate}: {e}") from None
        return sockets, int(sockets[0].getsockname()[1])
    raise ConfigError(f"inspector: ports {port} to {candidate} on {host} are all in use")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """``Host`` values the inspector answers; None when it listens everywhere (then
    only IP addresses and ``localhost``: a DNS name could be rebound to it)."""
    if host in ("", "0.0.0.0", "::"):
        return None
    names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
    return frozenset(f"{name.lower()}:{port}" for name in names) | (
        frozenset(n.lower() for n in names) if port == 80 else frozenset()
    )


def make_app(web_: InspectorWeb) -> web.Application:
    args = {"web": web_}
    return web.Application(
        [
            (r"/api/requests", RequestList, args),
            (r"/api/requests/(\d+)", RequestDetail, args),
            (r"/api/requests/(\d+)/body/(request|response)", RequestBody, args),
            (r"/api/requests/(\d+)/har", RequestHar, args),
            (r"/api/requests/(\d+)/curl", RequestCurl, args),
            (r"/api/requests/(\d+)/replay", RequestReplay, args),
            (r"/api/events", Events, args),
            (r"/metrics", Metrics, args),
            (r"/(.*)", Static, {**args, "path": STATIC, "default_filename": "index.html"}),
        ],
        compress_response=False,
    )


# -- handlers -------------------------------------------------------------------------


class _Checks:
    """The ``Host`` check and default headers every handler shares."""

    web: InspectorWeb
    request: Any

    def check_host(self) -> None:
        allowed = self.web.allowed_hosts
        host = self.request.host.lower()
        if allowed is None:
            if not _names_no_dns(host):
                raise web.HTTPError(403, reason="Unexpected Host")
        elif host not in allowed:
            raise web.HTTPError(403, reason="Unexpected Host")


def _names_no_dns(host: str) -> bool:
    """``host`` (``name[:port]``) is an IP address or ``localhost``, never rebindable DNS."""
    name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Handler(_Checks, web.RequestHandler):
    def initialize(self, web: InspectorWeb) -> None:
        self.web = web
        self.inspector = web.inspector

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")

    def prepare(self) -> None:
        self.check_host()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.send_json({"error": self._reason})

    def send_json(self, value: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(value, ensure_ascii=False))

    def fail(self, status: int, message: str) -> None:
        self.set_status(status)
        self.send_json({"error": message})

    def record(self, id: str) -> Record:
        record = self.inspector.get(int(id))
        if record is None:
            raise web.HTTPError(404, reason=f"No request {id} (the last {self.inspector.keep})")
        return record

    @property
    def unmasked(self) -> bool:
        return self.inspector.unmasked


class RequestList(Handler):
    def get(self) -> None:
        q = self.get_argument("q", "").lower()
        method = self.get_argument("method", "").upper()
        status = self.get_argument("status", "").lower()
        limit = self.get_argument("limit", "")
        items = []
        for record in reversed(self.inspector.records):
            item = views.summary(record, self.unmasked)
            if method and item["method"] != method:
                continue
            if status and item["class"] != status:
                continue
            if q and q not in f"{item['method']} {item['path']} {item['status']}".lower():
                continue
            items.append(item)
            if limit.isdigit() and len(items) >= int(limit):
                break
        config = self.web.config
        self.send_json(
            {
                "requests": items,
                "keep": self.inspector.keep,
                "body_limit": self.inspector.body_limit,
                "unmasked": self.unmasked,
                "destination": config.dst_origin + config.dst_base_path,
            }
        )


class RequestDetail(Handler):
    def get(self, id: str) -> None:
        self.send_json(views.detail(self.record(id), self.web.config, self.unmasked))


class RequestBody(Handler):
    """The kept bytes, typed only as an image (anything else could run as a page here)."""

    def get(self, id: str, side: str) -> None:
        record = self.record(id)
        body = record.request if side == "request" else record.response_
        headers = record.head.headers if side == "request" else record.headers
        mime = views.header(headers, "content-type").split(";", 1)[0].strip().lower()
        self.set_header("Content-Type", mime if mime.startswith("image/") else "text/plain")
        self.set_header("Content-Security-Policy", "default-src 'none'; sandbox")
        encoding = views.header(headers, "content-encoding")
        if encoding and body.size == body.kept:
            self.set_header("Content-Encoding", encoding)
        self.finish(views.body_bytes(body))


class RequestHar(Handler):
    def get(self, id: str) -> None:
        self.send_json(views.har_document(self.record(id), self.web.config, self.unmasked))


class RequestCurl(Handler):
    def get(self, id: str) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(views.curl_command(self.record(id), self.web.config, self.unmasked) + "\n")


class RequestReplay(Handler):
    async def post(self, id: str) -> None:
        origin = self.request.headers.get("Origin")
        if origin and urllib.parse.urlsplit(origin).netloc.lower() != self.request.host.lower():
            return self.fail(403, "cross-origin replay refused")
        content_type = self.request.headers.get("Content-Type", "").split(";", 1)[0]
        if content_type.strip().lower() != "application/json":
            return self.fail(415, "send the edits as application/json ({} for none)")
        record = self.record(id)
        try:
            edits = json.loads(self.request.body or b"{}")
        except ValueError:
            return self.fail(400, "the body is not JSON")
        if not isinstance(edits, dict):
            return self.fail(400, "the body must be a JSON object")
        try:
            head, body, host = views.replay_request(record, edits, self.web.config)
        except ReplayError as e:
            return self.fail(400, str(e))
        replayed = await replay(self.web, record, head, body, host)
        self.send_json(views.detail(replayed, self.web.config, self.unmasked))


class Events(Handler):
    """Server-Sent Events: ``event: request`` with a list item, for each change."""

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushing = False
        self._backlog: list[str] = []
        self._backlog_size = 0
        self.write("retry: 1000\n\n")
        self._flush()
        self.inspector.listeners.add(self.send)
        try:
            await self._closed
        finally:
            self.inspector.listeners.discard(self.send)

    def send(self, text: str) -> None:
        if self._closed.done():
            return
        if self._flushing:  # the page has not read the last batch yet
            self._backlog.append(text)
            self._backlog_size += len(text)
            if self._backlog_size > EVENTS_BACKLOG:
                self.request.connection.close()
            return
        self.write(text)
        self._flush()

    def _flush(self) -> None:
        self._flushing = True
        self.flush().add_done_callback(self._flushed)

    def _flushed(self, future: asyncio.Future[None]) -> None:
        self._flushing = False
        if future.exception() is not None:
            self.on_connection_close()
        elif self._backlog and not self._closed.done():
            text, self._backlog, self._backlog_size = "".join(self._backlog), [], 0
            self.write(text)
            self._flush()

    def on_connection_close(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


class Metrics(Handler):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.web.registry))


class Static(_Checks, web.StaticFileHandler):
    def initialize(self, web: InspectorWeb, path: str, default_filename: str) -> None:  # type: ignore[override]
        super().initialize(path, default_filename)
        self.web = web

    def prepare(self) -> None:
        self.check_host()

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-cache")


# -- replay ---------------------------------------------------------------------------


class _ReplayTransfer:
    """One replay's curl callbacks: the relay's request setup, a bounded capture back."""

    def __init__(
        self, web_: InspectorWeb, record: Record, head: protocol.RequestHead, body: bytes, host: str
    ) -> None:
        self.config = web_.config
        self.record = record
        self.head = head
        self.body = body
        self.host = host
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []

    def prepare(self, curl: Any) -> None:
        head, config = self.head, self.config
        target = relay.upstream_target(config.dst_base_path, head.target)
        curl.setopt(pycurl.REQUEST_TARGET, target.encode("latin-1", "replace"))
        lines = curl_header_lines(head.headers, self.host, len(self.body), head.method)
        curl.setopt(pycurl.HTTPHEADER, lines)
        curl.setopt(pycurl.HEADERFUNCTION, self.on_header_line)
        curl.setopt(pycurl.WRITEFUNCTION, self.record.response_body)
        curl.setopt(pycurl.TIMEOUT_MS, int(config.timeout * 1000))
        if self.body:
            curl.setopt(pycurl.CUSTOMREQUEST, head.method)
            curl.setopt(pycurl.POSTFIELDSIZE_LARGE, len(self.body))
            curl.setopt(pycurl.POSTFIELDS, self.body)

    def on_header_line(self, line: bytes) -> None:
        text = line.decode("latin-1").rstrip("\r\n")
        if text.startswith("HTTP/"):
            parts = text.split(" ", 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.reason = parts[2].strip() if len(parts) > 2 else ""
            self.headers = []
        elif not text:
            if self.status >= 200 or self.status == 101:
                self.record.response(self.status, self.reason, self.headers)
        elif text[0] in " \t" and self.headers:
            name, value = self.headers[-1]
            self.headers[-1] = (name, value + " " + text.strip())
        else:
            name, _, value = text.partition(":")
            self.headers.append((name.strip(), value.strip()))


async def replay(
    web_: InspectorWeb, original: Record, head: protocol.RequestHead, body: bytes, host: str
) -> Record:
    """Send ``head`` and ``body`` to the local app with ``Host: host``: a new record."""
    config = web_.config
    record = web_.inspector.start(head, replay_of=original.id)
    if body:
        record.request_body(body)
    transfer = _ReplayTransfer(web_, record, head, body, host)
    request = HTTPRequest(
        config.dst_origin + "/",
        method=head.method,
        connect_timeout=config.timeout,
        validate_cert=not config.dst_insecure,
        ca_certs=config.dst_ca or None,
        prepare_curl_callback=transfer.prepare,
    )
    error = None
    try:
        await web_.http_client.fetch(request, raise_error=False)
    except CurlError as e:
        error = f"local app: {e}"
    record.finish(error)
    log.info(
        "replay of request %d: %s %s %s %.0f ms",
        original.id,
        head.method,
        redact.current().mask_target(head.target),
        record.status or error,
        (record.duration or 0) * 1000,
    )
    return record


# -- metrics --------------------------------------------------------------------------


class ClientCollector(Collector):
    """The inspector's counters, read at scrape time (counting costs an addition)."""

    def __init__(self, inspector: Inspector) -> None:
        self.inspector = inspector

    def collect(self) -> Iterator[Metric]:
        i = self.inspector
        requests = CounterMetricFamily(
            "backstream_client_requests",
            "Requests relayed to the local app, by status class (failed: no response)",
            labels=["status_class"],
        )
        for status_class, count in sorted(i.by_class.items()):
            requests.add_metric([status_class], count)
        yield requests
        yield GaugeMetricFamily(
            "backstream_client_requests_in_flight",
            "Requests being relayed now",
            value=i.in_flight,
        )
        yield CounterMetricFamily(
            "backstream_client_request_body_bytes",
            "Request body bytes sent to the local app",
            value=i.bytes_in,
        )
        yield CounterMetricFamily(
            "backstream_client_response_body_bytes",
            "Response body bytes relayed from the local app",
            value=i.bytes_out,
        )
        cumulative, buckets = 0, []
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), i.buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "backstream_client_request_duration_seconds",
            "Time from the request head to the end of the response",
            buckets=buckets,
            sum_value=i.duration_sum,
        )
        yield CounterMetricFamily(
            "backstream_client_replays", "Requests replayed from the inspector", value=i.replays
        )
        yield CounterMetricFamily(
            "backstream_client_connects", "Tunnel connections established", value=i.connects
        )
        yield GaugeMetricFamily(
            "backstream_client_connected",
            "1 while the tunnel to the server is up",
            value=int(i.connected),
        )
        yield GaugeMetricFamily(
            "backstream_client_streams_open",
            "Streams in the tunnel's table (HTTP exchanges and WebSockets in flight)",
            value=i.open_streams(),
        )
        yield GaugeMetricFamily(
            "backstream_client_inspector_requests",
            "Requests held by the inspector",
            value=len(i.records),
        )
