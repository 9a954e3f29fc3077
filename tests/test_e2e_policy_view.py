"""Issue 14, end to end: policies see what the app will see, and secrets stay hidden.

Real processes on 127.0.0.1: ``backstream serve -p ...``, ``backstream client`` and
the local app, whose hit counter proves that a denied request never reached it.

- A deny-list on ``input.path_normalized`` (``policies/deny-paths``) refuses every
  spelling of ``/admin`` that reaches the app's ``/admin``: doubled slashes,
  encoded letters, dot segments.
- ``input.remote`` behind ``--trust-forwarded`` proxies is the caller named by
  ``X-Forwarded-For``; from anyone else it stays the TCP peer (``input.peer``).
- Every default secret header and query parameter, and the ones added with
  ``--mask-header`` / ``--mask-query``, are masked in debug logs and HAR files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import REPO, ProcessPool, Server, request, wait_until

from backstream import redact

pytestmark = pytest.mark.timeout(90)

DENY_PATHS = str(REPO / "policies" / "deny-paths")

ALLOW_CLIENTS = """\
package auth.client

import rego.v1

default allow := true
"""

#: Only the caller 10.1.2.3 may pass, and the decision says which peer it came through.
ONE_CALLER = """\
package auth.server

import rego.v1

default allow := false

allow if {
    input.remote == "10.1.2.3"
    input.peer == "127.0.0.1"
}
"""


def policy_dir(tmp_path: Path, server_policy: str | None = None) -> str:
    (tmp_path / "client.rego").write_text(ALLOW_CLIENTS)
    if server_policy is not None:
        (tmp_path / "server.rego").write_text(server_policy)
    return str(tmp_path)


def test_deny_list_on_the_normalized_path_catches_every_spelling(
    procs: ProcessPool, tmp_path: Path
) -> None:
    app = procs.local_app()
    srv = procs.server("-p", policy_dir(tmp_path), "-p", DENY_PATHS)
    procs.client(srv, app)
    for path in ("/", "/anything", "/anything/admin", "/static/admin.css"):
        assert request(srv, "GET", path).status != 403, path
    app.reset()
    for path in ("/admin", "//admin", "/%61dmin", "/x/../admin", "/x/%2e%2e/admin", "/ADMIN/x"):
        r = request(srv, "GET", path)
        assert r.status == 403, (path, r.status, r.body)
    assert app.hits() == 0


@pytest.mark.parametrize(
    "trust, forwarded_for, status",
    [
        (None, "10.1.2.3", 403),  # an untrusted caller cannot name itself
        ("127.0.0.0/8", "10.1.2.3", 200),
        ("127.0.0.0/8", "6.6.6.6, 10.1.2.3", 200),  # the caller's own claim is ignored
        ("127.0.0.0/8", "10.1.2.3, 6.6.6.6", 403),  # the proxy saw 6.6.6.6
        ("10.0.0.0/8", "10.1.2.3", 403),  # the peer is not one of the trusted proxies
    ],
)
def test_allow_list_behind_a_trusted_proxy(
    procs: ProcessPool, tmp_path: Path, trust: str | None, forwarded_for: str, status: int
) -> None:
    app = procs.local_app()
    args = ["-p", policy_dir(tmp_path, ONE_CALLER)]
    if trust is not None:
        args += ["--trust-forwarded", trust]
    srv = procs.server(*args)
    procs.client(srv, app)
    r = request(srv, "GET", "/anything", [("X-Forwarded-For", forwarded_for)])
    assert r.status == status, (r.status, r.body)


def test_forwarded_header_names_the_caller_too(procs: ProcessPool, tmp_path: Path) -> None:
    app = procs.local_app()
    srv = procs.server("-p", policy_dir(tmp_path, ONE_CALLER), "--trust-forwarded", "127.0.0.1")
    procs.client(srv, app)
    r = request(srv, "GET", "/anything", [("Forwarded", 'for="10.1.2.3:4711";proto=https')])
    assert r.status == 200, (r.status, r.body)


#: One distinct secret per default name; none may appear in any log or HAR file.
HEADER_SECRETS = {name: f"hsecret{i}x" for i, name in enumerate(redact.DEFAULT_HEADERS)}
QUERY_SECRETS = {name: f"qsecret{i}x" for i, name in enumerate(redact.DEFAULT_QUERY)}
EXTRA = {"X-Custom-Credential": "hsecretcustomx"}
EXTRA_QUERY = {"session": "qsecretcustomx"}


def _har_text(directory: Path) -> str:
    files = sorted(directory.glob("*.har"))
    assert files, "no HAR file written"
    for f in files:
        json.loads(f.read_text())  # each one valid JSON
    return "\n".join(f.read_text() for f in files)


def test_every_secret_masked_in_debug_logs_and_har(procs: ProcessPool, tmp_path: Path) -> None:
    app = procs.local_app()
    srv: Server = procs.server("--log-level", "debug")
    har = tmp_path / "har"
    cli = procs.client(
        srv,
        app,
        "--log-level",
        "debug",
        "-o",
        str(har),
        "--mask-header",
        "X-Custom-Credential",
        "--mask-query",
        "session",
    )
    query = "&".join(f"{n}={v}" for n, v in {**QUERY_SECRETS, **EXTRA_QUERY}.items())
    headers = [*HEADER_SECRETS.items(), *EXTRA.items(), ("X-Visible", "shown-value")]
    # /status/200 does not echo the request: whatever shows a secret is a leak.
    r = request(srv, "GET", f"/status/200?{query}&visible=shown-query", headers)
    assert r.status == 200
    debug = cli.wait_for(r"stream=\d+ GET /status/200\?.* headers: ")
    wait_until(lambda: list(har.glob("*.har")))
    shown = {"client": cli.output(), "server": srv.output(), "har": _har_text(har)}
    secrets = [*HEADER_SECRETS.values(), *QUERY_SECRETS.values(), *EXTRA.values()]
    secrets += EXTRA_QUERY.values()
    for where, text in shown.items():
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{where} shows {leaked}"
    assert "shown-value" in debug.string and "visible=shown-query" in debug.string
    assert "shown-value" in shown["har"] and "shown-query" in shown["har"]


def test_mask_lists_from_the_environment(procs: ProcessPool, tmp_path: Path) -> None:
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(
        srv,
        app,
        "--log-level",
        "debug",
        env={"BACKSTREAM_MASK_HEADER": "X-One,X-Two", "BACKSTREAM_MASK_QUERY": "sess"},
    )
    r = request(
        srv, "GET", "/anything?sess=envsecret3", [("X-One", "envsecret1"), ("X-Two", "envsecret2")]
    )
    assert r.status == 200
    cli.wait_for(r"stream=\d+ GET /anything\?sess=\*\*\* headers: .*X-One: \*\*\*")
    assert "envsecret" not in cli.output()
