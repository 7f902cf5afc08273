"""Launch configurations (`sage_fast.ops.launch`): the types, the order of choice, the one interpret flag.

The GPU configurations themselves are checked by compiling them for sm_90 (test_kernels_compile.py);
here, their values at a few shapes are pinned, so that a change to a heuristic is a visible one.
"""
import ast
import dataclasses
import pathlib

import pytest
import torch

import sage_fast.ops.backend as backend
import sage_fast.ops.launch as launch
from sage_fast.ops import compensated_la_loss, compensated_log_prior
from sage_fast.ops.la_loss import fused_la_loss
from sage_fast.ops.launch import LossLaunch, RowLaunch, WeightGradLaunch

KERNELS_DIR = pathlib.Path(__file__).resolve().parents[2] / "kernels"
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture
def gpu_path(monkeypatch):
    """The GPU launch path on this machine: interpreter off, device answers as a 132-SM "Test GPU"."""
    monkeypatch.setattr(backend, "interpret_enabled", lambda: False)
    monkeypatch.setattr(launch, "device_info", lambda device: ("Test GPU", 132))


def test_gpu_heuristics_at_a_few_shapes(gpu_path):
    # (d, H = 2r, operand dtype) -> row kernels: fp32 operands take half the rows at small H.
    assert launch.row_launch(768, 8, f32, "cuda") == RowLaunch(block_m=32, block_d=64, num_warps=8)
    assert launch.row_launch(768, 8, bf16, "cuda") == RowLaunch(block_m=64, block_d=64, num_warps=8)
    assert launch.row_launch(768, 256, f16, "cuda") == RowLaunch(block_m=32, block_d=32, num_warps=8)
    assert launch.row_launch(1024, 512, bf16, "cuda") == RowLaunch(block_m=16, block_d=16, num_warps=8)
    assert launch.row_launch(20, 2, bf16, "cuda") == RowLaunch(block_m=64, block_d=32, num_warps=8)
    assert launch.row_block_h(2) == 16 and launch.row_block_h(64) == 64 and launch.row_block_h(66) == 128
    # Weight gradients at 512 rows (8 row blocks): the split fills two waves of 132 SMs, at most 8.
    assert launch.weight_grad_launch(768, 8, 512, bf16, "cuda") == WeightGradLaunch(64, 64, 16, 8, 8)
    assert launch.weight_grad_launch(768, 512, 25216, bf16, "cuda") == WeightGradLaunch(64, 32, 128, 3, 8)
    assert launch.weight_grad_launch(768, 8, 1, bf16, "cuda").split == 1
    # The loss: one row per program, chunks of at most 2048 classes.
    assert launch.loss_launch(512, 8142) == LossLaunch(block_b=1, block_c=2048, num_warps=8)
    assert launch.loss_launch(512, 100) == LossLaunch(block_b=1, block_c=128, num_warps=1)


def test_interpreter_has_its_own_configurations():
    if not backend.interpret_enabled():
        pytest.skip("Triton's interpreter is off here (CUDA)")
    assert launch.row_launch(768, 8, f32, "cpu") == launch.interpreter_row_launch(768, 8) == RowLaunch(64, 128, 4)
    assert launch.weight_grad_launch(768, 8, 512, f32, "cpu") == launch.interpreter_weight_grad_launch(768, 8, 512)
    assert launch.weight_grad_launch(768, 8, 512, f32, "cpu").split == 2
    assert launch.loss_launch(300, 100) == launch.interpreter_loss_launch(300, 100) == LossLaunch(64, 128, 8)


def test_a_tuned_entry_comes_before_the_heuristic(gpu_path, monkeypatch):
    row = RowLaunch(block_m=128, block_d=32, num_warps=4)
    dw = WeightGradLaunch(block_m=32, block_d=32, block_h=16, split=64, num_warps=4)
    monkeypatch.setitem(launch.TUNED_ROW, ("Test GPU", 768, 4, bf16), row)
    monkeypatch.setitem(launch.TUNED_WEIGHT_GRAD, ("Test GPU", 768, 4, bf16), dw)
    assert launch.row_launch(768, 8, bf16, "cuda") == row
    assert launch.weight_grad_launch(768, 8, 100_000, bf16, "cuda") == dw
    # the split never exceeds the row blocks: 100 rows are 4 blocks of 32
    assert launch.weight_grad_launch(768, 8, 100, bf16, "cuda") == dataclasses.replace(dw, split=4)
    # another r, dtype or device: the heuristic
    assert launch.row_launch(768, 16, bf16, "cuda") == launch.gpu_row_launch(768, 16, bf16)
    assert launch.row_launch(768, 8, f16, "cuda") == launch.gpu_row_launch(768, 8, f16)
    monkeypatch.setattr(launch, "device_info", lambda device: ("Other GPU", 132))
    assert launch.row_launch(768, 8, bf16, "cuda") == launch.gpu_row_launch(768, 8, bf16)
    assert launch.weight_grad_launch(768, 8, 512, bf16, "cuda") == launch.gpu_weight_grad_launch(768, 8, 512, 132)


def test_launch_values_are_checked_and_frozen():
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        RowLaunch(block_m=48, block_d=32, num_warps=4)
    with pytest.raises(ValueError, match=">= 16"):
        RowLaunch(block_m=8, block_d=32, num_warps=4)
    with pytest.raises(ValueError, match="num_warps"):
        WeightGradLaunch(block_m=64, block_d=32, block_h=16, split=2, num_warps=3)
    with pytest.raises(ValueError, match="split"):
        WeightGradLaunch(block_m=64, block_d=32, block_h=16, split=0, num_warps=4)
    with pytest.raises(ValueError, match="block_c"):
        LossLaunch(block_b=1, block_c=100, num_warps=1)
    LossLaunch(block_b=1, block_c=1, num_warps=1)  # the loss kernel has no dot: any power of two
    with pytest.raises(dataclasses.FrozenInstanceError):
        RowLaunch(16, 16, 4).block_m = 32


def test_the_loss_glue_launches_what_loss_launch_returns(monkeypatch):
    """Tests force small loss tiles by replacing `launch.loss_launch`: it must reach the kernel."""
    asked = []
    forced = LossLaunch(block_b=2, block_c=16, num_warps=1)
    monkeypatch.setattr(launch, "loss_launch", lambda batch, num_classes: asked.append((batch, num_classes)) or forced)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counts = [30, 5, 9, 1, 12] * 8
    logits = torch.randn(5, 40, device=device)
    target = torch.tensor([0, 7, 39, 12, 3], device=device)
    got = fused_la_loss(logits, target, compensated_log_prior(counts))
    assert asked == [(5, 40)]
    torch.testing.assert_close(got, compensated_la_loss(logits, target, counts), rtol=1e-5, atol=1e-6)


def test_one_interpret_flag():
    """The ops layer reads the kernels' flag; the kernels define it once and import nothing of the ops."""
    from sage_fast.kernels import la_loss, sg_adapter, utils

    assert backend.interpret_enabled() is utils.INTERPRET
    assert not hasattr(sg_adapter, "INTERPRET") and not hasattr(la_loss, "INTERPRET")
    for path in sorted(KERNELS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("sage_fast"), (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("sage_fast") for a in node.names), path.name
