"""``UpstreamClient`` makes libcurl handles when first needed, reuses them, queues past the limit.

Real transfers to a Tornado app on 127.0.0.1 that holds each answer for a
moment, so the requests of a burst are all in flight together.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pycurl
from tornado.httpclient import HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from backstream.client.curl import UpstreamClient


class _Slow(RequestHandler):
    async def get(self) -> None:
        await asyncio.sleep(0.2)
        self.write("ok")


async def _burst(client: UpstreamClient, port: int, count: int) -> list[bytes]:
    bodies: list[list[bytes]] = [[] for _ in range(count)]

    def request(i: int) -> HTTPRequest:
        def prepare(curl: Any) -> None:
            curl.setopt(pycurl.WRITEFUNCTION, bodies[i].append)

        return HTTPRequest(f"http://127.0.0.1:{port}/", prepare_curl_callback=prepare)

    responses = await asyncio.gather(*(client.fetch(request(i)) for i in range(count)))
    assert [r.code for r in responses] == [200] * count
    return [b"".join(b) for b in bodies]


def test_handles_are_made_on_demand_and_reused() -> None:
    async def main() -> None:
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(Application([("/", _Slow)]))
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        client = UpstreamClient(force_instance=True, max_clients=256)
        try:
            assert client.handles_made == 0
            assert await _burst(client, port, 8) == [b"ok"] * 8
            assert client.handles_made == 8
            assert await _burst(client, port, 8) == [b"ok"] * 8
            assert client.handles_made == 8  # the same eight, reused
        finally:
            client.close()
            server.stop()

    asyncio.run(main())


def test_requests_past_the_limit_wait_for_a_free_handle() -> None:
    async def main() -> None:
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(Application([("/", _Slow)]))
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        client = UpstreamClient(force_instance=True, max_clients=2)
        try:
            assert await _burst(client, port, 5) == [b"ok"] * 5
            assert client.handles_made == 2
        finally:
            client.close()
            server.stop()

    asyncio.run(main())
