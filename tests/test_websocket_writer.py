"""``websocket_writer``: messages written from pieces arrive whole, both directions.

A real Tornado WebSocket server on 127.0.0.1 and a real ``websocket_connect``
client; the reader on each side is Tornado's own, so a wrong header, length or
mask rotation shows up as a different message or a closed connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets
from tornado.web import Application
from tornado.websocket import WebSocketClosedError, WebSocketHandler, websocket_connect
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from backstream import websocket_writer
from backstream.websocket_writer import LARGE, frame_header, mask_at, write_binary


class _Echo(WebSocketHandler):
    """Answers each message with the same pieces, written by ``write_binary``."""

    def on_message(self, message: str | bytes) -> None:
        assert isinstance(message, bytes)
        cut = len(message) // 3
        write_binary(
            self.ws_connection, [message[:cut], message[cut : 2 * cut], message[2 * cut :]]
        )


async def _round_trip(messages: list[list[bytes]]) -> list[bytes]:
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(Application([("/", _Echo)], websocket_max_message_size=64 << 20))
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    try:
        ws = await websocket_connect(f"ws://127.0.0.1:{port}/", max_message_size=64 << 20)
        echoed = []
        for pieces in messages:
            write_binary(ws.protocol, pieces)
        for _ in messages:
            reply = await asyncio.wait_for(ws.read_message(), 20)
            assert isinstance(reply, bytes), f"connection closed: {ws.close_code} {ws.close_reason}"
            echoed.append(reply)
        ws.close()
        return echoed
    finally:
        server.stop()


def _sizes_to_pieces(sizes: list[int], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for size in sizes]


piece_size = st.one_of(
    st.integers(0, 300),  # headers and small heads
    st.integers(LARGE - 3, LARGE + 3),  # around the join/alone boundary
    st.integers(60_000, 300_000),  # body chunks, odd lengths rotate the mask
)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.lists(piece_size, min_size=1, max_size=12), min_size=1, max_size=4), st.integers()
)
def test_messages_from_pieces_arrive_whole_both_ways(sizes: list[list[int]], seed: int) -> None:
    messages = [_sizes_to_pieces(s, seed + i) for i, s in enumerate(sizes)]
    if all(sum(map(len, m)) == 0 for m in messages):
        messages[0].append(b"x")
    echoed = asyncio.run(_round_trip(messages))
    assert [hashlib.sha256(m).hexdigest() for m in echoed] == [
        hashlib.sha256(b"".join(m)).hexdigest() for m in messages
    ]


def test_length_encodings_at_their_boundaries() -> None:
    sizes = [0, 125, 126, 0xFFFF, 0x10000]
    messages = [[os.urandom(n)] for n in sizes]
    echoed = asyncio.run(_round_trip(messages))
    assert [len(m) for m in echoed] == sizes
    assert echoed == [m[0] for m in messages]
    # RFC 6455 5.2: the minimal number of bytes must be used for the length
    assert frame_header(125) == b"\x82\x7d"
    assert frame_header(126) == b"\x82\x7e\x00\x7e"
    assert frame_header(0xFFFF) == b"\x82\x7e\xff\xff"
    assert frame_header(0xFFFF, b"abcd") == b"\x82\xfe\xff\xffabcd"
    assert frame_header(0x10000) == b"\x82\x7f" + (0x10000).to_bytes(8, "big")
    assert frame_header(0x10000, b"abcd") == b"\x82\xff" + (0x10000).to_bytes(8, "big") + b"abcd"


def _write_fragmented(connection: Any, message: bytes, cuts: int, text: bool) -> None:
    """``message`` as ``cuts`` frames of one fragmented message (RFC 6455 5.4)."""
    step = max(1, -(-len(message) // cuts))
    parts = [message[i : i + step] for i in range(0, len(message), step)] or [b""]
    for i, part in enumerate(parts):
        write_binary(connection, [part], text=text, opens=i == 0, final=i == len(parts) - 1)


class _FragmentingEcho(WebSocketHandler):
    """Answers each message with the same bytes, as a fragmented message of three frames."""

    def on_message(self, message: str | bytes) -> None:
        text = isinstance(message, str)
        data = message.encode() if isinstance(message, str) else message
        _write_fragmented(self.ws_connection, data, 3, text)


@pytest.mark.parametrize("text", [False, True])
def test_a_message_written_as_fragments_arrives_whole_both_ways(text: bool) -> None:
    """Masked from the client, unmasked from the server; Tornado's reader rebuilds it."""
    message = "é€x".encode() * 100_000 if text else os.urandom(700_001)

    async def main() -> Any:
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(Application([("/", _FragmentingEcho)]))
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        try:
            ws = await websocket_connect(f"ws://127.0.0.1:{port}/")
            _write_fragmented(ws.protocol, message, 7, text)  # cuts inside UTF-8 sequences
            reply = await asyncio.wait_for(ws.read_message(), 20)
            ws.close()
            return reply
        finally:
            server.stop()

    reply = asyncio.run(main())
    assert reply == (message.decode() if text else message)
    assert frame_header(5, opens=False, final=False) == b"\x00\x05"
    assert frame_header(5, text=True, final=False) == b"\x01\x05"
    assert frame_header(5, opens=False) == b"\x80\x05"


@given(st.binary(max_size=64), st.binary(max_size=64), st.binary(min_size=4, max_size=4))
def test_masking_a_piece_continues_the_mask_of_the_ones_before(
    first: bytes, second: bytes, mask: bytes
) -> None:
    whole = mask_at(mask, 0, first + second)
    assert mask_at(mask, 0, first) + mask_at(mask, len(first), second) == whole


def test_writing_to_a_closed_connection_raises_websocket_closed() -> None:
    async def main() -> None:
        sockets = bind_sockets(0, "127.0.0.1")
        server = HTTPServer(Application([("/", _Echo)]))
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        try:
            ws = await websocket_connect(f"ws://127.0.0.1:{port}/")
            protocol = ws.protocol
            ws.close()
            with pytest.raises(WebSocketClosedError):
                write_binary(protocol, [b"late"])
            with pytest.raises(WebSocketClosedError):
                write_binary(None, [b"never connected"])
        finally:
            server.stop()

    asyncio.run(main())


def test_big_pieces_are_not_joined() -> None:
    small, big = b"s" * 10, b"B" * LARGE
    groups = list(websocket_writer._groups([small, small, big, small]))
    assert groups == [small + small, big, small]
    assert groups[1] is big


class _Recorder:
    """Stands in for the IOStream: keeps what is written; fails from the ``fail_at``-th write."""

    def __init__(self, fail_at: int = 0) -> None:
        self.written: list[bytes] = []
        self.fail_at = fail_at

    def write(self, data: bytes) -> None:
        if self.fail_at and len(self.written) + 1 >= self.fail_at:
            raise StreamClosedError()
        self.written.append(bytes(data))


class _Connection:
    def __init__(self, masked: bool, stream: _Recorder) -> None:
        self.mask_outgoing = masked
        self.stream = stream

    def is_closing(self) -> bool:
        return False


def _strict_parse(data: bytes, masked: bool) -> Frame:
    """One frame, parsed by the ``websockets`` reader, which rejects a wrong mask bit."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=masked, max_size=None)
    try:
        next(parser)
    except StopIteration as done:
        assert not reader.buffer, "bytes after the frame"
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


@settings(max_examples=200, deadline=None)
@given(st.lists(piece_size, max_size=8), st.booleans(), st.integers())
def test_frames_are_exactly_rfc_6455(sizes: list[int], masked: bool, seed: int) -> None:
    pieces = _sizes_to_pieces(sizes, seed)
    stream = _Recorder()
    write_binary(_Connection(masked, stream), pieces)  # type: ignore[arg-type]
    frame = _strict_parse(b"".join(stream.written), masked)
    assert frame.opcode == Opcode.BINARY and frame.fin
    assert not (frame.rsv1 or frame.rsv2 or frame.rsv3)
    assert frame.data == b"".join(pieces)


def test_a_stream_closed_mid_message_raises_websocket_closed() -> None:
    pieces = [b"head", b"B" * LARGE, b"tail"]  # three writes: header+head, the chunk, tail
    with pytest.raises(WebSocketClosedError):
        write_binary(_Connection(True, _Recorder(fail_at=2)), pieces)  # type: ignore[arg-type]
