"""Launch configurations (`sage_fast.ops.launch`): the types, the order of choice, the one interpret flag.

The GPU configurations themselves are checked by compiling them for sm_90 (test_kernels_compile.py);
here, their values at a few shapes are pinned, so that a change to a heuristic is a visible one.
"""
import ast
import dataclasses
import json
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


@pytest.fixture
def tables():
    """The tuned tables, restored after the test (which may install its own)."""
    saved = launch.installed_entries()
    yield
    launch.install_table(saved)


def test_a_tuned_entry_comes_before_the_heuristic(gpu_path, tables):
    fwd = RowLaunch(block_m=128, block_d=32, num_warps=4)
    dx = RowLaunch(block_m=32, block_d=128, num_warps=8, num_stages=2)
    dw = WeightGradLaunch(block_m=32, block_d=32, block_h=16, split=64, num_warps=4)
    loss = LossLaunch(block_b=2, block_c=1024, num_warps=4, num_stages=1)
    launch.install_table([
        launch.TunedEntry("fwd", ("Test GPU", 768, 4, bf16), fwd),
        launch.TunedEntry("dx", ("Test GPU", 768, 4, bf16), dx),
        launch.TunedEntry("dw", ("Test GPU", 768, 4, bf16), dw),
        launch.TunedEntry("loss", ("Test GPU", 8142, f32, True), loss),
    ])
    assert launch.row_launch(768, 8, bf16, "cuda") == launch.row_launch(768, 8, bf16, "cuda", kernel="fwd") == fwd
    assert launch.row_launch(768, 8, bf16, "cuda", kernel="dx") == dx
    assert launch.weight_grad_launch(768, 8, 100_000, bf16, "cuda") == dw
    # the split never exceeds the row blocks: 100 rows are 4 blocks of 32
    assert launch.weight_grad_launch(768, 8, 100, bf16, "cuda") == dataclasses.replace(dw, split=4)
    assert launch.select_loss_launch(512, 8142, f32, True, "cuda") == loss
    # another r, dtype, class count, FIT setting or device: the heuristic
    assert launch.row_launch(768, 16, bf16, "cuda") == launch.gpu_row_launch(768, 16, bf16)
    assert launch.row_launch(768, 8, f16, "cuda", kernel="dx") == launch.gpu_row_launch(768, 8, f16)
    assert launch.select_loss_launch(512, 8142, bf16, True, "cuda") == launch.gpu_loss_launch(512, 8142)
    assert launch.select_loss_launch(512, 8142, f32, False, "cuda") == launch.gpu_loss_launch(512, 8142)
    assert launch.select_loss_launch(512, 1000, f32, True, "cuda") == launch.gpu_loss_launch(512, 1000)
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as m:
        m.setattr(launch, "device_info", lambda device: ("Other GPU", 132))
        assert launch.row_launch(768, 8, bf16, "cuda") == launch.gpu_row_launch(768, 8, bf16)
        assert launch.row_launch(768, 8, bf16, "cuda", kernel="dx") == launch.gpu_row_launch(768, 8, bf16)
        assert launch.weight_grad_launch(768, 8, 512, bf16, "cuda") == launch.gpu_weight_grad_launch(768, 8, 512, 132)
        assert launch.select_loss_launch(512, 8142, f32, True, "cuda") == launch.gpu_loss_launch(512, 8142)
    with pytest.raises(ValueError, match="kernel must be one of"):
        launch.row_launch(768, 8, bf16, "cuda", kernel="dw")


def _entries():
    return [
        launch.TunedEntry("fwd", ("Test GPU", 768, 32, bf16), RowLaunch(64, 128, 4, 3), {"speedup": 1.2}),
        launch.TunedEntry("dx", ("Test GPU", 768, 32, bf16), RowLaunch(32, 64, 8)),
        launch.TunedEntry("dw", ("Test GPU", 768, 256, bf16), WeightGradLaunch(64, 32, 128, 6, 8, 2)),
        launch.TunedEntry("loss", ("Test GPU", 1000, f32, True), LossLaunch(1, 1024, 8)),
        launch.TunedEntry("fwd", ("Another GPU", 768, 32, f16), RowLaunch(32, 32, 4)),
    ]


def test_table_file_round_trip_and_the_glue_reads_it(tmp_path, gpu_path, tables, monkeypatch):
    """write_table -> read_table gives the same entries; loading the file makes row_launch & co. pick
    the entry for the matching device and shape and the heuristic for everything else."""
    path = launch.write_table(tmp_path / "t.json", _entries(), note="test")
    data = json.loads(path.read_text())
    assert data["format"] == launch.TABLE_FORMAT and data["note"] == "test" and len(data["entries"]) == 5
    first = next(e for e in data["entries"] if e["kernel"] == "fwd" and e["device"] == "Test GPU")
    assert first == {"kernel": "fwd", "device": "Test GPU", "d": 768, "r": 32, "dtype": "bfloat16",
                     "config": {"block_m": 64, "block_d": 128, "num_warps": 4, "num_stages": 3},
                     "evidence": {"speedup": 1.2}}
    back = launch.read_table(path)
    assert sorted(map(repr, back)) == sorted(map(repr, _entries()))
    assert next(e for e in back if e.kernel == "fwd" and e.key[0] == "Test GPU").evidence == {"speedup": 1.2}
    # the environment variable points the module at this file, as a fresh import would read it
    monkeypatch.setenv(launch.TABLE_ENV, str(path))
    assert launch.table_path() == path
    launch.load_tuned_tables()
    assert launch.row_launch(768, 64, bf16, "cuda") == RowLaunch(64, 128, 4, 3)
    assert launch.row_launch(768, 64, bf16, "cuda", kernel="dx") == RowLaunch(32, 64, 8)
    assert launch.weight_grad_launch(768, 512, 25216, bf16, "cuda") == WeightGradLaunch(64, 32, 128, 6, 8, 2)
    assert launch.select_loss_launch(512, 1000, f32, True, "cuda") == LossLaunch(1, 1024, 8)
    # no entry for r = 4, for fp16 on this device, for dw at r = 32: the heuristics
    assert launch.row_launch(768, 8, bf16, "cuda") == launch.gpu_row_launch(768, 8, bf16)
    assert launch.row_launch(768, 64, f16, "cuda") == launch.gpu_row_launch(768, 64, f16)
    assert launch.weight_grad_launch(768, 64, 25216, bf16, "cuda") == launch.gpu_weight_grad_launch(768, 64, 25216, 132)
    # "none": no table at all
    monkeypatch.setenv(launch.TABLE_ENV, "none")
    assert launch.load_tuned_tables() == [] and launch.installed_entries() == []
    assert launch.row_launch(768, 64, bf16, "cuda") == launch.gpu_row_launch(768, 64, bf16)


def test_a_bad_table_is_ignored_with_a_warning(tmp_path, gpu_path, tables):
    bad = [
        "{not json",
        json.dumps({"format": 99, "entries": []}),
        json.dumps({"format": 1, "entries": [{"kernel": "fwd", "device": "Test GPU", "d": 768, "r": 32,
                                               "dtype": "bfloat16", "config": {"block_m": 48, "block_d": 64,
                                                                               "num_warps": 8}}]}),
        json.dumps({"format": 1, "entries": [{"kernel": "bwd", "device": "Test GPU"}]}),
        json.dumps({"format": 1, "entries": [{"kernel": "loss", "device": "Test GPU", "classes": 10,
                                               "dtype": "float64", "fit": True, "config": {}}]}),
    ]
    dup = launch.table_to_json(_entries()[:1])
    dup["entries"] *= 2
    bad.append(json.dumps(dup))
    for i, text in enumerate(bad):
        path = tmp_path / f"bad{i}.json"
        path.write_text(text)
        launch.install_table(_entries())
        with pytest.raises(ValueError):
            launch.read_table(path)
        with pytest.warns(UserWarning, match="ignoring the tuned launch table"):
            assert launch.load_tuned_tables(path) == []
        assert launch.installed_entries() == []  # nothing half-loaded
    assert launch.read_table(tmp_path / "missing.json") == []


def test_the_shipped_table_is_valid_and_packaged():
    """tuned_launch.json beside launch.py parses, every entry is a valid configuration, and setup.py ships it."""
    entries = launch.read_table(launch.TABLE_PATH)
    assert launch.TABLE_PATH.name == "tuned_launch.json" and launch.TABLE_PATH.parent.name == "ops"
    for e in entries:
        assert e.config == launch.KERNEL_TABLES[e.kernel][0](**dataclasses.asdict(e.config))
    setup = (pathlib.Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert '"sage_fast.ops": ["tuned_launch.json"]' in setup


def test_launch_options_carry_num_stages_only_when_set():
    assert RowLaunch(64, 64, 8).options() == {"num_warps": 8}
    assert RowLaunch(64, 64, 8, 2).options() == {"num_warps": 8, "num_stages": 2}
    assert WeightGradLaunch(64, 32, 16, 3, 4, 4).options() == {"num_warps": 4, "num_stages": 4}
    assert LossLaunch(1, 2048, 8).options() == {"num_warps": 8}
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="num_stages"):
            RowLaunch(64, 64, 8, bad)


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
