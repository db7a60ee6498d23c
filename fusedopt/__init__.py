"""fusedopt: fused multi-tensor optimizers for PyTorch.

One kernel launch per ``step()`` on CUDA, one fused parallel C++ call on CPU, for SGD (momentum, Nesterov),
Adam/AdamW, Adagrad, Adadelta, Adamax and RMSprop; drop-in replacements for torch.optim.
"""
from . import lr_scheduler
from ._ops import EXTENSION_AVAILABLE
from .optimizers import (
    FusedAdadelta,
    FusedAdagrad,
    FusedAdam,
    FusedAdamax,
    FusedAdamW,
    FusedRMSprop,
    FusedSGD,
)

__all__ = [
    "EXTENSION_AVAILABLE",
    "FusedSGD",
    "FusedAdam",
    "FusedAdamW",
    "FusedAdagrad",
    "FusedAdadelta",
    "FusedAdamax",
    "FusedRMSprop",
    "lr_scheduler",
]
__version__ = "0.1.0"
