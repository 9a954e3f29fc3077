"""The shared-secret check for tunnel clients (``--token``), for users who write no Rego.

The client sends the secret in its own handshake header, never in
``Authorization``, so it cannot be mistaken for a credential of the local app
and does not change who owns a tunnel name. Both sides are hashed before the
comparison, so it takes the same time whatever is presented, its length included.
"""

from __future__ import annotations

import hashlib
import hmac

#: The handshake header carrying the token; never forwarded, masked in every log line.
TOKEN_HEADER = "Backstream-Token"


def matches(presented: str | None, expected: str) -> bool:
    """Whether ``presented`` is ``expected``, compared in constant time."""
    if presented is None:
        return False
    given = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    wanted = hashlib.sha256(expected.encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(given, wanted)
