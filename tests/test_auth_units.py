"""Pure parts of auth: the input document, decisions, the Rego source scanner."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from backstream.auth import Decision, build_input, canonical_header_name, decision_from_document
from backstream.auth.regoengine import Program
from backstream.auth.regosource import (
    RegoFile,
    describe_engine_error,
    deterministic,
    function_calls,
    input_fields,
    parse_module,
    strip_comments_and_strings,
    unavailable_calls,
)


def test_build_input_document() -> None:
    doc = build_input(
        "POST",
        "/hook",
        [("a", "1"), ("b", ""), ("a", "2")],
        [("authorization", "Bearer t"), ("X-API-KEY", "k"), ("x-tag", "1"), ("X-Tag", "2")],
        "192.0.2.1",
        "demo.example:8080",
        "10.0.0.7",
    )
    assert doc == {
        "method": "POST",
        "path": "/hook",
        "path_normalized": "/hook",
        "header": {"Authorization": "Bearer t", "X-Api-Key": "k", "X-Tag": "1"},
        "headers": {"Authorization": ["Bearer t"], "X-Api-Key": ["k"], "X-Tag": ["1", "2"]},
        "query": {"a": ["1", "2"], "b": [""]},
        "remote": "192.0.2.1",
        "peer": "10.0.0.7",
        "host": "demo.example:8080",
    }
    assert canonical_header_name("www-authenticate") == "Www-Authenticate"


def test_decision_from_document() -> None:
    assert decision_from_document("p", {"allow": True}, defined=True).allowed
    assert decision_from_document("p", {}, defined=True) == Decision(
        False, detail="not allowed by policy"
    )
    assert decision_from_document("p", None, defined=False).detail == "package p is not loaded"
    assert decision_from_document("p", {"allow": 1}, defined=True).error
    assert decision_from_document("p", [], defined=True).error


def test_strip_keeps_positions() -> None:
    text = 'x := "a(b) # c" # d(e)\ny := `raw(\nz)` + f(1)\n'
    stripped = strip_comments_and_strings(text)
    assert len(stripped) == len(text)
    assert stripped.count("\n") == text.count("\n")
    assert [name for name, _ in function_calls(text)] == ["f"]


def test_unavailable_calls() -> None:
    lib = parse_module("lib.rego", "package lib\nimport rego.v1\nhelper(x) := x\n")
    main = parse_module(
        "main.rego",
        "package auth.server\nimport rego.v1\nimport data.lib\nimport data.lib.helper as h\n"
        "local(x) if {\n  count(x) > 0\n}\n"
        "allow if {\n  local(input.a)\n  lib.helper(1)\n  h(1)\n  data.lib.helper(2)\n"
        "  print(1)\n  net.cidr_contains(input.a, input.b)\n}\n",
    )
    missing = unavailable_calls([lib, main], lambda name: name in {"count"})
    assert [(c.path, c.line, c.name) for c in missing] == [("main.rego", 14, "net.cidr_contains")]


def test_deterministic() -> None:
    assert deterministic([parse_module("a", "package a\nx := count([1])\n")])
    assert not deterministic([parse_module("a", "package a\nx := time.now_ns()\n")])


def test_input_fields_are_what_the_policies_read() -> None:
    def fields(*texts: str) -> frozenset[str] | None:
        return input_fields([parse_module(f"{i}.rego", t) for i, t in enumerate(texts)])

    server = (
        "package auth.server\n"
        'allow if {\n  input.method == "GET"\n  startswith(input.path, "/w")\n}\n'
    )
    client = 'package auth.client\nallow if input.header.Authorization == "x" # input[k]\n'
    assert fields(server, client) == {"method", "path", "header"}
    assert fields('package a\nx := "input[1] in a string"\n') == frozenset()
    assert fields("package a\nallow if data.input.x\n") == frozenset()
    # Whole-input uses: any field may matter.
    assert fields("package a\nallow if input[k] == 1\n") is None
    assert fields("package a\nimport input\nallow if input.x\n") is None
    assert fields("package a\nallow if walk(input, [p, v])\n") is None
    assert fields(server, 'package b\nx := object.get(input, "y", 1)\n') is None


def test_describe_engine_error() -> None:
    files = [RegoFile("p.rego", "package a\n\nallow if {\n  x ==\n}\n", "a")]
    message = "(rego-errorseq (error 6:p.rego|26|2 (errormsg 9:Bad thing) (errorast |26|2)))"
    assert describe_engine_error(message, files) == "p.rego:4:5: Bad thing"


headers = st.lists(
    st.tuples(
        st.sampled_from(["x-a", "X-A", "x-b", "Authorization"]),
        st.text(st.characters(max_codepoint=0xFF), max_size=20),
    ),
    max_size=5,
)


@settings(max_examples=100, deadline=None)
@given(headers=headers, path=st.text(max_size=20))
def test_input_reaches_the_engine_unchanged(headers: list[tuple[str, str]], path: str) -> None:
    """Any header value Tornado can produce (latin-1) survives the trip into regopy."""
    policy = parse_module("echo.rego", "package auth.server\ndoc := input\n")
    program = Program([policy], ["auth.server"])
    doc = build_input("GET", path, [], headers, "127.0.0.1", "h")
    result = program.evaluate("auth.server", json.dumps(doc))
    assert result.error is None
    assert result.value["doc"] == doc
