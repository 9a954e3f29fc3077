"""Policy checks for the server's two doors: the tunnel handshake and public requests.

The gate turns a Tornado request into the policy input document and a
``Decision`` into an exception: ``PolicyDenied`` (403) for a plain deny,
``PolicyFailure`` (500) when the engine failed, so a broken policy engine
never looks like bad credentials, and never lets anything through.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import TYPE_CHECKING

from tornado.httputil import HTTPServerRequest

from .. import errors, relay
from ..auth import CLIENT_PACKAGE, SERVER_PACKAGE, Authorizer, build_input
from ..auth.token import TOKEN_HEADER

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("backstream.auth")

#: The --token header, never part of a policy's input.
_TOKEN = TOKEN_HEADER.lower()


class Gate:
    """Asks the authorizer about each request; raises when it is not allowed."""

    def __init__(
        self,
        authorizer: Authorizer,
        trusted: tuple[relay.Network, ...] = (),
        metrics: Metrics | None = None,
        forwarded_header: str = "x-forwarded-for",
    ) -> None:
        self.authorizer = authorizer
        #: Proxies (``--trust-forwarded``) whose ``forwarded_header`` names the caller.
        self.trusted = trusted
        #: The one header ``input.remote`` is read from (``--forwarded-header``): a
        #: proxy that writes only the other one passes a caller's own copy on untouched.
        self.forwarded_header = forwarded_header
        #: Counts each decision by package and result (``--metrics-addr``).
        self.metrics = metrics

    async def check_client(self, request: HTTPServerRequest, target: str, name: str) -> None:
        """``name``: the tunnel name the client asks for (``""``: none)."""
        await self._check(CLIENT_PACKAGE, request, target, name=name)

    async def check_public(self, request: HTTPServerRequest, target: str, tunnel: str) -> None:
        """``target`` is the origin-form target the local app will receive, ``tunnel``
        the name of the tunnel it is routed to (``""``: the default one)."""
        await self._check(SERVER_PACKAGE, request, target, tunnel=tunnel)

    async def _check(
        self, package: str, request: HTTPServerRequest, target: str, **extra: str
    ) -> None:
        # The policy sees the target as forwarded, never Tornado's parse of an
        # absolute-form one ("http://x/admin" would be a path no rule matches).
        path, _, query = target.partition("?")
        peer = remote = request.remote_ip or ""
        if self.trusted:
            values = request.headers.get_list(self.forwarded_header)
            chain = relay.forwarded_chain(self.forwarded_header, values)
            remote = relay.client_address(peer, chain, self.trusted)
        document = build_input(
            request.method or "",
            path,
            urllib.parse.parse_qsl(query, keep_blank_values=True),
            # The token is checked by the server itself and goes nowhere else (not to OPA).
            [(n, v) for n, v in request.headers.get_all() if n.lower() != _TOKEN],
            remote,
            request.host,
            peer,
            **extra,
        )
        decision = await self.authorizer.decide(package, document)
        if self.metrics is not None:
            self.metrics.decided(package, decision)
        if decision.error is not None:
            log.error(
                "policy evaluation failed package=%s %s %s remote=%s: %s",
                package,
                request.method,
                path,
                remote,
                decision.error,
            )
            raise errors.PolicyFailure(f"{package}: {decision.error}")
        if not decision.allowed:
            log.info(
                "denied by policy package=%s %s %s remote=%s: %s",
                package,
                request.method,
                path,
                remote,
                decision.detail,
            )
            raise errors.PolicyDenied(f"{package}: {decision.detail or 'denied'}")

    async def reload(self, why: str) -> None:
        """Swap in the policies on disk; a broken set is logged and the old one kept."""
        try:
            await self.authorizer.reload()
        except errors.ConfigError as e:
            log.error("policy reload (%s) rejected, keeping the previous policies: %s", why, e)
            return
        log.info("policies reloaded (%s)", why)
        await self.warn_missing()

    async def reload_if_changed(self) -> None:
        if self.authorizer.changed():
            await self.reload("files changed")

    async def warn_missing(self) -> None:
        for package in await self.authorizer.missing_packages():
            guarded = "tunnel client" if package == CLIENT_PACKAGE else "public request"
            log.warning(
                "policy package %s is not loaded: every %s will be denied "
                "(a policy set needs both auth.client and auth.server)",
                package,
                guarded,
            )

    def watch(self, interval: float) -> asyncio.Task[None]:
        """Reload whenever the policy files change, checking every ``interval`` s."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.reload_if_changed()

        return asyncio.ensure_future(loop())
