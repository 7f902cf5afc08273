"""The experiment commands on the tiny model: test-time ensembling, predict, attention, sweep.

One tiny run (3 classes with 40 / 12 / 6 training images, 3 test images each, two epochs on `sage-tiny`)
is trained once for the module; no test writes into it or changes the model loaded from it.
"""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers.images import make_image_folder
from PIL import Image
from safetensors.torch import load_file

from sage_fast.model.attention_maps import attention_maps, cls_attention, patch_grid
from sage_fast.training.attention_figure import figure_pixels, grid_shape
from sage_fast.training.checkpoint import load_weights
from sage_fast.cli import main as cli_main
from sage_fast.cli.common import split_arguments
from sage_fast.training.config import ConfigError, build_config, config_from_dict
from sage_fast.training.data import CLIP_MEAN, CLIP_STD, build_transform
from sage_fast.training.inference import evaluate_weights, load_trained, resolve_run_config
from sage_fast.training.reuse import finished_report
from sage_fast.training.sweep import folder_name, split_axes
from sage_fast.training.trainer import train
from sage_fast.training.tte import TTE_EXPAND, tte_dataset, tte_logits, tte_transform

COUNTS = (40, 12, 6)
TEST_PER_CLASS = 3


def overrides(data_root, out_dir, **extra):
    o = {
        "data.dataset": "folder", "data.root": str(data_root), "data.class_names": "classnames.txt",
        "data.num_workers": 0, "model.name": "sage-tiny", "model.pretrained": None, "model.backend": "torch",
        "model.text_batch_size": 64, "optim.epochs": 2, "optim.batch_size": 16, "optim.lr": 0.05,
        "train.output_dir": str(out_dir), "train.ckpt_every_steps": 0, "train.eval_batch_size": 4,
        "train.progress": False, "train.tensorboard": False,
    }
    o.update(extra)
    return o


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("cmd_data"), COUNTS, TEST_PER_CLASS)


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    """(output folder, report) of the module's trained run. Read only."""
    out = tmp_path_factory.mktemp("cmd_run")
    return out, train(build_config(overrides=overrides(data_root, out)))


@pytest.fixture(scope="module")
def model(run):
    """The trained model, loaded as `sage-fast predict` loads it. Not to be changed."""
    weights = run[0] / "adapters.safetensors"
    return load_trained(weights, resolve_run_config(weights))


def images_of(data_root):
    """The test images, in the order predict lists the class folders."""
    return sorted((data_root / "test").glob("c*/*.png"))


# ---------------------------------------------------------------- test-time ensembling


def test_tte_crops_as_torchvision_cuts_them(data_root):
    """fivecrop: Resize(S + 24) then FiveCrop(S); tencrop adds the five flips."""
    from torchvision import transforms as T

    s = 32
    with Image.open(images_of(data_root)[0]) as im:
        img = im.convert("RGB")
    five, ten = tte_transform(s, "fivecrop")(img), tte_transform(s, "tencrop")(img)
    assert five.shape == (5, 3, s, s) and ten.shape == (10, 3, s, s)
    resized = T.Resize(s + TTE_EXPAND, interpolation=T.InterpolationMode.BICUBIC)(img)
    norm = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    for k, crop in enumerate(T.FiveCrop(s)(resized)):
        assert torch.equal(five[k], norm(crop))
    # TenCrop crops the flipped image: its top-left crop is the flipped top-right one, and so on
    assert torch.equal(ten[:5], five) and torch.equal(ten[5:], five[[1, 0, 3, 2, 4]].flip(-1))
    assert torch.equal(tte_transform(s, "none")(img), build_transform(s, train=False)(img))


def test_tte_fivecrop_logits_are_the_mean_of_the_crops_one_by_one(model, data_root):
    tf = tte_transform(model.image_size, "fivecrop")
    batch = []
    for path in images_of(data_root)[:3]:
        with Image.open(path) as im:
            batch.append(tf(im.convert("RGB")))
    batch = torch.stack(batch)                                        # (3, 5, 3, S, S)
    got = tte_logits(model, batch)
    one_by_one = torch.stack([torch.stack([model.predict(crop[None])[0] for crop in crops]).mean(0)
                              for crops in batch])
    torch.testing.assert_close(got, one_by_one, rtol=1e-5, atol=1e-5)

    class Spy:  # all 3 x 5 crops go through the model in one forward
        def predict(self, x):
            sizes.append(len(x))
            return model.predict(x)

    sizes = []
    torch.testing.assert_close(tte_logits(Spy(), batch), got)
    assert sizes == [15]
    plain = batch[:, 4]
    assert torch.equal(tte_logits(model, plain), model.predict(plain))  # 4-D input: the model itself


def test_tte_none_leaves_the_evaluation_unchanged_and_fivecrop_evaluates_the_crops(run, model, data_root,
                                                                                   tmp_path):
    out, report = run
    weights = out / "adapters.safetensors"
    base = resolve_run_config(weights, overrides=[f"train.output_dir={tmp_path / 'none'}"])
    assert base.eval.tte == "none"
    plain = evaluate_weights(base, weights)
    assert plain["per_class"] == report["per_class"]  # what the run itself measured at its end
    ran = json.loads((tmp_path / "none" / "eval" / "runtime.json").read_text())  # what the evaluation ran
    assert ran["model"]["forward_seen"] and ran["model"]["adapter"]["requested"] == base.model.backend

    cfg = resolve_run_config(weights, overrides=[f"train.output_dir={tmp_path / 'five'}", "eval.tte=fivecrop"])
    five = evaluate_weights(cfg, weights)
    # the same accuracy from the crops' mean logits, image by image
    tf = tte_transform(model.image_size, "fivecrop")
    correct = [0] * len(COUNTS)
    for path in images_of(data_root):
        with Image.open(path) as im:
            crops = tf(im.convert("RGB"))
        label = int(path.parent.name[1:])
        correct[label] += int(tte_logits(model, crops[None]).argmax(-1)) == label
    assert five["per_class"] == pytest.approx([100.0 * c / TEST_PER_CLASS for c in correct])
    assert json.loads((tmp_path / "five" / "eval" / "metrics.json").read_text())["test_images"] == len(images_of(data_root))


def test_tte_config():
    assert build_config().eval.tte == "none"
    assert build_config(overrides=["eval.tte=tencrop"]).eval.tte == "tencrop"
    with pytest.raises(ConfigError, match="eval.tte"):
        build_config(overrides=["eval.tte=sixcrop"])
    with pytest.raises(ConfigError, match="gpu_decode"):
        build_config(overrides=["eval.tte=fivecrop", "data.gpu_decode=true"])
    stored = build_config().to_dict()
    del stored["eval"]                                    # a config saved before the eval section existed
    assert config_from_dict(stored).eval.tte == "none"
    ds = object()
    assert tte_dataset(ds, "none", 32) is ds


# ---------------------------------------------------------------- predict


def test_predict_table_and_json(run, data_root, tmp_path, capsys):
    out, _ = run
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    weights = str(out / "adapters.safetensors")
    assert cli_main(["predict", "--weights", weights, "--topk", "2", str(data_root / "test" / "c0"), str(bad)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["image", "top-1", "p", "top-2", "p"]
    assert len(lines) == 1 + TEST_PER_CLASS + 1 and "unreadable" in lines[-1] and "broken.png" in lines[-1]
    assert "1 of 4 images could not be read" in captured.err

    # JSON, every test image, all classes: the top-1 predictions give the run's own per-class accuracy
    assert cli_main(["predict", "--weights", str(out / "last.pt"), "--json", "--topk", "9",
                     str(data_root / "test" / "c0"), str(data_root / "test" / "c1"), str(data_root / "test" / "c2"),
                     str(bad), "train.eval_batch_size=4"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results[:-1]] == [str(p) for p in images_of(data_root)]
    assert "error" in results[-1] and results[-1]["image"] == str(bad)
    names = (data_root / "classnames.txt").read_text().split()
    correct = [0] * len(COUNTS)
    for r in results[:-1]:
        preds = r["predictions"]
        probs = [p["probability"] for p in preds]
        assert len(preds) == len(COUNTS) and probs == sorted(probs, reverse=True) and math.isclose(sum(probs), 1.0,
                                                                                                  rel_tol=1e-5)
        assert all(names[p["index"]] == p["class"] for p in preds)
        label = int(r["image"].split("/")[-2][1:])
        correct[label] += preds[0]["index"] == label
    per_class = [line.split(",")[-1] for line in (out / "per_class.csv").read_text().splitlines()[1:]]
    assert [100.0 * c / TEST_PER_CLASS for c in correct] == pytest.approx([float(v) for v in per_class])


def test_predict_errors(run, data_root, tmp_path, capsys):
    out, _ = run
    weights = str(out / "adapters.safetensors")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    assert cli_main(["predict", "--weights", weights, str(bad), str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sage-fast: error: sage-fast predict: none of the 2 images could be read")
    assert cli_main(["predict", "--weights", str(tmp_path / "none.safetensors"), str(bad)]) == 2
    assert "weights not found" in capsys.readouterr().err
    assert cli_main(["predict", "--weights", weights, str(bad), "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["predict", "--help"])
    assert e.value.code == 0 and "IMAGE_OR_FOLDER" in capsys.readouterr().out


def test_predict_bare_weights_take_classes_from_the_config(run, data_root, tmp_path, capsys):
    """A state dict without metadata: model from --config, class names from its data set."""
    out, _ = run
    bare = tmp_path / "bare.pt"
    torch.save(load_weights(out / "adapters.safetensors"), bare)
    img = images_of(data_root)[0]
    assert cli_main(["predict", "--weights", str(bare), "--config", str(out / "config.yaml"), "--json", str(img)]) == 0
    bare_result = json.loads(capsys.readouterr().out)
    assert cli_main(["predict", "--weights", str(out / "adapters.safetensors"), "--json", str(img)]) == 0
    assert json.loads(capsys.readouterr().out) == bare_result
    assert cli_main(["predict", "--weights", str(bare), str(img)]) == 2
    assert "holds no run config: give the run's --config" in capsys.readouterr().err


# ---------------------------------------------------------------- the weights decide the model


def _without_zero_shot(src, dst):
    """A copy of an export as written before W_zs was stored in it (digest of the remaining tensors)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sage_fast.training.checkpoint import _tensors_digest

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    del tensors["zs_classifier"]
    save_file(tensors, str(dst), metadata={**meta, "digest": _tensors_digest(tensors)})
    return dst


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sage-fast: error: "), err
    return err[0]


def test_exports_and_checkpoints_store_the_zero_shot_classifier(run, model):
    out, _ = run
    exported = load_file(str(out / "adapters.safetensors"))
    assert torch.equal(exported["zs_classifier"], model.zs_classifier)
    assert torch.equal(torch.load(out / "last.pt", weights_only=True)["zs_classifier"], model.zs_classifier)
    # the template classifier of the model the run was trained as, not a copy of the trained one
    assert not torch.equal(exported["zs_classifier"], exported["classifier"])


def test_eval_builds_no_text_classifier_and_checks_no_training_image(run, tmp_path, monkeypatch):
    """At 8,142 classes these cost minutes: the trained classifier and W_zs come from the weights, the training
    split is only listed. Weights written before W_zs was stored still evaluate alike (W_zs computed)."""
    import sage_fast.model.sage as sage_mod
    import sage_fast.training.data.registry as registry

    out, trained = run
    weights = out / "adapters.safetensors"
    checked, encoded = [], []
    real_screen, real_text = registry.screen_images, sage_mod.cached_text_classifier
    monkeypatch.setattr(registry, "screen_images", lambda root, samples, split, *a, **k: (
        checked.append(split), real_screen(root, samples, split, *a, **k))[1])
    monkeypatch.setattr(sage_mod, "cached_text_classifier", lambda *a, **k: (encoded.append(1), real_text(*a, **k))[1])
    report = evaluate_weights(resolve_run_config(weights), weights, out_dir=tmp_path / "new")
    assert checked == ["test"] and encoded == []
    assert report["overall"] == trained["overall"] and report["per_class"] == trained["per_class"]

    old = _without_zero_shot(weights, tmp_path / "old.safetensors")
    again = evaluate_weights(resolve_run_config(old), old, out_dir=tmp_path / "old")
    assert encoded == [1]  # FIT's z^ needs W_zs: computed, as before
    assert again["per_class"] == trained["per_class"]
    rows = (tmp_path / "new" / "per_class.csv").read_text().splitlines()[1:]
    assert [r.split(",")[2] for r in rows] == [str(c) for c in COUNTS]  # the training counts stored


def test_eval_refuses_settings_that_change_the_result(run, data_root, tmp_path, capsys):
    out, trained = run
    weights = str(out / "adapters.safetensors")
    assert cli_main(["eval", "--weights", weights, "--out", str(tmp_path / "a"), "model.alpha=0.9",
                     "model.bottleneck=4"]) == 2
    line = one_error_line(capsys)
    assert "model.alpha (0.1 -> 0.9), model.bottleneck (null -> 4)" in line and "--force-config" in line
    assert not (tmp_path / "a").exists()
    # what only changes how or where the test images are read, or what only training reads, is fine
    assert cli_main(["eval", "--weights", weights, "--out", str(tmp_path / "b"), "optim.lr=3", "model.mu=2",
                     "data.num_workers=0", "train.eval_batch_size=2", "train.device=cpu"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["overall"] == trained["overall"]
    # a config file is held to the same rule
    other = yaml.safe_load((out / "config.yaml").read_text())
    other["model"]["alpha"] = 0.9
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    assert cli_main(["eval", "--weights", weights, "--config", str(tmp_path / "other.yaml"), "--out",
                     str(tmp_path / "c")]) == 2
    assert "model.alpha (0.1 -> 0.9)" in one_error_line(capsys)
    with pytest.warns(UserWarning, match=r"differ from the ones .* was trained with: model\.alpha \(0\.1 -> 0\.9\)"):
        assert cli_main(["eval", "--weights", weights, "--config", str(tmp_path / "other.yaml"), "--out",
                         str(tmp_path / "c"), "--force-config"]) == 0
    # predict and attention alike
    img = str(images_of(data_root)[0])
    assert cli_main(["predict", "--weights", weights, "model.fit=false", img]) == 2
    assert "model.fit (true -> false)" in one_error_line(capsys)
    assert cli_main(["attention", "--weights", weights, "--images", img, "--out", str(tmp_path / "a.png"),
                     "model.text_proj=false"]) == 2
    assert "model.text_proj (true -> false)" in one_error_line(capsys)


def test_eval_refuses_a_data_set_of_other_class_names(run, data_root, tmp_path, capsys):
    out, _ = run
    shutil.copytree(data_root, tmp_path / "data")
    names = (data_root / "classnames.txt").read_text().split()
    (tmp_path / "data" / "classnames.txt").write_text("\n".join([names[1], names[0], names[2]]) + "\n")
    args = ["eval", "--weights", str(out / "adapters.safetensors"), "--out", str(tmp_path / "e"),
            f"data.root={tmp_path / 'data'}"]
    assert cli_main(args) == 2
    assert (f"class 0 is '{names[0]}' in the weights, '{names[1]}' in the data set (1 more classes differ)"
            in one_error_line(capsys))
    assert not (tmp_path / "e").exists()
    with pytest.warns(UserWarning, match="class names"):
        assert cli_main(args + ["--force-config"]) == 0
    assert (tmp_path / "e" / "per_class.csv").read_text().splitlines()[1].startswith(f'0,"{names[0]}"')


def test_bare_weights_with_a_config_that_does_not_fit(run, data_root, tmp_path, capsys):
    """A state dict without metadata takes --config: one of another bottleneck, or without FIT, is one line
    naming the tensor, both shapes (or where it is missing) and the key."""
    out, _ = run
    bare = tmp_path / "bare.pt"
    torch.save(load_weights(out / "adapters.safetensors"), bare)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["model"]["bottleneck"] = 8
    (tmp_path / "r8.yaml").write_text(yaml.safe_dump(cfg))
    img = str(images_of(data_root)[0])
    assert cli_main(["predict", "--weights", str(bare), "--config", str(tmp_path / "r8.yaml"), img]) == 2
    assert one_error_line(capsys) == ("sage-fast: error: adapters.0.down_v.weight: shape (1, 64) in the weights, "
                                      "(8, 64) for model.bottleneck=8")
    assert cli_main(["eval", "--weights", str(bare), "--config", str(out / "config.yaml"), "model.fit=false",
                     "--out", str(tmp_path / "e")]) == 2
    assert one_error_line(capsys) == ("sage-fast: error: criterion.s1 (and 1 more): in the weights, not in a "
                                      "model with model.fit=false; the weights were trained with model.fit=true")
    nan = {k: v.clone() for k, v in load_weights(out / "adapters.safetensors").items()}
    nan["classifier"][0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    assert cli_main(["predict", "--weights", str(tmp_path / "nan.pt"), "--config", str(out / "config.yaml"), img]) == 2
    assert "classifier hold NaN or Inf" in one_error_line(capsys)


def test_predict_json_is_strict(run, data_root, monkeypatch, capsys):
    import sage_fast.training.inference as inference

    real = inference.predict_images

    def with_nan(*a, **k):
        results = real(*a, **k)
        results[0]["predictions"][0]["probability"] = float("nan")
        return results

    monkeypatch.setattr(inference, "predict_images", with_nan)
    out, _ = run
    img = str(images_of(data_root)[0])
    assert cli_main(["predict", "--weights", str(out / "adapters.safetensors"), "--json", img]) == 0
    text = capsys.readouterr().out
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert results[0]["predictions"][0]["probability"] is None


def test_user_mistakes_of_predict_and_attention_are_one_line(run, data_root, tmp_path, capsys):
    out, _ = run
    weights = str(out / "adapters.safetensors")
    img = str(images_of(data_root)[0])
    if not torch.cuda.is_available():
        assert cli_main(["predict", "--weights", weights, "train.device=cuda", img]) == 2
        assert "CUDA is not available" in one_error_line(capsys)
    assert cli_main(["attention", "--weights", weights, "--images", img, "--out", str(tmp_path)]) == 2
    assert "is a folder: give the PNG file to write" in one_error_line(capsys)
    assert cli_main(["predict", "--weights", str(out / "config.yaml"), img]) == 2
    assert "unreadable weights" in one_error_line(capsys)
    assert cli_main(["predict", "--weights", weights, "--config", str(tmp_path / "none.yaml"), img]) == 2
    assert "none.yaml" in one_error_line(capsys)


# ---------------------------------------------------------------- attention


def test_class_token_attention_is_row_0_of_the_full_softmax():
    torch.manual_seed(0)
    d, heads, n, b = 64, 4, 17, 3
    attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    with torch.no_grad():
        attn.in_proj_bias.normal_()  # nonzero key bias: the softmax must still drop it
    h = torch.randn(b, n, d)
    q, k, _ = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k))   # (B, H, N, hd)
    reference = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)[:, :, 0]
    got = cls_attention(attn, h)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    weights = attn(h, h, h, need_weights=True, average_attn_weights=False)[1][:, :, 0]
    torch.testing.assert_close(got, weights, rtol=1e-5, atol=1e-6)


def test_attention_maps_of_the_frozen_encoder_follow_open_clip_blocks(model, data_root):
    """The hook on ln_1 sees the block input of the normal (fast attention) forward: compared with open_clip's
    own blocks run one by one and PyTorch's attention weights."""
    tf = build_transform(model.image_size, train=False)
    images = []
    for path in images_of(data_root)[:2]:
        with Image.open(path) as im:
            images.append(tf(im.convert("RGB")))
    images = torch.stack(images)
    visual = model.clip.visual
    gh, gw = patch_grid(model)
    for block in (0, 1, -1):
        maps, feats = attention_maps(model, images, block, adapters=False)
        with torch.no_grad():
            x = visual._embeds(images)
            blocks = visual.transformer.resblocks
            for blk in blocks[:block % len(blocks)]:
                x = blk(x)
            h = blocks[block].ln_1(x)
            ref = blocks[block].attn(h, h, h, need_weights=True, average_attn_weights=False)[1][:, :, 0, 1:]
        assert maps.shape == (2, blocks[block].attn.num_heads, gh, gw)
        torch.testing.assert_close(maps.flatten(2), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(feats, model.visual_features(images, adapters=False))
    # no adapter acts before block 0: its maps are the same in the fine-tuned model
    torch.testing.assert_close(attention_maps(model, images, 0, adapters=True)[0],
                               attention_maps(model, images, 0, adapters=False)[0])


def test_attention_png(run, data_root, tmp_path, capsys):
    out, _ = run
    weights = str(out / "adapters.safetensors")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"nope")
    imgs = [str(p) for p in images_of(data_root)[:2]]
    png = tmp_path / "maps" / "attention.png"
    assert cli_main(["attention", "--weights", weights, "--images", *imgs, str(bad), "--out", str(png)]) == 0
    captured = capsys.readouterr()
    assert "skipped unreadable image" in captured.err and "block 1" in captured.out
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size == figure_pixels(*grid_shape(2, 4, heads=False)) == (3 * 220, 2 * 270 + 40)

    heads = tmp_path / "heads.png"
    assert cli_main(["attention", "--weights", weights, "--images", imgs[0], "--out", str(heads), "--heads",
                     "--block", "0", "train.device=cpu"]) == 0
    with Image.open(heads) as im:
        assert im.size == figure_pixels(*grid_shape(1, 4, heads=True)) == figure_pixels(2, 6)
    capsys.readouterr()
    assert cli_main(["attention", "--weights", weights, "--images", imgs[0], "--out", str(heads), "--block", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the model has 2 blocks" in err[0]


# ---------------------------------------------------------------- sweep


def test_sweep_arguments():
    words = ["model.lambdas=[0,0,1],[0.1,0.1,1]", "optim.lr=0.1", "--data.root", "/x", "model.fit=true",
             "--model.alpha=0.1,0.5"]
    over, axes = split_axes(split_arguments(words)[0])  # the command line's words, as sweep reads them
    assert over == ["optim.lr=0.1", "data.root=/x", "model.fit=true"]
    assert [(a.key, a.values) for a in axes] == [("model.lambdas", [[0, 0, 1], [0.1, 0.1, 1]]),
                                                 ("model.alpha", [0.1, 0.5])]
    assert folder_name({"model.lambdas": [0.0, 0.0, 1.0], "data.root": "a/b c"}) == \
        "model.lambdas=[0.0,0.0,1.0],data.root=a_b_c"


def test_sweep_mistakes_are_one_line(tmp_path, capsys):
    """Each is detected where it is made and printed as one line (exit 2), before anything trains."""
    base = ["sweep", f"train.output_dir={tmp_path / 'sweep'}", "--dry-run"]
    for words, expected in [
        (["model.alpha=0.1,0.2", "model.alpha=0.3"], "model.alpha is swept (0.1,0.2) and also set to 0.3: give it once"),
        (["model.alpha=0.1,0.2", "--model.alpha", "0.3"], "model.alpha is swept (0.1,0.2) and also set to 0.3"),
        (["model.alpha=a,b"], "model.alpha: expected float, got 'a'"),
        (["model.alpha=0.1,0.1"], "give the same run"),
        (["model.lambdas=[1],[2]"], "model.lambdas must hold three numbers"),
        (["optim.nope=1,2"], "unknown config key 'optim.nope'"),
        (["--config", str(tmp_path / "none.yaml"), "model.alpha=0.1,0.2"], "config file not found"),
    ]:
        assert cli_main(base + words) == 2, words
        assert expected in one_error_line(capsys), words
    assert not (tmp_path / "sweep").exists()


def test_sweep_trains_each_value_once(data_root, tmp_path, capsys, monkeypatch):
    cfg_file = tmp_path / "base.yaml"
    cfg_file.write_text(build_config(overrides=overrides(data_root, tmp_path / "unused")).to_yaml())
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(cfg_file), f"train.output_dir={out}", "optim.epochs=1", "model.alpha=0.1,0.5"]
    assert cli_main(argv) == 0
    assert "2 runs (2 trained, 0 finished earlier)" in capsys.readouterr().out
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0] == "model.alpha,overall,many,medium,few,run"
    assert [r.split(",")[0] for r in rows[1:]] == ["0.1", "0.5"]
    for value, row in zip(("0.1", "0.5"), rows[1:]):
        folder = out / f"model.alpha={value}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert row.split(",")[1] == f"{metrics['overall']:.4f}" and row.endswith(f"model.alpha={value}")
        assert yaml.safe_load((folder / "config.yaml").read_text())["model"]["alpha"] == float(value)
    with Image.open(out / "sweep.png") as im:
        assert im.format == "PNG"

    # the same command again: both runs are found finished, nothing trains
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("sage_fast.training.trainer.train", no_training)
    assert cli_main(argv) == 0
    assert "2 runs (0 trained, 2 finished earlier)" in capsys.readouterr().out
    # another base config is another run
    changed = build_config(str(cfg_file), [f"train.output_dir={out / 'model.alpha=0.1'}", "optim.epochs=1",
                                           "model.alpha=0.1", "optim.lr=0.02"])
    assert finished_report(changed, out / "model.alpha=0.1") is None
    same = build_config(str(cfg_file), ["optim.epochs=1", "model.alpha=0.1", "train.eval_batch_size=64"])
    assert finished_report(same, out / "model.alpha=0.1")["epoch"] == 1

    with pytest.raises(SystemExit) as e:  # no key with several values
        cli_main(["sweep", "--config", str(cfg_file), "model.alpha=0.1"])
    assert e.value.code == 2


def test_eval_replaces_reports_only_when_asked(run, tmp_path, capsys):
    """eval wrote over the metrics.json, per_class.csv and the plot that --out held: an earlier evaluation's
    (other weights, say) or a user's own file of that name."""
    out, trained = run
    weights = str(out / "adapters.safetensors")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"mine": true}\n')
    assert cli_main(["eval", "--weights", weights, "--out", str(mine)]) == 2
    line = one_error_line(capsys)
    assert f"{mine} holds metrics.json already" in line and "--overwrite" in line
    assert [p.name for p in mine.iterdir()] == ["metrics.json"]
    assert (mine / "metrics.json").read_text() == '{"mine": true}\n'
    assert cli_main(["eval", "--weights", weights, "--out", str(mine), "--overwrite"]) == 0
    assert json.loads((mine / "metrics.json").read_text())["overall"] == trained["overall"]
    capsys.readouterr()
    # a second evaluation into the same folder: refused before anything is built, the first's files intact
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert cli_main(["eval", "--weights", weights, "--out", str(mine)]) == 2
    assert "holds metrics.json, per_class.csv, per_class_accuracy.png, runtime.json already" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
