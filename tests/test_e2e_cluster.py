"""Scale-out (issue #12): instances sharing their tunnels through a real Redis.

Every test starts Debian's ``redis-server`` on a free loopback port and
instances of ``backstream serve --redis`` on 127.0.0.1; a tunnel's client
connects to one instance and public requests arrive at the others, which relay
them over peer links. Requests name their tunnel with ``Backstream-Tunnel``.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import time
from typing import Any

import pytest
from cluster_harness import SECRET, Balancer, RedisServer, instance, redis
from harness import (
    TIMEOUTS,
    ProcessPool,
    Server,
    pattern_chunks,
    request,
    stream_request,
    wait_until,
)
from test_e2e_metrics import metrics_port, scrape, value
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024


def _to(name: str) -> list[tuple[str, str]]:
    return [("Backstream-Tunnel", name)]


def _cluster(procs: ProcessPool, n: int = 3) -> tuple[RedisServer, list[Server]]:
    store = redis(procs)
    return store, [instance(procs, store) for _ in range(n)]


def _get(srv: Server, path: str, name: str = "app", timeout: float = 20) -> Any:
    return request(srv, "GET", path, headers=_to(name), timeout=timeout)


def _settled(srv: Server, name: str = "app") -> None:
    """Until ``srv`` finds the tunnel (the claim's news travels by pub/sub)."""
    wait_until(lambda: _get(srv, "/anything/probe", name).status == 200, TIMEOUTS.request)


def test_requests_reach_a_tunnel_held_by_another_instance(procs: ProcessPool) -> None:
    app = procs.local_app()
    _, (a, b, c) = _cluster(procs)
    procs.client(a, app, "--name", "app", "--no-inspect")
    for srv in (b, c):
        _settled(srv)
        r = _get(srv, "/anything/cross?q=1")
        assert r.status == 200 and r.json()["uri"] == "/anything/cross?q=1"
        seen = {k.lower(): v for k, v in r.json()["headers"]}
        assert "backstream-tunnel" not in seen and seen["x-forwarded-for"] == "127.0.0.1"
    # A streamed response crosses as it is written: the first line before the last.
    conn, resp = stream_request(b, "GET", "/drip?token=t1", headers=_to("app"))
    try:
        assert resp.status == 200
        assert resp.readline() == b"first\n"
        app.release("t1")
        assert resp.readline() == b"last\n"
    finally:
        conn.close()
    # An unknown name is 404 everywhere, the request that reached no one.
    assert _get(c, "/anything/x", "nobody").status == 404
    assert "peer link open" in b.output() and "peer link accepted" in a.output()
    assert SECRET not in "".join(p.output() for p in (a, b, c))


def test_200mib_each_way_across_the_hop_with_bounded_memory(procs: ProcessPool) -> None:
    app = procs.local_app()
    _, (a, b, c) = _cluster(procs)
    cli = procs.client(a, app, "--name", "app", "--no-inspect")
    _settled(b)
    before = {p.name + str(p.pid): p.peak_rss_kib() for p in (a, b, c, cli)}
    size = 200 * MiB
    conn, resp = stream_request(b, "GET", f"/download?size={size}", headers=_to("app"))
    digest = hashlib.sha256()
    got = 0
    try:
        assert resp.status == 200
        while chunk := resp.read(MiB):
            digest.update(chunk)
            got += len(chunk)
    finally:
        conn.close()
    expected = hashlib.sha256()
    for chunk in pattern_chunks(size):
        expected.update(chunk)
    assert got == size and digest.hexdigest() == expected.hexdigest()
    up = request(
        b, "POST", "/upload", headers=_to("app"), body=pattern_chunks(size), timeout=120
    ).json()
    assert up == {"len": size, "sha256": expected.hexdigest()}
    growth = {
        key: (p.peak_rss_kib() - before[key]) / 1024
        for p, key in ((p, p.name + str(p.pid)) for p in (a, b, c, cli))
    }
    print("peak RSS growth, MiB:", growth)
    assert all(mib < 40 for mib in growth.values()), growth


def test_a_websocket_across_instances(procs: ProcessPool) -> None:
    app = procs.local_app()
    _, (a, b, _) = _cluster(procs)
    procs.client(a, app, "--name", "app", "--no-inspect")
    _settled(b)

    async def go() -> tuple[Any, ...]:
        conn = await websocket_connect(
            HTTPRequest(f"ws://{b.netloc}/ws/echo", headers={"Backstream-Tunnel": "app"}),
            max_message_size=64 * MiB,
        )
        greeting = json.loads(await conn.read_message())  # type: ignore[arg-type]
        big = b"".join(pattern_chunks(5 * MiB))
        await conn.write_message(big, binary=True)
        echoed = await conn.read_message()
        await conn.write_message("close")
        closed = await conn.read_message()
        return greeting["uri"], echoed == big, closed, conn.close_code, conn.close_reason

    uri, same, closed, code, reason = asyncio.run(asyncio.wait_for(go(), TIMEOUTS.request))
    assert (uri, same, closed, code, reason) == ("/ws/echo", True, None, 4001, "asked to close")


def test_a_pool_spanning_two_instances_serves_from_both(procs: ProcessPool) -> None:
    app1, app2 = procs.local_app(), procs.local_app()
    _, (a, b, c) = _cluster(procs)
    owner = ("-H", "Authorization: Bearer team-blue")
    procs.client(a, app1, "--name", "app", "--no-inspect", *owner)
    procs.client(b, app2, "--name", "app", "--no-inspect", *owner)
    _settled(c)
    # Through a third instance: both members take a share.
    for i in range(20):
        assert _get(c, f"/anything/spread/{i}").status == 200
    assert app1.hits() > 0 and app2.hits() > 0, (app1.hits(), app2.hits())
    # An instance with a member of its own prefers it.
    local_before = app1.hits()
    for i in range(10):
        assert _get(a, f"/anything/local/{i}").status == 200
    assert app1.hits() - local_before == 10


def test_two_owners_racing_for_a_name_on_two_instances_never_both_win(
    procs: ProcessPool,
) -> None:
    app = procs.local_app()
    _, (a, b, _) = _cluster(procs)
    for round_ in range(3):
        name = f"race{round_}"
        first = procs.client(
            a, app, "--name", name, "--no-inspect", "-H", "Authorization: Bearer one", wait=False
        )
        second = procs.client(
            b, app, "--name", name, "--no-inspect", "-H", "Authorization: Bearer two", wait=False
        )
        wait_until(
            lambda pair=(first, second): any(p.popen.poll() is not None for p in pair),
            TIMEOUTS.connect,
        )
        time.sleep(1.0)  # a late winner would have connected by now
        connected = [p for p in (first, second) if p.connected_count() > 0]
        refused = [p for p in (first, second) if p.popen.poll() == 2]
        assert len(connected) == 1 and len(refused) == 1, [p.tail() for p in (first, second)]
        assert "status=409" in refused[0].output()
        connected[0].kill()


def test_an_instance_killed_its_clients_come_back_elsewhere_under_grace(
    procs: ProcessPool,
) -> None:
    app = procs.local_app()
    _, (a, b, c) = _cluster(procs)
    balancer = Balancer([a.port, b.port, c.port])
    try:
        # The balancer's first choice for the tunnel's connection is a (its turn 1).
        balancer._turn = -1
        cli = procs.client(
            balancer.url,
            app,
            "--name",
            "app",
            "--no-inspect",
            "-H",
            "Authorization: Bearer owner",
            "--max-backoff",
            "1",
        )
        holder = wait_until(
            lambda: next((s for s in (a, b, c) if "client connected" in s.output()), None)
        )
        others = [s for s in (a, b, c) if s is not holder]
        _settled(others[0])
        balancer.backends.remove(holder.port)
        holder.kill()
        # Never a hang: 502 while the dead instance lingers, then 503 or 404 or,
        # once the client is back on another instance, 200.
        t0 = time.monotonic()
        statuses = set()
        while time.monotonic() - t0 < 20:
            r = _get(others[0], "/anything/after", timeout=10)
            statuses.add(r.status)
            assert r.status in (200, 404, 502, 503), r.status
            if r.status == 200:
                break
            time.sleep(0.2)
        assert 200 in statuses, statuses
        cli.wait_connected(2)
        # The name stayed its owner's: another credential is refused.
        thief = procs.client(
            balancer.url,
            app,
            "--name",
            "app",
            "--no-inspect",
            "-H",
            "Authorization: Bearer thief",
            wait=False,
        )
        assert thief.wait_exit(TIMEOUTS.connect) == 2
        assert "status=409" in thief.output()
        for srv in others:
            _settled(srv)
    finally:
        balancer.close()


def test_redis_down_local_tunnels_serve_and_the_rest_fails_fast(procs: ProcessPool) -> None:
    app = procs.local_app()
    store = redis(procs)
    a = instance(procs, store)
    b = instance(procs, store, "--metrics-addr", "127.0.0.1:0")
    metrics_port(b)
    procs.client(a, app, "--name", "app", "--no-inspect")
    _settled(b)
    seen = scrape(b)
    assert value(seen, "backstream_peer_links") == 1
    assert value(seen, "backstream_cluster_redis_up") == 1
    store.kill()
    a.wait_for(r"cluster: redis unavailable", 10)
    b.wait_for(r"cluster: redis unavailable", 10)
    # The tunnel's own instance serves it without Redis.
    assert _get(a, "/anything/local").status == 200
    # Another instance cannot find it: 503 within about a second, never a hang.
    t0 = time.monotonic()
    r = _get(b, "/anything/far")
    assert r.status == 503 and b"cluster state unavailable" in r.body, r.body
    assert time.monotonic() - t0 < 3
    # A new client cannot claim a name: refused with 503, it retries.
    late = procs.client(b, app, "--name", "late", "--no-inspect", "--max-backoff", "1", wait=False)
    late.wait_for(r"status=503", 15)
    # Redis comes back empty: the instances register what they hold again by themselves.
    procs.add(RedisServer(store.port))
    a.wait_for(r"cluster: redis is back; 1 name\(s\) registered again", 10)
    b.wait_for(r"cluster: redis is back", 10)
    _settled(b)
    seen = scrape(b)
    assert value(seen, "backstream_cluster_redis_up") == 1
    assert value(seen, "backstream_cluster_redis_errors_total") >= 1
    late.wait_connected(1, timeout=15)
    _settled(a, "late")


def test_workers_share_the_port_and_their_tunnels(procs: ProcessPool) -> None:
    app = procs.local_app()
    store = redis(procs)
    srv = instance(procs, store, "--workers", "2")
    srv.wait_for_count(r"cluster instance=\w+ advertise=", 2, TIMEOUTS.startup)
    procs.client(srv, app, "--no-inspect")
    wait_until(lambda: request(srv, "GET", "/anything/warm").status == 200, TIMEOUTS.request)
    # New connections each: the kernel spreads them over both workers.
    statuses = [request(srv, "GET", f"/anything/w/{i}").status for i in range(40)]
    assert statuses == [200] * 40
    assert "peer link accepted" in srv.output()  # some went to the worker without the client
    srv.terminate()
    assert srv.wait_exit(TIMEOUTS.exit) == 0


def test_cluster_flags_are_checked(procs: ProcessPool) -> None:
    cases = [
        (["--redis", "redis://127.0.0.1:1/0"], "--redis needs --cluster-secret"),
        (["--workers", "2"], "--workers above 1 needs --redis"),
        (
            ["-a", "0.0.0.0:0", "--redis", "redis://127.0.0.1:1/0", "--cluster-secret", "x"],
            "--advertise",
        ),
    ]
    for args, message in cases:
        srv = procs.server(*args, addr="-a" not in args, wait=False)
        assert srv.wait_exit(TIMEOUTS.startup) == 2
        assert message in srv.output(), srv.output()


def test_a_handshake_that_never_upgrades_does_not_keep_the_name(procs: ProcessPool) -> None:
    """A claim made while judging a handshake is let go when Tornado then refuses it."""
    app = procs.local_app()
    _, (a, b, _) = _cluster(procs)
    squat = [("Backstream-Client", "1"), ("Backstream-Name", "victim")]  # no Upgrade
    assert request(a, "GET", "/", headers=squat).status == 400
    owner = procs.client(
        b, app, "--name", "victim", "--no-inspect", "-H", "Authorization: Bearer owner"
    )
    assert owner.connected_count() == 1
    _settled(a, "victim")


def test_streams_over_a_lost_peer_link_fail_at_once(procs: ProcessPool) -> None:
    app = procs.local_app()
    _, (a, b, _) = _cluster(procs)
    procs.client(a, app, "--name", "app", "--no-inspect")
    _settled(b)
    conn, resp = stream_request(b, "GET", "/drip?token=held", headers=_to("app"))
    try:
        assert resp.status == 200 and resp.readline() == b"first\n"
        a.kill()  # the holder, mid-response
        t0 = time.monotonic()
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            resp.read()  # chunked: a cut stream is an error, never a short body
        assert time.monotonic() - t0 < 5
    finally:
        conn.close()
    r = _get(b, "/anything/after")
    assert r.status in (502, 503, 404), r.status
