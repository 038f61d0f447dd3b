"""Label inference from the gradients a U-shaped client sends back (``gradlabel``).

In the U-shaped split the client keeps the last layer ``logits = W h + b`` and the labels, and
sends the cloud dL/dh so that the tail can train. For the client's mean cross-entropy over a
batch of B samples, one sample's row is

    dL/dh = W^T (softmax(W h + b) - onehot(y)) / B,

so ``g = W^T r`` with ``r = (p - e_y) / B``: every entry of r is positive except the true
class's, ``(p_y - 1) / B < 0``. Knowing W, the cloud solves ``W^T v = g`` by least squares (W^T
is d x C with d >> C and full column rank, so v = r exactly when g is as sent) and names the
most negative entry of v; neither h, b nor B is needed. In SplitFed the server aggregates the
last layer with the head, so a cloud that is the aggregator has W: knowledge level
``"whitebox"``, where :class:`~attacks.base.Knowledge` carries the group's last layer.

Below white-box the cloud does not have W. Li et al. (ICLR 2022, binary labels) score each
gradient by its cosine with a gradient whose label is known; no labelled gradient exists here
(the cloud cannot compute a client's loss without W and the client's labels), but their
observation that gradients of one class point the same way still holds: a row is dominated by
``-(1 - p_y) W_y``. Mode ``"cluster"`` (knowledge ``"query"``) therefore

1. clusters the group's recorded gradients (all its clients, pooled) into ``num_classes``
   groups by cosine k-means (k-means++ seeding, ``restarts`` runs, the tightest kept);
2. names the clusters with the cloud's public labelled auxiliary data: it computes h of
   ``probe_samples`` auxiliary images (query oracle, then its own tail) and fits a softmax
   regression on them (a linear probe of h), classifies with it the h its own tail gives for
   the recorded features (row-aligned with the gradients), and assigns clusters to classes one
   to one (Hungarian, maximising the agreeing votes). The probe alone is no better than model
   completion and its errors are consistent per class (it confuses the same pairs every
   time), so a majority per cluster would keep them; a one-to-one assignment does not;
3. labels each attacked row by the name of its nearest cluster centre.

Solving the least-squares problem with the probe's weight instead of W was tried and is
fragile (the pseudo-inverse amplifies the directions in which the probe differs from W:
between 52 % and 100 % on the same run, depending on the probe's learning rate).

This relies on every class being present among the group's gradients and forming its own
cluster; a class missing from the group takes the name of a real one's split cluster.
Measured on a 10-client, 1-round Fashion-MNIST run (global accuracy 52 %): the probe labels
56-66 % of the recorded samples right, the named clusters 100 % with 200 to 2000 labelled
auxiliary images and 71 % with 40; numbers for the defaults are in tests/test_gradlabel.py.

Rows whose gradient was never received (NaN, a client that failed between forward and
backward; the stage attacks completed rounds only) get label -1, which scores as wrong.
The stage's "from scratch" reference (``scratch``) for this attack is the majority class of
the auxiliary labels for every sample: what the cloud guesses with no gradient at all.

Defenses measured against it (tests/test_gradlabel.py): ``gradnoise`` (noise on dL/dh, what
is sent) and InfoScissors' ``lam_y`` (an extra term inside dL/dh). Defenses that change z only
(noise, dropout, ...) leave the form W^T (p - onehot(y)) / B of dL/dh as it is, so they are not
expected to hide labels from this attack (not measured).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from attacks.base import Attack, AttackError, Knowledge, register

MODES = ("auto", "whitebox", "cluster")


def labels_from_gradients(grads: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per row of ``grads`` (n, d), the class c whose entry of ``v = argmin ||W^T v - g||`` is
    the most negative, for a last layer ``weight`` W (C, d); -1 for non-finite rows."""
    g = grads.flatten(1).to(torch.float64)
    finite = torch.isfinite(g).all(1)
    v = torch.linalg.lstsq(weight.to(torch.float64).T, torch.where(finite[:, None], g, 0.0).T).solution
    labels = v.argmin(0)
    return torch.where(finite, labels, torch.full_like(labels, -1))


@register
class GradientLabelInference(Attack):
    """Read the client's labels off the dL/dh rows the cloud recorded (U-shaped split).

    Parameters:
        mode: ``"whitebox"`` (the client's aggregated last layer, knowledge ``"whitebox"``),
            ``"cluster"`` (clustered gradients named with the auxiliary data, knowledge
            ``"query"``), or ``"auto"``: white-box when the knowledge allows it. Strings are
            quoted in specs: ``gradlabel(mode='cluster')``.
        probe_steps: full-batch Adam steps of the probe's softmax regression.
        probe_samples: labelled auxiliary images the probe is fitted on.
        restarts: k-means runs (different seeds); the one with the tightest clusters is kept.
    """

    name = "gradlabel"
    needs = "query"  # "auto" and "cluster"; "whitebox" mode needs more (set per instance)
    kind = "completion"
    splits = ("ushaped",)
    uses_gradients = True

    def __init__(self, mode: str = "auto", probe_steps: int = 300,
                 probe_samples: int = 1000, restarts: int = 4) -> None:
        super().__init__()
        if mode not in MODES:
            raise AttackError(f"gradlabel: mode must be one of {', '.join(MODES)}, got '{mode}'")
        if min(probe_steps, probe_samples, restarts) < 1:
            raise AttackError("gradlabel: probe_steps, probe_samples and restarts must be "
                              "at least 1")
        self.mode = mode
        if mode == "whitebox":
            self.needs = "whitebox"  # checked by fit() and, before a run starts, by sim.run
        self.probe_steps, self.probe_samples = probe_steps, probe_samples
        self.restarts = restarts
        self.weight: torch.Tensor | None = None  # white-box: the client's W (C, d)
        self.centres: torch.Tensor | None = None  # cluster: unit centres (C, d), row c = class c
        self.used = ""  # the mode fit() chose: "whitebox" or "cluster"
        self._majority = 0

    def _fit(self, knowledge: Knowledge, aux01: torch.Tensor,
             aux_labels: torch.Tensor | None) -> None:
        if aux_labels is not None:
            self._majority = int(torch.bincount(aux_labels).argmax())
        if self.mode != "cluster" and knowledge.allows("whitebox"):
            if knowledge.last is None:
                raise AttackError(f"attack '{self.name}': the white-box knowledge carries no "
                                  "last layer (not a U-shaped run?)")
            weight = cast(torch.Tensor, knowledge.last.weight)  # nn.Module types it Tensor | Module
            self.weight, self.used = weight.detach().cpu().float(), "whitebox"
            return
        if aux_labels is None:
            raise AttackError(f"attack '{self.name}' without the client's last layer needs the "
                              "labels of its auxiliary data")
        if knowledge.query is None or knowledge.tail is None:
            raise AttackError(f"attack '{self.name}' without the client's last layer needs the "
                              "query oracle and the cloud's tail")
        grads, feats = knowledge.observed_grads, knowledge.observed
        if grads is None or feats is None:
            raise AttackError(f"attack '{self.name}' needs the gradients the cloud recorded "
                              "(the U-shaped split's dL/dh), but the view has none")
        grads = grads.flatten(1).double()
        known = torch.isfinite(grads).all(1)
        grads, feats = grads[known], feats[known]
        classes = knowledge.num_classes
        if len(grads) < classes:
            raise AttackError(f"attack '{self.name}': {len(grads)} recorded gradients, fewer "
                              f"than the {classes} clusters to find")
        pick = torch.randperm(len(aux01))[:self.probe_samples]
        with torch.no_grad():
            h = knowledge.tail(knowledge.query(aux01[pick])).flatten(1).cpu()
        probe = fit_softmax_regression(h, aux_labels[pick], classes, self.probe_steps)
        with torch.no_grad():
            guesses = torch.cat([probe(knowledge.tail(feats[i:i + 1024]).flatten(1).cpu()).argmax(1)
                                 for i in range(0, len(feats), 1024)])
        assign, centres = cosine_kmeans(grads, classes, self.restarts)
        votes = np.zeros((classes, classes))
        np.add.at(votes, (assign.numpy(), guesses.numpy()), 1)
        clusters, names = linear_sum_assignment(-votes)  # cluster -> class, one to one
        self.centres = centres[torch.from_numpy(clusters[np.argsort(names)])]
        self.used = "cluster"

    def _run(self, features: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        g = gradients.flatten(1).to(torch.float64)
        fitted = self.weight if self.used == "whitebox" else self.centres
        assert fitted is not None  # _fit set the one of the mode it chose (run() checks fit ran)
        width = fitted.shape[1]
        if g.shape[1] != width:
            raise AttackError(f"attack '{self.name}': gradients of {g.shape[1]} entries per "
                              f"sample, the client's last layer takes {width}")
        if self.used == "whitebox":
            return labels_from_gradients(g, fitted)
        finite = torch.isfinite(g).all(1)
        nearest = (_unit(torch.where(finite[:, None], g, 0.0)) @ fitted.T).argmax(1)
        return torch.where(finite, nearest, torch.full_like(nearest, -1))

    def scratch(self, images01: torch.Tensor) -> torch.Tensor:
        """The reference without gradients: the auxiliary data's majority class for all."""
        return torch.full((len(images01),), self._majority, dtype=torch.int64)


def fit_softmax_regression(h: torch.Tensor, labels: torch.Tensor, classes: int,
                           steps: int, lr: float = 0.01) -> nn.Linear:
    """A linear classifier of ``h`` (full-batch Adam on the CE), frozen."""
    layer = nn.Linear(h.shape[1], classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(layer(h), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return layer.eval().requires_grad_(False)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def cosine_kmeans(x: torch.Tensor, k: int, restarts: int,
                  iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of the rows of ``x`` (n, d): (assignments (n,), unit centres (k, d)).

    k-means++ seeding on cosine distance, ``restarts`` runs from torch's global generator;
    the run with the largest summed cosine to the assigned centres is kept.
    """
    u = _unit(x)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(restarts):
        centres = u[torch.randint(len(u), (1,))]
        while len(centres) < k:
            distance = (1 - (u @ centres.T).max(1).values).clamp_min(0) + 1e-12
            centres = torch.cat([centres, u[torch.multinomial(distance, 1)]])
        for _ in range(iters):
            assign = (u @ centres.T).argmax(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, u)
            empty = sums.norm(dim=1) == 0
            new = torch.where(empty[:, None], centres, _unit(sums))
            if torch.equal(new, centres):
                break
            centres = new
        assign = (u @ centres.T).argmax(1)
        tightness = float((u * centres[assign]).sum())
        if best is None or tightness > best[0]:
            best = (tightness, assign, centres)
    assert best is not None  # restarts >= 1
    return best[1], best[2]
