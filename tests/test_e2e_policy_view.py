"""Issue 14, end to end: policies see what the app will see, and secrets stay hidden.

Real processes on 127.0.0.1: ``backstream serve -p ...``, ``backstream client`` and
the local app, whose hit counter proves that a denied request never reached it.

- A deny-list on ``input.path_normalized`` (``policies/deny-paths``) refuses every
  spelling of ``/admin`` that reaches some app's ``/admin``: doubled slashes,
  encoded letters, dot segments (resolved or not), ``;`` parameters.
- ``input.remote`` behind ``--trust-forwarded`` proxies is the caller named by
  the one ``--forwarded-header`` (``X-Forwarded-For`` or ``Forwarded``); from
  anyone else it stays the TCP peer (``input.peer``).
- Every default secret header and query parameter, and the ones added with
  ``--mask-header`` / ``--mask-query``, are shown masked in debug logs and HAR
  files, and a response ``Set-Cookie`` in HAR files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import REPO, ProcessPool, Response, Server, request, wait_until
from local_app import set_cookie_secret

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
    denied = ("/admin", "//admin", "/%61dmin", "/x/../admin", "/x/%2e%2e/admin", "/ADMIN/x")
    # An app that does not resolve dot segments routes the next two as /admin/...;
    # Tomcat reads the last two as /admin.
    denied += ("/admin/../anything", "/admin/%2e%2e/anything", "/;/admin", "/.;/admin")
    for path in denied:
        r = request(srv, "GET", path)
        assert r.status == 403, (path, r.status, r.body)
    assert app.hits() == 0


def _via_forwarding(
    procs: ProcessPool, policies: list[str], trust: str | None, forwarded_for: str
) -> Response:
    """A GET with ``X-Forwarded-For`` through a server with ``policies`` (and
    ``--trust-forwarded trust``)."""
    app = procs.local_app()
    args = policies + ([] if trust is None else ["--trust-forwarded", trust])
    srv = procs.server(*args)
    procs.client(srv, app)
    return request(srv, "GET", "/anything", [("X-Forwarded-For", forwarded_for)])


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
    r = _via_forwarding(procs, ["-p", policy_dir(tmp_path, ONE_CALLER)], trust, forwarded_for)
    assert r.status == status, (r.status, r.body)


TRUST = ["--trust-forwarded", "127.0.0.1"]
FORWARDED = ["--forwarded-header", "forwarded"]
CALLER_IN_XFF = ("10.1.2.3", "for=6.6.6.6")
CALLER_IN_FORWARDED = ("6.6.6.6", 'for="10.1.2.3:4711";proto=https')


@pytest.mark.parametrize(
    "args, env, headers, status",
    [
        (TRUST, {}, CALLER_IN_XFF, 200),  # X-Forwarded-For is read by default...
        (TRUST, {}, CALLER_IN_FORWARDED, 403),  # ...and Forwarded ignored
        # A proxy that writes only Forwarded: the caller's own X-Forwarded-For is not believed.
        (TRUST + FORWARDED, {}, CALLER_IN_XFF, 403),
        (TRUST + FORWARDED, {}, CALLER_IN_FORWARDED, 200),
        (TRUST, {"BACKSTREAM_FORWARDED_HEADER": "forwarded"}, CALLER_IN_FORWARDED, 200),
        (FORWARDED, {}, CALLER_IN_FORWARDED, 403),  # from an untrusted peer, it names no one
        (["--trust-forwarded", "10.0.0.0/8", *FORWARDED], {}, CALLER_IN_FORWARDED, 403),
    ],
)
def test_one_forwarding_header_names_the_caller(
    procs: ProcessPool,
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    headers: tuple[str, str],
    status: int,
) -> None:
    """Both headers arrive; --forwarded-header says which one input.remote is read from."""
    app = procs.local_app()
    srv = procs.server("-p", policy_dir(tmp_path, ONE_CALLER), *args, env=env)
    procs.client(srv, app)
    x_forwarded_for, forwarded = headers
    r = request(
        srv, "GET", "/anything", [("X-Forwarded-For", x_forwarded_for), ("Forwarded", forwarded)]
    )
    assert r.status == status, (r.status, r.body)


@pytest.mark.parametrize(
    "trust, forwarded_for, status",
    [
        (None, "6.6.6.6", 200),  # the proxy (127.0.0.1) is in the list: everyone passes
        ("127.0.0.1", "6.6.6.6", 403),
        ("127.0.0.1", "10.1.2.3", 200),
        ("127.0.0.1", "10.1.2.3, 6.6.6.6", 403),
    ],
)
def test_shipped_ip_allowlist_behind_a_trusted_proxy(
    procs: ProcessPool, tmp_path: Path, trust: str | None, forwarded_for: str, status: int
) -> None:
    """policies/ip-allowlist (embedded engine) with the --trust-forwarded it documents."""
    policies = ["-p", policy_dir(tmp_path), "-p", str(REPO / "policies" / "ip-allowlist")]
    r = _via_forwarding(procs, policies, trust, forwarded_for)
    assert r.status == status, (r.status, r.body)


#: One distinct secret per default name; none may appear in any log or HAR file.
HEADER_SECRETS = {name: f"hsecret{i}x" for i, name in enumerate(redact.DEFAULT_HEADERS)}
QUERY_SECRETS = {name: f"qsecret{i}x" for i, name in enumerate(redact.DEFAULT_QUERY)}
EXTRA = {"x-custom-credential": "hsecretcustomx"}
EXTRA_QUERY = {"session": "qsecretcustomx"}
#: Default names the server never relays, so never in the client's debug line or HAR
#: file: Proxy-Authorization is hop-by-hop (meant for the public server, RFC 9110
#: 7.6.1), Backstream-Token is the server's own --token. They are sent here anyway,
#: and on the client's handshake (-H, --token), where only the server sees them.
NOT_RELAYED = {"proxy-authorization", "backstream-token"}
HANDSHAKE_SECRETS = ["hsecrethandshakex", "hsecrettokenx"]


def _har_entries(directory: Path) -> list[dict]:
    files = sorted(directory.glob("*.har"))
    assert files, "no HAR file written"
    return [json.loads(f.read_text())["log"]["entries"][0] for f in files]


def test_every_secret_masked_in_debug_logs_and_har(procs: ProcessPool, tmp_path: Path) -> None:
    app = procs.local_app()
    token = HANDSHAKE_SECRETS[1]
    srv: Server = procs.server("--log-level", "debug", "--token", token)
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
        "--token",
        token,
        "-H",
        f"Proxy-Authorization: Basic {HANDSHAKE_SECRETS[0]}",
    )
    query = "&".join(f"{n}={v}" for n, v in {**QUERY_SECRETS, **EXTRA_QUERY}.items())
    headers = [*HEADER_SECRETS.items(), *EXTRA.items(), ("X-Visible", "shown-value")]
    # /status/200 does not echo the request: whatever shows a secret is a leak.
    r = request(srv, "GET", f"/status/200?{query}&visible=shown-query", headers)
    assert r.status == 200
    # A response Set-Cookie from the app: token=<cookie>.
    r = request(srv, "GET", "/cookies?secret=seed")
    assert r.status == 200 and r.header_all("set-cookie")
    cookie = set_cookie_secret("seed")
    debug = cli.wait_for(r"stream=\d+ GET /status/200\?.* headers: ").string
    wait_until(lambda: len(list(har.glob("*.har"))) == 2)
    entries = _har_entries(har)
    shown = {"client": cli.output(), "server": srv.output(), "har": json.dumps(entries)}
    secrets = [*HEADER_SECRETS.values(), *QUERY_SECRETS.values(), *EXTRA.values()]
    secrets += [*EXTRA_QUERY.values(), *HANDSHAKE_SECRETS, cookie]
    for where, text in shown.items():
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{where} shows {leaked}"

    # Each name is shown masked, not dropped on the way.
    status, cookies = sorted(entries, key=lambda e: "/cookies" in e["request"]["url"])
    har_headers = {h["name"].lower(): h["value"] for h in status["request"]["headers"]}
    har_query = {q["name"]: q["value"] for q in status["request"]["queryString"]}
    target, _, head = debug.partition(" headers: ")
    debug_headers = {n.lower(): v for n, _, v in (h.partition(": ") for h in head.split("; "))}
    for name in [*HEADER_SECRETS, *EXTRA]:
        if name in NOT_RELAYED:
            assert name not in har_headers and name not in debug_headers, name
        else:
            assert (debug_headers.get(name), har_headers.get(name)) == ("***", "***"), name
    for name in [*QUERY_SECRETS, *EXTRA_QUERY]:
        assert f"{name}=***" in target and har_query.get(name) == "***", name
    assert debug_headers["x-visible"] == "shown-value" and "visible=shown-query" in target
    assert har_headers["x-visible"] == "shown-value" and har_query["visible"] == "shown-query"
    set_cookies = [h["value"] for h in cookies["response"]["headers"] if h["name"] == "Set-Cookie"]
    assert set_cookies and set(set_cookies) == {"***"}, set_cookies


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
