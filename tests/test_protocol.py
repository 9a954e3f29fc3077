"""The wire protocol, byte for byte: no sockets, no event loop."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backstream import protocol
from backstream.errors import ProtocolError
from backstream.protocol import Data, RequestHead, Reset, ResponseHead, Window

stream_ids = st.integers(min_value=1, max_value=2**32 - 1)
# Heads as Tornado's HTTP/1.1 parser hands them over (RFC 9110 5.1, 5.5; RFC 9112 3.2):
# token names and methods, latin-1 values without control bytes but HTAB, and
# origin-form targets of visible bytes. Anything else is refused (tests below).
_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VISIBLE = [chr(c) for c in (*range(0x21, 0x7F), *range(0x80, 0x100))]
tokens = st.text(st.sampled_from(_TCHARS), min_size=1, max_size=20)
header_values = st.text(st.sampled_from([" ", "\t", *_VISIBLE]), max_size=40)
headers = st.lists(st.tuples(tokens, header_values), max_size=12)
visible = st.text(st.sampled_from(_VISIBLE), max_size=200)

request_heads = st.builds(
    RequestHead,
    stream_ids,
    st.one_of(st.sampled_from(["GET", "POST", "PURGE", "OPTIONS", "HEAD"]), tokens),
    visible.map(lambda path: "/" + path),
    headers,
    st.integers(min_value=-1, max_value=2**53),
    st.text(max_size=40),
    st.sampled_from(["http", "https"]),
    visible,
    st.booleans(),
)
response_heads = st.builds(
    ResponseHead,
    stream_ids,
    st.integers(min_value=100, max_value=999),
    header_values,
    headers,
    st.booleans(),
)
data_frames = st.builds(
    Data, stream_ids, st.binary(max_size=protocol.MAX_CHUNK), st.booleans(), st.booleans()
)
window_frames = st.builds(Window, stream_ids, st.integers(min_value=1, max_value=2**32 - 1))
reset_frames = st.builds(
    Reset, stream_ids, st.integers(min_value=0, max_value=65535), st.text(max_size=100)
)
frames = st.one_of(request_heads, response_heads, data_frames, window_frames, reset_frames)


@given(frames)
def test_every_frame_round_trips(frame: protocol.Frame) -> None:
    assert protocol.decode(frame.encode()) == frame


@given(st.binary(max_size=512))
def test_garbage_is_a_protocol_error_never_a_crash(message: bytes) -> None:
    try:
        protocol.decode_all(message)
    except ProtocolError:
        pass


@given(frames, st.data())
def test_mutated_frames_decode_or_raise(frame: protocol.Frame, data: st.DataObject) -> None:
    encoded = bytearray(frame.encode())
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[index] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded)))
    try:
        protocol.decode_all(bytes(encoded[:cut]))
    except ProtocolError:
        pass


def test_header_layout_is_type_flags_stream_id_length() -> None:
    encoded = Data(7, b"abc", end_stream=True).encode()
    assert encoded == struct.pack("!BBII", 3, protocol.FLAG_END, 7, 3) + b"abc"


@given(st.lists(frames, min_size=1, max_size=20))
def test_a_batch_carries_frames_in_order(batch_frames: list[protocol.Frame]) -> None:
    batch = protocol.Batch()
    for frame in batch_frames:
        batch.add(frame.encode())
    messages = [b"".join(parts) for parts in batch.messages()]
    assert not batch
    assert all(len(m) <= protocol.MAX_MESSAGE for m in messages)
    decoded = [frame for message in messages for frame in protocol.decode_all(message)]
    assert decoded == batch_frames


def test_batches_are_cut_near_batch_size() -> None:
    batch = protocol.Batch()
    chunk = Data(1, b"x" * 10_000).encode()
    for _ in range(100):
        batch.add(chunk)
    messages = [b"".join(parts) for parts in batch.messages()]
    assert len(messages) > 1
    assert all(len(m) <= protocol.BATCH_SIZE for m in messages)
    # A frame larger than a batch travels alone.
    big = Data(1, b"y" * protocol.MAX_CHUNK).encode()
    batch.add(chunk)
    batch.add(big)
    batch.add(chunk)
    assert batch.messages() == [[chunk], [big], [chunk]]


def test_body_bytes_are_raw_not_base64() -> None:
    body = bytes(range(256))
    assert Data(1, body).encode().endswith(body)


def test_request_head_keeps_query_and_repeated_headers_in_order() -> None:
    head = RequestHead(
        3,
        "GET",
        "/a%2Fb?x=1&x=2&empty=&u=%C3%A9",
        [("Cookie", "a=1"), ("X-Dup", "1"), ("Cookie", "b=2"), ("X-Dup", "2")],
        0,
        "127.0.0.1",
        "http",
        "example.test",
    )
    decoded = protocol.decode(head.encode())
    assert isinstance(decoded, RequestHead)
    assert decoded.target == "/a%2Fb?x=1&x=2&empty=&u=%C3%A9"
    assert decoded.headers == head.headers


def _frame(type_: int, stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack("!BBII", type_, flags, stream_id, len(payload)) + payload


@pytest.mark.parametrize(
    "message, why",
    [
        (b"", "empty message"),
        (b"\x03\x00\x00", "truncated frame header"),
        (_frame(99, 1, b""), "unknown frame type"),
        (_frame(3, 0, b"x"), "stream id 0"),
        (_frame(3, 1, b"abc")[:-1], "truncated frame"),
        (_frame(3, 1, b"abc") + b"\x03", "truncated frame header"),
        (_frame(1, 1, b"{}"), "JSON array"),
        (_frame(1, 1, b"[1,2"), "not valid JSON"),
        (_frame(2, 1, b'[99,"x",[]]'), "status"),
        (_frame(2, 1, b'[200,"x",[["a"]]]'), "pairs"),
        (_frame(2, 1, b'[200,"x",[["a","b\\r\\nc: d"]]]'), "control byte"),
        (_frame(4, 1, b"\0\0"), "4 bytes"),
        (_frame(4, 1, b"\0\0\0\0"), "positive"),
        (_frame(5, 1, b"\0"), "too short"),
        (_frame(3, 1, b"x" * (protocol.MAX_FRAME + 1)), "frame too large"),
        (b"x" * (protocol.MAX_MESSAGE + 1), "message too large"),
    ],
)
def test_malformed_frames_say_what_is_wrong(message: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        protocol.decode_all(message)


def _request(method: str, target: str, headers: str = "[]", host: str = "h") -> bytes:
    payload = f'["{method}","{target}",{headers},0,"1.2.3.4","http","{host}"]'.encode()
    return _frame(1, 1, payload)


@pytest.mark.parametrize(
    "message, why",
    [
        (_request("GET\\r\\nX: y", "/"), "method"),
        (_request("GE T", "/"), "method"),
        (_request("GET", "/a HTTP/1.1\\r\\nHost: x\\r\\n\\r\\nGET /smuggled"), "target"),
        (_request("GET", "/a b"), "target"),
        (_request("GET", "example.com/x"), "target"),
        (_request("GET", "/\\u0000"), "target"),
        (_request("GET", "/", '[["X Y","1"]]'), "header name"),
        (_request("GET", "/", '[["X:Y","1"]]'), "header name"),
        (_request("GET", "/", '[["","1"]]'), "header name"),
        (_request("GET", "/", '[["X","a\\u0001b"]]'), "control byte"),
        (_request("GET", "/", "[]", "h\\r\\nX: y"), "host"),
        (_frame(2, 1, b'[200,"OK\\r\\nX: y",[]]'), "reason"),
    ],
)
def test_heads_that_would_inject_into_http_are_refused(message: bytes, why: str) -> None:
    """Both sides refuse a head whose method, target or headers could split a request."""
    with pytest.raises(ProtocolError, match=why):
        protocol.decode_all(message)


def test_valid_heads_with_unusual_but_legal_bytes_pass() -> None:
    head = RequestHead(1, "PROPFIND", "/%2F?a=%C3%A9&b=\xe9", [("X-Tab", "a\tb")], host="h:1")
    assert protocol.decode(head.encode()) == head


def test_version_check() -> None:
    assert protocol.check_version(str(protocol.PROTOCOL_VERSION)) is None
    assert "missing" in (protocol.check_version(None) or "")
    problem = protocol.check_version("2")
    assert problem is not None and "server speaks 1" in problem and "'2'" in problem


class TestFlowControl:
    def test_sender_stops_at_the_window(self) -> None:
        window = protocol.SendWindow(100)
        assert window.spend(60)
        assert not window.spend(41)
        assert window.spend(40)
        assert window.credit == 0
        window.grant(10)
        assert window.credit == 10

    def test_grant_overflow_is_a_protocol_error(self) -> None:
        window = protocol.SendWindow(protocol.MAX_WINDOW)
        with pytest.raises(ProtocolError):
            window.grant(1)

    def test_no_peer_may_grant_more_than_one_window(self) -> None:
        """A receiver only grants back what it consumed: more is a peer that never reads."""
        assert protocol.MAX_WINDOW == protocol.INITIAL_WINDOW
        window = protocol.SendWindow()
        window.spend(1000)
        window.grant(1000)
        with pytest.raises(ProtocolError, match="overflows"):
            window.grant(1)

    def test_receiver_rejects_an_overrun(self) -> None:
        window = protocol.RecvWindow(100)
        window.receive(100)
        with pytest.raises(ProtocolError, match="flow-control"):
            window.receive(1)

    def test_receiver_grants_in_half_window_batches(self) -> None:
        window = protocol.RecvWindow(100)
        window.receive(100)
        assert window.consume(30) == 0
        assert window.consume(30) == 60
        assert window.available == 60
        window.receive(60)
        assert window.consume(40) == 0 and window.consume(10) == 50

    @given(st.lists(st.integers(min_value=1, max_value=protocol.MAX_CHUNK), max_size=200))
    def test_sender_and_receiver_never_deadlock_and_stay_bounded(self, chunks: list[int]) -> None:
        """Any chunk sizes up to MAX_CHUNK flow through; in flight never exceeds a window."""
        sender, receiver = protocol.SendWindow(), protocol.RecvWindow()
        in_flight = 0
        for size in chunks:
            if not sender.spend(size):
                # Blocked: the receiver consumes what it holds and grants credit back.
                increment = receiver.consume(in_flight)
                in_flight = 0
                assert increment > 0
                sender.grant(increment)
                assert sender.spend(size), "a blocked sender must be unblocked by consumption"
            receiver.receive(size)
            in_flight += size
            assert in_flight <= protocol.INITIAL_WINDOW


def test_websocket_close_payload() -> None:
    assert protocol.parse_close(protocol.close_payload(4001, "bye")) == (4001, "bye")
    assert protocol.parse_close(protocol.close_payload(1000, "")) == (1000, "")
    assert protocol.close_payload(99, "out of range") == b""
    # No code travels as no code: the far end then gets a close frame without one (1005).
    assert protocol.close_payload(None, None) == b""
    assert protocol.parse_close(b"") == (None, None)
    assert protocol.parse_close(b"\x03") == (None, None)
    # 1005, 1006 (and 1004, 1015) only report what happened; they are never sent.
    for reserved in (1004, 1005, 1006, 1015):
        assert protocol.close_payload(reserved, "x") == b""
        assert protocol.parse_close(struct.pack("!H", reserved) + b"x") == (None, None)
    # A reason is cut to what a close frame holds, never in the middle of a character.
    long = protocol.parse_close(protocol.close_payload(4000, "é" * 100))
    assert long == (4000, "é" * 61)


# -- WebSocket messages in fragments --------------------------------------------------------


@given(st.integers(min_value=0, max_value=3 * protocol.MAX_CHUNK + 7), st.booleans())
def test_a_message_round_trips_through_its_fragments(size: int, text: bool) -> None:
    message = bytes(i % 251 for i in range(size))
    frames = list(protocol.fragments(5, message, text))
    assert all(len(f.data) <= protocol.MAX_CHUNK for f in frames)
    assert [f.more for f in frames] == [True] * (len(frames) - 1) + [False]
    tracker = protocol.MessageTracker(limit=size)
    pieces = [tracker.feed(protocol.decode(f.encode())) for f in frames]  # type: ignore[arg-type]
    assert b"".join(p.data for p in pieces) == message
    assert [p.first for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [p.final for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(p.text == text for p in pieces) and pieces[-1].size == size


def test_each_message_opens_anew_after_the_last_one_ended() -> None:
    tracker = protocol.MessageTracker()
    chunk = b"x" * 10
    assert (tracker.feed(Data(1, chunk)).first, tracker.feed(Data(1, chunk)).first) == (True, True)
    opening = tracker.feed(Data(1, chunk, more=True))
    middle = tracker.feed(Data(1, chunk, more=True))
    last = tracker.feed(Data(1, chunk))
    assert (opening.first, middle.first, last.first) == (True, False, False)
    assert (middle.size, last.size, last.final) == (20, 30, True)
    assert tracker.feed(Data(1, b"", text=True)).first  # the next one starts over


def test_a_text_flag_that_changes_within_a_message_is_a_protocol_error() -> None:
    tracker = protocol.MessageTracker()
    tracker.feed(Data(1, b"abc", text=True, more=True))
    with pytest.raises(ProtocolError, match="text flag"):
        tracker.feed(Data(1, b"def", text=False))


def test_a_message_over_the_limit_is_refused() -> None:
    tracker = protocol.MessageTracker(limit=protocol.MAX_CHUNK + 1)
    tracker.feed(Data(1, b"x" * protocol.MAX_CHUNK, more=True))
    with pytest.raises(protocol.MessageTooBig, match="limit"):
        tracker.feed(Data(1, b"xx"))
