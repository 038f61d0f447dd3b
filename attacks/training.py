"""Training an attack's networks to convergence on a validation slice of the auxiliary data.

An attack that stops after a small fixed number of epochs understates what a competent
attacker recovers, which makes a defense look safer than it is. Every trained attack therefore
holds out a validation slice of its auxiliary data (:func:`split_validation`) and trains with
:func:`fit_until_converged`: the learning rate is cut when the validation loss stops falling,
training stops once it has not improved for ``patience`` epochs (or at the budget's epoch or
time cap, which the :class:`Curve` says), and the weights of the best validation epoch are
restored. The curve (train and validation loss per epoch, seconds, why it stopped) goes into
the leakage report, so the cost of an attack and whether it converged are in the open.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

STOPS = ("converged", "epoch cap", "time cap")


@dataclass(frozen=True)
class Budget:
    """How long an attack may train: stop after ``patience`` epochs without a validation
    improvement of at least ``min_delta`` (relative), or at ``max_epochs`` / ``max_seconds``.

    ``lr_patience`` epochs without improvement cut the learning rate by ``lr_factor`` (down
    to ``min_lr``); the stop comes only after the lower rate had its chance too.
    """

    max_epochs: int = 200
    patience: int = 4
    max_seconds: float = 1800.0
    min_delta: float = 0.002
    lr_patience: int = 1
    lr_factor: float = 0.3
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.patience < 1 or self.max_seconds <= 0:
            raise ValueError(f"need max_epochs >= 1, patience >= 1, max_seconds > 0; got "
                             f"{self.max_epochs}, {self.patience}, {self.max_seconds}")
        if self.lr_patience < 0 or not 0 < self.lr_factor <= 1 or self.min_delta < 0:
            raise ValueError(f"need lr_patience >= 0, 0 < lr_factor <= 1, min_delta >= 0; got "
                             f"{self.lr_patience}, {self.lr_factor}, {self.min_delta}")


@dataclass
class Curve:
    """What one training run cost and reached: per-epoch train and validation loss."""

    name: str = ""
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""  # one of STOPS
    best_epoch: int = 0  # 1-based epoch whose weights were kept

    @property
    def epochs(self) -> int:
        return len(self.val)

    @property
    def best(self) -> float:
        return self.val[self.best_epoch - 1] if self.val else float("nan")

    def as_row(self) -> dict[str, object]:
        """The columns a leakage row carries about this training."""
        return {"epochs": self.epochs, "best_epoch": self.best_epoch, "stopped": self.stopped,
                "val_loss": round(self.best, 6)}


def split_validation(n: int, fraction: float = 0.1, minimum: int = 64,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, validation) index split of ``n`` auxiliary samples."""
    n_val = min(max(minimum, int(round(n * fraction))), n // 2)
    if n_val < 1:
        raise ValueError(f"need at least 2 auxiliary samples to keep a validation slice, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def fit_until_converged(modules: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
                        epoch: Callable[[], float], validate: Callable[[], float], budget: Budget,
                        name: str = "") -> Curve:
    """Run ``epoch()`` (one pass, returns its mean train loss) until ``validate()`` (the loss on
    the validation slice, lower is better) stops improving; restore the best modules.

    ``modules`` are what gets restored; ``optimizers`` have their learning rate cut on a plateau.
    """
    curve = Curve(name=name)
    best_val, best_state, since_best, since_cut = float("inf"), None, 0, 0
    start = time.perf_counter()
    while True:
        curve.train.append(float(epoch()))
        for m in modules:
            m.eval()
        with torch.no_grad():
            val = float(validate())
        for m in modules:
            m.train()
        curve.val.append(val)
        if val < best_val * (1 - budget.min_delta):
            best_val, since_best, since_cut = val, 0, 0
            best_state = [copy.deepcopy(m.state_dict()) for m in modules]
            curve.best_epoch = curve.epochs
        else:
            since_best += 1
            since_cut += 1
            if budget.lr_patience and since_cut >= budget.lr_patience:
                _cut_lr(optimizers, budget)
                since_cut = 0
        elapsed = time.perf_counter() - start
        if since_best >= budget.patience:
            curve.stopped = "converged"
        elif curve.epochs >= budget.max_epochs:
            curve.stopped = "epoch cap"
        elif elapsed >= budget.max_seconds:
            curve.stopped = "time cap"
        if curve.stopped:
            break
    if best_state is not None:
        for m, state in zip(modules, best_state):
            m.load_state_dict(state)
    for m in modules:
        m.eval()
    curve.seconds = time.perf_counter() - start
    return curve


def _cut_lr(optimizers: Sequence[torch.optim.Optimizer], budget: Budget) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = max(budget.min_lr, group["lr"] * budget.lr_factor)
