"""The cluster's shared state in Redis: which instances live, who owns each name, who holds it.

Keys (``bs:`` prefix)::

    bs:instances        sorted set: instance id -> last heartbeat (ms)
    bs:advertise        hash: instance id -> URL other instances reach it at
    bs:owner:NAME       hash: owner (credential digest, hex), released (ms, when its
                        last holder let it go)
    bs:holders:NAME     set: ids of the instances with a member of NAME
    bs:changed          pub/sub channel: a NAME whose holders changed

A name is claimed by one Lua script, so two instances racing for it with
different credentials can never both win: the owner stays the owner while
any holder lives and for ``grace`` after the last one left or died.

Nothing here is on the hot path once warm: each instance caches the holders
of the names it was asked for and the set of live instances, and drops a
cached name when ``bs:changed`` says so; the live set is re-read with each
heartbeat, so a killed instance drops out within its TTL. Every Redis call
has a short timeout: with Redis down, local tunnels keep serving, and what
needs Redis fails fast with 503 ``cluster state unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .. import errors

log = logging.getLogger("backstream.server")

#: Seconds between heartbeats; an instance is gone after ``TTL_BEATS`` missed ones.
HEARTBEAT = float(os.environ.get("BACKSTREAM_CLUSTER_HEARTBEAT", "2"))
TTL_BEATS = 3
#: Seconds any one Redis call may take before the cluster counts as unavailable.
REDIS_TIMEOUT = 1.0
#: Names whose holders are cached at most (requests for made-up names must not grow it).
MAX_CACHED = 10_000

# Both scripts first forget holders that stopped beating: the reservation of a
# name whose last holder died runs from its last heartbeat ("released").
_PRUNE = """
local now, ttl = tonumber(ARGV[3]), tonumber(ARGV[5])
local released = tonumber(redis.call('HGET', KEYS[1], 'released') or '0')
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local beat = tonumber(redis.call('ZSCORE', 'bs:instances', id) or '0')
  if beat + ttl <= now then
    redis.call('SREM', KEYS[2], id)
    if beat > released then released = beat end
  end
end
local live = redis.call('SCARD', KEYS[2])
"""

_CLAIM = (
    """
-- KEYS: owner, holders; ARGV: credential, instance, now (ms), grace (ms), ttl (ms)
-- 0: owned by another; 1: held already; 2: this instance became a holder
"""
    + _PRUNE
    + """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] and (live > 0 or released + tonumber(ARGV[4]) > now) then
  return 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('HDEL', KEYS[1], 'released')
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
return 1 + redis.call('SADD', KEYS[2], ARGV[2])
"""
)

_RELEASE = (
    """
-- KEYS: owner, holders; ARGV: instance, unused, now (ms), grace (ms), ttl (ms)
redis.call('SREM', KEYS[2], ARGV[1])
"""
    + _PRUNE
    + """
if live == 0 then
  redis.call('HSET', KEYS[1], 'released', math.max(released, tonumber(ARGV[3])))
  redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[4]), 1))
end
return 1
"""
)


_ABANDON = """
-- KEYS: owner, holders; ARGV: instance, credential
-- A claim whose client never connected: no reservation is left behind for it.
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[2]) == 0 and redis.call('HGET', KEYS[1], 'owner') == ARGV[2]
    and not redis.call('HGET', KEYS[1], 'released') then
  redis.call('DEL', KEYS[1])
end
return 1
"""


def _key(kind: str, name: str) -> str:
    return f"bs:{kind}:{name}"


class Unavailable(errors.NoClient):
    """Redis did not answer in time: what needs the cluster state gets 503."""

    def __init__(self, what: str) -> None:
        super().__init__(f"cluster state unavailable: {what}", reason="cluster state unavailable")


class Cluster:
    """This instance's view of the cluster, kept in Redis."""

    def __init__(self, url: str, instance: str, advertise: str, grace: float) -> None:
        import redis.asyncio as aioredis  # only with --redis

        self.redis: Any = aioredis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            health_check_interval=0,
        )
        self.instance = instance
        self.advertise = advertise
        self.grace = grace
        self.ttl = HEARTBEAT * TTL_BEATS
        #: Live instances (id -> advertised URL), this one excluded; refreshed each heartbeat.
        self.peers: dict[str, str] = {}
        #: name -> ids of the instances holding it, as last read (pub/sub drops stale ones).
        self._holders: dict[str, tuple[str, ...]] = {}
        #: Names with a member here, re-claimed at each heartbeat (Redis may have restarted).
        self.local: dict[str, bytes] = {}
        self.available = True
        #: Redis calls that failed or timed out (a metric).
        self.errors = 0
        #: Names let go here that Redis may still list this instance for.
        self._releasing: set[str] = set()
        #: Bumped by every cache invalidation: a lookup racing one is not cached.
        self._generation = 0
        #: Called with a name another owner took while Redis was away (closes its clients).
        self.lost: Callable[[str], None] = lambda name: None
        self._claim: Any = self.redis.register_script(_CLAIM)
        self._release: Any = self.redis.register_script(_RELEASE)
        self._abandon: Any = self.redis.register_script(_ABANDON)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._beat_forever()),
            asyncio.ensure_future(self._listen_forever()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._leave(), REDIS_TIMEOUT)
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    # -- names ------------------------------------------------------------------

    async def claim(self, name: str, credential: bytes) -> bool:
        """Make this instance a holder of ``name`` for ``credential``; False: owned by another.

        Raises ``Unavailable`` when Redis does not answer.
        """
        try:
            result = await self._claim_now(name, credential)
        except Exception as e:
            self.errors += 1
            raise Unavailable(f"claim of {name or '(default)'}: {_why(e)}") from None
        if not result:
            return False
        self.local[name] = credential
        self._releasing.discard(name)
        if result == 2:  # a new holder: the others' cached holders are stale
            await self._publish(name)
        return True

    async def _claim_now(self, name: str, credential: bytes) -> int:
        return int(await self._claim(*self._claim_of(name, credential)))

    def _claim_of(self, name: str, credential: bytes) -> tuple[list[str], list[Any]]:
        keys = [_key("owner", name), _key("holders", name)]
        return keys, [credential.hex(), self.instance, *self._times()]

    def _times(self) -> list[int]:
        """now, grace and ttl in ms, as the scripts take them (ARGV 3 to 5)."""
        return [int(time.time() * 1000), int(self.grace * 1000), int(self.ttl * 1000)]

    async def release(self, name: str) -> None:
        """The last member of ``name`` here left: its reservation starts.

        Retried at each heartbeat until Redis took it, so that no instance stays
        listed as a holder of a name it has no client for.
        """
        self.local.pop(name, None)
        self._releasing.add(name)
        try:
            await self._release_now(name)
        except Exception as e:
            self.errors += 1
            log.warning("cluster: release of %s not recorded yet: %s", name or "(default)", _why(e))

    async def abandon(self, name: str, credential: bytes) -> None:
        """A claim whose handshake then failed: let the name go without a reservation."""
        if self.local.get(name) == credential:
            del self.local[name]
        keys = [_key("owner", name), _key("holders", name)]
        try:
            await self._abandon(keys=keys, args=[self.instance, credential.hex()])
        except Exception as e:  # the heartbeat no longer claims it; Redis keeps it a while
            self.errors += 1
            self._releasing.add(name)
            log.warning("cluster: claim of %s not withdrawn: %s", name or "(default)", _why(e))
            return
        await self._publish(name)

    async def _release_now(self, name: str) -> None:
        keys = [_key("owner", name), _key("holders", name)]
        await self._release(keys=keys, args=[self.instance, "", *self._times()])
        if name not in self.local:  # not claimed again meanwhile
            self._releasing.discard(name)
        await self._publish(name)

    async def _publish(self, name: str) -> None:
        try:
            await self.redis.publish("bs:changed", name)
        except Exception as e:  # the others' caches follow at the next change or beat
            self.errors += 1
            log.debug("cluster: change of %s not published: %s", name or "(default)", _why(e))

    async def holders(self, name: str) -> list[str]:
        """Advertised URLs of the other live instances holding ``name`` (cached)."""
        ids = self._holders.get(name)
        if ids is None:
            generation = self._generation
            try:
                members = await self.redis.smembers(_key("holders", name))
            except Exception as e:
                self.errors += 1
                raise Unavailable(f"lookup of {name or '(default)'}: {_why(e)}") from None
            ids = tuple(sorted(m.decode() for m in members))
            if generation == self._generation:  # no change announced while reading
                if len(self._holders) >= MAX_CACHED:
                    self._holders.clear()
                self._holders[name] = ids
            await self._learn_peers([i for i in ids if i not in self.peers])
        return [self.peers[i] for i in ids if i in self.peers]

    async def _learn_peers(self, ids: list[str]) -> None:
        """Holders this instance has not seen beat yet (they just started): are they live?"""
        ids = [i for i in ids if i != self.instance]
        if not ids:
            return
        now = int(time.time() * 1000)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.zscore("bs:instances", i)
                    pipe.hget("bs:advertise", i)
                answers = await pipe.execute()
        except Exception as e:
            self.errors += 1
            raise Unavailable(f"lookup of instances: {_why(e)}") from None
        for i, beat, url in zip(ids, answers[::2], answers[1::2], strict=True):
            if beat is not None and url is not None and beat + self.ttl * 1000 > now:
                self.peers[i] = url.decode()

    def _forget(self, name: str | None = None) -> None:
        """Drop one cached name (or all): a change was announced, or may have been missed."""
        self._generation += 1
        if name is None:
            self._holders.clear()
        else:
            self._holders.pop(name, None)

    # -- membership -------------------------------------------------------------

    async def _beat_forever(self) -> None:
        while True:
            try:
                await self._beat()
                if not self.available:
                    log.info("cluster: redis is back; %d name(s) registered again", len(self.local))
                self.available = True
            except Exception as e:
                self.errors += 1
                if self.available:
                    log.error("cluster: redis unavailable: %s", _why(e))
                self.available = False
                self._forget()  # cannot be kept fresh meanwhile
            await asyncio.sleep(HEARTBEAT)

    async def _beat(self) -> None:
        now = int(time.time() * 1000)
        stale = now - 10 * int(self.ttl * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd("bs:instances", {self.instance: now})
            pipe.hset("bs:advertise", self.instance, self.advertise)
            pipe.zrangebyscore("bs:instances", now - int(self.ttl * 1000), "+inf")
            pipe.hgetall("bs:advertise")
            pipe.zrangebyscore("bs:instances", 0, stale)
            _, _, live, advertised, gone = await pipe.execute()
        if gone:  # long dead: their entries go, so that these keys do not grow for ever
            await self.redis.hdel("bs:advertise", *gone)
            await self.redis.zrem("bs:instances", *gone)
        ids = {i.decode() for i in live} - {self.instance}
        urls = {k.decode(): v.decode() for k, v in advertised.items()}
        peers = {i: urls[i] for i in ids if i in urls}
        if peers.keys() != self.peers.keys():
            self._forget()  # an instance came or went: read holders afresh
        self.peers = peers
        # Redis may have lost everything (a restart without persistence): claim
        # again, in one round trip. A name claimed by another owner meanwhile is
        # not shared: its local clients are closed.
        names = list(self.local.items())
        if names:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, credential in names:
                    await self._claim(*self._claim_of(name, credential), client=pipe)
                results = await pipe.execute()
            for (name, credential), result in zip(names, results, strict=True):
                if self.local.get(name) != credential:
                    self._releasing.add(name)  # released while the beat ran
                elif not result:
                    log.warning("cluster: %s is owned elsewhere now", name or "(default)")
                    del self.local[name]
                    self.lost(name)
                elif int(result) == 2:
                    await self._publish(name)
        for name in list(self._releasing):
            if name not in self.local:
                await self._release_now(name)

    async def _leave(self) -> None:
        for name in list(self.local):
            await self.release(name)
        await self.redis.zrem("bs:instances", self.instance)
        await self.redis.hdel("bs:advertise", self.instance)

    async def _listen_forever(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe("bs:changed")
                self._forget()  # what changed while not subscribed is unknown
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._forget(message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception:
                self._forget()
                await asyncio.sleep(HEARTBEAT)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
