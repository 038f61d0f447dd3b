"""Gaussian noise corruption: CEM's primary base defense (z + sigma * N(0, I)).

Noise is added in training and at inference alike, as in the CEM repo, so the cloud never sees
a clean feature. With a Sigmoid-bounded head, sigma is on the scale of z's [0, 1] range.
"""

from __future__ import annotations

from typing import Any

import torch

from defenses.base import Defense, register


@register
class Noise(Defense):
    name = "noise"

    def __init__(self, sigma: float = 0.05) -> None:
        super().__init__()
        if not 0.0 <= sigma <= 10.0:
            raise ValueError(f"sigma must be in [0, 10], got {sigma}")
        self.sigma = sigma

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.sigma * torch.randn_like(z) if self.sigma > 0 else z

    def public_params(self) -> dict[str, Any]:
        return {"sigma": self.sigma}
