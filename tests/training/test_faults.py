"""Fault injection, black box through the command line: every run is a `python -m sage_fast train ...`
(or ``eval``) subprocess on the tiny model (CPU, no DataLoader workers unless they are the point) and a small
generated image folder.

Faults are injected from outside the library: signals sent to the process, bytes flipped in its files, or
a wrapper script in the test's folder that patches torch / os and then calls `sage_fast.cli.main`.

4 classes with 40 / 12 / 6 / 3 training images (no many-shot class: its accuracy is NaN, null in JSON),
2 test images each; batch 8: 7 steps per epoch, 2 epochs, a checkpoint every 3 steps and at epoch ends
(steps 3, 6, 7, 9, 12, 14). Every comparison with the reference run is bitwise (one thread everywhere).
"""
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers.images import make_image_folder
from helpers.runs import TIMEOUT, error_line, finish, overrides, sage, start, tree_digest, wait_for_log_rows, why
from helpers.runs import command as _cmd
from helpers.runs import env as _env
from safetensors.torch import load_file

from sage_fast.training.checkpoint import CheckpointError, find_resumable, read_checkpoint

COUNTS = (40, 12, 6, 3)
STEPS_PER_EPOCH = sum(COUNTS) // 8
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
EXIT_PREEMPTED = 75


def wrapper_script(folder, patch: str) -> Path:
    """A script that applies `patch` and then runs the CLI with its arguments."""
    path = Path(folder) / "inject.py"
    path.write_text("import os, signal, sys\nimport torch\n" + textwrap.dedent(patch) + textwrap.dedent("""
        from sage_fast.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    return path


def assert_same_weights(run, ref):
    got, want = load_file(str(Path(run) / "adapters.safetensors")), load_file(str(Path(ref) / "adapters.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def temporaries(folder):
    return sorted(p.name for p in Path(folder).glob(".*.tmp"))


def wait_for_file(path, proc, timeout=TIMEOUT):
    """Wait until `path` exists (a wrapper's marker: the process got where the fault belongs)."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if proc.poll() is not None:
            pytest.fail(f"the process ended before {Path(path).name}:\n" + why(finish(proc)))
        if time.monotonic() > deadline:
            pytest.fail(f"the process did not reach {Path(path).name} in time")
        time.sleep(0.02)


def pause_wrapper(folder, module: str, name: str, mark) -> Path:
    """A wrapper script under which the function `module.name` first creates the file `mark`, then sleeps for
    two minutes: the process waits where the fault belongs until the test signals it."""
    return wrapper_script(folder, f"""
        import time
        import {module} as _target
        _real = _target.{name}
        def _paused(*a, **k):
            open({str(mark)!r}, "w").close()
            time.sleep(120)
            return _real(*a, **k)
        _target.{name} = _paused
    """)


def stopped_line(proc, command="train") -> str:
    """The one line the CLI printed after a stop signal: no traceback, nothing else from the stop."""
    assert "Traceback" not in proc.stderr and "lost sys.stderr" not in proc.stderr, why(proc)
    return error_line(proc, prefix=f"sage-fast: stopped: sage-fast {command}: ")


# ---------------------------------------------------------------- shared data and reference run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The image folder: read only, every test uses it as it is."""
    return make_image_folder(tmp_path_factory.mktemp("fault_data"), COUNTS, test=2)


@pytest.fixture(scope="module")
def _reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fault_ref") / "run"
    proc = sage("train", *overrides(data, out))
    assert proc.returncode == 0, why(proc)
    return out


@pytest.fixture()
def reference(_reference):
    """The uninterrupted run's folder: read it, never write into it (copy it with `finished_copy`)."""
    return _reference


@pytest.fixture()
def finished_copy(_reference, tmp_path):
    """This test's own copy of the finished reference run."""
    return Path(shutil.copytree(_reference, tmp_path / "finished"))


# ---------------------------------------------------------------- kill -9


def test_kill9_at_a_random_moment_then_resume_is_bitwise_equal(data, reference, tmp_path):
    """SIGKILL at a random moment of training; a torn log line and a stale temporary file on top (what a
    kill during a write leaves); `--resume auto` ends at the uninterrupted run's weights."""
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 1.0)
    out = tmp_path / "run"
    proc = start("train", *overrides(data, out))
    wait_for_log_rows(out / "train_log.csv", 1, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    with open(out / "train_log.csv", "a") as f:
        f.write("9")  # a row torn after its first character
    (out / ".last.pt.999999.tmp").write_bytes(b"PK\x03\x04 torn")
    proc = sage("train", *overrides(data, out), "--resume", "auto")
    assert proc.returncode == 0, f"seed {seed}, delay {delay:.3f} s\n" + why(proc)
    assert_same_weights(out, reference)
    assert temporaries(out) == []
    steps = [int(r.split(",")[0]) for r in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL_STEPS


_KILL_IN_WRITE = {
    # the second checkpoint (step 6) dies half written: last.pt stays the step-3 one
    "mid_write": """
        _save, _calls = torch.save, []
        def save(obj, f, *a, **k):
            _calls.append(1)
            if len(_calls) == 2:
                f.write(b"PK\\x03\\x04 half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return _save(obj, f, *a, **k)
        torch.save = save
    """,
    # the step-6 checkpoint is whole and the old last.pt is already previous.pt, but not yet replaced
    "between_rotation_and_replace": """
        _replace, _calls = os.replace, []
        def replace(src, dst, *a, **k):
            if os.path.basename(dst) == "last.pt":
                _calls.append(1)
                if len(_calls) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            return _replace(src, dst, *a, **k)
        os.replace = replace
    """,
}


@pytest.mark.parametrize("where", sorted(_KILL_IN_WRITE))
def test_kill9_inside_a_checkpoint_write_then_resume_is_bitwise_equal(data, reference, tmp_path, where):
    out = tmp_path / "run"
    proc = sage("train", *overrides(data, out), wrapper=wrapper_script(tmp_path, _KILL_IN_WRITE[where]))
    assert proc.returncode == -signal.SIGKILL, why(proc)
    assert read_checkpoint(out / "last.pt")["global_step"] == 3
    (tmp,) = temporaries(out)
    assert tmp.startswith(".last.pt.")
    if where == "between_rotation_and_replace":
        assert read_checkpoint(out / "previous.pt")["global_step"] == 3
    proc = sage("train", *overrides(data, out), "--resume")
    assert proc.returncode == 0, why(proc)
    assert_same_weights(out, reference)
    assert temporaries(out) == []


# ---------------------------------------------------------------- NaN


_NAN_ON_STEP_6 = """
    _step, _calls = torch.optim.SGD.step, []
    def step(self, *a, **k):
        _calls.append(1)
        if len(_calls) == 6:
            p = next(p for g in self.param_groups for p in g["params"] if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
        return _step(self, *a, **k)
    torch.optim.SGD.step = step
"""


def test_nan_gradient_on_a_checkpoint_step_keeps_the_last_good_checkpoint(data, reference, tmp_path):
    """A NaN gradient on step 6 (a checkpoint step): exit 3 naming step 6 and the step-3 checkpoint, nothing
    non-finite on disk, and the run resumes (data moved meanwhile) to the uninterrupted run's weights."""
    out = tmp_path / "run"
    proc = sage("train", *overrides(data, out), wrapper=wrapper_script(tmp_path, _NAN_ON_STEP_6))
    assert proc.returncode == 3, why(proc)
    line = error_line(proc)
    assert "diverged at step 6" in line and f"{out / 'last.pt'} (step 3)" in line, line
    ckpt = read_checkpoint(out / "last.pt")  # verifies digest and finiteness
    assert ckpt["global_step"] == 3
    assert not (out / "previous.pt").exists() and not (out / "adapters.safetensors").exists()
    moved = Path(shutil.copytree(data, tmp_path / "moved_data"))
    proc = sage("train", *overrides(moved, out), "--resume")
    assert proc.returncode == 0, why(proc)
    assert_same_weights(out, reference)


def test_overflowing_logits_are_a_divergence_stop_too(data, tmp_path):
    """An lr so large that the logits overflow while the weights stay finite: the loss refuses its NaN / Inf
    input, and the run ends in the divergence stop (exit 3, the step, the last good checkpoint), not a
    traceback; what is on disk is finite."""
    out = tmp_path / "run"
    proc = sage("train", *overrides(data, out, **{"optim.lr": 1e30, "train.ckpt_every_steps": 1}))
    assert proc.returncode == 3, why(proc)
    line = error_line(proc)
    assert "diverged at step" in line and "the loss (the logits overflowed) hold NaN or Inf" in line, line
    assert "Traceback" not in proc.stderr
    if (out / "last.pt").exists():
        read_checkpoint(out / "last.pt")  # verifies digest and finiteness


# ---------------------------------------------------------------- corrupt checkpoints


def _flip_tensor_bytes(path):
    """Flip one byte inside the stored block_scales tensor: the zip and the pickle stay readable."""
    raw = bytearray(path.read_bytes())
    needle = torch.load(path, weights_only=True)["trainable"]["block_scales"].numpy().tobytes()
    at = raw.find(needle)
    assert at >= 0 and raw.find(needle, at + 1) < 0, "block_scales bytes not found once in the checkpoint"
    raw[at + 1] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_last_pt_fall_back_to_previous_pt(data, reference, finished_copy):
    out = finished_copy
    _flip_tensor_bytes(out / "last.pt")
    # eval of the corrupt file: one line, exit 2, no report written
    proc = sage("eval", "--weights", str(out / "last.pt"), f"train.output_dir={out}")
    assert proc.returncode == 2, why(proc)
    assert "checksum" in error_line(proc, "sage-fast: error: sage-fast eval: ")
    assert not (out / "eval").exists()
    # resume: previous.pt (step 12) verifies; the last two steps are trained again to the same weights
    proc = sage("train", *overrides(data, out), "--resume")
    assert proc.returncode == 0, why(proc)
    assert re.search(r"last\.pt: content does not match its checksum.*resuming from .*previous\.pt \(step 12\)",
                     proc.stderr), why(proc)
    assert_same_weights(out, reference)
    assert read_checkpoint(out / "last.pt")["global_step"] == TOTAL_STEPS
    # the corrupt file was not rotated into previous.pt
    assert read_checkpoint(out / "previous.pt")["global_step"] == 12


def test_no_verifying_checkpoint_is_a_one_line_error(reference, tmp_path):
    for name in ("last.pt", "previous.pt"):
        shutil.copy(reference / name, tmp_path / name)
        _flip_tensor_bytes(tmp_path / name)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from verifies") as e:
        find_resumable(tmp_path / "last.pt")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- stop signals


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, EXIT_PREEMPTED), (signal.SIGINT, 130)])
def test_stop_signal_mid_epoch_checkpoints_and_resume_is_bitwise_equal(data, reference, tmp_path, sig, status):
    """SIGTERM to the whole process group, as SLURM sends it, or SIGINT, as Ctrl-C sends it, with two DataLoader
    workers in it: the run finishes its step, writes a checkpoint, exits 75 (SIGTERM) or 130 (SIGINT) with one
    line. Only epoch-end checkpoints (ckpt_every_steps=0), so a mid-epoch checkpoint can only come from the
    signal. The resume (no workers, a periodic checkpoint: settings a resume may change) ends at the
    uninterrupted run's weights."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(["train", *overrides(data, out, **{"train.ckpt_every_steps": 0, "data.num_workers": 2})]),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_log_rows(out / "train_log.csv", 1, proc)
    os.killpg(proc.pid, sig)
    proc = finish(proc)
    assert proc.returncode == status, why(proc)
    m = re.fullmatch(rf"sage-fast: stopped: sage-fast train: {sig.name} after step (\d+) .*checkpoint (\S+last\.pt); "
                     r"continue with --resume", stopped_line(proc))
    assert m, why(proc)
    step = int(m[1])
    ckpt = read_checkpoint(out / "last.pt")
    assert ckpt["global_step"] == step and ckpt["step_in_epoch"] > 0
    assert not (out / "adapters.safetensors").exists()
    proc = sage("train", *overrides(data, out), "--resume")
    assert proc.returncode == 0, why(proc)
    assert_same_weights(out, reference)


def test_a_second_sigint_stops_at_once(data, tmp_path):
    """The first Ctrl-C waits for the step; a second one does not (a step can be long): one line, 130, and
    only whole files (no checkpoint of the unfinished step, no temporaries)."""
    mark = tmp_path / "in_step"
    wrapper = wrapper_script(tmp_path, f"""
        import time
        from sage_fast.training.trainer import Trainer
        _step = Trainer.train_step
        def train_step(self, batch):
            if self.global_step == 4:
                open({str(mark)!r}, "w").close()
                time.sleep(120)
            return _step(self, batch)
        Trainer.train_step = train_step
    """)
    out = tmp_path / "run"
    proc = start("train", *overrides(data, out), wrapper=wrapper)
    wait_for_file(mark, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc = finish(proc)
    assert proc.returncode == 130, why(proc)
    assert "SIGINT again: stopped at once" in stopped_line(proc)
    assert read_checkpoint(out / "last.pt")["global_step"] == 3 and temporaries(out) == []


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, EXIT_PREEMPTED), (signal.SIGINT, 130)])
def test_a_signal_before_the_first_step_exits_with_one_line(data, tmp_path, sig, status):
    """While the data set is being built (minutes at iNaturalist: the image check) there is nothing to save:
    the run stops at once, one line, 75 after SIGTERM (a scheduler resubmits), 130 after SIGINT."""
    mark = tmp_path / "building"
    wrapper = pause_wrapper(tmp_path, "sage_fast.training.trainer", "build_data", mark)
    out = tmp_path / "run"
    proc = start("train", *overrides(data, out), wrapper=wrapper)
    wait_for_file(mark, proc)
    proc.send_signal(sig)
    proc = finish(proc)
    assert proc.returncode == status, why(proc)
    assert stopped_line(proc) == (f"sage-fast: stopped: sage-fast train: {sig.name}: stopped before the first step, "
                                  "nothing to save: run the same command again")
    assert not out.exists()


def test_eval_interrupted_writes_nothing(reference, tmp_path):
    """Ctrl-C in the middle of sage-fast eval, DataLoader workers running: one line, 130, no --out folder."""
    mark = tmp_path / "evaluating"
    wrapper = pause_wrapper(tmp_path, "sage_fast.training.evaluation", "tte_logits", mark)
    out = tmp_path / "eval"
    proc = subprocess.Popen(
        _cmd(["eval", "--weights", str(reference / "adapters.safetensors"), "--out", str(out), "data.num_workers=2",
              "train.eval_batch_size=2"], wrapper),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_file(mark, proc)
    os.killpg(proc.pid, signal.SIGINT)
    proc = finish(proc)
    assert proc.returncode == 130, why(proc)
    assert stopped_line(proc, "eval") == "sage-fast: stopped: sage-fast eval: SIGINT: stopped"
    assert not out.exists()


_SLOW_PREPARE = """
    import time
    from sage_fast.training.data import prepare
    _encode = prepare._encode
    def encode(*a, **k):
        time.sleep(0.1)
        return _encode(*a, **k)
    prepare._encode = encode
"""


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_prepare_stops_its_workers_on_a_signal_and_resumes(tmp_path, sig, group):
    """Ctrl-C (SIGINT to the process group: the workers get it too) or SIGTERM to the main process alone, while
    two workers write shards: the command ends within seconds with one line (130 / 75), leaves no temporary
    file, and the same command then finishes, keeping the shards that were done."""
    src = make_image_folder(tmp_path / "src", [16] * 8, test=2, size=48)
    out = tmp_path / "shards"
    args = ["prepare", "--out", str(out), "--short-side", "32", "--shard-size", "0.03", "--workers", "2",
            "--no-progress", f"data.root={src}", "data.class_names=classnames.txt"]
    proc = subprocess.Popen(_cmd(args, wrapper_script(tmp_path, _SLOW_PREPARE)), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while not list(out.glob(".train-*.tmp")):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("prepare did not start writing shards:\n" + why(finish(proc)))
        time.sleep(0.02)
    t0 = time.monotonic()
    (os.killpg if group else os.kill)(proc.pid, sig)
    proc = finish(proc)
    took = time.monotonic() - t0
    assert proc.returncode == (130 if sig == signal.SIGINT else EXIT_PREEMPTED), why(proc)
    m = re.fullmatch(rf"sage-fast: stopped: sage-fast prepare: {sig.name}: stopped; (\d+) of (\d+) shards are finished "
                     rf"and kept in {re.escape(str(out))}: run the same command again to write the other (\d+)",
                     stopped_line(proc, "prepare"))
    assert m and int(m[1]) < int(m[2]), why(proc)
    assert took < 30, f"{took:.1f} s from the signal to the exit"
    time.sleep(0.5)  # a worker left running would still be writing
    assert [p.name for p in out.rglob("*.tmp")] == [], why(proc)
    proc = sage(*args)
    assert proc.returncode == 0, why(proc)
    assert (out / "manifest.json").is_file()
    if int(m[1]):
        assert f"resuming: {m[1]} of {m[2]} shards are finished" in proc.stdout, why(proc)


# ---------------------------------------------------------------- run folders and eval


def test_fresh_run_in_a_finished_folder_is_refused_and_overwrite_starts_over(data, reference, finished_copy):
    out = finished_copy
    before = tree_digest(out)
    proc = sage("train", *overrides(data, out))
    assert proc.returncode == 2, why(proc)
    assert "already holds a run" in error_line(proc)
    assert tree_digest(out) == before  # nothing touched: logs, checkpoints, reports
    proc = sage("train", *overrides(data, out), "--overwrite")
    assert proc.returncode == 0, why(proc)
    assert_same_weights(out, reference)
    assert read_checkpoint(out / "previous.pt")["global_step"] == 12


def test_eval_writes_its_own_files_and_valid_json(reference, finished_copy):
    out = finished_copy
    before = tree_digest(out)
    # the weights' stored config names the reference folder: point eval at this copy
    proc = sage("eval", "--weights", str(out / "adapters.safetensors"), f"train.output_dir={out}")
    assert proc.returncode == 0, why(proc)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))

    printed = strict(proc.stdout.strip().splitlines()[-1])
    assert printed["many"] is None  # no class has more than 100 training images
    assert {k: v for k, v in tree_digest(out).items() if not k.startswith("eval/")} == before
    metrics = strict((out / "eval" / "metrics.json").read_text())
    trained = strict((out / "metrics.json").read_text())
    assert metrics["overall"] == trained["overall"] == printed["overall"] and metrics["many"] is None
    assert metrics["step"] == TOTAL_STEPS and metrics["weights"] == str(out / "adapters.safetensors")
    assert (out / "eval" / "per_class.csv").is_file() and (out / "eval" / "per_class_accuracy.png").is_file()


def test_resume_with_settings_that_change_the_result_is_refused_unless_forced(data, finished_copy):
    out = finished_copy
    before = tree_digest(out)
    proc = sage("train", *overrides(data, out, **{"train.seed": 1, "optim.batch_size": 4}), "--resume")
    assert proc.returncode == 2, why(proc)
    line = error_line(proc)
    assert "optim.batch_size (8 -> 4)" in line and "train.seed (0 -> 1)" in line and "--force-resume" in line
    assert tree_digest(out) == before
    # the seed and the batch size describe what the run already did: refused even when forced, saying why
    proc = sage("train", *overrides(data, out, **{"train.seed": 1, "optim.batch_size": 4}), "--resume",
                "--force-resume")
    assert proc.returncode == 2, why(proc)
    line = error_line(proc)
    assert "cannot differ even with --force-resume" in line and "optim.batch_size: the steps per epoch" in line
    assert "train.seed: it orders the samples" in line
    assert tree_digest(out) == before
    # a key that applies from the checkpoint on, forced, on a finished run: nothing left to do, nothing touched
    proc = sage("train", *overrides(data, out, **{"optim.lr": 0.01}), "--resume", "--force-resume")
    assert proc.returncode == 0, why(proc)
    assert f"{out} already finished (2 epochs, step {TOTAL_STEPS}): nothing to do" in proc.stdout, why(proc)
    assert "--force-resume changes nothing in a finished run" in proc.stdout, why(proc)
    assert tree_digest(out) == before


# ---------------------------------------------------------------- torchrun


_RANK_WRAPPER = """
    import os, sys
    folder = sys.argv.pop(1)
    with open(os.path.join(folder, "pid." + os.environ["RANK"]), "w") as f:
        f.write(str(os.getpid()))
    {patch}
    from sage_fast.cli import main
    rc = main(sys.argv[1:])
    with open(os.path.join(folder, "rc." + os.environ["RANK"]), "w") as f:
        f.write(str(rc))
    sys.exit(rc)
"""


def _torchrun(tmp_path, args, patch=""):
    """`torchrun --nproc_per_node 2` (gloo, CPU) of the CLI through a wrapper that writes each rank's pid
    (``pid.RANK``) and exit code (``rc.RANK``) into `tmp_path`."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torchrun (torch.distributed.run) is not available in this build")
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(_RANK_WRAPPER).replace("{patch}", textwrap.indent(textwrap.dedent(patch), "")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _communicate(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun stops its workers before it exits
        try:
            output = proc.communicate(timeout=40)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
        pytest.fail(f"torchrun did not end within {timeout} s:\n{output[-3000:]}")


def test_torchrun_sigterm_to_one_rank_stops_every_rank_at_the_same_step(data, tmp_path):
    """SIGTERM to rank 1 only (SIGUSR1 / SIGTERM reach one process first in practice): both ranks agree to
    stop after the same step, rank 0 writes that step's checkpoint, both exit 75."""
    out = tmp_path / "ddp"
    proc = _torchrun(tmp_path, ["train", *overrides(data, out, **{"train.ckpt_every_steps": 0})])
    wait_for_log_rows(out / "train_log.csv", 1, proc)
    os.kill(int((tmp_path / "pid.1").read_text()), signal.SIGTERM)
    output = _communicate(proc, 120)
    assert proc.returncode != 0, output[-3000:]
    stops = {int(r): int(s) for r, s in re.findall(r"rank (\d): SIGTERM after step (\d+)", output)}
    assert sorted(stops) == [0, 1] and len(set(stops.values())) == 1, output[-3000:]
    rcs = [int((tmp_path / f"rc.{r}").read_text()) for r in (0, 1)]
    assert rcs == [EXIT_PREEMPTED, EXIT_PREEMPTED], output[-3000:]
    assert read_checkpoint(out / "last.pt")["global_step"] == stops[0]
    assert not (out / "adapters.safetensors").exists()


def test_sigterm_to_torchrun_itself_checkpoints_and_every_rank_exits_75(data, tmp_path):
    """SIGTERM to the torchrun agent (what SLURM's srun forwards, examples/slurm/train_sage.sbatch): torchrun
    passes it to its processes, which stop after the same step with a checkpoint and exit 75."""
    out = tmp_path / "ddp"
    proc = _torchrun(tmp_path, ["train", *overrides(data, out, **{"train.ckpt_every_steps": 0})])
    wait_for_log_rows(out / "train_log.csv", 1, proc)
    proc.send_signal(signal.SIGTERM)
    output = _communicate(proc, 120)
    assert proc.returncode != 0, output[-3000:]
    stops = {int(r): int(s) for r, s in re.findall(r"rank (\d): SIGTERM after step (\d+)", output)}
    assert sorted(stops) == [0, 1] and len(set(stops.values())) == 1, output[-3000:]
    assert [int((tmp_path / f"rc.{r}").read_text()) for r in (0, 1)] == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    assert read_checkpoint(out / "last.pt")["global_step"] == stops[0]


_HANG_RANK_1 = """
    import time
    from sage_fast.training.trainer import Trainer
    _step, _calls = Trainer.train_step, []
    def train_step(self, batch):
        _calls.append(1)
        if self.dist.rank == 1 and len(_calls) == 3:
            open(os.path.join(folder, "hung"), "w").close()
            time.sleep(600)
        return _step(self, batch)
    Trainer.train_step = train_step
"""


def test_torchrun_sigterm_does_not_wait_for_a_stuck_rank(data, tmp_path):
    """Rank 1 hangs inside its third step, so rank 0 waits in DDP's all-reduce: a SIGTERM to both (as
    SLURM sends) cannot be honoured with a checkpoint, and must not keep the job alive either (without the
    stop watchdog it would last until the sleep or gloo's 30-minute timeout ends)."""
    out = tmp_path / "ddp"
    proc = _torchrun(tmp_path, ["train", *overrides(data, out, **{"train.ckpt_every_steps": 0})], _HANG_RANK_1)
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "hung").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("rank 1 did not reach its third step:\n" + _communicate(proc, 1)[-3000:])
        time.sleep(0.05)
    t0 = time.monotonic()
    for rank in (0, 1):
        os.kill(int((tmp_path / f"pid.{rank}").read_text()), signal.SIGTERM)
    output = _communicate(proc, 60)
    assert time.monotonic() - t0 < 60 and proc.returncode != 0
    assert "did not reach the end of its step" in output, output[-3000:]
    assert not (out / "last.pt").exists()
