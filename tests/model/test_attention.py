"""The backbone's attention kernel (sage_fast.model.attention): "auto" is SDPA, xformers only where a tiny
call of it runs, and an explicit choice that cannot run is a one-line error, never a silent SDPA.

Most tests stand in a fake `xformers` package (sys.modules), so they run whether or not xformers is
installed; the one that probes the real package is skipped without it.
"""
from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from sage_fast.model import attention, build_sage
from sage_fast.model.attention import (
    AttentionUnavailableError,
    explain_attention,
    frozen_self_attention,
    resolve_attention,
    xformers_ops_used,
)

NAMES = ["golden_retriever", "red fox", "tabby cat"]
COUNTS = [150, 12, 3]


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """No probe result or recorded op leaks into or out of a test."""
    probe = attention._unusable_reason  # a test may replace it
    probe.cache_clear()
    monkeypatch.setattr(attention, "_XFORMERS_OPS", {})
    yield
    probe.cache_clear()


def sdpa_bmhk(q, k, v):
    """Attention in xformers' (B, N, H, hd) layout, computed by SDPA."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def fake_xformers(monkeypatch, attention_fn, op_name="fakeF@test"):
    """Install a stand-in `xformers` whose memory_efficient_attention is `attention_fn` and whose
    dispatcher names `op_name`."""
    op = type("FakeFwOp", (), {"NAME": op_name})
    fmha = types.SimpleNamespace(Inputs=lambda query, key, value: (query, key, value),
                                 _dispatch_fw=lambda inp, needs_gradient: op)
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention, ops.fmha = attention_fn, fmha
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(attention, "xformers_version", lambda: "0.0.0+fake")


def no_kernel(q, k, v):
    raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n  query ...")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_sage(NAMES, COUNTS, model_name="sage-tiny", pretrained=None, backend="torch", progress=False)


def test_auto_is_sdpa_even_where_xformers_runs(monkeypatch):
    assert resolve_attention("auto", "cpu") == "sdpa"
    monkeypatch.setattr(attention, "_unusable_reason", lambda device: None)  # xformers "usable" everywhere
    assert resolve_attention("auto", "cuda:0") == "sdpa"
    assert resolve_attention("xformers", "cuda:0") == "xformers"
    info = explain_attention("auto", "cpu")
    assert info["resolved"] == "sdpa" and "same aten kernels" in info["reason"]
    assert info["xformers"]["usable"] is True
    with pytest.raises(ValueError, match="attention must be one of"):
        resolve_attention("flash", "cpu")


def test_explain_without_probing_xformers(monkeypatch):
    def no_probe(device):
        raise AssertionError("xformers must not be probed")

    monkeypatch.setattr(attention, "_unusable_reason", no_probe)
    info = explain_attention("auto", "cuda:0", probe_xformers=False)
    assert info["resolved"] == "sdpa" and info["xformers"]["usable"] is None
    assert info["xformers"]["reason"] == "not probed"


def test_xformers_on_cpu_is_a_one_line_user_error():
    with pytest.raises(AttentionUnavailableError) as caught:
        resolve_attention("xformers", "cpu")
    err = caught.value
    assert err.user_error is True and "\n" not in str(err)
    assert str(err).startswith("model.attention=xformers cannot run on cpu: ")
    assert str(err).endswith("use model.attention=auto or sdpa")
    info = explain_attention("xformers", "cpu")
    assert info["resolved"] is None and info["reason"] == str(err) and info["xformers"]["usable"] is False
    json.dumps(info)


def test_build_refuses_xformers_on_cpu_before_loading_anything(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("CLIP must not be loaded")

    monkeypatch.setattr("sage_fast.model.sage.load_clip", no_load)
    with pytest.raises(AttentionUnavailableError, match="cannot run on cpu"):
        build_sage(NAMES, COUNTS, model_name="sage-tiny", pretrained=None, attention="xformers", progress=False)


def test_xformers_is_never_silently_replaced_by_sdpa(tiny_model):
    model = copy.deepcopy(tiny_model)
    block = model.clip.visual.transformer.resblocks[0]
    x = torch.randn(2, 5, model.dim)
    with pytest.raises(AttentionUnavailableError):
        frozen_self_attention(block.attn, x, "xformers")
    model.attention = "xformers"  # set after the build: the forward refuses too
    with pytest.raises(AttentionUnavailableError):
        model.visual_features(torch.randn(1, 3, model.image_size, model.image_size))
    with pytest.raises(ValueError, match="'sdpa' or 'xformers'"):
        frozen_self_attention(block.attn, x, "auto")


def test_not_installed(monkeypatch):
    monkeypatch.setattr(attention, "xformers_version", lambda: None)
    assert "xformers is not installed" in attention.xformers_unusable_reason("cuda:0")
    assert explain_attention("auto", "cpu")["xformers"] == {
        "version": None, "usable": False, "reason": "xformers is not installed (pip install 'sage-fast[xformers]')"}


def test_probe_needs_a_call_that_runs_and_agrees(monkeypatch):
    cpu = torch.device("cpu")
    fake_xformers(monkeypatch, sdpa_bmhk)
    assert attention._probe_xformers(cpu) is None
    fake_xformers(monkeypatch, no_kernel)
    reason = attention._probe_xformers(cpu)
    assert reason == ("xformers' memory_efficient_attention fails on cpu in torch.float32: NotImplementedError: "
                      "No operator found for `memory_efficient_attention_forward` with inputs:")
    fake_xformers(monkeypatch, lambda q, k, v: v * 1.1)
    assert "disagrees with SDPA on cpu in torch.float32" in attention._probe_xformers(cpu)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)  # a broken install: the import fails
    assert attention._probe_xformers(cpu).startswith("xformers does not import: ")


def test_probe_of_the_installed_xformers():
    """The real package (xformers 0.0.35 loads without its compiled extensions for this torch): its call
    fails on CPU, so it is not usable there, whatever find_spec says."""
    if attention.xformers_version() is None:
        pytest.skip("xformers is not installed (the CI does not install it)")
    reason = attention._probe_xformers(torch.device("cpu"))
    assert reason is not None and reason.startswith("xformers' memory_efficient_attention fails on cpu")


def test_the_model_says_which_attention_and_xformers_op_ran(monkeypatch, tiny_model):
    fake_xformers(monkeypatch, sdpa_bmhk, op_name="fa2F@test-pt")
    monkeypatch.setattr(attention, "_unusable_reason", lambda device: None)  # let the fake run on CPU
    model = copy.deepcopy(tiny_model)
    images = torch.randn(2, 3, model.image_size, model.image_size)
    assert model.runtime()["attention"]["ran"] is None
    with torch.no_grad():
        want = model.visual_features(images)
        assert model.runtime()["attention"]["ran"] == "sdpa"
        assert model.runtime()["attention"]["xformers_ops"] == []
        model.attention = "xformers"
        got = model.visual_features(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    report = model.runtime()["attention"]
    assert report["requested"] == "xformers" and report["ran"] == "xformers"
    assert report["xformers_ops"] == ["fa2F@test-pt"] == xformers_ops_used()
