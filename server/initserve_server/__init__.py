"""initserve server: torch.nn.init as a gRPC service (``initserve-server``, ``python -m initserve_server``)."""

__version__ = "0.1.0"
