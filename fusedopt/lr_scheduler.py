"""Device-side learning-rate schedules for the fusedopt optimizers.

Same class names, constructor arguments and learning-rate sequences as ``torch.optim.lr_scheduler``, but the
schedule's state (epoch counter, current lr, plateau bookkeeping) lives on the optimizer's device and the fused
kernel reads the lr from device memory. ``scheduler.step()`` is one tiny op (``torch.ops.fusedopt.
advance_schedule_``) with no host synchronization; with ``per_step=True`` the optimizer's own fused launch
advances the schedule after every update and ``scheduler.step()`` does nothing.

Several schedulers on one optimizer compose as torch's do on ``group["lr"]``: they share the lr (and cycled
momentum) tensors; the per-epoch ones advance on their own ``step()``, the per-step ones all in the launch, in
construction order (``_ScheduleSet``), so a torch loop that steps those first computes the same lrs.

Layout of the device tensors (``program``, ``state``): see csrc/lr_schedule.h.

Which calls read back from the device (synchronize): ``get_last_lr()``, ``get_last_momentum()``,
``last_epoch`` in ``per_step`` mode, and the constructors when a group's lr is a tensor and it has no
``initial_lr``. ``step()``, ``last_lr_tensors()``, ``momentum_tensors()``, ``state_dict()`` and
``load_state_dict()`` do not.
"""
import numbers
from bisect import bisect_right

import torch
from torch.optim import lr_scheduler as _torch_sched

from . import _ops
from .optimizer import FusedOptimizer

__all__ = [
    "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR", "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR", "TimeBasedDecayLR", "ExponentialDecayLR",
    "SequentialLR", "ChainedScheduler", "ReduceLROnPlateau",
]

# Schedule kinds: ScheduleKind in csrc/lr_schedule.h.
_KIND = dict(step=1, multi_step=2, constant=3, linear=4, exponential=5, polynomial=6, cosine=7,
             warm_restarts=8, cyclic=9, one_cycle=10, time_decay=11, exp_decay=12, plateau=13,
             sequential=20, chained=21, multi=22)
_HEADER_WORDS = 4  # kind, state offset, node length, base lr
_STATE_OFFSET_WORD = 1
_BASE_STATE_WORDS = 2  # last_epoch, pending initial step
_F64 = torch.float64


class _ShadowScheduler(_torch_sched.LRScheduler):
    """torch's LRScheduler base checks (optimizer type, initial_lr on resume) for schedules torch lacks."""

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]


def _shadow_optimizer(optimizer):
    """A torch Optimizer with copies of the optimizer's defaults and group hyperparameters (lrs as floats), on
    which torch's own scheduler constructor runs: its validation, error messages and derived values are torch's."""
    shadow = object.__new__(torch.optim.Optimizer)
    shadow.defaults = dict(optimizer.defaults)
    shadow.state = {}
    shadow.param_groups = []
    for group in optimizer.param_groups:
        copy = {k: v for k, v in group.items() if k != "params"}
        lr = group.get("initial_lr", group["lr"])
        copy["lr"] = float(lr)  # reads back a tensor lr only when the group has no initial_lr
        copy["params"] = []
        shadow.param_groups.append(copy)
    return shadow


def _device_of(optimizer, cls_name):
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
    if not isinstance(optimizer, FusedOptimizer):
        raise TypeError(
            f"fusedopt.lr_scheduler.{cls_name} needs a fusedopt optimizer (FusedSGD, FusedAdam, ...), got "
            f"{type(optimizer).__name__}: its learning rate lives on the device where only fusedopt's fused "
            f"kernels read it. Use torch.optim.lr_scheduler.{cls_name} with torch.optim optimizers."
        )
    if not _ops.EXTENSION_AVAILABLE:
        raise RuntimeError(
            f"fusedopt.lr_scheduler.{cls_name} needs fusedopt's compiled extension, which could not be loaded "
            f"({_ops.EXTENSION_ERROR}); use torch.optim.lr_scheduler.{cls_name} instead."
        )
    devices = {p.device for group in optimizer.param_groups for p in group["params"]}
    if len(devices) > 1:
        raise ValueError(
            f"fusedopt.lr_scheduler.{cls_name} keeps its schedule on one device, but the optimizer's params are "
            f"on {sorted(str(d) for d in devices)}; use one optimizer per device."
        )
    first = next(p for group in optimizer.param_groups for p in group["params"])
    return first.device


def _momentum_key(optimizer):
    return "betas" if "betas" in optimizer.defaults else "momentum"


def _group_momentum(group, key):
    return float(group["betas"][0]) if key == "betas" else float(group["momentum"])


def _reinstall_lr_views(optimizer, views):
    """Puts ``views[g]`` back as ``group["lr"]`` wherever something else replaced it (e.g. the optimizer's
    load_state_dict), copying that value into the view first (a device copy or fill: no sync)."""
    groups = optimizer.param_groups
    if len(groups) != len(views):
        raise RuntimeError(
            f"the optimizer has {len(groups)} param groups but its fusedopt scheduler was built for "
            f"{len(views)}; construct the scheduler again after add_param_group()"
        )
    for group, view in zip(groups, views):
        lr = group["lr"]
        if lr is view:
            continue
        if torch.is_tensor(lr):
            view.copy_(lr.detach().reshape(()))
        else:
            view.fill_(float(lr))
        group["lr"] = view


class _ScheduleSet:
    """``optimizer._device_schedule``: what the optimizer's launches see of every fusedopt scheduler attached to
    it. ``lrs`` and ``momenta`` are the tensors all of them share (the kernel reads them), and ``program`` /
    ``state`` advance every per-step scheduler, in construction order, inside the fused launch: one scheduler's
    own tensors, or a MULTI root over several (csrc/lr_schedule.h) whose state the schedulers then view. A new
    set object replaces the old one whenever the membership changes, so the optimizer's cached plan notices."""

    def __init__(self, optimizer, shared, stepping):
        self.optimizer, self._shared, self.stepping = optimizer, shared, list(stepping)
        self.lrs, self.momenta = shared["lrs"], shared["momenta"]
        self.per_step = bool(self.stepping)
        self.program = self.state = None
        if len(self.stepping) == 1:
            only = self.stepping[0]
            if not only.state.is_contiguous():  # a view of the combined state of a set it shared before
                only.state = only.state.contiguous()
            self.program, self.state = only.program, only.state
        elif self.stepping:
            self._combine()

    def _combine(self):
        """One MULTI program over the per-step schedulers; their state moves into one tensor they view."""
        groups, n = self.lrs.numel(), len(self.stepping)
        header_len = _HEADER_WORDS + 1 + 2 * n
        pairs, program_at, state_at = [], header_len, 0
        for s in self.stepping:
            pairs += [program_at, state_at]
            program_at += s._program_host.shape[1]
            state_at += s.state.shape[1]
        header = torch.tensor([[_KIND["multi"], 0, header_len, 0.0, n, *pairs]] * groups, dtype=_F64)
        self.program = torch.cat([header] + [s._program_host for s in self.stepping], dim=1).to(self.lrs.device)
        self.state = torch.cat([s.state for s in self.stepping], dim=1).contiguous()
        for s, at in zip(self.stepping, pairs[1::2]):
            s.state = self.state[:, at:at + s.state.shape[1]]

    def _reinstall_lr_views(self):
        _reinstall_lr_views(self.optimizer, self._shared["views"])

    def _advance(self):
        """The per-step advance, as its own op: for a step whose launches did not run (no param had a grad)."""
        self._reinstall_lr_views()
        _ops.op("advance_schedule_")(self.lrs, self.state, self.program, self.momenta, None)


class _DeviceSchedule:
    """What the fused kernel and the op read: ``lrs`` (f64 [G]), ``momenta`` (f64 [G] or None), ``program``
    (f64 [G, P]), ``state`` (f64 [G, S]), ``per_step``. All schedulers of one optimizer share ``lrs`` (and
    ``momenta``), so two of them stepping the same optimizer compose as torch's do; the optimizer sees them
    through one ``_ScheduleSet``."""

    _owner = None  # the SequentialLR/ChainedScheduler that took this scheduler over

    def _attach(self, optimizer, per_step, momentum_init=None):
        self.optimizer = optimizer
        self.per_step = bool(per_step)
        groups = optimizer.param_groups
        existing = getattr(optimizer, "_device_schedule", None)
        if existing is not None and existing.lrs.device == self.device and existing.lrs.numel() == len(groups):
            self._shared = existing._shared
        else:
            lrs = torch.zeros(len(groups), dtype=_F64, device=self.device)
            self._shared = {"lrs": lrs, "views": [lrs[g] for g in range(len(groups))], "momenta": None}
        self.lrs, self._lr_views = self._shared["lrs"], self._shared["views"]
        self._reinstall_lr_views()
        self.momenta = None
        if momentum_init is not None:
            if self._shared["momenta"] is None:
                self._shared["momenta"] = torch.zeros(len(groups), dtype=_F64, device=self.device)
            self.momenta = self._shared["momenta"]
            for g, value in enumerate(momentum_init):
                if value is not None:
                    self.momenta[g].fill_(value)

    def _register(self, taken_over=()):
        """Adds this scheduler to the set the optimizer's launches see (replacing the set: a new plan). Every
        scheduler keeps working beside the others: per-step ones all advance in the launch, in construction
        order; the kernel reads the shared lrs and momenta whoever set them. ``taken_over``: children a
        composite now runs, which leave the set."""
        optimizer = self.optimizer
        existing = getattr(optimizer, "_device_schedule", None)
        stepping = []
        if isinstance(existing, _ScheduleSet) and existing._shared is self._shared:
            stepping = [s for s in existing.stepping if not any(s is t for t in taken_over)]
        if self.per_step:
            stepping.append(self)
        # FusedOptimizer.step advances a per-step set itself when no launch of its step did
        optimizer._device_schedule = _ScheduleSet(optimizer, self._shared, stepping)

    def _set_program(self, rows, states):
        self._program_host = torch.tensor(rows, dtype=_F64)
        self.program = self._program_host.to(self.device)
        self.state = torch.tensor(states, dtype=_F64).to(self.device)

    def _reinstall_lr_views(self):
        _reinstall_lr_views(self.optimizer, self._lr_views)

    def _advance(self, metric=None):
        self._reinstall_lr_views()
        _ops.op("advance_schedule_")(self.lrs, self.state, self.program, self.momenta, metric)

    def _check_not_taken_over(self):
        if self._owner is not None:
            raise RuntimeError(
                f"this {type(self).__name__} is part of a {type(self._owner).__name__}, whose program now runs it: "
                f"call step() on the {type(self._owner).__name__} instead"
            )

    # ---- public accessors ----
    def get_last_lr(self):
        """The current learning rate of every group, as floats: reads them back from the device (a sync)."""
        return [float(v) for v in self.lrs.tolist()]

    def last_lr_tensors(self):
        """The current learning rates as a float64 [G] tensor on the device (a copy; no sync)."""
        return self.lrs.clone()

    def momentum_tensors(self):
        """The cycled momentum / beta1 of every group as a float64 [G] device tensor (a copy; no sync), or None.
        The kernel reads these; ``group["momentum"]``/``group["betas"]`` are not updated on the host."""
        return None if self.momenta is None else self.momenta.clone()

    def get_last_momentum(self):
        """The cycled momenta / beta1s as floats (reads back from the device), or None."""
        return None if self.momenta is None else [float(v) for v in self.momenta.tolist()]

    @property
    def last_epoch(self):
        """The step counter. Per-epoch mode: a host counter of step() calls. ``per_step=True``: the counter lives
        on the device (the kernel advances it), so reading it synchronizes."""
        if self.per_step:
            return int(self.state[0, 0].item())
        return self._last_epoch

    def state_dict(self):
        """Copies of the device tensors (no sync) and the host values; ``program`` identifies the schedule."""
        return {
            "type": type(self).__name__,
            "program": self._program_host.clone(),
            "state": self.state.clone(),
            "lrs": self.lrs.clone(),
            "momenta": None if self.momenta is None else self.momenta.clone(),
            "last_epoch": self._last_epoch,
            "per_step": self.per_step,
            "base_lrs": list(getattr(self, "base_lrs", [])),
        }

    def load_state_dict(self, state_dict):
        """Restores a state_dict of the same schedule (device copies; no sync)."""
        if state_dict.get("type") != type(self).__name__ or not torch.equal(
            state_dict["program"].to(_F64).cpu(), self._program_host
        ):
            raise ValueError(
                f"this state_dict is not from a {type(self).__name__} with the same arguments and param groups "
                f"(got one from {state_dict.get('type')})"
            )
        if (state_dict["momenta"] is None) != (self.momenta is None):
            raise ValueError("this state_dict's momentum cycling does not match this scheduler's")
        self._reinstall_lr_views()
        self.state.copy_(state_dict["state"])
        self.lrs.copy_(state_dict["lrs"])
        if self.momenta is not None:
            self.momenta.copy_(state_dict["momenta"])
        self._last_epoch = state_dict["last_epoch"]  # per_step stays as constructed: the optimizer plans with it


class _LeafSchedule(_DeviceSchedule):
    """A scheduler computed by one node of csrc/lr_schedule.h. Subclasses give the kind, torch's class and
    their node's parameters; the constructor runs torch's own constructor on a shadow optimizer for validation
    and derived values, then performs torch's initial step on the device."""

    _kind: str
    _torch_cls = None
    _cycles_momentum = False

    def __init__(self, optimizer, *args, per_step=False, **kwargs):
        name = type(self).__name__
        self.device = _device_of(optimizer, name)
        self._check_arguments(*args, **kwargs)
        shadow_opt = _shadow_optimizer(optimizer)
        torch_cls = self._torch_cls or _ShadowScheduler
        shadow = torch_cls(shadow_opt, *args, **kwargs)  # torch's validation and exceptions
        self._check_derived(shadow)
        last_epoch = shadow.last_epoch - 1  # before torch's initial step
        # torch's constructor writes group keys (initial_lr, max_lr, momentum bounds ...); copy them as floats.
        momentum_key = _momentum_key(optimizer)
        for group, shadow_group in zip(optimizer.param_groups, shadow_opt.param_groups):
            for key, value in shadow_group.items():
                if key not in ("params", "lr", "momentum", "betas") and (key not in group or group[key] != value):
                    group[key] = value
        self.base_lrs = [float(v) for v in self._base_lrs(shadow)]
        momentum_init = None
        if self._cycles_momentum and shadow.cycle_momentum:
            if last_epoch == -1:  # torch sets momentum / beta1 to max_momentum before its first step
                momentum_init = [float(g["max_momentum"]) for g in shadow_opt.param_groups]
                for group, value in zip(optimizer.param_groups, momentum_init):
                    if momentum_key == "betas":
                        group["betas"] = (value, *group["betas"][1:])
                    else:
                        group["momentum"] = value
            else:
                momentum_init = [_group_momentum(g, momentum_key) for g in optimizer.param_groups]
        self._attach(optimizer, per_step, momentum_init)
        for one_cycle in self._shared.setdefault("one_cycles", []):
            one_cycle._load_group_values()  # torch's earlier OneCycleLRs read what this constructor wrote
        start_lrs = self._start_lrs(shadow, last_epoch)
        if start_lrs is not None:
            for view, value in zip(self._lr_views, start_lrs):
                view.fill_(float(value))
        rows, states = [], []
        for g in range(len(optimizer.param_groups)):
            params = [float(v) for v in self._node_params(shadow, shadow_opt.param_groups[g], g)]
            rows.append([_KIND[self._kind], 0, _HEADER_WORDS + len(params), self.base_lrs[g], *params])
            states.append([float(last_epoch), 1.0, *self._extra_state(shadow, shadow_opt.param_groups[g], last_epoch)])
        self._set_program(rows, states)
        self._last_epoch = last_epoch
        self._advance()  # torch's _initial_step, on the device
        self._after_initial_step(shadow_opt)
        self._last_epoch += 1
        self._register()

    def _check_arguments(self, *args, **kwargs):
        """Checks torch's constructor would not make, for arguments the device cannot honour."""

    def _check_derived(self, shadow):
        """Checks after torch's constructor accepted the arguments: inputs for which torch divides by zero in a
        later step (ZeroDivisionError) raise ValueError here, where the device would compute NaN instead."""

    def _after_initial_step(self, shadow_opt):
        """Corrections to the device's initial step where torch's constructor computes it differently."""

    @staticmethod
    def _zero_division(message):
        return ValueError(f"{message}: torch raises ZeroDivisionError there, and fusedopt's device schedule would "
                          "set the learning rate to NaN")

    def _base_lrs(self, shadow):
        return shadow.base_lrs

    def _start_lrs(self, shadow, last_epoch):
        """The lrs the initial step starts from when torch's constructor sets them (None: the current ones)."""
        return None

    def _node_params(self, shadow, group, g):
        return []

    def _extra_state(self, shadow, group, last_epoch):
        return []

    def _check_step(self):
        pass

    def step(self):
        """Advances the schedule by one epoch on the device: one op, no host sync. With ``per_step=True`` the
        optimizer's fused step advances it and this does nothing. (torch's deprecated ``step(epoch)`` is not
        supported.)"""
        self._check_not_taken_over()
        if self.per_step:
            return
        self._check_step()
        self._advance()
        self._last_epoch += 1


class StepLR(_LeafSchedule):
    """torch.optim.lr_scheduler.StepLR: lr *= gamma every ``step_size`` epochs. A step_size that is not a positive
    integer raises ValueError here (torch fails only when stepping)."""

    _kind, _torch_cls = "step", _torch_sched.StepLR

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1, *, per_step=False):
        super().__init__(optimizer, step_size, gamma, last_epoch, per_step=per_step)

    def _check_arguments(self, step_size, gamma, last_epoch):
        if not isinstance(step_size, numbers.Integral) or step_size <= 0:
            raise ValueError(f"Expected positive integer step_size, but got {step_size}")  # torch fails in step()

    def _node_params(self, shadow, group, g):
        return [shadow.step_size, shadow.gamma]


class MultiStepLR(_LeafSchedule):
    """torch.optim.lr_scheduler.MultiStepLR: lr *= gamma ** (times the epoch appears in ``milestones``)."""

    _kind, _torch_cls = "multi_step", _torch_sched.MultiStepLR

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1, *, per_step=False):
        super().__init__(optimizer, list(milestones), gamma, last_epoch, per_step=per_step)

    def _node_params(self, shadow, group, g):
        pairs = sorted(shadow.milestones.items())
        return [shadow.gamma, len(pairs), *[v for pair in pairs for v in pair]]


class ConstantLR(_LeafSchedule):
    """torch.optim.lr_scheduler.ConstantLR: lr * factor until ``total_iters``."""

    _kind, _torch_cls = "constant", _torch_sched.ConstantLR

    def __init__(self, optimizer, factor=1.0 / 3, total_iters=5, last_epoch=-1, *, per_step=False):
        super().__init__(optimizer, factor, total_iters, last_epoch, per_step=per_step)

    def _node_params(self, shadow, group, g):
        return [shadow.factor, shadow.total_iters]

    def _check_derived(self, shadow):
        total = shadow.total_iters
        if shadow.factor == 0 and total > 0 and float(total).is_integer():
            raise self._zero_division(f"ConstantLR with factor=0 divides the lr by the factor at epoch {total}")


class LinearLR(_LeafSchedule):
    """torch.optim.lr_scheduler.LinearLR (linear warm-up / decay of a multiplicative factor)."""

    _kind, _torch_cls = "linear", _torch_sched.LinearLR

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5, last_epoch=-1, *,
                 per_step=False):
        super().__init__(optimizer, start_factor, end_factor, total_iters, last_epoch, per_step=per_step)

    def _node_params(self, shadow, group, g):
        self.total_iters = shadow.total_iters  # as torch's attribute; SequentialLR checks it
        return [shadow.start_factor, shadow.end_factor, shadow.total_iters]


class ExponentialLR(_LeafSchedule):
    """torch.optim.lr_scheduler.ExponentialLR: lr *= gamma every epoch."""

    _kind, _torch_cls = "exponential", _torch_sched.ExponentialLR

    def __init__(self, optimizer, gamma, last_epoch=-1, *, per_step=False):
        super().__init__(optimizer, gamma, last_epoch, per_step=per_step)

    def _node_params(self, shadow, group, g):
        return [shadow.gamma]


class PolynomialLR(_LeafSchedule):
    """torch.optim.lr_scheduler.PolynomialLR."""

    _kind, _torch_cls = "polynomial", _torch_sched.PolynomialLR

    def __init__(self, optimizer, total_iters=5, power=1.0, last_epoch=-1, *, per_step=False):
        super().__init__(optimizer, total_iters, power, last_epoch, per_step=per_step)

    def _node_params(self, shadow, group, g):
        self.total_iters = shadow.total_iters  # as torch's attribute; SequentialLR checks it
        return [shadow.total_iters, shadow.power]


class CosineAnnealingLR(_LeafSchedule):
    """torch.optim.lr_scheduler.CosineAnnealingLR (torch's recursive form, restarts every 2 T_max included)."""

    _kind, _torch_cls = "cosine", _torch_sched.CosineAnnealingLR

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1, *, per_step=False):
        super().__init__(optimizer, T_max, eta_min, last_epoch, per_step=per_step)

    def _node_params(self, shadow, group, g):
        return [shadow.T_max, shadow.eta_min]

    def _check_derived(self, shadow):
        if shadow.T_max == 0:
            raise self._zero_division("CosineAnnealingLR with T_max=0 divides by T_max at its first step")


class CosineAnnealingWarmRestarts(_LeafSchedule):
    """torch.optim.lr_scheduler.CosineAnnealingWarmRestarts (step() without an epoch)."""

    _kind, _torch_cls = "warm_restarts", _torch_sched.CosineAnnealingWarmRestarts

    def __init__(self, optimizer, T_0, T_mult=1, eta_min=0.0, last_epoch=-1, *, per_step=False):
        super().__init__(optimizer, T_0, T_mult, eta_min, last_epoch, per_step=per_step)

    def _node_params(self, shadow, group, g):
        return [shadow.T_0, shadow.T_mult, shadow.eta_min]

    def _extra_state(self, shadow, group, last_epoch):
        return [float(last_epoch), float(shadow.T_0)]  # T_cur, T_i as torch's constructor sets them


class CyclicLR(_LeafSchedule):
    """torch.optim.lr_scheduler.CyclicLR with the built-in modes (triangular, triangular2, exp_range) and
    momentum / beta1 cycling (``momentum_tensors()``; the host group values are not updated). A custom Python
    ``scale_fn`` cannot run on the device: use torch.optim.lr_scheduler.CyclicLR for that."""

    _kind, _torch_cls, _cycles_momentum = "cyclic", _torch_sched.CyclicLR, True
    _MODES = {"triangular": 0, "triangular2": 1, "exp_range": 2}

    def __init__(self, optimizer, base_lr, max_lr, step_size_up=2000, step_size_down=None, mode="triangular",
                 gamma=1.0, scale_fn=None, scale_mode="cycle", cycle_momentum=True, base_momentum=0.8,
                 max_momentum=0.9, last_epoch=-1, *, per_step=False):
        if scale_fn is not None:
            raise ValueError(
                "fusedopt.lr_scheduler.CyclicLR runs on the device and cannot call a Python scale_fn; use "
                "torch.optim.lr_scheduler.CyclicLR for a custom scale_fn"
            )
        super().__init__(optimizer, base_lr, max_lr, step_size_up, step_size_down, mode, gamma, None, scale_mode,
                         cycle_momentum, base_momentum, max_momentum, last_epoch, per_step=per_step)

    def _start_lrs(self, shadow, last_epoch):
        return shadow.base_lrs if last_epoch == -1 else None

    def _check_derived(self, shadow):
        if shadow.step_ratio == 0:
            raise self._zero_division("CyclicLR with step_size_up=0 divides by it at the start of every cycle")

    def _after_initial_step(self, shadow_opt):
        # torch's constructor steps with the group's initial_lr as base (its base_lr replaces base_lrs only
        # afterwards): the first lr is initial_lr where another scheduler set it first. The shadow ran exactly that.
        for view, group in zip(self._lr_views, shadow_opt.param_groups):
            view.fill_(float(group["lr"]))

    def _node_params(self, shadow, group, g):
        momentum = shadow.cycle_momentum
        return [float(shadow.max_lrs[g]), shadow.total_size, shadow.step_ratio, self._MODES[shadow.mode],
                shadow.gamma, float(momentum), float(shadow.base_momentums[g]) if momentum else 0.0,
                float(shadow.max_momentums[g]) if momentum else 0.0]


class OneCycleLR(_LeafSchedule):
    """torch.optim.lr_scheduler.OneCycleLR, with momentum / beta1 cycling (``momentum_tensors()``; the host
    group values are not updated). Stepping past ``total_steps`` raises torch's ValueError in per-epoch mode;
    with ``per_step=True`` the device holds the last lr instead (it cannot raise)."""

    _kind, _torch_cls, _cycles_momentum = "one_cycle", _torch_sched.OneCycleLR, True

    # The group keys torch's OneCycleLR reads at every step; the node's state holds their values (lr_schedule.h).
    _GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None, pct_start=0.3,
                 anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85, max_momentum=0.95,
                 div_factor=25.0, final_div_factor=1e4, three_phase=False, last_epoch=-1, *, per_step=False):
        super().__init__(optimizer, max_lr, total_steps, epochs, steps_per_epoch, pct_start, anneal_strategy,
                         cycle_momentum, base_momentum, max_momentum, div_factor, final_div_factor, three_phase,
                         last_epoch, per_step=per_step)
        self._shared["one_cycles"].append(self)

    def _node_params(self, shadow, group, g):
        self.total_steps = shadow.total_steps
        words = [shadow.total_steps, float(shadow._anneal_func_type == "cos"), float(shadow.cycle_momentum),
                 len(shadow._schedule_phases)]
        key = self._GROUP_KEYS.index
        for phase in shadow._schedule_phases:
            words += [phase["end_step"], key(phase["start_lr"]), key(phase["end_lr"]), key(phase["start_momentum"]),
                      key(phase["end_momentum"])]
        return words

    def _extra_state(self, shadow, group, last_epoch):
        return [float(group.get(key, 0.0)) for key in self._GROUP_KEYS]

    def _load_group_values(self):
        """Copies the param groups' current values of _GROUP_KEYS into this node's state, wherever it runs now
        (its own state, a view of the optimizer's per-step set, or its composite's): a device write, no sync."""
        values = torch.tensor([[float(g.get(key, 0.0)) for key in self._GROUP_KEYS] for g in self.optimizer.param_groups],
                              dtype=_F64)
        state, at = self.state, _BASE_STATE_WORDS
        if self._owner is not None:
            index = next(i for i, s in enumerate(self._owner._schedulers) if s is self)
            state, at = self._owner.state, self._owner._child_state_offsets[index] + _BASE_STATE_WORDS
        state[:, at:at + len(self._GROUP_KEYS)] = values.to(state.device)

    def _check_derived(self, shadow):
        phases = shadow._schedule_phases
        start = phases[-2]["end_step"] if len(phases) > 1 else 0
        if phases[-1]["end_step"] == start:
            raise self._zero_division(
                f"OneCycleLR's last phase has zero length (it ends at step {start}, where the previous one ends): "
                f"step {shadow.total_steps} divides by that length")

    def _check_step(self):
        if self._last_epoch + 1 > self.total_steps:
            raise ValueError(
                f"Tried to step {self._last_epoch + 1} times. The specified number of total steps is "
                f"{self.total_steps}"
            )


class _SeedDecay(_LeafSchedule):
    """The seed slides' decays: one parameter, the decay rate d >= 0."""

    def __init__(self, optimizer, decay, last_epoch=-1, *, per_step=False):
        self.decay = decay
        super().__init__(optimizer, last_epoch, per_step=per_step)

    def _check_arguments(self, last_epoch):
        if not isinstance(self.decay, numbers.Real) or not self.decay >= 0:
            raise ValueError(f"Expected non-negative decay, but got {self.decay}")

    def _node_params(self, shadow, group, g):
        return [self.decay]


class TimeBasedDecayLR(_SeedDecay):
    r"""Time-based decay of the seed slides: :math:`\eta_{n+1} = \eta_n / (1 + d\,n)`, n = 0, 1, ... the epoch
    just finished, so :math:`\eta_1 = \eta_0` and :math:`\eta_2 = \eta_0 / (1 + d)`. ``decay`` is d >= 0."""

    _kind = "time_decay"


class ExponentialDecayLR(_SeedDecay):
    r"""Exponential decay of the seed slides: :math:`\eta_n = \eta_0 e^{-d\,n}` at epoch n (n = 0 at
    construction), advanced as :math:`\eta_{n+1} = \eta_n e^{-d}` so that it chains like torch's schedulers.
    ``decay`` is d >= 0."""

    _kind = "exp_decay"


class ReduceLROnPlateau(_DeviceSchedule):
    """torch.optim.lr_scheduler.ReduceLROnPlateau, decided on the device: ``step(metrics)`` takes the metric as a
    device tensor (or a CPU tensor / Python number, copied to the device) and never synchronizes. torch's
    semantics exactly: is_better with threshold rel/abs, num_bad_epochs, cooldown, min_lr, the eps rule, and a
    NaN metric counts as a bad epoch. There is no per_step mode. ``best``, ``num_bad_epochs`` and
    ``cooldown_counter`` live in ``state`` (columns 2, 3, 4; csrc/lr_schedule.h)."""

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel",
                 cooldown=0, min_lr=0, eps=1e-8):
        self.device = _device_of(optimizer, "ReduceLROnPlateau")
        shadow_opt = _shadow_optimizer(optimizer)
        shadow = _torch_sched.ReduceLROnPlateau(shadow_opt, mode, factor, patience, threshold, threshold_mode,
                                                cooldown, min_lr, eps)
        self.mode, self.factor, self.patience = shadow.mode, shadow.factor, shadow.patience
        self.threshold, self.threshold_mode = shadow.threshold, shadow.threshold_mode
        self.cooldown, self.eps, self.min_lrs = shadow.cooldown, shadow.eps, [float(v) for v in shadow.min_lrs]
        self._attach(optimizer, False)
        rows, states = [], []
        for g in range(len(optimizer.param_groups)):
            params = [float(shadow.mode == "max"), shadow.threshold, float(shadow.threshold_mode == "rel"),
                      shadow.factor, shadow.patience, shadow.cooldown, self.min_lrs[g], shadow.eps]
            rows.append([_KIND["plateau"], 0, _HEADER_WORDS + len(params), 0.0, *params])
            states.append([0.0, 0.0, shadow.mode_worse, 0.0, 0.0])
        self._set_program(rows, states)
        self._last_epoch = 0
        self._register()

    def step(self, metrics, epoch=None):
        """One plateau decision on the device. ``metrics``: a 1-element tensor (any device, copied to the
        optimizer's) or a Python number."""
        if torch.is_tensor(metrics):
            if metrics.numel() != 1:
                raise ValueError(f"ReduceLROnPlateau expects a single metric value, got a tensor of {metrics.numel()}")
            metric = metrics.detach().reshape(1).to(device=self.device, dtype=_F64)
        else:
            metric = torch.full((1,), float(metrics), dtype=_F64, device=self.device)
        self._advance(metric)
        self._last_epoch = self._last_epoch + 1 if epoch is None else epoch

    @property
    def best(self):
        """torch's ``best`` (reads back from the device)."""
        return float(self.state[0, 2].item())

    @property
    def num_bad_epochs(self):
        """torch's ``num_bad_epochs`` (reads back from the device)."""
        return int(self.state[0, 3].item())

    @property
    def cooldown_counter(self):
        """torch's ``cooldown_counter`` (reads back from the device)."""
        return int(self.state[0, 4].item())


class _CompositeSchedule(_DeviceSchedule):
    """SequentialLR / ChainedScheduler: the children's nodes become part of this scheduler's program (their
    state columns are copied after this one's), so one op (or the fused step) advances them all; the children's
    own step() then raises RuntimeError. Children must be fusedopt leaf schedulers (nested composites: ValueError)."""

    _kind: str

    def _check_children(self, optimizer, schedulers):
        name = type(self).__name__
        if len(schedulers) < 1:
            raise ValueError(self._empty_message)
        for idx, scheduler in enumerate(schedulers):
            if not hasattr(scheduler, "optimizer"):
                raise TypeError(f"{name} at index {idx} should have `optimizer` as its attribute.")
            if isinstance(scheduler, (ReduceLROnPlateau, _torch_sched.ReduceLROnPlateau)):
                raise ValueError(
                    f"{name} does not support `ReduceLROnPlateau` scheduler as it "
                    "requires additional kwargs to be specified when calling `step`, "
                    f"but got one at index {idx} in the given schedulers sequence."
                )
            if optimizer != scheduler.optimizer:
                raise ValueError(
                    f"{name} expects all schedulers to belong to the same optimizer, but "
                    f"got scheduler {scheduler.__class__.__name__} at index {idx} has {scheduler.optimizer}, "
                    f"which is different from {optimizer.__class__.__name__}."
                )
            if isinstance(scheduler, _CompositeSchedule):
                raise ValueError(f"fusedopt.lr_scheduler.{name} composes leaf schedulers only; got a "
                                 f"{type(scheduler).__name__} at index {idx} (nested composites are not supported)")
            if not isinstance(scheduler, _LeafSchedule):
                raise TypeError(f"fusedopt.lr_scheduler.{name} composes fusedopt.lr_scheduler schedulers; got "
                                f"{type(scheduler).__module__}.{type(scheduler).__name__} at index {idx}")
            if scheduler._owner is not None:
                raise ValueError(f"the scheduler at index {idx} already belongs to a {type(scheduler._owner).__name__}")

    def _compose(self, optimizer, schedulers, milestones, per_step):
        self.device = schedulers[0].device
        self._schedulers = list(schedulers)
        self._milestones = list(milestones)
        momentum_init = None
        if any(s.momenta is not None for s in schedulers):
            momentum_init = [None] * len(optimizer.param_groups)  # shared with the children: keep their values
        self._attach(optimizer, per_step, momentum_init)
        groups = len(optimizer.param_groups)
        n = len(schedulers)
        header_len = _HEADER_WORDS + 1 + n + len(milestones)
        own_state = _BASE_STATE_WORDS
        child_program_offsets, child_state_offsets = [], []
        program_at, state_at = header_len, own_state
        for s in schedulers:
            child_program_offsets.append(program_at)
            child_state_offsets.append(state_at)
            program_at += s._program_host.shape[1]
            state_at += s.state.shape[1]
        header = torch.tensor([[_KIND[self._kind], 0, header_len, 0.0, n, *child_program_offsets, *milestones]] * groups,
                              dtype=_F64)
        parts = [header]
        for s, offset in zip(schedulers, child_state_offsets):
            child = s._program_host.clone()
            child[:, _STATE_OFFSET_WORD] = offset
            parts.append(child)
        self._program_host = torch.cat(parts, dim=1).contiguous()
        self.program = self._program_host.to(self.device)
        own = torch.zeros(groups, own_state, dtype=_F64, device=self.device)
        self.state = torch.cat([own] + [s.state for s in schedulers], dim=1).contiguous()
        self._child_state_offsets = child_state_offsets
        for s in schedulers:
            s._owner = self

    def state_dict(self):
        """The base state, plus the children's host step counters (their per-epoch checks read them)."""
        state = super().state_dict()
        state["children_last_epoch"] = [s._last_epoch for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for s, epoch in zip(self._schedulers, state_dict.get("children_last_epoch", ())):
            s._last_epoch = epoch


class SequentialLR(_CompositeSchedule):
    """torch.optim.lr_scheduler.SequentialLR over fusedopt leaf schedulers (e.g. LinearLR warm-up then
    CosineAnnealingLR), run entirely on the device, including the milestone restart of the next scheduler at its
    epoch 0 (its closed form, as torch's ``_update_lr(0)``)."""

    _kind = "sequential"
    _empty_message = "SequentialLR expects at least one scheduler, but got no scheduler."

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1, *, per_step=False):
        self._check_children(optimizer, schedulers)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                "Sequential Schedulers expects number of schedulers provided to be one more "
                f"than the number of milestone points, but got number of schedulers {len(schedulers)} and the "
                f"number of milestones to be equal to {len(milestones)}"
            )
        self._check_restarts(schedulers)
        self._compose(optimizer, schedulers, milestones, per_step)
        # torch: reset the lrs to initial_lr, undo the children's initial steps, then only the scheduler of
        # epoch 0 makes its initial step (on the device: the pending flag of this node).
        for view, group in zip(self._lr_views, optimizer.param_groups):
            view.fill_(float(group["initial_lr"]))
        for s, offset in zip(schedulers, self._child_state_offsets):
            self.state[:, offset] -= 1
            s._last_epoch -= 1
        self.state[:, 0] = float(last_epoch + 1)
        self.state[:, 1] = 1.0
        self._last_epoch = last_epoch + 1
        self._advance()
        schedulers[bisect_right(self._milestones, 0)]._last_epoch += 1
        self._register(taken_over=schedulers)

    @staticmethod
    def _check_restarts(schedulers):
        """A child after a milestone restarts with torch's closed form, which divides by total_iters."""
        for idx, child in enumerate(schedulers[1:], start=1):
            if isinstance(child, (LinearLR, PolynomialLR)) and child.total_iters == 0:
                raise _LeafSchedule._zero_division(
                    f"SequentialLR restarts its {type(child).__name__} at index {idx} with its closed form, which "
                    "divides by total_iters=0")

    def step(self):
        """Advances the active child by one epoch (one op, no sync); no-op with ``per_step=True``."""
        if self.per_step:
            return
        epoch = self._last_epoch + 1
        idx = bisect_right(self._milestones, epoch)
        child = self._schedulers[idx]
        restart = idx > 0 and self._milestones[idx - 1] == epoch
        if not restart:
            child._check_step()  # e.g. OneCycleLR past total_steps: torch's ValueError, before anything changes
        self._advance()
        self._last_epoch = epoch
        child._last_epoch = 0 if restart else child._last_epoch + 1


class ChainedScheduler(_CompositeSchedule):
    """torch.optim.lr_scheduler.ChainedScheduler over fusedopt leaf schedulers: every child's step, in order, on
    the shared device lr (one op, or inside the fused step with ``per_step=True``)."""

    _kind = "chained"
    _empty_message = "ChainedScheduler expects at least one scheduler to be chained, but got no scheduler."

    def __init__(self, schedulers, optimizer=None, *, per_step=False):
        if len(schedulers) < 1:
            raise ValueError(self._empty_message)  # before schedulers[0] is read
        optimizer = optimizer or schedulers[0].optimizer
        self._check_children(optimizer, schedulers)
        self._compose(optimizer, schedulers, [], per_step)
        self._last_epoch = 0
        self._register(taken_over=schedulers)

    def step(self):
        """Steps every child once (one op, no sync); no-op with ``per_step=True``."""
        if self.per_step:
            return
        for s in self._schedulers:
            s._check_step()
        self._advance()
        self._last_epoch += 1
        for s in self._schedulers:
            s._last_epoch += 1
