"""The backend-independent part of the auth tests: one suite, one subclass per backend.

As Tornado's ``HTTPClientCommonTestCase`` does, the cases live in mixins that
know nothing of the backend; ``RegoBackend`` and ``OpaBackend`` say how to
start an authorizer over a set of policy files and how to reload them. The OPA
flavour serves the files from ``opa_fake`` (real Rego over real HTTP on
127.0.0.1) the way ``opa run --server --watch DIR`` would.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

from opa_fake import FakeOpa
from tornado.testing import AsyncTestCase

from backstream.auth import Authorizer, Decision, build_input
from backstream.auth.opa import OpaAuthorizer
from backstream.auth.rego import RegoAuthorizer

POLICIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "policies")


def request(
    path: str = "/",
    *,
    method: str = "GET",
    query: Sequence[tuple[str, str]] = (),
    headers: Sequence[tuple[str, str]] = (),
    remote: str = "127.0.0.1",
    host: str = "tunnel.example",
) -> dict[str, Any]:
    return build_input(method, path, query, headers, remote, host)


class BackendTestCase(AsyncTestCase):
    """Policy files in a temporary directory and an authorizer over them."""

    def setUp(self) -> None:
        super().setUp()
        self.dir = tempfile.mkdtemp(prefix="backstream-auth-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.authorizer: Authorizer | None = None

    def tearDown(self) -> None:
        if self.authorizer is not None:
            self.io_loop.run_sync(self.authorizer.close)
        self.stop_backend()
        super().tearDown()

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    async def decide(self, package: str, input: dict[str, Any]) -> Decision:
        assert self.authorizer is not None
        return await self.authorizer.decide(package, input)

    # Backend hooks.
    async def start(self, paths: Sequence[str] | None = None) -> Authorizer:
        raise NotImplementedError

    async def reload(self) -> None:
        raise NotImplementedError

    def stop_backend(self) -> None:
        pass


class RegoBackend(BackendTestCase):
    backend = "rego"

    async def start(self, paths: Sequence[str] | None = None) -> Authorizer:
        self.authorizer = RegoAuthorizer(paths or [self.dir])
        return self.authorizer

    async def reload(self) -> None:
        assert self.authorizer is not None
        await self.authorizer.reload()


class OpaBackend(BackendTestCase):
    backend = "opa"
    token: str | None = "opa-test-token"

    async def start(self, paths: Sequence[str] | None = None) -> Authorizer:
        self.fake = FakeOpa(paths or [self.dir], token=self.token)
        url = self.fake.listen()
        self.authorizer = OpaAuthorizer(url, self.token)
        return self.authorizer

    async def reload(self) -> None:
        self.fake.reload()  # what OPA's --watch does; raises ConfigError when broken
        assert self.authorizer is not None
        await self.authorizer.reload()

    def stop_backend(self) -> None:
        fake = getattr(self, "fake", None)
        if fake is not None:
            self.io_loop.run_sync(fake.stop)
