"""Model completion (Fu et al., USENIX Security 2022): the cloud recovers the client's labels.

In the U-shaped split the client keeps the last layer, so labels and predictions are never
sent to the cloud (the gradients dL/dh it sends reveal them: :mod:`attacks.gradlabel`). The
cloud still owns most of the network: it stacks a small MLP "inference head" on its own tail
and trains it with a handful of labelled public samples (4 per class) plus the unlabelled rest,
semi-supervised with MixMatch. Applied to the features a client sent, the completed model
predicts that client's labels.

The client's last layer is federated with the head, so a cloud that is also the aggregating
server holds it and needs no completion at all (at level ``"whitebox"``,
:class:`~attacks.base.Knowledge` carries it, for :mod:`attacks.gradlabel`); these attacks
model a cloud that is not (a separate aggregator, or secure aggregation): they never read the
last layer, only the head (query oracle) and the cloud's own tail.

* ``pmc`` (passive): done after an honest training.
* ``amc`` (active): the cloud trained its tail during the federation with
  :class:`MaliciousOptimizer` (Fu et al.'s MaliciousSGD), which scales up its tail's updates so
  the tail learns more of the task than its share; ``amc`` then completes that tail as ``pmc``.

Both also train the *same* MLP, with the same labels and the same MixMatch recipe, on raw
pixels instead of the tail's features (``scratch``): the reference that says how much of the
completion comes from what the cloud's part of the model learned from the clients, rather than
from the 40 labels alone (InfoScissors' appendix: 69 % completion vs 77 % clean accuracy vs
15 % from scratch on CIFAR-10). The scorer applies ``scratch`` to the victims' true images; the
attack itself only ever sees features and public data.

MixMatch as Fu et al. use it: two augmented views per unlabelled sample, label guessing by the
mean prediction sharpened with T = 0.8, mixup with lam ~ Beta(0.75, 0.75) and lam = max(lam,
1 - lam), an MSE loss on the unlabelled part weighted by lambda_u (50) ramped up linearly, Adam
2e-3, labelled batch 16, and an EMA teacher (0.999) that makes the predictions. Scaled down for
CPUs: the tail is frozen (only the MLP trains, on features computed once per augmented view),
``steps`` iterations in all instead of 25 x 1024, and the EMA decay warms up as
``min(decay, (1 + t) / (10 + t))`` so that a short run is not dominated by the random
initialisation (with 0.999 fixed, 37 % of the teacher would still be its initial weights after
1000 steps).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, AttackError, Knowledge, register
from attacks.threads import torch_threads


class MaliciousOptimizer:
    """Fu et al.'s MaliciousSGD as a wrapper around any torch optimiser (Adam here).

    After the wrapped optimiser computes its update (momentum, Adam's moments and all), each
    entry of the update is multiplied by ``r = clamp(1 + gamma * g_t / (g_{t-1} + 1e-7), 1, 5)``
    where ``g_t`` and ``g_{t-1}`` are that entry's current and previous raw gradients: entries
    whose gradient keeps its sign and grows are pushed further, so the malicious party's part
    learns faster than an honest optimiser would let it. Scaling the *update* (not the
    gradient) keeps the effect under Adam, whose normalisation would undo a gradient scale.
    """

    def __init__(self, inner: torch.optim.Optimizer, gamma: float = 1.0, min_ratio: float = 1.0,
                 max_ratio: float = 5.0) -> None:
        self.inner = inner
        self.gamma, self.min_ratio, self.max_ratio = gamma, min_ratio, max_ratio
        self._last_grad: dict[int, torch.Tensor] = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        params = [p for g in self.inner.param_groups for p in g["params"] if p.grad is not None]
        before = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() for p in params]
        self.inner.step()
        for p, old, grad in zip(params, before, grads):
            last = self._last_grad.get(id(p))
            if last is not None:
                ratio = (1 + self.gamma * grad / (last + 1e-7)).clamp(self.min_ratio, self.max_ratio)
                p.copy_(old + ratio * (p - old))
            self._last_grad[id(p)] = grad

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.inner.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The inner optimiser's state and the previous gradients, by parameter position."""
        last = {i: self._last_grad[id(p)] for i, p in enumerate(self._params()) if id(p) in self._last_grad}
        return {"inner": self.inner.state_dict(), "last_grad": last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        params = self._params()
        self._last_grad = {id(params[int(i)]): g for i, g in state["last_grad"].items()}


class InferenceHead(nn.Module):
    """The completion MLP: fixed input standardisation, Linear-ReLU-Linear."""

    mean: torch.Tensor  # buffers (register_buffer in __init__), declared for the type checker
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, hidden: int, classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.body = nn.Sequential(nn.Linear(len(mean), hidden), nn.ReLU(True), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


def augment(x01: torch.Tensor, shift: int = 2) -> torch.Tensor:
    """MixMatch's weak augmentation: random horizontal flip and a shift of up to ``shift`` px."""
    n = len(x01)
    flip = torch.rand(n) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x01.flip(-1), x01)
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n)).tolist()
    h, w = x01.shape[-2:]
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def labelled_subset(labels: torch.Tensor, per_class: int, classes: int) -> torch.Tensor:
    """Indices of ``per_class`` random samples of every class (torch's global generator)."""
    picks = []
    for c in range(classes):
        members = torch.nonzero(labels == c).flatten()
        if len(members) < per_class:
            raise AttackError(f"need {per_class} labelled auxiliary samples of class {c}, "
                              f"the auxiliary data has {len(members)}")
        picks.append(members[torch.randperm(len(members))[:per_class]])
    return torch.cat(picks)


def train_mixmatch(bank: torch.Tensor, labelled: torch.Tensor, labels: torch.Tensor,
                   unlabelled: torch.Tensor, classes: int, *, steps: int, batch_size: int = 16,
                   lr: float = 2e-3, lambda_u: float = 50.0, temperature: float = 0.8,
                   alpha: float = 0.75, ema_decay: float = 0.999, hidden: int = 128) -> nn.Module:
    """Train an :class:`InferenceHead` with MixMatch; return its EMA teacher (eval mode).

    ``bank`` holds inputs of every sample under ``V >= 2`` augmentations, shape (V, N, D);
    ``labelled`` and ``unlabelled`` index its samples, ``labels`` belong to ``labelled``.
    Randomness comes from torch's global generator: the same seed gives the same head.
    """
    views, _, dim = bank.shape
    flat = bank.reshape(-1, dim)
    model = InferenceHead(flat.mean(0), flat.std(0) + 1e-6, hidden, classes)
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    beta = torch.distributions.Beta(alpha, alpha)
    targets = F.one_hot(labels, classes).float()
    for step in range(steps):
        li = torch.randint(len(labelled), (batch_size,))
        xl = bank[torch.randint(views, (batch_size,)), labelled[li]]
        ui = unlabelled[torch.randint(len(unlabelled), (batch_size,))]
        v1 = torch.randint(views, (batch_size,))
        v2 = (v1 + 1 + torch.randint(views - 1, (batch_size,))) % views  # another view
        u1, u2 = bank[v1, ui], bank[v2, ui]
        with torch.no_grad():
            guess = (F.softmax(model(u1), 1) + F.softmax(model(u2), 1)) / 2
            guess = guess ** (1 / temperature)
            guess = guess / guess.sum(1, keepdim=True)
        inputs = torch.cat([xl, u1, u2])
        mixed_targets = torch.cat([targets[li], guess, guess])
        lam = float(beta.sample())
        lam = max(lam, 1 - lam)
        perm = torch.randperm(len(inputs))
        logits = model(lam * inputs + (1 - lam) * inputs[perm])
        mixed_targets = lam * mixed_targets + (1 - lam) * mixed_targets[perm]
        loss_x = -(mixed_targets[:batch_size] * F.log_softmax(logits[:batch_size], 1)).sum(1).mean()
        loss_u = F.mse_loss(F.softmax(logits[batch_size:], 1), mixed_targets[batch_size:])
        loss = loss_x + lambda_u * min(1.0, step / steps) * loss_u
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), model.parameters()):
                t.mul_(decay).add_(s, alpha=1 - decay)
    return teacher.eval()


@register
class PassiveCompletion(Attack):
    """Passive model completion: MixMatch an MLP onto the cloud's tail with few labels.

    Parameters:
        labels_per_class: labelled auxiliary samples per class (Fu et al.: 4 for CIFAR-10).
        unlabelled: auxiliary samples used unlabelled (the features of each are computed once
            per view: the cost of the attack).
        views: augmentations per sample (MixMatch: 2).
        steps: MixMatch iterations (Fu et al.: 25 x 1024).
        batch_size, lr, lambda_u, temperature, alpha, ema_decay: MixMatch's (16, 2e-3, 50,
            0.8, 0.75, 0.999).
        hidden: width of the MLP's hidden layer.
    """

    name = "pmc"
    needs = "query"  # the aux images' features come from the head's query oracle
    kind = "completion"
    splits = ("ushaped",)

    def __init__(self, labels_per_class: int = 4, unlabelled: int = 4000, views: int = 2,
                 steps: int = 1000, batch_size: int = 16, lr: float = 2e-3, lambda_u: float = 50.0,
                 temperature: float = 0.8, alpha: float = 0.75, ema_decay: float = 0.999,
                 hidden: int = 128) -> None:
        super().__init__()
        if labels_per_class < 1 or unlabelled < 1 or views < 2 or steps < 1 or batch_size < 1:
            raise ValueError("need labels_per_class, unlabelled, steps, batch_size >= 1 and views >= 2")
        self.labels_per_class, self.unlabelled, self.views = labels_per_class, unlabelled, views
        self.train_args: dict[str, Any] = dict(steps=steps, batch_size=batch_size, lr=lr, lambda_u=lambda_u,
                                               temperature=temperature, alpha=alpha, ema_decay=ema_decay,
                                               hidden=hidden)
        self.head: nn.Module | None = None
        self.scratch_head: nn.Module | None = None

    def _fit(self, knowledge: Knowledge, aux01: torch.Tensor,
             aux_labels: torch.Tensor | None) -> None:
        if aux_labels is None:
            raise AttackError(f"attack '{self.name}' needs the labels of its auxiliary data")
        with torch_threads(1):  # its MLP's ops are far too small to gain from more threads
            self._complete(knowledge, aux01, aux_labels)

    def _complete(self, knowledge: Knowledge, aux01: torch.Tensor, aux_labels: torch.Tensor) -> None:
        assert knowledge.query is not None and knowledge.tail is not None
        classes = knowledge.num_classes
        labelled = labelled_subset(aux_labels, self.labels_per_class, classes)
        rest = torch.ones(len(aux01), dtype=torch.bool)
        rest[labelled] = False
        pool = torch.nonzero(rest).flatten()
        pool = pool[torch.randperm(len(pool))[:self.unlabelled]]
        used = torch.cat([labelled, pool])
        images = [augment(aux01[used]) for _ in range(self.views)]
        n = len(labelled)
        local_labelled, local_pool = torch.arange(n), torch.arange(n, len(used))
        tail = knowledge.tail
        features = torch.stack([self._tail_features(tail, knowledge.query(x)) for x in images])
        self.head = train_mixmatch(features, local_labelled, aux_labels[labelled], local_pool,
                                   classes, **self.train_args)
        pixels = torch.stack([x.flatten(1) for x in images])
        self.scratch_head = train_mixmatch(pixels, local_labelled, aux_labels[labelled],
                                           local_pool, classes, **self.train_args)

    @staticmethod
    @torch.no_grad()
    def _tail_features(tail: nn.Module, z: torch.Tensor, batch: int = 1024) -> torch.Tensor:
        return torch.cat([tail(z[i:i + batch]) for i in range(0, len(z), batch)])

    def _run(self, features: torch.Tensor) -> torch.Tensor:
        # set by fit (run() checks that it ran), which needs the tail (needs = "query")
        assert self.head is not None and self.knowledge is not None and self.knowledge.tail is not None
        with torch.no_grad():
            return self.head(self._tail_features(self.knowledge.tail, features)).argmax(1)

    def scratch(self, images01: torch.Tensor) -> torch.Tensor:
        """Labels predicted by the from-scratch MLP on raw [0, 1] images (the reference)."""
        if self.scratch_head is None:
            raise AttackError(f"attack '{self.name}': call fit() before scratch()")
        with torch.no_grad():
            return self.scratch_head(torch.as_tensor(images01, dtype=torch.float32).flatten(1)).argmax(1)


@register
class ActiveCompletion(PassiveCompletion):
    """Active model completion: ``pmc`` on a tail the cloud trained with
    :class:`MaliciousOptimizer` (needs ``--adversary active``). Same parameters as ``pmc``."""

    name = "amc"
    adversary = "active"
