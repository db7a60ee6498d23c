"""The Fused* optimizers: drop-in replacements for their torch.optim namesakes.

Each class takes exactly the constructor arguments of the torch.optim class it subclasses (torch validates them
and sets the defaults), keeps the same state keys, and says per param group which compiled kernel to run
(`_options`), which hyperparameters it reads (`_hyper`, in the slot order of csrc/update_rules.h) and how a
param's state starts (`_new_state`).
"""
import torch

from .optimizer import FusedOptimizer


def _zeros(param):
    return torch.zeros_like(param, memory_format=torch.preserve_format)


class FusedSGD(FusedOptimizer, torch.optim.SGD):
    """torch.optim.SGD (plain, momentum, Nesterov) with one fused launch per step."""

    _op_name = "sgd_"
    _state_keys = ("momentum_buffer",)
    _uses_step = False
    _state_created_per_key = True  # torch: state.get("momentum_buffer") is None -> a buffer from this grad

    def _options(self, group):
        # torch checks nesterov against momentum/dampening only in the constructor's defaults; a group with
        # momentum 0 runs plain SGD whatever its nesterov says (and nesterov with dampening runs as written).
        momentum = group["momentum"] != 0
        return (momentum, momentum and group["nesterov"], group["maximize"])

    def _hyper(self, group):
        return (group["lr"], group["momentum"], group["dampening"], group["weight_decay"])

    def _active_state_keys(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else (None,)

    def _new_state(self, param, group):
        # Filled by the kernel from this step's gradient, as torch clones it.
        return {"momentum_buffer": _zeros(param)}


class FusedAdam(FusedOptimizer, torch.optim.Adam):
    """torch.optim.Adam (amsgrad, maximize, decoupled_weight_decay) with one fused launch per step."""

    _op_name = "adam_"
    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _options(self, group):
        return (group["amsgrad"], group["maximize"], group.get("decoupled_weight_decay", False))

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])

    def _active_state_keys(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None)

    def _new_state(self, param, group):
        return {key: _zeros(param) for key in self._state_keys}


class FusedAdamW(FusedAdam, torch.optim.AdamW):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""


class FusedAdagrad(FusedOptimizer, torch.optim.Adagrad):
    """torch.optim.Adagrad with one fused launch per step."""

    _op_name = "adagrad_"
    _state_keys = ("sum",)

    def _options(self, group):
        return (group["maximize"],)

    def _hyper(self, group):
        return (group["lr"], group["lr_decay"], group["weight_decay"], group["eps"])

    def _new_state(self, param, group):
        # torch seeds state created after construction from the constructor's value, not the group's
        value = self.defaults["initial_accumulator_value"]
        fill = complex(value, value) if param.is_complex() else value
        return {"sum": torch.full_like(param, fill, memory_format=torch.preserve_format)}


class FusedAdadelta(FusedOptimizer, torch.optim.Adadelta):
    """torch.optim.Adadelta with one fused launch per step."""

    _op_name = "adadelta_"
    _state_keys = ("square_avg", "acc_delta")

    def _options(self, group):
        return (group["maximize"],)

    def _hyper(self, group):
        return (group["lr"], group["rho"], group["eps"], group["weight_decay"])

    def _new_state(self, param, group):
        return {key: _zeros(param) for key in self._state_keys}


class FusedAdamax(FusedOptimizer, torch.optim.Adamax):
    """torch.optim.Adamax with one fused launch per step."""

    _op_name = "adamax_"
    _state_keys = ("exp_avg", "exp_inf")

    def _options(self, group):
        return (group["maximize"],)

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])

    def _new_state(self, param, group):
        return {key: _zeros(param) for key in self._state_keys}


class FusedRMSprop(FusedOptimizer, torch.optim.RMSprop):
    """torch.optim.RMSprop (momentum, centered, maximize) with one fused launch per step."""

    _op_name = "rmsprop_"
    _state_keys = ("square_avg", "momentum_buffer", "grad_avg")

    def _options(self, group):
        return (group["momentum"] > 0, group["centered"], group["maximize"])

    def _hyper(self, group):
        return (group["lr"], group["alpha"], group["eps"], group["weight_decay"], group["momentum"])

    def _active_state_keys(self, group):
        return ("square_avg",
                "momentum_buffer" if group["momentum"] > 0 else None,
                "grad_avg" if group["centered"] else None)

    def _new_state(self, param, group):
        return {key: _zeros(param) for key in self._state_keys}
