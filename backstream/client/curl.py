"""Tornado's curl client, trimmed and extended for relaying.

Setup: Tornado's generic ``_curl_setup_request`` sets some forty options per
request (proxies, auth, redirects, decompression, ...) and was a quarter of
the client's CPU time. A relayed request needs a handful; the handle was
``reset()`` after its previous transfer, so everything else is libcurl's
default, and the request's ``prepare_curl_callback`` sets the rest.

Handles: Tornado makes all ``max_clients`` libcurl handles up front, 17 KiB
each, 4.4 MiB for the default ``--max-concurrency`` of 256 that an idle
client never uses. Here they are made when first needed and then reused.

A relayed request must stop when its caller goes away, the server times it
out or the tunnel drops. Tornado's ``CurlAsyncHTTPClient`` has no cancel; a
libcurl callback can only abort a transfer when libcurl happens to call it,
which an idle transfer (an app thinking about its answer) never does. So the
abort ends the transfer the way Tornado ends a failed one, through
``_finish``: the handle leaves the multi handle and the fetch fails with 599.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from io import BytesIO
from typing import Any, SupportsIndex

import pycurl
from tornado import httputil
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.httpclient import HTTPRequest

log = logging.getLogger("backstream.client")


class _LazyHandles(list[Any]):
    """Tornado's free list of curl handles, making up to ``count`` of them on demand."""

    def __init__(self, create: Callable[[], Any], count: int, made: list[Any]) -> None:
        super().__init__()
        self._create = create
        self._unmade = count
        self._made = made  # Tornado's ``_curls``: closed with the client

    def __bool__(self) -> bool:
        return len(self) > 0 or self._unmade > 0

    def pop(self, index: SupportsIndex = -1) -> Any:
        if len(self) > 0:
            return super().pop(index)
        if self._unmade <= 0:
            raise IndexError("pop from empty list")
        curl = self._create()  # may raise: then no slot is used up
        self._unmade -= 1
        self._made.append(curl)
        return curl


class UpstreamClient(CurlAsyncHTTPClient):
    def initialize(self, max_clients: int = 10, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(max_clients=0, **kwargs)
        self._free_list = _LazyHandles(self._curl_create, max_clients, self._curls)

    @property
    def handles_made(self) -> int:
        """How many libcurl handles exist (for tests: at most the peak concurrency)."""
        return len(self._curls)

    def _curl_setup_request(
        self, curl: Any, request: Any, buffer: BytesIO, headers: httputil.HTTPHeaders
    ) -> None:
        curl.setopt(pycurl.URL, request.url)
        curl.setopt(pycurl.PROXY, "")  # never an environment proxy towards the local app
        curl.setopt(pycurl.CONNECTTIMEOUT_MS, int(1000 * request.connect_timeout))
        curl.setopt(pycurl.NOSIGNAL, 1)  # policy threads may exist; timeouts are ours
        # An https:// local app: verified unless --dst-insecure, with --dst-ca if given.
        verify = request.validate_cert is not False
        curl.setopt(pycurl.SSL_VERIFYPEER, 1 if verify else 0)
        curl.setopt(pycurl.SSL_VERIFYHOST, 2 if verify else 0)
        if request.ca_certs:
            curl.setopt(pycurl.CAINFO, request.ca_certs)
        if request.method == "HEAD":
            curl.setopt(pycurl.NOBODY, 1)
        elif request.method != "GET":
            curl.setopt(pycurl.CUSTOMREQUEST, request.method)
        request.prepare_curl_callback(curl)

    def running(self, curl: Any, request: HTTPRequest) -> bool:
        """Whether ``curl`` still carries ``request``'s transfer (it may serve another by now)."""
        info = getattr(curl, "info", None)
        return info is not None and getattr(info.get("request"), "request", None) is request

    def abort(self, curl: Any, request: HTTPRequest, why: str) -> None:
        """End ``request``'s transfer on ``curl`` now, if it is still running.

        Call this from the IOLoop, never from inside a libcurl callback.
        """
        if not self.running(curl, request):
            log.debug("abort: transfer already finished (%s)", why)
            return
        log.debug("abort: ending transfer (%s)", why)
        self._finish(curl, pycurl.E_ABORTED_BY_CALLBACK, why)
