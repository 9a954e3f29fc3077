"""Issue 2, logging: JSON lines parse, secrets never appear in any log line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness import ProcessPool, Server, json_lines, request, wait_until
from local_app import set_cookie_secret

pytestmark = pytest.mark.timeout(90)

SECRETS = {
    "Authorization": "Bearer log-secret-token-51c2",
    "Cookie": "sid=log-secret-cookie-a9f3",
    "Proxy-Authorization": "Basic log-secret-proxy-77e1",
}
SEED = "seed-0b4d"
SET_COOKIE_SECRET = set_cookie_secret(SEED)


def _traffic(srv: Server) -> None:
    headers = list(SECRETS.items())
    assert request(srv, "GET", "/logs?x=1", headers).status == 200
    # bodies are never logged either (they may carry passwords)
    body = b"password=log-secret-body-7a7a"
    assert request(srv, "POST", "/logs", headers, body).status == 200
    assert request(srv, "GET", f"/cookies?secret={SEED}", headers).status == 200
    assert request(srv, "GET", "/status/404", headers).status == 404


def _assert_no_secrets(text: str) -> None:
    leaked = sorted(set(re.findall(r"log-secret-[a-z]+-[0-9a-f]{4}", text)))
    if SET_COOKIE_SECRET in text:
        leaked.append(f"Set-Cookie value {SET_COOKIE_SECRET}")
    assert not leaked, f"secrets in logs: {leaked}"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_debug_logs_never_show_secrets(procs: ProcessPool, fmt: str) -> None:
    app = procs.local_app()
    flags = ("--log-level", "debug", "--log-format", fmt)
    srv = procs.server(*flags)
    # a client header (-H) is a secret too when it is an Authorization
    cli = procs.client(srv, app, *flags, "-H", "Authorization: Bearer log-secret-hdr-13d7")
    _traffic(srv)
    # at least one request is logged somewhere at debug level (the test sees traffic)
    wait_until(lambda: any("/logs" in line for line in srv.lines + cli.lines))
    srv.terminate()
    cli.terminate()
    srv.wait_exit()
    cli.wait_exit()
    everything = srv.output() + "\n" + cli.output()
    _assert_no_secrets(everything)
    if fmt == "json":
        for p in (srv, cli):
            objs = list(json_lines(p.stderr_lines))
            assert objs, f"{p.name}: no log lines"
            for o in objs:
                assert {"level", "logger", "msg"} <= set(o), o


def test_json_lines_at_info(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server("--log-format", "json")
    cli = procs.client(srv, app, "--log-format", "json")
    assert request(srv, "GET", "/x").status == 200
    for p in (srv, cli):
        objs = list(json_lines(p.stderr_lines))
        assert any("listening" in o["msg"] or "connected" in o["msg"] for o in objs)


def test_log_format_env_var(procs: ProcessPool) -> None:
    srv = procs.server(env={"BACKSTREAM_LOG_FORMAT": "json"})
    objs = list(json_lines(srv.stderr_lines))
    assert any("listening" in o["msg"] for o in objs), srv.stderr_lines


def test_log_output_stdout(procs: ProcessPool) -> None:
    srv = procs.server("--log-output", "stdout")
    assert any("listening url=" in line for line in srv.stdout_lines)
    assert not any("listening url=" in line for line in srv.stderr_lines)


def test_log_output_file(procs: ProcessPool, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    srv = procs.server("--log-output", str(log), wait=False)
    wait_until(lambda: log.exists() and "listening url=" in log.read_text())
    assert srv.alive()
    assert not any("listening url=" in line for line in srv.lines)


def test_complete_responses_not_logged_as_failures(procs: ProcessPool) -> None:
    """A caller that closes as soon as it has read a whole Content-Length body got a
    complete response: the server must not log it as a failed relay."""
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app)
    mark = srv.mark()
    n, size = 40, 300_000
    for i in range(n):
        # a body larger than one WebSocket message: the end of the stream can reach
        # the server after the caller already has every byte and has hung up
        r = request(srv, "GET", f"/download?size={size}&i={i}")
        assert r.status == 200 and len(r.body) == size
    srv.wait_for_count(r"GET /download", n, start=mark)
    bad = [
        line
        for line in srv.lines[mark:]
        if "error=" in line or "went away" in line or "failed" in line
    ]
    assert not bad, "\n".join(bad[:6])
