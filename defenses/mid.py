"""MID: a variational information bottleneck between the head and the wire (docs/papers.md C.6, D.7).

Zou et al.'s MID as implemented in VFLAIR's ``MID_model``: z (flattened, d entries) goes
through an encoder ``Linear(d -> 2d) + ReLU`` whose output is split into μ and ρ; the
standard deviation is ``softplus(ρ - std_shift)`` (std_shift = 0.5); a sample μ + std·ε is
decoded by ``Linear(d -> hidden·d) + ReLU + Linear(hidden·d -> d)`` back to z's shape, and the
client's loss gets ``lam · KL(N(μ, std²) || N(0, I))``, summed over the d bottleneck entries,
averaged over the batch and divided by d ("normalised by the feature size", docs/papers.md C.6) — i.e.
the mean KL per entry. What the cloud receives is the decoder's output.

Choices (documented deviations or settings):
* The encoder keeps VFLAIR's ReLU (so μ >= 0 and std >= softplus(-0.5) ≈ 0.47).
* The decoder ends in a **Sigmoid** instead of VFLAIR's ReLU: the tail and every noise level
  in this simulator are calibrated on the head's Sigmoid range [0, 1], and a ReLU output could
  be rescaled freely by the encoder.
* ``hidden = 2`` (VFLAIR's ``MID_model_small``; ``MID_model`` uses 5): with d = 392
  (Fashion-MNIST's 8x7x7 z) the layers hold about 0.9 M parameters, which are federated
  (averaged within the group and sent every round), against ~25 k for the head itself.
* Training samples μ + std·ε; at inference (``eval()``) the mean μ is decoded, the usual VIB
  practice, unless ``sample_eval=True`` (VFLAIR samples always).
* The layers need d before any data is seen (their parameters are part of the group's first
  model), so they are created in :meth:`bind`, which the simulator calls right after
  ``build_defense``; using an unbound MID raises a clear error.

``report()`` gives the mean KL per entry over this round's training batches (``kl``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import Defense, register
from sim.models import SplitSpec


@register
class MID(Defense):
    name = "mid"
    std_shift = 0.5

    def __init__(self, lam: float = 0.01, hidden: int = 2, sample_eval: bool = False) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1e3:
            raise ValueError(f"lam must be in [0, 1000], got {lam}")
        if not 1 <= hidden <= 8:
            raise ValueError(f"hidden (decoder width / d) must be in 1..8, got {hidden}")
        self.lam = lam
        self.hidden = hidden
        self.sample_eval = sample_eval
        self.feature_shape: tuple[int, ...] | None = None
        self.encoder: nn.Module | None = None
        self.decoder: nn.Module | None = None
        self._last_kl: torch.Tensor | None = None
        self._kl_sum = 0.0
        self._batches = 0

    def bind(self, spec: SplitSpec) -> None:
        shape = tuple(int(s) for s in spec.feature_shape)
        if self.feature_shape is not None:
            if shape != self.feature_shape:
                raise ValueError(f"mid: already bound to {self.feature_shape}, got {shape}")
            return
        d = math.prod(shape)
        if d < 1:
            raise ValueError(f"mid: empty feature shape {shape}")
        self.feature_shape = shape
        self.encoder = nn.Linear(d, 2 * d)
        self.decoder = nn.Sequential(nn.Linear(d, self.hidden * d), nn.ReLU(),
                                     nn.Linear(self.hidden * d, d), nn.Sigmoid())

    def _check_bound(self, z: torch.Tensor) -> None:
        if self.encoder is None:
            raise RuntimeError("mid: the defense was not bound to a feature shape; "
                               "call defense.bind(spec) after build_defense")
        if tuple(z.shape[1:]) != self.feature_shape:
            raise ValueError(f"mid: bound to z of shape {self.feature_shape}, "
                             f"got {tuple(z.shape[1:])}")

    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and std of the bottleneck for a batch of features."""
        self._check_bound(z)
        assert self.encoder is not None  # _check_bound raised otherwise
        mu, rho = F.relu(self.encoder(z.reshape(len(z), -1))).chunk(2, dim=1)
        return mu, F.softplus(rho - self.std_shift)

    @staticmethod
    def kl(mu: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Mean over batch and entries of KL(N(μ, std²) || N(0, 1))."""
        return (0.5 * (mu.pow(2) + std.pow(2) - 1.0) - torch.log(std)).mean()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        mu, std = self.encode(z)
        if self.training:
            kl = self.kl(mu, std)
            self._last_kl = kl
            self._kl_sum += float(kl.detach())
            self._batches += 1
        else:
            self._last_kl = None
        code = mu + std * torch.randn_like(std) if self.training or self.sample_eval else mu
        assert self.decoder is not None  # bound with the encoder, which encode() checked
        return self.decoder(code).reshape(z.shape)

    def loss(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """λ·KL of the batch just sent through :meth:`forward` (recomputed if there was none)."""
        kl = self._last_kl if self._last_kl is not None else self.kl(*self.encode(z))
        self._last_kl = None
        return self.lam * kl

    def report(self) -> dict[str, float]:
        return {"kl": self._kl_sum / self._batches if self._batches else float("nan")}
