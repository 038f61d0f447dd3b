"""The reproduction harness shared by ``reproduce_cem`` and ``reproduce_infoscissors``.

A paper's defense table is reproduced on the simulator's reference split model, trained
*centrally* on a subset of the training set (one client holding all of it, as in CEM's own
experiments, docs/papers.md A.6: ``num_client = 1``): the head and tail are ``sim.models``' ones, the
defense comes from ``defenses.build_defense``, and each batch runs exactly as a client's
``sim.client.local_train`` step does (``z = head(x)``, the tail sees ``defense(z)``, the head's
loss adds ``defense.loss(x, z, y)``, ``on_epoch_end`` gets eval-mode clean features before the
first epoch and after each one), with Adam 1e-3 as in ``sim.cloud.make_optimizer``. The attack
is the simulator's ``decoder`` attack with query access: the attacker has a disjoint public
part of the test set processed by the trained head and defense (fresh noise per query) and is
scored on the rest of the test set, as in the calibration (docs/calibration.md).
With ``ka=True`` the same victims' features are also attacked by Knowledge Alignment (``ka``,
knowledge level "none": only the trained tail and the labelled public images), a decoder whose
surrogate head is aligned through the tail instead of queried.

``split="ushaped"`` trains the U-shaped split instead (the client keeps ``build_last``; the loss
is the client's CE plus ``defense.output_loss(h, y)``, as ``sim.client._ushaped_exchange``
computes it, so InfoScissors' ``lam_y`` acts) and attacks it with passive model completion
(``pmc``, fitted on the public images and their labels as ``sim.stage`` fits it) instead of
the decoder: the score is the completed model's label accuracy on the victims' features.

Defaults are small so that a script runs in minutes on two CPU cores; ``--train-subset``,
``--epochs``, ``--attack-epochs`` and ``--decoder-width`` scale it up towards the papers'.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

from attacks import Knowledge, build_attack
from attacks.scoring import Scorer, per_image_metrics, summarise
from defenses import Defense
from defenses.client_model import make_defense
from sim.data import ImageData, load_dataset, to_tensor
from sim.models import DEFAULT_ARCH, SplitSpec, build_head, build_last, build_tail, normalise

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Scale:
    """How big one reproduction is (every setting trains and attacks its own model)."""

    dataset: str
    data_root: str | None
    train_subset: int
    epochs: int
    batch_size: int
    attack_aux: int  # public test images the attacker trains its decoder on
    attack_victims: int  # the (disjoint) test images it is scored on
    attack_epochs: int
    decoder_width: int
    decoder_blocks: int
    seed: int
    out: Path


def add_scale_args(parser: argparse.ArgumentParser, out: str) -> None:
    """The flags both scripts share; defaults are the cheap ones."""
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, or cifar10 with --data-root")
    parser.add_argument("--data-root", default=None, help="torchvision-layout folder (needed for cifar10)")
    parser.add_argument("--train-subset", type=int, default=4000, help="training images (the paper: all)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (CEM: 240)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--attack-aux", type=int, default=2000, help="attacker's public test images")
    parser.add_argument("--attack-victims", type=int, default=500, help="test images scored")
    parser.add_argument("--attack-epochs", type=int, default=3, help="decoder attack epochs (CEM: 50)")
    parser.add_argument("--decoder-width", type=int, default=16, help="attack decoder channels (CEM: 64)")
    parser.add_argument("--decoder-blocks", type=int, default=1, help="attack decoder blocks (CEM: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=out, help="folder for the PNG figures")


def scale_from_args(args: argparse.Namespace) -> Scale:
    return Scale(args.dataset, args.data_root, args.train_subset, args.epochs, args.batch_size,
                 args.attack_aux, args.attack_victims, args.attack_epochs, args.decoder_width,
                 args.decoder_blocks, args.seed, Path(args.out))


@dataclass
class Outcome:
    """One defense setting: its utility and the attacks' success against it (nan: not run)."""

    defense: str
    accuracy: float
    mse: float  # the decoder's (vanilla split)
    ssim: float
    seconds: float
    ka_ssim: float = math.nan  # Knowledge Alignment's (vanilla split, ``ka=True``)
    completion: float = math.nan  # pmc's label accuracy on the victims (U-shaped split)


class Harness:
    """The data and split of one reproduction, and :meth:`evaluate` for one defense setting.

    ``split``: "vanilla" (decoder attack, and KA with ``ka``) or "ushaped" (pmc attack).
    """

    # Small batches and a larger step than CEM's (256, 1e-3) make the few-epoch attack
    # converge: the settings tests/test_attacks.py measured for its scaled-down decoder.
    ATTACK_BATCH = 32
    ATTACK_LR = 3e-3
    # KA's surrogate-head epochs: two already reach the surrogate accuracy ka.py measured.
    KA_HEAD_EPOCHS = 2

    def __init__(self, scale: Scale, split: str = "vanilla", ka: bool = False) -> None:
        torch.set_num_threads(1)  # the machine is shared; one thread also keeps timings comparable
        self.scale = scale
        self.ka = ka
        self.data: ImageData = load_dataset(scale.dataset, scale.data_root)
        shape = self.data.shape
        self.spec = SplitSpec(DEFAULT_ARCH.get(shape[0], "vgg11_bn"), shape, self.data.num_classes,
                              split=split)
        self.spec.validate()
        n_test = len(self.data.test_y)
        if scale.attack_aux + scale.attack_victims > n_test:
            raise SystemExit(f"--attack-aux + --attack-victims must be at most {n_test}")
        self.x = self._inputs(self.data.train_x[:scale.train_subset])
        self.y = torch.from_numpy(self.data.train_y[:scale.train_subset].copy()).long()
        self.x_eval = self._inputs(self.data.test_x)
        self.y_eval = torch.from_numpy(self.data.test_y.copy()).long()
        self.aux01 = to_tensor(self.data.test_x[:scale.attack_aux])
        self.aux_labels = torch.from_numpy(self.data.test_y[:scale.attack_aux].copy()).long()
        self.victim_ids = np.arange(n_test - scale.attack_victims, n_test)
        self.victims01 = to_tensor(self.data.test_x[self.victim_ids])
        # The only holder of the victims' true labels (pmc's score), as in sim.stage.
        self.scorer = Scorer(self.data.test_x, self.data.test_y)

    def _inputs(self, x_uint8: np.ndarray) -> torch.Tensor:
        return normalise(to_tensor(x_uint8), self.data.mean, self.data.std)

    def train(self, defense_text: str) -> tuple[torch.nn.Module, torch.nn.Module, Defense, float]:
        """Train head, tail and defense centrally; returns them and the test accuracy.

        In the U-shaped split the client's last layer trains too but is not returned: no
        attack may have it (:mod:`attacks.completion`).
        """
        s = self.scale
        torch.manual_seed(s.seed)
        head, tail = build_head(self.spec), build_tail(self.spec)
        last = build_last(self.spec) if self.spec.ushaped else None
        defense = make_defense(self.spec, defense_text)
        params = [*head.parameters(), *tail.parameters(), *defense.parameters()]
        if last is not None:
            params += last.parameters()
        optimizer = torch.optim.Adam(params, lr=1e-3)
        self._epoch_end(head, defense)
        for _ in range(s.epochs):
            head.train(), tail.train(), defense.train()
            if last is not None:
                last.train()
            order = torch.randperm(len(self.x))
            for start in range(0, len(order), s.batch_size):
                ids = order[start:start + s.batch_size]
                x, y = self.x[ids], self.y[ids]
                z = head(x)
                out = tail(defense(z))
                if last is not None:  # the U-shaped client's loss on h (sim.client._ushaped_exchange)
                    out_loss = F.cross_entropy(last(out), y) + defense.output_loss(out, y)
                else:
                    out_loss = F.cross_entropy(out, y)
                loss = out_loss + defense.loss(x, z, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            self._epoch_end(head, defense)
        head.eval(), tail.eval(), defense.eval()
        predict = tail if last is None else torch.nn.Sequential(tail, last.eval())
        with torch.no_grad():
            hits = sum(int((predict(defense(head(self.x_eval[i:i + 1000]))).argmax(1)
                            == self.y_eval[i:i + 1000]).sum()) for i in range(0, len(self.x_eval), 1000))
        return head, tail, defense, hits / len(self.y_eval)

    def _epoch_end(self, head: torch.nn.Module, defense: Defense) -> None:
        if not defense.wants_epoch_features():
            return
        head.eval()
        with torch.no_grad():
            feats = torch.cat([head(self.x[i:i + 1000]) for i in range(0, len(self.x), 1000)])
        defense.on_epoch_end(feats, self.y)

    def attack(self, head: torch.nn.Module, tail: torch.nn.Module, defense: Defense,
               defense_text: str) -> dict[str, float]:
        """Attack the trained models: in the vanilla split the decoder with query access (mean
        ``mse``, ``ssim``; with ``ka`` also KA's ``ka_ssim`` on the same features), in the
        U-shaped split pmc (``completion``: its label accuracy on the victims)."""
        s = self.scale
        torch.manual_seed(s.seed + 1)
        knowledge = Knowledge.from_models("query", head, tail, defense_text, self.spec,
                                          self.data.mean, self.data.std, defense)
        assert knowledge.query is not None  # level "query" grants it
        if self.spec.ushaped:
            pmc = build_attack("pmc")
            pmc.fit(knowledge, self.aux01, self.aux_labels)
            labels = pmc.run(knowledge.query(self.victims01))
            return {"completion": self.scorer.label_accuracy(self.victim_ids, labels)}
        decoder_args = (f"epochs={s.attack_epochs}, width={s.decoder_width}, blocks={s.decoder_blocks}, "
                        f"batch_size={self.ATTACK_BATCH}, lr={self.ATTACK_LR}")
        attack = build_attack(f"decoder({decoder_args})")
        attack.fit(knowledge, self.aux01)
        victims = knowledge.query(self.victims01)  # the features the cloud saw, fresh noise and all
        scores = summarise(per_image_metrics(attack.run(victims), self.victims01))
        if self.ka:
            ka = build_attack(f"ka(head_epochs={self.KA_HEAD_EPOCHS}, {decoder_args})")
            ka.fit(Knowledge.from_models("none", None, tail, defense_text, self.spec, self.data.mean,
                                         self.data.std), self.aux01, self.aux_labels)
            scores["ka_ssim"] = summarise(per_image_metrics(ka.run(victims), self.victims01))["ssim"]
        return scores

    def evaluate(self, defense_text: str) -> Outcome:
        start = time.perf_counter()
        head, tail, defense, accuracy = self.train(defense_text)
        scores = self.attack(head, tail, defense, defense_text)
        return Outcome(defense_text, accuracy, scores.get("mse", math.nan), scores.get("ssim", math.nan),
                       time.perf_counter() - start, scores.get("ka_ssim", math.nan),
                       scores.get("completion", math.nan))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats are printed with 4 significant digits."""
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# The attack metrics an Outcome carries, as the x axis of plot_curves names them.
AXIS_LABELS = {"mse": "decoder attack MSE", "ssim": "decoder attack SSIM", "ka_ssim": "KA attack SSIM",
               "completion": "pmc completion accuracy"}


def plot_curves(curves: dict[str, list[Outcome]], x: str, path: Path, title: str) -> None:
    """Accuracy against an attack metric (``x``: a key of AXIS_LABELS), one line per defense family."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, outcomes in curves.items():
        ax.plot([getattr(o, x) for o in outcomes], [o.accuracy for o in outcomes], marker="o", label=name)
    ax.set(xlabel=AXIS_LABELS[x], ylabel="test accuracy", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
