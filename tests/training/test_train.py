"""Trainer on CPU: end to end on a tiny image folder, outputs, metrics, kill-and-resume, torchrun + gloo DDP.

The tiny set: 6 classes with 105 / 30 / 20 / 8 / 4 / 3 training images (one many-, two medium-, three
few-shot classes), 4 test images each, 32x32 PNG; the tiny open_clip config (random weights).
"""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.images import make_image_folder
from safetensors.torch import load_file

from sage_fast.cli import main as cli_main
from sage_fast.training.config import build_config
from sage_fast.training.checkpoint import load_weights
from sage_fast.utils.files import atomic_torch_save
from sage_fast.training.distributed import resolve_device
from sage_fast.training.trainer import Trainer, cosine_lambda, train
from sage_fast.training.metrics import accuracy_report, plot_per_class

COUNTS = (105, 30, 20, 8, 4, 3)
TEST_PER_CLASS = 4


def run_overrides(data_root, out_dir, **extra):
    o = {
        "data.dataset": "folder", "data.root": str(data_root), "data.class_names": "classnames.txt",
        "data.num_workers": 0, "model.name": "sage-tiny", "model.pretrained": None,
        "model.backend": "torch", "model.text_batch_size": 64,
        "optim.epochs": 2, "optim.batch_size": 16, "optim.lr": 0.05, "train.output_dir": str(out_dir),
        "train.ckpt_every_steps": 3, "train.log_every_steps": 2, "train.eval_every_epochs": 1,
        "train.eval_batch_size": 16, "train.progress": False,
    }
    o.update(extra)
    return o


def cfg_for(data_root, out_dir, **extra):
    return build_config(overrides=run_overrides(data_root, out_dir, **extra))


# The tiny set and the reference run are made once per module; each test gets its own copy of them, so
# no test can see what another one changed (or wrote next to them).


@pytest.fixture(scope="module")
def _tiny_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tiny_data"), COUNTS, TEST_PER_CLASS)


@pytest.fixture(scope="module")
def _reference_run(_tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_run")
    report = train(cfg_for(_tiny_data, out))
    return out, report


@pytest.fixture()
def tiny(_tiny_data, tmp_path):
    """This test's copy of the tiny image folder."""
    return Path(shutil.copytree(_tiny_data, tmp_path / "tiny_data"))


@pytest.fixture()
def reference(_reference_run, tmp_path):
    """One uninterrupted two-epoch run on the tiny set: (this test's copy of its output folder, its report)."""
    out, report = _reference_run
    return Path(shutil.copytree(out, tmp_path / "ref_run")), copy.deepcopy(report)


# ---------------------------------------------------------------- metrics


def test_accuracy_report_groups():
    group_counts = [150, 101, 100, 20, 19, 1, 5]
    total = torch.tensor([10, 10, 10, 10, 10, 10, 0])
    correct = torch.tensor([10, 5, 4, 6, 0, 10, 0])
    r = accuracy_report(correct, total, group_counts)
    assert r["overall"] == pytest.approx(100 * 35 / 60)
    assert r["many"] == pytest.approx(75.0)         # classes 0, 1 (> 100)
    assert r["medium"] == pytest.approx(50.0)       # classes 2, 3 (20 to 100)
    assert r["few"] == pytest.approx(50.0)          # classes 4, 5 (< 20); class 6 has no test image
    assert np.isnan(r["per_class"][6]) and r["per_class"][1] == 50.0 and r["test_images"] == 60
    assert np.isnan(accuracy_report(correct[:1], total[:1], [5])["many"])


def test_cosine_schedule():
    f = cosine_lambda(10)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0) and f(20) == pytest.approx(0.0)


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)

    def broken(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # the partial temporary file is gone


def test_per_class_plot_with_groups_from_other_counts(tmp_path):
    """CIFAR-100-LT ratio 10: the groups follow ratio 100's counts, not the plotted ones."""
    png = tmp_path / "p.png"
    plot_per_class(png, [90.0, 50.0, float("nan")], [500, 120, 50], "r10", group_counts=[500, 80, 5])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".*"))


def test_device_resolution_under_torchrun():
    assert resolve_device("auto", 1, 0, cuda_available=False) == "cpu"
    assert resolve_device("auto", 2, 1, cuda_available=True) == "cuda:1"
    assert resolve_device("cuda", 4, 3, cuda_available=True) == "cuda:3"
    assert resolve_device("cuda:1", 1, 0, cuda_available=True) == "cuda:1"  # one process: the GPU asked for
    assert resolve_device("cpu", 2, 1, cuda_available=True) == "cpu"
    with pytest.raises(ValueError, match="every process would use that GPU"):
        resolve_device("cuda:1", 2, 0, cuda_available=True)


# ---------------------------------------------------------------- end to end


def test_train_writes_metrics_logs_plot_checkpoint(reference):
    out, report = reference
    for k in ("overall", "many", "medium", "few"):
        assert 0.0 <= report[k] <= 100.0
    assert report["test_images"] == TEST_PER_CLASS * len(COUNTS) and report["skipped"] == 0
    assert len(report["per_class"]) == len(COUNTS)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"] == pytest.approx(report["overall"]) and metrics["epoch"] == 2
    assert metrics["step"] == 2 * (sum(COUNTS) // 16)
    rows = (out / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,name,train_count,group_count,group,accuracy" and len(rows) == 1 + len(COUNTS)
    assert rows[1].startswith('0,"colour_0",105,105,many') and ",medium," in rows[2] and ",few," in rows[6]
    assert (out / "per_class_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (out / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,epoch,loss,lr,images_per_s"
    steps = [int(r.split(",")[0]) for r in log[1:]]
    assert steps == sorted(steps) and steps[-1] == metrics["step"]
    lrs = [float(r.split(",")[3]) for r in log[1:]]
    assert lrs[0] == pytest.approx(0.05 * cosine_lambda(20)(1)) and all(a > b for a, b in zip(lrs, lrs[1:]))
    evals = (out / "eval_log.csv").read_text().splitlines()
    assert len(evals) == 3  # header, after epoch 1, final
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["batch_size"] == 16
    ran = json.loads((out / "runtime.json").read_text())  # what actually ran, beside the config
    assert ran["versions"]["torch"] == torch.__version__ and ran["model"]["forward_seen"]
    assert ran["model"]["adapter"]["resolved"] in ("torch", "triton") and ran["model"]["loss"]["op"] == "loss"
    assert ran["model"]["attention"]["ran"] in ("sdpa", "open_clip", "xformers")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == metrics["step"]
    assert {"optimizer", "scheduler", "rng", "config", "trainable"} <= set(ckpt)
    adapters = load_file(str(out / "adapters.safetensors"))
    assert set(adapters) == set(ckpt["trainable"])
    assert any(k.startswith("adapters.") for k in adapters) and "classifier" in adapters
    for k, v in adapters.items():
        assert torch.equal(v, ckpt["trainable"][k])
    assert not any(k.startswith("clip.") for k in adapters)  # the frozen backbone is not exported
    assert not list(out.glob(".*tmp*"))


def test_eval_command_reproduces_the_metrics(reference, tmp_path, capsys):
    out, report = reference
    eval_dir = tmp_path / "eval"
    assert cli_main(["eval", "--weights", str(out / "adapters.safetensors"), f"train.output_dir={eval_dir}",
                     "train.progress=false"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["overall"] == pytest.approx(report["overall"])
    assert printed["few"] == pytest.approx(report["few"])
    assert (eval_dir / "eval" / "per_class_accuracy.png").is_file()  # eval writes under OUTPUT_DIR/eval
    assert load_weights(out / "last.pt").keys() == load_file(str(out / "adapters.safetensors")).keys()


class Kill(Exception):
    pass


def _kill_at(step):
    def cb(trainer, event, info):
        if event == "step" and info == step:
            raise Kill(f"killed after step {step}")

    return cb


def _log_rows(path, up_to):
    return [r for r in path.read_text().splitlines()[1:] if int(r.split(",")[0]) <= up_to]


@pytest.mark.parametrize("kill_step", [5, 14])
def test_kill_and_resume_matches_uninterrupted(tiny, reference, tmp_path, kill_step, monkeypatch):
    """Kill after `kill_step` steps (checkpoints every 3 steps and at the epoch end, 10 steps per epoch),
    resume from last.pt through the CLI, compare final weights with the uninterrupted run. The resumed run
    must run only the missing steps (retraining from scratch would reach the same weights too)."""
    ref_out, ref_report = reference
    out = tmp_path / "run"
    with pytest.raises(Kill):
        train(cfg_for(tiny, out), callbacks=[_kill_at(kill_step)])
    ckpt = torch.load(out / "last.pt", weights_only=True)
    # step 5: the step-3 checkpoint; step 14: the step-12 one (epoch-end checkpoint at 10, then 12)
    assert ckpt["global_step"] == {5: 3, 14: 12}[kill_step]
    assert not (out / "adapters.safetensors").exists()
    log_before = _log_rows(out / "train_log.csv", ckpt["global_step"])
    assert log_before and int(log_before[-1].split(",")[0]) <= ckpt["global_step"]
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg_for(tiny, out).to_dict()))
    steps_run = []
    real_step = Trainer.train_step

    def counting_step(self, batch):
        steps_run.append(self.global_step)
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", counting_step)
    assert cli_main(["train", "--config", str(cfg_file), "--resume"]) == 0
    total_steps = 2 * (sum(COUNTS) // 16)
    assert steps_run == list(range(ckpt["global_step"], total_steps))
    assert _log_rows(out / "train_log.csv", ckpt["global_step"]) == log_before  # the kept rows are untouched
    got = load_file(str(out / "adapters.safetensors"))
    want = load_file(str(ref_out / "adapters.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert json.loads((out / "metrics.json").read_text())["overall"] == pytest.approx(ref_report["overall"])
    steps = [int(r.split(",")[0]) for r in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps))  # rows of the lost steps were replaced, not duplicated


def test_unreadable_training_images_do_not_stop_training(tmp_path):
    """Within data.max_unreadable (see test_user_errors.py for the limit itself)."""
    root = make_image_folder(tmp_path / "data", (12, 6, 4), test=2)
    (root / "train/c0/0.png").write_bytes(b"garbage")  # found by the check before training: left out
    (root / "train/c1/1.png").unlink()
    data = (root / "train/c2/0.png").read_bytes()
    (root / "train/c2/0.png").write_bytes(data[: len(data) // 2])  # truncated: found while training
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = train(cfg_for(root, tmp_path / "run", **{"optim.epochs": 1, "optim.batch_size": 4,
                                                           "train.eval_every_epochs": 0, "data.max_unreadable": 0.2}))
    assert any("2 of the 22 training images cannot be read and are left out" in str(w.message) for w in caught)
    assert any("unreadable training images skipped" in str(w.message) for w in caught)
    assert report["test_images"] == 6 and (tmp_path / "run/adapters.safetensors").is_file()


def test_grad_checkpoint_trains_to_the_same_weights(tiny, reference, tmp_path):
    """model.grad_checkpoint=true through the trainer: the reference run's weights, bit for bit (fp32, CPU)."""
    out = tmp_path / "ckpt"
    train(cfg_for(tiny, out, **{"model.grad_checkpoint": True, "train.eval_every_epochs": 0}))
    got, want = load_file(str(out / "adapters.safetensors")), load_file(str(reference[0] / "adapters.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_resume_refuses_other_classes(reference, tmp_path):
    other = make_image_folder(tmp_path / "other", (5, 4, 3), test=1)
    trainer = Trainer(cfg_for(other, tmp_path / "run", **{"optim.batch_size": 4}))
    with pytest.raises(ValueError, match="other classes"):
        trainer.load_checkpoint(reference[0] / "last.pt")


# ---------------------------------------------------------------- torchrun + gloo


def test_torchrun_two_processes_match_single_process(tiny, reference, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU), per-process batch 8 = the single run's global batch 16."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    ref_out, ref_report = reference
    out = tmp_path / "ddp"
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg_for(tiny, out).to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sage_fast", "train", "--config", str(cfg_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = load_file(str(out / "adapters.safetensors"))
    want = load_file(str(ref_out / "adapters.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_images"] == ref_report["test_images"]
    assert metrics["overall"] == pytest.approx(ref_report["overall"])
    assert proc.stdout.count("top-1 overall") == 1  # only rank 0 prints ...
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # ... and writes files


_FAILING_RANK_SCRIPT = textwrap.dedent("""
    import sys
    from sage_fast.training.config import build_config
    from sage_fast.training.trainer import train

    def fail(trainer, event, info):
        if event == "step" and info == 2 and trainer.dist.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")

    train(build_config(sys.argv[1]), callbacks=[fail])
""")


def test_torchrun_job_fails_instead_of_hanging_when_one_process_raises(tiny, tmp_path):
    """Rank 1 raises after step 2 while rank 0 goes on into DDP's all-reduce: the job must exit non-zero
    soon (no final barrier on the failing rank), not wait for gloo's 30-minute timeout."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg_for(tiny, tmp_path / "ddp", **{"train.tensorboard": False}).to_dict()))
    script = tmp_path / "fail_rank1.py"
    script.write_text(_FAILING_RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(cfg_file)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        # SIGTERM: torchrun stops its workers (they run in sessions of their own) before it exits
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail("torchrun hung after one process raised")
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in output, output[-3000:]
    assert not (tmp_path / "ddp" / "adapters.safetensors").exists()


def test_gpu_decode_option_runs_on_cpu(tmp_path):
    """data.gpu_decode: workers read bytes, the step decodes and augments (here on the CPU device)."""
    root = make_image_folder(tmp_path / "data", (10, 6, 4), test=2)
    report = train(cfg_for(root, tmp_path / "run", **{"optim.epochs": 1, "optim.batch_size": 4,
                                                       "train.eval_every_epochs": 0, "data.gpu_decode": True,
                                                       "data.num_workers": 1}))
    assert report["test_images"] == 6 and report["skipped"] == 0
    assert (tmp_path / "run/adapters.safetensors").is_file()


def test_binned_accuracy_by_hand():
    from sage_fast.training.metrics import binned_accuracy

    counts = [1, 2, 4, 8, 100, 200, 50]
    acc = [0.0, 100.0, 50.0, 50.0, 100.0, 0.0, float("nan")]  # the last class has no test image: left out
    # 3 bins from 1 to 200, edges 1, 5.85, 34.2 and 200: {1, 2, 4}, {8}, {100, 200}
    x, mean, n = binned_accuracy(counts, acc, num_bins=3)
    assert n.tolist() == [3, 1, 2]
    assert mean.tolist() == pytest.approx([50.0, 50.0, 50.0])
    assert x.tolist() == pytest.approx([2.0, 8.0, (100 * 200) ** 0.5])
    x, mean, n = binned_accuracy([10, 10, 10], [0.0, 100.0, 100.0])  # one count: one bin
    assert n.tolist() == [3] and mean.tolist() == pytest.approx([200 / 3]) and x.tolist() == pytest.approx([10.0])
    # default: one bin per doubling; the largest count lies in the last bin, not past it
    x, mean, n = binned_accuracy([1, 2, 3, 4, 1024], [0.0, 0.0, 100.0, 100.0, 30.0])
    assert n.sum() == 5 and mean[-1] == pytest.approx(30.0) and x[-1] == pytest.approx(1024.0)
    assert len(binned_accuracy([5], [float("nan")])[0]) == 0


def test_per_class_plot_at_inaturalist_scale(tmp_path):
    """8,142 classes with 3 test images each (accuracy 0, 33, 67 or 100%), 2 to 1,000 training images: the
    plot draws three scatters (one per group, not one per class), the binned means and the group means."""
    from sage_fast.training.metrics import binned_accuracy, group_masks

    rng = np.random.default_rng(0)
    counts = np.maximum(2, np.round(1000 * np.exp(-np.linspace(0, 6.2, 8142)))).astype(int)
    acc = 100 * rng.binomial(3, np.clip(0.2 + 0.1 * np.log(counts), 0, 1)) / 3
    png = tmp_path / "inat.png"
    fig = plot_per_class(png, acc.tolist(), counts.tolist(), "inat2018")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert len(ax.collections) == 3 + 3  # a scatter and a mean segment per group
    (line,) = [ln for ln in ax.lines if ln.get_label() == "mean over log-spaced bins"]
    bx, by, _ = binned_accuracy(counts, acc)
    assert np.allclose(line.get_xdata(), bx) and np.allclose(line.get_ydata(), by) and len(bx) == 9
    for name, mask in group_masks(counts).items():
        (seg,) = [c for c in ax.collections if c.get_label().startswith(f"{name} mean")]
        assert seg.get_segments()[0][0][1] == pytest.approx(acc[mask.numpy()].mean())
    scatter_alpha = {c.get_alpha() for c in ax.collections if " mean " not in c.get_label()}
    assert scatter_alpha == {0.08}
