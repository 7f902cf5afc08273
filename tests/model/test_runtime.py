"""What runs here, as plain data: `SageModel.runtime` and the environment report (sage_fast.model.runtime).

On CPU "auto" takes no kernel; the tests that need "auto" to take the kernels (self-check, fallback)
replace `backend._auto_prefers_triton` so that the CPU counts as a kernel device, with the kernels in
Triton's interpreter. The CUDA speed probe is skipped on CPU; its timing code runs here on the
interpreter at a tiny shape (the ratio then means nothing).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import sage_fast
from helpers.broken_kernels import ADAPTER_FWD_OUT, break_adapter, scale_arg
from sage_fast.model import attention, build_sage, runtime
from sage_fast.ops import backend, selfcheck
from sage_fast.ops.selfcheck import SelfCheckWarning

NAMES = ["golden_retriever", "red fox", "tabby cat"]
COUNTS = [150, 12, 3]
needs_kernels_here = pytest.mark.skipif(
    not torch.cuda.is_available() and not backend.interpret_enabled(), reason="needs CUDA or Triton's interpreter"
)

pytestmark = pytest.mark.usefixtures("fresh_self_checks")  # conftest.py, as auto_takes_triton


@pytest.fixture(scope="module")
def tiny_auto():
    torch.manual_seed(0)
    return build_sage(NAMES, COUNTS, model_name="sage-tiny", pretrained=None, progress=False)  # backend "auto"


def test_model_runtime_on_cpu(monkeypatch, tiny_auto):
    def no_probe(device):
        raise AssertionError("attention 'auto' must not import or probe xformers")

    monkeypatch.setattr(attention, "_unusable_reason", no_probe)
    model = tiny_auto
    model._ran = None
    before = model.runtime()
    assert before["forward_seen"] is False and before["attention"]["ran"] is None
    images = torch.randn(2, 3, model.image_size, model.image_size)
    model.loss(model(images), torch.tensor([0, 2]))
    info = json.loads(json.dumps(model.runtime()))
    assert info["forward_seen"] is True and info["device"] == "cpu"
    assert info["adapter"]["kind"] == "sg" and info["loss"]["kind"] == "FITLoss"
    for op, path in (("adapter", "the folded PyTorch adapter"), ("loss", "the PyTorch reference loss")):
        assert info[op]["requested"] == "auto" and info[op]["resolved"] == "torch"
        assert info[op]["path"].startswith(path) and info[op]["fallback"] is False
        assert info[op]["reason"] == "'auto' runs the kernels on CUDA only, not on cpu"
    assert info["attention"]["requested"] == "auto" and info["attention"]["ran"] == "sdpa"
    assert selfcheck.results() == []


@needs_kernels_here
def test_model_runtime_reports_the_fallback(monkeypatch, auto_takes_triton, tiny_auto):
    """A wrong adapter kernel under "auto": one warning, the PyTorch adapter, and the run folder's
    record says so; the loss, whose kernel is right, keeps Triton."""
    break_adapter(monkeypatch, after=scale_arg(ADAPTER_FWD_OUT, 1.01))
    model = tiny_auto
    images = torch.randn(2, 3, model.image_size, model.image_size)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.loss(model(images), torch.tensor([0, 2]))[0].backward()
    assert len([w for w in record if issubclass(w.category, SelfCheckWarning)]) == 1
    info = model.runtime()
    assert info["adapter"]["resolved"] == "torch" and info["adapter"]["fallback"] is True
    assert info["adapter"]["reason"].startswith("the kernels failed their self-check: block form: output differs")
    assert info["loss"]["resolved"] == "triton" and info["loss"]["self_check"]["status"] == "passed"
    model.zero_grad(set_to_none=True)


def test_environment_report_on_cpu():
    report = runtime.environment_report("cpu")
    assert json.loads(json.dumps(report)) == report
    v = report["versions"]
    assert v["sage_fast"] == sage_fast.__version__ and v["torch"] == torch.__version__
    assert set(v) == {"sage_fast", "python", "torch", "triton", "open_clip", "xformers", "cuda", "cudnn"}
    assert report["device"]["device"] == "cpu" and report["device"]["capability"] is None
    assert [(b["op"], b["dtype"], b["resolved"]) for b in report["backends"]] == [
        ("adapter", "float32", "torch"), ("loss", "float32", "torch")]
    assert report["attention"]["resolved"] == "sdpa"
    assert report["speed"] == {"skipped": "the speed probe runs on CUDA only, not on cpu"}
    text = runtime.format_environment(report)
    assert f"sage_fast  {sage_fast.__version__}" in text
    assert "adapter  float32   auto -> the folded PyTorch adapter" in text
    assert "attention: auto -> sdpa" in text
    assert "kernel self-check (on): none ran" in text
    assert "speed: skipped (the speed probe runs on CUDA only, not on cpu)" in text


@needs_kernels_here
def test_environment_report_where_the_kernels_run(monkeypatch, auto_takes_triton):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    report = runtime.environment_report(dev, dtypes=(torch.float32, torch.float16), speed=False)
    assert [(b["op"], b["dtype"], b["resolved"]) for b in report["backends"]] == [
        ("adapter", "float32", "triton"), ("adapter", "float16", "triton"),
        ("loss", "float32", "triton"), ("loss", "float16", "triton")]
    assert [c["status"] for c in report["self_check"]] == ["passed"] * 4
    text = runtime.format_environment(report)
    lines = [line.split()[:4] for line in text.splitlines()]
    assert ["adapter", selfcheck.device_key(dev), "float16", "passed"] in lines
    monkeypatch.setenv(selfcheck.ENV_VAR, "0")
    assert "kernel self-check (off (SAGE_FAST_SELF_CHECK=0))" in runtime.format_environment(
        runtime.environment_report(dev, speed=False))


@needs_kernels_here
def test_speed_probe_times_both_paths():
    """The timing code, at a tiny shape on the interpreter (CPU) or the GPU; a ratio, never a target."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sp = runtime.measure_speed_ratios(dev, torch.float32, adapter_shape={"m": 20, "d": 48, "r": 4},
                                      loss_shape={"batch": 6, "num_classes": 37}, iters=1, repeats=1)
    for op in ("adapter", "loss"):
        assert sp[op]["fused_ms"] > 0 and sp[op]["pytorch_ms"] > 0 and sp[op]["speedup"] > 0
    report = runtime.environment_report("cpu", speed=False)
    report["speed"] = sp
    text = runtime.format_environment(report)
    assert "speed (fused vs PyTorch, forward + backward, float32):" in text
    assert "adapter  m=20, d=48, r=4: " in text
