"""`sage-fast ablate`: the component ladder of the paper's Tables 5 and 6 after zero-shot CLIP, one run per row.

    sage-fast ablate --preset imagenet_lt data.root=/data/ImageNet_LT train.output_dir=runs/ablation
    sage-fast ablate --config run.yaml train.output_dir=runs/ablation --rows baseline +FIT
    sage-fast ablate --preset places_lt data.root=/data/Places_LT train.output_dir=runs/ablation --dry-run

The first row is zero-shot CLIP, which trains nothing: the frozen encoder and the template classifier
(``sage-fast eval --zero-shot``). Each row after it adds one component to the row before it (docs/method.md,
"Ablation switches"); the rows set the four switches below on top of the given config (preset, YAML file,
overrides), everything else is the given config's:

    row        model.adapter  model.classifier_init  model.loss   model.fit
    zero-shot  -              templates              -            -          CLIP, no training
    baseline   adaptformer    single                 la           false      LIFT: AdaptFormer, one prompt, LA loss
    +SG        sg             single                 la           false      the SG-Adapter replaces AdaptFormer
    +Init      sg             templates              la           false      classifier from the 60 templates
    +CF        sg             templates              compensated  false      the compensation factor in the loss
    +FIT       sg             templates              compensated  true       FIT: the full Sage

Each row trains (zero-shot: is evaluated) in its own folder under ``train.output_dir`` (``0-zero-shot``,
``1-baseline``, ``2-sg``, ``3-init``, ``4-cf``, ``5-fit``). A row whose folder holds a finished run of the
same config is not rerun; one interrupted with a checkpoint is resumed; one of another config (the base
config changed) is trained again from scratch (see ``sage-fast sweep``). So the same command again
continues where it stopped.

After every row, ``train.output_dir`` gets ``ablation.md`` (a Markdown table) and ``ablation.csv``: per row
overall / many / medium / few test top-1 (%), the trainable parameters (adapters, block scales, classifier,
FIT's s1 and s2) and the adapters' own (adapters and block scales: the paper's Table 12 count), read from
the row's ``adapters.safetensors`` (zero-shot: 0; its switch cells are empty). The table holds the rows
run now and every other row already finished in the folder. ``--rows`` picks rows by name (``+``
optional, any case) or number (0 to 5); ``--dry-run`` lists the rows and whether each is finished, without
training.

The four switches come from the rows: giving one of them as an override is an error (a config file's
values of them are replaced). Other model keys
(``model.text_proj``, ``model.gamma``, ``model.lambdas``, ...) apply to every row that uses them.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..utils.files import atomic_write_text
from .checkpoint import ZERO_SHOT
from .config import ConfigError, SageConfig, build_config, parse_overrides
from .distributed import is_main_process
from .metrics import ACCURACIES, metric_value
from .reuse import finished_report, run_or_reuse
from .run_folder import EXPORT, hold_run_folder

#: the switches the rows set, in the table's column order
SWITCHES = ("adapter", "classifier_init", "loss", "fit")


@dataclass(frozen=True)
class Row:
    name: str          # as the paper's tables write it: "zero-shot", "baseline", "+SG", ...
    slug: str          # its folder, after its number: "zero-shot", "baseline", "sg", ...
    model: Dict[str, Any]  # the model.* values it sets (all four SWITCHES; zero-shot: the classifier only)
    what: str          # the component it adds, in words
    zero_shot: bool = False  # evaluated, not trained (`inference.evaluate_weights` without weights)


#: Tables 5 and 6 of the paper, after zero-shot CLIP: each row adds one component to the one before it; a row's
#: number (its folder's prefix, a name for --rows) is its index here
LADDER: Tuple[Row, ...] = (
    Row("zero-shot", "zero-shot", {"classifier_init": "templates"},
        "zero-shot CLIP: the frozen encoder and the template classifier, no training", zero_shot=True),
    Row("baseline", "baseline", {"adapter": "adaptformer", "classifier_init": "single", "loss": "la", "fit": False},
        "LIFT: AdaptFormer, classifier from one prompt, logit-adjusted loss, no FIT"),
    Row("+SG", "sg", {"adapter": "sg", "classifier_init": "single", "loss": "la", "fit": False},
        "the SG-Adapter instead of AdaptFormer"),
    Row("+Init", "init", {"adapter": "sg", "classifier_init": "templates", "loss": "la", "fit": False},
        "the classifier initialised from the 60 templates"),
    Row("+CF", "cf", {"adapter": "sg", "classifier_init": "templates", "loss": "compensated", "fit": False},
        "the compensation factor in the loss (Eq. 22)"),
    Row("+FIT", "fit", {"adapter": "sg", "classifier_init": "templates", "loss": "compensated", "fit": True},
        "FIT (Eq. 23, 24): the full Sage"),
)


def row_folder(index: int, row: Row) -> str:
    return f"{index}-{row.slug}"


def row_overrides(row: Row) -> List[str]:
    """The row as ``model.key=value`` overrides (for messages and the docs)."""
    return [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in row.model.items()]


def select_rows(names: Optional[Sequence[str]]) -> List[int]:
    """Ladder indices (in ladder order; the row numbers) of the rows named: "zero-shot", "baseline", "+SG" /
    "sg" / "SG", or "0".."5". None or empty: every row. ConfigError for a name that is no row."""
    if not names:
        return list(range(len(LADDER)))
    lookup = {}
    for i, row in enumerate(LADDER):
        for alias in (row.name, row.slug, row.name.lstrip("+"), str(i), row_folder(i, row)):
            lookup[alias.lower()] = i
    picked = set()
    for name in names:
        key = name.strip().lower()
        if key not in lookup:
            raise ConfigError(f"no ablation row {name!r}; rows: {', '.join(r.name for r in LADDER)} "
                              f"(or their numbers 0 to {len(LADDER) - 1})")
        picked.add(lookup[key])
    return sorted(picked)


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Planned:
    index: int   # the row's number: its place in the ladder (0: zero-shot)
    row: Row
    cfg: SageConfig
    folder: Path


def plan_ablation(config=None, overrides: Sequence[str] = (), preset: Optional[str] = None
         ) -> Tuple[SageConfig, List[Planned]]:
    """The base config and every row of the ladder (all six, in order), each with its config and folder.

    ConfigError for a bad key or value, or an override of one of the rows' switches.
    """
    layer = parse_overrides(list(overrides))
    fixed = sorted(f"model.{k}" for k in SWITCHES if k in (layer.get("model") or {}))
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} set by the ablation rows; "
                          "leave it out (pick rows with --rows)")
    base = build_config(config, layer, preset=preset)
    out_dir = Path(base.train.output_dir)
    planned = []
    for i, row in enumerate(LADDER):
        layer_i = copy.deepcopy(layer)
        model = layer_i.setdefault("model", {})
        if not isinstance(model, dict):
            raise ConfigError("the override 'model' must be a mapping of model keys")
        model.update(row.model)
        cfg = build_config(config, layer_i, preset=preset)
        folder = out_dir / row_folder(i, row)
        cfg.train.output_dir = str(folder)
        planned.append(Planned(i, row, cfg, folder))
    return base, planned


# --------------------------------------------------------------------------------------------------
# Results


def parameter_counts(folder) -> Optional[Dict[str, int]]:
    """{"trainable", "adapters"} from the run's ``adapters.safetensors`` (shapes only, no tensor is read), or
    None when there is none. "adapters": adapters and block scales (the paper's count, Table 12);
    "trainable": everything trained (also the classifier and FIT's s1, s2), `SageModel.num_trainable_parameters`."""
    path = Path(folder) / EXPORT
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        total = own = 0
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name == ZERO_SHOT:
                    continue  # W_zs, stored for evaluation: frozen, not trained
                n = math.prod(f.get_slice(name).get_shape())
                total += n
                if name.split(".")[0] in ("adapters", "block_scales"):
                    own += n
    except Exception:  # noqa: BLE001 - a damaged export: the count is left blank, the accuracies still stand
        return None
    return {"trainable": total, "adapters": own}


def _acc(v, missing: str = "") -> str:
    x = metric_value(v)
    return missing if math.isnan(x) else f"{x:.2f}"


def _count(counts: Optional[dict], key: str) -> str:
    return "" if counts is None else f"{counts[key]:,}"


def table_rows(done: Sequence[Tuple[Planned, dict]]) -> List[Dict[str, Any]]:
    """One dict per finished row: the switches (None for zero-shot), the four accuracies, the parameter counts
    (0 for zero-shot, which trains nothing), the folder."""
    out = []
    for p, report in done:
        counts = {"trainable": 0, "adapters": 0} if p.row.zero_shot else parameter_counts(p.folder)
        out.append({"row": p.row.name, **{k: None if p.row.zero_shot else getattr(p.cfg.model, k) for k in SWITCHES},
                    **{m: metric_value(report.get(m)) for m in ACCURACIES},
                    "trainable_parameters": None if counts is None else counts["trainable"],
                    "adapter_parameters": None if counts is None else counts["adapters"],
                    "run": p.folder.name})
    return out


def csv_text(rows: Sequence[Dict[str, Any]]) -> str:
    """``ablation.csv``: row, the four switches (empty for zero-shot), overall / many / medium / few (%, 4
    decimals; empty: no class in the group), trainable_parameters, adapter_parameters, run (the row's folder)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["row", *SWITCHES, *ACCURACIES, "trainable_parameters", "adapter_parameters", "run"]
    w.writerow(head)
    for r in rows:
        vals = []
        for k in head:
            v = r[k]
            if k in ACCURACIES:
                v = "" if math.isnan(v) else f"{v:.4f}"
            elif isinstance(v, bool):
                v = str(v).lower()
            elif v is None:
                v = ""
            vals.append(v)
        w.writerow(vals)
    return buf.getvalue()


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The table of ``ablation.md``: a check mark per component the row has (none for zero-shot), then the
    accuracies (n/a: no class in the group) and the parameter counts."""
    head = ["row", "SG-Adapter", "template init", "compensated loss", "FIT", "overall", "many", "medium", "few",
            "trainable params", "adapter params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * 5 + [" ---: "] * 6) + "|"]
    for r in rows:
        marks = [r["adapter"] == "sg", r["classifier_init"] == "templates", r["loss"] == "compensated", bool(r["fit"])]
        cells = [r["row"], *("✓" if m else "" for m in marks), *(_acc(r[m], "n/a") for m in ACCURACIES),
                 "" if r["trainable_parameters"] is None else f"{r['trainable_parameters']:,}",
                 "" if r["adapter_parameters"] is None else f"{r['adapter_parameters']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(base: SageConfig, rows: Sequence[Dict[str, Any]]) -> str:
    """``ablation.md``: a title, what was run, the table."""
    data = base.data.dataset + (f" ({base.data.root})" if base.data.root else "")
    weights = f" ({base.model.pretrained})" if base.model.pretrained else " (random weights)"
    epochs = f"{base.optim.epochs} epoch{'s' if base.optim.epochs != 1 else ''}"
    what = (f"model {base.model.name}{weights}, {epochs}, batch {base.optim.batch_size}, lr {base.optim.lr:g}"
            + (f", preset {base.preset}" if base.preset else ""))
    return (f"# Ablation: Tables 5 and 6\n\nData set {data}; {what}. Test top-1 accuracy (%; n/a: no class in "
            "the group); zero-shot is CLIP before any training, and each row after it adds one component to the "
            "row above it (`sage-fast ablate --help`).\n\n"
            + markdown_table(rows))


def write_results(out_dir, base: SageConfig, done: Sequence[Tuple[Planned, dict]]) -> List[Dict[str, Any]]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(sorted(done, key=lambda d: d[0].index))
    atomic_write_text(out_dir / "ablation.csv", csv_text(rows))
    atomic_write_text(out_dir / "ablation.md", markdown(base, rows))
    return rows


def row_report(p: Planned, identities: Optional[dict] = None) -> Optional[dict]:
    """The report of row `p` when its folder holds it finished (`reuse.finished_report`), else None.
    identities: the data listings read so far in this command (`reuse.DataIdentities`)."""
    return finished_report(p.cfg, p.folder, identities, epoch=0 if p.row.zero_shot else None)


def evaluate_or_reuse(p: Planned, identities: Optional[dict] = None) -> Tuple[dict, str]:
    """The zero-shot row: its finished report ("reused"), or zero-shot CLIP evaluated into its folder ("evaluated")."""
    from .inference import evaluate_weights

    report = row_report(p, identities)
    if report is not None:
        return report, "reused"
    # this folder belongs to the ablation (as a trained row's does, `reuse.run_or_reuse`): an evaluation of
    # another config or data there is replaced
    return evaluate_weights(p.cfg, None, out_dir=p.folder, overwrite=True), "evaluated"


def run_ablation(base: SageConfig, planned: Sequence[Planned], selected: Sequence[int], log=print
                 ) -> List[Tuple[Planned, dict, str]]:
    """Run or reuse the `selected` rows (indices into `planned`) in ladder order; after each, rewrite
    ``ablation.md`` and ``ablation.csv`` with them and every other row finished earlier.

    -> [(planned row, report, status)] for the selected rows (status: see `reuse.run_or_reuse`; "evaluated"
    for zero-shot). `log` gets the progress lines (on the main process only). The main process holds the output
    folder's lock throughout (a second ablation into it is refused, `RunFolderBusy`), and each row its own
    folder's.
    """
    if not is_main_process():  # under torchrun: one process reports
        def log(*args, **kwargs):
            pass
    out_dir = Path(base.train.output_dir)
    identities: dict = {}  # the data's listing, read once per data config
    done: List[Tuple[Planned, dict, str]] = []
    with hold_run_folder(out_dir, is_main_process()):
        others = {i: row_report(planned[i], identities) for i in range(len(planned)) if i not in selected}
        others = {i: r for i, r in others.items() if r is not None}
        for n, i in enumerate(selected, 1):
            p = planned[i]
            finished = row_report(p, identities) is not None
            doing = "evaluating" if p.row.zero_shot else "training"
            log(f"[{n}/{len(selected)}] {p.row.name} ({' '.join(row_overrides(p.row))}): "
                + ("finished earlier" if finished else f"{doing} in {p.folder}"))
            start = time.time()
            report, status = (evaluate_or_reuse(p, identities) if p.row.zero_shot
                              else run_or_reuse(p.cfg, p.folder, identities))
            done.append((p, report, status))
            if status != "reused":
                log(f"    {p.row.name}: overall {_acc(report.get('overall'))}  many {_acc(report.get('many'))}  "
                    f"medium {_acc(report.get('medium'))}  few {_acc(report.get('few'))}  "
                    f"({status}, {time.time() - start:.0f} s)")
            if is_main_process():
                results = [(planned[j], r) for j, r in others.items()] + [(d[0], d[1]) for d in done]
                write_results(out_dir, base, results)
    return done
