"""Two "nodes" on this machine: two torchrun agents of one rank each (gloo, CPU) that meet through a c10d
rendezvous on localhost, as `torchrun --nnodes 2 --node_rank i --rdzv_backend c10d --rdzv_endpoint HOST:PORT`
does across machines (README, "Many machines").

* The two-node run reaches the weights of one process with the same global batch (fp32, the all-reduce
  sums the two halves' gradients in another order: 1e-4 relative, 1e-5 absolute, as the one-node
  torchrun test in test_train.py).
* One node killed mid-run (SIGKILL to its worker and its agent, as a lost machine), then both nodes run
  again with ``--resume auto``: the final weights equal the uninterrupted two-node run's bit for bit.

Tiny model and data: 3 classes with 20 / 8 / 4 training images, batch 8 (4 per node), 2 epochs of 4 steps,
a checkpoint every 2 steps; one thread per process.
"""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.images import make_image_folder
from safetensors.torch import load_file

from sage_fast.training.checkpoint import read_checkpoint

TIMEOUT = 120
#: about 55 s of CPU time in all (seven training processes, six torchrun agents), 40 to 80 s of wall time on 2 cores
pytestmark = pytest.mark.slow

_WORKER = """
    import os, sys
    folder = sys.argv.pop(1)
    with open(os.path.join(folder, "pid." + os.environ["RANK"]), "w") as f:
        f.write(f"{os.getpid()} {os.getppid()}")
    from sage_fast.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    return env


def _args(data, out, *extra):
    o = {
        "data.dataset": "folder", "data.root": str(data), "data.class_names": "classnames.txt",
        "data.num_workers": 0, "model.name": "sage-tiny", "model.pretrained": "null", "model.backend": "torch",
        "optim.epochs": 2, "optim.batch_size": 8, "optim.lr": 0.05, "train.output_dir": str(out),
        "train.device": "cpu", "train.ckpt_every_steps": 2, "train.log_every_steps": 1,
        "train.eval_every_epochs": 0, "train.progress": "false", "train.tensorboard": "false",
    }
    return ["train", *(f"{k}={v}" for k, v in o.items()), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_nodes(folder: Path, args) -> list:
    """Two torchrun agents, node ranks 0 and 1, one worker each, meeting at a c10d rendezvous on localhost."""
    script = folder / "worker.py"
    script.write_text(textwrap.dedent(_WORKER))
    endpoint, job = f"127.0.0.1:{_free_port()}", uuid.uuid4().hex[:8]
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", job,
               "--rdzv_conf", f"is_host={int(node == 0)}", "--max_restarts", "0", "--monitor_interval", "0.1",
               str(script), str(folder), *args]
        log = open(folder / f"node{node}.log", "w")
        nodes.append(subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT))
    return nodes


def _wait(nodes, folder: Path, timeout=TIMEOUT) -> list:
    deadline = time.monotonic() + timeout
    for proc in nodes:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in nodes:
                p.send_signal(signal.SIGTERM)  # the agents stop their workers
            for p in nodes:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            pytest.fail("the two-node run did not end in time:\n" + _logs(folder))
    return [p.returncode for p in nodes]


def _logs(folder: Path) -> str:
    return "\n".join(f"--- node {n}\n" + (folder / f"node{n}.log").read_text()[-2500:] for n in (0, 1))


def _weights(out) -> dict:
    return load_file(str(Path(out) / "adapters.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("multinode_data"), (20, 8, 4), test=1)


@dataclass
class Runs:
    two_nodes: Path      # the uninterrupted two-node run's output folder
    one: Path            # one process, the same global batch
    resumed: Path        # the run whose rank-1 node was killed, then resumed on both nodes
    stopped_at: int      # the global step of its checkpoint when the node was killed
    killed_rcs: list     # the two agents' exit statuses after the kill


def _kill_a_node_mid_run(folder: Path, out: Path, nodes: list) -> None:
    """SIGKILL the worker of rank 1 and its agent once a checkpoint exists and training goes on (step 3
    logged: the step-2 checkpoint was written before it)."""
    deadline = time.monotonic() + TIMEOUT
    while not ((out / "last.pt").exists() and (out / "train_log.csv").exists()
               and len((out / "train_log.csv").read_text().splitlines()) > 3):
        if any(p.poll() is not None for p in nodes) or time.monotonic() > deadline:
            _wait(nodes, folder, 30)
            pytest.fail("the run ended before a node could be killed:\n" + _logs(folder))
        time.sleep(0.02)
    worker, agent = map(int, (folder / "pid.1").read_text().split())
    os.kill(worker, signal.SIGKILL)                  # the node with rank 1 is lost: its worker ...
    os.kill(agent, signal.SIGKILL)                   # ... and its agent


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """All runs, overlapped where they are independent (one process, the uninterrupted two-node run, and the
    killed run followed by its resumption), so that the machine's cores stay busy."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    root = tmp_path_factory.mktemp("multinode")
    folders = {name: root / name for name in ("two", "killed", "resumed")}
    for folder in folders.values():
        folder.mkdir()
    one_out, two_out, out = root / "one", folders["two"] / "run", folders["killed"] / "run"
    one = subprocess.Popen([sys.executable, "-m", "sage_fast", *_args(data, one_out)], env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    two = _start_nodes(folders["two"], _args(data, two_out))
    killed = _start_nodes(folders["killed"], _args(data, out, "--resume", "auto"))
    _kill_a_node_mid_run(folders["killed"], out, killed)
    killed_rcs = _wait(killed, folders["killed"], 60)  # the other node fails (its peer is gone), it does not hang
    stopped_at = read_checkpoint(out / "last.pt")["global_step"]
    assert not (out / "adapters.safetensors").exists()
    resumed = _start_nodes(folders["resumed"], _args(data, out, "--resume", "auto"))
    assert _wait(two, folders["two"]) == [0, 0], _logs(folders["two"])
    assert one.wait(timeout=TIMEOUT) == 0, one.stderr.read()[-3000:]
    assert _wait(resumed, folders["resumed"]) == [0, 0], _logs(folders["resumed"])
    return Runs(two_out, one_out, out, stopped_at, killed_rcs)


def test_two_nodes_match_one_process_with_the_same_global_batch(runs):
    got, want = _weights(runs.two_nodes), _weights(runs.one)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    assert read_checkpoint(runs.two_nodes / "last.pt")["global_step"] == 8


def test_a_killed_node_then_resume_auto_on_both_is_bitwise_equal(runs):
    assert all(rc != 0 for rc in runs.killed_rcs) and -signal.SIGKILL in runs.killed_rcs, runs.killed_rcs
    assert 2 <= runs.stopped_at < 8
    steps = [int(line.split(",")[0]) for line in (runs.resumed / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 9))  # continued from the checkpoint: each step logged once
    got, want = _weights(runs.resumed), _weights(runs.two_nodes)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
