"""The server's half of one relayed request.

A ``ServerStream`` sits between the public ``RequestHandler`` (which awaits it)
and the ``Tunnel`` (which feeds it frames). It owns the flow-control windows of
its stream, the response chunks received but not yet written, and the timer
that turns a silent client into a 504, so no public request waits forever.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING

from .. import errors, protocol, relay
from ..protocol import ResponseHead

if TYPE_CHECKING:
    from .tunnel import Tunnel

#: Bytes a tunnel may have queued for its socket before body senders wait: a client
#: that stops reading stalls its streams instead of growing the server's memory.
MAX_UNSENT = 8 * 1024 * 1024

log = logging.getLogger("backstream.server")


class ServerStream:
    """Response head and body chunks for one stream id, with backpressure both ways."""

    __slots__ = (
        "tunnel",
        "id",
        "send_window",
        "recv_window",
        "response",
        "timeout",
        "_chunks",
        "_fragments",
        "messages",
        "_discarding",
        "upgrade",
        "body_open",
        "websocket",
        "close_info",
        "_ended",
        "_error",
        "_waiter",
        "_timer",
        "closed",
    )

    def __init__(self, tunnel: Tunnel, stream_id: int, timeout: float) -> None:
        self.tunnel = tunnel
        self.id = stream_id
        self.send_window = protocol.SendWindow()
        self.recv_window = protocol.RecvWindow()
        self.response: ResponseHead | None = None
        self.timeout = timeout
        self._chunks: collections.deque[bytes] = collections.deque()
        self._fragments: collections.deque[protocol.Fragment] = collections.deque()
        #: Follows the local app's WebSocket messages (set for an upgrade, with its limit).
        self.messages = protocol.MessageTracker()
        #: A message was over the limit: the rest of it is dropped, the WebSocket closed.
        self._discarding = False
        #: A WebSocket upgrade was requested; once answered 101 the stream carries messages.
        self.upgrade = False
        #: The request has a body whose end the client has not been sent yet.
        self.body_open = False
        self.websocket = False
        #: The local app's close code and reason once its WebSocket closed (None: no code).
        self.close_info: tuple[int | None, str | None] = (None, None)
        self._ended = False
        self._error: errors.StreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    # -- frames from the tunnel -------------------------------------------------

    def on_response(self, head: ResponseHead) -> None:
        if self.response is not None:
            raise errors.ProtocolError(f"second RESPONSE on stream {self.id}")
        try:  # the server decides the framing of what it relays, not the client
            head.headers = relay.response_headers(head.status, head.headers, upgrade=self.upgrade)
        except ValueError as e:
            self.reset(errors.InvalidResponse(f"invalid response head from the client: {e}"))
            return
        self.response = head
        self.websocket = self.upgrade and head.status == 101
        self._ended = head.end_stream
        self._cancel_timer()
        self.wake()

    def on_data(self, frame: protocol.Data) -> None:
        if self.response is None:
            raise errors.ProtocolError(f"DATA before RESPONSE on stream {self.id}")
        if self._ended:
            raise errors.ProtocolError(f"DATA after the end of stream {self.id}")
        self.recv_window.receive(len(frame.data))
        if self.websocket:
            if not frame.end_stream:
                if not self._discarding:
                    self._on_fragment(frame)
                return
            if not self._discarding:
                self.close_info = protocol.parse_close(frame.data)
        elif frame.data:
            self._chunks.append(frame.data)
        self._ended = frame.end_stream
        self.wake()

    def _on_fragment(self, frame: protocol.Data) -> None:
        try:
            fragment = self.messages.feed(frame)
        except protocol.MessageTooBig as e:
            # The pump closes the public WebSocket with 1009, and that close is
            # relayed to the local app; what is still coming of the message is dropped.
            self.close_info = (1009, str(e))
            self._discarding = True
            self.wake()
            return
        self._fragments.append(fragment)  # at most a window of them: credit comes once written
        self.wake()

    def on_window(self, increment: int) -> None:
        self.send_window.grant(increment)
        self._cancel_timer()
        self.wake()

    def fail(self, error: errors.StreamError) -> None:
        """End the stream with ``error`` (the tunnel closed, the client reset it, ...)."""
        if self._error is None:
            self._error = error
        self._cancel_timer()
        self.wake()

    # -- used by the public handler ---------------------------------------------

    async def send_body(self, chunk: bytes) -> None:
        """Forward a piece of the request body, waiting for credit as needed.

        Once the local app has answered, the rest of the body is dropped: it
        has no reader any more, and waiting for credit would stall the answer.
        """
        view = memoryview(chunk)
        tunnel = self.tunnel
        while view:
            if self._error is not None or self.response is not None:
                return
            size = min(len(view), self.send_window.credit, protocol.MAX_CHUNK)
            if size == 0:
                await self._wait()
                continue
            if tunnel.unsent > MAX_UNSENT:  # the client is not reading: stall, never buffer
                tunnel.stalled.add(self)
                await self._wait()
                continue
            self.send_window.spend(size)
            piece = chunk if size == len(chunk) else bytes(view[:size])
            self.tunnel.send(*protocol.Data(self.id, piece).parts())
            view = view[size:]

    def end_body(self) -> None:
        if self._error is None and self.response is None:
            self.body_open = False
            self.tunnel.send(protocol.Data(self.id, b"", end_stream=True).encode())

    async def response_head(self) -> ResponseHead:
        while self.response is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self.response

    def complete(self) -> bool:
        """Whether the rest of the response body has arrived (nothing more to wait for)."""
        return self._ended and self._error is None

    async def read(self) -> list[bytes] | None:
        """The response chunks queued so far (at least one), or None at the end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            await self._wait()
        chunks = list(self._chunks)
        self._chunks.clear()
        return chunks

    async def read_fragment(self) -> protocol.Fragment | None:
        """The next piece of the local app's WebSocket messages, or None once it closed.

        Call ``consumed`` with its size once it went out: its credit is granted then.
        """
        while not self._fragments:
            if self._error is not None:
                raise self._error
            if self._ended or self._discarding:
                return None
            await self._wait()
        return self._fragments.popleft()

    async def send_message(self, data: bytes, text: bool) -> None:
        """Send one WebSocket message to the local app, in fragments, waiting for credit."""
        for fragment in protocol.fragments(self.id, data, text):
            while True:
                if self.closed or self._ended:  # the local app's side is closed already
                    return
                if self._error is not None:
                    raise self._error
                if self.tunnel.unsent > MAX_UNSENT:
                    self.tunnel.stalled.add(self)
                    await self._wait()
                elif self.send_window.spend(len(fragment.data)):
                    break
                else:
                    await self._wait()
            self.tunnel.send(*fragment.parts())

    def consumed(self, size: int) -> None:
        """``size`` response bytes reached the public caller: grant more credit."""
        increment = self.recv_window.consume(size)
        if increment and not self.closed:
            self.tunnel.send(protocol.Window(self.id, increment).encode())

    def reset(self, error: errors.StreamError) -> None:
        """Abort the stream from this side and tell the client."""
        if not self.closed:
            self.tunnel.send(protocol.Reset(self.id, error.reset_code, error.log_message).encode())
        self.fail(error)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        if self.body_open and self._error is None:
            # Answered before the whole request body went out (the local app did
            # not wait for it): the client's transfer would wait for it for ever.
            error = errors.Cancelled("response complete before the request body")
            self.tunnel.send(protocol.Reset(self.id, error.reset_code, error.log_message).encode())
        self.closed = True
        self._cancel_timer()
        self.tunnel.forget(self.id)

    # -- waiting ----------------------------------------------------------------

    def _wait(self) -> asyncio.Future[None]:
        """A future resolved by the next frame; arms the no-answer timer meanwhile."""
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
        if self.response is None and self._timer is None and self.timeout > 0:
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self._on_timeout)
        return self._waiter

    def wake(self) -> None:
        """Let a waiting sender or reader look at the stream again."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        log.warning(
            "no response from the client stream=%d tunnel=%s timeout=%gs",
            self.id,
            self.tunnel.id,
            self.timeout,
        )
        self.reset(errors.UpstreamTimeout(f"no response within {self.timeout:g}s"))
