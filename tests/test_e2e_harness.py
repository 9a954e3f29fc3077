"""Self-tests of the harness and the local app, talking to the local app directly.

These do not involve backstream: when they fail, the harness is broken, not the tunnel.
They also document what the local app's endpoints answer without a tunnel in between.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import threading

import pytest
from harness import (
    TIMEOUTS,
    LocalApp,
    ProcessPool,
    parse_raw_response,
    pattern_chunks,
    pattern_sha256,
    raw_request,
    request,
    stream_request,
)
from local_app import GZIP_PLAIN, PATTERN_BLOCK_LEN

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def app(module_procs: ProcessPool) -> LocalApp:
    return module_procs.local_app()


def test_pattern_is_deterministic_and_chunk_independent() -> None:
    n = 3 * PATTERN_BLOCK_LEN + 12345
    a = b"".join(pattern_chunks(n, 65536))
    b = b"".join(pattern_chunks(n, 777))
    assert a == b and len(a) == n
    assert hashlib.sha256(a).hexdigest() == pattern_sha256(n)
    # chunks larger than the block, at every offset
    for chunk in (PATTERN_BLOCK_LEN + 1, 1 << 20, 3 * PATTERN_BLOCK_LEN):
        c = b"".join(pattern_chunks(n, chunk))
        assert c == a, chunk


def test_echo_any_method_and_raw_uri(app: LocalApp) -> None:
    r = request(
        app, "PURGE", "/a%2Fb;x=1?q=&q=2&%E2%9C%93", [("X-Rep", "1"), ("X-Rep", "2")], b"body"
    )
    assert r.status == 200
    j = r.json()
    assert j["method"] == "PURGE"
    assert j["uri"] == "/a%2Fb;x=1?q=&q=2&%E2%9C%93"
    assert [v for k, v in j["headers"] if k == "X-Rep"] == ["1", "2"]
    assert j["body_sha256"] == hashlib.sha256(b"body").hexdigest()


def test_hits_counter(app: LocalApp) -> None:
    before = app.hits()
    request(app, "GET", "/x")
    request(app, "GET", "/__stats")
    assert app.hits() == before + 1
    app.wait_for(r'hit GET "/x"')


def test_download_upload(app: LocalApp) -> None:
    n = 5 * 1024 * 1024 + 3
    r = request(app, "GET", f"/download?size={n}")
    assert r.status == 200 and len(r.body) == n
    assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(n)
    r = request(app, "POST", "/upload", [("Content-Length", str(n))], pattern_chunks(n))
    assert r.json() == {"len": n, "sha256": pattern_sha256(n)}
    r = request(app, "PUT", "/upload", [], pattern_chunks(n))  # chunked
    assert r.json() == {"len": n, "sha256": pattern_sha256(n)}


def test_drip_release(app: LocalApp) -> None:
    conn, resp = stream_request(app, "GET", "/drip?token=self1")
    try:
        assert resp.readline() == b"first\n"
        assert app.stats()["drips"]["self1"] == "waiting"
        app.release("self1")
        assert resp.read() == b"last\n"
    finally:
        conn.close()


def test_slow_concurrency_tracking(app: LocalApp) -> None:
    app.reset()
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(request(app, "GET", "/slow?delay=0.5").status)
        )
        for _ in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUTS.request)
    assert results == [200] * 10
    assert app.stats()["slow_max_inflight"] == 10


def test_misc_endpoints(app: LocalApp) -> None:
    r = request(app, "GET", "/status/299?reason=Custom%20Reason")
    assert (r.status, r.reason) == (299, "Custom Reason")
    r = request(app, "GET", "/cookies")
    assert r.header_all("Set-Cookie")[1].startswith("b=2; Expires=Wed, 21 Oct")
    assert len(r.header_all("Set-Cookie")) == 3
    r = request(app, "GET", "/gzip")
    assert r.header("Content-Encoding") == "gzip"
    assert gzip.decompress(r.body) == GZIP_PLAIN
    r = request(app, "GET", "/redirect?to=/elsewhere")
    assert (r.status, r.header("Location")) == (302, "/elsewhere")
    r = request(app, "GET", "/hopheaders")
    assert r.header("X-Resp-Hop") == "must-not-pass"
    for path in ("/nocontent", "/notmodified"):
        raw = raw_request(
            app, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        code, _, _, rest = parse_raw_response(raw)
        assert code in (204, 304) and rest == b""
    raw = raw_request(
        app, b"HEAD /download?size=100 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    code, _, headers, rest = parse_raw_response(raw)
    assert code == 200 and ("Content-Length", "100") in headers and rest == b""
    assert json.loads(request(app, "GET", "/__hits").body)["hits"] > 0
