"""The SDK's exceptions, keyed by gRPC status code, and the one lookup that turns an RpcError into them.

What torch itself rejects comes back as the exception torch raises (ValueError, RuntimeError, ...) with
torch's message: the server names the exception type in trailing metadata, and only builtin types on an
allowlist are ever re-created here. Nothing received is ever unpickled or evaluated.
"""

from __future__ import annotations

import builtins
from typing import Any

from initserve_protocol.errors import REFUSAL_KEY, TORCH_EXCEPTION_KEY, TORCH_EXCEPTION_TYPES


class InitServeError(Exception):
    """Base of every error the SDK raises for a failed call; ``code`` is the gRPC status code name."""

    code: str | None = None
    # Why the server refused, machine-readable (trailing metadata initserve_protocol.errors.REFUSAL_KEY), where
    # the code alone does not decide what to do next; None when it said nothing more.
    refusal: str | None = None

    def __init__(self, message: str, *, code: str | None = None, refusal: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.refusal = refusal


class InvalidArgument(InitServeError, ValueError):
    """The request is malformed or exceeds a per-request limit (INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"


class FailedPrecondition(InitServeError):
    """The server cannot generate as asked: no such CUDA device, or a device-fingerprint mismatch."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(InitServeError):
    """A server-wide limit or memory budget refused the request (RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(InitServeError):
    """The server could not be reached or went away (UNAVAILABLE)."""

    code = "UNAVAILABLE"


class DeadlineExceeded(InitServeError):
    """The call's timeout passed before the tensor was complete (DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(InitServeError):
    code = "CANCELLED"


class Unauthenticated(InitServeError):
    code = "UNAUTHENTICATED"


class PermissionDenied(InitServeError):
    code = "PERMISSION_DENIED"


class Unimplemented(InitServeError):
    """The server does not implement this call (an older or newer API version)."""

    code = "UNIMPLEMENTED"


class OutOfRange(InitServeError, ValueError):
    """A resume offset past the tensor's end (OUT_OF_RANGE)."""

    code = "OUT_OF_RANGE"


class Internal(InitServeError):
    """The server failed in a way it did not expect; the request may be retried or reported."""

    code = "INTERNAL"


class IntegrityError(InitServeError):
    """The received stream is not a whole, intact tensor: short, out of order, or its checksum differs.

    Raised by the client before it returns anything: a result that could be wrong is never returned.
    ``recovery`` says what a retry may do: ``"resume"`` (the bytes before ``received`` are verified, so
    a new stream may start there), ``"restart"`` (the whole-tensor checksum failed: start again from byte 0)
    or ``"none"`` (the server describes a different tensor than asked, or replicas disagree).
    """

    def __init__(self, message: str, *, received: int = 0, recovery: str = "none") -> None:
        super().__init__(message)
        self.received = received
        self.recovery = recovery


_BY_CODE: dict[str, type[InitServeError]] = {
    cls.code: cls  # type: ignore[misc]
    for cls in (
        InvalidArgument,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
        PermissionDenied,
        Unimplemented,
        OutOfRange,
        Internal,
    )
}


def trailing_value(rpc_error: Any, wanted: str) -> str | None:
    """The value of trailing-metadata key ``wanted`` on an RpcError, or None."""
    trailing = rpc_error.trailing_metadata() if hasattr(rpc_error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == wanted and isinstance(value, str):
            return value
    return None


def from_grpc_error(rpc_error: Any) -> Exception:
    """The exception to raise for a ``grpc.RpcError`` (raise it ``from`` the original)."""
    code = rpc_error.code()
    code_name = getattr(code, "name", str(code))
    message = rpc_error.details() or code_name
    if code_name == "INVALID_ARGUMENT":
        torch_exception = trailing_value(rpc_error, TORCH_EXCEPTION_KEY)
        if torch_exception in TORCH_EXCEPTION_TYPES:
            return getattr(builtins, torch_exception)(message)
    cls = _BY_CODE.get(code_name, InitServeError)
    return cls(message, code=code_name, refusal=trailing_value(rpc_error, REFUSAL_KEY))
