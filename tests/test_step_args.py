"""What a call changes travels beside the step table (StepArgs, by value), never in it: the phases, GradScaler's
tensors, max_grad_norm and the schedule to advance leave the table as it was, and a float hyperparameter that
changes every step rewrites only the group entries (issues 8 and 13). Also: a NaN grad under clipping without a
scaler behaves as torch's clip_grad_norm_ (the factor is NaN). CPU always; CUDA through conftest.DEVICES."""
import math
from types import SimpleNamespace

import pytest
import torch

import fusedopt
from fusedopt import _ops

from conftest import DEVICES


def _layout():
    """(header words, words per tensor entry, words per group entry), from table_words alone."""
    empty = _ops.table_words(0, 0)  # header + the chunk map's closing word
    return empty - 1, _ops.table_words(1, 0) - empty - 1, _ops.table_words(0, 1) - empty


def _optimizer(device, **kwargs):
    generator = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=generator).to(device).requires_grad_() for s in ((5,), (70000,), (3, 4))]
    optimizer = fusedopt.FusedAdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], lr=0.01,
                                    **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    return optimizer, params


def _scaler(device):
    scaler = torch.amp.GradScaler(device, init_scale=4.0)
    scaler.scale(torch.ones((), device=device))
    return scaler


@pytest.mark.parametrize("device", DEVICES)
def test_per_call_values_leave_the_table_unchanged(device):
    optimizer, _ = _optimizer(device, max_grad_norm=1.0)
    optimizer.step()  # phases: reduce + update + reset, no scaler
    launch = optimizer._plan.launches[0]
    table = launch.host_table.clone()
    scaler = _scaler(device)
    scaler.step(optimizer)  # the scaler's scale and found_inf tensors
    scaler.update()
    assert torch.equal(table, launch.host_table), "GradScaler's per-call tensors were written into the table"
    optimizer.max_grad_norm = 3.0
    optimizer.step()
    assert torch.equal(table, launch.host_table), "max_grad_norm was written into the table"
    optimizer.max_grad_norm = None
    optimizer.step()  # phases: update only
    assert torch.equal(table, launch.host_table), "the phases were written into the table"
    assert optimizer._plan.launches[0] is launch


@pytest.mark.parametrize("device", DEVICES)
def test_a_changing_float_lr_rewrites_only_the_group_entries(device):
    optimizer, params = _optimizer(device)
    optimizer.step()
    launch = optimizer._plan.launches[0]
    header, tensor_words, group_words = _layout()
    groups_begin = header + len(params) * tensor_words
    groups_end = groups_begin + len(optimizer.param_groups) * group_words
    for step in range(3):
        before = launch.host_table.clone()
        optimizer.param_groups[1]["lr"] = 0.02 * (0.9 ** (step + 1))
        optimizer.step()
        changed = (before != launch.host_table).nonzero().flatten().tolist()
        assert changed, "the new lr did not reach the table"
        assert all(groups_begin <= i < groups_end for i in changed), \
            f"a lr change rewrote words {changed} outside the group entries [{groups_begin}, {groups_end})"
        assert optimizer._plan.launches[0] is launch


def test_the_step_ops_take_every_per_call_value_as_an_argument():
    # The schema is the contract: the per-call values are arguments, and the table is only read or rewritten
    # by the host, so a captured call keeps what it was given.
    schema = str(torch.ops.fusedopt.adam_.default._schema)
    for name in ("grad_scale", "skip_if", "found_inf", "grad_stats", "max_grad_norm", "phases", "schedule_lrs"):
        assert f" {name}" in schema, schema


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kwargs", [("FusedSGD", dict(lr=0.1, momentum=0.9)), ("FusedAdam", dict(lr=0.01))])
def test_nan_grad_with_clipping_and_no_scaler_matches_clip_grad_norm(device, name, kwargs):
    """torch's clip_grad_norm_ multiplies every grad by a NaN factor when the norm is NaN, so every param
    becomes NaN; fusedopt's in-step clipping does the same (it does not clip the other tensors by 1)."""
    generator = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=generator) for s in ((7,), (40000,), (2, 3))]
    fused_params = [t.clone().to(device).requires_grad_() for t in init]
    ref_params = [t.clone().to(device).requires_grad_() for t in init]
    fused = getattr(fusedopt, name)(fused_params, max_grad_norm=1.0, **kwargs)
    ref = getattr(torch.optim, name.removeprefix("Fused"))(ref_params, **kwargs)
    for t in range(2):
        grads = [torch.randn(p.shape, generator=generator).to(device) for p in fused_params]
        if t == 1:
            grads[1][123] = math.nan
        for fp, rp, g in zip(fused_params, ref_params, grads):
            fp.grad, rp.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref.step()
        fused.step()
    assert math.isnan(float(norm))
    for i, (fp, rp) in enumerate(zip(fused_params, ref_params)):
        assert torch.isnan(rp).all(), "the reference is not the case this test is about"
        assert torch.isnan(fp).all(), f"param {i}: a NaN grad norm must make every update NaN, as in torch"


REDUCE, UPDATE, RESET = 1, 2, 4  # StepPhase in csrc/step_table.h


class _Plan:  # what _calls reads of a plan, as _Plan.add_launches builds it (test_plan_indexes_its_launches)
    launches_by_device = {"gpu0": ["a", "b"], "gpu1": ["c"]}
    no_scaling = {"gpu0": (None, None, None), "gpu1": (None, None, None)}
    update_calls = [("a", UPDATE), ("b", UPDATE), ("c", UPDATE)]


NO_SCALER = _Plan.no_scaling


def test_plan_indexes_its_launches():
    """A plan's launches by device (in first-seen order), and the usual step's scaling and calls built once."""
    launches = [SimpleNamespace(device=device) for device in ("gpu0", "gpu1", "gpu0")]
    plan = fusedopt.optimizer._Plan.__new__(fusedopt.optimizer._Plan)
    plan.launches_by_device = {}
    plan.add_launches(launches)
    assert plan.launches_by_device == {"gpu0": [launches[0], launches[2]], "gpu1": [launches[1]]}
    assert plan.no_scaling == {"gpu0": (None, None, None), "gpu1": (None, None, None)}
    assert plan.update_calls == [(launches[0], UPDATE), (launches[2], UPDATE), (launches[1], UPDATE)]


def _call_order(optimizer, plan, scaling, monkeypatch):
    events = []
    monkeypatch.setattr(optimizer, "_share_grad_stats", lambda devices: events.append(("share", tuple(devices))))
    for launch, phases in optimizer._calls(plan, scaling):
        events.append((launch, phases))
    return events


def test_clipping_over_several_devices_reduces_everywhere_before_any_update(monkeypatch):
    """The global norm over devices: every launch on every device reduces, the sums are shared, then every
    launch updates (the last one per device zeroing its grad_stats)."""
    optimizer = fusedopt.FusedAdamW([torch.zeros(1, requires_grad=True)], max_grad_norm=1.0)
    assert _call_order(optimizer, _Plan, NO_SCALER, monkeypatch) == [
        ("a", REDUCE), ("b", REDUCE), ("c", REDUCE), ("share", ("gpu0", "gpu1")),
        ("a", UPDATE), ("b", UPDATE | RESET), ("c", UPDATE | RESET)]


def test_launch_phases_per_device(monkeypatch):
    """Without clipping or an in-step scaler check every launch just updates; with an in-step scaler each
    device decides alone (one launch: reduce + update together; several: all reduce, then all update)."""
    optimizer = fusedopt.FusedAdamW([torch.zeros(1, requires_grad=True)])
    assert _call_order(optimizer, _Plan, NO_SCALER, monkeypatch) == [("a", UPDATE), ("b", UPDATE), ("c", UPDATE)]
    # a scaler whose verdict came before the step (GradScaler's newer contract) needs no statistics either
    verdict_given = {device: ("scale", "found_inf", None) for device in _Plan.launches_by_device}
    assert _call_order(optimizer, _Plan, verdict_given, monkeypatch) == [("a", UPDATE), ("b", UPDATE), ("c", UPDATE)]
    in_step_scaler = {device: ("scale", None, "found_inf") for device in _Plan.launches_by_device}
    assert _call_order(optimizer, _Plan, in_step_scaler, monkeypatch) == [
        ("a", REDUCE), ("b", REDUCE), ("a", UPDATE), ("b", UPDATE | RESET), ("c", REDUCE | UPDATE | RESET)]
