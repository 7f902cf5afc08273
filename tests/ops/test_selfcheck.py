"""The kernels' self-check (sage_fast.ops.selfcheck) and the decision it feeds (sage_fast.ops.backend).

On CPU the kernels run in Triton's interpreter (conftest.py). There "auto" never takes Triton, so its
fallback is driven by replacing `backend._auto_prefers_triton` (the one rule "auto" adds on top of
where Triton can run) so that the CPU counts as a kernel device; everything after that (the check,
the warning, the PyTorch path) is the code a GPU runs. Kernels are made wrong on purpose by
tests/helpers/broken_kernels.py: the real kernel runs, then one of its outputs is scaled.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import triton

from helpers.adapters import random_adapter_pair
from helpers.broken_kernels import (
    ADAPTER_DX_OUT,
    ADAPTER_FWD_OUT,
    LOSS_DZ_OUT,
    break_adapter,
    break_loss,
    scale_arg,
)
from sage_fast import CompensatedLALoss, FITLoss
from sage_fast.ops import backend, selfcheck
from sage_fast.ops.backend import explain_backend, resolve_backend
from sage_fast.ops.selfcheck import SelfCheckError, SelfCheckWarning

DEV = "cuda" if torch.cuda.is_available() else "cpu"
f32, f16 = torch.float32, torch.float16
pytestmark = [
    pytest.mark.skipif(DEV == "cpu" and not backend.interpret_enabled(), reason="needs CUDA or Triton's interpreter"),
    pytest.mark.usefixtures("fresh_self_checks"),  # conftest.py, as auto_takes_triton
]


def _adapter_inputs(d=16, rows=6, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen).to(DEV)
    return x, torch.randn(d, generator=gen).to(DEV), torch.randn(rows, d, generator=gen).to(DEV)


def _self_check_warnings(record):
    return [w for w in record if issubclass(w.category, SelfCheckWarning)]


# --- the check itself ------------------------------------------------------------------------------


def test_tolerances_are_written_once_per_kernel_dtype():
    assert set(selfcheck.TOLERANCES) == {torch.float32, torch.float16, torch.bfloat16}
    assert selfcheck.TOLERANCES[torch.float32] <= 1e-5
    assert all(selfcheck.TOLERANCES[t] <= 2e-2 for t in (torch.float16, torch.bfloat16))


@pytest.mark.parametrize("dtype", [f32, f16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("family", selfcheck.FAMILIES)
def test_correct_kernels_pass(family, dtype):
    result = selfcheck.self_check(family, DEV, dtype)
    assert result.status == "passed", result.reason
    assert result.reason is None and result.seconds > 0
    assert result.device == selfcheck.device_key(DEV) and result.dtype == str(dtype).replace("torch.", "")


def test_check_runs_once_per_family_device_and_dtype(monkeypatch):
    launcher = break_adapter(monkeypatch)  # not broken: counts the forward launches
    first = selfcheck.self_check("adapter", DEV, f32)
    launches = launcher.launches
    assert launches == 2  # the block form and the drop-in form
    assert selfcheck.self_check("adapter", DEV, f32) is first
    assert launcher.launches == launches
    selfcheck.self_check("adapter", DEV, f16)
    assert launcher.launches == 2 * launches
    assert [(r["family"], r["dtype"]) for r in selfcheck.results()] == [("adapter", "float32"), ("adapter", "float16")]


@pytest.mark.parametrize("kernel,index,what", [
    ("sg_adapter_fwd_kernel", ADAPTER_FWD_OUT, "block form: output"),
    ("sg_adapter_bwd_dx_kernel", ADAPTER_DX_OUT, "block form: d x"),
    ("sg_adapter_bwd_dw_kernel", 6, "block form: d w_cat"),   # its split-K partials of dW_cat
], ids=["forward", "backward-dx", "backward-dw"])
def test_a_wrong_adapter_kernel_fails_the_check(monkeypatch, kernel, index, what):
    break_adapter(monkeypatch, kernel, after=scale_arg(index, 1.01))   # 1% off
    result = selfcheck.self_check("adapter", DEV, f32)
    assert result.status == "failed"
    assert result.reason.startswith(what), result.reason


def test_a_wrong_loss_gradient_fails_the_check(monkeypatch):
    break_loss(monkeypatch, after=scale_arg(LOSS_DZ_OUT, 1.01))
    result = selfcheck.self_check("loss", DEV, f32)
    assert result.status == "failed"
    assert result.reason.startswith("FIT loss: d z"), result.reason


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access was encountered (test)\nmore"),
                                   ValueError("PassManager::run failed (test)")], ids=["launch", "compile"])
def test_a_kernel_that_does_not_run_fails_the_check(monkeypatch, error):
    break_loss(monkeypatch, error=error)
    result = selfcheck.self_check("loss", DEV, f32)
    assert result.status == "failed"
    assert result.reason.startswith(f"the kernel did not run: {type(error).__name__}: ")
    assert "\n" not in result.reason and "more" not in result.reason


def test_check_leaves_the_callers_state_alone():
    """No global RNG draw, and it runs (with gradients, without autocast) under no_grad, inference mode
    and autocast."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert selfcheck.self_check("adapter", DEV, f32).status == "passed"
    with torch.no_grad():
        assert selfcheck.self_check("loss", DEV, f32).status == "passed"
    assert torch.equal(torch.get_rng_state(), state)


def test_results_are_plain_data(monkeypatch):
    break_loss(monkeypatch, error=RuntimeError("launch failed (test)"))
    selfcheck.self_check("loss", DEV, f32)
    selfcheck.self_check("adapter", DEV, f32)
    got = json.loads(json.dumps(selfcheck.results()))
    assert [(r["family"], r["status"]) for r in got] == [("loss", "failed"), ("adapter", "passed")]
    assert set(got[0]) == {"family", "device", "dtype", "status", "reason", "seconds"}


def test_unknown_family_or_dtype_is_refused():
    with pytest.raises(ValueError, match="family"):
        selfcheck.self_check("attention", DEV, f32)
    with pytest.raises(ValueError, match="float64"):
        selfcheck.self_check("loss", DEV, torch.float64)


# --- the decision: "auto" falls back, "triton" refuses ---------------------------------------------


def test_auto_falls_back_to_pytorch_for_the_family_and_warns_once(monkeypatch, auto_takes_triton):
    launcher = break_adapter(monkeypatch, after=scale_arg(ADAPTER_FWD_OUT, 1.01))
    ref, fused = random_adapter_pair(16, 2, backend="auto")
    ref, fused = ref.to(DEV), fused.to(DEV)
    x, g, mlp = _adapter_inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fused(x, g)
        launches = launcher.launches
        blk = fused.forward_block(x, g, mlp, torch.tensor(0.5, device=DEV))
        fused(x, g)
    found = _self_check_warnings(record)
    assert len(found) == 1
    text = str(found[0].message)
    for part in ("Triton adapter kernels failed their self-check", selfcheck.describe_device(DEV), "float32",
                 f"torch {torch.__version__}", f"Triton {triton.__version__}", "block form: output differs",
                 "PyTorch path", "SAGE_FAST_SELF_CHECK=0"):
        assert part in text, (part, text)
    assert launcher.launches == launches  # the wrong kernel no longer runs
    with torch.no_grad():  # and the results are the (right) folded PyTorch path's
        torch.testing.assert_close(out, ref(x, g), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(blk, ref.forward_block(x, g, mlp, torch.tensor(0.5, device=DEV)),
                                   rtol=1e-5, atol=1e-5)
    assert resolve_backend("auto", DEV, f32, op="adapter") == "torch"
    assert resolve_backend("auto", DEV, f32, op="loss") == "triton"   # the other family is checked on its own
    info = explain_backend("adapter", "auto", DEV, f32)
    assert info["resolved"] == "torch" and info["fallback"] is True
    assert info["path"].startswith("the folded PyTorch adapter")
    assert info["reason"].startswith("the kernels failed their self-check: block form: output")
    assert info["self_check"]["status"] == "failed"


def test_triton_refuses_with_a_one_line_user_error(monkeypatch):
    break_adapter(monkeypatch, "sg_adapter_bwd_dx_kernel", after=scale_arg(ADAPTER_DX_OUT, 1.01))
    _, fused = random_adapter_pair(16, 2, backend="triton")
    x, g, _ = _adapter_inputs()
    with pytest.raises(SelfCheckError) as caught:
        fused.to(DEV)(x, g)
    err = caught.value
    assert err.user_error is True and "\n" not in str(err)
    assert str(err).startswith("model.backend=triton: the Triton adapter kernels failed their self-check on ")
    assert "block form: d x differs" in str(err) and "SAGE_FAST_SELF_CHECK=0" in str(err)
    with pytest.raises(SelfCheckError):  # every later call too
        fused(x, g)
    info = explain_backend("adapter", "triton", DEV, f32)
    assert info["resolved"] is None and info["reason"] == str(err) and info["self_check"]["status"] == "failed"


def test_loss_modules_fall_back_under_auto_and_refuse_under_triton(monkeypatch, auto_takes_triton):
    break_loss(monkeypatch, error=RuntimeError("no kernel image is available for execution on the device (test)"))
    counts = [50, 20, 5, 2]
    gen = torch.Generator().manual_seed(4)
    z, zv, zt = (torch.randn(5, 4, generator=gen).to(DEV) for _ in range(3))
    target = torch.tensor([0, 1, 2, 3, 0], device=DEV)
    want = FITLoss(counts, backend="torch").to(DEV)(z, zv, zt, target)[0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = FITLoss(counts, backend="auto").to(DEV)(z, zv, zt, target)[0]
        CompensatedLALoss(counts, backend="auto").to(DEV)(z, target)
    assert len(_self_check_warnings(record)) == 1
    assert "no kernel image is available" in str(_self_check_warnings(record)[0].message)
    torch.testing.assert_close(got, want)
    with pytest.raises(SelfCheckError, match="Triton loss kernels failed their self-check"):
        CompensatedLALoss(counts, backend="triton").to(DEV)(z, target)


def test_self_check_off_skips_it(monkeypatch):
    """SAGE_FAST_SELF_CHECK=0: no check, the kernels run as they are (here: wrong), recorded as skipped."""
    monkeypatch.setenv(selfcheck.ENV_VAR, "0")
    break_adapter(monkeypatch, after=scale_arg(ADAPTER_FWD_OUT, 2.0))
    ref, fused = random_adapter_pair(16, 2, backend="triton")
    x, g, _ = _adapter_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fused.to(DEV)(x, g), 2.0 * ref.to(DEV)(x, g), rtol=1e-5, atol=1e-5)
    (result,) = selfcheck.results()
    assert result["status"] == "skipped" and result["reason"] == "SAGE_FAST_SELF_CHECK=0"


def test_no_check_where_no_kernel_runs(monkeypatch):
    launcher = break_adapter(monkeypatch)
    _, fused = random_adapter_pair(16, 2, backend="torch")
    x, g, _ = _adapter_inputs()
    fused.to(DEV)(x, g)
    if DEV == "cpu":
        fused.backend = "auto"  # 'auto' on CPU: the folded PyTorch path, never the interpreter
        fused(x, g)
    assert launcher.launches == 0 and selfcheck.results() == []


def test_a_compiled_trace_reads_the_kept_result(monkeypatch, auto_takes_triton):
    """torch.compile traces the path the eager check decided, without a graph break or a new check."""
    launcher = break_adapter(monkeypatch, after=scale_arg(ADAPTER_FWD_OUT, 1.01))
    assert selfcheck.run_self_checks(DEV, (f32,), ("adapter",))[0]["status"] == "failed"
    launches = launcher.launches
    ref, fused = random_adapter_pair(16, 2, backend="auto")
    ref, fused = ref.to(DEV), fused.to(DEV)
    x, g, _ = _adapter_inputs()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fused)(x, g)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelfCheckWarning)
        torch.testing.assert_close(compiled(x, g), ref(x, g), rtol=1e-5, atol=1e-5)
    assert launcher.launches == launches
    torch._dynamo.reset()


def test_decide_backends_fails_before_any_work(monkeypatch, auto_takes_triton):
    break_adapter(monkeypatch, after=scale_arg(ADAPTER_FWD_OUT, 1.01))
    with pytest.raises(SelfCheckError, match="adapter kernels failed"):
        backend.decide_backends("triton", DEV, (f32,))
    with pytest.warns(SelfCheckWarning):
        entries = backend.decide_backends("auto", DEV, (f32,))
    assert [(e["op"], e["resolved"], e["fallback"]) for e in entries] == [("adapter", "torch", True),
                                                                          ("loss", "triton", False)]


# --- explain_backend: plain data of what runs ------------------------------------------------------


def test_explain_backend_without_kernels_here(monkeypatch):
    auto = explain_backend("adapter", "auto", "cpu", f32)
    assert auto["resolved"] == "torch" and auto["fallback"] is False and auto["self_check"] is None
    assert auto["reason"] == "'auto' runs the kernels on CUDA only, not on cpu"
    assert explain_backend("loss", "auto", "cpu", f32)["path"] == "the PyTorch reference loss"
    assert explain_backend("adapter", "torch", "cpu", f32)["path"] == "the PyTorch reference"
    fp64 = explain_backend("loss", "auto", "cpu", torch.float64)
    assert fp64["resolved"] == "torch"
    monkeypatch.setattr(backend, "interpret_enabled", lambda: False)
    refused = explain_backend("adapter", "triton", "cpu", f32)
    assert refused["resolved"] is None and "TRITON_INTERPRET" in refused["reason"]
    json.dumps([auto, fp64, refused])
    with pytest.raises(ValueError, match="op must be one of"):
        explain_backend("attention", "auto", "cpu", f32)


def test_explain_backend_runs_the_check_where_the_kernels_would_run(auto_takes_triton):
    info = explain_backend("loss", "auto", DEV, f16)
    assert info["resolved"] == "triton" and info["path"] == "the Triton kernels"
    assert info["self_check"]["status"] == "passed" and info["fallback"] is False
