"""The one exception tree of backstream, and its mapping to HTTP status.

::

    BackstreamError                    (500)
     +-- ConfigError                   bad flags, policies or files at start-up
     +-- ProtocolError                 a malformed or unexpected frame: closes one tunnel
     +-- StreamError                   one relayed request failed; carries its status
          +-- BadRequest               (400) a target or tunnel header that cannot be served
          +-- NoClient                 (503, or the server's -c/--code)
          +-- UnknownTunnel            (404) no tunnel has the name asked for
          +-- ClientLost               (502) the tunnel closed with the request in flight
          +-- UpstreamUnreachable      (502) the local app refused or could not be reached
          +-- UpstreamTimeout          (504) the local app was slower than --timeout
          +-- InvalidResponse          (502) a response head that cannot be relayed
          +-- BodyTooLarge             (413)
          +-- RequestTimeout           (408) the public caller stopped sending its body
          +-- PolicyDenied             (403)
          +-- PolicyFailure            (500) the policy engine failed: fail closed

Each ``StreamError`` keeps ``reason`` (short, safe to send to the public caller)
apart from ``log_message`` (details for the log only), as Tornado's ``HTTPError``
does. The numeric ``code`` of each class is what ``RESET`` frames carry.
"""

from __future__ import annotations


class BackstreamError(Exception):
    """Base class of every error backstream raises on purpose."""


class ConfigError(BackstreamError):
    """Invalid configuration: the CLI prints it on one line and exits 2."""


class ProtocolError(BackstreamError):
    """The peer sent something the wire protocol does not allow."""


class StreamError(BackstreamError):
    """One relayed request failed with a known HTTP status."""

    status = 500
    reason = "Internal Server Error"
    #: The code carried by a RESET frame for this error (see ``protocol.ResetCode``).
    reset_code = 1

    def __init__(
        self, log_message: str = "", *, status: int | None = None, reason: str | None = None
    ) -> None:
        if reason is not None:
            self.reason = reason  # this one's answer; the status line keeps the class's
        super().__init__(log_message or self.reason)
        self.log_message = log_message or self.reason
        if status is not None:
            self.status = status


class BadRequest(StreamError):
    status = 400
    reason = "Bad Request"
    reset_code = 12


class NoClient(StreamError):
    status = 503
    reason = "No tunnel client is connected"
    reset_code = 2


class UnknownTunnel(StreamError):
    status = 404
    reason = "No tunnel has that name"
    reset_code = 11


class ClientLost(StreamError):
    status = 502
    reason = "The tunnel client disconnected"
    reset_code = 3


class UpstreamUnreachable(StreamError):
    status = 502
    reason = "The local app could not be reached"
    reset_code = 4


class UpstreamTimeout(StreamError):
    status = 504
    reason = "The local app did not answer in time"
    reset_code = 5


class InvalidResponse(StreamError):
    """The local app (or a hostile client) sent a head HTTP/1.1 cannot carry."""

    status = 502
    reason = "The local app sent an invalid response"
    reset_code = 10


class BodyTooLarge(StreamError):
    status = 413
    reason = "Request body too large"
    reset_code = 6


class RequestTimeout(StreamError):
    status = 408
    reason = "Request body timed out"
    reset_code = 13


class PolicyDenied(StreamError):
    status = 403
    reason = "Forbidden by policy"
    reset_code = 7


class PolicyFailure(StreamError):
    status = 500
    reason = "Policy evaluation failed"
    reset_code = 8


class Cancelled(StreamError):
    """The other side gave up on the stream (caller went away, server timed out)."""

    status = 499
    reason = "Request cancelled"
    reset_code = 9


STREAM_ERRORS: dict[int, type[StreamError]] = {
    cls.reset_code: cls
    for cls in (
        StreamError,
        BadRequest,
        NoClient,
        UnknownTunnel,
        ClientLost,
        UpstreamUnreachable,
        UpstreamTimeout,
        InvalidResponse,
        BodyTooLarge,
        RequestTimeout,
        PolicyDenied,
        PolicyFailure,
        Cancelled,
    )
}


def error_for_reset(code: int, message: str) -> StreamError:
    """The exception a RESET frame with ``code`` stands for (unknown codes: 502)."""
    cls = STREAM_ERRORS.get(code)
    if cls is None:
        return StreamError(message, status=502)
    return cls(message)
