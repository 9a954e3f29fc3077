"""Property-based fuzzing of each side's stream state machine (issue 10, hostile peers).

In the style of mitmproxy's disconnect fuzzers: random sequences of peer frames
(REQUEST, RESPONSE, DATA with and without END/MORE/TEXT, WINDOW, RESET, garbage;
for streams that are open, finished, or never opened), interleaved with what the
other parties do (public callers uploading, reading slowly, going away; the local
app answering, streaming, pausing, failing; timers firing; the tunnel's socket
backing up or breaking) and tunnel disconnects at any step.

The real classes run in-process on a real asyncio loop: the server's ``Tunnel``
and ``ServerStream`` behind ``TunnelHandler.on_message`` / ``on_close``, the
client's ``ClientTunnel.on_message`` with its ``Exchange`` and
``WebSocketExchange``. Only the sockets are replaced: the WebSocket writer
(``websocket_writer.write_binary``) records what each side writes, libcurl is a
fake transfer the fuzzer drives through the very callbacks ``Exchange``
installs, and the local app's WebSocket is a fake connection.

Invariants checked after every step:

* nothing but ``ProtocolError`` escapes the dispatch entry point, and that one
  is handled there (the tunnel closes); no relay task dies of an exception;
* no stream outlives its request: a stream that was reset, closed or whose
  tunnel went away is gone from the tunnel's stream table, and at the end
  (every caller gone, then a disconnect) the table is empty and every task done;
* credit never goes negative nor past one window (``SendWindow.credit``,
  ``RecvWindow.available``) and what a stream buffers stays within its window;
* nothing is sent for a stream after it ended (after its RESET, either way,
  after its tunnel closed, no DATA after its own END), and everything a side
  writes decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import struct
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pycurl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from tornado.curl_httpclient import CurlError
from tornado.httpclient import HTTPClientError, HTTPResponse
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from tornado.websocket import WebSocketClosedError

import backstream.client.websocket as client_websocket
import backstream.server.stream as server_stream
import backstream.server.tunnel as server_tunnel
from backstream import errors, protocol, websocket_writer
from backstream.client import ClientTunnel
from backstream.client.upstream import Exchange
from backstream.client.websocket import WebSocketExchange
from backstream.config import ClientConfig
from backstream.server.stream import ServerStream
from backstream.server.tunnel import Tunnel, TunnelHandler, Tunnels

FUZZ = settings(
    max_examples=350,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HEADER = struct.Struct("!BBII")
#: Loop turns to let tasks react after each step (a chain of wake-ups is a few turns).
SETTLE_TURNS = 12
#: Queued-bytes limit while fuzzing, so that a stall happens within a few frames.
SMALL_UNSENT = 64 * 1024

DATA, WINDOW, RESET = protocol.FrameType.DATA, protocol.FrameType.WINDOW, protocol.FrameType.RESET


class LastError(logging.Handler):
    """Keeps the last error logged, for the statistics (``--hypothesis-show-statistics``)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()


LAST_ERROR = LastError()


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    """Thousands of protocol errors are expected: keep their log lines out of the report."""
    logger = logging.getLogger("backstream")
    saved = logger.level, logger.propagate
    logger.setLevel(logging.ERROR)
    logger.propagate = False
    logger.addHandler(LAST_ERROR)
    try:
        yield
    finally:
        logger.removeHandler(LAST_ERROR)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def event(label: str) -> None:
    """A statistics label (``--hypothesis-show-statistics``); ignored outside a test."""
    with contextlib.suppress(InvalidArgument):
        hypothesis_event(label)


def error_kind(message: str) -> str:
    """A log message without its numbers, as an event label."""
    return re.sub(r"\d+", "N", message.split(": ", 1)[-1])[:70]


# -- shared fakes -----------------------------------------------------------------------------


class FakeSocket:
    """The tunnel's WebSocket as the writer sees it: records messages, writes complete later."""

    def __init__(self) -> None:
        self.frames: list[protocol.Frame] = []
        self.pending: list[asyncio.Future[None]] = []
        self.broken = False

    def write(self, pieces: Any) -> asyncio.Future[None]:
        # Whatever a side writes must be a valid message: it never sends garbage.
        self.frames.extend(protocol.decode_all(b"".join(pieces)))
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(written)
        return written

    def drain(self) -> None:
        pending, self.pending = self.pending, []
        for written in pending:
            if not written.done():
                written.set_result(None)


class FakeAppProtocol:
    """The local app's WebSocket connection as the writer and ``record_sent_close`` see it."""

    def __init__(self) -> None:
        self.client_terminated = False
        self.closed_with: tuple[int | None, str | None] | None = None
        self.written: list[tuple[bytes, dict[str, Any]]] = []
        self.pending: list[asyncio.Future[None]] = []

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if self.closed_with is None:
            self.closed_with = (code, reason)

    def _handle_message(self, opcode: int, data: bytes) -> None:
        """Each frame from the app, as Tornado's reader passes it (``record_peer_close``)."""

    def write(self, pieces: Any, options: dict[str, Any]) -> asyncio.Future[None]:
        if self.closed_with is not None:
            raise WebSocketClosedError()
        self.written.append((b"".join(pieces), options))
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(written)
        return written

    def drain(self) -> None:
        pending, self.pending = self.pending, []
        for written in pending:
            if not written.done():
                written.set_result(None)


def fake_write_binary(connection: Any, pieces: Any, **options: Any) -> asyncio.Future[None]:
    """``websocket_writer.write_binary`` for the fakes: same contract, no socket."""
    if isinstance(connection, FakeSocket):
        if connection.broken:
            raise WebSocketClosedError()
        return connection.write(pieces)
    if isinstance(connection, FakeAppProtocol):
        return connection.write(pieces, options)
    raise WebSocketClosedError()


#: Invariant violations and exceptions raised where nobody awaits them (a send check
#: inside a libcurl or future callback, an exception in a loop callback), this example.
FAILURES: list[str] = []


def failed_in_callback(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    FAILURES.append(f"{context.get('message')}: {context.get('exception')!r}")


def assert_no_failures() -> None:
    assert not FAILURES, "\n".join(FAILURES)


async def settle() -> None:
    for _ in range(SETTLE_TURNS):
        await asyncio.sleep(0)


def run_scenario(coro: Any) -> None:
    """Run one example on a fresh loop; whatever is left over is cancelled, never leaked."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(failed_in_callback)
    FAILURES.clear()
    with mock.patch.object(websocket_writer, "write_binary", fake_write_binary):
        try:
            loop.run_until_complete(coro)
            assert_no_failures()
        finally:
            leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in leftover:
                task.cancel()
            if leftover:
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
            loop.close()


def header_of(frame: tuple[bytes, ...]) -> tuple[int, int, int]:
    type_, flags, stream_id, _ = HEADER.unpack_from(frame[0])
    return type_, flags, stream_id


def pick(ids: list[int], ref: int, unknown: int) -> int:
    """A stream id for ``ref``: one of ``ids`` (open or finished), else an unknown one."""
    if ref >= 0 and ids:
        return ids[ref % len(ids)]
    return unknown if ref == -1 else 0xFFFFFFFF


# -- strategies shared by both sides ------------------------------------------------------------

refs = st.one_of(st.integers(min_value=0, max_value=7), st.sampled_from([-1, -2]))
sizes = st.sampled_from([0, 1, 700, 16 * 1024, protocol.MAX_CHUNK])
#: What a public caller sends in one go: a body chunk or a whole WebSocket message.
big_sizes = st.sampled_from(
    [1, 700, protocol.MAX_CHUNK, 4 * protocol.MAX_CHUNK, protocol.INITIAL_WINDOW + 1000]
)
data_flags = st.sets(st.sampled_from([protocol.FLAG_END, protocol.FLAG_MORE, protocol.FLAG_TEXT]))
increments = st.sampled_from([1, 1000, protocol.MAX_CHUNK, protocol.INITIAL_WINDOW, 2**32 - 1])
reset_codes = st.sampled_from([0, 1, 3, 5, 9, 10, 65535])


def data_frame(stream_id: int, size: int, flags: set[int]) -> bytes:
    return protocol.Data(
        stream_id,
        b"d" * size,
        end_stream=protocol.FLAG_END in flags,
        text=protocol.FLAG_TEXT in flags,
        more=protocol.FLAG_MORE in flags,
    ).encode()


class HonestPeer:
    """An honest peer's bookkeeping for one stream: what it may send, what it owes back.

    The fuzz mixes its frames (valid for the stream's state: a head first, DATA
    within credit, WINDOW for what was received, consistent message flags) with
    hostile ones, so that deep states are reached as well as every error.
    """

    def __init__(self) -> None:
        self.credit = protocol.INITIAL_WINDOW
        self.owed = 0
        self.started = False
        self.ended = False
        self.websocket = False
        self.message_open = False
        self.text = False

    def on_frame_from_other_side(self, type_: int, length: int) -> None:
        if type_ == DATA:
            self.owed += length
        elif type_ == WINDOW:
            self.credit += length

    def window(self, stream_id: int) -> bytes:
        increment, self.owed = self.owed, 0
        return protocol.Window(stream_id, increment).encode()

    def data(self, stream_id: int, choice: int, size: int) -> bytes:
        """The next DATA of the stream: a body chunk, a message fragment or the end."""
        end = choice % 4 == 0
        payload = b"d" * min(size, self.credit)
        more = text = False
        if self.websocket:
            if end:
                payload = protocol.close_payload(1000, "") if self.credit >= 2 else b""
            else:
                more = choice % 2 == 1
                text = self.text if self.message_open else bool(choice & 4)
                self.message_open, self.text = more, text
        self.credit -= len(payload)
        self.ended = end
        return protocol.Data(stream_id, payload, end_stream=end, text=text, more=more).encode()


# ==============================================================================================
# The server: Tunnel + ServerStream, fed by TunnelHandler.on_message
# ==============================================================================================


class FakeHandler:
    """The parts of ``TunnelHandler`` a ``Tunnel`` uses, with its real message entry points."""

    on_message = TunnelHandler.on_message
    on_close = TunnelHandler.on_close

    def __init__(self, tunnels: Tunnels) -> None:
        self.ws_connection = FakeSocket()
        self.tunnels = tunnels
        self.metrics = None
        self.gone: str | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.tunnel: Tunnel | None = None
        self.close_called = False

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """As Tornado's: the socket stops taking writes; on_close follows (the caller runs it)."""
        self.close_code, self.close_reason = code, reason
        self.ws_connection.broken = True

    def connection_closed(self) -> None:
        """The WebSocket is gone: Tornado calls on_close exactly once."""
        self.ws_connection.broken = True
        if not self.close_called:
            self.close_called = True
            self.on_close()


class RecordingTunnel(Tunnel):
    """A real ``Tunnel`` that checks each frame its streams queue, as it is queued."""

    model: ServerModel

    def send(self, *frame: bytes) -> None:
        if self.open:
            try:
                self.model.on_send(frame)
            except AssertionError as e:  # raised where nobody may be listening: kept
                FAILURES.append(str(e))
        super().send(*frame)


class CallerGone(Exception):
    """The public caller's connection closed (what Tornado's writes would raise)."""


class Caller:
    """One public request, driven the way ``PublicHandler`` / ``PassthroughHandler`` drive it."""

    def __init__(self, stream: ServerStream, body_length: int, upgrade: bool) -> None:
        self.stream = stream
        self.body_length = body_length
        self.upgrade = upgrade
        self.body: asyncio.Queue[int | None] = asyncio.Queue()
        #: Writes the public socket will take (the fuzzer grants them: a slow or fast reader).
        self.permits = 0
        self._wake: asyncio.Future[None] | None = None
        self.gone = False
        self.outcome = ""
        self.senders: list[asyncio.Task[None]] = []
        self.task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        stream = self.stream
        try:
            if self.body_length != 0:  # data_received, one chunk at a time, then relay()
                while (size := await self.body.get()) is not None:
                    await stream.send_body(b"u" * size)
                stream.end_body()
            await stream.response_head()
            if stream.websocket:
                await self.pump()
                return
            while (chunks := await stream.read()) is not None:
                await self.permit()  # the public socket took the last write
                if not self.upgrade:  # a refused upgrade's body is held whole, no credit back
                    stream.consumed(sum(map(len, chunks)))
            self.outcome = "complete"
        except CallerGone:  # flush() raised StreamClosedError
            self.outcome = "caller gone"
            if not stream.closed:
                stream.reset(errors.Cancelled("public caller went away"))
        except errors.StreamError as e:
            self.outcome = type(e).__name__
            if not stream.closed:
                stream.reset(e)
        finally:
            stream.close()

    async def pump(self) -> None:
        """``PassthroughHandler._pump_from_app``: fragments out as the caller takes them."""
        stream = self.stream
        while (fragment := await stream.read_fragment()) is not None:
            await self.permit()  # raises CallerGone as write_binary raises WebSocketClosedError
            stream.consumed(len(fragment.data))
        self.outcome = "websocket closed by the app"
        self.ws_closed()

    def allow(self, writes: int) -> None:
        self.permits += writes
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def permit(self) -> None:
        while not self.gone:
            if self.permits:
                self.permits -= 1
                return
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake
        raise CallerGone()

    def ws_message(self, size: int, text: bool) -> None:
        """``PassthroughHandler.on_message``."""

        async def send() -> None:
            try:
                await self.stream.send_message(b"w" * size, text)
            except errors.StreamError:
                self.ws_closed()  # close(1011): on_close follows

        self.senders.append(asyncio.ensure_future(send()))

    def ws_closed(self) -> None:
        """``PassthroughHandler.on_close``."""
        stream = self.stream
        if stream.closed:
            return
        payload = protocol.close_payload(1000, "bye")
        stream.tunnel.send(protocol.Data(stream.id, payload, end_stream=True).encode())
        stream.fail(errors.Cancelled("public websocket closed"))
        stream.close()

    def go_away(self) -> None:
        """``on_connection_close``: the public caller hung up."""
        self.gone = True
        if not self.stream.closed:
            self.stream.reset(errors.Cancelled("public caller went away"))
        self.body.put_nowait(None)
        self.allow(0)


class ServerModel:
    """What the server fuzz knows: the streams it opened and what was sent for each."""

    def __init__(self) -> None:
        self.tunnels = Tunnels(grace=0)
        self.handler = FakeHandler(self.tunnels)
        self.tunnel = RecordingTunnel(self.handler, "127.0.0.1")  # type: ignore[arg-type]
        self.tunnel.model = self
        self.handler.tunnel = self.tunnel
        self.tunnels.add(self.tunnel)
        self.callers: dict[int, Caller] = {}
        self.peers: dict[int, HonestPeer] = {}
        self.reset_sent: set[int] = set()
        #: States reached, reported as statistics (coverage of the fuzz itself).
        self.seen: set[str] = set()
        self.end_sent: set[int] = set()

    @property
    def socket(self) -> FakeSocket:
        return self.handler.ws_connection

    def on_send(self, frame: tuple[bytes, ...]) -> None:
        type_, flags, stream_id = header_of(frame)
        if type_ == protocol.FrameType.REQUEST:
            assert stream_id not in self.callers, f"stream {stream_id} opened twice"
            self.peers[stream_id] = HonestPeer()
            return
        length = HEADER.unpack_from(frame[0])[3]
        if type_ == WINDOW:
            length = struct.unpack("!I", b"".join(frame)[protocol.HEADER_SIZE :])[0]
        self.peers[stream_id].on_frame_from_other_side(type_, length)
        caller = self.callers.get(stream_id)
        assert caller is not None, f"frame type {type_} for stream {stream_id}, never opened"
        assert not caller.stream.closed, f"frame type {type_} for closed stream {stream_id}"
        assert stream_id not in self.reset_sent, f"frame type {type_} after RESET {stream_id}"
        if type_ == DATA:
            assert stream_id not in self.end_sent, f"DATA after the END of stream {stream_id}"
            if flags & protocol.FLAG_END:
                self.end_sent.add(stream_id)
        elif type_ == RESET:
            self.reset_sent.add(stream_id)

    # -- actions ----------------------------------------------------------------------------

    def open(self, body_length: int, upgrade: bool) -> None:
        if not self.tunnel.open:
            return  # a closed tunnel is never picked for a request
        request = HTTPServerRequest(
            headers=HTTPHeaders({"Host": "public.example", "X-Fuzz": "1"}),
            start_line=RequestStartLine("GET" if upgrade else "POST", "/fuzz?x=1", "HTTP/1.1"),
        )
        body_length = 0 if upgrade else body_length
        stream = self.tunnel.relay_request(
            request, "/fuzz?x=1", body_length, 3600.0, upgrade=upgrade
        )
        stream.messages = protocol.MessageTracker(protocol.MAX_CHUNK * 3)
        self.callers[stream.id] = Caller(stream, body_length, upgrade)

    def ids(self) -> list[int]:
        return sorted(self.callers)

    def caller(self, ref: int) -> Caller | None:
        ids = self.ids()
        return self.callers[ids[ref % len(ids)]] if ids and ref >= 0 else None

    def receive(self, parts: list[bytes]) -> None:
        """One WebSocket message from the client, through the real handler entry point."""
        message = b"".join(parts)
        if self.socket.broken or not self.tunnel.open or not message:
            return  # nothing arrives on a closed WebSocket
        self.handler.on_message(message)

    def frame(self, spec: tuple[Any, ...]) -> bytes:
        kind, ref = spec[0], spec[1]
        stream_id = pick(self.ids(), ref, self.tunnel._next_stream_id)
        if kind == "honest":
            return self.honest(stream_id, spec[2], spec[3])
        if kind == "response":
            _, _, status, end, head_headers = spec
            return protocol.ResponseHead(stream_id, status, "R", head_headers, end).encode()
        if kind == "data":
            return data_frame(stream_id, spec[2], spec[3])
        if kind == "window":
            return protocol.Window(stream_id, spec[2]).encode()
        if kind == "reset":
            return protocol.Reset(stream_id, spec[2], "fuzz").encode()
        if kind == "request":
            return protocol.RequestHead(stream_id, "GET", "/", []).encode()
        return bytes(spec[2])  # garbage

    def honest(self, stream_id: int, choice: int, size: int) -> bytes:
        """What an honest client would send next on ``stream_id`` (b"" if nothing)."""
        peer, caller = self.peers.get(stream_id), self.callers.get(stream_id)
        if peer is None or caller is None:
            return b""
        if not peer.started and caller.body_length and stream_id not in self.end_sent:
            if choice % 3:  # the local app reads the upload before it answers
                return peer.window(stream_id) if peer.owed else b""
        if not peer.started:
            peer.started = True
            upgrade = caller.stream.upgrade
            status = 101 if upgrade and choice % 4 else (200 if choice % 3 else 404)
            peer.websocket = status == 101
            peer.ended = not peer.websocket and choice % 5 == 0
            return protocol.ResponseHead(stream_id, status, "OK", [], peer.ended).encode()
        if peer.owed and (choice % 3 == 0 or peer.ended):
            return peer.window(stream_id)
        if peer.ended:
            return b""
        return peer.data(stream_id, choice, size)

    def check(self) -> None:
        assert_no_failures()
        tunnel = self.tunnel
        if tunnel.stalled:
            self.seen.add("a stream stalled on unsent bytes")
        if any(c.stream.websocket for c in self.callers.values()):
            self.seen.add("a websocket was open")
        if any(c.stream.send_window.credit == 0 for c in self.callers.values()):
            self.seen.add("a stream spent its whole window")
        if not tunnel.open:
            assert not tunnel.streams, "streams left on a closed tunnel"
        for stream_id, caller in self.callers.items():
            stream = caller.stream
            if stream.closed:
                assert stream_id not in tunnel.streams, f"closed stream {stream_id} still routed"
            if stream_id in tunnel.streams:
                assert tunnel.streams[stream_id] is stream
            assert 0 <= stream.send_window.credit <= protocol.MAX_WINDOW
            assert 0 <= stream.recv_window.available <= protocol.INITIAL_WINDOW
            buffered = sum(map(len, stream._chunks)) + sum(len(f.data) for f in stream._fragments)
            assert buffered <= protocol.INITIAL_WINDOW, f"stream {stream_id} holds {buffered}"
            for task in (caller.task, *caller.senders):
                if task.done():
                    assert task.exception() is None, task.exception()

    async def finish(self) -> None:
        """Every caller leaves, then the client: nothing may be left behind."""
        for caller in self.callers.values():
            event(f"server caller: {caller.outcome or 'unfinished'}")
            caller.go_away()
        for seen in self.seen:
            event(f"server state: {seen}")
        event(f"server tunnel: {self.handler.gone or ('open' if self.tunnel.open else 'lost')}")
        if self.handler.gone:
            event(f"server protocol error: {error_kind(LAST_ERROR.last)}")
        await settle()
        self.check()
        if self.tunnel.open:
            assert not self.tunnel.streams, f"streams outlived requests: {self.tunnel.streams}"
        self.handler.connection_closed()
        await settle()
        self.check()
        assert not self.tunnel.streams
        for caller in self.callers.values():
            for task in (caller.task, *caller.senders):
                assert task.done(), f"stream {caller.stream.id}: a task still waits"


response_headers = st.sampled_from(
    [
        [],
        [("Content-Length", "5")],
        [("Content-Length", "x")],
        [("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
        [("Sec-WebSocket-Protocol", "chat")],
    ]
)
def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, chosen with the given relative weights."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


honest_frames = st.tuples(
    st.just("honest"), st.integers(min_value=0, max_value=7), st.integers(0, 63), sizes
)
hostile_client_frames = st.one_of(
    st.tuples(
        st.just("response"),
        refs,
        st.sampled_from([101, 200, 304, 100, 999]),
        st.booleans(),
        response_headers,
    ),
    st.tuples(st.just("data"), refs, sizes, data_flags),
    st.tuples(st.just("window"), refs, increments),
    st.tuples(st.just("reset"), refs, reset_codes),
    st.tuples(st.just("request"), refs),
    st.tuples(st.just("garbage"), refs, st.binary(max_size=24)),
)
opens = st.tuples(
    st.just("open"), st.sampled_from([0, 10, -1, -1]), st.sampled_from([False, False, True])
)


def server_scenarios(hostile: int) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """Scenarios where about ``hostile`` percent of the client's frames are hostile."""
    frames = weighted((100 - hostile, honest_frames), (hostile, hostile_client_frames))
    actions = weighted(
        (4, opens),
        (30, st.tuples(st.just("client"), st.lists(frames, min_size=1, max_size=3))),
        (8, st.tuples(st.just("body"), refs, big_sizes)),
        (3, st.tuples(st.just("body_end"), refs)),
        (10, st.tuples(st.just("read"), refs, st.integers(min_value=1, max_value=4))),
        (3, st.tuples(st.just("gone"), refs)),
        (4, st.tuples(st.just("ws_message"), refs, big_sizes, st.booleans())),
        (2, st.tuples(st.just("ws_close"), refs)),
        (2, st.tuples(st.just("timer"), refs)),
        (6, st.tuples(st.just("drain"))),
        (
            1,
            st.tuples(st.just("disconnect"), st.sampled_from(["close", "write_fails", "protocol"])),
        ),
    )
    # A few requests first, so that most steps have streams to act on.
    return st.tuples(
        st.lists(opens, min_size=1, max_size=4), st.lists(actions, min_size=4, max_size=60)
    ).map(lambda parts: parts[0] + parts[1])


#: Mostly honest clients reach deep states; hostile ones every error.
any_server_scenario = st.sampled_from([0, 3, 10, 40]).flatmap(server_scenarios)


CALLER_ACTIONS = {"body", "body_end", "read", "gone", "ws_message", "ws_close", "timer"}


async def server_scenario(actions: list[tuple[Any, ...]]) -> None:
    model = ServerModel()
    for action in actions:
        kind = action[0]
        caller = model.caller(action[1]) if kind in CALLER_ACTIONS else None
        if kind == "open":
            model.open(action[1], action[2])
        elif kind == "client":
            model.receive([model.frame(spec) for spec in action[1]])
        elif kind == "body" and caller is not None:
            caller.body.put_nowait(action[2])
        elif kind == "body_end" and caller is not None:
            caller.body.put_nowait(None)
        elif kind == "read" and caller is not None:
            caller.allow(action[2])
        elif kind == "gone" and caller is not None:
            caller.go_away()
        elif kind == "ws_message" and caller is not None and caller.stream.websocket:
            caller.ws_message(action[2], action[3])
        elif kind == "ws_close" and caller is not None and caller.stream.websocket:
            caller.ws_closed()
        elif kind == "timer" and caller is not None and caller.stream._timer is not None:
            # The no-answer timer fires now (the loop would call this after --timeout).
            caller.stream._timer.cancel()
            caller.stream._on_timeout()
        elif kind == "drain":
            model.socket.drain()
        elif kind == "disconnect":
            if action[1] == "close":
                model.handler.connection_closed()
            elif action[1] == "write_fails":
                model.socket.broken = True  # the next flush finds the socket gone
            else:
                model.receive([b"\xff"])  # a protocol error: the tunnel closes itself
        await settle()
        model.check()
    await model.finish()


@FUZZ
@given(any_server_scenario)
def test_server_streams_survive_any_client(actions: list[tuple[Any, ...]]) -> None:
    with (
        mock.patch.object(server_stream, "MAX_UNSENT", SMALL_UNSENT),
        mock.patch.object(server_tunnel, "MAX_UNSENT", SMALL_UNSENT),
    ):
        run_scenario(server_scenario(actions))


# ==============================================================================================
# The client: ClientTunnel + Exchange / WebSocketExchange, fed by ClientTunnel.on_message
# ==============================================================================================


class FakeServerConnection:
    """The client's tunnel WebSocket (``WebSocketClientConnection``) as ``ClientTunnel`` uses it."""

    def __init__(self) -> None:
        self.protocol = FakeSocket()
        self.close_code: int | None = None
        self.close_reason: str | None = None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.close_code, self.close_reason = code, reason
        self.protocol.broken = True


class FakeCurl:
    """A libcurl easy handle: keeps the options and callbacks ``Exchange`` sets."""

    def __init__(self, transfer: FakeTransfer) -> None:
        self.transfer = transfer
        self.options: dict[int, Any] = {}

    def setopt(self, option: int, value: Any) -> None:
        self.options[option] = value

    def pause(self, bitmask: int) -> None:
        if bitmask == pycurl.PAUSE_CONT:
            self.transfer.unpause()

    def getinfo(self, what: int) -> int:
        assert what == pycurl.SIZE_UPLOAD_T, what
        return self.transfer.uploaded


class FakeTransfer:
    """One transfer to the local app, played by the fuzzer through ``Exchange``'s callbacks.

    As libcurl: a paused write keeps its chunk and delivers it again on unpause,
    synchronously inside ``pause()``; a callback's abort ends the transfer with a
    ``CurlError``; the upload stops at its declared length.
    """

    def __init__(self, request: Any) -> None:
        self.request = request
        self.future: asyncio.Future[HTTPResponse] = asyncio.get_running_loop().create_future()
        self.curl = FakeCurl(self)
        self.state = "queued"
        self.status = 0
        self.head_done = False
        self.write_paused = False
        self.read_paused = False
        self.body: list[bytes] = []
        self.uploaded = 0
        self.upload_eof = False

    @property
    def running(self) -> bool:
        return self.state == "running"

    def start(self) -> None:
        """A ``--max-concurrency`` slot is free: Tornado sets the handle up (_process_queue)."""
        if self.state != "queued":
            return
        self.state = "running"
        try:
            self.request.prepare_curl_callback(self.curl)
        except Exception as e:  # Tornado passes a setup error to the fetch's future
            self.state = "done"
            self.future.set_exception(e)

    def fail(self, errno: int, message: str = "fake failure") -> None:
        if self.state == "done":
            return
        self.state = "done"
        self.future.set_exception(CurlError(errno, message))

    def complete(self) -> None:
        if not self.running or not self.head_done or self.write_paused or self.body:
            return
        self.state = "done"
        self.future.set_result(HTTPResponse(self.request, self.status))

    def head(self, status: int, lines: list[str], interim: bool) -> None:
        if not self.running or self.head_done:
            return
        callback = self.curl.options[pycurl.HEADERFUNCTION]
        block = ["HTTP/1.1 100 Continue\r\n", "\r\n"] if interim else []
        block += [f"HTTP/1.1 {status} Fuzz\r\n", *lines, "\r\n"]
        for line in block:
            if callback(line.encode("latin-1")) == 0:  # an abort from the callback
                self.fail(pycurl.E_WRITE_ERROR, "header callback aborted")
                return
        self.status, self.head_done = status, True

    def write(self, size: int) -> None:
        if self.running and self.head_done:
            # libcurl hands over at most CURLOPT_BUFFERSIZE bytes per write callback.
            most = self.curl.options.get(pycurl.BUFFERSIZE, 16 * 1024)
            self.body.extend(b"b" * min(most, size - at) for at in range(0, size, most))
            self.deliver()

    def deliver(self) -> None:
        callback = self.curl.options[pycurl.WRITEFUNCTION]
        while self.body and self.running and not self.write_paused:
            result = callback(self.body[0])
            if result == pycurl.WRITEFUNC_PAUSE:
                self.write_paused = True
            elif result is not None:
                self.fail(pycurl.E_WRITE_ERROR, "write callback aborted")
            else:
                self.body.pop(0)

    def read(self, size: int) -> None:
        callback = self.curl.options.get(pycurl.READFUNCTION)
        if not self.running or callback is None or self.read_paused or self.upload_eof:
            return
        result = callback(size)
        if result == pycurl.READFUNC_PAUSE:
            self.read_paused = True
        elif result == pycurl.READFUNC_ABORT:
            self.fail(pycurl.E_ABORTED_BY_CALLBACK, "read callback aborted")
        elif isinstance(result, bytes):
            assert len(result) <= size, "read callback returned more than asked"
            self.uploaded += len(result)
            declared = self.curl.options.get(
                pycurl.POSTFIELDSIZE_LARGE, self.curl.options.get(pycurl.INFILESIZE_LARGE, -1)
            )
            if not result or 0 <= declared <= self.uploaded:
                self.upload_eof = True
        else:
            raise AssertionError(f"read callback returned {result!r}")

    def next_step(self, choice: int, size: int) -> None:
        """What a well-behaved local app (and libcurl) would do next."""
        if self.state == "queued":
            self.start()
        elif not self.head_done:
            if choice % 4 == 0:
                self.read(size)  # the app reads (some of) the upload first
            else:
                length = [f"Content-Length: {size}\r\n"] if choice % 3 == 0 else []
                self.head(101 if choice % 8 == 1 else 200, length, interim=choice % 5 == 0)
        elif choice % 4 == 0:
            self.complete()
        elif choice % 4 == 1:
            self.read(size)
        else:
            self.write(size)

    def unpause(self) -> None:
        if not self.running:
            return
        self.read_paused = False
        if self.write_paused:
            self.write_paused = False
            self.deliver()


class FakeCurlClient:
    """``UpstreamClient`` as ``Exchange`` uses it: fetch, running, abort."""

    def __init__(self) -> None:
        self.transfers: list[FakeTransfer] = []

    def fetch(self, request: Any, raise_error: bool = True) -> asyncio.Future[HTTPResponse]:
        transfer = FakeTransfer(request)
        self.transfers.append(transfer)
        return transfer.future

    def running(self, curl: FakeCurl, request: Any) -> bool:
        return curl.transfer.running and curl.transfer.request is request

    def abort(self, curl: FakeCurl, request: Any, why: str) -> None:
        if self.running(curl, request):
            curl.transfer.fail(pycurl.E_ABORTED_BY_CALLBACK, why)


class FakeAppConnection:
    """The local app's WebSocket (a ``WebSocketClientConnection``) for ``WebSocketExchange``."""

    def __init__(self) -> None:
        self.protocol = FakeAppProtocol()
        self.selected_subprotocol: str | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.inbox: list[str | bytes] = []
        self.reader: asyncio.Future[str | bytes | None] | None = None
        self.ended = False

    def read_message(self) -> asyncio.Future[str | bytes | None]:
        future: asyncio.Future[str | bytes | None] = asyncio.get_running_loop().create_future()
        if self.inbox:
            future.set_result(self.inbox.pop(0))
        elif self.ended:
            future.set_result(None)
        else:
            self.reader = future
        return future

    def _resolve(self, message: str | bytes | None) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(message)
            self.reader = None
        elif message is not None:
            self.inbox.append(message)

    def app_message(self, message: str | bytes) -> None:
        if not self.ended and self.protocol.closed_with is None:
            self._resolve(message)

    def app_close(self, code: int) -> None:
        if not self.ended:
            self.close_code, self.close_reason = code, "app closed"
            self.protocol._handle_message(0x8, b"")  # its close frame arrived
            self.ended = True
            self._resolve(None)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.protocol.close(code, reason)  # record_sent_close wraps this
        if not self.ended:  # the app answers the close; then read_message() ends
            self.ended = True
            self._resolve(None)


class AppHandshake:
    """A pending ``websocket_connect`` to the local app; the fuzzer decides how it ends."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.future: asyncio.Future[FakeAppConnection] = asyncio.get_running_loop().create_future()
        self.conn: FakeAppConnection | None = None

    def accept(self) -> None:
        if not self.future.done():
            self.conn = FakeAppConnection()
            self.future.set_result(self.conn)

    def refuse(self, status: int) -> None:
        if not self.future.done():
            response = HTTPResponse(
                self.request,
                status,
                headers=HTTPHeaders({"X-Refused": "yes", "Content-Length": "2"}),
                buffer=io.BytesIO(b"no"),
            )
            self.future.set_exception(HTTPClientError(status, response=response))

    def unreachable(self) -> None:
        if not self.future.done():
            self.future.set_exception(ConnectionRefusedError("fake: connection refused"))


class RecordingClientTunnel(ClientTunnel):
    """A real ``ClientTunnel`` that checks each frame its exchanges queue, as it is queued."""

    model: ClientModel

    def send(self, *frame: bytes) -> None:
        try:
            self.model.on_send(frame)
        except AssertionError as e:  # often inside a libcurl or future callback: kept
            FAILURES.append(str(e))
        super().send(*frame)

    def _start(self, head: protocol.RequestHead) -> None:
        before = set(self._tasks)
        super()._start(head)
        exchange = self.streams[head.stream_id]
        (task,) = set(self._tasks) - before
        self.model.started(exchange, task)


class ClientModel:
    """What the client fuzz knows: the requests it sent and what came back for each."""

    def __init__(self) -> None:
        self.ws = FakeServerConnection()
        self.http = FakeCurlClient()
        config = ClientConfig(
            server_url="ws://127.0.0.1:9/",
            dst_origin="http://127.0.0.1:9",
            timeout=3600.0,
            inspect_addr=None,
            ws_max_message=3 * protocol.MAX_CHUNK,
        )
        self.tunnel = RecordingClientTunnel(self.ws, config, self.http, None)  # type: ignore[arg-type]
        self.tunnel.model = self
        self.next_id = 1
        self.requested: dict[int, protocol.RequestHead] = {}
        self.peers: dict[int, HonestPeer] = {}
        self.exchanges: list[tuple[Exchange | WebSocketExchange, asyncio.Task[None]]] = []
        self.handshakes: list[AppHandshake] = []
        #: Per exchange (by id()): it sent a RESET / the END of its DATA.
        self.reset_sent: set[int] = set()
        self.end_sent: set[int] = set()
        self.seen: set[str] = set()

    async def ws_connect(self, request: Any, **options: Any) -> FakeAppConnection:
        handshake = AppHandshake(request)
        self.handshakes.append(handshake)
        return await handshake.future

    def started(self, exchange: Exchange | WebSocketExchange, task: asyncio.Task[None]) -> None:
        self.exchanges.append((exchange, task))

    def on_send(self, frame: tuple[bytes, ...]) -> None:
        type_, flags, stream_id = header_of(frame)
        assert type_ != protocol.FrameType.REQUEST, "the client sent a REQUEST"
        exchange = self.tunnel.streams.get(stream_id)
        assert not self.tunnel.closed.done(), f"frame type {type_} after the tunnel closed"
        assert exchange is not None, f"frame type {type_} for stream {stream_id}, not in flight"
        key = id(exchange)
        assert key not in self.reset_sent, f"frame type {type_} after RESET {stream_id}"
        if type_ == DATA:
            assert key not in self.end_sent, f"DATA after the END of stream {stream_id}"
            if flags & protocol.FLAG_END:
                self.end_sent.add(key)
                self.seen.add("a response or websocket ended")
        elif type_ == RESET:
            self.reset_sent.add(key)
            self.seen.add("the client reset a stream")
        elif type_ == protocol.FrameType.RESPONSE:
            self.seen.add("a response head went out")
        length = HEADER.unpack_from(frame[0])[3]
        if type_ == WINDOW:
            length = struct.unpack("!I", b"".join(frame)[protocol.HEADER_SIZE :])[0]
        peer = self.peers.get(stream_id)
        if peer is not None:
            peer.on_frame_from_other_side(type_, length)
            if type_ == protocol.FrameType.RESPONSE:
                head = protocol.decode(b"".join(frame))
                assert isinstance(head, protocol.ResponseHead)
                peer.websocket = self.requested[stream_id].upgrade and head.status == 101
                peer.started = True

    # -- the server's frames ----------------------------------------------------------------

    def ids(self) -> list[int]:
        return sorted(self.requested)

    def request(self, reuse: int, body_length: int, upgrade: bool, method: str) -> bytes:
        if reuse >= 0 and self.requested:
            stream_id = pick(self.ids(), reuse, 0)
        else:
            stream_id, self.next_id = self.next_id, self.next_id + 1
        body_length = 0 if upgrade else body_length
        head = protocol.RequestHead(
            stream_id,
            "GET" if upgrade else method,
            "/fuzz?q=1",
            [("Host", "public.example"), ("X-Forwarded-Proto", "https")],
            body_length,
            "203.0.113.9",
            "https",
            "public.example",
            upgrade,
        )
        self.requested[stream_id] = head
        peer = self.peers[stream_id] = HonestPeer()
        peer.ended = body_length == 0 and not upgrade  # no body to send
        return head.encode()

    def honest(self, ref: int, choice: int, size: int) -> bytes:
        """What an honest server would send next on a stream (b"" if nothing)."""
        stream_id = pick(self.ids(), ref, 0)
        peer = self.peers.get(stream_id)
        if peer is None:
            return b""
        if peer.owed and (choice % 3 == 0 or peer.ended):
            return peer.window(stream_id)
        if self.requested[stream_id].upgrade:
            if not peer.websocket or peer.ended:
                return b""
        elif peer.ended:
            return b""
        return peer.data(stream_id, choice, size)

    def frame(self, spec: tuple[Any, ...]) -> bytes:
        kind = spec[0]
        if kind == "request":
            return self.request(*spec[1:])
        if kind == "honest":
            return self.honest(*spec[1:])
        stream_id = pick(self.ids(), spec[1], self.next_id + 7)
        if kind == "data":
            return data_frame(stream_id, spec[2], spec[3])
        if kind == "window":
            return protocol.Window(stream_id, spec[2]).encode()
        if kind == "reset":
            return protocol.Reset(stream_id, spec[2], "fuzz").encode()
        if kind == "response":
            return protocol.ResponseHead(stream_id, 200, "OK", []).encode()
        return bytes(spec[2])  # garbage

    def receive(self, parts: list[bytes]) -> None:
        """One WebSocket message from the server, through the real entry point."""
        message = b"".join(parts)
        if self.tunnel.closed.done() or not message:
            return
        self.tunnel.on_message(message)

    # -- the local app ------------------------------------------------------------------------

    def transfer(self, ref: int) -> FakeTransfer | None:
        live = [t for t in self.http.transfers if t.state != "done"]
        return live[ref % len(live)] if live and ref >= 0 else None

    def handshake(self, ref: int) -> AppHandshake | None:
        return self.handshakes[ref % len(self.handshakes)] if self.handshakes else None

    def app_connection(self, ref: int, ended: bool = False) -> FakeAppConnection | None:
        """A connection to the app; ``ended``: closed ones too (their writes may still drain)."""
        conns = [h.conn for h in self.handshakes if h.conn is not None]
        conns = [conn for conn in conns if ended or not conn.ended]
        return conns[ref % len(conns)] if conns else None

    def exchange(self, ref: int) -> Exchange | None:
        running = [e for e, task in self.exchanges if isinstance(e, Exchange) and not task.done()]
        return running[ref % len(running)] if running else None

    # -- invariants ---------------------------------------------------------------------------

    def check(self) -> None:
        assert_no_failures()
        tunnel = self.tunnel
        if tunnel.closed.done():
            assert not tunnel.streams, "streams left on a closed tunnel"
        for exchange, task in self.exchanges:
            if task.done():
                assert task.exception() is None, repr(task.exception())
                current = tunnel.streams.get(exchange.id)
                assert current is not exchange, f"stream {exchange.id} outlived its exchange"
            if exchange.cancelled and tunnel.streams.get(exchange.id) is exchange:
                self.seen.add("a cancelled exchange still routed (until its transfer ends)")
            assert 0 <= exchange.send_window.credit <= protocol.MAX_WINDOW
            assert 0 <= exchange.recv_window.available <= protocol.INITIAL_WINDOW
            if isinstance(exchange, Exchange):
                queued = sum(map(len, exchange.upload))
                assert queued <= protocol.INITIAL_WINDOW, f"upload queue {queued}"
                if exchange.write_paused:
                    self.seen.add("a response paused for credit")
                if exchange.read_paused:
                    self.seen.add("an upload paused for data")
            elif exchange.conn is not None:
                self.seen.add("a websocket was open")

    async def finish(self) -> None:
        """Every transfer gets a slot, then the server goes away: nothing may be left behind."""
        for transfer in self.http.transfers:
            transfer.start()
        await settle()
        self.check()
        for seen in self.seen:
            event(f"client state: {seen}")
        for exchange, task in self.exchanges:
            if task.done():
                event(f"client exchange: {type(exchange).__name__} done")
        event(f"client tunnel: {'open' if not self.tunnel.closed.done() else 'closed'}")
        if self.tunnel.closed.done() and LAST_ERROR.last:
            event(f"client protocol error: {error_kind(LAST_ERROR.last)}")
        self.tunnel.on_message(None)  # Tornado's callback when the connection closed
        await settle()
        for handshake in self.handshakes:  # connect_timeout ends every handshake
            handshake.unreachable()
        await settle()
        self.check()
        assert not self.tunnel.streams
        for exchange, task in self.exchanges:
            assert exchange.cancelled or task.done()
            assert task.done(), f"stream {exchange.id}: its exchange still waits"
        for transfer in self.http.transfers:
            assert transfer.state == "done", "a transfer to the local app was never ended"


response_lines = st.sampled_from(
    [
        [],
        ["Content-Length: 5\r\n"],
        ["Content-Length: 0\r\n", "X-A: 1\r\n"],
        ["Transfer-Encoding: chunked\r\n"],
        ["Bad Header: x\r\n"],
        ["X-Folded: a\r\n", " b\r\n"],
    ]
)
honest_server_frames = st.tuples(
    st.just("honest"), st.integers(min_value=0, max_value=7), st.integers(0, 63), sizes
)
new_requests = st.tuples(
    st.just("request"),
    st.just(-1),
    st.sampled_from([0, 0, 700, -1]),
    st.sampled_from([False, False, True]),
    st.sampled_from(["GET", "POST", "PUT", "HEAD", "PATCH"]),
)
hostile_server_frames = st.one_of(
    st.tuples(
        st.just("request"),
        st.integers(min_value=0, max_value=7),
        st.sampled_from([0, 5]),
        st.booleans(),
        st.just("GET"),
    ),
    st.tuples(st.just("data"), refs, sizes, data_flags),
    st.tuples(st.just("window"), refs, increments),
    st.tuples(st.just("reset"), refs, reset_codes),
    st.tuples(st.just("response"), refs),
    st.tuples(st.just("garbage"), refs, st.binary(max_size=24)),
)
app_refs = st.integers(min_value=0, max_value=7)


def client_scenarios(hostile: int) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """Scenarios where about ``hostile`` percent of the server's frames are hostile."""
    frames = weighted(
        (10, new_requests),
        (90 - hostile, honest_server_frames),
        (hostile, hostile_server_frames),
    )
    reset_frame = st.tuples(st.just("reset"), st.integers(0, 7), reset_codes)
    actions = weighted(
        (28, st.tuples(st.just("server"), st.lists(frames, min_size=1, max_size=3))),
        (2, st.tuples(st.just("server"), st.lists(reset_frame, min_size=1, max_size=1))),
        (20, st.tuples(st.just("app"), app_refs, st.integers(0, 63), big_sizes)),
        (5, st.tuples(st.just("slot"), app_refs)),
        (5, st.tuples(st.just("head"), app_refs, st.sampled_from([200, 200, 204, 404, 101]),
                      response_lines, st.booleans())),
        (6, st.tuples(st.just("write"), app_refs, big_sizes)),
        (5, st.tuples(st.just("read"), app_refs, st.sampled_from([1, 700, protocol.MAX_CHUNK]))),
        (3, st.tuples(st.just("complete"), app_refs)),
        (1, st.tuples(st.just("fail"), app_refs, st.sampled_from(
            [pycurl.E_COULDNT_CONNECT, pycurl.E_OPERATION_TIMEDOUT, pycurl.E_RECV_ERROR]))),
        (1, st.tuples(st.just("timer"), app_refs)),
        (3, st.tuples(st.just("ws_accept"), app_refs)),
        (1, st.tuples(st.just("ws_refuse"), app_refs, st.sampled_from([403, 404, 500]))),
        (1, st.tuples(st.just("ws_unreachable"), app_refs)),
        (4, st.tuples(st.just("ws_message"), app_refs, sizes, st.booleans())),
        (1, st.tuples(st.just("ws_close"), app_refs, st.sampled_from([1000, 1001, 4001]))),
        (3, st.tuples(st.just("ws_drain"), app_refs)),
        (1, st.tuples(st.just("disconnect"), st.sampled_from(["closed", "write_fails"]))),
    )
    first = st.lists(st.tuples(st.just("server"), st.lists(new_requests, min_size=1, max_size=2)),
                     min_size=1, max_size=3)
    return st.tuples(first, st.lists(actions, min_size=4, max_size=60)).map(
        lambda parts: parts[0] + parts[1]
    )


any_client_scenario = st.sampled_from([0, 3, 10, 40]).flatmap(client_scenarios)


async def client_scenario(actions: list[tuple[Any, ...]]) -> None:
    model = ClientModel()
    with mock.patch.object(client_websocket, "websocket_connect", model.ws_connect):
        await play_client(model, actions)


async def play_client(model: ClientModel, actions: list[tuple[Any, ...]]) -> None:
    LAST_ERROR.last = ""
    for action in actions:
        kind = action[0]
        if kind == "server":
            model.receive([model.frame(spec) for spec in action[1]])
        elif kind in ("app", "slot", "head", "write", "read", "complete", "fail"):
            transfer = model.transfer(action[1])
            if transfer is None:
                pass
            elif kind == "app":
                transfer.next_step(action[2], action[3])
            elif kind == "slot":
                transfer.start()
            elif kind == "head":
                transfer.head(action[2], action[3], action[4])
            elif kind == "write":
                transfer.write(action[2])
            elif kind == "read":
                transfer.read(action[2])
            elif kind == "complete":
                transfer.complete()
            else:
                transfer.fail(action[2])
        elif kind == "timer":
            exchange = model.exchange(action[1])
            if exchange is not None:
                exchange._on_timeout()  # what the loop calls after --timeout
        elif kind in ("ws_accept", "ws_refuse", "ws_unreachable"):
            handshake = model.handshake(action[1])
            if handshake is None:
                pass
            elif kind == "ws_accept":
                handshake.accept()
            elif kind == "ws_refuse":
                handshake.refuse(action[2])
            else:
                handshake.unreachable()
        elif kind in ("ws_message", "ws_close", "ws_drain"):
            conn = model.app_connection(action[1], ended=kind == "ws_drain")
            if conn is None:
                pass
            elif kind == "ws_message":
                conn.app_message("t" * action[2] if action[3] else b"b" * action[2])
            elif kind == "ws_close":
                conn.app_close(action[2])
            else:
                conn.protocol.drain()
        elif kind == "disconnect":
            if action[1] == "closed":
                model.tunnel.on_message(None)
            else:
                model.ws.protocol.broken = True  # the next flush finds the socket gone
        await settle()
        model.check()
    await model.finish()


@FUZZ
@given(any_client_scenario)
# Found by this fuzz: a WebSocket's fragments written to the app after it closed granted
# credit for a stream that had ended (WINDOW after the END and after the stream was gone).
@example(
    [("server", [("request", -1, 0, True, "GET")]), ("ws_accept", 0)]
    + [("server", [("honest", 0, 2, protocol.MAX_CHUNK)])] * 5
    + [("ws_close", 0, 1000), ("ws_drain", 0)]
)
# Found by this fuzz: the app's WebSocket handshake ending after the tunnel closed (or the
# server reset the stream) still sent a RESET, or the refusal's RESPONSE and DATA.
@example([("server", [("request", -1, 0, True, "GET")]), ("disconnect", "closed")])
@example(
    [
        ("server", [("request", -1, 0, True, "GET")]),
        ("server", [("reset", 0, 9)]),
        ("ws_refuse", 0, 403),
    ]
)
def test_client_streams_survive_any_server(actions: list[tuple[Any, ...]]) -> None:
    run_scenario(client_scenario(actions))
