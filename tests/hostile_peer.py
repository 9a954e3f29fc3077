"""Hostile tunnel peers for the end-to-end attack tests, hand-rolled over raw sockets.

Both peers speak RFC 6455 themselves (no WebSocket library), so a test decides
exactly what goes on the wire and when anything is read:

``HostileClient.connect(port)``  a tunnel *client* (handshake with
    ``Backstream-Client: 1``, masked frames out). It reads the socket only when a
    test asks (``wait_request``, ``recv_frames``), so "stop reading and keep
    writing" is simply not calling them; ``rcvbuf`` shrinks its receive buffer so
    that a peer's unread bytes pile up on the *peer's* side at once.
``HostileServer()``  a tunnel *server* on ``127.0.0.1:0``: a helper thread
    accepts real ``backstream client`` processes (up to ``max_connections``),
    answers their handshake with 101 and queues each connection for the test
    (``next_connection``); frames out are unmasked.

Frames are built with ``backstream.protocol`` (``RequestHead(...).encode()``,
``ResponseHead``, ``Data``, ``Window``, ``Reset``); ``request_frame`` builds a
REQUEST head by hand, for fields a strict encoder might refuse to produce (CR/LF
in the method, odd header names). Every read has a deadline and every loop a
bound; ``close()`` (or the context manager) releases sockets and joins threads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import socket
import struct
import threading
import time
from typing import Any

from backstream import protocol

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
#: Largest WebSocket message either peer accepts (the protocol's own limit, with room).
MAX_WS_MESSAGE = 2 * protocol.MAX_MESSAGE
#: Largest HTTP handshake head either peer reads.
MAX_HANDSHAKE = 64 * 1024


class PeerClosed(ConnectionError):
    """The other side closed the WebSocket (close frame or EOF)."""


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def encode_ws_frame(opcode: int, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    """One RFC 6455 frame; ``mask`` for client-to-server frames."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _mask(payload, key)


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def request_frame(
    stream_id: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | list[list[str]],
    body_length: int = 0,
    remote: str = "127.0.0.1",
    scheme: str = "http",
    host: str = "public.example",
    flags: int = 0,
) -> bytes:
    """A REQUEST frame built by hand (same layout as ``RequestHead.encode``), any fields."""
    payload = json.dumps(
        [method, target, [list(h) for h in headers], body_length, remote, scheme, host],
        separators=(",", ":"),
    ).encode("utf-8")
    header = struct.pack("!BBII", protocol.FrameType.REQUEST, flags, stream_id, len(payload))
    return header + payload


def _read_head(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    """Read an HTTP head (up to the blank line): (head, bytes read past it)."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HANDSHAKE:
            raise ConnectionError("handshake head too large")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out reading a handshake head")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"EOF during the handshake after {bytes(buf[:200])!r}")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    return head, rest


def _header_map(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


class WsConnection:
    """One WebSocket over a blocking socket: write at any time, read only when asked."""

    def __init__(self, sock: socket.socket, *, mask: bool, leftover: bytes = b"") -> None:
        self.sock = sock
        self.mask = mask
        self._buf = bytearray(leftover)
        self._send_lock = threading.Lock()
        self.closed = False
        #: Frames read while waiting for something else (``wait_request``).
        self.pending: list[protocol.Frame] = []
        self.close_code: int | None = None

    # -- writing ------------------------------------------------------------------
    def send_message(self, *frames: bytes, timeout: float = 10.0) -> None:
        """The given backstream frames, back to back, as one binary message."""
        self.send_ws(OP_BINARY, b"".join(frames), timeout=timeout)

    def send_ws(self, opcode: int, payload: bytes, timeout: float = 10.0) -> None:
        data = encode_ws_frame(opcode, payload, mask=self.mask)
        with self._send_lock:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)

    # -- reading ------------------------------------------------------------------
    def _fill(self, need: int, deadline: float) -> None:
        while len(self._buf) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out reading from the peer")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(max(65536, need - len(self._buf)))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
                raise PeerClosed("peer closed the connection")
            self._buf += chunk

    def _take(self, n: int, deadline: float) -> bytes:
        self._fill(n, deadline)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def recv_ws(self, timeout: float) -> tuple[int, bytes]:
        """The next whole WebSocket message (opcode, payload); pings are answered."""
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        opcode = None
        for _ in range(10_000):  # fragments and control frames of one message
            b0, b1 = self._take(2, deadline)
            fin, op = b0 & 0x80, b0 & 0x0F
            masked, n = b1 & 0x80, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._take(2, deadline))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._take(8, deadline))
            if n > MAX_WS_MESSAGE:
                raise ConnectionError(f"WebSocket frame too large ({n} bytes)")
            key = self._take(4, deadline) if masked else b""
            payload = self._take(n, deadline)
            if masked:
                payload = _mask(payload, key)
            if op == OP_PING:
                self.send_ws(OP_PONG, payload)
                continue
            if op == OP_PONG:
                continue
            if op == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.closed = True
                raise PeerClosed(f"close frame code={self.close_code}")
            if op != OP_CONT:
                opcode = op
            parts.append(payload)
            if sum(len(p) for p in parts) > MAX_WS_MESSAGE:
                raise ConnectionError("WebSocket message too large")
            if fin:
                assert opcode is not None
                return opcode, b"".join(parts)
        raise ConnectionError("too many frames in one message")

    def recv_frames(self, timeout: float) -> list[protocol.Frame]:
        """The backstream frames of the next binary message."""
        opcode, payload = self.recv_ws(timeout)
        if opcode != OP_BINARY:
            raise ConnectionError(f"unexpected WebSocket opcode {opcode}")
        return protocol.decode_all(payload)

    def wait_for_frame(self, kind: type[Any], timeout: float) -> Any:
        """Read until a frame of type ``kind`` arrives; the others go to ``pending``."""
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            for i, frame in enumerate(self.pending):
                if isinstance(frame, kind):
                    return self.pending.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.pending.extend(self.recv_frames(left))
        raise TimeoutError(f"no {kind.__name__} frame within {timeout} s")

    def wait_request(self, timeout: float) -> protocol.RequestHead:
        """Read until the next REQUEST frame (a server's DATA after it may stay unread)."""
        head: protocol.RequestHead = self.wait_for_frame(protocol.RequestHead, timeout)
        return head

    def wait_closed(self, timeout: float) -> bool:
        """Read (and drop) until the peer closes; False if it is still open at the deadline."""
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self.recv_ws(left)
            except PeerClosed:
                return True
            except (TimeoutError, OSError):
                return self.closed
        return False

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> WsConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HostileClient(WsConnection):
    """A tunnel client that does exactly what the test says, and nothing else."""

    @classmethod
    def connect(
        cls,
        port: int,
        *,
        version: str = str(protocol.PROTOCOL_VERSION),
        rcvbuf: int | None = None,
        timeout: float = 10.0,
    ) -> HostileClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:  # before connect(): fixes the window, no autotuning
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(
                (
                    "GET / HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{port}\r\n"
                    "Upgrade: websocket\r\n"
                    "Connection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n"
                    f"{protocol.CLIENT_HEADER}: {version}\r\n"
                    "\r\n"
                ).encode()
            )
            head, rest = _read_head(sock, time.monotonic() + timeout)
            status_line, headers = _header_map(head)
            if " 101 " not in status_line + " ":
                raise ConnectionError(f"handshake refused: {head[:300]!r}")
            if headers.get("sec-websocket-accept") != accept_key(key):
                raise ConnectionError("bad Sec-WebSocket-Accept")
        except BaseException:
            sock.close()
            raise
        return cls(sock, mask=True, leftover=rest)


class HostileServer:
    """A tunnel server on 127.0.0.1:0 that hands each client connection to the test."""

    def __init__(self, max_connections: int = 16, lifetime: float = 120.0) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_connections = max_connections
        self.lifetime = lifetime
        self.handshakes: list[dict[str, str]] = []
        self.errors: list[str] = []
        self._connections: queue.Queue[WsConnection] = queue.Queue()
        self._all: list[WsConnection] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + self.lifetime
        accepted = 0
        while not self._stop.is_set() and accepted < self.max_connections:
            if time.monotonic() > deadline:
                return
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            accepted += 1
            try:
                conn = self._handshake(sock)
            except (OSError, ConnectionError) as e:
                self.errors.append(repr(e))
                sock.close()
                continue
            self._all.append(conn)
            self._connections.put(conn)

    def _handshake(self, sock: socket.socket) -> WsConnection:
        head, rest = _read_head(sock, time.monotonic() + 10.0)
        _, headers = _header_map(head)
        self.handshakes.append(headers)
        key = headers.get("sec-websocket-key", "")
        sock.settimeout(10.0)
        sock.sendall(
            (
                "HTTP/1.1 101 Switching Protocols\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
                "\r\n"
            ).encode()
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return WsConnection(sock, mask=False, leftover=rest)

    def next_connection(self, timeout: float) -> WsConnection:
        """The next client connection, handshake done; raises TimeoutError."""
        try:
            return self._connections.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no tunnel client connected within {timeout} s (errors: {self.errors})"
            ) from None

    def close(self) -> None:
        self._stop.set()
        try:
            self.listener.close()
        except OSError:
            pass
        self._thread.join(5.0)
        for conn in self._all:
            conn.close()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
