"""Client's scheme methods as type checkers see them; generated: ``python -m tests.scheme_methods --write``.

At run time the methods are made from the scheme table (``initserve._client``); this class only declares their
signatures, so that ``client.kaiming_normal(...)`` is checked like any method. Do not edit by hand.
"""

from __future__ import annotations

import torch

from initserve._requests import ShapeLike


class SchemeMethods:
    """One new-tensor method and one in-place twin per scheme, with torch.nn.init's parameters and defaults."""

    def uniform(
        self,
        shape: ShapeLike,
        *,
        a: float = 0.0,
        b: float = 1.0,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.uniform_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def uniform_(
        self,
        tensor: torch.Tensor,
        a: float = 0.0,
        b: float = 1.0,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.uniform_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def normal(
        self,
        shape: ShapeLike,
        *,
        mean: float = 0.0,
        std: float = 1.0,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.normal_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def normal_(
        self,
        tensor: torch.Tensor,
        mean: float = 0.0,
        std: float = 1.0,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.normal_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def trunc_normal(
        self,
        shape: ShapeLike,
        *,
        mean: float = 0.0,
        std: float = 1.0,
        a: float = -2.0,
        b: float = 2.0,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.trunc_normal_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def trunc_normal_(
        self,
        tensor: torch.Tensor,
        mean: float = 0.0,
        std: float = 1.0,
        a: float = -2.0,
        b: float = 2.0,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.trunc_normal_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def constant(
        self,
        shape: ShapeLike,
        *,
        val: float,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.constant_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def constant_(
        self,
        tensor: torch.Tensor,
        val: float,
        *,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.constant_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def ones(
        self,
        shape: ShapeLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.ones_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def ones_(
        self,
        tensor: torch.Tensor,
        *,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.ones_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def zeros(
        self,
        shape: ShapeLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.zeros_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def zeros_(
        self,
        tensor: torch.Tensor,
        *,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.zeros_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def eye(
        self,
        shape: ShapeLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.eye_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def eye_(
        self,
        tensor: torch.Tensor,
        *,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.eye_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def dirac(
        self,
        shape: ShapeLike,
        *,
        groups: int = 1,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.dirac_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def dirac_(
        self,
        tensor: torch.Tensor,
        groups: int = 1,
        *,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.dirac_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def xavier_uniform(
        self,
        shape: ShapeLike,
        *,
        gain: float = 1.0,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.xavier_uniform_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def xavier_uniform_(
        self,
        tensor: torch.Tensor,
        gain: float = 1.0,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.xavier_uniform_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def xavier_normal(
        self,
        shape: ShapeLike,
        *,
        gain: float = 1.0,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.xavier_normal_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def xavier_normal_(
        self,
        tensor: torch.Tensor,
        gain: float = 1.0,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.xavier_normal_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def kaiming_uniform(
        self,
        shape: ShapeLike,
        *,
        a: float = 0,
        mode: str = "fan_in",
        nonlinearity: str = "leaky_relu",
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.kaiming_uniform_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def kaiming_uniform_(
        self,
        tensor: torch.Tensor,
        a: float = 0,
        mode: str = "fan_in",
        nonlinearity: str = "leaky_relu",
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.kaiming_uniform_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def kaiming_normal(
        self,
        shape: ShapeLike,
        *,
        a: float = 0,
        mode: str = "fan_in",
        nonlinearity: str = "leaky_relu",
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.kaiming_normal_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def kaiming_normal_(
        self,
        tensor: torch.Tensor,
        a: float = 0,
        mode: str = "fan_in",
        nonlinearity: str = "leaky_relu",
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.kaiming_normal_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def orthogonal(
        self,
        shape: ShapeLike,
        *,
        gain: float = 1,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.orthogonal_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def orthogonal_(
        self,
        tensor: torch.Tensor,
        gain: float = 1,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.orthogonal_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import

    def sparse(
        self,
        shape: ShapeLike,
        *,
        sparsity: float,
        std: float = 0.01,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """A new CPU tensor of ``shape`` filled by ``torch.nn.init.sparse_`` on the server."""
        raise NotImplementedError  # made from the scheme table at import

    def sparse_(
        self,
        tensor: torch.Tensor,
        sparsity: float,
        std: float = 0.01,
        generator: torch.Generator | None = None,
        *,
        seed: int | None = None,
        device: str = "cpu",
        timeout: float | None = None,
    ) -> torch.Tensor:
        """Drop-in for ``torch.nn.init.sparse_``: fills ``tensor`` in place."""
        raise NotImplementedError  # made from the scheme table at import
