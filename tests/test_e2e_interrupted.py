"""A thousand requests interrupted at random points leave no stream behind (issue #10).

Each caller is a raw socket that goes away at a random moment: in the middle
of its upload, of its download, while the local app is still thinking, or
right after a WebSocket opened. Afterwards both sides' stream tables are read
from their metrics (``backstream_streams_in_flight`` on the server's metrics
port, ``backstream_client_streams_open`` on the client's inspector port) and
must be empty: counted, not guessed.
"""

from __future__ import annotations

import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness import TIMEOUTS, ProcessPool, request, wait_until, websocket_upgrade
from prometheus_client.parser import text_string_to_metric_families
from test_e2e_metrics import metrics_port

pytestmark = pytest.mark.timeout(240)

KiB = 1024
MiB = 1024 * KiB
N = 1000


def _interrupted(port: int, seed: int) -> str:
    """One request, abandoned at a point chosen by ``seed``; returns its kind."""
    rng = random.Random(seed)
    kind = rng.choice(["upload", "download", "slow", "websocket", "whole"])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUTS.request) as sock:
        if kind == "upload":
            size = MiB
            sock.sendall(
                f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
            )
            sock.sendall(b"u" * rng.randrange(0, size // 2))
        elif kind == "download":
            sock.sendall(b"GET /download?size=4194304 HTTP/1.1\r\nHost: x\r\n\r\n")
            want, got = rng.randrange(1, 2 * MiB), 0
            while got < want and (chunk := sock.recv(64 * KiB)):
                got += len(chunk)
        elif kind == "slow":
            sock.sendall(b"GET /slow?delay=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(rng.random() * 0.05)
        elif kind == "websocket":
            sock.sendall(websocket_upgrade("/ws/echo"))
            if rng.random() < 0.5:
                sock.recv(1)  # the 101 came: drop it open
        else:
            sock.sendall(b"GET /anything/whole HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while sock.recv(64 * KiB):
                pass
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return kind


def _gauge(text: str, name: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def test_a_thousand_interrupted_requests_leave_no_stream_state(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server("--metrics-addr", "127.0.0.1:0", "--timeout", "10")
    server_metrics = metrics_port(srv)
    cli = procs.client(srv, app, "--inspect", "127.0.0.1:0")
    client_port = int(cli.wait_for(r"inspector url=http://127\.0\.0\.1:(\d+)", 10).group(1))

    def streams() -> tuple[float, float]:
        server = request(f"127.0.0.1:{server_metrics}", "GET", "/metrics").text()
        client = request(f"127.0.0.1:{client_port}", "GET", "/metrics").text()
        return (
            _gauge(server, "backstream_streams_in_flight"),
            _gauge(client, "backstream_client_streams_open"),
        )

    kinds: dict[str, int] = {}
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        for kind in pool.map(lambda seed: _interrupted(srv.port, seed), range(N)):
            kinds[kind] = kinds.get(kind, 0) + 1
    print(f"{N} interrupted requests in {time.monotonic() - started:.1f}s: {kinds}")
    assert all(kinds.get(k, 0) > 100 for k in ("upload", "download", "slow", "websocket"))
    try:
        wait_until(lambda: streams() == (0, 0), 20)
    except AssertionError:
        raise AssertionError(f"streams left (server, client): {streams()}") from None
    # And the tunnel still serves.
    assert request(srv, "GET", "/anything/after").status == 200


def test_callers_gone_mid_upload_leave_nothing_on_the_server(procs: ProcessPool) -> None:
    """Each abandoned upload once kept its handler, task and stream for ever (~30 KiB)."""
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\n\r\n"

    def abandon(_: int) -> None:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUTS.request) as s:
            s.sendall(head + b"u" * 65536)
            time.sleep(0.02)  # the server has read it and relayed the head

    def burst(n: int) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(abandon, range(n)))
        wait_until(lambda: request(srv, "GET", "/anything/after").status == 200)

    burst(300)  # warm-up: allocator pools
    before = srv.rss_kib()
    burst(900)
    time.sleep(1)
    growth = (srv.rss_kib() - before) / 1024
    print(f"server RSS growth after 900 abandoned uploads: {growth:.1f} MiB")
    assert growth < 5, f"{growth:.1f} MiB"
