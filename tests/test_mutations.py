"""Changes a user or a library makes to an optimizer between two steps, differentially against torch.optim.

Every Fused* class (the registry's representative option sets) and its torch.optim reference take the same
steps; between two of them the same change is made to both (a row of MUTATIONS); then over the following steps
params and every state buffer (keys and values) must agree with torch's, or, where torch raises, fusedopt must
raise the same exception type and leave its params and state bit-identical. A fused optimizer caches a launch
plan (the tensors its kernels update), so each row checks that the plan notices the change.
"""
import collections
import copy
import inspect
from dataclasses import dataclass

import pytest
import torch

from conftest import DEVICES, TOLERANCES, PSpec, Problem, assert_matches, assert_state_identical, bits, clone_state
from registry import ENTRIES

DTYPE = torch.float32
# Two groups. The changes to one param's state or data are made to params[0], the only param of group 1, which
# gets the registry's second group override: for SGD, Adam, AdamW and RMSprop that selects another kernel
# variant, so params[0] is in the last of two launches, and a step that must fail has to fail before the first
# launch runs. The changes to a group's hyperparameters and params are made to group 0 (params 1 and 2).
SPECS = (PSpec((2, 3), group=1), PSpec((5,), group=0), PSpec((4,), group=0))
STEPS_BEFORE, STEPS_AFTER = 2, 3
# A long plan: the same three params plus 26 others in both groups, and params[0] placed after every other
# param of its group. The host loops over a plan's tensors request the objects of the tensors ahead of the one
# they are at (csrc/host_prefetch.h); here a changed param, state dict or grad is reached from far down the plan.
LONG_SPECS = SPECS + tuple(PSpec((1 + i % 6, 2), group=i % 2) for i in range(26))


def _values(shape, seed, device, dtype=DTYPE):
    """Deterministic values, the same for the fused and the torch.optim run."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def _buffers(opt, p):
    return [k for k in opt.state.get(p, {}) if k != "step"]


def _other_device(device):
    return "cpu" if torch.device(device).type == "cuda" else "cuda"


# --------------------------------------------------------------------------------------------------
# The changes. `apply(opt, params, saved)` changes `opt` in place; `saved` holds deep copies of the
# state_dicts both optimizers had after their first step ("own", "torch"). `applies(entry, opt)` filters the
# rows that mean something for a class (e.g. betas); `grad_missing(t, i)` drops param i's grad at step t.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutation:
    id: str
    apply: object
    applies: object = lambda entry, opt: True
    grad_missing: object = lambda t, i: False
    needs_cuda: bool = False
    # fusedopt rejects the state this leaves (RuntimeError, nothing written), also where torch.optim computes on
    # with it: its kernels need every state buffer in the param's shape, dtype and device. A bool, or a predicate
    # of the registry entry.
    rejected: object = False

    def rejects(self, entry):
        return self.rejected(entry) if callable(self.rejected) else self.rejected


def _set_buffers(make):
    def apply(opt, params, saved):
        p = params[0]
        for key in _buffers(opt, p):
            opt.state[p][key] = make(opt.state[p][key], p)
    return apply


def _set_group(key, make):
    def apply(opt, params, saved):
        opt.param_groups[0][key] = make(opt.param_groups[0][key], params[0].device)
    return apply


def _changed_param(opt):
    return opt.param_groups[1]["params"][0]  # params[0]


def _has_state(entry, opt):
    return len(opt.state.get(_changed_param(opt), {})) > 0


def _has_buffers(entry, opt):
    return bool(_buffers(opt, _changed_param(opt)))


def _has_step(entry, opt):
    return "step" in opt.state.get(_changed_param(opt), {})


def _has_group_key(*keys):
    return lambda entry, opt: all(k in opt.param_groups[0] for k in keys)


def _data_swap(shape, seed):
    def apply(opt, params, saved):
        params[0].data = _values(shape(params[0]), seed, params[0].device, params[0].dtype)
    return apply


def _add_group(opt, params, saved):
    p = _values((3,), 11, params[0].device).requires_grad_()
    opt.add_param_group({"params": [p], "lr": 0.02})


def _replace_params(opt, params, saved):
    g = opt.param_groups[0]
    g["params"] = [g["params"][1], _values((2, 2), 12, params[0].device).requires_grad_()]  # drops params[1]


def _replace_param_in_place(opt, params, saved):
    opt.param_groups[0]["params"][0] = _values((5,), 13, params[0].device).requires_grad_()


def _move_param_between_groups(opt, params, saved):
    g0, g1 = opt.param_groups[0]["params"], opt.param_groups[1]["params"]
    g0[1], g1[0] = g1[0], g0[1]  # in place: the lists stay the same objects


def _reassign_state(opt, params, saved):
    opt.state = collections.defaultdict(dict)


def _state_dict_with_scaled_buffers(opt, params, saved):
    sd = copy.deepcopy(saved["own"])
    for s in sd["state"].values():
        for key, value in s.items():
            if key != "step":
                value.mul_(0.5)
    opt.load_state_dict(sd)


def _flip(key):
    return _set_group(key, lambda v, device: not v)


MUTATIONS = (
    # the table
    Mutation("state_clear", lambda opt, params, saved: opt.state.clear()),
    Mutation("state_entry_reset", lambda opt, params, saved: opt.state.__setitem__(params[0], {})),
    Mutation("state_entry_deleted", lambda opt, params, saved: opt.state.pop(params[0]), _has_state),
    Mutation("state_reassigned", _reassign_state),
    Mutation("buffers_replaced", _set_buffers(lambda t, p: torch.full_like(t, 0.5)), _has_buffers),
    Mutation("first_buffer_replaced", lambda opt, params, saved: opt.state[params[0]].__setitem__(
        _buffers(opt, params[0])[0], torch.ones_like(params[0])), _has_buffers),
    Mutation("step_replaced", lambda opt, params, saved: opt.state[params[0]].__setitem__(
        "step", torch.tensor(100.0)), _has_step),
    # torch raises for a number `step`, except in single-tensor ASGD: there `step_t += 1` rebinds a local, so the
    # stored step stays 50 and eta/mu are computed from step 51 forever (its foreach path raises). fusedopt raises
    # for every algorithm rather than freeze the step.
    Mutation("step_replaced_as_number", lambda opt, params, saved: opt.state[params[0]].__setitem__(
        "step", 50), _has_step, rejected=lambda entry: entry.name == "asgd"),
    Mutation("step_deleted", lambda opt, params, saved: opt.state[params[0]].pop("step"), _has_step),
    Mutation("buffer_deleted", lambda opt, params, saved: opt.state[params[0]].pop(
        _buffers(opt, params[0])[0]), _has_buffers),
    Mutation("buffer_set_to_none", lambda opt, params, saved: opt.state[params[0]].__setitem__(
        "momentum_buffer", None), lambda entry, opt: entry.name == "sgd" and _has_buffers(entry, opt)),
    Mutation("buffer_wrong_shape", _set_buffers(lambda t, p: torch.zeros(7, device=p.device)), _has_buffers),
    Mutation("buffer_wrong_shape_same_numel", _set_buffers(lambda t, p: torch.zeros(3, 2, device=p.device)),
             _has_buffers),
    Mutation("buffer_wrong_dtype", _set_buffers(lambda t, p: t.double()), _has_buffers, rejected=True),
    Mutation("buffer_wrong_device", _set_buffers(lambda t, p: t.to(_other_device(p.device))), _has_buffers,
             needs_cuda=True, rejected=True),
    # in-place changes to a state tensor: same object, so only the kernels' per-step reads can see them
    Mutation("buffers_zeroed_in_place", _set_buffers(lambda t, p: t.zero_()), _has_buffers),
    Mutation("buffers_data_swapped", _set_buffers(lambda t, p: setattr(t, "data", torch.full_like(t, 0.25)) or t),
             _has_buffers),
    Mutation("buffer_data_wrong_shape", _set_buffers(
        lambda t, p: setattr(t, "data", torch.zeros(7, device=p.device)) or t), _has_buffers),
    Mutation("step_modified_in_place", lambda opt, params, saved: opt.state[params[0]]["step"].fill_(40),
             _has_step),
    # params and grads
    Mutation("param_data_same_shape", _data_swap(lambda p: p.shape, 21)),
    Mutation("param_data_other_shape", _data_swap(lambda p: (7,), 22)),
    Mutation("param_data_same_numel", _data_swap(lambda p: (3, 2), 23)),
    Mutation("requires_grad_off", lambda opt, params, saved: params[0].requires_grad_(False)),
    Mutation("grad_none_then_back", lambda opt, params, saved: None, grad_missing=lambda t, i: i == 0 and
             t == STEPS_BEFORE),
    Mutation("grad_none_every_other", lambda opt, params, saved: None, grad_missing=lambda t, i: i != 1 and t % 2),
    # hyperparameters and options
    Mutation("lr_float", _set_group("lr", lambda v, device: 0.5 * float(v))),
    Mutation("lr_tensor", _set_group("lr", lambda v, device: torch.tensor(0.5 * float(v), device=device))),
    Mutation("lr_tensor_float64", _set_group("lr", lambda v, device: torch.tensor(
        0.5 * float(v), dtype=torch.float64, device=device))),
    Mutation("weight_decay_float", _set_group("weight_decay", lambda v, device: 0.03),
             _has_group_key("weight_decay")),
    Mutation("weight_decay_tensor", _set_group("weight_decay", lambda v, device: torch.tensor(0.03)),
             _has_group_key("weight_decay")),
    Mutation("betas_float", _set_group("betas", lambda v, device: (0.7, 0.8)), _has_group_key("betas")),
    Mutation("betas_tensor", _set_group("betas", lambda v, device: (torch.tensor(0.7), torch.tensor(0.8))),
             _has_group_key("betas")),
    Mutation("momentum_changed", _set_group("momentum", lambda v, device: 0.5), _has_group_key("momentum")),
    Mutation("amsgrad_toggled", _flip("amsgrad"), _has_group_key("amsgrad")),
    Mutation("centered_toggled", _flip("centered"), _has_group_key("centered")),
    Mutation("maximize_toggled", _flip("maximize"), _has_group_key("maximize")),
    # param groups
    Mutation("param_group_added", _add_group),
    Mutation("group_params_replaced", _replace_params),
    Mutation("group_params_reordered_new_list", lambda opt, params, saved: opt.param_groups[0].__setitem__(
        "params", opt.param_groups[0]["params"][::-1])),
    Mutation("group_params_as_tuple", lambda opt, params, saved: opt.param_groups[0].__setitem__(
        "params", tuple(opt.param_groups[0]["params"]))),
    Mutation("group_params_reversed_in_place", lambda opt, params, saved: opt.param_groups[0]["params"].reverse()),
    Mutation("group_param_replaced_in_place", _replace_param_in_place),
    Mutation("param_moved_between_groups", _move_param_between_groups),
    # state dicts
    # (deep copies: torch's load_state_dict keeps the tensors it is given when dtype and device already match)
    Mutation("load_own_earlier_state_dict", lambda opt, params, saved: opt.load_state_dict(
        copy.deepcopy(saved["own"]))),
    Mutation("load_torch_state_dict", lambda opt, params, saved: opt.load_state_dict(copy.deepcopy(saved["torch"]))),
    Mutation("load_state_dict_scaled_buffers", _state_dict_with_scaled_buffers),
)


def _cases():
    out = []
    for entry in ENTRIES:
        for opt_id in entry.representative:
            for m in MUTATIONS:
                marks = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type (CUDA)")
                         ] if m.needs_cuda else []
                out.append(pytest.param(entry, opt_id, m, id=f"{entry.name}-{opt_id}-{m.id}", marks=marks))
    return out


# --------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------
class Run:
    """One optimizer over the problem; grads are drawn per step for whatever params its groups hold."""

    def __init__(self, cls, entry, opt_id, device, dtype=DTYPE, long_plan=False):
        self.problem = Problem(LONG_SPECS if long_plan else SPECS, device, seed=31)
        self.params = self.problem.params(dtype)
        kwargs = dict(entry.option_sets[opt_id])
        if cls is entry.torch_cls and "foreach" in inspect.signature(cls).parameters:
            # torch's for-loop implementation, the reference on every device: its CUDA default (foreach) rejects
            # tensor betas, which the for-loop implementation and fusedopt accept (fusedopt.references' classes
            # are for-loops only)
            kwargs["foreach"] = False
        groups = self.problem.param_arg(self.params, entry.group_overrides[1:])
        if long_plan:  # params[0] last in its group (compared by identity: `in` would compare values)
            first = self.params[0]
            for group in groups:
                if any(p is first for p in group["params"]):
                    group["params"] = [p for p in group["params"] if p is not first] + [first]
        self.opt = cls(groups, **kwargs)

    def all_params(self):
        """The original params, then any a change added, without duplicates, in a deterministic order."""
        seen, out = set(), []
        for p in self.params + [p for g in self.opt.param_groups for p in g["params"]]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def set_grads(self, t, mutation):
        for i, p in enumerate(self.all_params()):
            p.grad = None if mutation.grad_missing(t, i) else _values(p.shape, 1000 * t + i, p.device, p.dtype)

    def step(self, t, mutation):
        self.set_grads(t, mutation)
        self.opt.step()


def _snapshot(run):
    return [bits(p).clone() for p in run.all_params()], clone_state(run.opt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry,opt_id,mutation", _cases())
def test_mutation_between_steps(entry, opt_id, mutation, device):
    _check_mutation(entry, opt_id, mutation, device, DTYPE)


# Complex params and states reach the kernels through real views: `.data = ...` must not leave them stale.
COMPLEX_MUTATIONS = ("state_clear", "buffers_replaced", "buffers_data_swapped", "param_data_same_shape",
                     "param_data_other_shape", "step_replaced")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutation", [m for m in MUTATIONS if m.id in COMPLEX_MUTATIONS], ids=lambda m: m.id)
@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in ENTRIES])
def test_mutation_between_steps_complex(entry, mutation, device):
    _check_mutation(entry, entry.representative[-1], mutation, device, torch.complex64)


# The changes to the objects a step reaches per param (its grad, state dict, state tensors, data).
LONG_PLAN_MUTATIONS = ("state_entry_reset", "buffers_replaced", "buffers_data_swapped", "buffer_wrong_dtype",
                       "step_replaced", "param_data_same_shape", "param_data_other_shape", "requires_grad_off",
                       "grad_none_then_back")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutation", [m for m in MUTATIONS if m.id in LONG_PLAN_MUTATIONS], ids=lambda m: m.id)
@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in ENTRIES])
def test_mutation_deep_in_a_long_plan(entry, mutation, device):
    _check_mutation(entry, entry.representative[0], mutation, device, DTYPE, long_plan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry,opt_id", [pytest.param(e, o, id=f"{e.name}-{o}") for e in ENTRIES
                                          for o in e.representative])
def test_unchanged_steps_reuse_the_plan(entry, opt_id, device):
    """The check must not mistake an unchanged optimizer for a changed one (a rebuild every step would be
    exact but slow): the plan of the first step serves the next ones."""
    run = Run(entry.fused_cls, entry, opt_id, device)
    run.step(0, MUTATIONS[0])
    plan = run.opt._plan
    for t in range(1, 4):
        run.step(t, MUTATIONS[0])
        assert run.opt._plan is plan, f"step {t} rebuilt the launch plan of an unchanged optimizer"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry,opt_id", [pytest.param(e, o, id=f"{e.name}-{o}") for e in ENTRIES
                                          for o in e.representative])
def test_replaced_and_restored_entry_keeps_the_plan_and_later_changes_are_seen(entry, opt_id, device):
    """Replacing a state entry and putting the original back changes its dict (CPython's dict version tag moves,
    which the guard reads before walking a dict) but not what the dict holds: the plan is kept. A buffer replaced
    at a later step is still found, and the steps match torch.optim's throughout."""
    fused, ref = Run(entry.fused_cls, entry, opt_id, device), Run(entry.torch_cls, entry, opt_id, device)
    runs = (fused, ref)
    for t in range(2):
        for run in runs:
            run.step(t, MUTATIONS[0])
    keys = _buffers(fused.opt, _changed_param(fused.opt))
    if not keys:
        pytest.skip(f"{entry.torch_cls.__name__}({opt_id}) keeps no state buffer")
    plan = fused.opt._plan
    for run in runs:
        state = run.opt.state[_changed_param(run.opt)]
        original = state[keys[0]]
        state[keys[0]] = torch.zeros_like(original)
        state[keys[0]] = original
        run.step(2, MUTATIONS[0])
    assert fused.opt._plan is plan, "a state entry replaced and restored rebuilt the launch plan"
    for run in runs:
        state = run.opt.state[_changed_param(run.opt)]
        state[keys[0]] = torch.full_like(state[keys[0]], 0.5)
    for t in range(3, 6):
        for run in runs:
            run.step(t, MUTATIONS[0])
        assert_matches(fused.opt, fused.all_params(), ref.opt, ref.all_params(), **TOLERANCES[torch.float32])


def _check_mutation(entry, opt_id, mutation, device, dtype, long_plan=False):
    fused = Run(entry.fused_cls, entry, opt_id, device, dtype, long_plan)
    ref = Run(entry.torch_cls, entry, opt_id, device, dtype, long_plan)
    saved = {}
    for t in range(STEPS_BEFORE):
        for run in (fused, ref):
            run.step(t, mutation)
        if t == 0:
            saved = {"own_fused": copy.deepcopy(fused.opt.state_dict()), "torch": copy.deepcopy(ref.opt.state_dict())}
    if not mutation.applies(entry, ref.opt):
        pytest.skip(f"{mutation.id} does not apply to {entry.torch_cls.__name__}({opt_id})")
    mutation.apply(fused.opt, fused.params, {"own": saved["own_fused"], "torch": saved["torch"]})
    mutation.apply(ref.opt, ref.params, {"own": saved["torch"], "torch": saved["torch"]})

    tol = TOLERANCES[torch.float32]  # complex64: float32 real and imaginary parts
    for t in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
        ref.set_grads(t, mutation)
        try:
            ref.opt.step()
        except Exception as error:  # noqa: BLE001 - whatever torch raises, fusedopt must raise too
            _assert_raises_untouched(fused, t, mutation, type(error))
            return
        if mutation.rejects(entry):
            _assert_raises_untouched(fused, t, mutation, RuntimeError)
            return
        fused.step(t, mutation)
        assert_matches(fused.opt, fused.all_params(), ref.opt, ref.all_params(), **tol)


def _assert_raises_untouched(fused, t, mutation, error_type):
    fused.set_grads(t, mutation)
    params_before, state_before = _snapshot(fused)
    with pytest.raises(error_type):
        fused.opt.step()
    changed = [i for i, (p, b) in enumerate(zip(fused.all_params(), params_before)) if not torch.equal(bits(p), b)]
    assert not changed, f"params {changed} were written by the step that raised"
    assert_state_identical(fused.opt, state_before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry,opt_id", [pytest.param(e, o, id=f"{e.name}-{o}") for e in ENTRIES
                                          for o in e.representative])
def test_unusable_state_error_names_param_and_key(entry, opt_id, device):
    """The error for a state buffer that does not match its param says which param (group, position) and key."""
    run = Run(entry.fused_cls, entry, opt_id, device)
    run.step(0, MUTATIONS[0])
    param = _changed_param(run.opt)
    keys = _buffers(run.opt, param)
    if not keys:
        pytest.skip(f"{entry.torch_cls.__name__}({opt_id}) keeps no state buffer")
    run.opt.state[param][keys[-1]] = torch.zeros(param.numel() + 1, device=param.device)
    with pytest.raises(RuntimeError, match=rf"state\['{keys[-1]}'\] of param_groups\[1\]\['params'\]\[0\] is "):
        run.step(1, MUTATIONS[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in ENTRIES])
def test_lazy_clones_keep_their_values(entry, device):
    """A lazy clone (copy-on-write) of a param or of a state buffer shares its memory until one of the two is
    written: the step must give the optimizer's tensor a copy of its own, as torch's in-place ops do, and leave
    the clone's values as they were; a lazily cloned grad is only read."""
    if not hasattr(torch, "_lazy_clone"):
        pytest.skip("this torch has no copy-on-write tensors (torch._lazy_clone)")
    opt_id = entry.representative[0]
    fused = Run(entry.fused_cls, entry, opt_id, device)
    ref = Run(entry.torch_cls, entry, opt_id, device)
    for t in range(STEPS_BEFORE):
        for run in (fused, ref):
            run.step(t, MUTATIONS[0])
    param = _changed_param(fused.opt)
    names = ["the param", *_buffers(fused.opt, param)]
    sources = [param] + [fused.opt.state[param][key] for key in names[1:]]
    for t in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
        clones = [torch._lazy_clone(source) for source in sources]
        values = [bits(clone).clone() for clone in clones]
        for run in (fused, ref):
            run.set_grads(t, MUTATIONS[0])
        grad_clone = torch._lazy_clone(param.grad)
        fused.opt.step()
        ref.opt.step()
        assert_matches(fused.opt, fused.all_params(), ref.opt, ref.all_params(), **TOLERANCES[DTYPE])
        for name, clone, value in zip(names, clones, values):
            assert torch.equal(bits(clone), value), f"step {t} wrote through a lazy clone of {name}"
        assert torch.equal(grad_clone, param.grad)
