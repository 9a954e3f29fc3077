"""Real third-party web apps work unchanged behind the tunnel.

Two real apps run beside a real ``backstream client``, and each test compares what a
caller gets through ``backstream serve`` with the same request sent straight to the app:

* FastAPI (Starlette) on uvicorn, ``tests/thirdparty_apps.py``: the automatic
  trailing-slash redirect (its ``Location`` is built from ``Host``), server-sent events,
  a 50 MiB streamed upload, a WebSocket with a subprotocol and a custom close code.
* Jupyter Server with an IPython kernel: a kernel created over REST, its ``channels``
  WebSocket carrying execute requests whose outputs are one message of 3 and 20 MiB,
  and headless Chromium using the page's own cookie and XSRF auth for a POST, which
  Jupyter only accepts when the ``Origin`` matches the ``Host`` it sees.

What is checked is the issue "Real web apps work unchanged": WebSocket messages up to
``--ws-max-message`` (default 64M) both ways, 1009 over it at both ends, close codes and
reasons passed through; ``client --host-header preserve|rewrite|VALUE`` (default
``preserve``, the public ``Host``), with ``Location``, ``Content-Location`` and ``Refresh``
rewritten to the public origin when the app saw the destination's host.

Jupyter's port: ``--ServerApp.port=0`` is accepted; the port is read from the
``http://127.0.0.1:PORT/`` line of its log (jupyter_server 2.19 logged port 0, fixed by
jupyter-server PR #1651; 2.21 is the lower bound). Jupyter itself binds port 0, reads
the port, closes the socket and listens again on it, a window of microseconds inside
one process; there is no option to hand it a bound socket short of patching private
methods.

Dependencies (the ``test`` extra): ``fastapi``, ``uvicorn``, ``jupyter_server``,
``ipykernel``, ``playwright`` (driving Debian's ``/usr/bin/chromium``, never a browser
download). None is skipped: a missing one fails with the install command.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    TIMEOUTS,
    Client,
    Proc,
    ProcessPool,
    Server,
    pattern_chunks,
    pattern_sha256,
    request,
    stream_request,
    wait_until,
)
from tornado import httpclient
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

TESTS = REPO / "tests"
APP_READY = r"^listening port=(\d+)$"
JUPYTER_READY = r"http://127\.0\.0\.1:(\d+)/\?token="
#: The test's own WebSocket client limit (Tornado's default is 10 MiB).
WS_CLIENT_MAX = 128 * 1024 * 1024
#: Bound on one kernel execution (its reply and all of its outputs).
EXECUTE_TIMEOUT = 90.0
MIB = 1024 * 1024
LAUNCH_ARGS = list(CHROMIUM_ARGS)
BROWSER_TIMEOUT = 30.0
INSTALL_HINT = (
    "install the test extra: `scripts/install .venv test` (or `.venv/bin/pip install "
    "fastapi uvicorn jupyter_server ipykernel playwright`); Chromium is Debian's package "
    "`chromium` (`apt-get install -y chromium`), no Playwright browser download is used"
)
FEATURE = "feature missing? (issue 'Real web apps work unchanged')"


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"missing Python package(s) {missing}; {INSTALL_HINT}", pytrace=False)


# -- processes ----------------------------------------------------------------------


@dataclass
class App:
    """A third-party app process listening on 127.0.0.1:``port``."""

    proc: Proc
    port: int

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Jupyter(App):
    token: str


@dataclass
class Tunnel:
    server: Server
    client: Client


def start_fastapi(pool: ProcessPool) -> App:
    _require("fastapi", "uvicorn")
    proc = pool.add(Proc("fastapi", [sys.executable, str(TESTS / "thirdparty_apps.py")]))
    port = int(proc.wait_for(APP_READY, TIMEOUTS.startup).group(1))
    return App(proc, port)


def start_jupyter(pool: ProcessPool, base: Path) -> Jupyter:
    _require("jupyter_server", "ipykernel")
    token = secrets.token_hex(16)
    root = base / "root"
    dirs = {name: base / name for name in ("runtime", "data", "config", "ipython")}
    for d in [root, *dirs.values()]:
        d.mkdir(parents=True, exist_ok=True)
    env = {
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "JUPYTER_DATA_DIR": str(dirs["data"]),
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "IPYTHONDIR": str(dirs["ipython"]),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    argv = [
        sys.executable,
        "-m",
        "jupyter_server",
        f"--IdentityProvider.token={token}",
        "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port=0",
        "--ServerApp.port_retries=0",
        "--no-browser",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.allow_root=True",  # CI runs as root; Jupyter refuses root without it
    ]
    proc = pool.add(Proc("jupyter", argv, env=env, cwd=base))
    port = int(proc.wait_for(JUPYTER_READY, TIMEOUTS.startup * 2).group(1))
    if port == 0:  # jupyter_server 2.19 logged port 0 and listened on another, unknown port
        pytest.fail("jupyter_server did not report its port for --port=0: " + INSTALL_HINT)
    return Jupyter(proc, port, token)


def start_tunnel(pool: ProcessPool, dest: str, *client_args: str, **kw: Any) -> Tunnel:
    srv = pool.server()
    cli = pool.client(srv, dest, *client_args, **kw)
    return Tunnel(srv, cli)


@pytest.fixture(scope="module")
def fastapi_app(module_procs: ProcessPool) -> App:
    return start_fastapi(module_procs)


@pytest.fixture(scope="module")
def fastapi_tunnel(module_procs: ProcessPool, fastapi_app: App) -> Tunnel:
    """Server + client with default flags in front of the FastAPI app."""
    return start_tunnel(module_procs, fastapi_app.url)


@pytest.fixture(scope="module")
def jupyter(
    module_procs: ProcessPool, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Jupyter]:
    jup = start_jupyter(module_procs, tmp_path_factory.mktemp("jupyter"))
    yield jup
    # SIGTERM: Jupyter shuts its kernels down (they are its children, not ours);
    # a kernel left behind anyway exits within 1 s once its parent is gone
    jup.proc.terminate()
    try:
        jup.proc.wait_exit(TIMEOUTS.exit)
    except Exception:  # killed by the pool right after
        pass


@pytest.fixture(scope="module")
def jupyter_tunnel(module_procs: ProcessPool, jupyter: Jupyter) -> Tunnel:
    """Server + client with default flags (so the default Host mode) in front of Jupyter."""
    return start_tunnel(module_procs, jupyter.url)


@pytest.fixture(scope="module")
def kernel_id(jupyter: Jupyter, jupyter_tunnel: Tunnel) -> str:
    """A python3 kernel created through the tunnel with the token (POST /api/kernels)."""
    resp = request(
        jupyter_tunnel.server,
        "POST",
        "/api/kernels",
        headers=[("Authorization", f"token {jupyter.token}"), ("Content-Type", "application/json")],
        body=json.dumps({"name": "python3"}).encode(),
        timeout=TIMEOUTS.request * 2,
    )
    assert resp.status == 201, (resp.status, resp.text()[:500])
    return str(resp.json()["id"])


# -- helpers ------------------------------------------------------------------------


def _target(url: str) -> tuple[tuple[str, int], str]:
    """``(host, port)`` and path+query of an absolute http URL (to follow a redirect)."""
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname and parts.port, url
    return (parts.hostname, parts.port), (parts.path or "/") + (
        f"?{parts.query}" if parts.query else ""
    )


async def _ws_open(
    port: int,
    path: str,
    subprotocols: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> WebSocketClientConnection:
    req = httpclient.HTTPRequest(
        f"ws://127.0.0.1:{port}{path}",
        headers=headers or {},
        connect_timeout=TIMEOUTS.connect,
        request_timeout=TIMEOUTS.connect,
    )
    return await websocket_connect(req, subprotocols=subprotocols, max_message_size=WS_CLIENT_MAX)


async def _ws_read(conn: WebSocketClientConnection, timeout: float = TIMEOUTS.request) -> Any:
    return await asyncio.wait_for(conn.read_message(), timeout)


def _closes(app: App) -> dict[str, list[Any]]:
    return dict(request(app.addr, "GET", "/ws/closes").json())


def _read_sse(target: Any, path: str) -> tuple[list[float], list[bytes], str | None]:
    """Each event's arrival time (s after the request) and bytes, and the content type."""
    conn, resp = stream_request(target, "GET", path, headers=[("Accept", "text/event-stream")])
    t0 = time.monotonic()
    times: list[float] = []
    events: list[bytes] = []
    buf = b""
    try:
        assert resp.status == 200, resp.status
        while True:
            chunk = resp.read1(65536)  # returns what has arrived (bounded by the socket timeout)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                times.append(time.monotonic() - t0)
                events.append(event)
        assert not buf.strip(), buf
        return times, events, resp.getheader("Content-Type")
    finally:
        conn.close()


# == 1. FastAPI on uvicorn ============================================================


def test_fastapi_slash_redirect_is_public_by_default(
    fastapi_app: App, fastapi_tunnel: Tunnel
) -> None:
    """1a: Starlette's 307 for ``/items/`` names the server's origin, and following it works."""
    direct = request(fastapi_app.addr, "GET", "/items/")
    assert direct.status == 307, direct.status
    assert direct.header("Location") == f"{fastapi_app.url}/items"  # built from Host
    expected = request(fastapi_app.addr, "GET", "/items")
    assert expected.status == 200

    srv = fastapi_tunnel.server
    tunneled = request(srv, "GET", "/items/")
    assert tunneled.status == 307, tunneled.status
    location = tunneled.header("Location")
    assert location == f"{srv.url}/items", (
        f"Location {location!r} is not the public origin {srv.url}: the app saw the "
        f"destination's Host, not the caller's (default --host-header preserve); {FEATURE}"
    )
    target, path = _target(location)
    followed = request(target, "GET", path)
    assert (followed.status, followed.body) == (200, expected.body)


def test_fastapi_slash_redirect_is_rewritten_with_host_rewrite(
    procs: ProcessPool, fastapi_app: App
) -> None:
    """1a: with ``--host-header rewrite`` the app builds its own origin; the tunnel rewrites it."""
    tunnel = start_tunnel(procs, fastapi_app.url, "--host-header", "rewrite")
    srv = tunnel.server
    seen = dict((k.lower(), v) for k, v in request(srv, "GET", "/headers").json())
    assert seen["host"] == fastapi_app.netloc, seen  # the app did see its own host:port

    tunneled = request(srv, "GET", "/items/")
    assert tunneled.status == 307, tunneled.status
    location = tunneled.header("Location")
    assert location == f"{srv.url}/items", (
        f"Location {location!r} was not rewritten to the public origin {srv.url}; {FEATURE}"
    )
    target, path = _target(location)
    followed = request(target, "GET", path)
    assert followed.status == 200
    assert followed.body == request(fastapi_app.addr, "GET", "/items").body


def test_fastapi_host_header_modes(procs: ProcessPool, fastapi_app: App) -> None:
    """The Host the app sees in each mode, and the X-Forwarded-* it always gets."""
    literal = "app.internal:8000"
    modes: dict[str, tuple[tuple[str, ...], dict[str, str] | None]] = {
        "default": ((), None),
        "preserve": (("--host-header", "preserve"), None),
        "--preserve-host": (("--preserve-host",), None),
        "rewrite": (("--host-header", "rewrite"), None),
        "literal": (("--host-header", literal), None),
        "env rewrite": ((), {"BACKSTREAM_HOST_HEADER": "rewrite"}),
    }
    # start every pair at once (2 cores: the processes start in parallel)
    servers = {mode: procs.server(wait=False) for mode in modes}
    for srv in servers.values():
        srv.wait_ready()
    clients = {
        mode: procs.client(servers[mode], fastapi_app.url, *args, env=env, wait=False)
        for mode, (args, env) in modes.items()
    }
    for mode, cli in clients.items():
        try:
            cli.wait_connected()
        except AssertionError as e:
            raise AssertionError(f"client for mode {mode!r} did not connect ({FEATURE})") from e

    public = {mode: srv.netloc for mode, srv in servers.items()}
    expected_host = {
        "default": public["default"],
        "preserve": public["preserve"],
        "--preserve-host": public["--preserve-host"],
        "rewrite": fastapi_app.netloc,
        "literal": literal,
        "env rewrite": fastapi_app.netloc,
    }
    seen_hosts = {}
    for mode, srv in servers.items():
        pairs = [(k.lower(), v) for k, v in request(srv, "GET", "/headers").json()]
        hosts = [v for k, v in pairs if k == "host"]
        assert len(hosts) == 1, (mode, pairs)
        seen_hosts[mode] = hosts[0]
        headers = dict(pairs)
        assert headers.get("x-forwarded-host") == srv.netloc, (mode, pairs)
        assert headers.get("x-forwarded-proto") == "http", (mode, pairs)
        assert headers.get("x-forwarded-for") == "127.0.0.1", (mode, pairs)
    assert seen_hosts == expected_host, FEATURE


def test_fastapi_location_headers_rewritten_only_for_the_destination(
    procs: ProcessPool, fastapi_app: App
) -> None:
    """Location, Content-Location and Refresh naming the destination's origin are rewritten."""
    tunnel = start_tunnel(procs, fastapi_app.url, "--host-header", "rewrite")
    srv = tunnel.server
    app_origin, public = fastapi_app.url, srv.url
    # Starlette's slash redirect keeps the query: only the origin is replaced
    direct = request(fastapi_app.addr, "GET", "/items/?a=1&b=%2F")
    assert direct.header("Location") == f"{app_origin}/items?a=1&b=%2F"
    tunneled = request(srv, "GET", "/items/?a=1&b=%2F")
    assert tunneled.header("Location") == f"{public}/items?a=1&b=%2F", FEATURE
    links = request(srv, "GET", "/links")
    assert links.status == 201, (links.status, links.text()[:300])
    assert links.header("Location") == f"{public}/items", (links.headers, FEATURE)
    assert links.header("Content-Location") == f"{public}/items?x=1", (links.headers, FEATURE)
    assert links.header("Refresh") == f"3; url={public}/items", (links.headers, FEATURE)
    # a URL on another origin is left as the app sent it
    other = request(srv, "GET", "/offsite")
    assert other.status == 302
    assert other.header("Location") == "http://other.test:81/x"
    assert request(fastapi_app.addr, "GET", "/links").header("Location") == f"{app_origin}/items"


def test_fastapi_https_and_refused_upgrade_redirects_are_rewritten(
    procs: ProcessPool, fastapi_app: App
) -> None:
    """With ``rewrite``, redirects naming the destination under https, or in the answer to a
    refused WebSocket upgrade, are rewritten to the public origin too.

    uvicorn trusts ``X-Forwarded-Proto`` from 127.0.0.1, so behind a TLS proxy (here a
    caller the server trusts with ``--trust-forwarded``) the app builds
    ``https://127.0.0.1:PORT/...``.
    """
    srv = procs.server("--trust-forwarded", "127.0.0.1")
    procs.client(srv, fastapi_app.url, "--host-header", "rewrite")
    proxy = [("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "pub.example")]
    upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    cases = {"https": ("/items/", proxy), "refused": ("/ws/moved", upgrade)}
    for name, (path, headers) in cases.items():
        direct = request(fastapi_app.addr, "GET", path, headers=headers)
        scheme = "https" if name == "https" else "http"
        assert direct.status == 307, (name, direct.status, direct.text()[:300])
        assert direct.header("Location") == f"{scheme}://{fastapi_app.netloc}/items", name
        public = "https://pub.example" if name == "https" else srv.url
        tunneled = request(srv, "GET", path, headers=headers)
        assert tunneled.status == 307, (name, tunneled.status, tunneled.text()[:300])
        assert tunneled.header("Location") == f"{public}/items", (name, tunneled.headers)
        names = [k.lower() for k, _ in tunneled.headers]
        assert len(names) == len(set(names)), (name, tunneled.headers)  # none doubled


def test_fastapi_sse_arrives_incrementally(fastapi_app: App, fastapi_tunnel: Tunnel) -> None:
    """1b: 5 events 0.3 s apart arrive one by one through the tunnel, as directly."""
    path = "/sse?n=5&interval=0.3"
    d_times, d_events, d_type = _read_sse(fastapi_app.addr, path)
    t_times, t_events, t_type = _read_sse(fastapi_tunnel.server, path)
    assert d_events == [f'id: {i}\ndata: {{"i": {i}}}'.encode() for i in range(5)]
    assert t_events == d_events
    assert t_type == d_type and t_type is not None and t_type.startswith("text/event-stream")
    # the app sends event i at 0.3*i s; a buffering hop would deliver them all at the end.
    # The first event must be in hand at least 2 intervals before the last one arrives,
    # i.e. before the 3rd event was even sent.
    assert d_times[-1] - d_times[0] >= 0.6, d_times
    assert t_times[-1] - t_times[0] >= 0.6, f"events not incremental: arrivals {t_times}"


def test_fastapi_50mib_streamed_upload(fastapi_app: App, fastapi_tunnel: Tunnel) -> None:
    """1c: a 50 MiB upload, streamed in 64 KiB chunks, reaches the app byte for byte."""
    size = 50 * MIB
    expected = {"len": size, "sha256": pattern_sha256(size)}
    results = {}
    for name, target in (("direct", fastapi_app.addr), ("tunnel", fastapi_tunnel.server)):
        resp = request(
            target,
            "POST",
            "/upload",
            headers=[("Content-Type", "application/octet-stream"), ("Content-Length", str(size))],
            body=pattern_chunks(size),
            timeout=TIMEOUTS.big_transfer,
        )
        assert resp.status == 200, (name, resp.status, resp.text()[:300])
        results[name] = resp.json()
    assert results["direct"] == expected
    assert results["tunnel"] == expected


def test_fastapi_websocket_subprotocol_echo_and_close_codes(
    fastapi_app: App, fastapi_tunnel: Tunnel
) -> None:
    """1d: subprotocol ``chat``, echo, the app's 4321 "bye", and the caller's close code,
    or its close without a code (uvicorn: 1005). An ASGI app cannot close without a code
    (``websocket.close`` has 1000 by default): that direction is in ``test_e2e_websocket.py``."""
    run = secrets.token_hex(4)

    async def session(port: int, tag: str) -> tuple[Any, ...]:
        conn = await _ws_open(port, f"/ws?tag={tag}", subprotocols=["chat"])
        chosen = conn.selected_subprotocol
        await conn.write_message("héllo ✓")
        text = await _ws_read(conn)
        await conn.write_message(bytes(range(256)), binary=True)
        data = await _ws_read(conn)
        await conn.write_message("close")
        end = await _ws_read(conn)
        return chosen, text, data, end, conn.close_code, conn.close_reason

    async def caller_closes(port: int, tag: str, *close: Any) -> None:
        conn = await _ws_open(port, f"/ws?tag={tag}", subprotocols=["chat"])
        await conn.write_message("ping")
        assert await _ws_read(conn) == "ping"
        conn.close(*close)
        assert await _ws_read(conn) is None  # the close handshake completes

    want = ("chat", "héllo ✓", bytes(range(256)), None, 4321, "bye")
    direct = asyncio.run(session(fastapi_app.port, f"d-{run}"))
    assert direct == want
    tunneled = asyncio.run(session(fastapi_tunnel.server.port, f"t-{run}"))
    assert tunneled[:4] == want[:4]
    assert tunneled[4:] == (4321, "bye"), f"close code/reason {tunneled[4:]}; {FEATURE}"

    for tag, close in (("c", (4002, "see you")), ("n", ())):  # "n": no code
        asyncio.run(caller_closes(fastapi_app.port, f"d{tag}-{run}", *close))
        asyncio.run(caller_closes(fastapi_tunnel.server.port, f"t{tag}-{run}", *close))
    tags = [f"{side}{tag}-{run}" for side in "dt" for tag in "cn"]
    closes = wait_until(
        lambda: (c := _closes(fastapi_app)) and all(t in c for t in tags) and c, TIMEOUTS.request
    )
    assert closes[f"dc-{run}"] == [4002, "see you", "peer"]
    assert closes[f"tc-{run}"] == [4002, "see you", "peer"], FEATURE
    assert closes[f"dn-{run}"] == [1005, "", "peer"]  # a close frame without a code
    assert closes[f"tn-{run}"] == closes[f"dn-{run}"], f"no code became {closes[f'tn-{run}']}"


def test_fastapi_websocket_big_messages_both_ways(fastapi_app: App, fastapi_tunnel: Tunnel) -> None:
    """Messages of 5 MiB (caller -> app -> caller) and 20 MiB (app -> caller) pass whole."""
    text = "t" * (5 * MIB)
    binary = bytes(range(256)) * (5 * MIB // 256)

    async def talk(port: int) -> tuple[bool, bool, int]:
        conn = await _ws_open(port, "/ws?tag=big")
        await conn.write_message(text)
        t_ok = await _ws_read(conn, EXECUTE_TIMEOUT) == text
        await conn.write_message(binary, binary=True)
        b_ok = await _ws_read(conn, EXECUTE_TIMEOUT) == binary
        await conn.write_message(f"big:{20 * MIB}")
        big = await _ws_read(conn, EXECUTE_TIMEOUT)
        info = f"closed {conn.close_code} {conn.close_reason!r}"
        assert big is not None, f"WebSocket {info} instead of a 20 MiB message; {FEATURE}"
        conn.close()
        return t_ok, b_ok, len(big) if big == "y" * len(big) else -1

    assert asyncio.run(talk(fastapi_app.port)) == (True, True, 20 * MIB)
    assert asyncio.run(talk(fastapi_tunnel.server.port)) == (True, True, 20 * MIB), FEATURE


def test_websocket_over_the_limit_closes_1009_at_both_ends(
    procs: ProcessPool, fastapi_app: App
) -> None:
    """``--ws-max-message 3M`` (server flag, client env): 2 MiB passes, 4 MiB gets 1009."""
    srv = procs.server("--ws-max-message", "3M")
    procs.client(srv, fastapi_app.url, env={"BACKSTREAM_WS_MAX_MESSAGE": "3M"})
    run = secrets.token_hex(4)

    async def under_the_limit() -> bool:
        conn = await _ws_open(srv.port, f"/ws?tag=ok-{run}")
        await conn.write_message("u" * (2 * MIB))
        ok = await _ws_read(conn) == "u" * (2 * MIB)
        await conn.write_message(f"big:{2 * MIB}")
        ok = ok and await _ws_read(conn) == "y" * (2 * MIB)
        conn.close(1000, "done")
        return ok

    async def over(tag: str, upstream: bool) -> tuple[Any, int | None, str | None]:
        conn = await _ws_open(srv.port, f"/ws?tag={tag}")
        try:
            if upstream:  # caller -> app
                await conn.write_message("o" * (4 * MIB))
            else:  # app -> caller
                await conn.write_message(f"big:{4 * MIB}")
        except WebSocketClosedError:
            pass  # the server may close while the oversized message is still being sent
        got = await _ws_read(conn)
        return got, conn.close_code, conn.close_reason

    assert asyncio.run(under_the_limit()), f"a 2 MiB message did not pass under 3M; {FEATURE}"
    for tag, upstream in ((f"up-{run}", True), (f"down-{run}", False)):
        got, code, reason = asyncio.run(over(tag, upstream))
        assert got is None, f"{tag}: a 4 MiB message went through a 3M limit"
        assert code == 1009 and reason, (tag, code, reason)
    closes = wait_until(
        lambda: (c := _closes(fastapi_app)) and f"up-{run}" in c and f"down-{run}" in c and c,
        TIMEOUTS.request,
    )
    assert closes[f"up-{run}"][:1] == [1009], closes[f"up-{run}"]
    assert closes[f"down-{run}"][:1] == [1009], closes[f"down-{run}"]
    assert closes[f"up-{run}"][1] and closes[f"down-{run}"][1]  # with a reason


def test_app_message_over_the_server_limit_closes_1009_at_both_ends(
    procs: ProcessPool, fastapi_app: App
) -> None:
    """The app's 4 MiB message passes the client's limit (64M) but not the server's (3M).

    The server's message tracker refuses it fragment by fragment: the caller gets
    1009 and the reason, and the same close is relayed back to the app.
    """
    srv = procs.server("--ws-max-message", "3M")
    procs.client(srv, fastapi_app.url)
    tag = "server-limit-" + secrets.token_hex(4)

    async def go() -> tuple[Any, int | None, str | None]:
        conn = await _ws_open(srv.port, f"/ws?tag={tag}")
        await conn.write_message(f"big:{4 * MIB}")
        got = await _ws_read(conn)
        return got, conn.close_code, conn.close_reason

    reason = f"message too big (limit {3 * MIB} bytes)"
    assert asyncio.run(go()) == (None, 1009, reason)
    closes = wait_until(lambda: (c := _closes(fastapi_app)) and tag in c and c, TIMEOUTS.request)
    assert closes[tag] == [1009, reason, "peer"]


# == 2. Jupyter Server with an IPython kernel ======================================


def _execute_request(code: str, session: str) -> tuple[str, str]:
    msg_id = uuid.uuid4().hex
    msg = {
        "header": {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "session": session,
            "username": "backstream-test",
            "version": "5.3",
            "date": datetime.datetime.now(datetime.UTC).isoformat(),
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }
    return msg_id, json.dumps(msg)


@dataclass
class Execution:
    reply: dict[str, Any]
    outputs: list[tuple[str, dict[str, Any]]]  # (msg_type, content) on iopub
    largest_frame: int  # bytes of the largest WebSocket message received


def execute(port: int, jup: Jupyter, kernel: str, code: str) -> Execution:
    """Run ``code`` over ``/api/kernels/ID/channels`` (JSON protocol, token header)."""

    async def run() -> Execution:
        session = uuid.uuid4().hex
        conn = await _ws_open(
            port,
            f"/api/kernels/{kernel}/channels?session_id={session}",
            headers={"Authorization": f"token {jup.token}"},
        )
        try:
            msg_id, raw = _execute_request(code, session)
            await conn.write_message(raw)
            deadline = time.monotonic() + EXECUTE_TIMEOUT
            reply: dict[str, Any] | None = None
            idle = False
            outputs: list[tuple[str, dict[str, Any]]] = []
            largest = 0
            while reply is None or not idle:
                frame = await _ws_read(conn, max(0.1, deadline - time.monotonic()))
                if frame is None:
                    raise AssertionError(
                        f"channels WebSocket closed ({conn.close_code}, {conn.close_reason!r}) "
                        f"before the execution finished; outputs so far "
                        f"{[t for t, _ in outputs]}"
                    )
                largest = max(largest, len(frame))
                msg = json.loads(frame)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["msg_type"]
                if msg["channel"] == "shell" and kind == "execute_reply":
                    reply = msg["content"]
                elif msg["channel"] == "iopub":
                    if kind == "status" and msg["content"]["execution_state"] == "idle":
                        idle = True
                    elif kind in {"stream", "display_data", "execute_result", "error"}:
                        outputs.append((kind, msg["content"]))
            return Execution(reply, outputs, largest)
        finally:
            conn.close()

    return asyncio.run(run())


def _compare_execution(
    jupyter: Jupyter, jupyter_tunnel: Tunnel, kernel_id: str, code: str
) -> tuple[Execution, Execution]:
    direct = execute(jupyter.port, jupyter, kernel_id, code)
    assert direct.reply["status"] == "ok", direct.reply
    try:
        tunneled = execute(jupyter_tunnel.server.port, jupyter, kernel_id, code)
    except AssertionError as e:
        raise AssertionError(f"through the tunnel: {e}; {FEATURE}") from e
    assert tunneled.reply["status"] == "ok", tunneled.reply
    return direct, tunneled


def test_jupyter_kernel_print(jupyter: Jupyter, jupyter_tunnel: Tunnel, kernel_id: str) -> None:
    """2(i): a kernel created through the tunnel runs ``print("ok")``: one stream message."""
    direct, tunneled = _compare_execution(jupyter, jupyter_tunnel, kernel_id, 'print("ok")')
    assert direct.outputs == [("stream", {"name": "stdout", "text": "ok\n"})]
    assert tunneled.outputs == direct.outputs


@pytest.mark.parametrize("mib", [3, 20])
def test_jupyter_big_display_output_in_one_message(
    jupyter: Jupyter, jupyter_tunnel: Tunnel, kernel_id: str, mib: int
) -> None:
    """2(ii), 2(iii): one display_data of 3 / 20 MiB arrives whole, exactly as directly."""
    size = mib * MIB
    code = (
        f'from IPython.display import display\ndisplay({{"text/plain": "x" * {size}}}, raw=True)\n'
    )
    direct, tunneled = _compare_execution(jupyter, jupyter_tunnel, kernel_id, code)
    assert [t for t, _ in direct.outputs] == ["display_data"], direct.outputs[:1]
    assert direct.outputs[0][1]["data"]["text/plain"] == "x" * size
    assert direct.largest_frame >= size
    assert tunneled.largest_frame >= size  # one WebSocket message, not split
    assert tunneled.outputs == direct.outputs


# == 3. A browser on Jupyter through the tunnel ======================================

#: Runs in the page: POST /api/kernels with the page's cookies and the _xsrf cookie as
#: X-XSRFToken (what Jupyter's own frontends do), then the kernel's ``channels``
#: WebSocket from the page (cookie auth; Jupyter refuses it with 403 when Origin != Host)
#: runs ``print(6 * 7)``, then DELETE the kernel the same way. Jupyter answers the POST
#: with 404 when Origin != Host.
BROWSER_JS = """
async () => {
  const m = document.cookie.match(/(?:^|; )_xsrf=([^;]*)/);
  const xsrf = m ? decodeURIComponent(m[1]) : null;
  const headers = {'Content-Type': 'application/json'};
  if (xsrf) headers['X-XSRFToken'] = xsrf;
  const r = await fetch('/api/kernels', {
    method: 'POST', headers, credentials: 'same-origin', body: JSON.stringify({name: 'python3'})
  });
  const body = await r.text();
  const execute = (kernel) => new Promise((resolve) => {
    const hex = () => Math.random().toString(16).slice(2);
    const session = hex(), msgId = hex();
    const out = {opened: false, output: '', reply: null, idle: false, closed: null};
    const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') +
      location.host + '/api/kernels/' + kernel + '/channels?session_id=' + session);
    const timer = setTimeout(() => ws.close(4000, 'timeout'), 60000);
    ws.onopen = () => {
      out.opened = true;
      ws.send(JSON.stringify({
        header: {msg_id: msgId, msg_type: 'execute_request', session, username: 'browser',
                 version: '5.3', date: new Date().toISOString()},
        parent_header: {}, metadata: {}, channel: 'shell', buffers: [],
        content: {code: 'print(6 * 7)', silent: false, store_history: false,
                  user_expressions: {}, allow_stdin: false, stop_on_error: true}}));
    };
    ws.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      if ((msg.parent_header || {}).msg_id !== msgId) return;
      const kind = msg.channel + ' ' + msg.msg_type;
      if (kind === 'shell execute_reply') out.reply = msg.content.status;
      if (kind === 'iopub stream') out.output += msg.content.text;
      if (kind === 'iopub status' && msg.content.execution_state === 'idle') out.idle = true;
      if (out.reply !== null && out.idle) ws.close(1000, 'done');
    };
    ws.onclose = (event) => {  // after the server's answer to our close, or a refusal
      clearTimeout(timer);
      out.closed = [event.code, event.reason];
      resolve(out);
    };
  });
  let ws = null, deleted = null;
  if (r.status === 201) {
    const kernel = JSON.parse(body).id;
    ws = await execute(kernel);
    const d = await fetch('/api/kernels/' + kernel, {
      method: 'DELETE', headers, credentials: 'same-origin'
    });
    deleted = d.status;
  }
  return {xsrf: xsrf !== null, status: r.status, body: body.slice(0, 300), ws, deleted,
          origin: location.origin};
}
"""


def _sync_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"Playwright for Python is not installed ({e}); {INSTALL_HINT}", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing; {INSTALL_HINT}", pytrace=False)
    return sync_playwright


def test_jupyter_browser_post_with_cookie_and_xsrf(
    jupyter: Jupyter, jupyter_tunnel: Tunnel
) -> None:
    """3: Chromium on ``/?token=T``, then a same-origin POST (201), the kernel's
    ``channels`` WebSocket running code, and a DELETE (204): through the tunnel exactly
    as directly, each in a fresh browser context (its own cookies)."""
    sync_playwright = _sync_playwright()
    srv = jupyter_tunnel.server
    console: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            for name, origin in (("direct", jupyter.url), ("tunnel", srv.url)):
                context = browser.new_context()
                page = context.new_page()
                page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
                page.set_default_timeout(BROWSER_TIMEOUT * 1000)
                response = page.goto(f"{origin}/?token={jupyter.token}", wait_until="load")
                assert response is not None and response.status == 200, (name, response)
                results[name] = page.evaluate(BROWSER_JS)
                assert results[name].pop("origin") == origin, (name, results[name])
                results[name].pop("body")  # names the kernel, a new one each time
                context.close()
        finally:
            browser.close()
    direct, tunneled = results["direct"], results["tunnel"]
    assert direct == {
        "xsrf": True,
        "status": 201,
        "ws": {
            "opened": True,
            "output": "42\n",
            "reply": "ok",
            "idle": True,
            "closed": [1000, ""],  # Tornado answers a close with its code, not its reason
        },
        "deleted": 204,
    }, (direct, console)
    blocked = jupyter.proc.count(r"Blocking Cross Origin")
    assert tunneled == direct, (
        f"through the tunnel the page got {tunneled}, directly {direct}; Jupyter logged "
        f"{blocked} 'Blocking Cross Origin' line(s): it saw a Host other than the page's "
        f"origin {srv.url} (default --host-header preserve); {FEATURE}; console {console}"
    )


def test_jupyter_rewritten_host_fails_the_origin_check(
    procs: ProcessPool, jupyter: Jupyter
) -> None:
    """Control for 3: with ``--host-header rewrite`` the same cookie+XSRF POST is refused.

    This is why ``preserve`` is the default: Jupyter compares ``Origin`` with ``Host``.
    (Plain HTTP with the headers a browser sends, to keep the test short.)
    """
    tunnel = start_tunnel(procs, jupyter.url, "--host-header", "rewrite")
    srv = tunnel.server
    page = request(srv, "GET", f"/?token={jupyter.token}")
    assert page.status == 200, page.status
    cookies = [c.split(";", 1)[0] for c in page.header_all("Set-Cookie")]
    xsrf = next(c.split("=", 1)[1] for c in cookies if c.startswith("_xsrf="))
    headers = [
        ("Origin", srv.url),
        ("Cookie", "; ".join(cookies)),
        ("X-XSRFToken", xsrf),
        ("Content-Type", "application/json"),
    ]
    mark = jupyter.proc.mark()
    refused = request(srv, "POST", "/api/kernels", headers=headers, body=b'{"name":"python3"}')
    assert refused.status == 404, (refused.status, refused.text()[:300])
    jupyter.proc.wait_for(r"Blocking Cross Origin API request", TIMEOUTS.request, start=mark)
