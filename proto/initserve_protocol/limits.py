"""Limits every server and client of the contract share; a server's own limits are in Describe's ``Limits``."""

from __future__ import annotations

# InitUnary answers a tensor of at most this many bytes from its offset in one message; a server with smaller
# messages says less (Limits.max_unary_bytes), and refuses larger with errors.UNARY_TOO_LARGE.
MAX_UNARY_BYTES = 1 << 20
