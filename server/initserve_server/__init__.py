"""initserve server: torch.nn.init as a gRPC service (``initserve-server``, ``python -m initserve_server``)."""

import warnings

# torch warns at import when NumPy is absent; the server never uses NumPy, so the line is only noise in its logs.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

__version__ = "0.1.0"
