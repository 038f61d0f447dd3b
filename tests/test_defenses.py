"""The client-side defenses on real Fashion-MNIST: each one's defining behaviour, measured.

Mechanical properties (noise scale, zeroed fractions, composition, state round-trips) are
checked on features of real images through a freshly initialised head. Training effects
(NoPeek's distance correlation, MID's KL, CEM's within-cluster variance) come from short
centralized trainings of the calibration head (docs/calibration.md; ``SplitSpec("small")``, z of shape 8x7x7 in
[0, 1]) with Adam 1e-3, each trained once per module. To keep the module fast on two busy
cores, the cloud's tail is replaced by a small MLP in those trainings (the defenses act on the
head's side only) and the training runs like ``sim.client.local_train``: ``z = head(x)``,
``z_sent = defense(z)``, loss = CE(tail(z_sent)) + ``defense.loss(x, z, y)``, and
``on_epoch_end`` with eval-mode clean features before the first epoch and after each one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses import (
    REGISTRY,
    Compose,
    Defense,
    DefenseError,
    build_defense,
    federated_arrays,
    load_arrays,
    local_arrays,
)
from defenses.cem import CEM, fit_mixture
from defenses.dropout import Dropout
from defenses.mid import MID
from defenses.noise import Noise
from defenses.nopeek import distance_correlation
from defenses.topk import TopK
from sim.data import load_dataset, to_tensor
from sim.models import SplitSpec, build_head
from sim.records import from_record, to_record

torch.set_num_threads(1)

SPEC = SplitSpec("small", (1, 28, 28), 10)
SHAPE = SPEC.feature_shape  # (8, 7, 7)
M = math.prod(SHAPE)  # 392
N_TRAIN, EPOCHS, BATCH = 2000, 3, 64


def _inputs(x_uint8: np.ndarray, data) -> torch.Tensor:
    return (to_tensor(np.ascontiguousarray(x_uint8)) - data.mean[0]) / data.std[0]


@pytest.fixture(scope="module")
def data():
    d = load_dataset("fashion-mnist")
    return {
        "x": _inputs(d.train_x[:N_TRAIN], d),
        "y": torch.from_numpy(d.train_y[:N_TRAIN].copy()).long(),
        "xt": _inputs(d.test_x[:1000], d), "yt": torch.from_numpy(d.test_y[:1000].copy()).long(),
    }


@pytest.fixture(scope="module")
def real_z(data):
    """Clean features of 256 real images through an untrained head (eval mode)."""
    torch.manual_seed(0)
    head = build_head(SPEC).eval()
    with torch.no_grad():
        return head(data["x"][:256]), data["y"][:256]


def built(text: str) -> Defense:
    d = build_defense(text)
    d.bind(SPEC)
    return d


def train(text: str, data: dict, seed: int = 0, epochs: int = EPOCHS) -> dict:
    """Centralized head + defense + small tail on N_TRAIN images, as local_train uses a defense."""
    torch.manual_seed(seed)
    head = build_head(SPEC)
    tail = nn.Sequential(nn.Flatten(), nn.Linear(M, 128), nn.ReLU(), nn.Linear(128, 10))
    defense = built(text)
    x, y = data["x"], data["y"]
    kl_history: list[float] = []  # MID: KL of the test features, at start and after each epoch

    def track_kl() -> None:
        if isinstance(defense, MID):
            with torch.no_grad():
                kl_history.append(float(MID.kl(*defense.encode(head.eval()(data["xt"])))))
            head.train()

    track_kl()
    opt = torch.optim.Adam([*head.parameters(), *defense.parameters(), *tail.parameters()], lr=1e-3)

    def epoch_end() -> None:
        if defense.wants_epoch_features():
            head.eval()
            with torch.no_grad():
                feats = head(x)
            defense.on_epoch_end(feats, y)
            head.train()

    epoch_end()
    head.train(), tail.train(), defense.train()
    batches = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), BATCH):
            ids = perm[i:i + BATCH]
            z = head(x[ids])
            loss = F.cross_entropy(tail(defense(z)), y[ids]) + defense.loss(x[ids], z, y[ids])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            batches += 1
        epoch_end()
        track_kl()
    head.eval(), tail.eval(), defense.eval()
    with torch.no_grad():
        zt = head(data["xt"])
        acc = float((tail(defense(zt)).argmax(1) == data["yt"]).float().mean())
    return {"head": head, "defense": defense, "z_test": zt, "acc": acc, "batches": batches,
            "kl_history": kl_history, "report": defense.report()}


@pytest.fixture(scope="module")
def runs(data):
    texts = {"none": "none", "nopeek": "nopeek(alpha=0.5)", "noise": "noise(sigma=0.05)",
             "cem": "noise(sigma=0.05)+cem(lam=0.5)"}
    out = {k: train(t, data) for k, t in texts.items()}
    out |= {k: train(t, data, epochs=2) for k, t in (("mid", "mid(lam=0.1)"),
                                                      ("mid-weak", "mid(lam=0.01)"))}
    return out


# ------------------------------------------------------------------ building and rejecting

@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_defense_builds_with_defaults(name, real_z, data):
    d = built(name)
    z, y = real_z
    z = z[:32].clone().requires_grad_(True)
    d.train()
    out = d(z)
    loss = d.loss(data["x"][:32], z, y[:32])
    assert out.shape == z.shape and loss.shape == () and torch.isfinite(loss)
    (out.sum() + loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert all(isinstance(v, float) and not math.isinf(v) for v in d.report().values())


@pytest.mark.parametrize("text, needle", [
    ("noise(sigma=-1)", "sigma"),
    ("dropout(p=1.0)", "p must be"),
    ("dropout(p='a')", "must be float"),
    ("topk(ratio=1.5)", "ratio"),
    ("laplace(epsilon=0)", "epsilon"),
    ("nopeek(alpha=-0.1)", "alpha"),
    ("mid(lam=-1)", "lam"),
    ("mid(hidden=0)", "hidden"),
    ("ppdl(theta=0)", "theta"),
    ("ppdl(epsilon=-1)", "epsilon"),
    ("cem(k=0)", "k (components"),
    ("cem(lam=-1)", "lam"),
    ("cem(sigma=0)", "presupposes noise"),
    ("cem(sigma='x')", "sigma must be"),
    ("noise(sigma=0)+cem", "presupposes noise"),
    ("noise(sigma=0.05)+cem(sigma=0.1)", "contradicts"),
    ("cem(lamb=1)", "unknown parameter 'lamb'"),
    ("adversarial(alpha=-1)", "alpha"),
    ("adversarial(ssim_treshold=0.5)", "unknown parameter 'ssim_treshold'; accepted: adversarial(alpha=0.3, "),
    ("adversarial(width=0)", "width"),
    ("infoscissors(lam_x=-1)", "lam_x"),
    ("infoscissors(lam_y=-0.5)", "lam_y"),
    ("noise(sigma=0.05)+infoscissors(y_width=0)", "y_width"),
])
def test_bad_values_give_one_line_errors(text, needle):
    with pytest.raises(DefenseError) as info:
        build_defense(text)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg
    assert any(msg.startswith(name + ":") for name in REGISTRY), msg


def test_unknown_defense_lists_every_one_including_the_simulated_attackers():
    with pytest.raises(DefenseError) as info:
        build_defense("noise+infoscisors(lam_x=1)")
    msg = str(info.value)
    assert msg.startswith("unknown defense 'infoscisors'; available: ") and "\n" not in msg
    for spec in ("adversarial(alpha=0.3, ssim_threshold=0.5, width=16, blocks=1)",
                 "infoscissors(lam_x=1.0, lam_y=0.0, width=16, blocks=1, y_width=64)", "cem(", "noise("):
        assert spec in msg, msg


# ------------------------------------------------------------------ what is sent

@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.5])
def test_noise_std_matches_sigma(real_z, sigma):
    z = real_z[0]
    for mode in (True, False):  # training and inference alike
        d = built(f"noise(sigma={sigma})").train(mode)
        diff = d(z) - z
        assert abs(float(diff.std()) / sigma - 1) < 0.02
        assert abs(float(diff.mean())) < 0.02 * sigma


@pytest.mark.parametrize("epsilon", [1.0, 5.0, 20.0])
def test_laplace_std_is_sqrt2_over_epsilon(real_z, epsilon):
    z = real_z[0]
    for mode in (True, False):
        d = built(f"laplace(epsilon={epsilon})").train(mode)
        diff = d(z) - z
        b = 1 / epsilon
        assert abs(float(diff.std()) / (math.sqrt(2) * b) - 1) < 0.03
        # Laplace, not Gaussian: E|n| = b (a Gaussian of the same std would give 1.13 b)
        assert abs(float(diff.abs().mean()) / b - 1) < 0.03
    assert built(f"laplace(epsilon={epsilon})").public_params()["scale"] == pytest.approx(b)


def test_dropout_zeroes_p_without_rescaling(real_z):
    z = real_z[0] + 0.01  # no exact zeros in the clean features
    for mode in (True, False):
        d = built("dropout(p=0.3)").train(mode)
        zz = z.clone().requires_grad_(True)
        out = d(zz)
        dropped = out == 0
        assert abs(float(dropped.float().mean()) - 0.3) < 0.01
        torch.testing.assert_close(out[~dropped], z[~dropped])  # kept entries unchanged
        out.sum().backward()
        assert torch.equal(zz.grad, (~dropped).float())


def test_topk_zeroes_smallest_fraction_per_sample(real_z):
    z, _ = real_z
    # samples on very different scales: a batch-wide threshold would empty the small ones
    scaled = (z * torch.logspace(-3, 0, len(z))[:, None, None, None]).requires_grad_(True)
    out = built("topk(ratio=0.25)")(scaled)
    zero = (out == 0).reshape(len(z), -1)
    assert (zero.sum(1) == round(0.25 * M)).all()
    flat, s = out.detach().reshape(len(z), -1).abs(), scaled.detach().reshape(len(z), -1).abs()
    kept_min = torch.where(zero, torch.inf, s).min(1).values
    dropped_max = torch.where(zero, s, -torch.inf).max(1).values
    assert (kept_min >= dropped_max).all()  # the dropped are each sample's smallest
    torch.testing.assert_close(flat[~zero], s[~zero])
    out.sum().backward()
    assert torch.equal(scaled.grad.reshape(len(z), -1), (~zero).float())


def test_ppdl_shares_a_noisy_clipped_fraction(real_z):
    z = real_z[0]
    c = round(0.1 * M)
    # every entry passes the test (tau far below): exactly c per sample, values clipped to gamma
    out = built("ppdl(theta=0.1, epsilon=50.0, gamma=0.6, tau=-1000.0)")(z).reshape(len(z), -1)
    nz = out != 0
    assert (nz.sum(1) == c).all() and float(out.abs().max()) <= 0.6 + 1e-6
    # no noise to speak of, threshold 0.5: only entries above it are sent, unchanged
    d = built("ppdl(theta=0.1, epsilon=1e9, gamma=1.0, tau=0.5)")
    out = d(z).reshape(len(z), -1)
    flat = z.reshape(len(z), -1)
    nz = out != 0
    assert (nz.sum(1) <= c).all() and (nz.sum(1) == torch.clamp((flat >= 0.5).sum(1), max=c)).all()
    assert (flat[nz] >= 0.5 - 1e-4).all()
    torch.testing.assert_close(out[nz], flat[nz], atol=1e-4, rtol=0)
    # which entries are sent is random, not simply the largest
    assert not torch.equal(d(z) != 0, d(z) != 0)
    # the released values carry Laplace noise of scale 2c*gamma/(2/9*epsilon)
    d = built("ppdl(theta=0.1, epsilon=2000.0, gamma=100.0, tau=-1e3)")
    _, _, b_value = d.scales(M)
    out = d(z)
    noise = (out - z)[out != 0]
    assert noise.numel() == c * len(z)
    assert abs(float(noise.std()) / (math.sqrt(2) * b_value) - 1) < 0.05


def test_composition_chains_forward_and_sums_losses(real_z, data):
    z, y = real_z
    d = built("dropout(p=0.5)+noise(sigma=0.1)")
    assert isinstance(d, Compose) and [type(p) for p in d.parts] == [Dropout, Noise]
    torch.manual_seed(3)
    out = d(z)
    torch.manual_seed(3)
    torch.testing.assert_close(out, d.parts[1](d.parts[0](z)))
    # half the entries dropped, noise on all: E(out - z)^2 = p E z^2 + sigma^2
    rms = float((out - z).pow(2).mean().sqrt())
    assert abs(rms / math.sqrt(0.5 * float(z.pow(2).mean()) + 0.1**2) - 1) < 0.02
    both = built("nopeek(alpha=0.3)+dropout(p=0.1)+nopeek(alpha=0.2)")
    x = data["x"][:64]
    torch.testing.assert_close(both.loss(x, z[:64], y[:64]), 0.5 * distance_correlation(x, z[:64]))
    assert set(both.report()) == {"nopeek.dcor"}
    assert type(built("none+topk(ratio=0.1)")) is TopK and type(build_defense("none")) is Defense
    assert built("dropout(p=0.2)+noise(sigma=0.1)").public_params() == {"0.dropout.p": 0.2,
                                                                          "1.noise.sigma": 0.1}


def test_cem_takes_sigma_from_its_noise_partner(real_z):
    z = real_z[0]
    alone = built("cem")
    assert alone.own_noise and alone.sigma == CEM.DEFAULT_SIGMA == 0.05
    assert alone.public_params() == {"sigma": 0.05}
    assert abs(float((alone(z) - z).std()) / 0.05 - 1) < 0.02  # CEM alone = noise + CEM
    assert abs(float((built("cem(sigma=0.02)")(z) - z).std()) / 0.02 - 1) < 0.02
    chain = built("noise(sigma=0.1)+cem(lam=0.05)")
    cem = chain.parts[1]
    assert cem.sigma == 0.1 and not cem.own_noise
    assert abs(float((chain(z) - z).std()) / 0.1 - 1) < 0.02  # the noise is added once
    assert chain.public_params() == {"0.noise.sigma": 0.1}
    assert built("cem+noise(sigma=0.1)").parts[0].sigma == 0.1  # order does not matter
    assert built("noise(sigma=0.1)+cem(sigma=0.1)").parts[1].sigma == 0.1
    lap = built("laplace(epsilon=10)+cem").parts[1]
    assert lap.sigma == pytest.approx(math.sqrt(2) / 10) and not lap.own_noise
    drop = built("cem(sigma=0.01)+dropout(p=0.2)").parts[0]
    assert drop.own_noise and drop.sigma == 0.01


# ------------------------------------------------------------------ state

def _with_fitted_cem(text: str, z: torch.Tensor, y: torch.Tensor) -> Defense:
    d = built(text)
    cem = d if isinstance(d, CEM) else next(p for p in d.parts if isinstance(p, CEM))
    cem.loss(None, z, y)  # one training batch seen: fitting may start
    d.on_epoch_end(z, y)
    assert cem.fitted()
    return d


@pytest.mark.parametrize("text", ["mid(lam=0.1)", "noise(sigma=0.05)+cem(lam=0.1)", "cem(k=3)",
                                  "mid+cem", "ppdl", "nopeek+laplace(epsilon=4)",
                                  "adversarial+noise(sigma=0.05)", "infoscissors(lam_x=2.0)"])
def test_state_round_trips_and_rebuilds_identically(text, real_z, data):
    z, y = real_z
    x = data["x"][:len(z)]
    torch.manual_seed(0)
    d = _with_fitted_cem(text, z, y) if "cem" in text else built(text)
    with torch.no_grad():  # change the parameters from their initial values
        for p in d.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fed, loc = federated_arrays(d), local_arrays(d)
    assert all(k.startswith("defense.") for k in fed)
    decoder = "adversarial" in text or "infoscissors" in text  # federated, BN statistics local
    assert ("mid" in text or decoder) == bool(fed) and ("cem" in text or decoder) == bool(loc)
    # through Flower records, as the client and the server carry them
    fed, loc = from_record(to_record(fed)), from_record(to_record(loc)) if loc else {}
    torch.manual_seed(1)
    again = built(text)
    load_arrays(again, fed, loc)
    for a, b in zip([*d.parameters(), *d.buffers()], [*again.parameters(), *again.buffers()]):
        assert torch.equal(a, b)
    for mode in (True, False):
        d.train(mode), again.train(mode)
        torch.manual_seed(5)
        out1, loss1 = d(z), d.loss(x, z, y)
        torch.manual_seed(5)
        out2, loss2 = again(z), again.loss(x, z, y)
        assert torch.equal(out1, out2) and torch.equal(loss1, loss2)


def test_mid_needs_bind_and_keeps_z_in_range(real_z):
    z = real_z[0]
    d = build_defense("mid")
    assert federated_arrays(d) == {}
    with pytest.raises(RuntimeError, match="bind"):
        d(z)
    d.bind(SPEC)
    d.bind(SPEC)  # idempotent
    with pytest.raises(ValueError, match="already bound"):
        d.bind(SplitSpec("small", (1, 28, 28), 10, cut=2))
    n_params = sum(p.numel() for p in d.parameters())
    assert n_params == (M * 2 * M + 2 * M) + (M * 2 * M + 2 * M) + (2 * M * M + M)
    out = d.train()(z)
    assert out.shape == z.shape and 0 <= float(out.detach().min())
    assert float(out.detach().max()) <= 1
    d.eval()
    assert torch.equal(d(z), d(z))  # the mean at inference
    d.train()
    assert not torch.equal(d(z), d(z))  # a sample in training
    chain = build_defense("mid+noise")
    chain.bind(SPEC)
    assert chain.parts[0].feature_shape == SHAPE


# ------------------------------------------------------------------ CEM mechanics

def test_cem_is_off_until_fitted_after_first_epoch(real_z):
    z, y = real_z
    d = built("cem(lam=1.0)")
    assert d.wants_epoch_features()
    d.on_epoch_end(z, y)  # a fresh client before training: nothing fitted (docs/papers.md A.4: off in epoch 1)
    assert not d.fitted() and float(d.loss(None, z, y)) == 0.0  # (this is a trained batch)
    d.on_epoch_end(z, y)  # after a trained batch it fits
    assert d.fitted()
    assert d.centroids.shape == (10, 5, M) and d.weights.shape == (10, 5)
    torch.testing.assert_close(d.weights.sum(1), torch.ones(10))
    assert float(d.loss(None, z, y)) < 0  # log(v + sigma^2) with v, sigma^2 << 1
    rep = d.report()
    assert math.isfinite(rep["within-var"]) and math.isfinite(rep["logdet"])
    # warm start: refitting the same features keeps the centroids where they are
    before = d.centroids.clone()
    d.on_epoch_end(z, y)
    torch.testing.assert_close(d.centroids, before, atol=1e-5, rtol=0)


def test_cem_handles_missing_and_tiny_classes(real_z):
    z, y = real_z
    labels = torch.full_like(y, 0)
    labels[:3] = 2  # class 2: 3 samples -> 1 component
    labels[3] = 4  # class 4: 1 sample -> skipped; classes 1, 3: absent
    d = built("noise(sigma=0.05)+cem(lam=1.0, k=5)")
    cem = d.parts[1]
    cem.loss(None, z, labels)
    d.on_epoch_end(z, labels)
    used = (cem.weights > 0).sum(1).tolist()
    assert used == [5, 0, 1, 0, 0]
    zz = z.clone().requires_grad_(True)
    batch_y = labels.clone()
    batch_y[10:14] = torch.tensor([1, 3, 7, 4])  # absent, absent, unseen (> C), skipped
    loss = d.loss(None, zz, batch_y)
    assert torch.isfinite(loss) and float(loss) < 0
    loss.backward()
    g = zz.grad.reshape(len(z), -1).abs().sum(1)
    assert (g[10:14] == 0).all() and (g[:3] > 0).all() and (g[20:] > 0).all()
    # a client without any usable class still trains, with loss 0
    lonely = built("cem(lam=1.0)")
    one_each = torch.arange(10)
    lonely.loss(None, z[:10], one_each)
    lonely.on_epoch_end(z[:10], one_each)
    assert not lonely.fitted()
    zz = z[:10].clone().requires_grad_(True)
    assert float(lonely.loss(None, zz, one_each)) == 0.0
    assert lonely(zz).shape == zz.shape
    # a class seen with fewer than 2K samples: fewer components, then more when data grows
    fit = fit_mixture(z[:8], torch.zeros(8, dtype=torch.long), 5, 0.05)
    assert int((fit.weights > 0).sum()) == 4


@pytest.mark.parametrize("text", ["adversarial(alpha=1.0, ssim_threshold=-1.0)", "infoscissors(lam_x=1.0)"])
def test_simulated_attacker_steps_itself_and_penalises_only_the_head(text, data):
    """One client batch as local_train runs it: the client's optimiser covers head + defense."""
    torch.manual_seed(0)
    head, d = build_head(SPEC), built(text)
    head.train(), d.train()
    x, y = data["x"][:64], data["y"][:64]
    optimizer = torch.optim.Adam([*head.parameters(), *d.parameters()], lr=1e-3)
    before = [p.detach().clone() for p in d.decoder.parameters()]
    loss = d.loss(x, head(x), y)
    stepped = [p.detach().clone() for p in d.decoder.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, stepped))  # its own attacker step
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in d.decoder.parameters())  # the penalty is not its gradient
    assert sum(float(p.grad.abs().sum()) for p in head.parameters()) > 0
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(d.decoder.parameters(), stepped))
    # the head's gradient points the right way: a small step along it lowers the penalty
    d.eval()
    z = head(x).detach().requires_grad_(True)
    penalty = d.loss(x, z, y)
    (grad,) = torch.autograd.grad(penalty, z)
    with torch.no_grad():
        assert float(d.loss(x, z - 0.05 * grad / grad.norm(), y)) < float(penalty)


@pytest.mark.slow
def test_simulated_attackers_raise_the_decoder_attacks_error():
    """Against the real decoder attack, both defenses leave the attacker a worse reconstruction.

    Run with ``benchmarks.reproduction`` (the centralised harness, reference model, 5000
    images, 3 epochs, batch 64; decoder attack 16x1, 3 epochs on 2000 public images, 500
    victims). Measured with seeds 0 / 1 (this test runs seed 0):
    no defense MSE 0.0195 / 0.0192, SSIM 0.480 / 0.529, accuracy 0.818 / 0.830;
    adversarial(alpha=1) MSE 0.0252 / 0.0204, SSIM 0.388 / 0.473, accuracy 0.817 / 0.823;
    infoscissors(lam_x=1) MSE 0.0243 / 0.0201, SSIM 0.403 / 0.481, accuracy 0.831 / 0.835.
    Those numbers are of the MSE-only decoder. The decoder now trains on MSE + 0.05 (1 - SSIM) to
    convergence (attacks.decoder), and on seed 0 it measured: no defense MSE 0.0188, SSIM 0.725,
    accuracy 0.818; infoscissors MSE 0.0180 (4 % lower), SSIM 0.522, accuracy 0.831. SSIM is
    the steady effect (it fell by 0.05-0.20 in every measurement); MSE moves either way, so the
    test asks for an SSIM drop of 0.05 and at most 3 points of accuracy lost, not an MSE rise.
    """
    from benchmarks.reproduction import Harness, Scale

    harness = Harness(Scale("fashion-mnist", None, 5000, 3, 64, 2000, 500, 3, 16, 1, 0, Path("unused")))
    plain = harness.evaluate("none")
    for text in ("adversarial(alpha=1.0)", "infoscissors(lam_x=1.0)"):
        got = harness.evaluate(text)
        assert got.ssim < plain.ssim - 0.05, (text, got, plain)
        assert got.accuracy > plain.accuracy - 0.03, (text, got, plain)


@pytest.mark.slow
def test_cem_raises_the_decoder_attacks_error_over_its_noise_base():
    """CEM on top of noise leaves the real decoder attack a worse reconstruction than the same
    noise alone, at no real accuracy cost.

    Run with ``benchmarks.reproduction`` (centralised, reference model, 10000 images, 3 epochs,
    batch 64; decoder attack 16x1, 4 epochs on 2000 public images, 500 victims). Measured with
    seeds 0 / 1 (this test runs seed 0): noise(sigma=0.05) MSE 0.0179 / 0.0185, SSIM
    0.507 / 0.570, accuracy 0.828 / 0.849; + cem(lam=0.5) MSE 0.0221 / 0.0229 (+24 % both),
    SSIM 0.479 / 0.534, accuracy 0.855 / 0.846 (lam=0.1, seed 0: +11 %). Re-training a head
    moves MSE by ~10 % (docs/calibration.md), so the test asks for half the measured gain, 12 %.
    """
    from benchmarks.reproduction import Harness, Scale

    harness = Harness(Scale("fashion-mnist", None, 10000, 3, 64, 2000, 500, 4, 16, 1, 0, Path("unused")))
    base = harness.evaluate("noise(sigma=0.05)")
    cem = harness.evaluate("noise(sigma=0.05)+cem(lam=0.5)")
    assert cem.mse > 1.12 * base.mse and cem.ssim < base.ssim, (base, cem)
    assert cem.accuracy > base.accuracy - 0.03, (base, cem)


# ------------------------------------------------------------------ training effects

def test_nopeek_lowers_distance_correlation(runs, data):
    x = data["xt"][:500]
    plain = float(distance_correlation(x, runs["none"]["z_test"][:500]))
    nopeek = float(distance_correlation(x, runs["nopeek"]["z_test"][:500]))
    assert nopeek < plain - 0.03, (plain, nopeek)
    assert math.isfinite(runs["nopeek"]["report"]["dcor"])
    assert runs["nopeek"]["acc"] > 0.6  # still learns the task


def test_mid_kl_falls_during_training(runs):
    """The KL term is minimised: it falls from its initial value, the more so the larger lam.

    (With a small lam the task pushes information through the bottleneck and the KL grows
    from its initial value instead: at lam = 0.01 it roughly doubles in two epochs.)
    """
    strong, weak = runs["mid"]["kl_history"], runs["mid-weak"]["kl_history"]
    assert strong[0] == pytest.approx(weak[0])  # same initial model
    assert min(strong[1:]) < 0.5 * strong[0], strong
    assert strong[-1] < 0.6 * weak[-1], (strong, weak)
    assert 0 < runs["mid"]["report"]["kl"] < runs["mid-weak"]["report"]["kl"]
    assert runs["mid"]["acc"] > 0.2 and runs["mid-weak"]["acc"] > 0.3  # chance: 0.1


def test_cem_lowers_within_cluster_variance(runs, data):
    yt = data["yt"]
    noise = fit_mixture(runs["noise"]["z_test"], yt, 5, 0.05)
    cem = fit_mixture(runs["cem"]["z_test"], yt, 5, 0.05)
    assert cem.within_var() < 0.6 * noise.within_var(), (noise.within_var(), cem.within_var())
    assert cem.logdet() < noise.logdet()
    run = runs["cem"]
    part = run["defense"].parts[1]
    per_epoch = run["batches"] // EPOCHS
    # off in the first epoch, on in the others
    assert part._active_batches == run["batches"] - per_epoch
    rep = run["report"]
    assert rep["cem.bound"] < 0 and rep["cem.within-var"] < noise.within_var()
    assert run["acc"] > runs["noise"]["acc"] - 0.1
