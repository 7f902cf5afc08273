"""Classifier-init benchmark: `text_classifier` (every class x template prompt through CLIP's text
tower, averaged per class) with each batch cut to its longest prompt after sorting by length
("trimmed", the default) against every batch at the full 77-token context ("untrimmed").

**GPU: not run yet.** Written and run on a CPU-only machine; the CUDA cases below have never
executed, so their sizes and the time they take are estimates.

CUDA: open_clip `ViT-B-16-quickgelu`, random weights (speed does not depend on them, and GPU machines
may be offline), fp32, batch 256 (`ModelConfig.text_batch_size`):
  C = 1000 (ImageNet-LT) x 60 templates = 60,000 prompts: untrimmed and trimmed, for the speedup.
  C = 8142 (iNaturalist 2018) x 60 = 488,520 prompts: trimmed only (target: under 60 s; the
      untrimmed path would take minutes there). Reported, not asserted.
  Timed: one call, after an untimed warm-up call on 8 classes (a call lasts seconds to a minute).
CPU: `sage-tiny` (text tower of width 32, 2 layers), C = 10 x 60 = 600 prompts, both paths; a smoke
  test of the harness and of correctness: tokenisation dominates at this size, so the CPU ratio says
  nothing about ViT-B (on a 2-core CPU, ViT-B-16 with 10 classes takes about 50 s untrimmed, 3-5 s
  trimmed; too slow for the smoke run).

Every trimmed case is checked against the untrimmed path (rows are independent per class, so a
sample of classes suffices: 64 on CUDA, all on CPU); a trimmed path that is fast but wrong fails.
Class names are synthetic Latin-like binomials of varied length (the sort only helps when prompt
lengths vary, as real class names do). Time includes tokenisation, as a build pays it.
"""
from __future__ import annotations

import random

import pytest
import torch

from . import timing
from .timing import DEVICE, ON_GPU

TEMPLATE_COUNT = 60
SAMPLE_CLASSES = 64
GPU_CASES = [(1000, "untrimmed"), (1000, "trimmed"), (8142, "trimmed")]
CPU_CASES = [(10, "untrimmed"), (10, "trimmed")]
TARGET_S = {8142: 60.0}
_SYLLABLES = ("ca", "ro", "lin", "us", "phae", "ter", "mi", "nor", "a", "tha", "lo", "chry", "sis", "ar",
              "den", "bu", "la", "ve", "ri", "don", "stro", "pte", "gon", "i", "cus")


def class_names(count: int, seed: int = 0) -> list[str]:
    """`count` deterministic "Genus species" names of 4 to 18 letters per word."""
    rng = random.Random(seed)

    def word(lo: int, hi: int) -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(lo, hi)))

    return [f"{word(2, 4).capitalize()} {word(2, 6)}" for _ in range(count)]


@pytest.fixture(scope="module")
def text_tower():
    from sage_fast import model as mm

    name = "ViT-B-16-quickgelu" if ON_GPU else "sage-tiny"
    torch.manual_seed(0)
    clip = mm.load_clip(name, pretrained=None, device=DEVICE)
    yield {"module": mm, "name": name, "clip": clip, "tokenizer": mm.tokenizer(name)}
    del clip
    timing.free_memory()


def _time(benchmark, fn, warm):
    """CPU: the harness's step plan. CUDA: one timed call after `warm` (calls last up to a minute)."""
    if not ON_GPU:
        return timing.run_benchmark(benchmark, fn, timing.CPU_STEP_PLAN)
    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(fn)
        timing.sync()
        return None
    benchmark._timer = timing.synced_perf_counter  # noqa: SLF001 - as timing.run_benchmark does
    warm()
    timing.sync()
    benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    st = benchmark.stats.stats
    return timing.Timing(st.median, st.mean, st.stddev, st.min, 1, 1, "synchronised host clock, one call")


@pytest.mark.parametrize("classes,impl", GPU_CASES if ON_GPU else CPU_CASES,
                         ids=[f"C{c}-{i}" for c, i in (GPU_CASES if ON_GPU else CPU_CASES)])
def test_classifier_init(classes, impl, text_tower, benchmark, recorder):
    mm, clip, tok = text_tower["module"], text_tower["clip"], text_tower["tokenizer"]
    templates = mm.TEMPLATES[:TEMPLATE_COUNT]
    names = class_names(classes)
    trim = impl == "trimmed"
    benchmark.group = "classifier_init"
    timing.free_memory()
    out = {}

    def fn():
        out["w"] = mm.text_classifier(clip, tok, names, templates, progress=False, trim=trim)

    def warm():
        mm.text_classifier(clip, tok, names[:8], templates, progress=False, trim=trim)

    timing.reset_peak_memory()
    measured = _time(benchmark, fn, warm)
    if "w" not in out:
        fn()
    got = out["w"]
    assert got.shape == (classes, clip.visual.proj.shape[0]) and bool(torch.isfinite(got).all())

    error = None
    if trim:
        assert mm.trimmable(clip), "the benchmark's tower must take the trimmed path"
        rows = sorted(random.Random(1).sample(range(classes), min(SAMPLE_CLASSES, classes)))
        want = mm.text_classifier(clip, tok, [names[k] for k in rows], templates, progress=False, trim=False)
        error = (got[rows] - want).abs().max().item()
        torch.testing.assert_close(got[rows], want, rtol=0, atol=1e-4 if ON_GPU else 1e-5)
    if measured is None:
        return

    case = f"{text_tower['name']} C={classes} T={len(templates)}"
    prompts = classes * len(templates)
    record = {
        "group": "classifier",
        "case": case,
        "impl": impl,
        "params": {"model": text_tower["name"], "classes": classes, "templates": len(templates), "batch": 256,
                   "precision": "fp32", "weights": "random"},
        **measured.record_fields(),
        "prompts_per_s": prompts / measured.median_s,
        **timing.peak_memory_fields(),
        "max_abs_err_vs_untrimmed": error,
    }
    if classes in TARGET_S:
        record["target_s"] = TARGET_S[classes]
        record["meets_target"] = measured.median_s < TARGET_S[classes]
    # records.add_ratios knows no "classifier" group: the speedup is taken here, same session.
    base = next((r for r in recorder.records if (r.get("group"), r.get("case"), r.get("impl"))
                 == ("classifier", case, "untrimmed")), None)
    if trim and base and base.get("time_s"):
        record["speedup_vs_untrimmed"] = base["time_s"] / measured.median_s
    recorder.add(record, benchmark.extra_info)
