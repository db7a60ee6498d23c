"""Validation: constructor errors identical to torch.optim's, and bad grads rejected without side effects."""
import dataclasses
import inspect

import pytest
import torch

from conftest import (
    DEVICES,
    SHAPE_SETS,
    TOLERANCES,
    Problem,
    assert_matches,
    assert_state_identical,
    bits,
    clone_state,
    train,
)
from registry import ENTRIES, ERROR_CASES, entry_params, option_params

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type (CUDA)")


@pytest.mark.parametrize("entry,case", [pytest.param(e, c, id=f"{e.name}-{c.id}") for e, c in ERROR_CASES])
def test_invalid_arguments_raise_like_torch(entry, case):
    p = torch.zeros(3, requires_grad=True)
    params = case.make_params(p) if case.make_params else [p]
    with pytest.raises(Exception) as info:
        entry.fused_cls(params, **case.kwargs)
    assert type(info.value) is case.exc_type, f"raised {type(info.value).__name__}: {info.value}"
    info.match(case.match)


@pytest.mark.parametrize("entry", entry_params())
def test_differentiable_raises(entry):
    # a non-leaf param, as differentiable=True is used (torch.optim steps it fine): the RuntimeError must
    # come from fusedopt refusing the option, not from an in-place update of a leaf that requires grad
    p = torch.randn(3, requires_grad=True).clone()
    with pytest.raises(RuntimeError):  # at construction or at the first step
        opt = entry.fused_cls([p], differentiable=True)
        p.grad = torch.ones(3)
        opt.step()


def _ignored_flag_cases():
    cases = []
    for e in ENTRIES:
        names = inspect.signature(e.torch_cls.__init__).parameters
        for flag in ("foreach", "fused", "capturable"):
            if flag in names:  # only the flags torch's constructor has
                for value in (True, False, None):
                    cases.append(pytest.param(e, flag, value, id=f"{e.name}-{flag}={value}"))
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry,flag,value", _ignored_flag_cases())
def test_ignored_flags_are_accepted(entry, flag, value, device):
    """foreach/fused/capturable are accepted and change nothing: same result as torch's default path."""
    kwargs = entry.option_sets[entry.representative[-1]]
    problem = Problem("groups", device, seed=7)
    fp, rp = problem.params(torch.float32), problem.params(torch.float32)
    fused = entry.fused_cls(problem.param_arg(fp, entry.group_overrides), **kwargs, **{flag: value})
    ref = entry.torch_cls(problem.param_arg(rp, entry.group_overrides), **kwargs)
    train(fused, problem, fp, 0, 10)
    train(ref, problem, rp, 0, 10)
    assert_matches(fused, fp, ref, rp, **TOLERANCES[torch.float32])


# --------------------------------------------------------------------------------------------------
# Bad grads: step() must raise and leave params and state bit-identical
# --------------------------------------------------------------------------------------------------
BAD_PARAM = 4  # the (2, 5) param in the last group of the "groups" set: earlier params/groups are valid
# every param has a grad at every step, so the failing step has the same params-with-grads as the steps
# before it (an implementation that caches per-step work must still validate)
SPECS = tuple(dataclasses.replace(s, grad="always") for s in SHAPE_SETS["groups"])


def _bad_grad(kind, p):
    if kind == "sparse":
        return torch.randn(p.shape, device=p.device).to_sparse()
    if kind == "wrong_numel":
        return torch.randn(3, 3, device=p.device)
    if kind == "wrong_shape_same_numel":  # (5, 2) for (2, 5): a numel-only check would accept it
        return torch.randn(tuple(reversed(p.shape)), device=p.device)
    if kind == "flattened":
        return torch.randn(p.numel(), device=p.device)
    if kind == "wrong_dtype":
        return torch.randn(p.shape, device=p.device, dtype=torch.float64)
    if kind == "wrong_device":
        return torch.randn(p.shape, device="cpu" if p.is_cuda else "cuda")
    raise ValueError(kind)


BAD_GRAD_KINDS = [
    "sparse",
    "wrong_numel",
    "wrong_shape_same_numel",
    "flattened",
    "wrong_dtype",
    pytest.param("wrong_device", marks=needs_cuda),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", BAD_GRAD_KINDS)
@pytest.mark.parametrize("entry,opt_id", option_params(representative_only=True))
def test_bad_grad_raises_without_side_effects(entry, opt_id, kind, device):
    """With the defaults, the last group's overrides select another kernel variant than the first groups'
    (amsgrad, momentum, centered...), so a step may need several launches: none may run before the bad grad
    is found."""
    kwargs = entry.option_sets[opt_id]
    problem = Problem(SPECS, device, seed=8)
    fp, rp = problem.params(torch.float32), problem.params(torch.float32)
    fused = entry.fused_cls(problem.param_arg(fp, entry.group_overrides), **kwargs)
    ref = entry.torch_cls(problem.param_arg(rp, entry.group_overrides), **kwargs)
    train(fused, problem, fp, 0, 3)  # warm: every algorithm has state by now
    train(ref, problem, rp, 0, 3)

    problem.set_grads(fp, 3)
    bad = _bad_grad(kind, fp[BAD_PARAM])
    if kind == "sparse":
        fp[BAD_PARAM].grad = bad  # the grad setter allows sparse grads
    else:
        fp[BAD_PARAM].grad.data = bad  # bypasses the setter's checks, as a buggy hook or kernel could
    assert fp[BAD_PARAM].grad is not None and fp[BAD_PARAM].grad.shape == bad.shape
    params_before = [bits(p).clone() for p in fp]
    state_before = clone_state(fused)
    # TORCH_CHECK and friends raise RuntimeError / ValueError / TypeError / IndexError; anything else
    # (AttributeError, segfault...) means the input was not validated
    with pytest.raises(RuntimeError if kind == "sparse" else (RuntimeError, ValueError, TypeError, IndexError)):
        fused.step()
    changed = [i for i, (p, before) in enumerate(zip(fp, params_before)) if not torch.equal(bits(p), before)]
    assert not changed, f"params {changed} were modified by the failed step"
    assert_state_identical(fused, state_before)

    # still usable afterwards, and the failed step left no trace (e.g. no step-counter increment)
    fp[BAD_PARAM].grad = None
    train(fused, problem, fp, 3, 6)
    train(ref, problem, rp, 3, 6)
    assert_matches(fused, fp, ref, rp, **TOLERANCES[torch.float32])
