"""Authorization: one async decision, backends registered by name.

The server asks ``await authorizer.decide(package, input)`` for the tunnel
client's handshake (package ``auth.client``) and for every public request
(package ``auth.server``), in ``prepare()``, before any body byte is read.
Backends know nothing of Tornado; they are imported lazily so that an optional
dependency (regopy, opa-python-client) is only imported when chosen.

Both Rego backends read the *package document* (``data.auth.client``) and take
``allow`` from it, so that the embedded engine and a remote OPA agree on what
"undefined" means: a package that is not loaded, or an ``allow`` that no rule
set, denies. Only ``allow: true`` (the boolean) allows.

The start-up sequence the server follows::

    authorizer = create_authorizer(backend, policy_paths, opa_url, opa_token)  # ConfigError
    for package in await authorizer.missing_packages():
        log.warning(...)                # that package now denies everything it guards
    decision = await authorizer.decide(SERVER_PACKAGE, build_input(...))
    if authorizer.changed(): await authorizer.reload()   # SIGHUP or --policy-reload
    await authorizer.close()
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from backstream.errors import ConfigError
from backstream.relay import normalize_path

CLIENT_PACKAGE = "auth.client"
SERVER_PACKAGE = "auth.server"
#: The packages the server queries; each one missing denies what it guards.
PACKAGES: tuple[str, ...] = (CLIENT_PACKAGE, SERVER_PACKAGE)


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of one evaluation.

    ``allowed`` is the only thing callers act on. ``error`` is set when the
    engine failed (the caller must answer 500 and log it apart from a deny);
    ``detail`` is for the log only.
    """

    allowed: bool
    error: str | None = None
    detail: str = ""


class Authorizer(abc.ABC):
    """A policy engine behind one async method."""

    @classmethod
    def from_options(
        cls,
        policy_paths: Sequence[str],
        opa_url: str | None,
        opa_token: str | None,
    ) -> Authorizer:
        """Build the backend from the serve options; raises ``ConfigError``."""
        raise NotImplementedError

    @abc.abstractmethod
    async def decide(self, package: str, input: Mapping[str, Any]) -> Decision:
        """Evaluate ``package`` for ``input``; never raises, fails closed."""

    async def missing_packages(self) -> list[str]:
        """The packages of ``PACKAGES`` that are not loaded (each denies everything)."""
        return []

    def changed(self) -> bool:
        """Whether the policy sources changed since the last (attempted) load."""
        return False

    async def reload(self) -> None:  # noqa: B027 - optional hook
        """Reload policies atomically (a broken set raises and keeps the old one)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions, threads and other resources."""


#: name -> "module:factory", imported only when chosen (as uvicorn does).
BACKENDS: dict[str, str] = {
    "none": "backstream.auth.none:NoAuth",
    "rego": "backstream.auth.rego:RegoAuthorizer",
    "opa": "backstream.auth.opa:OpaAuthorizer",
}


def load_backend(name: str) -> type[Authorizer]:
    """Import the backend class registered as ``name``."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown auth backend {name!r} (choose from {', '.join(sorted(BACKENDS))})"
        ) from None
    module_name, _, attr = target.partition(":")
    cls: type[Authorizer] = getattr(importlib.import_module(module_name), attr)
    return cls


def create_authorizer(
    backend: str | None,
    policy_paths: Sequence[str],
    opa_url: str | None = None,
    opa_token: str | None = None,
) -> Authorizer:
    """The authorizer the serve options ask for; ``ConfigError`` on any start-up problem.

    ``backend`` None means ``rego`` when policy paths are given, else ``none``.
    """
    name = backend or ("rego" if policy_paths else "none")
    try:
        cls = load_backend(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except ImportError as exc:
        raise ConfigError(f"auth backend {name!r} is not installed: {exc}") from None
    return cls.from_options(tuple(policy_paths), opa_url, opa_token)


def canonical_header_name(name: str) -> str:
    """``x-api-key`` -> ``X-Api-Key``, as Tornado and Go canonicalize header names."""
    return "-".join(part.capitalize() for part in name.split("-"))


def build_input(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Sequence[tuple[str, str]],
    remote: str,
    host: str,
    peer: str | None = None,
    **extra: str,
) -> dict[str, Any]:
    """The policy input document (see doc/policy.md).

    ``query`` and ``headers`` are ordered (name, value) pairs. ``header`` keeps
    the first value of each canonical header name (what the original tool's
    policies read as ``input.header.Authorization``); ``headers`` keeps them all.
    ``path`` is the raw path exactly as it will be forwarded, without the query;
    ``path_normalized`` the same decoded and resolved, for deny-lists.
    ``remote`` is the caller (behind trusted proxies, from ``--forwarded-header``),
    ``peer`` the TCP peer (``remote`` when not given). ``extra`` holds what one
    package alone sees: ``name`` (``auth.client``: the name asked for) and
    ``tunnel`` (``auth.server``: the tunnel the request is routed to).
    """
    header: dict[str, str] = {}
    all_headers: dict[str, list[str]] = {}
    for name, value in headers:
        key = canonical_header_name(name)
        header.setdefault(key, value)
        all_headers.setdefault(key, []).append(value)
    params: dict[str, list[str]] = {}
    for name, value in query:
        params.setdefault(name, []).append(value)
    return {
        "method": method,
        "path": path,
        "path_normalized": normalize_path(path),
        "header": header,
        "headers": all_headers,
        "query": params,
        "remote": remote,
        "peer": remote if peer is None else peer,
        "host": host,
        **extra,
    }


def decision_from_document(package: str, document: Any, *, defined: bool) -> Decision:
    """Read ``allow`` from a package document; shared by both Rego backends.

    ``defined`` is False when the engine answered "undefined" (the package is
    not loaded). A non-boolean ``allow`` is a policy bug: fail closed as an error.
    """
    if not defined:
        return Decision(False, detail=f"package {package} is not loaded")
    if not isinstance(document, dict):
        return Decision(False, error=f"data.{package} is not an object")
    allow = document.get("allow", False)
    if not isinstance(allow, bool):
        return Decision(False, error=f"data.{package}.allow is {type(allow).__name__}, not boolean")
    return Decision(allow, detail="allowed" if allow else "not allowed by policy")
