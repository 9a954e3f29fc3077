"""Issue 2, failures: each error is a distinct status with a short text body, no public
request hangs, clients come and go, and no stream state outlives its request."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time

import pytest
from harness import (
    TIMEOUTS,
    Client,
    LocalApp,
    Proc,
    ProcessPool,
    Response,
    Server,
    request,
    stream_request,
)

pytestmark = pytest.mark.timeout(120)


def assert_error(r: Response, status: int) -> None:
    assert r.status == status, (r.status, r.reason, r.body[:300])
    assert (r.header("Content-Type") or "").startswith("text/plain"), r.headers
    assert 0 < len(r.body) < 300, r.body
    assert b"Traceback" not in r.body


# -- no client / app down / app slow -------------------------------------------------------


def test_no_client_503(server: Server) -> None:
    assert_error(request(server, "GET", "/x"), 503)
    assert_error(request(server, "POST", "/x", [], b"body" * 1000), 503)


def test_no_client_code_flag(procs: ProcessPool) -> None:
    srv = procs.server("-c", "599")
    assert_error(request(srv, "GET", "/x"), 599)


def test_no_client_code_env(procs: ProcessPool) -> None:
    srv = procs.server(env={"BACKSTREAM_NO_CLIENT_CODE": "598"})
    assert_error(request(srv, "GET", "/x"), 598)


def assert_logged_with_stream_id(p: Proc, status: int) -> None:
    """The error has a log line carrying the stream id (issue 2, "Errors")."""
    p.wait_for(rf"(?=.*\bstream=\d+)(?=.*\b{status}\b)", timeout=10)


def test_local_app_refused_502(procs: ProcessPool, closed_port: int) -> None:
    srv = procs.server()
    procs.client(srv, f"http://127.0.0.1:{closed_port}")
    assert_error(request(srv, "GET", "/x"), 502)
    assert_logged_with_stream_id(srv, 502)
    assert_error(request(srv, "POST", "/x", [], b"b" * 100_000), 502)
    # the tunnel survives: a second request gets the same answer
    assert_error(request(srv, "GET", "/y"), 502)


@pytest.mark.parametrize("side", ["serve", "client"])
def test_local_app_slower_than_timeout_504(procs: ProcessPool, side: str) -> None:
    app = procs.local_app()
    srv = procs.server(*(["--timeout", "1"] if side == "serve" else []))
    procs.client(srv, app, *(["--timeout", "1"] if side == "client" else []))
    r = request(srv, "GET", "/slow?delay=20")
    assert_error(r, 504)
    assert_logged_with_stream_id(srv, 504)
    assert r.elapsed < 10, f"504 after {r.elapsed:.1f} s with --timeout 1"
    # a fast request on the same tunnel still works
    assert request(srv, "GET", "/fast").status == 200


def test_timeout_env_var_504(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server(env={"BACKSTREAM_TIMEOUT": "1"})
    procs.client(srv, app)
    assert_error(request(srv, "GET", "/slow?delay=20"), 504)


def test_timeout_aborts_request_at_local_app(procs: ProcessPool) -> None:
    """After a 504 the client abandons the request to the local app (no stale stream)."""
    app = procs.local_app()
    srv = procs.server("--timeout", "1")
    procs.client(srv, app)
    assert_error(request(srv, "GET", "/slow?delay=30&id=t504"), 504)
    app.wait_for(r'closed GET "/slow\?delay=30&id=t504"', timeout=15)


def test_public_caller_gone_aborts_request_at_local_app(procs: ProcessPool) -> None:
    """The public caller hangs up: the stream is reset and the app's request dropped."""
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"GET /slow?delay=30&id=gone HTTP/1.1\r\nHost: x\r\n\r\n")
        app.wait_for(r'hit GET "/slow\?delay=30&id=gone"', timeout=TIMEOUTS.request)
    app.wait_for(r'closed GET "/slow\?delay=30&id=gone"', timeout=15)


def test_public_caller_gone_mid_download_stops_app(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)
    size = 1024 * 1024 * 1024
    conn, resp = stream_request(srv, "GET", f"/download?size={size}&id=dl")
    assert resp.read(1024 * 1024)
    conn.close()
    resp.close()
    app.wait_for(r'closed GET "/download\?size=\d+&id=dl"', timeout=15)
    assert app.stats()["download_bytes"] < size // 2
    assert request(srv, "GET", "/after").status == 200


# -- the client goes away ----------------------------------------------------------------------


def test_client_killed_mid_request_502_quickly(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(srv, app)
    result: list[Response] = []
    t = threading.Thread(
        target=lambda: result.append(request(srv, "GET", "/slow?delay=60&id=k")), daemon=True
    )
    t.start()
    app.wait_for(r'hit GET "/slow\?delay=60&id=k"', timeout=TIMEOUTS.request)
    os.kill(cli.pid, signal.SIGKILL)
    killed = time.monotonic()
    t.join(TIMEOUTS.request)
    assert result, "public request still pending after the client was killed"
    after = time.monotonic() - killed
    print(f"502 {after:.3f} s after SIGKILL of the client")
    assert_error(result[0], 502)
    assert after < 3.0, f"502 only {after:.2f} s after the client died"
    # nobody connected now
    assert_error(request(srv, "GET", "/x"), 503)


def test_client_killed_mid_response_body_truncates(procs: ProcessPool) -> None:
    """Head already sent: the public response must end abnormally, not look complete."""
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(srv, app)
    conn, resp = stream_request(srv, "GET", "/drip?token=kb")
    try:
        assert resp.status == 200
        assert resp.readline() == b"first\n"
        os.kill(cli.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises((http.client.IncompleteRead, ConnectionError, OSError)):
            resp.read()
        print(f"truncated {time.monotonic() - t0:.3f} s after SIGKILL")
        assert time.monotonic() - t0 < 5
    finally:
        conn.close()


def test_server_restart_client_reconnects(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(srv, app)
    assert request(srv, "GET", "/before").status == 200
    port = srv.port
    srv.kill()
    t0 = time.monotonic()
    srv2 = procs.server(port=port)
    cli.wait_connected(2, timeout=TIMEOUTS.reconnect)
    print(f"client reconnected {time.monotonic() - t0:.2f} s after the server restart")
    assert cli.count(r"(?i)reconnect") >= 1, "no reconnection attempt logged"
    r = request(srv2, "GET", "/after-restart")
    assert r.status == 200 and r.json()["uri"] == "/after-restart"
    assert cli.alive()


def test_server_restart_with_request_in_flight(procs: ProcessPool) -> None:
    """The in-flight request is not replayed to the local app after reconnecting."""
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(srv, app)
    t = threading.Thread(
        target=lambda: _ignore(lambda: request(srv, "GET", "/slow?delay=3&id=inflight")),
        daemon=True,
    )
    t.start()
    app.wait_for(r'hit GET "/slow\?delay=3&id=inflight"', timeout=TIMEOUTS.request)
    port = srv.port
    srv.kill()
    srv2 = procs.server(port=port)
    cli.wait_connected(2, timeout=TIMEOUTS.reconnect)
    assert request(srv2, "GET", "/after").status == 200
    t.join(TIMEOUTS.request)
    assert app.count(r'hit GET "/slow\?delay=3&id=inflight"') == 1


def _ignore(fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except Exception:
        pass


def test_frozen_client_detected_by_ping(procs: ProcessPool) -> None:
    """A client that stops answering (SIGSTOP) is dropped after the ping timeout: the
    public request fails instead of hanging, and the client reconnects once resumed."""
    app = procs.local_app()
    srv = procs.server("--ping-interval", "1", "--ping-timeout", "2")
    cli = procs.client(srv, app, "--ping-interval", "1", "--ping-timeout", "2")
    os.kill(cli.pid, signal.SIGSTOP)
    try:
        r = request(srv, "GET", "/while-frozen", timeout=30)
        print(f"frozen client: {r.status} after {r.elapsed:.2f} s")
        assert r.status in (502, 503, 504), r.status
    finally:
        os.kill(cli.pid, signal.SIGCONT)
    cli.wait_connected(2, timeout=TIMEOUTS.reconnect)
    assert request(srv, "GET", "/after-thaw").status == 200


def test_frozen_server_detected_by_client_ping(procs: ProcessPool) -> None:
    """The server stops answering (SIGSTOP): the client's pong timeout drops the
    tunnel and it starts reconnecting; once the server resumes, it is connected again."""
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(srv, app, "--ping-interval", "1", "--ping-timeout", "1")
    mark = cli.mark()
    os.kill(srv.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        cli.wait_for(r"(?i)disconnected|reconnecting", timeout=30, start=mark)
        print(f"client noticed the frozen server after {time.monotonic() - t0:.2f} s")
    finally:
        os.kill(srv.pid, signal.SIGCONT)
    cli.wait_connected(2, timeout=TIMEOUTS.reconnect)
    assert request(srv, "GET", "/after-server-thaw").status == 200


# -- several clients ------------------------------------------------------------------------------


def test_two_clients_round_robin_then_one_leaves(procs: ProcessPool) -> None:
    app_a, app_b = procs.local_app(), procs.local_app()
    srv = procs.server()
    procs.client(srv, app_a)
    cli_b = procs.client(srv, app_b)
    n = 40
    statuses = [request(srv, "GET", f"/rr/{i}").status for i in range(n)]
    assert statuses == [200] * n
    a, b = app_a.hits(), app_b.hits()
    print(f"round robin over {n}: a={a} b={b}")
    assert a + b == n, "a request was lost or broadcast"
    assert abs(a - b) <= 2, f"not round robin: a={a} b={b}"

    cli_b.kill()
    statuses = [request(srv, "GET", f"/after-leave/{i}").status for i in range(20)]
    assert statuses == [200] * 20
    assert app_a.hits() == a + 20
    assert app_b.hits() == b


def test_concurrent_requests_two_clients_none_lost(procs: ProcessPool) -> None:
    app_a, app_b = procs.local_app(), procs.local_app()
    srv = procs.server()
    procs.client(srv, app_a)
    procs.client(srv, app_b)
    n = 100
    results: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        st = request(srv, "GET", f"/slow?delay=0.2&i={i}").status
        with lock:
            results.append(st)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUTS.request)
    assert results == [200] * n
    assert app_a.hits() + app_b.hits() == n
    assert app_a.hits() > 0 and app_b.hits() > 0


# -- no leak --------------------------------------------------------------------------------


def _burst(srv: Server, n: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUTS.request)
    t0 = time.monotonic()
    try:
        for i in range(n):
            kind = i % 10
            if kind == 0:
                r = request(srv, "POST", f"/leak/{i}", [], b"x" * 10_000, conn=conn)
            elif kind == 1:
                r = request(srv, "GET", "/download?size=100000", conn=conn)
            elif kind == 2:
                r = request(srv, "GET", "/status/500", conn=conn)
            else:
                r = request(srv, "GET", f"/leak/{i}?q={i}", conn=conn)
            assert r.status in (200, 500)
    finally:
        conn.close()
    return n / (time.monotonic() - t0)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(300)
def test_no_state_leak_after_thousands_of_requests(procs: ProcessPool, local_app: LocalApp) -> None:
    srv = procs.server()
    cli: Client = procs.client(srv, local_app)
    n = 2000
    _burst(srv, 500)  # warm-up: allocator pools, caches
    rate1 = _burst(srv, n)
    rss1 = (srv.rss_kib(), cli.rss_kib())
    fds1 = (_fds(srv.pid), _fds(cli.pid))
    rate2 = _burst(srv, n)
    rss2 = (srv.rss_kib(), cli.rss_kib())
    fds2 = (_fds(srv.pid), _fds(cli.pid))
    direct = _burst_direct(local_app, n)
    print(
        f"leak check: {n} req at {rate1:.0f}/s then {rate2:.0f}/s (direct {direct:.0f}/s); "
        f"server rss {rss1[0] // 1024}->{rss2[0] // 1024} MiB, "
        f"client rss {rss1[1] // 1024}->{rss2[1] // 1024} MiB, fds {fds1}->{fds2}"
    )
    assert rss2[0] - rss1[0] < 10 * 1024, "server RSS keeps growing"
    assert rss2[1] - rss1[1] < 10 * 1024, "client RSS keeps growing"
    assert fds2[0] <= fds1[0] + 5 and fds2[1] <= fds1[1] + 5, "file descriptors leak"


def _burst_direct(app: LocalApp, n: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=TIMEOUTS.request)
    t0 = time.monotonic()
    try:
        for i in range(n):
            request(app, "GET", f"/direct/{i}", conn=conn)
    finally:
        conn.close()
    return n / (time.monotonic() - t0)
