"""Local differential privacy on z: i.i.d. Laplace noise of scale b = 1/epsilon (docs/papers.md A.5, C.6).

The Laplace mechanism adds Lap(Δ/ε) per entry; we take the sensitivity Δ = 1 because the head
ends in a Sigmoid, so every entry of z lies in [0, 1] and changes by at most 1 between any two
inputs (the per-entry view of Fu et al.'s ``DPLaplacianNoiseApplyer`` and CEM's
``local_dp_laplace``, both "scale 1/ε"). This is a per-entry guarantee: composed over the m
entries of z the sample-level budget is m·ε, which is why useful accuracy needs large ε.
The noise is added in training and at inference alike (like ``noise``); its standard deviation
is sqrt(2)/ε, exposed to CEM through :meth:`noise_std` so that ``"laplace(epsilon=20)+cem"``
uses the matching noise power.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from defenses.base import Defense, register


def laplace_like(z: torch.Tensor, scale: float) -> torch.Tensor:
    """I.i.d. Laplace(0, scale) noise shaped like ``z`` (difference of two exponentials)."""
    return scale * (torch.empty_like(z).exponential_() - torch.empty_like(z).exponential_())


@register
class Laplace(Defense):
    name = "laplace"

    def __init__(self, epsilon: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < epsilon <= 1e6:
            raise ValueError(f"epsilon must be in (0, 1e6], got {epsilon}")
        self.epsilon = epsilon
        self.scale = 1.0 / epsilon  # sensitivity 1 on z in [0, 1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + laplace_like(z, self.scale)

    def noise_std(self) -> float:
        """Standard deviation of the added noise (used by CEM as its sigma)."""
        return math.sqrt(2.0) * self.scale

    def public_params(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "scale": self.scale, "std": self.noise_std()}
