"""A real local app for the end-to-end tests: a small Tornado server run as a subprocess.

Run it as ``python tests/local_app.py [--port 0] [--host 127.0.0.1]``. Once bound it
prints ``listening port=PORT`` on stdout (flushed), and then one line per request it
sees: ``hit METHOD "URI"`` at headers time and ``closed METHOD "URI"`` when the caller
(the backstream client) dropped the connection before the response was finished.
The harness (``tests/harness.py``, ``LocalApp``) starts it and reads these lines.

Endpoints (every request whose path does not start with ``/__`` counts as a hit):

``* /anything``            echo: JSON ``{"method", "uri", "path", "query", "headers",
                           "body_len", "body_sha256", "remote_ip", "version", "body_b64"}``.
                           ``uri`` is ``request.uri`` exactly as received (latin-1 str),
                           ``headers`` an ordered list of ``[name, value]`` pairs; any
                           method is accepted, custom ones too. ``body_b64`` only when
                           the body is at most 4 KiB.
``GET|HEAD /download?size=N[&chunk=C][&chunked=1]``
                           N deterministic bytes (see ``pattern_chunks``) written in
                           chunks of C bytes with a flush (backpressure) per chunk,
                           ``Content-Length: N`` unless ``chunked=1``.
``POST|PUT /upload``       streamed body sink (``@stream_request_body``): answers JSON
                           ``{"len", "sha256"}`` without holding the body. With
                           ``?notify=1`` it prints ``upload-data "URI" N`` when the first
                           body bytes arrive (N = bytes received so far).
``GET /drip?token=T``      writes ``first\\n`` and flushes, then waits until
                           ``POST /__release/T`` (or 120 s), then writes ``last\\n``.
``GET /drip?delay=D``      the same, but the last line comes after D seconds.
``* /slow?delay=D``        answers JSON after D seconds; tracks in-flight count.
``* /barrier?name=B&n=N[&timeout=S]`` answers 200 once N requests wait on barrier B
                           (all in flight at once), or 500 ``barrier timeout`` after S
                           seconds (default 60).
``* /status/CODE[?reason=R]`` answers CODE with reason R and a short text body.
``GET /cookies[?secret=S]`` three ``Set-Cookie`` headers (one with a comma), two
                           ``X-Multi``; plus ``Set-Cookie: token=V; Secure`` when ``secret``
                           is given, V = ``set_cookie_secret(S)``.
``GET /redirect?to=URL[&code=302]`` a redirect with ``Location: URL``.
``GET /gzip``              ``GZIP_PLAIN`` gzip-compressed, ``Content-Encoding: gzip``.
``GET /nocontent``         204.
``GET /notmodified``       304 with an ``ETag``.
``GET /hopheaders``        a response carrying hop-by-hop headers (``Connection:
                           X-Resp-Hop``, ``X-Resp-Hop``, ``Keep-Alive``,
                           ``Proxy-Authenticate``, ``Trailer``) plus ``X-End-To-End``.
``GET /ws/echo`` (WebSocket) greets with JSON ``{"uri", "headers"}``, then echoes every
                           message with its type; subprotocols ``chat``/``superchat``;
                           the text ``close`` closes with 4001, ``close-nocode`` without a
                           code, ``drop`` drops the connection; prints ``ws-open "URI"`` and
                           ``ws-closed "URI" code=N reason="R"`` (JSON; ``null`` for none).
``GET /ws/refuse``         refuses the upgrade with 403 and ``X-Refused: yes``.
``GET /browser/ws``        a small HTML page (inline script, no external resources) for
                           the browser test: it opens a WebSocket to ``ws://`` +
                           ``location.host`` + ``/ws/echo``, sends ``BROWSER_WS_MESSAGE``
                           and, when that exact text is echoed back (after the greeting),
                           writes it into ``<p id="echo">``; ``<p id="status">`` tells
                           how far it got (``open``, ``echoed``, ``error``, ``closed N``).
``GET /__hits``            JSON ``{"hits": N}``: requests seen (excluding ``/__*``).
``GET /__stats``           JSON: hits, slow in-flight and max in-flight, bytes written by
                           downloads so far, drip states, closed (aborted) count.
``POST /__reset``          zero the counters.
``POST /__release/T``      release the drip waiting on token T.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import json
import ssl
import sys
from collections.abc import Iterator
from typing import Any

import tornado.iostream
import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

#: Length of the repeating block of the deterministic byte pattern (a prime, so that a
#: lost or duplicated chunk never lines up with the block).
PATTERN_BLOCK_LEN = 1_000_003
_PATTERN_BLOCK = hashlib.shake_256(b"backstream-e2e-pattern").digest(PATTERN_BLOCK_LEN)

GZIP_PLAIN = b"backstream gzip passthrough check\n" * 200


def pattern_chunks(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """Yield ``total`` deterministic bytes in chunks of at most ``chunk`` bytes."""
    pos = 0
    while pos < total:
        n = min(chunk, total - pos)
        parts = []
        need = n
        while need:
            start = (pos + n - need) % PATTERN_BLOCK_LEN
            piece = _PATTERN_BLOCK[start : start + need]
            parts.append(piece)
            need -= len(piece)
        yield parts[0] if len(parts) == 1 else b"".join(parts)
        pos += n


def set_cookie_secret(seed: str) -> str:
    """The cookie value ``/cookies?secret=SEED`` sets (the seed itself is in the URL,
    which may be logged; this derived value is not)."""
    return "setcookie-secret-" + hashlib.sha256(seed.encode()).hexdigest()[:12]


def pattern_sha256(total: int) -> str:
    """The sha256 hex digest of ``pattern_chunks(total)``."""
    h = hashlib.sha256()
    for c in pattern_chunks(total, 1 << 20):
        h.update(c)
    return h.hexdigest()


class State:
    hits = 0
    slow_inflight = 0
    slow_max_inflight = 0
    download_bytes = 0
    closed = 0
    drips: dict[str, str] = {}
    releases: dict[str, asyncio.Event] = {}

    @classmethod
    def reset(cls) -> None:
        cls.hits = 0
        cls.slow_inflight = 0
        cls.slow_max_inflight = 0
        cls.download_bytes = 0
        cls.closed = 0
        cls.drips = {}
        cls.releases = {}

    @classmethod
    def release_event(cls, token: str) -> asyncio.Event:
        if token not in cls.releases:
            cls.releases[token] = asyncio.Event()
        return cls.releases[token]


class _AllMethods:
    def __contains__(self, item: object) -> bool:
        return True


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Base(tornado.web.RequestHandler):
    SUPPORTED_METHODS = _AllMethods()  # type: ignore[assignment]

    def compute_etag(self) -> str | None:
        return None

    def prepare(self) -> Any:
        if not self.request.path.startswith("/__"):
            State.hits += 1
            _say(f"hit {self.request.method} {json.dumps(self.request.uri)}")

    def on_connection_close(self) -> None:
        if not self._finished:
            self.note_closed()

    def note_closed(self) -> None:
        """Say ``closed`` once, whether Tornado reports the close or a write fails first."""
        if not getattr(self, "_closed_noted", False):
            self._closed_noted = True
            State.closed += 1
            _say(f"closed {self.request.method} {json.dumps(self.request.uri)}")

    def send_json(self, obj: object) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj).encode())


class Echo(Base):
    def prepare(self) -> Any:
        super().prepare()
        r = self.request
        body = r.body or b""
        self.send_json(
            {
                "method": r.method,
                "uri": r.uri,
                "path": r.path,
                "query": r.query,
                "version": r.version,
                "headers": [[k, v] for k, v in r.headers.get_all()],
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_b64": base64.b64encode(body).decode() if len(body) <= 4096 else None,
                "remote_ip": r.remote_ip,
            }
        )


class Download(Base):
    async def get(self) -> None:
        size = int(self.get_argument("size"))
        chunk = int(self.get_argument("chunk", str(64 * 1024)))
        if self.get_argument("chunked", "0") != "1":
            self.set_header("Content-Length", str(size))
        self.set_header("Content-Type", "application/octet-stream")
        if self.request.method == "HEAD":
            self.finish()
            return
        try:
            for c in pattern_chunks(size, chunk):
                self.write(c)
                await self.flush()
                State.download_bytes += len(c)
        except tornado.iostream.StreamClosedError:
            self.note_closed()
            return
        self.finish()

    head = get


@tornado.web.stream_request_body
class Upload(Base):
    def prepare(self) -> Any:
        super().prepare()
        self.request.connection.set_max_body_size(1 << 40)  # type: ignore[attr-defined]
        self._sha = hashlib.sha256()
        self._len = 0

    def data_received(self, chunk: bytes) -> None:
        first = self._len == 0
        self._sha.update(chunk)
        self._len += len(chunk)
        if first and self.get_argument("notify", "0") == "1":
            _say(f"upload-data {json.dumps(self.request.uri)} {self._len}")

    def _done(self) -> None:
        self.send_json({"len": self._len, "sha256": self._sha.hexdigest()})

    def post(self) -> None:
        self._done()

    put = post


class Drip(Base):
    async def get(self) -> None:
        token = self.get_argument("token", "")
        delay = float(self.get_argument("delay", "0"))
        self.set_header("Content-Type", "text/plain")
        try:
            self.write(b"first\n")
            await self.flush()
            if token:
                State.drips[token] = "waiting"
                ev = State.release_event(token)
                try:
                    await asyncio.wait_for(ev.wait(), 120)
                except TimeoutError:
                    State.drips[token] = "timeout"
                    self.finish(b"timeout\n")
                    return
                State.drips[token] = "released"
            else:
                await asyncio.sleep(delay)
            self.write(b"last\n")
            await self.flush()
        except tornado.iostream.StreamClosedError:
            if token:
                State.drips[token] = "closed"
            return
        if token:
            State.drips[token] = "done"
        self.finish()


class Release(tornado.web.RequestHandler):
    def post(self, token: str) -> None:
        State.release_event(token).set()
        self.finish({"released": token})


class Slow(Base):
    def prepare(self) -> Any:
        super().prepare()
        return self._slow()

    async def _slow(self) -> None:
        delay = float(self.get_argument("delay", "1"))
        State.slow_inflight += 1
        State.slow_max_inflight = max(State.slow_max_inflight, State.slow_inflight)
        try:
            await asyncio.sleep(delay)
        finally:
            State.slow_inflight -= 1
        if self.request.connection.stream.closed():  # type: ignore[attr-defined]
            return
        self.send_json({"slept": delay})


class Barrier(Base):
    waiting: dict[str, list[asyncio.Future[None]]] = {}

    def prepare(self) -> Any:
        super().prepare()
        return self._wait()

    async def _wait(self) -> None:
        name = self.get_argument("name")
        n = int(self.get_argument("n"))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        group = self.waiting.setdefault(name, [])
        group.append(fut)
        if len(group) >= n:
            for f in group:
                if not f.done():
                    f.set_result(None)
        try:
            await asyncio.wait_for(asyncio.shield(fut), float(self.get_argument("timeout", "60")))
        except TimeoutError:
            self.set_status(500)
            self.finish(b"barrier timeout\n")
            return
        self.send_json({"barrier": name, "n": n})


class Status(Base):
    def prepare(self) -> Any:
        super().prepare()
        code = (
            int(self.path_args[0]) if self.path_args else int(self.request.path.rsplit("/", 1)[1])
        )
        reason = self.get_argument("reason", None)
        self.set_status(code, reason)
        if code in (204, 304) or code < 200:
            self.finish()
        else:
            self.set_header("Content-Type", "text/plain")
            self.finish(f"status {code}\n".encode())


class Cookies(Base):
    def get(self) -> None:
        self.add_header("Set-Cookie", "a=1; Path=/")
        self.add_header("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT; HttpOnly")
        self.add_header("Set-Cookie", "c=3")
        secret = self.get_argument("secret", None)
        if secret:
            self.add_header("Set-Cookie", f"token={set_cookie_secret(secret)}; Secure")
        self.add_header("X-Multi", "one")
        self.add_header("X-Multi", "two")
        self.finish(b"cookies\n")


class Redirect(Base):
    def get(self) -> None:
        self.set_status(int(self.get_argument("code", "302")))
        self.set_header("Location", self.get_argument("to"))
        self.finish(b"redirecting\n")


class Gzip(Base):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain")
        self.set_header("Content-Encoding", "gzip")
        self.finish(gzip.compress(GZIP_PLAIN, mtime=0))


class NoContent(Base):
    def get(self) -> None:
        self.set_status(204)
        self.finish()

    head = get


class Bare(Base):
    """A response with no Server, Date or Content-Type: only what it sets itself."""

    def get(self) -> None:
        for name in ("Server", "Date", "Content-Type"):
            self.clear_header(name)
        self.set_header("X-Only", "1")
        self.finish(b"bare\n")


class NotModified(Base):
    def get(self) -> None:
        self.set_status(304)
        self.set_header("ETag", '"v1"')
        self.finish()


class HopHeaders(Base):
    def get(self) -> None:
        self.set_header("Connection", "X-Resp-Hop")
        self.set_header("X-Resp-Hop", "must-not-pass")
        self.set_header("Keep-Alive", "timeout=5, max=100")
        self.set_header("Proxy-Authenticate", 'Basic realm="x"')
        self.set_header("Trailer", "X-Checksum")
        self.set_header("X-End-To-End", "kept")
        self.finish(b"hop\n")


class Hits(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish({"hits": State.hits})


class Stats(tornado.web.RequestHandler):
    def get(self) -> None:
        self.finish(
            {
                "hits": State.hits,
                "slow_inflight": State.slow_inflight,
                "slow_max_inflight": State.slow_max_inflight,
                "download_bytes": State.download_bytes,
                "closed": State.closed,
                "drips": State.drips,
            }
        )


class Reset(tornado.web.RequestHandler):
    def post(self) -> None:
        State.reset()
        self.finish({"reset": True})


class WsEcho(tornado.websocket.WebSocketHandler):
    """WebSocket echo: greets with the request line it saw, then echoes every message.

    Subprotocols ``chat`` and ``superchat`` are accepted (the first one offered);
    the text message ``close`` makes the app close with code 4001, ``close-nocode``
    with a close frame without a code, ``drop`` drops the connection without any.
    Messages up to 128 MiB are taken (Tornado's default is 10 MiB).
    """

    @property
    def max_message_size(self) -> int:
        return 128 * 1024 * 1024

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return next((p for p in subprotocols if p in ("chat", "superchat")), None)

    def open(self) -> None:
        _say(f'ws-open "{self.request.uri}"')
        headers = [[k, v] for k, v in self.request.headers.get_all()]
        self.write_message(json.dumps({"uri": self.request.uri, "headers": headers}))

    def on_message(self, message: str | bytes) -> None:
        if message == "close":
            self.close(4001, "asked to close")
            return
        if message == "close-nocode":
            self.close()
            return
        if message == "drop" and self.ws_connection is not None:
            self.ws_connection.stream.close()
            return
        self.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        reason = json.dumps(self.close_reason)
        _say(f'ws-closed "{self.request.uri}" code={self.close_code} reason={reason}')


BROWSER_WS_MESSAGE = "hello through the tunnel"

BROWSER_WS_PAGE = """<!doctype html>
<html>
<head>
<meta charset="utf-8">
<title>backstream browser WebSocket check</title>
<link rel="icon" href="data:,">
</head>
<body>
<h1>backstream: a WebSocket from the browser</h1>
<p id="status">loading</p>
<p id="echo"></p>
<script>
"use strict";
const message = MESSAGE;
const status = document.getElementById("status");
const ws = new WebSocket("ws://" + location.host + "/ws/echo");
ws.onopen = () => {
  status.textContent = "open";
  ws.send(message);
};
ws.onmessage = (event) => {
  // the first message is the app's JSON greeting; wait for the echo itself
  if (event.data === message) {
    document.getElementById("echo").textContent = event.data;
    status.textContent = "echoed";
  }
};
ws.onerror = () => { status.textContent = "error"; };
ws.onclose = (event) => {
  if (status.textContent !== "echoed") { status.textContent = "closed " + event.code; }
};
</script>
</body>
</html>
""".replace("MESSAGE", json.dumps(BROWSER_WS_MESSAGE))


class BrowserWs(Base):
    """The page of ``GET /browser/ws`` (see the module docstring)."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(BROWSER_WS_PAGE.encode())


class WsRefuse(tornado.web.RequestHandler):
    """A WebSocket endpoint that refuses every upgrade with 403 and a body."""

    def get(self) -> None:
        self.set_status(403)
        self.set_header("X-Refused", "yes")
        self.write("no websockets for you\n")


def make_app() -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/__hits", Hits),
            (r"/__stats", Stats),
            (r"/__reset", Reset),
            (r"/__release/([^/]+)", Release),
            (r"/download", Download),
            (r"/upload", Upload),
            (r"/drip", Drip),
            (r"/slow", Slow),
            (r"/barrier", Barrier),
            (r"/status/(\d+)", Status),
            (r"/cookies", Cookies),
            (r"/redirect", Redirect),
            (r"/gzip", Gzip),
            (r"/nocontent", NoContent),
            (r"/notmodified", NotModified),
            (r"/bare", Bare),
            (r"/hopheaders", HopHeaders),
            (r"/ws/echo", WsEcho),
            (r"/ws/refuse", WsRefuse),
            (r"/browser/ws", BrowserWs),
            (r".*", Echo),
        ],
        compress_response=False,
    )


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate chain ...")
    p.add_argument("--tls-key", help="... and this PEM key")
    args = p.parse_args()
    sockets = bind_sockets(args.port, args.host, backlog=1024)
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    server = HTTPServer(
        make_app(), max_body_size=1 << 40, idle_connection_timeout=300, ssl_options=tls
    )
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    _say(f"listening port={port}")
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
