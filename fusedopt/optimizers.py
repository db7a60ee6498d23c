"""The Fused* optimizers: drop-in replacements for their torch.optim namesakes.

Each class takes the constructor arguments of the torch.optim class it subclasses (torch validates them and sets
the defaults) and keeps the same state keys, plus fusedopt's keyword-only options: ``max_grad_norm`` and the
low-precision ``param_rounding``, ``master_weights``, ``state_dtype`` and ``seed`` (fusedopt/_low_precision.py),
which add the state keys ``master_param`` / ``kahan_comp`` to bfloat16/float16 params where they are used.
It names its op (`_op_name`); the op's declaration (csrc/algorithms/<name>.h, read through
`fusedopt._C.algorithm_specs()`) names the hyperparameters, options, state buffers and scalar state. The class
says, by those names, what a param group's values are (`_hyper`, `_options`) and how a param's state starts when
torch would not start it at zero (`_new_state`).
"""
import torch

from . import references
from .optimizer import FusedOptimizer


class FusedSGD(FusedOptimizer, torch.optim.SGD):
    """torch.optim.SGD (plain, momentum, Nesterov) with one fused launch per step."""

    _op_name = "sgd_"
    _state_created_per_key = True  # torch: state.get("momentum_buffer") is None -> a buffer from this grad

    def _options(self, group):
        # torch checks nesterov against momentum/dampening only in the constructor's defaults; a group with
        # momentum 0 runs plain SGD whatever its nesterov says (and nesterov with dampening runs as written).
        momentum = group["momentum"] != 0
        return {"momentum": momentum, "nesterov": momentum and group["nesterov"], "maximize": group["maximize"]}

    def _hyper(self, group):
        return {"momentum": group["momentum"], "dampening": group["dampening"], "weight_decay": group["weight_decay"]}

    # momentum_buffer starts as zeros and is filled by the kernel from this step's gradient, as torch clones it.


class FusedAdam(FusedOptimizer, torch.optim.Adam):
    """torch.optim.Adam (amsgrad, maximize, decoupled_weight_decay) with one fused launch per step."""

    _op_name = "adam_"

    def _options(self, group):
        return {"amsgrad": group["amsgrad"], "maximize": group["maximize"],
                "decoupled_weight_decay": group.get("decoupled_weight_decay", False)}

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": beta1, "beta2": beta2, "eps": group["eps"], "weight_decay": group["weight_decay"]}


class FusedAdamW(FusedAdam, torch.optim.AdamW):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""


class FusedAdagrad(FusedOptimizer, torch.optim.Adagrad):
    """torch.optim.Adagrad with one fused launch per step."""

    _op_name = "adagrad_"

    def _options(self, group):
        return {"maximize": group["maximize"]}

    def _hyper(self, group):
        return {"lr_decay": group["lr_decay"], "weight_decay": group["weight_decay"], "eps": group["eps"]}

    def _new_state(self, param, group):
        # torch seeds state created after construction from the constructor's value, not the group's
        value = self.defaults["initial_accumulator_value"]
        fill = complex(value, value) if param.is_complex() else value
        return {"sum": torch.full_like(param, fill, memory_format=torch.preserve_format)}


class FusedAdadelta(FusedOptimizer, torch.optim.Adadelta):
    """torch.optim.Adadelta with one fused launch per step."""

    _op_name = "adadelta_"

    def _options(self, group):
        return {"maximize": group["maximize"]}

    def _hyper(self, group):
        return {"rho": group["rho"], "eps": group["eps"], "weight_decay": group["weight_decay"]}


class FusedAdamax(FusedOptimizer, torch.optim.Adamax):
    """torch.optim.Adamax with one fused launch per step."""

    _op_name = "adamax_"

    def _options(self, group):
        return {"maximize": group["maximize"]}

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": beta1, "beta2": beta2, "eps": group["eps"], "weight_decay": group["weight_decay"]}


class FusedRMSprop(FusedOptimizer, torch.optim.RMSprop):
    """torch.optim.RMSprop (momentum, centered, maximize) with one fused launch per step."""

    _op_name = "rmsprop_"

    def _options(self, group):
        return {"momentum": group["momentum"] > 0, "centered": group["centered"], "maximize": group["maximize"]}

    def _hyper(self, group):
        return {"alpha": group["alpha"], "eps": group["eps"], "weight_decay": group["weight_decay"],
                "momentum": group["momentum"]}


class FusedLion(FusedOptimizer, references.Lion):
    """Lion (fusedopt.references.Lion: Chen et al. 2023, decoupled weight decay, maximize) with one fused launch
    per step. State per param, as the reference keeps it: ``exp_avg`` (the momentum, zeros at first) and ``step``
    (a float32 0-dim tensor on the param's device, counted but unused by the update)."""

    _op_name = "lion_"

    def _options(self, group):
        return {"maximize": group["maximize"]}

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": beta1, "beta2": beta2, "weight_decay": group["weight_decay"]}


class FusedLAMB(FusedOptimizer, references.LAMB):
    """LAMB (fusedopt.references.LAMB: You et al. 2019 in NVIDIA's formulation, as apex's FusedLAMB) in one
    fused launch per step: the global grad-norm clipping (``max_grad_norm``, keyword-only, default 1.0; ``None``
    or ``0`` disables it; an attribute, not a group entry, as in the reference), the Adam moments, the
    per-tensor norms of the param and the update (summed in float64 over the whole tensor, also for fp16/bf16
    params; the reference sums in float32 for those), and the update scaled by the trust ratio. On CUDA the
    norms are reduced inside the launch, behind a grid barrier. State per param, as the reference keeps it:
    ``step`` (a float32 0-dim tensor on the param's device), ``exp_avg`` and ``exp_avg_sq`` (zeros at first)."""

    _op_name = "lamb_"

    def _options(self, group):
        return {"maximize": group["maximize"]}

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": beta1, "beta2": beta2, "eps": group["eps"], "weight_decay": group["weight_decay"]}


class FusedNAdam(FusedOptimizer, torch.optim.NAdam):
    """torch.optim.NAdam (momentum_decay, decoupled_weight_decay, maximize) with one fused launch per step.
    `mu_product`, like `step`, is a float32 tensor on the param's device that the launch advances."""

    _op_name = "nadam_"

    def _options(self, group):
        return {"maximize": group["maximize"], "decoupled_weight_decay": group["decoupled_weight_decay"]}

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": beta1, "beta2": beta2, "eps": group["eps"], "weight_decay": group["weight_decay"],
                "momentum_decay": group["momentum_decay"]}

    def _new_state(self, param, group):
        return {"mu_product": 1.0}  # torch: the empty product


class FusedRAdam(FusedOptimizer, torch.optim.RAdam):
    """torch.optim.RAdam (decoupled_weight_decay, maximize) with one fused launch per step. Whether a step is
    rectified is decided in the launch from the device's `step`, without a host sync."""

    _op_name = "radam_"

    def _options(self, group):
        return {"maximize": group["maximize"], "decoupled_weight_decay": group["decoupled_weight_decay"]}

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {"beta1": beta1, "beta2": beta2, "eps": group["eps"], "weight_decay": group["weight_decay"]}


class FusedRprop(FusedOptimizer, torch.optim.Rprop):
    """torch.optim.Rprop (etas, step_sizes, maximize) with one fused launch per step.

    As in torch, the group's lr only seeds a param's ``step_size`` when its state is created; changing the lr
    later (an LR scheduler, fusedopt.lr_scheduler's device schedules) does not change the update.
    """

    _op_name = "rprop_"

    def _options(self, group):
        return {"maximize": group["maximize"]}

    def _hyper(self, group):
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        return {"etaminus": etaminus, "etaplus": etaplus, "step_size_min": step_size_min,
                "step_size_max": step_size_max}

    def _new_state(self, param, group):
        # torch fills step_size with the group's lr; a complex param is two independent reals (torch's comment)
        lr = float(group["lr"])
        fill = complex(lr, lr) if param.is_complex() else lr
        return {"step_size": torch.full_like(param, fill, memory_format=torch.preserve_format)}


class FusedASGD(FusedOptimizer, torch.optim.ASGD):
    """torch.optim.ASGD (lambd, alpha, t0, weight_decay, maximize) with one fused launch per step.

    ``eta`` and ``mu`` are float32 tensors on the param's device, advanced inside the launch (torch keeps them
    as float32 tensors too); the copy-or-average choice for ``ax`` is made there, without a host sync.
    """

    _op_name = "asgd_"

    def _options(self, group):
        return {"maximize": group["maximize"]}

    def _hyper(self, group):
        return {"lambd": group["lambd"], "alpha": group["alpha"], "t0": group["t0"],
                "weight_decay": group["weight_decay"]}

    def _new_state(self, param, group):
        # torch: eta = the group's lr, mu = 1 (both float32); the base converts them to device tensors
        return {"eta": float(group["lr"]), "mu": 1.0}


# Every Fused* class defined above, exported by the fusedopt package.
__all__ = sorted(name for name, value in list(globals().items())
                 if name.startswith("Fused") and isinstance(value, type) and issubclass(value, FusedOptimizer)
                 and value is not FusedOptimizer)
