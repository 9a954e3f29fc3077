"""Prometheus metrics and health checks, on a port of their own (``--metrics-addr``).

Why a port of its own: the public port relays every path to the local app,
``/metrics`` and ``/healthz`` included, so that a tunnel stays transparent; the
operator's scraper and probes talk to a second Tornado ``HTTPServer`` in the
same process and IOLoop, which is never reachable through a tunnel.

Why a ``CollectorRegistry`` of our own: nothing imported by the process can add
series to it, and tests (or an embedding program) can run several servers
without their counters mixing in the global default registry.

What the hot path pays: public handlers call ``Metrics.finished`` once per
request, which finds the tunnel's ``Series`` in a dict and updates children
resolved once per tunnel label (``.labels()`` costs about 2 us, an update of a
resolved child about 0.6 us). Gauges (clients, tunnels, streams in flight) cost
nothing per request: ``_TunnelCollector`` reads them from ``Tunnels`` at
scrape time.

Why labels stay bounded: a tunnel name gets series of its own only while a
client holds it (``Tunnels.taken``: it passed ``auth.client`` and the
registry), and only up to ``max_tunnels`` names at once; every other request
is counted under ``other`` (names beyond the cap, names nobody holds, requests
that could not be routed), so a caller inventing Host names cannot grow the
label set. A name's series are removed at the first scrape after its name was
released. The unnamed default tunnel is ``-``, as in the access log (no name
can be ``-``); a tunnel actually named ``other`` is counted as ``other``.
"""

from __future__ import annotations

import gzip
import logging
import socket
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from tornado.httputil import HTTPServerRequest
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from .. import __version__, routing
from ..auth import PACKAGES, Decision
from .listener import Server

if TYPE_CHECKING:
    from .tunnel import Tunnels

log = logging.getLogger("backstream.server")

#: The tunnel label of the unnamed default tunnel.
DEFAULT = "-"
#: The tunnel label of everything without a series of its own.
OTHER = "other"
#: Tunnel names with series of their own, at most (``--metrics-max-tunnels``).
MAX_TUNNELS = 500
#: Status classes by ``status // 100``; 1xx is only ever a WebSocket accepted (101).
CODE_CLASSES = tuple(f"{n}xx" for n in range(10))
#: Request durations, in seconds, up to the default ``--timeout`` (60 s).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Why a tunnel client was refused (``backstream_client_refusals_total``).
REFUSAL_REASONS = (
    "version",  # 400: protocol version mismatch, or no Backstream-Client value
    "token",  # 401: missing or wrong --token
    "bad_name",  # 400: the name asked for is not a DNS label
    "denied",  # 403: auth.client denied
    "policy_error",  # 500: the policy engine failed
    "name_in_use",  # 409: the name belongs to other credentials
    "server_full",  # 503: the server holds --max-tunnels names
    "cluster_unavailable",  # 503: Redis did not answer the name's claim in time
)
#: How a tunnel client went away (``backstream_client_disconnects_total``).
DISCONNECT_REASONS = ("closed", "lost", "protocol_error")
#: Policy outcomes: ``error`` is an engine failure (answered 500, fail closed).
RESULTS = ("allow", "deny", "error")


class Series:
    """The children of one tunnel label, resolved once and reused for every request."""

    __slots__ = ("label", "_family", "_requests", "received", "sent", "duration")

    def __init__(self, metrics: Metrics, label: str) -> None:
        self.label = label
        self._family = metrics.requests
        #: By status class, created on first use (a tunnel shows only the classes it saw).
        self._requests: list[Counter | None] = [None] * len(CODE_CLASSES)
        self.received = metrics.received.labels(label)
        self.sent = metrics.sent.labels(label)
        self.duration = metrics.duration.labels(label)

    def count(self, status: int) -> None:
        """One more answer with ``status`` (a request or a WebSocket upgrade)."""
        index = min(max(status // 100, 0), len(CODE_CLASSES) - 1)
        child = self._requests[index]
        if child is None:
            child = self._requests[index] = self._family.labels(self.label, CODE_CLASSES[index])
        child.inc()

    def finished(self, status: int, received: int, sent: int, seconds: float) -> None:
        """One public HTTP request answered: its status, body bytes each way and duration."""
        self.count(status)
        if received:
            self.received.inc(received)
        if sent:
            self.sent.inc(sent)
        self.duration.observe(seconds)

    def remove(self, metrics: Metrics) -> None:
        """Drop this label's series (its name was released)."""
        for index, child in enumerate(self._requests):
            if child is not None:
                metrics.requests.remove(self.label, CODE_CLASSES[index])
        metrics.received.remove(self.label)
        metrics.sent.remove(self.label)
        metrics.duration.remove(self.label)


class Metrics:
    """Every metric of one server, in a registry of its own, and its readiness."""

    def __init__(
        self,
        tunnels: Tunnels,
        *,
        max_tunnels: int = MAX_TUNNELS,
        domain: str = "",
        ready_needs_client: bool = False,
    ) -> None:
        self.tunnels = tunnels
        self.max_tunnels = max_tunnels
        self.domain = domain
        self.ready_needs_client = ready_needs_client
        #: Why ``/readyz`` answers 503, or None: set by ``run_server`` as it starts and stops.
        self.not_ready: str | None = "starting"
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "backstream_requests",
            "Public requests answered, by tunnel and status class (WebSockets accepted: 1xx).",
            ("tunnel", "code"),
            registry=registry,
        )
        self.received = Counter(
            "backstream_received_bytes",
            "Request body bytes received from public callers, by tunnel.",
            ("tunnel",),
            registry=registry,
        )
        self.sent = Counter(
            "backstream_sent_bytes",
            "Response body bytes sent to public callers, by tunnel.",
            ("tunnel",),
            registry=registry,
        )
        self.duration = Histogram(
            "backstream_request_duration_seconds",
            "Public HTTP requests, from their head to the end of the response, by tunnel.",
            ("tunnel",),
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        decisions = Counter(
            "backstream_policy_decisions",
            "Policy decisions, by package (auth.client, auth.server) and result.",
            ("package", "result"),
            registry=registry,
        )
        self.decisions = {
            (package, result): decisions.labels(package, result)
            for package in PACKAGES
            for result in RESULTS
        }
        self.connects = Counter(
            "backstream_client_connects",
            "Tunnel clients accepted (WebSocket handshakes upgraded).",
            registry=registry,
        )
        self._disconnects = disconnects = Counter(
            "backstream_client_disconnects",
            "Tunnel clients gone: closed (closing handshake), lost (no close frame: "
            "network, ping timeout), protocol_error.",
            ("reason",),
            registry=registry,
        )
        self.disconnects = {reason: disconnects.labels(reason) for reason in DISCONNECT_REASONS}
        self._refusals = refusals = Counter(
            "backstream_client_refusals",
            "Tunnel client handshakes refused, by reason.",
            ("reason",),
            registry=registry,
        )
        self.refusals = {reason: refusals.labels(reason) for reason in REFUSAL_REASONS}
        Info("backstream_build", "The running backstream.", registry=registry).info(
            {"version": __version__}
        )
        registry.register(_TunnelCollector(self))
        registry.register(_ClusterCollector(self))
        ProcessCollector(registry=registry)
        self._series: dict[str, Series] = {"": Series(self, DEFAULT)}
        self.other = Series(self, OTHER)

    # -- the hot path ---------------------------------------------------------------

    def series(self, name: str | None) -> Series:
        """The series of tunnel ``name`` (``""``: the default one; None: not routed)."""
        series = self._series.get(name) if name is not None else None
        if series is not None:
            return series
        if (
            name is None
            or name == OTHER
            or len(self._series) > self.max_tunnels  # the default tunnel is not counted
            or not self.tunnels.taken(name)
        ):
            return self.other
        series = self._series[name] = Series(self, name)
        return series

    def finished(self, name: str | None, status: int, received: int, sent: int, t: float) -> None:
        """A public HTTP request to tunnel ``name`` ended (see ``Series.finished``)."""
        self.series(name).finished(status, received, sent, t)

    def websocket_answered(
        self, request: HTTPServerRequest, tunnel: str | None, status: int
    ) -> None:
        """A public WebSocket upgrade was answered (101, or refused).

        ``tunnel``: the name of the tunnel it was relayed to, None if it never was
        (then it is routed again here, which only refusals pay for).
        """
        if tunnel is None:
            try:
                header = request.headers.get(routing.TUNNEL_HEADER)
                tunnel = routing.route(request.host or "", header, self.domain)
            except ValueError:
                tunnel = None
        self.series(tunnel).count(status)

    def decided(self, package: str, decision: Decision) -> None:
        """A policy decision: ``error`` when the engine failed, else ``allow`` or ``deny``."""
        if decision.error is not None:
            result = "error"
        else:
            result = "allow" if decision.allowed else "deny"
        child = self.decisions.get((package, result))
        if child is not None:  # a package the server never asks about: not counted
            child.inc()

    def refused(self, reason: str) -> None:
        """A tunnel client was refused; ``reason`` is one of ``REFUSAL_REASONS``.

        Reasons are literals in the code, so bounded: one missing from the tuple
        still counts, in a series created on its first use.
        """
        child = self.refusals.get(reason)
        (child if child is not None else self._refusals.labels(reason)).inc()

    def disconnected(self, reason: str) -> None:
        """A tunnel client went away; ``reason`` is one of ``DISCONNECT_REASONS``."""
        child = self.disconnects.get(reason)
        (child if child is not None else self._disconnects.labels(reason)).inc()

    # -- scrapes and probes ---------------------------------------------------------

    def sweep(self) -> None:
        """Forget the series of names no client holds any more, freeing their slots."""
        gone = [name for name in self._series if name and not self.tunnels.taken(name)]
        for name in gone:
            self._series.pop(name).remove(self)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The metrics in the format ``accept`` asks for (Prometheus text by default)."""
        self.sweep()
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def readiness(self) -> str | None:
        """Why the server is not ready, or None when it is."""
        if self.not_ready is not None:
            return self.not_ready
        if self.ready_needs_client and len(self.tunnels) == 0:
            return "no tunnel client connected"
        return None


class _ClusterCollector:
    """The scale-out's own state at scrape time: peer links, their streams, Redis."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        remote = self.metrics.tunnels.remote
        links = GaugeMetricFamily(
            "backstream_peer_links", "Open links to other instances (--redis)."
        )
        streams = GaugeMetricFamily(
            "backstream_peer_streams_in_flight",
            "Streams relayed from here to the instance holding their tunnel.",
        )
        up = GaugeMetricFamily(
            "backstream_cluster_redis_up", "1 while Redis answers the heartbeat, else 0."
        )
        errors = CounterMetricFamily(
            "backstream_cluster_redis_errors", "Redis calls that failed or timed out."
        )
        if remote is not None:
            open_links = remote.links.open_links()
            links.add_metric((), len(open_links))
            streams.add_metric((), sum(len(link.streams) for link in open_links))
            up.add_metric((), 1 if remote.cluster.available else 0)
            errors.add_metric((), remote.cluster.errors)
        return [links, streams, up, errors]


class _TunnelCollector:
    """Gauges read from ``Tunnels`` at scrape time, so that requests pay nothing for them."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "backstream_clients_connected", "Tunnel clients connected (WebSockets open)."
        )
        yield GaugeMetricFamily(
            "backstream_tunnels_connected",
            "Tunnels (names, the default one included) with at least one client connected.",
        )
        yield GaugeMetricFamily(
            "backstream_tunnels_reserved",
            "Names kept for their owner with no client connected (--name-grace).",
        )
        yield GaugeMetricFamily(
            "backstream_streams_in_flight",
            "Streams open on tunnels (HTTP requests in flight and open WebSockets), by tunnel.",
            labels=("tunnel",),
        )

    def collect(self) -> Iterable[Metric]:
        metrics = self.metrics
        clients, connected, reserved, streams = self._families()
        streams_by_label: dict[str, int] = {DEFAULT: 0}
        members = live = held = 0
        for pool in metrics.tunnels.pools():
            if not pool.members:
                held += 1
                continue
            live += 1
            members += len(pool.members)
            label = metrics.series(pool.name).label
            in_flight = sum(len(member.streams) for member in pool.members)
            streams_by_label[label] = streams_by_label.get(label, 0) + in_flight
        clients.add_metric((), members)
        connected.add_metric((), live)
        reserved.add_metric((), held)
        for label, count in streams_by_label.items():
            streams.add_metric((label,), count)
        return [clients, connected, reserved, streams]


# -- the metrics port -------------------------------------------------------------------


class _MetricsHandler(RequestHandler):
    def initialize(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def compute_etag(self) -> None:
        return None  # a new body every time: hashing it is wasted

    def get(self) -> None:
        headers = self.request.headers
        body, content_type = self.metrics.exposition(headers.get("Accept", ""))
        # Prometheus asks for gzip; 500 tunnels are some 1 MB of text. Done here, since
        # Tornado's own transform leaves the OpenMetrics type uncompressed.
        if "gzip" in headers.get("Accept-Encoding", ""):
            body = gzip.compress(body, compresslevel=6)
            self.set_header("Content-Encoding", "gzip")
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)


class _HealthHandler(RequestHandler):
    """``/healthz``: the process is alive and its IOLoop answers."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish("ok\n")

    head = get


class _ReadyHandler(_HealthHandler):
    """``/readyz``: the public port listens (and, with ``--ready-needs-client``, a
    tunnel client is connected); 503 with the reason otherwise."""

    def initialize(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def get(self) -> None:
        problem = self.metrics.readiness()
        if problem is None:
            super().get()
            return
        self.set_status(503)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(problem + "\n")

    head = get


def make_app(metrics: Metrics) -> Application:
    """``/metrics``, ``/healthz`` and ``/readyz``; every other path is 404."""
    return Application(
        [
            (r"/metrics", _MetricsHandler, {"metrics": metrics}),
            (r"/healthz", _HealthHandler),
            (r"/readyz", _ReadyHandler, {"metrics": metrics}),
        ],
        log_function=_no_access_log,
    )


def _no_access_log(handler: RequestHandler) -> None:
    """A scrape or a probe every few seconds is not worth a log line."""


#: Largest request body the metrics port reads (it serves GET only): a bigger one is
#: refused before it is buffered, where Tornado's default would hold 100 MB.
MAX_BODY = 64 * 1024


def start(host: str, port: int, metrics: Metrics) -> Server:
    """Serve ``metrics`` on ``host:port`` (0 picks a free port); OSError if it cannot."""
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``_created`` twins
    try:
        sockets = bind_sockets(port, host)
    except OSError as e:
        raise OSError(
            e.errno, f"cannot listen on {host}:{port} for metrics: {e.strerror}"
        ) from None
    server = Server(make_app(metrics), max_body_size=MAX_BODY)
    server.add_sockets(sockets)
    for sock in sockets:
        bound, port = sock.getsockname()[:2]
        shown = f"[{bound}]" if sock.family == socket.AF_INET6 else bound
        log.info("metrics url=http://%s:%d/metrics", shown, port)
    if not _is_loopback(host):
        log.warning(
            "the metrics port %s:%d is reachable from other hosts: it lists tunnel names, "
            "keep it off the public network",
            host,
            port,
        )
    return server


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
