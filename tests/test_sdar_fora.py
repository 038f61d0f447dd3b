"""SDAR and FORA: the no-head-access attacks that align a substitute head to what the cloud saw.

Fast tests build them at tiny scale (real torch, untrained models, a few dozen images) to check
their contract: they fit on the cloud's knowledge alone, keep a curve per training phase, return
[0, 1] images of the right shape, and refuse what they cannot do with one-line AttackErrors.
The slow test runs the real simulation (Flower + Ray) and checks the acceptance: on an
undefended run both beat KA, the earlier no-head-access attack, in mean SSIM.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attacks import AttackError, Knowledge, build_attack
from attacks.alignment import FeatureCritic, critic_loss, mk_mmd
from sim.models import SplitSpec, build_head, build_tail
from tests.simhelpers import run_cli

SPEC = SplitSpec("small", (1, 28, 28), 10)
TINY = dict(max_epochs=2, patience=1, batch_size=16, width=8, blocks=0, critic_width=8)


def tiny_knowledge(spec: SplitSpec = SPEC, n_observed: int = 48,
                   level: str = "none") -> tuple[Knowledge, torch.Tensor, torch.Tensor]:
    """The cloud's knowledge of an (untrained) head, what it recorded, and aux data."""
    torch.manual_seed(0)
    head, tail = build_head(spec).eval(), build_tail(spec).eval()
    know = Knowledge.from_models(level, head, tail, "none", spec, (0.5,), (0.25,))
    with torch.no_grad():
        know.observed = head((torch.rand(n_observed, *spec.in_shape) - 0.5) / 0.25)
    aux = torch.rand(40, *spec.in_shape)
    return know, aux, torch.randint(0, spec.num_classes, (40,))


@pytest.mark.parametrize("name, extra", [("sdar", {}), ("sdar", {"image_adv": 0.1}),
                                         ("fora", {})])
def test_fit_and_run_at_tiny_scale(name, extra):
    know, aux, labels = tiny_knowledge()
    attack = build_attack(name, **TINY, **extra)
    attack.fit(know, aux, labels)
    out = attack.run(know.observed[:5])
    assert out.shape == (5, 1, 28, 28) and 0 <= out.min() and out.max() <= 1
    assert [c.name for c in attack.curves] == [f"{name} substitute", f"{name} inversion"]
    for curve in attack.curves:
        assert 1 <= curve.epochs <= 2 and curve.stopped in ("converged", "epoch cap")
        assert all(np.isfinite(curve.val)) and curve.best >= 0


def test_fora_works_on_a_ushaped_split_and_sdar_refuses_it():
    """FORA matches feature distributions only; SDAR needs the tail's class logits."""
    ushaped = SplitSpec("small", (1, 28, 28), 10, split="ushaped")
    know, aux, labels = tiny_knowledge(ushaped)
    fora = build_attack("fora", **TINY)
    fora.fit(know, aux)  # no labels needed either
    assert fora.run(know.observed[:3]).shape == (3, 1, 28, 28)
    with pytest.raises(AttackError, match="vanilla split, not on a ushaped"):
        build_attack("sdar", **TINY).fit(know, aux, labels)


@pytest.mark.parametrize("spec, match", [
    ("sdar(lambda1=-1)", "weights"),
    ("sdar(lr=0)", "learning rates"),
    ("fora(a=1.5)", "0 <= a <= 1"),
    ("fora(batch_size=1)", "batch_size >= 2"),
    ("sdar(max_epochs=0)", "max_epochs >= 1"),
    ("fora(width=0)", "width >= 1"),
])
def test_bad_parameters_are_refused(spec, match):
    with pytest.raises(AttackError, match=match) as info:
        build_attack(spec)
    assert "\n" not in str(info.value)


def test_missing_knowledge_is_refused():
    know, aux, labels = tiny_knowledge()
    with pytest.raises(AttackError, match="labels"):
        build_attack("sdar", **TINY).fit(know, aux)
    know.observed = None
    for name in ("sdar", "fora"):
        with pytest.raises(AttackError, match="knowledge.observed"):
            build_attack(name, **TINY).fit(know, aux, labels)
    know.observed = torch.rand(10, 4, 7, 7)
    with pytest.raises(AttackError, match="recorded features of shape"):
        build_attack("fora", **TINY).fit(know, aux)


def test_mk_mmd_and_critic_losses():
    """The MMD is 0 for identical sets, grows with the shift; the critic losses are finite
    and the BCE one is about 2 log 2 for a critic that cannot tell the sets apart."""
    torch.manual_seed(0)
    a = torch.rand(64, 8, 7, 7)
    assert float(mk_mmd(a, a.clone())) == pytest.approx(0.0, abs=1e-6)
    near, far = float(mk_mmd(a, torch.rand_like(a))), float(mk_mmd(a, torch.rand_like(a) + 0.5))
    assert 0 < near < far
    critic = FeatureCritic((8, 7, 7), width=8)
    torch.nn.init.zeros_(critic.body[-1].weight)
    torch.nn.init.zeros_(critic.body[-1].bias)
    assert float(critic_loss(critic, a, a, "bce")) == pytest.approx(2 * np.log(2), rel=1e-5)
    assert np.isfinite(float(critic_loss(critic, a, torch.rand_like(a), "wgan-gp")))


# Comparable decoders for all three (CEM's network, narrow for the CPU budget); KA's own
# defaults (a 64-wide, 8-block decoder for 50 epochs) would take most of an hour here.
SDAR_MARGIN, FORA_MARGIN = 0.0, 0.05
KA = "ka(head_epochs=4, epochs=10, width=32, blocks=2, batch_size=128)"


@pytest.mark.slow
def test_sdar_and_fora_beat_ka_on_an_undefended_run(tmp_path: Path):
    """Acceptance on the real simulation: 10 clients, 2 rounds, no defense, 3000 public aux
    images (aux fraction 0.3), the cloud knowing nothing of the heads.

    Measured on this configuration by attacking a saved run directly (mean SSIM over the 10
    clients, 64 features each; mean-image baseline 0.17): KA 0.295, SDAR 0.306, FORA 0.395
    (the query-access decoder, for reference: 0.406). FORA's margin leaves half its measured
    gap as headroom; SDAR's gain is small (0.011), so only
    strictly better than KA is asserted for it (thin: it may flip with the seed).
    """
    start = time.perf_counter()
    # Three trained attacks outlast run_sim's 10-minute limit on a busy 2-core machine.
    proc = run_cli(tmp_path, "--clients", "10", "--rounds", "2", "--train-subset", "3000",
                   "--defense", "none", "--aux-fraction", "0.3", "--attacker-knowledge", "none",
                   "--attacks", f"{KA},sdar,fora", timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, = (p for p in tmp_path.iterdir() if p.is_dir())
    with (run_dir / "leakage.csv").open() as f:
        rows = list(csv.DictReader(f))
    ssim = {a: float(np.mean([float(r["ssim"]) for r in rows if r["attack"] == a]))
            for a in ("ka", "sdar", "fora")}
    print(f"\nmean SSIM {ssim} in {time.perf_counter() - start:.0f} s")
    assert all(sum(r["attack"] == a for r in rows) == 10 for a in ssim)
    assert ssim["sdar"] > ssim["ka"] + SDAR_MARGIN
    assert ssim["fora"] > ssim["ka"] + FORA_MARGIN
