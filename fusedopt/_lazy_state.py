"""torch.optim's lazy state rules, applied when a launch plan is built.

Reading and writing are two passes, so that a step that must fail (a missing key, a state tensor of the wrong
shape, dtype or device) raises before any state is created, converted or updated:

- `read_rows` only reads `optimizer.state`: per param with a grad, the state keys its group's options use and
  which of them this step creates. It raises what torch raises for the same state, before torch would write:
  the algorithms that initialise a param's state only while its state dict is empty (all but SGD) raise
  `KeyError(key)` for a key missing from a non-empty state; SGD treats a
  missing or None `momentum_buffer` as fresh. A state tensor that does not match its param raises
  `RuntimeError` naming the param (group index and position) and the key.
- `create_state` then fills each row's state as torch's `_init_group` would, and returns it.

Low precision (fusedopt/_low_precision.py) adds to torch's rules: buffers are created in, and must have, the
state dtype (`state_dtype`, else the param's); a bf16/fp16 param's extra buffer (`master_param`, `kahan_comp`)
is fusedopt's, not torch's, so it is created whenever it is missing (a state loaded from torch.optim lacks it;
the master copy then starts from the param's current value), also for plain SGD, which otherwise keeps no
state, and a state dict holding only extras counts as empty for torch's rules.
"""
from dataclasses import dataclass

import torch

from ._low_precision import EXTRA_KEYS


@dataclass
class StateRow:
    group_index: int
    position: int  # in param_groups[group_index]["params"]
    param: torch.Tensor
    keys: tuple  # the optimizer's _active_state_keys(group): None where these options use no buffer
    fresh_keys: tuple  # the keys this step creates (zeroed / filled by _new_state)
    keeps_state: bool  # False: plain SGD, which creates no state entry at all
    extra_key: str = None  # "master_param" / "kahan_comp" where the low-precision options give the param one
    extra_fresh: bool = False  # this step creates it

    @property
    def fresh(self):
        return bool(self.fresh_keys)


def read_rows(optimizer):
    """One StateRow per param with a grad, in param-group order; reads only."""
    rows = []
    for group_index, group in enumerate(optimizer.param_groups):
        keys = tuple(optimizer._active_state_keys(group))
        for position, param in enumerate(group["params"]):
            if param.grad is not None:
                rows.append(_read_row(optimizer, group_index, position, param, keys))
    return rows


def _read_row(optimizer, group_index, position, param, keys):
    used = [k for k in keys if k is not None]
    scalars = list(optimizer._spec.scalars)
    low_precision = optimizer.low_precision
    extra = low_precision.extra_key(param)
    keeps_state = bool(scalars) or bool(used) or extra is not None
    if not keeps_state:
        return StateRow(group_index, position, param, keys, (), False)
    state = optimizer.state.get(param)  # .get: a defaultdict would insert an entry
    if optimizer._state_created_per_key:  # SGD: state.get("momentum_buffer") is None -> a fresh buffer
        fresh = tuple(k for k in used if state is None or state.get(k) is None)
    elif not state or all(k in EXTRA_KEYS for k in state):  # torch: `if len(state) == 0:` create every buffer
        fresh = tuple(used)                                   # and the step (fusedopt's extras are not torch's)
    else:
        fresh = ()
        for key in used + scalars:
            if key not in state:
                raise KeyError(key)  # what torch's `state[key]` raises
    for key in used:
        if key not in fresh:
            _check_tensor(optimizer, group_index, position, param, key, state[key],
                          low_precision.state_dtype_for(param), "a state buffer")
    if not fresh:
        for key in scalars:
            _check_scalar(optimizer, group_index, position, key, state[key])
    extra_fresh = extra is not None and (state is None or state.get(extra) is None)
    if extra is not None and not extra_fresh:
        _check_tensor(optimizer, group_index, position, param, extra, state[extra],
                      low_precision.extra_dtype(extra, param), f"{extra!r}")
    return StateRow(group_index, position, param, keys, fresh, True, extra, extra_fresh)


def _describe(t):
    return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _where(optimizer, group_index, position, key):
    return f"{type(optimizer).__name__}: state[{key!r}] of param_groups[{group_index}]['params'][{position}]"


def _check_tensor(optimizer, group_index, position, param, key, value, dtype, what):
    """A state tensor the kernel will use: the param's shape and device, and `dtype` (the state dtype for a
    buffer, float32 for a master copy, the param's for a compensation buffer)."""
    if not torch.is_tensor(value):
        raise RuntimeError(f"{_where(optimizer, group_index, position, key)} is {type(value).__name__}, not a tensor")
    if value.shape != param.shape or value.dtype != dtype or value.device != param.device:
        rule = ("match its param in shape, dtype and device" if dtype == param.dtype
                else f"match its param in shape and device and be {dtype}")
        raise RuntimeError(
            f"{_where(optimizer, group_index, position, key)} is {_describe(value)}, but the param is "
            f"{_describe(param)}: {what} must {rule}"
        )


def _check_scalar(optimizer, group_index, position, key, value):
    """torch requires a 1-element tensor for `step` (it raises RuntimeError for a number) and keeps its other
    scalar state as tensors too; fusedopt converts their dtype and device, as torch's own kernels accept any."""
    if not (torch.is_tensor(value) and value.numel() == 1 and not value.is_complex()):
        shown = _describe(value) if torch.is_tensor(value) else type(value).__name__
        raise RuntimeError(f"{_where(optimizer, group_index, position, key)} is {shown}, not a 1-element "
                           "real tensor")


def create_state(optimizer, row):
    """The row's state dict with every buffer it uses present (created as torch creates them)."""
    if not row.keeps_state:
        return {}  # plain SGD keeps no state: create no entry, as torch creates none
    group = optimizer.param_groups[row.group_index]
    state = optimizer.state[row.param]
    if row.fresh_keys:
        new = optimizer._new_buffers(row.param, group)
        for key in optimizer._spec.scalars:  # first, in declaration order, as torch creates them
            if key == "step":
                optimizer._scalar_tensor(state, key, row.param)
            else:
                state[key] = new[key]
        for key in row.fresh_keys:
            state[key] = new[key]
    if row.extra_fresh:
        state[row.extra_key] = optimizer.low_precision.new_extra(row.extra_key, row.param)
    return state
