"""The sweep report: accuracy against leakage per defense family, and defenses at matched accuracy.

Per finished point and attack (``leakage.csv``'s ``worst-case`` and ``worst-case-labels`` rows,
each client's strongest attack, lead; every attack follows), the point's leakage is the mean
over the clients attacked at its final round and its accuracy the run's final accuracy on the
evaluation split; per client group (heterogeneous configs) the group's clients and the group's
accuracy. Leakage is SSIM and MSE for inversion attacks, label accuracy for label attacks.

- **Frontier** (``frontier_<attack>_<metric>[_<group>].png``): accuracy on x, leakage on y,
  one line per curve (a family, see :mod:`sim.sweep`) through its strengths; markers at the
  mean over seeds, error bars one standard deviation over seeds both ways.
- **Matched accuracy**: per curve and seed, leakage is interpolated linearly in accuracy
  between the curve's strengths (never extrapolated) at common accuracy levels: three evenly
  spaced over the accuracies every curve with several strengths covers in every seed (if
  there is no such range, over the reference family's); mean over seeds with a t-based 95 %
  interval. Each curve is compared with the reference family seed by seed (the same seed: the
  same data, partition and initialisation): the mean difference and its 95 % interval. An
  interval on the side of less leakage means the defense moves the frontier (less leakage at
  the same accuracy); an interval around 0 means it only moves along it.
- **Equal strength**: where a curve has a strength the reference also has (noise+CEM and noise
  at the same sigma), the accuracy difference and the relative change of each leakage metric,
  paired by seed (CEM's claim is a higher attacker MSE at equal sigma, at no accuracy cost).
- **Point against point**, where the curves share no accuracy range (InfoScissors 0.83-0.84
  against noise 0.77-0.82): each strength of each curve against each strength of the reference,
  paired by seed, the accuracy and leakage differences with 95 % intervals. Less leakage (its
  interval excluding 0) where the accuracy is not lower (its interval not below 0) puts the
  point beyond the reference's frontier; more leakage where it is not higher puts it inside;
  less leakage for lower accuracy, or more for higher, is a trade-off.
- **Per-client leakage explained** (:mod:`sim.explain`): per point, the Spearman rank
  correlation of each client's worst-case leakage with its statistics; over the points, their
  mean, range and how many are significant, with a figure.

Files: ``sweep_report.md``, ``sweep_points.csv`` (one row per point, group and attack),
``sweep_summary.csv`` (per curve and strength: means and standard deviations over seeds),
``sweep_matched.csv``, ``sweep_equal_strength.csv``, ``sweep_dominance.csv``, ``sweep_clients.csv``
and the PNGs.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from scipy import stats as scistats

from attacks.scoring import WORST, WORST_LABELS
from sim import explain
from sim.report import read_csv, write_csv

# leakage metrics: which way is more leakage (+1: higher), and their names
DIRECTION = {"ssim": +1, "mse": -1, "completion_accuracy": +1}
NAMES = {"ssim": "SSIM", "mse": "MSE", "completion_accuracy": "label accuracy"}
ALL = "all clients"  # the group of every client
LEVELS = 3  # matched accuracy levels


def _ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its t-based 95 % interval (NaN below two values)."""
    n = len(values)
    if n < 2:
        return (float(values[0]) if n else float("nan")), float("nan")
    return float(np.mean(values)), float(scistats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n))


def _file(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", "_".join(p for p in parts if p)).strip("-")


def _attack_order(attack: str) -> tuple[int, str]:
    return ({WORST: 0, WORST_LABELS: 1}.get(attack, 2), attack)


# ----------------------------------------------------------------------------- the numbers


def point_rows(points: list[Any], runs: dict[str, Path]) -> list[dict[str, Any]]:
    """Per finished point, group (``all clients`` and each group of a heterogeneous config) and
    attack: accuracy and mean leakage over the clients attacked at the final round."""
    rows = []
    for p in points:
        if p.id not in runs:
            continue
        summary = json.loads((runs[p.id] / "summary.json").read_text())
        leakage = read_csv(runs[p.id] / "leakage.csv")
        if not leakage:
            continue
        final = max(int(r["round"]) for r in leakage)
        groups = {ALL: summary["final_accuracy"]}
        if len(summary.get("group_accuracy") or {}) > 1:
            groups |= summary["group_accuracy"]
        for attack in sorted(dict.fromkeys(r["attack"] for r in leakage), key=_attack_order):
            for group, accuracy in groups.items():
                mine = [r for r in leakage if r["attack"] == attack and int(r["round"]) == final
                        and group in (ALL, str(r["group"]))]
                row = {"point": p.id, "family": p.family, "curve": p.curve, "strength": p.strength,
                       "seed": p.seed, "group": group, "attack": attack, "accuracy": accuracy, "clients": len(mine)}
                for metric in DIRECTION:
                    values = [float(r[metric]) for r in mine if r.get(metric) not in (None, "")]
                    if values:
                        row[metric] = float(np.mean(values))
                rows.append(row | {"run_dir": str(runs[p.id])})
    return rows


def by_strength(rows: list[dict[str, Any]], order: dict[tuple[str, str], tuple]) -> list[dict[str, Any]]:
    """Per group, attack, curve and strength: seeds, and mean and std over seeds of accuracy and
    leakage; in the order of the curves' strengths."""
    acc: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        acc[(r["group"], r["attack"], r["curve"], r["strength"])].append(r)
    out = []
    for (group, attack, curve, strength), rs in acc.items():
        entry = {"group": group, "attack": attack, "curve": curve, "strength": strength, "seeds": len(rs)}
        for key in ("accuracy", *DIRECTION):
            values = [r[key] for r in rs if key in r]
            if values:
                entry[f"{key}_mean"] = float(np.mean(values))
                entry[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        out.append(entry)
    return sorted(out, key=lambda e: (e["group"] != ALL, e["group"], _attack_order(e["attack"]),
                                      e["curve"], order[(e["curve"], e["strength"])]))


def _curves(rows: list[dict[str, Any]], group: str, attack: str, metric: str) -> dict[str, dict[int, list]]:
    """``{curve: {seed: [(accuracy, leakage), ...]}}`` of one group, attack and metric."""
    data: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["group"] == group and r["attack"] == attack and metric in r:
            data[r["curve"]][r["seed"]].append((r["accuracy"], r[metric]))
    return data


def interpolate(pairs: list[tuple[float, float]], level: float) -> float:
    """Leakage at accuracy ``level`` on the piecewise-linear curve through ``pairs`` (accuracy,
    leakage); NaN outside the accuracies it spans. Equal accuracies are averaged."""
    xs = sorted({a for a, _ in pairs})
    ys = [np.mean([leak for a, leak in pairs if a == x]) for x in xs]
    if not xs or not xs[0] <= level <= xs[-1]:
        return float("nan")
    return float(np.interp(level, xs, ys))


def levels(data: dict[str, dict[int, list]], reference: str) -> list[float]:
    """The matched accuracy levels (see the module's docstring); empty when there are none."""
    def span(curves: list[str]) -> tuple[float, float]:
        ranges = [(min(a for a, _ in pairs), max(a for a, _ in pairs))
                  for c in curves for pairs in data[c].values()]
        return max(lo for lo, _ in ranges), min(hi for _, hi in ranges)

    several = [c for c in data if all(len({a for a, _ in pairs}) > 1 for pairs in data[c].values())]
    for curves in (several, [reference] if reference in several else []):
        if curves:
            lo, hi = span(curves)
            if lo <= hi:
                return np.linspace(lo, hi, LEVELS).tolist() if hi > lo else [lo]
    return []


def matched(data: dict[str, dict[int, list]], at: list[float], reference: str, metric: str) -> list[dict[str, Any]]:
    """Per level and curve: leakage at that accuracy (mean, 95 % half-width, seeds) and its
    difference from the reference curve, paired by seed, with a verdict."""
    out = []
    for level in at:
        ref = {s: interpolate(pairs, level) for s, pairs in data.get(reference, {}).items()}
        for curve, seeds in data.items():
            values = {s: interpolate(pairs, level) for s, pairs in seeds.items()}
            finite = [v for v in values.values() if np.isfinite(v)]
            mean, half = _ci(finite)
            entry = {"accuracy": level, "curve": curve, "leakage": mean, "ci": half, "seeds": len(finite)}
            diffs = [values[s] - ref[s] for s in values if s in ref and np.isfinite(values[s]) and np.isfinite(ref[s])]
            if curve != reference and diffs:
                delta, dhalf = _ci(diffs)
                entry |= {"delta": delta, "delta_ci": dhalf, "verdict": _verdict(delta, dhalf, len(diffs), metric)}
            out.append(entry)
    return out


def _side(delta: float, half: float, metric: str) -> int:
    """-1 for less leakage, +1 for more, 0 when the 95 % interval ``delta ± half`` holds 0."""
    more = DIRECTION[metric] * np.array([delta - half, delta + half])
    return -1 if more.max() < 0 else 1 if more.min() > 0 else 0


def _verdict(delta: float, half: float, n: int, metric: str) -> str:
    if n < 2:
        return "one seed: no interval"
    return {-1: "less leakage at equal accuracy: moves the frontier",
            1: "more leakage at equal accuracy: a worse frontier",
            0: "no difference at 95 %: moves along the frontier"}[_side(delta, half, metric)]


def equal_strength(rows: list[dict[str, Any]], group: str, attack: str, reference: str) -> list[dict[str, Any]]:
    """Per curve and strength the reference also has (``sigma=0.05`` of noise and of noise+CEM):
    the accuracy difference and each metric's relative change (%) from the reference, per seed,
    mean with a t-based 95 % half-width."""
    by = {(r["curve"], r["strength"], r["seed"]): r for r in rows if r["group"] == group and r["attack"] == attack}
    out = []
    for curve, strength in dict.fromkeys((c, s) for c, s, _ in by):
        seeds = [seed for c, s, seed in by if (c, s) == (curve, strength) and (reference, strength, seed) in by]
        if curve == reference or not seeds or not strength:
            continue
        pairs = [(by[(curve, strength, seed)], by[(reference, strength, seed)]) for seed in seeds]
        entry = {"curve": curve, "strength": strength, "seeds": len(seeds)}
        entry["accuracy_delta"], entry["accuracy_ci"] = _ci([a["accuracy"] - b["accuracy"] for a, b in pairs])
        for m in DIRECTION:
            if all(m in a and m in b and b[m] for a, b in pairs):
                entry[f"{m}_change"], entry[f"{m}_change_ci"] = _ci([100 * (a[m] - b[m]) / b[m] for a, b in pairs])
        out.append(entry)
    return out


def dominance(rows: list[dict[str, Any]], group: str, attack: str, reference: str,
              metric: str) -> list[dict[str, Any]]:
    """Each strength of each curve against each strength of the reference, paired by seed: the
    accuracy and leakage differences (mean, t-based 95 % half-width) and a verdict."""
    by = {(r["curve"], r["strength"], r["seed"]): r for r in rows
          if r["group"] == group and r["attack"] == attack and metric in r}
    points = list(dict.fromkeys((c, s) for c, s, _ in by))
    out = []
    for curve, strength in points:
        for ref_strength in (s for c, s in points if c == reference and curve != reference):
            seeds = [seed for c, s, seed in by if (c, s) == (curve, strength) and (reference, ref_strength, seed) in by]
            if not seeds:
                continue
            pairs = [(by[(curve, strength, seed)], by[(reference, ref_strength, seed)]) for seed in seeds]
            dacc, acc_half = _ci([a["accuracy"] - b["accuracy"] for a, b in pairs])
            dleak, leak_half = _ci([a[metric] - b[metric] for a, b in pairs])
            out.append({"curve": curve, "strength": strength, "against": ref_strength, "seeds": len(seeds),
                        "accuracy_delta": dacc, "accuracy_ci": acc_half, "delta": dleak, "delta_ci": leak_half,
                        "verdict": _beyond(dacc, acc_half, dleak, leak_half, len(seeds), metric)})
    return out


def _beyond(dacc: float, acc_half: float, delta: float, half: float, n: int, metric: str) -> str:
    if n < 2:
        return "one seed: no interval"
    side = _side(delta, half, metric)
    if side < 0:
        return ("less leakage, lower accuracy: a trade-off" if dacc + acc_half < 0
                else "less leakage, accuracy not lower at 95 %: beyond the frontier")
    if side > 0:
        return ("more leakage, higher accuracy: a trade-off" if dacc - acc_half > 0
                else "more leakage, accuracy not higher at 95 %: inside the frontier")
    return "no leakage difference at 95 %"


# ----------------------------------------------------------------------------- the figures


def plot_frontier(summary: list[dict[str, Any]], group: str, attack: str, metric: str, at: list[float],
                  path: Path) -> None:
    """Accuracy against leakage, one line per curve through its strengths (mean, std over seeds)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    mine = [e for e in summary if e["group"] == group and e["attack"] == attack and f"{metric}_mean" in e]
    for i, curve in enumerate(dict.fromkeys(e["curve"] for e in mine)):
        es = [e for e in mine if e["curve"] == curve]
        ax.errorbar([e["accuracy_mean"] for e in es], [e[f"{metric}_mean"] for e in es],
                    xerr=np.nan_to_num([e["accuracy_std"] for e in es]),  # one seed: no bar
                    yerr=np.nan_to_num([e[f"{metric}_std"] for e in es]),
                    marker="o", ms=4, capsize=2, color=plt.get_cmap("tab10")(i % 10), label=curve)
        for e in es:
            if e["strength"]:
                text = e["strength"].split("=", 1)[1] if e["strength"].count("=") == 1 else e["strength"]
                ax.annotate(text, (e["accuracy_mean"], e[f"{metric}_mean"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
    for level in at:
        ax.axvline(level, color="grey", lw=0.6, ls=":")
    worse = "higher" if DIRECTION[metric] > 0 else "lower"
    ax.set(xlabel="accuracy" + ("" if group == ALL else f" (group {group})"),
           ylabel=f"{attack} {NAMES[metric]} ({worse} = more leakage)",
           title=f"{attack}: accuracy against leakage" + ("" if group == ALL else f", group {group}"))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_client_correlations(entries: list[dict[str, Any]], attack: str, path: Path) -> None:
    """Each point's Spearman rho per client statistic, coloured by curve."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    curves = list(dict.fromkeys(e["curve"] for e in entries))
    rng = np.random.default_rng(0)  # horizontal jitter only
    for i, (stat, _) in enumerate(explain.STATS):
        for e in (e for e in entries if e["stat"] == stat and e["rho"] is not None):
            ax.scatter(i + rng.uniform(-0.2, 0.2), e["rho"], s=14,
                       color=plt.get_cmap("tab10")(curves.index(e["curve"]) % 10))
    for j, curve in enumerate(curves):
        ax.scatter([], [], color=plt.get_cmap("tab10")(j % 10), label=curve, s=14)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks(range(len(explain.STATS)), [label for _, label in explain.STATS], fontsize=7, rotation=20)
    ax.set(ylim=(-1.05, 1.05), ylabel="Spearman ρ with leakage",
           title=f"{attack}: which client statistics go with leakage (one dot per point)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ the report


def client_correlations(points: list[Any], runs: dict[str, Path]) -> list[dict[str, Any]]:
    """Per finished point, worst-case target and client statistic: Spearman's rho (sim.explain)."""
    out = []
    for p in points:
        if p.id not in runs:
            continue
        rows = read_csv(runs[p.id] / "leakage.csv")
        if not rows:
            continue
        records = [json.loads(line) for line in (runs[p.id] / "metrics.jsonl").read_text().splitlines()]
        final = max(int(r["round"]) for r in rows)
        for attack, metric in explain.targets(rows, final):
            corr = explain.correlations(explain.client_table(rows, records, final, attack, metric))
            out += [{"point": p.id, "curve": p.curve, "strength": p.strength, "seed": p.seed, "attack": attack,
                     "stat": stat, **c} for stat, c in corr.items()]
    return out


def _fmt(mean: float, half: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if np.isfinite(half) else "")


def _digits(metric: str) -> int:
    return 4 if metric == "mse" else 3


def _client_lines(entries: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    lines = []
    for attack in dict.fromkeys(e["attack"] for e in entries):
        mine = [e for e in entries if e["attack"] == attack]
        name = _file("sweep_clients", attack) + ".png"
        plot_client_correlations(mine, attack, sweep_dir / name)
        lines += [f"**{attack}**: Spearman's ρ between each client's {attack} leakage and its statistics, "
                  "per point; over the points:", "",
                  "| client statistic | points with a ρ | mean ρ | range | p < 0.05 (positive / negative) |",
                  "|---|---|---|---|---|"]
        for stat, label in explain.STATS:
            rhos = [e for e in mine if e["stat"] == stat and e["rho"] is not None]
            if not rhos:
                why = next((e["why"] for e in mine if e["stat"] == stat), "")
                lines.append(f"| {label} | 0 ({why}) | | | |")
                continue
            values = [e["rho"] for e in rhos]
            pos = sum(e["p"] < 0.05 and e["rho"] > 0 for e in rhos)
            neg = sum(e["p"] < 0.05 and e["rho"] < 0 for e in rhos)
            lines.append(f"| {label} | {len(rhos)} | {np.mean(values):+.2f} | {min(values):+.2f} .. "
                         f"{max(values):+.2f} | {pos} / {neg} |")
        lines += ["", f"![{name}]({name})", ""]
    return lines


def write_report(sweep_dir: Path, points: list[Any], runs: dict[str, Path], errors: dict[str, str],
                 reference: str) -> Path:
    """Every table, figure and ``sweep_report.md`` of the finished points; returns the report's path."""
    rows = point_rows(points, runs)
    order = {(p.curve, p.strength): p.order for p in points}
    summary = by_strength(rows, order)
    curves = list(dict.fromkeys(p.curve for p in points))
    ref = reference if reference in curves else next((c for c in curves if c.startswith(reference)), curves[0])
    write_csv(rows, sweep_dir / "sweep_points.csv")
    write_csv(summary, sweep_dir / "sweep_summary.csv")
    lines = [f"# Sweep report: {sweep_dir.name}", "",
             f"{len(runs)} of {len(points)} points finished ({len(errors)} failed), {len(curves)} curves; "
             f"every point is a run directory under `points/` with its own `report.md`. Leakage is the mean over "
             f"the clients attacked at the final round; `worst-case` is each client's strongest inversion attack, "
             f"`worst-case-labels` its strongest label attack. Curves are compared with **{ref}**.", ""]
    if errors:
        lines += ["Failed points:", ""] + [f"- `{pid}`: {text}" for pid, text in errors.items()] + [""]
    glance: list[str] = []
    matched_rows: list[dict[str, Any]] = []
    equal_rows: list[dict[str, Any]] = []
    dominance_rows: list[dict[str, Any]] = []
    body: list[str] = []
    groups = list(dict.fromkeys(r["group"] for r in rows))
    for group in groups:
        if group != ALL:
            body += [f"## Group {group}", "", "Accuracy: the group's own; leakage: the group's clients.", ""]
        for attack in sorted(dict.fromkeys(r["attack"] for r in rows if r["group"] == group), key=_attack_order):
            metrics = [m for m in DIRECTION if any(r["group"] == group and r["attack"] == attack and m in r
                                                   for r in rows)]
            body += [f"### {attack}" + ("" if group == ALL else f" (group {group})"), "",
                     "| curve | strength | seeds | accuracy | " + " | ".join(NAMES[m] for m in metrics) + " |",
                     "|---" * (4 + len(metrics)) + "|"]
            for e in (e for e in summary if e["group"] == group and e["attack"] == attack):
                body.append(f"| {e['curve']} | {e['strength']} | {e['seeds']} | "
                            f"{_fmt(e['accuracy_mean'], e['accuracy_std'])} | "
                            + " | ".join(_fmt(e.get(f"{m}_mean", np.nan), e.get(f"{m}_std", np.nan), _digits(m))
                                         for m in metrics) + " |")
            body += ["", "(mean ± standard deviation over seeds)", ""]
            same = equal_strength(rows, group, attack, ref)
            equal_rows += [{"group": group, "attack": attack, **e} for e in same]
            if same:
                body += [f"At equal strength, against {ref} (paired by seed; mean ± 95 % interval): accuracy "
                         "difference and relative change of the leakage metrics:", "",
                         "| curve | strength | seeds | Δ accuracy | "
                         + " | ".join(f"{NAMES[m]} change %" for m in metrics) + " |",
                         "|---" * (4 + len(metrics)) + "|"]
                body += [f"| {e['curve']} | {e['strength']} | {e['seeds']} | "
                         f"{_fmt(e['accuracy_delta'], e['accuracy_ci'])} | "
                         + " | ".join(_fmt(e.get(f"{m}_change", np.nan), e.get(f"{m}_change_ci", np.nan), 1)
                                      for m in metrics) + " |" for e in same]
                body.append("")
            for metric in metrics:
                data = _curves(rows, group, attack, metric)
                base = ref if ref in data else next(iter(data))  # e.g. a label attack only some curves ran
                at = levels(data, base)
                name = _file("frontier", attack, metric, "" if group == ALL else group) + ".png"
                plot_frontier(summary, group, attack, metric, at, sweep_dir / name)
                body += [f"![{name}]({name})", ""]
                table = matched(data, at, base, metric)
                matched_rows += [{"group": group, "attack": attack, "metric": metric, **t} for t in table]
                if not table:
                    body += [f"{NAMES[metric]} at matched accuracy: no accuracy range that the curves share.", ""]
                    pairs = dominance(rows, group, attack, base, metric)
                    dominance_rows += [{"group": group, "attack": attack, "metric": metric, **t} for t in pairs]
                    if pairs:
                        d = _digits(metric)
                        body += [f"{NAMES[metric]}, point against point (Δ: minus {base} at the strength "
                                 "named, paired by seed; mean ± 95 % interval):", "",
                                 f"| curve | strength | against {base} | seeds | Δ accuracy | Δ {NAMES[metric]} "
                                 "| verdict |", "|---|---|---|---|---|---|---|"]
                        body += [f"| {t['curve']} | {t['strength']} | {t['against']} | {t['seeds']} | "
                                 f"{_fmt(t['accuracy_delta'], t['accuracy_ci'])} | "
                                 f"{_fmt(t['delta'], t['delta_ci'], d)} | {t['verdict']} |" for t in pairs]
                        body.append("")
                    if attack in (WORST, WORST_LABELS) and metric != "mse":
                        glance += [f"- {attack} {NAMES[metric]}" + ("" if group == ALL else f", group {group}")
                                   + f": **{t['curve']} {t['strength']}** vs {base} {t['against']}: Δ accuracy "
                                   f"{_fmt(t['accuracy_delta'], t['accuracy_ci'])}, Δ {NAMES[metric]} "
                                   f"{_fmt(t['delta'], t['delta_ci'], d)}: {t['verdict']}"
                                   for t in pairs if "frontier" in t["verdict"]]
                    continue
                body += [f"{NAMES[metric]} at matched accuracy (interpolated between strengths, mean ± 95 % "
                         f"interval over seeds; Δ: minus {base}, paired by seed):", "",
                         f"| accuracy | curve | {NAMES[metric]} | seeds | Δ vs {base} | verdict |",
                         "|---|---|---|---|---|---|"]
                d = _digits(metric)
                for t in table:
                    delta = _fmt(t["delta"], t["delta_ci"], d) if "delta" in t else ""
                    body.append(f"| {t['accuracy']:.3f} | {t['curve']} | {_fmt(t['leakage'], t['ci'], d)} | "
                                f"{t['seeds']} | {delta} | {t.get('verdict', '')} |")
                body.append("")
                middle = [t for t in table if t["accuracy"] == at[len(at) // 2] and "delta" in t]
                if attack in (WORST, WORST_LABELS) and metric != "mse" and middle:
                    glance += [f"- {attack} {NAMES[metric]}" + ("" if group == ALL else f", group {group}")
                               + f", accuracy {t['accuracy']:.3f}: **{t['curve']}** vs {base}: Δ "
                               f"{_fmt(t['delta'], t['delta_ci'], d)}: {t['verdict']}" for t in middle]
    write_csv(matched_rows, sweep_dir / "sweep_matched.csv")
    write_csv(equal_rows, sweep_dir / "sweep_equal_strength.csv")
    write_csv(dominance_rows, sweep_dir / "sweep_dominance.csv")
    if glance:
        lines += ["## At a glance", "", "At the middle matched accuracy level, or point against point where the "
                  "curves share no accuracy range (each client's worst case):", "",
                  *glance, ""]
    lines += body
    entries = client_correlations(points, runs)
    write_csv(entries, sweep_dir / "sweep_clients.csv")
    if entries:
        lines += ["## Which clients leak most, and why", "",
                  "Per point, each client's worst-case leakage against its samples, classes held, label skew, "
                  "rounds since it trained, accuracy and failed rounds (each point's `report.md` lists its "
                  "leakiest clients); a statistic the same for every client has no ρ.", "",
                  *_client_lines(entries, sweep_dir)]
    path = sweep_dir / "sweep_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
