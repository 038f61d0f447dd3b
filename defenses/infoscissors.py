"""InfoScissors' two leakage regularisers (Duan et al., NeurIPS 2024; docs/papers.md C.3, C.4, D.6).

**Input leakage** (``lam_x``): a CLUB-style variational upper bound on the mutual information
between the input x and the feature z, with a client-side Gaussian decoder q(x|z) = N(g(z), s²I)
(fixed s):

    I(z; x) <= E_p(x,z)[log q(x|z)] − E_p(x)p(z)[log q(x|z)]
             = (1 / 2s²) · ( E_{x' indep. z} ||x' − g(z)||² − E_{(x,z) paired} ||x − g(z)||² ).

Each batch (see :mod:`defenses.simulated`) the client first trains g by MSE on the paired
``(z.detach(), x)`` (maximum likelihood for q: the simulated Knowledge-Alignment attacker), then
the head minimises ``lam_x`` times the bound through g with frozen parameters: it pushes the
paired reconstruction error up relative to the error against unrelated images, i.e. towards a
decoder output that says no more about *this* x than about any other.

**Prediction leakage** (``lam_y``, U-shaped split only): the same bound on I(h; y) between the
cloud's output h (the tail's penultimate activations) and the client's labels, with a client-side
classifier q_phi(y|h), an MLP ``flatten(h) -> y_width -> ReLU -> classes``:

    I(h; y) <= E_p(h,y)[log q(y|h)] − E_p(h)p(y)[log q(y|h)] = −CE(q(h), y) + E_{y'} CE(q(h), y').

Each U-shaped batch, in :meth:`InfoScissors.output_loss`, phi first takes one step of its own
Adam on ``CE(q(h.detach()), y)`` (the simulated model-completion attacker), then the client's
objective adds ``lam_y`` times the bound through q with frozen parameters; its gradient flows
into h only, so dL/dh sent to the cloud carries it into the honest cloud's tail (docs/papers.md C.4) and,
through dL/dz, into the head: both learn an h from which q cannot tell this sample's label from
any other's, while the client's last layer, trained jointly on the plain CE, still decodes y.
Measured at small scale (tests/test_prediction_leakage.py): ``lam_y = 0.3`` lowers a 40-label
completion probe on h by 2-4 points at about 1 point of client accuracy, ``lam_y >= 1`` costs
more accuracy than it hides; in 2-round, 4-client Fashion-MNIST runs ``pmc`` was not lowered
consistently (seeds 0 / 1 / 2: 0.652 -> 0.590, 0.621 -> 0.723, 0.676 -> 0.688).

Choices, and why:

* Errors are per-pixel means (MSE on [0, 1] images) instead of sums, and 1/(2s²) is folded into
  ``lam_x``: with d pixels, ``lam_x`` = λ_d · d / (2s²) of the paper's objective, so one weight
  means the same across image sizes and s needs no separate setting.
* Both negative terms are the mean over *all* n² pairs of the batch, in closed form: for x,
  mean ||x_j||² + mean ||g(z_i)||² − 2 x̄·ḡ; for y, the cross-entropy of q(·|h_i) against the
  batch's label histogram. That is the expectation over every shuffle of the batch that
  "shuffled-batch negatives" sample, with no extra randomness. Like CLUB's estimator it
  includes the n paired terms.
* phi is a **federated parameter**, averaged with the head within the group like the decoder,
  for the decoder's reasons (:mod:`defenses.simulated`): the tail it attacks is the cloud's
  one global tail, so the clients' classifiers learn the same completion and their average is
  the stronger simulated attacker from the next round on; and client state must stay small
  (phi is about 17 k numbers at the defaults). It reveals nothing new to the aggregator: the
  client's last layer, federated the same way, is already a classifier of y from h (see
  :mod:`attacks.completion`). It exists only when ``lam_y > 0`` and the defense was bound in
  the U-shaped split, so ``lam_y = 0`` runs ship no unused weights. Its Adam state starts
  fresh every round, like the head's; there is no pre-training (no public labelled data).
* In the vanilla split the cloud computes the logits itself and the client never sees h, so
  ``lam_y > 0`` there is refused before the run starts (:func:`sim.experiment.prepare`).
* The decoder, its federation and the [0, 1] mapping of x are those of
  :class:`defenses.simulated.SimulatedAttacker`. What is sent is z itself.

``report()``: ``paired-mse`` = the simulated inversion attacker's mean reconstruction MSE on this
round's training batches, ``bound`` = the mean per-pixel input bound (shuffled minus paired
MSE); with ``lam_y > 0`` also ``y-ce`` = the simulated completion attacker's mean CE and
``y-bound`` = the mean prediction bound (all-labels minus paired CE, in nats).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defenses.base import register
from defenses.simulated import SimulatedAttacker, frozen_call, step_alone, unit_range
from sim.models import SplitSpec


def label_club_bound(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bound: CE against the batch's label histogram − paired CE, paired CE) of a batch."""
    log_q = F.log_softmax(logits, dim=1)
    paired = F.nll_loss(log_q, y)
    histogram = torch.bincount(y, minlength=logits.shape[1]).to(log_q.dtype) / len(y)
    all_pairs = -(log_q.mean(0) @ histogram)
    return all_pairs - paired, paired


def club_bound(recon01: torch.Tensor, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pixel bound: all-pairs MSE − paired MSE, paired MSE) of a batch."""
    r, x = recon01.flatten(1), x01.flatten(1)
    d = r.shape[1]
    paired = ((x - r) ** 2).mean()
    all_pairs = ((x * x).sum(1).mean() + (r * r).sum(1).mean() - 2 * x.mean(0) @ r.mean(0)) / d
    return all_pairs - paired, paired


@register
class InfoScissors(SimulatedAttacker):
    name = "infoscissors"

    def __init__(self, lam_x: float = 1.0, lam_y: float = 0.0, width: int = 16, blocks: int = 1,
                 y_width: int = 64) -> None:
        super().__init__(width, blocks)
        if not 0.0 <= lam_x <= 1e4:
            raise ValueError(f"lam_x must be in [0, 10000], got {lam_x}")
        if not 0.0 <= lam_y <= 1e4:
            raise ValueError(f"lam_y must be in [0, 10000], got {lam_y}")
        if not 1 <= y_width <= 4096:
            raise ValueError(f"y_width must be in 1..4096, got {y_width}")
        self.lam_x, self.lam_y, self.y_width = lam_x, lam_y, y_width
        self.classifier: nn.Module | None = None
        self._classifier_optimizer: torch.optim.Optimizer | None = None
        self._bound_sum = 0.0
        self._paired_sum = 0.0
        self._batches = 0
        self._y_bound_sum = 0.0
        self._y_ce_sum = 0.0
        self._y_batches = 0

    def bind(self, spec: SplitSpec) -> None:
        super().bind(spec)
        if self.lam_y == 0.0 or not spec.ushaped or self.classifier is not None:
            return  # no classifier needed, not U-shaped (output_loss says so), or already built
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(spec.hidden_width, self.y_width),
                                        nn.ReLU(), nn.Linear(self.y_width, spec.num_classes))

    def needs_output(self) -> bool:
        return self.lam_y > 0.0

    def attacker_loss(self, recon01: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
        return ((recon01 - x01) ** 2).mean()

    def loss(self, x: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x01 = unit_range(x)
        self.attacker_step(z, x01)
        bound, paired = club_bound(self.frozen_decode(z), x01)
        if self.training and torch.is_grad_enabled():
            self._bound_sum += float(bound.detach())
            self._paired_sum += float(paired.detach())
            self._batches += 1
        return self.lam_x * bound

    def output_loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``lam_y`` x the prediction bound on the cloud's output h, after phi's own step."""
        if self.lam_y == 0.0:
            return h.new_zeros(())
        if self.classifier is None:
            raise RuntimeError("infoscissors: lam_y > 0 needs the classifier on the cloud's output; call "
                               "defense.bind(spec) with a U-shaped spec")
        training = self.training and torch.is_grad_enabled()
        if training:
            if self._classifier_optimizer is None:
                self._classifier_optimizer = torch.optim.Adam(self.classifier.parameters(), lr=self.LR)
            step_alone(self._classifier_optimizer, F.cross_entropy(self.classifier(h.detach()), y))
        bound, paired = label_club_bound(frozen_call(self.classifier, h), y)
        if training:
            self._y_bound_sum += float(bound.detach())
            self._y_ce_sum += float(paired.detach())
            self._y_batches += 1
        return self.lam_y * bound

    def report(self) -> dict[str, float]:
        nan = float("nan")
        out = {"paired-mse": self._paired_sum / self._batches if self._batches else nan,
               "bound": self._bound_sum / self._batches if self._batches else nan}
        if self.lam_y > 0.0:
            out |= {"y-ce": self._y_ce_sum / self._y_batches if self._y_batches else nan,
                    "y-bound": self._y_bound_sum / self._y_batches if self._y_batches else nan}
        return out
