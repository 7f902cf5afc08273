"""ViT-L/14 (d = 1024, 24 blocks): the open_clip names the docs give, LIFT's bottleneck rule at L = 24, and the
trainable parameter counts of docs/method.md ("ViT-L/14"), on the meta device (no weights allocated)."""
import pytest
import torch

from sage_fast.model import SageModel, image_size
from sage_fast.model.clip import _open_clip, check_pretrained, model_config
from sage_fast.model.memory import trainable_parameters, vision_shape
from sage_fast.ops import lift_bottleneck

#: docs/method.md: C -> (r, adapters + block scales, all trainable with FIT)
DOCUMENTED = {100: (2, 25_510_080, 25_612_482), 365: (4, 25_755_984, 26_129_746),
              1000: (16, 27_231_408, 28_255_410), 8142: (128, 41_002_032, 49_339_442)}


@pytest.fixture(scope="module")
def vit_l14_meta():
    with torch.device("meta"):
        return _open_clip().CLIP(**model_config("ViT-L-14-quickgelu"))


@pytest.mark.parametrize("classes", sorted(DOCUMENTED))
def test_parameter_counts_and_bottleneck(vit_l14_meta, classes):
    r, adapters, total = DOCUMENTED[classes]
    assert lift_bottleneck(classes, 24) == r
    m = SageModel(vit_l14_meta, [f"c{k}" for k in range(classes)], [5] * classes, torch.zeros(classes, 1024))
    assert (m.dim, m.num_layers, m.bottleneck) == (1024, 24, r)
    parts = m.trainable_parameter_counts()
    d = 1024
    assert parts["adapters"] + parts["block_scales"] == 24 * ((5 * r + d + 4) * d + 3 * r + 2) == adapters
    assert m.num_trainable_parameters() == total == adapters + classes * d + 2
    assert trainable_parameters(vision_shape("ViT-L-14-quickgelu"), classes, r) == total


def test_the_documented_names_and_weights_exist():
    for name, size in (("ViT-L-14-quickgelu", 224), ("ViT-L-14-336-quickgelu", 336)):
        assert image_size(name) == size
        check_pretrained(name, "openai")  # OpenAI's weights (QuickGELU), an open_clip tag
        shape = vision_shape(name)
        assert (shape.width, shape.layers, shape.heads, shape.quick_gelu) == (1024, 24, 16, True)
        assert shape.tokens == (size // 14) ** 2 + 1
