"""CEM's GAN-based inversion: WGAN-GP refinement of the trained decoder (docs/papers.md B.1.2 / D.3.3).

The decoder attack's inverse network becomes the generator; a critic learns to tell the
auxiliary images from the generator's reconstructions of their features, and the generator is
pushed towards images the critic finds real while the pixel loss (weighted 1500, as in CEM)
keeps it on the right image. The aim is sharper reconstructions than MSE alone gives (MSE
training averages over what the features leave uncertain, which blurs). Noise-aware like the
decoder: every batch re-queries, so the generator sees fresh defense noise.

CEM: critic ``DGWGAN32`` (three stride-2 5x5 convs with InstanceNorm and LeakyReLU 0.2, then
a conv over the remaining map), gradient penalty 10, n_critic 10, Adam betas (0.5, 0.999),
critic lr 5e-3, generator lr 5e-4, 150 epochs. Scaled-down defaults here (few decoder and GAN
epochs, a narrow decoder); off by default in the simulator's ``--attacks``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Knowledge, register
from attacks.decoder import DecoderAttack


class Critic(nn.Module):
    """CEM's DGWGAN discriminator for any image size: the last conv covers the remaining map."""

    def __init__(self, image_shape: tuple[int, ...], width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch, (h, w) = image_shape[0], image_shape[1:]
        for i in range(3):
            out = width * 2**i
            layers += [nn.Conv2d(ch, out, 5, stride=2, padding=2), nn.LeakyReLU(0.2, True)]
            if i > 0:  # DGWGAN: no normalisation on the first block
                layers.insert(-1, nn.InstanceNorm2d(out, affine=True))
            ch, h, w = out, (h + 1) // 2, (w + 1) // 2
        layers.append(nn.Conv2d(ch, 1, (h, w)))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: (||grad critic(x_hat)|| - 1)^2 on random interpolates of real and fake.

    The interpolation weights come from torch's global generator, or from ``generator`` (a CPU
    generator) where the caller keeps its own seeded stream.
    """
    if generator is None:
        eps = torch.rand(len(real), 1, 1, 1, device=real.device)
    else:
        eps = torch.rand((len(real), 1, 1, 1), generator=generator).to(real.device)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def train_gan(generator: nn.Module, critic: nn.Module,
              features_of: Callable[[torch.Tensor], torch.Tensor], aux01: torch.Tensor, *,
              epochs: int, batch_size: int = 128, n_critic: int = 10, gp: float = 10.0,
              mse_weight: float = 1500.0, lr_g: float = 5e-4, lr_d: float = 5e-3,
              device: str | torch.device = "cpu") -> list[float]:
    """Refine ``generator`` with WGAN-GP; returns the per-epoch pixel MSE of its outputs.

    The critic steps on every batch, the generator on every ``n_critic``-th (WGAN's schedule).
    Both learning rates follow a cosine schedule over the run, as in CEM.
    """
    generator.to(device).train()
    critic.to(device).train()
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(critic.parameters(), lr=lr_d, betas=(0.5, 0.999))
    steps = max(1, epochs * -(-len(aux01) // batch_size))
    sched = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps) for o in (opt_g, opt_d)]
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(aux01))
        total = 0.0
        for i, start in enumerate(range(0, len(order), batch_size)):
            x_cpu = aux01[order[start:start + batch_size]]
            z = features_of(x_cpu).detach().to(device)
            real = x_cpu.to(device)
            fake = generator(z)
            loss_d = (critic(fake.detach()).mean() - critic(real).mean()
                      + gp * gradient_penalty(critic, real, fake.detach()))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            mse = F.mse_loss(fake, real)
            if i % n_critic == 0:
                loss_g = -critic(fake).mean() + mse_weight * mse
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
            for s in sched:
                s.step()
            total += float(mse.detach()) * len(real)
        history.append(total / len(order))
    return history


@register
class GanAttack(DecoderAttack):
    """The decoder attack, then CEM's WGAN-GP refinement of the decoder as the generator.

    Parameters:
        epochs, patience, max_seconds, batch_size, lr, weight_decay, min_lr, ssim_weight, width, blocks,
            heads, device: the decoder's (see ``decoder``), trained to convergence first.
        gan_epochs: WGAN-GP epochs over the auxiliary data (CEM: 150).
        gan_batch_size: batch of the GAN phase (CEM: 128).
        n_critic: critic steps per generator step (CEM: 10).
        gp, mse_weight: gradient-penalty and pixel-loss weights (CEM: 10 and 1500).
        lr_g, lr_d: generator and critic learning rates (CEM: 5e-4 and 5e-3).
        critic_width: channels of the critic's first conv.
    """

    name = "gan"
    needs = "query"

    def __init__(self, epochs: int = 100, patience: int = 4, max_seconds: float = 1200.0,
                 batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4,
                 min_lr: float = 1e-5, ssim_weight: float = 0.05, width: int = 32, blocks: int = 2,
                 heads: str = "both", device: str = "cpu", gan_epochs: int = 2, gan_batch_size: int = 128,
                 n_critic: int = 10, gp: float = 10.0, mse_weight: float = 1500.0,
                 lr_g: float = 5e-4, lr_d: float = 5e-3, critic_width: int = 32) -> None:
        super().__init__(epochs=epochs, patience=patience, max_seconds=max_seconds,
                         batch_size=batch_size, lr=lr, weight_decay=weight_decay, min_lr=min_lr,
                         ssim_weight=ssim_weight, width=width, blocks=blocks, heads=heads, device=device)
        if gan_epochs < 1 or gan_batch_size < 1 or n_critic < 1:
            raise ValueError(f"need gan_epochs, gan_batch_size, n_critic >= 1; got {gan_epochs}, "
                             f"{gan_batch_size}, {n_critic}")
        self.gan_args: dict[str, Any] = dict(epochs=gan_epochs, batch_size=gan_batch_size, n_critic=n_critic,
                                             gp=gp, mse_weight=mse_weight, lr_g=lr_g, lr_d=lr_d, device=device)
        self.critic_width = critic_width
        self.gan_history: list[float] = []

    def _fit(self, knowledge: Knowledge, aux01: torch.Tensor,
             aux_labels: torch.Tensor | None) -> None:
        super()._fit(knowledge, aux01, aux_labels)
        critic = Critic(knowledge.image_shape, self.critic_width)
        # the decoder super()._fit trained, with the query oracle that needs = "query" grants
        assert self.decoder is not None and knowledge.query is not None
        self.gan_history = train_gan(self.decoder, critic, knowledge.query, aux01, **self.gan_args)
