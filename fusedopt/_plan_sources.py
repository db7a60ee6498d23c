"""What a launch plan is read from, gathered while the plan is built, for its PlanGuard (csrc/plan_guard.cpp).

The guard's per-step check compares these by object identity, in C++: the param lists of the groups,
`optimizer.state` and each planned param's state dict (so a replaced, added or removed entry or `step` is
seen), and the real views of complex params and states. The tensors themselves are checked by each launch's
cached call in its pass over them (csrc/cached_call.cpp), which sees an in-place `.data = ...` that leaves them
unusable.
"""
from . import _ops


class PlanSources:
    def __init__(self, optimizer):
        self.containers = [group["params"] for group in optimizer.param_groups] + [optimizer.state]
        self.views = []

    def add(self, row, state, buffers, launch):
        """Called after every state write for the row, once `launch` has added its param: the launch's last
        kernel param and last state entries are then the row's."""
        if row.keeps_state:
            self.containers.append(state)
        # `buffers`: the state buffers in column order, then the low-precision extra (master copy, compensation),
        # which only bf16/fp16 params have, so a complex param's buffers pair with the launch's columns below
        if row.param.is_complex():  # the kernels see real views, which `.data = ...` on the source leaves stale
            self.views.append((row.param, launch.kernel_params[-1]))
            self.views += [(t, column[-1]) for t, column in zip(buffers, [c for c in launch.state_lists if c])]

    def guard(self):
        """A PlanGuard over everything added: `.unchanged()` holds while the plan's containers are unchanged."""
        return _ops.plan_guard(self.containers, self.views)
