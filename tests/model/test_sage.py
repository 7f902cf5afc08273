"""The Sage model on a small random-init open_clip config (registered by the tests)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers.adapters import randomise_adapters
from sage_fast.model import SageModel, build_sage, frozen_self_attention, load_clip, xformers_unusable_reason
from sage_fast.model.sage import WeightsMismatchError
from sage_fast.model.templates import TEMPLATES, prompts_for

NAMES = ["golden_retriever", "red fox", "tabby cat", "school bus"]
COUNTS = [150, 60, 12, 3]


@pytest.fixture(scope="module")
def tiny():
    return "sage-tiny"  # ships with the package (sage_fast/model/configs)


@pytest.fixture(scope="module")
def _built_model(tiny):
    """Built once per module; tests get a copy (`model`), never this one."""
    torch.manual_seed(0)
    return build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, backend="torch", progress=False)


@pytest.fixture
def model(_built_model):
    """A fresh Sage model (a deep copy of the module's one): a test may change its weights, backend,
    attention or mode without another test seeing it."""
    return copy.deepcopy(_built_model)


def test_fresh_model_is_zero_shot_clip(model):
    images = torch.randn(3, 3, model.image_size, model.image_size)
    with torch.no_grad():
        want = model.clip.encode_image(images)
        for backend in ("sdpa", "open_clip"):
            model.attention = backend
            for adapters in (True, False):
                feats = model.visual_features(images, adapters=adapters)
                torch.testing.assert_close(feats @ model.clip.visual.proj, want, rtol=1e-5, atol=1e-5)


def test_attention_backend_matches_open_clip(model):
    torch.manual_seed(1)
    block = model.clip.visual.transformer.resblocks[0]
    x = torch.randn(2, 17, model.dim)
    want = block.attn(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(frozen_self_attention(block.attn, x, "sdpa"), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers runs on CUDA only")
def test_xformers_attention_matches_open_clip(model):
    reason = xformers_unusable_reason("cuda")
    if reason is not None:
        pytest.skip(reason)
    block = model.clip.visual.transformer.resblocks[0].cuda()
    x = torch.randn(2, 197, model.dim, device="cuda")
    want = block.attn(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(frozen_self_attention(block.attn, x, "xformers"), want, rtol=1e-4, atol=1e-4)


def test_only_intended_parameters_train(model):
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "block_scales" in names and "classifier" in names
    assert {"criterion.s1", "criterion.s2"} <= names
    assert all(n.startswith(("adapters.", "block_scales", "classifier", "criterion.")) for n in names)
    assert not any(p.requires_grad for p in model.clip.parameters())
    d, r, L, C = model.dim, model.bottleneck, model.num_layers, model.num_classes
    per_block = (5 * r + d + 4) * d + 3 * r + 2       # docs/method.md: adapter + s_vt + the block's s
    assert model.num_trainable_parameters() == L * per_block + C * d + 2


def test_classifier_init_from_templates(model, tiny):
    import open_clip

    assert len(TEMPLATES) == 60 and prompts_for("red_fox")[0] == "a photo of a red fox."
    tok = open_clip.get_tokenizer(tiny)
    with torch.no_grad():
        emb = F.normalize(model.clip.encode_text(tok(prompts_for(NAMES[2]))), dim=-1).mean(0)
        want = F.normalize(F.normalize(emb, dim=-1) @ model.clip.visual.proj.t(), dim=-1)
    torch.testing.assert_close(model.classifier[2], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.zs_classifier, model.classifier.detach())
    assert not model.zs_classifier.requires_grad
    torch.testing.assert_close(model.guidance(), F.normalize(model.classifier, dim=-1).mean(0))


def test_outputs_and_fit_logits(model):
    images = torch.randn(5, 3, model.image_size, model.image_size)
    out = model(images)
    for t in out:
        assert t.shape == (5, len(NAMES)) and t.dtype == torch.float32
    with torch.no_grad():
        f = model.visual_features(images)
        f_zs = model.visual_features(images, adapters=False)
    cos = lambda w, x: 25.0 * F.normalize(x, dim=-1) @ F.normalize(w, dim=-1).t()  # noqa: E731
    torch.testing.assert_close(out.z, cos(model.classifier, f))
    torch.testing.assert_close(out.zv, cos(model.classifier, f_zs))
    torch.testing.assert_close(out.zt, cos(model.zs_classifier, f))
    torch.testing.assert_close(model.predict(images), out.z_hat.detach())


def test_frozen_backbone_stays_in_eval_mode(model):
    model.train()
    assert model.adapters.training and not model.clip.training


def test_build_from_local_checkpoint(tmp_path, tiny):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    clip = load_clip(tiny, pretrained=None)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    pt_path, st_path = tmp_path / "clip.pt", tmp_path / "clip.safetensors"
    torch.save(state, pt_path)
    save_file(state, str(st_path))
    for path in (pt_path, st_path):
        m = build_sage(NAMES, COUNTS, model_name=tiny, pretrained=str(path), backend="torch", progress=False)
        for k, v in m.clip.state_dict().items():
            assert torch.equal(v, state[k]), k
    with pytest.raises(FileNotFoundError):
        build_sage(NAMES, COUNTS, model_name=tiny, pretrained=str(tmp_path / "missing.pt"), progress=False)


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="class names"):
        build_sage(NAMES, COUNTS[:2], model_name=tiny, pretrained=None, progress=False)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_sage(NAMES, COUNTS, model_name="no-such-model", pretrained=None, progress=False)
    with pytest.raises(ValueError, match="backend"):
        build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, backend="cuda", progress=False)
    with pytest.raises(ValueError, match="attention"):
        build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, attention="flash", progress=False)


@pytest.mark.parametrize("fit", [True, False])
def test_training_steps_lower_the_loss(tiny, fit):
    torch.manual_seed(2)
    m = build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, fit=fit, backend="torch", progress=False)
    images = torch.randn(8, 3, m.image_size, m.image_size)
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    optim = torch.optim.SGD(m.trainable_parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(8):
        loss, _ = m.loss(m(images), target)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_every_trainable_parameter_gets_a_gradient(tiny):
    torch.manual_seed(3)
    m = build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, backend="torch", progress=False)
    randomise_adapters(m.adapters)
    with torch.no_grad():
        m.criterion.s1.fill_(0.2)
        m.criterion.s2.fill_(0.1)
    images = torch.randn(4, 3, m.image_size, m.image_size)
    loss, _ = m.loss(m(images), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_trainable_state_dict_round_trip(model, tiny):
    other = build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, backend="torch", progress=False)
    randomise_adapters(model.adapters, seed=9)
    other.load_trainable_state_dict(model.trainable_state_dict())
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(dict(other.named_parameters())[k], v)
    with pytest.raises(WeightsMismatchError, match="missing"):
        other.load_trainable_state_dict({"classifier": model.classifier.detach()})
    state = model.trainable_state_dict()
    state["classifier"] = state["classifier"][:, :-1]
    with pytest.raises(WeightsMismatchError, match="classifier: shape"):
        other.load_trainable_state_dict(state)
    assert isinstance(other, SageModel)


def test_fused_and_reference_adapters_agree_in_the_model(tiny):
    """The model's fused path (Triton under the interpreter on CPU) against its reference path."""
    torch.manual_seed(4)
    m = build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, backend="torch", progress=False)
    randomise_adapters(m.adapters, seed=4)
    images = torch.randn(2, 3, m.image_size, m.image_size)
    target = torch.tensor([1, 3])
    results = {}
    for impl in ("torch", "triton", "auto"):  # reference, Triton (interpreted on CPU), folded PyTorch
        m.set_backend(impl)
        m.zero_grad()
        out = m(images)
        loss, _ = m.loss(out, target)
        loss.backward()
        results[impl] = (out.z.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert type(m.adapters[0]).__name__ == "SGAdapterFused"
    for impl in ("triton", "auto"):
        torch.testing.assert_close(results[impl][0], results["torch"][0], rtol=1e-4, atol=1e-4)
        for name, grad in results["torch"][1].items():
            torch.testing.assert_close(results[impl][1][name], grad, rtol=1e-3, atol=1e-5, msg=f"{impl}: {name}")


def test_torch_compile_traces_the_fused_model_without_graph_breaks(tiny):
    """The fused adapter is a registered custom op: the whole adapted encoder is one graph."""
    torch.manual_seed(6)
    m = build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, backend="torch", progress=False)
    m.set_backend("triton")
    randomise_adapters(m.adapters, seed=6)
    m.attention = "sdpa"
    images = torch.randn(2, 3, m.image_size, m.image_size)
    explained = torch._dynamo.explain(m.visual_features)(images)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(m.visual_features, fullgraph=True, backend="aot_eager")
    got = compiled(images)
    got.sum().backward()
    want = m.visual_features(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert m.adapters[0].up.weight.grad is not None


def test_default_fused_training_path_matches_the_reference(tiny):
    """Fused adapters and the fused loss (Triton, interpreted on CPU), the CUDA default, against the
    reference adapters and the PyTorch loss: loss and every gradient."""
    torch.manual_seed(7)
    results = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(7)
        m = build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, backend=impl, progress=False)
        randomise_adapters(m.adapters, seed=7)
        with torch.no_grad():
            m.criterion.s1.fill_(0.3)
            m.criterion.s2.fill_(-0.1)
        images = torch.randn(3, 3, m.image_size, m.image_size, generator=torch.Generator().manual_seed(1))
        loss, z_hat = m.loss(m(images), torch.tensor([0, 2, 3]))
        loss.backward()
        results[impl] = (loss.detach(), z_hat.detach(),
                         {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    (loss_r, zh_r, grads_r), (loss_f, zh_f, grads_f) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(zh_f, zh_r, rtol=1e-4, atol=1e-4)
    for name, grad in grads_r.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_nan_parameters_raise_a_clear_error(tiny):
    m = build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, backend="torch", progress=False)
    m.set_backend("auto")
    with torch.no_grad():
        m.adapters[1].up.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf: adapters\.1\.up\.weight"):
        m(torch.randn(1, 3, m.image_size, m.image_size))


def test_torchscript_checkpoint_gets_a_clear_error(tmp_path, tiny):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "ViT-B-16.pt"
    scripted.save(str(path))
    with pytest.raises(ValueError, match="TorchScript archive"):
        load_clip(tiny, pretrained=str(path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_model_matches_reference_under_bf16_autocast_on_cuda(tiny):
    """The training setting on a GPU: bf16 autocast, fused adapters and loss vs the reference path."""
    results = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(8)
        m = build_sage(NAMES, COUNTS, model_name=tiny, pretrained=None, backend=impl, device="cuda", progress=False)
        randomise_adapters(m.adapters, seed=8)
        images = torch.randn(8, 3, m.image_size, m.image_size, device="cuda",
                             generator=torch.Generator(device="cuda").manual_seed(2))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(images)
        loss, _ = m.loss(out, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3], device="cuda"))
        loss.backward()
        results[impl] = (out.z.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad})
    z_r, grads_r = results["torch"]
    z_f, grads_f = results["triton"]
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-12))  # noqa: E731
    assert rel(z_f, z_r) < 3e-2
    for name, grad in grads_r.items():
        assert rel(grads_f[name], grad) < 5e-2, name
