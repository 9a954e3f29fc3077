"""Send one binary WebSocket message made of several pieces, copying the big ones once at most.

A batch is a list of pieces: frame headers, small heads and body chunks of up
to 256 KiB. Tornado's ``write_message`` takes one bytes object, so the batch
had to be joined first, and its frame writer then copies the payload twice
more (the mask, then header plus payload): four copies of every body byte in
the client, a fifth of its CPU during a download. Here small pieces are
joined (cheap), and each big piece goes to the IOStream as it is on the
server, or masked straight into its only copy on the client (RFC 6455 5.3:
every client-to-server frame is masked).

The frame is appended to the connection's IOStream in one go, exactly as
Tornado's own frame writer does, so it never interleaves with Tornado's pings
or close frames (which may come between the frames of a fragmented message,
RFC 6455 section 5.4). The tunnel never negotiates extensions, so no RSV bit is set.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from tornado.concurrent import Future
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketProtocol

from .masking import mask as _websocket_mask

#: Pieces at least this big are written on their own, uncopied; smaller ones are joined
#: into groups of about this size, so that a message costs few copies and few syscalls.
LARGE = 64 * 1024

_FIN = 0x80
_CONTINUATION = 0x0
_TEXT = 0x1
_BINARY = 0x2
_CLOSE = 0x8
_MASKED = 0x80


def frame_header(
    length: int,
    mask: bytes | None = None,
    *,
    text: bool = False,
    opens: bool = True,
    final: bool = True,
) -> bytes:
    """The header of one binary (or text) frame of ``length`` payload bytes.

    ``opens``: the frame starts its message, else it is a continuation frame;
    ``final``: it ends its message (FIN).
    """
    bit = _MASKED if mask else 0
    first = (_TEXT if text else _BINARY) if opens else _CONTINUATION
    if final:
        first |= _FIN
    if length < 126:
        head = struct.pack("!BB", first, bit | length)
    elif length <= 0xFFFF:
        head = struct.pack("!BBH", first, bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, bit | 127, length)
    return head + mask if mask else head


def mask_at(mask: bytes, offset: int, data: bytes) -> bytes:
    """``data`` masked as if it started ``offset`` bytes into the payload."""
    shift = offset % 4
    return _websocket_mask(mask[shift:] + mask[:shift] if shift else mask, data)


def write_binary(
    connection: WebSocketProtocol | None,
    pieces: Sequence[bytes],
    *,
    text: bool = False,
    opens: bool = True,
    final: bool = True,
) -> Future[None]:
    """Send ``pieces`` as one frame (a whole binary message by default), or raise
    ``WebSocketClosedError``.

    ``text``: a text message (the pieces are its UTF-8, passed on as they are).
    ``opens`` / ``final``: the frame starts / ends its message, so that a
    message can be written fragment by fragment (RFC 6455 section 5.4).
    The future resolves once the whole frame has left for the socket.
    """
    stream = connection.stream if connection is not None else None
    if stream is None or connection is None or connection.is_closing():
        raise WebSocketClosedError()
    mask = os.urandom(4) if connection.mask_outgoing else None  # type: ignore[attr-defined]
    waiting = [frame_header(sum(map(len, pieces)), mask, text=text, opens=opens, final=final)]
    offset = 0
    try:
        for group in _groups(pieces):
            data = mask_at(mask, offset, group) if mask else group
            offset += len(group)
            if len(group) < LARGE:
                waiting.append(data)
                continue
            if waiting:
                stream.write(b"".join(waiting))
                waiting = []
            written = stream.write(data)
        if waiting:
            written = stream.write(b"".join(waiting))
    except StreamClosedError:
        raise WebSocketClosedError() from None
    return written


def record_sent_close(connection: Any) -> list[tuple[int | None, str | None]]:
    """Make a Tornado WebSocket protocol remember a close it starts, Tornado's own too.

    Tornado closes a message over its limit with 1009 and drops the connection
    at once, without waiting for the peer's answer, so ``close_code`` stays
    None: the other end of the relay must still be told 1009 and the reason.
    The returned list holds the first close this side started, once there is one.
    """
    sent: list[tuple[int | None, str | None]] = []
    close = connection.close

    def recording(code: int | None = None, reason: str | None = None) -> None:
        # Only a close this side starts: an answer to the peer's echoes its code
        # without its reason, and the peer's own close_code and close_reason say more.
        if not sent and not connection.client_terminated:
            sent.append((code, reason))
        close(code, reason)

    connection.close = recording
    return sent


def record_peer_close(connection: Any) -> list[bool]:
    """Make a Tornado WebSocket protocol remember that the peer's close frame arrived.

    Tornado leaves ``close_code`` None both after a close frame without a code
    and after a connection that dropped without any (1006): the relay passes
    the first on as it is, and reports the second as the peer going away.
    The returned list holds True once the peer's close frame arrived.
    """
    received: list[bool] = []
    handle = connection._handle_message

    def handling(opcode: int, data: bytes) -> Any:
        if opcode == _CLOSE and not received:
            received.append(True)
        return handle(opcode, data)

    connection._handle_message = handling
    return received


def _groups(pieces: Sequence[bytes]) -> Iterator[bytes]:
    """Each big piece alone; small pieces joined into groups of about ``LARGE`` bytes."""
    run: list[bytes] = []
    size = 0
    for piece in pieces:
        if len(piece) >= LARGE:
            if run:
                yield b"".join(run)
                run, size = [], 0
            yield piece
            continue
        run.append(piece)
        size += len(piece)
        if size >= LARGE:
            yield b"".join(run)
            run, size = [], 0
    if run:
        yield b"".join(run)
