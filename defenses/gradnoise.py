"""Gradient noise: Gaussian noise on the dL/dh a U-shaped client sends back to the cloud.

In the U-shaped split the client's dL/dh is ``W^T (softmax(W h + b) - onehot(y)) / B``: it lies
in the span of the client's last-layer weights and points at the true class, which is what
:mod:`attacks.gradlabel` reads. This defense sends ``g + sigma * ||g|| / sqrt(d) * N(0, I)``
instead, per sample, with ``d`` the size of one sample's gradient: the noise's expected norm
is ``sigma`` times the sample's own gradient norm (Li et al.'s isotropic Gaussian baseline,
scaled per sample).

Why relative to the per-sample norm rather than absolute: gradients shrink by orders of
magnitude as a sample becomes well classified and as training goes on, so one absolute sigma
would drown early rounds and hide nothing later; relative noise keeps the same signal-to-noise
ratio for every sample and round, and ``sigma`` reads the same on any model. A sample whose
gradient is exactly zero gets no noise (it carries no label information either).

Only what is sent changes: the client's last layer trains on its exact loss; the cloud's tail
and, through the returned dL/dz, the head train on the noisy gradient. Noise that is isotropic
in h's d dimensions falls mostly outside the C-dimensional span of W (d = 256, C = 10 for the
small model), which a least-squares solve projects away: only about sqrt(C / d) of its norm
competes with the signal, so hiding labels needs sigma well above 1. Measured in
tests/test_gradlabel.py (10 clients, 1 round, Fashion-MNIST): white-box label accuracy 1.000
undefended, 0.997 at sigma 3, 0.908 at 5, 0.503 at 10, while the global accuracy falls from
0.52 to 0.38, 0.15 and 0.11: at this scale it hides labels only by stopping the model
learning. It is a baseline to measure attacks against, not a recommended setting.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from defenses.base import Defense, register


@register
class GradNoise(Defense):
    name = "gradnoise"

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= sigma <= 1000.0:
            raise ValueError(f"sigma must be in [0, 1000], got {sigma}")
        self.sigma = sigma

    def protect_gradient(self, grad_h: torch.Tensor) -> torch.Tensor:
        if self.sigma == 0:
            return grad_h
        flat = grad_h.flatten(1)
        scale = self.sigma * flat.norm(dim=1, keepdim=True) / math.sqrt(flat.shape[1])
        return (flat + scale * torch.randn_like(flat)).view_as(grad_h)

    def needs_output(self) -> bool:
        """dL/dh is sent only in the U-shaped split (sigma 0 changes nothing anywhere)."""
        return self.sigma > 0

    def public_params(self) -> dict[str, Any]:
        return {"sigma": self.sigma}
