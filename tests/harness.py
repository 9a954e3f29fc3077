"""End-to-end test harness: real processes on 127.0.0.1, readiness from their logs.

Every process (server, client, local app) is a real subprocess started with
``sys.executable``; a reader thread per pipe collects its output lines, and readiness
is detected by waiting for a log line, never by sleeping. All timeouts live in
``Timeouts`` below. Use the fixtures in ``tests/conftest.py`` (they kill every process
in teardown) rather than constructing ``Server``/``Client``/``LocalApp`` directly.

API (stable; ``tests/test_auth*.py`` imports it)::

    from harness import (
        TIMEOUTS, Proc, Server, Client, LocalApp, Response, ProcessPool,
        request, raw_request, stream_request, wait_until, rss_kib, peak_rss_kib,
        pattern_chunks, pattern_sha256, json_lines, parse_raw_response, run_cli,
        BACKSTREAM_CMD,
    )

    pool = ProcessPool()                         # conftest: ``procs`` fixture
    app = pool.local_app()                       # -> LocalApp (port, url)
    srv = pool.server("--timeout", "5", env={"BACKSTREAM_X": "1"})  # -> Server (port, url)
    srv = pool.server(port=srv.port)             # restart on a known port
    cli = pool.client(srv, app, "-H", "Authorization: Bearer t")  # waits for "connected"
    cli = pool.client(srv, app.url + "/base", wait=False)          # do not wait
    pool.add(Proc("name", [...argv...]))         # any other process, killed at close
    pool.close()                                 # kill everything (fixtures do this)

    resp = request(srv, "GET", "/path?q=1", headers=[("X-A", "1")], body=b"")
    resp.status, resp.reason, resp.headers (ordered list of pairs), resp.body
    resp.header("x-a"), resp.header_all("set-cookie"), resp.json()
    app.hits() -> int  (requests the app has seen, excluding /__*), app.stats() -> dict
    app.reset(), app.release(token)

    Proc (base of Server, Client, LocalApp):
        .pid, .lines (all output lines, "stderr"/"stdout" merged in arrival order),
        .wait_for(regex, timeout=None, start=0) -> re.Match   (raises on exit/timeout)
        .wait_for_count(regex, n, timeout=None) -> list[re.Match]
        .count(regex) -> int, .output() -> str, .mark() -> int (line index for ``start``)
        .alive(), .kill() (SIGKILL), .terminate() (SIGTERM), .wait_exit(timeout) -> rc
        .rss_kib() / .peak_rss_kib()   (VmRSS / VmHWM from /proc/PID/status)

    Server: .port, .url ("http://127.0.0.1:PORT"), .netloc ("127.0.0.1:PORT"), .args
    Client: .server, .dest, .args, .wait_connected(n=1) (n-th "connected to server" line)
    LocalApp: .port, .url, .netloc; its output has one ``hit METHOD "URI"`` line per
        request and ``closed METHOD "URI"`` when a request was dropped unfinished.

    run_cli(*args, env=None, timeout=None) -> subprocess.CompletedProcess  (one-shot CLI)

``request`` uses ``http.client`` and sends the target, method and headers exactly as
given (no ``Accept-Encoding`` added; ``Host`` added only when absent). ``raw_request``
writes raw bytes to a socket and reads until EOF (for wire-level checks; send
``Connection: close``), ``parse_raw_response`` splits the result. ``stream_request``
returns ``(conn, http.client.HTTPResponse)`` unread, for incremental reads.
Environment: every ``BACKSTREAM_*`` variable of the test runner is removed from the
children's environment; pass ``env=`` to set some.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local_app import pattern_chunks, pattern_sha256

__all__ = [
    "BACKSTREAM_CMD",
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "REPO",
    "TIMEOUTS",
    "Client",
    "LocalApp",
    "Proc",
    "ProcessPool",
    "Response",
    "Server",
    "json_lines",
    "pattern_chunks",
    "parse_raw_response",
    "pattern_sha256",
    "peak_rss_kib",
    "raw_request",
    "request",
    "rss_kib",
    "run_cli",
    "stream_request",
    "wait_until",
]

REPO = Path(__file__).resolve().parent.parent

#: Debian's Chromium, driven by Playwright with ``executable_path`` (never a download).
CHROMIUM = "/usr/bin/chromium"
#: Headless launch flags for this closed network: without the background-networking
#: ones Chromium's own connections (component updates, sync, ...) are refused and
#: page loads can stall.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
TESTS = REPO / "tests"
BACKSTREAM_CMD = [sys.executable, "-m", "backstream"]


@dataclass(frozen=True)
class Timeouts:
    """Every timeout the end-to-end tests use, in seconds (hang guards, not targets)."""

    startup: float = 20.0  # a process prints its readiness line
    connect: float = 20.0  # a client logs "connected to server"
    reconnect: float = 45.0  # a client reconnects after a server restart (backoff cap 30 s)
    request: float = 30.0  # one ordinary HTTP request through the tunnel
    big_transfer: float = 240.0  # one 200 MiB upload or download
    exit: float = 10.0  # a process exits after a signal / a one-shot CLI run
    condition: float = 15.0  # wait_until default


TIMEOUTS = Timeouts()

SERVER_READY = re.compile(r"listening url=https?://127\.0\.0\.1:(\d+)")
CLIENT_READY = re.compile(r"connected to server url=wss?://\S+")
APP_READY = re.compile(r"listening port=(\d+)")


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTREAM_")}
    base["PYTHONUNBUFFERED"] = "1"
    pp = base.get("PYTHONPATH")
    base["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    if env:
        base.update(env)
    return base


def _proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_kib(pid: int) -> int:
    """Current resident set size of ``pid`` in KiB (VmRSS)."""
    return _proc_status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size of ``pid`` in KiB (VmHWM)."""
    return _proc_status_kib(pid, "VmHWM")


class ProcessExited(AssertionError):
    pass


class Proc:
    """A subprocess whose stdout and stderr lines are collected by reader threads."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO
    ) -> None:
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self._closed_pipes = 0
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_child_env(env),
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._threads = [
            threading.Thread(
                target=self._reader, args=(self.popen.stdout, self.stdout_lines), daemon=True
            ),
            threading.Thread(
                target=self._reader, args=(self.popen.stderr, self.stderr_lines), daemon=True
            ),
        ]
        for t in self._threads:
            t.start()

    def _reader(self, pipe: Any, sink: list[str]) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                sink.append(line)
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._closed_pipes += 1
            self._cond.notify_all()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid}>"

    # -- output ---------------------------------------------------------------------
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def mark(self) -> int:
        """Index of the next line: pass as ``start`` to only match lines after now."""
        with self._cond:
            return len(self.lines)

    def count(self, pattern: str | re.Pattern[str], start: int = 0) -> int:
        rx = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines[start:] if rx.search(line))

    def wait_for_count(
        self,
        pattern: str | re.Pattern[str],
        n: int,
        timeout: float | None = None,
        start: int = 0,
    ) -> list[re.Match[str]]:
        """Wait until ``n`` lines (from index ``start``) match; return their matches."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + (TIMEOUTS.startup if timeout is None else timeout)
        with self._cond:
            while True:
                found = [m for line in self.lines[start:] if (m := rx.search(line))]
                if len(found) >= n:
                    return found[:n]
                if self._closed_pipes == 2:
                    raise ProcessExited(
                        f"{self!r} exited (rc={self.popen.poll()}) before {n} x "
                        f"{rx.pattern!r}; output:\n{self.tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self!r}: timed out waiting for {n} x {rx.pattern!r}; "
                        f"output:\n{self.tail()}"
                    )
                self._cond.wait(min(left, 0.5))

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float | None = None, start: int = 0
    ) -> re.Match[str]:
        """Wait for the first line (from index ``start``) matching ``pattern``."""
        return self.wait_for_count(pattern, 1, timeout, start)[0]

    # -- lifecycle ------------------------------------------------------------------
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        self.wait_exit()

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait_exit(self, timeout: float | None = None) -> int:
        rc = self.popen.wait(TIMEOUTS.exit if timeout is None else timeout)
        for t in self._threads:
            t.join(TIMEOUTS.exit)
        return rc

    def close(self) -> None:
        """Kill if still running (teardown), with whatever it started (its process group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.alive():
            self.signal(signal.SIGKILL)
        try:
            self.wait_exit()
        except subprocess.TimeoutExpired:
            pass
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()

    # -- memory ---------------------------------------------------------------------
    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def peak_rss_kib(self) -> int:
        return peak_rss_kib(self.pid)


class Server(Proc):
    """``python -m backstream serve -a 127.0.0.1:PORT ...``; ready at ``listening url=``."""

    def __init__(
        self,
        *args: str,
        port: int = 0,
        env: dict[str, str] | None = None,
        addr: bool = True,
        wait: bool = True,
    ) -> None:
        self.args = list(args)
        argv = [*BACKSTREAM_CMD, "serve"]
        if addr:
            argv += ["-a", f"127.0.0.1:{port}"]
        super().__init__("server", argv + self.args, env)
        self.port = port
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        m = self.wait_for(SERVER_READY, TIMEOUTS.startup)
        self.port = int(m.group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalApp(Proc):
    """``python tests/local_app.py --port 0``; ready at ``listening port=``."""

    def __init__(self, port: int = 0, wait: bool = True, args: Sequence[str] = ()) -> None:
        super().__init__(
            "local_app",
            [sys.executable, str(TESTS / "local_app.py"), "--port", str(port), *args],
        )
        self.port = port
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        self.port = int(self.wait_for(APP_READY, TIMEOUTS.startup).group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def get_json(self, path: str, method: str = "GET") -> Any:
        return request(self, method, path).json()

    def hits(self) -> int:
        """Requests the app has seen so far (paths starting with ``/__`` excluded)."""
        return int(self.get_json("/__hits")["hits"])

    def stats(self) -> dict[str, Any]:
        return dict(self.get_json("/__stats"))

    def reset(self) -> None:
        self.get_json("/__reset", "POST")

    def release(self, token: str) -> None:
        self.get_json(f"/__release/{token}", "POST")


class Client(Proc):
    """``python -m backstream client -s SERVER -d DEST ...``; ready at ``connected to server``.

    Clients run with ``--no-inspect`` (tests run in parallel: no fight over port 4040)
    unless ``args`` or ``env`` choose the inspector (``--inspect``, ``BACKSTREAM_INSPECT``).
    """

    def __init__(
        self,
        server: Server | str,
        dest: LocalApp | str,
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.server = server
        self.server_url = server.url if isinstance(server, Server) else server
        self.dest = dest.url if isinstance(dest, LocalApp) else dest
        self.args = list(args)
        argv = [*BACKSTREAM_CMD, "client", "-s", self.server_url, "-d", self.dest, *self.args]
        chosen = any(a in ("--inspect", "--no-inspect") or a.startswith("--inspect=") for a in args)
        if not chosen and "BACKSTREAM_INSPECT" not in (env or {}):
            argv.append("--no-inspect")
        super().__init__("client", argv, env)
        if wait:
            self.wait_connected()

    def wait_connected(self, n: int = 1, timeout: float | None = None) -> None:
        """Wait until the client has logged ``connected to server`` ``n`` times in all."""
        self.wait_for_count(CLIENT_READY, n, TIMEOUTS.connect if timeout is None else timeout)

    def connected_count(self) -> int:
        return self.count(CLIENT_READY)


class ProcessPool:
    """Starts processes and kills all of them in ``close()`` (used by the fixtures)."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def add(self, p: Proc) -> Proc:
        self.procs.append(p)
        return p

    def local_app(self, port: int = 0, args: Sequence[str] = ()) -> LocalApp:
        app = LocalApp(port, wait=False, args=args)
        self.procs.append(app)
        app.wait_ready()
        return app

    def server(
        self,
        *args: str,
        port: int = 0,
        env: dict[str, str] | None = None,
        addr: bool = True,
        wait: bool = True,
    ) -> Server:
        srv = Server(*args, port=port, env=env, addr=addr, wait=False)
        self.procs.append(srv)
        if wait:
            srv.wait_ready()
        return srv

    def client(
        self,
        server: Server | str,
        dest: LocalApp | str,
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Client:
        cli = Client(server, dest, *args, env=env, wait=False)
        self.procs.append(cli)
        if wait:
            cli.wait_connected()
        return cli

    def close(self) -> None:
        for p in reversed(self.procs):
            p.close()
        self.procs.clear()

    def dump(self) -> str:
        """Every process's output (for failure reports)."""
        return "\n".join(f"=== {p!r}\n{p.tail(200)}" for p in self.procs)


# -- HTTP helpers -------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def header_all(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_names(self) -> list[str]:
        return [k.lower() for k, _ in self.headers]

    def json(self) -> Any:
        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


Target = Server | LocalApp | tuple[str, int] | str


def _hostport(target: Target) -> tuple[str, int]:
    if isinstance(target, Server | LocalApp):
        return "127.0.0.1", target.port
    if isinstance(target, tuple):
        return target
    netloc = target.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = netloc.rpartition(":")
    return host, int(port)


def _send(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]],
    body: bytes | Iterable[bytes] | None,
) -> None:
    headers = list(headers)
    names = {k.lower() for k, _ in headers}
    conn.putrequest(method, path, skip_host="host" in names, skip_accept_encoding=True)
    for k, v in headers:
        conn.putheader(k, v)
    if body is None:
        conn.endheaders()
        return
    if isinstance(body, bytes | bytearray):
        if "content-length" not in names and "transfer-encoding" not in names:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(bytes(body))
        return
    chunked = "content-length" not in names
    if chunked and "transfer-encoding" not in names:
        conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for chunk in body:
        if not chunk:
            continue
        if chunked:
            conn.send(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n")
        else:
            conn.send(chunk)
    if chunked:
        conn.send(b"0\r\n\r\n")


def stream_request(
    target: Target,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | Iterable[bytes] | None = None,
    timeout: float | None = None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send a request and return the connection and the unread response (close both).

    ``body`` may be an iterable of chunks: sent with the given ``Content-Length``
    header, or chunked when there is none.
    """
    host, port = _hostport(target)
    conn = http.client.HTTPConnection(
        host, port, timeout=TIMEOUTS.request if timeout is None else timeout
    )
    try:
        _send(conn, method, path, headers, body)
        resp = conn.getresponse()
    except BaseException:
        conn.close()
        raise
    return conn, resp


def request(
    target: Target,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | Iterable[bytes] | None = None,
    timeout: float | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Response:
    """One HTTP request, exactly as given; returns the whole response.

    Pass ``conn`` (an ``http.client.HTTPConnection``) to reuse a keep-alive connection.
    """
    t0 = time.monotonic()
    if conn is not None:
        _send(conn, method, path, headers, body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.reason, resp.getheaders(), data, time.monotonic() - t0)
    c, resp = stream_request(target, method, path, headers, body, timeout)
    try:
        data = resp.read()
    finally:
        c.close()
    return Response(resp.status, resp.reason, resp.getheaders(), data, time.monotonic() - t0)


def websocket_upgrade(path: str, host: str = "x") -> bytes:
    """A raw RFC 6455 opening handshake for ``path`` (a fixed key: no test checks it)."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def open_raw_websocket(sock: socket.socket, path: str) -> None:
    """Upgrade ``sock`` to a WebSocket for ``path``, reading the head byte by byte (so no
    frame after it is consumed); fails unless it is a 101."""
    sock.sendall(websocket_upgrade(path))
    head = b""
    while b"\r\n\r\n" not in head:
        byte = sock.recv(1)
        assert byte, f"closed during the upgrade: {head!r}"
        head += byte
    assert head.startswith(b"HTTP/1.1 101"), head


def raw_request(target: Target, data: bytes, timeout: float | None = None) -> bytes:
    """Write ``data`` to a fresh TCP connection, then read until EOF (or timeout)."""
    host, port = _hostport(target)
    with socket.create_connection(
        (host, port), timeout=TIMEOUTS.request if timeout is None else timeout
    ) as s:
        s.sendall(data)
        out = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return bytes(out)
            out += chunk


def parse_raw_response(data: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """Split a raw HTTP/1.x response into status, reason, headers and the bytes after."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no end of head in {data[:500]!r}"
    lines = head.decode("latin-1").split("\r\n")
    _, code, *reason = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    return int(code), (reason[0] if reason else ""), headers, rest


@dataclass
class RawResponse:
    """The first response of a raw conversation, and what came after its body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    after: bytes  # bytes after the first response's body

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def first_response(data: bytes) -> RawResponse:
    """The first response in ``data`` (body cut at its Content-Length, if any)."""
    assert data, "no response at all (connection closed or reset without an answer)"
    status, _, headers, rest = parse_raw_response(data)
    length = next((v for k, v in headers if k.lower() == "content-length"), None)
    if length is not None and length.isdigit():
        return RawResponse(status, headers, rest[: int(length)], rest[int(length) :])
    return RawResponse(status, headers, rest, b"")


def assert_short_text(r: RawResponse, status: int, says: str = "") -> None:
    """``r`` is ``status`` with a short plain-text body (saying ``says``), no traceback."""
    assert r.status == status, (r.status, r.headers, r.body[:300])
    assert (r.header("Content-Type") or "").startswith("text/plain"), r.headers
    assert 0 < len(r.body) < 300, r.body
    assert b"Traceback" not in r.body, r.body
    assert says.lower() in r.body.decode().lower(), r.body


def wait_until(
    predicate: Callable[[], Any], timeout: float | None = None, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise on timeout."""
    deadline = time.monotonic() + (TIMEOUTS.condition if timeout is None else timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within timeout: {predicate}")
        time.sleep(interval)


def json_lines(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Parse every non-empty line as a JSON object (raises on the first bad one)."""
    for line in lines:
        if line.strip():
            obj = json.loads(line)
            assert isinstance(obj, dict), line
            yield obj


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m backstream ARGS`` to completion (for --help / bad flags)."""
    return subprocess.run(
        [*BACKSTREAM_CMD, *args],
        capture_output=True,
        text=True,
        env=_child_env(env),
        cwd=REPO,
        timeout=TIMEOUTS.exit if timeout is None else timeout,
        stdin=subprocess.DEVNULL,
    )
