"""The tunnel registry's choices, on real ``Pool`` and ``Tunnel`` objects (no sockets:
the choice is a pure function of each member's state)."""

from __future__ import annotations

import pytest

from backstream import errors
from backstream.server.stream import MAX_UNSENT
from backstream.server.tunnel import Pool, Tunnel, Tunnels


def member(streams: int = 0) -> Tunnel:
    tunnel = Tunnel(None, "127.0.0.1")  # type: ignore[arg-type]
    tunnel.streams = dict.fromkeys(range(1, streams + 1))  # type: ignore[arg-type]
    return tunnel


def test_the_member_with_fewest_streams_in_flight_wins_ties_in_turn() -> None:
    pool = Pool("x", b"")
    busy, idle_a, idle_b = member(3), member(0), member(0)
    pool.members = [busy, idle_a, idle_b]
    picks = [pool.pick() for _ in range(6)]
    assert busy not in picks
    # tied members take strict turns, whatever their places beside the busy one
    assert [picks.count(idle_a), picks.count(idle_b)] == [3, 3]
    assert picks[0] is not picks[1] and picks[1] is not picks[2]
    for counts in ([4, 3, 3], [0, 0, 1], [1, 0, 0, 0]):
        pool.members = members = [member(n) for n in counts]
        tied = [m for m in members if len(m.streams) == min(counts)]
        picks = [pool.pick() for _ in range(6 * len(tied))]
        assert [picks.count(m) for m in tied] == [6] * len(tied), counts


def test_closed_or_congested_members_get_nothing_new() -> None:
    pool = Pool("x", b"")
    closed, congested, healthy = member(), member(), member(5)
    closed.open = False
    congested.unsent = MAX_UNSENT + 1
    pool.members = [closed, congested, healthy]
    assert all(pool.pick() is healthy for _ in range(5))
    pool.members = [congested]
    assert pool.pick() is None


def test_a_congested_tunnel_says_so_and_a_closing_one_is_no_client() -> None:
    tunnels = Tunnels(grace=0)
    only = member()
    only.unsent = MAX_UNSENT + 1
    tunnels.add(only)
    with pytest.raises(errors.NoClient) as caught:
        tunnels.pick("", no_client_code=599)
    assert caught.value.status == 503 and "keeping up" in caught.value.reason
    only.unsent, only.open = 0, False
    with pytest.raises(errors.NoClient) as caught:
        tunnels.pick("", no_client_code=599)
    assert caught.value.status == 599
    with pytest.raises(errors.UnknownTunnel, match="no tunnel named nope"):
        tunnels.pick("nope")
