"""``masking``: the fast mask equals Tornado's, and Tornado's frames use it once installed."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st
from tornado.util import _websocket_mask_python

from backstream import masking


@given(st.binary(min_size=4, max_size=4), st.binary(max_size=5000))
def test_mask_is_the_rfc_6455_xor(key: bytes, data: bytes) -> None:
    assert masking.mask(key, data) == _websocket_mask_python(key, data)
    assert masking.mask(key, masking.mask(key, data)) == data


def test_the_sse2_mask_of_websockets_is_used_when_installed() -> None:
    # websockets is a dependency: falling back to Tornado's mask here would be
    # a silent 10x slowdown of every transfer.
    assert masking.mask.__qualname__.startswith("_fastest.")


INSTALLED_ROUND_TRIP = """
import asyncio, os, sys
import tornado.websocket
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application
from tornado.websocket import WebSocketHandler, websocket_connect
from backstream import masking

calls = []
fast = masking.mask
def counting(key, data):
    calls.append(len(data))
    return fast(key, data)
masking.mask = counting
masking.install()

class Echo(WebSocketHandler):
    def on_message(self, message):
        self.write_message(message, binary=True)

async def main():
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(Application([("/", Echo)]))
    server.add_sockets(sockets)
    ws = await websocket_connect(f"ws://127.0.0.1:{sockets[0].getsockname()[1]}/")
    payload = os.urandom(100_003)
    ws.write_message(payload, binary=True)
    assert await ws.read_message() == payload
    ws.close()
    server.stop()

asyncio.run(main())
# the client masked the frame and the server unmasked it, both with ours
print(sorted(calls))
"""


def test_tornado_frames_are_masked_and_unmasked_by_it_once_installed() -> None:
    # A fresh interpreter: install() changes Tornado for the whole process.
    out = subprocess.run(
        [sys.executable, "-c", INSTALLED_ROUND_TRIP],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    calls = [int(n) for n in out.stdout.strip().strip("[]").split(", ")]
    assert calls.count(100_003) == 2, calls  # (the close frame is masked too)
