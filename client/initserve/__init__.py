"""initserve: torch.nn.init as a gRPC service — the client SDK.

    import initserve
    with initserve.Client("localhost:50051") as client:
        w = client.kaiming_normal((256, 128), seed=7, mode="fan_out", nonlinearity="relu")

Every tensor returned equals, bit for bit, ``torch.nn.init.<scheme>_`` run with
``torch.Generator(device).manual_seed(seed)`` under the server's torch.
"""

from torch.nn.init import calculate_gain

from initserve._calls import draw_seed
from initserve._client import Client
from initserve._errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InitServeError,
    IntegrityError,
    Internal,
    InvalidArgument,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_grpc_error,
)
from initserve._memory import MemoryPolicy
from initserve._modules import Rule, Sharding
from initserve._pipeline import InitResult
from initserve._requests import TensorSpec
from initserve._retry import RetryPolicy
from initserve_protocol.checksum import CHECKSUM_ALGORITHM, tensor_checksum
from initserve_protocol.schemes import SCHEMES
from initserve_protocol.seeds import derive_seed
from initserve_protocol.slices import Range, Shard, shard_bounds

__version__ = "0.1.0"

__all__ = [
    "CHECKSUM_ALGORITHM",
    "SCHEMES",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InitResult",
    "InitServeError",
    "IntegrityError",
    "Internal",
    "InvalidArgument",
    "MemoryPolicy",
    "OutOfRange",
    "PermissionDenied",
    "Range",
    "ResourceExhausted",
    "RetryPolicy",
    "Rule",
    "Shard",
    "Sharding",
    "TensorSpec",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "calculate_gain",
    "derive_seed",
    "draw_seed",
    "from_grpc_error",
    "shard_bounds",
    "tensor_checksum",
]
