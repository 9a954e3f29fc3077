"""HAR 1.2 recording on the client: one file per relayed request.

Bodies are kept only up to a cap (the rest is counted, not stored), so a
200 MiB download costs at most the cap in memory. Secret headers and query
parameters (``redact``) are masked unless the user asked for unmasked files.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import logging
import os
import time
import urllib.parse
from typing import Any

from . import __version__, protocol, redact, relay
from .config import ClientConfig

log = logging.getLogger("backstream.client")

_file_numbers = itertools.count(1)


class Body:
    """The first ``limit`` bytes of a body, and its full size (also the inspector's)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.kept = 0
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(data[:room])
            self.kept += min(room, len(data))

    def drop(self) -> None:
        """Let the kept bytes go (the inspector's memory budget); the size stays known."""
        self.parts = []
        self.kept = 0

    def as_har(self) -> dict[str, Any]:
        data = b"".join(self.parts)
        entry: dict[str, Any] = {}
        try:
            entry["text"] = data.decode("utf-8")
        except UnicodeDecodeError:
            entry["text"] = base64.b64encode(data).decode("ascii")
            entry["encoding"] = "base64"
        if self.size > self.kept:
            entry["comment"] = f"truncated to the first {self.kept} of {self.size} bytes"
        return entry


class HarEntry:
    """What is known of one request so far; written out by ``finish``."""

    def __init__(self, recorder: HarRecorder, head: protocol.RequestHead, url: str) -> None:
        self.recorder = recorder
        self.head = head
        self.url = url
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.waited: float | None = None
        self.request = Body(recorder.body_limit)
        self.response_ = Body(recorder.body_limit)
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []

    def request_body(self, data: bytes) -> None:
        self.request.add(data)

    def response(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        self.waited = time.monotonic() - self.started_mono
        self.status, self.reason, self.headers = status, reason, headers

    def response_body(self, data: bytes) -> None:
        self.response_.add(data)

    def finish(self, error: str | None) -> None:
        try:
            self.recorder.write(self, error)
        except OSError as e:
            log.error("cannot write HAR file in %s: %s", self.recorder.directory, e)


class HarRecorder:
    """Writes entries into ``directory``; with ``""`` it only builds documents (the inspector)."""

    def __init__(self, directory: str, unmasked: bool, body_limit: int) -> None:
        self.directory = directory
        self.unmasked = unmasked
        self.body_limit = body_limit
        if directory:
            os.makedirs(directory, exist_ok=True)

    def start(self, head: protocol.RequestHead, config: ClientConfig) -> HarEntry:
        url = config.dst_origin + relay.upstream_target(config.dst_base_path, head.target)
        return HarEntry(self, head, url)

    def _headers(self, headers: list[tuple[str, str]]) -> list[dict[str, str]]:
        shown = headers if self.unmasked else redact.current().mask_headers(headers)
        return [{"name": n, "value": v} for n, v in shown]

    def _url(self, url: str) -> str:
        return url if self.unmasked else redact.current().mask_target(url)

    def _text(self, text: str) -> str:
        return text if self.unmasked else redact.current().mask_text(text)

    def _query(self, url: str) -> list[dict[str, str]]:
        pairs = urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True)
        shown = pairs if self.unmasked else redact.current().mask_query(pairs)
        return [{"name": n, "value": v} for n, v in shown]

    def document(
        self, entry: HarEntry, error: str | None, ended: float | None = None
    ) -> dict[str, Any]:
        """The HAR 1.2 document of one entry that ended at monotonic time ``ended`` (now)."""
        head = entry.head
        total = ((time.monotonic() if ended is None else ended) - entry.started_mono) * 1000
        wait = (entry.waited or 0) * 1000
        request: dict[str, Any] = {
            "method": head.method,
            "url": self._url(entry.url),
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": self._headers(head.headers),
            "queryString": self._query(entry.url),
            "headersSize": -1,
            "bodySize": entry.request.size,
        }
        if entry.request.size:
            content_type = _header(head.headers, "content-type")
            request["postData"] = {"mimeType": content_type, **entry.request.as_har()}
        response = {
            "status": entry.status,
            "statusText": entry.reason,
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": self._headers(entry.headers),
            "content": {
                "size": entry.response_.size,
                "mimeType": _header(entry.headers, "content-type"),
                **entry.response_.as_har(),
            },
            "redirectURL": self._url(_header(entry.headers, "location")),
            "headersSize": -1,
            "bodySize": entry.response_.size,
        }
        har_entry: dict[str, Any] = {
            "startedDateTime": datetime.datetime.fromtimestamp(
                entry.started, datetime.UTC
            ).isoformat(),
            "time": total,
            "request": request,
            "response": response,
            "cache": {},
            "timings": {"send": 0, "wait": wait, "receive": max(total - wait, 0)},
        }
        if error:  # an error may quote a URL or a header
            har_entry["comment"] = self._text(f"relay failed: {error}")
        return {
            "log": {
                "version": "1.2",
                "creator": {"name": "backstream", "version": __version__},
                "entries": [har_entry],
            }
        }

    def write(self, entry: HarEntry, error: str | None) -> None:
        document = self.document(entry, error)
        name = f"{int(entry.started * 1000)}-{os.getpid()}-{next(_file_numbers)}.har"
        path = os.path.join(self.directory, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(document, f, ensure_ascii=False)
        os.replace(path + ".tmp", path)


def _header(headers: list[tuple[str, str]], name: str) -> str:
    for n, v in headers:
        if n.lower() == name:
            return v
    return ""
