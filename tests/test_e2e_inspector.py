"""Issue 11, the client's inspector: its JSON API, masking, replay, HAR and curl
export, the bounded ring, the port fallback and the client's ``/metrics``.

Each test runs a real local app, server and client (``--inspect 127.0.0.1:0``: any
free port, read from the client's ``inspector url=`` line) and talks to the
inspector over HTTP on 127.0.0.1, as the page does.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import threading
import time
from typing import Any

import pytest
from harness import TIMEOUTS, Client, ProcessPool, Server, request, run_cli, wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(120)

INSPECTOR_URL = re.compile(r"inspector url=(http://127\.0\.0\.1:(\d+))")
JSON = [("Content-Type", "application/json")]
TOKEN = "insp-secret-token-8d2e"
AUTH = "Bearer insp-secret-auth-41fa"


def start(procs: ProcessPool, *flags: str) -> tuple[Any, Server, Client, str]:
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(srv, app, "--inspect", "127.0.0.1:0", *flags)
    return app, srv, cli, cli.wait_for(INSPECTOR_URL).group(1)


def get(url: str, path: str) -> Any:
    r = request(url, "GET", path)
    assert r.status == 200, (path, r.status, r.text()[:300])
    return r.json()


def finished(url: str, n: int = 1, **query: str) -> list[dict[str, Any]]:
    """The list once its newest ``n`` requests have finished."""
    suffix = "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""

    def ready() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = get(url, "/api/requests" + suffix)["requests"]
        done = len(items) >= n and all(i["duration_ms"] is not None for i in items[:n])
        return items if done else None

    result: list[dict[str, Any]] = wait_until(ready)
    return result


def replay(url: str, id: int, edits: dict[str, Any] | None = None) -> dict[str, Any]:
    r = request(url, "POST", f"/api/requests/{id}/replay", JSON, json.dumps(edits or {}).encode())
    assert r.status == 200, r.text()
    result: dict[str, Any] = r.json()
    return result


def access_lines(srv: Server, path: str) -> int:
    return srv.count(rf"backstream\.access: \S+ {re.escape(path)} ")


def test_api_lists_a_request_with_its_heads_and_bodies(procs: ProcessPool) -> None:
    app, srv, cli, url = start(procs)
    body = b'{"event": "push", "n": [1, 2]}'
    r = request(srv, "POST", "/hook/api?x=1", [*JSON, ("X-Plain", "visible")], body)
    assert r.status == 200
    [item] = finished(url)
    assert item["method"] == "POST" and item["path"] == "/hook/api?x=1"
    assert (item["status"], item["class"], item["replay_of"]) == (200, "2xx", None)
    assert item["request_size"] == len(body) and item["response_size"] == len(r.body)
    assert item["duration_ms"] > 0 and abs(item["time"] - time.time()) < 60

    d = get(url, f"/api/requests/{item['id']}")
    headers = {n.lower(): v for n, v in d["request"]["headers"]}
    assert headers["x-plain"] == "visible" and headers["content-type"] == "application/json"
    assert headers["host"] == srv.netloc and headers["via"] == "1.1 backstream"
    assert d["request"]["url"] == app.url + "/hook/api?x=1"
    req_body = d["request"]["body"]
    assert (req_body["kind"], req_body["text"], req_body["truncated"]) == (
        "json",
        body.decode(),
        False,
    )
    assert json.loads(req_body["pretty"]) == json.loads(body) and "\n" in req_body["pretty"]
    resp = d["response"]
    assert (resp["status"], resp["reason"]) == (200, "OK")
    assert ["Content-Type", "application/json"] in resp["headers"]
    assert resp["body"]["kind"] == "json" and json.loads(resp["body"]["text"]) == r.json()
    raw = request(url, "GET", f"/api/requests/{item['id']}/body/response")
    assert raw.body == r.body and raw.header("content-security-policy")
    # the terminal line, as ngrok's console
    cli.wait_for(rf"POST /hook/api\?x=1 200 \d+ ms {len(r.body)} B stream=\d+$")
    assert cli.count(r"POST /hook/api") == 1, "one line per request"
    # filters
    request(srv, "GET", "/status/404")
    finished(url, 2)
    assert [i["path"] for i in get(url, "/api/requests?status=4xx")["requests"]] == ["/status/404"]
    assert [i["method"] for i in get(url, "/api/requests?method=POST")["requests"]] == ["POST"]
    assert len(get(url, "/api/requests?q=hook")["requests"]) == 1
    assert request(url, "GET", "/api/requests/999").status == 404


def test_bodies_rendered_by_type_and_cut_at_the_limit(procs: ProcessPool) -> None:
    app, srv, cli, url = start(procs, "--inspect-body-limit", "1K")
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    sends = [
        ("form", [("Content-Type", "application/x-www-form-urlencoded")], b"a=1&b=two+words&b="),
        ("image", [("Content-Type", "image/png")], png),
        ("binary", [("Content-Type", "application/octet-stream")], b"\x00\xff\xfe" * 10),
        ("text", [("Content-Type", "text/plain")], b"line\n" * 1000),
    ]
    for kind, headers, body in sends:
        assert request(srv, "POST", f"/kinds/{kind}", headers, body).status == 200
    items = finished(url, len(sends))
    views = {i["path"]: get(url, f"/api/requests/{i['id']}") for i in items}
    form = views["/kinds/form"]["request"]["body"]
    assert form["kind"] == "form" and form["form"] == [["a", "1"], ["b", "two words"], ["b", ""]]
    image = views["/kinds/image"]["request"]["body"]
    assert image["kind"] == "image"
    served = request(url, "GET", image["url"])
    assert served.header("content-type") == "image/png" and served.body == png
    binary = views["/kinds/binary"]["request"]["body"]
    assert binary["kind"] == "binary" and binary["hex"].startswith("00000000  00 ff fe 00 ff fe")
    text = views["/kinds/text"]["request"]["body"]
    assert text["kind"] == "text" and (text["size"], text["kept"], text["truncated"]) == (
        5000,
        1024,
        True,
    )
    assert text["text"] == ("line\n" * 1000)[:1024]
    # a replay cannot invent the bytes that were not kept
    id_ = views["/kinds/text"]["id"]
    r = request(url, "POST", f"/api/requests/{id_}/replay", JSON, b"{}")
    assert r.status == 400 and "kept" in r.json()["error"]


def _secret_traffic(srv: Server) -> bytes:
    r = request(srv, "GET", f"/status/201?token={TOKEN}&x=1", [("Authorization", AUTH)])
    assert r.status == 201
    return r.body


def test_secrets_masked_in_the_api_and_the_exports(procs: ProcessPool) -> None:
    app, srv, cli, url = start(procs)
    _secret_traffic(srv)
    [item] = finished(url)
    id_ = item["id"]
    assert item["path"] == "/status/201?token=***&x=1"
    shown = {
        "list": request(url, "GET", "/api/requests").text(),
        "detail": request(url, "GET", f"/api/requests/{id_}").text(),
        "har": request(url, "GET", f"/api/requests/{id_}/har").text(),
        "curl": request(url, "GET", f"/api/requests/{id_}/curl").text(),
        "client log": cli.output(),
    }
    for where, text in shown.items():
        assert TOKEN not in text and "insp-secret-auth" not in text, f"{where} shows a secret"
    detail = json.loads(shown["detail"])
    assert ["Authorization", "***"] in detail["request"]["headers"]
    har = json.loads(shown["har"])["log"]["entries"][0]["request"]
    assert {"name": "Authorization", "value": "***"} in har["headers"]
    assert {"name": "token", "value": "***"} in har["queryString"]
    assert "token=***" in shown["curl"] and "Authorization: ***" in shown["curl"]
    # replaying the masked request sends the real secrets (the page never sees them)
    replayed = replay(url, id_)
    assert replayed["status"] == 201
    app.wait_for(re.escape(f'hit GET "/status/201?token={TOKEN}&x=1"'), TIMEOUTS.request)
    edited = replay(
        url, id_, {"path": "/anything?token=***&x=2", "headers": detail["request"]["headers"]}
    )
    echo = json.loads(edited["response"]["body"]["text"])  # bodies are never masked
    assert echo["uri"] == f"/anything?token={TOKEN}&x=2"
    assert ["Authorization", AUTH] in echo["headers"]


def test_secrets_shown_with_har_unmasked(procs: ProcessPool) -> None:
    app, srv, cli, url = start(procs, "--har-unmasked")
    _secret_traffic(srv)
    [item] = finished(url)
    assert item["path"] == f"/status/201?token={TOKEN}&x=1"
    detail = get(url, f"/api/requests/{item['id']}")
    assert ["Authorization", AUTH] in detail["request"]["headers"]
    har = request(url, "GET", f"/api/requests/{item['id']}/har").text()
    assert TOKEN in har and AUTH in har
    assert AUTH in request(url, "GET", f"/api/requests/{item['id']}/curl").text()
    assert TOKEN not in cli.output(), "the log masks secrets whatever the inspector shows"


def test_har_export_is_har_1_2(procs: ProcessPool) -> None:
    from test_e2e_har import check_har_1_2

    app, srv, cli, url = start(procs)
    r = request(srv, "PUT", "/har/put", [("Content-Type", "text/plain")], b"har body")
    [item] = finished(url)
    entry = check_har_1_2(get(url, f"/api/requests/{item['id']}/har"))
    assert entry["request"]["method"] == "PUT" and entry["request"]["url"] == app.url + "/har/put"
    assert entry["request"]["postData"]["text"] == "har body"
    assert entry["response"]["status"] == 200
    assert entry["response"]["content"]["text"] == r.text()
    assert 0 < entry["time"] < 10_000


def test_replay_goes_to_the_local_app_only(procs: ProcessPool) -> None:
    app, srv, cli, url = start(procs)
    body = b"original body"
    r = request(srv, "POST", "/replay/me?q=1", [("Content-Type", "text/plain")], body)
    assert r.status == 200
    [item] = finished(url)
    srv.wait_for(r"backstream\.access: POST /replay/me ")
    hits = app.hits()

    same = replay(url, item["id"])
    assert same["replay_of"] == item["id"] and same["status"] == 200
    echo = json.loads(same["response"]["body"]["text"])
    original = r.json()
    for key in ("method", "uri", "body_sha256", "headers"):
        assert echo[key] == original[key], key

    edited = replay(
        url,
        item["id"],
        {
            "method": "PUT",
            "path": "/replay/edited?q=2",
            "headers": [["Content-Type", "text/plain"], ["X-Edited", "yes"]],
            "body": "edited body",
        },
    )
    echo = json.loads(edited["response"]["body"]["text"])
    assert (echo["method"], echo["uri"]) == ("PUT", "/replay/edited?q=2")
    assert ["X-Edited", "yes"] in echo["headers"]
    assert base64_text(echo["body_b64"]) == "edited body"

    assert app.hits() == hits + 2  # the app saw both replays...
    # ...and the server neither: a request sent after them is logged, they are not
    request(srv, "GET", "/replay/sentinel")
    srv.wait_for(r"backstream\.access: GET /replay/sentinel ")
    assert access_lines(srv, "/replay/me") == 1 and access_lines(srv, "/replay/edited") == 0
    items = finished(url, 4)[1:]
    assert [i["replay_of"] for i in items] == [item["id"], item["id"], None]
    assert items[0]["method"] == "PUT" and items[0]["path"] == "/replay/edited?q=2"
    metrics = scrape(url)
    assert metrics["backstream_client_replays_total"] == 2
    assert metrics['backstream_client_requests_total{status_class="2xx"}'] == 2
    # bad edits are refused with a reason, nothing is sent
    for edits in ({"method": "GE T"}, {"path": "no-slash"}, {"headers": [["Bad Name", "x"]]}):
        bad = request(
            url, "POST", f"/api/requests/{item['id']}/replay", JSON, json.dumps(edits).encode()
        )
        assert bad.status == 400 and bad.json()["error"], edits
    assert app.hits() == hits + 3


def base64_text(value: str) -> str:
    import base64

    return base64.b64decode(value).decode()


@pytest.mark.parametrize(
    "method,path,headers,body",
    [
        ("GET", "/curl/get?a=1&b=%2F", [("X-One", "1"), ("Accept", "text/plain")], None),
        ("POST", "/curl/post", [("Content-Type", "application/json")], b'{"it\'s": "json"}'),
        ("PUT", "/curl/binary", [("Content-Type", "application/octet-stream")], bytes(range(256))),
    ],
)
def test_curl_export_reproduces_the_request(
    procs: ProcessPool, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None
) -> None:
    app, srv, cli, url = start(procs)
    r = request(srv, method, path, headers, body)
    assert r.status == 200
    [item] = finished(url)
    command = request(url, "GET", f"/api/requests/{item['id']}/curl").text()
    assert command.startswith(("curl ", "printf ")), command
    run = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        timeout=TIMEOUTS.request,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr
    direct, relayed = json.loads(run.stdout), r.json()
    for key in ("method", "uri", "body_len", "body_sha256"):
        assert direct[key] == relayed[key], (key, command)
    assert sorted(map(tuple, direct["headers"])) == sorted(map(tuple, relayed["headers"])), command


def test_ring_keeps_the_last_requests_in_bounded_memory(procs: ProcessPool) -> None:
    app, srv, cli, url = start(procs, "--inspect-keep", "50", "--inspect-body-limit", "4K")
    body = b"x" * (200 * 1024)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUTS.request)
    rss: list[int] = []
    deadline = time.monotonic() + 90
    try:
        for i in range(2000):
            r = request(srv, "POST", f"/upload?i={i}", [], body, conn=conn)
            assert r.status == 200 and r.json()["len"] == len(body)
            if i % 250 == 249:
                rss.append(cli.rss_kib())
            assert time.monotonic() < deadline, f"only {i} requests in 90 s"
    finally:
        conn.close()
    items = finished(url, 50)
    assert len(items) == 50
    assert [i["path"] for i in items] == [f"/upload?i={i}" for i in range(1999, 1949, -1)]
    assert all(i["request_size"] == len(body) for i in items)
    kept = get(url, f"/api/requests/{items[0]['id']}")["request"]["body"]
    assert (kept["kept"], kept["size"]) == (4096, len(body))
    metrics = scrape(url)
    assert metrics["backstream_client_inspector_requests"] == 50
    assert metrics['backstream_client_requests_total{status_class="2xx"}'] == 2000
    growth = max(rss[1:]) - rss[1]  # after the first 500 requests: flat
    print(f"client RSS every 250 requests (KiB): {rss}; peak {cli.peak_rss_kib()} KiB")
    assert growth < 5 * 1024, rss
    assert cli.peak_rss_kib() < 150 * 1024


def test_bodies_of_all_requests_stay_under_the_memory_budget(procs: ProcessPool) -> None:
    """Large bodies: the newest are kept, the oldest let go, so RSS stays near the budget."""
    app, srv, cli, url = start(
        procs, "--inspect-body-limit", "1M", "--inspect-memory", "4M", "--inspect-keep", "100"
    )
    body = b"y" * (3 * 1024 * 1024 // 2)  # each upload keeps 1 MiB of its body
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUTS.request)
    try:
        for i in range(60):
            assert request(srv, "POST", f"/upload?i={i}", [], body, conn=conn).status == 200
    finally:
        conn.close()
    items = finished(url, 60)
    kept = [get(url, f"/api/requests/{i['id']}")["request"]["body"]["kept"] for i in items]
    # newest first: the last ones keep their first MiB (4 MiB in all with the small
    # response bodies), every older one was let go
    assert kept[:3] == [1024 * 1024] * 3 and set(kept[4:]) == {0}, kept
    assert sum(kept) <= 4 * 1024 * 1024
    assert all(i["request_size"] == len(body) for i in items)
    print(f"client peak RSS {cli.peak_rss_kib()} KiB")
    assert cli.peak_rss_kib() < 100 * 1024


def test_busy_port_moves_to_the_next_free_one(procs: ProcessPool) -> None:
    app = procs.local_app()
    srv = procs.server()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cli = procs.client(srv, app, "--inspect", f"127.0.0.1:{port}")
        m = cli.wait_for(INSPECTOR_URL)
        moved = int(m.group(2))
        assert port < moved <= port + 100, m.group(0)
        assert m.group(0) == f"inspector url=http://127.0.0.1:{moved}"
        assert get(m.group(1), "/api/requests")["requests"] == []
        # the environment variable sets it too; a bare port means loopback
        other = procs.client(srv, app, env={"BACKSTREAM_INSPECT": str(port)})
        assert int(other.wait_for(INSPECTOR_URL).group(2)) > port
    # --no-inspect (the harness's default): no inspector at all
    quiet = procs.client(srv, app)
    assert "--no-inspect" in quiet.argv and quiet.count("inspector url=") == 0


def test_inspector_flags_are_checked() -> None:
    for args in (
        ["--inspect", "127.0.0.1:http"],
        ["--inspect-keep", "0"],
        ["--inspect-body-limit", "1X"],
    ):
        r = run_cli("client", "-s", "http://127.0.0.1:9", "-d", "http://127.0.0.1:9", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # an address that cannot be used: one line, exit code 2 (before connecting)
    r = run_cli(
        "client",
        "-s",
        "http://127.0.0.1:9",
        "-d",
        "http://127.0.0.1:9",
        "--inspect",
        "203.0.113.5:4040",
        timeout=TIMEOUTS.request,
    )
    assert r.returncode == 2 and "inspector: cannot listen on 203.0.113.5:4040" in r.stderr
    text = run_cli("client", "--help").stdout
    for flag in ("--inspect", "--no-inspect", "--inspect-keep", "--inspect-body-limit"):
        assert flag in text


def test_page_and_api_refuse_other_origins(procs: ProcessPool) -> None:
    app, srv, cli, url = start(procs)
    page = request(url, "GET", "/")
    assert page.status == 200 and "<title>backstream inspector</title>" in page.text()
    assert "default-src 'none'" in (page.header("content-security-policy") or "")
    for name in ("/app.js", "/style.css"):
        asset = request(url, "GET", name)
        assert asset.status == 200
        # nothing is fetched from the internet
        assert not re.search(rb"https?://", asset.body + page.body), name
    request(srv, "GET", "/origin/check")
    [item] = finished(url)
    # DNS rebinding: a page of another name that resolves here gets nothing
    assert request(url, "GET", "/api/requests", [("Host", "evil.example:80")]).status == 403
    assert (
        request(url, "GET", "/", [("Host", f"evil.example:{url.rsplit(':', 1)[1]}")]).status == 403
    )
    assert (
        request(
            url, "GET", "/api/requests", [("Host", f"localhost:{url.rsplit(':', 1)[1]}")]
        ).status
        == 200
    )
    # cross-site replays: a form cannot send JSON, a script of another origin is refused
    path = f"/api/requests/{item['id']}/replay"
    assert request(url, "POST", path, [("Content-Type", "text/plain")], b"{}").status == 415
    assert (
        request(url, "POST", path, [*JSON, ("Origin", "http://evil.example")], b"{}").status == 403
    )
    assert app.hits() == 1


def test_events_stream_new_requests(procs: ProcessPool) -> None:
    app, srv, cli, url = start(procs)
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUTS.request)
    try:
        conn.request("GET", "/api/events")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type", "").startswith(
            "text/event-stream"
        )
        request(srv, "GET", "/live/one")
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + TIMEOUTS.request
        while not any(e["path"] == "/live/one" and e["duration_ms"] is not None for e in events):
            assert time.monotonic() < deadline, events
            line = resp.fp.readline().decode()
            assert line, "the event stream ended"
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
        assert events[-1]["status"] == 200
    finally:
        conn.close()


def scrape(url: str) -> dict[str, float]:
    """Every sample of the client's /metrics, parsed by prometheus_client."""
    r = request(url, "GET", "/metrics")
    assert r.status == 200 and (r.header("content-type") or "").startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def test_metrics_scraped_while_traffic_flows(procs: ProcessPool) -> None:
    app, srv, cli, url = start(procs)
    stop = threading.Event()
    sent = {"ok": 0, "404": 0}

    def traffic() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUTS.request)
        try:
            for i in range(400):
                if stop.is_set():
                    break
                path = "/status/404" if i % 4 == 3 else f"/m/{i}"
                r = request(srv, "POST", path, [], b"12345", conn=conn)
                sent["404" if r.status == 404 else "ok"] += 1
        finally:
            conn.close()

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        scrapes = []
        deadline = time.monotonic() + 60
        while worker.is_alive() and time.monotonic() < deadline and len(scrapes) < 50:
            scrapes.append(scrape(url))
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(TIMEOUTS.request)
    assert len(scrapes) >= 2, "the traffic ended before a scrape"
    final = wait_until(
        lambda: (
            (m := scrape(url))["backstream_client_request_duration_seconds_count"]
            == sent["ok"] + sent["404"]
            and m
        )
    )
    ok, missing = sent["ok"], sent["404"]
    assert final['backstream_client_requests_total{status_class="2xx"}'] == ok
    assert final['backstream_client_requests_total{status_class="4xx"}'] == missing
    assert final["backstream_client_request_body_bytes_total"] == 5 * (ok + missing)
    assert final["backstream_client_response_body_bytes_total"] > 0
    assert final['backstream_client_request_duration_seconds_bucket{le="+Inf"}'] == ok + missing
    assert final["backstream_client_requests_in_flight"] == 0
    assert (
        final["backstream_client_connected"] == 1 and final["backstream_client_connects_total"] == 1
    )
    assert final["process_resident_memory_bytes"] > 0
    # counters only grow between scrapes
    counts = [s.get("backstream_client_request_duration_seconds_count", 0) for s in scrapes]
    assert counts == sorted(counts), counts


def test_loopback_and_host_rules() -> None:
    from backstream.client.inspector_web import allowed_hosts, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert is_loopback("localhost") and not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    hosts = allowed_hosts("127.0.0.1", 4041)
    assert hosts is not None and {"127.0.0.1:4041", "localhost:4041", "[::1]:4041"} <= hosts
    assert "evil.example:4041" not in hosts and "127.0.0.1:4040" not in hosts
    assert allowed_hosts("0.0.0.0", 4040) is None  # every interface: any name (it warns)
    assert "192.168.1.5:4040" in (allowed_hosts("192.168.1.5", 4040) or ())
