"""The shared auth suite, run against the embedded engine and a remote OPA.

``AuthCases`` holds the cases; ``TestRegoAuth`` and ``TestOpaAuth`` run them on
each backend (see ``auth_cases.py``). Backend-specific behaviour (start-up
errors, timeouts, the cache, an unreachable OPA) follows in its own classes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from auth_cases import OpaBackend, RegoBackend, request
from opa_fake import FakeOpa
from tornado.testing import gen_test

from backstream.auth import CLIENT_PACKAGE, SERVER_PACKAGE, create_authorizer
from backstream.auth.opa import OpaAuthorizer
from backstream.auth.rego import RegoAuthorizer
from backstream.errors import ConfigError

CLIENT_TOKEN = """\
package auth.client
import rego.v1
default allow := false
allow if input.header.Authorization == "Bearer s3cret"
"""

SERVER_RULES = """\
package auth.server
import rego.v1
default allow := false
allow if input.header["X-Api-Key"] == "k1"
allow if "yes" in input.query.open
allow if input.remote == "192.0.2.7"
allow if startswith(input.path, "/public/")
allow if "b" in input.headers["X-Tag"]
allow if {
    input.method == "DELETE"
    input.host == "admin.example"
}
"""

NO_DEFAULT = """\
package auth.client
import rego.v1
allow if input.header.Authorization == "Bearer s3cret"
"""

CONFLICT = """\
package auth.server
import rego.v1
allow := true if input.query.a
allow := false if input.query.b
"""


class AuthCases:
    """Cases every backend must pass; mixed into a ``BackendTestCase``."""

    @gen_test
    async def test_allow_and_deny(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        await self.start()
        good = request(headers=[("Authorization", "Bearer s3cret")])
        bad = request(headers=[("Authorization", "Bearer nope")])
        self.assertTrue((await self.decide(CLIENT_PACKAGE, good)).allowed)
        decision = await self.decide(CLIENT_PACKAGE, bad)
        self.assertFalse(decision.allowed)
        self.assertIsNone(decision.error)

    @gen_test
    async def test_default_deny_without_default_rule(self) -> None:
        self.write("client.rego", NO_DEFAULT)
        await self.start()
        decision = await self.decide(CLIENT_PACKAGE, request())
        self.assertEqual((decision.allowed, decision.error), (False, None))
        ok = request(headers=[("authorization", "Bearer s3cret")])
        self.assertTrue((await self.decide(CLIENT_PACKAGE, ok)).allowed)

    @gen_test
    async def test_missing_package_denies_and_is_reported(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        authorizer = await self.start()
        self.assertEqual(await authorizer.missing_packages(), [SERVER_PACKAGE])
        decision = await self.decide(SERVER_PACKAGE, request())
        self.assertEqual((decision.allowed, decision.error), (False, None))

    @gen_test
    async def test_header_query_remote_path_host_rules(self) -> None:
        self.write("server.rego", SERVER_RULES)
        await self.start()
        allowed = [
            request(headers=[("x-api-key", "k1")]),
            request(query=[("open", "no"), ("open", "yes")]),
            request(remote="192.0.2.7"),
            request("/public/index.html"),
            request(headers=[("X-Tag", "a"), ("x-tag", "b")]),
            request(method="DELETE", host="admin.example"),
        ]
        denied = [
            request(),
            request(headers=[("X-Api-Key", "k2"), ("X-Api-Key", "k1")]),  # first value counts
            request(query=[("open", "no")]),
            request(remote="192.0.2.8"),
            request("/publicity"),
            request(method="DELETE", host="other.example"),
        ]
        for input in allowed:
            self.assertTrue((await self.decide(SERVER_PACKAGE, input)).allowed, input)
        for input in denied:
            decision = await self.decide(SERVER_PACKAGE, input)
            self.assertEqual((decision.allowed, decision.error), (False, None), input)

    @gen_test
    async def test_evaluation_error_fails_closed(self) -> None:
        self.write("server.rego", CONFLICT)
        await self.start()
        self.assertTrue((await self.decide(SERVER_PACKAGE, request(query=[("a", "1")]))).allowed)
        decision = await self.decide(SERVER_PACKAGE, request(query=[("a", "1"), ("b", "1")]))
        self.assertFalse(decision.allowed)
        self.assertTrue(decision.error)

    @gen_test
    async def test_non_boolean_allow_is_an_error(self) -> None:
        self.write("client.rego", 'package auth.client\nallow := "yes"\n')
        await self.start()
        decision = await self.decide(CLIENT_PACKAGE, request())
        self.assertFalse(decision.allowed)
        self.assertIn("boolean", decision.error or "")

    @gen_test
    async def test_reload_swaps_policies(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        await self.start()
        old = request(headers=[("Authorization", "Bearer s3cret")])
        new = request(headers=[("Authorization", "Bearer rotated")])
        self.assertTrue((await self.decide(CLIENT_PACKAGE, old)).allowed)
        self.write("client.rego", CLIENT_TOKEN.replace("s3cret", "rotated"))
        await self.reload()
        self.assertFalse((await self.decide(CLIENT_PACKAGE, old)).allowed)
        self.assertTrue((await self.decide(CLIENT_PACKAGE, new)).allowed)

    @gen_test
    async def test_broken_reload_keeps_old_set(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        await self.start()
        good = request(headers=[("Authorization", "Bearer s3cret")])
        self.write("client.rego", "package auth.client\nallow if {\n  input.x ==\n}\n")
        with self.assertRaisesRegex(ConfigError, r"client\.rego:3:"):
            await self.reload()
        self.assertTrue((await self.decide(CLIENT_PACKAGE, good)).allowed)


class TestRegoAuth(AuthCases, RegoBackend):
    pass


class TestOpaAuth(AuthCases, OpaBackend):
    pass


class TestRegoStartup(RegoBackend):
    """Start-up refusals of the embedded engine: one line naming the file and line."""

    def load(self) -> str:
        with self.assertRaises(ConfigError) as caught:
            RegoAuthorizer([self.dir])
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_syntax_error_names_file_and_line(self) -> None:
        text = "package auth.client\n\nallow if {\n  input.x ==\n}\n"
        path = self.write("sub/dir/bad.rego", text)
        self.assertRegex(self.load(), rf"^{path}:4:\d+: ")

    def test_unavailable_builtin_is_refused(self) -> None:
        path = self.write(
            "ip.rego",
            "package auth.server\nimport rego.v1\n# net.cidr_contains(x) in a comment is fine\n"
            'allow if net.cidr_contains("10.0.0.0/8", input.remote)\n',
        )
        message = self.load()
        self.assertTrue(message.startswith(f"{path}:4: net.cidr_contains()"), message)
        self.assertIn("BACKSTREAM_AUTH=opa", message)

    def test_unknown_function_is_refused(self) -> None:
        path = self.write("f.rego", "package auth.server\nimport rego.v1\nallow if foo.bar(1)\n")
        self.assertTrue(self.load().startswith(f"{path}:3: foo.bar()"))

    def test_missing_path_and_empty_directory(self) -> None:
        missing = os.path.join(self.dir, "nope")
        with self.assertRaisesRegex(ConfigError, "nope: policy file or directory not found"):
            RegoAuthorizer([missing])
        self.assertIn("no *.rego files", self.load())

    def test_file_without_package(self) -> None:
        path = self.write("x.rego", "# nothing\nallow := true\n")
        self.assertEqual(self.load(), f"{path}:1: missing package declaration")

    def test_constant_conflict_is_refused(self) -> None:
        self.write("c.rego", "package auth.client\nallow := true\nallow := false\n")
        self.assertIn("package auth.client fails to evaluate", self.load())

    def test_factory(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        self.assertIsInstance(create_authorizer(None, [self.dir]), RegoAuthorizer)
        self.assertEqual(type(create_authorizer(None, [])).__name__, "NoAuth")
        with self.assertRaisesRegex(ConfigError, "unknown auth backend 'ldap'"):
            create_authorizer("ldap", [])
        with self.assertRaisesRegex(ConfigError, "--auth none cannot be combined"):
            create_authorizer("none", [self.dir])
        with self.assertRaisesRegex(ConfigError, "cannot be combined with --auth opa"):
            create_authorizer("opa", [self.dir], "http://127.0.0.1:8181")


class TestRegoRuntime(RegoBackend):
    """Timeouts, the decision cache, change detection and close."""

    @gen_test
    async def test_timeout_fails_closed(self) -> None:
        self.write(
            "slow.rego",
            "package auth.server\nimport rego.v1\n"
            "allow if count([x | some x in numbers.range(1, 200000); x % 7 == 0]) > 0\n",
        )
        self.authorizer = RegoAuthorizer([self.dir], timeout=0.001)
        decision = await self.decide(SERVER_PACKAGE, request())
        self.assertFalse(decision.allowed)
        self.assertIn("exceeded", decision.error or "")

    @gen_test
    async def test_cache_answers_repeated_inputs(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        authorizer = await self.start()
        assert isinstance(authorizer, RegoAuthorizer)
        cache = authorizer.policy_set.cache
        assert cache is not None
        input = request(headers=[("Authorization", "Bearer s3cret")])
        for _ in range(3):
            self.assertTrue((await self.decide(CLIENT_PACKAGE, input)).allowed)
        self.assertEqual((cache.misses, cache.hits), (1, 2))
        await authorizer.reload()
        self.assertIsNot(authorizer.policy_set.cache, cache)

    @gen_test
    async def test_cache_key_is_only_what_the_policy_reads(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)  # reads input.header only
        authorizer = await self.start()
        assert isinstance(authorizer, RegoAuthorizer)
        self.assertEqual(authorizer.policy_set.key_fields, ("header",))
        cache = authorizer.policy_set.cache
        assert cache is not None
        for i in range(3):  # unique paths and queries: one evaluation
            input = request(path=f"/p{i}", headers=[("Authorization", "Bearer s3cret")])
            self.assertTrue((await self.decide(CLIENT_PACKAGE, input)).allowed)
        self.assertEqual((cache.misses, cache.hits), (1, 2))
        wrong = request(path="/p0", headers=[("Authorization", "Bearer nope")])
        self.assertFalse((await self.decide(CLIENT_PACKAGE, wrong)).allowed)
        self.assertEqual(cache.misses, 2)

    @gen_test
    async def test_input_that_is_not_json_fails_closed_and_never_raises(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)  # reads input.header only: field-keyed cache
        authorizer = await self.start()
        assert isinstance(authorizer, RegoAuthorizer)
        self.assertEqual(authorizer.policy_set.key_fields, ("header",))
        token = [("Authorization", "Bearer s3cret")]
        for bad in (
            {**request(headers=token), "path": object()},  # an unread field: on a miss
            {**request(headers=[("Authorization", "Bearer other")]), "path": object()},
            {"header": {1: "a", "b": "c"}},  # a read field that cannot be sorted
        ):
            decision = await self.decide(CLIENT_PACKAGE, bad)
            self.assertFalse(decision.allowed)
            self.assertIn("not JSON-encodable", decision.error or "")

    @gen_test
    async def test_time_dependent_policies_are_not_cached(self) -> None:
        self.write("t.rego", "package auth.client\nimport rego.v1\nallow if time.now_ns() > 0\n")
        authorizer = await self.start()
        assert isinstance(authorizer, RegoAuthorizer)
        self.assertIsNone(authorizer.policy_set.cache)
        self.assertTrue((await self.decide(CLIENT_PACKAGE, request())).allowed)

    @gen_test
    async def test_changed_tracks_files_and_attempts(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        authorizer = await self.start()
        self.assertFalse(authorizer.changed())
        self.write("server.rego", SERVER_RULES)
        self.assertTrue(authorizer.changed())
        await authorizer.reload()
        self.assertFalse(authorizer.changed())
        self.assertEqual(await authorizer.missing_packages(), [])
        self.write("server.rego", "package auth.server\nallow if {\n")
        self.assertTrue(authorizer.changed())
        with self.assertRaises(ConfigError):
            await authorizer.reload()
        self.assertFalse(authorizer.changed())  # no retry loop on a broken set

    @gen_test
    async def test_decide_after_close_fails_closed(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        authorizer = await self.start()
        await authorizer.close()
        decision = await self.decide(CLIENT_PACKAGE, request(headers=[("X", "1")]))
        self.assertFalse(decision.allowed)
        self.assertTrue(decision.error)


class TestOpaRemote(OpaBackend):
    """What only the remote backend has: the network, the token, the URL."""

    @gen_test
    async def test_opa_down_fails_closed(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        await self.start()
        good = request(headers=[("Authorization", "Bearer s3cret")])
        self.assertTrue((await self.decide(CLIENT_PACKAGE, good)).allowed)
        await self.fake.stop()
        decision = await self.decide(CLIENT_PACKAGE, good)
        self.assertFalse(decision.allowed)
        self.assertIn("OPA query failed", decision.error or "")

    @gen_test
    async def test_wrong_token_fails_closed_without_leaking_it(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        await self.start()
        wrong = OpaAuthorizer(self.fake.url, "not-the-token")
        try:
            decision = await wrong.decide(CLIENT_PACKAGE, request())
            self.assertFalse(decision.allowed)
            self.assertIn("401", decision.error or "")
            self.assertNotIn("not-the-token", decision.error or "")
            self.assertEqual(await wrong.missing_packages(), [])  # warns, cannot tell
        finally:
            await wrong.close()

    @gen_test
    async def test_url_and_token_from_environment(self) -> None:
        self.write("client.rego", CLIENT_TOKEN)
        await self.start()
        env = {"BACKSTREAM_OPA_URL": self.fake.url, "BACKSTREAM_OPA_TOKEN": self.token or ""}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            authorizer = create_authorizer("opa", [])
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        try:
            good = request(headers=[("Authorization", "Bearer s3cret")])
            self.assertTrue((await authorizer.decide(CLIENT_PACKAGE, good)).allowed)
            self.assertEqual(await authorizer.missing_packages(), [SERVER_PACKAGE])
        finally:
            await authorizer.close()

    def test_bad_urls(self) -> None:
        for url in ["127.0.0.1:8181", "ftp://x", "http://u:p@x:8181", "http://x:99999"]:
            with self.assertRaises(ConfigError, msg=url):
                OpaAuthorizer(url)

    @gen_test
    async def test_fake_as_subprocess(self) -> None:
        path = self.write("client.rego", CLIENT_TOKEN)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "opa_fake.py")
        proc = subprocess.Popen(
            [sys.executable, script, "-p", path],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()  # printed once listening
            self.authorizer = OpaAuthorizer(url)
            good = request(headers=[("Authorization", "Bearer s3cret")])
            self.assertTrue((await self.decide(CLIENT_PACKAGE, good)).allowed)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


class TestFakeOpa(OpaBackend):
    """The test OPA itself refuses what it cannot evaluate honestly."""

    def test_refuses_builtins_regopy_lacks(self) -> None:
        self.write(
            "ip.rego",
            textwrap.dedent("""\
            package auth.server
            import rego.v1
            allow if net.cidr_contains("10.0.0.0/8", input.remote)
            """),
        )
        with self.assertRaisesRegex(ConfigError, "net.cidr_contains"):
            FakeOpa([self.dir])
