"""Pure proxy decisions: which headers travel, and where a request goes.

Kept apart from the I/O modules so each rule is a plain function that the
tests call directly.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

Headers = list[tuple[str, str]]

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: Headers whose values are secrets: masked in logs and HAR files.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})

VIA = "1.1 backstream"


def strip_hop_by_hop(headers: Iterable[tuple[str, str]], *, drop: Iterable[str] = ()) -> Headers:
    """Remove hop-by-hop headers, those named in ``Connection``, and ``drop``."""
    pairs = list(headers)
    removed = set(HOP_BY_HOP)
    removed.update(name.lower() for name in drop)
    for name, value in pairs:
        if name.lower() == "connection":
            removed.update(token.strip().lower() for token in value.split(",") if token.strip())
    return [(name, value) for name, value in pairs if name.lower() not in removed]


def add_forwarded(headers: Headers, *, remote: str, scheme: str, host: str) -> Headers:
    """Append the de-facto proxy headers the local app expects.

    ``X-Forwarded-For`` and ``Via`` are appended to (a load balancer in front
    of the server may have set them); ``X-Forwarded-Proto`` and
    ``X-Forwarded-Host`` are only set when absent, so a TLS-terminating
    platform in front of the server keeps its word.
    """
    names = {name.lower() for name, _ in headers}
    out = list(headers)
    if remote:
        out.append(("X-Forwarded-For", remote))
    if "x-forwarded-proto" not in names:
        out.append(("X-Forwarded-Proto", scheme))
    if host and "x-forwarded-host" not in names:
        out.append(("X-Forwarded-Host", host))
    out.append(("Via", VIA))
    return _merge_repeated(out, ("x-forwarded-for", "via"))


def _merge_repeated(headers: Headers, names: Iterable[str]) -> Headers:
    """Fold repeated list headers into one comma-separated value, in order."""
    wanted = set(names)
    merged: dict[str, int] = {}
    out: Headers = []
    for name, value in headers:
        key = name.lower()
        if key in wanted:
            if key in merged:
                index = merged[key]
                out[index] = (out[index][0], out[index][1] + ", " + value)
                continue
            merged[key] = len(out)
        out.append((name, value))
    return out


def origin_form(target: str) -> str:
    """The path-and-query part of a request target, which must not change host.

    Origin-form (``/path?q``) is returned byte for byte. Absolute-form
    (``http://host/path``) keeps only its path and query: the tunnel is not a
    forward proxy. Anything else (``*``, ``@host``, an empty target) raises
    ValueError.
    """
    if target.startswith("/"):
        return target
    if "://" in target:
        parts = urllib.parse.urlsplit(target)
        if parts.scheme.lower() in ("http", "https") and parts.netloc:
            path = parts.path or "/"
            return path + ("?" + parts.query if parts.query else "")
    raise ValueError(f"unsupported request target {target[:100]!r}")


def upstream_target(base_path: str, target: str) -> str:
    """The request target sent to the local app: the ``-d`` base path + origin-form."""
    return base_path.rstrip("/") + origin_form(target)


def mask_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """A copy of ``headers`` with secret values replaced, for logs and HAR files."""
    return [(n, "***" if n.lower() in SECRET_HEADERS else v) for n, v in headers]


def parse_header_line(text: str) -> tuple[str, str]:
    """Parse ``"Name: value"`` (from ``-H``); raise ValueError if it is not one."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or "\n" in value or "\r" in value:
        raise ValueError(f"invalid header {text!r}: expected 'Name: value'")
    return name, value.strip()
