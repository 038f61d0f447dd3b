"""The decoding (training-based) inversion attack: CEM's main attack, KA's inverse network.

The cloud has its auxiliary images processed by the client's head and defense (query access),
and trains an inverse network from those features back to the images; it then applies it to
the victims' recorded features. Every batch re-queries, so the decoder sees fresh defense noise
each time, as a noise-aware attacker that knows sigma would simulate it (CEM §B.1).
Defaults are CEM's: Adam 1e-3, weight decay 1e-4, cosine annealing to 1e-5, batch 256, MSE
against the [0, 1] image, 50 epochs (the simulator passes fewer at small scale).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, Knowledge, register
from attacks.models import build_decoder


def train_decoder(decoder: nn.Module, features_of: Callable[[torch.Tensor], torch.Tensor],
                  aux01: torch.Tensor, *, epochs: int, batch_size: int = 256, lr: float = 1e-3,
                  weight_decay: float = 1e-4, min_lr: float = 1e-5,
                  device: str | torch.device = "cpu") -> list[float]:
    """Fit ``decoder`` to map ``features_of(x)`` back to ``x``; returns the per-epoch MSE.

    ``features_of`` (the query oracle) is called on every batch, so a stochastic defense
    draws fresh noise for every pair in every epoch, and no copy of the whole auxiliary set
    is ever made. Shuffles and initialisation (and the oracle's noise) use torch's global
    generator: the same ``torch.manual_seed`` gives the same decoder.
    """
    decoder.to(device).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(aux01) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs * steps_per_epoch), eta_min=min_lr)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(aux01))
        total = 0.0
        for start in range(0, len(order), batch_size):
            x_cpu = aux01[order[start:start + batch_size]]
            z = features_of(x_cpu).detach().to(device)
            x = x_cpu.to(device)
            loss = F.mse_loss(decoder(z), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(x)
        history.append(total / len(order))
    return history


def decode(decoder: nn.Module, features: torch.Tensor, batch_size: int = 512,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """Apply a trained decoder (eval mode) to features, in batches."""
    decoder.eval()
    with torch.no_grad():
        return torch.cat([decoder(features[i:i + batch_size].to(device)).cpu()
                          for i in range(0, len(features), batch_size)])


@register
class DecoderAttack(Attack):
    """Train CEM's ``res_normN8C64`` inverse network on ``(query(x_aux), x_aux)`` pairs.

    Parameters:
        epochs: passes over the auxiliary data (CEM: 50).
        batch_size, lr, weight_decay, min_lr: Adam with cosine annealing, as in CEM.
        width, blocks: the decoder's channels and residual blocks (CEM: 64 and 8); smaller
            values trade attack strength for speed.
        device: where the decoder trains ("cpu", "cuda").
    """

    name = "decoder"
    needs = "query"

    def __init__(self, epochs: int = 50, batch_size: int = 256, lr: float = 1e-3,
                 weight_decay: float = 1e-4, min_lr: float = 1e-5, width: int = 64,
                 blocks: int = 8, device: str = "cpu") -> None:
        super().__init__()
        if epochs < 1 or batch_size < 1 or lr <= 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, "
                             f"{batch_size}, {lr}")
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.weight_decay, self.min_lr, self.device = weight_decay, min_lr, device
        self.width, self.blocks = width, blocks
        self.decoder: nn.Module | None = None
        self.history: list[float] = []

    def _fit(self, knowledge: Knowledge, aux01: torch.Tensor,
             aux_labels: torch.Tensor | None) -> None:
        assert knowledge.query is not None  # guaranteed by needs = "query"
        self.decoder = build_decoder(knowledge.feature_shape, knowledge.image_shape,
                                     self.width, self.blocks)
        self.history = train_decoder(
            self.decoder, knowledge.query, aux01, epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            min_lr=self.min_lr, device=self.device)

    def _run(self, features: torch.Tensor) -> torch.Tensor:
        return decode(self.decoder, features, device=self.device)
