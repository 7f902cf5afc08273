"""Gradient accumulation (``optim.accumulate_steps``): the same update as the full batch, on one process and
under torchrun (gloo, CPU), and the exact resume of a run stopped in the middle of a batch.

4 classes with 40 / 12 / 6 / 3 training images, one of them a truncated PNG (it passes the header check
and fails to decode in the step, so it is dropped from its micro-batch); batch 16: 3 steps per epoch,
2 epochs. Every run is fp32 on CPU with one thread.

Tolerance: the accumulated gradient is the full batch's summed in another order (per micro-batch, then
over the micro-batches), so the weights after the 6 steps agree up to float rounding, not bitwise:
``rtol=1e-5, atol=1e-6`` (measured: at most 3.1e-7 absolute, weights up to 1.0; not bitwise equal).
"""
import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.images import make_image_folder
from safetensors.torch import load_file

from sage_fast.cli import main as cli_main
from sage_fast.model.sage import SageModel
from sage_fast.training.config import RESUME_FREE_KEYS, ConfigError, build_config
from sage_fast.training.distributed import DistInfo
from sage_fast.training.errors import UserError
from sage_fast.training.preflight import preflight
from sage_fast.training.trainer import train

COUNTS = (40, 12, 6, 3)
RTOL, ATOL = 1e-5, 1e-6
TIMEOUT = 240


def overrides(data, out, **extra):
    o = {
        "data.dataset": "folder", "data.root": str(data), "data.class_names": "classnames.txt",
        "data.num_workers": 0, "data.max_unreadable": 0.05, "model.name": "sage-tiny", "model.pretrained": None,
        "model.backend": "torch", "model.text_batch_size": 64, "optim.epochs": 2, "optim.batch_size": 16,
        "optim.lr": 0.05, "train.output_dir": str(out), "train.device": "cpu", "train.ckpt_every_steps": 2,
        "train.log_every_steps": 1, "train.eval_every_epochs": 0, "train.eval_batch_size": 16,
        "train.progress": False, "train.tensorboard": False,
    }
    o.update(extra)
    return o


def weights(out) -> dict:
    return load_file(str(Path(out) / "adapters.safetensors"))


def assert_close_weights(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=k)


def log_rows(out):
    with open(Path(out) / "train_log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("accum_data"), COUNTS, test=2)
    png = (root / "train/c0/5.png").read_bytes()
    (root / "train/c0/5.png").write_bytes(png[: len(png) // 2])  # decodes with an error: dropped in the step
    return root


@pytest.fixture(scope="module")
def full_batch(data, tmp_path_factory):
    """The reference: one process, no accumulation."""
    out = tmp_path_factory.mktemp("full_batch")
    with pytest.warns(UserWarning, match="unreadable training images skipped"):
        train(build_config(overrides=overrides(data, out)))
    return out


def test_accumulate_steps_must_divide_the_batch(tmp_path, capsys):
    with pytest.raises(ConfigError, match="optim.accumulate_steps must be positive"):
        build_config(overrides={"optim.accumulate_steps": 0})
    with pytest.raises(ConfigError, match=r"optim.batch_size=16 is not divisible by optim.accumulate_steps=3"):
        build_config(overrides={"optim.batch_size": 16, "optim.accumulate_steps": 3})
    # the processes: checked when the run starts (preflight), before anything is built
    cfg = build_config(overrides=overrides(tmp_path, tmp_path / "run", **{"optim.accumulate_steps": 4}))
    preflight(cfg, DistInfo(world_size=2))  # 16 = 4 x 2 x 2
    cfg.optim.batch_size = 12  # 12 / 4 = 3 per micro-batch, not a multiple of 2 processes
    with pytest.raises(UserError, match=r"optim.batch_size=12 \(the global batch\) is not divisible by the "
                                        r"optim.accumulate_steps=4 x 2 processes: use a multiple of 8"):
        preflight(cfg, DistInfo(world_size=2))
    with pytest.raises(SystemExit) as e:
        cli_main(["train", f"train.output_dir={tmp_path / 'run'}", "optim.accumulate_steps=5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sage-fast: error: ") and "accumulate_steps=5" in err[0], err
    # not a key a resume may change: the update is the same only up to float rounding
    assert "optim.accumulate_steps" not in RESUME_FREE_KEYS


def test_accumulated_micro_batches_give_the_full_batch_update(data, full_batch, tmp_path):
    out = tmp_path / "accum4"
    with pytest.warns(UserWarning, match="unreadable training images skipped"):
        train(build_config(overrides=overrides(data, out, **{"optim.accumulate_steps": 4})))
    assert_close_weights(weights(out), weights(full_batch))
    # the same steps, learning rates and (the batch's) losses in the log
    got, want = log_rows(out), log_rows(full_batch)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [str(s) for s in range(1, 7)]
    for a, b in zip(got, want):
        assert float(a["lr"]) == float(b["lr"])
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*unreadable training image")
def test_a_run_stopped_inside_a_batch_resumes_to_the_same_weights(data, tmp_path, monkeypatch):
    """A crash in the third micro-batch of step 4 (checkpoint at step 2 and the end of epoch 1, step 3): the
    resume repeats step 4 from its first micro-batch and ends bitwise where an uninterrupted run ends."""
    cfg = overrides(data, tmp_path / "whole", **{"optim.accumulate_steps": 4})
    train(build_config(overrides=cfg))

    calls = []
    loss = SageModel.loss

    def crash_in_step_4(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3 * 4 + 3:
            raise RuntimeError("killed inside a batch")
        return loss(self, *args, **kwargs)

    cut = overrides(data, tmp_path / "cut", **{"optim.accumulate_steps": 4})
    monkeypatch.setattr(SageModel, "loss", crash_in_step_4)
    with pytest.raises(RuntimeError, match="killed inside a batch"):
        train(build_config(overrides=cut))
    monkeypatch.setattr(SageModel, "loss", loss)
    assert torch.load(tmp_path / "cut/last.pt", weights_only=True)["global_step"] == 3
    train(build_config(overrides=cut), resume="auto")
    got, want = weights(tmp_path / "cut"), weights(tmp_path / "whole")
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- torchrun


_RANK_SCRIPT = """
    import os, sys
    from sage_fast.training import trainer as T

    # count the gradient all-reduces: DDP calls the hook once per bucket of a backward that synchronises
    folder, synced = sys.argv.pop(1), []
    init = T.Trainer.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)

        def hook(state, bucket):
            if bucket.index() == 0:
                synced.append(1)
            return torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook(None, bucket)

        import torch
        import torch.distributed.algorithms.ddp_comm_hooks.default_hooks
        self.net.register_comm_hook(None, hook)

    T.Trainer.__init__ = __init__
    from sage_fast.cli import main
    rc = main(sys.argv[1:])
    with open(os.path.join(folder, "synced." + os.environ["RANK"]), "w") as f:
        f.write(str(len(synced)))
    sys.exit(rc)
"""


def test_torchrun_two_ranks_accumulating_match_one_process(data, full_batch, tmp_path):
    """2 ranks x 4 micro-batches of 2 images = the single process's batch of 16: the same weights up to
    rounding, although the truncated image leaves one rank fewer images than the other in its steps (the
    micro-batches are weighted by their share of the global batch, not of their rank's). Each step
    all-reduces gradients once, after the last micro-batch."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path / "ddp"
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(_RANK_SCRIPT))
    settings = overrides(data, out, **{"optim.accumulate_steps": 4})
    args = [f"{k}={'null' if v is None else v}" for k, v in settings.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_close_weights(weights(out), weights(full_batch))
    for a, b in zip(log_rows(out), log_rows(full_batch)):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    assert [int((tmp_path / f"synced.{r}").read_text()) for r in (0, 1)] == [6, 6]  # 6 steps, not 24
