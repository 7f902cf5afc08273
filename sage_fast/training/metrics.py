"""Accuracy by many / medium / few-shot group and the report files.

`write_report` writes, into a run's output folder (or, for ``sage-fast eval``, its own folder):

* ``metrics.json``: the report without ``per_class``, plus ``dataset``; NaN (a group without classes) as null
  (`json_safe`: strict JSON, which NaN is not);
* ``per_class.csv``: ``class,name,train_count,group_count,group,accuracy`` (accuracy empty without test images);
* ``per_class_accuracy.png``: `plot_per_class` (the classes, their binned means and the group means).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..utils.files import atomic_path, atomic_write_text
from .run_folder import METRICS, PER_CLASS, PLOT


#: the accuracies a report leads with, in this order (top-1, %)
ACCURACIES = ("overall", "many", "medium", "few")


def group_masks(group_counts: Sequence[int]) -> Dict[str, torch.Tensor]:
    """many: > 100 training images, medium: 20 to 100, few: < 20 (the paper's groups; docs/method.md)."""
    c = torch.as_tensor(list(group_counts))
    return {"many": c > 100, "medium": (c >= 20) & (c <= 100), "few": c < 20}


def accuracy_report(correct: torch.Tensor, total: torch.Tensor, group_counts: Sequence[int]) -> dict:
    """Top-1 accuracies in percent from per-class correct / total counts (C,).

    overall: over samples; many / medium / few: the mean of the group's per-class accuracies (classes
    without test images are left out; a group with no class is NaN); per_class: C values (NaN: no test image).
    """
    correct, total = correct.double().cpu(), total.double().cpu()
    per_class = torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, float("nan")))
    out = {"overall": 100.0 * float(correct.sum() / total.sum()) if total.sum() > 0 else float("nan")}
    for name, mask in group_masks(group_counts).items():
        sel = mask & (total > 0)
        out[name] = 100.0 * float(per_class[sel].mean()) if bool(sel.any()) else float("nan")
    out["per_class"] = (100.0 * per_class).tolist()
    out["test_images"] = int(total.sum())
    return out


def metric_value(v) -> float:
    """A report's accuracy as a float: None (a group without classes, after JSON) is NaN."""
    return float("nan") if v is None else float(v)


def new_figure(**kwargs):
    """A matplotlib `Figure` with the Agg canvas, made without pyplot: the process's matplotlib backend and
    pyplot's figure list stay as the caller had them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path, **kwargs) -> None:
    """Write `fig` as a PNG to `path` atomically."""
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", **kwargs)


def json_safe(obj):
    """`obj` with every non-finite float (NaN: a group without classes) replaced by None, for strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def format_report(r: dict) -> str:
    """One line for the terminal: overall / many / medium / few top-1, test images and skipped ones."""
    return (f"top-1 overall {r['overall']:.2f}%  many {r['many']:.2f}%  medium {r['medium']:.2f}%  "
            f"few {r['few']:.2f}%  ({r['test_images']} test images, {r['skipped']} skipped)")


def binned_accuracy(train_counts: Sequence[int], accuracy: Sequence[float], num_bins: Optional[int] = None):
    """The mean per-class accuracy over log-spaced bins of the training-set size.

    train_counts (C,) positive; accuracy (C,) in %, NaN for a class without test images (left out).
    num_bins: geometric bins from the smallest to the largest count, both included (default: one per
    doubling, 1 to 12). -> (x, mean, classes), each (B,) for the B bins that hold a class with test images:
    x the geometric mean of those classes' counts, mean their mean accuracy, classes how many there are.
    """
    x = np.asarray(train_counts, dtype=float)
    y = np.asarray(accuracy, dtype=float)
    keep = np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if x.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=int)
    lo, hi = x.min(), x.max()
    if num_bins is None:
        num_bins = int(np.clip(np.ceil(np.log2(hi / lo)), 1, 12))
    edges = np.geomspace(lo, hi, num_bins + 1) if hi > lo else np.array([lo, hi])
    which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    centres, means, sizes = [], [], []
    for b in np.unique(which):
        sel = which == b
        centres.append(float(np.exp(np.log(x[sel]).mean())))
        means.append(float(y[sel].mean()))
        sizes.append(int(sel.sum()))
    return np.array(centres), np.array(means), np.array(sizes)


def plot_per_class(path, accuracy: Sequence[float], train_counts: Sequence[int], title: str = "",
                   group_counts: Optional[Sequence[int]] = None):
    """PNG: per-class test accuracy against the class's training count (log x), coloured by group, with what
    stays readable at thousands of classes: the mean accuracy over log-spaced bins of the count
    (`binned_accuracy`, a line with markers) and each group's mean (the report's many / medium / few; a
    horizontal segment over the group's counts). The dots get lighter and smaller as classes grow (iNaturalist:
    8,142 classes with 3 test images each lie on four bands, 0, 33, 67 and 100%). -> the `Figure`.

    group_counts: the counts that define many / medium / few (default `train_counts`). The group borders
    (20 and 100) are drawn only when the groups follow the plotted counts; CIFAR-100-LT ratios 50 and 10 use
    ratio 100's counts, which the x label then says.
    """
    x = np.asarray(train_counts)
    y = np.asarray(accuracy, dtype=float)
    same = group_counts is None or list(group_counts) == list(train_counts)
    masks = group_masks(train_counts if group_counts is None else group_counts)
    fig = new_figure(figsize=(7, 5), dpi=120)
    ax = fig.subplots()
    # 0.7 up to 100 classes, then 7 / sqrt(C): 0.22 at 1,000, the floor 0.08 at 8,142
    alpha = float(np.clip(7.0 / np.sqrt(max(len(y), 1)), 0.08, 0.7))
    size = 10 if len(y) <= 1000 else 4
    colours = dict(zip(masks, ("tab:blue", "tab:orange", "tab:green")))
    for name, mask in masks.items():
        sel = mask.numpy()
        if sel.any():
            ax.scatter(x[sel], y[sel], s=size, alpha=alpha, color=colours[name], linewidths=0,
                       label=f"{name} ({int(sel.sum()):,} class{'es' if sel.sum() != 1 else ''})")
    for name, mask in masks.items():
        sel = mask.numpy() & np.isfinite(y)
        if sel.any():
            mean = float(y[sel].mean())
            # a tenth beyond the group's counts on either side (log x): a one-class group still shows
            ax.hlines(mean, x[sel].min() / 1.1, x[sel].max() * 1.1, colors=colours[name], linewidth=2.5,
                      label=f"{name} mean {mean:.1f}%", zorder=3)
    bx, by, _ = binned_accuracy(x, y)
    if len(bx):
        ax.plot(bx, by, "o-", color="black", linewidth=1.2, markersize=4, zorder=4,
                label="mean over log-spaced bins")
    if same:
        for border in (20, 100):
            ax.axvline(border, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("training images of the class")
    else:
        ax.set_xlabel("training images of the class (groups by the ratio-100 counts: group_count in per_class.csv)")
    ax.set_xscale("log")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_ylim(-2, 102)
    # below the axes: inside, it would hide the 0% band of the many-shot classes
    legend = ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=7, ncol=3, frameon=False)
    for handle in getattr(legend, "legend_handles", None) or legend.legendHandles:
        handle.set_alpha(1.0)  # the dots' own alpha would make their legend entries invisible
    ax.set_title(title or "per-class accuracy")
    fig.tight_layout()
    save_png(fig, path)
    return fig


def write_report(out_dir, report: dict, data) -> None:
    """metrics.json, per_class.csv and per_class_accuracy.png in `out_dir` (see the module docstring).

    report: an `accuracy_report` (plus ``skipped``, ``epoch``, ``step``); data: an `LTData` (its name,
    class names, class counts and group counts).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in report.items() if k != "per_class"}
    summary["dataset"] = data.name
    atomic_write_text(out_dir / METRICS, json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    masks = group_masks(data.group_counts)
    # group_count: the count that decides the group (CIFAR-100-LT ratios 50 / 10: ratio 100's count)
    rows = ["class,name,train_count,group_count,group,accuracy"]
    for k, (name, count, gcount, acc) in enumerate(zip(data.class_names, data.class_counts, data.group_counts,
                                                       report["per_class"])):
        group = next(g for g, m in masks.items() if bool(m[k]))
        rows.append(f"{k},{json.dumps(name)},{count},{gcount},{group},{'' if math.isnan(acc) else f'{acc:.4f}'}")
    atomic_write_text(out_dir / PER_CLASS, "\n".join(rows) + "\n")
    plot_per_class(out_dir / PLOT, report["per_class"], data.class_counts,
                   f"{data.name}: overall {report['overall']:.1f}%, many {report['many']:.1f}, "
                   f"medium {report['medium']:.1f}, few {report['few']:.1f}", group_counts=data.group_counts)
