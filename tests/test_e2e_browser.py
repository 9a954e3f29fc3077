"""A real browser through a named tunnel: headless Chromium opens a page and a WebSocket.

Debian's Chromium (``/usr/bin/chromium``, package ``chromium``) is driven by Playwright
for Python (the ``playwright`` package of the ``test`` extra, sync API) with
``executable_path``: Playwright's own browser downloads are never used. ``scripts/test``
installs the Debian package when it is missing; this test never skips: without Chromium
or Playwright it fails and says how to install them.

The server runs with ``--domain tunnel.test`` and the client with ``--name myapp`` (the app
sees the public ``Host``, which its WebSocket ``Origin`` check needs); Chromium
resolves ``*.tunnel.test`` to 127.0.0.1 (``--host-resolver-rules``), so the page
``http://myapp.tunnel.test:PORT/browser/ws`` reaches the server with that ``Host`` and is
routed to the tunnel by name. The page (served by ``tests/local_app.py``) opens a WebSocket
to ``ws://`` + ``location.host`` + ``/ws/echo`` (through the same tunnel), sends
``BROWSER_WS_MESSAGE`` and writes the echo into ``<p id="echo">``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from harness import CHROMIUM, CHROMIUM_ARGS, TIMEOUTS, ProcessPool, request
from local_app import BROWSER_WS_MESSAGE

DOMAIN = "tunnel.test"
NAME = "myapp"
LAUNCH_ARGS = [f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1", *CHROMIUM_ARGS]
#: Bound on the page load and on the echo reaching the page, in seconds.
BROWSER_TIMEOUT = 20.0
INSTALL_HINT = (
    "scripts/test installs both: `scripts/install .venv test` (Playwright for Python) and, "
    "as root, `apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
    "chromium` (Debian's Chromium; no Playwright browser download is used)"
)


def _sync_playwright() -> Any:
    """Playwright's ``sync_playwright``, or a failure saying how to install it."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"Playwright for Python is not installed ({e}); {INSTALL_HINT}", pytrace=False)
    return sync_playwright


def _require_chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing (Debian package chromium); {INSTALL_HINT}", pytrace=False
        )


def test_browser_websocket_through_a_named_tunnel(procs: ProcessPool, tmp_path: Path) -> None:
    _require_chromium()
    sync_playwright = _sync_playwright()

    app = procs.local_app()
    srv = procs.server("--domain", DOMAIN)
    # The browser's Origin names the public host, and the local app (Tornado's
    # WebSocketHandler.check_origin, like most apps) refuses a WebSocket whose Origin
    # differs from its Host with 403: this works because the app sees the public Host
    # (--host-header preserve, the default).
    cli = procs.client(srv, app, "--name", NAME)
    forwarding = cli.wait_for(r"forwarding (\S+) -> (\S+)", TIMEOUTS.connect)
    public_url = forwarding.group(1)
    assert public_url.lower() == f"http://{NAME}.{DOMAIN}:{srv.port}", forwarding.group(0)
    # the server routes by name before the browser comes in (a plain HTTP check first,
    # so that a routing failure is reported as such, not as a browser timeout)
    page_path = "/browser/ws"
    check = request(srv, "GET", page_path, headers=[("Host", f"{NAME}.{DOMAIN}:{srv.port}")])
    assert check.status == 200, (check.status, check.text()[:300])
    assert 'id="echo"' in check.text()

    shot = tmp_path / "browser-ws.png"
    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            page.set_default_timeout(BROWSER_TIMEOUT * 1000)
            response = page.goto(public_url + page_path, wait_until="load")
            assert response is not None and response.status == 200, response
            echo = page.locator("#echo")
            try:
                echo.filter(has_text=BROWSER_WS_MESSAGE).wait_for(
                    state="visible", timeout=BROWSER_TIMEOUT * 1000
                )
            except Exception as e:
                status = page.locator("#status").text_content()
                raise AssertionError(
                    f"no echo within {BROWSER_TIMEOUT:.0f} s (page status {status!r}, "
                    f"console {console})"
                ) from e
            text = echo.text_content()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert text == BROWSER_WS_MESSAGE
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot
    # both the page and the WebSocket went through the tunnel to the local app
    assert app.count(r'^hit GET "/browser/ws"$') >= 2  # the check above and the browser
    app.wait_for(re.escape('ws-open "/ws/echo"'), TIMEOUTS.request)
