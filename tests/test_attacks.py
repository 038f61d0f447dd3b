"""Tests for the adversary's attacks: real Fashion-MNIST, real torch, small scale.

A small head+tail is trained centrally twice (no defense, and Gaussian noise), then the curious
cloud attacks the features of 500 "victim" training images, knowing only what its knowledge
level allows and 3000 public test images (with labels). Thresholds come from measurements on
this setup (see each test); the attacks are scaled down (small decoder, few epochs and steps) so
that the whole file runs in a few minutes on 2 busy CPU cores.
"""

from __future__ import annotations

import ast
import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attacks
import attacks.base
import sim.decoders
from attacks import ATTACKS, AttackError, Knowledge, Scorer, build_attack
from attacks.base import normalise
from attacks.scoring import PSNR_CAP
from defenses import build_defense
from sim.data import FASHION_MNIST_DEFAULT_ROOT, load_dataset, to_tensor
from sim.decoders import build_decoder, upsample_plan
from sim.models import SplitSpec, build_head, build_tail

HAVE_FASHION = Path(FASHION_MNIST_DEFAULT_ROOT, "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="dataset-fashion-mnist not installed")

SPEC = SplitSpec("small", (1, 28, 28), 10)
NOISE = "noise(sigma=0.3)"  # strong enough that its effect clears seed-to-seed spread
VICTIMS = np.arange(20000, 20500)  # train ids outside the 10k the models are trained on
RMLE_VICTIMS = 64  # rMLE optimises every image: a subset keeps it to seconds
# Scaled-down attack settings (the defaults are CEM's full-size ones).
DECODER = dict(epochs=4, width=16, blocks=1, batch_size=32, lr=3e-3)
RMLE = dict(steps=200)


@dataclass
class Setup:
    """One trained split model and what the cloud observed of the victims."""

    defense: str
    head: torch.nn.Module
    tail: torch.nn.Module
    features: torch.Tensor  # the victims' z as received (after the defense)
    accuracy: float


@pytest.fixture(scope="module")
def one_thread():
    """Other jobs share the 2 cores; one thread is also what makes timings comparable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(one_thread):
    if not HAVE_FASHION:
        pytest.skip("dataset-fashion-mnist not installed")
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="module")
def aux(data) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacker's public auxiliary data: 3000 labelled test images."""
    return to_tensor(data.test_x[:3000]), torch.tensor(data.test_y[:3000])


@pytest.fixture(scope="module")
def scorer(data) -> Scorer:
    """Holds the victims' images; no attack ever gets it."""
    return Scorer(data.train_x)


def train_split(data, defense: str, seed: int = 0, n: int = 10000, epochs: int = 2) -> Setup:
    """Central training of head+defense+tail (Adam 1e-3, batch 128) and the victims' features."""
    torch.manual_seed(seed)
    head, tail, guard = build_head(SPEC), build_tail(SPEC), build_defense(defense)
    optimizer = torch.optim.Adam([*head.parameters(), *tail.parameters()], lr=1e-3)
    x, y = to_tensor(data.train_x[:n]), torch.tensor(data.train_y[:n])
    for _ in range(epochs):
        order = torch.randperm(n)
        for start in range(0, n, 128):
            idx = order[start:start + 128]
            logits = tail(guard(head(normalise(x[idx], data.mean, data.std))))
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.eval(), tail.eval(), guard.eval()
    with torch.no_grad():
        test_x, test_y = to_tensor(data.test_x[5000:7000]), torch.tensor(data.test_y[5000:7000])
        accuracy = float((tail(guard(head(normalise(test_x, data.mean, data.std)))).argmax(1)
                          == test_y).float().mean())
        features = guard(head(normalise(to_tensor(data.train_x[VICTIMS]), data.mean, data.std)))
    return Setup(defense, head, tail, features, accuracy)


@pytest.fixture(scope="module")
def setups(data) -> dict[str, Setup]:
    return {d: train_split(data, d) for d in ("none", NOISE)}


def knowledge(data, setup: Setup, level: str = "whitebox") -> Knowledge:
    return Knowledge.from_models(level, setup.head, setup.tail, setup.defense, SPEC,
                                 data.mean, data.std)


@pytest.fixture(scope="module")
def results(data, aux, setups, scorer):
    """Run each (attack, defense) once, lazily; tests share the scores. Prints what it sees."""
    cache: dict[tuple[str, str], dict] = {}

    def get(name: str, defense: str, **params) -> dict:
        if (name, defense) not in cache:
            setup = setups[defense]
            n = RMLE_VICTIMS if name == "rmle" else len(VICTIMS)
            attack = build_attack(name, **params)
            torch.manual_seed(1)
            start = time.perf_counter()
            attack.fit(knowledge(data, setup), *aux)
            recon = attack.run(setup.features[:n])
            seconds = time.perf_counter() - start
            assert recon.shape == (n, 1, 28, 28) and 0 <= recon.min() and recon.max() <= 1
            score = scorer.score(VICTIMS[:n], recon)
            score["baseline"] = scorer.baseline(aux[0], VICTIMS[:n])
            score["seconds"] = seconds
            print(f"\n{name} vs {defense} (accuracy {setup.accuracy:.3f}): "
                  f"mse {score['mse']:.4f} ssim {score['ssim']:.3f} in {seconds:.1f}s; "
                  f"baseline mse {score['baseline']['mse']:.4f} "
                  f"ssim {score['baseline']['ssim']:.3f}")
            cache[name, defense] = score
        return cache[name, defense]

    return get


# ------------------------------------------------------------------------ attacks


@pytest.mark.slow
@needs_fashion
def test_decoder_far_above_baseline_and_hurt_by_noise(results):
    clean = results("decoder", "none", **DECODER)
    noisy = results("decoder", NOISE, **DECODER)
    assert clean["ssim"] > clean["baseline"]["ssim"] + 0.3
    assert clean["mse"] < 0.3 * clean["baseline"]["mse"]
    assert noisy["ssim"] > noisy["baseline"]["ssim"] + 0.15  # noise hurts, does not blind
    assert noisy["mse"] > 1.15 * clean["mse"]
    assert noisy["ssim"] < clean["ssim"] - 0.03


@needs_fashion
def test_rmle_above_baseline_and_hurt_by_noise(results):
    clean = results("rmle", "none", **RMLE)
    noisy = results("rmle", NOISE, **RMLE)
    assert clean["ssim"] > clean["baseline"]["ssim"] + 0.1
    assert noisy["ssim"] < clean["ssim"] - 0.03


@pytest.mark.slow
@needs_fashion
def test_ka_above_baseline_but_weaker_than_decoder(results):
    ka = results("ka", "none", head_epochs=1, **DECODER)
    decoder = results("decoder", "none", **DECODER)
    assert ka["ssim"] > ka["baseline"]["ssim"] + 0.05
    assert ka["mse"] < ka["baseline"]["mse"]
    assert ka["ssim"] < decoder["ssim"]


@pytest.mark.slow
@needs_fashion
def test_gan_refinement_runs_and_beats_knowing_nothing(results):
    """CEM's WGAN-GP refinement of the decoder, scaled down: it must run and stay a real
    attack (its reconstructions no worse than the mean-image baseline)."""
    gan = results("gan", "none", **DECODER, gan_epochs=1, gan_batch_size=64, n_critic=5,
                  critic_width=16)
    assert gan["ssim"] > gan["baseline"]["ssim"]


# ---------------------------------------------------------------- knowledge levels


@needs_fashion
def test_knowledge_levels_are_enforced(data, aux, setups):
    setup = setups["none"]
    none, query = knowledge(data, setup, "none"), knowledge(data, setup, "query")
    assert none.head is None and none.query is None and none.tail is not None
    assert query.head is None and query.query is not None
    with pytest.raises(AttackError, match="needs knowledge level 'query'"):
        build_attack("decoder", epochs=1).fit(none, aux[0][:64])
    with pytest.raises(AttackError, match="needs knowledge level 'whitebox'"):
        build_attack("rmle").fit(query, aux[0][:64])
    with pytest.raises(AttackError, match="must not carry"):
        Knowledge("query", (1, 28, 28), SPEC.feature_shape, 10, None, head=setup.head)
    with pytest.raises(AttackError, match="labels"):
        build_attack("ka", epochs=1, head_epochs=1).fit(none, aux[0][:64])
    with pytest.raises(AttackError, match="fit"):
        build_attack("decoder").run(setup.features)


@needs_fashion
def test_query_is_a_fresh_noisy_copy(data, setups):
    """The oracle re-applies the defense each call and never changes the caller's models."""
    setup = setups[NOISE]
    before = {k: v.clone() for k, v in setup.head.state_dict().items()}
    oracle = knowledge(data, setup, "query")
    x = to_tensor(data.test_x[:16])
    z1, z2 = oracle.query(x), oracle.query(x)
    assert z1.shape == (16, *SPEC.feature_shape) and not torch.equal(z1, z2)
    assert (z1 - z2).std() == pytest.approx(0.3 * 2**0.5, rel=0.1)
    assert oracle.defense_public == {"sigma": 0.3}
    clean = knowledge(data, setups["none"], "query")
    assert torch.equal(clean.query(x), clean.query(x))
    assert all(torch.equal(before[k], v) for k, v in setup.head.state_dict().items())


def test_attack_code_never_reads_victim_data():
    """Only the scorer maps ids to images: no attack module imports it or the dataset loader,
    and the entry points take features and public data, never sample ids."""
    modules = {attacks.base, sim.decoders} | {inspect.getmodule(ATTACKS[n]) for n in ATTACKS}
    for module in modules:
        imported = set()
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        assert not imported & {"attacks.scoring", "sim.data", "sim.view"}, module.__name__
    fit = inspect.signature(attacks.Attack.fit).parameters
    run = inspect.signature(attacks.Attack.run).parameters
    assert list(fit) == ["self", "knowledge", "aux_images01", "aux_labels"]
    assert list(run) == ["self", "features", "gradients"]  # gradients: dL/dh rows, never ids
    for cls in (ATTACKS[n] for n in ATTACKS):  # subclasses keep the base entry points
        assert cls.fit is attacks.Attack.fit and cls.run is attacks.Attack.run


@needs_fashion
def test_decoder_is_deterministic_given_the_seed(data, setups, aux):
    know = knowledge(data, setups[NOISE], "query")
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        attack = build_attack("decoder(epochs=1, width=8, blocks=1)", batch_size=64)
        attack.fit(know, aux[0][:256])
        outs.append(attack.run(setups[NOISE].features[:8]))
    assert torch.equal(*outs)


# ------------------------------------------------------------------------ scoring


def test_scorer_identical_images_and_sources():
    rng = np.random.default_rng(0)
    images_u8 = rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
    images = to_tensor(images_u8)
    ids = np.array([3, 1, 7])
    for source in (images_u8, images, lambda i: images[torch.from_numpy(i)]):
        score = Scorer(source).score(ids, images[ids], per_image=True)
        assert score["mse"] == 0 and score["psnr"] == PSNR_CAP
        assert score["ssim"] == pytest.approx(1.0, abs=1e-5) and score["n"] == 3
        assert score["per_image"]["ssim"].shape == (3,)
    other = Scorer(images).score(ids, images[[1, 7, 3]])  # every image the wrong one
    assert other["mse"] > 0.05 and other["psnr"] < 15 and other["ssim"] < 0.5


def test_baseline_is_the_aux_mean_image():
    rng = np.random.default_rng(1)
    victims = rng.random((5, 1, 16, 16), dtype=np.float32)
    aux = torch.from_numpy(rng.random((40, 1, 16, 16), dtype=np.float32))
    scorer = Scorer(torch.from_numpy(victims))
    ids = np.array([4, 0, 2])
    got = scorer.baseline(aux, ids)
    mean = aux.numpy().mean(0)
    mse = ((victims[ids] - mean) ** 2).reshape(3, -1).mean(1)
    assert got["mse"] == pytest.approx(mse.mean(), rel=1e-5)
    assert got["psnr"] == pytest.approx(np.mean(10 * np.log10(1 / mse)), rel=1e-5)
    same = scorer.score(ids, torch.from_numpy(np.broadcast_to(mean, (3, 1, 16, 16)).copy()))
    assert got["ssim"] == pytest.approx(same["ssim"], rel=1e-4)


# ---------------------------------------------------------------- models and registry


@pytest.mark.parametrize("feature, image, doublings, resize", [
    ((8, 7, 7), (1, 28, 28), 2, False),   # Fashion-MNIST, cut 4
    ((8, 8, 8), (3, 32, 32), 2, False),   # CIFAR, vgg11_bn cut 4
    ((8, 14, 14), (1, 28, 28), 1, False),
    ((8, 3, 3), (1, 28, 28), 3, True),    # 3 -> 24, resized to 28
    ((8, 28, 28), (1, 28, 28), 0, False),
])
def test_decoder_shapes(feature, image, doublings, resize):
    assert upsample_plan(feature[1:], image[1:]) == (doublings, resize)
    decoder = build_decoder(feature, image, width=8, blocks=1).eval()
    out = decoder(torch.rand(2, *feature))
    assert out.shape == (2, *image) and 0 <= out.min() and out.max() <= 1


def test_build_attack_registry():
    assert set(ATTACKS) >= {"decoder", "rmle", "ka", "gan", "pmc", "amc"}
    assert {ATTACKS[n].needs for n in ATTACKS} <= set(attacks.LEVELS)
    attack = build_attack("rmle(steps=10, tv=0)", lr=1)
    assert (attack.steps, attack.tv, attack.lr) == (10, 0.0, 1.0)
    with pytest.raises(AttackError, match="unknown attack 'nope'"):
        build_attack("nope")
    with pytest.raises(AttackError, match="unknown parameter 'step'"):
        build_attack("rmle", step=3)
    with pytest.raises(AttackError, match="must be int"):
        build_attack("decoder", epochs="5")
    with pytest.raises(AttackError, match="init"):
        build_attack("rmle", init="random")
