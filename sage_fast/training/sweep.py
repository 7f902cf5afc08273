"""`sage-fast sweep`: one training run per value of one or two config keys (the paper's Figs. 7 and 8).

    sage-fast sweep --preset imagenet_lt data.root=/data/ImageNet_LT train.output_dir=runs/alpha \\
        model.alpha=0.1,0.2,0.4,0.8,1.0
    sage-fast sweep --config run.yaml train.output_dir=runs/lambdas model.mu=0.25,0.5,1 model.gamma=0.03,0.05

An argument ``KEY=V1,V2,...`` with two or more values (a YAML flow list without its brackets, so
``model.lambdas=[0,0,1],[0.01,0.01,0.4]`` is two values) is a sweep axis; one with a single value is an
ordinary override for every run. One or two axes; with two, every pair of values is run.

Each run trains in its own folder under ``train.output_dir``, named after its values
(``model.alpha=0.4``, ``model.mu=0.5,model.gamma=0.03``). A run whose folder holds the metrics of a
finished run of the same config is not rerun; one interrupted with a checkpoint is resumed; one whose
stored config differs (the base config changed) is trained again from scratch. So an interrupted sweep
continues where it stopped when the same command is given again.

After every run, ``train.output_dir`` gets ``sweep.csv`` (one row per run: the axis values, overall / many /
medium / few top-1 and the run folder) and ``sweep.png``: the four accuracies against the value (one key),
or one panel per accuracy with one line per value of the second key (two keys). Numeric values are drawn
on a numeric axis (logarithmic when they span two decades or more), others as categories.
``--dry-run`` lists the runs and whether each is finished, without training.

For other commands that train several configs (an ablation table): `run_or_reuse(cfg, folder)` is the
run-folder logic, `finished_report` the test of a finished run.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from .checkpoint import RESUME_FREE_KEYS, config_differences
from .config import ConfigError, SageConfig, build_config, config_from_dict, parse_overrides
from .errors import CommandParser

METRICS = ("overall", "many", "medium", "few")

#: keys that change how a run is carried out but not its result: a stored run that differs from the
#: requested config only in these still counts as the same run
IGNORED_KEYS = RESUME_FREE_KEYS - {"eval.tte"}  # a finished run's metrics depend on how it was evaluated


# --------------------------------------------------------------------------------------------------
# Finished runs


def stored_config(folder) -> Optional[Dict[str, Any]]:
    """The config a run folder was trained with (its ``config.yaml``, brought to today's keys), or None."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {}).to_dict()
    except (ConfigError, yaml.YAMLError, TypeError, AttributeError):
        return None  # written by another version or damaged: not a run of this config


def same_run(cfg: SageConfig, folder) -> bool:
    """Whether `folder`'s ``config.yaml`` is `cfg`, up to `IGNORED_KEYS`."""
    stored = stored_config(folder)
    return stored is not None and not config_differences(stored, cfg.to_dict(), free=IGNORED_KEYS)


def finished_report(cfg: SageConfig, folder) -> Optional[dict]:
    """The ``metrics.json`` of a finished run of `cfg` in `folder`, else None.

    Finished: the metrics are at least as new as ``config.yaml`` (which a run writes when it starts, so
    metrics left by an earlier config do not count), were taken after the last epoch, and the config is
    `cfg` (`same_run`).
    """
    folder = Path(folder)
    metrics, config = folder / "metrics.json", folder / "config.yaml"
    if not (metrics.is_file() and config.is_file()) or metrics.stat().st_mtime < config.stat().st_mtime:
        return None
    try:
        report = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("epoch") != cfg.optim.epochs or not same_run(cfg, folder):
        return None
    return report


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_or_reuse(cfg: SageConfig, folder) -> Tuple[dict, str]:
    """Train `cfg` in `folder` (its ``train.output_dir`` is set to it), unless a finished run is there.

    -> (report, status): status "reused" (the finished run's metrics.json), "resumed" (an interrupted run
    of the same config continued from its checkpoint) or "trained". The config is not modified.
    """
    from .loop import train

    cfg = copy.deepcopy(cfg)
    cfg.train.output_dir = str(folder)
    report = finished_report(cfg, folder)
    if report is not None:
        return report, "reused"
    resume = None
    if (Path(folder) / "last.pt").is_file():
        if same_run(cfg, folder):
            resume = Path(folder) / "last.pt"
        elif _is_main():
            warnings.warn(f"{folder} holds a run of another config: training it again from scratch")
    # this folder belongs to the sweep (or ablation): a run of another config there is replaced
    report = train(cfg, resume=resume, overwrite=resume is None)
    return report, ("resumed" if resume else "trained")


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
        text = tok[2:] if tok.startswith("--") else tok
        key, sep, raw = text.partition("=")
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


def plan(config=None, overrides: Sequence[str] = (), axes: Sequence[Axis] = (), preset: Optional[str] = None
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


def _number(v) -> float:
    return float("nan") if v is None else float(v)


def write_csv(path, keys: Sequence[str], rows: Sequence[Tuple[Run, dict]]) -> None:
    """``sweep.csv``: the axis values, overall / many / medium / few (empty: no class in the group), run folder."""
    from ..utils.files import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(keys) + list(METRICS) + ["run"])
    for run, report in rows:
        vals = [_number(report.get(m)) for m in METRICS]
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
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..utils.files import atomic_path

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
        pts = sorted((x_of[value_text(r.assignment[keys[0]])], _number(rep.get(metric))) for r, rep in subset)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", **kw)

    if len(keys) == 1:
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
        for metric in METRICS:
            line(ax, rows, metric, label=metric)
        style(ax, "test top-1 accuracy (%)")
        ax.legend(fontsize=8)
        ax.set_title(title or f"accuracy against {keys[0]}", fontsize=10)
    else:
        fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), dpi=120)
        second = list(dict.fromkeys(value_text(r.assignment[keys[1]]) for r, _ in rows))
        for ax, metric in zip(axes.flat, METRICS):
            for v in second:
                line(ax, [(r, rep) for r, rep in rows if value_text(r.assignment[keys[1]]) == v], metric,
                     label=f"{keys[1]}={v}")
            style(ax, f"{metric} top-1 (%)")
            ax.set_title(metric, fontsize=10)
            if all(math.isnan(_number(rep.get(metric))) for _, rep in rows):
                ax.text(0.5, 0.5, "no class in this group", transform=ax.transAxes, ha="center", color="grey")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(title or f"accuracy against {keys[0]} and {keys[1]}", fontsize=11)
    fig.tight_layout()
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def run_sweep(runs: Sequence[Run], out_dir, keys: Sequence[str], log=print) -> List[Tuple[Run, dict, str]]:
    """Run or reuse every run in order; after each, rewrite ``sweep.csv`` and ``sweep.png`` in `out_dir`.

    -> [(run, report, status)] (status: see `run_or_reuse`).
    """
    out_dir = Path(out_dir)
    done: List[Tuple[Run, dict, str]] = []
    for i, run in enumerate(runs, 1):
        finished = finished_report(run.cfg, run.folder) is not None
        log(f"[{i}/{len(runs)}] {folder_name(run.assignment)}: "
            + ("finished earlier" if finished else f"training in {run.folder}"))
        report, status = run_or_reuse(run.cfg, run.folder)
        done.append((run, report, status))
        if _is_main():
            out_dir.mkdir(parents=True, exist_ok=True)
            rows = [(r, rep) for r, rep, _ in done]
            write_csv(out_dir / "sweep.csv", keys, rows)
            plot(out_dir / "sweep.png", keys, rows)
    return done


# --------------------------------------------------------------------------------------------------
# The command


def main(argv=None) -> int:
    from .cli import _split_overrides
    from .config import PRESETS
    from .predict import fail, overrides_help

    p = CommandParser(prog="sage-fast sweep", allow_abbrev=False,
                                description=__doc__.split("\n\nFor other commands")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=overrides_help(),
                                usage="%(prog)s [--config C] [--preset P] [--dry-run] [overrides] "
                                      "KEY=V1,V2,... [KEY2=W1,W2,...]")
    p.add_argument("--config", help="YAML run config (sections data, model, optim, train, eval)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a row of the paper's Table 8")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are finished; train nothing")
    args, rest = p.parse_known_args(argv)
    overrides, axes = split_axes(_split_overrides(rest))
    if not axes:
        p.error("give one or two keys to sweep, each with several values: KEY=V1,V2,... (e.g. model.alpha=0.1,0.5)")
    try:
        base, runs = plan(args.config, overrides, axes, args.preset)
    except (ConfigError, FileNotFoundError) as e:
        return fail(p.prog, e)
    keys = [a.key for a in axes]
    out_dir = Path(base.train.output_dir)
    if args.dry_run:
        for run in runs:
            state = "finished" if finished_report(run.cfg, run.folder) is not None else "to run"
            print(f"{run.folder}  {state}")
        return 0
    try:
        done = run_sweep(runs, out_dir, keys)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return fail(p.prog, e)
    if _is_main():
        print()
        head = keys + list(METRICS)
        table = [[value_text(r.assignment[k]) for k in keys] + [f"{_number(rep.get(m)):.2f}" for m in METRICS]
                 for r, rep, _ in done]
        widths = [max(len(h), *(len(row[c]) for row in table)) for c, h in enumerate(head)]
        for row in [head] + table:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        trained = sum(s != "reused" for _, _, s in done)
        print(f"{len(done)} runs ({trained} trained, {len(done) - trained} finished earlier); "
              f"{out_dir / 'sweep.csv'}, {out_dir / 'sweep.png'}")
    return 0
