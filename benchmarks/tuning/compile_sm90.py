"""Ahead-of-time compilation of the Triton kernels for an H100 (sm_90) on a CPU-only machine: a child process.

    python -m benchmarks.tuning.compile_sm90 OUT.json                 # the glue's own launches
    python -m benchmarks.tuning.compile_sm90 OUT.json --grid GRID.json  # the candidates of a tuning grid

Triton's interpreter (what the CPU tests run) accepts code that real GPU compilation rejects (tl.dot
tiles smaller than 16, some bf16 dots, ...). This compiles the real kernels with `triton.compile` for
`GPUTarget("cuda", 90, 32)`, down to a cubin through the ptxas bundled with the triton wheel (no GPU, no
CUDA driver needed), and reads ptxas' resource report (`-v`) for registers and spills, and the compiled
kernel's shared memory. `tests/ops/test_kernels_compile.py` runs it on the glue's launches and asserts on
the report; `benchmarks.tuning.prefilter` runs it on the tuning grid and keeps what passes.

What gets compiled is exactly what the GPU launch path would launch: the glue's launch functions
(`sage_fast.ops.sg_adapter.sg_adapter_fwd` / `sg_adapter_bwd`, `sage_fast.ops.la_loss._fit_la_loss_forward`)
are called on small CPU tensors with the real (not interpreted) kernel module and the kernels swapped for
recorders; the launch configurations come from `sage_fast.ops.launch`, whose `device_info` answers as an
H100 (its name, 132 SMs). Each recorded launch is specialised the way Triton's JIT specialises a launch
(argument types, 16-divisibility of pointers and integers, integers equal to 1 as constants) and compiled
once per distinct specialisation.

The glue's cases (`_record_launches`): adapter d in {768, 1024} with r in {1, 4, 32, 256} (2r padded by
the glue), forward and backward, block epilogue with inputs bf16 / fp16 / fp32 plus a mixed case (fp32
residual stream, bf16 mlp_out and GEMM operands: a user's fp32 model under bf16 autocast; the Sage model
itself runs all-bf16 there, as open_clip's LayerNorm casts back to bf16), drop-in form in bf16; every
entry of the tuned tables (`sage_fast.ops.launch.TUNED_FWD`, `_DX`, `_WEIGHT_GRAD`, `_LOSS`, loaded from
sage_fast/ops/tuned_launch.json) at its own key; loss C in {8142, 100}, FIT on and off, logits bf16 /
fp16 / fp32 with all gradients, and fp32 inference (no gradient). About 40 s on 2 shared cores (~60
distinct compilations).

The grid's cases (`_record_grid_launches`): each candidate launched through the glue with its kernel's
launch function forced to the candidate.

A child process, because Triton fixes interpret mode when a kernel is decorated and the CPU tests run
with TRITON_INTERPRET=1 (`run_child` starts it without). Limits the callers judge by: sm_90's
227 KiB of shared memory per block (a program asking for more compiles and then fails at launch), and
at most SPILL_TOLERANCE_BYTES of register spills (a few bytes, as triton 3.6 gives the fp32 backward
where 3.8 gives none, cost nothing; an oversized tile spills kilobytes). `blocks_per_sm` estimates
occupancy from the compiled resources.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]

H100 = ("cuda", 90, 32)
H100_NAME = "NVIDIA H100 80GB HBM3"  # as torch.cuda.get_device_name reports an SXM H100
# sm_90's limits: a program asking for more shared memory than the opt-in maximum per block
# compiles fine but fails at launch (Triton raises OutOfResources), which no CPU test would see.
SM90_MAX_SHARED_PER_BLOCK = 232448      # 227 KiB
SM90_SHARED_PER_SM = 233472             # 228 KiB, 1 KiB of it reserved per resident block
SM90_REGISTERS_PER_SM = 65536
SM90_MAX_WARPS_PER_SM = 64

SPILL_TOLERANCE_BYTES = 32


# --------------------------------------------------------------------------------------------
# recording the launches


_LOSS_KERNELS = ["fit_la_loss_fwd_kernel"]
_ADAPTER_KERNELS = ["sg_adapter_fwd_kernel", "sg_adapter_bwd_dx_kernel", "sg_adapter_bwd_dw_kernel"]


def _install_recorders(launches: list, label: list, keep: Optional[list] = None) -> None:
    """Swap the glue's kernels for recorders: `kernel[grid](*args, **kwargs)` appends (kernel, args,
    kwargs, label[0]) to `launches` (label is mutable: the caller sets the current case before each
    launch); with `keep`, only launches of the kernel named keep[0]."""
    import types

    import sage_fast.ops.la_loss as fl
    import sage_fast.ops.sg_adapter as fa
    from sage_fast.kernels import la_loss as kl
    from sage_fast.kernels import sg_adapter as ka
    from sage_fast.kernels import utils as kernel_utils

    if kernel_utils.INTERPRET:
        raise RuntimeError("the kernels were imported in interpret mode (TRITON_INTERPRET=1 is set)")

    class Capture:
        """Stands in for a JITFunction."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                if keep is None or self.fn.__name__ == keep[0]:
                    launches.append((self.fn, args, kwargs, label[0]))

            return record

    def proxy(module, names):
        ns = types.SimpleNamespace(**{k: v for k, v in vars(module).items() if not k.startswith("__")})
        for name in names:
            setattr(ns, name, Capture(getattr(module, name)))
        return ns

    fa._kernels = proxy(ka, _ADAPTER_KERNELS)
    loss_kernels = proxy(kl, _LOSS_KERNELS)
    fl._kernels = lambda: loss_kernels


def _folded_weights(d: int, r: int) -> tuple:
    """(W_cat (d, 2r), b_cat (2r,), W_up (d, 2r), b_up (d,)), fp32: the glue's operands. Their values do not
    matter here: the JIT specialises on dtypes, alignment and integer arguments."""
    import torch

    h = 2 * r
    return torch.randn(d, h), torch.randn(h), torch.randn(d, h), torch.randn(d)


def _record_launches() -> list:
    """Run the GPU launch path of both glue modules on CPU tensors; return the kernel launches."""
    import torch

    import sage_fast.ops.la_loss as fl
    import sage_fast.ops.launch as launch
    import sage_fast.ops.sg_adapter as fa

    launches: list = []
    label = [""]
    _install_recorders(launches, label)

    # The launch path asks the device for its name (tuned entries) and SM count (the weight-gradient
    # kernel's split-K factor): answer as an H100 would, with its 132 SMs (SPLIT = 1 would otherwise be
    # specialised into a constant).
    device = [H100_NAME]
    launch.device_info = lambda dev: (device[0], 132)

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    name = {f32: "fp32", bf16: "bf16", f16: "fp16"}
    rows = 512  # token rows; a multiple of 16 like most real batches (B x 197 tokens, B even)

    def adapter_case(d, r, x_dt, mlp_dt, cdt, block):
        w_cat, b_cat, w_up, b_up = _folded_weights(d, r)
        label[0] = (
            f"d={d} r={r} x={name[x_dt]} ops={name[cdt]}"
            + (f" mlp={name[mlp_dt]} block" if block else " drop-in")
            + ("" if device[0] == H100_NAME else f" tuned for {device[0]}")
        )
        x = torch.randn(rows, d, dtype=x_dt)
        scale = torch.tensor(0.5) if block else None
        mlp = torch.randn(rows, d, dtype=mlp_dt) if block else None
        out, mean, rstd = fa.sg_adapter_fwd(x, w_cat, b_cat, w_up, b_up, scale, mlp, 0.1, 1e-5, cdt)
        dout = torch.randn_like(out)
        fa.sg_adapter_bwd(dout, x, mean, rstd, w_cat, b_cat, w_up, b_up, scale, 0.1, cdt)

    # (x, mlp_out, compute dtype): the plain dtypes (the Sage model under bf16 autocast is all
    # bf16), and a mixed fp32-residual / bf16-operand case. The model uses the block epilogue; the drop-in form (a subset of its code) is compiled in bf16 only,
    # to keep the test's time down.
    adapter_dtypes = [(bf16, bf16, bf16), (f16, f16, f16), (f32, f32, f32), (f32, bf16, bf16)]
    for d, r in [(768, 1), (768, 4), (768, 32), (768, 256), (1024, 1), (1024, 4), (1024, 32), (1024, 256)]:
        for x_dt, mlp_dt, cdt in adapter_dtypes:
            for block in (True, False) if cdt == bf16 and x_dt == bf16 else (True,):
                adapter_case(d, r, x_dt, mlp_dt, cdt, block)

    # Every tuned entry (sage_fast.ops.launch.TUNED_FWD, _DX, _WEIGHT_GRAD), on the device it was tuned
    # for: block epilogue with inputs in the entry's operand dtype (the glue picks the entries itself).
    tuned = set(launch.TUNED_FWD) | set(launch.TUNED_DX) | set(launch.TUNED_WEIGHT_GRAD)
    for dev_name, d, r, cdt in sorted(tuned, key=repr):
        device[0] = dev_name
        adapter_case(d, r, cdt, cdt, cdt, True)
    device[0] = H100_NAME

    def loss_case(num_classes, dt, fit, train, batch=64):
        label[0] = (f"C={num_classes} logits={name[dt]} FIT={'on' if fit else 'off'} {'train' if train else 'eval'}"
                    + ("" if device[0] == H100_NAME else f" tuned for {device[0]}"))
        log_prior = torch.randn(num_classes)
        target = torch.randint(0, num_classes, (batch,))
        z = torch.randn(batch, num_classes, dtype=dt)
        zv, zt = (torch.randn_like(z), torch.randn_like(z)) if fit else (None, None)
        s = torch.tensor([0.3, 0.2]) if fit else log_prior
        need = (train, train and fit, train and fit)
        fl._fit_la_loss_forward(z, zv, zt, s, target, log_prior, (0.015, 0.02, 0.4), -100, need, fit)

    for num_classes in (8142, 100):
        for dt in (bf16, f16, f32):
            for fit in (True, False):
                # Inference (no gradient: pass 1 only) in fp32, the model's logits dtype.
                for train in (True, False) if dt == f32 else (True,):
                    loss_case(num_classes, dt, fit, train)

    # Every tuned loss entry (TUNED_LOSS), on its device, training (all gradients).
    for dev_name, num_classes, dt, fit in sorted(launch.TUNED_LOSS, key=repr):
        device[0] = dev_name
        loss_case(num_classes, dt, fit, True)
    device[0] = H100_NAME
    return launches


def _record_grid_launches(items: list) -> list:
    """The launches of a tuning grid (`benchmarks.tuning.prefilter` writes `items`, one per candidate): each
    candidate is launched through the glue, with the launch function of its kernel forced to return
    the candidate's configuration, and only its own kernel's launch is kept (label = the item's label)."""
    import torch

    import sage_fast.ops.la_loss as fl
    import sage_fast.ops.launch as launch
    import sage_fast.ops.sg_adapter as fa

    launches: list = []
    label = [""]
    keep = [""]
    _install_recorders(launches, label, keep)
    launch.device_info = lambda dev: (H100_NAME, 132)
    kernel_names = {"fwd": "sg_adapter_fwd_kernel", "dx": "sg_adapter_bwd_dx_kernel",
                    "dw": "sg_adapter_bwd_dw_kernel", "loss": "fit_la_loss_fwd_kernel"}
    types_ = {"fwd": launch.RowLaunch, "dx": launch.RowLaunch, "dw": launch.WeightGradLaunch,
              "loss": launch.LossLaunch}
    rows = 512  # 16-divisible like the real M = 128 x 197: the same specialisation
    for item in items:
        kernel = item["kernel"]
        cfg = types_[kernel](**item["config"])
        dt = getattr(torch, item["dtype"])
        label[0], keep[0] = item["label"], kernel_names[kernel]
        if kernel == "loss":
            launch.select_loss_launch = lambda *a, cfg=cfg: cfg
            c, fit = item["classes"], item["fit"]
            log_prior = torch.randn(c)
            target = torch.randint(0, c, (64,))
            z = torch.randn(64, c, dtype=dt)
            zv, zt = (torch.randn_like(z), torch.randn_like(z)) if fit else (None, None)
            s = torch.tensor([0.3, 0.2]) if fit else log_prior
            fl._fit_la_loss_forward(z, zv, zt, s, target, log_prior, (0.015, 0.02, 0.4), -100, (True, fit, fit), fit)
            continue
        d, r = item["d"], item["r"]
        orig_row, orig_dw = launch.row_launch, launch.weight_grad_launch
        if kernel in ("fwd", "dx"):
            launch.row_launch = lambda d_, h_, dt_, dev_, kernel="fwd", k=kernel, cfg=cfg, orig=orig_row: (
                cfg if kernel == k else orig(d_, h_, dt_, dev_, kernel=kernel))
        else:
            launch.weight_grad_launch = lambda *a, cfg=cfg: cfg
        try:
            w_cat, b_cat, w_up, b_up = _folded_weights(d, r)
            x = torch.randn(rows, d, dtype=dt)
            mlp = torch.randn(rows, d, dtype=dt)
            scale = torch.tensor(0.5)
            out, mean, rstd = fa.sg_adapter_fwd(x, w_cat, b_cat, w_up, b_up, scale, mlp, 0.1, 1e-5, dt)
            if kernel != "fwd":
                fa.sg_adapter_bwd(torch.randn_like(out), x, mean, rstd, w_cat, b_cat, w_up, b_up, scale, 0.1, dt)
        finally:
            launch.row_launch, launch.weight_grad_launch = orig_row, orig_dw
    return launches



# --------------------------------------------------------------------------------------------
# compiling


def _specialize(fn, args, kwargs, backend):
    """(signature, constexprs, attrs, options) of one launch, as Triton's JIT derives them."""
    from triton._C.libtriton import native_specialize_impl

    names = fn.arg_names
    bound = dict(zip(names, args))
    options = {}
    for k, v in kwargs.items():
        if k in names:
            bound[k] = v
        else:
            options[k] = v
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{fn.__name__}: launch without arguments {missing}")
    signature, constexprs, attrs = {}, {}, {}
    for i, (n, p) in enumerate(zip(names, fn.params)):
        v = bound[n]
        if p.is_constexpr:
            ty, spec = "constexpr", v
        else:
            ty, spec = native_specialize_impl(
                backend, v, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
            )
        signature[n] = ty
        if ty == "constexpr":
            constexprs[n] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    return signature, constexprs, attrs, options


_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")



def _compile_one(e: dict, target) -> dict:
    """Compile one distinct launch for `target`; the result as a JSON-friendly dict."""
    import triton
    from triton.compiler import ASTSource

    fn = e["fn"]
    t0 = time.time()
    case = dict(
        kernel=fn.__name__,
        labels=e["labels"],
        constexprs={k: v for k, v in e["cons"].items()},
        options=e["opts"],
        signature={k: v for k, v in e["sig"].items() if v != "constexpr"},
        ok=False,
        error=None,
        registers=None,
        spill_stores=None,
        spill_loads=None,
        shared=None,
        num_warps=None,
    )
    log = io.StringIO()  # ptxas -v output (TRITON_DUMP_PTXAS_LOG=1), and the PTX dump on failure
    try:
        with contextlib.redirect_stdout(log):
            src = ASTSource(fn=fn, signature=e["sig"], constexprs=e["cons"], attrs=e["attrs"])
            compiled = triton.compile(src, target=target, options=e["opts"])
        case["ok"] = len(compiled.asm.get("cubin", b"")) > 0
        case["shared"] = int(compiled.metadata.shared)
        case["num_warps"] = int(compiled.metadata.num_warps)
        if not case["ok"]:
            case["error"] = "triton.compile returned no cubin"
    except Exception as exc:
        case["error"] = f"{type(exc).__name__}: {str(exc)[:3000]}"
    text = log.getvalue()
    spills = _PTXAS_SPILLS.findall(text)
    regs = _PTXAS_REGS.findall(text)
    if case["ok"] and spills and regs:
        case["spill_stores"] = sum(int(s) for s, _ in spills)
        case["spill_loads"] = sum(int(lo) for _, lo in spills)
        case["registers"] = max(int(r) for r in regs)
    case["seconds"] = round(time.time() - t0, 2)
    return json.loads(json.dumps(case, default=repr))


def compile_report(out_path: str, grid_path: Optional[str] = None) -> None:
    """The child's work: record the launches (the glue's, or the grid file's candidates), compile each
    distinct specialisation for sm_90, write the report (JSON) to out_path. Without an nvidia backend or
    ptxas the report says why in "skip"."""
    from sage_fast.utils.files import atomic_write_text

    t_start = time.time()
    report: dict = {"skip": None, "cases": []}
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        target = GPUTarget(*H100)
        backend = make_backend(target)
        report["ptxas"] = triton.knobs.nvidia.ptxas.version  # raises when ptxas is missing
    except Exception as exc:  # no nvidia backend or no ptxas in this triton install
        report["skip"] = f"cannot compile for sm_90 here: {type(exc).__name__}: {exc}"
        atomic_write_text(out_path, json.dumps(report))
        return
    report["triton"] = triton.__version__

    if grid_path:
        launches = _record_grid_launches(json.loads(Path(grid_path).read_text())["items"])
    else:
        launches = _record_launches()
    report["launches"] = len(launches)
    unique: dict = {}
    for fn, args, kwargs, label in launches:
        sig, cons, attrs, opts = _specialize(fn, args, kwargs, backend)
        key = repr((fn.__name__, sorted(sig.items()), sorted(cons.items()), sorted(attrs.items()), sorted(opts.items())))
        entry = unique.setdefault(key, dict(fn=fn, sig=sig, cons=cons, attrs=attrs, opts=opts, labels=[]))
        entry["labels"].append(label)

    # One process: with the 2 cores shared, a pool of 2 compiled no faster (measured).
    report["cases"] = [_compile_one(e, target) for e in unique.values()]
    report["seconds"] = round(time.time() - t_start, 1)
    atomic_write_text(out_path, json.dumps(report, default=repr))


# --------------------------------------------------------------------------------------------
# reading the report


def blocks_per_sm(case: dict) -> Optional[int]:
    """Resident programs per SM on sm_90, from shared memory, registers and warps (an occupancy
    estimate from the compiled resources; it says nothing about speed by itself)."""
    if case["registers"] is None or case["shared"] is None:
        return None
    warps = case["num_warps"]
    regs = -(-case["registers"] // 8) * 8  # registers are allocated 8 per thread at a time
    by_regs = SM90_REGISTERS_PER_SM // (regs * 32 * warps)
    by_shared = SM90_SHARED_PER_SM // (case["shared"] + 1024)
    return min(by_regs, by_shared, SM90_MAX_WARPS_PER_SM // warps, 32)


def describe(case: dict) -> str:
    """One line naming a compiled case: kernel, constexprs, options and the cases that launch it."""
    cons = ", ".join(f"{k}={v}" for k, v in case["constexprs"].items())
    opts = ", ".join(f"{k}={v}" for k, v in case["options"].items())
    labels = case["labels"]
    shown = "; ".join(labels[:3]) + (f"; ... ({len(labels)} cases)" if len(labels) > 3 else "")
    return f"{case['kernel']}[{cons}; {opts}] for {shown}"


# --------------------------------------------------------------------------------------------
# the child process


def run_child(work_dir: Path, grid_path: Optional[Path] = None, timeout: float = 900) -> tuple:
    """Run the compile child (outside Triton's interpreter, with a fresh Triton cache in `work_dir` so that
    ptxas really runs and logs); (the child's CompletedProcess, its report or None when it wrote none)."""
    work_dir = Path(work_dir)
    out = work_dir / "compile-report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(work_dir / "triton-cache")
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "benchmarks.tuning.compile_sm90", str(out)]
    if grid_path is not None:
        cmd += ["--grid", str(grid_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    report = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else None
    return proc, report


if __name__ == "__main__":
    args = sys.argv[1:]
    grid = None
    if "--grid" in args:
        i = args.index("--grid")
        grid = args[i + 1]
        del args[i:i + 2]
    compile_report(args[0], grid)
