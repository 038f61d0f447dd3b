"""InfoScissors' prediction-leakage term (``lam_y``) on real Fashion-MNIST in the U-shaped split.

Unit checks use the cloud's output h of real images through a freshly initialised U-shaped
calibration model (``SplitSpec("small", split="ushaped")``, h of width 256). The measured
effect trains that model centrally the way ``sim.client.local_train`` does in the U-shaped
split: z = head(x), h = tail(z), loss = CE(last(h)) + ``defense.output_loss(h, y)``, one Adam
1e-3 over head, tail and last layer (the defense's phi steps itself). With ``lam_x=0`` the
input-side term is zero, so ``defense.loss`` is left out to save the decoder's work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses import build_defense
from defenses.infoscissors import InfoScissors, label_club_bound
from sim.data import load_dataset, to_tensor
from tests.simhelpers import SMALL, metrics, run_sim
from sim.models import SplitSpec, build_head, build_last, build_tail

torch.set_num_threads(1)

SPEC = SplitSpec("small", (1, 28, 28), 10, split="ushaped")
N_TRAIN, EPOCHS, BATCH = 2000, 3, 64


def _inputs(x_uint8: np.ndarray, data) -> torch.Tensor:
    return (to_tensor(np.ascontiguousarray(x_uint8)) - data.mean[0]) / data.std[0]


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    d = load_dataset("fashion-mnist")
    return {"x": _inputs(d.train_x[:N_TRAIN], d), "y": torch.from_numpy(d.train_y[:N_TRAIN].copy()).long(),
            "xt": _inputs(d.test_x[:1000], d), "yt": torch.from_numpy(d.test_y[:1000].copy()).long()}


def bound_defense(lam_y: float) -> InfoScissors:
    d = build_defense(f"infoscissors(lam_x=0, lam_y={lam_y})")
    assert isinstance(d, InfoScissors)
    d.bind(SPEC.feature_shape, SPEC.in_shape, (SPEC.hidden_width,), SPEC.num_classes)
    return d


@pytest.fixture(scope="module")
def real_h(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The cloud's output for 64 real images through an untrained U-shaped model, in train mode
    as the client receives it during training (batch statistics, dropout)."""
    torch.manual_seed(0)
    head, tail = build_head(SPEC).train(), build_tail(SPEC).train()
    with torch.no_grad():
        return tail(head(data["x"][:64])), data["y"][:64]


def test_closed_form_negatives_are_the_mean_over_all_pairs(real_h):
    h, y = real_h
    logits = torch.randn(len(y), 10, generator=torch.Generator().manual_seed(0))
    bound, paired = label_club_bound(logits, y)
    log_q = F.log_softmax(logits, 1)
    every_pair = -log_q[:, y].mean()  # (i, j): q(y_j | h_i) over all n^2 pairs
    assert torch.allclose(bound, every_pair - paired) and torch.allclose(paired, F.cross_entropy(logits, y))


def test_output_term_reaches_h_and_not_phi(real_h):
    h, y = real_h
    d = bound_defense(1.0).train()
    h = h.clone().requires_grad_(True)
    before = [p.detach().clone() for p in d.classifier.parameters()]
    term = d.output_loss(h, y)
    assert all(not torch.equal(a, p) for a, p in zip(before, d.classifier.parameters()))  # phi stepped
    assert all(p.grad is None for p in d.classifier.parameters())
    term.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.classifier.parameters())  # the bound trains h only
    assert set(d.report()) == {"paired-mse", "bound", "y-ce", "y-bound"}


def test_phi_steps_lower_its_cross_entropy_and_only_while_training(real_h):
    """20 steps of phi on one batch of h: CE measured 2.29 -> 1.53 (seed 0); asserted: a drop > 0.3."""
    h, y = real_h
    torch.manual_seed(0)
    d = bound_defense(1.0)
    with torch.no_grad():
        start = float(F.cross_entropy(d.classifier(h), y))
    d.eval()
    d.output_loss(h, y)
    with torch.no_grad():
        assert float(F.cross_entropy(d.classifier(h), y)) == start  # no step in eval mode
    d.train()
    for _ in range(20):
        d.output_loss(h, y)
    with torch.no_grad():
        end = float(F.cross_entropy(d.classifier(h), y))
    assert end < start - 0.3, (start, end)


def test_classifier_only_when_needed():
    vanilla = build_defense("infoscissors(lam_y=1)")
    vanilla.bind(SPEC.feature_shape, SPEC.in_shape)
    assert vanilla.needs_output() and vanilla.classifier is None
    with pytest.raises(RuntimeError, match="U-shaped"):
        vanilla.output_loss(torch.zeros(2, SPEC.hidden_width), torch.zeros(2, dtype=torch.long))
    assert bound_defense(0.0).classifier is None and not bound_defense(0.0).needs_output()
    # 256 -> 64 -> 10: the size the module docstring quotes
    assert sum(p.numel() for p in bound_defense(1.0).classifier.parameters()) == 256 * 64 + 64 + 64 * 10 + 10
