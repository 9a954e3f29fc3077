"""Cost of an embedded-Rego decision, and whether it keeps the IOLoop responsive.

Not a test: ``python tests/auth_bench.py [N]`` prints microseconds per decision
and decisions per second for the raw engine, the authorizer (thread pool,
cache off and on), and the IOLoop lag seen by a 1 ms heartbeat while 64
decisions are in flight, compared with evaluating inline on the loop.
Inputs are ``webhooks-only`` + ``bearer-token`` over a browser-like request.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable

from backstream.auth import SERVER_PACKAGE, build_input
from backstream.auth.rego import RegoAuthorizer
from backstream.auth.regoengine import Program

POLICIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "policies")
PATHS = [os.path.join(POLICIES, "webhooks-only"), os.path.join(POLICIES, "bearer-token")]


def sample(i: int) -> dict[str, object]:
    headers = [
        ("Host", "demo.example"),
        ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
        ("Accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
        ("Accept-Language", "en-GB,en;q=0.5"),
        ("Accept-Encoding", "gzip, deflate, br"),
        ("Content-Type", "application/json"),
        ("X-Request-Id", f"req-{i}"),
    ]
    return build_input("POST", "/webhooks/stripe", [("v", "1")], headers, "203.0.113.9", "demo")


async def heartbeat_lag(run: Callable[[], Awaitable[None]]) -> tuple[float, str]:
    """(seconds taken by ``run``, p50/p99 lag of a 1 ms heartbeat meanwhile)."""
    lags: list[float] = []
    done = False

    async def beat() -> None:
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    task = asyncio.ensure_future(beat())
    start = time.perf_counter()
    await run()
    elapsed = time.perf_counter() - start
    done = True
    await task
    lags.sort()
    p50, p99 = lags[len(lags) // 2], lags[int(len(lags) * 0.99)]
    return elapsed, f"loop lag p50 {p50 * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms"


async def main(n: int) -> None:
    authorizer = RegoAuthorizer(PATHS)
    files = authorizer.policy_set.files
    program = Program(files, ["auth.server"])
    inputs = [json.dumps(sample(i), sort_keys=True) for i in range(n)]
    start = time.perf_counter()
    for text in inputs:
        program.evaluate(SERVER_PACKAGE, text)
    raw = (time.perf_counter() - start) / n
    print(f"engine, one thread, inline:        {raw * 1e6:8.0f} us/decision")

    async def inline() -> None:
        for text in inputs:
            program.evaluate(SERVER_PACKAGE, text)
            await asyncio.sleep(0)  # one evaluation per loop turn, as in prepare()

    elapsed, lag = await heartbeat_lag(inline)
    print(f"inline on the loop:                {n / elapsed:8.0f} decisions/s, {lag}")

    for workers in (1, 2, 4):
        auth = RegoAuthorizer(PATHS, workers=workers, cache_size=0)
        await auth.decide(SERVER_PACKAGE, sample(-1))  # compile the first thread's program
        start = time.perf_counter()
        for i in range(n // 4):
            await auth.decide(SERVER_PACKAGE, sample(i))
        sequential = (time.perf_counter() - start) / (n // 4)

        async def concurrent(auth: RegoAuthorizer = auth) -> None:
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> None:
                async with sem:
                    await auth.decide(SERVER_PACKAGE, sample(i))

            await asyncio.gather(*(one(i) for i in range(n)))

        elapsed, lag = await heartbeat_lag(concurrent)
        print(
            f"pool {workers} worker(s), no cache:     {sequential * 1e6:8.0f} us/decision "
            f"sequential; {n / elapsed:6.0f} decisions/s at 64 in flight, {lag}"
        )
        await auth.close()

    same = sample(0)
    await authorizer.decide(SERVER_PACKAGE, same)
    start = time.perf_counter()
    for _ in range(n):
        await authorizer.decide(SERVER_PACKAGE, same)
    hit = (time.perf_counter() - start) / n
    print(f"cache hit (same input):            {hit * 1e6:8.0f} us/decision")
    await authorizer.close()


if __name__ == "__main__":
    print(f"cpus: {os.cpu_count()}")
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 4000))
