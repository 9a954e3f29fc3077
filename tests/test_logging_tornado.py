"""#13 item 14: what Tornado's own loggers write is masked like every other line.

``tornado.application`` (an uncaught exception: the request line, the request's
repr, a traceback), ``tornado.general`` (parse errors quoting what they refused)
and ``tornado.access`` pass through ``logs.MaskingFilter`` like backstream's own.
First the records Tornado writes, emitted in a fresh process set up by
``logs.setup_logging`` (text and JSON, to a file); then the lines a running
server really writes through ``tornado.general`` for hostile requests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO, TIMEOUTS, ProcessPool, first_response
from test_e2e_attacks_public import WS_HANDSHAKE, converse

pytestmark = pytest.mark.timeout(120)

#: Emits what Tornado emits (web.py ``log_exception``, http1connection.py, web.py
#: ``log_request``), after the set-up the CLI does: ``python -c EMIT FORMAT FILE``.
EMIT = """
import logging, sys
from tornado.httputil import HTTPInputError
from backstream import logs


class Request:
    # The repr Tornado's log_exception prints (older Tornados list the headers too).
    def __repr__(self):
        return (
            "HTTPServerRequest(protocol='http', host='x', method='GET', "
            "uri='/x?access_token=SECRETTOKEN1', version='HTTP/1.1', remote_ip='127.0.0.1', "
            "headers={'Cookie': 'session=SECRETCOOKIE1', 'Authorization': 'Bearer SECRETBEARER'})"
        )


logs.setup_logging(level="debug", fmt=sys.argv[1], output=sys.argv[2])
try:
    raise RuntimeError("no answer for /x?access_token=SECRETTOKEN2, Cookie: session=SECRETCOOKIE2")
except RuntimeError:
    logging.getLogger("tornado.application").error(
        "Uncaught exception %s\\n%r",
        "GET /x?access_token=SECRETTOKEN1 (127.0.0.1)",
        Request(),
        exc_info=True,
    )
logging.getLogger("tornado.general").info(
    "Malformed HTTP message from %s: %s",
    "127.0.0.1",
    HTTPInputError("Invalid header value 'session=SECRETCOOKIE3'"),
)
logging.getLogger("tornado.access").warning(
    "%d %s %.2fms", 400, "GET /y?token=SECRETTOKEN3 (127.0.0.1)", 0.5
)
"""

SECRETS = ("SECRETTOKEN", "SECRETCOOKIE", "SECRETBEARER", "SECRETHOST")


def _readable(text: str, fmt: str) -> str:
    """The log as ``logger: message`` lines (a JSON entry's ``error`` on the next ones)."""
    if fmt == "text":
        return text
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    return "\n".join(f"{e['logger']}: {e['msg']}\n{e.get('error', '')}" for e in entries)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_tornado_records_are_masked(tmp_path: Path, fmt: str) -> None:
    """An uncaught exception's request line, request repr and traceback, a parse error
    quoting a header value, an access line: all there, with no secret in them."""
    out = tmp_path / "server.log"
    subprocess.run(
        [sys.executable, "-c", EMIT, fmt, str(out)],
        cwd=REPO,
        check=True,
        timeout=TIMEOUTS.exit,
    )
    text = out.read_text()
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"logged {leaked}:\n{text}"
    shown = _readable(text, fmt)
    for expected in (
        "tornado.application: Uncaught exception GET /x?access_token=*** (127.0.0.1)",
        "uri='/x?access_token=***'",
        "'Cookie': '***'",
        "Traceback (most recent call last)",
        "RuntimeError: no answer for /x?access_token=***",
        "tornado.general: Malformed HTTP message from 127.0.0.1: Invalid header value",
        "tornado.access: 400 GET /y?token=*** (127.0.0.1)",
    ):
        assert expected in shown, f"{expected!r} not in:\n{text}"


COOKIE = "Cookie: session=SECRETCOOKIE1\r\n"
#: Requests the screen lets through and Tornado itself refuses, logging on tornado.general:
#: a handshake whose (empty) body Tornado parses as a form it cannot decode, and a Host
#: that Tornado quotes; then a head over Tornado's own limit (256 KiB).
HOSTILE = {
    "handshake with a form body": (
        f"GET /ws/echo?access_token=SECRETTOKEN1 HTTP/1.1\r\nHost: x\r\n{COOKIE}{WS_HANDSHAKE}"
        "Content-Type: application/x-www-form-urlencoded\r\nContent-Encoding: br\r\n\r\n",
        r"tornado\.general.*400 GET /ws/echo\?access_token=\*\*\* \(127\.0\.0\.1\): Invalid body",
    ),
    "a Host Tornado quotes": (
        f"GET /x?access_token=SECRETTOKEN2 HTTP/1.1\r\nHost: a b@SECRETHOST\r\n{COOKIE}"
        "Connection: close\r\n\r\n",
        r"tornado\.general.*Malformed HTTP message from 127\.0\.0\.1: Invalid Host header",
    ),
    "a 300 KB head": (
        f"GET /x?access_token=SECRETTOKEN3 HTTP/1.1\r\nHost: x\r\n{COOKIE}"
        f"X-Big: {'a' * 300_000}\r\nConnection: close\r\n\r\n",
        r"tornado\.general.*Unsatisfiable read",
    ),
}


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_tornado_lines_of_a_running_server_are_masked(procs: ProcessPool, fmt: str) -> None:
    """A real server at --log-level debug writes Tornado's own lines for requests Tornado
    refuses; each is there, and neither the cookie nor the query token nor the quoted
    value is."""
    srv = procs.server("--log-level", "debug", "--log-format", fmt)
    for name, (data, line) in HOSTILE.items():
        mark = srv.mark()
        answer = first_response(converse(srv, data.encode()))
        assert answer.status in (400, 431), (name, answer.status, answer.body[:300])
        srv.wait_for(line, timeout=TIMEOUTS.request, start=mark)
    srv.terminate()
    srv.wait_exit(TIMEOUTS.exit)
    output = srv.output()
    leaked = [s for s in SECRETS if s in output]
    assert not leaked, f"{srv!r} logged {leaked}:\n{output}"
