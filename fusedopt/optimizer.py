"""The base class of every Fused* optimizer.

Each Fused* class subclasses the torch.optim class it replaces: construction, validation, defaults, param
groups, hooks, ``state_dict``/``load_state_dict`` and ``__setstate__`` are torch's own, and so is the fallback
``step`` when the compiled extension is missing. This class replaces ``step`` with one fused op call per
(device, dtype, option set) and owns what that needs: lazy state creation with torch's state keys, and a cached
launch plan (the tensor lists and the device tables the kernels walk), rebuilt only when the set of params with
gradients, the param groups, the options or the state object change.
"""
import inspect

import torch

from . import _ops


class _Launch:
    """One fused op call: the params of one (device, dtype, options) bucket, across param groups."""

    def __init__(self, device, options):
        self.device, self.options = device, options
        self.params = []  # the torch params, whose .grad is read every step
        self.kernel_params = []  # what the kernel sees (real views of complex params)
        self.is_complex = []
        self.state_lists = None  # one list per state argument of the op, [] where the options use none
        self.steps = []
        self.fresh_state = []  # SGD: momentum buffers that torch would create from this step's gradient
        self.group_indices = []  # param_groups index of each of this launch's groups
        self.group_ends = []
        self.host_table = self.device_table = None
        self.cached = None  # the op call with its arguments converted once (fusedopt._C.CachedCall)

    def add(self, group_index, param, states, step, fresh):
        if not self.group_indices or self.group_indices[-1] != group_index:
            self.group_indices.append(group_index)
            self.group_ends.append(len(self.params))
        self.params.append(param)
        self.is_complex.append(param.is_complex())
        real = torch.view_as_real if param.is_complex() else (lambda t: t)
        self.kernel_params.append(real(param))
        if self.state_lists is None:
            self.state_lists = [[] for _ in states]
        for column, state in zip(self.state_lists, states):
            if state is not None:
                column.append(real(state))
        if step is not None:
            self.steps.append(step)
        self.fresh_state.append(int(fresh))
        self.group_ends[-1] = len(self.params)

    def allocate_tables(self):
        words = _ops.table_words(len(self.params), len(self.group_indices))
        on_cpu = self.device.type == "cpu"
        # Pinned for CUDA: a step captured in a CUDA graph uploads a changed table straight from it.
        self.host_table = torch.zeros(words, dtype=torch.int64, pin_memory=not on_cpu)
        self.device_table = torch.zeros(0 if on_cpu else words, dtype=torch.int64, device=self.device)


class _Plan:
    def __init__(self, optimizer):
        self.state = optimizer.state
        self.group_params = [group["params"] for group in optimizer.param_groups]
        self.group_sizes = [len(params) for params in self.group_params]
        self.options = [optimizer._options(group) for group in optimizer.param_groups]
        self.without_grad = [p for params in self.group_params for p in params if p.grad is None]
        self.launches = []

    def still_valid(self, optimizer):
        groups = optimizer.param_groups
        return (
            optimizer.state is self.state
            and len(groups) == len(self.group_params)
            and all(g["params"] is params and len(params) == size
                    for g, params, size in zip(groups, self.group_params, self.group_sizes))
            and [optimizer._options(group) for group in groups] == self.options
            # in C++, every launch before any runs: True when each param has a grad, raises on an unusable one
            and all(launch.cached.grads_ready() for launch in self.launches)
            and _ops.none_has_grad(self.without_grad)
        )


class FusedOptimizer(torch.optim.Optimizer):
    """Subclasses set these, and mix in the torch.optim class they replace after this one."""

    _op_name: str  # the torch.ops.fusedopt op
    _state_keys: tuple  # the op's state list arguments, as torch.optim state keys
    _uses_step = True  # keeps a per-param `step` counter

    def __init__(self, params, *args, **kwargs):
        if kwargs.get("differentiable", False):
            raise RuntimeError(
                f"{type(self).__name__} does not support differentiable=True: its fused kernels are not "
                f"differentiable; use torch.optim.{self._torch_class().__name__}(differentiable=True)"
            )
        super().__init__(params, *args, **kwargs)  # the torch.optim class: validation, defaults, groups
        # torch's GradScaler skips unscaling for optimizers that claim to do it in their step (torch's fused
        # ones); ours does not yet, so let the scaler unscale and check the gradients itself.
        self._step_supports_amp_scaling = False
        self._plan = None
        self.register_load_state_dict_post_hook(FusedOptimizer._forget_plan)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The constructor forwards to torch's: show torch's arguments to inspect.signature and IDEs.
        torch_init = inspect.signature(cls._torch_class().__init__)
        cls.__signature__ = torch_init.replace(parameters=list(torch_init.parameters.values())[1:])

    @classmethod
    def _torch_class(cls):
        return next(c for c in cls.__mro__ if c.__module__.startswith("torch.optim"))

    # ---- Per-algorithm pieces (subclasses) ----
    def _options(self, group):
        """The op's boolean options for this group: they select the compiled kernel."""
        raise NotImplementedError

    def _hyper(self, group):
        """The group's hyperparameters in the op's slot order, lr first (see csrc/update_rules.h)."""
        raise NotImplementedError

    def _new_state(self, param, group):
        """Zeroed state for a param's first step, with torch.optim's keys."""
        raise NotImplementedError

    def _active_state_keys(self, group):
        """_state_keys with None for the arguments these options do not use."""
        return self._state_keys

    # ---- Param groups and state ----
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._plan = None

    @staticmethod
    def _forget_plan(optimizer):
        optimizer._plan = None

    def _step_tensor(self, state, param):
        """torch keeps `step` on the CPU unless fused/capturable; the kernels read it on the param's device."""
        step = state.get("step")
        if step is None:
            step = torch.zeros((), dtype=torch.float32, device=param.device)
        elif not torch.is_tensor(step) or step.device != param.device or step.dtype != torch.float32:
            step = torch.as_tensor(step, dtype=torch.float32).to(param.device).reshape(())
        state["step"] = step
        return step

    def _check_grads(self):
        """Every grad this step would use, checked before any state is created or any launch runs."""
        name = type(self).__name__
        supported = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128)
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                if grad.shape != param.shape or grad.dtype != param.dtype or grad.device != param.device:
                    raise RuntimeError(
                        f"{name}: the gradient of a param of shape {tuple(param.shape)}, {param.dtype} on "
                        f"{param.device} is {tuple(grad.shape)}, {grad.dtype} on {grad.device}"
                    )
                if param.dtype not in supported:
                    raise RuntimeError(f"{name} does not support parameters of dtype {param.dtype}")

    def _build_plan(self):
        self._check_grads()
        plan = _Plan(self)
        launches = {}
        for group_index, group in enumerate(self.param_groups):
            options = self._options(group)
            keys = self._active_state_keys(group)
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not self._uses_step and not any(keys):
                    state = {}  # plain SGD keeps no state: create no entry, as torch creates none
                else:
                    state = self.state[param]
                fresh = False
                missing = [k for k in keys if k is not None and k not in state]
                if missing:
                    new = self._new_state(param, group)
                    fresh = any(state.get(k) is None for k in missing)
                    for k in missing:
                        state[k] = new[k]
                step = self._step_tensor(state, param) if self._uses_step else None
                real_dtype = torch.view_as_real(param).dtype if param.is_complex() else param.dtype
                key = (param.device, real_dtype, options)
                if key not in launches:
                    launches[key] = _Launch(param.device, options)
                launches[key].add(group_index, param, [state[k] if k else None for k in keys], step, fresh)
        plan.launches = list(launches.values())
        for launch in plan.launches:
            launch.allocate_tables()
            self._cache_call(launch)
        return plan

    def _cache_call(self, launch):
        launch.cached = _ops.cached_call(self._op_name, self._op_arguments(launch), launch.params)

    # ---- The step ----
    def _group_arguments(self, launch):
        hyper, lrs = [], []
        for index in launch.group_indices:
            group = self.param_groups[index]
            values = list(self._hyper(group))
            lr = group["lr"]
            if torch.is_tensor(lr):
                if lr.device == launch.device and lr.dtype in (torch.float32, torch.float64):
                    lrs.append(lr)  # read by the kernel at launch time: no host sync, graph-capturable
                    values[0] = 0.0
                else:
                    lrs.append(None)
                    values[0] = float(lr)
            else:
                lrs.append(None)
                values[0] = float(lr)
            hyper.extend(float(v) for v in values)
            hyper.extend([0.0] * (_ops.HYPER_SLOTS - len(values)))
        return hyper, lrs

    def _op_arguments(self, launch):
        grads = [p.grad for p in launch.params]
        if any(launch.is_complex):
            grads = [torch.view_as_real(g) if c else g for g, c in zip(grads, launch.is_complex)]
        per_tensor = list(launch.state_lists)
        per_tensor.append(launch.steps if self._uses_step else launch.fresh_state)
        hyper, lrs = self._group_arguments(launch)
        return (launch.kernel_params, grads, *per_tensor, launch.group_ends, hyper, lrs,
                launch.host_table, launch.device_table, *launch.options)

    def _current_plan(self):
        plan = getattr(self, "_plan", None)
        if plan is None or not plan.still_valid(self):
            plan = self._plan = self._build_plan()
        return plan

    def _op_invocations(self):
        """(op, args) of the calls the next step() makes, with state created as step() would create it."""
        with torch.no_grad():
            return [(_ops.op(self._op_name), self._op_arguments(launch)) for launch in self._current_plan().launches]

    def step(self, closure=None):
        if not _ops.EXTENSION_AVAILABLE:
            return super().step(closure)  # torch.optim's implementation, on the same state
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for launch in self._current_plan().launches:
                launch.cached.run(*self._group_arguments(launch))
                if not self._uses_step and any(launch.fresh_state):
                    launch.fresh_state = [0] * len(launch.params)  # torch's buffers exist from now on
                    self._cache_call(launch)
        return loss
