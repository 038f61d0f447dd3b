"""Knowledge Alignment (KA) with no access to the client's head: only the cloud's own tail.

The cloud cannot query the head, but it knows the architecture (the split is part of the
protocol), the public defense, and it owns the trained tail. It trains a *surrogate* head so
that the frozen tail classifies the labelled auxiliary data well through surrogate + defense:
the tail only works on features that look like the real head's, so this pulls the surrogate's
feature space towards the real one. It then trains the decoder of :mod:`attacks.decoder` on the
surrogate's features and applies it to the victims' real features.

Why it is weaker than ``decoder``: the tail constrains features only as far as its decision
depends on them. Anything the tail is (nearly) invariant to, such as which of several
channels carries a cue, the scale of features the ReLUs cut off, image details that do not
change the class, is left free, so the surrogate matches the real head only up to those
symmetries, and the decoder learns to invert the surrogate, not the victim's head. How much
survives depends on how much of the image the features keep and the tail uses; a query attacker
pays none of that.

Measured on Fashion-MNIST (small head, 2 epochs on 10k images; 3000 labelled aux images, a
16-wide 1-block decoder for 6 epochs, 2 surrogate epochs; mean-image baseline SSIM 0.17): KA
reached SSIM 0.37 / 0.50 / 0.52 against heads trained with noise sigma 0 / 0.1 / 0.3, where the
query decoder reached 0.66 / 0.62 / 0.56. That KA *gains* from the noise is, we think, because a
head trained through noise must spread classes far apart in a few saturated channels, which the
tail then pins down more tightly than the loose clean feature space. The surrogates reached
75-80 % accuracy on the aux data through the frozen tail in their second epoch (the real heads:
77-83 % test accuracy), so matching the tail's decisions is far from matching the features.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, AttackError, Knowledge, register
from attacks.decoder import decode, train_decoder
from attacks.training import Budget, Curve, fit_until_converged, split_validation
from sim.decoders import build_decoder
from sim.models import build_head


def train_surrogate(surrogate: nn.Module, defense: nn.Module, tail: nn.Module,
                    normalise: Callable[[torch.Tensor], torch.Tensor], aux01: torch.Tensor,
                    labels: torch.Tensor, *, budget: Budget, batch_size: int = 128,
                    lr: float = 1e-3, device: str | torch.device = "cpu",
                    seed: int = 0) -> Curve:
    """Train ``surrogate`` so that the frozen ``tail`` (eval mode) classifies its features
    (after the public ``defense``) until the cross-entropy on a validation slice of the
    auxiliary data stops falling; returns the training curve."""
    surrogate.to(device).train()
    tail.to(device).eval()
    defense.train()
    optimizer = torch.optim.Adam(surrogate.parameters(), lr=lr)
    train_idx, val_idx = split_validation(len(aux01), seed=seed)
    logits_of = lambda x: tail(defense(surrogate(normalise(x.to(device)))))  # noqa: E731

    def epoch() -> float:
        order = train_idx[torch.randperm(len(train_idx))]
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(logits_of(aux01[idx]), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        return total / len(order)

    def validate() -> float:
        return float(F.cross_entropy(logits_of(aux01[val_idx]), labels[val_idx].to(device)))

    return fit_until_converged([surrogate], [optimizer], epoch, validate, budget, "ka surrogate")


@register
class KnowledgeAlignment(Attack):
    """Surrogate head aligned through the frozen tail, then a decoder on its features.

    Both phases train to convergence on a validation slice of the auxiliary data (the
    surrogate on its cross-entropy through the tail, the decoder on its MSE).

    Parameters:
        head_epochs: the epoch cap of the surrogate head's training through the frozen tail.
        epochs: the decoder's epoch cap (as ``decoder``).
        patience, max_seconds: when each phase stops (as ``decoder``).
        head_lr: Adam learning rate for the surrogate (batch 128).
        batch_size, lr: the decoder's batch and Adam learning rate (as ``decoder``).
        width, blocks: decoder size (as ``decoder``).
        device: where both train.
    """

    name = "ka"
    needs = "none"
    splits = ("vanilla",)  # aligns through the tail's class logits, which a U-shaped tail lacks

    def __init__(self, head_epochs: int = 100, epochs: int = 100, patience: int = 4,
                 max_seconds: float = 1200.0, head_lr: float = 1e-3, batch_size: int = 64,
                 lr: float = 1e-3, width: int = 32, blocks: int = 2, device: str = "cpu") -> None:
        super().__init__()
        if head_epochs < 1 or epochs < 1 or head_lr <= 0 or lr <= 0:
            raise ValueError(f"need head_epochs >= 1, epochs >= 1, head_lr > 0, lr > 0; got "
                             f"{head_epochs}, {epochs}, {head_lr}, {lr}")
        self.head_budget = Budget(max_epochs=head_epochs, patience=patience, max_seconds=max_seconds)
        self.budget = Budget(max_epochs=epochs, patience=patience, max_seconds=max_seconds)
        self.head_lr, self.lr = head_lr, lr
        self.batch_size, self.width, self.blocks, self.device = batch_size, width, blocks, device
        self.surrogate: nn.Module | None = None
        self.decoder: nn.Module | None = None
        self.curves: list[Curve] = []

    def _fit(self, knowledge: Knowledge, aux01: torch.Tensor,
             aux_labels: torch.Tensor | None) -> None:
        if aux_labels is None:
            raise AttackError("attack 'ka' needs the labels of the auxiliary data (aux_labels) "
                              "to align a surrogate head through the tail")
        if knowledge.tail is None or knowledge.split is None:
            raise AttackError("attack 'ka' needs the cloud's tail and the split spec in its "
                              "knowledge")
        # The surrogate copies the public architecture, never the real head's weights.
        self.surrogate = surrogate = build_head(knowledge.split)
        assert knowledge.defense is not None  # Knowledge builds it from the public spec
        defense = copy.deepcopy(knowledge.defense)
        surrogate_curve = train_surrogate(
            surrogate, defense, knowledge.tail, knowledge.normalise, aux01, aux_labels,
            budget=self.head_budget, lr=self.head_lr, device=self.device)
        surrogate.eval()
        defense.eval()

        def surrogate_query(x01: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([defense(surrogate(knowledge.normalise(
                    x01[i:i + 1024].to(self.device)))) for i in range(0, len(x01), 1024)])

        self.decoder = build_decoder(knowledge.feature_shape, knowledge.image_shape,
                                     self.width, self.blocks)
        self.curves = [surrogate_curve, train_decoder(
            self.decoder, surrogate_query, aux01, budget=self.budget, batch_size=self.batch_size,
            lr=self.lr, device=self.device, name="ka decoder")]

    def _run(self, features: torch.Tensor) -> torch.Tensor:
        assert self.decoder is not None  # set by _fit (run() checks that fit ran)
        return decode(self.decoder, features, device=self.device)
