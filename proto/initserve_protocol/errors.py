"""The error contract: the trailing-metadata keys a server sets beside its status, and what they may carry.

Status codes carry the kind of failure; these keys carry what the code alone cannot, as machine-readable values
(never message text): which exception torch raised, and why a request was refused where the code is ambiguous.
"""

from __future__ import annotations

# Trailing-metadata key in which the server names the exception torch raised.
TORCH_EXCEPTION_KEY = "initserve-torch-exception"
# Trailing-metadata key in which the server says why it refused, where the status code alone does not decide
# what a client does next; RegionReply.refusal carries the same kind of value on the shared-memory socket.
REFUSAL_KEY = "initserve-refusal"
# INVALID_ARGUMENT on InitUnary: the tensor is larger than InitUnary answers; use the Init stream.
UNARY_TOO_LARGE = "unary-too-large"
# FAILED_PRECONDITION: this server writes no shared memory (no --shared-memory-socket, or asked by name); fetch
# over gRPC from now on.
SHARED_MEMORY_OFF = "shared-memory-off"
# FAILED_PRECONDITION: no such region on this server (released, its connection closed, another replica's);
# nothing was written; fetch over gRPC this time.
NO_SUCH_REGION = "no-such-region"
# RegionReply (closed): the socket has as many connections as it may; try again later.
TOO_MANY_CONNECTIONS = "too-many-connections"
# RegionReply: this connection holds as many regions or bytes as one may; release some, then register again.
CONNECTION_LIMIT = "connection-limit"
# The only exception types the client re-creates from that key.
TORCH_EXCEPTION_TYPES: frozenset[str] = frozenset(
    {
        "ValueError",
        "TypeError",
        "RuntimeError",
        "NotImplementedError",
        "ZeroDivisionError",
        "IndexError",
        "OverflowError",
    }
)
# How much of a tensor's name an InitMany error repeats.
MAX_LABEL_NAME_CHARS = 64


def tensor_label(position: int, name: str) -> str:
    """How an InitMany error names its tensor, on the server and in the SDK alike: ``tensors[3] ('layer.weight'): ``
    (a name over MAX_LABEL_NAME_CHARS characters shortened, with "..."), or ``tensors[3]: `` when it has none."""
    if not name:
        return f"tensors[{position}]: "
    shown = name if len(name) <= MAX_LABEL_NAME_CHARS else name[:MAX_LABEL_NAME_CHARS] + "..."
    return f"tensors[{position}] ({shown!r}): "
