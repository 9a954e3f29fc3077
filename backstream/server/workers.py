"""``--workers N``: N server processes on one public port, one per core.

Each worker is a whole instance of its own (its own tunnels, its own peer
port, its own entry in the cluster), so a public request may reach any worker
and is relayed over a peer link when another one holds its tunnel. The
kernel spreads connections across the workers' ``SO_REUSEPORT`` sockets. The
parent only forks, forwards SIGINT/SIGTERM and restarts a worker that died
for another reason, at most once a second.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable

from ..config import ServerConfig

log = logging.getLogger("backstream.server")

#: Workers dying this many times within 30 s stop the whole server.
MAX_QUICK_DEATHS = 5


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound (not listening) to ``port``, 0 picking one, so that all workers share it.

    Bound without ``listen()``, it is in no ``SO_REUSEPORT`` group and gets no connections.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock, sock.getsockname()[1]


def _die_with_parent() -> None:
    """A worker whose supervisor was killed (SIGKILL) ends too, and frees the port."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def supervise(config: ServerConfig, run: Callable[[ServerConfig], None]) -> int:
    """Fork ``config.workers`` processes that each ``run`` the server; the exit code.

    A worker that ends with code 2 (a configuration error) stops them all.
    """
    reserved, port = reserve_port(config.host, config.port)
    config = dataclasses.replace(config, port=port)
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False
    exit_code = 0
    deaths: collections.deque[float] = collections.deque(maxlen=MAX_QUICK_DEATHS)

    def start(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            _die_with_parent()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the server handles it
            reserved.close()
            code = 0
            try:
                run(dataclasses.replace(config, workers=1, worker=index))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # a crash is a crash: said, and not exit code 0
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def reload(signum: int, frame: object) -> None:
        for pid in children:  # each worker reloads its policies and certificate
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, reload)
    for index in range(config.workers):
        start(index)
    log.info("workers started count=%d port=%d", config.workers, port)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children or stopping:
            children.pop(pid, None)
            continue
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        deaths.append(time.monotonic())
        if code == 2 or len(deaths) >= MAX_QUICK_DEATHS and deaths[-1] - deaths[0] < 30:
            # a configuration error, or one that will not go away: stop them all
            log.error("worker %d exited (code %d); stopping", index, code)
            exit_code = code or 1
            stop(signal.SIGTERM, None)
            continue
        log.error("worker %d exited (code %d); starting it again", index, code)
        time.sleep(1.0)
        if not stopping:
            start(index)
    reserved.close()
    return exit_code
