"""Tunnel names: what a valid one is, and which tunnel a public request is for.

A name is a DNS label, so that ``NAME.tunnel.example.com`` is its address
under wildcard DNS. The default tunnel has the empty name: a server without
``--domain`` serves only it (plus named tunnels reached by header), exactly
as before names existed. Everything here is pure.
"""

from __future__ import annotations

import base64
import re
import secrets
import urllib.parse

#: Request header that selects a tunnel without wildcard DNS; never forwarded.
TUNNEL_HEADER = "Backstream-Tunnel"
#: Handshake header carrying the name a client asks for, and the name it was given.
NAME_HEADER = "Backstream-Name"
#: Handshake response header: the public URL of the client's tunnel.
URL_HEADER = "Backstream-Url"

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def check_name(text: str) -> str:
    """``text`` as a tunnel name (lower-cased); ValueError if it is not a DNS label."""
    name = text.strip().lower()
    if _LABEL.fullmatch(name) is None:
        raise ValueError(
            f"invalid tunnel name {text[:70]!r}: use 1-63 of a-z, 0-9 and '-', "
            "not starting or ending with '-'"
        )
    return name


def random_name() -> str:
    """An unguessable name: 10 characters of lower-case base32, 50 random bits."""
    return base64.b32encode(secrets.token_bytes(7)).decode("ascii")[:10].lower()


def route(host: str, header: str | None, domain: str) -> str:
    """The tunnel a request is for: ``""`` is the default tunnel.

    The ``Backstream-Tunnel`` header wins (ValueError when it is not a name);
    else, with a ``domain``, a Host ``NAME.domain`` (any case, any port, a
    trailing dot) names the tunnel ``NAME``; anything else is the default one.
    A Host deeper under the domain (``a.b.domain``) is returned as ``a.b``,
    which no tunnel can be named, so it is answered as unknown.
    """
    if header is not None:
        return check_name(header)
    if not domain:
        return ""
    hostname = _hostname(host)
    if hostname.endswith("." + domain):
        return hostname[: -len(domain) - 1]
    return ""


def _hostname(host: str) -> str:
    """``"MyApp.Example.COM.:8080"`` -> ``"myapp.example.com"``; ``[::1]:80`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0].rstrip(".") if ":" in host else host.rstrip(".")


def normalize_domain(domain: str) -> str:
    """``--domain``: ``"Tunnel.Example.com."`` -> ``"tunnel.example.com"``; ValueError if bad."""
    text = domain.strip().lower().rstrip(".")
    if text and not all(_LABEL.fullmatch(label) for label in text.split(".")):
        raise ValueError(f"invalid domain {domain!r}: expected a DNS name")
    return text


def public_url(name: str, domain: str, public: str, scheme: str, host: str) -> str:
    """Where tunnel ``name`` is reached, as told to its client.

    ``public`` (``--public-url``) gives the scheme and port for servers behind a
    TLS terminator; otherwise they are those the client reached this server
    with (``scheme``, and the port of the handshake's ``host``). With a
    ``domain``, a named tunnel's host is ``NAME.domain``; otherwise the URL is
    the server's own.
    """
    if public:
        parts = urllib.parse.urlsplit(public)
        scheme, netloc = parts.scheme, parts.netloc
    else:
        netloc = host
    if not (name and domain):
        return f"{scheme}://{netloc}"
    port = urllib.parse.urlsplit(f"{scheme}://{netloc}").port
    default = {"http": 80, "https": 443}.get(scheme)
    suffix = f":{port}" if port is not None and port != default else ""
    return f"{scheme}://{name}.{domain}{suffix}"
