"""fusedopt: fused multi-tensor optimizers for PyTorch.

One kernel launch per ``step()`` on CUDA, one fused parallel C++ call on CPU; drop-in replacements for
torch.optim (the Fused* classes of ``fusedopt.optimizers``), with plain-PyTorch references for the algorithms
torch.optim lacks (``fusedopt.references``).
"""
from . import lr_scheduler, optimizers, references
from ._ops import EXTENSION_AVAILABLE
from .optimizers import *  # noqa: F401,F403  (every Fused* class: optimizers.__all__)

__all__ = ["EXTENSION_AVAILABLE", *optimizers.__all__, "lr_scheduler", "references"]
__version__ = "0.1.0"
