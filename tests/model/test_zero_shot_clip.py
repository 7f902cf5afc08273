"""Zero-shot CLIP (`ZeroShotCLIP`): the frozen encoder and the template classifier W_zs, nothing trained."""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers.adapters import randomise_adapters
from sage_fast.model import ZeroShotCLIP, build_sage

NAMES = ["golden_retriever", "red fox", "tabby cat", "school bus"]
COUNTS = [150, 60, 12, 3]


@pytest.fixture(scope="module")
def _built_model():
    torch.manual_seed(0)
    return build_sage(NAMES, COUNTS, model_name="sage-tiny", pretrained=None, backend="torch", progress=False)


@pytest.fixture
def model(_built_model):
    return copy.deepcopy(_built_model)


def test_zero_shot_logits_are_the_scaled_cosine_of_frozen_features_and_templates(model):
    torch.manual_seed(1)
    images = torch.randn(5, 3, model.image_size, model.image_size)
    with torch.no_grad():
        # the frozen encoder's class token before the projection (test_sage.py: it is CLIP's encode_image)
        feats = model.visual_features(images, adapters=False)
        want = model.logit_scale * F.normalize(feats, dim=-1) @ F.normalize(model.zs_classifier, dim=-1).t()
    zs = ZeroShotCLIP(model)
    got = zs.predict(images)
    assert got.shape == (5, len(NAMES)) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a fresh model is zero-shot CLIP too (adapters output 0, classifier = W_zs, no FIT): the same logits
    no_fit = copy.deepcopy(model)
    no_fit.fit = False
    torch.testing.assert_close(no_fit.predict(images), got, rtol=1e-5, atol=1e-5)
    assert zs.num_classes == len(NAMES) and zs.class_names == NAMES and zs.image_size == model.image_size


def test_zero_shot_ignores_everything_training_changes(model):
    torch.manual_seed(2)
    images = torch.randn(3, 3, model.image_size, model.image_size)
    before = ZeroShotCLIP(model).predict(images)
    randomise_adapters(model.adapters, seed=3)
    with torch.no_grad():
        model.classifier.add_(torch.randn_like(model.classifier))
        model.block_scales.mul_(3.0)
    assert torch.equal(ZeroShotCLIP(model).predict(images), before)
    assert not torch.allclose(model.predict(images), before)  # the trained model's logits did change
