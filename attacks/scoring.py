"""The scorer: the only code that maps sample ids to the victims' true images.

Attacks return reconstructions in the order of the features they were given; the simulator
hands the matching sample ids (recorded with the features) to a :class:`Scorer`, which looks
the true images up and measures the leakage. Keeping this lookup out of :mod:`attacks.base`
and the attacks is what guarantees that no attack can read a victim's raw data.

Metrics follow CEM's evaluation on [0, 1] images: MSE, PSNR = 10 log10(1 / MSE) and SSIM with
an 11x11 Gaussian window (sigma 1.5), each computed per image and averaged over images.
Completion attacks return labels instead; the scorer, which alone holds the true labels, gives
their accuracy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch

PSNR_CAP = 100.0  # dB for a perfect reconstruction (MSE 0), where the formula gives infinity
_CHUNK = 1024  # images per SSIM call: bounds the memory of the Gaussian-filtered copies


def per_image_metrics(recon01: torch.Tensor, true01: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image MSE, PSNR (capped at :data:`PSNR_CAP`) and SSIM of two (N, C, H, W) batches."""
    if recon01.shape != true01.shape:
        raise ValueError(f"reconstructions {tuple(recon01.shape)} and true images "
                         f"{tuple(true01.shape)} differ in shape")
    # Imported here: torchmetrics takes seconds to import, and most processes that import the
    # attacks (every client actor, through the cloud's session) never score.
    from torchmetrics.functional.image import structural_similarity_index_measure

    recon01, true01 = recon01.detach().float().cpu(), true01.detach().float().cpu()
    mse = ((recon01 - true01) ** 2).flatten(1).mean(1)
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_CAP / 10))))
    # torchmetrics types its SSIM Tensor | (Tensor, Tensor); without return_full_image it is a Tensor
    ssim = torch.cat([
        cast(torch.Tensor, structural_similarity_index_measure(
            recon01[i:i + _CHUNK], true01[i:i + _CHUNK], gaussian_kernel=True, sigma=1.5,
            kernel_size=11, data_range=1.0, reduction="none"))
        for i in range(0, len(recon01), _CHUNK)])
    return {"mse": mse, "psnr": psnr, "ssim": ssim}


def summarise(per_image: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means over images, plus the image count."""
    out = {k: float(v.mean()) for k, v in per_image.items()}
    out["n"] = int(len(next(iter(per_image.values()))))
    return out


class Scorer:
    """Measures reconstructions against the true images of their sample ids.

    ``images01_by_id`` is either a callable ``ids -> float (N, C, H, W) in [0, 1]``, a float
    tensor (N, C, H, W) in [0, 1] indexed by id, or a dataset's uint8 (N, H, W, C) array (e.g.
    ``ImageData.train_x``), converted only for the ids asked for. ``labels_by_id`` (e.g.
    ``ImageData.train_y``) is needed only to score completion attacks.
    """

    def __init__(self, images01_by_id: Callable[[np.ndarray], torch.Tensor] | torch.Tensor
                 | np.ndarray, labels_by_id: np.ndarray | None = None) -> None:
        self._source = images01_by_id
        self._labels = None if labels_by_id is None else np.asarray(labels_by_id)

    def label_accuracy(self, sample_ids: np.ndarray, predicted: torch.Tensor | np.ndarray) -> float:
        """Share of ``predicted`` labels equal to the true labels of ``sample_ids``."""
        if self._labels is None:
            raise ValueError("this scorer has no labels: pass labels_by_id to score label predictions")
        ids = np.asarray(sample_ids, dtype=np.int64)
        return float((np.asarray(predicted) == self._labels[ids]).mean())

    def classifier_accuracy(self, sample_ids: np.ndarray,
                            classify: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Accuracy of a reference classifier of raw [0, 1] images on the true images of
        ``sample_ids`` (e.g. a completion attack's from-scratch MLP)."""
        return self.label_accuracy(sample_ids, classify(self.true_images(sample_ids)))

    def true_images(self, sample_ids: np.ndarray) -> torch.Tensor:
        """The true [0, 1] images of ``sample_ids`` (N, C, H, W)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        source = self._source
        if callable(source):
            return torch.as_tensor(source(ids), dtype=torch.float32)
        if isinstance(source, np.ndarray) and source.dtype == np.uint8:
            from sim.data import to_tensor  # uint8 NHWC -> float NCHW in [0, 1]
            return to_tensor(source[ids])
        return torch.as_tensor(source)[torch.from_numpy(ids)].float()

    def score(self, sample_ids: np.ndarray, reconstructions: torch.Tensor,
              per_image: bool = False) -> dict:
        """Mean MSE, PSNR, SSIM over images (and ``n``); with ``per_image`` also the
        per-image tensors under ``"per_image"``."""
        true = self.true_images(sample_ids)
        metrics = per_image_metrics(torch.as_tensor(reconstructions), true)
        out: dict = summarise(metrics)
        if per_image:
            out["per_image"] = metrics
        return out

    def baseline(self, aux_images01: torch.Tensor, sample_ids: np.ndarray) -> dict:
        """The metrics of the auxiliary data's mean image for every victim: what an attacker
        that learns nothing from the features achieves."""
        aux = torch.as_tensor(aux_images01, dtype=torch.float32)
        mean = aux.mean(0, keepdim=True).expand(len(np.asarray(sample_ids)), *aux.shape[1:])
        return self.score(sample_ids, mean.contiguous())


WORST = "worst-case"  # the pseudo-attack of each client's strongest inversion result
WORST_LABELS = "worst-case-labels"  # ... and of its strongest label inference
# per metric: which way is worse for the client (more leakage)
_WORSE = {"ssim": max, "psnr": max, "mse": min, "completion_accuracy": max}


def worst_case(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per client and attacked round, the strongest attack's result on every metric.

    A defense is as good as its worst attack: for each (round, client) this gives the highest
    SSIM and PSNR and the lowest MSE over the inversion attacks (``attack = "worst-case"``),
    and the highest label accuracy over the label-inference attacks (``"worst-case-labels"``),
    each with the attack that reached it (``ssim_attack``, ...). Metrics may come from
    different attacks: each is the client's worst case on that metric.
    """
    by_client: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["attack"] not in (WORST, WORST_LABELS):
            by_client[(row["round"], row["partition_id"])].append(row)
    out = []
    for _, mine in sorted(by_client.items()):
        for name, metrics in ((WORST, ("ssim", "psnr", "mse")), (WORST_LABELS, ("completion_accuracy",))):
            scored = [r for r in mine if metrics[0] in r]
            if not scored:
                continue
            worst = {k: v for k, v in scored[0].items() if k not in ATTACK_FIELDS}
            worst |= {"attack": name, "attacks": "+".join(r["attack"] for r in scored)}
            for metric in metrics:
                best = _WORSE[metric](scored, key=lambda r: r[metric])
                worst[metric], worst[f"{metric}_attack"] = best[metric], best["attack"]
                if metric == "completion_accuracy":
                    worst["scratch_accuracy"] = best.get("scratch_accuracy", float("nan"))
            if name == WORST:
                worst |= {f"baseline_{m}": scored[0][f"baseline_{m}"] for m in metrics}
            out.append(worst)
    return out


# the columns that belong to one attack's result, not to the client
ATTACK_FIELDS = ("attack", "mse", "psnr", "ssim", "baseline_mse", "baseline_psnr",
                 "baseline_ssim", "completion_accuracy", "scratch_accuracy", "fit_epochs", "fit_stopped")
