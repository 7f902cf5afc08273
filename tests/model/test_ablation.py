"""The paper's ablation switches of `ModelConfig` on the Sage model: ``adapter`` (sg | adaptformer),
``text_proj``, ``classifier_init`` (templates | single), ``loss`` (compensated | la | ce); their
validation in the run config, and the trainable parameter counts (Table 12)."""
import dataclasses
import math
import typing

import pytest
import torch
import torch.nn.functional as F

import sage_fast.model.classifier as classifier_module
from sage_fast import AdaptFormerFused, SGAdapterFused, loss_log_prior
from sage_fast.model import CLASSIFIER_TEMPLATES, ModelConfig, SageModel, build_sage, classifier_cache_key, load_clip
from sage_fast.model.clip import _open_clip
from sage_fast.model.clip import model_config as clip_config
from sage_fast.model.templates import SINGLE_TEMPLATE, TEMPLATES
from sage_fast.ops import LOSSES
from sage_fast.training.config import ConfigError, build_config

from helpers.adapters import randomise_adapters

TINY = "sage-tiny"
NAMES = ["golden_retriever", "red fox", "tabby cat", "school bus"]
COUNTS = [150, 60, 12, 3]
SWITCHES = {"adapter": "sg", "text_proj": True, "classifier_init": "templates", "loss": "compensated"}


def _build(seed=0, **fields):
    torch.manual_seed(seed)
    fields.setdefault("backend", "torch")
    return build_sage(NAMES, COUNTS, model_name=TINY, pretrained=None, progress=False, **fields)


def _randomise(model, seed):
    randomise_adapters(model.adapters, seed)
    with torch.no_grad():
        if model.fit:
            model.criterion.s1.fill_(0.3)
            model.criterion.s2.fill_(-0.1)


def _images(model, n=3, seed=1):
    return torch.randn(n, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(seed))


def _sg_block(d, r, text_proj=True):
    """SG-Adapter parameters per block, the block scale s included."""
    return (5 * r + d + 4) * d + 3 * r + 2 - (0 if text_proj else d * d + d)


def _adaptformer_block(d, r):
    """ln (2d), down (dr + r), up (rd + d), the block scale s (1)."""
    return (2 * r + 3) * d + r + 1


# ----------------------------------------------------------------------------------------------
# configuration


def test_defaults_and_choices():
    cfg = ModelConfig()
    assert {k: getattr(cfg, k) for k in SWITCHES} == SWITCHES
    hints = typing.get_type_hints(ModelConfig)
    assert typing.get_args(hints["loss"]) == LOSSES
    assert set(typing.get_args(hints["classifier_init"])) == set(CLASSIFIER_TEMPLATES)
    assert CLASSIFIER_TEMPLATES == {"templates": TEMPLATES, "single": ("a photo of a {}.",)} and SINGLE_TEMPLATE[0] == TEMPLATES[0]


def test_run_config_validates_the_switches():
    cfg = build_config(overrides=["model.adapter=adaptformer", "model.text_proj=false", "model.classifier_init=single",
                                  "model.loss=ce"])
    assert (cfg.model.adapter, cfg.model.text_proj, cfg.model.classifier_init, cfg.model.loss) == (
        "adaptformer", False, "single", "ce")
    for key, bad, listed in [("adapter", "lora", "'sg' | 'adaptformer'"),
                             ("classifier_init", "prompts", "'templates' | 'single'"),
                             ("loss", "focal", "'compensated' | 'la' | 'ce'")]:
        with pytest.raises(ConfigError, match=f"model.{key}: expected one of {listed}, got '{bad}'"):
            build_config(overrides=[f"model.{key}={bad}"])
    with pytest.raises(ConfigError, match="model.text_proj: expected bool"):
        build_config(overrides=["model.text_proj=maybe"])


def test_model_layer_validates_the_switches():
    for key, bad in [("adapter", "lora"), ("classifier_init", "prompts"), ("loss", "focal")]:
        with pytest.raises(ValueError, match=f"{key} must be one of"):
            build_sage(NAMES, COUNTS, model_name=TINY, pretrained=None, progress=False, **{key: bad})


def test_defaults_build_todays_model():
    """The default switches are the Sage model: same modules, same random init, same outputs and
    loss as naming every switch's default."""
    base = _build(seed=3)
    named = _build(seed=3, **SWITCHES)
    assert base.config == named.config
    for (n, p), (m, q) in zip(base.named_parameters(), named.named_parameters()):
        assert n == m and torch.equal(p, q), n
    assert all(type(a) is SGAdapterFused and a.proj is not None for a in base.adapters)
    assert base.guided and base.criterion.adjustment == "compensated"
    images, target = _images(base), torch.tensor([0, 2, 3])
    _randomise(base, 1)
    _randomise(named, 1)
    out_a, out_b = base(images), named(images)
    assert torch.equal(out_a.z_hat, out_b.z_hat)
    assert torch.equal(base.loss(out_a, target)[0], named.loss(out_b, target)[0])


# ----------------------------------------------------------------------------------------------
# adapter: adaptformer, and text_proj


def test_adaptformer_model():
    """AdaptFormer in every block: a fresh model is zero-shot CLIP, the guidance is never computed,
    every trainable parameter gets a gradient, and the counts are L ((2r + 3) d + r + 1) + C d + 2."""
    m = _build(adapter="adaptformer", bottleneck=3)
    assert not m.guided
    assert all(type(a) is AdaptFormerFused and a.bottleneck == 3 for a in m.adapters)
    assert {n for n, _ in m.adapters[0].named_children()} == {"ln", "down", "up"}
    images = _images(m)
    with torch.no_grad():
        want = m.clip.encode_image(images)
        torch.testing.assert_close(m.visual_features(images) @ m.clip.visual.proj, want, rtol=1e-5, atol=1e-5)
    m.guidance = lambda: pytest.fail("AdaptFormer takes no guidance")
    _randomise(m, 2)
    loss, _ = m.loss(m(images), torch.tensor([0, 1, 3]))
    loss.backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    d, L, C = m.dim, m.num_layers, m.num_classes
    assert m.num_trainable_parameters() == L * _adaptformer_block(d, 3) + C * d + 2


def test_no_text_proj_model():
    m = _build(text_proj=False)
    assert all(type(a) is SGAdapterFused and a.proj is None for a in m.adapters)
    assert not any(".proj." in n for n, _ in m.named_parameters() if n.startswith("adapters"))
    d, r, L, C = m.dim, m.bottleneck, m.num_layers, m.num_classes
    assert m.num_trainable_parameters() == L * _sg_block(d, r, text_proj=False) + C * d + 2
    # the guidance still enters the adapters (through f_t), so the classifier moves the features
    _randomise(m, 3)
    with torch.no_grad():
        base = m.visual_features(_images(m))
        m.classifier.add_(torch.randn_like(m.classifier) * 0.1)
        assert not torch.allclose(m.visual_features(_images(m)), base)


@pytest.mark.parametrize("variant", [{"adapter": "adaptformer"}, {"text_proj": False}], ids=["adaptformer", "no_text_proj"])
def test_fused_variant_matches_reference_in_the_model(variant):
    """The fused adapters and loss (Triton, interpreted on CPU) and the folded PyTorch adapters
    ("auto") against the reference path ("torch"): logits, loss and every gradient."""
    results = {}
    for impl in ("torch", "triton", "auto"):
        m = _build(seed=4, backend=impl, loss="la", **variant)
        _randomise(m, 4)
        loss, z_hat = m.loss(m(_images(m, 2)), torch.tensor([1, 3]))
        loss.backward()
        results[impl] = (loss.detach(), z_hat.detach(),
                         {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    loss_r, zh_r, grads_r = results["torch"]
    for impl in ("triton", "auto"):
        loss_f, zh_f, grads_f = results[impl]
        torch.testing.assert_close(loss_f, loss_r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(zh_f, zh_r, rtol=1e-4, atol=1e-4)
        for name, grad in grads_r.items():
            torch.testing.assert_close(grads_f[name], grad, rtol=1e-3, atol=1e-5, msg=f"{impl}: {name}")


# ----------------------------------------------------------------------------------------------
# classifier_init


def test_single_prompt_classifier_and_its_cache(tmp_path, monkeypatch):
    """"single" initialises each row from LIFT's one prompt; the prompts are in the cache key, so the
    two inits are two cache entries and each build reads its own."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    clip = load_clip(TINY, None)
    ckpt = str(tmp_path / "clip.safetensors")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, ckpt)
    cache = tmp_path / "cache"

    def build(init):
        return build_sage(NAMES, COUNTS, model_name=TINY, pretrained=ckpt, backend="torch", progress=False,
                          cache_dir=cache, classifier_init=init)

    single, many = build("single"), build("templates")
    tok = _open_clip().get_tokenizer(TINY)
    with torch.no_grad():
        emb = F.normalize(single.clip.encode_text(tok(["a photo of a tabby cat."])), dim=-1)[0]
        want = F.normalize(emb @ single.clip.visual.proj.t(), dim=-1)
    torch.testing.assert_close(single.classifier[2], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single.zs_classifier, single.classifier.detach())
    assert not torch.allclose(single.classifier, many.classifier)
    assert classifier_cache_key(TINY, ckpt, NAMES, SINGLE_TEMPLATE) != classifier_cache_key(TINY, ckpt, NAMES, TEMPLATES)
    assert len(list(cache.glob("*.safetensors"))) == 2
    monkeypatch.setattr(classifier_module, "text_classifier", lambda *a, **k: pytest.fail("cached: no encoding"))
    assert torch.equal(build("single").classifier, single.classifier)
    assert torch.equal(build("templates").classifier, many.classifier)


# ----------------------------------------------------------------------------------------------
# loss


@pytest.mark.parametrize("fit", [True, False], ids=["fit", "no_fit"])
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_switch(loss, fit):
    """The criterion's prior is the chosen loss's (FIT's four terms included); without FIT the model's
    loss is the cross-entropy of z plus that prior."""
    m = _build(loss=loss, fit=fit, gamma=0.07)
    assert m.criterion.adjustment == loss
    torch.testing.assert_close(m.criterion.log_prior, loss_log_prior(COUNTS, loss, 0.5, 0.07))
    _randomise(m, 6)
    out, target = m(_images(m)), torch.tensor([0, 1, 3])
    got, _ = m.loss(out, target)
    prior = loss_log_prior(COUNTS, loss, 0.5, 0.07)
    ce = lambda t: F.cross_entropy(t + prior, target)  # noqa: E731
    want = ce(out.z) if not fit else (
        ce(out.z) + 0.015 * ce(out.zv) + 0.015 * ce(out.zt) + 0.4 * ce(out.z_hat))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_switches_reach_the_trainer(tmp_path):
    """The run config's model section builds the switched model (here AdaptFormer with plain LA)."""
    import numpy as np

    from sage_fast.training.data import ArrayDataset, LTData
    from sage_fast.training.trainer import Trainer

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    labels, names = [0, 1, 0, 1], ["class 0", "class 1"]
    data = LTData("memory", ArrayDataset(images, labels, names), ArrayDataset(images[:2], labels[:2], names),
                  names, [2, 2], [2, 2], 2)
    cfg = build_config(overrides={
        "model.name": TINY, "model.pretrained": None, "model.backend": "torch", "train.device": "cpu",
        "train.output_dir": str(tmp_path), "train.progress": False, "data.num_workers": 0, "optim.batch_size": 4,
        "model.adapter": "adaptformer", "model.loss": "la", "model.fit": False})
    model = Trainer(cfg, data=data).model
    assert model.config == cfg.model
    assert all(type(a) is AdaptFormerFused for a in model.adapters)
    assert model.criterion.adjustment == "la"


# ----------------------------------------------------------------------------------------------
# parameter counts (Table 12)

#: Table 12 of the paper: the SG-Adapter's trainable parameters for ViT-B/16, in units of 2^20,
#: truncated to two decimals (adapters and block scales; classifier and FIT's s1, s2 excluded).
TABLE_12 = {4: 6.96, 8: 7.13, 32: 8.19, 256: 18.04}


@pytest.fixture(scope="module")
def vit_b16_meta():
    """ViT-B/16 (d = 768, 12 blocks) on the meta device: its shapes without allocating 150M weights."""
    with torch.device("meta"):
        return _open_clip().CLIP(**clip_config("ViT-B-16-quickgelu"))


def _adapter_count(clip, r, **fields):
    num_classes = 10
    m = SageModel(clip, [f"c{k}" for k in range(num_classes)], [5] * num_classes, torch.zeros(num_classes, 768),
                  bottleneck=r, **fields)
    parts = m.trainable_parameter_counts()
    assert sum(parts.values()) == m.num_trainable_parameters()
    assert (parts["classifier"], parts["fit"], parts["block_scales"]) == (num_classes * 768, 2, 12)
    return parts["adapters"] + parts["block_scales"]


@pytest.mark.parametrize("r", sorted(TABLE_12))
def test_vit_b16_parameter_counts_match_table_12(vit_b16_meta, r):
    d, L = 768, 12
    sg = _adapter_count(vit_b16_meta, r)
    assert sg == L * _sg_block(d, r)
    assert math.floor(100 * sg / 2**20) / 100 == TABLE_12[r]
    assert _adapter_count(vit_b16_meta, r, text_proj=False) == L * _sg_block(d, r, text_proj=False) == sg - L * (d * d + d)
    assert _adapter_count(vit_b16_meta, r, adapter="adaptformer") == L * _adaptformer_block(d, r)


def test_config_dataclass_round_trip():
    """The new keys live in the run config's model section and survive to_dict / from dict."""
    from sage_fast.training.config import config_from_dict

    cfg = build_config(overrides=["model.adapter=adaptformer", "model.loss=la"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert dataclasses.asdict(cfg.model)["adapter"] == "adaptformer"
