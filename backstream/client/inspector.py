"""The inspector's memory: the last relayed requests, and how they are shown.

Recording sits on the relay's hot path, so it only keeps references: the
request head the server sent, the response head the app sent, and the first
``body_limit`` bytes of each body (``har.Body`` stores a chunk as it is and
slices only the one that crosses the limit; the rest is counted). Records
live in a ring (``deque(maxlen=keep)``), and the bodies kept by all of them,
in flight or finished, stay under ``memory`` bytes: each byte is charged as it
is kept, and past the budget the oldest bodies are let go first (their records
stay, and a request still in flight keeps nothing more), so memory is bounded
whatever the traffic. Nothing is formatted or
encoded at record time: the functions below build JSON views, HAR documents
and ``curl`` commands only when the page or the API asks for one, masking
secrets (``redact``) unless the user asked for unmasked output.

Counters for ``/metrics`` are plain integers here, read by a collector only
when scraped (``inspector_web``).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import itertools
import json
import re
import shlex
import time
import urllib.parse
import zlib
from collections.abc import Callable
from typing import Any

from .. import protocol, redact, relay
from ..config import ClientConfig
from ..har import Body, HarEntry, HarRecorder

Headers = list[tuple[str, str]]

#: Upper bounds of the request duration histogram, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Bytes of a binary body shown as a hex dump.
HEX_PREVIEW = 1024
#: Seconds between pushes to the live page: a burst of requests becomes one push.
PUSH_DELAY = 0.05
#: Curl adds these unless told not to (an empty ``-H 'Name:'`` removes them).
_CURL_DEFAULTS = ("User-Agent", "Accept")
_NOT_COPIED = ("host", "content-length", "transfer-encoding")


class Record:
    """One relayed (or replayed) request: the same fields a ``HarEntry`` has."""

    __slots__ = (
        "inspector",
        "id",
        "head",
        "replay_of",
        "started",
        "started_mono",
        "waited",
        "status",
        "reason",
        "headers",
        "request",
        "response_",
        "duration",
        "error",
    )

    def __init__(
        self, inspector: Inspector, id: int, head: protocol.RequestHead, replay_of: int | None
    ) -> None:
        self.inspector = inspector
        self.id = id
        self.head = head
        self.replay_of = replay_of
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.waited: float | None = None
        self.status = 0
        self.reason = ""
        #: The response headers as the app sent them.
        self.headers: Headers = []
        self.request = Body(inspector.body_limit)
        self.response_ = Body(inspector.body_limit)
        #: Seconds from the request head to the end of the response; None while in flight.
        self.duration: float | None = None
        self.error: str | None = None

    # The four calls the relay makes, as for a HarEntry.

    def request_body(self, data: bytes) -> None:
        kept = self.request.kept
        self.request.add(data)
        if self.request.kept != kept:
            self.inspector.charge(self.request.kept - kept)

    def response(self, status: int, reason: str, headers: Headers) -> None:
        self.waited = time.monotonic() - self.started_mono
        self.status, self.reason, self.headers = status, reason, headers

    def response_body(self, data: bytes) -> None:
        kept = self.response_.kept
        self.response_.add(data)
        if self.response_.kept != kept:
            self.inspector.charge(self.response_.kept - kept)

    def finish(self, error: str | None) -> None:
        self.duration = time.monotonic() - self.started_mono
        self.error = error
        self.inspector.finished(self)


class Inspector:
    """The ring of records, the live page's listeners and the client's counters."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.keep = config.inspect_keep
        self.body_limit = config.inspect_body_limit
        self.memory = config.inspect_memory
        #: Body bytes kept by the records in the ring.
        self.kept_bytes = 0
        self.unmasked = config.har_unmasked
        self.records: collections.deque[Record] = collections.deque(maxlen=self.keep)
        #: Called with a batch of Server-Sent Events text (one string for all of them).
        self.listeners: set[Callable[[str], None]] = set()
        self._changed: dict[int, Record] = {}
        self._ids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        # counters, read by the /metrics collector
        self.in_flight = 0
        self.by_class: collections.Counter[str] = collections.Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.replays = 0
        self.connects = 0
        self.connected = False
        #: The streams the current tunnel carries (its stream table), 0 while disconnected.
        self.open_streams: Callable[[], int] = lambda: 0

    def start(self, head: protocol.RequestHead, replay_of: int | None = None) -> Record:
        record = Record(self, next(self._ids), head, replay_of)
        if len(self.records) == self.keep:  # the oldest is about to leave the ring
            _let_go(self.records[0])
            self.kept_bytes -= _kept(self.records[0])
        self.records.append(record)
        if replay_of is None:
            self.in_flight += 1
        if self.listeners:
            self._push(record)
        return record

    def finished(self, record: Record) -> None:
        if record.replay_of is None:
            self.in_flight -= 1
            duration = record.duration or 0.0
            self.by_class[status_class(record)] += 1
            self.bytes_in += record.request.size
            self.bytes_out += record.response_.size
            self.buckets[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
            self.duration_sum += duration
        else:
            self.replays += 1
        if self.listeners:
            self._push(record)

    def charge(self, size: int) -> None:
        """``size`` more body bytes kept; past the budget, the oldest bodies go."""
        self.kept_bytes += size
        if self.kept_bytes <= self.memory:
            return
        for old in self.records:
            if self.kept_bytes <= self.memory:
                return
            kept = _kept(old)
            if kept:
                self.kept_bytes -= kept
                _let_go(old)

    def get(self, id: int) -> Record | None:
        """The record with ``id`` if it is still in the ring (ids are consecutive there)."""
        if not self.records:
            return None
        index = id - self.records[0].id
        if 0 <= index < len(self.records):
            record = self.records[index]
            if record.id == id:
                return record
        return None

    def _push(self, record: Record) -> None:
        if not self._changed:
            self._loop.call_later(PUSH_DELAY, self._send_changes)
        self._changed[record.id] = record

    def _send_changes(self) -> None:
        records, self._changed = list(self._changed.values()), {}
        if not self.listeners or not records:
            return
        text = "".join(
            f"event: request\ndata: {json.dumps(summary(r, self.unmasked))}\n\n" for r in records
        )
        for listener in list(self.listeners):
            listener(text)


def _kept(record: Record) -> int:
    return record.request.kept + record.response_.kept


def _let_go(record: Record) -> None:
    """Drop what ``record`` kept of its bodies; in flight, it keeps nothing more."""
    for body in (record.request, record.response_):
        body.drop()
        body.limit = 0


# -- views (built on demand, never at record time) ------------------------------------


def status_class(record: Record) -> str:
    """``2xx`` ... for a response, ``failed`` when none came back (an error or no head)."""
    if record.status == 0:
        return "failed" if record.duration is not None else "pending"
    return f"{record.status // 100}xx" if 100 <= record.status <= 599 else "other"


def header(headers: Headers, name: str) -> str:
    for n, v in headers:
        if n.lower() == name:
            return v
    return ""


def _shown_target(target: str, unmasked: bool) -> str:
    return target if unmasked else redact.current().mask_target(target)


def _shown_headers(headers: Headers, unmasked: bool) -> list[list[str]]:
    shown = headers if unmasked else redact.current().mask_headers(headers)
    return [[n, v] for n, v in shown]


def summary(record: Record, unmasked: bool) -> dict[str, Any]:
    """One line of the list."""
    head = record.head
    duration = record.duration
    return {
        "id": record.id,
        "replay_of": record.replay_of,
        "time": record.started,
        "method": head.method,
        "path": _shown_target(head.target, unmasked),
        "status": record.status,
        "reason": record.reason,
        "class": status_class(record),
        "duration_ms": None if duration is None else round(duration * 1000, 3),
        "request_size": record.request.size,
        "response_size": record.response_.size,
        "content_type": header(record.headers, "content-type"),
        "error": record.error,
    }


def detail(record: Record, config: ClientConfig, unmasked: bool) -> dict[str, Any]:
    """Everything the detail view shows: both heads (masked) and both bodies by type."""
    head = record.head
    url = config.dst_origin + relay.upstream_target(config.dst_base_path, head.target)
    view = summary(record, unmasked)
    view["request"] = {
        "method": head.method,
        "target": _shown_target(head.target, unmasked),
        "url": _shown_target(url, unmasked),
        "http_version": "HTTP/1.1",
        "remote": head.remote,
        "scheme": head.scheme,
        "headers": _shown_headers(head.headers, unmasked),
        "body": body_view(record.request, head.headers, f"{record.id}/body/request"),
    }
    view["response"] = {
        "status": record.status,
        "reason": record.reason,
        "http_version": "HTTP/1.1",
        "headers": _shown_headers(record.headers, unmasked),
        "body": body_view(record.response_, record.headers, f"{record.id}/body/response"),
    }
    view["wait_ms"] = None if record.waited is None else round(record.waited * 1000, 3)
    return view


def body_bytes(body: Body) -> bytes:
    return b"".join(body.parts)


def body_view(body: Body, headers: Headers, path: str) -> dict[str, Any]:
    """A body as the page renders it: ``kind`` is empty, json, form, text, image or binary.

    ``text`` is the body as sent (decoded when it was gzip or deflate), ``pretty``
    the JSON indented, ``form`` the fields of a form, ``hex`` a dump of the start
    of a binary body; ``url`` serves the kept bytes (images are shown from it).
    """
    content_type = header(headers, "content-type")
    view: dict[str, Any] = {
        "size": body.size,
        "kept": body.kept,
        "truncated": body.size > body.kept,
        "content_type": content_type,
        "url": f"/api/requests/{path}",
        "kind": "empty",
    }
    if not body.size:
        return view
    data = body_bytes(body)
    encoding = header(headers, "content-encoding").strip().lower()
    if encoding in ("gzip", "deflate") and not view["truncated"]:
        try:  # shown decoded, at most body_limit bytes of it; relayed untouched
            decoder = zlib.decompressobj(47 if encoding == "gzip" else 15)
            data = decoder.decompress(data, max(body.limit, 1))
            view["decoded"] = encoding
        except zlib.error:
            pass
    mime = content_type.split(";", 1)[0].strip().lower()
    text = _text(data)
    if mime.startswith("image/"):
        view["kind"] = "image"
    elif text is not None and (mime == "application/json" or mime.endswith("+json")):
        view["text"], view["kind"] = text, "text"
        try:
            view["pretty"] = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            view["kind"] = "json"
        except ValueError:
            pass
    elif text is not None and mime == "application/x-www-form-urlencoded":
        view["form"] = [list(p) for p in urllib.parse.parse_qsl(text, keep_blank_values=True)]
        view["text"], view["kind"] = text, "form"
    elif text is not None:
        view["text"], view["kind"] = text, "text"
    else:
        view["hex"], view["kind"] = hex_dump(data[:HEX_PREVIEW]), "binary"
    return view


def _text(data: bytes) -> str | None:
    """``data`` as UTF-8 text, or None for binary (a cut multi-byte character is allowed)."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start >= len(data) - 3:  # truncated inside the last character
            return data[: e.start].decode("utf-8", "replace")
        return None


def hex_dump(data: bytes) -> str:
    lines = []
    for offset in range(0, len(data), 16):
        row = data[offset : offset + 16]
        ascii_ = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{offset:08x}  {row.hex(' '):<47}  |{ascii_}|")
    return "\n".join(lines)


def har_document(record: Record, config: ClientConfig, unmasked: bool) -> dict[str, Any]:
    """The record as a HAR 1.2 document, built by the HAR recorder itself."""
    recorder = HarRecorder("", unmasked, record.inspector.body_limit)
    url = config.dst_origin + relay.upstream_target(config.dst_base_path, record.head.target)
    entry = HarEntry(recorder, record.head, url)
    entry.started, entry.started_mono, entry.waited = (
        record.started,
        record.started_mono,
        record.waited,
    )
    entry.request, entry.response_ = record.request, record.response_
    entry.status, entry.reason, entry.headers = record.status, record.reason, record.headers
    ended = None if record.duration is None else record.started_mono + record.duration
    return recorder.document(entry, record.error, ended)


def curl_command(record: Record, config: ClientConfig, unmasked: bool) -> str:
    """A shell command line that sends the request again, straight to the local app."""
    head = record.head
    url = config.dst_origin + relay.upstream_target(config.dst_base_path, head.target)
    host = relay.upstream_host(config.host_header, head.host, config.dst_netloc)
    headers = [("Host", host), *((n, v) for n, v in head.headers if n.lower() not in _NOT_COPIED)]
    if not unmasked:
        url = redact.current().mask_target(url)
        headers = redact.current().mask_headers(headers)
    data = body_bytes(record.request)
    args = ["curl", "--path-as-is"]
    if head.method == "HEAD":
        args.append("--head")
    elif head.method != "GET" or data:
        args += ["-X", head.method]
    args.append(url)
    present = {n.lower() for n, _ in headers}
    for name, value in headers:
        args += ["-H", f"{name}: {value}" if value else f"{name};"]
    for name in _CURL_DEFAULTS:
        if name.lower() not in present:
            args += ["-H", f"{name}:"]
    prefix = ""
    if data:
        for name in ("Content-Type", "Expect"):  # curl would add its own
            if name.lower() not in present:
                args += ["-H", f"{name}:"]
        text = _text(data)
        if text is not None and text.encode() == data:
            args += ["--data-raw", text]
        else:
            encoded = base64.b64encode(data).decode()
            prefix = f"printf %s {shlex.quote(encoded)} | base64 -d | "
            args += ["--data-binary", "@-"]
    command = prefix + shlex.join(args)
    if record.request.size > record.request.kept:
        kept, size = record.request.kept, record.request.size
        command = f"# the body was cut to the first {kept} of {size} bytes\n{command}"
    return command


# -- replay ---------------------------------------------------------------------------


class ReplayError(ValueError):
    """An edit that cannot be sent (answered 400 with this message)."""


def replay_request(
    record: Record, edits: dict[str, Any], config: ClientConfig
) -> tuple[protocol.RequestHead, bytes, str]:
    """The request to send again, the record's with the page's edits: (head, body, Host).

    The ``Host`` sent is the edited one if the user changed it, else what the
    relay would send (``--host-header``).

    The page shows masked values (``***``); an edited header or query value that
    still reads as the original's masked form gets the original value back, so
    "replay as it was" works without ever showing the secret.
    """
    head = record.head
    method = edits.get("method") or head.method
    if not isinstance(method, str) or not protocol.is_token(method):
        raise ReplayError(f"invalid method {str(method)[:40]!r}")
    target = edits.get("path") or head.target
    if not isinstance(target, str):
        raise ReplayError("path must be a string")
    target = _restore_target(target, head.target)
    if not protocol.is_origin_form(target):
        raise ReplayError(f"path {target[:100]!r} must start with / (no spaces)")
    headers = list(head.headers)
    if "headers" in edits:
        pairs = edits["headers"]
        if not isinstance(pairs, list) or not all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(x, str) for x in p)
            for p in pairs
        ):
            raise ReplayError("headers must be a list of [name, value] pairs")
        headers = _restore_headers([(n.strip(), v.strip()) for n, v in pairs], head.headers)
        problem = protocol.headers_problem(headers)
        if problem is not None:
            raise ReplayError(problem)
    host = header(headers, "host")
    if not host or host == header(head.headers, "host"):
        host = relay.upstream_host(config.host_header, head.host, config.dst_netloc)
    if "body_base64" in edits or "body" in edits:
        body = _edited_body(edits)
    elif record.request.size > record.request.kept:
        raise ReplayError(
            f"only {record.request.kept} of the body's {record.request.size} bytes were kept "
            "(--inspect-body-limit): send an edited body"
        )
    else:
        body = body_bytes(record.request)
    length = header(headers, "content-length")
    if (body or length) and length != str(len(body)):
        headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
    replayed = protocol.RequestHead(
        0, method, target, headers, len(body), head.remote, head.scheme, head.host
    )
    return replayed, body, host


def _edited_body(edits: dict[str, Any]) -> bytes:
    if "body_base64" in edits:
        try:
            return base64.b64decode(str(edits["body_base64"]), validate=True)
        except ValueError:
            raise ReplayError("body_base64 is not base64") from None
    body = edits["body"]
    if not isinstance(body, str):
        raise ReplayError("body must be a string")
    return body.encode("utf-8")


def _restore_headers(edited: Headers, original: Headers) -> Headers:
    masker = redact.current()
    masked = masker.mask_headers(original)
    out = []
    for name, value in edited:
        for (on, ov), (_, mv) in zip(original, masked, strict=True):
            if on.lower() == name.lower() and mv == value and ov != mv:
                value = ov
                break
        out.append((name, value))
    return out


_QUERY_VALUE = re.compile(r"([?&;])([^=&;#]+)=([^&;#]*)")


def _restore_target(edited: str, original: str) -> str:
    if edited == redact.current().mask_target(original):
        return original
    values: dict[str, list[str]] = {}
    for m in _QUERY_VALUE.finditer(original):
        values.setdefault(m.group(2).lower(), []).append(m.group(3))

    def restore(m: re.Match[str]) -> str:
        if m.group(3) != redact.MASK:
            return m.group(0)
        found = values.get(m.group(2).lower())
        return m.group(1) + m.group(2) + "=" + (found.pop(0) if found else redact.MASK)

    return _QUERY_VALUE.sub(restore, edited)
