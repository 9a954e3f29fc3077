"""Issue 2, HAR: ``client -o DIR`` writes one valid HAR 1.2 file per relayed request,
secrets masked unless ``--har-unmasked``, large bodies not held whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from harness import ProcessPool, request, wait_until
from local_app import set_cookie_secret

pytestmark = pytest.mark.timeout(90)

AUTH = "Bearer har-secret-token-4f1e"
COOKIE = "sid=har-secret-cookie-77ab"
SEED = "har-seed-9c0d"
SET_COOKIE_SECRET = set_cookie_secret(SEED)


def har_files(d: Path) -> list[Path]:
    """Finished HAR files (``*.har``; a file being written is ``*.har.tmp``)."""
    return sorted(p for p in d.rglob("*.har") if p.is_file())


def check_har_1_2(doc: dict[str, Any]) -> dict[str, Any]:
    """Assert the required fields of HAR 1.2 (one entry); return the entry."""
    log = doc["log"]
    assert log["version"] == "1.2"
    assert isinstance(log["creator"]["name"], str) and isinstance(log["creator"]["version"], str)
    assert len(log["entries"]) == 1
    e = log["entries"][0]
    for key in ("startedDateTime", "time", "request", "response", "cache", "timings"):
        assert key in e, key
    req, resp = e["request"], e["response"]
    for key in (
        "method",
        "url",
        "httpVersion",
        "cookies",
        "headers",
        "queryString",
        "headersSize",
        "bodySize",
    ):
        assert key in req, f"request.{key}"
    for key in (
        "status",
        "statusText",
        "httpVersion",
        "cookies",
        "headers",
        "content",
        "redirectURL",
        "headersSize",
        "bodySize",
    ):
        assert key in resp, f"response.{key}"
    assert "size" in resp["content"] and "mimeType" in resp["content"]
    for key in ("send", "wait", "receive"):
        assert key in e["timings"], f"timings.{key}"
    for h in req["headers"] + resp["headers"]:
        assert set(h) >= {"name", "value"}
    return dict(e)


def _run(procs: ProcessPool, tmp_path: Path, *flags: str) -> tuple[list[Path], list[str]]:
    app = procs.local_app()
    srv = procs.server()
    procs.client(srv, app, "-o", str(tmp_path), *flags)
    r1 = request(
        srv,
        "GET",
        "/status/201?x=1&y=2",  # not the echo: its body would repeat the secrets
        [("Authorization", AUTH), ("Cookie", COOKIE), ("X-Plain", "visible")],
    )
    r2 = request(srv, "POST", "/har/post", [("Content-Type", "text/plain")], b"hello har")
    r3 = request(srv, "GET", f"/cookies?secret={SEED}")
    assert [r1.status, r2.status, r3.status] == [201, 200, 200]
    files = wait_until(lambda: len(har_files(tmp_path)) >= 3 and har_files(tmp_path))
    texts = [p.read_text() for p in files]
    return files, texts


def test_har_one_valid_file_per_request_masked(procs: ProcessPool, tmp_path: Path) -> None:
    files, texts = _run(procs, tmp_path)
    assert len(files) == 3, files
    assert not list(tmp_path.rglob("*.tmp")), "leftover temporary files"
    entries = [check_har_1_2(json.loads(t)) for t in texts]
    by_method = {(e["request"]["method"], e["request"]["url"].split("?")[0]) for e in entries}
    assert any(m == "POST" and u.endswith("/har/post") for m, u in by_method), by_method
    get = next(e for e in entries if "/status/201" in e["request"]["url"])
    assert get["response"]["status"] == 201
    assert {"name": "x", "value": "1"} in get["request"]["queryString"]
    names = {h["name"].lower(): h["value"] for h in get["request"]["headers"]}
    assert names.get("x-plain") == "visible"
    assert "authorization" in names and "cookie" in names
    everything = "\n".join(texts)
    assert "har-secret-token-4f1e" not in everything, "Authorization not masked in HAR"
    assert "har-secret-cookie-77ab" not in everything, "Cookie not masked in HAR"
    assert SET_COOKIE_SECRET not in everything, "Set-Cookie not masked in HAR"


def test_har_unmasked(procs: ProcessPool, tmp_path: Path) -> None:
    files, texts = _run(procs, tmp_path, "--har-unmasked")
    everything = "\n".join(texts)
    assert "har-secret-token-4f1e" in everything
    assert "har-secret-cookie-77ab" in everything


def test_har_large_body_not_held_whole(procs: ProcessPool, tmp_path: Path) -> None:
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(srv, app, "-o", str(tmp_path))
    size = 100 * 1024 * 1024
    r = request(srv, "GET", f"/download?size={size}")
    assert r.status == 200 and len(r.body) == size
    files = wait_until(lambda: har_files(tmp_path))
    assert len(files) == 1
    check_har_1_2(json.loads(files[0].read_text()))
    assert files[0].stat().st_size < 10 * 1024 * 1024, files[0].stat().st_size
    print(
        f"HAR of a 100 MiB download: {files[0].stat().st_size} bytes; "
        f"client peak {cli.peak_rss_kib() // 1024} MiB"
    )
    assert cli.peak_rss_kib() < 120 * 1024
