"""Issue 11, the inspector in a real browser: headless Chromium opens the page, a
request sent through the tunnel appears without a reload, it is opened, edited and
replayed, and the replay's response is shown beside the original.

Debian's Chromium (``/usr/bin/chromium``) driven by Playwright for Python with
``executable_path``, as in ``tests/test_e2e_browser.py`` (never a browser download,
never skipped). The page is the client's own (``--inspect 127.0.0.1:0``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from harness import CHROMIUM, CHROMIUM_ARGS, TIMEOUTS, ProcessPool, request
from test_e2e_browser import _require_chromium, _sync_playwright

#: Bound on each wait in the page, in seconds.
BROWSER_TIMEOUT = 20.0


def test_inspector_page_live_list_detail_and_edited_replay(
    procs: ProcessPool, tmp_path: Path
) -> None:
    _require_chromium()
    sync_playwright = _sync_playwright()
    app = procs.local_app()
    srv = procs.server()
    cli = procs.client(srv, app, "--inspect", "127.0.0.1:0")
    url = cli.wait_for(r"inspector url=(http://127\.0\.0\.1:\d+)").group(1)

    shot = tmp_path / "inspector.png"
    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            page.set_default_timeout(BROWSER_TIMEOUT * 1000)
            response = page.goto(url + "/", wait_until="load")
            assert response is not None and response.status == 200, response
            page.locator("#live.on").wait_for()  # the event stream is open

            # a request through the tunnel shows up without a reload
            sent = request(
                srv,
                "POST",
                "/browser/hook?n=1",
                [("Content-Type", "application/json")],
                b'{"a": 1}',
            )
            assert sent.status == 200
            row = page.locator('#requests tbody tr[data-path="/browser/hook?n=1"]')
            row.wait_for()
            assert "200" in (row.text_content() or "")

            # open it: both heads and the JSON body, pretty-printed
            row.click()
            original = page.locator("#original")
            original.get_by_text("POST /browser/hook?n=1 HTTP/1.1").wait_for()
            assert '"a": 1' in (original.locator("pre.json").first.text_content() or "")

            # edit and replay: the replay's response appears beside the original
            page.click("#edit")
            page.fill("#edit-method", "PUT")
            page.fill("#edit-path", "/browser/replayed?n=2")
            page.fill("#edit-body", '{"a": 2}')
            page.click("#replay-send")
            result = page.locator("#replay-result")
            result.locator(".status-line").filter(has_text="200").wait_for()
            echo = json.loads(result.locator("pre.json").last.text_content() or "{}")
            assert (echo["method"], echo["uri"]) == ("PUT", "/browser/replayed?n=2"), echo
            assert original.is_visible() and result.is_visible()

            # the list marks the replay as one
            replay_row = page.locator(
                '#requests tbody tr.replay[data-path="/browser/replayed?n=2"]'
            )
            replay_row.wait_for()
            assert "replay of #" in (replay_row.text_content() or "")
            page.screenshot(path=str(shot), full_page=True)
        except Exception as e:
            raise AssertionError(f"{e}\nbrowser console: {console}") from e
        finally:
            browser.close()

    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
    print(f"screenshot: {shot}")
    # the replay went to the app directly, never through the server
    app.wait_for(re.escape('hit PUT "/browser/replayed?n=2"'), TIMEOUTS.request)
    assert srv.count(r"backstream\.access: \S+ /browser/replayed") == 0
    assert not [line for line in console if line.startswith("error")], console
