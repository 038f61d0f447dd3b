"""Top-k pruning of z, the compression ("DC") baseline (docs/papers.md A.5, C.6, D.5, D.7).

Per sample, the ``ratio`` fraction of z's entries with the smallest magnitude is zeroed and the
rest is sent unchanged (exactly ``round(ratio * m)`` entries of the m per sample; ties are broken
by ``torch.topk``). This is deliberately *per sample*: the CEM repo's ``prune_defense`` ranks the
whole batch tensor, which makes each sample's sparsity depend on its batch-mates (docs/papers.md A.7 item
5), and Fu et al.'s ``TensorPruner`` likewise thresholds a whole tensor. Ranking by magnitude
follows ``TensorPruner`` (for the Sigmoid head z >= 0, so magnitude and value agree). Applied in
training and at inference; the gradient flows through the kept entries.
"""

from __future__ import annotations

from typing import Any

import torch

from defenses.base import Defense, register


def keep_mask(z: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the entries kept per sample (the largest ``1 - ratio`` by magnitude)."""
    flat = z.detach().reshape(len(z), -1)
    m = flat.shape[1]
    drop = int(round(ratio * m))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if drop > 0:
        idx = flat.abs().topk(drop, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask.reshape(z.shape)


@register
class TopK(Defense):
    name = "topk"

    def __init__(self, ratio: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio (the fraction zeroed) must be in [0, 1), got {ratio}")
        self.ratio = ratio

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.ratio == 0.0:
            return z
        return z * keep_mask(z, self.ratio)

    def public_params(self) -> dict[str, Any]:
        return {"ratio": self.ratio}
