"""What counts as a secret in traffic, and how it is hidden wherever traffic is shown.

One list of header names and one of query parameter names serve every place
that shows a request: log lines (``logs.MaskingFilter``, Tornado's loggers
included), the client's debug lines and HAR files. Each list has defaults and
grows with ``--mask-header`` / ``--mask-query``; nothing can remove a default.
A hidden value reads ``***``.

``mask_text`` is the net under everything else: it finds ``Name: value``,
``'Name': 'value'`` and ``name=value`` forms in any formatted line (after a
quoted name, as in a dict or list repr, the value up to its closing quote;
after a bare one, up to the end of the line or a following ``; Name: ``
header, quoted strings in it read whole), bearer and basic credentials, and
secret query parameters in any URL (names compared percent-decoded).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Headers = list[tuple[str, str]]

MASK = "***"

#: Request and response headers whose values are credentials.
DEFAULT_HEADERS = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-access-token",
    "x-csrf-token",
    "x-amz-security-token",
    "x-goog-api-key",
    "backstream-token",
)
#: Query parameters whose values are credentials.
DEFAULT_QUERY = (
    "access_token",
    "refresh_token",
    "id_token",
    "token",
    "api_key",
    "apikey",
    "key",
    "sig",
    "signature",
    "secret",
    "client_secret",
    "password",
)

_CREDENTIAL_RE = re.compile(r"(?i)\b(bearer|basic|digest)\s+[A-Za-z0-9._~+/=-]+")
#: ``scheme://user:password@`` in a URL.
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s'\"]*@")


class Redactor:
    """Masks the configured headers and query parameters; immutable once built."""

    def __init__(self, headers: Iterable[str] = (), query: Iterable[str] = ()) -> None:
        self.headers = frozenset(DEFAULT_HEADERS) | {h.strip().lower() for h in headers if h}
        self.query = frozenset(DEFAULT_QUERY) | {q.strip().lower() for q in query if q}
        names = "|".join(re.escape(h) for h in sorted(self.headers, key=len, reverse=True))
        self._header_re = re.compile(
            rf"""(?ix)
            (?<![\w-])({names})               # a secret header name
            (?:
              (['"]\s*[:=,]\s*)                 # quoted ('Cookie': ), so is its value:
              (?:(['"])(?:\\.|(?!\3)[^\\])*\3     #   to its closing quote
              | (?:(?!;\s[\w-]+:\s)[^\r\n])*)    #   (if it is not quoted, as below)
            | (\s*[:=,]\s*)                     # bare (Cookie: ), so to its value's end:
              (?:"(?:\\.|[^"\\\r\n])*"?         #   quoted strings read whole,
              | (?!;\s[\w-]+:\s)[^"\r\n])*       #   up to "; Next-Header: " or the line's end
            )
            """
        )
        params = "|".join(_encoded(q) for q in sorted(self.query, key=len, reverse=True))
        self._query_re = re.compile(rf"(?i)([?&;](?:{params})=)([^&;#\s'\"]*)")
        # Cheap pre-check: a line with none of these has no secret header or credential.
        self._triggers = tuple({*self.headers, "bearer", "basic", "digest", "@"})

    def mask_headers(self, headers: Iterable[tuple[str, str]]) -> Headers:
        """A copy of ``headers`` with secret values, and query secrets in URLs, replaced."""
        secret = self.headers
        return [
            (n, MASK if n.lower() in secret else self.mask_target(v) if "?" in v else v)
            for n, v in headers
        ]

    def mask_query(self, pairs: Iterable[tuple[str, str]]) -> Headers:
        """A copy of parsed query ``pairs`` with secret values replaced."""
        secret = self.query
        return [(n, MASK if n.lower() in secret else v) for n, v in pairs]

    def mask_target(self, target: str) -> str:
        """A URL or request target with secret query values (and any password) replaced."""
        if "@" in target:
            target = _USERINFO_RE.sub(r"\1" + MASK + "@", target)
        if "?" not in target or "=" not in target:
            return target
        return self._query_re.sub(lambda m: m.group(1) + MASK, target)

    def mask_text(self, text: str) -> str:
        """Any formatted line with secret values replaced."""
        text = self.mask_target(text)
        lowered = text.lower()
        if not any(trigger in lowered for trigger in self._triggers):
            return text
        text = self._header_re.sub(_mask_header_match, text)
        return _CREDENTIAL_RE.sub(lambda m: m.group(1) + " " + MASK, text)


def _encoded(name: str) -> str:
    """A pattern for ``name`` with any character percent-encoded, as apps decode it:
    ``access%5Ftoken`` is ``access_token`` to them."""
    return "".join(f"(?:{re.escape(c)}|%{ord(c):02x})" for c in name)


def _mask_header_match(m: re.Match[str]) -> str:
    quote = m.group(3)
    value = quote + MASK + quote if quote else MASK
    return m.group(1) + (m.group(2) or m.group(4)) + value


_current = Redactor()


def configure(headers: Iterable[str] = (), query: Iterable[str] = ()) -> Redactor:
    """Extend the defaults for the whole process (the CLI calls this once)."""
    global _current
    _current = Redactor(headers, query)
    return _current


def current() -> Redactor:
    """The process's redactor: defaults plus what ``configure`` added."""
    return _current
