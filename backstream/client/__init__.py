"""The tunnel client: one WebSocket to the server, one curl transfer per stream.

``run_client`` connects, serves streams until the WebSocket closes, then
reconnects for ever with capped exponential backoff and full jitter. Streams
in flight when a connection drops are aborted, never re-sent: the server has
already answered their callers with 502.
"""

from __future__ import annotations

import asyncio
import logging
import random
import urllib.parse
from typing import Any

from tornado import httpclient
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from .. import errors, protocol, routing, tls, websocket_writer
from ..auth.token import TOKEN_HEADER
from ..config import ClientConfig
from ..har import HarRecorder
from .curl import UpstreamClient
from .inspector import Inspector
from .upstream import Exchange
from .websocket import WebSocketExchange, http_headers

log = logging.getLogger("backstream.client")

#: Seconds to wait for the WebSocket handshake.
CONNECT_TIMEOUT = 10.0
#: A connection that lasted this long resets the backoff.
STABLE_AFTER = 10.0
#: Backoff multiplier after the server's policy denied us: do not hammer it.
DENIED_SLOWDOWN = 8.0


def backoff_delay(
    attempt: int, *, base: float = 0.5, cap: float = 30.0, rand: float = 1.0
) -> float:
    """Seconds to wait before reconnection ``attempt`` (0-based): full jitter, capped.

    ``rand`` is a number in [0, 1] (``random.random()``); the delay lies between
    half and all of ``min(cap, base * 2**attempt)``, so clients that lost the
    same server spread out without any of them waiting needlessly long.
    """
    ceiling: float = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling * (0.5 + 0.5 * rand)


class ClientTunnel:
    """The streams carried by one WebSocket connection."""

    def __init__(
        self,
        ws: WebSocketClientConnection,
        config: ClientConfig,
        http_client: UpstreamClient,
        har: HarRecorder | None,
        inspector: Inspector | None = None,
    ) -> None:
        self.ws = ws
        self.config = config
        self.http_client = http_client
        self.har = har
        self.inspector = inspector
        self.loop = asyncio.get_running_loop()
        self.streams: dict[int, Exchange | WebSocketExchange] = {}
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self._batch = protocol.Batch()
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, *frame: bytes) -> None:
        """Queue a frame; frames go out in order from the IOLoop, not from curl callbacks."""
        if not self._batch:
            self.loop.call_soon(self._flush)
        self._batch.add(*frame)

    def _flush(self) -> None:
        messages = self._batch.messages()
        if self.closed.done():
            return
        try:
            for pieces in messages:
                websocket_writer.write_binary(self.ws.protocol, pieces)
        except WebSocketClosedError:
            self.on_message(None)

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    def on_message(self, message: str | bytes | None) -> None:
        if message is None:
            self._close(
                f"connection closed code={self.ws.close_code} reason={self.ws.close_reason}"
            )
            return
        try:
            if isinstance(message, str):
                raise errors.ProtocolError("text message on the tunnel")
            self._receive(message)
        except errors.ProtocolError as e:
            log.error("protocol error from server, reconnecting: %s", e)
            self.ws.close(1002, "protocol error")
            self._close(f"protocol error: {e}")

    def _receive(self, message: bytes) -> None:
        for frame in protocol.decode_all(message):
            self._route(frame)

    def _route(self, frame: protocol.Frame) -> None:
        if isinstance(frame, protocol.RequestHead):
            if frame.stream_id in self.streams:
                raise errors.ProtocolError(f"stream {frame.stream_id} opened twice")
            self._start(frame)
            return
        exchange = self.streams.get(frame.stream_id)
        if exchange is None:
            return  # the stream finished here first: a harmless race
        if isinstance(frame, protocol.Data):
            exchange.on_request_data(frame)
        elif isinstance(frame, protocol.Window):
            exchange.on_window(frame.increment)
        elif isinstance(frame, protocol.Reset):
            self.forget(frame.stream_id)
            exchange.cancel(f"reset by server: {frame.message}")
        else:
            raise errors.ProtocolError(f"unexpected {type(frame).__name__} from the server")

    def _start(self, head: protocol.RequestHead) -> None:
        exchange: Exchange | WebSocketExchange
        if head.upgrade:
            exchange = WebSocketExchange(self, head, self.config)
        else:
            har = self.har.start(head, self.config) if self.har is not None else None
            record = self.inspector.start(head) if self.inspector is not None else None
            exchange = Exchange(self, head, self.config, har, record)
        self.streams[head.stream_id] = exchange
        task = asyncio.ensure_future(exchange.run(self.http_client))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("stream failed", exc_info=task.exception())

    def _close(self, why: str) -> None:
        if self.closed.done():
            return
        for exchange in list(self.streams.values()):
            exchange.cancel("tunnel closed")
        self.streams.clear()
        self.closed.set_result(why)


async def connect(
    config: ClientConfig, on_message: Any, name: str = ""
) -> WebSocketClientConnection:
    """Open the tunnel WebSocket asking for ``name``; HTTP errors come back as HTTPClientError."""
    pairs = [(protocol.CLIENT_HEADER, str(protocol.PROTOCOL_VERSION)), *config.headers]
    if name:
        pairs.append((routing.NAME_HEADER, name))
    if config.token:
        pairs.append((TOKEN_HEADER, config.token))
    headers = http_headers(pairs)
    secure = config.server_url.startswith("wss:")
    if secure and config.insecure:
        log.warning("not verifying the server's certificate (--insecure) url=%s", config.server_url)
    request = httpclient.HTTPRequest(
        config.server_url,
        headers=headers,
        connect_timeout=CONNECT_TIMEOUT,
        request_timeout=CONNECT_TIMEOUT,
        ssl_options=tls.client_context(config.ca, config.insecure) if secure else None,
    )
    return await websocket_connect(
        request,
        on_message_callback=on_message,
        ping_interval=config.ping_interval or None,
        ping_timeout=config.ping_timeout or None,
        max_message_size=protocol.MAX_MESSAGE,
    )


async def run_client(config: ClientConfig) -> None:
    """Connect and serve for ever; only a protocol version mismatch is fatal."""
    http_client = UpstreamClient(
        force_instance=True,
        max_clients=config.max_concurrency,
        max_body_size=1 << 62,  # bodies are streamed with flow control, never held
    )
    har = None
    if config.har_dir:
        har = HarRecorder(config.har_dir, config.har_unmasked, config.har_body_limit)
    inspector = web = None
    if config.inspect_addr is not None:
        from .inspector_web import start_inspector  # Tornado handlers, prometheus_client

        inspector = Inspector(config)
        web = start_inspector(inspector, http_client)
    attempt = 0
    name = config.name
    try:
        while True:
            # A name the server assigned is asked for again: the URL survives a reconnect.
            stable, slowdown, name = await serve_once(config, http_client, har, name, inspector)
            attempt = 0 if stable else attempt + 1
            delay = backoff_delay(attempt, cap=config.max_backoff, rand=random.random()) * slowdown
            log.info("reconnecting in %.1fs attempt=%d", delay, attempt + 1)
            await asyncio.sleep(delay)
    finally:
        if web is not None:
            web.stop()
        http_client.close()


async def serve_once(
    config: ClientConfig,
    http_client: UpstreamClient,
    har: HarRecorder | None,
    name: str = "",
    inspector: Inspector | None = None,
) -> tuple[bool, float, str]:
    """One connection, served until it closes: (was it stable, backoff slowdown, its name)."""
    tunnel: ClientTunnel | None = None
    early: list[str | bytes | None] = []

    def on_message(message: str | bytes | None) -> None:
        if tunnel is None:
            early.append(message)  # arrived before connect() returned to us
        else:
            tunnel.on_message(message)

    url = config.server_url
    try:
        ws = await connect(config, on_message, name)
    except httpclient.HTTPClientError as e:
        body = e.response.body.decode("utf-8", "replace").strip() if e.response else ""
        if e.code == 400 and "protocol version" in body:
            raise errors.ConfigError(f"cannot connect to {url}: {body}") from None
        if e.code == 403:
            log.error("denied by server policy url=%s status=403", url)
            return False, DENIED_SLOWDOWN, name
        if e.code == 409:  # another client owns the tunnel: retrying cannot help
            log.error("tunnel in use url=%s status=409: %s", url, body[:200])
            raise errors.ConfigError(f"cannot connect to {url}: {body[:200]}") from None
        log.error("server refused the tunnel url=%s status=%d %s", url, e.code, body[:200])
        return False, 1.0, name
    except (TimeoutError, OSError, httpclient.HTTPError) as e:
        log.error("cannot connect to server url=%s: %s", url, e)
        return False, 1.0, name
    loop = asyncio.get_running_loop()
    if ws.protocol is not None:
        ws.protocol.set_nodelay(True)  # frames are small and latency-bound: no Nagle
    tunnel = ClientTunnel(ws, config, http_client, har, inspector)
    started = loop.time()
    log.info("connected to server url=%s", url)
    if inspector is not None:
        inspector.connects += 1
        inspector.connected = True
        inspector.open_streams = tunnel.streams.__len__
    answer = ws.headers if ws.headers is not None else {}
    name = answer.get(routing.NAME_HEADER, name)
    public = answer.get(routing.URL_HEADER, "") or url
    destination = config.dst_origin + config.dst_base_path
    log.info("forwarding %s -> %s%s", public, destination, header_route_note(public, name))
    for message in early:
        tunnel.on_message(message)
    why = await tunnel.closed
    if inspector is not None:
        inspector.connected = False
        inspector.open_streams = lambda: 0
    log.warning("disconnected from server url=%s: %s", url, why)
    return loop.time() - started >= STABLE_AFTER, 1.0, name


def header_route_note(public_url: str, name: str) -> str:
    """How to reach a named tunnel whose URL is the server's own (a server without --domain)."""
    host = urllib.parse.urlsplit(public_url).hostname or ""
    if name and not host.startswith(name + "."):
        return f" (header {routing.TUNNEL_HEADER}: {name})"
    return ""
