"""Typed, frozen configuration for the server and the client.

The CLI parses flags, ``BACKSTREAM_*`` variables and config files once into
these objects; everything below the CLI reads settings from here only. Each
field's comment is its documentation, with its default.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

from .errors import ConfigError
from .protocol import DEFAULT_WEBSOCKET_MESSAGE
from .relay import Headers, Network


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    #: Interface to listen on (``-a``; default ``localhost``).
    host: str = "localhost"
    #: Port to listen on (``-a``; default 8080; 0 picks a free one).
    port: int = 8080
    #: Status answered when no tunnel client is connected (``-c``; default 503).
    no_client_code: int = 503
    #: Seconds to wait for the response head of a relayed request (default 60).
    timeout: float = 60.0
    #: Seconds between WebSocket pings to each tunnel client (default 20).
    ping_interval: float = 20.0
    #: Seconds without a pong before a tunnel is declared dead (default 20).
    ping_timeout: float = 20.0
    #: Largest public request body in bytes, 0 for no limit (default 0).
    max_body_size: int = 0
    #: Policy files or directories (``-p``), loaded recursively.
    policy_paths: tuple[str, ...] = ()
    #: Auth backend: ``none``, ``rego`` or ``opa``; None chooses from ``policy_paths``.
    auth: str | None = None
    #: Remote OPA server URL for the ``opa`` backend.
    opa_url: str | None = None
    #: Bearer token for the remote OPA server.
    opa_token: str | None = dataclasses.field(default=None, repr=False)
    #: Seconds between checks for changed policy files, 0 to only reload on SIGHUP.
    policy_reload: float = 0.0
    #: Proxies in front whose ``X-Forwarded-*``/``Forwarded`` headers are kept
    #: (``--trust-forwarded``; default none: those headers are replaced).
    trust_forwarded: tuple[Network, ...] = ()
    #: The one header behind those proxies that names the caller (``input.remote``):
    #: ``x-forwarded-for`` or ``forwarded`` (``--forwarded-header``; default the first).
    forwarded_header: str = "x-forwarded-for"
    #: Wildcard domain: ``NAME.domain`` reaches tunnel NAME (``--domain``; default none).
    domain: str = ""
    #: Public URL of this server behind a TLS terminator (``--public-url``; default none).
    public_url: str = ""
    #: Seconds a name stays reserved for its owner after its last client left (default 60).
    name_grace: float = 60.0
    #: Names (tunnels) one server holds at most, reserved ones included (default 1000).
    max_tunnels: int = 1000
    #: Largest WebSocket message relayed, in bytes (``--ws-max-message``; default 64 MiB).
    ws_max_message: int = DEFAULT_WEBSOCKET_MESSAGE
    #: Longest request target in bytes, else 414 (``--max-target``; default 8 KiB; 0: none).
    max_target: int = 8 * 1024
    #: Seconds a request head may take, else 408 (``--header-timeout``; default 10; 0: none).
    header_timeout: float = 10.0
    #: Seconds a kept-alive connection waits for its next request (``--idle-timeout``;
    #: default 60; 0: none).
    idle_timeout: float = 60.0
    #: Seconds without a request body byte, else 408 (``--body-timeout``; default 30; 0: none).
    body_timeout: float = 30.0
    #: Public connections at once, beyond it 503 (``--max-connections``; default 10000).
    max_connections: int = 10000
    #: Streams in flight per tunnel client, beyond it 503 (``--max-streams``; default 1000).
    max_streams: int = 1000
    #: Tunnel clients connected at once, beyond it 503 (``--max-clients``; default 1000).
    max_clients: int = 1000
    #: (host, port) of ``/metrics``, ``/healthz`` and ``/readyz``, on a port of their
    #: own (``--metrics-addr``; default None: not served).
    metrics_addr: tuple[str, int] | None = None
    #: ``/readyz`` answers 503 until a tunnel client is connected (default False).
    ready_needs_client: bool = False
    #: Tunnel names with metric series of their own; the others count as ``other``
    #: (``--metrics-max-tunnels``; default 500).
    metrics_max_tunnels: int = 500
    #: Certificate chain and key files: serve HTTPS and WSS (``--tls-cert``/``--tls-key``).
    tls: tuple[str, str] | None = None
    #: A shared secret tunnel clients must present (``--token``; default none).
    token: str = dataclasses.field(default="", repr=False)
    #: Redis URL of the cluster's shared state (``--redis``; default none: one instance).
    redis: str = dataclasses.field(default="", repr=False)
    #: Secret that authenticates peer links between instances (``--cluster-secret``).
    cluster_secret: str = dataclasses.field(default="", repr=False)
    #: How other instances reach this one (``--advertise``; default from ``-a``).
    advertise: str = ""
    #: Processes sharing the public port (``--workers``; default 1).
    workers: int = 1
    #: This worker's index under ``--workers``, -1 when not a worker.
    worker: int = -1


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    #: WebSocket URL of the server (``-s``, http->ws and https->wss).
    server_url: str
    #: Base URL of the local app (``-d``), without its path.
    dst_origin: str
    #: Path prefix from ``-d`` (``""`` when none), prepended to every request.
    dst_base_path: str = ""
    #: Extra handshake headers (``-H``), e.g. a bearer token for ``auth.client``.
    headers: Headers = dataclasses.field(default_factory=list, repr=False)
    #: Directory for one HAR file per relayed request (``-o``), None for none.
    har_dir: str | None = None
    #: Keep secrets in HAR files (default: masked).
    har_unmasked: bool = False
    #: Bytes of each body kept in a HAR file (default 1 MiB).
    har_body_limit: int = 1024 * 1024
    #: Seconds to wait for the local app's response head (default 60).
    timeout: float = 60.0
    #: The Host the local app sees (``--host-header``): ``preserve`` (default, the
    #: public one), ``rewrite`` (the destination's) or a literal value.
    host_header: str = "preserve"
    #: Seconds between WebSocket pings to the server (default 20).
    ping_interval: float = 20.0
    #: Seconds without a pong before the tunnel is declared dead (default 20).
    ping_timeout: float = 20.0
    #: Concurrent requests to the local app (default 256; each costs a curl handle).
    max_concurrency: int = 256
    #: Longest pause between reconnection attempts, in seconds (default 30).
    max_backoff: float = 30.0
    #: The tunnel name to claim (``--name``); empty for the default tunnel, or a
    #: random name when the server has a domain.
    name: str = ""
    #: Largest WebSocket message relayed, in bytes (``--ws-max-message``; default 64 MiB).
    ws_max_message: int = DEFAULT_WEBSOCKET_MESSAGE
    #: Where the inspector listens (``--inspect``; default 127.0.0.1:4040, the next free
    #: port when taken; port 0 picks any); None with ``--no-inspect``.
    inspect_addr: tuple[str, int] | None = ("127.0.0.1", 4040)
    #: Requests the inspector keeps, the oldest dropped first (``--inspect-keep``; default 200).
    inspect_keep: int = 200
    #: Bytes of each body the inspector keeps (``--inspect-body-limit``; default 1 MiB).
    inspect_body_limit: int = 1024 * 1024
    #: Bytes of bodies the inspector keeps in all; the oldest go first
    #: (``--inspect-memory``; default 16 MiB).
    inspect_memory: int = 16 * 1024 * 1024
    #: The server's shared secret, sent in the handshake (``--token``; default none).
    token: str = dataclasses.field(default="", repr=False)
    #: CA file to verify the server's certificate with (``--ca``; default the system store).
    ca: str = ""
    #: Do not verify the server's certificate (``--insecure``; warned at every connect).
    insecure: bool = False
    #: CA file to verify an ``https://`` local app with (``--dst-ca``).
    dst_ca: str = ""
    #: Do not verify an ``https://`` local app's certificate (``--dst-insecure``).
    dst_insecure: bool = False

    @property
    def dst_netloc(self) -> str:
        """``host:port`` of the destination, its ``Host`` with ``--host-header rewrite``."""
        return self.dst_origin.split("://", 1)[1]


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port_text = addr.rpartition(":")
    if not sep:
        raise ConfigError(f"invalid address {addr!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"invalid port in address {addr!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"invalid port in address {addr!r}")
    return host, port


def server_ws_url(src: str) -> str:
    """The tunnel URL for a server URL: http->ws, https->wss (ws/wss kept)."""
    parts = urllib.parse.urlsplit(src if "://" in src else "http://" + src)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ConfigError(f"invalid server URL {src!r}: expected http(s)://host[:port]")
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))


def split_destination(dst: str) -> tuple[str, str]:
    """``http://host:port/base`` -> (``http://host:port``, ``/base``)."""
    parts = urllib.parse.urlsplit(dst if "://" in dst else "http://" + dst)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"invalid destination URL {dst!r}: expected http(s)://host[:port]")
    if parts.query or parts.fragment:
        raise ConfigError(f"invalid destination URL {dst!r}: no query or fragment allowed")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(f"invalid port in destination URL {dst!r}") from None
    return f"{parts.scheme.lower()}://{parts.netloc}", parts.path.rstrip("/")
