"""Processes for the cluster tests: a real Redis, instances sharing it, a TCP balancer.

``RedisServer`` is Debian's ``redis-server`` on a free loopback port, without
persistence (``scripts/test`` installs it). ``instance(...)`` starts one
``backstream serve`` of the cluster with a short heartbeat, so that a killed
instance drops out in about 1.5 s. ``Balancer`` stands in for the load
balancer in front of the instances: each connection goes to the first backend
that accepts it, in turn, so a client whose instance died reconnects to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import threading
from collections.abc import Sequence

from harness import TIMEOUTS, Proc, ProcessPool, Server

SECRET = "cluster-secret-for-tests"
#: Heartbeat of the test instances (seconds); an instance is gone after 3 missed ones.
HEARTBEAT = "0.5"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer(Proc):
    """``redis-server`` on 127.0.0.1:PORT, in memory only."""

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        argv = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]
        super().__init__("redis", argv)
        self.wait_for(r"Ready to accept connections", TIMEOUTS.startup)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def redis(procs: ProcessPool, port: int = 0) -> RedisServer:
    return procs.add(RedisServer(port))  # type: ignore[return-value]


def instance(
    procs: ProcessPool, redis_server: RedisServer, *args: str, port: int = 0, wait: bool = True
) -> Server:
    """One instance of the cluster on 127.0.0.1 (advertised there)."""
    return procs.server(
        "--redis",
        redis_server.url,
        "--cluster-secret",
        SECRET,
        *args,
        port=port,
        env={"BACKSTREAM_CLUSTER_HEARTBEAT": HEARTBEAT},
        wait=wait,
    )


class Balancer:
    """A TCP balancer on loopback: each connection to the first backend that accepts, in turn."""

    def __init__(self, backends: Sequence[int]) -> None:
        self.backends = list(backends)
        self._turn = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(TIMEOUTS.startup)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(len(self.backends)):
            self._turn += 1
            port = self.backends[self._turn % len(self.backends)]
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
            return
        writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(256 * 1024):
                writer.write(chunk)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUTS.exit)
