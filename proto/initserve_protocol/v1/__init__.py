"""Generated protobuf/gRPC stubs for initserve.v1 (``make proto``; never edited by hand)."""
