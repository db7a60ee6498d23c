"""The base class of every Fused* optimizer.

Each Fused* class subclasses the torch.optim class it replaces: construction, validation, defaults, param
groups, hooks, ``state_dict``/``load_state_dict`` and ``__setstate__`` are torch's own, and so is the fallback
``step`` when the compiled extension is missing. This class replaces ``step`` with one fused op call per
(device, dtype, option set) and owns what that needs: lazy state creation with torch's state keys, and a cached
launch plan (the tensor lists and the device tables the kernels walk), rebuilt when the set of params with
gradients, the param groups or their params, the options, `optimizer.state` or any state entry or tensor in it,
or the attached device LR schedule change: a fused step updates exactly the tensors `optimizer.state` shows.

Inside the same launch the kernels also unscale gradients for ``torch.amp.GradScaler`` and skip the whole
update when one is inf/NaN, clip the global gradient norm (``max_grad_norm``), and advance a per-step device
LR schedule (``fusedopt.lr_scheduler``): a step never waits for the host.

Every Fused* class also takes the low-precision options ``param_rounding``, ``master_weights``, ``state_dtype``
and ``seed`` (keyword-only; fusedopt/_low_precision.py documents them, their state keys ``master_param`` and
``kahan_comp`` and the state dict's ``fusedopt_rng``): they choose how the same launch stores what it computes.
"""
import functools
import inspect
import math
import warnings

import torch
import torch.optim.optimizer as torch_optimizer
from torch.amp.grad_scaler import OptState

from . import _distributed, _lazy_state, _low_precision, _ops
from ._low_precision import RNG_KEY, LowPrecision, real_dtype
from ._plan_sources import PlanSources

# StepPhase in csrc/step_table.h
REDUCE_GRADS, UPDATE, RESET_STATS = 1, 2, 4

# torch.optim's global step hooks (torch.optim.optimizer.register_optimizer_step_pre_hook/_post_hook), which its
# step wrapper runs; None where this torch names them otherwise (FusedOptimizer.profile_hook_step then always
# takes torch's wrapper).
_GLOBAL_STEP_HOOKS = tuple(getattr(torch_optimizer, name, None)
                           for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"))

# GradScaler passes itself to optimizers whose step() takes `grad_scaler` and warns that this contract is
# deprecated. It is the one contract that lets the step kernel find the inf/NaN gradients itself (the newer one
# runs torch's separate checking pass first), so fusedopt uses it and silences exactly that warning.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


class _Launch:
    """One fused op call: the params of one (device, dtype, state dtype, options) bucket, across param groups."""

    def __init__(self, device, options, extra_key=None, rounding="nearest"):
        self.device, self.options = device, options
        self.params = []  # the torch params, whose .grad is read every step
        self.kernel_params = []  # what the kernel sees (real views of complex params)
        self.is_complex = []
        self.state_lists = None  # one list per state argument of the op, [] where the options use none
        # low precision (fusedopt/_low_precision.py): every param of a launch has the same dtype, so all or none
        # have an extra buffer (master copy or Kahan compensation), and one rounding serves them all
        self.extra_key, self.rounding = extra_key, rounding
        self.extras = []
        self.scalar_lists = None  # one list per scalar state of the op (`step`, ...)
        self.fresh_state = []  # buffers that torch would create from this step's gradient (classes that need it)
        self.group_indices = []  # param_groups index of each of this launch's groups
        self.group_ends = []
        self.host_table = self.device_table = None
        self.cached = None  # the op call with its arguments converted once (fusedopt._C.CachedCall)
        self.advances_schedule = False  # the last launch on the schedule's device advances a per-step schedule

    def add(self, group_index, param, states, scalars, fresh, extra=None):
        if not self.group_indices or self.group_indices[-1] != group_index:
            self.group_indices.append(group_index)
            self.group_ends.append(len(self.params))
        self.params.append(param)
        self.is_complex.append(param.is_complex())
        real = torch.view_as_real if param.is_complex() else (lambda t: t)
        self.kernel_params.append(real(_distributed.local(param)))
        if self.state_lists is None:
            self.state_lists = [[] for _ in states]
        for column, state in zip(self.state_lists, states):
            if state is not None:
                column.append(real(_distributed.local(state)))
        if self.scalar_lists is None:
            self.scalar_lists = [[] for _ in scalars]
        for column, scalar in zip(self.scalar_lists, scalars):
            column.append(scalar)
        self.fresh_state.append(int(fresh))
        if extra is not None:
            self.extras.append(_distributed.local(extra))
        self.group_ends[-1] = len(self.params)

    def allocate_tables(self):
        words = _ops.table_words(len(self.params), len(self.group_indices))
        on_cpu = self.device.type == "cpu"
        # Plain host memory: eager steps upload through a pinned staging copy, a captured step through a pinned
        # snapshot its graph owns, so no copy ever reads this table after the op returns.
        self.host_table = torch.zeros(words, dtype=torch.int64)
        self.device_table = torch.zeros(0 if on_cpu else words, dtype=torch.int64, device=self.device)


class _Plan:
    def __init__(self, optimizer):
        self.state = optimizer.state
        self.group_params = [group["params"] for group in optimizer.param_groups]
        self.group_sizes = [len(params) for params in self.group_params]
        self.options = [optimizer._option_values(group) for group in optimizer.param_groups]
        self.without_grad = [p for params in self.group_params for p in params if p.grad is None]
        self.schedule = getattr(optimizer, "_device_schedule", None)
        self.launches = []
        self.launches_by_device = {}
        self.guard = None  # fusedopt._C.PlanGuard over the containers and tensors the plan was read from
        self.advances_schedule = False  # one of its launches advances the per-step device schedule

    def still_valid(self, optimizer):
        groups = optimizer.param_groups
        return (
            optimizer.state is self.state
            and getattr(optimizer, "_device_schedule", None) is self.schedule
            and len(groups) == len(self.group_params)
            and all(g["params"] is params and len(params) == size
                    for g, params, size in zip(groups, self.group_params, self.group_sizes))
            and [optimizer._option_values(group) for group in groups] == self.options
            # in C++: the param lists, optimizer.state and every planned state dict hold the same objects as
            # when the plan was built
            and self.guard.unchanged()
            and _ops.none_has_grad(self.without_grad)
        )

    def add_launches(self, launches):
        self.launches = launches
        for launch in launches:
            self.launches_by_device.setdefault(launch.device, []).append(launch)
        # The usual step's scaling and calls (no GradScaler, no clipping: every launch just updates), built once
        self.no_scaling = {device: (None, None, None) for device in self.launches_by_device}
        self.update_calls = [(launch, UPDATE) for on_device in self.launches_by_device.values() for launch in on_device]

    def prepare(self):
        """Every launch's one pass over its tensors (C++), all before any launch runs: False when a tensor no
        longer fits its launch (a param lost its grad, or changed dtype, device or shape in place)."""
        return all(launch.cached.prepare() for launch in self.launches)

    def release(self):
        for launch in self.launches:
            launch.cached.release()


class FusedOptimizer(torch.optim.Optimizer):
    """Subclasses set these, and mix in the torch.optim class they replace after this one.

    Every subclass takes its torch class's arguments plus these keyword-only ones (fusedopt/_low_precision.py
    documents the last four in full):

    - ``max_grad_norm=None``: clip the global gradient norm inside the step (LAMB's reference owns its own).
    - ``param_rounding="nearest"`` | ``"stochastic"`` | ``"kahan"``: how bfloat16/float16 params receive their
      float32 updates. ``"kahan"`` keeps a compensation buffer, state key ``"kahan_comp"`` (param dtype).
    - ``master_weights=False``: ``True`` keeps a float32 copy of each bfloat16/float16 param, state key
      ``"master_param"``, which the update is computed on; the param receives its rounding.
    - ``state_dtype=None`` | ``torch.float32`` | ``torch.bfloat16``: the state buffers' dtype (None: the param's;
      float64 params keep float64 state).
    - ``seed=None``: the stochastic-rounding seed (None: drawn from torch's default generator).

    float32/float64 params update exactly as with the default options, whatever these say (but for
    ``state_dtype``). ``optimizer.low_precision`` holds the options; ``state_dict()`` adds ``"fusedopt_rng"`` with
    stochastic rounding, ``state_dict_for_torch()`` leaves out everything torch.optim would not have saved.
    """

    _op_name: str  # the torch.ops.fusedopt op; its declaration (csrc/algorithms/) names everything else
    # How torch creates state lazily: False, a param's whole state (and `step`) while its state dict is empty,
    # a missing key of a non-empty one raising KeyError; True (SGD), each buffer whose key is missing or None,
    # which the kernel then fills from this step's gradient (the op's `fresh_state`).
    _state_created_per_key = False

    def __init__(self, params, *args, **kwargs):
        if kwargs.get("differentiable", False):
            raise RuntimeError(
                f"{type(self).__name__} does not support differentiable=True: its fused kernels are not "
                f"differentiable; use {self._reference_name()}(differentiable=True)"
            )
        # fusedopt's own options, validated (ValueError) before torch's constructor sees the rest
        low_precision = LowPrecision.pop_from(kwargs)
        if self._clips_itself():
            # The replaced class takes max_grad_norm (LAMB): its default, validation and attribute.
            super().__init__(params, *args, **kwargs)
        else:
            max_grad_norm = kwargs.pop("max_grad_norm", None)
            if max_grad_norm is not None and not (
                isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
                and math.isfinite(max_grad_norm) and max_grad_norm > 0
            ):
                raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
            super().__init__(params, *args, **kwargs)  # the torch.optim class: validation, defaults, groups
            # Global gradient-norm clipping inside the step (torch.nn.utils.clip_grad_norm_'s factor); None: off.
            self.max_grad_norm = max_grad_norm
        # How bf16/fp16 params receive their updates and in which dtype the state lives (read-only).
        self.low_precision = low_precision
        low_precision.draw_default_seed()  # after torch's validation: a failing constructor draws nothing
        if not _ops.EXTENSION_AVAILABLE and not low_precision.is_default:
            warnings.warn(f"{type(self).__name__}: without the compiled extension torch.optim's step runs, which "
                          f"ignores {low_precision}", RuntimeWarning, stacklevel=2)
        # GradScaler hands the scale to step() instead of unscaling the grads itself.
        self._step_supports_amp_scaling = True
        self._plan = None
        self._grad_stats = {}  # device -> float64 [sum of squares, non-finite flag], zeroed by the kernels
        self._found_inf = {}  # device -> float32 flag the kernel writes for GradScaler.update()
        # between load_state_dict's pre- and post-hook: the incoming state tensors as saved, and the rng entry
        self._loading, self._loading_rng = {}, None
        self.register_load_state_dict_pre_hook(FusedOptimizer._keep_saved_tensors)
        self.register_load_state_dict_post_hook(FusedOptimizer._restore_saved_tensors)
        self.register_load_state_dict_post_hook(FusedOptimizer._forget_plan)
        self.register_state_dict_post_hook(FusedOptimizer._save_rng)
        self._convert_buffers()
        self._move_scalars()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The constructor forwards to torch's: show torch's arguments (and max_grad_norm and the low-precision
        # options) to inspect.signature.
        torch_init = inspect.signature(cls._torch_class().__init__)
        parameters = list(torch_init.parameters.values())[1:]
        if not cls._clips_itself():
            parameters.append(inspect.Parameter("max_grad_norm", inspect.Parameter.KEYWORD_ONLY, default=None))
        parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
                       for name, default in _low_precision.OPTIONS.items()]
        cls.__signature__ = torch_init.replace(parameters=parameters)

    @staticmethod
    def profile_hook_step(func):
        """torch.optim wraps every optimizer class's step() in this (Optimizer._patch_step_function): torch's
        wrapper enters a ``record_function("Optimizer.step#<class>.step")`` range and runs the step pre and post
        hooks. Entering the range costs ~6 us even when nothing records it, a quarter of a small model's step:
        here torch's wrapper runs whenever a hook is registered or a profiler (any RecordFunction observer) could
        see the range, and the step alone otherwise, which is what torch's wrapper amounts to then."""
        observed_step = torch.optim.Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            optimizer = args[0]
            if (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                    or any(hooks is None or hooks for hooks in _GLOBAL_STEP_HOOKS)
                    or _ops.record_function_observed()):
                return observed_step(*args, **kwargs)
            return func(*args, **kwargs)

        return wrapper

    @classmethod
    def _torch_class(cls):
        """The class this one replaces: a torch.optim class, or a plain-PyTorch reference (fusedopt.references)
        for algorithms torch.optim lacks."""
        return next(c for c in cls.__mro__ if issubclass(c, torch.optim.Optimizer)
                    and not issubclass(c, FusedOptimizer) and c is not torch.optim.Optimizer)

    @classmethod
    def _clips_itself(cls):
        """Whether the replaced class clips the global grad norm itself (LAMB's reference): it then owns the
        `max_grad_norm` argument, and the fused step's clipping computes the factor the class applies."""
        return "max_grad_norm" in inspect.signature(cls._torch_class().__init__).parameters

    @classmethod
    def _reference_name(cls):
        """How users import the replaced class: torch.optim.Adam, fusedopt.references.Lion."""
        reference = cls._torch_class()
        module = "torch.optim" if reference.__module__.startswith("torch.optim") else reference.__module__
        return f"{module}.{reference.__name__}"

    # ---- Per-algorithm pieces (subclasses), by the names the op's declaration gives ----
    def _options(self, group):
        """{option name: bool} for this group: they select the compiled kernel."""
        raise NotImplementedError

    def _hyper(self, group):
        """{hyperparameter name: value} for this group, every declared one but lr (the base reads group["lr"])."""
        raise NotImplementedError

    def _new_state(self, param, group):
        """Initial values of a param's state where torch does not start at zero: {state key: tensor or number}.
        Buffers not named here start as zeros like the param, scalars other than `step` are required here.
        `param` stands for the param: its shape, device and layout, in the state dtype (the param itself unless
        `state_dtype` differs), so that `torch.full_like(param, value)` is the buffer, rounded only once."""
        return {}

    # ---- Derived from the declaration ----
    @property
    def _spec(self):
        return _ops.spec(self._op_name)

    def _option_values(self, group):
        return self._spec.option_values(self, self._options(group))

    def _active_state_keys(self, group):
        """The declared state buffers, with None for those these options do not use."""
        return self._spec.active_states(self._option_values(group))

    def _new_buffers(self, param, group):
        """Every declared buffer and scalar a param's first step creates (scalars as given, converted later),
        the buffers in the state dtype (`state_dtype`: the param's by default)."""
        dtype = self.low_precision.state_dtype_for(param)
        preserve = torch.preserve_format
        like = param if dtype == param.dtype else torch.empty_like(param, dtype=dtype, memory_format=preserve)
        initial = self._new_state(like, group)
        state = {key: initial[key] if key in initial
                 else torch.zeros_like(param, dtype=dtype, memory_format=preserve)
                 for key in self._spec.states}
        state.update({key: initial[key] for key in self._spec.scalars if key != "step"})
        return state

    # ---- Param groups and state ----
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._plan = None

    @staticmethod
    def _forget_plan(optimizer):
        optimizer._plan = None
        optimizer._move_scalars()

    # torch's load_state_dict casts every state tensor but `step` to its param's dtype: it would round a float32
    # master copy to bf16 and the moments to the param's dtype. The pre-hook keeps the incoming tensors, the
    # post-hook puts them back in the dtypes this optimizer keeps them in, so that resuming is exact.
    @staticmethod
    def _keep_saved_tensors(optimizer, state_dict):
        optimizer._loading, optimizer._loading_rng = {}, None
        if RNG_KEY in state_dict:
            LowPrecision.check_rng_state_dict(state_dict[RNG_KEY])  # before anything is loaded
        if _ops.EXTENSION_AVAILABLE:  # else torch's step runs on torch's layout
            optimizer._loading = _low_precision.saved_tensors(optimizer, state_dict)
        optimizer._loading_rng = state_dict.get(RNG_KEY)

    @staticmethod
    def _restore_saved_tensors(optimizer):
        saved, optimizer._loading = optimizer._loading, {}
        _low_precision.restore_tensors(optimizer, saved)
        rng, optimizer._loading_rng = optimizer._loading_rng, None
        if rng is not None and optimizer.low_precision.stochastic:
            optimizer.low_precision.load_rng_state_dict(rng)

    @staticmethod
    def _save_rng(optimizer, state_dict):
        """state_dict post-hook: the stochastic-rounding stream (seed, each device's counter), so that resuming
        rounds as the uninterrupted run would. Only with stochastic rounding: otherwise the state dict is
        torch's."""
        if optimizer.low_precision.stochastic:
            state_dict[RNG_KEY] = optimizer.low_precision.rng_state_dict()
        return state_dict

    def state_dict_for_torch(self):
        """This optimizer's state dict as torch.optim.<Class> (or the fusedopt.references class) saves it, to
        continue training there as if torch had trained: ``master_param``, ``kahan_comp`` and ``fusedopt_rng``
        dropped, state buffers cast to their params' dtypes. (torch.optim also loads ``state_dict()`` itself: it
        ignores ``fusedopt_rng``, keeps the extras unused and casts the buffers the same way.)"""
        return _low_precision.for_torch(self, self.state_dict())

    def _convert_buffers(self):
        """State torch's constructor created (Adagrad's `sum`) in the param's dtype, created again in the state
        dtype as the first step creates it (converting would round the initial value through the param's dtype)."""
        if not _ops.EXTENSION_AVAILABLE or self.low_precision.state_dtype is None:
            return
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state or self.low_precision.state_dtype_for(param) == param.dtype:
                    continue
                new = self._new_buffers(param, group)
                for key in self._spec.states:
                    if torch.is_tensor(state.get(key)):
                        state[key] = new[key]

    def _move_scalars(self):
        """Every existing scalar state (`step`, ...) onto its param's device: states torch creates up front
        (Adagrad) or loads (load_state_dict with any map_location), whether or not the param gets a grad."""
        if not _ops.EXTENSION_AVAILABLE:
            return  # torch's own step runs: keep torch's layout
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                for key in self._spec.scalars if state else ():
                    if key in state:
                        self._scalar_tensor(state, key, param)

    @staticmethod
    def _scalar_tensor(state, key, param):
        """torch keeps scalar state (`step`, NAdam's `mu_product`, ...) on the CPU unless fused/capturable, in
        float32; the kernels read and advance it on the param's device. A missing `step` starts at zero."""
        value = state.get(key)
        if value is None and key == "step":
            value = torch.zeros((), dtype=torch.float32, device=param.device)
        elif not torch.is_tensor(value) or value.device != param.device or value.dtype != torch.float32:
            value = torch.as_tensor(value, dtype=torch.float32).to(param.device).reshape(())
        state[key] = value
        return value

    def _check_grads(self):
        """Every grad this step would use, checked before any state is created or any launch runs."""
        name = type(self).__name__
        _ops.check_grads(name, [p for group in self.param_groups for p in group["params"]])
        _distributed.check_params(name, self)

    def _build_plan(self):
        self._check_grads()
        rows = _lazy_state.read_rows(self)  # raises like torch, before anything below writes
        plan = _Plan(self)
        launches = {}
        watched = PlanSources(self)
        for row in rows:
            param, group = row.param, self.param_groups[row.group_index]
            state = _lazy_state.create_state(self, row)
            scalars = [self._scalar_tensor(state, k, param) for k in self._spec.scalars] if row.keeps_state else []
            states = [state[k] if k else None for k in row.keys]
            extra = state[row.extra_key] if row.extra_key else None  # master copy / compensation, bf16/fp16 only
            # the kernels see real views; one launch's state buffers share one dtype (csrc/ops.cpp)
            param_dtype = real_dtype(param.dtype)
            state_dtype = real_dtype(self.low_precision.state_dtype_for(param))
            options = self._option_values(group)
            key = (param.device, param_dtype, state_dtype, options, *_distributed.launch_key(param))
            if key not in launches:
                launches[key] = _Launch(param.device, options, row.extra_key,
                                        self.low_precision.launch_rounding(param_dtype, state_dtype))
            launches[key].add(row.group_index, param, states, scalars, row.fresh, extra)
            buffers = [t for t in states if t is not None] + ([extra] if extra is not None else [])
            watched.add(row, state, buffers, launches[key])
        plan.add_launches(list(launches.values()))
        plan.guard = watched.guard()
        for launch in plan.launches:
            if launch.device not in self._grad_stats:
                self._grad_stats[launch.device] = torch.zeros(2, dtype=torch.float64, device=launch.device)
                self._found_inf[launch.device] = torch.zeros((), dtype=torch.float32, device=launch.device)
        schedule = plan.schedule
        if schedule is not None and schedule.per_step:
            on_device = plan.launches_by_device.get(schedule.lrs.device)
            if on_device:
                on_device[-1].advances_schedule = True  # after every other launch on that device has read the lrs
                plan.advances_schedule = True
        for launch in plan.launches:
            if not any(launch.fresh_state):
                launch.fresh_state = []  # the op reads an empty list as no fresh buffer; a step tests it in O(1)
            launch.allocate_tables()
            self._cache_call(launch)
        plan.distributed = _distributed.plan_reduction(self, plan)
        return plan

    def _cache_call(self, launch):
        launch.cached = _ops.cached_call(self._op_name, self._op_arguments(launch), launch.params)

    # ---- The step ----
    def _group_arguments(self, launch):
        """The groups' hyperparameters (declaration order, lr first) and tensor lrs the kernel reads itself."""
        hyper, lrs = [], []
        spec = self._spec
        for index in launch.group_indices:
            group = self.param_groups[index]
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.device == launch.device and lr.dtype in (torch.float32, torch.float64):
                lrs.append(lr)  # read by the kernel at launch time: no host sync, graph-capturable
                hyper.append(0.0)
            else:
                lrs.append(None)
                hyper.append(float(lr))
            hyper.extend(spec.hyper_values(self, self._hyper(group)))
        return hyper, lrs

    def _op_arguments(self, launch, phases=UPDATE):
        """The op's arguments, by the names of its schema (csrc/algorithm_op.h derives it from the declaration)."""
        spec = self._spec
        grads = [_distributed.local(p.grad) for p in launch.params]
        if any(launch.is_complex):
            grads = [torch.view_as_real(g) if c else g for g, c in zip(grads, launch.is_complex)]
        hyper, lrs = self._group_arguments(launch)
        schedule = getattr(self, "_device_schedule", None)
        momenta = []
        if schedule is not None and schedule.momenta is not None:
            momenta = [schedule.momenta[index] for index in launch.group_indices]
        args = {
            "params": launch.kernel_params, "grads": grads,
            **dict(zip(spec.states, launch.state_lists)), **dict(zip(spec.scalars, launch.scalar_lists)),
            "fresh_state": launch.fresh_state if self._state_created_per_key else [],
            "group_ends": launch.group_ends, "hyper": hyper, "lrs": lrs,
            "host_table": launch.host_table, "device_table": launch.device_table,
            **dict(zip(spec.options, launch.options)),
            "momenta": momenta, "grad_stats": self._grad_stats[launch.device],
            "max_grad_norm": float(self.max_grad_norm or 0.0), "phases": phases,
        }
        if launch.advances_schedule:
            args.update(schedule_lrs=schedule.lrs, schedule_momenta=schedule.momenta, schedule_state=schedule.state,
                        schedule_program=schedule.program)
        args.update(self._storage_arguments(launch))
        return args

    def _storage_arguments(self, launch):
        """How the launch stores what it computes (fusedopt/_low_precision.py), only where that differs from the
        op's defaults: a launch with nothing in low precision is called exactly as without the options."""
        args = {}
        if launch.extras:
            args[_low_precision.EXTRA_ARGUMENTS[launch.extra_key]] = launch.extras
        if launch.rounding != "nearest":
            args["param_rounding"] = launch.rounding
        if launch.rounding == "stochastic":
            args["rng_state"] = self.low_precision.rng_state(launch.device)
        return args

    def _scaling(self, plan, grad_scaler):
        """Per device: (grad_scale, skip_if, found_inf) op arguments for this step's GradScaler, if any."""
        if grad_scaler is None:
            grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
            if grad_scale is None and found_inf is None:
                return plan.no_scaling
            # GradScaler's newer contract: it has checked the grads already and hands over its verdict.
            return {device: (self._on(grad_scale, device), self._on(found_inf, device), None)
                    for device in plan.launches_by_device}
        devices = list(plan.launches_by_device)
        scaler_state = grad_scaler._per_optimizer_states[id(self)]
        if scaler_state["stage"] is OptState.READY and len(devices) > 1:
            # One verdict must cover every device before any updates: let torch check (and unscale) first.
            grad_scaler.unscale_(self)
        if scaler_state["stage"] is OptState.UNSCALED:
            # The grads were unscaled (and checked) by scaler.unscale_(): honour its verdict.
            verdicts = list(scaler_state["found_inf_per_device"].values())
            return {device: (None, sum(v.to(device, non_blocking=True) for v in verdicts) if verdicts else None,
                             None) for device in devices}
        scale = grad_scaler._get_scale_async()
        scaler_state["found_inf_per_device"] = {device: self._found_inf[device] for device in devices}
        return {device: (self._on(scale, device), None, self._found_inf[device]) for device in devices}

    @staticmethod
    def _on(tensor, device):
        return None if tensor is None else tensor.to(device=device, dtype=torch.float32, non_blocking=True)

    def _current_plan(self):
        plan = getattr(self, "_plan", None)
        if plan is None or not plan.still_valid(self) or not _distributed.still_valid(plan):
            plan = self._plan = self._build_plan()
        return plan

    def _prepared_plan(self):
        """The current plan with every launch's tensors checked and tabled for this step (release it after)."""
        plan = self._current_plan()
        if plan.prepare():
            return plan
        plan.release()
        plan = self._plan = self._build_plan()  # raises, as torch would, on a grad it cannot use
        if not plan.prepare():
            plan.release()
            raise RuntimeError(f"{type(self).__name__}: a new launch plan does not fit its own tensors "
                               "(a fusedopt bug: please report it)")
        return plan

    def _op_invocations(self):
        """(op, args) of the calls the next step() makes, with state created as step() would create it."""
        with torch.no_grad():
            plan = self._prepared_plan()
            plan.release()
            return [(_ops.op(self._op_name), self._op_arguments(launch)) for launch in plan.launches]

    def _calls(self, plan, scaling):
        """(launch, phases) in the order this step runs them. Without a scaler's in-step check and without
        clipping, every launch just updates (the plan's list); otherwise _staged_calls."""
        if scaling is plan.no_scaling and not self.max_grad_norm:
            return plan.update_calls
        return self._staged_calls(plan, scaling)

    def _staged_calls(self, plan, scaling):
        """The calls of a step that needs the grads' statistics: every launch of a device reduces its grads
        before any updates: in one launch (reduce, grid barrier, update) where the device has one, else reduce in
        each, then update in each. Clipping over several devices reduces on all of them first and gives every device
        the global sums (_share_grad_stats), so that each clips by the global norm, as clip_grad_norm_ does."""
        by_device = plan.launches_by_device
        needs_stats = {device: scaling[device][2] is not None or bool(self.max_grad_norm) for device in by_device}
        if self.max_grad_norm and len(by_device) > 1:
            for launches in by_device.values():
                yield from ((launch, REDUCE_GRADS) for launch in launches)
            for device in by_device:  # DTensor params: combine across ranks first (no-op without them)
                _distributed.all_reduce_grad_stats(plan, device, self._grad_stats)
            self._share_grad_stats(list(by_device))
            for launches in by_device.values():
                yield from self._updates(launches)
            return
        for device, launches in by_device.items():
            if not needs_stats[device]:
                yield from ((launch, UPDATE) for launch in launches)
            elif len(launches) == 1 and not _distributed.needs_separate_reduce(plan):
                yield launches[0], REDUCE_GRADS | UPDATE | RESET_STATS
            else:  # DTensor params: the all-reduce across ranks runs between the reduce and the update launches
                yield from ((launch, REDUCE_GRADS) for launch in launches)
                _distributed.all_reduce_grad_stats(plan, device, self._grad_stats)
                yield from self._updates(launches)

    @staticmethod
    def _updates(launches):
        """Update in every launch; the device's last one also zeroes grad_stats for the next step."""
        yield from ((launch, UPDATE) for launch in launches[:-1])
        yield launches[-1], UPDATE | RESET_STATS

    def _share_grad_stats(self, devices):
        """Every device's grad_stats becomes the sum over all devices, added in device order (deterministic).
        Between GPUs without a host sync: cross-device copies are ordered after both devices' current streams.
        A copy to or from the CPU is blocking, so the CPU never reads a sum before it has arrived."""
        stats = [self._grad_stats[device] for device in devices]
        non_blocking = all(device.type == "cuda" for device in devices)
        total = stats[0].clone()
        for other in stats[1:]:
            total += other.to(devices[0], non_blocking=non_blocking)
        for tensor in stats:
            tensor.copy_(total, non_blocking=non_blocking)

    def step(self, closure=None, grad_scaler=None):
        if not _ops.EXTENSION_AVAILABLE:
            return self._unfused_step(closure, grad_scaler)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # torch.no_grad()'s switch itself: the context manager's objects cost ~1 us, 10% of a small model's step
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            schedule = getattr(self, "_device_schedule", None)
            if schedule is not None:
                schedule._reinstall_lr_views()
            plan = self._prepared_plan()
            try:
                scaling = self._scaling(plan, grad_scaler)
                for launch, phases in self._calls(plan, scaling):
                    grad_scale, skip_if, found_inf = scaling[launch.device]
                    hyper, lrs = self._group_arguments(launch)
                    launch.cached.run({
                        "hyper": hyper, "lrs": lrs, "grad_scale": grad_scale, "skip_if": skip_if,
                        "found_inf": found_inf, "max_grad_norm": float(self.max_grad_norm or 0.0),
                        "phases": phases,
                        "grad_stats": _distributed.grad_stats(plan, launch, phases,
                                                              self._grad_stats[launch.device], REDUCE_GRADS),
                    })
            finally:
                plan.release()
            for launch in plan.launches:
                if self._state_created_per_key and launch.fresh_state:
                    launch.fresh_state = []  # torch's buffers exist from now on
                    self._cache_call(launch)
            if schedule is not None and schedule.per_step and not plan.advances_schedule:
                # torch's loop steps its schedulers whether or not any param had a grad; a launch advances a
                # per-step schedule only when one runs on its device, so a step without one advances it here
                # (here rather than in a step post hook, which would cost every step torch's hook wrapper)
                schedule._advance()
        finally:
            torch._C._set_grad_enabled(grad_enabled)
        return loss

    def _unfused_step(self, closure, grad_scaler):
        """torch.optim's own step (no compiled extension), with GradScaler's and clipping's usual passes."""
        if grad_scaler is not None:
            scaler_state = grad_scaler._per_optimizer_states[id(self)]
            if scaler_state["stage"] is OptState.READY:
                grad_scaler.unscale_(self)
            if sum(v.item() for v in scaler_state["found_inf_per_device"].values()):
                return None
        if self.max_grad_norm and not self._clips_itself():
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)
