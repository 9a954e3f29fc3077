"""Remote OPA: decisions from an OPA server's Data API, through opa-python-client.

``POST <url>/v1/data/auth/client`` with ``{"input": ...}`` answers
``{"result": {"allow": true}}``, or ``{}`` when the package is not loaded
(which denies). OPA has the full builtin library (``net.cidr_contains``,
``http.send``, ``io.jwt.*``) that the embedded engine lacks, and policies are
managed by OPA itself (``opa run --server DIR`` or bundles), so ``reload()`` has
nothing to do here.

opa-python-client's ``AsyncOpaClient`` is used as is, with one aiohttp session
for the life of the server (opened lazily on the IOLoop, since aiohttp binds
it to the running loop). Its built-in retries sleep between attempts (0.3 s,
0.6 s) on connection errors and 5xx answers; they are turned off so that an
unreachable OPA fails the request closed (500) within ``timeout`` instead of
holding it. It builds URLs as ``scheme://host:port/<version>``: a URL path
prefix (OPA behind a gateway at ``/opa``) is passed as part of ``version``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from opa_client import AsyncOpaClient
from opa_client.errors import PolicyNotFoundError

from backstream.auth import PACKAGES, Authorizer, Decision, decision_from_document
from backstream.errors import ConfigError

log = logging.getLogger(__name__)

URL_ENV = "BACKSTREAM_OPA_URL"
TOKEN_ENV = "BACKSTREAM_OPA_TOKEN"
#: Seconds one decision may take (connect + answer) before it fails closed.
DEFAULT_TIMEOUT = 1.0


def client_options(url: str) -> dict[str, Any]:
    """``AsyncOpaClient`` keyword arguments for an OPA base URL; ``ConfigError`` if bad."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"--opa-url must be an http(s) URL like http://127.0.0.1:8181, not {url!r}"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("--opa-url takes no credentials, query or fragment (use --opa-token)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"--opa-url has an invalid port: {url!r}") from None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    prefix = parts.path.strip("/")
    return {
        "host": host,
        "port": port,
        "ssl": parts.scheme == "https",
        "version": f"{prefix}/v1" if prefix else "v1",
    }


class OpaAuthorizer(Authorizer):
    """Asks a remote OPA server, one reused session, fails closed on any error."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        url = url or os.environ.get(URL_ENV)
        if not url:
            raise ConfigError(f"the opa auth backend needs --opa-url or {URL_ENV}")
        token = token or os.environ.get(TOKEN_ENV) or None
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._client = AsyncOpaClient(
            **client_options(self.url), token=token, retries=0, timeout=timeout
        )
        log.info("auth backend opa url=%s token=%s", self.url, "set" if token else "none")

    @classmethod
    def from_options(
        cls,
        policy_paths: Sequence[str],
        opa_url: str | None,
        opa_token: str | None,
    ) -> OpaAuthorizer:
        if policy_paths:
            # Ignoring them would let an operator believe they are enforced.
            raise ConfigError(
                "--policy cannot be combined with --auth opa: load the policies into OPA "
                "(opa run --server DIR)"
            )
        return cls(opa_url, opa_token)

    async def _session(self) -> AsyncOpaClient:
        if self._client._session is None:
            await self._client.__aenter__()  # no await inside: no race on the loop
        return self._client

    async def decide(self, package: str, input: Mapping[str, Any]) -> Decision:
        try:
            client = await self._session()
            answer = await asyncio.wait_for(
                client.query_rule(input_data=dict(input), package_path=package),
                self.timeout + 0.5,
            )
        except TimeoutError:
            return Decision(False, error=f"OPA did not answer within {self.timeout:g}s")
        except Exception as exc:  # noqa: BLE001 - fail closed, never raise
            return Decision(False, error=f"OPA query failed: {type(exc).__name__}: {exc}")
        if not isinstance(answer, dict):
            return Decision(False, error="OPA answered something other than a JSON object")
        return decision_from_document(package, answer.get("result"), defined="result" in answer)

    async def missing_packages(self) -> list[str]:
        """Packages OPA does not define (``GET /v1/data/auth/client`` has no result)."""
        missing = []
        for package in PACKAGES:
            try:
                client = await self._session()
                path = package.replace(".", "/")
                await asyncio.wait_for(client.get_data(path), self.timeout + 0.5)
            except PolicyNotFoundError as exc:
                # get_data raises it for {} (undefined) with its own class name as
                # the code, and for OPA error bodies with OPA's code (unauthorized...).
                if exc.expression != "PolicyNotFoundError":
                    log.warning("OPA at %s refused the package check: %s", self.url, exc.message)
                    return []
                missing.append(package)
            except Exception as exc:  # noqa: BLE001 - a start-up check, not a decision
                log.warning("cannot reach OPA at %s to check packages: %r", self.url, exc)
                return []
        return missing

    async def close(self) -> None:
        await self._client.close_connection()
