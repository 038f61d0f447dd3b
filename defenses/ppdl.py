"""PPDL: Shokri & Shmatikov's (CCS 2015) differentially private selective sharing, on z.

docs/papers.md C.6 / D.7 (the InfoScissors baseline, after Fu et al.'s ``dp_gc_ppdl``): per sample, only
c = round(theta·m) of z's m entries are sent, chosen by the sparse-vector technique, and the
rest is zeroed. Entries are visited in a random order; entry j passes if

    |clip(z_j, ±gamma)| + Lap(2b) >= tau + Lap(b),          b = 2·c·Δ / ε1,

and the first c that pass are sent as clip(z_j + Lap(2·c·Δ / ε2), ±gamma). The budget epsilon
is split ε1 = 8/9·ε for the selection and ε2 = 2/9·ε for the released values, as in Shokri &
Shmatikov and Fu et al. The sensitivity Δ is ``gamma``: a clipped entry moves by at most gamma
(Fu et al. fix Δ = 1; for z in [0, 1] and gamma = 1 that is the same).

Parameters and defaults:
* ``theta`` = 0.1: the fraction of entries shared per sample (Fu et al. sweep 0.75/0.5/0.25/0.1;
  the InfoScissors comparison sweeps it).
* ``epsilon`` = 2000: the privacy budget of one sample's release. The noise scales grow with c,
  so on a 392-entry z (Fashion-MNIST, theta = 0.1, c = 39) a "textbook" ε drowns every entry
  (threshold scale b ≈ 49 and value scale ≈ 195 at ε = 1.8, Fu et al.'s value, which suits their
  tiny gradients, not features in [0, 1]). At 2000, b ≈ 0.044 and the value scale ≈ 0.18
  (std ≈ 0.25): a heavily perturbed but learnable operating point (a short test training of the
  calibration model (docs/calibration.md) reached 75 % vs 81 % undefended; ε = 500 gave 47 %).
  As a DP guarantee this ε is vacuous; treat epsilon as the strength knob to sweep (lower = stronger).
* ``gamma`` = 1.0: the clipping bound of shared values (z itself is in [0, 1], so clipping acts
  on the noise; Fu et al.'s 0.001 is a gradient-scale value).
* ``tau`` = 0.5: the threshold of the test, the middle of the Sigmoid range, so that entries
  that are "on" are preferred (Fu et al.'s 1e-4 is again gradient-scale).

Deviation for speed: the threshold noise Lap(b) is drawn once per sample instead of redrawn
after every accepted entry (the sparse-vector variant with a single noisy threshold and the
noise scaled by c), which makes the mechanism one vectorised pass. If fewer than c entries
pass, fewer are sent. Applied in training and at inference; the gradient flows through the
sent entries that were not clipped.
"""

from __future__ import annotations

from typing import Any

import torch

from defenses.base import Defense, register
from defenses.laplace import laplace_like


@register
class PPDL(Defense):
    name = "ppdl"

    def __init__(self, theta: float = 0.1, epsilon: float = 2000.0, gamma: float = 1.0,
                 tau: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta (the fraction shared) must be in (0, 1], got {theta}")
        if not 0.0 < epsilon <= 1e9:
            raise ValueError(f"epsilon must be in (0, 1e9], got {epsilon}")
        if not 0.0 < gamma <= 1e3:
            raise ValueError(f"gamma (the clipping bound) must be in (0, 1000], got {gamma}")
        if not -1e3 <= tau <= 1e3:
            raise ValueError(f"tau must be in [-1000, 1000], got {tau}")
        self.theta, self.epsilon, self.gamma, self.tau = theta, epsilon, gamma, tau

    def scales(self, m: int) -> tuple[int, float, float]:
        """(c, threshold noise scale b, value noise scale) for z with m entries per sample."""
        c = max(1, int(round(self.theta * m)))
        b = 2.0 * c * self.gamma / (8.0 / 9.0 * self.epsilon)
        return c, b, 2.0 * c * self.gamma / (2.0 / 9.0 * self.epsilon)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(len(z), -1)
        m = flat.shape[1]
        c, b, b_value = self.scales(m)
        with torch.no_grad():
            clipped = flat.detach().clamp(-self.gamma, self.gamma).abs()
            threshold = self.tau + laplace_like(flat[:, :1], b)
            passed = clipped + laplace_like(flat, 2.0 * b) >= threshold
            # the first c passing entries in a random visiting order
            order = torch.where(passed, torch.rand_like(flat), torch.full_like(flat, 2.0))
            picked = order.topk(min(c, m), dim=1, largest=False)
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask.scatter_(1, picked.indices, picked.values < 2.0)
        sent = (flat + laplace_like(flat, b_value)).clamp(-self.gamma, self.gamma)
        return (sent * mask).reshape(z.shape)

    def public_params(self) -> dict[str, Any]:
        return {"theta": self.theta, "epsilon": self.epsilon, "gamma": self.gamma, "tau": self.tau}
