"""A client-side simulated inversion attacker: the common part of ``adversarial`` and ``infoscissors``.

Both defenses train, on the client, a small decoder that plays the cloud's inversion attacker
(CEM repo's gan_adv, docs/papers.md D.4; InfoScissors' variational decoder q(x|z), docs/papers.md
C.3-C.4), and penalise the head by how well that decoder does. Each batch, in :meth:`loss`:

1. **Attacker step**: the decoder takes one step of its own Adam optimiser on
   ``(z.detach(), x)``: the detached features keep the attacker's objective out of the head,
   and the decoder's own optimiser keeps it out of the client's (whose step comes later).
2. **Head penalty**: the subclass's penalty is computed through the decoder with *detached
   parameters* (``torch.func.functional_call``), so its gradient reaches the head only. The
   client's optimiser also lists the decoder's parameters (it covers head + defense), but they
   get no gradient from the client's objective, so Adam skips them: the decoder's maximisation
   and the head's minimisation never share a gradient. The penalty uses copies of the BatchNorm
   running statistics, so one batch updates them once (in the attacker step).

Why the decoder is a **federated parameter** (averaged with the head within the group), not
client-private state: the head it attacks is the group's shared head, so every client's
decoder learns the same inversion and averaging them gives each client a stronger simulated
attacker from the next round on, as the cloud's attacker pools all clients' features; and a
buffer would travel in Flower's ``context.state`` with every message, which must stay small.
The decoder is :func:`sim.decoders.build_decoder` (the cloud's attack architecture) scaled
down to ``width`` channels and ``blocks`` residual blocks: at the defaults (16, 1) it holds about
15 k parameters on Fashion-MNIST (the head: about 25 k). Its BatchNorm statistics are buffers,
hence client state (a few hundred numbers). The decoder's Adam state starts fresh every round,
like the head's. There is no pre-training on held-out data (the repo pre-trains 30 epochs): a
client has no public data, so the decoder warms up during the first batches and rounds.

The decoder outputs images in [0, 1] but the defense sees the head's *normalised* input x and
not the dataset's statistics; :func:`unit_range` maps x back to [0, 1] by a per-channel min-max
over the batch, which is exact whenever the batch holds a black and a white pixel per channel
(nearly every batch of Fashion-MNIST or CIFAR) and an affine approximation otherwise.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from defenses.base import Defense
from sim.decoders import build_decoder
from sim.models import SplitSpec


def unit_range(x: torch.Tensor) -> torch.Tensor:
    """Per-channel min-max of a normalised batch (B, C, H, W) to [0, 1] (see module docstring)."""
    low = x.amin(dim=(0, 2, 3), keepdim=True)
    high = x.amax(dim=(0, 2, 3), keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-8)


class SimulatedAttacker(Defense):
    """Base of defenses that train a decoder against the head; subclasses define both losses."""

    LR = 1e-3  # the decoder's Adam step size (the repo's gan_adv and CEM's attack decoder)

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        if not 1 <= width <= 256 or not 0 <= blocks <= 16:
            raise ValueError(f"decoder needs width in 1..256 and blocks in 0..16, got {width}, {blocks}")
        self.width, self.blocks = width, blocks
        self.decoder: nn.Module | None = None
        self.shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def bind(self, spec: SplitSpec) -> None:
        shapes = (tuple(int(s) for s in spec.feature_shape), tuple(int(s) for s in spec.in_shape))
        if self.shapes is not None:
            if shapes != self.shapes:
                raise ValueError(f"{self.name}: already bound to {self.shapes}, got {shapes}")
            return
        self.shapes = shapes
        self.decoder = build_decoder(shapes[0], shapes[1], self.width, self.blocks)

    def _decoder(self) -> nn.Module:
        if self.decoder is None:
            raise RuntimeError(f"{self.name}: the defense was not bound to feature and input shapes; "
                               "call defense.bind(spec) after build_defense")
        return self.decoder

    def attacker_loss(self, recon01: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
        """What the simulated attacker minimises on a batch of its reconstructions."""
        raise NotImplementedError

    def attacker_step(self, z: torch.Tensor, x01: torch.Tensor) -> None:
        """One step of the decoder on detached features (only while training with gradients)."""
        if not (self.training and torch.is_grad_enabled()):
            return
        decoder = self._decoder()
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(decoder.parameters(), lr=self.LR)
        step_alone(self._optimizer, self.attacker_loss(decoder(z.detach()), x01))

    def frozen_decode(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's reconstruction of ``z`` with gradient to ``z`` only (module docstring)."""
        return frozen_call(self._decoder(), z)


def step_alone(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One step of a simulated attacker's own optimiser, leaving no gradient behind for the
    client's optimiser (which also lists the attacker's parameters) to act on."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with detached parameters and copied buffers: the gradient reaches ``x``
    only, and BatchNorm statistics are not updated a second time."""
    state = {k: v.detach() for k, v in module.named_parameters()}
    state |= {k: v.clone() for k, v in module.named_buffers()}
    return torch.func.functional_call(module, state, (x,))


def batch_ssim(recon01: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
    """Differentiable mean SSIM of a batch, with the scorer's window (11x11 Gaussian, sigma 1.5)."""
    # Imported here, as in attacks.scoring: torchmetrics is slow to import and most processes
    # that import the defenses never compute an SSIM.
    from torchmetrics.functional.image import structural_similarity_index_measure

    # torchmetrics types its SSIM Tensor | (Tensor, Tensor); without return_full_image it is a Tensor
    return cast(torch.Tensor, structural_similarity_index_measure(recon01, x01, gaussian_kernel=True, sigma=1.5,
                                                                  kernel_size=11, data_range=1.0))
