"""A raw TCP origin server for the end-to-end tests, run in threads of the pytest process.

Unlike ``tests/local_app.py`` (a real Tornado app), this origin parses nothing it does
not have to: it records the exact bytes of every connection it accepts, so a test can
prove that a request never reached the origin at all (zero bytes), or that it arrived
with exactly the method and target the public caller sent.

It listens on 127.0.0.1, port 0; the socket stays bound from construction to
``close()``, so there is no port race. One thread accepts, one thread per connection
serves it. Every wait is bounded (sockets poll with a short timeout and stop at
``close()``), and ``close()`` closes every socket and joins every thread.

Behaviour per request:

default      read the head (up to CRLFCRLF) and the body (``Content-Length``, or
             chunked), then answer ``HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok``
             and keep the connection for the next request (keep-alive).
answer early for targets starting with a prefix given to ``answer_early()``: answer
             the same 200 right after the head, WITHOUT reading the body, and then keep
             the connection open without ever reading from it again (until ``close()``,
             or ``EARLY_HOLD`` seconds at most).

API::

    origin = RawOrigin()
    origin.url, origin.port
    origin.answer_early("/early")   # targets starting with /early get "answer early"
    origin.requests()   -> list[RawRequest]  (method, target, headers: list of pairs)
    origin.raw()        -> list[bytes]       (every byte received, one item per connection)
    origin.total_bytes(), origin.connection_count()
    origin.wait_requests(n, timeout)         # until n request heads have been parsed
    origin.close()
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

__all__ = ["OK_RESPONSE", "RawOrigin", "RawRequest"]

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

#: Seconds between checks of the stop flag while a socket waits.
POLL = 0.1
#: A head larger than this closes the connection (the origin never answers it).
MAX_HEAD = 256 * 1024
#: A chunk-size line or trailer line longer than this closes the connection.
MAX_LINE = 8 * 1024
#: The receive buffer of every accepted socket: small and fixed (set before ``listen``,
#: so it is inherited and not auto-tuned), so a peer that keeps sending to a connection
#: the origin no longer reads ("answer early") blocks after a few KiB, deterministically.
RCVBUF = 64 * 1024
#: Longest time an "answer early" connection is held open unread (``close()`` ends it
#: sooner): a bound, not a wait anyone sits through.
EARLY_HOLD = 300.0


@dataclass(frozen=True)
class RawRequest:
    """One parsed request head as the origin received it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    connection: int  # index into ``RawOrigin.raw()``

    def header_all(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None


class _Closed(Exception):
    """The peer closed, the origin is stopping, or the input is beyond our limits."""


def parse_head(head: bytes, connection: int) -> RawRequest:
    """Split a request head (without the final CRLFCRLF) into its parts, leniently."""
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.rpartition(" ") if rest.count(" ") else (rest, "", "")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return RawRequest(method, target, version, headers, connection)


class _Connection:
    """Reads one accepted socket, recording every byte it receives."""

    def __init__(self, origin: RawOrigin, sock: socket.socket, index: int) -> None:
        self.origin = origin
        self.sock = sock
        self.index = index
        self.buf = bytearray()

    def _fill(self) -> None:
        """Receive at least one more byte into ``buf`` (raises _Closed on EOF or stop)."""
        while not self.origin.stopping.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise _Closed from e
            if not data:
                raise _Closed
            self.origin._record(self.index, data)
            self.buf += data
            return
        raise _Closed

    def _take_until(self, sep: bytes, limit: int) -> bytes:
        while (end := self.buf.find(sep)) < 0:
            if len(self.buf) > limit:
                raise _Closed
            self._fill()
        out = bytes(self.buf[:end])
        del self.buf[: end + len(sep)]
        return out

    def _skip(self, n: int) -> None:
        while n > 0:
            if not self.buf:
                self._fill()
            step = min(n, len(self.buf))
            del self.buf[:step]
            n -= step

    def _read_chunked(self) -> None:
        while True:
            size_line = self._take_until(b"\r\n", MAX_LINE)
            size_text = size_line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _Closed from None
            if size == 0:
                while self._take_until(b"\r\n", MAX_LINE):  # trailers, up to an empty line
                    pass
                return
            self._skip(size + 2)

    def serve(self) -> None:
        try:
            while True:
                head = self._take_until(b"\r\n\r\n", MAX_HEAD)
                request = parse_head(head, self.index)
                self.origin._add_request(request)
                if self.origin._is_early(request.target):
                    self.sock.sendall(OK_RESPONSE)
                    self.origin.stopping.wait(EARLY_HOLD)  # never read again
                    return
                codings = ",".join(request.header_all("transfer-encoding")).lower()
                lengths = request.header_all("content-length")
                if "chunked" in codings:
                    self._read_chunked()
                elif len(lengths) == 1 and lengths[0].isdigit():
                    self._skip(int(lengths[0]))
                self.sock.sendall(OK_RESPONSE)
                if "close" in ",".join(request.header_all("connection")).lower():
                    return
        except (_Closed, OSError):
            return
        finally:
            self.origin._forget(self.sock)


class RawOrigin:
    """The raw origin; see the module docstring."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._cond = threading.Condition()
        self._raw: list[bytearray] = []
        self._requests: list[RawRequest] = []
        self._early: tuple[str, ...] = ()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(128)
            self._listener.settimeout(POLL)
        except BaseException:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept_loop, name="raw-origin", daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer_early(self, *prefixes: str) -> None:
        """Targets starting with any of ``prefixes`` get the "answer early" behaviour."""
        with self._cond:
            self._early = tuple(prefixes)

    # -- what was received ------------------------------------------------------------

    def requests(self) -> list[RawRequest]:
        with self._cond:
            return list(self._requests)

    def raw(self) -> list[bytes]:
        with self._cond:
            return [bytes(b) for b in self._raw]

    def total_bytes(self) -> int:
        with self._cond:
            return sum(len(b) for b in self._raw)

    def connection_count(self) -> int:
        with self._cond:
            return len(self._raw)

    def wait_requests(self, n: int, timeout: float) -> list[RawRequest]:
        """Wait until at least ``n`` request heads were parsed; raise on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"raw origin: {len(self._requests)} requests, wanted {n}: "
                        f"{[(r.method, r.target) for r in self._requests]}"
                    )
                self._cond.wait(min(left, POLL))
            return list(self._requests)

    # -- threads ----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(POLL)
            with self._cond:
                if self.stopping.is_set():
                    sock.close()
                    return
                index = len(self._raw)
                self._raw.append(bytearray())
                self._socks.add(sock)
                conn = _Connection(self, sock, index)
                thread = threading.Thread(
                    target=conn.serve, name=f"raw-origin-{index}", daemon=True
                )
                self._threads.append(thread)
                self._cond.notify_all()
            thread.start()

    def _record(self, index: int, data: bytes) -> None:
        with self._cond:
            self._raw[index] += data
            self._cond.notify_all()

    def _add_request(self, request: RawRequest) -> None:
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    def _is_early(self, target: str) -> bool:
        with self._cond:
            return any(target.startswith(p) for p in self._early)

    def _forget(self, sock: socket.socket) -> None:
        with self._cond:
            self._socks.discard(sock)
        sock.close()

    def close(self) -> None:
        """Stop accepting, close every connection, join every thread (bounded)."""
        self.stopping.set()
        self._accepter.join(5.0)
        self._listener.close()
        with self._cond:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(5.0)
        with self._cond:
            for sock in list(self._socks):
                sock.close()
            self._socks.clear()
