"""Markdown summary and PNG chart of a benchmark results folder.

    python -m benchmarks.report RESULTS_DIR            # rewrite RESULTS_DIR/summary.md and chart.png
    python -m benchmarks.report RESULTS_DIR --print    # and print the summary

Reads RESULTS_DIR/records.jsonl (one record per measured case, written by the benchmarks, read through
`benchmarks.records.load_records`), env.json, ceilings.json, skipped.json and tune.json. pytest-benchmark
JSON files (``--benchmark-json``) carry the same records in each benchmark's ``extra_info``; pass them
with ``--from-json FILE`` to rebuild records.jsonl from them.

Ratios are computed here from the records (time of the baseline / time of the case, same run),
so a summary never mixes numbers from different sessions unless they share a results folder.
Every record of a compared case carries its error against the eager reference (rel_err_*); a
case over its limit is listed under "Error against the eager reference" and its speedups do
not count towards the targets.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional

from sage_fast.utils.files import atomic_path, atomic_write_text

from .records import load_records, read_json, records_from_benchmark_json, slot, write_records

TARGETS = {
    "adapter_vs_eager": 4.0,
    "adapter_vs_compile": 1.5,
    "adapter_copy_fraction": 0.70,
    "loss_vs_eager": 3.0,
    "train_fused_vs_reference": 1.5,
    "train_vs_floor": 0.85,
}


# ----------------------------------------------------------------------------------------------
# looking up records


def _find(records: list[dict], group: str, case: str, impl: str) -> Optional[dict]:
    return next((r for r in records if slot(r) == (group, case, impl)), None)


def _ratio(records, group, case, impl, base_impl, base_case=None) -> Optional[float]:
    rec, base = _find(records, group, case, impl), _find(records, group, base_case or case, base_impl)
    if rec and base and rec.get("time_s") and base.get("time_s"):
        return base["time_s"] / rec["time_s"]
    return None


# ----------------------------------------------------------------------------------------------
# formatting


def _f(value, fmt="{:.2f}", missing="–") -> str:
    return missing if value is None else fmt.format(value)


def _ms(rec: Optional[dict]) -> str:
    return _f(rec and rec.get("time_s") and rec["time_s"] * 1e3, "{:.3f}")


def _x(value) -> str:
    return _f(value, "{:.2f}x")


def _pct(value) -> str:
    if value is not None and 0 < value < 0.01:
        return "<1%"
    return _f(None if value is None else 100 * value, "{:.0f}%")


def _err(rec: Optional[dict]) -> str:
    """"error / limit" of a record's deciding tensor, with FAIL when it is over."""
    if not rec or rec.get("rel_err_vs_eager") is None:
        return "–"
    text = f"{rec['rel_err_vs_eager']:.1e} / {rec.get('rel_err_limit', float('nan')):.0e}"
    return text if rec.get("rel_err_ok", True) else f"**FAIL** {text}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["_no measurements_", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _cases(records, group) -> list[str]:
    seen = []
    for rec in records:
        if rec.get("group") == group and rec.get("case") not in seen:
            seen.append(rec["case"])
    return seen


def _primary_fused(records, group) -> Optional[str]:
    impls = {r.get("impl") for r in records if r.get("group") == group}
    return "fused" if "fused" in impls else ("fused_torch" if "fused_torch" in impls else None)


# ----------------------------------------------------------------------------------------------
# sections


def _env_lines(env: dict, ceilings: Optional[dict], records: list[dict]) -> list[str]:
    mode = env.get("mode", "?")
    lines = ["# sage-fast benchmark summary", ""]
    if mode != "gpu":
        threads = sorted({r.get("torch_threads") for r in records if r.get("torch_threads")})
        lines += [
            "> **CPU smoke run.** Small shapes, PyTorch paths only: these numbers test the harness and say",
            "> nothing about GPU performance. GPU results: not measured in this run."
            + (f" (torch threads: {', '.join(map(str, threads))})" if threads else ""),
            "",
        ]
    keys = ["device", "gpu_capability", "gpu_sms", "gpu_memory_GiB", "driver", "cuda_driver", "torch_cuda", "cudnn",
            "torch", "triton", "open_clip", "xformers", "xformers_status", "sdpa_kernel", "date_utc", "git_commit",
            "git_dirty", "command"]
    lines += [f"- **{k}**: `{env.get(k)}`" for k in keys if k in env]
    for b in env.get("auto_backends", []):
        lines.append(f"- **auto, {b['op']} {b['dtype']}**: {b['resolved']} ({b['reason']})")
    for c in env.get("self_check", []):
        tail = f": {c['reason']}" if c.get("reason") else ""
        lines.append(f"- **kernel self-check, {c['family']} {c['dtype']}**: {c['status']} in {c['seconds']:.2f} s{tail}")
    methods = sorted({r["timing_method"] for r in records if r.get("timing_method")})
    if methods:
        lines.append("- **timing**: " + "; ".join(f"`{m}`" for m in methods))
    for cmd in env.get("sessions", []):
        lines.append(f"- **session**: `{cmd}`")
    lines.append("")
    if ceilings:
        mm = ceilings.get("matmul_TFLOPs", {})
        n = ceilings.get("matmul_n", {})
        lines += [
            "## Ceilings of this device",
            "",
            "Measured once per results folder (later `--sage-append` sessions on the same device, as in "
            "run_gpu.sh, reuse them)"
            + (f", at {ceilings['measured_at']}" if ceilings.get("measured_at") else "") + ".",
            "",
            f"- device-to-device copy ({ceilings.get('copy_MiB', 0):.0f} MiB): **{ceilings.get('copy_GBps', 0):.1f} GB/s** "
            "(read + write bytes / time)",
        ]
        for dt in ("bf16", "fp32"):
            if dt in mm:
                note = " (no TF32)" if dt == "fp32" else ""
                lines.append(f"- {dt} matmul {n.get(dt)}^3{note}: **{mm[dt]:.2f} TFLOP/s**")
        lines.append("")
    return lines


def _kernel_rows(records, group, fields: list[str], impls: list[str]) -> tuple[list[str], list[list[str]]]:
    primary = _primary_fused(records, group)
    header = fields + [f"{i} ms" for i in impls]
    if primary:
        header += [f"{primary} vs eager", f"{primary} vs compile", "GB/s", "% copy BW", "TFLOP/s", "% matmul",
                   "M rows/s" if group == "loss" else "M tokens/s", f"{primary} err / limit"]
    rows = []
    for case in _cases(records, group):
        recs = {i: _find(records, group, case, i) for i in impls}
        some = next((r for r in recs.values() if r), None)
        params = some.get("params", {}) if some else {}
        row = [str(params.get(f, "")) for f in fields]
        row += [_ms(recs[i]) for i in impls]
        if primary:
            p = recs.get(primary) or {}
            row += [
                _x(_ratio(records, group, case, primary, "eager")),
                _x(_ratio(records, group, case, primary, "compile")),
                _f(p.get("GBps"), "{:.3g}"),
                _pct(p.get("frac_copy_bw")),
                _f(p.get("TFLOPs"), "{:.3g}"),
                _pct(p.get("frac_matmul_peak")),
                _f(p.get("tokens_per_s") and p["tokens_per_s"] / 1e6, "{:.3g}"),
                _err(p),
            ]
        rows.append(row)
    return header, rows


E2E_ORDER = [("floor", "floor")] + [(c, i) for c in ("fit_on", "fit_off")
                                    for i in ("floor_bwd", "reference", "fused", "fused_compile")]


def _floor_ratio(records, group, case, impl) -> Optional[float]:
    """images/s as a fraction of the floor: training, the frozen-backbone floor with the same FIT setting
    (floor_bwd); inference, the no-grad floor."""
    if group == "train":
        return _ratio(records, group, case, impl, "floor_bwd") if impl not in ("floor", "floor_bwd") else None
    return _ratio(records, group, case, impl, "floor", base_case="floor") if case != "floor" else None


def _e2e_rows(records, group) -> list[list[str]]:
    rows = []
    for case, impl in E2E_ORDER:
        rec = _find(records, group, case, impl)
        if rec is None:
            continue
        vs_ref = _ratio(records, group, case, impl, "reference") if impl.startswith("fused") else None
        rows.append([
            impl, {"fit_on": "on", "fit_off": "off"}.get(case, "–"),
            _f(rec.get("images_per_s"), "{:.1f}"), _ms(rec), *_memory(rec),
            _x(vs_ref), _pct(_floor_ratio(records, group, case, impl)), _err(rec), _attention(rec),
        ])
    return rows


def _memory(rec: dict) -> list[str]:
    """Peak memory of a case (MiB, torch.cuda.max_memory_allocated after a reset, without the L2-flush
    buffer), and the part of it above what was allocated at the reset (model, inputs): "–" off CUDA."""
    return [_f(rec.get("peak_mem_MiB"), "{:.0f}"), _f(rec.get("peak_mem_added_MiB"), "{:.0f}")]


def _attention(rec: dict) -> str:
    """"sdpa" with the SDPA kernel that ran where it was probed (sdpa-flash, ...), else the backend."""
    kernel, backend = rec.get("attention_kernel"), str(rec.get("attention", ""))
    return kernel if kernel and backend == "sdpa" else backend


def _headlines(records, gpu: bool = True) -> list[tuple[str, str, str]]:
    """(target, measured, status) for each target of the issue; never asserted.

    Where a target covers several cases (all r, both dtypes) the worst case decides and the text
    shows min / median / max. gpu=False (a CPU smoke run): values are shown, not judged.
    """
    out = []
    records = [r for r in records if r.get("rel_err_ok") is not False]  # a wrong result's speed does not count

    def status(value, target):
        if value is None:
            return "not measured"
        if not gpu:
            return "n/a (CPU smoke, not a GPU measurement)"
        return "met" if value >= target else "not met"

    def span(values, fmt):
        values = [v for v in values if v is not None]
        if not values:
            return None, "not measured"
        lo, mid, hi = min(values), statistics.median(values), max(values)
        if len(values) == 1:
            return lo, fmt(lo)
        return lo, f"min {fmt(lo)}, median {fmt(mid)}, max {fmt(hi)} ({len(values)} cases)"

    adapter_bwd = [c for c in _cases(records, "adapter") if c.endswith("fwdbwd")]
    for base, key in (("eager", "adapter_vs_eager"), ("compile", "adapter_vs_compile")):
        low, text = span([_ratio(records, "adapter", c, "fused", base) for c in adapter_bwd], _x)
        label = "torch.compile" if base == "compile" else base
        out.append((f"SG-Adapter fused fwd+bwd >= {TARGETS[key]}x {label} (all r, bf16 and fp32)", text,
                    status(low, TARGETS[key])))
    fracs = [rec.get("frac_copy_bw") for c in _cases(records, "adapter")
             if (rec := _find(records, "adapter", c, "fused")) and rec.get("params", {}).get("r", 10**9) <= 32]
    low, text = span(fracs, _pct)
    out.append((f"SG-Adapter fused >= {TARGETS['adapter_copy_fraction']:.0%} of copy bandwidth (r <= 32, fwd and fwd+bwd)",
                text, status(low, TARGETS["adapter_copy_fraction"])))
    loss_cases = [c for c in _cases(records, "loss") if "C=8142" in c and c.endswith("fwdbwd")]
    low, text = span([_ratio(records, "loss", c, "fused", "eager") for c in loss_cases], _x)
    out.append((f"Loss fused fwd+bwd >= {TARGETS['loss_vs_eager']}x eager at C = 8142 (fit and la, bf16 and fp32)",
                text, status(low, TARGETS["loss_vs_eager"])))
    r = _ratio(records, "train", "fit_on", "fused", "reference")
    out.append((f"Train step (FIT on): Sage fused >= {TARGETS['train_fused_vs_reference']}x Sage reference images/s",
                _x(r) if r is not None else "not measured", status(r, TARGETS["train_fused_vs_reference"])))
    r = _ratio(records, "train", "fit_on", "fused", "floor_bwd")
    out.append(("Train step (FIT on): Sage fused within 15% of the frozen-backbone floor (>= 85% of its images/s)",
                _pct(r) + " of floor" if r is not None else "not measured", status(r, TARGETS["train_vs_floor"])))
    return out


def build_markdown(results_dir: Path) -> str:
    results_dir = Path(results_dir)
    records = load_records(results_dir)
    env = read_json(results_dir / "env.json", {})
    ceilings = read_json(results_dir / "ceilings.json", None)
    skips = read_json(results_dir / "skipped.json", {})
    lines = _env_lines(env, ceilings, records)

    lines += ["## Targets (reported, not asserted)", ""]
    lines += _table(["target", "measured", "status"],
                    [list(h) for h in _headlines(records, gpu=env.get("mode") == "gpu")])

    lines += ["## SG-Adapter block: x + mlp_out + s * adapter(x, g)", "",
              "Time is the median per call; GB/s and TFLOP/s use the work model of benchmarks/README.md.", ""]
    header, rows = _kernel_rows(records, "adapter", ["r", "dtype", "mode"], ["eager", "compile", "fused_torch", "fused"])
    lines += _table(header, rows)

    lines += ["## Loss: compensated LA (la) and FIT four-term (fit), module API", ""]
    header, rows = _kernel_rows(records, "loss", ["kind", "classes", "dtype", "mode"], ["eager", "compile", "fused"])
    lines += _table(header, rows)

    for group, title in (("train", "Training step"), ("infer", "Inference")):
        some = next((r for r in records if r.get("group") == group), None)
        lines += [f"## {title}", ""]
        if some:
            p = some.get("params", {})
            floors = ("floor = frozen backbone (no grad) + cosine head; floor_bwd = forward and backward through "
                      "the frozen blocks without adapters (+ FIT's second, no-grad forward with FIT on): the "
                      "frozen-backbone floor \"of floor\" compares with, same FIT setting; fused_compile = the fused "
                      "model's forward under torch.compile (loss eager)." if group == "train" else
                      "floor = frozen backbone + cosine head (\"of floor\" compares with it).")
            lines += [f"{p.get('model')} at {p.get('image_size')} px, batch {p.get('batch')}, {p.get('classes')} classes "
                      f"(r = {p.get('bottleneck')}), {p.get('precision')}, synthetic data on the device, "
                      f"attention: **{_attention(some)}**. {floors}", ""]
        fused = next((r for r in records if r.get("group") == group and r.get("impl") == "fused"), None)
        if fused and fused.get("adapter_backend"):
            lines += [f"fused = SG-Adapter backend `{fused['adapter_backend']}`, loss backend "
                      f"`{fused.get('loss_backend')}`.", ""]
        unit = "ms/step" if group == "train" else "ms/batch"
        lines += _table(["config", "FIT", "images/s", unit, "peak MiB", "added MiB", "fused vs reference",
                         "of floor", "err / limit", "attention"], _e2e_rows(records, group))

    lines += _encoder_lines(records)

    lines += _input_lines(records)
    lines += _decode_lines(records)
    lines += _tune_lines(results_dir)
    lines += _error_lines(records)

    if skips:
        lines += ["## Skipped cases", ""]
        counts: dict[str, int] = {}
        for reason in skips.values():
            counts[reason] = counts.get(reason, 0) + 1
        lines += [f"- {n} x {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])]
        lines.append("")
    return "\n".join(lines)


ENCODER_ORDER = ("open_clip", "sdpa", "xformers")


def _encoder_lines(records: list[dict]) -> list[str]:
    """bench_encoder.py: the frozen image encoder forward + backward with each attention kernel."""
    recs = {r.get("impl"): r for r in records if r.get("group") == "encoder"}
    if not recs:
        return []
    p = next(iter(recs.values())).get("params", {})
    lines = ["## Frozen image encoder, forward + backward, by attention kernel", "",
             f"{p.get('model')} at {p.get('image_size')} px, batch {p.get('batch')}, {p.get('precision')}: "
             "visual_features without adapters, then the gradient of the images (backward through every frozen "
             "block, as Sage's adapters need). err / limit: features and image gradient against open_clip's "
             "attention in fp32. peak MiB: torch.cuda.max_memory_allocated, reset before each kernel; added: "
             "above what was allocated before it (weights, inputs).", ""]
    rows = []
    for impl in ENCODER_ORDER:
        rec = recs.get(impl)
        if rec is None:
            rows.append([impl, "–", "–", "–", "–", "–", "–", "not run (see Skipped cases)"])
            continue
        rows.append([impl, _attention(rec), _f(rec.get("images_per_s"), "{:.1f}"), _ms(rec), *_memory(rec),
                     "–" if impl == "open_clip" else _x(_ratio(records, "encoder", "fwdbwd", impl, "open_clip")),
                     _err(rec)])
    return lines + _table(["attention", "kernel", "images/s", "ms/step", "peak MiB", "added MiB", "vs open_clip",
                           "err / limit"], rows)


def _input_lines(records: list[dict]) -> list[str]:
    """The input pipeline's images/s beside the fused training step's (FIT on): does loading keep up?"""
    recs = [r for r in records if r.get("group") == "input"]
    if not recs:
        return []
    step = _find(records, "train", "fit_on", "fused")
    need = step.get("images_per_s") if step else None
    p = recs[0].get("params", {})
    lines = ["## Input pipeline", "",
             f"Generated {p.get('width')} x {p.get('height')} JPEGs ({p.get('files')} files of about "
             f"{p.get('mean_file_KB')} KB, each listed {p.get('repeat')} times, page-cached), sage-fast's loader, batch "
             f"{p.get('batch')}, {p.get('image_size')} px crop_flip; {p.get('warmup_batches')} batches of warm-up, "
             f"{p.get('timed_batches')} timed. cpu = the workers decode (PIL); gpu_decode = the workers read bytes, "
             "nvJPEG decodes and the GPU augments. \"keeps up\" compares with the fused training step, FIT on"
             + (f" ({need:.1f} images/s)." if need else " (not measured in this run)."), ""]
    rows = []
    for rec in sorted(recs, key=lambda r: str(r.get("case"))):
        ips = rec.get("images_per_s")
        rows.append([str(rec.get("case")), str(rec.get("params", {}).get("workers")), str(rec.get("cpu_count")),
                     _f(ips, "{:.0f}"), _pct(ips / need if ips and need else None),
                     "–" if not (ips and need) else ("yes" if ips >= need else "no")])
    return lines + _table(["mode", "workers", "CPU cores", "images/s", "of train step", "keeps up"], rows)


def _decode_lines(records: list[dict]) -> list[str]:
    """bench_input_decode.py: images/s per worker from a raw folder, with reduced-scale decoding, and from
    prepared shards; and the many-worker loader over the shards."""
    recs = [r for r in records if r.get("group") == "input_decode"]
    if not recs:
        return []
    lines = ["## Input decoding per worker", "",
             "One process reading, decoding and augmenting (RandomResizedCrop 224 + flip) generated JPEGs: raw = "
             "full decode, raw_fast = data.fast_decode, prepared = sage-fast prepare's shards (short side 320). "
             "The prepared target: >= 2x raw on large originals (reported, not asserted).", ""]
    rows = []
    for rec in sorted(recs, key=lambda r: (str(r.get("case")), str(r.get("impl")))):
        ips = rec.get("images_per_s_per_worker", rec.get("images_per_s"))
        keeps = rec.get("keeps_ahead")
        rows.append([str(rec.get("case")), str(rec.get("impl")), _f(ips, "{:.0f}"),
                     _f(rec.get("speedup_vs_raw"), "{:.2f}x"), "–" if keeps is None else ("yes" if keeps else "no")])
    return lines + _table(["images", "impl", "images/s", "vs raw", "keeps ahead of 1,500/s"], rows)


def _tune_lines(results_dir: Path) -> list[str]:
    """The tuning stage's decisions (tune.json), one row per problem."""
    data = read_json(Path(results_dir) / "tune.json", None)
    if not data:
        return []
    lines = ["## Launch-configuration tuning", ""]
    if not data.get("problems"):
        return lines + [f"_{data.get('note', 'nothing tuned')}_", ""]
    pre = data.get("precompile") or {}
    lines += [f"Device {data.get('device')} ({data.get('sms')} SMs), budget {data.get('budget_s')} s, "
              f"{data.get('elapsed_s')} s used; {data.get('timing')}. A candidate wins only when it beats the "
              f"heuristic by more than max(noise, {data.get('min_margin', 0):.0%})."
              + (f" Precompile: {pre.get('done')} of {pre.get('submitted')} compiled ahead by {pre.get('workers')} "
                 f"workers ({pre.get('failed')} failed)." if pre else ""), ""]
    rows = []
    for prob in data["problems"]:
        dec = prob.get("decision") or {}
        cands = prob.get("candidates", [])
        timed = sum(c.get("status") == "timed" for c in cands)
        rejected = sum("rejected" in str(c.get("status")) or "failed" in str(c.get("status")) for c in cands)
        base = prob.get("base_times_s") or []
        base_us = statistics.median(base) * 1e6 if base else None
        best = dec.get("best")
        speedup = dec.get("speedup")
        rows.append([prob["problem"], str(prob.get("status")), _f(base_us, "{:.1f}"),
                     _cfg(best), _f(base_us / (1 + speedup) if base_us and speedup is not None else None, "{:.1f}"),
                     _f(None if speedup is None else 100 * speedup, "{:+.1f}%"),
                     _f(None if dec.get("noise") is None else 100 * dec["noise"], "{:.1f}%"),
                     f"{timed} / {rejected}", "**yes**" if dec.get("winner") else "no"])
    lines += _table(["problem", "status", "heuristic µs", "best candidate", "best µs", "vs heuristic", "noise",
                     "timed / rejected", "table entry"], rows)
    return lines


def _cfg(cfg: Optional[dict]) -> str:
    if not cfg:
        return "–"
    short = {"block_m": "m", "block_d": "d", "block_h": "h", "block_b": "b", "block_c": "c", "split": "split",
             "num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in cfg.items() if v is not None)


def _error_lines(records: list[dict]) -> list[str]:
    """The error check over all records: how many were compared, and every case over its limit."""
    checked = [r for r in records if r.get("rel_err_ok") is not None]
    failed = [r for r in checked if r.get("rel_err_ok") is False]
    lines = ["## Error against the eager reference", "",
             "Each case's output and gradients against the eager reference in fp32 on the same rounded inputs "
             "(benchmarks/README.md); err / limit is the tensor closest to its limit. A case over its limit "
             "fails its benchmark and does not count towards the targets.", ""]
    if not checked:
        return lines + ["_no compared cases_", ""]
    if not failed:
        return lines + [f"All {len(checked)} compared cases are within their limits.", ""]
    lines += [f"**{len(failed)} of {len(checked)} compared cases are over their limit:**", ""]
    lines += _table(["group", "case", "impl", "tensor", "error", "limit"],
                    [[str(r.get("group")), str(r.get("case")), str(r.get("impl")), str(r.get("rel_err_tensor")),
                      _f(r.get("rel_err_vs_eager"), "{:.2e}"), _f(r.get("rel_err_limit"), "{:.0e}")] for r in failed])
    return lines


def headline_text(results_dir: Path) -> str:
    records = load_records(Path(results_dir))
    env = read_json(Path(results_dir) / "env.json", {})
    rows = _headlines(records, gpu=env.get("mode") == "gpu")
    lines = [f"  {target}: {measured} [{status}]" for target, measured, status in rows]
    checked = [r for r in records if r.get("rel_err_ok") is not None]
    failed = [f"{r.get('group')} {r.get('case')} {r.get('impl')}" for r in checked if r.get("rel_err_ok") is False]
    lines.append(f"  error against eager: {len(checked) - len(failed)} of {len(checked)} compared cases within their limits"
                 + (f"; over: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# chart


def build_chart(results_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_records(Path(results_dir))
    env = read_json(Path(results_dir) / "env.json", {})
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for ax, group in zip(axes[:2], ("adapter", "loss")):
        primary = _primary_fused(records, group)
        cases = [c for c in _cases(records, group) if c.endswith("fwdbwd")]
        labels, vs_eager, vs_compile = [], [], []
        for c in cases:
            e = _ratio(records, group, c, primary, "eager") if primary else None
            if e is None:
                continue
            labels.append(c.replace(" fwdbwd", ""))
            vs_eager.append(e)
            vs_compile.append(_ratio(records, group, c, primary, "compile") or 0.0)
        title = {"adapter": "SG-Adapter block fwd+bwd", "loss": "Loss fwd+bwd"}[group]
        if labels:
            xs = range(len(labels))
            ax.bar([x - 0.2 for x in xs], vs_eager, width=0.4, label=f"{primary} vs eager")
            ax.bar([x + 0.2 for x in xs], vs_compile, width=0.4, label=f"{primary} vs torch.compile")
            ax.axhline(1.0, color="black", linewidth=0.8)
            target = TARGETS["adapter_vs_eager" if group == "adapter" else "loss_vs_eager"]
            ax.axhline(target, color="red", linestyle="--", linewidth=0.8, label=f"target {target}x eager")
            ax.set_xticks(list(xs))
            ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel("speedup (x)")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
    ax = axes[2]
    rows = [(f"{impl}\n{case}", rec["images_per_s"]) for case, impl in E2E_ORDER
            if (rec := _find(records, "train", case, impl)) and rec.get("images_per_s")]
    if rows:
        ax.bar(range(len(rows)), [v for _, v in rows], color="tab:green")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([k for k, _ in rows], fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("images / s")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Training step")
    smoke = "" if env.get("mode") == "gpu" else "CPU SMOKE RUN (not representative) - "
    fig.suptitle(f"{smoke}sage-fast on {env.get('device', '?')}  (torch {env.get('torch')}, commit "
                 f"{str(env.get('git_commit', '?'))[:10]})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_outputs(results_dir: Path) -> None:
    """summary.md, and chart.png when matplotlib is installed."""
    results_dir = Path(results_dir)
    atomic_write_text(results_dir / "summary.md", build_markdown(results_dir))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("benchmarks.report: matplotlib is not installed, no chart.png", file=sys.stderr)
        return
    build_chart(results_dir, results_dir / "chart.png")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--from-json", type=Path, nargs="*", default=[],
                        help="pytest-benchmark --benchmark-json files to rebuild records.jsonl from")
    parser.add_argument("--print", action="store_true", help="print the summary")
    args = parser.parse_args(argv)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        records = {slot(r): r for r in load_records(args.results_dir)}
        records.update({slot(r): r for r in records_from_benchmark_json(args.from_json)})
        write_records(args.results_dir, records.values())
    write_outputs(args.results_dir)
    if args.print:
        print((args.results_dir / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
