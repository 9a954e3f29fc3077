"""Where a public request goes and whether it may: shared by both public handlers.

The order matters: the target is reduced to the origin-form the local app will
receive, the tunnel is chosen from it and the Host, and only then does the
policy decide, seeing both; the pick of a tunnel member comes last, so that a
denied request never takes a slot anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tornado.httputil import HTTPServerRequest

from .. import errors, relay, routing
from .gate import Gate
from .tunnel import Tunnel, Tunnels

if TYPE_CHECKING:
    from .peers import PeerRoute


def destination(request: HTTPServerRequest, domain: str) -> tuple[str, str]:
    """(origin-form target, tunnel name) of a public request; BadRequest if it has none."""
    try:
        target = relay.origin_form(request.uri or "")
        header = request.headers.get(routing.TUNNEL_HEADER)
        return target, routing.route(request.host or "", header, domain)
    except ValueError as e:
        raise errors.BadRequest(str(e), reason=str(e)) from None


async def admit(
    request: HTTPServerRequest,
    target: str,
    name: str,
    tunnels: Tunnels,
    gate: Gate | None,
    no_client_code: int,
) -> Tunnel | PeerRoute:
    """The tunnel member for the request; ``StreamError`` (403, 404, 500, 503) if none.

    A local member first; else, in a cluster, the instance that holds the name.
    """
    if gate is not None:
        await gate.check_public(request, target, name)
    try:
        return tunnels.pick(name, no_client_code)
    except (errors.UnknownTunnel, errors.NoClient):
        if tunnels.remote is None:
            raise
        route = await tunnels.remote.route(name)
        if route is None:
            raise
        return route
