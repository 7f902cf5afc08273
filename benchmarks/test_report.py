"""The arithmetic of the benchmark report: ratios, target verdicts, CPU-smoke labelling, outputs.

Synthetic records with known times, so every expected number is computed by hand here.
"""
from __future__ import annotations

import json

import pytest

from . import ceilings, environment, records, report, timing


def _rec(group, case, impl, time_s, **extra):
    return {"group": group, "case": case, "impl": impl, "time_s": time_s, **extra}


def _write(tmp_path, records, mode="gpu"):
    with open(tmp_path / "records.jsonl", "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    (tmp_path / "env.json").write_text(json.dumps({"mode": mode, "device": "test device", "git_commit": "abc"}))


def _gpu_like_records():
    recs = []
    for r, fused_time, frac in ((4, 1.0, 0.8), (32, 2.0, 0.6)):
        case = f"r={r} bf16 fwdbwd"
        recs += [
            _rec("adapter", case, "eager", 10.0, params={"r": r}),
            _rec("adapter", case, "compile", 4.0, params={"r": r}),
            _rec("adapter", case, "fused", fused_time, params={"r": r}, frac_copy_bw=frac, GBps=100.0),
        ]
    recs += [
        _rec("loss", "fit C=8142 bf16 fwdbwd", "eager", 6.0),
        _rec("loss", "fit C=8142 bf16 fwdbwd", "fused", 1.5),
        _rec("loss", "fit C=8142 bf16 fwd", "fused", 10.0),     # fwd cases do not enter the loss target
        _rec("loss", "fit C=8142 bf16 fwd", "eager", 1.0),
        _rec("train", "floor", "floor", 0.5, images_per_s=256.0),     # head only: not the floor Sage is held to
        _rec("train", "fit_on", "floor_bwd", 1.0, images_per_s=128.0),
        _rec("train", "fit_on", "reference", 3.0, images_per_s=128 / 3.0),
        _rec("train", "fit_on", "fused", 1.1, images_per_s=128 / 1.1),
    ]
    return recs


def test_headlines_compute_ratios_and_verdicts(tmp_path):
    _write(tmp_path, _gpu_like_records())
    rows = {target.split(" (")[0]: (measured, status) for target, measured, status in
            report._headlines(records.load_records(tmp_path), gpu=True)}
    # eager / fused: 10 / 1 = 10x and 10 / 2 = 5x -> the worst case (5x) decides against 4x
    assert rows["SG-Adapter fused fwd+bwd >= 4.0x eager"] == ("min 5.00x, median 7.50x, max 10.00x (2 cases)", "met")
    # compile / fused: 4x and 2x; 2x >= 1.5x
    assert rows["SG-Adapter fused fwd+bwd >= 1.5x torch.compile"][1] == "met"
    # copy fraction 80% and 60%: 60% < 70%
    assert rows["SG-Adapter fused >= 70% of copy bandwidth"] == ("min 60%, median 70%, max 80% (2 cases)", "not met")
    # loss fwd+bwd only: 6 / 1.5 = 4x (the 0.1x fwd case is not part of this target)
    assert rows["Loss fused fwd+bwd >= 3.0x eager at C = 8142"] == ("4.00x", "met")
    # train: 3.0 / 1.1 = 2.73x; floor_bwd (FIT on) 1.0 / 1.1 = 91% of the floor's images/s
    train = [(m, s) for t, m, s in report._headlines(records.load_records(tmp_path)) if t.startswith("Train")]
    assert train == [("2.73x", "met"), ("91% of floor", "met")]


def test_missing_cases_are_not_measured_and_cpu_is_not_judged(tmp_path):
    _write(tmp_path, [_rec("train", "fit_on", "reference", 3.0), _rec("train", "fit_on", "fused", 2.0)], mode="cpu-smoke")
    rows = report._headlines(records.load_records(tmp_path), gpu=False)
    assert rows[0][1:] == ("not measured", "not measured")
    assert rows[4][1:] == ("1.50x", "n/a (CPU smoke, not a GPU measurement)")
    text = report.build_markdown(tmp_path)
    assert "CPU smoke run" in text and "not measured" in text


def test_outputs_and_rebuild_from_benchmark_json(tmp_path):
    _write(tmp_path, _gpu_like_records())
    report.write_outputs(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "10.00x" in summary and "CPU smoke" not in summary  # r=4: eager 10 ms / fused 1 ms
    assert (tmp_path / "chart.png").stat().st_size > 1000
    # pytest-benchmark JSON carries each record in extra_info: records.jsonl can be rebuilt from it
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({"benchmarks": [{"extra_info": r} for r in _gpu_like_records()]}))
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    (rebuilt / "env.json").write_text((tmp_path / "env.json").read_text())
    assert report.main([str(rebuilt), "--from-json", str(bench_json)]) == 0
    assert len(records.load_records(rebuilt)) == len(_gpu_like_records())


def test_recorder_ratios_and_append(tmp_path):
    rec = records.Recorder(tmp_path, append=False)
    info = {}
    rec.add(_rec("adapter", "r=4 fp32 fwd", "fused", 2.0), info)  # baseline not measured yet
    assert "speedup_vs_eager" not in info
    rec.add(_rec("adapter", "r=4 fp32 fwd", "eager", 5.0))
    rec.refresh_ratios()  # at the end of the session, order no longer matters
    assert info["speedup_vs_eager"] == pytest.approx(2.5)
    # a later session appending to the folder keeps the earlier records; a fresh one starts empty
    assert len(records.Recorder(tmp_path, append=True).records) == 2
    assert records.Recorder(tmp_path, append=False).records == []
    assert not (tmp_path / "records.jsonl").exists()


def test_ceilings_measured_once_per_folder_and_device(tmp_path, monkeypatch):
    calls = []

    def fake_measure():
        calls.append(1)
        return {"copy_GBps": 100.0 * len(calls), "matmul_TFLOPs": {"bf16": 1.0}}

    monkeypatch.setattr(ceilings, "measure_ceilings", fake_measure)
    path = tmp_path / "ceilings.json"
    first = ceilings.load_or_measure_ceilings(path, reuse=True)   # nothing saved yet: measures
    assert first["copy_GBps"] == 100.0 and first["device"] == environment.device_name()
    assert ceilings.load_or_measure_ceilings(path, reuse=True) == first  # an appending session reuses them
    assert len(calls) == 1
    assert ceilings.load_or_measure_ceilings(path, reuse=False)["copy_GBps"] == 200.0  # a fresh session measures
    saved = json.loads(path.read_text())
    saved["device"] = "another device"
    path.write_text(json.dumps(saved))
    assert ceilings.load_or_measure_ceilings(path, reuse=True)["copy_GBps"] == 300.0  # not this device's: remeasure


def test_attention_column_names_the_sdpa_kernel(tmp_path):
    recs = [_rec("train", "floor", "floor", 1.0, images_per_s=128.0, attention="sdpa", attention_kernel="sdpa-flash"),
            _rec("train", "fit_on", "reference", 2.0, images_per_s=64.0, attention="xformers",
                 attention_kernel="xformers")]
    _write(tmp_path, recs)
    rows = report._e2e_rows(records.load_records(tmp_path), "train")
    assert [row[-1] for row in rows] == ["sdpa-flash", "xformers"]
    if not timing.ON_GPU:
        assert environment.sdpa_kernel() == "sdpa (cpu)"


def test_error_check_is_shown_and_a_failed_case_does_not_count(tmp_path):
    recs = _gpu_like_records()
    ok = {"rel_err_vs_eager": 3e-7, "rel_err_limit": 1e-5, "rel_err_ok": True, "rel_err_tensor": "out"}
    bad = {"rel_err_vs_eager": 0.3, "rel_err_limit": 0.02, "rel_err_ok": False, "rel_err_tensor": "grad x"}
    for rec in recs:
        rec.update(ok)
    wrong = next(r for r in recs if r["case"] == "r=32 bf16 fwdbwd" and r["impl"] == "fused")
    wrong.update(bad)  # fast (2 ms) but wrong
    _write(tmp_path, recs)
    rows = {target.split(" (")[0]: measured for target, measured, _ in report._headlines(records.load_records(tmp_path))}
    assert rows["SG-Adapter fused fwd+bwd >= 4.0x eager"] == "10.00x"  # only r=4 counts
    text = report.build_markdown(tmp_path)
    assert "1 of 14 compared cases are over their limit" in text
    assert "| adapter | r=32 bf16 fwdbwd | fused | grad x | 3.00e-01 | 2e-02 |" in text
    assert "**FAIL** 3.0e-01 / 2e-02" in text and "3.0e-07 / 1e-05" in text
    assert "over: adapter r=32 bf16 fwdbwd fused" in report.headline_text(tmp_path)


def test_train_rows_compare_with_the_floor_of_the_same_fit_setting(tmp_path):
    recs = [_rec("train", "floor", "floor", 0.5, images_per_s=256.0),
            _rec("train", "fit_on", "floor_bwd", 1.0, images_per_s=128.0),
            _rec("train", "fit_off", "floor_bwd", 0.8, images_per_s=160.0),
            _rec("train", "fit_on", "fused", 1.25, images_per_s=102.4),
            _rec("train", "fit_on", "fused_compile", 1.0, images_per_s=128.0),
            _rec("train", "fit_off", "fused", 1.0, images_per_s=128.0),
            _rec("train", "fit_on", "reference", 2.5, images_per_s=51.2)]
    _write(tmp_path, recs)
    rows = {(r[0], r[1]): r for r in report._e2e_rows(records.load_records(tmp_path), "train")}
    assert [k for k in rows] == [("floor", "–"), ("floor_bwd", "on"), ("reference", "on"), ("fused", "on"),
                                 ("fused_compile", "on"), ("floor_bwd", "off"), ("fused", "off")]
    assert rows[("fused", "on")][6:8] == ["2.00x", "80%"]          # 2.5 / 1.25; floor_bwd on 1.0 / 1.25
    assert rows[("fused_compile", "on")][6:8] == ["2.50x", "100%"]
    assert rows[("fused", "off")][7] == "80%"                      # floor_bwd off 0.8 / 1.0
    assert rows[("floor_bwd", "on")][7] == "–"
    rec = records.Recorder(tmp_path / "r", append=False)
    for r in recs:
        rec.add(dict(r))
    rec.refresh_ratios()
    by = {(r["case"], r["impl"]): r for r in rec.records}
    assert by[("fit_on", "fused")]["vs_floor"] == pytest.approx(0.8)
    assert by[("fit_on", "fused_compile")]["speedup_vs_fused"] == pytest.approx(1.25)
    assert "vs_floor" not in by[("fit_on", "floor_bwd")]


def test_input_pipeline_and_tuning_sections(tmp_path):
    recs = _gpu_like_records() + [
        {"group": "input", "case": "cpu", "impl": "loader", "time_s": 0.1, "images_per_s": 1280.0, "cpu_count": 16,
         "params": {"workers": 16, "width": 500, "height": 375, "batch": 128, "files": 2048, "repeat": 3,
                    "mean_file_KB": 40.0, "image_size": 224, "warmup_batches": 16, "timed_batches": 32}},
        {"group": "input", "case": "gpu_decode", "impl": "loader", "time_s": 0.02, "images_per_s": 6400.0,
         "cpu_count": 16, "params": {"workers": 16}},
    ]
    _write(tmp_path, recs)
    tune_log = {"device": "test device", "sms": 132, "budget_s": 150, "elapsed_s": 97.0, "timing": "events",
                "min_margin": 0.03, "precompile": {"done": 10, "submitted": 12, "workers": 14, "failed": 1},
                "problems": [
                    {"problem": "fwd d=768 r=32 bfloat16", "status": "decided", "base_times_s": [1e-4, 1e-4],
                     "candidates": [{"status": "timed"}, {"status": "rejected by the gate"}, {"status": "timed"}],
                     "decision": {"winner": {"block_m": 64, "block_d": 128, "num_warps": 4, "num_stages": None},
                                  "best": {"block_m": 64, "block_d": 128, "num_warps": 4, "num_stages": None},
                                  "speedup": 0.25, "noise": 0.01, "margin": 0.03}},
                    {"problem": "loss C=8142 fit float32", "status": "skipped: out of time budget", "base_times_s": [],
                     "candidates": [], "decision": None}]}
    (tmp_path / "tune.json").write_text(json.dumps(tune_log))
    text = report.build_markdown(tmp_path)
    # fused train step FIT on: 128 / 1.1 = 116.4 images/s; the CPU loader 1280 images/s keeps up
    assert "| cpu | 16 | 16 | 1280 | 1100% | yes |" in text
    assert "| gpu_decode | 16 | 16 | 6400 |" in text
    assert "| fwd d=768 r=32 bfloat16 | decided | 100.0 | m64 d128 w4 | 80.0 | +25.0% | 1.0% | 2 / 1 | **yes** |" in text
    assert "| loss C=8142 fit float32 | skipped: out of time budget | – | – | – | – | – | 0 / 0 | no |" in text


def test_peak_memory_of_every_train_variant_is_in_the_summary(tmp_path):
    recs = [_rec("train", case, impl, t, images_per_s=128 / t, peak_mem_MiB=mem, peak_mem_added_MiB=mem - 1000)
            for case, impl, t, mem in (("fit_on", "reference", 3.0, 30000.0), ("fit_on", "fused", 1.5, 21000.0),
                                       ("fit_off", "reference", 2.0, 25000.0), ("fit_off", "fused", 1.0, 18000.0))]
    _write(tmp_path, recs)
    rows = {(r[0], r[1]): r for r in report._e2e_rows(records.load_records(tmp_path), "train")}
    assert rows[("reference", "on")][4:6] == ["30000", "29000"]
    assert rows[("fused", "off")][4:6] == ["18000", "17000"]
    text = report.build_markdown(tmp_path)
    assert "| peak MiB | added MiB |" in text and "| fused | on | 85.3 | 1500.000 | 21000 | 20000 | 2.00x |" in text


def test_encoder_section_compares_the_attention_kernels(tmp_path):
    ok = {"rel_err_vs_eager": 4e-3, "rel_err_limit": 2e-2, "rel_err_ok": True, "rel_err_tensor": "grad images"}
    params = {"model": "ViT-B-16-quickgelu", "image_size": 224, "batch": 128, "precision": "bf16 autocast"}
    recs = [_rec("encoder", "fwdbwd", "open_clip", 0.10, images_per_s=1280.0, attention="open_clip",
                 peak_mem_MiB=9000.0, peak_mem_added_MiB=8600.0, params=params, **ok),
            _rec("encoder", "fwdbwd", "sdpa", 0.08, images_per_s=1600.0, attention="sdpa", attention_kernel="sdpa-flash",
                 peak_mem_MiB=7000.0, peak_mem_added_MiB=6600.0, params=params, **ok)]
    _write(tmp_path, recs)
    text = report.build_markdown(tmp_path)
    assert "## Frozen image encoder, forward + backward, by attention kernel" in text
    assert "| sdpa | sdpa-flash | 1600.0 | 80.000 | 7000 | 6600 | 1.25x | 4.0e-03 / 2e-02 |" in text  # 0.10 / 0.08
    assert "| xformers | – | – | – | – | – | – | not run (see Skipped cases) |" in text
    rec = records.Recorder(tmp_path / "r", append=False)
    for r in recs:
        rec.add(dict(r))
    rec.refresh_ratios()
    assert {r["impl"]: r.get("speedup_vs_open_clip") for r in rec.records} == {"open_clip": None,
                                                                                "sdpa": pytest.approx(1.25)}


def test_records_are_read_in_one_place_by_the_recorder_and_the_report(tmp_path):
    """A record written by the Recorder reads back through records.load_records (which the report and an
    appending session use), a later measurement of the same slot winning, and through the benchmark JSON."""
    rec = records.Recorder(tmp_path, append=False)
    info: dict = {}
    rec.add(_rec("encoder", "fwdbwd", "sdpa", 2.0, params={"batch": 4}), info)
    rec.add(_rec("encoder", "fwdbwd", "sdpa", 1.0, params={"batch": 4}))   # measured again: this one counts
    back = records.load_records(tmp_path)
    assert len(back) == 1 and back[0]["time_s"] == 1.0 and back[0]["device"] == environment.device_name()
    assert records.Recorder(tmp_path, append=True).records == back
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({"benchmarks": [{"extra_info": info}, {"extra_info": {"no": "record"}}]}))
    assert [r["time_s"] for r in records.records_from_benchmark_json([bench_json])] == [2.0]
    records.write_records(tmp_path / "copy", back)
    assert records.load_records(tmp_path / "copy") == back
    path = records.write_json(tmp_path / "env.json", {"b": 1, "a": [1, 2]})
    assert records.read_json(path) == {"a": [1, 2], "b": 1} and records.read_json(tmp_path / "none.json", 7) == 7
