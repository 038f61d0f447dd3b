"""CEM: conditional-entropy maximisation, a regulariser plugged into a noise defense (docs/papers.md A, D.2).

Xia et al. (CVPR 2025) bound any inversion attacker's MSE from below by the conditional entropy
H(x|z) of the input given the transmitted feature z = f(x) + ε, ε ~ N(0, σ²I). Modelling the
clean features of each class as a K-component Gaussian mixture, maximising the lower bound on
H(x|z) means minimising (docs/papers.md A.3, diagonal form)

    L_C = mean over classes c present of  Σ_k π_ck · mean_j log(v_ckj + σ²),

the within-component spread of the clean features measured against the noise power. The head's
loss becomes L = L_task + lam · L_C (the plain "paper" form; docs/papers.md D.2). Gradient reaches the
head only: L_C depends on the clean z alone, the centroids are constants.

What this implementation does, and why:

* **Mixture fit** (docs/papers.md A.3 [CODE], D.2, D.9): hard k-means per class on the client's own clean
  features, in :meth:`on_epoch_end` (the simulator passes eval-mode features after aggregation
  and after every local epoch). K = ``k`` components per class; warm start from the previous
  centroids, k-means++ for missing ones; at most ``MAX_ITERS`` Lloyd iterations (stopping when
  assignments settle) on at most ``FIT_CAP`` samples per class, then one assignment pass over all
  of the class for the weights π (cluster fractions) and the stored variances. A class the client
  lacks gets no component; a class with n < 2K samples gets n // 2 components (none if n < 2,
  which skips it): D.9's "reduce K", so no component is fitted on a single sample. A client with
  no usable class trains with loss 0.
* **State**: centroids (C, K, m), weights π (C, K), the scalar within-cluster variance v̄ (C, K)
  and the class counts (C,) are *buffers*: the client's private state kept across rounds (never
  averaged or sent). C is the client's largest label + 1; unused components have π = 0.
* **Batch loss**: each sample of class c is assigned to the nearest centroid of class c
  (Euclidean on flattened z); for each (c, k) hit in the batch v_ckj is the batch mean of
  (z_j − μ_ckj)² (the second moment around the fixed centroid, so one member already gives an
  unbiased estimate); term = π_ck · mean_j log(v_ckj + σ²), π_ck from the fit; L_C = mean over the
  classes present of Σ_k term. This is the paper-faithful diagonal objective (CEM repo's older
  ``model_training_GMM.py`` form, the "older variant", the form calibrated here
  on Fashion-MNIST). The released repo's blending with the stored v̄, its hinge and
  γ = 0.01 (docs/papers.md A.4) are *not* used: they are variance reduction and a floor specific to the
  repo's LR-rescaled gradient, and the plain form is the one the calibration (docs/calibration.md) measured.
* **CEM off in the first epoch** (docs/papers.md A.4 "e >= 2", D.2): the loss is 0 until centroids exist,
  and the very first fit of a fresh client is skipped until it has trained some batches, so
  round 1's pre-training call (features of an untrained head) fits nothing; the first mixture is
  fitted after the client's first local epoch and warm-started from then on.
* **Noise** (docs/papers.md A.1, A.5, D.1): CEM presupposes noise; σ is the noise standard deviation.
  Composed with a ``noise`` part (``"noise(sigma=0.05)+cem(lam=0.05)"``) CEM takes σ from it via
  the :meth:`attach` hook (several noise parts: σ² summed; ``laplace`` counts with its standard
  deviation sqrt(2)/ε) and sends z unchanged itself. Without a noise part in the chain (``cem``
  alone, or with dropout / top-k / ...), CEM adds N(0, σ²) itself in its ``forward`` (train and
  inference) with σ = ``sigma`` or ``DEFAULT_SIGMA`` = 0.05 (docs/papers.md A.5: "for every other base
  defense the scripts also turn on small noise"). Put ``cem`` first in such a chain to add the
  noise before dropout/top-k as the repo does. An explicit ``sigma`` that contradicts the chain's
  noise is an error.
* **λ**: ``lam`` is the weight of the plain form; the calibration found 0.05–0.1 keeps accuracy
  on Fashion-MNIST (the repo's 8/16 are rescaled by 0.001/lr and ruin accuracy here).

``report()``: ``bound`` = mean L_C over this round's batches where CEM was active (NaN if none),
``within-var`` = mean squared distance per entry of the client's clean features to their
centroid at the latest fit, ``logdet`` = Σ_k π_k mean_j log(v_kj + σ²) averaged over the
client's samples at the latest fit (docs/papers.md B.3's monitor, diagonal form), and ``mixture-info`` =
``logdet`` − log σ² = Σ_k π_k mean_j log(1 + v_kj/σ²): the Gaussian-mixture term of the bound
(docs/papers.md A.3 step 3: H(x|z) >= H(x) − H(π) − (m/2)·mixture-info), so the attacker's MSE floor
ξ >= exp(2H(x|z)/d)/(2πe) falls as it grows. Unlike ``logdet`` it does not grow with σ itself,
which makes it comparable across clients with different noise (the per-client theory audit,
``sim.report.cem_audit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from defenses.base import Defense, DefenseError, register
from defenses.noise import Noise


@dataclass
class MixtureFit:
    """Per-class k-means statistics of a set of features (m entries per sample)."""

    centroids: torch.Tensor  # (C, K, m)
    weights: torch.Tensor  # (C, K): fraction of the class in each component, 0 = unused
    variances: torch.Tensor  # (C, K): mean over members and entries of (z - μ)²
    counts: torch.Tensor  # (C,): samples per class
    dim_log_term: torch.Tensor  # (C,): Σ_k π_k mean_j log(v_kj + σ²) on the whole class

    def within_var(self) -> float:
        """Mean squared distance per entry of every sample to its own centroid."""
        total = float(self.counts.sum())
        if total == 0:
            return float("nan")
        return float((self.counts * (self.weights * self.variances).sum(1)).sum()) / total

    def logdet(self) -> float:
        """Sample-weighted mean of the per-class diagonal log-det monitor."""
        used = (self.weights.sum(1) > 0)
        total = float(self.counts[used].sum())
        if total == 0:
            return float("nan")
        return float((self.counts[used] * self.dim_log_term[used]).sum()) / total


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min(0.0)


def _kmeanspp(x: torch.Tensor, existing: torch.Tensor, k: int) -> torch.Tensor:
    """Extend ``existing`` centres to ``k`` by k-means++ seeding on ``x``."""
    centres = existing
    while len(centres) < k:
        if len(centres) == 0:
            pick = int(torch.randint(len(x), (1,)))
        else:
            d = _sq_dists(x, centres).min(1).values
            total = float(d.sum())
            pick = int(torch.multinomial(d, 1)) if total > 0 else int(torch.randint(len(x), (1,)))
        centres = torch.cat([centres, x[pick:pick + 1]])
    return centres


def _lloyd(x: torch.Tensor, centres: torch.Tensor, iters: int) -> torch.Tensor:
    assign = None
    for _ in range(iters):
        new = _sq_dists(x, centres).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=len(centres))
        hit = counts > 0  # an emptied component keeps its place
        centres = centres.clone()
        centres[hit] = sums[hit] / counts[hit, None].to(x.dtype)
    return centres


def fit_mixture(features: torch.Tensor, labels: torch.Tensor, k: int, sigma: float,
                previous: MixtureFit | None = None, fit_cap: int = 2000,
                max_iters: int = 50) -> MixtureFit:
    """Per-class k-means (warm-started from ``previous`` where it fits) and its statistics."""
    x_all = features.detach().reshape(len(features), -1).float()
    labels = labels.reshape(-1).long()
    m = x_all.shape[1]
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    centroids = torch.zeros(n_classes, k, m)
    weights = torch.zeros(n_classes, k)
    variances = torch.zeros(n_classes, k)
    counts = torch.zeros(n_classes)
    log_term = torch.zeros(n_classes)
    warm = previous if previous is not None and previous.centroids.shape[1:] == (k, m) else None
    for c in range(n_classes):
        x = x_all[labels == c]
        counts[c] = len(x)
        k_c = min(k, len(x) // 2)
        if k_c == 0:
            continue
        start = x_all.new_zeros(0, m)
        if warm is not None and c < len(warm.centroids):
            start = warm.centroids[c][warm.weights[c] > 0][:k_c]
        sub = x if len(x) <= fit_cap else x[torch.randperm(len(x))[:fit_cap]]
        centres = _lloyd(sub, _kmeanspp(sub, start, k_c), max_iters)
        assign = _sq_dists(x, centres).argmin(1)
        sq = (x - centres[assign]) ** 2
        n_k = torch.bincount(assign, minlength=k_c).float()
        per_dim = torch.zeros(k_c, m).index_add_(0, assign, sq) / n_k.clamp_min(1)[:, None]
        pi = n_k / len(x)
        centroids[c, :k_c] = centres
        weights[c, :k_c] = pi
        variances[c, :k_c] = per_dim.mean(1)
        log_term[c] = (pi * torch.log(per_dim + sigma**2).mean(1)).sum()
    return MixtureFit(centroids, weights, variances, counts, log_term)


def noise_std_of(part: Defense) -> float | None:
    """Standard deviation of the additive noise a chain part adds (None: it adds none)."""
    if isinstance(part, Noise):
        return float(part.sigma)
    std = getattr(part, "noise_std", None)
    return float(std()) if callable(std) else None


@register
class CEM(Defense):
    name = "cem"
    DEFAULT_SIGMA = 0.05
    FIT_CAP = 2000  # samples per class that k-means iterates on
    MAX_ITERS = 50  # Lloyd iterations per fit (the repo's 50), fewer when assignments settle
    # Buffers (register_buffer in __init__), declared for the type checker.
    centroids: torch.Tensor
    weights: torch.Tensor
    variances: torch.Tensor
    counts: torch.Tensor

    def __init__(self, lam: float = 0.05, k: int = 5, sigma: float | None = None) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1e4:
            raise ValueError(f"lam must be in [0, 10000], got {lam}")
        if not 1 <= k <= 64:
            raise ValueError(f"k (components per class) must be in 1..64, got {k}")
        if sigma is not None:
            if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
                raise ValueError(f"sigma must be a float or None, got {sigma!r}")
            if not 0.0 < sigma <= 10.0:
                raise ValueError(f"sigma must be in (0, 10] (CEM presupposes noise), got {sigma}")
        self.lam, self.k = lam, k
        self._sigma_arg = None if sigma is None else float(sigma)
        self.sigma = self._sigma_arg if self._sigma_arg is not None else self.DEFAULT_SIGMA
        self.own_noise = True  # no noise part beside it: CEM adds its own
        self.register_buffer("centroids", torch.zeros(0, k, 0))
        self.register_buffer("weights", torch.zeros(0, k))
        self.register_buffer("variances", torch.zeros(0, k))
        self.register_buffer("counts", torch.zeros(0))
        self._trained_batches = 0
        self._bound_sum = 0.0
        self._active_batches = 0
        self._fit: MixtureFit | None = None

    # -- composition ---------------------------------------------------------------------
    def attach(self, parts: list[Defense]) -> None:
        stds = [s for p in parts if p is not self for s in [noise_std_of(p)] if s is not None]
        if not stds:
            return
        sigma = math.sqrt(sum(s * s for s in stds))
        if sigma <= 0.0:
            raise DefenseError("cem: the chain's noise has sigma 0, "
                               "but CEM presupposes noise (sigma > 0)")
        if self._sigma_arg is not None and not math.isclose(self._sigma_arg, sigma, rel_tol=1e-9):
            raise DefenseError(f"cem: sigma={self._sigma_arg} contradicts the chain's noise "
                               f"(sigma {sigma:g}); leave sigma out, "
                               "it is taken from the noise part")
        self.sigma = sigma
        self.own_noise = False

    # -- what is sent --------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.sigma * torch.randn_like(z) if self.own_noise else z

    def public_params(self) -> dict[str, Any]:
        return {"sigma": self.sigma} if self.own_noise else {}

    # -- the mixture ---------------------------------------------------------------------
    def fitted(self) -> bool:
        return self.centroids.numel() > 0 and bool((self.weights > 0).any())

    def wants_epoch_features(self) -> bool:
        return self.lam > 0

    def on_epoch_end(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if not self.fitted() and self._trained_batches == 0:
            return  # a fresh client before its first epoch: CEM starts after epoch 1
        previous = (MixtureFit(self.centroids, self.weights, self.variances, self.counts,
                               torch.zeros(len(self.counts))) if self.fitted() else None)
        fit = fit_mixture(features, labels, self.k, self.sigma, previous,
                          self.FIT_CAP, self.MAX_ITERS)
        self.centroids, self.weights = fit.centroids, fit.weights
        self.variances, self.counts = fit.variances, fit.counts
        self._fit = fit

    # -- the regulariser -----------------------------------------------------------------
    def bound_term(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """L_C of a batch of clean features (None when no sample has a fitted class)."""
        if not self.fitted():
            return None
        n_classes, k, m = self.centroids.shape
        flat = z.reshape(len(z), -1)
        if flat.shape[1] != m:
            raise ValueError(f"cem: features have {flat.shape[1]} entries, the centroids {m}")
        y = y.reshape(-1).long()
        keep = (y >= 0) & (y < n_classes)
        keep[keep.clone()] = (self.weights[y[keep]] > 0).any(1)
        if not bool(keep.any()):
            return None
        zs, ys = flat[keep], y[keep]
        cents = self.centroids[ys]  # (n, K, m)
        with torch.no_grad():
            d = ((zs.detach()[:, None, :] - cents) ** 2).sum(-1)
            d[self.weights[ys] <= 0] = float("inf")
            a = d.argmin(1)
        sq = (zs - cents[torch.arange(len(ys)), a]) ** 2
        group = ys * k + a
        sums = sq.new_zeros(n_classes * k, m).index_add(0, group, sq)
        cnt = torch.bincount(group, minlength=n_classes * k)
        hit = torch.nonzero(cnt > 0).squeeze(1)
        v = sums[hit] / cnt[hit, None].to(sq.dtype)
        terms = self.weights.reshape(-1)[hit] * torch.log(v + self.sigma**2).mean(1)
        per_class = sq.new_zeros(n_classes).index_add(0, hit // k, terms)
        return per_class[torch.unique(hit // k)].mean()

    def loss(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled()
        if training:
            self._trained_batches += 1
        if self.lam == 0.0:
            return z.new_zeros(())
        bound = self.bound_term(z, y)
        if bound is None:
            return z.new_zeros(())
        if training:
            self._bound_sum += float(bound.detach())
            self._active_batches += 1
        return self.lam * bound

    def report(self) -> dict[str, float]:
        nan = float("nan")
        fit = self._fit
        return {
            "bound": self._bound_sum / self._active_batches if self._active_batches else nan,
            "within-var": fit.within_var() if fit is not None else nan,
            "logdet": fit.logdet() if fit is not None else nan,
            "mixture-info": fit.logdet() - 2.0 * math.log(self.sigma) if fit is not None else nan,
        }
