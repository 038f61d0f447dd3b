"""The leakage report: ``leakage.csv``, per-group means, figures and ``report.md``.

Rows come from :mod:`sim.stage` (one per client, attack and attacked round) and are joined
with what each client reported while training (its held-out accuracy, data statistics, the
defense's own numbers such as CEM's bound) so a reader can put leakage next to utility.
Inversion rows carry MSE/PSNR/SSIM, completion rows (pmc, amc) ``completion_accuracy`` and
``scratch_accuracy``; ``leakage.csv`` leaves a row's other columns empty.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from attacks.scoring import WORST, WORST_LABELS
from sim import explain
from sim.explain import group_colours
from sim.records import failure_counts

STAT_FIELDS = ("num_examples", "num_classes", "majority_share", "accuracy")
# The leakage column holding a client's CEM Gaussian-mixture term (``defenses.cem``'s
# ``mixture-info`` report, whatever the chain's prefix), empty for clients without CEM.
CEM_TERM = "cem_mixture_term"
_CEM_REPORT_KEY = "mixture-info"


def client_stats(labels: np.ndarray, partitions: list[tuple[np.ndarray, np.ndarray]],
                 records: list[dict[str, Any]], until_round: int) -> dict[int, dict[str, Any]]:
    """Per client: data statistics, its latest reported numbers and its failed rounds, up to
    ``until_round``."""
    stats: dict[int, dict[str, Any]] = {}
    for pid, (train, _) in enumerate(partitions):
        counts = np.bincount(labels[train])
        stats[pid] = {"num_examples": len(train), "num_classes": int((counts > 0).sum()),
                      "majority_share": round(float(counts.max() / counts.sum()), 4), "failures": 0}
    for pid, n in failure_counts(records, until_round).items():
        stats[pid]["failures"] = n
    for record in records:
        if record["round"] > until_round:
            continue
        for c in record["clients"]:
            if c["accuracy"] is not None:
                stats[c["partition_id"]]["accuracy"] = c["accuracy"]
            stats[c["partition_id"]].update({k: v for k, v in c.items() if k.startswith("defense-")})
            terms = [v for k, v in c.items() if k.startswith("defense-") and k.endswith(_CEM_REPORT_KEY)]
            if terms:
                stats[c["partition_id"]][CEM_TERM] = terms[0]
    return stats


def join(rows: list[dict[str, Any]], stats_by_round: dict[int, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{**row, **stats_by_round[row["round"]][row["partition_id"]]} for row in rows]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows :func:`write_csv` wrote (none when there is no file): a cell that reads as an int
    or a float is that number, an empty or other cell its text."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _cell(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def group_means(rows: list[dict[str, Any]], final_round: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{attack: {group: {metric: mean}}}`` over the clients attacked at the final round."""
    acc: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["round"] == final_round:
            acc[row["attack"]][row["group"]].append(row)
    keys = ("mse", "psnr", "ssim", "baseline_mse", "baseline_ssim", "completion_accuracy",
            "scratch_accuracy", "accuracy")
    return {a: {g: {k: float(np.mean([r[k] for r in rs if k in r])) for k in keys if any(k in r for r in rs)}
                for g, rs in groups.items()} for a, groups in acc.items()}


def cem_audit(rows: list[dict[str, Any]], final_round: int) -> dict[str, dict[str, Any]]:
    """Per attack: Spearman's rank correlation of CEM's mixture term with the attack's MSE.

    The per-client theory audit: CEM's bound says the best attacker's MSE floor falls as the
    mixture term (the information z keeps about x, :data:`CEM_TERM`) grows, so across clients
    the correlation should be negative if the bound orders clients as a real attacker does.
    Computed over the clients attacked at the final round that have a finite term; ``rho`` is
    None when fewer than three clients have one or either side is constant.
    """
    from scipy.stats import spearmanr

    audit: dict[str, dict[str, Any]] = {}
    for attack in dict.fromkeys(r["attack"] for r in rows if "mse" in r):  # inversion attacks
        pairs = [(float(r[CEM_TERM]), float(r["mse"])) for r in rows
                 if r["attack"] == attack and r["round"] == final_round
                 and r.get(CEM_TERM) is not None and np.isfinite(float(r[CEM_TERM]))]
        rho = None
        if len(pairs) >= 3:
            terms, mses = zip(*pairs)
            value = float(spearmanr(terms, mses).statistic) if len(set(terms)) > 1 and len(set(mses)) > 1 else None
            rho = value if value is not None and np.isfinite(value) else None
        audit[attack] = {"spearman_term_vs_mse": rho, "clients": len(pairs), "term": CEM_TERM}
    return audit


def plot_ssim_bars(rows: list[dict[str, Any]], attack: str, final_round: int, path: Path) -> None:
    rs = sorted((r for r in rows if r["attack"] == attack and r["round"] == final_round),
                key=lambda r: r["partition_id"])
    groups = list(dict.fromkeys(r["group"] for r in rs))
    colours = group_colours(groups)
    fig, ax = plt.subplots(figsize=(max(6, len(rs) * 0.18), 3.5))
    ax.bar(range(len(rs)), [r["ssim"] for r in rs], color=[colours[r["group"]] for r in rs])
    ax.plot(range(len(rs)), [r["baseline_ssim"] for r in rs], "k_", label="mean-image baseline")
    for g in groups:
        ax.bar([], [], color=colours[g], label=g)
    ax.set(xlabel="client (partition id)", ylabel="SSIM", title=f"{attack}: reconstruction SSIM per client")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_completion_bars(rows: list[dict[str, Any]], attack: str, final_round: int, path: Path) -> None:
    """Per client: the completed model's label accuracy, with the client's own accuracy and
    the from-scratch reference as markers."""
    rs = sorted((r for r in rows if r["attack"] == attack and r["round"] == final_round),
                key=lambda r: r["partition_id"])
    groups = list(dict.fromkeys(r["group"] for r in rs))
    colours = group_colours(groups)
    xs = range(len(rs))
    fig, ax = plt.subplots(figsize=(max(6, len(rs) * 0.18), 3.5))
    ax.bar(xs, [r["completion_accuracy"] for r in rs], color=[colours[r["group"]] for r in rs])
    ax.plot(xs, [r["scratch_accuracy"] for r in rs], "k_", label="same MLP from scratch")
    ax.plot(xs, [r.get("accuracy", float("nan")) for r in rs], "r_", label="client accuracy")
    for g in groups:
        ax.bar([], [], color=colours[g], label=g)
    ax.set(xlabel="client (partition id)", ylabel="label accuracy", ylim=(0, 1),
           title=f"{attack}: completed model's accuracy on each client's labels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_ssim(rows: list[dict[str, Any]], attack: str, final_round: int, path: Path) -> None:
    rs = [r for r in rows if r["attack"] == attack and r["round"] == final_round and "accuracy" in r]
    colours = group_colours(list(dict.fromkeys(r["group"] for r in rs)))
    fig, ax = plt.subplots(figsize=(5, 4))
    for g, c in colours.items():
        mine = [r for r in rs if r["group"] == g]
        ax.scatter([r["ssim"] for r in mine], [r["accuracy"] for r in mine], color=c, label=g, s=18)
    ax.set(xlabel=f"{attack} SSIM (leakage)", ylabel="client held-out accuracy", title="utility vs leakage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_over_rounds(rows: list[dict[str, Any]], path: Path) -> None:
    """Mean inversion SSIM per round, per attack and group."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    by: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if "ssim" in r:
            by[(r["attack"], r["group"])][r["round"]].append(r["ssim"])
    for (attack, group), rounds in sorted(by.items()):
        xs = sorted(rounds)
        ax.plot(xs, [np.mean(rounds[x]) for x in xs], marker="o", label=f"{attack} / {group}")
    ax.set(xlabel="round", ylabel="mean SSIM", title="leakage over rounds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(examples: dict[int, tuple[torch.Tensor, torch.Tensor]], attack: str, path: Path,
              clients: int = 4) -> None:
    """Originals over reconstructions for a few clients."""
    chosen = sorted(examples)[:clients]
    cols = max(len(examples[p][0]) for p in chosen)
    fig, axes = plt.subplots(2 * len(chosen), cols, figsize=(cols * 0.9, len(chosen) * 1.9), squeeze=False)
    for i, pid in enumerate(chosen):
        true, recon = examples[pid]
        for j in range(cols):
            for k, img in enumerate((true, recon)):
                ax = axes[2 * i + k][j]
                ax.axis("off")
                if j < len(img):
                    pic = img[j].permute(1, 2, 0).numpy()
                    ax.imshow(pic.squeeze(-1) if pic.shape[-1] == 1 else pic, cmap="gray", vmin=0, vmax=1)
            axes[2 * i][0].set_title(f"client {pid}: original / {attack}", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Validation loss per epoch of every training phase of every attack (final round)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for attack, fits in curves.items():
        for fit in fits:
            ax.plot(range(1, len(fit["val"]) + 1), fit["val"], marker=".",
                    label=f"{fit['name'] or attack} / {fit['group']} ({fit['stopped']})")
    ax.set(xlabel="epoch", ylabel="validation loss", yscale="log", title="attack training on the validation slice")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost_table(seconds: dict[str, float], curves: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown rows: per attack its seconds, and per training phase the epochs it used."""
    lines = ["| attack | seconds | training phase (group) | epochs used | best epoch | stopped by | "
             "best validation loss |", "|---|---|---|---|---|---|---|"]
    for attack, total in seconds.items():
        fits = curves.get(attack) or [{}]
        for fit in fits:
            phase = f"{fit.get('name') or attack} ({fit['group']})" if fit else "no training"
            val = f"{min(fit['val']):.5f}" if fit.get("val") else ""
            lines.append(f"| {attack} | {total:.1f} | {phase} | {len(fit.get('val', []))} | "
                         f"{fit.get('best_epoch', '')} | {fit.get('stopped', '')} | {val} |")
    return lines


def per_round_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Mean SSIM per attack and attacked round next to the clients' accuracy by then: how
    leakage and utility move together (e.g. FSHA's hijack: SSIM up as the task collapses).
    Nothing when a single round was attacked."""
    rs = [r for r in rows if "ssim" in r]
    if len({r["round"] for r in rs}) < 2:
        return []
    by: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rs:
        by[(r["attack"], r["round"])].append(r)
    lines = ["Per attacked round (means over clients):", "",
             "| attack | round | accuracy | SSIM |", "|---|---|---|---|"]
    for (attack, round_), group in sorted(by.items()):
        accuracy = np.mean([r["accuracy"] for r in group if r.get("accuracy") is not None] or [np.nan])
        lines.append(f"| {attack} | {round_} | {accuracy:.3f} | {np.mean([r['ssim'] for r in group]):.3f} |")
    return lines + [""]


def lost_rounds_lines(summary_path: Path) -> list[str]:
    """The client-rounds that did not count in training (failures, dead actors), by cause, as
    ``summary.json``'s ``client_rounds_lost`` has them: leakage and accuracy rest on the rest."""
    if not summary_path.is_file():
        return []
    lost = json.loads(summary_path.read_text()).get("client_rounds_lost") or {}
    if not lost.get("total"):
        return ["Client-rounds lost in training: none.", ""]
    causes = "; ".join(f"{cause}: {e['count']} (rounds {', '.join(map(str, e['rounds']))})"
                       for cause, e in lost["by_cause"].items())
    return [f"Client-rounds lost in training: {lost['total']} ({causes}).", ""]


def write_report(run_dir: Path, rows: list[dict[str, Any]], examples: dict[str, Any],
                 means: dict[str, Any], seconds: dict[str, float], final_round: int,
                 curves: dict[str, list[dict[str, Any]]] | None = None) -> list[str]:
    """All figures and ``report.md``; returns the figure file names.

    The worst case over the attacks (:func:`worst_case`) leads each table and gets the
    per-client figures first: a defense is as good as its worst attack.
    """
    figures = []
    attacks = sorted(dict.fromkeys(r["attack"] for r in rows), key=lambda a: a not in (WORST, WORST_LABELS))
    means = {a: means[a] for a in sorted(means, key=lambda a: a not in (WORST, WORST_LABELS))}
    curves = {a: [c for c in fits if c["round"] == final_round] for a, fits in (curves or {}).items()}
    completion = {r["attack"] for r in rows if "completion_accuracy" in r}
    for attack in attacks:
        if attack in completion:
            plot_completion_bars(rows, attack, final_round, run_dir / f"completion_{attack}.png")
            figures.append(f"completion_{attack}.png")
            continue
        for name, plot in ((f"ssim_{attack}.png", plot_ssim_bars), (f"accuracy_vs_ssim_{attack}.png",
                                                                  plot_accuracy_vs_ssim)):
            plot(rows, attack, final_round, run_dir / name)
            figures.append(name)
        if attack in examples:
            plot_grid(examples[attack], attack, run_dir / f"reconstructions_{attack}.png")
            figures.append(f"reconstructions_{attack}.png")
    if set(attacks) - completion:
        plot_over_rounds(rows, run_dir / "leakage_over_rounds.png")
        figures.append("leakage_over_rounds.png")
    if any(curves.values()):
        plot_curves(curves, run_dir / "attack_curves.png")
        figures.append("attack_curves.png")
    lines = ["# Leakage report", "",
             f"Attacks on the features the cloud recorded, scored per client (round {final_round}). "
             "Per-client rows: `leakage.csv`. `worst-case` is, for every client, its strongest attack "
             "on each metric (highest SSIM and PSNR, lowest MSE; `worst-case-labels`: highest label "
             "accuracy), with the attack that reached it in `leakage.csv` (`ssim_attack`, ...): a "
             "defense is as good as its worst attack.", ""]
    if set(attacks) - completion:
        lines += ["Inversion: the baseline is the attacker's auxiliary mean image (knowing nothing).", "",
                  "| attack | group | accuracy | MSE | PSNR | SSIM | baseline SSIM |",
                  "|---|---|---|---|---|---|---|"]
        for attack in (a for a in means if a not in completion):
            for group, m in means[attack].items():
                lines.append(f"| {attack} | {group} | {m.get('accuracy', float('nan')):.3f} | {m['mse']:.4f} | "
                             f"{m['psnr']:.2f} | {m['ssim']:.3f} | {m['baseline_ssim']:.3f} |")
        lines.append("")
        lines += per_round_lines(rows)
    if completion:
        lines += ["Model completion: the completed model's accuracy on the clients' labels, next to "
                  "the clients' own accuracy and the same MLP trained from scratch on raw inputs "
                  "with the same labels.", "",
                  "| attack | group | client accuracy | completion accuracy | from scratch |",
                  "|---|---|---|---|---|"]
        for attack in (a for a in means if a in completion):
            for group, m in means[attack].items():
                lines.append(f"| {attack} | {group} | {m.get('accuracy', float('nan')):.3f} | "
                             f"{m['completion_accuracy']:.3f} | {m['scratch_accuracy']:.3f} |")
        lines.append("")
    lines += lost_rounds_lines(run_dir / "summary.json")
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    explained, explain_figures = explain.report_lines(rows, records, final_round, run_dir)
    lines += explained
    figures += explain_figures
    winners = [r["ssim_attack"] for r in rows if r["attack"] == WORST and r["round"] == final_round]
    if winners:
        counts = ", ".join(f"{a} {winners.count(a)}" for a in dict.fromkeys(winners))
        lines += [f"Strongest attack by SSIM, clients per attack: {counts}.", ""]
    lines += ["Attack cost (each attack trains until its validation loss stops improving, "
              "within its epoch and time caps):", "", *cost_table(seconds, curves), ""]
    lines += [f"![{f}]({f})" for f in figures]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return figures


def update_summary(run_dir: Path, means: dict[str, Any], seconds: dict[str, float],
                   audit: dict[str, dict[str, Any]], rows: list[dict[str, Any]] | None = None,
                   curves: dict[str, list[dict[str, Any]]] | None = None, final_round: int = 0) -> None:
    """Add the leakage means, the per-client worst case, the CEM audit and the attacks'
    costs (seconds, and each training phase's curve) to ``summary.json``."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    summary["leakage"] = means
    summary["worst_case"] = {
        str(r["partition_id"]): {k: r[k] for k in r if k.split("_")[0] in ("ssim", "mse", "psnr", "completion")}
        for r in rows or [] if r["round"] == final_round and r["attack"] in (WORST, WORST_LABELS)}
    summary["cem_audit"] = audit
    summary["attack_seconds"] = seconds
    summary["attack_training"] = {a: [{k: c[k] for k in ("name", "group", "round", "threads", "stopped",
                                                          "best_epoch", "seconds", "val", "train")}
                                      for c in fits] for a, fits in (curves or {}).items()}
    path.write_text(json.dumps(summary, indent=2))
