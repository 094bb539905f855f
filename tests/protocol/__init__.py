"""The contract package on its own: codec, checksum, seeds, and the golden digests of the contract's bytes."""
