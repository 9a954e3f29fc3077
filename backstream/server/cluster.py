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

_CLAIM = """
-- KEYS: owner, holders; ARGV: credential, instance, now (ms), grace (ms), ttl (ms)
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then
  local now, ttl, grace = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[4])
  local last = tonumber(redis.call('HGET', KEYS[1], 'released') or '0')
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local beat = tonumber(redis.call('ZSCORE', 'bs:instances', id) or '0')
    if beat + ttl > now then
      return 0  -- held by a live instance
    end
    if beat > last then last = beat end  -- died then: its reservation runs from there
  end
  if last + grace > now then
    return 0  -- reserved for its owner
  end
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('HDEL', KEYS[1], 'released')
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[2])
return 1
"""

_RELEASE = """
-- KEYS: owner, holders; ARGV: instance, now (ms), grace (ms)
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[1], 'released', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[3]), 1))
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
        self._claim: Any = self.redis.register_script(_CLAIM)
        self._release: Any = self.redis.register_script(_RELEASE)
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
            won = await self._claim_now(name, credential)
            if won:
                await self.redis.publish("bs:changed", name)
        except Exception as e:
            self.errors += 1
            raise Unavailable(f"claim of {name or '(default)'}: {_why(e)}") from None
        if won:
            self.local[name] = credential
        return won

    async def _claim_now(self, name: str, credential: bytes) -> bool:
        keys = [_key("owner", name), _key("holders", name)]
        now = int(time.time() * 1000)
        args = [credential.hex(), self.instance, now, int(self.grace * 1000), int(self.ttl * 1000)]
        return bool(await self._claim(keys=keys, args=args))

    async def release(self, name: str) -> None:
        """The last member of ``name`` here left: its reservation starts (best effort)."""
        self.local.pop(name, None)
        keys = [_key("owner", name), _key("holders", name)]
        now = int(time.time() * 1000)
        try:
            await self._release(keys=keys, args=[self.instance, now, int(self.grace * 1000)])
            await self.redis.publish("bs:changed", name)
        except Exception as e:
            self.errors += 1
            log.warning("cluster: release of %s not recorded: %s", name or "(default)", _why(e))

    async def holders(self, name: str) -> list[str]:
        """Advertised URLs of the other live instances holding ``name`` (cached)."""
        ids = self._holders.get(name)
        if ids is None:
            try:
                members = await self.redis.smembers(_key("holders", name))
            except Exception as e:
                self.errors += 1
                raise Unavailable(f"lookup of {name or '(default)'}: {_why(e)}") from None
            if len(self._holders) >= MAX_CACHED:
                self._holders.clear()
            ids = self._holders[name] = tuple(sorted(m.decode() for m in members))
        return [self.peers[i] for i in ids if i in self.peers]

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
                self._holders.clear()  # cannot be kept fresh meanwhile
            await asyncio.sleep(HEARTBEAT)

    async def _beat(self) -> None:
        now = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd("bs:instances", {self.instance: now})
            pipe.hset("bs:advertise", self.instance, self.advertise)
            pipe.zrangebyscore("bs:instances", now - int(self.ttl * 1000), "+inf")
            pipe.hgetall("bs:advertise")
            _, _, live, advertised = await pipe.execute()
        ids = {i.decode() for i in live} - {self.instance}
        urls = {k.decode(): v.decode() for k, v in advertised.items()}
        peers = {i: urls[i] for i in ids if i in urls}
        if peers.keys() != self.peers.keys():
            self._holders.clear()  # an instance came or went: read holders afresh
        self.peers = peers
        # Redis may have lost everything (a restart without persistence): claim again.
        for name, credential in list(self.local.items()):
            if not await self._claim_now(name, credential):
                log.warning("cluster: %s is owned elsewhere now", name or "(default)")

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
                self._holders.clear()  # what changed while not subscribed is unknown
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._holders.pop(message["data"].decode(), None)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._holders.clear()
                await asyncio.sleep(HEARTBEAT)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
