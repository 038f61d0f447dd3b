"""NoPeek: penalise the distance correlation between the input x and the features z.

Vepakomma et al. ("NoPeek", 2020) add α·dCor(x, z) to the client's loss, computed on the
batch, so that z keeps the label information the task needs but as little of the geometry of
x as possible (docs/papers.md A.5: CEM's ``nopeek`` flag; D.5). The loss sees the clean z (before any
noise / dropout) and is differentiable w.r.t. it; nothing changes in what is sent.

``alpha`` is the effective weight of the term: the CEM repo multiplies its
``AT_regularization_strength`` by 0.1 (×10 on CIFAR-10), so ``alpha = 0.1`` is the repo's
strength 1 on non-CIFAR-10 data.

dCor is the sample distance correlation of Székely et al.: with pairwise Euclidean distance
matrices a (of flattened x) and b (of flattened z), double-centred to A and B,
dCov²(x, z) = mean(A·B), and dCor = sqrt(dCov²(x, z) / sqrt(dCov²(x, x)·dCov²(z, z))) in [0, 1]
(the repo's ``dist_corr``, not its square).
"""

from __future__ import annotations

import torch

from defenses.base import Defense, register

_EPS = 1e-12


def _centred_distances(v: torch.Tensor) -> torch.Tensor:
    """Double-centred Euclidean distance matrix of the rows of ``v`` (n, d)."""
    sq = (v * v).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * v @ v.T).clamp_min(0.0)
    off = 1.0 - torch.eye(len(v), dtype=v.dtype, device=v.device)
    d = torch.sqrt(d2 * off + _EPS) * off  # zero diagonal, finite gradient everywhere
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of two batches (first dim = samples), differentiable."""
    if len(x) != len(z):
        raise ValueError(f"batches differ in size: {len(x)} vs {len(z)}")
    a = _centred_distances(x.reshape(len(x), -1).to(torch.float64))
    b = _centred_distances(z.reshape(len(z), -1).to(torch.float64))
    dcov_xz = (a * b).mean().clamp_min(0.0)
    dvar = ((a * a).mean() * (b * b).mean()).sqrt()
    return torch.sqrt(dcov_xz / (dvar + _EPS) + _EPS).to(z.dtype)


@register
class NoPeek(Defense):
    name = "nopeek"

    def __init__(self, alpha: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1e3:
            raise ValueError(f"alpha must be in [0, 1000], got {alpha}")
        self.alpha = alpha
        self._sum = 0.0
        self._batches = 0

    def loss(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0.0 or len(z) < 2:
            return z.new_zeros(())
        dcor = distance_correlation(x, z)
        if self.training:
            self._sum += float(dcor.detach())
            self._batches += 1
        return self.alpha * dcor

    def report(self) -> dict[str, float]:
        """Mean batch dCor(x, z) over this round's training batches."""
        return {"dcor": self._sum / self._batches if self._batches else float("nan")}
