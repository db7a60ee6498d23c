"""Plain-PyTorch Lion and LAMB: optimizers torch.optim does not have, written like torch.optim's own
single-tensor implementations (a loop over params, lazy state, math in the param's dtype).

They are the references fusedopt's fused Lion/LAMB kernels are tested against, the implementations those
classes fall back to when the compiled extension is missing, and public classes in their own right:

    from fusedopt.references import Lion, LAMB

Both keep ``state["step"]`` as a float32 0-dim tensor on the param's device (as torch does for its
fused/capturable paths, and as fusedopt's kernels keep it), take ``maximize`` as torch.optim does, reject
sparse gradients with ``RuntimeError`` and validate their arguments with torch.optim's wording. They offer
no ``foreach``/``fused``/``capturable``/``differentiable`` variants. Each step reads ``step`` and the LAMB
trust ratio with ``.item()``, as torch's single-tensor code reads its CPU ``step``: a host sync per param on
CUDA, which is acceptable for a reference and a fallback, not for speed.
"""
import math

import torch
from torch.optim import Optimizer

__all__ = ["Lion", "LAMB"]


def _check_lr(lr):
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_betas(betas):
    for index in (0, 1):
        if not 0.0 <= betas[index] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")


def _check_weight_decay(weight_decay):
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _as_float(value):
    """A hyperparameter as a Python float: lr may be a 1-element tensor, as in torch.optim."""
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def _real(tensor):
    # Complex params are updated as pairs of independent reals, as torch.optim does.
    return torch.view_as_real(tensor) if torch.is_complex(tensor) else tensor


def _new_step(param):
    return torch.zeros((), dtype=torch.float32, device=param.device)


def _zeros(param):
    return torch.zeros_like(param, memory_format=torch.preserve_format)


class _Reference(Optimizer):
    """What Lion and LAMB share: closure handling, grad collection, lazy state."""

    _state_buffers = ()  # names of the param-shaped state buffers, created as zeros on the first step

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _params_with_grad_by_group(self):
        """Each group's params that have a grad. Every grad and `step` is checked before any update, so a sparse
        grad or a number `step` in a later group raises with nothing written."""
        by_group = [[p for p in group["params"] if p.grad is not None] for group in self.param_groups]
        if any(p.grad.is_sparse for params in by_group for p in params):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        for param in (p for params in by_group for p in params):
            step = self.state[param].get("step") if param in self.state else None
            if step is not None and not (torch.is_tensor(step) and step.numel() == 1):
                # as torch.optim's kernels reject it: a number would be rebound by `+= 1`, not advanced in place
                raise RuntimeError(f"{type(self).__name__}: state['step'] must be a 1-element tensor, got "
                                   f"{type(step).__name__}")
        return by_group

    def _state(self, param):
        state = self.state[param]
        if len(state) == 0:  # lazy initialization, as torch.optim: only while the state is empty
            state["step"] = _new_step(param)
            for key in self._state_buffers:
                state[key] = _zeros(param)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step()
        return loss


class Lion(_Reference):
    r"""Lion (EvoLved Sign Momentum), Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"
    (https://arxiv.org/abs/2302.06675), Algorithm 2 with decoupled weight decay.

    Per step, for every param with a gradient (:math:`g \leftarrow -g` when ``maximize``):

    .. math::
        \theta &\leftarrow \theta\,(1 - \gamma\lambda) \\
        c &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        \theta &\leftarrow \theta - \gamma\,\mathrm{sign}(c) \\
        m &\leftarrow \beta_2 m + (1 - \beta_2) g

    The mixes are written ``exp_avg.lerp(grad, 1 - beta1)`` and ``exp_avg.lerp_(grad, 1 - beta2)``, the way
    torch.optim writes such averages; ``sign(0) = 0`` (``torch.sign``), so an element whose ``c`` is exactly
    zero does not move apart from its weight decay. All math is in the param's dtype, as torch.optim's
    single-tensor code computes.

    Args:
        params (iterable): iterable of parameters or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-4). Lion's update has unit
            magnitude per element, so its lr is typically 3-10x smaller than AdamW's.
        betas (Tuple[float, float], optional): :math:`\beta_1` (interpolation of the update direction) and
            :math:`\beta_2` (momentum decay) (default: (0.9, 0.99)).
        weight_decay (float, optional): decoupled weight decay :math:`\lambda`, multiplied by lr as in AdamW
            (default: 0).
        maximize (bool, optional): maximize the objective instead of minimizing it (default: False).

    State per param: ``exp_avg`` (the momentum :math:`m`, zeros at first) and ``step`` (a float32 0-dim
    tensor on the param's device). Lion's update does not use ``step``; it is counted as every torch.optim
    optimizer counts it, so checkpoints and schedules see the same state layout.

    Other implementations: ``lion-pytorch`` (``use_triton=False``), ``pytorch-optimizer``
    (``weight_decouple=True``) and ``torch-optimi`` (``kahan_sum=False``) compute the same update;
    ``tests/test_references.py`` checks this in float64 for every option set (``lion-pytorch`` and
    ``torch-optimi`` have no ``maximize`` and keep no ``step``).
    """

    _state_buffers = ("exp_avg",)

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False):
        _check_lr(lr)
        _check_betas(betas)
        _check_weight_decay(weight_decay)
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)

    def _step(self):
        by_group = self._params_with_grad_by_group()
        for group, params in zip(self.param_groups, by_group):
            beta1, beta2 = group["betas"]
            lr, weight_decay = _as_float(group["lr"]), group["weight_decay"]
            for param in params:
                state = self._state(param)
                state["step"] += 1
                grad = -param.grad if group["maximize"] else param.grad
                p, g, exp_avg = _real(param), _real(grad), _real(state["exp_avg"])
                if weight_decay != 0:
                    p.mul_(1 - lr * weight_decay)
                direction = exp_avg.lerp(g, 1 - beta1).sign_()
                p.add_(direction, alpha=-lr)
                exp_avg.lerp_(g, 1 - beta2)


class LAMB(_Reference):
    r"""LAMB (Layer-wise Adaptive Moments for Batch training), You et al. 2019, "Large Batch Optimization
    for Deep Learning: Training BERT in 76 minutes" (https://arxiv.org/abs/1904.00962), in NVIDIA's
    formulation: apex's ``FusedLAMB`` with ``adam_w_mode=True``, ``grad_averaging=True``,
    ``bias_correction=True`` and ``use_nvlamb=True`` (the trust ratio applies to every param, including
    those without weight decay).

    Per step, first (when ``max_grad_norm`` is set) every gradient of every param group is scaled by
    :math:`\min(1, c / (\lVert g \rVert_2 + 10^{-6}))`, where :math:`\lVert g \rVert_2` is the global norm
    of all the step's gradients: the factor ``torch.nn.utils.clip_grad_norm_`` applies, and the one
    fusedopt's in-step clipping applies. Then for every param with a gradient (:math:`g \leftarrow -g` when
    ``maximize``), with :math:`t` the param's step after incrementing it:

    .. math::
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        u &\leftarrow \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} + \lambda\theta \\
        r &\leftarrow \lVert\theta\rVert_2 / \lVert u\rVert_2 \quad (1 \text{ if either norm is } 0) \\
        \theta &\leftarrow \theta - \gamma\, r\, u

    The norms are over the whole tensor (each param is one "layer"), accumulated in float32 for fp16/bf16
    params and in the param's dtype otherwise; everything else is computed in the param's dtype.

    Args:
        params (iterable): iterable of parameters or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-3).
        betas (Tuple[float, float], optional): coefficients of the running averages of the gradient and
            its square (default: (0.9, 0.999)).
        eps (float, optional): term added to the denominator (default: 1e-6, apex's default).
        weight_decay (float, optional): decoupled weight decay :math:`\lambda`, added to the update before
            the trust ratio (default: 0.01).
        max_grad_norm (float or None, keyword-only): the global gradient norm to clip to before the update
            (default: 1.0, apex's default); ``None`` or ``0`` disables clipping. It is one value for the
            whole optimizer (the attribute ``max_grad_norm``, not a param-group entry), because the
            clipping is global across groups.
        maximize (bool, optional): maximize the objective instead of minimizing it (default: False).

    State per param: ``step`` (a float32 0-dim tensor on the param's device), ``exp_avg`` (:math:`m`) and
    ``exp_avg_sq`` (:math:`v`), zeros at first.

    Differences from other implementations:

    - apex divides the gradients by :math:`\max(1, \lVert g\rVert_2 / c)` instead of multiplying them by
      :math:`\min(1, c / (\lVert g\rVert_2 + 10^{-6}))`: the two factors differ by about :math:`10^{-6}/c`
      relative, and only when clipping is active.
    - The caller's ``.grad`` tensors are never modified: the clipping works on scaled copies. (Clipping
      with ``torch.nn.utils.clip_grad_norm_`` before ``step()`` modifies them in place; set
      ``max_grad_norm=None`` when doing that.) fusedopt's fused classes leave ``.grad`` unclipped too.
    - apex counts one ``step`` per param group; here every param has its own ``step``, as in torch.optim.
    - The paper scales the trust ratio's numerator by a function :math:`\phi(\lVert\theta\rVert)`;
      apex and this class use :math:`\phi(x) = x`. ``pytorch-optimizer``'s ``Lamb`` clamps it at 10,
      corrects the bias of the first moment through the step size, leaves the second moment uncorrected
      and adds eps to the trust ratio's denominator and the clipping norm; with its lr and eps rescaled
      per step it agrees with this class to about eps (``tests/test_references.py``).
    """

    _state_buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, *,
                 max_grad_norm=1.0, maximize=False):
        _check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        _check_betas(betas)
        _check_weight_decay(weight_decay)
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
            and math.isfinite(max_grad_norm) and max_grad_norm >= 0
        ):
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    def _clip_factor(self, params):
        """The clip_grad_norm_ factor for these params' grads (a 0-dim tensor), or None without clipping."""
        if not self.max_grad_norm or not params:
            return None
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        return torch.clamp(self.max_grad_norm / (total_norm + 1e-6), max=1.0)

    def _step(self):
        by_group = self._params_with_grad_by_group()
        clip = self._clip_factor([p for params in by_group for p in params])
        for group, params in zip(self.param_groups, by_group):
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = _as_float(group["lr"]), group["eps"], group["weight_decay"]
            for param in params:
                state = self._state(param)
                state["step"] += 1
                step = state["step"].item()
                grad = param.grad if clip is None else param.grad * clip.to(param.grad.device)
                grad = -grad if group["maximize"] else grad
                p, g = _real(param), _real(grad)
                exp_avg, exp_avg_sq = _real(state["exp_avg"]), _real(state["exp_avg_sq"])
                exp_avg.lerp_(g, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
                update = (exp_avg / (1 - beta1**step)).div_(denom)
                if weight_decay != 0:
                    update.add_(p, alpha=weight_decay)
                p.add_(update, alpha=-lr * self._trust_ratio(p, update))

    @staticmethod
    def _trust_ratio(param, update):
        """‖param‖ / ‖update‖ as a Python float (1 when either is 0), accumulated in fp32 or better."""
        norm_dtype = torch.float32 if param.element_size() < 4 else param.dtype
        param_norm = torch.linalg.vector_norm(param, dtype=norm_dtype).item()
        update_norm = torch.linalg.vector_norm(update, dtype=norm_dtype).item()
        if param_norm == 0 or update_norm == 0:
            return 1.0
        return param_norm / update_norm
