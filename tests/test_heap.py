"""``heap.keep_freed_buffers``: buffer churn stops faulting pages in.

Each run is a fresh interpreter, since glibc's settings are per process. The
loop is the pattern of Tornado's frame writer on the client before
``websocket_writer``: mask a 256 KiB chunk, prepend the mask, drop both.
Page faults are counted by the kernel, not timed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backstream import heap

CHURN = """
import json, os, resource, sys
from backstream import heap
tuned = heap.keep_freed_buffers() if sys.argv[1] == "tuned" else None
from tornado.util import _websocket_mask
data, mask = os.urandom(256 * 1024), os.urandom(4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(300):
    mask + _websocket_mask(mask, data)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _churn(mode: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=60, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(not heap._is_glibc(), reason="mallopt is glibc's")
def test_freed_buffers_are_reused_instead_of_faulted_in_again() -> None:
    default, tuned = _churn("default"), _churn("tuned")
    assert tuned["tuned"] is True
    # 300 rounds of two 256 KiB buffers: with glibc's defaults the heap top is
    # trimmed and grown again each round (~100 faults a round); reused heap
    # memory faults in nothing once warm.
    assert isinstance(default["faults"], int) and isinstance(tuned["faults"], int)
    assert default["faults"] > 5_000, default
    assert tuned["faults"] < default["faults"] / 10, (default, tuned)
