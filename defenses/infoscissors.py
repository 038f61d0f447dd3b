"""InfoScissors' input-leakage regulariser (Duan et al., NeurIPS 2024; spec C.3, C.4, D.6).

A CLUB-style variational upper bound on the mutual information between the input x and the
feature z, with a client-side Gaussian decoder q(x|z) = N(g(z), s²I) (fixed s):

    I(z; x) <= E_p(x,z)[log q(x|z)] − E_p(x)p(z)[log q(x|z)]
             = (1 / 2s²) · ( E_{x' indep. z} ||x' − g(z)||² − E_{(x,z) paired} ||x − g(z)||² ).

Each batch (see :mod:`defenses.simulated`) the client first trains g by MSE on the paired
``(z.detach(), x)`` (maximum likelihood for q: the simulated Knowledge-Alignment attacker), then
the head minimises ``lam_x`` times the bound through g with frozen parameters: it pushes the
paired reconstruction error up relative to the error against unrelated images, i.e. towards a
decoder output that says no more about *this* x than about any other.

Choices, and why:

* Errors are per-pixel means (MSE on [0, 1] images) instead of sums, and 1/(2s²) is folded into
  ``lam_x``: with d pixels, ``lam_x`` = λ_d · d / (2s²) of the paper's objective, so one weight
  means the same across image sizes and s needs no separate setting.
* The negative term is the mean over *all* n² (image, feature) pairs of the batch, in closed form
  (mean ||x_j||² + mean ||g(z_i)||² − 2 x̄·ḡ): the expectation over every shuffle of the batch
  that "shuffled-batch negatives" sample, with no extra randomness. Like CLUB's estimator it
  includes the n paired terms.
* ``lam_y`` is the prediction-leakage weight (a client-side classifier q(y|z) on the *cloud's*
  output, spec C.3): it needs the U-shaped split, which the simulator does not have yet, so
  only ``lam_y = 0`` is accepted (any other value is a one-line error saying so).
* The decoder, its federation and the [0, 1] mapping of x are those of
  :class:`defenses.simulated.SimulatedAttacker`. What is sent is z itself.

``report()``: ``paired-mse`` = the simulated attacker's mean reconstruction MSE on this round's
training batches, ``bound`` = the mean per-pixel bound (shuffled minus paired MSE).
"""

from __future__ import annotations

import torch

from defenses.base import register
from defenses.simulated import SimulatedAttacker, unit_range


def club_bound(recon01: torch.Tensor, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pixel bound: all-pairs MSE − paired MSE, paired MSE) of a batch."""
    r, x = recon01.flatten(1), x01.flatten(1)
    d = r.shape[1]
    paired = ((x - r) ** 2).mean()
    all_pairs = ((x * x).sum(1).mean() + (r * r).sum(1).mean() - 2 * x.mean(0) @ r.mean(0)) / d
    return all_pairs - paired, paired


@register
class InfoScissors(SimulatedAttacker):
    name = "infoscissors"

    def __init__(self, lam_x: float = 1.0, lam_y: float = 0.0, width: int = 16, blocks: int = 1) -> None:
        super().__init__(width, blocks)
        if not 0.0 <= lam_x <= 1e4:
            raise ValueError(f"lam_x must be in [0, 10000], got {lam_x}")
        if lam_y != 0.0:
            raise ValueError("lam_y > 0 (prediction leakage) needs the U-shaped split, "
                             "which is not available yet; use lam_y=0")
        self.lam_x, self.lam_y = lam_x, lam_y
        self._bound_sum = 0.0
        self._paired_sum = 0.0
        self._batches = 0

    def attacker_loss(self, recon01: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
        return ((recon01 - x01) ** 2).mean()

    def loss(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x01 = unit_range(x)
        self.attacker_step(z, x01)
        bound, paired = club_bound(self.frozen_decode(z), x01)
        if self.training and torch.is_grad_enabled():
            self._bound_sum += float(bound.detach())
            self._paired_sum += float(paired.detach())
            self._batches += 1
        return self.lam_x * bound

    def report(self) -> dict[str, float]:
        nan = float("nan")
        return {"paired-mse": self._paired_sum / self._batches if self._batches else nan,
                "bound": self._bound_sum / self._batches if self._batches else nan}
