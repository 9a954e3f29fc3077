"""Tornado's curl client, plus the one thing a proxy needs that it lacks: abort.

A relayed request must stop when its caller goes away, the server times it
out or the tunnel drops. Tornado's ``CurlAsyncHTTPClient`` has no cancel; a
libcurl callback can only abort a transfer when libcurl happens to call it,
which an idle transfer (an app thinking about its answer) never does. So the
abort ends the transfer the way Tornado ends a failed one, through
``_finish``: the handle leaves the multi handle and the fetch fails with 599.
"""

from __future__ import annotations

from typing import Any

import pycurl
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.httpclient import HTTPRequest


class UpstreamClient(CurlAsyncHTTPClient):
    def abort(self, curl: Any, request: HTTPRequest, why: str) -> None:
        """End ``request``'s transfer on ``curl`` now, if it is still running.

        Call this from the IOLoop, never from inside a libcurl callback.
        """
        info = getattr(curl, "info", None)
        if info is None or getattr(info.get("request"), "request", None) is not request:
            return  # finished already; the handle may serve another request by now
        self._finish(curl, pycurl.E_ABORTED_BY_CALLBACK, why)
