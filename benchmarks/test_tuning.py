"""The tuner (benchmarks/tuning/) without a GPU: its grid, the committed pre-filtered grid, the correctness
gate, the decision, the budget, the table it writes, and that it launches the kernels exactly as the glue
does. One test runs the whole tuner on tiny problems in Triton's interpreter (a child process).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from sage_fast.ops import launch
from sage_fast.ops.launch import LossLaunch, RowLaunch, WeightGradLaunch

from .tuning import candidates, launches, measure, precompile, prefilter, problems, table, tuner
from .tuning.compile_sm90 import REPO_ROOT

f32, bf16 = torch.float32, torch.bfloat16


# ----------------------------------------------------------------------------------------------
# the grid


@pytest.mark.parametrize("p", problems.gpu_problems(), ids=lambda p: p.name)
def test_grid_starts_with_the_heuristic_and_holds_valid_distinct_candidates(p):
    cands = candidates.grid(p)
    assert cands[0] == candidates.heuristic(p) and len(set(cands)) == len(cands)
    assert 10 <= len(cands) <= 60, len(cands)
    assert all(isinstance(c, problems.CONFIG_TYPES[p.kernel]) for c in cands)
    # nearest to the heuristic first (the pipelining-depth variants of the heuristic close the list)
    dist = [candidates.distance(c, cands[0]) for c in cands if c.num_stages is None]
    assert dist == sorted(dist)
    assert sum(c.num_stages is not None for c in cands) == (2 if p.kernel == "loss" else 3)
    if p.kernel == "dw":
        row_blocks = launch.cdiv(p.rows, 32)
        assert all(1 <= c.split <= row_blocks for c in cands)
        assert candidates.heuristic(p) == launch.gpu_weight_grad_launch(p.d, p.h, p.rows, problems.DEFAULT_SMS)
        more = candidates.split_variants(p, cands[:3], problems.DEFAULT_SMS)
        assert more and all(c not in cands[:3] and c.split != 0 for c in more)
    if p.kernel == "loss":
        assert all(4 <= c.block_b * c.block_c / (32 * c.num_warps) <= 32 for c in cands[1:] if c.num_stages is None)


def test_the_gpu_problems_are_the_benchmark_shapes():
    names = [p.name for p in problems.gpu_problems()]
    assert names[:3] == ["fwd d=768 r=32 bfloat16", "dx d=768 r=32 bfloat16", "dw d=768 r=32 bfloat16"]
    assert {p.r for p in problems.gpu_problems() if p.kernel != "loss"} == {4, 8, 32, 256}
    assert all(p.rows == 128 * 197 for p in problems.gpu_problems() if p.kernel != "loss")
    assert {(p.classes, p.fit, p.batch) for p in problems.gpu_problems() if p.kernel == "loss"} == {
        (8142, True, 512), (1000, True, 512), (8142, False, 512)}
    key = problems.gpu_problems()[0].key("NVIDIA H100 80GB HBM3")
    assert key == ("NVIDIA H100 80GB HBM3", 768, 32, bf16)
    assert problems.gpu_problems()[-1].key("X") == ("X", 8142, f32, False)


def test_the_committed_grid_file_is_the_prefiltered_current_grid():
    """benchmarks/tuning/grid.json holds a verdict for every candidate the generator makes today (rerun
    `python -m benchmarks.tuning prefilter` after changing the grid), and the heuristics pass it."""
    data = candidates.load_grid_file()
    assert data is not None, "benchmarks/tuning/grid.json is missing: run python -m benchmarks.tuning prefilter"
    for p in problems.gpu_problems():
        entry = data["problems"][p.name]
        known = {e["key"] for e in entry["passed"]} | {e["key"] for e in entry["rejected"]}
        want = {candidates.compile_key(p.kernel, c) for c in candidates.grid(p)}
        assert known == want, f"{p.name}: the grid file is stale (rerun the prefilter)"
        assert candidates.compile_key(p.kernel, candidates.heuristic(p)) in {e["key"] for e in entry["passed"]}
        cands, rejected = candidates.filtered_grid(p, problems.DEFAULT_SMS, data)
        assert cands[0] == candidates.heuristic(p) and len(cands) >= 5
        assert not any(candidates.compile_key(p.kernel, c) in rejected for c in cands[1:])


def test_prefilter_classifies_the_compile_report():
    p = problems.Problem("fwd", "bfloat16", d=768, r=4, rows=25216)
    items = prefilter.grid_items([p])
    cases = []
    for i, item in enumerate(items):
        case = {"ok": True, "error": None, "shared": 1024, "spill_stores": 0, "spill_loads": 0, "registers": 100,
                "labels": [item["label"]]}
        if i == 1:
            case.update(spill_stores=400, spill_loads=400, registers=255)
        if i == 2:
            case.update(shared=300_000)
        if i == 3:
            case.update(ok=False, error="RuntimeError: boom")
        cases.append(case)
    out = prefilter.classify({"cases": cases}, [p], {"spill_bytes": 32, "shared_bytes": 232448})[p.name]
    assert len(out["passed"]) == len(items) - 3
    reasons = sorted(r["reason"].split()[0] for r in out["rejected"])
    assert reasons == ["300000", "does", "register"]


# ----------------------------------------------------------------------------------------------
# the gate and the decision


def test_the_gate_rejects_wrong_and_unwritten_outputs():
    want = {"out": torch.randn(64, 32).to(bf16), "mean": torch.randn(64), "status": torch.zeros(64, dtype=torch.int32)}
    same = {k: v.clone() for k, v in want.items()}
    assert measure.gate(same, want)[0]
    fp32_noise = dict(same, mean=want["mean"] * (1 + 1e-5))
    assert measure.gate(fp32_noise, want)[0]
    assert not measure.gate(dict(same, mean=want["mean"] * 1.01), want)[0]  # 1% in fp32: over 1e-3
    assert measure.gate(dict(same, out=(want["out"].float() * 1.004).to(bf16)), want)[0]  # bf16 rounding
    ok, name, ratio = measure.gate(dict(same, out=want["out"] * 1.1), want)
    assert not ok and name == "out" and ratio > 1
    unwritten = same["out"].clone()
    unwritten[3, 5] = float("nan")  # a poisoned element the candidate did not write
    assert measure.gate(dict(same, out=unwritten), want) == (False, "out", math.inf)
    assert not measure.gate(dict(same, status=torch.ones(64, dtype=torch.int32)), want)[0]
    assert not measure.gate(dict(same, mean=want["mean"][:32]), want)[0]


def test_decide_needs_a_margin_over_the_noise():
    base = RowLaunch(64, 64, 8)
    a, b = RowLaunch(32, 64, 8), RowLaunch(128, 32, 4)
    d = measure.decide(base, [1.00, 1.01, 0.99], {a: [0.90, 0.905], b: [0.95, 0.95]})
    assert d.winner == a and d.speedup == pytest.approx(1 / 0.9025 - 1) and d.margin == pytest.approx(0.03)
    assert measure.decide(base, [1.0, 1.0, 1.0], {a: [0.98, 0.98]}).winner is None  # 2% < 3%
    noisy = measure.decide(base, [1.0, 1.25, 0.95], {a: [0.85, 0.86]})
    assert noisy.winner is None and noisy.noise == pytest.approx(0.30) and "within" in noisy.reason
    assert measure.decide(base, [1.0, 1.0], {a: [0.9, 1.2, 0.95]}).winner is None  # its own spread: 0.3 / 0.95
    assert measure.decide(base, [1.0], {a: [0.5, 0.5]}).winner is None  # noise unknown
    assert measure.decide(base, [1.0, 1.0], {a: [0.5]}).winner is None  # never re-timed
    assert measure.decide(base, [1.0, 1.0], {base: [0.5, 0.5]}).winner is None  # the heuristic itself
    assert measure.decide(base, [1.0, 1.0], {}).reason.startswith("no candidate")


class FakeRunner:
    """A kernel stand-in: outputs and times per configuration, and a clock that each timing advances."""

    def __init__(self, times: dict, wrong=(), step_s: float = 1.0):
        self.times, self.wrong, self.step_s = times, set(wrong), step_s
        self.now = 0.0
        self.timed: list = []
        self.out = {"out": torch.linspace(1, 2, 100)}

    def clock(self) -> float:
        return self.now

    def outputs(self, cfg):
        self.now += self.step_s / 10
        got = {k: v.clone() for k, v in self.out.items()}
        if cfg in self.wrong:
            got["out"][7] += 0.5
        return got

    def time(self, cfg, target_s=None):
        self.now += self.step_s
        self.timed.append(cfg)
        return self.times[cfg]


P_FWD = problems.Problem("fwd", "bfloat16", d=768, r=32, rows=25216)


def test_a_wrong_candidate_is_rejected_before_it_is_timed():
    cands = candidates.grid(P_FWD)[:5]
    base = cands[0]
    times = {c: 1.0 for c in cands}
    times[cands[1]] = 0.5   # the fastest, but wrong: must never win
    times[cands[2]] = 0.8
    runner = FakeRunner(times, wrong=[cands[1]])
    res = measure.tune_problem(P_FWD, runner, base, cands, deadline=1e9, clock=runner.clock)
    entry = {json.dumps(e["config"]): e for e in res.candidates}[json.dumps(problems.config_to_json(cands[1]))]
    assert entry["status"] == "rejected by the gate" and entry["gate_output"] == "out"
    assert cands[1] not in runner.timed
    assert res.decision.winner == cands[2] and res.status == "decided"
    assert len(res.base_times) >= 3 + measure.CONFIRM_ROUNDS - 1  # start, middle, end, and the confirmation rounds


def test_a_compile_failure_and_a_launch_failure_reject_the_candidate():
    cands = candidates.grid(P_FWD)[:4]
    runner = FakeRunner({c: 1.0 for c in cands})
    real_outputs = runner.outputs

    def outputs(cfg):
        if cfg == cands[2]:
            raise RuntimeError("out of resources: shared memory")
        return real_outputs(cfg)

    runner.outputs = outputs
    res = measure.tune_problem(P_FWD, runner, cands[0], cands, 1e9, runner.clock,
                            wait=lambda c: "CompilationError: boom" if c == cands[1] else None)
    status = [e["status"] for e in res.candidates]
    assert status == ["compile failed", "launch failed", "timed"]
    assert res.decision.winner is None  # all as fast as the heuristic


def test_the_budget_cuts_a_sweep_and_keeps_what_it_measured():
    cands = candidates.grid(P_FWD)
    times = {c: 1.0 - 0.01 * i for i, c in enumerate(cands)}
    runner = FakeRunner(times, step_s=1.0)
    # each timing costs 1 s of the fake clock; the confirmation reserve is (3 + 1) x 3 x 1.5 s
    res = measure.tune_problem(P_FWD, runner, cands[0], cands, deadline=25.0, clock=runner.clock)
    timed = [e for e in res.candidates if e["status"] == "timed"]
    assert res.status == "decided (sweep cut by the budget)"
    assert 0 < len(timed) < len(cands) - 1
    assert res.decision is not None and res.decision.best is not None
    # the best of what was measured, confirmed
    measured = {json.dumps(e["config"]) for e in timed}
    assert set(res.confirm) <= measured


def test_budget_shares():
    now = [0.0]
    budget = measure.Budget(100.0, clock=lambda: now[0], reserve_s=4.0)
    assert budget.share(4) == pytest.approx(24.0)
    now[0] = 50.0
    assert budget.left() == pytest.approx(46.0) and budget.share(2) == pytest.approx(23.0)
    now[0] = 120.0
    assert budget.share(1) == 0.0


# ----------------------------------------------------------------------------------------------
# the table


def _result(p, device, winner, status="decided", speedup=0.1):
    r = measure.ProblemResult(p, p.key(device), candidates.heuristic(p))
    r.status = status
    r.base_times = [1.0, 1.0]
    if winner is not None:
        r.confirm = {json.dumps(problems.config_to_json(winner)): [0.9, 0.9]}
    r.decision = measure.Decision(winner, winner, speedup, 0.01, 0.03, "test") if status.startswith("decided") else None
    return r


def test_the_written_table_replaces_only_the_decided_keys(tmp_path, monkeypatch):
    dev = "Test GPU"
    p32, p4, p8 = (problems.Problem("fwd", "bfloat16", d=768, r=r, rows=25216) for r in (32, 4, 8))
    loss = problems.Problem("loss", "float32", classes=8142, batch=512, fit=True)
    other = launch.TunedEntry("fwd", ("Other GPU", 768, 32, bf16), RowLaunch(32, 32, 4))
    old4 = launch.TunedEntry("fwd", p4.key(dev), RowLaunch(128, 64, 4))
    old8 = launch.TunedEntry("fwd", p8.key(dev), RowLaunch(128, 32, 4))
    results = [
        _result(p32, dev, RowLaunch(64, 128, 8)),            # a new winner
        _result(p4, dev, None),                               # decided: the heuristic stays, old entry goes
        _result(p8, dev, None, status="not reached"),         # not decided: the committed entry stays
        _result(loss, dev, LossLaunch(2, 1024, 8)),
    ]
    entries = table.merge_table([other, old4, old8], results, dev, lambda r: {"speedup": r.decision.speedup})
    got = {(e.kernel, e.key): e.config for e in entries}
    assert got == {("fwd", other.key): other.config, ("fwd", old8.key): old8.config,
                   ("fwd", p32.key(dev)): RowLaunch(64, 128, 8), ("loss", loss.key(dev)): LossLaunch(2, 1024, 8)}
    path = launch.write_table(tmp_path / "t.json", entries)
    assert {(e.kernel, e.key): e.config for e in launch.read_table(path)} == got
    # and the glue picks them on that device
    monkeypatch.setattr(launch.backend, "interpret_enabled", lambda: False)
    monkeypatch.setattr(launch, "device_info", lambda device: (dev, 132))
    saved = launch.installed_entries()
    try:
        launch.load_tuned_tables(path)
        assert launch.row_launch(768, 64, bf16, "cuda") == RowLaunch(64, 128, 8)
        assert launch.row_launch(768, 64, bf16, "cuda", kernel="dx") == launch.gpu_row_launch(768, 64, bf16)
        assert launch.select_loss_launch(512, 8142, f32, True, "cuda") == LossLaunch(2, 1024, 8)
    finally:
        launch.install_table(saved)


def _stub_the_measurement(monkeypatch, fake_tune_problem):
    """A run whose problems are decided by `fake_tune_problem`, with no data made and no kernel run."""
    monkeypatch.setattr(tuner, "tune_problem", fake_tune_problem)
    monkeypatch.setattr(tuner, "DataCache", lambda device, sms: types.SimpleNamespace(get=lambda p: None))
    monkeypatch.setattr(tuner, "KernelRunner", lambda *a, **k: types.SimpleNamespace(release=lambda: None,
                                                                                      estimate_reps=1))


def test_an_interrupted_run_keeps_the_problems_it_decided(tmp_path, monkeypatch):
    """SIGINT (run_gpu.sh's limit) in the second problem: the first one's winner is in the table."""
    probs = [problems.Problem("fwd", "float32", d=64, r=4, rows=96), problems.Problem("dx", "float32", d=64, r=4, rows=96)]
    winner = RowLaunch(128, 32, 4)
    calls = []

    def fake_tune_problem(p, runner, base, cands, deadline, clock, wait, sms, log, key, **kw):
        calls.append(p)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _result(p, key[0], winner)

    _stub_the_measurement(monkeypatch, fake_tune_problem)
    base = launch.write_table(tmp_path / "base.json", [])
    out = tmp_path / "out"
    content = tuner.run(probs, out, 60, out / "table.json", base_table=base, grid_path=None, device="cpu",
                       log=lambda s: None)
    assert content["final"] and [p["status"] for p in content["problems"]] == ["decided", "not reached"]
    entries = launch.read_table(out / "table.json")
    assert [(e.kernel, e.config) for e in entries] == [("fwd", winner)]
    assert json.loads((out / "tune.json").read_text())["problems"][0]["decision"]["winner"] == dataclasses.asdict(winner)


# ----------------------------------------------------------------------------------------------
# the launches: the tuner passes what the glue passes


class _Capture:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log
        self.arg_names = fn.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn.__name__, tuple(grid), args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        self.log.append((self.fn.__name__, tuple(grid), args, kwargs))


def _proxy(module, log):
    ns = types.SimpleNamespace(**{k: v for k, v in vars(module).items() if not k.startswith("__")})
    for name in ("sg_adapter_fwd_kernel", "sg_adapter_bwd_dx_kernel", "sg_adapter_bwd_dw_kernel",
                 "fit_la_loss_fwd_kernel"):
        if hasattr(module, name):
            setattr(ns, name, _Capture(getattr(module, name), log))
    return ns


# outputs (uninitialised on both sides: compared by dtype, shape and strides only)
_OUTPUTS = {"OUT", "MEAN", "RSTD", "DX", "ACT", "DH", "DS_PART", "DBCAT_PART", "DWCAT_PART", "DWUP_PART", "DBUP_PART",
            "loss_ptr", "ds_ptr", "status_ptr", "dz_ptr", "dzv_ptr", "dzt_ptr", "zhat_ptr"}


def _same_launch(glue, ours, arg_names):
    assert glue[0] == ours[0] and glue[1] == ours[1], (glue[:2], ours[:2])
    assert glue[3] == ours[3]
    assert len(glue[2]) == len(ours[2])
    for name, a, b in zip(arg_names, glue[2], ours[2]):
        if isinstance(a, torch.Tensor):
            assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()), name
            if name not in _OUTPUTS:
                assert torch.equal(a, b), name
        else:
            assert type(a) is type(b) and a == b, name


@pytest.mark.parametrize("kernel", ["fwd", "dx", "dw"])
def test_the_tuner_launches_the_adapter_kernels_as_the_glue_does(kernel, monkeypatch):
    import sage_fast.ops.sg_adapter as fa
    from sage_fast.kernels import sg_adapter as ka

    p = problems.Problem(kernel, "float32", d=64, r=4, rows=96)
    cfg = {"fwd": RowLaunch(32, 32, 4, 2), "dx": RowLaunch(64, 16, 8), "dw": WeightGradLaunch(32, 32, 16, 3, 4, 1)}[kernel]
    log: list = []
    monkeypatch.setattr(fa, "_kernels", _proxy(ka, log))
    if kernel == "dw":
        monkeypatch.setattr(launch, "weight_grad_launch", lambda *a, **k: cfg)
    else:
        monkeypatch.setattr(launch, "row_launch", lambda *a, kernel="fwd", k=kernel: cfg if kernel == k
                            else launch.gpu_row_launch(a[0], a[1], a[2]))
    gen = torch.Generator().manual_seed(0)
    t = {"x": torch.randn(96, 64, generator=gen), "mlp": torch.randn(96, 64, generator=gen),
         "dout": torch.randn(96, 64, generator=gen), "w_cat": torch.randn(64, 8, generator=gen),
         "b_cat": torch.randn(8, generator=gen), "w_up": torch.randn(64, 8, generator=gen),
         "b_up": torch.randn(64, generator=gen), "scale": torch.tensor(launches.SCALE)}
    mean, rstd = torch.randn(96), torch.rand(96) + 0.5
    fa.sg_adapter_fwd(t["x"], t["w_cat"], t["b_cat"], t["w_up"], t["b_up"], t["scale"], t["mlp"], launches.ALPHA,
                      launches.EPS, f32)
    if kernel != "fwd":
        fa.sg_adapter_bwd(t["dout"], t["x"], mean, rstd, t["w_cat"], t["b_cat"], t["w_up"], t["b_up"], t["scale"],
                          launches.ALPHA, f32)
    name = {"fwd": "sg_adapter_fwd_kernel", "dx": "sg_adapter_bwd_dx_kernel", "dw": "sg_adapter_bwd_dw_kernel"}[kernel]
    glue = [e for e in log if e[0] == name]
    assert len(glue) == 1
    data = launches.adapter_data(p, "cpu", tensors=t)
    data.mean, data.rstd = mean, rstd
    if kernel == "dw":  # the glue's act and dh come from its (captured, never run) dx launch
        dx_args = next(e for e in log if e[0] == "sg_adapter_bwd_dx_kernel")[2]
        data.act, data.dh = dx_args[11], dx_args[12]
    ours: list = []
    fn, grid, args, kwargs = launches.launch_spec(_proxy(ka, ours), p, data, cfg, launches.alloc_outputs(p, data, cfg))
    fn[grid](*args, **kwargs)
    _same_launch(glue[0], ours[0], getattr(ka, name).arg_names)


@pytest.mark.parametrize("fit", [True, False], ids=["fit", "la"])
def test_the_tuner_launches_the_loss_kernel_as_the_glue_does(fit, monkeypatch):
    import sage_fast.ops.la_loss as fl
    from sage_fast.kernels import la_loss as kl

    p = problems.Problem("loss", "float32", classes=100, batch=8, fit=fit)
    cfg = LossLaunch(2, 64, 2, 1)
    log: list = []
    proxy = _proxy(kl, log)
    monkeypatch.setattr(fl, "_kernels", lambda: proxy)
    monkeypatch.setattr(launch, "select_loss_launch", lambda *a: cfg)
    data = launches.loss_data(p, "cpu")
    zv, zt = (data.zv, data.zt) if fit else (None, None)
    fl._fit_la_loss_forward(data.z, zv, zt, data.s, data.target, data.log_prior, data.lambdas, -100,
                            (True, fit, fit), fit)
    ours: list = []
    fn, grid, args, kwargs = launches.launch_spec(_proxy(kl, ours), p, data, cfg, launches.alloc_outputs(p, data, cfg))
    fn[grid](*args, **kwargs)
    _same_launch(log[0], ours[0], kl.fit_la_loss_fwd_kernel.arg_names)


@pytest.mark.parametrize("p", [problems.gpu_problems()[i] for i in (0, 1, 2, 12, 14)], ids=lambda p: p.name)
def test_a_compile_worker_builds_complete_launches_on_placeholders(p, monkeypatch):
    """What a precompile worker does (`_warm`), with the kernels' warmup recorded instead of compiled."""
    log: list = []
    real = launches.kernel_module
    monkeypatch.setattr(precompile, "kernel_module", lambda prob: _proxy(real(prob), log))
    precompile._PLACEHOLDERS.clear()
    for c in candidates.grid(p)[:3]:
        precompile._warm(p.to_json(), problems.config_to_json(c))
    assert len(log) == 3 and all(isinstance(a, (torch.Tensor, int, float)) for a in log[0][2])
    assert log[0][3]["num_warps"] == candidates.grid(p)[0].num_warps


# ----------------------------------------------------------------------------------------------
# the whole tuner, on tiny problems, in Triton's interpreter


def test_the_tuner_runs_end_to_end_in_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    base = launch.write_table(tmp_path / "base.json", [])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.tuning", "run", "--results", str(tmp_path / "out"), "--budget-s", "120",
         "--base-table", str(base), "--max-candidates", "3"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    log = json.loads((tmp_path / "out" / "tune.json").read_text())
    assert log["final"] and [p["problem"] for p in log["problems"]] == [p.name for p in problems.smoke_problems()]
    for prob in log["problems"]:
        assert prob["status"] == "decided", prob
        assert all(c["status"] == "timed" for c in prob["candidates"]), prob["candidates"]
        assert len(prob["base_times_s"]) >= 3
    entries = launch.read_table(tmp_path / "out" / "tuned_launch.json")
    assert all(e.key[0] == "cpu (interpreter)" for e in entries)


def test_the_run_shares_its_budget_and_skips_what_it_cannot_reach(tmp_path, monkeypatch):
    """Budget 20 s (2 s kept for writing): the first problem may use 6 s (a third), takes 4 s; the
    second gets (20 - 2 - 4) / 2 = 7 s, takes 13.5 s (a sweep overrunning its share); nothing is left
    for the third, which is skipped; the first two are decided and in the log."""
    probs = [problems.Problem("fwd", "float32", d=64, r=r, rows=96) for r in (4, 8, 16)]
    now = [0.0]
    shares = []

    def fake_tune_problem(p, runner, base, cands, deadline, clock, wait, sms, log, key, **kw):
        shares.append(deadline - clock())
        now[0] += 4.0 if len(shares) == 1 else 13.5
        return _result(p, key[0], None)

    _stub_the_measurement(monkeypatch, fake_tune_problem)
    base = launch.write_table(tmp_path / "base.json", [])
    content = tuner.run(probs, tmp_path / "out", 20.0, tmp_path / "out" / "t.json", base_table=base,
                       grid_path=None, device="cpu", log=lambda s: None, clock=lambda: now[0])
    assert shares == pytest.approx([6.0, 7.0])
    assert [p["status"] for p in content["problems"]] == ["decided", "decided", "skipped: out of time budget"]


def test_an_error_in_a_problem_stops_the_run_and_keeps_what_was_decided(tmp_path, monkeypatch):
    probs = [problems.Problem("fwd", "float32", d=64, r=r, rows=96) for r in (4, 8, 16)]
    winner = RowLaunch(128, 32, 4)
    calls = []

    def fake_tune_problem(p, runner, base, cands, deadline, clock, wait, sms, log, key, **kw):
        calls.append(p)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return _result(p, key[0], winner)

    _stub_the_measurement(monkeypatch, fake_tune_problem)
    base = launch.write_table(tmp_path / "base.json", [])
    content = tuner.run(probs, tmp_path / "out", 60, tmp_path / "out" / "t.json", base_table=base, grid_path=None,
                       device="cpu", log=lambda s: None)
    assert [p["status"][:7] for p in content["problems"]] == ["decided", "failed:", "not rea"]
    assert "illegal memory access" in content["error"] and len(calls) == 2
    assert [e.config for e in launch.read_table(tmp_path / "out" / "t.json")] == [winner]
