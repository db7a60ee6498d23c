"""Guards the registry rows of RAdam, ASGD and Rprop: their option sets reach the branches they are there for,
within the STEPS steps of a numeric comparison. Runs the reference classes only (no fusedopt kernel)."""
import pytest
import torch

from conftest import STEPS, Problem
from registry import ENTRY_BY_NAME


def _run(entry, kwargs, steps=STEPS):
    """STEPS steps of the reference on a 3-group problem; yields (step, param, group, state) after each."""
    problem = Problem("groups", "cpu", seed=11)
    params = problem.params(torch.float32)
    opt = entry.torch_cls(problem.param_arg(params, entry.group_overrides), **kwargs)
    for t in range(steps):
        problem.set_grads(params, t)
        opt.step()
        for group in opt.param_groups:
            for p in group["params"]:
                if p in opt.state:
                    yield t + 1, p, group, opt.state[p]


def _rectified(group, step):
    """torch.optim.RAdam's branch test: rho_t > 5."""
    beta2 = group["betas"][1]
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf - 2 * step * beta2**step / (1 - beta2**step) > 5.0


@pytest.mark.parametrize("opt_id", ["defaults", "all_options"])
def test_radam_representative_sets_take_both_branches_early(opt_id):
    entry = ENTRY_BY_NAME["radam"]
    kwargs = entry.option_sets[opt_id]
    branches = {_rectified(group, int(state["step"])) for step, _, group, state in _run(entry, kwargs, steps=10)}
    assert branches == {False, True}


def test_radam_never_rectified_set():
    entry = ENTRY_BY_NAME["radam"]
    groups = {id(group): group for _, _, group, _ in _run(entry, entry.option_sets["never_rectified"], steps=1)}
    assert all(2 / (1 - g["betas"][1]) - 1 <= 5 for g in groups.values())


@pytest.mark.parametrize("opt_id", ["t0", "all_options"])
def test_asgd_small_t0_reaches_averaging(opt_id):
    entry = ENTRY_BY_NAME["asgd"]
    mus = [float(state["mu"]) for _, _, _, state in _run(entry, entry.option_sets[opt_id])]
    assert any(mu != 1.0 for mu in mus) and any(mu == 1.0 for mu in mus)


@pytest.mark.parametrize("opt_id", ["step_sizes", "all_options"])
def test_rprop_step_sizes_hit_both_clamps(opt_id):
    entry = ENTRY_BY_NAME["rprop"]
    at_min = at_max = 0
    for _, _, group, state in _run(entry, entry.option_sets[opt_id]):
        low, high = group["step_sizes"]
        at_min += int((state["step_size"] == low).sum())
        at_max += int((state["step_size"] == high).sum())
    assert at_min > 0 and at_max > 0
