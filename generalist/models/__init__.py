"""Model families behind one registry; every model is a :class:`Classifier` (stem -> blocks -> pool -> head).

Families: ``cnn`` / ``cnn_fast`` (plain conv-BN-ReLU stages), ``resnet`` (CIFAR-style ResNet-20 at
width 1 / depth 1) and ``tv.<name>`` (torchvision classifiers, ``weights=None``).
"""

from generalist.models import cnn as _cnn  # noqa: F401  (registers cnn, cnn_fast)
from generalist.models import resnet as _resnet  # noqa: F401  (registers resnet)
from generalist.models.base import Classifier, Normalize
from generalist.models.registry import create_model, list_models, register_model
from generalist.models.summary import ModelSummary, count_parameters, summarize_model

__all__ = [
    "Classifier",
    "ModelSummary",
    "Normalize",
    "count_parameters",
    "create_model",
    "list_models",
    "register_model",
    "summarize_model",
]
