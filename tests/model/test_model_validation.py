"""The model layer's checks: `ModelConfig`'s ranges (shared with the run config) and `SageModel`'s images."""
import pytest
import torch

from sage_fast.model import ModelConfig, build_sage, check_model_config, model_config

NAMES = ["red fox", "tabby cat", "school bus"]
COUNTS = [20, 6, 2]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_sage(NAMES, COUNTS, model_name="sage-tiny", pretrained=None, backend="torch", progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("alpha", 2.0, r"alpha must lie in \[0, 1\], got 2.0"),
    ("gamma", 1000.0, r"gamma must lie in \[0, 10\]"),
    ("gamma", float("nan"), "gamma must be a finite number"),
    ("mu", float("inf"), "mu must be a finite number"),
    ("lambdas", [-1.0, 0.0, 0.0], r"lambdas\[0\] must be >= 0"),
    ("lambdas", [0.0, float("nan"), 0.0], r"lambdas\[1\] must be a finite number"),
    ("logit_scale", float("inf"), "logit_scale must be a finite number"),
    ("logit_scale", 0.0, "logit_scale must be positive"),
    ("bottleneck", 0, "bottleneck must be positive"),
])
def test_model_config_ranges(field, value, message):
    with pytest.raises(ValueError, match=message):
        model_config(**{field: value})
    cfg = ModelConfig(**{field: value})
    with pytest.raises(ValueError, match="model." + message):
        check_model_config(cfg, prefix="model.")


def test_defaults_and_presets_are_in_range():
    check_model_config(ModelConfig())
    check_model_config(ModelConfig(alpha=1.0, gamma=0.085, lambdas=[1e-7, 1e-7, 1e-7]))


@pytest.mark.parametrize("images, error, message", [
    (lambda s: torch.randn(2, 3, 2 * s, 2 * s), ValueError, "images must have shape (B, 3, {s}, {s}) for this model"),
    (lambda s: torch.randn(2, 4, s, s), ValueError, "images must have shape (B, 3, {s}, {s})"),
    (lambda s: torch.randn(3, s, s), ValueError, "images must have shape (B, 3, {s}, {s})"),
    (lambda s: torch.zeros(2, 3, s, s, dtype=torch.uint8), TypeError, "images must be a floating-point tensor"),
    (lambda s: [[0.0]], TypeError, "images must be a torch.Tensor of shape (B, 3, {s}, {s})"),
])
def test_predict_names_a_wrong_image_size_or_dtype(model, images, error, message):
    """A raw torch error ("The size of tensor a ...") before; now what the model expects."""
    s = model.image_size
    with pytest.raises(error) as err:
        model.predict(images(s))
    assert message.format(s=s) in str(err.value)
    assert model.predict(torch.randn(2, 3, s, s)).shape == (2, 3)
