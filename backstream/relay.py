"""Pure proxy decisions: which headers travel, and where a request goes.

Kept apart from the I/O modules so each rule is a plain function that the
tests call directly.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Iterable, Sequence

Headers = list[tuple[str, str]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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

VIA = "1.1 backstream"

#: Headers a ``Connection`` header cannot remove (besides ``X-Forwarded-*``): the
#: app's own credentials, and what the server sets itself.
CONNECTION_PROOF = frozenset({"authorization", "cookie", "host", "forwarded", "via"})


def strip_hop_by_hop(headers: Iterable[tuple[str, str]], *, drop: Iterable[str] = ()) -> Headers:
    """Remove hop-by-hop headers, those named in ``Connection``, and ``drop``.

    A peer may name its own hop-by-hop headers in ``Connection`` (RFC 9110
    7.6.1), but not ``CONNECTION_PROOF`` ones or ``X-Forwarded-*``: a caller
    sending ``Connection: Authorization, X-Forwarded-For`` must not strip the
    app's credentials or the forwarding headers the server adds.
    """
    pairs = list(headers)
    removed = set(HOP_BY_HOP)
    removed.update(name.lower() for name in drop)
    for name, value in pairs:
        if name.lower() == "connection":
            for token in value.split(","):
                key = token.strip().lower()
                if key and key not in CONNECTION_PROOF and not key.startswith("x-forwarded-"):
                    removed.add(key)
    return [(name, value) for name, value in pairs if name.lower() not in removed]


def add_forwarded(
    headers: Headers, *, remote: str, scheme: str, host: str, trusted: bool = False
) -> Headers:
    """Set the de-facto proxy headers the local app expects.

    From a ``trusted`` peer (a proxy named by ``--trust-forwarded``) the
    forwarding headers it set are kept: ``X-Forwarded-For`` and ``Via`` are
    appended to, ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` only set when
    absent. From anyone else every ``X-Forwarded-*`` and ``Forwarded`` header
    is dropped first, so a caller cannot tell the app it came over HTTPS, from
    another address or for another host.
    """
    if not trusted:
        headers = [(n, v) for n, v in headers if not _is_forwarding_header(n)]
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


def _is_forwarding_header(name: str) -> bool:
    key = name.lower()
    return key.startswith("x-forwarded-") or key == "forwarded"


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, ::1"`` -> networks; raise ValueError naming a bad entry."""
    networks = []
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"invalid network {part!r}: expected an address or CIDR") from None
    return tuple(networks)


def client_address(peer: str, forwarded: Sequence[str], networks: Sequence[Network]) -> str:
    """The caller's address, for policies: ``peer``, unless ``peer`` is a trusted proxy.

    Then it is the right-most entry of ``forwarded`` (``forwarded_chain``) that
    is not itself a trusted proxy: each trusted proxy appends the address it
    saw, so entries further left were written by the caller and prove nothing.
    When every entry is trusted, the left-most one.
    """
    if not is_trusted(peer, networks):
        return peer
    chain = [_bare_address(a) for a in forwarded if a.strip()]
    for address in reversed(chain):
        if not is_trusted(address, networks):
            return address
    return chain[0] if chain else peer


#: The headers ``--forwarded-header`` may name: the one read for ``input.remote``.
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")


def forwarded_chain(header: str, values: Sequence[str]) -> list[str]:
    """The addresses named by the values of ``header`` (one of ``FORWARDED_HEADERS``)."""
    if header == "forwarded":
        return forwarded_for(values)
    return [a.strip() for value in values for a in value.split(",") if a.strip()]


#: A quoted string (to its end if unclosed), a run of other text, or a separator.
_FORWARDED_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"?|[^",;]+|[,;]')
_QUOTED = re.compile(r'"((?:\\.|[^"\\])*)"')


def forwarded_for(values: Sequence[str]) -> list[str]:
    """The ``for=`` values of ``Forwarded`` headers (RFC 7239), in order, unquoted.

    A quoted string is read whole: a ``,`` or ``;`` inside one separates nothing,
    so ``for="1.2.3.4, 5.6.7.8"`` is one (invalid) address, never two.
    """
    found = []
    for value in values:
        pair = ""
        for token in [*_FORWARDED_TOKEN.findall(value), ";"]:
            if token not in (",", ";"):
                pair += token
                continue
            name, sep, address = pair.partition("=")
            if sep and name.strip().lower() == "for":
                found.append(_unquote(address.strip()))
            pair = ""
    return found


def _unquote(value: str) -> str:
    """A quoted-string (RFC 9110 5.6.4) without its quotes and escapes; else ``value``."""
    quoted = _QUOTED.fullmatch(value)
    return re.sub(r"\\(.)", r"\1", quoted.group(1)) if quoted else value


def _bare_address(entry: str) -> str:
    """``"[::1]:80"`` -> ``"::1"``, ``"1.2.3.4:5"`` -> ``"1.2.3.4"`` (ports are sometimes kept)."""
    entry = entry.strip().strip('"')
    if entry.startswith("["):
        return entry[1:].partition("]")[0]
    host, sep, port = entry.rpartition(":")
    return host if sep and "." in host and port.isdigit() else entry


def is_trusted(remote: str, networks: Sequence[Network]) -> bool:
    """Whether the peer address ``remote`` lies in one of ``networks``."""
    if not networks or not remote:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in network for network in networks)


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


#: A header block larger than this is answered 431 (RFC 6585).
MAX_HEADER_BLOCK = 64 * 1024
#: A request target longer than this is answered 414 (``--max-target``).
MAX_TARGET = 8 * 1024
#: Bytes no request head may hold: controls other than HTAB, CR and LF (RFC 9110 5.5).
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,19}")


def body_length(headers: Iterable[tuple[str, str]]) -> int:
    """0 for no body, N for ``Content-Length: N``, -1 for a chunked body.

    Raises ValueError for any framing two HTTP implementations could read
    differently (RFC 9112 6.1, 6.3): both headers, more than one of either,
    a coding other than exactly ``chunked``, a length that is not plain digits.
    """
    lengths: list[str] = []
    codings: list[str] = []
    for name, value in headers:
        key = name.lower()
        if key == "content-length":
            lengths.append(value)
        elif key == "transfer-encoding":
            codings.append(value)
    if codings:
        if lengths:
            raise ValueError("both Transfer-Encoding and Content-Length")
        if len(codings) != 1 or codings[0].strip().lower() != "chunked":
            raise ValueError("Transfer-Encoding other than one 'chunked'")
        return -1
    if not lengths:
        return 0
    if len(lengths) != 1 or not _DIGITS.fullmatch(lengths[0].strip()):
        raise ValueError("invalid Content-Length")
    return int(lengths[0])


def content_length(headers: Iterable[tuple[str, str]]) -> int | None:
    """The one valid ``Content-Length`` of a message, or None (absent, several, invalid)."""
    values = [v for n, v in headers if n.lower() == "content-length"]
    if len(values) == 1 and _DIGITS.fullmatch(values[0].strip()):
        return int(values[0])
    return None


def raw_head_problem(head: bytes) -> str | None:
    """Why a request head, as received (through its empty last line), is refused, or None.

    Every line must end in CRLF: a bare LF or CR ends a line for some parsers
    and not for others (RFC 9112 2.2). No line folding (RFC 9112 5.2), and no
    control byte but HTAB (RFC 9110 5.5). Empty lines before the request line
    are ignored, as RFC 9112 2.2 allows.
    """
    head = head.lstrip(b"\r\n")
    lines = head.count(b"\n")
    crlf = head.count(b"\r\n")
    if lines != crlf:
        return "a line ending in LF without CR"
    if head.count(b"\r") != crlf:
        return "a CR not followed by LF"
    if b"\n " in head or b"\n\t" in head:
        return "obsolete line folding"
    if _CONTROL.search(head):
        return "a control character in the request head"
    return None


def head_problem(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    *,
    handshake: bool,
    max_target: int = MAX_TARGET,
) -> tuple[int, str] | None:
    """(status, reason) for a request head refused before routing, or None.

    ``handshake``: the request asks for a WebSocket (public or the tunnel), which
    never has a body, so none is ever read or buffered for it. ``max_target``:
    the longest request target (0: no limit).
    """
    if max_target and len(target) > max_target:
        return 414, f"request target longer than {max_target} bytes"
    size = len(method) + len(target) + sum(len(name) + len(value) + 4 for name, value in headers)
    if size > MAX_HEADER_BLOCK:
        return 431, f"request header fields larger than {MAX_HEADER_BLOCK} bytes"
    if sum(1 for name, _ in headers if name.lower() == "host") > 1:
        return 400, "more than one Host header"
    try:
        length = body_length(headers)
    except ValueError as e:
        return 400, f"bad request framing: {e}"
    if handshake and length != 0:
        return 400, "a WebSocket handshake must not have a body"
    return None


def websocket_handshake_problem(
    method: str, headers: Sequence[tuple[str, str]]
) -> tuple[int, str] | None:
    """(status, reason) if a public upgrade is not a valid RFC 6455 handshake, or None.

    Checked before the handshake is relayed, so that the local app never opens
    a WebSocket for an upgrade the public side would then refuse.
    """
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value)
    if method != "GET":
        return 405, "a WebSocket handshake must be a GET"
    connection = {t.strip().lower() for v in values.get("connection", []) for t in v.split(",")}
    if "upgrade" not in connection:
        return 400, "a WebSocket handshake needs 'Connection: Upgrade'"
    if values.get("sec-websocket-version") != ["13"]:
        return 426, "unsupported WebSocket version (13 is supported)"
    if len(values.get("sec-websocket-key", [])) != 1 or not values["sec-websocket-key"][0]:
        return 400, "a WebSocket handshake needs one Sec-WebSocket-Key"
    return None


def response_headers(status: int, headers: Headers, *, upgrade: bool) -> Headers:
    """The headers of a relayed response, its framing decided here, not by the peer.

    Hop-by-hop headers (``Transfer-Encoding`` among them) are dropped; the one
    ``Content-Length`` left must be valid. An interim status (1xx) is refused,
    except 101 answering a WebSocket upgrade. Raises ValueError.
    """
    if 100 <= status < 200 and not (status == 101 and upgrade):
        raise ValueError(f"status {status} is not a final response")
    headers = strip_hop_by_hop(headers)
    lengths = [v for n, v in headers if n.lower() == "content-length"]
    if len(lengths) > 1 or (lengths and not _DIGITS.fullmatch(lengths[0].strip())):
        raise ValueError("invalid Content-Length in the response")
    return headers


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_PARAMS = re.compile(r";[^/]*")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normalize_path(path: str) -> str:
    """The path as an app that decodes and resolves it may see it: for deny-lists.

    Escapes of unreserved characters are decoded (``%61`` -> ``a``, ``%2e`` ->
    ``.``), the others upper-cased (``%2f`` -> ``%2F``: an encoded slash stays
    one); ``;params`` are cut from each segment; runs of slashes are merged;
    dot segments removed (RFC 3986 6.2.2, 5.2.4). Decoding happens once:
    ``%252e`` stays ``%252e``.

    Parameters go because a deny-list must catch the spelling the most lenient
    app reads: Tomcat and Spring strip them, so ``/x/..;/admin`` and
    ``/;/admin`` are their ``/admin``. Slashes are merged before dots resolve
    (``/a//../b`` -> ``/b``, where RFC 3986 gives ``/a/b``), as Tomcat does.
    """
    path = _ESCAPE.sub(_unescape_unreserved, path)
    if ";" in path:
        path = _PARAMS.sub("", path)
    if "//" in path:
        path = re.sub(r"/{2,}", "/", path)
    segments = path.split("/")
    if "." not in segments and ".." not in segments:
        return path
    out: list[str] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment == "..":
            if len(out) > 1:
                out.pop()
        elif segment != ".":
            out.append(segment)
            continue
        if i == last:
            out.append("")  # "/a/.." -> "/", "/a/." -> "/a/"
    return "/".join(out) or "/"


def _unescape_unreserved(m: re.Match[str]) -> str:
    char = chr(int(m.group(1), 16))
    return char if char in _UNRESERVED else "%" + m.group(1).upper()


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


def upstream_host(mode: str, public_host: str, destination: str) -> str:
    """The ``Host`` sent to the local app for ``--host-header`` ``mode``.

    ``preserve``: the caller's (as nginx's ``proxy_set_header Host $host``);
    ``rewrite``: the destination's ``host:port``; anything else is sent as it is.
    """
    if mode == "preserve":
        return public_host or destination
    if mode == "rewrite":
        return destination
    return mode


#: Response headers that may point the caller at the local app's own address.
LOCATION_HEADERS = frozenset({"location", "content-location", "refresh"})


def public_origin(headers: Iterable[tuple[str, str]]) -> str:
    """``scheme://host`` the caller used, from the forwarding headers the server set."""
    proto = host = ""
    for name, value in headers:
        key = name.lower()
        if key == "x-forwarded-proto" and not proto:
            proto = value.split(",")[0].strip()
        elif key == "x-forwarded-host" and not host:
            host = value.split(",")[0].strip()
    return f"{proto or 'http'}://{host}" if host else ""


def rewrite_locations(headers: Headers, local: str, public: str) -> Headers:
    """Point redirects at the public origin, as nginx's ``proxy_redirect default``.

    ``local`` is the destination's origin and base path (``http://127.0.0.1:3000/app``),
    ``public`` the caller's origin: a ``Location``, ``Content-Location`` or
    ``Refresh`` URL under ``local``, under http or https (an app that trusts
    ``X-Forwarded-Proto`` builds ``https://127.0.0.1:3000/...``), is moved under
    ``public``; nothing else changes.
    """
    if not public:
        return headers
    out: Headers = []
    hostpath = local.rstrip("/").lower().partition("://")[2]
    prefixes = ("http://" + hostpath, "https://" + hostpath)
    for name, value in headers:
        key = name.lower()
        if key in LOCATION_HEADERS:
            value = _rewrite_url(value, prefixes, public, refresh=key == "refresh")
        out.append((name, value))
    return out


_REFRESH_URL = re.compile(r"(?i)url\s*=\s*")


def _rewrite_url(value: str, prefixes: tuple[str, ...], public: str, *, refresh: bool) -> str:
    # Refresh: "5; url=http://...": the URL is after "url=". Elsewhere the whole value
    # is the URL (a "next_url=" in its query is not the target).
    start = 0
    if refresh:
        found = _REFRESH_URL.search(value)
        if found is None:
            return value
        start = found.end()
    url = value[start:].strip().strip("'\"")
    at = value.index(url, start)  # what is around the URL (quotes, spaces) stays
    lowered = url.lower()
    for prefix in prefixes:
        if lowered == prefix or lowered.startswith((prefix + "/", prefix + "?")):
            rest = url[len(prefix) :]
            moved = public + (rest if rest.startswith(("/", "?")) else "/" + rest)
            return value[:at] + moved + value[at + len(url) :]
    return value


def upstream_target(base_path: str, target: str) -> str:
    """The request target sent to the local app: the ``-d`` base path + origin-form."""
    return base_path.rstrip("/") + origin_form(target)


def parse_header_line(text: str) -> tuple[str, str]:
    """Parse ``"Name: value"`` (from ``-H``); raise ValueError if it is not one."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or "\n" in value or "\r" in value:
        raise ValueError(f"invalid header {text!r}: expected 'Name: value'")
    return name, value.strip()
