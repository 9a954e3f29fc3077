"""Every example in ``policies/`` works as its README line says, on both backends."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time

from auth_cases import POLICIES, OpaBackend, RegoBackend, request
from tornado.testing import gen_test

from backstream.auth import CLIENT_PACKAGE, SERVER_PACKAGE, Decision
from backstream.auth.rego import RegoAuthorizer
from backstream.errors import ConfigError

JWT_SECRET = "change-me-to-a-long-random-secret"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: dict[str, object], secret: str = JWT_SECRET, alg: str = "HS256") -> str:
    head = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def basic(credentials: str) -> tuple[str, str]:
    return ("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())


class PolicyCases:
    async def load(self, *names: str) -> None:
        await self.start([os.path.join(POLICIES, name) for name in names])

    async def check(self, package: str, allowed: list[dict], denied: list[dict]) -> None:
        for input in allowed:
            self.assertEqual(await self.decide(package, input), Decision(True, detail="allowed"))
        for input in denied:
            decision = await self.decide(package, input)
            self.assertEqual((decision.allowed, decision.error), (False, None), input)

    @gen_test
    async def test_bearer_token(self) -> None:
        await self.load("bearer-token")
        token = "change-me-to-a-long-random-string"
        await self.check(
            CLIENT_PACKAGE,
            [request(headers=[("Authorization", f"Bearer {token}")])],
            [
                request(),
                request(headers=[("Authorization", f"Bearer {token}x")]),
                request(headers=[("Authorization", token)]),
            ],
        )

    @gen_test
    async def test_basic_auth(self) -> None:
        await self.load("basic-auth")
        await self.check(
            SERVER_PACKAGE,
            [request(headers=[basic("alice:wonderland")])],
            [
                request(),
                request(headers=[basic("alice:wrong")]),
                request(headers=[basic("bob:wonderland")]),
                request(headers=[basic("alice")]),
                request(headers=[("Authorization", "Basic !!!")]),
                request(headers=[("Authorization", "Basic YQ")]),
                request(headers=[("Authorization", "Basic w7w=")]),
                request(headers=[("Authorization", "Bearer x")]),
            ],
        )

    @gen_test
    async def test_ip_allowlist(self) -> None:
        await self.load("ip-allowlist")
        allowed = ["127.0.0.1", "10.255.1.1", "192.168.3.4", "::1"]
        denied = ["11.0.0.1", "192.169.0.1", "::2", "300.1.1.1", "1.2.3", "10.0.0.1x", ""]
        await self.check(
            SERVER_PACKAGE,
            [request(remote=ip) for ip in allowed],
            [request(remote=ip) for ip in denied],
        )

    @gen_test
    async def test_jwt_hs256(self) -> None:
        await self.load("jwt-hs256")
        now = int(time.time())

        def bearer(token: str) -> dict:
            return request(headers=[("Authorization", f"Bearer {token}")])

        await self.check(
            SERVER_PACKAGE,
            [bearer(jwt({"sub": "a", "exp": now + 60})), bearer(jwt({"sub": "a"}))],
            [
                request(),
                bearer(jwt({"sub": "a", "exp": now - 60})),
                bearer(jwt({"sub": "a", "nbf": now + 60})),
                bearer(jwt({"sub": "a"}, secret="wrong")),
                bearer(b64url(b'{"alg":"none"}') + "." + b64url(b'{"sub":"a"}') + "."),
                bearer("a.b.c"),
                bearer("eyJhbGciOiJIUzI1NiJ9.e30.a"),
                bearer("garbage"),
            ],
        )

    @gen_test
    async def test_webhooks_only(self) -> None:
        await self.load("webhooks-only")
        await self.check(
            SERVER_PACKAGE,
            [request("/webhooks/stripe", method="POST"), request("/webhooks/a/b")],
            [
                request("/"),
                request("/webhooks"),
                request("/webhooks/x", method="DELETE"),
                request("/webhooks/../admin"),
                request("/webhooks/%2e%2e/admin"),
                request("/webhooks/..%2Fadmin"),
                request("/webhooks//admin"),
                request("/webhooks/..\\admin"),
                request("/%77ebhooks/..%2F..%2Fadmin"),
                request("/webhooks/%2E%2E/%2e%2e/admin"),
                # ";params" (Tomcat reads "/webhooks/.;/../admin" as "/admin")
                request("/webhooks/..;/admin"),
                request("/webhooks/%2e%2e;/admin"),
                request("/webhooks/.;/../admin"),
                # an app that resolves nothing routes these outside /webhooks/
                request("/x/../webhooks/a"),
                request("/;/webhooks/a"),
                request("/webhooks/a/./b"),
            ],
        )

    @gen_test
    async def test_tunnel_names_per_token(self) -> None:
        await self.load("tunnel-names")

        def claim(token: str, name: str) -> dict:
            document = request(headers=[("Authorization", f"Bearer {token}")])
            return {**document, "name": name}

        alice, bob, ci = "change-me-alice-token", "change-me-bob-token", "change-me-ci-token"
        await self.check(
            CLIENT_PACKAGE,
            [
                claim(alice, "alice"),
                claim(alice, "alice-staging"),
                claim(bob, "bob"),
                claim(ci, ""),
                claim(ci, "h5isdmnqwq"),  # its random name again, after a reconnect
            ],
            [
                claim(alice, "bob"),
                claim(alice, ""),
                claim(bob, "alice"),
                claim(ci, "alice"),
                claim("unknown", "alice"),
                {**request(), "name": "alice"},
                request(headers=[("Authorization", f"Bearer {alice}")]),  # no name field
            ],
        )

    @gen_test
    async def test_deny_paths_sees_every_spelling(self) -> None:
        """A deny-list on path_normalized catches what a raw-path rule would miss."""
        await self.load("deny-paths")
        await self.check(
            SERVER_PACKAGE,
            [
                request("/"),
                request("/anything"),
                request("/administrator-guide"),
                request("/static/admin.css"),
                request("/x/..y"),
                request("/x/.../y"),
                request("/.well-known/x"),
            ],
            [
                request(path)
                for path in (
                    "/admin",
                    "/admin/users",
                    "//admin",
                    "/%61dmin",
                    "/x/../admin",
                    "/x/%2e%2e/admin/",
                    "/./admin",
                    "/ADMIN",
                    "/Internal/metrics",
                    "/admin;jsessionid=1",
                    "/x/..%2Fadmin",
                    "/x/..%5cadmin",
                    "/x\\..\\admin",
                    "/x/..;/admin",
                    # an app that does not resolve dot segments routes these as /admin/...
                    "/admin/../anything",
                    "/admin/%2e%2e/anything",
                    "/ADMIN/%2E/x",
                    "/admin//../x",
                    # ";params", which Tomcat and Spring strip
                    "/;/admin",
                    "/.;/admin",
                    "/x/.;/admin",
                    "/admin/.;/x",
                )
            ],
        )

    @gen_test
    async def test_examples_combine(self) -> None:
        await self.load("bearer-token", "webhooks-only")
        assert self.authorizer is not None
        self.assertEqual(await self.authorizer.missing_packages(), [])


class TestRegoPolicies(PolicyCases, RegoBackend):
    def test_ip_allowlist_opa_is_refused_with_its_line(self) -> None:
        with self.assertRaisesRegex(
            ConfigError, r"ip-allowlist-opa/server\.rego:18: net\.cidr_contains\(\).*opa"
        ):
            RegoAuthorizer([os.path.join(POLICIES, "ip-allowlist-opa")])


class TestOpaPolicies(PolicyCases, OpaBackend):
    def test_ip_allowlist_opa(self) -> None:
        self.skipTest(
            "needs a real OPA: the test OPA evaluates with regopy, which lacks net.cidr_contains"
        )
