"""Summary tables and plots from result rows (dicts as in results.jsonl), reusable by task reports.

Rows are grouped by ``group_by`` axes plus "precision"; cells show mean ± sample sd over seeds (the mean
alone for one seed).
Metrics with an "acc" word in their name (test_acc, test_acc_at_best_val) are fractions, shown in percent.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from tritium.config import FAMILIES, Precision, parse_precision


def _precision(p: str) -> Precision | None:
    try:
        return parse_precision(p)
    except ValueError:
        return None


def scale(metric: str) -> float:
    """Display factor of a metric: 100 for accuracies (an "acc" word in the name), 1 otherwise."""
    return 100.0 if "acc" in metric.split("_") else 1.0


def precision_order(p: str) -> tuple:
    """Sort key of a precision string: higher nominal bits first, then float, QAT, PTQ, then by name;
    strings that are not precisions last."""
    q = _precision(p)
    if q is None:
        return (1, 0.0, 0, p)
    return (0, -q.nominal_bits, FAMILIES.index(q.family), p)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = statistics.fmean(values)
    return m, statistics.stdev(values) if len(values) > 1 else 0.0


def groups(rows: list[dict], group_by: tuple[str, ...], metric: str) -> dict[tuple, list[float]]:
    """``{(*group values, precision): [metric per row]}`` for rows that have the metric."""
    out: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        v = r.get(metric)
        if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
            out[(*(r.get(g) for g in group_by), r["precision"])].append(float(v))
    return dict(out)


def _label(values: tuple) -> str:
    return " / ".join(str(v) for v in values)


def summary_table(rows: list[dict], group_by: tuple[str, ...], metric: str) -> str:
    """Markdown table of mean ± sd of ``metric``: one row per (leading axes, precision), one column per
    value of the last ``group_by`` axis, plus an "avg" column when every cell of a row is present."""
    g = groups(rows, group_by, metric)
    if not g:
        return f"_no rows with {metric}_\n"
    k = scale(metric)
    cols = list(dict.fromkeys(key[-2] for key in g)) if group_by else [metric]
    lead = sorted({(key[:-2], key[-1]) for key in g},
                  key=lambda t: (tuple(str(x) for x in t[0]), precision_order(t[1])))
    counts = {len(v) for v in g.values()}
    head = [*group_by[:-1], "precision", *[str(c) for c in cols]]
    avg = len(cols) > 1
    lines = ["| " + " | ".join(head + (["avg"] if avg else [])) + " |",
             "|" + "---|" * (len(head) - len(cols)) + "---:|" * (len(cols) + avg)]
    for axes, prec in lead:
        cells, means = [], []
        for c in cols:
            vals = g.get((*axes, c, prec) if group_by else (prec,))
            if not vals:
                cells.append("")
                continue
            m, s = mean_sd(vals)
            means.append(m * k)
            cell = f"{m * k:.2f} ± {s * k:.2f}" if len(vals) > 1 else f"{m * k:.2f}"
            cells.append(cell if len(counts) == 1 else f"{cell} (n={len(vals)})")
        if avg:
            cells.append(f"{statistics.fmean(means):.2f}" if len(means) == len(cols) else "")
        lines.append("| " + " | ".join([*(str(a) for a in axes), prec, *cells]) + " |")
    note = f"{metric}{' (%)' if k == 100 else ''}, mean ± sd over "
    note += f"{counts.pop()} seed(s)" if len(counts) == 1 else "n seeds"
    return "\n".join(lines) + f"\n\n{note}.\n"


def run_time(rows: list[dict], group_by: tuple[str, ...]) -> str:
    """One line: the rows' wall-clock time (sum of ``wall_s``) in hours per value of the last ``group_by``
    axis, and in total ("" when no row has ``wall_s``)."""
    axis = group_by[-1] if group_by else None
    hours: dict = defaultdict(float)
    n = 0
    for r in rows:
        w = r.get("wall_s")
        if isinstance(w, (int, float)) and math.isfinite(w):
            hours[r.get(axis) if axis else None] += w / 3600
            n += 1
    if not n:
        return ""
    keys = sorted(hours) if all(isinstance(k, int) for k in hours) else list(hours)
    per = f"{'; '.join(f'{k}: {hours[k]:.1f}' for k in keys)} by {axis}; " if axis else ""
    return (f"Run time (sum of `wall_s`, hours; a resumed run counts from its resume): {per}"
            f"{sum(hours.values()):.1f} in all over {n} runs.\n")


def paper_comparison(rows: list[dict], group_by: tuple[str, ...], metric: str,
                     published: dict[tuple, float]) -> str:
    """Markdown table of our mean ``metric`` next to published values (keyed like `groups`:
    ``(*group values, precision)``, in display units), for the cells we ran."""
    g = groups(rows, group_by, metric)
    k = scale(metric)
    lines = ["| " + " | ".join([*group_by, "precision", "ours", "published", "ours - published"]) + " |",
             "|" + "---|" * (len(group_by) + 1) + "---:|" * 3]
    for key in sorted(g, key=lambda t: (tuple(str(x) for x in t[:-1]), precision_order(t[-1]))):
        if key in published:
            m, s = mean_sd(g[key])
            n = len(g[key])
            ours = f"{m * k:.2f} ± {s * k:.2f} (n={n})" if n > 1 else f"{m * k:.2f} (n=1)"
            cells = [*(str(x) for x in key), ours, f"{published[key]:.2f}", f"{m * k - published[key]:+.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(rows: list[dict], group_by: tuple[str, ...], metric: str, path: Path, title: str = "") -> Path:
    """Grouped bar plot of mean ``metric`` with sd error bars: one group per combination of axes, one bar
    per precision."""
    plt = _plt()
    g = groups(rows, group_by, metric)
    k = scale(metric)
    xs = list(dict.fromkeys(key[:-1] for key in g))
    precs = sorted({key[-1] for key in g}, key=precision_order)
    width = 0.8 / max(len(precs), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(xs) * max(1, len(precs)) * 0.35 + 2), 3.8))
    for j, p in enumerate(precs):
        pos, ms, ss = [], [], []
        for i, x in enumerate(xs):
            vals = g.get((*x, p))
            if vals:
                m, s = mean_sd(vals)
                pos.append(i + (j - (len(precs) - 1) / 2) * width)
                ms.append(m * k)
                ss.append(s * k)
        ax.bar(pos, ms, width, yerr=ss, capsize=2, label=p, color=f"C{j % 10}")
    ax.set_xticks(range(len(xs)), [_label(x) for x in xs])
    lo = min((mean_sd(v)[0] * k for v in g.values()), default=0)
    if k == 100:
        ax.set_ylim(max(0.0, lo - 10), 100)
    ax.set_ylabel(metric + (" (%)" if k == 100 else ""))
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(rows: list[dict], group_by: tuple[str, ...], path: Path, keys: tuple[str, ...] | None = None,
                title: str = "") -> Path | None:
    """Training curves (mean over seeds) from each row's "curves": one panel per (curve, axes) and one line
    per precision. ``keys``: curve names to plot (default: all but "step")."""
    curves = [r for r in rows if isinstance(r.get("curves"), dict) and r["curves"].get("step")]
    if not curves:
        return None
    if keys is None:
        keys = tuple(dict.fromkeys(c for r in curves for c in r["curves"] if c != "step"))
    xs = list(dict.fromkeys(tuple(r.get(g) for g in group_by) for r in curves))
    plt = _plt()
    precs = sorted({r["precision"] for r in curves}, key=precision_order)
    color = {p: f"C{i % 10}" for i, p in enumerate(precs)}
    fig, axes = plt.subplots(len(keys), len(xs), figsize=(3.4 * len(xs), 2.6 * len(keys)), squeeze=False)
    for i, key in enumerate(keys):
        for j, x in enumerate(xs):
            ax = axes[i][j]
            by_prec: dict[str, list[dict]] = defaultdict(list)
            for r in curves:
                if tuple(r.get(g) for g in group_by) == x and key in r["curves"]:
                    by_prec[r["precision"]].append(r["curves"])
            for p in sorted(by_prec, key=precision_order):
                cs = by_prec[p]
                n = min(len(c[key]) for c in cs)
                ys = [statistics.fmean(c[key][t] for c in cs) for t in range(n)]
                ax.plot(cs[0]["step"][:n], ys, label=p, lw=1, color=color[p])
            ax.set_title(f"{_label(x)}: {key}" if x else key, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=color[p], label=p) for p in precs]
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=min(len(precs), 4))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1 if len(keys) < 3 else 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bit_widths(rows: list[dict]) -> set[float]:
    """The distinct nominal weight bit widths (`Precision.nominal_bits`) among the rows' precisions."""
    return {q.nominal_bits for r in rows if "precision" in r and (q := _precision(r["precision"]))}


def plot_vs_bits(rows: list[dict], group_by: tuple[str, ...], metric: str, path: Path, title: str = "") -> Path:
    """Mean ``metric`` (sd error bars) against nominal weight bits (`Precision.nominal_bits`: fp32 = 32,
    bf16 = 16, log axis): one line per combination of axes and quantizer (`Precision.scheme`: measure,
    granularity, activation bits, PTQ, autocast), for the axes with at least three widths when there are
    such. Each line ends at the float run it was trained like (fp32, or bf16 for ``+bf16``); float runs no
    line ends at are plotted alone."""
    plt = _plt()
    g = groups(rows, group_by, metric)
    k = scale(metric)
    lines: dict[tuple, dict[float, tuple[float, float]]] = defaultdict(dict)
    base: dict[tuple, dict[float, tuple[float, float]]] = {}  # (*axes, float precision): its point
    anchor: dict[tuple, tuple] = {}  # line: the key of its float run in base
    for key, vals in g.items():
        axes, q = key[:-1], _precision(key[-1])
        if q is None:
            continue
        m, s = mean_sd(vals)
        if q.family == "fp":
            base[(*axes, str(q))] = {q.nominal_bits: (m * k, s * k)}
            continue
        lines[(*axes, q.scheme)][q.nominal_bits] = (m * k, s * k)
        anchor[(*axes, q.scheme)] = (*axes, str(Precision(autocast=q.autocast)))
    for key, fp in anchor.items():
        lines[key].update(base.get(fp, {}))
    for key, point in base.items():
        if key not in anchor.values():
            lines[key].update(point)
    widths: dict[tuple, set] = defaultdict(set)
    for key, v in lines.items():
        widths[key[:-1]] |= set(v)
    if any(len(w) >= 3 for w in widths.values()):  # only the axes with a sweep of widths
        lines = defaultdict(dict, {key: v for key, v in lines.items() if len(widths[key[:-1]]) >= 3})
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key in sorted(lines, key=str):
        pts = sorted(lines[key].items())
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                    marker="o", ms=3, capsize=2, lw=1, label=_label(key))
    ax.set_xscale("log", base=2)
    ticks = [1, 1.58, 2, 4, 8, 16, 32]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("weight bits (fp32 = 32, bf16/fp16 = 16)")
    ax.set_ylabel(metric + (" (%)" if k == 100 else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def generic_report(rows: list[dict], out: Path, task: str, group_by: tuple[str, ...], metric: str,
                   higher_is_better: bool = True) -> str:
    """The summary table and plots of one task's rows, written under ``out``; returns markdown."""
    better = "higher" if higher_is_better else "lower"
    parts = [f"## {task}", "", f"Main metric: `{metric}` ({better} is better).", "",
             summary_table(rows, group_by, metric), run_time(rows, group_by)]
    bars = plot_bars(rows, group_by, metric, out / f"{task}_{metric}.png", title=task)
    parts.append(f"![{task} {metric}]({bars.name})\n")
    curves = plot_curves(rows, group_by, out / f"{task}_curves.png", title=f"{task}: training curves")
    if curves:
        parts.append(f"![{task} curves]({curves.name})\n")
    if len(bit_widths(rows)) >= 3:
        vb = plot_vs_bits(rows, group_by, metric, out / f"{task}_{metric}_vs_bits.png", title=task)
        parts.append(f"![{task} {metric} vs bits]({vb.name})\n")
    return "\n".join(parts)
