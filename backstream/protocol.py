"""The backstream wire protocol, free of I/O.

One tunnel is one WebSocket between the public server and a client. Each
binary WebSocket message carries one or more *frames* back to back (a sender
batches what it has queued in one event-loop turn into one message)::

    +--------+---------+----------------------+---------------------+---------+
    | type 1 | flags 1 | stream id 4 (BE u32) | payload length 4 BE | payload |
    +--------+---------+----------------------+---------------------+---------+

Frame types (``S->C``: server to client):

* ``REQUEST``  S->C  opens a stream: the public request head (JSON array).
* ``RESPONSE`` C->S  the response head for a stream (JSON array).
* ``DATA``     both  body bytes, raw; ``FLAG_END`` marks the last one. On a
  WebSocket stream (a REQUEST with ``FLAG_UPGRADE`` answered 101) DATA carry
  messages: one message is one or more DATA frames, all but its last with
  ``FLAG_MORE``, each with ``FLAG_TEXT`` for text, so a message of any size
  crosses under the stream's window. ``FLAG_END`` closes the WebSocket
  (payload: the close code, u16, and reason, if the closing side gave one;
  empty for a close without a code).
* ``WINDOW``   both  grants the peer more credit for DATA on a stream (u32).
* ``RESET``    both  aborts one stream (u16 error code, UTF-8 message); the
  tunnel and every other stream carry on.

Flow control: a side may only send as many DATA payload bytes on a stream as
its peer has granted, starting from ``INITIAL_WINDOW``; the receiver grants
more as it consumes (``RecvWindow``). Memory per stream is therefore bounded by
the window whatever the body size, and one slow stream never stalls the others.

The protocol version travels in the ``Backstream-Client`` header of the
WebSocket handshake, so a client speaking another version is refused before
the upgrade with a message that says which versions the two sides speak.

Nothing here does I/O: callers feed each message to :func:`decode_all`, and
send what :meth:`Frame.encode` returns, gathered into messages by a
:class:`Batch`. Malformed input raises :class:`ProtocolError` (the I/O layer
closes that one tunnel), never anything else.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import struct
from collections.abc import Iterator
from typing import Any, ClassVar

from .errors import ProtocolError

PROTOCOL_VERSION = 1
#: Request header that marks the tunnel handshake; its value is the version.
CLIENT_HEADER = "Backstream-Client"
#: Request header that marks a peer link's handshake (``--redis``, ``server/peers.py``).
PEER_HEADER = "Backstream-Peer"

#: Credit each side starts with for each stream and direction, in bytes.
INITIAL_WINDOW = 2 * 1024 * 1024
#: Largest DATA payload a sender puts in one frame (must fit twice in a window).
MAX_CHUNK = 256 * 1024
#: Largest WebSocket message relayed by default (``--ws-max-message``), in fragments.
DEFAULT_WEBSOCKET_MESSAGE = 64 * 1024 * 1024
#: Largest frame payload a receiver accepts.
MAX_FRAME = MAX_CHUNK + 64 * 1024
#: A sender starts a new message once a batch reaches this size.
BATCH_SIZE = 256 * 1024
#: Largest message a receiver accepts: a full batch plus one largest frame.
MAX_MESSAGE = BATCH_SIZE + MAX_FRAME + 64
#: Credit a peer may hold on one stream: an honest receiver only grants back what was
#: consumed, so more than one window is a protocol error (a peer that grants and never
#: reads cannot make the sender buffer without bound).
MAX_WINDOW = INITIAL_WINDOW

_HEADER = struct.Struct("!BBII")
HEADER_SIZE = _HEADER.size
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")

FLAG_END = 0x01
#: On REQUEST: a WebSocket upgrade; the stream then carries messages, not a body.
FLAG_UPGRADE = 0x02
#: On DATA of a WebSocket stream: a text message (otherwise binary).
FLAG_TEXT = 0x04
#: On DATA of a WebSocket stream: the message goes on in the next DATA frame.
FLAG_MORE = 0x08

Headers = list[tuple[str, str]]


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3
    WINDOW = 4
    RESET = 5


def check_version(header_value: str | None) -> str | None:
    """Why a handshake's ``Backstream-Client`` value is refused, or None if it is fine."""
    if header_value is None:
        return f"missing {CLIENT_HEADER} header"
    if header_value.strip() != str(PROTOCOL_VERSION):
        return (
            f"protocol version mismatch: server speaks {PROTOCOL_VERSION}, "
            f"client sent {header_value.strip()[:20]!r}; upgrade the older side"
        )
    return None


@dataclasses.dataclass(slots=True)
class RequestHead:
    """A public request as the server saw it (headers already filtered)."""

    stream_id: int
    method: str
    target: str
    headers: Headers
    #: Body length: 0 for none, N for Content-Length N, -1 when unknown (chunked).
    body_length: int = 0
    remote: str = ""
    scheme: str = "http"
    host: str = ""
    #: A WebSocket upgrade: each DATA frame is then one whole message.
    upgrade: bool = False

    TYPE: ClassVar[FrameType] = FrameType.REQUEST

    def encode(self) -> bytes:
        payload = [
            self.method,
            self.target,
            self.headers,
            self.body_length,
            self.remote,
            self.scheme,
            self.host,
        ]
        flags = FLAG_UPGRADE if self.upgrade else 0
        return _head_frame(self.TYPE, flags, self.stream_id, payload)

    @classmethod
    def decode_payload(cls, stream_id: int, flags: int, payload: bytes) -> RequestHead:
        fields = _json_array(payload, 7)
        method, target, headers, body_length, remote, scheme, host = fields
        if not (isinstance(method, str) and method and isinstance(target, str)):
            raise ProtocolError("REQUEST: method and target must be strings")
        if not isinstance(body_length, int) or isinstance(body_length, bool) or body_length < -1:
            raise ProtocolError("REQUEST: bad body length")
        if not (isinstance(remote, str) and isinstance(scheme, str) and isinstance(host, str)):
            raise ProtocolError("REQUEST: remote, scheme and host must be strings")
        if _SURROGATE.search(remote) or _SURROGATE.search(scheme):
            raise ProtocolError("REQUEST: remote and scheme must be valid Unicode")
        if not is_token(method):
            raise ProtocolError(f"REQUEST: method {method[:40]!r} is not an HTTP token")
        if not is_origin_form(target):
            raise ProtocolError(f"REQUEST: target {target[:100]!r} is not an origin-form path")
        if not _VISIBLE.fullmatch(host):
            raise ProtocolError(f"REQUEST: host {host[:100]!r} has spaces or control bytes")
        return cls(
            stream_id,
            method,
            target,
            _headers(headers),
            body_length,
            remote,
            scheme,
            host,
            bool(flags & FLAG_UPGRADE),
        )


@dataclasses.dataclass(slots=True)
class ResponseHead:
    """The local app's status line and headers (hop-by-hop already removed)."""

    stream_id: int
    status: int
    reason: str
    headers: Headers
    #: True when no DATA follows (HEAD, 204, 304 or an empty body).
    end_stream: bool = False

    TYPE: ClassVar[FrameType] = FrameType.RESPONSE

    def encode(self) -> bytes:
        flags = FLAG_END if self.end_stream else 0
        return _head_frame(
            self.TYPE, flags, self.stream_id, [self.status, self.reason, self.headers]
        )

    @classmethod
    def decode_payload(cls, stream_id: int, flags: int, payload: bytes) -> ResponseHead:
        status, reason, headers = _json_array(payload, 3)
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 999:
            raise ProtocolError("RESPONSE: status must be an integer from 100 to 999")
        if not isinstance(reason, str) or _FORBIDDEN_IN_VALUE.search(reason):
            raise ProtocolError("RESPONSE: reason must be a string without control bytes")
        return cls(stream_id, status, reason, _headers(headers), bool(flags & FLAG_END))


@dataclasses.dataclass(slots=True)
class Data:
    """A piece of a body. An empty payload with ``end_stream`` just ends it."""

    stream_id: int
    data: bytes
    end_stream: bool = False
    #: A text WebSocket message (WebSocket streams only).
    text: bool = False
    #: Not the last fragment of its WebSocket message (WebSocket streams only).
    more: bool = False

    TYPE: ClassVar[FrameType] = FrameType.DATA

    def encode(self) -> bytes:
        return b"".join(self.parts())

    def parts(self) -> tuple[bytes, bytes]:
        """Header and payload apart, so that a batch copies the payload only once."""
        flags = (
            (FLAG_END if self.end_stream else 0)
            | (FLAG_TEXT if self.text else 0)
            | (FLAG_MORE if self.more else 0)
        )
        return _HEADER.pack(self.TYPE, flags, self.stream_id, len(self.data)), self.data

    @classmethod
    def decode_payload(cls, stream_id: int, flags: int, payload: bytes) -> Data:
        return cls(
            stream_id,
            payload,
            bool(flags & FLAG_END),
            bool(flags & FLAG_TEXT),
            bool(flags & FLAG_MORE),
        )


@dataclasses.dataclass(slots=True)
class Window:
    """Grants the peer ``increment`` more bytes of DATA on ``stream_id``."""

    stream_id: int
    increment: int

    TYPE: ClassVar[FrameType] = FrameType.WINDOW

    def encode(self) -> bytes:
        return _HEADER.pack(self.TYPE, 0, self.stream_id, _U32.size) + _U32.pack(self.increment)

    @classmethod
    def decode_payload(cls, stream_id: int, flags: int, payload: bytes) -> Window:
        if len(payload) != _U32.size:
            raise ProtocolError("WINDOW: payload must be 4 bytes")
        (increment,) = _U32.unpack(payload)
        if increment == 0:
            raise ProtocolError("WINDOW: increment must be positive")
        return cls(stream_id, increment)


@dataclasses.dataclass(slots=True)
class Reset:
    """Aborts one stream; ``code`` is an ``errors.StreamError.reset_code``."""

    stream_id: int
    code: int
    message: str = ""

    TYPE: ClassVar[FrameType] = FrameType.RESET

    def encode(self) -> bytes:
        text = self.message.encode("utf-8")[:1024]
        length = _U16.size + len(text)
        return _HEADER.pack(self.TYPE, 0, self.stream_id, length) + _U16.pack(self.code) + text

    @classmethod
    def decode_payload(cls, stream_id: int, flags: int, payload: bytes) -> Reset:
        if len(payload) < _U16.size:
            raise ProtocolError("RESET: payload too short")
        (code,) = _U16.unpack_from(payload)
        message = payload[_U16.size :].decode("utf-8", "replace")
        return cls(stream_id, code, message)


Frame = RequestHead | ResponseHead | Data | Window | Reset

_DECODERS: dict[int, Any] = {
    FrameType.REQUEST: RequestHead.decode_payload,
    FrameType.RESPONSE: ResponseHead.decode_payload,
    FrameType.DATA: Data.decode_payload,
    FrameType.WINDOW: Window.decode_payload,
    FrameType.RESET: Reset.decode_payload,
}


def decode_all(message: bytes) -> list[Frame]:
    """Parse one WebSocket message into its frames; raise ProtocolError if malformed."""
    if len(message) > MAX_MESSAGE:
        raise ProtocolError(f"message too large ({len(message)} bytes)")
    frames: list[Frame] = []
    offset, end = 0, len(message)
    view = memoryview(message)
    while offset < end:
        if end - offset < HEADER_SIZE:
            raise ProtocolError(f"truncated frame header ({end - offset} bytes)")
        type_, flags, stream_id, length = _HEADER.unpack_from(message, offset)
        start = offset + HEADER_SIZE
        offset = start + length
        if length > MAX_FRAME:
            raise ProtocolError(f"frame too large ({length} bytes)")
        if offset > end:
            raise ProtocolError(f"truncated frame: {length} bytes announced, {end - start} sent")
        decoder = _DECODERS.get(type_)
        if decoder is None:
            raise ProtocolError(f"unknown frame type {type_}")
        if stream_id == 0:
            raise ProtocolError("stream id 0 is reserved")
        frames.append(decoder(stream_id, flags, bytes(view[start:offset])))
    if not frames:
        raise ProtocolError("empty message")
    return frames


def decode(message: bytes) -> Frame:
    """Parse a message that must hold exactly one frame (tests and tools)."""
    frames = decode_all(message)
    if len(frames) != 1:
        raise ProtocolError(f"expected one frame, got {len(frames)}")
    return frames[0]


class Batch:
    """Encoded frames waiting to go out, cut into messages of about BATCH_SIZE.

    Batching is what keeps a busy tunnel cheap: one WebSocket message (one
    header, one mask, one syscall) for everything a turn of the event loop
    produced, instead of one per frame.
    """

    __slots__ = ("_frames",)

    def __init__(self) -> None:
        self._frames: list[tuple[bytes, ...]] = []

    def __bool__(self) -> bool:
        return bool(self._frames)

    def add(self, *parts: bytes) -> None:
        """Queue one frame, given whole or as pieces (``Data.parts()``)."""
        self._frames.append(parts)

    def messages(self) -> list[list[bytes]]:
        """Take everything queued, as messages: each the list of its pieces, in order.

        The pieces are not joined here: the writer sends them as one message
        without copying the big ones (``websocket_writer``).
        """
        messages: list[list[bytes]] = []
        current: list[bytes] = []
        size = 0
        for frame in self._frames:
            length = sum(len(part) for part in frame)
            if current and size + length > BATCH_SIZE:
                messages.append(current)
                current, size = [], 0
            current.extend(frame)
            size += length
        if current:
            messages.append(current)
        self._frames = []
        return messages


#: Close codes no endpoint may send (RFC 6455 7.4.1): 1005 and 1006 only report, locally,
#: a close frame without a code and a connection that dropped without one.
RESERVED_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})
#: Relayed in place of a dropped connection (1006 cannot be sent): the peer went away.
GOING_AWAY = 1001


def sendable_close_code(code: int) -> bool:
    """Whether ``code`` may be sent in a close frame."""
    return 1000 <= code <= 4999 and code not in RESERVED_CLOSE_CODES


def close_reason(text: str) -> str:
    """``text`` cut to what a close frame holds beside its code (123 bytes of UTF-8)."""
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")


def close_payload(code: int | None, reason: str | None) -> bytes:
    """The payload of the DATA frame that closes a WebSocket stream: empty for no code."""
    if code is None or not sendable_close_code(code):
        return b""
    return _U16.pack(code) + close_reason(reason or "").encode("utf-8")


def parse_close(payload: bytes) -> tuple[int | None, str | None]:
    """(code, reason) from a closing DATA payload; (None, None) when it had no code.

    No code stays no code: closing with it makes Tornado send a close frame
    without one, which the far end reads as 1005, as it would have directly.
    """
    if len(payload) < _U16.size:
        return None, None
    (code,) = _U16.unpack_from(payload)
    if not sendable_close_code(code):
        return None, None
    # cut again: a replaced invalid byte grows to three, and Tornado refuses a long reason
    return code, close_reason(payload[_U16.size :].decode("utf-8", "replace"))


#: One encoder for every head (``json.dumps`` with options builds a new one per call).
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _head_frame(type_: FrameType, flags: int, stream_id: int, payload: list[Any]) -> bytes:
    body = _encode_json(payload).encode("utf-8")
    return _HEADER.pack(type_, flags, stream_id, len(body)) + body


def _json_array(payload: bytes, length: int) -> list[Any]:
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"head is not valid JSON: {e}") from None
    except RecursionError:  # "[[[[..." nested past the parser's recursion limit
        raise ProtocolError("head is nested too deeply") from None
    if not isinstance(value, list) or len(value) != length:
        raise ProtocolError(f"head must be a JSON array of {length} items")
    return value


def _headers(value: Any) -> Headers:
    if not isinstance(value, list):
        raise ProtocolError("headers must be a list of [name, value] pairs")
    pairs: Headers = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], str)
        ):
            raise ProtocolError("headers must be a list of [name, value] pairs")
        problem = header_problem(item[0], item[1])
        if problem is not None:
            raise ProtocolError(problem)
        pairs.append((item[0], item[1]))
    return pairs


# -- what may be written on an HTTP/1.1 connection (RFC 9110 5.1, 5.5; RFC 9112 3.2) --------
# Both sides check with these before a head goes out, and the decoder refuses anything
# else, so no peer can make the other write CR, LF or a second request onto a socket.

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Visible ASCII and obs-text: no space, no control byte.
_VISIBLE = re.compile(r"[\x21-\x7e\x80-\xff]*")
#: A request target in origin-form: a path, maybe a query.
_ORIGIN_FORM = re.compile(r"/[\x21-\x7e\x80-\xff]*")
#: A lone UTF-16 surrogate: JSON can escape one (``"\\ud800"``), UTF-8 cannot carry it.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
#: Control bytes a field value must not hold (HTAB is allowed), and anything past latin-1.
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\u0100-\U0010ffff]")


def is_token(text: str) -> bool:
    """Whether ``text`` is an HTTP token: a method or a header name."""
    return _TOKEN.fullmatch(text) is not None


def is_origin_form(target: str) -> bool:
    """Whether ``target`` is ``/path?query`` with no space or control byte."""
    return _ORIGIN_FORM.fullmatch(target) is not None


def header_problem(name: str, value: str) -> str | None:
    """Why a header cannot be written on an HTTP/1.1 connection, or None."""
    if not is_token(name):
        return f"header name {name[:40]!r} is not an HTTP token"
    if _FORBIDDEN_IN_VALUE.search(value):
        return f"header {name} has a control byte in its value"
    return None


def headers_problem(headers: Headers) -> str | None:
    """The first header of ``headers`` that cannot be written, or None."""
    for name, value in headers:
        problem = header_problem(name, value)
        if problem is not None:
            return problem
    return None


def fragments(stream_id: int, message: bytes, text: bool) -> Iterator[Data]:
    """One WebSocket message as DATA frames of at most ``MAX_CHUNK`` bytes each.

    Lazily: each fragment is cut only when the sender has credit for it.
    """
    if len(message) <= MAX_CHUNK:
        yield Data(stream_id, message, text=text)
        return
    view = memoryview(message)
    for i in range(0, len(message), MAX_CHUNK):
        more = i + MAX_CHUNK < len(message)
        yield Data(stream_id, bytes(view[i : i + MAX_CHUNK]), text=text, more=more)


class MessageTooBig(ProtocolError):
    """A WebSocket message grew past the receiver's limit (closed with 1009)."""


@dataclasses.dataclass(slots=True)
class Fragment:
    """One piece of a relayed WebSocket message, written on as one WebSocket frame."""

    data: bytes
    text: bool
    #: It opens a message (a text or binary frame), else it continues one.
    first: bool
    #: It ends its message (the frame has FIN set).
    final: bool
    #: The size of its message so far, this piece included.
    size: int


class MessageTracker:
    """Follows relayed WebSocket messages fragment by fragment, against a size limit.

    Each DATA fragment is written on at once as a frame of a fragmented
    WebSocket message (RFC 6455 section 5.4), and its credit is granted once
    it was written: no side ever holds a whole message, so a stream holds a
    window at most, whatever the size of its messages and however slow its reader.
    """

    __slots__ = ("limit", "_size", "_open", "_text")

    def __init__(self, limit: int = DEFAULT_WEBSOCKET_MESSAGE) -> None:
        self.limit = limit
        self._size = 0
        #: A message was started and not ended yet.
        self._open = False
        self._text = False

    def feed(self, frame: Data) -> Fragment:
        """Where ``frame`` falls in its message; raises ``MessageTooBig`` past ``limit``.

        A text flag that changes within a message is a ``ProtocolError``.
        """
        first = not self._open
        if not first and frame.text != self._text:
            raise ProtocolError(f"text flag changed within a message on stream {frame.stream_id}")
        size = self._size + len(frame.data)
        if size > self.limit:
            raise MessageTooBig(f"message too big (limit {self.limit} bytes)")
        if frame.more:
            self._open, self._size, self._text = True, size, frame.text
        else:
            self._open, self._size = False, 0
        return Fragment(frame.data, frame.text, first, not frame.more, size)


class SendWindow:
    """Credit this side may still spend on DATA for one stream."""

    __slots__ = ("credit",)

    def __init__(self, initial: int = INITIAL_WINDOW) -> None:
        self.credit = initial

    def spend(self, size: int) -> bool:
        """Take ``size`` bytes of credit if there is enough; say whether it was taken."""
        if size > self.credit:
            return False
        self.credit -= size
        return True

    def grant(self, increment: int) -> None:
        """Apply a WINDOW frame from the peer."""
        if self.credit + increment > MAX_WINDOW:
            raise ProtocolError("WINDOW overflows the flow-control window")
        self.credit += increment


class RecvWindow:
    """Credit this side has granted for one stream, and when to grant more.

    The receiver tells the peer about consumed bytes in batches of at least
    half a window, so a stream costs one WINDOW frame per half window of body.
    """

    __slots__ = ("available", "pending", "threshold")

    def __init__(self, initial: int = INITIAL_WINDOW) -> None:
        self.available = initial
        self.pending = 0
        self.threshold = initial // 2

    def receive(self, size: int) -> None:
        """Account for a DATA frame; a peer overrunning its credit is a protocol error."""
        if size > self.available:
            raise ProtocolError("peer sent more DATA than its flow-control window allows")
        self.available -= size

    def consume(self, size: int) -> int:
        """Record ``size`` bytes passed on; return the increment to grant now (0: not yet)."""
        self.pending += size
        if self.pending < self.threshold:
            return 0
        increment, self.pending = self.pending, 0
        self.available += increment
        return increment
