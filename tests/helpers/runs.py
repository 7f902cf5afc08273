"""Training runs as a user starts them: ``python -m sage_fast ...`` subprocesses on the tiny model (CPU, one
thread, no DataLoader workers unless asked), and what tests read back from their folders."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: seconds a run subprocess may take
TIMEOUT = 240


def overrides(data, out, **extra):
    """``key=value`` words for a 2-epoch run (batch 8, a checkpoint every 3 steps) on the image folder `data`."""
    o = {
        "data.dataset": "folder", "data.root": str(data), "data.class_names": "classnames.txt",
        "data.num_workers": 0, "model.name": "sage-tiny", "model.pretrained": "null", "model.backend": "torch",
        "model.text_batch_size": 64, "optim.epochs": 2, "optim.batch_size": 8, "optim.lr": 0.05,
        "train.output_dir": str(out), "train.device": "cpu", "train.ckpt_every_steps": 3,
        "train.log_every_steps": 1, "train.eval_every_epochs": 0, "train.eval_batch_size": 16,
        "train.progress": "false", "train.tensorboard": "false",
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def env():
    # one thread: bitwise-equal results across processes, and no oversubscription of a small machine
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e.pop("TRITON_INTERPRET", None)
    return e


def command(args, wrapper=None):
    return [sys.executable, str(wrapper)] + list(args) if wrapper else [sys.executable, "-m", "sage_fast"] + list(args)


def sage(*args, wrapper=None) -> subprocess.CompletedProcess:
    """`python -m sage_fast ARGS` (or `python WRAPPER ARGS`) to completion."""
    return subprocess.run(command(args, wrapper), env=env(), capture_output=True, text=True, timeout=TIMEOUT)


def start(*args, wrapper=None) -> subprocess.Popen:
    return subprocess.Popen(command(args, wrapper), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def why(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def error_line(proc, prefix="sage-fast: error: sage-fast train: ") -> str:
    """The one line the CLI printed for a refusal: no traceback, the message on a single line."""
    assert "Traceback" not in proc.stderr, why(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, why(proc)
    return lines[0]


def wait_for_log_rows(path, rows, proc, timeout=TIMEOUT):
    """Wait until the train log holds `rows` rows (training is under way); fail if `proc` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) > rows:
            return
        if proc.poll() is not None:
            pytest.fail("the run ended before the fault could be injected:\n" + why(finish(proc)))
        time.sleep(0.02)
    pytest.fail("the run did not start training in time")


def tree_digest(folder) -> dict:
    """{relative path: sha256} of every file under `folder`: equal before and after means nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}
