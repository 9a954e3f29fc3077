"""TLS contexts: the server's certificate (reloaded in place), the client's trust.

On ``SIGHUP`` the server loads the renewed files into a new ``SSLContext``
and, only if they load, uses it for the next handshakes: connections already
open keep theirs, and a broken file (or a certificate with the wrong key)
leaves the old context in force, untouched. Loading into the live context
instead would leave it with the new certificate and no key.
The client verifies the server like a browser does (system trust store and
host name) unless told otherwise, and says so at every connect when it is.
"""

from __future__ import annotations

import logging
import ssl

from .errors import ConfigError

log = logging.getLogger("backstream.server")


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context holding ``cert`` and ``key``, or ``ConfigError``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    _load(context, cert, key)
    return context


def reload(cert: str, key: str) -> ssl.SSLContext | None:
    """A new context with the renewed files, or None (logged) if they do not load."""
    try:
        context = server_context(cert, key)
    except ConfigError as e:
        log.error("certificate not reloaded, the old one stays in force: %s", e)
        return None
    log.info("certificate reloaded cert=%s", cert)
    return context


def _load(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise ConfigError(f"cannot read certificate or key: {e.filename}: {e.strerror}") from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"invalid certificate {cert!r} or key {key!r}: {e}") from None


def client_context(ca: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """How a client checks a TLS peer: ``ca`` (else the system store), or not at all."""
    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except FileNotFoundError as e:
            raise ConfigError(f"cannot read CA file: {e.filename}: {e.strerror}") from None
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"invalid CA file {ca!r}: {e}") from None
    return context
