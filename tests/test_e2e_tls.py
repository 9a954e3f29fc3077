"""TLS on the public port and towards the local app, and the shared token (issue #10).

Certificates are made on the fly by ``trustme`` for 127.0.0.1: a server with
``--tls-cert`` serves HTTPS and WSS on one port, the client verifies it
against ``--ca`` (or refuses it), ``--insecure`` is warned about at every
connect, ``SIGHUP`` loads a renewed certificate, and an ``https://`` local app
is verified with ``--dst-ca`` or not at all with ``--dst-insecure``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from harness import TIMEOUTS, Proc, ProcessPool, Server, request, wait_until
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-token-never-logged"


def _issue(tmp: Path, ca: trustme.CA, name: str) -> tuple[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return str(cert_file), str(key_file)


@pytest.fixture
def ca(tmp_path: Path) -> trustme.CA:
    return trustme.CA()


def _ca_file(tmp: Path, ca: trustme.CA, name: str = "ca") -> str:
    path = tmp / f"{name}.crt"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def _tls_server(procs: ProcessPool, tmp: Path, ca: trustme.CA, *args: str) -> Server:
    cert, key = _issue(tmp, ca, "server")
    return procs.server("--tls-cert", cert, "--tls-key", key, *args)


def _https(srv: Server, ca_file: str, path: str, headers: Any = ()) -> Any:
    context = ssl.create_default_context(cafile=ca_file)
    conn = http.client.HTTPSConnection(
        "127.0.0.1", srv.port, context=context, timeout=TIMEOUTS.request
    )
    try:
        return request(srv, "GET", path, headers=headers, conn=conn)
    finally:
        conn.close()


def _served_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_https_and_wss_on_one_port_verified_with_ca(
    procs: ProcessPool, tmp_path: Path, ca: trustme.CA
) -> None:
    app = procs.local_app()
    srv = _tls_server(procs, tmp_path, ca)
    assert "listening url=https://127.0.0.1:" in srv.output()
    ca_file = _ca_file(tmp_path, ca)
    cli = procs.client(f"https://127.0.0.1:{srv.port}", app, "--ca", ca_file)
    cli.wait_for(rf"connected to server url=wss://127\.0\.0\.1:{srv.port}", TIMEOUTS.connect)
    r = _https(srv, ca_file, "/anything/over-tls?x=1")
    assert r.status == 200, r.body
    seen = r.json()
    assert seen["uri"] == "/anything/over-tls?x=1"
    forwarded = {k.lower(): v for k, v in seen["headers"]}
    assert forwarded["x-forwarded-proto"] == "https"

    async def websocket() -> Any:
        context = ssl.create_default_context(cafile=ca_file)
        conn = await websocket_connect(
            HTTPRequest(f"wss://127.0.0.1:{srv.port}/ws/echo", ssl_options=context)
        )
        greeting = await conn.read_message()
        await conn.write_message("over wss")
        echoed = await conn.read_message()
        conn.close()
        return greeting, echoed

    greeting, echoed = asyncio.run(asyncio.wait_for(websocket(), TIMEOUTS.request))
    assert json.loads(greeting)["uri"] == "/ws/echo" and echoed == "over wss"


def test_client_refuses_an_unknown_certificate_unless_insecure(
    procs: ProcessPool, tmp_path: Path, ca: trustme.CA
) -> None:
    app = procs.local_app()
    srv = _tls_server(procs, tmp_path, ca)
    src = f"https://127.0.0.1:{srv.port}"
    # The system store does not know the test CA: verified, refused, retried.
    strict = procs.client(src, app, "--max-backoff", "1", wait=False)
    strict.wait_for(r"cannot connect to server url=wss://\S+: .*CERTIFICATE_VERIFY_FAILED", 15)
    assert "connected to server" not in strict.output()
    # A CA that did not sign it is refused the same way.
    other = _ca_file(tmp_path, trustme.CA(), "other")
    wrong = procs.client(src, app, "--ca", other, "--max-backoff", "1", wait=False)
    wrong.wait_for(r"CERTIFICATE_VERIFY_FAILED", 15)
    # --insecure connects, and says so before every connect.
    loose = procs.client(src, app, "--insecure")
    assert loose.count(r"WARNING .*not verifying the server's certificate \(--insecure\)") == 1
    r = _https(srv, _ca_file(tmp_path, ca), "/anything/x")
    assert r.status == 200
    srv.kill()
    procs.server(*srv.args, port=srv.port)
    loose.wait_connected(2)
    assert loose.count(r"not verifying the server's certificate") == 2


def test_sighup_loads_a_renewed_certificate_and_keeps_a_broken_one_out(
    procs: ProcessPool, tmp_path: Path, ca: trustme.CA
) -> None:
    app = procs.local_app()
    cert, key = _issue(tmp_path, ca, "live")
    srv = procs.server("--tls-cert", cert, "--tls-key", key)
    ca_file = _ca_file(tmp_path, ca)
    procs.client(f"https://127.0.0.1:{srv.port}", app, "--ca", ca_file)
    first = _served_certificate(srv.port)
    renewed_ca = trustme.CA()
    new_cert, new_key = _issue(tmp_path, renewed_ca, "renewed")
    Path(cert).write_bytes(Path(new_cert).read_bytes())
    Path(key).write_bytes(Path(new_key).read_bytes())
    srv.signal(signal.SIGHUP)
    srv.wait_for(r"certificate reloaded", 10)
    second = _served_certificate(srv.port)
    assert second != first
    r = _https(srv, _ca_file(tmp_path, renewed_ca, "renewed-ca"), "/anything/renewed")
    assert r.status == 200
    # A broken file, then a certificate with another one's key (certbot half done):
    # an error line each, and the renewed certificate stays in force, still serving.
    Path(cert).write_text("not a certificate")
    srv.signal(signal.SIGHUP)
    srv.wait_for(r"ERROR .*certificate not reloaded, the old one stays in force", 10)
    assert _served_certificate(srv.port) == second
    third_cert, _ = _issue(tmp_path, trustme.CA(), "third")
    Path(cert).write_bytes(Path(third_cert).read_bytes())  # key: still the renewed one's
    mark = srv.mark()
    srv.signal(signal.SIGHUP)
    srv.wait_for(r"ERROR .*certificate not reloaded", 10, start=mark)
    assert _served_certificate(srv.port) == second
    r = _https(srv, _ca_file(tmp_path, renewed_ca, "renewed-ca"), "/anything/still")
    assert r.status == 200


def test_https_local_app_verified_with_dst_ca_or_insecure(
    procs: ProcessPool, tmp_path: Path, ca: trustme.CA
) -> None:
    cert, key = _issue(tmp_path, ca, "app")
    app = procs.local_app(args=("--tls-cert", cert, "--tls-key", key))
    dst = f"https://127.0.0.1:{app.port}"
    srv = procs.server()
    verified = procs.client(srv, dst, "--dst-ca", _ca_file(tmp_path, ca))
    r = request(srv, "GET", "/anything/to-https-app")
    assert r.status == 200 and r.json()["uri"] == "/anything/to-https-app"
    verified.kill()
    # Without the CA the app's certificate is refused: 502, never a silent downgrade.
    strict = procs.client(srv, dst)
    r = request(srv, "GET", "/anything/unverified")
    assert r.status == 502, r.body
    strict.kill()
    procs.client(srv, dst, "--dst-insecure")
    r = request(srv, "GET", "/anything/insecure")
    assert r.status == 200


def test_token_required_from_clients_never_forwarded_never_logged(
    procs: ProcessPool, tmp_path: Path
) -> None:
    app = procs.local_app()
    srv = procs.server("--token", TOKEN)
    assert "no policy in force" not in srv.output()
    missing = procs.client(srv, app, "--max-backoff", "1", wait=False)
    missing.wait_for(r"server refused the tunnel url=\S+ status=401 missing or wrong token", 15)
    wrong = procs.client(
        srv, app, "--max-backoff", "1", wait=False, env={"BACKSTREAM_TOKEN": "guess"}
    )
    wrong.wait_for(r"status=401", 15)
    srv.wait_for(r"refused tunnel client remote=127\.0\.0\.1 status=401: missing or wrong token", 5)
    missing.kill()
    wrong.kill()
    har = tmp_path / "har"
    good = procs.client(srv, app, "-o", str(har), "--log-level", "debug", "--token", TOKEN)
    # A caller's own Backstream-Token header is the server's alone: never relayed.
    r = request(srv, "GET", "/anything/t", headers=[("Backstream-Token", TOKEN)])
    assert r.status == 200
    assert "backstream-token" not in {k.lower() for k, _ in r.json()["headers"]}
    assert TOKEN.encode() not in r.body
    wait_until(lambda: any(har.glob("*.har")), TIMEOUTS.request)
    time.sleep(0.5)
    for proc in (srv, good, app):
        assert TOKEN not in proc.output(), proc.name
    for path in har.glob("*.har"):
        assert TOKEN not in path.read_text()


def test_token_and_policy_must_both_allow(procs: ProcessPool, tmp_path: Path) -> None:
    policy = tmp_path / "client.rego"
    policy.write_text(
        "package auth.client\n"
        "default allow := false\n"
        'allow if input.header["X-Team"] == "blue"\n'
    )
    (tmp_path / "server.rego").write_text("package auth.server\ndefault allow := true\n")
    app = procs.local_app()
    srv = procs.server("--token", TOKEN, "-p", str(tmp_path))
    denied = procs.client(srv, app, "--token", TOKEN, "--max-backoff", "1", wait=False)
    denied.wait_for(r"denied by server policy url=\S+ status=403", 15)
    denied.kill()
    no_token = procs.client(srv, app, "-H", "X-Team: blue", "--max-backoff", "1", wait=False)
    no_token.wait_for(r"status=401", 15)
    no_token.kill()
    procs.client(srv, app, "-H", "X-Team: blue", "--token", TOKEN)
    assert request(srv, "GET", "/anything/both").status == 200


def test_open_server_warns_once_started_and_tls_flags_go_together(
    procs: ProcessPool, tmp_path: Path
) -> None:
    srv = procs.server()
    srv.wait_for(r"WARNING .*no policy in force: anyone may connect .*--token", 5)
    half = Proc(
        "server",
        [sys.executable, "-m", "backstream", "serve", "-a", "127.0.0.1:0", "--tls-cert", "x"],
    )
    procs.add(half)
    assert half.wait_exit(TIMEOUTS.startup) == 2
    assert "--tls-cert and --tls-key go together" in half.output()
    missing = Proc(
        "server",
        [
            sys.executable,
            "-m",
            "backstream",
            "serve",
            "-a",
            "127.0.0.1:0",
            "--tls-cert",
            str(tmp_path / "none.pem"),
            "--tls-key",
            str(tmp_path / "none.key"),
        ],
    )
    procs.add(missing)
    assert missing.wait_exit(TIMEOUTS.startup) == 2
    assert "cannot read certificate or key" in missing.output()
