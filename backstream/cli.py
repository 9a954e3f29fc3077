"""Command line: ``backstream serve`` and ``backstream client``.

Every flag can also come from a ``BACKSTREAM_*`` environment variable or a
config file (``--config``), via configargparse. Mistakes end in one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import urllib.parse
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn

import configargparse

from . import __version__, heap, masking, redact, routing
from .config import ClientConfig, ServerConfig, parse_addr, server_ws_url, split_destination
from .errors import ConfigError
from .logs import LEVELS, setup_logging
from .protocol import DEFAULT_WEBSOCKET_MESSAGE
from .relay import FORWARDED_HEADERS, parse_header_line, parse_networks


class _Parser(configargparse.ArgumentParser):  # type: ignore[misc]
    """Reports errors on one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")
        raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``"10M"`` -> 10485760; plain numbers are bytes; K, M, G are powers of 1024."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 512K, 10M, 1G)")
    number, unit = match.groups()
    factor: int = 1024 ** " KMG".index(unit.upper() or " ")
    return int(number) * factor


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _at_least_one(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {text!r}")
    return int(text)


def _whole_number(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number (0: no limit): {text!r}")
    return int(text)


def _networks(text: str) -> tuple[Any, ...]:
    try:
        return parse_networks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _status(text: str) -> int:
    if not text.isdigit() or not 100 <= int(text) <= 999:
        raise argparse.ArgumentTypeError(f"invalid HTTP status {text!r}")
    return int(text)


def _add_logging(parser: Any, defaults: bool) -> None:
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-level", choices=LEVELS, default=default("info"), env_var="BACKSTREAM_LOG_LEVEL"
    )
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=default("text"),
        env_var="BACKSTREAM_LOG_FORMAT",
    )
    group.add_argument(
        "--log-output",
        default=default("stderr"),
        env_var="BACKSTREAM_LOG_OUTPUT",
        help="stderr, stdout or a file path (default: stderr)",
    )
    group.add_argument(
        "--mask-header",
        action="append",
        default=default([]),
        metavar="NAME",
        help="another header whose values are masked in logs and HAR files, repeatable "
        "(env BACKSTREAM_MASK_HEADER: comma separated; always masked: "
        + ", ".join(redact.DEFAULT_HEADERS)
        + ")",
    )
    group.add_argument(
        "--mask-query",
        action="append",
        default=default([]),
        metavar="NAME",
        help="another query parameter whose values are masked, repeatable "
        "(env BACKSTREAM_MASK_QUERY: comma separated; always masked: "
        + ", ".join(redact.DEFAULT_QUERY)
        + ")",
    )


def build_parser() -> Any:
    parser = _Parser(prog="backstream", description="A self-hosted reverse tunnel.")
    parser.add_argument("--version", action="version", version=f"backstream {__version__}")
    _add_logging(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        aliases=["server", "s"],
        help="run the public server",
        description="Run the public server.",
    )
    serve.add_argument(
        "--config", is_config_file=True, env_var="BACKSTREAM_CONFIG", help="config file"
    )
    serve.add_argument(
        "-a",
        "--addr",
        default="localhost:8080",
        env_var="BACKSTREAM_ADDR",
        help="listen address HOST:PORT (default: localhost:8080)",
    )
    serve.add_argument(
        "-p",
        "--policy",
        action="append",
        default=[],
        help="Rego file or directory, repeatable (env BACKSTREAM_POLICY: ':' or ',' separated)",
    )
    serve.add_argument(
        "-c",
        "--code",
        type=_status,
        default=503,
        env_var="BACKSTREAM_NO_CLIENT_CODE",
        help="status when no client is connected (default: 503)",
    )
    serve.add_argument(
        "--timeout",
        type=_positive,
        default=60.0,
        env_var="BACKSTREAM_TIMEOUT",
        help="seconds to wait for a response head (default: 60)",
    )
    serve.add_argument(
        "--ping-interval",
        type=_positive,
        default=20.0,
        env_var="BACKSTREAM_PING_INTERVAL",
        help="seconds between WebSocket pings (default: 20)",
    )
    serve.add_argument(
        "--ping-timeout",
        type=_positive,
        default=20.0,
        env_var="BACKSTREAM_PING_TIMEOUT",
        help="seconds to wait for a pong (default: 20)",
    )
    serve.add_argument(
        "--max-body-size",
        type=parse_size,
        default=0,
        env_var="BACKSTREAM_MAX_BODY_SIZE",
        help="largest request body, e.g. 100M; 0 for no limit (default: 0)",
    )
    serve.add_argument(
        "--auth",
        choices=("none", "rego", "opa"),
        default=None,
        env_var="BACKSTREAM_AUTH",
        help="policy engine (default: rego with -p, else none)",
    )
    serve.add_argument(
        "--opa-url",
        default=None,
        env_var="BACKSTREAM_OPA_URL",
        help="remote OPA server for --auth opa",
    )
    serve.add_argument(
        "--opa-token",
        default=None,
        env_var="BACKSTREAM_OPA_TOKEN",
        help="bearer token for the OPA server",
    )
    serve.add_argument(
        "--policy-reload",
        type=_positive,
        default=0.0,
        env_var="BACKSTREAM_POLICY_RELOAD",
        help="seconds between checks for changed policy files; 0: only on SIGHUP (default: 0)",
    )
    serve.add_argument(
        "--trust-forwarded",
        type=_networks,
        default=(),
        env_var="BACKSTREAM_TRUST_FORWARDED",
        metavar="CIDR,...",
        help="proxies whose X-Forwarded-*/Forwarded headers are kept (default: none, replaced)",
    )
    serve.add_argument(
        "--forwarded-header",
        type=str.lower,
        choices=FORWARDED_HEADERS,
        default=FORWARDED_HEADERS[0],
        env_var="BACKSTREAM_FORWARDED_HEADER",
        help="the one header behind --trust-forwarded proxies that names the caller for "
        "policies (input.remote); the other is ignored for it (default: x-forwarded-for)",
    )
    serve.add_argument(
        "--domain",
        default="",
        env_var="BACKSTREAM_DOMAIN",
        help="wildcard domain: a Host NAME.DOMAIN reaches the tunnel named NAME",
    )
    serve.add_argument(
        "--public-url",
        default="",
        env_var="BACKSTREAM_PUBLIC_URL",
        help="this server's public URL behind a TLS terminator, e.g. https://tunnel.example.com",
    )
    serve.add_argument(
        "--name-grace",
        type=_positive,
        default=60.0,
        env_var="BACKSTREAM_NAME_GRACE",
        help="seconds a name stays reserved for its owner after its last client left "
        "(default: 60)",
    )
    serve.add_argument(
        "--max-tunnels",
        type=_at_least_one,
        default=1000,
        env_var="BACKSTREAM_MAX_TUNNELS",
        help="names one server holds at most (default: 1000)",
    )
    serve.add_argument(
        "--ws-max-message",
        type=parse_size,
        default=DEFAULT_WEBSOCKET_MESSAGE,
        env_var="BACKSTREAM_WS_MAX_MESSAGE",
        help="largest WebSocket message relayed, e.g. 16M (default: 64M; larger ones: 1009)",
    )
    limits = serve.add_argument_group("limits (0 turns one off)")
    limits.add_argument(
        "--max-target",
        type=parse_size,
        default=8 * 1024,
        env_var="BACKSTREAM_MAX_TARGET",
        help="longest request target, e.g. 16K (default: 8K; longer ones: 414)",
    )
    limits.add_argument(
        "--header-timeout",
        type=_positive,
        default=10.0,
        env_var="BACKSTREAM_HEADER_TIMEOUT",
        help="seconds a request head may take (default: 10; else 408)",
    )
    limits.add_argument(
        "--idle-timeout",
        type=_positive,
        default=60.0,
        env_var="BACKSTREAM_IDLE_TIMEOUT",
        help="seconds a kept-alive connection waits for its next request (default: 60)",
    )
    limits.add_argument(
        "--body-timeout",
        type=_positive,
        default=30.0,
        env_var="BACKSTREAM_BODY_TIMEOUT",
        help="seconds without a byte of a request body (default: 30; else 408)",
    )
    limits.add_argument(
        "--max-connections",
        type=_whole_number,
        default=10000,
        env_var="BACKSTREAM_MAX_CONNECTIONS",
        help="public connections at once (default: 10000; more get 503)",
    )
    limits.add_argument(
        "--max-streams",
        type=_whole_number,
        default=1000,
        env_var="BACKSTREAM_MAX_STREAMS",
        help="requests in flight per tunnel client (default: 1000; more get 503)",
    )
    limits.add_argument(
        "--max-clients",
        type=_whole_number,
        default=1000,
        env_var="BACKSTREAM_MAX_CLIENTS",
        help="tunnel clients connected at once (default: 1000; more are refused with 503)",
    )
    secure = serve.add_argument_group("TLS and token")
    secure.add_argument(
        "--tls-cert",
        default="",
        env_var="BACKSTREAM_TLS_CERT",
        metavar="FILE",
        help="PEM certificate chain: serve HTTPS and WSS on --addr (reloaded on SIGHUP)",
    )
    secure.add_argument(
        "--tls-key",
        default="",
        env_var="BACKSTREAM_TLS_KEY",
        metavar="FILE",
        help="PEM private key of --tls-cert",
    )
    secure.add_argument(
        "--token",
        default="",
        env_var="BACKSTREAM_TOKEN",
        help="a shared secret every tunnel client must present (with policies: both must allow)",
    )
    cluster = serve.add_argument_group("scale-out")
    cluster.add_argument(
        "--redis",
        default="",
        env_var="BACKSTREAM_REDIS",
        metavar="URL",
        help="Redis holding the cluster's shared state, e.g. redis://10.0.0.2:6379/0 "
        "(default: none, one instance)",
    )
    cluster.add_argument(
        "--cluster-secret",
        default="",
        env_var="BACKSTREAM_CLUSTER_SECRET",
        help="secret authenticating the links between instances (required with --redis)",
    )
    cluster.add_argument(
        "--advertise",
        default="",
        env_var="BACKSTREAM_ADVERTISE",
        metavar="URL",
        help="how other instances reach this one, e.g. http://10.0.0.5:8080 "
        "(default: from -a when it is a concrete address)",
    )
    cluster.add_argument(
        "--workers",
        type=_at_least_one,
        default=1,
        env_var="BACKSTREAM_WORKERS",
        help="processes sharing the public port, each an instance (default: 1; "
        "more need --redis)",
    )
    observe = serve.add_argument_group("metrics and health")
    observe.add_argument(
        "--metrics-addr",
        default="",
        env_var="BACKSTREAM_METRICS_ADDR",
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /healthz and /readyz on this address, a port of "
        "their own, e.g. 127.0.0.1:9090 (default: none)",
    )
    observe.add_argument(
        "--ready-needs-client",
        action="store_true",
        env_var="BACKSTREAM_READY_NEEDS_CLIENT",
        help="/readyz answers 503 until a tunnel client is connected",
    )
    observe.add_argument(
        "--metrics-max-tunnels",
        type=_at_least_one,
        default=500,
        env_var="BACKSTREAM_METRICS_MAX_TUNNELS",
        help="tunnel names with metric series of their own; the others count as 'other' "
        "(default: 500)",
    )
    _add_logging(serve, defaults=False)

    client = commands.add_parser(
        "client",
        aliases=["c"],
        help="run the tunnel client beside the local app",
        description="Run the tunnel client beside the local app.",
    )
    client.add_argument(
        "--config", is_config_file=True, env_var="BACKSTREAM_CONFIG", help="config file"
    )
    client.add_argument(
        "-s",
        "--src",
        required="BACKSTREAM_SRC_URL" not in os.environ,
        env_var="BACKSTREAM_SRC_URL",
        help="server URL, e.g. https://tunnel.example.com",
    )
    client.add_argument(
        "-d",
        "--dst",
        required="BACKSTREAM_DST_URL" not in os.environ,
        env_var="BACKSTREAM_DST_URL",
        help="local app URL, e.g. http://localhost:3000[/base]",
    )
    client.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        help="'Name: value' for the handshake, repeatable (env BACKSTREAM_HEADER: one per line)",
    )
    client.add_argument(
        "-o",
        "--output",
        default=None,
        env_var="BACKSTREAM_OUTPUT",
        help="directory for one HAR file per request",
    )
    client.add_argument(
        "--har-unmasked",
        action="store_true",
        env_var="BACKSTREAM_HAR_UNMASKED",
        help="keep secret headers in HAR files",
    )
    client.add_argument(
        "--har-body-limit",
        type=parse_size,
        default=1024 * 1024,
        env_var="BACKSTREAM_HAR_BODY_LIMIT",
        help="bytes of each body kept in HAR files (default: 1M)",
    )
    client.add_argument(
        "--timeout",
        type=_positive,
        default=60.0,
        env_var="BACKSTREAM_TIMEOUT",
        help="seconds to wait for the local app's response head (default: 60)",
    )
    client.add_argument(
        "--host-header",
        default="preserve",
        env_var="BACKSTREAM_HOST_HEADER",
        metavar="preserve|rewrite|VALUE",
        help="the Host the local app sees: the public one (preserve, default), the "
        "destination's (rewrite; redirects to it are rewritten) or VALUE",
    )
    client.add_argument(
        "--preserve-host",
        action="store_true",
        env_var="BACKSTREAM_PRESERVE_HOST",
        help="the same as --host-header preserve",
    )
    client.add_argument(
        "--ping-interval",
        type=_positive,
        default=20.0,
        env_var="BACKSTREAM_PING_INTERVAL",
        help="seconds between WebSocket pings (default: 20)",
    )
    client.add_argument(
        "--ping-timeout",
        type=_positive,
        default=20.0,
        env_var="BACKSTREAM_PING_TIMEOUT",
        help="seconds to wait for a pong (default: 20)",
    )
    client.add_argument(
        "--max-concurrency",
        type=_at_least_one,
        default=256,
        env_var="BACKSTREAM_MAX_CONCURRENCY",
        help="concurrent requests to the local app (default: 256)",
    )
    client.add_argument(
        "--max-backoff",
        type=_positive,
        default=30.0,
        env_var="BACKSTREAM_MAX_BACKOFF",
        help="longest wait between reconnection attempts (default: 30)",
    )
    client.add_argument(
        "--name",
        default="",
        env_var="BACKSTREAM_NAME",
        help="the tunnel name to claim, a DNS label (default: the server assigns one "
        "when it has --domain)",
    )
    client.add_argument(
        "--ws-max-message",
        type=parse_size,
        default=DEFAULT_WEBSOCKET_MESSAGE,
        env_var="BACKSTREAM_WS_MAX_MESSAGE",
        help="largest WebSocket message relayed, e.g. 16M (default: 64M; larger ones: 1009)",
    )
    secure = client.add_argument_group("TLS and token")
    secure.add_argument(
        "--token",
        default="",
        env_var="BACKSTREAM_TOKEN",
        help="the server's shared secret (its --token)",
    )
    secure.add_argument(
        "--ca",
        default="",
        env_var="BACKSTREAM_CA",
        metavar="FILE",
        help="PEM CA certificates to verify the server with (default: the system store)",
    )
    secure.add_argument(
        "--insecure",
        action="store_true",
        env_var="BACKSTREAM_INSECURE",
        help="do not verify the server's certificate (warned at every connect)",
    )
    secure.add_argument(
        "--dst-ca",
        default="",
        env_var="BACKSTREAM_DST_CA",
        metavar="FILE",
        help="PEM CA certificates to verify an https:// local app with",
    )
    secure.add_argument(
        "--dst-insecure",
        action="store_true",
        env_var="BACKSTREAM_DST_INSECURE",
        help="do not verify an https:// local app's certificate (self-signed dev servers)",
    )
    inspect = client.add_argument_group("inspector")
    inspect.add_argument(
        "--inspect",
        default="127.0.0.1:4040",
        env_var="BACKSTREAM_INSPECT",
        metavar="ADDR",
        help="where the inspector (web page, API, /metrics) listens; the next free port "
        "when taken; 'off' for none (default: 127.0.0.1:4040)",
    )
    inspect.add_argument("--no-inspect", action="store_true", help="no inspector")
    inspect.add_argument(
        "--inspect-keep",
        type=_at_least_one,
        default=200,
        env_var="BACKSTREAM_INSPECT_KEEP",
        help="requests the inspector keeps (default: 200)",
    )
    inspect.add_argument(
        "--inspect-body-limit",
        type=parse_size,
        default=1024 * 1024,
        env_var="BACKSTREAM_INSPECT_BODY_LIMIT",
        help="bytes of each body the inspector keeps (default: 1M)",
    )
    inspect.add_argument(
        "--inspect-memory",
        type=parse_size,
        default=16 * 1024 * 1024,
        env_var="BACKSTREAM_INSPECT_MEMORY",
        help="bytes of bodies the inspector keeps in all, the oldest let go first "
        "(default: 16M)",
    )
    _add_logging(client, defaults=False)
    return parser


def _env_list(name: str, separators: str) -> list[str]:
    value = os.environ.get(name, "")
    return [part.strip() for part in re.split(f"[{re.escape(separators)}]", value) if part.strip()]


def server_config(args: argparse.Namespace) -> ServerConfig:
    host, port = parse_addr(args.addr)
    policies = args.policy or _env_list("BACKSTREAM_POLICY", ":,")
    return ServerConfig(
        host=host,
        port=port,
        no_client_code=args.code,
        timeout=args.timeout,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        max_body_size=args.max_body_size,
        policy_paths=tuple(policies),
        auth=args.auth,
        opa_url=args.opa_url,
        opa_token=args.opa_token,
        policy_reload=args.policy_reload,
        trust_forwarded=args.trust_forwarded,
        forwarded_header=args.forwarded_header,
        domain=_checked(routing.normalize_domain, args.domain),
        public_url=_public_url(args.public_url),
        name_grace=args.name_grace,
        max_tunnels=args.max_tunnels,
        ws_max_message=args.ws_max_message,
        max_target=args.max_target,
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        max_streams=args.max_streams,
        max_clients=args.max_clients,
        metrics_addr=parse_addr(args.metrics_addr) if args.metrics_addr.strip() else None,
        ready_needs_client=_needs_metrics(args.ready_needs_client, args.metrics_addr),
        metrics_max_tunnels=args.metrics_max_tunnels,
        tls=_tls_pair(args.tls_cert, args.tls_key),
        token=args.token,
        **_cluster(args, host),
    )


def _cluster(args: argparse.Namespace, host: str) -> dict[str, Any]:
    """The scale-out settings, checked: each needs the ones it builds on."""
    if not args.redis:
        if args.workers > 1:
            raise ConfigError("--workers above 1 needs --redis (the workers share their tunnels)")
        return {}
    if not args.cluster_secret:
        raise ConfigError("--redis needs --cluster-secret (it authenticates the instances)")
    advertise = args.advertise.strip().rstrip("/")
    if advertise:
        parts = urllib.parse.urlsplit(advertise)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise ConfigError(f"invalid --advertise {advertise!r}: expected http(s)://host:port")
    elif host in ("0.0.0.0", "::", ""):
        raise ConfigError(
            "-a listens on every interface: say how other instances reach this one "
            "with --advertise http://ADDRESS:PORT"
        )
    return {
        "redis": args.redis,
        "cluster_secret": args.cluster_secret,
        "advertise": advertise,
        "workers": args.workers,
    }


def _tls_pair(cert: str, key: str) -> tuple[str, str] | None:
    if bool(cert) != bool(key):
        raise ConfigError("--tls-cert and --tls-key go together")
    return (cert, key) if cert else None


def _needs_metrics(ready_needs_client: bool, metrics_addr: str) -> bool:
    if ready_needs_client and not metrics_addr.strip():
        raise ConfigError("--ready-needs-client needs --metrics-addr (where /readyz is served)")
    return ready_needs_client


def client_config(args: argparse.Namespace) -> ClientConfig:
    origin, base_path = split_destination(args.dst)
    raw_headers = args.header or _env_list("BACKSTREAM_HEADER", "\n")
    try:
        headers = [parse_header_line(line) for line in raw_headers]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ClientConfig(
        server_url=server_ws_url(args.src),
        dst_origin=origin,
        dst_base_path=base_path,
        headers=headers,
        har_dir=args.output,
        har_unmasked=args.har_unmasked,
        har_body_limit=args.har_body_limit,
        timeout=args.timeout,
        host_header=_host_header(args.host_header, args.preserve_host),
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        max_concurrency=args.max_concurrency,
        max_backoff=args.max_backoff,
        name=_checked(routing.check_name, args.name) if args.name else "",
        ws_max_message=args.ws_max_message,
        inspect_addr=None if args.no_inspect else _inspect_addr(args.inspect),
        inspect_keep=args.inspect_keep,
        inspect_body_limit=args.inspect_body_limit,
        inspect_memory=args.inspect_memory,
        token=args.token,
        ca=args.ca,
        insecure=args.insecure,
        dst_ca=args.dst_ca,
        dst_insecure=args.dst_insecure,
    )


def _inspect_addr(text: str) -> tuple[str, int] | None:
    """``off``, a port (on loopback) or ``HOST:PORT`` for ``--inspect``."""
    text = text.strip()
    if text.lower() in ("off", "no", "none", "false"):
        return None
    if text.lstrip(":").isdigit():  # "4041" or ":4041": loopback, not every interface
        text = "127.0.0.1:" + text.lstrip(":")
    return parse_addr(text)


def _checked(check: Any, text: str) -> Any:
    try:
        return check(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _host_header(mode: str, preserve: bool) -> str:
    mode = mode.strip()
    if mode.lower() in ("preserve", "rewrite"):
        mode = mode.lower()
    elif not re.fullmatch(r"[\x21-\x7e]+", mode):
        raise ConfigError(f"invalid --host-header {mode!r}: preserve, rewrite or a host[:port]")
    if preserve and mode != "preserve":
        raise ConfigError(f"--preserve-host contradicts --host-header {mode}")
    return mode


def _public_url(text: str) -> str:
    url = text.strip().rstrip("/")
    if url and (not re.match(r"https?://[^/?#]+$", url)):
        raise ConfigError(f"invalid public URL {text!r}: expected http(s)://host[:port]")
    return url


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (BACKSTREAM_LOOP=asyncio opts out)."""
    if os.environ.get("BACKSTREAM_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("serve", "server", "s"):
            from .server import run_server

            config: Any = server_config(args)
            runner: Any = run_server
            if config.workers > 1:
                _setup(args)
                from .server.workers import supervise

                sys.exit(supervise(config, lambda worker: _run(run_server, worker)))
        else:
            from .client import run_client

            config = client_config(args)
            runner = run_client
        _setup(args)
    except ConfigError as e:
        print(f"backstream: error: {e}", file=sys.stderr)
        sys.exit(2)
    _run(runner, config)


def _setup(args: argparse.Namespace) -> None:
    redact.configure(
        args.mask_header or _env_list("BACKSTREAM_MASK_HEADER", ",\n"),
        args.mask_query or _env_list("BACKSTREAM_MASK_QUERY", ",\n"),
    )
    setup_logging(args.log_level, args.log_format, args.log_output)
    heap.keep_freed_buffers()
    masking.install()


def _run(runner: Any, config: Any) -> None:
    """Run a server or client; bad settings exit 2, an OS refusal (a busy port) 1."""
    try:
        run_loop(runner(config))
    except ConfigError as e:
        print(f"backstream: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"backstream: error: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
