"""Attacks train to convergence: the shared loop, the thread probe, and the decoder on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks import AttackError, build_attack
from attacks.threads import available_cores, fastest_threads, torch_threads
from attacks.training import Budget, fit_until_converged, split_validation


def _regression(budget: Budget, noise: float = 0.0):
    """A linear model fitted to y = 3x by SGD; the validation loss is its real error."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.linspace(-1, 1, 64).unsqueeze(1)
    y = 3 * x + noise * torch.randn_like(x)

    def epoch() -> float:
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    def validate() -> float:
        return float(((model(x) - 3 * x) ** 2).mean())

    return model, opt, fit_until_converged([model], [opt], epoch, validate, budget, "toy")


def test_stops_once_the_validation_loss_stops_improving_and_keeps_the_best_epoch():
    model, opt, curve = _regression(Budget(max_epochs=500, patience=3))
    assert curve.stopped == "converged" and curve.epochs < 500
    assert curve.epochs - curve.best_epoch == 3  # patience epochs after the best one
    assert curve.best == min(curve.val)
    with torch.no_grad():  # the best epoch's weights are the ones kept
        x = torch.linspace(-1, 1, 64).unsqueeze(1)
        assert float(((model(x) - 3 * x) ** 2).mean()) == pytest.approx(curve.best)
    assert opt.param_groups[0]["lr"] < 0.1  # cut on the plateau before stopping
    assert abs(float(model.weight) - 3) < 0.05


def test_caps_are_stated():
    assert _regression(Budget(max_epochs=2, patience=3))[2].stopped == "epoch cap"
    assert _regression(Budget(max_epochs=10_000, patience=10_000, max_seconds=0.05, min_delta=0.0))[2].stopped \
        in ("time cap", "converged")


def test_validation_split_is_seeded_disjoint_and_bounded():
    train, val = split_validation(1000, 0.1, seed=3)
    again = split_validation(1000, 0.1, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert len(val) == 100 and len(set(train.tolist()) | set(val.tolist())) == 1000
    assert len(split_validation(100, 0.1)[1]) == 50  # never more than half
    with pytest.raises(ValueError):
        split_validation(1)


def test_thread_probe_picks_one_thread_or_every_core_and_restores_the_setting():
    before = torch.get_num_threads()
    assert fastest_threads((8, 7, 7), (1, 28, 28), batch=8) in (1, available_cores())
    assert torch.get_num_threads() == before
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("spec, message", [
    ("decoder(heads='middle')", "heads must be one of end, start, both"),
    ("decoder(patience=0)", "patience >= 1"),
    ("decoder(max_seconds=0.0)", "max_seconds > 0"),
    ("ka(head_epochs=0)", "head_epochs >= 1"),
])
def test_bad_budgets_are_refused_in_one_line(spec, message):
    with pytest.raises(AttackError, match=message):
        build_attack(spec)


def test_the_bare_name_is_the_default_attack():
    """`--attacks decoder` and the default `--attacks` are one attack (they once differed, and
    the 50-epoch full-width decoder behind the bare name made the stage look 10x slow)."""
    from sim.config import SimConfig

    assert SimConfig().attacks == "decoder"
    default = build_attack("decoder")
    assert (default.budget.max_epochs, default.width, default.blocks, default.heads) == (100, 32, 2, "both")


def test_only_a_whitebox_cloud_inverts_the_rounds_starting_head_too():
    from attacks import Knowledge
    from sim.models import SplitSpec, build_head, build_tail

    spec = SplitSpec("small", (1, 28, 28), 10)
    end, start, tail = build_head(spec), build_head(spec), build_tail(spec)
    make = lambda level, s: Knowledge.from_models(level, end, tail, "none", spec, (0.5,), (0.5,),  # noqa: E731
                                                  start_head=s)
    x = torch.rand(4, 1, 28, 28)
    both = make("whitebox", start).oracles("both")
    assert len(both) == 2 and not torch.equal(both[0](x), both[1](x))
    assert torch.equal(make("whitebox", start).oracles("start")[0](x), both[1](x))
    assert len(make("query", start).oracles("both")) == 1  # a black-box cloud has the current head only
    assert len(make("whitebox", None).oracles("both")) == 1  # a run saved before start heads were kept
    with pytest.raises(AttackError, match="starting head is not known"):
        make("whitebox", None).oracles("start")
