"""Loads the compiled ops (``torch.ops.fusedopt.*``) and registers their fake kernels.

Importing fusedopt never breaks a training script: when the extension is missing, every Fused* optimizer
runs torch.optim's own implementation, and this module warns once.
"""
import warnings

import torch

OP_NAMES = ("sgd_", "adam_", "adagrad_", "adadelta_", "adamax_", "rmsprop_", "advance_schedule_")
HYPER_SLOTS = 5  # hyperparameters per param group: kMaxHyper in csrc/update_rules.h

try:
    from . import _C  # registers torch.ops.fusedopt

    EXTENSION_AVAILABLE = True
    EXTENSION_ERROR = None
except ImportError as error:  # not built, or built against another torch
    EXTENSION_AVAILABLE = False
    EXTENSION_ERROR = error
    warnings.warn(
        f"fusedopt: the compiled extension could not be loaded ({error}); the Fused* optimizers fall back to "
        "torch.optim's own (unfused) implementations. Reinstall fusedopt to build it.",
        RuntimeWarning,
        stacklevel=2,
    )

if EXTENSION_AVAILABLE:
    # The ops only mutate their inputs, so tracing (FakeTensor, torch.compile) needs no shape logic.
    for _name in OP_NAMES:
        torch.library.register_fake(f"fusedopt::{_name}")(lambda *args, **kwargs: None)


def cached_call(op_name, args, grad_sources):
    """The op call `op_name(*args)`, converted once; `.run({name: value})` repeats it with fresh grads and
    the named arguments replaced."""
    return _C.CachedCall(op_name, tuple(args), list(grad_sources))


def plan_guard(containers, params, states, steps, views):
    """fusedopt._C.PlanGuard: `.unchanged()` is True while the containers hold the same objects and each
    param's state tensors still match it (see csrc/plan_guard.cpp)."""
    return _C.PlanGuard(list(containers), list(params), list(states), list(steps), list(views))


def none_has_grad(params):
    return _C.none_has_grad(params)


def op(name):
    return getattr(torch.ops.fusedopt, name)


def table_words(num_tensors, num_groups):
    return torch.ops.fusedopt.table_words(num_tensors, num_groups)
