"""An OPA-REST-compatible server for tests, answering from real Rego (regopy).

No OPA binary can be installed here, so the remote backend is tested against
this: a real Tornado HTTP server on 127.0.0.1 speaking the parts of OPA's REST
API that backstream and its tests use, with the same shapes as OPA:

- ``POST|GET /v1/data/<path>`` (``{"input": ...}``) -> ``{"result": ...}``, or
  ``{}`` when undefined; 500 ``{"code": "internal_error"}`` on evaluation errors.
- ``PUT /v1/policies/<id>`` (Rego text) -> 200 ``{}``, or 400
  ``{"code": "invalid_parameter"}`` (the old policies keep serving);
  ``DELETE /v1/policies/<id>``.
- ``GET /health``; an optional bearer token (401 ``{"code": "unauthorized"}``).

It evaluates with lenient builtin errors, like OPA's default, and refuses
policies that call builtins regopy lacks (``net.cidr_contains``...): it cannot
evaluate those, and answering "undefined" would be a lie. ``reload()`` mimics
``opa run --server --watch DIR``: it reloads the directories it was started
with and keeps the old set when the new one is broken.

In-process: ``FakeOpa(paths, token).listen()`` (a bound socket from
``bind_unused_port``). Subprocess: ``python -m tests.opa_fake -p DIR [--token
T]`` prints ``http://127.0.0.1:<port>`` on its first line once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.testing
import tornado.web

from backstream.auth.regoengine import check_builtins, query
from backstream.auth.regosource import RegoFile, parse_module, read_policy_files
from backstream.errors import ConfigError

log = logging.getLogger(__name__)


class FakeOpa:
    """Policies by id, evaluated per request with a fresh regopy interpreter."""

    def __init__(self, policy_paths: Sequence[str] = (), token: str | None = None) -> None:
        self.paths = tuple(policy_paths)
        self.token = token
        self.data_requests = 0
        self.policies: dict[str, RegoFile] = {}
        self.server: tornado.httpserver.HTTPServer | None = None
        self.url = ""
        if self.paths:
            self.reload()

    # -- policy management -------------------------------------------------

    @staticmethod
    def _check(files: Sequence[RegoFile]) -> None:
        check_builtins(files)
        result = query(files, "", "{}", strict=False)  # compiles everything
        if result.error is not None:
            raise ConfigError(result.error)

    def reload(self) -> None:
        """Reload the start-up paths; a broken set raises and the old one stays."""
        files = read_policy_files(self.paths)
        self._check(files)
        self.policies = {f.path: f for f in files}

    def put_policy(self, policy_id: str, text: str) -> None:
        candidate = dict(self.policies)
        candidate[policy_id] = parse_module(policy_id, text)
        self._check(list(candidate.values()))
        self.policies = candidate

    def evaluate(self, path: str, input: Any) -> tuple[int, dict[str, Any]]:
        files = list(self.policies.values())
        if not files:
            return 200, {}
        result = query(files, path.strip("/").replace("/", "."), json.dumps(input), strict=False)
        if result.error is not None:
            return 500, {"code": "internal_error", "message": result.error}
        return 200, {"result": result.value} if result.defined else {}

    # -- serving -----------------------------------------------------------

    def app(self) -> tornado.web.Application:
        return tornado.web.Application(
            [
                (r"/health", _Health, {"fake": self}),
                (r"/v1/data/?(.*)", _Data, {"fake": self}),
                (r"/v1/policies/(.+)", _Policies, {"fake": self}),
            ]
        )

    def listen(self) -> str:
        """Serve on an unused 127.0.0.1 port of the current IOLoop; returns the URL."""
        sock, port = tornado.testing.bind_unused_port()
        self.server = tornado.httpserver.HTTPServer(self.app())
        self.server.add_sockets([sock])
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            await self.server.close_all_connections()
            self.server = None


class _Handler(tornado.web.RequestHandler):
    def initialize(self, fake: FakeOpa) -> None:
        self.fake = fake

    def prepare(self) -> None:
        token = self.fake.token
        if token and self.request.headers.get("Authorization") != f"Bearer {token}":
            self.answer(401, {"code": "unauthorized", "message": "missing or invalid token"})

    def answer(self, status: int, body: dict[str, Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))


class _Health(_Handler):
    def get(self) -> None:
        self.answer(200, {})


class _Data(_Handler):
    def get(self, path: str) -> None:
        self.fake.data_requests += 1
        self.answer(*self.fake.evaluate(path, None))

    def post(self, path: str) -> None:
        self.fake.data_requests += 1
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            self.answer(400, {"code": "invalid_parameter", "message": "body is not JSON"})
            return
        self.answer(*self.fake.evaluate(path, body.get("input")))


class _Policies(_Handler):
    def put(self, policy_id: str) -> None:
        try:
            self.fake.put_policy(policy_id, self.request.body.decode())
        except (ConfigError, UnicodeDecodeError) as exc:
            self.answer(400, {"code": "invalid_parameter", "message": str(exc)})
            return
        self.answer(200, {})

    def delete(self, policy_id: str) -> None:
        if self.fake.policies.pop(policy_id, None) is None:
            self.answer(404, {"code": "resource_not_found", "message": policy_id})
            return
        self.answer(200, {})


async def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", "--policy", action="append", default=[])
    parser.add_argument("--token")
    args = parser.parse_args(argv)
    fake = FakeOpa(args.policy, args.token)
    print(fake.listen(), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(_main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass
