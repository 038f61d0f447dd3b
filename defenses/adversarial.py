"""Adversarial representation learning: CEM repo's ``gan_adv`` (docs/papers.md A.5, D.4; ResSFL-style).

The client trains a simulated inversion attacker (a decoder, see :mod:`defenses.simulated`)
each batch to *maximise* the SSIM of its reconstructions of x from the detached features, and
the head's loss gets ``alpha · (SSIM − ssim_threshold)`` when that SSIM exceeds the threshold
(else 0), computed through the decoder with frozen parameters: the head learns features the
current attacker cannot invert well, without spending utility once the attacker's SSIM is
below the threshold. Defaults are the repo's: ``alpha`` = 0.3 (``run_exp.sh``'s
``AT_regularization_strength``), ``ssim_threshold`` = 0.5 (0.6 for FaceScrub / TinyImageNet),
one decoder step per batch (``gan_adv_step1``), Adam 1e-3.

Deviations: the decoder is :func:`sim.decoders.build_decoder` at ``width`` 16 and ``blocks`` 1
rather than the repo's ``res_normN4C64`` (a federated parameter must stay small), it is not
pre-trained (no held-out data on a client), and it is trained on the SSIM objective alone from
the first batch (the repo pre-trains with MSE, then maximises SSIM). What is sent is z itself:
compose with noise for the repo's setting (``"adversarial+noise(sigma=0.025)"``).

``report()``: ``ssim`` = mean SSIM of the simulated attacker on this round's training batches
(as the head's penalty saw it), ``active`` = fraction of those batches where the penalty was on.
"""

from __future__ import annotations

import torch

from defenses.base import register
from defenses.simulated import SimulatedAttacker, batch_ssim, unit_range


@register
class Adversarial(SimulatedAttacker):
    name = "adversarial"

    def __init__(self, alpha: float = 0.3, ssim_threshold: float = 0.5, width: int = 16,
                 blocks: int = 1) -> None:
        super().__init__(width, blocks)
        if not 0.0 <= alpha <= 1e3:
            raise ValueError(f"alpha must be in [0, 1000], got {alpha}")
        if not -1.0 <= ssim_threshold < 1.0:
            raise ValueError(f"ssim_threshold must be in [-1, 1), got {ssim_threshold}")
        self.alpha, self.ssim_threshold = alpha, ssim_threshold
        self._ssim_sum = 0.0
        self._active = 0
        self._batches = 0

    def attacker_loss(self, recon01: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
        return 1.0 - batch_ssim(recon01, x01)

    def loss(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x01 = unit_range(x)
        self.attacker_step(z, x01)
        ssim = batch_ssim(self.frozen_decode(z), x01)
        excess = torch.relu(ssim - self.ssim_threshold)
        if self.training and torch.is_grad_enabled():
            self._ssim_sum += float(ssim.detach())
            self._active += int(float(excess.detach()) > 0)
            self._batches += 1
        return self.alpha * excess

    def report(self) -> dict[str, float]:
        nan = float("nan")
        return {"ssim": self._ssim_sum / self._batches if self._batches else nan,
                "active": self._active / self._batches if self._batches else nan}
