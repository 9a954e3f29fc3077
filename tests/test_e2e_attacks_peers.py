"""Issue 13, hostile peers: a tunnel client or server that lies must not hurt the other side.

The misbehaving peers are hand-rolled (``tests/hostile_peer.py``); the origins that
record or mangle bytes are tiny thread-per-connection TCP servers defined here.
Everything listens on 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable

import pytest
from harness import (
    SERVER_READY,
    TIMEOUTS,
    Proc,
    ProcessPool,
    Server,
    parse_raw_response,
    request,
    wait_until,
    websocket_upgrade,
)
from hostile_peer import HostileClient, HostileServer, WsConnection, request_frame

from backstream import protocol
from backstream.protocol import Data, RequestHead, ResponseHead, Window

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
KiB = 1024


# -- helpers ----------------------------------------------------------------------------


class RssSampler:
    """The largest VmRSS of a process, sampled every 100 ms in a thread (bounded)."""

    def __init__(self, proc: Proc, interval: float = 0.1, max_samples: int = 1200) -> None:
        self.proc = proc
        self.interval = interval
        self.max_samples = max_samples
        self.baseline = proc.rss_kib()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(self.max_samples):
            try:
                self.peak = max(self.peak, self.proc.rss_kib())
            except (OSError, KeyError):
                return  # the process is gone
            if self._stop.wait(self.interval):
                return

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 1024

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
        try:
            self.peak = max(self.peak, self.proc.rss_kib())
        except (OSError, KeyError):
            pass


class Uploader:
    """``POST /up`` with a large Content-Length, in chunks, from a thread; tolerates a cut."""

    def __init__(
        self, port: int, size: int = 128 * MiB, chunk: int = 256 * KiB, lifetime: float = 40.0
    ) -> None:
        self.port = port
        self.size = size
        self.chunk = chunk
        self.lifetime = lifetime
        self.sent = 0
        self.cut: str | None = None  # why sending or reading stopped early
        self.response = b""
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.lifetime
        try:
            sock = self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.sendall(
                b"POST /up HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n"
                b"Content-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % self.size
            )
            piece = b"u" * self.chunk
            for _ in range(self.size // self.chunk):
                if self._stop.is_set() or time.monotonic() > deadline:
                    self.cut = "stopped"
                    break
                sock.sendall(piece)
                self.sent += len(piece)
        except OSError as e:
            self.cut = f"send: {e!r}"
        self._read_response(deadline)

    def _read_response(self, deadline: float) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            for _ in range(10_000):
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return
                sock.settimeout(min(left, 0.5))
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                self.response += data
        except OSError as e:
            self.cut = (self.cut or "") + f" recv: {e!r}"

    @property
    def status(self) -> int | None:
        m = re.match(rb"HTTP/1\.[01] (\d{3})", self.response)
        return int(m.group(1)) if m else None

    def ended(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def __enter__(self) -> Uploader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10.0)
        if sock is not None:
            sock.close()


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``, read until EOF; at the deadline return what came (never raises)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            for _ in range(100_000):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
    except OSError:
        pass
    return bytes(out)


class RawOrigin:
    """A tiny origin: one thread per connection, records every byte each one sent.

    ``respond(path)`` returns ``(delay_seconds, raw_response_bytes)``; each connection
    serves one request and closes. ``connections`` holds the raw bytes per connection.
    """

    def __init__(
        self,
        respond: Callable[[str], tuple[float, bytes]] | None = None,
        max_connections: int = 64,
        lifetime: float = 120.0,
    ) -> None:
        self.respond = respond or (lambda path: (0.0, ok_response()))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_connections = max_connections
        self.lifetime = lifetime
        self.connections: list[bytearray] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + self.lifetime
        while not self._stop.is_set() and len(self._threads) < self.max_connections:
            if time.monotonic() > deadline:
                return
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record = bytearray()
            with self._lock:
                self.connections.append(record)
                self._socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock, record), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, record: bytearray) -> None:
        deadline = time.monotonic() + 10.0
        try:
            while b"\r\n\r\n" not in record and len(record) < 1 * MiB:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    return
                with self._lock:
                    record += chunk
            line = bytes(record).split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            path = parts[1] if len(parts) > 1 else ""
            with self._lock:
                self.paths.append(path)
            delay, answer = self.respond(path)
            if delay and self._stop.wait(delay):
                return
            sock.settimeout(10.0)
            sock.sendall(answer)
            # Whatever else the peer writes is recorded too (an injected second request).
            sock.settimeout(0.3)
            for _ in range(16):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                with self._lock:
                    record += chunk
        except OSError:
            pass
        finally:
            sock.close()

    def received(self) -> bytes:
        with self._lock:
            return b"".join(bytes(r) for r in self.connections)

    def connection_count(self) -> int:
        with self._lock:
            return len(self.connections)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._accept.join(5.0)
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5.0)

    def __enter__(self) -> RawOrigin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ok_response(body: bytes = b"ok") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (len(body), body)
    )


def connect_hostile(srv: Server, rcvbuf: int | None = None) -> HostileClient:
    """A hostile tunnel client, connected and registered by the server."""
    mark = srv.mark()
    hostile = HostileClient.connect(srv.port, rcvbuf=rcvbuf)
    srv.wait_for(r"client connected tunnel=\d+", timeout=TIMEOUTS.connect, start=mark)
    return hostile


def drop_hostile(srv: Server, hostile: WsConnection, mark: int) -> None:
    """Close the hostile tunnel and wait until the server has let go of it."""
    hostile.close()
    srv.wait_for(r"client disconnected tunnel=\d+", timeout=TIMEOUTS.request, start=mark)


def assert_serves_normal_client(procs: ProcessPool, srv: Server) -> None:
    """The server is alive and relays for a well-behaved client (no other tunnel left)."""
    assert srv.alive(), srv.tail()
    app = procs.local_app()
    procs.client(srv, app)
    r = request(srv, "GET", "/after-attack")
    assert r.status == 200, (r.status, r.body[:300])


def wait_quietly(proc: Proc, pattern: str, timeout: float, start: int = 0) -> bool:
    try:
        proc.wait_for(pattern, timeout=timeout, start=start)
    except AssertionError:
        return False
    return True


# -- A. credit cap and bounded send queue ---------------------------------------------------


def test_window_grant_beyond_the_cap_closes_tunnel_memory_bounded(procs: ProcessPool) -> None:
    """#13 item 4: a client granting 2 GiB of credit and then never reading is a protocol
    error (credit above INITIAL_WINDOW), its tunnel closes, the upload ends, and the
    server's memory stays bounded (< 40 MiB growth) throughout."""
    srv = procs.server("--timeout", "30")
    mark = srv.mark()
    hostile = connect_hostile(srv, rcvbuf=64 * KiB)
    problems = []
    with RssSampler(srv) as rss, Uploader(srv.port) as up:
        head = hostile.wait_request(TIMEOUTS.request)
        assert (head.method, head.target, head.body_length) == ("POST", "/up", 128 * MiB)
        # One grant that the old SendWindow accepted (it only capped at 2**31-1): total
        # credit ~2 GiB. From here on the hostile client never reads its socket.
        hostile.send_message(Window(head.stream_id, 2**31 - 1 - protocol.INITIAL_WINDOW).encode())
        if not wait_quietly(srv, r"protocol error, closing tunnel", 8.0, start=mark):
            problems.append("no 'protocol error, closing tunnel' for credit above the window")
        up.join(8.0)
        if not up.ended():
            problems.append(f"upload still running after the grant (sent {up.sent >> 20} MiB)")
        elif up.status not in (502, None):  # None: the connection was cut
            problems.append(f"upload answered {up.status}, expected 502 or a cut")
    if rss.growth_mib >= 40:
        problems.append(f"server RSS grew {rss.growth_mib:.1f} MiB (limit 40)")
    assert not problems, problems
    drop_hostile(srv, hostile, mark)
    assert_serves_normal_client(procs, srv)


def test_slow_reader_within_the_cap_memory_bounded(procs: ProcessPool) -> None:
    """#13 item 4: a client that grants 256 KiB every 20 ms (never above the cap) but
    never reads its socket cannot make the server queue without bound: RSS grows
    < 40 MiB; closing the tunnel or stalling are both fine; the server stays alive."""
    srv = procs.server("--timeout", "30")
    mark = srv.mark()
    hostile = connect_hostile(srv, rcvbuf=64 * KiB)
    with RssSampler(srv) as rss, Uploader(srv.port) as up:
        head = hostile.wait_request(TIMEOUTS.request)
        assert (head.method, head.target) == ("POST", "/up")
        grants = 0
        deadline = time.monotonic() + 4.0
        for _ in range(200):
            if time.monotonic() > deadline:
                break
            try:
                hostile.send_message(Window(head.stream_id, 256 * KiB).encode(), timeout=2.0)
            except OSError:
                break  # the server closed this tunnel: acceptable
            grants += 1
            time.sleep(0.02)  # the attack's pace, not a readiness wait
        assert grants > 0
        drop_hostile(srv, hostile, mark)
        up.join(TIMEOUTS.request)
        assert up.ended(), f"upload still running after the tunnel closed ({up.sent} bytes)"
        assert up.status in (502, None), up.response[:300]
    assert rss.growth_mib < 40, (
        f"server RSS grew {rss.growth_mib:.1f} MiB after {grants} grants (limit 40)"
    )
    assert srv.count(r"Traceback") == 0, srv.tail()
    assert_serves_normal_client(procs, srv)


# -- B. a hostile client dictating the response framing --------------------------------------


def hostile_answer(
    srv: Server, hostile: HostileClient, path: str, *frames_for: Callable[[int], list[bytes]]
) -> bytes:
    """A public ``GET path`` (Connection: close) answered by ``frames_for(stream_id)``."""
    result: dict[str, bytes] = {}
    raw = f"GET {path} HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n".encode()
    caller = threading.Thread(
        target=lambda: result.update(raw=raw_exchange(srv.port, raw, timeout=10.0)),
        daemon=True,
    )
    caller.start()
    try:
        head = hostile.wait_request(TIMEOUTS.request)
        assert head.target == path, head
        for make in frames_for:
            hostile.send_message(*make(head.stream_id))
    finally:
        caller.join(15.0)
    assert not caller.is_alive()
    return result.get("raw", b"")


def test_hostile_client_cannot_send_two_framings(procs: ProcessPool) -> None:
    """#13 item 7: a RESPONSE with both Transfer-Encoding: chunked and Content-Length: 5
    reaches the caller with exactly one framing: Content-Length 5, no Transfer-Encoding
    from the client, body ``hello``."""
    srv = procs.server()
    mark = srv.mark()
    hostile = connect_hostile(srv)
    headers = [("Transfer-Encoding", "chunked"), ("Content-Length", "5")]
    raw = hostile_answer(
        srv,
        hostile,
        "/x",
        lambda sid: [
            ResponseHead(sid, 200, "OK", headers).encode(),
            Data(sid, b"hello", end_stream=True).encode(),
        ],
    )
    assert raw, "no response at all"
    status, _, got, rest = parse_raw_response(raw)
    names = [k.lower() for k, _ in got]
    assert status == 200, raw[:500]
    assert "transfer-encoding" not in names, raw[:500]
    assert [v for k, v in got if k.lower() == "content-length"] == ["5"], raw[:500]
    assert rest == b"hello", raw[:500]
    drop_hostile(srv, hostile, mark)
    assert_serves_normal_client(procs, srv)


@pytest.mark.parametrize("status", [101, 100, 103])
def test_hostile_client_interim_status_on_plain_get_is_502(procs: ProcessPool, status: int) -> None:
    """#13 item 7: a 101 answer to a plain (non-upgrade) GET, or a 1xx interim status as
    the final answer, gets the caller a 502, never the client's status line."""
    srv = procs.server()
    mark = srv.mark()
    hostile = connect_hostile(srv)
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade")] if status == 101 else []
    raw = hostile_answer(
        srv,
        hostile,
        "/y",
        lambda sid: [ResponseHead(sid, status, "Interim", headers, end_stream=True).encode()],
    )
    assert raw, "no response at all"
    assert re.match(rb"HTTP/1\.1 502 ", raw), raw[:500]
    assert b" 101 " not in raw.split(b"\r\n", 1)[0]
    drop_hostile(srv, hostile, mark)
    assert_serves_normal_client(procs, srv)


# -- C. a hostile server against the client ---------------------------------------------------

MARKERS = (b"smuggled", b"evil", b"x: y")
HEADERS = [["Host", "public.example"]]

BAD_REQUESTS = {
    "crlf-in-method": lambda sid: request_frame(sid, "GET /evil HTTP/1.1\r\nX: y", "/", HEADERS),
    "crlf-in-target": lambda sid: request_frame(
        sid, "GET", "/a HTTP/1.1\r\nHost: x\r\n\r\nGET /smuggled", HEADERS
    ),
    "space-in-target": lambda sid: request_frame(sid, "GET", "/a evil", HEADERS),
    "target-not-a-path": lambda sid: request_frame(sid, "GET", "example.com/x", HEADERS),
    "space-in-header-name": lambda sid: request_frame(
        sid, "GET", "/h", [*HEADERS, ["X-Evil Y", "1"]]
    ),
    "colon-in-header-name": lambda sid: request_frame(
        sid, "GET", "/h", [*HEADERS, ["X-Evil:Y", "1"]]
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_client_refuses_injected_request_frames(procs: ProcessPool, case: str) -> None:
    """#13 item 8: a REQUEST with CR/LF in the method or target, a space in the target, a
    target that is not a path, or a header name with a space or colon is a protocol
    error: the client writes nothing to the origin and reconnects; a valid REQUEST on
    the new connection reaches the origin as ``GET /ok HTTP/1.1``."""
    with HostileServer() as hs, RawOrigin() as origin:
        cli = procs.client(hs.url, origin.url, "--max-backoff", "1", wait=False)
        conn = hs.next_connection(TIMEOUTS.connect)
        cli.wait_connected(1)
        mark = cli.mark()
        conn.send_message(BAD_REQUESTS[case](1))
        refused = wait_quietly(cli, r"protocol error", 5.0, start=mark)
        received = origin.received()
        assert not any(m in received.lower() for m in MARKERS), received[:500]
        assert origin.connection_count() == 0, f"the origin got a request: {received[:500]!r}"
        assert refused, f"the client did not refuse the frame:\n{cli.tail()}"
        # It reconnects (new WebSocket); the old one is not used again.
        second = hs.next_connection(TIMEOUTS.connect)
        cli.wait_connected(2)
        conn.close()
        second.send_message(
            RequestHead(
                1, "GET", "/ok", [("Host", "public.example")], 0, "127.0.0.1", "http", "x"
            ).encode()
        )
        answer = second.wait_for_frame(ResponseHead, TIMEOUTS.request)
        assert answer.status == 200, answer
        wait_until(lambda: b"\r\n\r\n" in origin.received(), timeout=TIMEOUTS.request)
        received = origin.received()
        assert origin.connection_count() == 1, received[:500]
        assert received.startswith(b"GET /ok HTTP/1.1\r\n"), received[:500]
        assert not any(m in received.lower() for m in MARKERS), received[:500]
        assert received.count(b"HTTP/1.1") == 1, received[:500]


# -- D. one odd response header fails one stream ---------------------------------------------


ODD_TAIL = b"Content-Length: 2\r\nConnection: close\r\n\r\nok"


def odd_origin_answer(path: str) -> tuple[float, bytes]:
    if path == "/odd1":
        return 0.0, b"HTTP/1.1 200 OK\r\n: value\r\n" + ODD_TAIL
    if path == "/odd2":
        big = b"X-Big: " + b"\x01" * 270_000 + b"\r\n"
        return 0.0, b"HTTP/1.1 200 OK\r\n" + big + ODD_TAIL
    if path == "/slow":
        return 1.5, ok_response()
    return 0.0, ok_response()


def test_one_odd_response_header_fails_only_its_stream(procs: ProcessPool) -> None:
    """#13 item 10: a response header with an empty name, or a 270,000-byte header of
    control characters, fails that one request with 502; a concurrent request on the
    same tunnel still gets 200 and the client never disconnects."""
    with RawOrigin(odd_origin_answer) as origin:
        srv = procs.server()
        cli = procs.client(srv, origin.url)
        slow: dict[str, object] = {}

        def get_slow() -> None:
            try:
                r = request(srv, "GET", "/slow", timeout=TIMEOUTS.request)
                slow["status"], slow["body"] = r.status, r.body
            except OSError as e:
                slow["error"] = repr(e)

        t = threading.Thread(target=get_slow, daemon=True)
        t.start()
        try:
            wait_until(lambda: "/slow" in origin.paths, timeout=TIMEOUTS.request)
            odd = {path: request(srv, "GET", path) for path in ("/odd1", "/odd2")}
        finally:
            t.join(TIMEOUTS.request)
        assert {p: r.status for p, r in odd.items()} == {"/odd1": 502, "/odd2": 502}, {
            p: (r.status, r.body[:200]) for p, r in odd.items()
        }
        assert slow.get("status") == 200 and slow.get("body") == b"ok", slow
        assert cli.connected_count() == 1, cli.tail()
        assert cli.count(r"disconnected") == 0, cli.tail()
        assert srv.count(r"Traceback") == 0, srv.tail()


# -- E. out of file descriptors -------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def test_out_of_file_descriptors_no_spin_no_log_flood(procs: ProcessPool) -> None:
    """#13 item 12: at RLIMIT_NOFILE 128 with 200 connections held open, the server does
    not spin on accept (< 1 s CPU in 2 s) nor flood its log (<= 3 lines in 2 s), and
    serves again once the connections are gone."""
    code = (
        "import resource, runpy, sys; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)); "
        "sys.argv = ['backstream', 'serve', '-a', '127.0.0.1:0']; "
        "runpy.run_module('backstream', run_name='__main__')"
    )
    srv = procs.add(Proc("server", [sys.executable, "-c", code]))
    port = int(srv.wait_for(SERVER_READY, TIMEOUTS.startup).group(1))
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 15.0
        for _ in range(200):
            if time.monotonic() > deadline:
                break
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=2.0))
            except OSError:
                pass
        # Settled: the server took what it could (its fd count stops climbing). A server
        # that accepts and sheds connections may wobble by a descriptor or two.
        seen: list[int] = []
        for _ in range(100):
            seen.append(_fd_count(srv.pid))
            if len(seen) >= 4 and max(seen[-4:]) - min(seen[-4:]) <= 2:
                break
            time.sleep(0.1)  # polling the condition above, bounded
        assert srv.alive(), srv.tail()
        lines0, cpu0, t0 = srv.mark(), _cpu_seconds(srv.pid), time.monotonic()
        time.sleep(2.0)  # the measurement window itself
        cpu = _cpu_seconds(srv.pid) - cpu0
        window = time.monotonic() - t0
        added = srv.mark() - lines0
        assert cpu < 1.0, f"server used {cpu:.2f} s CPU in {window:.1f} s at EMFILE"
        assert added <= 3, f"{added} log lines in {window:.1f} s:\n{srv.tail(10)}"
    finally:
        for s in held:
            s.close()
    assert srv.alive(), srv.tail()
    app = procs.local_app()
    procs.client(f"http://127.0.0.1:{port}", app)
    r = request(("127.0.0.1", port), "GET", "/after-emfile")
    assert r.status == 200, (r.status, r.body[:300])


def test_upgrade_refusal_whose_body_never_ends_is_bounded(procs: ProcessPool) -> None:
    """A client refusing a WebSocket upgrade (403) with a body it never ends cannot hold
    the caller: the server answers 504 after its --timeout (review of #13)."""
    srv = procs.server("--timeout", "2")
    mark = srv.mark()
    hostile = connect_hostile(srv)
    result: dict[str, bytes] = {}
    upgrade = websocket_upgrade("/ws", host="public.example")
    # The answer leaves a keep-alive connection open: read what came within 8 s.
    caller = threading.Thread(
        target=lambda: result.update(raw=raw_exchange(srv.port, upgrade, timeout=8.0)),
        daemon=True,
    )
    caller.start()
    try:
        head = hostile.wait_request(TIMEOUTS.request)
        assert head.upgrade, head
        hostile.send_message(
            ResponseHead(head.stream_id, 403, "Forbidden", []).encode(),
            Data(head.stream_id, b"never ends").encode(),
        )
    finally:
        caller.join(15.0)
    status, _, _, _ = parse_raw_response(result.get("raw", b""))
    assert status == 504, result
    drop_hostile(srv, hostile, mark)
