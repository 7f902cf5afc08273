"""Classifier initialisation: trimmed text encoding equals open_clip's, and the disk cache."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from sage_fast.model import (
    TEMPLATES,
    build_sage,
    cached_text_classifier,
    classifier_cache_key,
    encode_text_trimmed,
    load_clip,
    prompts_for,
    resolve_cache_dir,
    text_classifier,
    tokenizer,
    trimmable,
)
from sage_fast.model import classifier as classifier_module

# Names of very different token lengths, so that sorting by length reorders the prompts a lot.
NAMES = ["x", "golden_retriever", "a very long and rather wordy class name, with punctuation (and more)", "red fox"]
COUNTS = [50, 20, 5, 2]
TINY = "sage-tiny"
VIT = "ViT-B-16-quickgelu"
MIXED = ["a", "a photo of a dog.", "a black and white photo of the very long and wordy class name, again.", "two cats"]


def _clip(name, seed=0):
    torch.manual_seed(seed)
    return load_clip(name, pretrained=None)


@pytest.fixture(scope="module")
def tiny_clip():
    return _clip(TINY)


@pytest.fixture(scope="module")
def vit_clip():
    return _clip(VIT)


def _reference_classifier(clip, tok, names, templates):
    """Per class, straight from open_clip's encode_text at full context: the definition of W."""
    rows = []
    with torch.no_grad():
        for name in names:
            emb = F.normalize(clip.encode_text(tok(prompts_for(name, templates))).float(), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=-1))
        text = torch.stack(rows) @ clip.visual.proj.float().t()
    return F.normalize(text, dim=-1)


# ----------------------------------------------------------------------------------------------
# trimmed encoding


@pytest.mark.parametrize("name", [TINY, pytest.param(VIT, marks=pytest.mark.slow)])
def test_trimmed_encoding_matches_encode_text(name, request):
    clip = request.getfixturevalue("tiny_clip" if name == TINY else "vit_clip")
    assert trimmable(clip)
    tokens = tokenizer(name)(MIXED)
    lengths = (tokens.argmax(-1) + 1).tolist()
    assert len(set(lengths)) == len(MIXED)  # prompts of different lengths share one batch
    with torch.no_grad():
        want = clip.encode_text(tokens)
        got = encode_text_trimmed(clip, tokens)
        got_given_length = encode_text_trimmed(clip, tokens, max(lengths))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_given_length, got, rtol=0, atol=0)


@pytest.mark.parametrize("name", [TINY, pytest.param(VIT, marks=pytest.mark.slow)])
def test_trimmed_classifier_matches_untrimmed(name, request, monkeypatch):
    clip = request.getfixturevalue("tiny_clip" if name == TINY else "vit_clip")
    tok = tokenizer(name)
    templates = TEMPLATES if name == TINY else TEMPLATES[:6]  # ViT-B at full context is slow on CPU
    # Small batches and windows: several windows, each sorted on its own, and a short last batch.
    monkeypatch.setattr(classifier_module, "_WINDOW_BATCHES", 2)
    batch = 7
    trimmed = text_classifier(clip, tok, NAMES, templates, batch_size=batch, progress=False)
    full = text_classifier(clip, tok, NAMES, templates, batch_size=batch, progress=False, trim=False)
    want = _reference_classifier(clip, tok, NAMES, templates)
    assert trimmed.shape == (len(NAMES), clip.visual.proj.shape[0])
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trimmed, want, rtol=1e-5, atol=1e-5)  # rows land on their own class


def test_trimmed_classifier_runs_fewer_tokens(tiny_clip, monkeypatch):
    seen = []
    real = classifier_module.encode_text_trimmed

    def spy(clip, text, length=None):
        seen.append(min(int(length), text.shape[1]) if length is not None else text.shape[1])
        return real(clip, text, length)

    monkeypatch.setattr(classifier_module, "encode_text_trimmed", spy)
    text_classifier(tiny_clip, tokenizer(TINY), NAMES[:2], batch_size=16, progress=False)
    assert seen and max(seen) < 30 < tiny_clip.context_length


def test_untrimmable_towers_use_encode_text(tiny_clip, monkeypatch):
    import copy

    import open_clip

    assert not trimmable(torch.nn.Linear(2, 2))
    no_mask = copy.deepcopy(tiny_clip)
    no_mask.attn_mask = None                    # bidirectional: later tokens reach the pooled one
    last = copy.deepcopy(tiny_clip)
    last.text_pool_type = "last"                # pools the final position, which moves when cut
    bad_mask = copy.deepcopy(tiny_clip)
    bad_mask.attn_mask = torch.zeros_like(tiny_clip.attn_mask)

    class OwnEncode(open_clip.model.CLIP):
        def encode_text(self, text, normalize=False):
            return super().encode_text(text, normalize)

    own = copy.deepcopy(tiny_clip)
    own.__class__ = OwnEncode
    for clip in (no_mask, last, bad_mask, own):
        assert not trimmable(clip)

    def boom(*args, **kwargs):
        raise AssertionError("the trimmed path ran on a tower it does not understand")

    monkeypatch.setattr(classifier_module, "encode_text_trimmed", boom)
    got = text_classifier(last, tokenizer(TINY), NAMES[:2], TEMPLATES[:4], progress=False)
    want = _reference_classifier(last, tokenizer(TINY), NAMES[:2], TEMPLATES[:4])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_empty_inputs_are_errors(tiny_clip):
    with pytest.raises(ValueError, match="class_names"):
        text_classifier(tiny_clip, tokenizer(TINY), [], progress=False)
    with pytest.raises(ValueError, match="templates"):
        text_classifier(tiny_clip, tokenizer(TINY), NAMES, (), progress=False)


# ----------------------------------------------------------------------------------------------
# disk cache


def _checkpoint(tmp_path, seed, name="clip.safetensors"):
    """A local sage-tiny checkpoint with random weights from `seed`."""
    from safetensors.torch import save_file

    clip = _clip(TINY, seed)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return str(path)


def _files(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".safetensors")) if os.path.isdir(folder) else []


def _forbid_encoding(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the text encoder ran although the classifier is cached")

    monkeypatch.setattr(classifier_module, "text_classifier", boom)


def _build(path, cache, names=NAMES):
    return build_sage(names, COUNTS[:len(names)], model_name=TINY, pretrained=path, backend="torch", progress=False,
                      cache_dir=cache)


def test_second_build_loads_from_cache(tmp_path, monkeypatch):
    ckpt, cache = _checkpoint(tmp_path, 1), tmp_path / "cache"
    first = _build(ckpt, cache)
    assert len(_files(cache)) == 1
    _forbid_encoding(monkeypatch)
    second = _build(ckpt, cache)
    assert torch.equal(second.classifier, first.classifier)
    assert torch.equal(second.zs_classifier, first.zs_classifier)
    # The key is the content, not the file's name or time: a copy elsewhere, or a touched file, hits.
    copy = tmp_path / "elsewhere" / "renamed.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(open(ckpt, "rb").read())
    os.utime(ckpt, ns=(1, 1))
    for path in (str(copy), ckpt):
        assert torch.equal(_build(path, cache).classifier, first.classifier)
    assert len(_files(cache)) == 1


def test_cached_equals_computed(tmp_path, tiny_clip):
    ckpt, cache = _checkpoint(tmp_path, 0), tmp_path / "cache"
    clip = load_clip(TINY, ckpt)
    want = text_classifier(clip, tokenizer(TINY), NAMES, progress=False)
    for _ in range(2):  # computed and stored, then loaded
        got = cached_text_classifier(clip, tokenizer(TINY), NAMES, model_name=TINY, pretrained=ckpt,
                                     cache_dir=cache, progress=False)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_other_names_templates_or_weights_miss(tmp_path):
    ckpt, cache = _checkpoint(tmp_path, 2), tmp_path / "cache"
    clip, tok = load_clip(TINY, ckpt), tokenizer(TINY)
    calls = []
    real = classifier_module.text_classifier

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def run(names=NAMES, templates=TEMPLATES, weights=ckpt, model=clip):
        return cached_text_classifier(model, tok, names, model_name=TINY, pretrained=weights,
                                      templates=templates, cache_dir=cache, progress=False)

    classifier_module.text_classifier = counting
    try:
        base = run()
        run()
        assert len(calls) == 1
        run(names=NAMES[::-1])                           # same names, other order: other rows
        run(names=NAMES[:3])
        run(names=NAMES[:3] + ["red_fox"])                 # one name changed
        run(templates=TEMPLATES[:10])
        run(templates=TEMPLATES[:-1] + ("a photo of a small {}.",))
        other_ckpt = _checkpoint(tmp_path, 3, "other.safetensors")
        other = run(weights=other_ckpt, model=load_clip(TINY, other_ckpt))
        assert len(calls) == 7
        assert len(_files(cache)) == 7
        assert not torch.allclose(other, base)
    finally:
        classifier_module.text_classifier = real


def test_cache_keys():
    key = classifier_cache_key(VIT, "openai", NAMES)
    assert key == classifier_cache_key(VIT, "openai", list(NAMES), list(TEMPLATES))
    assert len(key) == 64
    others = {
        classifier_cache_key(VIT, "laion2b_s34b_b88k", NAMES),
        classifier_cache_key("ViT-B-16", "openai", NAMES),
        classifier_cache_key(VIT, "openai", NAMES[:-1]),
        classifier_cache_key(VIT, "openai", NAMES, TEMPLATES[:59]),
    }
    assert key not in others and len(others) == 4
    # Random init depends on the torch seed, which the key cannot see: never cached.
    assert classifier_cache_key(VIT, None, NAMES) is None
    assert classifier_cache_key(VIT, "", NAMES) is None


def test_random_init_and_disabled_cache_write_nothing(tmp_path):
    cache = tmp_path / "cache"
    _build(None, cache)
    assert _files(cache) == []
    _build(_checkpoint(tmp_path, 4), False)
    assert _files(cache) == []


def test_default_location(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGE_FAST_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env"
    _build(_checkpoint(tmp_path, 5), None)
    assert len(_files(tmp_path / "env")) == 1
    monkeypatch.delenv("SAGE_FAST_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir(None) == tmp_path / "home" / ".cache" / "sage-fast"
    assert resolve_cache_dir(tmp_path / "x") == tmp_path / "x"
    assert resolve_cache_dir(False) is None


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong_shape", "nan", "foreign_key"])
def test_corrupt_cache_file_is_recomputed(tmp_path, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt, cache = _checkpoint(tmp_path, 6), tmp_path / "cache"
    first = _build(ckpt, cache).classifier.detach().clone()
    (name,) = _files(cache)
    path = cache / name
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with safe_open(str(path), framework="pt") as fh:
            meta, weight = fh.metadata(), fh.get_tensor("classifier")
        if damage == "wrong_shape":
            weight = torch.cat([weight, weight[:1]])
        elif damage == "nan":
            weight[0, 0] = float("nan")
        else:
            meta = dict(meta, key="0" * 64)
        save_file({"classifier": weight}, str(path), metadata=meta)
    with pytest.warns(RuntimeWarning, match="ignoring the classifier cache"):
        again = _build(ckpt, cache).classifier
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with safe_open(str(path), framework="pt") as fh:  # rewritten whole
        assert torch.equal(fh.get_tensor("classifier"), first) and len(fh.metadata()["key"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build(ckpt, cache)


def test_unwritable_cache_warns(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="could not write"):
        m = _build(_checkpoint(tmp_path, 7), blocker / "cache")
    assert m.classifier.shape == (len(NAMES), m.dim)


def test_no_temporary_files_left(tmp_path):
    cache = tmp_path / "cache"
    _build(_checkpoint(tmp_path, 8), cache)
    assert [p for p in os.listdir(cache) if not p.endswith(".safetensors")] == []
