"""Long-tailed data sets, CLIP transforms, samplers and loaders (see `datasets` for the formats)."""
from .datasets import *  # noqa: F401,F403
from .datasets import (  # noqa: F401  (private helpers the tests use)
    _CifarUnpickler,
)
