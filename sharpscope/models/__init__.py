"""The model registry (DESIGN.md section 2): ``create_model(name, in_channels=, num_classes=, image_size=)``.

Names: mlp, convnet, resnet20/32/56 (He et al. 2016, option-A shortcuts), resnet20/32/56-noshort (Li et al.
2018, no skip connections), wrn16-8, wrn28-10 (Zagoruyko & Komodakis 2016).
"""

from sharpscope.models.registry import ModelEntry, create_model, list_models, register_model

# Architecture modules register their models on import.
from sharpscope.models import convnet, mlp, resnet, wrn  # noqa: E402,F401  isort: skip
from sharpscope.models.convnet import ConvNet  # noqa: E402
from sharpscope.models.mlp import MLP  # noqa: E402
from sharpscope.models.resnet import CifarResNet  # noqa: E402
from sharpscope.models.wrn import WideResNet  # noqa: E402

__all__ = [
    # registry
    "create_model",
    "list_models",
    "register_model",
    "ModelEntry",
    # architectures
    "MLP",
    "ConvNet",
    "CifarResNet",
    "WideResNet",
]
