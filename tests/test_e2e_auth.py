"""Issue 3, end to end: Rego policies on the tunnel handshake and on public requests.

Every test runs real processes on 127.0.0.1 (``backstream serve -p ...``, ``backstream
client``, the local app and, for the remote backend, ``tests/opa_fake.py``, an
OPA-REST-compatible server evaluating real Rego). The local app's hit counter proves
that a denied (or failed) request never reached it. The allow/deny cases are shared by
both backends through the ``backend`` fixture (``rego``: embedded, ``opa``: remote).
"""

from __future__ import annotations

import http.client
import os
import re
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    REPO,
    TIMEOUTS,
    Client,
    LocalApp,
    Proc,
    ProcessPool,
    Response,
    Server,
    request,
    run_cli,
)

pytestmark = pytest.mark.timeout(90)

POLICIES = REPO / "policies"
WEBHOOKS_ONLY = str(POLICIES / "webhooks-only")
BASIC_AUTH = str(POLICIES / "basic-auth")

#: The tunnel client's secret; it must never show up in any log.
TOKEN = "e2e-client-token-9b1f3c7d5a"
#: Another client's wrong secret; it must not show up either.
WRONG_TOKEN = "e2e-wrong-token-4e8a2f6c1d"
#: A visitor's credential on public requests.
VISITOR_TOKEN = "e2e-visitor-token-0c5e7a3b9f"

CLIENT_POLICY = f"""\
package auth.client

import rego.v1

default allow := false

allow if input.header.Authorization == "Bearer {TOKEN}"
"""

#: ``auth.server`` that allows exactly one path (for the reload tests).
PATH_POLICY = """\
package auth.server

import rego.v1

default allow := false

allow if input.path == "{path}"
"""

BROKEN_POLICY = """\
package auth.server

import rego.v1

default allow := false

allow if {
	input.path ==
}
"""

BIG = 5 * 1024 * 1024

SERVER_CONNECTED = r"client connected tunnel="
CLIENT_DISCONNECTED = r"disconnected from server"
CLIENT_DENIED = r"denied by server policy url=\S+ status=403"
SERVER_DENIED_CLIENT = r"denied by policy package=auth\.client "
SERVER_DENIED_PUBLIC = r"denied by policy package=auth\.server "
POLICY_FAILED = r"policy evaluation failed package=auth\.server "
RECONNECTING = re.compile(r"reconnecting in (\d+(?:\.\d+)?)s attempt=(\d+)")


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None


# -- helpers ---------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one step, so a watcher never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")  # not *.rego: never loaded
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"


def assert_status(r: Response, status: int) -> None:
    assert r.status == status, (r.status, r.reason, r.body[:300])
    if status in (403, 500):
        assert (r.header("Content-Type") or "").startswith("text/plain"), r.headers
        assert len(r.body) < 300 and b"Traceback" not in r.body, r.body


def start_opa(procs: ProcessPool, *paths: str) -> tuple[Proc, str]:
    """``tests/opa_fake.py -p PATH...`` as a subprocess; ready once it prints its URL."""
    argv = [sys.executable, str(REPO / "tests" / "opa_fake.py")]
    for path in paths:
        argv += ["-p", path]
    opa = Proc("opa_fake", argv)
    procs.add(opa)
    url = opa.wait_for(r"^(http://127\.0\.0\.1:\d+)$", TIMEOUTS.startup).group(1)
    return opa, url


@dataclass
class Gateway:
    """A server enforcing policies, the local app, and a client holding the token."""

    backend: str
    server: Server
    app: LocalApp
    client: Client
    opa: Proc | None = None


def start_gateway(
    procs: ProcessPool,
    backend: str,
    policy_paths: Sequence[str],
    *server_args: str,
    client_args: Sequence[str] = (),
) -> Gateway:
    """The same policies enforced by the embedded engine or served by the fake OPA."""
    opa: Proc | None = None
    if backend == "rego":
        args = [arg for path in policy_paths for arg in ("-p", path)]
    else:
        opa, url = start_opa(procs, *policy_paths)
        args = ["--auth", "opa", "--opa-url", url]
    app = procs.local_app()
    srv = procs.server(*args, *server_args)
    cli = procs.client(srv, app, "-H", bearer(TOKEN), *client_args)
    return Gateway(backend, srv, app, cli, opa)


@pytest.fixture(params=["rego", "opa"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def client_policy(tmp_path: Path) -> str:
    path = tmp_path / "client" / "client.rego"
    path.parent.mkdir()
    path.write_text(CLIENT_POLICY, encoding="utf-8")
    return str(path)


def headers_only(srv: Server, method: str, path: str, length: int) -> Response:
    """Send only the head of a request announcing ``length`` body bytes, then read the
    response: it can only arrive if the server decided at header time."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUTS.request)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()  # no body byte is ever sent
        resp = conn.getresponse()
        return Response(resp.status, resp.reason, resp.getheaders(), resp.read())
    finally:
        conn.close()


def post_like_curl(srv: Server, path: str, size: int) -> tuple[int, int]:
    """POST ``size`` body bytes the way curl does: keep reading while sending, and stop
    sending once the answer is in (a server may answer early and close without reading
    the body). Returns the status and how many body bytes were sent."""
    head = f"POST {path} HTTP/1.1\r\nHost: {srv.netloc}\r\nContent-Length: {size}\r\n\r\n"
    chunk = b"\0" * 65536
    sent = 0
    received = b""
    deadline = time.monotonic() + TIMEOUTS.request
    with socket.create_connection(("127.0.0.1", srv.port), TIMEOUTS.request) as s:
        s.sendall(head.encode())
        s.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while b"\r\n\r\n" not in received:
                left = deadline - time.monotonic()
                assert left > 0, f"no answer after sending {sent} of {size} bytes"
                for _, events in sel.select(left):
                    if events & selectors.EVENT_READ:
                        try:
                            data = s.recv(65536)
                        except ConnectionResetError:
                            data = b""
                        assert data, f"closed without an answer: {received!r}"
                        received += data
                    elif events & selectors.EVENT_WRITE:
                        try:
                            sent += s.send(chunk[: size - sent])
                        except BlockingIOError:
                            pass
                        except (BrokenPipeError, ConnectionResetError):
                            size = sent  # the server stopped reading: just listen
                        if sent >= size:
                            sel.modify(s, selectors.EVENT_READ)
    return int(received.split(b" ", 2)[1]), sent


def check_case(gw: Gateway, case: Case) -> None:
    """One public request: its status, and whether the local app saw it."""
    before = gw.app.hits()
    r = request(gw.server, case.method, case.path, case.headers, case.body)
    assert_status(r, case.status)
    reached = gw.app.hits() - before
    assert reached == (1 if case.status == 200 else 0), (case, reached)
    if case.status == 200 and case.method != "HEAD":
        assert r.json()["uri"] == case.path


# -- 1. the tunnel handshake -----------------------------------------------------------


def test_client_without_token_refused_with_slow_backoff(
    procs: ProcessPool, client_policy: str
) -> None:
    app = procs.local_app()
    srv = procs.server("-p", client_policy, "-p", WEBHOOKS_ONLY)
    refused = procs.client(srv, app, wait=False)
    wrong = procs.client(srv, app, "-H", bearer(WRONG_TOKEN), wait=False)
    good = procs.client(srv, app, "-H", bearer(TOKEN))  # waits for "connected to server"

    refused.wait_for(CLIENT_DENIED)
    wrong.wait_for(CLIENT_DENIED)
    srv.wait_for(SERVER_CONNECTED)  # logged just after the client's "connected"
    assert srv.count(SERVER_CONNECTED) == 1, srv.output()
    r = request(srv, "GET", "/webhooks/ok")
    assert_status(r, 200)  # through the one client that holds the token

    # The refused client keeps retrying, much more slowly than after a network error
    # (0.5-1 s, then 1-2 s): after a policy refusal every delay is 8 times longer.
    retries = refused.wait_for_count(RECONNECTING, 2, 30.0)
    delays = [float(m.group(1)) for m in retries]
    attempts = [int(m.group(2)) for m in retries]
    assert attempts == [2, 3]  # the number of the connection attempt to come
    assert delays[0] >= 4.0, delays
    assert delays[1] >= delays[0], delays
    # Neither got in, nor hammered the server: two attempts each at most by now (the
    # next ones are 8 s or more away), each refused on the handshake.
    assert refused.connected_count() == 0 and wrong.connected_count() == 0
    assert refused.count(CLIENT_DENIED) == 2, refused.output()
    srv.wait_for_count(SERVER_DENIED_CLIENT, 3)
    assert srv.count(SERVER_DENIED_CLIENT) <= 4, srv.output()
    assert srv.count(SERVER_CONNECTED) == 1, srv.output()
    assert good.connected_count() == 1 and good.count(CLIENT_DISCONNECTED) == 0


# -- 2 and 4. public requests, both backends ---------------------------------------------


#: ``policies/webhooks-only``: GET/HEAD/POST under /webhooks/, no ambiguous paths.
WEBHOOK_CASES = [
    Case("GET", "/webhooks/stripe", 200),
    Case("GET", "/webhooks/stripe?v=1&v=2", 200),
    Case("POST", "/webhooks/github", 200, (("Content-Type", "application/json"),), b"{}"),
    Case("HEAD", "/webhooks/head", 200),
    Case("GET", "/", 403),
    Case("GET", "/admin?next=/webhooks/x", 403),
    Case("PUT", "/webhooks/put", 403, (), b"data"),
    Case("DELETE", "/webhooks/x", 403),
    Case("GET", "/webhooks/../admin", 403),
    Case("GET", "/webhooks/%2e%2e/admin", 403),
    Case("GET", "/webhooks//admin", 403),
    Case("POST", "/admin", 403, (), b"x" * 10_000),
]

#: ``policies/basic-auth``: alice:wonderland (YWxpY2U6d29uZGVybGFuZA==).
BASIC_CASES = [
    Case("GET", "/private", 200, (("Authorization", "Basic YWxpY2U6d29uZGVybGFuZA=="),)),
    Case("GET", "/private", 403),
    Case("GET", "/private", 403, (("Authorization", "Basic YWxpY2U6d3Jvbmc="),)),  # alice:wrong
    Case("GET", "/private", 403, (("Authorization", "Basic !!notbase64"),)),
    Case("GET", "/private", 403, (("Authorization", f"Bearer {VISITOR_TOKEN}"),)),
]


def test_public_requests_per_policy(procs: ProcessPool, backend: str, client_policy: str) -> None:
    gw = start_gateway(procs, backend, [client_policy, WEBHOOKS_ONLY])
    for case in WEBHOOK_CASES:
        check_case(gw, case)
    denied = sum(1 for c in WEBHOOK_CASES if c.status == 403)
    # Log lines reach the pipes a little after the responses: wait, then count exactly.
    gw.server.wait_for_count(SERVER_DENIED_PUBLIC, denied)
    gw.server.wait_for(r"access: POST /admin stream=- status=403")  # the last case
    assert gw.server.count(SERVER_DENIED_PUBLIC) == denied, gw.server.output()
    assert gw.server.count(POLICY_FAILED) == 0, gw.server.output()
    gw.app.wait_for_count(r"^hit ", len(WEBHOOK_CASES) - denied)
    assert gw.app.count(r"^hit ") == len(WEBHOOK_CASES) - denied


def test_basic_auth_visitors(procs: ProcessPool, backend: str, client_policy: str) -> None:
    gw = start_gateway(procs, backend, [client_policy, BASIC_AUTH])
    for case in BASIC_CASES:
        check_case(gw, case)
    denied = sum(1 for c in BASIC_CASES if c.status == 403)
    gw.server.wait_for_count(r"access: GET /private stream=- status=403", denied)
    # Malformed credentials are a plain deny, not an engine failure, on both backends.
    assert gw.server.count(POLICY_FAILED) == 0, gw.server.output()


def test_denied_large_body_never_forwarded(
    procs: ProcessPool, backend: str, client_policy: str
) -> None:
    gw = start_gateway(procs, backend, [client_policy, WEBHOOKS_ONLY])
    # The 403 comes at header time: no body byte has been sent when it arrives.
    assert_status(headers_only(gw.server, "POST", "/admin/upload", BIG), 403)
    # And with the body sent as it would be by curl: still 403, none of it forwarded.
    assert post_like_curl(gw.server, "/admin/upload", BIG)[0] == 403
    assert gw.app.hits() == 0
    assert gw.app.count(r"^hit ") == 0
    # No stream was ever opened (stream=-): the body read while answering was dropped.
    gw.server.wait_for_count(r"POST /admin/upload stream=- status=403 ", 2)
    # The same body on an allowed path does go through, whole.
    r = request(gw.server, "POST", "/webhooks/upload", [], b"\0" * BIG)
    assert_status(r, 200)
    assert r.json()["body_len"] == BIG
    assert gw.app.hits() == 1


def test_fail_closed_when_opa_goes_away(procs: ProcessPool, client_policy: str) -> None:
    gw = start_gateway(procs, "opa", [client_policy, WEBHOOKS_ONLY])
    assert gw.opa is not None
    assert_status(request(gw.server, "GET", "/webhooks/before"), 200)
    assert gw.app.hits() == 1
    gw.opa.kill()
    mark = gw.server.mark()
    # Allowed by the policy, still not let through; the same for a denied path.
    assert_status(request(gw.server, "GET", "/webhooks/after"), 500)
    assert_status(request(gw.server, "GET", "/admin"), 500)
    assert post_like_curl(gw.server, "/webhooks/big", BIG)[0] == 500
    assert_status(headers_only(gw.server, "POST", "/webhooks/big", BIG), 500)
    assert gw.app.hits() == 1
    gw.server.wait_for_count(POLICY_FAILED, 4, start=mark)
    assert gw.server.count(POLICY_FAILED, start=mark) == 4, gw.server.output()
    assert gw.server.count(SERVER_DENIED_PUBLIC, start=mark) == 0, gw.server.output()
    # The established tunnel is not dropped because the policy engine is down.
    assert gw.client.count(CLIENT_DISCONNECTED) == 0


def test_fail_closed_opa_unreachable(
    procs: ProcessPool, closed_port: int, client_policy: str
) -> None:
    app = procs.local_app()
    srv = procs.server("--auth", "opa", "--opa-url", f"http://127.0.0.1:{closed_port}")
    srv.wait_for(r"cannot reach OPA at http://127\.0\.0\.1:\d+ to check packages")
    assert_status(request(srv, "GET", "/webhooks/x"), 500)
    srv.wait_for(POLICY_FAILED)
    assert srv.count(SERVER_DENIED_PUBLIC) == 0
    # The handshake fails closed too: 500, which the client does not report as a denial.
    cli = procs.client(srv, app, "-H", bearer(TOKEN), wait=False)
    cli.wait_for(r"server refused the tunnel url=\S+ status=500")
    srv.wait_for(r"policy evaluation failed package=auth\.client ")
    assert cli.count(CLIENT_DENIED) == 0 and cli.connected_count() == 0
    assert app.hits() == 0


# -- 3. missing packages, no policies ------------------------------------------------------


def test_missing_server_package_denies_every_public_request(
    procs: ProcessPool, client_policy: str
) -> None:
    app = procs.local_app()
    srv = procs.server("-p", client_policy)
    srv.wait_for(r"WARNING .*policy package auth\.server is not loaded: every public request")
    assert srv.count(r"policy package auth\.client is not loaded") == 0
    procs.client(srv, app, "-H", bearer(TOKEN))
    for method, path, body in [
        ("GET", "/", None),
        ("GET", "/webhooks/x", None),
        ("POST", "/anything", b"data"),
    ]:
        assert_status(request(srv, method, path, [], body), 403)
    assert app.hits() == 0


def test_missing_client_package_denies_every_client(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server("-p", WEBHOOKS_ONLY)
    srv.wait_for(r"WARNING .*policy package auth\.client is not loaded: every tunnel client")
    cli = procs.client(srv, app, "-H", bearer(TOKEN), wait=False)
    cli.wait_for(CLIENT_DENIED)
    assert srv.count(SERVER_CONNECTED) == 0
    assert_status(request(srv, "GET", "/webhooks/x"), 503)  # allowed, but no client


def test_no_policy_warns_anyone_may_connect(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server()
    srv.wait_for(r"WARNING .*no policy in force: anyone may connect as a tunnel client")
    procs.client(srv, app)  # no token needed
    assert_status(request(srv, "GET", "/anything"), 200)
    assert app.hits() == 1


# -- 5. start-up errors ----------------------------------------------------------------------


def assert_startup_error(args: Sequence[str], pattern: str) -> str:
    result = run_cli("serve", "-a", "127.0.0.1:0", *args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "listening" not in result.stdout + result.stderr
    return lines[0]


def test_startup_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "server.rego"
    bad.write_text(BROKEN_POLICY, encoding="utf-8")
    line = BROKEN_POLICY.splitlines().index("\tinput.path ==") + 1
    assert_startup_error(
        ["-p", str(tmp_path)], rf"^backstream: error: {re.escape(str(bad))}:{line}\b"
    )


def test_startup_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert_startup_error(
        ["-p", str(missing)], rf"^backstream: error: {re.escape(str(missing))}: .*not found"
    )


def test_startup_unknown_builtin(tmp_path: Path) -> None:
    policy = tmp_path / "server.rego"
    policy.write_text(
        "package auth.server\n\nimport rego.v1\n\n"
        'allow if net.cidr_contains("10.0.0.0/8", input.remote)\n',
        encoding="utf-8",
    )
    assert_startup_error(
        ["-p", str(policy)],
        rf"^backstream: error: {re.escape(str(policy))}:5: net\.cidr_contains.*OPA backend",
    )
    # The shipped OPA-only example is refused the same way.
    assert_startup_error(
        ["-p", str(POLICIES / "ip-allowlist-opa")], r"server\.rego:\d+: net\.cidr_contains.*OPA"
    )


# -- 6. reload -----------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["watch", "sighup"])
def test_reload_swaps_policies_live(procs: ProcessPool, tmp_path: Path, trigger: str) -> None:
    (tmp_path / "client.rego").write_text(CLIENT_POLICY, encoding="utf-8")
    server_rego = tmp_path / "server.rego"
    server_rego.write_text(PATH_POLICY.format(path="/one"), encoding="utf-8")
    app = procs.local_app()
    flags = ["--policy-reload", "0.5"] if trigger == "watch" else []
    srv = procs.server("-p", str(tmp_path), *flags)
    cli = procs.client(srv, app, "-H", bearer(TOKEN))
    why = "files changed" if trigger == "watch" else "SIGHUP"

    def swap(text: str) -> int:
        mark = srv.mark()
        write_atomic(server_rego, text)
        if trigger == "sighup":
            srv.signal(signal.SIGHUP)
        return mark

    assert_status(request(srv, "GET", "/one"), 200)
    assert_status(request(srv, "GET", "/two"), 403)

    mark = swap(PATH_POLICY.format(path="/two"))
    srv.wait_for(rf"policies reloaded \({why}\)", start=mark)
    assert_status(request(srv, "GET", "/two"), 200)
    assert_status(request(srv, "GET", "/one"), 403)

    # A broken set is rejected, with the file and line, and the previous one keeps serving.
    mark = swap(BROKEN_POLICY)
    line = srv.wait_for(
        rf"ERROR .*policy reload \({why}\) rejected, keeping the previous policies: "
        rf"{re.escape(str(server_rego))}:\d+",
        start=mark,
    )
    assert srv.count(r"policies reloaded", start=mark) == 0, line.string
    assert_status(request(srv, "GET", "/two"), 200)
    assert_status(request(srv, "GET", "/one"), 403)

    # Fixed again: it is picked up.
    mark = swap(PATH_POLICY.format(path="/one"))
    srv.wait_for(rf"policies reloaded \({why}\)", start=mark)
    assert_status(request(srv, "GET", "/one"), 200)
    assert_status(request(srv, "GET", "/two"), 403)

    assert app.hits() == 4  # /one, /two, /two (old set kept), /one
    # The tunnel lived through all of it.
    assert srv.alive()
    assert srv.count(SERVER_CONNECTED) == 1, srv.output()
    assert srv.count(r"client disconnected") == 0, srv.output()
    assert cli.connected_count() == 1 and cli.count(CLIENT_DISCONNECTED) == 0


# -- 7. secrets ------------------------------------------------------------------------------


def test_tokens_never_logged_at_debug(procs: ProcessPool, backend: str, client_policy: str) -> None:
    debug = ("--log-level", "debug")
    gw = start_gateway(procs, backend, [client_policy, WEBHOOKS_ONLY], *debug, client_args=debug)
    wrong = procs.client(gw.server, gw.app, "-H", bearer(WRONG_TOKEN), *debug, wait=False)
    wrong.wait_for(CLIENT_DENIED)
    # Visitors' credentials too, relayed by the client to the app (curl logs at debug).
    visitor = [("Authorization", f"Bearer {VISITOR_TOKEN}"), ("Cookie", f"s={VISITOR_TOKEN}")]
    assert_status(request(gw.server, "GET", "/webhooks/x", visitor), 200)
    assert_status(request(gw.server, "GET", "/private", visitor), 403)
    gw.client.wait_for(r"DEBUG .*stream=\d+ GET /webhooks/x")  # debug lines are there
    gw.server.wait_for(r"GET /private stream=- status=403")
    for proc in (gw.server, gw.client, wrong):  # stopped, so that every line is in
        proc.terminate()
        proc.wait_exit()
    # The visitor's headers did pass through a logged path (the client's debug line), masked.
    assert gw.client.count(r"Authorization: \*\*\*") >= 1, gw.client.output()
    for proc in (gw.server, gw.client, wrong):
        for secret in (TOKEN, WRONG_TOKEN, VISITOR_TOKEN):
            leaks = [line for line in proc.lines if secret in line]
            assert not leaks, (proc, secret, leaks)
