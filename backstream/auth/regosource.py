"""Rego source files: finding, reading and checking them before an engine sees them.

Pure functions over text, so they are unit-tested without regopy. They exist
because the embedded engine reports some problems without a location (an
unknown function) or not at all until a request reaches the rule (a builtin it
lacks, such as ``net.cidr_contains``, is silently undefined). Scanning the
calls lets start-up name the file and line instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence

from backstream.errors import ConfigError

#: Calls that are not builtins but that the engines accept anyway.
SPECIAL_CALLS = frozenset({"print"})
#: Builtins whose answer changes over time or has effects: never cache decisions.
NONDETERMINISTIC = frozenset(
    {
        "time.now_ns",
        "io.jwt.decode_verify",
        "rand.intn",
        "uuid.rfc4122",
        "http.send",
        "net.lookup_ip_addr",
        "opa.runtime",
        "crypto.x509.parse_and_verify_certificates",
        "crypto.x509.parse_and_verify_certificates_with_options",
        "print",
        "trace",
    }
)
_KEYWORDS = frozenset(
    "if else not some every in contains with as default import package true false null".split()
)
_CALL = re.compile(r"(?<![\w.\]\)])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\(")
_PACKAGE = re.compile(r"^[ \t]*package[ \t]+([A-Za-z_][\w.]*)", re.MULTILINE)
_IMPORT = re.compile(r"^[ \t]*import[ \t]+([\w.]+)(?:[ \t]+as[ \t]+(\w+))?", re.MULTILINE)
_HEAD = re.compile(r"[ \t]*([A-Za-z_]\w*)\(")


@dataclasses.dataclass(frozen=True)
class RegoFile:
    """One policy module: ``path`` as the user gave it, its text and package."""

    path: str
    text: str
    package: str


@dataclasses.dataclass(frozen=True)
class Call:
    """A function call found in a module."""

    path: str
    line: int
    name: str


def find_rego_files(paths: Sequence[str]) -> list[str]:
    """Every ``*.rego`` under ``paths`` (files or directories), sorted, no duplicates."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                found.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(".rego"))
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise ConfigError(f"{path}: policy file or directory not found")
    unique = list(dict.fromkeys(os.path.normpath(p) for p in found))
    if not unique:
        raise ConfigError(f"no *.rego files found in {', '.join(paths)}")
    return unique


def parse_module(path: str, text: str) -> RegoFile:
    """Classify one module by its package; ``ConfigError`` when it declares none."""
    match = _PACKAGE.search(strip_comments_and_strings(text))
    if match is None:
        raise ConfigError(f"{path}:1: missing package declaration")
    return RegoFile(path, text, match.group(1))


def read_policy_files(paths: Sequence[str]) -> tuple[RegoFile, ...]:
    """Read and classify every module; ``ConfigError`` naming the file on failure."""
    files = []
    for path in find_rego_files(paths):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read policy: {exc}") from None
        files.append(parse_module(path, text))
    return tuple(files)


def fingerprint(paths: Sequence[str]) -> str:
    """A digest of the names and contents of every policy file (for ``changed()``)."""
    digest = hashlib.sha256()
    try:
        names = find_rego_files(paths)
    except ConfigError as exc:
        return f"error: {exc}"
    for name in names:
        digest.update(name.encode() + b"\0")
        try:
            with open(name, "rb") as f:
                digest.update(f.read())
        except OSError as exc:
            digest.update(str(exc).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def line_of(text: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a character offset."""
    before = text[: max(0, offset)]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def strip_comments_and_strings(text: str) -> str:
    """``text`` with comments and string contents blanked, same length and lines."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            while i < n and text[i] != "\n":
                out[i] = " "
                i += 1
        elif c in '"`':
            i += 1
            while i < n and text[i] != c:
                if c == '"' and text[i] == "\\":
                    out[i] = " "
                    i += 1
                    if i >= n:
                        break
                if text[i] != "\n":
                    out[i] = " "
                i += 1
            i += 1
        else:
            i += 1
    return "".join(out)


def _top_level_heads(code: str) -> set[str]:
    """Names of functions defined in ``code`` (rule heads at bracket depth 0)."""
    heads: set[str] = set()
    depth = 0
    line_start = True
    for i, c in enumerate(code):
        if line_start and depth == 0:
            match = _HEAD.match(code, i)
            if match:
                heads.add(match.group(1))
        line_start = c == "\n"
        if c in "{[(":
            depth += 1
        elif c in "}])":
            depth = max(0, depth - 1)
    return heads


def function_calls(text: str) -> list[tuple[str, int]]:
    """(name, offset) of every call in ``text``, keywords excluded."""
    code = strip_comments_and_strings(text)
    return [(m.group(1), m.start(1)) for m in _CALL.finditer(code) if m.group(1) not in _KEYWORDS]


def unavailable_calls(files: Iterable[RegoFile], is_builtin: Callable[[str], bool]) -> list[Call]:
    """Calls that are neither defined by the policies nor builtins of the engine."""
    files = list(files)
    defined: set[str] = set()
    aliases: dict[str, set[str]] = {}
    for f in files:
        code = strip_comments_and_strings(f.text)
        defined |= _top_level_heads(code)
        names = aliases.setdefault(f.path, {"data", "input"})
        for m in _IMPORT.finditer(code):
            if m.group(1).startswith(("data.", "input.")):
                names.add(m.group(2) or m.group(1).rsplit(".", 1)[-1])
    missing = []
    for f in files:
        for name, offset in function_calls(f.text):
            first = name.split(".", 1)[0]
            if name in defined or first in aliases[f.path]:
                continue
            if name in SPECIAL_CALLS or is_builtin(name):
                continue
            missing.append(Call(f.path, line_of(f.text, offset)[0], name))
    return missing


def deterministic(files: Iterable[RegoFile]) -> bool:
    """Whether the same input always gets the same answer (so it may be cached)."""
    return not any(name in NONDETERMINISTIC for f in files for name, _ in function_calls(f.text))


_INPUT = re.compile(r"(?<![\w.])input\b(\.([A-Za-z_]\w*))?")


def input_fields(files: Iterable[RegoFile]) -> frozenset[str] | None:
    """The top-level input fields the policies read, or None if they may read any.

    A decision depends on nothing else of the input, so a cache keyed on these
    fields alone stays exact while it stops missing on, say, a unique query
    string that no rule looks at. ``input`` used whole (``input[k]``,
    ``import input``, ``walk(input)``, ``with input as``) means any field.
    """
    fields: set[str] = set()
    for f in files:
        for match in _INPUT.finditer(strip_comments_and_strings(f.text)):
            if match.group(2) is None:
                return None
            fields.add(match.group(2))
    return frozenset(fields)


_ERROR = re.compile(r"\(error (\d+):")
_POSITION = re.compile(r"\|(\d+)\|(\d+)")
_MESSAGE = re.compile(r"\(errormsg (\d+):")


def parse_engine_errors(message: str) -> list[tuple[str, int, str]]:
    """(source name, offset, message) from a rego-cpp error S-expression.

    rego-cpp prints each error as ``(error <len>:<name>|<offset>|<length>
    (errormsg <len>:<text>) ...)`` with length-prefixed strings.
    """
    errors: list[tuple[str, int, str]] = []
    pos = 0
    while True:
        m = _ERROR.search(message, pos)
        if m is None:
            return errors
        start = m.end()
        name = message[start : start + int(m.group(1))]
        where = _POSITION.match(message, start + len(name))
        offset = int(where.group(1)) if where else 0
        msg = _MESSAGE.search(message, start)
        text = message[msg.end() : msg.end() + int(msg.group(1))] if msg else "error"
        errors.append((name, offset, text))
        pos = start


def engine_messages(message: str) -> str:
    """All ``errormsg`` texts of a rego-cpp error S-expression, joined."""
    found = [message[m.end() : m.end() + int(m.group(1))] for m in _MESSAGE.finditer(message)]
    return "; ".join(found) or "engine error"


def describe_engine_error(message: str, files: Sequence[RegoFile]) -> str:
    """One line ``path:line:col: message`` for the first error rego-cpp reported."""
    errors = parse_engine_errors(message)
    if not errors:
        return message.strip().splitlines()[0] if message.strip() else "unknown engine error"
    name, offset, text = errors[0]
    source = next((f for f in files if f.path == name), None)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if source is None:
        return f"{name}: {text}{more}"
    line, col = line_of(source.text, offset)
    return f"{name}:{line}:{col}: {text}{more}"
