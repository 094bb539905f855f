"""The error contract: the trailing-metadata keys a server sets beside its status, and what they may carry.

Status codes carry the kind of failure; these keys carry what the code alone cannot, as machine-readable values
(never message text): which exception torch raised, and why a request was refused where the code is ambiguous.
"""

from __future__ import annotations

# Trailing-metadata key in which the server names the exception torch raised.
TORCH_EXCEPTION_KEY = "initserve-torch-exception"
# Trailing-metadata key in which the server says why it refused, where the status code alone does not:
# UNARY_TOO_LARGE on INVALID_ARGUMENT means "this tensor is larger than InitUnary answers: use the Init stream".
REFUSAL_KEY = "initserve-refusal"
UNARY_TOO_LARGE = "unary-too-large"
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
