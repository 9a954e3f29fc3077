"""No authorization: everything is allowed, as in the original tool without ``-p``.

It exists as a backend (rather than ``authorizer is None`` checks in the
server) so that the request path is the same with and without policies; the
server warns at start-up that anyone may connect as a tunnel client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from backstream.auth import Authorizer, Decision
from backstream.errors import ConfigError

_ALLOWED = Decision(True, detail="no authorization configured")


class NoAuth(Authorizer):
    """Allows every request and every tunnel client."""

    @classmethod
    def from_options(
        cls,
        policy_paths: Sequence[str],
        opa_url: str | None,
        opa_token: str | None,
    ) -> NoAuth:
        if policy_paths:
            # Policies given but ignored would be a silent hole: refuse instead.
            raise ConfigError("--auth none cannot be combined with --policy")
        return cls()

    async def decide(self, package: str, input: Mapping[str, Any]) -> Decision:
        return _ALLOWED
