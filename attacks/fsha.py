"""Feature-space hijacking (FSHA; Pasquini, Ateniese and Bernaschi, CCS 2021).

A malicious cloud does not need to attack the features a head happens to produce: in split
learning it chooses the gradient the client trains its head with, so it can make the head
produce features it already knows how to invert. Per cut layer it holds (paper §3.2):

* a pilot encoder f~ with the head's architecture, and an inverse network f~^-1 (CEM's decoder,
  :func:`sim.decoders.build_decoder`), trained as an autoencoder on public auxiliary images
  (Eq. 2: MSE between x_pub and f~^-1(f~(x_pub))), so f~'s feature space is invertible;
* a discriminator D on feature space, trained to tell f~(x_pub) from the client's z with the
  WGAN-GP loss (Eq. 4: D(f~(x_pub)) - D(z) plus the gradient penalty on interpolates);

and it answers every client batch, instead of dL/dz of the task, with the gradient w.r.t. z of
the adversarial loss mean D(z) (Eq. 3), which pulls the client's head into f~'s feature space.
Once there, f~^-1 decodes the features the cloud records: the ``fsha`` attack does just that,
with no query access to the head and no training at attack time (knowledge ``"none"``).

The tail is not trained meanwhile, so the task accuracy collapses to chance: the signal an
honest client can notice (the paper's own caveat; §5 and Erdogan et al.'s SplitGuard).

Scaled to the simulator: the paper trains 10^4+ iterations with Adam at 1e-5 (f, f~, f~^-1) and
1e-4 (D); a few-round simulation gives the cloud a few hundred batches, so f~, f~^-1 and D use
Adam at 1e-3, the autoencoder is first trained :data:`PRETRAIN` steps on its own (the aux data
is the cloud's: it may train on it as much as it likes, and a settled f~ gives D a fixed
target), and D takes :data:`D_STEPS` steps per client batch. The gradient penalty's norm is
taken per sample over all of z. Measured in-process (4 clients, 2000 samples, 3 local epochs,
FedAvg of the heads), the SSIM of f~^-1 on the client's features after 2 rounds was 0.20 with
the paper's penalty weight 500 and 0.32 with the usual 10, which is used. The discriminator
follows the paper's (strided convolutions, no normalisation, one linear output).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.base import Attack, AttackError, Knowledge, register
from attacks.decoder import decode, reconstruction_loss
from attacks.gan import gradient_penalty
from sim.decoders import build_decoder
from sim.models import SplitSpec, build_head, load_numpy_state, normalise, state_to_numpy

INVERSE = "fsha_inverse"  # the inverse network's name among the cloud's attack models
INVERSE_WIDTH, INVERSE_BLOCKS = 32, 2  # f~^-1: CEM's decoder, narrowed for CPUs
LR_AE, LR_D = 1e-3, 1e-3  # Adam for f~ with f~^-1, and for D
GP_WEIGHT = 10.0  # Gulrajani et al.'s weight (the paper's 500 hijacked slower here, below)
AUX_BATCH = 64  # the paper's batch size
AE_STEPS = 1  # autoencoder steps per client batch
D_STEPS = 2  # critic steps per client batch
PRETRAIN = 300  # autoencoder steps before the first client batch
SSIM_WEIGHT = 0.05  # the autoencoder trains on the decoder attack's loss (MSE plus SSIM term)


def build_inverse(spec: SplitSpec) -> nn.Module:
    """f~^-1 for features of ``spec``: the same network on the cloud and at the stage."""
    return build_decoder(spec.feature_shape, spec.in_shape, INVERSE_WIDTH, INVERSE_BLOCKS)


def build_discriminator(feature_shape: tuple[int, int, int], width: int = 64) -> nn.Module:
    """D: feature map -> one critic score (no BatchNorm: it would break the per-sample
    gradient penalty of WGAN-GP)."""
    c, h, w = feature_shape
    half = lambda n: (n + 1) // 2  # noqa: E731 - a stride-2, padding-1 3x3 conv's output size
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(2 * width * half(half(h)) * half(half(w)), 1))


def _penalty(critic: nn.Module, a: torch.Tensor, b: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """WGAN-GP on interpolates of the first ``min(len(a), len(b))`` rows of each batch."""
    n = min(len(a), len(b))
    return gradient_penalty(critic, a[:n], b[:n], generator=gen)


class Hijacker:
    """The malicious cloud's FSHA state for one cut layer, and its per-batch step.

    ``aux_x`` are the public auxiliary images as the dataset stores them (N, H, W, C) uint8;
    ``mean``/``std`` the public normalisation the heads use; ``pretrain`` autoencoder steps
    come before the first batch's. Every random draw (aux batches,
    gradient-penalty interpolation) comes from ``(seed, step)``, so the whole state is the
    networks, their optimisers and the step count: :meth:`state` is all a resumed run needs.
    """

    def __init__(self, spec: SplitSpec, aux_x: np.ndarray, mean: Any, std: Any, seed: int,
                 device: str | torch.device = "cpu", pretrain: int = PRETRAIN) -> None:
        self.device = torch.device(device)
        self.seed, self.step, self.pretrain = seed, 0, pretrain
        aux01 = torch.from_numpy(np.ascontiguousarray(aux_x)).permute(0, 3, 1, 2).float().div_(255)
        self.aux01 = aux01.to(self.device)
        self.aux_in = normalise(self.aux01, tuple(mean), tuple(std))
        with torch.random.fork_rng(devices=[]):  # initialise from the seed, leave the caller's RNG alone
            torch.manual_seed(seed)
            self.pilot = build_head(spec).to(self.device)
            self.inverse = build_inverse(spec).to(self.device)
            self.critic = build_discriminator(spec.feature_shape).to(self.device)
        self.opt_ae = torch.optim.Adam([*self.pilot.parameters(), *self.inverse.parameters()], lr=LR_AE)
        self.opt_d = torch.optim.Adam(self.critic.parameters(), lr=LR_D, betas=(0.5, 0.9))

    def _aux_batch(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(len(self.aux01), (AUX_BATCH,), generator=generator).to(self.device)

    def hijack(self, z: np.ndarray) -> np.ndarray:
        """One client batch: the gradient to send back (of mean D(z), Eq. 3, with D as it is
        before this batch), then f~/f~^-1 and D trained one step further (Eq. 2 and 4)."""
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.step]).generate_state(1)[0]))
        self.step += 1
        zt = torch.from_numpy(z).to(self.device).requires_grad_(True)
        for p in self.critic.parameters():
            p.requires_grad_(False)
        self.critic(zt).mean().backward()
        for p in self.critic.parameters():
            p.requires_grad_(True)
        assert zt.grad is not None  # zt is a leaf that requires grad, and backward() just ran
        grad = zt.grad.cpu().numpy()
        self.pilot.train()
        self.inverse.train()
        for _ in range(AE_STEPS + (self.pretrain if self.step == 1 else 0)):
            idx = self._aux_batch(gen)
            loss = reconstruction_loss(self.inverse(self.pilot(self.aux_in[idx])), self.aux01[idx], SSIM_WEIGHT)
            self.opt_ae.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_ae.step()
        z_priv = zt.detach()
        for _ in range(D_STEPS):
            with torch.no_grad():
                z_pub = self.pilot(self.aux_in[self._aux_batch(gen)[: len(z)]])
            d_loss = self.critic(z_pub).mean() - self.critic(z_priv).mean()
            d_loss = d_loss + GP_WEIGHT * _penalty(self.critic, z_priv, z_pub, gen)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
        return grad

    def attack_models(self) -> dict[str, dict[str, np.ndarray]]:
        """What the stage's ``fsha`` attack needs: the inverse network's weights."""
        return {INVERSE: state_to_numpy(self.inverse)}

    def state(self) -> dict[str, Any]:
        """Networks, optimisers and step count; tensors and numbers only (checkpoints load
        with ``weights_only=True``)."""
        return {"step": self.step,
                **{name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                   for name, m in self._modules().items()},
                "opt_ae": self.opt_ae.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        for name, m in self._modules().items():
            m.load_state_dict({k: torch.as_tensor(v) for k, v in state[name].items()})
        self.opt_ae.load_state_dict(state["opt_ae"])
        self.opt_d.load_state_dict(state["opt_d"])

    def _modules(self) -> dict[str, nn.Module]:
        return {"pilot": self.pilot, "inverse": self.inverse, "critic": self.critic}


@register
class FSHAAttack(Attack):
    """Decode recorded features with the hijacking cloud's inverse network f~^-1.

    Nothing is trained at attack time: f~^-1 was trained during the federation, and the
    hijacked heads were pulled into its feature space (needs ``--adversary hijack``).

    Parameters:
        device: where the inverse network runs ("cpu", "cuda").
    """

    name = "fsha"
    needs = "none"
    splits = ("vanilla",)
    adversary = "hijack"

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.device = device
        self.inverse: nn.Module | None = None

    def _fit(self, knowledge: Knowledge, aux01: torch.Tensor,
             aux_labels: torch.Tensor | None) -> None:
        state = knowledge.cloud_models.get(INVERSE)
        if state is None or knowledge.split is None:
            raise AttackError("attack 'fsha' needs the hijacking cloud's inverse network "
                              "(a run with --adversary hijack)")
        self.inverse = build_inverse(knowledge.split)
        load_numpy_state(self.inverse, state)
        self.inverse.to(self.device)

    def _run(self, features: torch.Tensor) -> torch.Tensor:
        assert self.inverse is not None  # set by _fit (run() checks that fit ran)
        return decode(self.inverse, features, device=self.device)
