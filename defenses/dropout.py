"""Feature dropout: zero each entry of z with probability p (docs/papers.md A.5 / D.5, CEM's ``dropoutP``).

As in the CEM repo's ``dropout_defense`` (``masked_fill(rand < p, 0)``) the mask is drawn in
training *and* at inference, so the cloud never sees a complete feature, and the kept entries
are *not* rescaled by 1/(1-p): unlike ``nn.Dropout`` this is an obfuscation, not a regulariser,
and rescaling would also push z out of the head's Sigmoid range [0, 1] that noise levels are
calibrated on. The gradient flows through the kept entries only. CEM's experiments pair it with
small noise (σ = 0.01), e.g. ``"dropout(p=0.2)+noise(sigma=0.01)"``.
"""

from __future__ import annotations

from typing import Any

import torch

from defenses.base import Defense, register


@register
class Dropout(Defense):
    name = "dropout"

    def __init__(self, p: float = 0.2) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return z
        return z.masked_fill(torch.rand_like(z) < self.p, 0.0)

    def public_params(self) -> dict[str, Any]:
        return {"p": self.p}
