"""The decoding (training-based) inversion attack: CEM's main attack, KA's inverse network.

The cloud has its auxiliary images processed by the client's head and defense (query access),
and trains an inverse network from those features back to the images; it then applies it to
the victims' recorded features. Every batch re-queries, so the decoder sees fresh defense noise
each time, as a noise-aware attacker that knows sigma would simulate it (CEM, docs/papers.md B.1).

It trains to convergence (:mod:`attacks.training`): a validation slice of the auxiliary data
is held out, the learning rate is cut when its MSE stops falling, training stops once it has
not improved for ``patience`` epochs, and the best epoch's weights are kept. CEM trains a
fixed 50 epochs with cosine annealing; a fixed budget either wastes time or stops short,
depending on the head and defense, and stopping short understates the leakage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, Knowledge, register
from attacks.training import Budget, Curve, fit_until_converged, split_validation
from sim.decoders import build_decoder

Oracle = Callable[[torch.Tensor], torch.Tensor]


def reconstruction_loss(recon01: torch.Tensor, x01: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    """MSE plus ``ssim_weight * (1 - SSIM)``, SSIM as the scorer computes it (11x11 Gaussian).

    MSE alone averages over what the features leave uncertain and blurs; the SSIM term asks
    for the structure the scorer (and a person) looks at. Measured on the README demo's view
    (4 epochs, the same decoder): MSE alone SSIM 0.511 / MSE 0.0173; with weight 0.05 SSIM
    0.704 / MSE 0.0167, better on both.
    """
    loss = F.mse_loss(recon01, x01)
    if ssim_weight > 0:
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        # torchmetrics types its SSIM Tensor | (Tensor, Tensor); without return_full_image it is a Tensor
        loss = loss + ssim_weight * (1 - cast(torch.Tensor, ssim(recon01, x01, gaussian_kernel=True, sigma=1.5,
                                                                 kernel_size=11, data_range=1.0)))
    return loss


def train_decoder(decoder: nn.Module, features_of: Oracle | Sequence[Oracle], aux01: torch.Tensor,
                  *, budget: Budget, batch_size: int = 64, lr: float = 1e-3,
                  weight_decay: float = 1e-4, ssim_weight: float = 0.05,
                  device: str | torch.device = "cpu", seed: int = 0,
                  name: str = "decoder") -> Curve:
    """Fit ``decoder`` to map ``features_of(x)`` back to ``x`` until the validation loss
    (:func:`reconstruction_loss`) stops improving; returns the training
    :class:`~attacks.training.Curve`.

    ``features_of`` (the query oracle) is called on every batch, so a stochastic defense draws
    fresh noise for every pair in every epoch. Several oracles (e.g. the heads a white-box
    cloud holds at the start and the end of a round) share each batch between them, so the
    decoder learns to invert every one of them; the validation slice is encoded once by each
    (one fixed draw of the noise, so epochs are compared on the same pairs). Shuffles and
    initialisation use torch's global generator, the split ``seed``: the same seeds give the
    same decoder.
    """
    oracles = [features_of] if callable(features_of) else list(features_of)
    decoder.to(device).train()
    train_idx, val_idx = split_validation(len(aux01), seed=seed)
    val_x = aux01[val_idx]
    val_z = [oracle(val_x).detach() for oracle in oracles]
    val_x = val_x.to(device)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr, weight_decay=weight_decay)

    def epoch() -> float:
        order = train_idx[torch.randperm(len(train_idx))]
        total = 0.0
        for start in range(0, len(order), batch_size):
            x_cpu = aux01[order[start:start + batch_size]]
            parts = torch.arange(len(x_cpu)) % len(oracles)
            z = torch.cat([oracles[k](x_cpu[parts == k]).detach() for k in range(len(oracles))])
            x = torch.cat([x_cpu[parts == k] for k in range(len(oracles))]).to(device)
            loss = reconstruction_loss(decoder(z.to(device)), x, ssim_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(x)
        return total / len(order)

    def validate() -> float:
        return sum(float(reconstruction_loss(decode(decoder, z, device=device).to(device), val_x,
                                             ssim_weight)) for z in val_z) / len(val_z)

    return fit_until_converged([decoder], [optimizer], epoch, validate, budget, name)


def decode(decoder: nn.Module, features: torch.Tensor, batch_size: int = 512,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """Apply a trained decoder (eval mode) to features, in batches."""
    decoder.eval()
    with torch.no_grad():
        return torch.cat([decoder(features[i:i + batch_size].to(device)).cpu()
                          for i in range(0, len(features), batch_size)])


@register
class DecoderAttack(Attack):
    """Train CEM's inverse network on ``(query(x_aux), x_aux)`` pairs until it converges.

    Parameters:
        epochs: the epoch cap; training stops earlier once the validation MSE has not
            improved for ``patience`` epochs (the report gives the epochs used).
        patience: epochs without a validation improvement before stopping (the learning rate
            is cut by 0.3 after each epoch without one).
        max_seconds: the time cap of the training.
        batch_size, lr, weight_decay, min_lr: Adam (CEM: lr 1e-3, weight decay 1e-4).
        ssim_weight: weight of the SSIM term in the loss (:func:`reconstruction_loss`; CEM
            trains on MSE alone, which is ``ssim_weight=0``).
        width, blocks: the decoder's channels and residual blocks (CEM: 64 and 8).
        heads: which of the white-box cloud's heads of the attacked round it inverts: "end"
            (the aggregated head), "start" (the head the round started from) or "both".
        device: where the decoder trains ("cpu", "cuda").
    """

    name = "decoder"
    needs = "query"

    def __init__(self, epochs: int = 100, patience: int = 4, max_seconds: float = 1200.0,
                 batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4,
                 min_lr: float = 1e-5, ssim_weight: float = 0.05, width: int = 32, blocks: int = 2,
                 heads: str = "both", device: str = "cpu") -> None:
        super().__init__()
        if epochs < 1 or batch_size < 1 or lr <= 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, "
                             f"{batch_size}, {lr}")
        if ssim_weight < 0:
            raise ValueError(f"ssim_weight must be >= 0, got {ssim_weight}")
        if heads not in HEAD_CHOICES:
            raise ValueError(f"heads must be one of {', '.join(HEAD_CHOICES)}, got '{heads}'")
        self.budget = Budget(max_epochs=epochs, patience=patience, max_seconds=max_seconds,
                             min_lr=min_lr)
        self.batch_size, self.lr, self.weight_decay = batch_size, lr, weight_decay
        self.ssim_weight = ssim_weight
        self.width, self.blocks, self.heads, self.device = width, blocks, heads, device
        self.decoder: nn.Module | None = None
        self.curves: list[Curve] = []

    def _fit(self, knowledge: Knowledge, aux01: torch.Tensor,
             aux_labels: torch.Tensor | None) -> None:
        self.decoder = build_decoder(knowledge.feature_shape, knowledge.image_shape,
                                     self.width, self.blocks)
        self.curves = [train_decoder(
            self.decoder, knowledge.oracles(self.heads), aux01, budget=self.budget,
            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            ssim_weight=self.ssim_weight, device=self.device, name=self.name)]

    def _run(self, features: torch.Tensor) -> torch.Tensor:
        assert self.decoder is not None  # set by _fit (run() checks that fit ran)
        return decode(self.decoder, features, device=self.device)


HEAD_CHOICES = ("end", "start", "both")
