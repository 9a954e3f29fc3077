"""Fixtures for the end-to-end tests (see ``tests/harness.py`` for the API).

Function scope (a fresh set of processes per test, all killed in teardown):

``procs``       a ``ProcessPool``: ``procs.server(...)``, ``procs.client(...)``,
                ``procs.local_app()`` for custom flags; every process is killed after
                the test.
``local_app``   a running ``LocalApp``.
``server``      a running ``Server`` with default flags.
``client``      a ``Client`` connected to ``server`` with destination ``local_app``.

Module scope (shared by read-only tests of one module, for speed):

``tunnel``      a ``Tunnel(server, client, app)`` with default flags.

``raw_origin`` (function scope) is a ``RawOrigin`` that records the exact bytes it receives.

On failure, the output of every process of the test is appended to the report.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Client, LocalApp, ProcessPool, Server  # noqa: E402
from raw_origin import RawOrigin  # noqa: E402


@dataclass
class Tunnel:
    server: Server
    client: Client
    app: LocalApp


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.failed:
        pools = [v for v in getattr(item, "funcargs", {}).values() if isinstance(v, ProcessPool)]
        for pool in pools:
            rep.sections.append(("backstream processes", pool.dump()))


@pytest.fixture
def procs() -> Iterator[ProcessPool]:
    pool = ProcessPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def module_procs() -> Iterator[ProcessPool]:
    pool = ProcessPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def local_app(procs: ProcessPool) -> LocalApp:
    return procs.local_app()


@pytest.fixture
def server(procs: ProcessPool) -> Server:
    return procs.server()


@pytest.fixture
def client(procs: ProcessPool, server: Server, local_app: LocalApp) -> Client:
    return procs.client(server, local_app)


@pytest.fixture(scope="module")
def tunnel(module_procs: ProcessPool) -> Tunnel:
    app = module_procs.local_app()
    srv = module_procs.server()
    cli = module_procs.client(srv, app)
    return Tunnel(srv, cli, app)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound but never listening, held for the test."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.fixture
def raw_origin() -> Iterator[RawOrigin]:
    """A fresh raw origin for one test (closed, threads joined, at teardown)."""
    origin = RawOrigin()
    try:
        yield origin
    finally:
        origin.close()


@dataclass
class OriginTunnel:
    """A server and client relaying to one raw origin (module fixtures of the attack tests)."""

    server: Server
    client: Client
    origin: RawOrigin
