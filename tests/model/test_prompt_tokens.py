"""`tokenize_prompts` gives open_clip's token ids exactly: on all 60 templates with awkward names (unicode, HTML
entities, names long enough to be truncated, empty ones, punctuation at the seams), and on random ASCII names
and templates (Hypothesis)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_fast.model import tokenizer
from sage_fast.model.prompt_tokens import splices, tokenize_prompts
from sage_fast.model.templates import SINGLE_TEMPLATE, TEMPLATES, prompts_for

NAMES = [
    "golden_retriever", "Red Fox", "snow leopard", "x", "3d", "C3PO", "t-shirt", "St. John's wort", "e.g.",
    "rock 'n' roll", "O'", "cat's", "it'll", "Ardea alba (great egret)", "a.b.c.", "100", "?", "...", "'s", "'",
    "", " ", "_", "__", "  spaced   out  ", "tab\tname", "new\nline", "a&b", "&amp;", "Tom &amp; Jerry",
    "<end_of_text>", "a < b", "naïve café", "Ångström", "Æsculapius", "ﬁsh", "‘quoted’", "CafÃ©", "Straße",
    "中文名字", "🦊 fox", "Ｆｕｌｌｗｉｄｔｈ", "x\u00a0y", "control\x01char", "carriage\rreturn",
    "Longus " * 40,                             # 240 characters: truncated at 77 tokens
    "Pseudo" + "nym" * 60 + "us",               # one very long word
    "Aa1" * 30,
]


@pytest.fixture(scope="module")
def tok():
    t = tokenizer("ViT-B-16-quickgelu")
    assert splices(t)
    return t


def reference(tok, names, templates):
    return tok([p for n in names for p in prompts_for(n, templates)])


def test_same_ids_as_the_tokenizer_on_all_templates(tok):
    want = reference(tok, NAMES, TEMPLATES)
    got = tokenize_prompts(tok, NAMES, TEMPLATES)
    assert got.dtype == want.dtype == torch.int64 and got.shape == want.shape == (len(NAMES) * 60, 77)
    mismatch = (got != want).any(dim=1).nonzero().flatten().tolist()
    assert not mismatch, [(NAMES[i // 60], TEMPLATES[i % 60]) for i in mismatch[:5]]
    assert (want[:, -1] != 0).any(), "no name was long enough to be truncated"


def test_windows_and_single_template(tok):
    want = reference(tok, NAMES, TEMPLATES)
    for start, stop in ((0, 7), (59, 61), (100, 1000), (len(want) - 3, len(want) + 5), (5, 5)):
        assert torch.equal(tokenize_prompts(tok, NAMES, TEMPLATES, start, stop), want[start:stop]), (start, stop)
    assert torch.equal(tokenize_prompts(tok, NAMES, SINGLE_TEMPLATE), reference(tok, NAMES, SINGLE_TEMPLATE))


def test_seams_that_html_entities_or_special_tokens_could_cross(tok, monkeypatch):
    """"&amp" + ";" is one entity and "<end_of" + "_text>" one special token only in the whole prompt: such names
    go to the tokenizer itself; plain ones are spliced."""
    names, templates = ["&amp", "<end_of", "&lt", "plain name"], ["{};", "{}_text>", "a {}."]
    want = reference(tok, names, templates)
    sent = []
    call = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, texts, *a, **k: sent.extend(texts) or call(self, texts, *a, **k))
    assert torch.equal(tokenize_prompts(tok, names, templates), want)
    assert sorted(sent) == sorted(p for n in names[:3] for p in prompts_for(n, templates))


def test_another_tokenizer_is_called_as_it_is():
    calls = []

    def fake(prompts):
        calls.append(list(prompts))
        return torch.arange(len(prompts))[:, None].expand(-1, 4)

    out = tokenize_prompts(fake, ["a_b", "c"], ["x {}.", "{}"], 1, 4)
    assert calls == [["a b", "x c.", "c"]] and out.shape == (3, 4)


_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


@settings(max_examples=100, deadline=None)
@given(names=st.lists(_ASCII, min_size=1, max_size=4))
def test_random_ascii_names_on_all_templates(tok, names):
    assert torch.equal(tokenize_prompts(tok, names, TEMPLATES), reference(tok, names, TEMPLATES))


@settings(max_examples=100, deadline=None)
@given(names=st.lists(_ASCII, min_size=1, max_size=3), pre=_ASCII, post=_ASCII)
def test_random_ascii_templates(tok, names, pre, post):
    no_braces = str.maketrans("{}", "()")
    templates = [pre.translate(no_braces) + "{}" + post.translate(no_braces), "{}" + post.translate(no_braces),
                 pre.translate(no_braces) + "{}"]
    assert torch.equal(tokenize_prompts(tok, names, templates), reference(tok, names, templates))
