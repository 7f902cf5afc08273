"""The error check of the benchmarks: a fast but wrong implementation must fail its benchmark.

The check itself (`error_check.check_error`) on hand-made tensors, then each benchmark run end to end
(its test function, with a stand-in for pytest-benchmark's fixture) on a deliberately wrong
"fused" implementation: wrong output, right output with a wrong gradient, a wrong loss, a wrong
adapter inside the Sage model. Each must raise after writing its record with rel_err_ok False.
CPU-sized shapes; the wrong implementations are PyTorch modules put in the place of the kernels.
"""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch

from sage_fast import FITLoss, SGAdapter, SGAdapterFused

from . import bench_adapter, bench_encoder, bench_loss, bench_train_step, environment, error_check, harness, records, timing


class FakeBenchmark:
    """What the benchmarks use of pytest-benchmark's fixture: one timed call."""

    disabled = False

    def __init__(self):
        self.extra_info: dict = {}
        self.group = None

    def pedantic(self, fn, rounds=1, iterations=1, warmup_rounds=0):
        start = time.perf_counter()
        fn()
        dt = time.perf_counter() - start
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=dt, mean=dt, stddev=0.0, min=dt))


# ----------------------------------------------------------------------------------------------
# the check on hand-made tensors


def test_relative_error():
    want = torch.tensor([3.0, 4.0])
    assert error_check.relative_error(want.clone(), want) == 0.0
    assert error_check.relative_error(torch.tensor([3.0, 4.5]), want) == pytest.approx(0.1)
    assert error_check.relative_error(torch.tensor([3.0, float("nan")]), want) == math.inf
    assert error_check.relative_error(torch.ones(3), want) == math.inf  # shape mismatch
    assert error_check.relative_error(torch.tensor([0.0, 2e-3]), torch.zeros(2)) == pytest.approx(2e-3)  # absolute


def test_a_wrong_gradient_fails_and_is_named():
    want = {"out": torch.randn(8, 16), "grad x": torch.randn(8, 16), "grad s": torch.tensor(2.0)}
    right = {k: v * (1 + 1e-7) for k, v in want.items()}
    assert error_check.check_error(right, want, "fp32").ok
    wrong = dict(right, **{"grad s": torch.tensor(2.001)})  # 5e-4 off: over fp32's 1e-5
    check = error_check.check_error(wrong, want, "fp32")
    assert not check.ok and check.worst == "grad s"
    assert check.record_fields()["rel_err_vs_eager"] == pytest.approx(5e-4, rel=1e-3)
    with pytest.raises(AssertionError, match="grad s: 0.0005 > 1e-05"):
        error_check.assert_error_ok(check, "case")
    # the same error is within bf16's limit
    error_check.assert_error_ok(error_check.check_error(wrong, want, "bf16"), "case")


def test_low_precision_limit_follows_the_eager_reference():
    want = {"out": torch.ones(100)}
    eager = {"out": torch.ones(100) * 1.05}  # the eager reference itself is 5% off at this precision
    assert error_check.check_error({"out": torch.ones(100) * 1.09}, want, "bf16", eager).ok   # 9% <= 2 x 5%
    assert not error_check.check_error({"out": torch.ones(100) * 1.11}, want, "bf16", eager).ok
    assert not error_check.check_error({"out": torch.ones(100) * 1.03}, want, "bf16").ok       # 3% > 2% without it
    assert error_check.check_error({"out": torch.ones(100) * 1.03}, want, "fp32", eager).limit("out") == 1e-5


# ----------------------------------------------------------------------------------------------
# each benchmark on a deliberately wrong implementation


class _WrongOutput(SGAdapter):
    """forward_block with the adapter output `factor` times too large."""

    factor = 1.01

    def forward_block(self, x, guidance, mlp_out, scale):
        return x + mlp_out + scale * self(x, guidance) * self.factor


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


class _WrongGradient(SGAdapter):
    """The right output; the gradient of x 1% too large."""

    def forward_block(self, x, guidance, mlp_out, scale):
        return super().forward_block(_ScaleGrad.apply(x), guidance, mlp_out, scale)


def _wrong_fused(monkeypatch, module, build):
    """Run the module's "fused" cases on CPU with `build(case)` as their implementation."""
    original = module.build_module
    monkeypatch.setattr(module, "ON_GPU", True)  # only lifts the skip of the Triton cases on CPU
    monkeypatch.setattr(module, "build_module", lambda case: build(case) if case.impl == "fused" else original(case))


def _wrong_adapter(cls):
    def build(case):
        module = cls(case.dim, case.r)
        module.load_state_dict(bench_adapter.build_module(
            bench_adapter.AdapterCase(case.batch, case.tokens, case.dim, case.r, case.dtype, case.mode, "eager")
        ).state_dict())
        return module.to(case.param_dtype)

    return build


def _expect_failure(run, recorder) -> dict:
    with pytest.raises(AssertionError, match="error against the eager reference"):
        run()
    record = recorder.records[-1]
    assert record["rel_err_ok"] is False and record["rel_err_vs_eager"] > record["rel_err_limit"]
    return record


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("dtype,factor", [("fp32", 1.001), ("bf16", 1.1)])
def test_wrong_adapter_output_fails_the_benchmark(mode, dtype, factor, monkeypatch, tmp_path):
    """0.1% off in fp32, 10% off in bf16 (whose limit is 2%)."""
    monkeypatch.setattr(_WrongOutput, "factor", factor)
    _wrong_fused(monkeypatch, bench_adapter, _wrong_adapter(_WrongOutput))
    recorder = records.Recorder(tmp_path, append=False)
    case = bench_adapter.AdapterCase(2, 17, 64, 4, dtype, mode, "fused")
    record = _expect_failure(lambda: bench_adapter.test_sg_adapter_block(case, FakeBenchmark(), recorder, {}, False),
                             recorder)
    assert record["impl"] == "fused" and record["case"] == case.key


def test_wrong_adapter_gradient_fails_the_benchmark(monkeypatch, tmp_path):
    _wrong_fused(monkeypatch, bench_adapter, _wrong_adapter(_WrongGradient))
    recorder = records.Recorder(tmp_path, append=False)
    fwd = bench_adapter.AdapterCase(2, 17, 64, 4, "fp32", "fwd", "fused")
    bench_adapter.test_sg_adapter_block(fwd, FakeBenchmark(), recorder, {}, False)  # the output is right
    assert recorder.records[-1]["rel_err_ok"] is True
    fwdbwd = bench_adapter.AdapterCase(2, 17, 64, 4, "fp32", "fwdbwd", "fused")
    record = _expect_failure(
        lambda: bench_adapter.test_sg_adapter_block(fwdbwd, FakeBenchmark(), recorder, {}, False), recorder)
    assert record["rel_err_tensor"] == "grad x"


@pytest.mark.parametrize("kind", ["fit", "la"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_wrong_loss_fails_the_benchmark(kind, mode, monkeypatch, tmp_path):
    def build(case):  # gamma 0.06 instead of 0.05: a slightly wrong compensated prior
        counts = harness.long_tailed_counts(case.classes)
        if kind == "la":
            return bench_loss.CompensatedLALoss(counts, gamma=0.06, backend="torch")
        module = FITLoss(counts, gamma=0.06, lambdas=bench_loss.LAMBDAS, backend="torch")
        with torch.no_grad():
            module.s1.fill_(0.1)
            module.s2.fill_(-0.05)
        return module

    _wrong_fused(monkeypatch, bench_loss, build)
    recorder = records.Recorder(tmp_path, append=False)
    case = bench_loss.LossCase(kind, 16, 100, "fp32", mode, "fused")
    _expect_failure(lambda: bench_loss.test_loss(case, FakeBenchmark(), recorder, {}, False), recorder)


def test_wrong_adapter_in_the_model_fails_the_train_step_and_inference(monkeypatch, tmp_path):
    original = bench_train_step.build_sage

    def build(e2e, fit, impl):
        model = original(e2e, fit, impl)
        if impl == "fused":  # one block's adapter computed with another activation: a wrong kernel
            model.adapters[1].alpha = 0.2
        return model

    monkeypatch.setattr(bench_train_step, "build_sage", build)
    e2e = bench_train_step.make_e2e(classes=10, batch=2)
    recorder = records.Recorder(tmp_path, append=False)
    bench_train_step.test_train_step("fit_on", "reference", e2e, FakeBenchmark(), recorder, False)
    assert recorder.records[-1]["rel_err_ok"] is True
    _expect_failure(lambda: bench_train_step.test_train_step("fit_on", "fused", e2e, FakeBenchmark(), recorder, False),
                    recorder)
    _expect_failure(lambda: bench_train_step.test_inference("fit_off", "fused", e2e, FakeBenchmark(), recorder),
                    recorder)
    # every variant's record carries its peak memory (None on a CPU: no CUDA allocator to ask)
    assert [(r["group"], r["impl"]) for r in recorder.records] == [("train", "reference"), ("train", "fused"),
                                                                   ("infer", "fused")]
    assert all({"peak_mem_MiB", "peak_mem_added_MiB"} <= set(r) for r in recorder.records)
    assert all((r["peak_mem_MiB"] is None) == (not timing.ON_GPU) for r in recorder.records)


@pytest.mark.parametrize("wrong", ["output", "gradient"])
def test_a_wrong_attention_kernel_fails_the_encoder_parity(wrong, monkeypatch, tmp_path):
    """SDPA's attention 0.1% off in every block, or right but with a 1% wrong gradient: its encoder case
    fails against open_clip's attention (features, or the gradient of the images); open_clip's passes."""
    import sage_fast.model.sage as sage_module

    real = sage_module.frozen_self_attention

    def attention(mha, x, backend):
        out = real(mha, x, backend)
        if backend != "sdpa":
            return out
        return out * 1.001 if wrong == "output" else _ScaleGrad.apply(out)

    monkeypatch.setattr(sage_module, "frozen_self_attention", attention)
    data = bench_encoder.make_encoder_data(batch=2)
    recorder = records.Recorder(tmp_path, append=False)
    bench_encoder.test_encoder_fwdbwd("open_clip", data, FakeBenchmark(), recorder)
    assert recorder.records[-1]["rel_err_ok"] is True and recorder.records[-1]["rel_err_vs_eager"] < 1e-6
    record = _expect_failure(lambda: bench_encoder.test_encoder_fwdbwd("sdpa", data, FakeBenchmark(), recorder),
                             recorder)
    assert record["impl"] == "sdpa"
    check = bench_encoder.check_against_open_clip(data, bench_encoder.build_encoder(data, "sdpa"))
    assert (check.errors["features"] > check.limit("features")) == (wrong == "output")
    assert check.errors["grad images"] > check.limit("grad images")


def test_xformers_is_skipped_with_its_reason_where_it_cannot_run(monkeypatch):
    from sage_fast.model import attention as model_attention

    if timing.ON_GPU and environment.xformers_status()[0]:
        pytest.skip("xformers runs on this machine")
    assert "xformers" in bench_encoder.skip_reason("xformers")
    assert bench_encoder.skip_reason("sdpa") is None and bench_encoder.skip_reason("open_clip") is None
    if timing.ON_GPU:
        return
    # installed but on a CPU: the model's probe says why (its per-device cache cleared around the change)
    monkeypatch.setattr(model_attention, "xformers_version", lambda: "0.0.35")
    model_attention._unusable_reason.cache_clear()
    try:
        runs, why = environment.xformers_status()
    finally:
        model_attention._unusable_reason.cache_clear()
    assert not runs and "CUDA" in why and bench_encoder.kernel_name("open_clip") == "open_clip"


def test_peak_memory_excludes_the_flush_buffer_and_counts_from_the_reset(monkeypatch):
    """The CUDA allocator's answers, simulated: 1000 MiB allocated at the reset (weights, inputs); during the
    timed calls the 256 MiB flush buffer is allocated and the step itself peaks 300 MiB above the start."""
    mib = 2**20
    state = {"allocated": 1000 * mib, "peak": 0}
    monkeypatch.setattr(timing, "ON_GPU", True)
    monkeypatch.setattr(timing, "_FLUSH", [])
    monkeypatch.setattr(timing, "_AT_RESET", [])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])
    timing.reset_peak_memory()
    monkeypatch.setattr(timing, "_FLUSH", [SimpleNamespace(nbytes=256 * mib)])
    state["peak"] = (1000 + 256 + 300) * mib
    assert timing.peak_memory_fields() == {"peak_mem_MiB": 1300.0, "peak_mem_added_MiB": 300.0}
    state["allocated"] = (1000 + 256) * mib  # the next variant: the flush buffer now exists before the reset
    timing.reset_peak_memory()
    state["peak"] += 100 * mib
    assert timing.peak_memory_fields() == {"peak_mem_MiB": 1100.0, "peak_mem_added_MiB": 100.0}


def test_the_fused_adapter_benchmark_builds_the_kernel_module():
    """The "fused" case times SGAdapterFused(backend="triton") without the per-call finiteness sync."""
    case = bench_adapter.AdapterCase(2, 17, 64, 4, "fp32", "fwd", "fused")
    module = bench_adapter.build_module(case)
    assert isinstance(module, SGAdapterFused) and module.backend == "triton" and module.check_finite is False


# ----------------------------------------------------------------------------------------------
# GPU timing plumbing that runs without a GPU


def test_the_replay_timer_makes_pytest_benchmark_record_the_given_samples():
    samples = [3e-3, 1e-3, 2e-3, 5e-3, 4e-3]
    timer = timing.ReplayTimer(samples)
    durations = []
    for _ in samples:  # what pedantic's runner does per round: timer(), call, timer()
        start = timer()
        timing._noop()
        durations.append(timer() - start)
    assert durations == pytest.approx(samples)


def test_the_replay_timer_through_pytest_benchmark(benchmark):
    """The real fixture: its median is the median of the replayed samples (CPU or GPU alike)."""
    samples = [0.7, 0.1, 0.4, 0.2, 0.9]
    benchmark._timer = timing.ReplayTimer(samples)
    benchmark.pedantic(timing._noop, rounds=len(samples), iterations=1, warmup_rounds=0)
    if not getattr(benchmark, "disabled", False):
        assert benchmark.stats.stats.median == pytest.approx(0.4)
        assert benchmark.stats.stats.min == pytest.approx(0.1)


def test_cpu_timing_records_its_method():
    cpu = timing.Timing(1.0, 1.0, 0.0, 1.0, 3, 2)
    assert cpu.record_fields()["timing_method"] == timing.CPU_TIMING_METHOD
    assert cpu.record_fields()["time_s"] == 1.0 and cpu.record_fields()["iterations"] == 2
    gpu = timing.Timing(1.0, 1.0, 0.0, 1.0, 20, 1, timing.GPU_TIMING_METHOD, 5, 0.1)
    fields = gpu.record_fields()
    assert fields["timing_method"].startswith("cuda-events") and fields["timing_warmup"] == 5
    assert "l2_flush_MiB" in fields and fields["iqr_s"] == 0.1
    t, reps = timing.median_time(lambda: sum(range(100)), target_s=1e-3, min_reps=3, max_reps=10, warmup=1)
    assert 3 <= reps <= 10 and t > 0


def test_the_input_benchmark_measures_a_gpu_decode_loader_on_cpu(tmp_path):
    """The gpu_decode path of bench_input_pipeline (raw bytes from the workers, GpuBatchTransform per batch),
    with the transform on the CPU: the same code the GPU run takes, minus nvJPEG."""
    from sage_fast.training.config import DataConfig
    from sage_fast.training.data import GpuBatchTransform, TrainSampler, build_data, build_loader

    from . import bench_input_pipeline as bip

    info = bip.make_jpeg_folder(tmp_path, files=8, classes=2, repeat=2, processes=1)
    assert info["files"] == 8 and 5 < info["mean_file_KB"] < 500
    cfg = DataConfig(dataset="folder", root=str(tmp_path), num_workers=0, gpu_decode=True, check_images=False,
                     pin_memory=False, allow_duplicates=True)  # the folder's lists repeat files on purpose
    data = build_data(cfg, 64, raw=True)
    loader = build_loader(data.train, 4, TrainSampler(data.train, 4, 1, 0, seed=0), cfg, pin_memory=False, train=True)
    transform = GpuBatchTransform(64, True, "cpu", cfg.crop_scale, cfg.train_augment)
    out = bip.measure(loader, warmup=1, batches=3, transform=transform)
    assert out["images"] == 12 and out["images_per_s"] > 0
