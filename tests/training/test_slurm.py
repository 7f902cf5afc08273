"""examples/slurm/train_sage.sbatch with `srun` and `scontrol` replaced by stubs on PATH (no SLURM here): the
command it runs on each node, the requeue after SLURM's warning signal, and no requeue otherwise."""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "train_sage.sbatch"

_SRUN = """#!/bin/bash
# STUB_MODE: finish (exit 0), fail (exit 1), wait (until SIGTERM, then exit 1 as torchrun does)
echo "$@" > "$STUB_DIR/srun_args"
if [ "$STUB_MODE" = finish ]; then exit 0; fi
if [ "$STUB_MODE" = fail ]; then exit 1; fi
trap 'echo TERM > "$STUB_DIR/srun_signal"; exit 1' TERM
touch "$STUB_DIR/srun_started"
while :; do sleep 0.05; done
"""

_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a\\ngpu-b\\n'; exit 0; fi
echo "$@" >> "$STUB_DIR/scontrol_calls"
"""


@pytest.fixture()
def stubs(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", _SRUN), ("scontrol", _SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def start(stubs, mode):
    env = dict(os.environ, PATH=f"{stubs / 'bin'}:{os.environ['PATH']}", STUB_DIR=str(stubs), STUB_MODE=mode,
               SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_NNODES="2", SLURM_JOB_ID="4242", GPUS_PER_NODE="4")
    return subprocess.Popen(["bash", str(SCRIPT), "--config", "run.yaml", "optim.lr=0.02"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_each_node_runs_torchrun_with_a_c10d_rendezvous_and_resume_auto(stubs):
    proc = start(stubs, "finish")
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    args = (stubs / "srun_args").read_text().split()
    assert args[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    joined = " ".join(args)
    for part in ("--nnodes 2", "--nproc_per_node 4", "--rdzv_backend c10d", "--rdzv_endpoint gpu-a:29500",
                 "--rdzv_id sage-4242", "-m sage_fast train --resume auto --config run.yaml optim.lr=0.02"):
        assert part in joined, joined
    assert not (stubs / "scontrol_calls").exists()


def test_a_failing_run_is_not_requeued(stubs):
    proc = start(stubs, "fail")
    proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert not (stubs / "scontrol_calls").exists()


def test_the_warning_signal_stops_the_run_and_requeues_the_job(stubs):
    proc = start(stubs, "wait")
    deadline = time.monotonic() + 30
    while not (stubs / "srun_started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    time.sleep(0.2)  # the script has taken srun's pid by now (SLURM warns minutes after the start)
    proc.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@120 sends
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert (stubs / "srun_signal").read_text().strip() == "TERM"
    assert (stubs / "scontrol_calls").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in out
