"""Named tunnels, end to end: real servers, clients and local apps on 127.0.0.1.

A server with ``--domain D`` routes a public request by its Host (``NAME.D``) to the
tunnel ``NAME``; the ``Backstream-Tunnel: NAME`` request header selects a tunnel on any
server and never reaches the local app. Clients that claim the same name with the
same credentials form a pool (least streams in flight first); the first client's
credentials own the name, which stays reserved for ``--name-grace`` seconds after its
last client left. Tunnel handshakes that only need the server's answer are made from
the test itself (``handshake``/``hold``), which is much cheaper than a client process.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import (
    TIMEOUTS,
    Client,
    LocalApp,
    ProcessPool,
    Response,
    Server,
    request,
    run_cli,
    stream_request,
    wait_until,
)
from tornado import httpclient
from tornado.websocket import WebSocketClientConnection, websocket_connect

pytestmark = pytest.mark.timeout(120)

DOMAIN = "tunnel.test"
#: The client's line per connection: public URL, destination, and the rest of the line.
FORWARDING = re.compile(r"forwarding (\S+) -> (\S+)(.*)$")
CLIENT_READY = r"connected to server url=wss?://\S+"
RANDOM_NAME = re.compile(r"[a-z2-7]{10}")
#: A tunnel handshake as the client sends it (RFC 6455 section 1.3 sample key).
TUNNEL_HANDSHAKE = [
    ("Backstream-Client", "1"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]


# -- helpers -----------------------------------------------------------------------------


def forwarding(cli: Client, n: int = 1, timeout: float | None = None) -> tuple[str, str, str]:
    """The ``n``-th ``forwarding URL -> DST`` line of ``cli``: (URL, DST, rest of line)."""
    m = cli.wait_for_count(FORWARDING, n, TIMEOUTS.connect if timeout is None else timeout)[-1]
    return m.group(1), m.group(2), m.group(3)


def named_client(
    procs: ProcessPool, srv: Server, dest: LocalApp | str, name: str | None, *args: str
) -> Client:
    """Start a client (``--name NAME`` unless None) without waiting for it."""
    extra = ["--name", name] if name is not None else []
    return procs.client(srv, dest, *extra, *args, wait=False)


def via_host(
    srv: Server, host: str, path: str = "/anything", headers: list[tuple[str, str]] | None = None
) -> Response:
    """A GET to ``srv`` with the given Host header."""
    return request(srv, "GET", path, [("Host", host), *(headers or [])])


def via_header(srv: Server, name: str, path: str = "/anything") -> Response:
    """A GET to ``srv`` (Host 127.0.0.1:PORT) selecting tunnel ``name`` by header."""
    return request(srv, "GET", path, [("Backstream-Tunnel", name)])


def _handshake_headers(
    srv: Server, name: str | None, auth: str | None, host: str | None
) -> list[tuple[str, str]]:
    headers = [("Host", host or srv.netloc), *TUNNEL_HANDSHAKE]
    if name is not None:
        headers.append(("Backstream-Name", name))
    if auth is not None:
        headers.append(("Authorization", auth))
    return headers


def handshake(
    srv: Server, name: str | None, *, auth: str | None = None, host: str | None = None
) -> Response:
    """One tunnel handshake from the test; the connection is closed at once (a 101
    means the tunnel was granted and then left)."""
    conn, resp = stream_request(srv, "GET", "/", _handshake_headers(srv, name, auth, host))
    try:
        body = b"" if resp.status == 101 else resp.read()
        return Response(resp.status, resp.reason, resp.getheaders(), body)
    finally:
        conn.close()


@contextmanager
def hold(
    srv: Server, name: str | None, *, auth: str | None = None
) -> Iterator[tuple[http.client.HTTPConnection, Response]]:
    """A granted tunnel handshake (101) kept open until the block ends."""
    conn, resp = stream_request(srv, "GET", "/", _handshake_headers(srv, name, auth, None))
    try:
        assert resp.status == 101, (resp.status, resp.read())
        yield conn, Response(resp.status, resp.reason, resp.getheaders(), b"")
    finally:
        conn.close()


def echo_header_names(resp: Response) -> list[str]:
    """The header names the local app's /anything echo saw (lower case)."""
    return [name.lower() for name, _ in resp.json()["headers"]]


def access_lines(srv: Server, path: str, tunnel: str, n: int) -> None:
    """Wait for ``n`` access lines of ``GET path`` carrying ``tunnel=TUNNEL``."""
    rx = rf"GET {re.escape(path)} .*\btunnel={re.escape(tunnel)}(?:\s|$)"
    srv.wait_for_count(rx, n, TIMEOUTS.request)


async def _ws_open(srv: Server, path: str, headers: dict[str, str]) -> WebSocketClientConnection:
    req = httpclient.HTTPRequest(
        f"ws://127.0.0.1:{srv.port}{path}",
        headers=headers,
        connect_timeout=TIMEOUTS.connect,
        request_timeout=TIMEOUTS.connect,
    )
    return await websocket_connect(req)


async def _ws_read(conn: WebSocketClientConnection) -> str | bytes | None:
    return await asyncio.wait_for(conn.read_message(), TIMEOUTS.request)


# -- routing -----------------------------------------------------------------------------


def test_host_routes_each_name_to_its_own_client(procs: ProcessPool) -> None:
    """Two named tunnels on a --domain server: a Host ``NAME.tunnel.test`` reaches
    tunnel NAME whatever its port, letter case or trailing dot; each local app gets only
    its own tunnel's requests; the header route works on a --domain server too; the
    forwarding line shows ``http://NAME.tunnel.test:PORT`` (the name from
    BACKSTREAM_NAME is kept lower-case); the access lines carry ``tunnel=NAME`` (#13)."""
    app_a, app_b = procs.local_app(), procs.local_app()
    srv = procs.server("--domain", DOMAIN)
    cli_a = named_client(procs, srv, app_a, "myapp")
    cli_b = procs.client(srv, app_b, env={"BACKSTREAM_NAME": "Other"}, wait=False)

    url, dst, rest = forwarding(cli_a)
    assert url == f"http://myapp.{DOMAIN}:{srv.port}"
    assert dst.rstrip("/") == app_a.url
    assert "Backstream-Tunnel" not in rest
    url, dst, _ = forwarding(cli_b)
    assert url == f"http://other.{DOMAIN}:{srv.port}"
    assert dst.rstrip("/") == app_b.url

    hosts_a = [
        f"myapp.{DOMAIN}",
        f"myapp.{DOMAIN}:{srv.port}",
        f"MyApp.Tunnel.Test:{srv.port}",
        f"myapp.{DOMAIN}.",
        f"myapp.{DOMAIN}:1",  # the port is ignored
    ]
    for i, host in enumerate(hosts_a):
        r = via_host(srv, host, f"/anything?to=a&i={i}")
        assert r.status == 200, (host, r.status, r.body)
        assert r.json()["uri"] == f"/anything?to=a&i={i}"
    for i, host in enumerate([f"other.{DOMAIN}", f"OTHER.{DOMAIN}.:{srv.port}"]):
        r = via_host(srv, host, f"/anything?to=b&i={i}")
        assert r.status == 200, (host, r.status, r.body)
    r = via_host(srv, DOMAIN, "/anything?to=b&by=header", [("Backstream-Tunnel", "other")])
    assert r.status == 200, r.body
    assert "backstream-tunnel" not in echo_header_names(r)

    assert app_a.hits() == len(hosts_a)
    assert app_b.hits() == 3
    assert app_a.count(r'hit GET "/anything\?to=b') == 0
    assert app_b.count(r'hit GET "/anything\?to=a') == 0
    access_lines(srv, "/anything", "myapp", len(hosts_a))
    access_lines(srv, "/anything", "other", 3)


def test_header_route_without_domain(procs: ProcessPool) -> None:
    """On a server without --domain, ``Backstream-Tunnel: NAME`` (any case) selects the
    named tunnel and is removed before the request reaches the local app; the forwarding
    line is the server's URL plus ``(header Backstream-Tunnel: NAME)``; without the
    header (or with a Host that looks like a name) the request is for the default
    tunnel, absent here (503); an unknown name is 404, an invalid one 400."""
    app_a, app_b = procs.local_app(), procs.local_app()
    srv = procs.server()
    cli_a = named_client(procs, srv, app_a, "alpha")
    cli_b = named_client(procs, srv, app_b, "beta")
    for cli, name in ((cli_a, "alpha"), (cli_b, "beta")):
        url, _, rest = forwarding(cli)
        assert url == srv.url
        assert rest.strip() == f"(header Backstream-Tunnel: {name})"

    for i in range(3):
        r = via_header(srv, "alpha", f"/anything?to=alpha&i={i}")
        assert r.status == 200, r.body
        assert "backstream-tunnel" not in echo_header_names(r)
        assert r.json()["uri"] == f"/anything?to=alpha&i={i}"
    for name in ("beta", "Beta"):
        r = via_header(srv, name, "/anything?to=beta")
        assert r.status == 200, (name, r.status, r.body)
        assert "backstream-tunnel" not in echo_header_names(r)
    assert (app_a.hits(), app_b.hits()) == (3, 2)

    assert request(srv, "GET", "/anything").status == 503
    assert via_host(srv, f"alpha.{DOMAIN}").status == 503  # no --domain: no Host route
    r = via_header(srv, "ghost")
    assert (r.status, r.body) == (404, b"no tunnel named ghost\n")
    assert via_header(srv, "no_good").status == 400
    assert (app_a.hits(), app_b.hits()) == (3, 2)


def test_default_tunnel_beside_named_ones(procs: ProcessPool) -> None:
    """On a server without --domain, an unnamed client is the default tunnel as before
    (its forwarding line is the bare server URL): plain requests go to it, requests with
    ``Backstream-Tunnel: x`` to the named client; access lines carry ``tunnel=-`` for
    the default tunnel and ``tunnel=x`` for the named one (#13)."""
    app_d, app_x = procs.local_app(), procs.local_app()
    srv = procs.server()
    cli_d = named_client(procs, srv, app_d, None)
    cli_x = named_client(procs, srv, app_x, "x")
    url, dst, rest = forwarding(cli_d)
    assert (url, dst.rstrip("/"), rest.strip()) == (srv.url, app_d.url, "")
    url, _, rest = forwarding(cli_x)
    assert url == srv.url
    assert "(header Backstream-Tunnel: x)" in rest

    for _ in range(3):
        assert request(srv, "GET", "/default-route").status == 200
    for name in ("x", "x", "X"):
        r = via_header(srv, name, "/named-route")
        assert r.status == 200
        assert "backstream-tunnel" not in echo_header_names(r)
    assert (app_d.hits(), app_x.hits()) == (3, 3)
    assert app_d.count(r'hit GET "/named-route') == 0
    access_lines(srv, "/default-route", "-", 3)
    access_lines(srv, "/named-route", "x", 3)


def test_random_names_distinct_routable_and_kept_on_reconnect(procs: ProcessPool) -> None:
    """Eight clients without --name on a --domain server each get a random name of 10
    lower-case base32 characters, all distinct, each routable by Host to its own client
    (each client has its own base path); after a server restart on the same port every
    client reconnects with the name it was given."""
    app = procs.local_app()
    srv = procs.server("--domain", DOMAIN)
    clients = [named_client(procs, srv, f"{app.url}/c{i}", None) for i in range(8)]
    urls, names = [], []
    for cli in clients:
        url, _, rest = forwarding(cli)
        m = re.fullmatch(rf"http://([^.]+)\.tunnel\.test:{srv.port}", url)
        assert m is not None, url
        assert RANDOM_NAME.fullmatch(m.group(1)), url
        assert "Backstream-Tunnel" not in rest
        urls.append(url)
        names.append(m.group(1))
    assert len(set(names)) == len(names), names
    for i, name in enumerate(names):
        r = via_host(srv, f"{name}.{DOMAIN}", "/first")
        assert r.status == 200, (name, r.status, r.body)
        assert r.json()["path"] == f"/c{i}/first"

    srv.kill()
    srv2 = procs.server("--domain", DOMAIN, port=srv.port)
    for cli, url in zip(clients, urls, strict=True):
        again, _, _ = forwarding(cli, 2, TIMEOUTS.reconnect)
        assert again == url
    for i, name in enumerate(names):
        r = via_host(srv2, f"{name}.{DOMAIN}", "/second")
        assert r.status == 200, (name, r.status, r.body)
        assert r.json()["path"] == f"/c{i}/second"


def test_invalid_names_refused(procs: ProcessPool) -> None:
    """A name that is not a DNS label is refused: ``backstream client --name`` (or
    BACKSTREAM_NAME) exits 2 with one line on stderr; a tunnel handshake with such a
    ``Backstream-Name`` gets 400 "invalid tunnel name". A 63-character name in capitals
    is valid and granted lower-case, its URL on a server without --domain being the
    server's own (as for the unnamed tunnel)."""
    dummy = ["client", "-s", "http://127.0.0.1:9", "-d", "http://127.0.0.1:9"]
    runs = [
        run_cli(*dummy, "--name", "BAD_"),
        run_cli(*dummy, "--name=-bad"),
        run_cli(*dummy, env={"BACKSTREAM_NAME": "a" * 64}),
    ]
    for r in runs:
        assert r.returncode == 2, (r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "invalid tunnel name" in lines[0], r.stderr

    srv = procs.server()
    for bad in ("-bad", "bad-", "bad_name", "a" * 64, "a.b", "a b"):
        r = handshake(srv, bad)
        assert r.status == 400, (bad, r.status, r.body)
        assert b"invalid tunnel name" in r.body, (bad, r.body)
    r = handshake(srv, "A" * 63)
    assert r.status == 101
    assert r.header("Backstream-Name") == "a" * 63
    assert r.header("Backstream-Url") == srv.url
    r = handshake(srv, None)
    assert r.status == 101
    assert r.header("Backstream-Url") == srv.url


def test_unknown_name_404_and_default_route_503(procs: ProcessPool) -> None:
    """On a --domain server with no client: a Host (or header) naming an unknown tunnel
    gets 404 ``no tunnel named NAME``; the domain itself, a Host outside it (also one
    that merely ends like it) and the bare address are for the default tunnel: 503."""
    srv = procs.server("--domain", DOMAIN)
    for host in (f"ghost.{DOMAIN}", f"GHOST.Tunnel.Test.:{srv.port}"):
        r = via_host(srv, host)
        assert (r.status, r.body) == (404, b"no tunnel named ghost\n"), host
    srv.wait_for_count(
        r"GET /anything stream=- status=404 error='no tunnel named ghost' .* tunnel=ghost",
        2,
        TIMEOUTS.request,
    )
    r = via_header(srv, "ghost")
    assert (r.status, r.body) == (404, b"no tunnel named ghost\n")
    assert via_header(srv, "-ghost").status == 400
    for host in (DOMAIN, f"{DOMAIN}:{srv.port}", f"ghost{DOMAIN}", "example.org", srv.netloc):
        r = via_host(srv, host)
        assert r.status == 503, (host, r.status, r.body)


def test_name_grace_then_released(procs: ProcessPool) -> None:
    """When the owner of a name leaves, the name stays reserved for --name-grace
    seconds: requests get 503, clients with other (or no) credentials get 409, the owner
    gets it back; once the grace has passed after its last client left, requests get
    404 and anyone may claim the name."""
    app = procs.local_app()
    srv = procs.server("--domain", DOMAIN, "--name-grace", "1.5")
    owner = named_client(procs, srv, app, "keep", "-H", "Authorization: Bearer alpha")
    assert forwarding(owner)[0] == f"http://keep.{DOMAIN}:{srv.port}"
    host = f"keep.{DOMAIN}"
    assert via_host(srv, host).status == 200

    mark = srv.mark()
    owner.kill()
    srv.wait_for(r"client disconnected", TIMEOUTS.request, start=mark)
    r = via_host(srv, host)
    assert r.status == 503, (r.status, r.body)
    for auth in ("Bearer beta", None):
        r = handshake(srv, "keep", auth=auth)
        assert r.status == 409, (auth, r.status, r.body)
        assert b"name keep is in use" in r.body, r.body
    mark = srv.mark()
    with hold(srv, "keep", auth="Bearer alpha") as (_, granted):
        assert granted.header("Backstream-Name") == "keep"
        assert granted.header("Backstream-Url") == f"http://keep.{DOMAIN}:{srv.port}"
        left = time.monotonic()  # the server sees this client leave after this instant
    srv.wait_for(r"client disconnected", TIMEOUTS.request, start=mark)
    assert via_host(srv, host).status == 503

    wait_until(lambda: via_host(srv, host).status != 503, timeout=15, interval=0.1)
    assert time.monotonic() - left >= 1.3, "released before the grace had passed"
    r = via_host(srv, host)
    assert (r.status, r.body) == (404, b"no tunnel named keep\n")
    assert handshake(srv, "keep", auth="Bearer beta").status == 101
    assert app.hits() == 1


def test_reserved_name_answers_the_no_client_code(procs: ProcessPool) -> None:
    """During the grace (here set by BACKSTREAM_NAME_GRACE) a reserved name whose
    clients are all away answers the no-client status chosen with -c, not 503."""
    app = procs.local_app()
    srv = procs.server("--domain", DOMAIN, "-c", "502", env={"BACKSTREAM_NAME_GRACE": "120"})
    owner = named_client(procs, srv, app, "away")
    forwarding(owner)
    host = f"away.{DOMAIN}"
    assert via_host(srv, host).status == 200
    mark = srv.mark()
    owner.kill()
    srv.wait_for(r"client disconnected", TIMEOUTS.request, start=mark)
    r = via_host(srv, host)
    assert r.status == 502, (r.status, r.body)
    assert b"no tunnel named" not in r.body, r.body


# -- pools and ownership -----------------------------------------------------------------


def _waiting(app: LocalApp) -> int:
    return sum(1 for state in app.stats()["drips"].values() if state == "waiting")


def test_pool_least_in_flight_and_members_leaving(procs: ProcessPool) -> None:
    """Three clients with one name and one Authorization form a pool. (a) Each request
    goes to the member with the fewest streams in flight: with 4 held on A, 6 more
    held requests split 3/3 over B and C, and 9 quick ones never reach A and are shared
    4/5 by B and C (round robin between equals). (b) A request in flight on a member that
    dies fails 502 and is not re-sent; once two members are gone every request is
    served by the third."""
    apps = [procs.local_app() for _ in range(3)]
    srv = procs.server("--domain", DOMAIN)
    host = f"pool.{DOMAIN}"
    auth = ["-H", "Authorization: Bearer same"]
    clients = [named_client(procs, srv, apps[0], "pool", *auth)]
    forwarding(clients[0])
    held: list[tuple[http.client.HTTPConnection, http.client.HTTPResponse]] = []
    try:
        for i in range(4):
            held.append(stream_request(srv, "GET", f"/drip?token=a{i}", [("Host", host)]))
        wait_until(lambda: _waiting(apps[0]) == 4, timeout=TIMEOUTS.request)
        clients += [named_client(procs, srv, app, "pool", *auth) for app in apps[1:]]
        for cli in clients[1:]:
            assert forwarding(cli)[0] == f"http://pool.{DOMAIN}:{srv.port}"
        for i in range(6):
            held.append(stream_request(srv, "GET", f"/drip?token=h{i}", [("Host", host)]))
        wait_until(lambda: sum(map(_waiting, apps)) == 10, timeout=TIMEOUTS.request)
        assert [_waiting(app) for app in apps] == [4, 3, 3]

        before = [app.hits() for app in apps]
        for i in range(9):
            r = via_host(srv, host, f"/quick?i={i}")
            assert r.status == 200, r.body
        quick = [app.hits() - b for app, b in zip(apps, before, strict=True)]
        assert quick[0] == 0, quick
        assert sorted(quick[1:]) == [4, 5], quick  # B and C are tied: they take turns
    finally:
        for app in apps:
            for token in app.stats()["drips"]:
                app.release(token)
        for conn, resp in held:
            try:
                assert resp.status == 200
                assert resp.read() == b"first\nlast\n"
            finally:
                conn.close()

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(via_host, srv, host, "/slow?delay=60")
        busy = wait_until(
            lambda: [i for i, app in enumerate(apps) if app.stats()["slow_inflight"]],
            timeout=TIMEOUTS.request,
        )
        assert len(busy) == 1, busy
        victim = busy[0]
        before = [app.hits() for app in apps]
        mark = srv.mark()
        clients[victim].kill()
        r = slow.result(TIMEOUTS.request)
        assert r.status == 502, (r.status, r.body)
        assert [app.hits() for app in apps] == before, "an in-flight request was re-sent"

    survivor = (victim + 1) % 3
    second = 3 - victim - survivor
    clients[second].kill()
    srv.wait_for_count(r"client disconnected", 2, TIMEOUTS.request, start=mark)
    before_survivor = apps[survivor].hits()
    for i in range(10):
        r = via_host(srv, host, f"/after?i={i}")
        assert r.status == 200, (i, r.status, r.body)
    assert apps[survivor].hits() - before_survivor == 10


def test_name_owned_by_first_credentials(procs: ProcessPool) -> None:
    """The first client's Authorization owns the name: a client claiming it with other
    credentials is refused 409 ``name NAME is in use``, logs status=409 and exits 2; a
    handshake without credentials is refused too; the owner's requests never reach the
    intruder's app."""
    owner_app, intruder_app = procs.local_app(), procs.local_app()
    srv = procs.server("--domain", DOMAIN)
    owner = named_client(procs, srv, owner_app, "shared", "-H", "Authorization: Bearer alpha")
    forwarding(owner)
    intruder = named_client(procs, srv, intruder_app, "shared", "-H", "Authorization: Bearer beta")
    assert intruder.wait_exit(TIMEOUTS.connect) == 2, intruder.output()
    assert intruder.count(r"status=409") >= 1, intruder.output()
    assert "name shared is in use" in intruder.output()
    assert intruder.count(CLIENT_READY) == 0
    r = handshake(srv, "Shared")
    assert r.status == 409 and b"name shared is in use" in r.body, (r.status, r.body)

    for i in range(20):
        r = via_host(srv, f"shared.{DOMAIN}", f"/anything?i={i}")
        assert r.status == 200, r.body
    assert owner_app.hits() == 20
    assert intruder_app.hits() == 0
    assert owner.alive()


# -- policies, WebSockets, limits, URLs ----------------------------------------------------

CLIENT_POLICY = """package auth.client

import rego.v1

default allow := false

allow if input.name != "forbidden"
"""

SERVER_POLICY = """package auth.server

import rego.v1

default allow := false

allow if input.tunnel == "public"
"""


def test_policies_see_the_name_and_the_tunnel(procs: ProcessPool, tmp_path: Path) -> None:
    """``auth.client`` gets ``input.name``: a policy refusing "forbidden" denies that
    client (403, "denied by server policy") and admits others; ``auth.server`` gets
    ``input.tunnel``, the routed name (by Host or by header): only tunnel "public"
    is let through, "private" gets 403 and its app sees nothing."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "client.rego").write_text(CLIENT_POLICY, encoding="utf-8")
    (policies / "server.rego").write_text(SERVER_POLICY, encoding="utf-8")
    public_app, private_app = procs.local_app(), procs.local_app()
    srv = procs.server("--domain", DOMAIN, "-p", str(policies))
    denied = named_client(procs, srv, "http://127.0.0.1:9", "forbidden")
    public = named_client(procs, srv, public_app, "public")
    private = named_client(procs, srv, private_app, "private")
    denied.wait_for(r"denied by server policy", TIMEOUTS.connect)
    forwarding(public)
    forwarding(private)
    assert denied.count(CLIENT_READY) == 0

    assert via_host(srv, f"public.{DOMAIN}").status == 200
    assert via_header(srv, "public").status == 200
    r = via_host(srv, f"private.{DOMAIN}")
    assert r.status == 403, (r.status, r.body)
    assert via_header(srv, "private").status == 403
    assert (public_app.hits(), private_app.hits()) == (2, 0)


def test_websocket_through_a_named_tunnel(procs: ProcessPool) -> None:
    """A public WebSocket reaches the named tunnel chosen by its Host (or by the
    Backstream-Tunnel header, which the app never sees) and echoes text and binary
    messages; an upgrade for an unknown name is refused 404."""
    app = procs.local_app()
    srv = procs.server("--domain", DOMAIN)
    forwarding(named_client(procs, srv, app, "ws"))
    binary = bytes(range(256)) * 64

    async def talk() -> None:
        conn = await _ws_open(srv, "/ws/echo?room=1", {"Host": f"ws.{DOMAIN}:{srv.port}"})
        greeting = json.loads(str(await _ws_read(conn)))
        assert greeting["uri"] == "/ws/echo?room=1"
        await conn.write_message("hello through ws")
        assert await _ws_read(conn) == "hello through ws"
        await conn.write_message(binary, binary=True)
        assert await _ws_read(conn) == binary
        conn.close(4002, "bye")

        conn = await _ws_open(srv, "/ws/echo?room=2", {"Backstream-Tunnel": "ws"})
        greeting = json.loads(str(await _ws_read(conn)))
        assert greeting["uri"] == "/ws/echo?room=2"
        names = [name.lower() for name, _ in greeting["headers"]]
        assert "backstream-tunnel" not in names
        await conn.write_message("by header")
        assert await _ws_read(conn) == "by header"
        conn.close(4003, "bye")

        with pytest.raises(httpclient.HTTPClientError) as info:
            await _ws_open(srv, "/ws/echo", {"Host": f"ghost.{DOMAIN}"})
        assert info.value.code == 404

    asyncio.run(talk())
    app.wait_for(r'ws-closed "/ws/echo\?room=1" code=4002', timeout=TIMEOUTS.request)
    app.wait_for(r'ws-closed "/ws/echo\?room=2" code=4003', timeout=TIMEOUTS.request)
    # each access line names the tunnel: opened, closed, refused
    srv.wait_for_count(r"WEBSOCKET /ws/echo stream=\d+ status=101 open tunnel=ws$", 2, 5)
    srv.wait_for_count(r"WEBSOCKET /ws/echo stream=\d+ closed code=\d+ tunnel=ws$", 2, 5)
    srv.wait_for(r"WEBSOCKET /ws/echo status=404 error='no tunnel named ghost' tunnel=ghost$", 5)


def test_max_tunnels(procs: ProcessPool) -> None:
    """With --max-tunnels 2 (set here by its variable) and two names held, a third
    name is refused 503 with a body saying "maximum", from a handshake and from a real
    client (which logs the refusal and never connects); a server-assigned random name is
    refused too."""
    srv = procs.server("--domain", DOMAIN, env={"BACKSTREAM_MAX_TUNNELS": "2"})
    with hold(srv, "one") as (_, one), hold(srv, "two") as (_, two):
        assert one.header("Backstream-Name") == "one"
        assert two.header("Backstream-Url") == f"http://two.{DOMAIN}:{srv.port}"
        for name in ("three", None):
            r = handshake(srv, name)
            assert r.status == 503, (name, r.status, r.body)
            assert b"maximum" in r.body, r.body
        cli = named_client(procs, srv, "http://127.0.0.1:9", "four")
        cli.wait_for(r"status=503.*maximum", TIMEOUTS.connect)
        assert cli.count(CLIENT_READY) == 0


def test_tunnel_urls_in_the_handshake_answer(procs: ProcessPool) -> None:
    """The 101 carries ``Backstream-Name`` and ``Backstream-Url``: ``http://NAME.D:PORT``
    with the port of the Host the client connected to (none when it is the default);
    with --public-url (here set by BACKSTREAM_DOMAIN and BACKSTREAM_PUBLIC_URL) its
    scheme and port, also for a random name; --public-url without --domain: the public
    URL itself, named or not."""
    srv = procs.server("--domain", DOMAIN)
    for host, url in (
        (srv.netloc, f"http://myapp.{DOMAIN}:{srv.port}"),
        ("gateway.local", f"http://myapp.{DOMAIN}"),
        ("gateway.local:80", f"http://myapp.{DOMAIN}"),
        ("gateway.local:8080", f"http://myapp.{DOMAIN}:8080"),
    ):
        r = handshake(srv, "MyApp", host=host)
        assert r.status == 101, (host, r.status, r.body)
        assert r.header("Backstream-Name") == "myapp"
        assert r.header("Backstream-Url") == url, host

    public = procs.server(
        env={
            "BACKSTREAM_DOMAIN": "tunnel.example.com",
            "BACKSTREAM_PUBLIC_URL": "https://tunnel.example.com",
        }
    )
    r = handshake(public, "myapp")
    assert r.status == 101
    assert r.header("Backstream-Url") == "https://myapp.tunnel.example.com"
    r = handshake(public, None)
    assert r.status == 101
    name = r.header("Backstream-Name") or ""
    assert RANDOM_NAME.fullmatch(name), name
    assert r.header("Backstream-Url") == f"https://{name}.tunnel.example.com"

    bare = procs.server("--public-url", "https://pub.example.com:8443")
    for name in ("x", None):
        r = handshake(bare, name)
        assert r.status == 101
        assert r.header("Backstream-Url") == "https://pub.example.com:8443", name
