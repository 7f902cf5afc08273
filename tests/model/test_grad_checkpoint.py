"""`model.grad_checkpoint`: the same loss and gradients with activation checkpointing, and the memory it saves.

Every case is fp32 on CPU, on the tiny model (2 blocks, d = 64, N = 17 tokens) with randomised adapters
and s1, s2 (so that every gradient is non-zero). The recomputation in backward runs the same kernels on
the same inputs, so the results are expected to be bitwise equal; the tests allow fp32 rounding (1e-6
relative, 1e-7 absolute) in case a kernel's reduction order varied between the two runs.

Saved bytes are measured with `SavedTensorBytes` (saved_tensors_hooks: every storage autograd keeps for
backward, once; parameters and buffers left out) and compared with `sage_fast.model.memory`'s bytes model.
"""
import copy

import pytest
import torch

from helpers.adapters import randomise_adapters
from sage_fast.model import build_sage
from sage_fast.model.memory import SavedTensorBytes, activation_bytes, vision_shape
from sage_fast.training.config import ConfigError, build_config

NAMES = ["golden_retriever", "red fox", "tabby cat", "school bus", "snow leopard"]
COUNTS = [150, 60, 12, 3, 2]
TINY = "sage-tiny"
BATCH = 3
RTOL, ATOL = 1e-6, 1e-7


@pytest.fixture(scope="module")
def _base():
    torch.manual_seed(0)
    m = build_sage(NAMES, COUNTS, model_name=TINY, pretrained=None, backend="torch", bottleneck=4, progress=False)
    randomise_adapters(m.adapters, seed=3)
    with torch.no_grad():
        m.criterion.s1.fill_(0.3)
        m.criterion.s2.fill_(-0.2)
        m.block_scales.add_(torch.tensor([0.2, -0.1]))
    return m


def configured(base, *, backend="torch", attention="sdpa", grad_checkpoint=False, fit=True):
    """A copy of `base` with these settings (the same trainable weights)."""
    m = copy.deepcopy(base)
    m.set_backend(backend)
    m.attention = attention
    m.config = type(m.config)(**{**vars(m.config), "grad_checkpoint": grad_checkpoint, "fit": fit})
    if not fit:  # rebuild without FIT (its loss module differs), same adapters and classifier
        state = {k: v for k, v in m.trainable_state_dict().items() if not k.startswith("criterion.")}
        m = build_sage(NAMES, COUNTS, m.config, progress=False)
        m.load_trainable_state_dict(state)
    m.train()
    return m


def step(model, images, target):
    """(loss, {name: gradient}) of one step, and the bytes it saved for backward."""
    with SavedTensorBytes(model) as saved:
        loss, _ = model.loss(model(images), target)
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads)), saved.bytes


def inputs(size):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, size, size, generator=gen), torch.tensor([0, 2, 4])


CASES = [  # (adapter backend, attention): the reference, the folded PyTorch path, the Triton interpreter
    ("torch", "sdpa"), ("torch", "open_clip"), ("auto", "sdpa"), ("auto", "open_clip"), ("triton", "sdpa"),
]


@pytest.mark.parametrize("backend,attention", CASES, ids=[f"{b}-{a}" for b, a in CASES])
@pytest.mark.parametrize("grad_checkpoint", [True, 2])
def test_checkpointing_gives_the_same_loss_and_gradients(_base, backend, attention, grad_checkpoint):
    images, target = inputs(_base.image_size)
    loss0, grads0, bytes0 = step(configured(_base, backend=backend, attention=attention), images, target)
    loss1, grads1, bytes1 = step(configured(_base, backend=backend, attention=attention,
                                            grad_checkpoint=grad_checkpoint), images, target)
    torch.testing.assert_close(loss1, loss0, rtol=RTOL, atol=ATOL)
    assert grads1.keys() == grads0.keys()
    for name, grad in grads0.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads1[name], grad, rtol=RTOL, atol=ATOL, msg=name)
    assert bytes1 < bytes0


def test_checkpointing_without_fit_and_with_adaptformer():
    torch.manual_seed(5)
    base = build_sage(NAMES, COUNTS, model_name=TINY, pretrained=None, adapter="adaptformer", fit=False,
                      bottleneck=4, progress=False)
    randomise_adapters(base.adapters, seed=5)
    images, target = inputs(base.image_size)
    results = []
    for ck in (False, True):
        m = copy.deepcopy(base)
        m.config = type(m.config)(**{**vars(m.config), "grad_checkpoint": ck})
        results.append(step(m.train(), images, target))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=RTOL, atol=ATOL)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=RTOL, atol=ATOL, msg=name)


# ---------------------------------------------------------------- the bytes model against the measurement

#: how close the bytes model must be to the measurement (it is exact on the CPU paths with torch 2.4 to 2.14;
#: the tolerance leaves room for another torch version saving a small tensor more or less)
BYTES_RTOL = 0.02


@pytest.mark.parametrize("fit", [True, False])
@pytest.mark.parametrize("backend,adapter", [("auto", "folded"), ("triton", "fused")])
def test_saved_bytes_match_the_bytes_model_and_fall_by_its_factor(_base, backend, adapter, fit):
    """The CPU measurement of the tiny model against `activation_bytes`, without and with checkpointing, and
    the factor by which checkpointing every block cuts the saved bytes (about 5x here, where block 0, whose
    frozen layers keep nothing, is half of the blocks; 7 to 8x for ViT-B/16 and ViT-L/14, README)."""
    shape = vision_shape(TINY)
    images, target = inputs(_base.image_size)
    measured = {}
    for ck in (False, True, 2):
        m = configured(_base, backend=backend, grad_checkpoint=ck, fit=fit)
        m.criterion.backend = "torch"  # the bytes model counts the PyTorch loss
        *_, measured[ck] = step(m, images, target)
        model = activation_bytes(shape, BATCH, num_classes=len(NAMES), bottleneck=4, adapter=adapter,
                                 grad_checkpoint=ck, fit=fit)
        assert measured[ck] == pytest.approx(model.saved, rel=BYTES_RTOL), ck
    factor = activation_bytes(shape, BATCH, num_classes=len(NAMES), bottleneck=4, adapter=adapter, fit=fit).saved / \
        activation_bytes(shape, BATCH, num_classes=len(NAMES), bottleneck=4, adapter=adapter, grad_checkpoint=True,
                         fit=fit).saved
    assert factor > 4
    assert measured[False] / measured[True] == pytest.approx(factor, rel=BYTES_RTOL)


def test_fit_frozen_pass_keeps_no_activations(_base, monkeypatch):
    """FIT's second forward (f_zs, no adapters) runs under no_grad: nothing is saved for backward in it."""
    m = configured(_base, backend="auto")
    images, target = inputs(m.image_size)
    inner = type(m).visual_features
    counts = {}

    def visual_features(self, x, adapters=True):
        with SavedTensorBytes(self) as saved:
            out = inner(self, x, adapters=adapters)
        counts[adapters] = saved.bytes
        return out

    monkeypatch.setattr(type(m), "visual_features", visual_features)
    m.loss(m(images), target)
    assert counts[False] == 0 and counts[True] > 0


def test_a_resume_may_change_it():
    from sage_fast.training.config import config_differences

    stored = build_config(overrides=["model.grad_checkpoint=false"]).to_dict()
    assert config_differences(stored, build_config(overrides=["model.grad_checkpoint=2"]).to_dict()) == []


def test_the_option_is_validated():
    assert build_config(overrides=["model.grad_checkpoint=3"]).model.grad_checkpoint == 3
    assert build_config(overrides=["model.grad_checkpoint=true"]).model.grad_checkpoint is True
    for bad in ("0", "-2", "every"):
        with pytest.raises(ConfigError, match="grad_checkpoint"):
            build_config(overrides=[f"model.grad_checkpoint={bad}"])
    with pytest.raises(ValueError, match="grad_checkpoint"):
        build_sage(NAMES, COUNTS, model_name=TINY, pretrained=None, grad_checkpoint=0, progress=False)


def test_readme_table_is_the_bytes_models():
    """README "Training at scale": the batch table is `batch_table()`'s output, and checkpointing every block
    cuts the saved activations of ViT-B/16 and ViT-L/14 by 7x or more."""
    from pathlib import Path

    from sage_fast.model.memory import batch_table, training_memory

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert batch_table() in readme
    for name in ("ViT-B-16-quickgelu", "ViT-L-14-quickgelu"):
        off, on = (training_memory(name, 128, num_classes=1000, grad_checkpoint=ck).activations.saved
                   for ck in (False, True))
        assert off / on > 7


def test_torch_compile_traces_checkpointed_blocks_without_graph_breaks(_base):
    m = configured(_base, backend="triton", grad_checkpoint=True)
    images, _ = inputs(m.image_size)
    explained = torch._dynamo.explain(m.visual_features)(images)
    assert explained.graph_break_count == 0, explained.break_reasons
