"""Sweeps (the paper's Figs. 7 and 8): one training run per value of one or two config keys.

`split_axes` picks the swept keys out of ``key=value`` arguments: a value with two or more entries (a YAML
flow list without its brackets, so ``model.lambdas=[0,0,1],[0.01,0.01,0.4]`` is two values) is an axis; one
with a single value is an ordinary override for every run. `plan_sweep` makes one `Run` per value, or per
pair of values with two axes, each in its own folder under ``train.output_dir`` named after its values
(``model.alpha=0.4``, ``model.mu=0.5,model.gamma=0.03``). `run_sweep` trains them in order, reusing finished
ones (`reuse`), and after every run rewrites ``sweep.csv`` (the axis values, overall / many / medium / few
top-1, the run folder) and ``sweep.png`` (the four accuracies against the value; with two keys one panel per
accuracy and one line per value of the second key; numeric values on a numeric axis, logarithmic when they
span two decades or more, others as categories).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from ..utils.files import atomic_write_text
from .config import ConfigError, SageConfig, build_config, parse_overrides
from .distributed import is_main_process
from .metrics import ACCURACIES, metric_value, new_figure, save_png
from .reuse import finished_report, run_or_reuse
from .run_folder import hold_run_folder

# --------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Axis:
    key: str
    values: List[Any]  # as parsed from the command line (YAML)


@dataclass
class Run:
    assignment: Dict[str, Any]  # axis key -> the value the config holds (after type checks)
    cfg: SageConfig
    folder: Path


def split_axes(tokens: Sequence[str]) -> Tuple[List[str], List[Axis]]:
    """``key=value`` tokens -> (overrides, axes): a token whose value is a list of two or more is an axis."""
    overrides, axes = [], []
    for tok in tokens:
        key, sep, raw = tok.partition("=")
        values = None
        if sep and "," in raw:
            try:
                values = yaml.safe_load(f"[{raw}]")
            except yaml.YAMLError:
                values = None  # not a list: build_config reports the value
        if isinstance(values, list) and len(values) >= 2:
            axes.append(Axis(key.strip(), values))
        else:
            overrides.append(tok)
    return overrides, axes


def _get(cfg: SageConfig, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def value_text(value: Any) -> str:
    """How a value is written in folder names, the CSV and the plot."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-\[\]]")


def folder_name(assignment: Mapping[str, Any]) -> str:
    """``key=value[,key2=value2]`` with characters outside a portable file name replaced by ``_``."""
    return _UNSAFE.sub("_", ",".join(f"{k}={value_text(v)}" for k, v in assignment.items()))


def plan_sweep(config=None, overrides: Sequence[str] = (), axes: Sequence[Axis] = (), preset: Optional[str] = None
         ) -> Tuple[SageConfig, List[Run]]:
    """The base config and one `Run` per value (pair), in the order given (the first key outermost).

    ConfigError for a bad key or value, more than two axes, a key given twice, or two values that make the
    same config.
    """
    if not 1 <= len(axes) <= 2:
        raise ConfigError(f"a sweep takes one or two keys with several values (KEY=V1,V2,...), got {len(axes)}")
    if len(axes) == 2 and axes[0].key == axes[1].key:
        raise ConfigError(f"{axes[0].key} is swept twice")
    layer = parse_overrides(list(overrides))
    base = build_config(config, layer, preset=preset)
    out_dir = Path(base.train.output_dir)
    combos: List[List[Any]] = [[v] for v in axes[0].values]
    if len(axes) == 2:
        combos = [[a, b] for a in axes[0].values for b in axes[1].values]
    runs, seen = [], {}
    for combo in combos:
        layer_i = copy.deepcopy(layer)
        for axis, value in zip(axes, combo):
            node = layer_i
            *parents, last = axis.key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"sweep key {axis.key!r} conflicts with an override of {part!r}")
            node[last] = value
        cfg = build_config(config, layer_i, preset=preset)
        assignment = {axis.key: _get(cfg, axis.key) for axis in axes}
        name = folder_name(assignment)
        if name in seen:
            raise ConfigError(f"the sweep values {seen[name]} and {combo} give the same run ({name})")
        seen[name] = combo
        cfg.train.output_dir = str(out_dir / name)
        runs.append(Run(assignment, cfg, out_dir / name))
    return base, runs


# --------------------------------------------------------------------------------------------------
# Results


def write_csv(path, keys: Sequence[str], rows: Sequence[Tuple[Run, dict]]) -> None:
    """``sweep.csv``: the axis values, overall / many / medium / few (empty: no class in the group), run folder."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(keys) + list(ACCURACIES) + ["run"])
    for run, report in rows:
        vals = [metric_value(report.get(m)) for m in ACCURACIES]
        w.writerow([value_text(run.assignment[k]) for k in keys] + ["" if math.isnan(v) else f"{v:.4f}" for v in vals]
                   + [run.folder.name])
    atomic_write_text(path, buf.getvalue())


def _positions(values: Sequence[Any]):
    """x positions, tick labels (None: numeric axis) and whether the axis is logarithmic."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        xs = [float(v) for v in values]
        log = min(xs) > 0 and max(xs) / min(xs) >= 100
        return xs, None, log
    return list(range(len(values))), [value_text(v) for v in values], False


def plot(path, keys: Sequence[str], rows: Sequence[Tuple[Run, dict]], title: str = "") -> None:
    """``sweep.png``: one key: the four accuracies against its value; two keys: one panel per accuracy,
    one line per value of the second key."""
    first = list(dict.fromkeys(value_text(r.assignment[keys[0]]) for r, _ in rows))
    raw_first = {value_text(r.assignment[keys[0]]): r.assignment[keys[0]] for r, _ in rows}
    xs, labels, log = _positions([raw_first[t] for t in first])
    x_of = dict(zip(first, xs))

    def style(ax, ylabel):
        if labels is not None:
            ax.set_xlim(-0.5, len(xs) - 0.5)
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, rotation=30 if max(map(len, labels)) > 6 else 0, fontsize=8)
        elif log:
            ax.set_xscale("log")
        ax.set_xlabel(keys[0])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    def line(ax, subset, metric, **kw):
        pts = sorted((x_of[value_text(r.assignment[keys[0]])], metric_value(rep.get(metric))) for r, rep in subset)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", **kw)

    if len(keys) == 1:
        fig = new_figure(figsize=(6.5, 4.2), dpi=120)
        ax = fig.subplots()
        for metric in ACCURACIES:
            line(ax, rows, metric, label=metric)
        style(ax, "test top-1 accuracy (%)")
        ax.legend(fontsize=8)
        ax.set_title(title or f"accuracy against {keys[0]}", fontsize=10)
    else:
        fig = new_figure(figsize=(10, 7.5), dpi=120)
        axes = fig.subplots(2, 2)
        second = list(dict.fromkeys(value_text(r.assignment[keys[1]]) for r, _ in rows))
        for ax, metric in zip(axes.flat, ACCURACIES):
            for v in second:
                line(ax, [(r, rep) for r, rep in rows if value_text(r.assignment[keys[1]]) == v], metric,
                     label=f"{keys[1]}={v}")
            style(ax, f"{metric} top-1 (%)")
            ax.set_title(metric, fontsize=10)
            if all(math.isnan(metric_value(rep.get(metric))) for _, rep in rows):
                ax.text(0.5, 0.5, "no class in this group", transform=ax.transAxes, ha="center", color="grey")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(title or f"accuracy against {keys[0]} and {keys[1]}", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)


def run_sweep(runs: Sequence[Run], out_dir, keys: Sequence[str], log=print) -> List[Tuple[Run, dict, str]]:
    """Run or reuse every run in order; after each, rewrite ``sweep.csv`` and ``sweep.png`` in `out_dir`.
    The main process holds `out_dir`'s lock throughout (a second sweep into it is refused, `RunFolderBusy`),
    and each run its own folder's.

    -> [(run, report, status)] (status: see `run_or_reuse`).
    """
    out_dir = Path(out_dir)
    done: List[Tuple[Run, dict, str]] = []
    identities: dict = {}  # the data's listing, read once per data config
    with hold_run_folder(out_dir, is_main_process()):
        for i, run in enumerate(runs, 1):
            finished = finished_report(run.cfg, run.folder, identities) is not None
            log(f"[{i}/{len(runs)}] {folder_name(run.assignment)}: "
                + ("finished earlier" if finished else f"training in {run.folder}"))
            report, status = run_or_reuse(run.cfg, run.folder, identities)
            done.append((run, report, status))
            if is_main_process():
                rows = [(r, rep) for r, rep, _ in done]
                write_csv(out_dir / "sweep.csv", keys, rows)
                plot(out_dir / "sweep.png", keys, rows)
    return done
