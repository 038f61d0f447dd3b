"""Which clients leak most, and why: each client's worst-case leakage against its own statistics.

For the clients attacked at a round, the leakage (the worst case over the inversion attacks,
SSIM, and over the label attacks, label accuracy: higher is more leakage for both) is set
against what differs between clients: its samples, the classes it holds, its label skew (the
majority class's share), its group, the rounds since it last trained, its held-out accuracy and
its failed rounds. Per statistic, Spearman's rank correlation over the clients (none for a
statistic that is the same for every client), the clients that leak most, and a figure with one
panel per statistic.

"Rounds since it last trained" is the attacked round minus the latest round up to it in which
the client completed training (``metrics.jsonl``'s per-round ``clients``): the cloud attacks
the features of exactly that round (the view keeps each client's latest completed round), so
0 means features from the attacked round's own head, k that the client sat out k rounds.

Used by the single-run report (:func:`sim.report.write_report`) and the sweep report
(:mod:`sim.sweep_report`), which reads the same numbers back from ``leakage.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from attacks.scoring import WORST, WORST_LABELS

matplotlib.use("Agg")  # figures go to files; every plotting module imports this one

# (column, what the report calls it); leakage.csv has all but rounds_since_trained
STATS = (("num_examples", "samples"), ("num_classes", "classes held"),
         ("majority_share", "label skew (majority share)"), ("rounds_since_trained", "rounds since it trained"),
         ("accuracy", "its accuracy"), ("failures", "failed rounds"))
# (pseudo-attack, metric): the worst case per client, for inversion and for label inference
TARGETS = ((WORST, "ssim"), (WORST_LABELS, "completion_accuracy"))
MIN_CLIENTS = 3  # fewer clients give no rank correlation


def group_colours(groups: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {g: cmap(i % 10) for i, g in enumerate(groups)}


def rounds_since_trained(records: list[dict[str, Any]], round_: int) -> dict[int, int]:
    """Per client that completed a round up to ``round_``: ``round_`` minus the latest such round."""
    last: dict[int, int] = {}
    for record in records:
        if record["round"] <= round_:
            for client in record["clients"]:
                last[int(client["partition_id"])] = int(record["round"])
    return {pid: round_ - r for pid, r in last.items()}


def _number(value: Any) -> float:
    """A leakage.csv cell (text) or a row value (number) as a float; NaN when empty."""
    return float("nan") if value is None or value == "" else float(value)


def targets(rows: list[dict[str, Any]], round_: int) -> list[tuple[str, str]]:
    """The worst-case rows present at ``round_`` (rows of leakage.csv or of the attack stage)."""
    present = {(str(r["attack"]), metric) for r in rows if int(r["round"]) == round_
               for metric in ("ssim", "completion_accuracy") if r.get(metric) not in (None, "")}
    return [t for t in TARGETS if t in present]


def client_table(rows: list[dict[str, Any]], records: list[dict[str, Any]], round_: int,
                 attack: str, metric: str) -> list[dict[str, Any]]:
    """One dict per client attacked at ``round_``: partition_id, group, leakage and every statistic."""
    since = rounds_since_trained(records, round_)
    table = []
    for r in rows:
        if r["attack"] == attack and int(r["round"]) == round_ and r.get(metric) not in (None, ""):
            pid = int(r["partition_id"])
            entry = {"partition_id": pid, "group": str(r["group"]), "leakage": _number(r[metric])}
            for stat, _ in STATS:
                entry[stat] = float(since.get(pid, np.nan)) if stat == "rounds_since_trained" \
                    else _number(r.get(stat))
            table.append(entry)
    return sorted(table, key=lambda e: e["partition_id"])


def correlations(table: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per statistic: Spearman's rho and p-value against the leakage, over the clients with both
    numbers (``rho`` None when fewer than :data:`MIN_CLIENTS` or either side is constant; ``why``
    says which)."""
    from scipy.stats import spearmanr

    out = {}
    for stat, _ in STATS:
        pairs = [(e[stat], e["leakage"]) for e in table if np.isfinite(e[stat]) and np.isfinite(e["leakage"])]
        xs, ys = zip(*pairs) if pairs else ((), ())
        entry: dict[str, Any] = {"rho": None, "p": None, "clients": len(pairs), "why": ""}
        if len(pairs) < MIN_CLIENTS:
            entry["why"] = f"{len(pairs)} clients"
        elif len(set(xs)) < 2:
            entry["why"] = f"the same for every client ({xs[0]:g})"
        elif len(set(ys)) < 2:
            entry["why"] = "the leakage is the same for every client"
        else:
            result = spearmanr(xs, ys)
            entry |= {"rho": float(result.statistic), "p": float(result.pvalue)}
        out[stat] = entry
    return out


def plot(table: list[dict[str, Any]], corr: dict[str, dict[str, Any]], ylabel: str, path: Path) -> None:
    """One panel per statistic: every client's leakage against it, coloured by group."""
    colours = group_colours(list(dict.fromkeys(e["group"] for e in table)))
    cols = (len(STATS) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(3 * cols, 5.6), sharey=True)
    for ax, (stat, label) in zip(axes.flat, STATS):
        for g, colour in colours.items():
            mine = [e for e in table if e["group"] == g]
            ax.scatter([e[stat] for e in mine], [e["leakage"] for e in mine], s=16, color=colour, label=g)
        rho = corr[stat]["rho"]
        ax.set_title(f"{label}: " + (f"Spearman ρ {rho:+.2f}" if rho is not None else "no ρ"), fontsize=8)
        ax.tick_params(labelsize=7)
    for row in axes:
        row[0].set_ylabel(ylabel, fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def correlation_lines(corr: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| client statistic | Spearman ρ | p | clients |", "|---|---|---|---|"]
    for stat, label in STATS:
        c = corr[stat]
        rho = f"{c['rho']:+.2f}" if c["rho"] is not None else f"none: {c['why']}"
        p = "" if c["p"] is None else f"{c['p']:.3f}"
        lines.append(f"| {label} | {rho} | {p} | {c['clients']} |")
    return lines


def report_lines(rows: list[dict[str, Any]], records: list[dict[str, Any]], round_: int, run_dir: Path,
                 most: int = 5) -> tuple[list[str], list[str]]:
    """The markdown section of a run's report and the figures it wrote to ``run_dir``."""
    lines, figures = [], []
    for attack, metric in targets(rows, round_):
        table = client_table(rows, records, round_, attack, metric)
        corr = correlations(table)
        what = f"{attack} {'SSIM' if metric == 'ssim' else 'label accuracy'}"
        name = f"clients_explained_{attack}.png"
        plot(table, corr, what, run_dir / name)
        figures.append(name)
        lines += [f"Which clients leak most, and why ({what} at round {round_}, higher = more leakage; "
                  "rounds since it trained: the attacked round minus the client's latest completed round, "
                  "whose features the cloud attacks):", "", *correlation_lines(corr), ""]
        top = sorted(table, key=lambda e: -e["leakage"])[:most]
        lines += [f"| client | group | {what} | " + " | ".join(label for _, label in STATS) + " |",
                  "|---" * (3 + len(STATS)) + "|"]
        lines += [f"| {e['partition_id']} | {e['group']} | {e['leakage']:.3f} | "
                  + " | ".join(f"{e[stat]:g}" for stat, _ in STATS) + " |" for e in top]
        names = dict.fromkeys(e["group"] for e in table)
        by_group = {g: [e["leakage"] for e in table if e["group"] == g] for g in names}
        if len(by_group) > 1:
            lines += ["", "Per group: " + ", ".join(f"{g} {np.mean(v):.3f} ({len(v)} clients)"
                                                    for g, v in by_group.items()) + "."]
        lines.append("")
    return lines, figures
