"""Loads the compiled ops (``torch.ops.fusedopt.*``) and registers their fake kernels.

Importing fusedopt never breaks a training script: when the extension is missing, every Fused* optimizer
runs torch.optim's own implementation, and this module warns once.
"""
import warnings

import torch

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


class AlgorithmSpec:
    """An algorithm's declaration (csrc/algorithms/<name>.h) as the extension exports it: the names the Python
    classes fill an op call by. Nothing here is written by hand on the Python side."""

    def __init__(self, op, declared):
        self.op = op
        self.hyper = tuple(declared["hyper"])  # "lr" first
        self.options = tuple(declared["options"])
        self.states = tuple(name for name, _ in declared["states"])
        self.enabled_by = {name: option for name, option in declared["states"]}  # "" = always used
        self.scalars = tuple(declared["scalars"])
        self.momentum = declared["momentum"] or None  # the hyperparameter a cycling schedule drives
        self.hyper_after_lr = self.hyper[1:]  # what a class's _hyper names (the base reads group["lr"])
        # the names each of a class's methods must return, as sets: checked at every step
        self._names_of = {"_options": frozenset(self.options), "_hyper": frozenset(self.hyper_after_lr)}

    def option_values(self, owner, named):
        """The options in declaration order, from the class's {name: value}."""
        self._same_names(owner, "_options", named)
        return tuple([bool(named[name]) for name in self.options])  # a list first: no generator per group and step

    def hyper_values(self, owner, named):
        """The hyperparameters after lr in declaration order, from the class's {name: value}."""
        self._same_names(owner, "_hyper", named)
        return [float(named[name]) for name in self.hyper_after_lr]

    def active_states(self, options):
        """The state buffers these option values use, with None where a buffer is unused."""
        on = dict(zip(self.options, options))
        return tuple(name if not self.enabled_by[name] or on[self.enabled_by[name]] else None
                     for name in self.states)

    def _same_names(self, owner, method, named):
        expected = self._names_of[method]
        if named.keys() != expected:  # a keys view against a set: no set built per step
            raise TypeError(f"{type(owner).__name__}.{method} must name exactly {sorted(expected)} (the declaration "
                            f"of {self.op} in csrc/algorithms/), got {sorted(named)}")


_SPECS = {}
if EXTENSION_AVAILABLE:
    _SPECS = {op: AlgorithmSpec(op, declared) for op, declared in _C.algorithm_specs().items()}
    # The ops only mutate their inputs, so tracing (FakeTensor, torch.compile) needs no shape logic.
    for _name in (*_SPECS, "advance_schedule_"):
        torch.library.register_fake(f"fusedopt::{_name}")(lambda *args, **kwargs: None)


def spec(op_name):
    """The AlgorithmSpec of a registered step op."""
    return _SPECS[op_name]


def cached_call(op_name, args, grad_sources):
    """The op call `op_name(**args)`, converted once. Per step: `.prepare()` walks its tensors once (False: the
    plan no longer fits them), `.run({name: value})` then runs each call of the step with the named arguments
    replaced, and `.release()` lets go of the step's grads."""
    return _C.CachedCall(op_name, dict(args), list(grad_sources))


def check_grads(name, params):
    """Raises RuntimeError for the first gradient of `params` a step could not use (csrc/grad_check.cpp)."""
    _C.check_grads(name, params)


def plan_guard(containers, views):
    """fusedopt._C.PlanGuard: `.unchanged()` is True while the containers hold the same objects and each real
    view still views its source (see csrc/plan_guard.cpp)."""
    return _C.PlanGuard(list(containers), list(views))


def param_rounding_modes():
    """The step ops' `param_rounding` values, as csrc/storage.h names them; None without the extension."""
    return tuple(_C.param_rounding_modes()) if EXTENSION_AVAILABLE else None


def none_has_grad(params):
    return _C.none_has_grad(params)


def record_function_observed():
    """Whether a profiler or another RecordFunction observer is registered: without one, entering a
    ``torch.autograd.profiler.record_function`` range records nothing. True without the extension (unknown)."""
    return _C.record_function_observed() if EXTENSION_AVAILABLE else True


def op(name):
    return getattr(torch.ops.fusedopt, name)


def table_words(num_tensors, num_groups):
    return torch.ops.fusedopt.table_words(num_tensors, num_groups)
