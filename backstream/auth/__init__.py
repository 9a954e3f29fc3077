"""Authorization: one async decision, backends registered by name.

The server asks ``await authorizer.decide(package, input)`` for the tunnel
client's handshake (package ``auth.client``) and for every public request
(package ``auth.server``), in ``prepare()``, before any body byte is read.
Backends know nothing of Tornado; they are imported lazily so that an optional
dependency (regopy, opa-python-client) is only imported when chosen.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

CLIENT_PACKAGE = "auth.client"
SERVER_PACKAGE = "auth.server"


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

    @abc.abstractmethod
    async def decide(self, package: str, input: Mapping[str, Any]) -> Decision:
        """Evaluate ``package`` for ``input``; never raises, fails closed."""

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


def build_input(
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Sequence[tuple[str, str]],
    remote: str,
    host: str,
) -> dict[str, Any]:
    """The policy input document (see doc/policy.md). Filled in by the auth issue."""
    raise NotImplementedError
