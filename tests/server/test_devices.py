"""The CPU fingerprint follows the bytes: replicas whose MKL takes other code paths report other fingerprints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import initserve
from tests.conftest import start_server

SHAPE = (300, 200)
SEED = 9
LOCAL_SECONDS = 120.0
LOCAL_ORTHOGONAL = f"""
import sys, torch
torch.set_num_threads(1)
t = torch.nn.init.orthogonal_(torch.empty{SHAPE}, generator=torch.Generator().manual_seed({SEED}))
sys.stdout.buffer.write(bytes(t.reshape(-1).view(torch.uint8).tolist()))
"""


def local_orthogonal(mkl_cbwr: str | None) -> bytes:
    """orthogonal_ in a fresh process (MKL reads MKL_CBWR once, at start) with one intra-op thread."""
    env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    if mkl_cbwr is not None:
        env["MKL_CBWR"] = mkl_cbwr
    done = subprocess.run([sys.executable, "-c", LOCAL_ORTHOGONAL], capture_output=True, env=env, timeout=LOCAL_SECONDS)
    assert done.returncode == 0, done.stderr
    return done.stdout


def raw(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.reshape(-1).view(torch.uint8).tolist())


@pytest.mark.parametrize("mkl_cbwr", ["AVX2", "COMPATIBLE"])
def test_mkl_code_paths_change_orthogonals_bytes_and_the_fingerprint(server, mkl_cbwr: str) -> None:
    assert "MKL_CBWR" not in os.environ  # the session's server runs MKL's automatic choice
    pinned = start_server(env={"MKL_CBWR": mkl_cbwr})
    try:
        with server.client() as default_client, pinned.client() as pinned_client:
            default = default_client.fetch(SHAPE, "orthogonal", seed=SEED)
            other = pinned_client.fetch(SHAPE, "orthogonal", seed=SEED)
            # Each replica keeps the contract under its own environment ...
            assert raw(default.tensor) == local_orthogonal(None)
            assert raw(other.tensor) == local_orthogonal(mkl_cbwr)
            # ... the bytes differ between them, and so do the fingerprints that clients can require,
            assert raw(default.tensor) != raw(other.tensor)
            assert default.device.fingerprint != other.device.fingerprint
            assert default.device.capability == other.device.capability  # where ATen's capability cannot tell
            with pytest.raises(initserve.FailedPrecondition, match="device fingerprint mismatch"):
                pinned_client.fetch(
                    SHAPE, "orthogonal", seed=SEED, require_device_fingerprint=default.device.fingerprint
                )
    finally:
        pinned.stop()


def test_the_fingerprint_is_stable_across_processes(server) -> None:
    again = start_server()
    try:
        with server.client() as first, again.client() as second:
            assert first.describe().devices[0].fingerprint == second.describe().devices[0].fingerprint
    finally:
        again.stop()
