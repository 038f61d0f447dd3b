"""Reproduce InfoScissors' accuracy-vs-SSIM comparison (spec C.5-C.7, D.7) on the reference split.

InfoScissors' input-leakage regulariser against the paper's baselines (Gaussian noise = AN,
Laplace = DP, top-k = DC, MID, PPDL), each at several strengths, attacked by the decoder
(Knowledge-Alignment-style) inversion: a table of accuracy and attack SSIM / MSE per setting
and one accuracy-vs-SSIM curve per defense (PNG). The paper's claim to check: InfoScissors
lowers SSIM at a smaller accuracy cost than the baselines (under 3 points, spec C.7). Training
and attack: :mod:`benchmarks.reproduction` (centralised, small by default).

    python -m benchmarks.reproduce_infoscissors                 # Fashion-MNIST, minutes
    python -m benchmarks.reproduce_infoscissors --train-subset 60000 --epochs 20 --attack-epochs 20
    python -m benchmarks.reproduce_infoscissors --dataset cifar10 --data-root ~/data
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.reproduction import Harness, Outcome, add_scale_args, markdown_table, plot_curves, scale_from_args

# Strengths from weak to strong (spec D.7's sweeps, at the ends that matter on [0, 1] features).
SWEEPS = {
    "infoscissors": ("infoscissors(lam_x=0.3)", "infoscissors(lam_x=1.0)", "infoscissors(lam_x=3.0)"),
    "noise (AN)": ("noise(sigma=0.05)", "noise(sigma=0.1)", "noise(sigma=0.3)"),
    "laplace (DP)": ("laplace(epsilon=20)", "laplace(epsilon=10)", "laplace(epsilon=4)"),
    "topk (DC)": ("topk(ratio=0.5)", "topk(ratio=0.8)", "topk(ratio=0.95)"),
    "mid": ("mid(lam=0.01)", "mid(lam=0.1)", "mid(lam=1.0)"),
    "ppdl": ("ppdl(theta=0.5)", "ppdl(theta=0.3)", "ppdl(theta=0.1)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scale_args(parser, out=str(Path(tempfile.gettempdir()) / "sim-benchmarks"))
    parser.add_argument("--only", default=None, help="comma-separated defense families to run")
    args = parser.parse_args()
    harness = Harness(scale_from_args(args))
    s = harness.scale
    families = {k: v for k, v in SWEEPS.items() if args.only is None or k.split()[0] in args.only.split(",")}
    print(f"# InfoScissors reproduction: {s.dataset}, {s.train_subset} training images, {s.epochs} epochs, "
          f"decoder attack {s.decoder_width}x{s.decoder_blocks} for {s.attack_epochs} epochs on "
          f"{s.attack_aux} public images, scored on {s.attack_victims}\n", flush=True)
    plain = harness.evaluate("none")
    curves: dict[str, list[Outcome]] = {}
    rows = [("none", "none", plain.accuracy, plain.mse, plain.ssim, "–")]
    for family, texts in families.items():
        curves[family] = [harness.evaluate(t) for t in texts]
        rows += [(family, o.defense, o.accuracy, o.mse, o.ssim,
                  f"{(o.accuracy - plain.accuracy) * 100:+.1f}") for o in curves[family]]
    print(markdown_table(("family", "defense", "accuracy", "attack MSE", "attack SSIM", "accuracy change (pt)"),
                         rows), "\n")
    path = s.out / f"infoscissors_accuracy_vs_ssim_{s.dataset}.png"
    plot_curves({k: [plain, *v] for k, v in curves.items()}, "ssim", path,
                "accuracy vs decoder SSIM (each curve starts at no defense)")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
