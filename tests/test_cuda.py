"""CUDA-only guarantees: one kernel launch per step, no host synchronization, CUDA-graph capturability.
(Numerics on CUDA run in the other files through the DEVICES list.)"""
import inspect
import random

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from conftest import STEPS, TOLERANCES, PSpec, Problem, assert_matches, train
from registry import entry_params, option_params

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _many_specs(n=1200):
    """n tensors (assorted sizes, some 1-element and some over 65536 elements) in 3 param groups."""
    rng = random.Random(99)
    specs = [PSpec((70001,), group=0), PSpec((300, 300), group=1)]
    while len(specs) < n:
        shape = rng.choice([(), (1,), (rng.randint(1, 3000),), (rng.randint(1, 64), rng.randint(1, 64))])
        specs.append(PSpec(shape, group=len(specs) % 3))
    return tuple(specs)


MANY = _many_specs()


def _gpu_activities(fn):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]


@cuda_only
@pytest.mark.parametrize("entry,opt_id", option_params(representative_only=True))
def test_one_kernel_launch_per_step(entry, opt_id):
    x = torch.zeros(8, device="cuda")
    calibration = _gpu_activities(lambda: x.add_(1))
    assert len(calibration) == 1, f"the profiler does not see kernels as expected: {calibration}"

    problem = Problem(MANY, "cuda", seed=10)
    params = problem.params(torch.float32)
    # 3 groups that differ in lr only: options that select another compiled kernel variant (amsgrad,
    # momentum, centered...) may legitimately need another launch
    opt = entry.fused_cls(problem.param_arg(params, ({"lr": 0.0123}, {"lr": 0.00456})), **entry.option_sets[opt_id])
    # Steady state: the grads stay the same tensors (zero_grad(set_to_none=False), DDP buckets), refilled
    # before each step; warm-up steps do state allocation and any one-time setup.
    for p in params:
        p.grad = torch.zeros_like(p)
    for t in range(4):
        for p, g in zip(params, problem.grads(t, torch.float32)):
            p.grad.copy_(g)
        if t < 3:
            opt.step()
    activities = _gpu_activities(opt.step)
    assert len(activities) == 1, f"expected one kernel launch, got {len(activities)}: {activities[:20]}"
    assert not activities[0].lower().startswith(("memcpy", "memset")), activities


@cuda_only
@pytest.mark.parametrize("entry", entry_params())
def test_no_host_sync_in_training_loop(entry):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    opt = entry.fused_cls(model.parameters(), **entry.option_sets[entry.representative[-1]])
    x = torch.randn(16, 32, device="cuda")

    def iteration():
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: lazy state initialization may synchronize
        iteration()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode is live: a synchronizing call does raise
            torch.zeros(1, device="cuda").item()
        for _ in range(3):
            iteration()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@cuda_only
@pytest.mark.parametrize("lr_kind", ["float", "device_tensor"])
@pytest.mark.parametrize("entry,opt_id", option_params(representative_only=True))
def test_cuda_graph_capture_replays_like_eager(entry, opt_id, lr_kind):
    """A captured step() replayed N times equals N eager steps from the same start. With an lr tensor on the
    device, changing it in place between replays must take effect (the graph reads it, never a baked copy)."""
    kwargs = dict(entry.option_sets[opt_id])

    def make_kwargs():
        if lr_kind == "float":
            return kwargs
        lr = kwargs.get("lr", inspect.signature(entry.torch_cls.__init__).parameters["lr"].default)
        return dict(kwargs, lr=torch.tensor(lr, device="cuda"))

    specs = (PSpec((4097,)), PSpec((5, 7), layout="transposed", group=1), PSpec((1,), group=1),
             PSpec((33, 3), group=2), PSpec((), group=2))
    problem = Problem(specs, "cuda", seed=11)
    gp, ep = problem.params(torch.float32), problem.params(torch.float32)
    graphed = entry.fused_cls(problem.param_arg(gp, entry.group_overrides), **make_kwargs())
    eager = entry.fused_cls(problem.param_arg(ep, entry.group_overrides), **make_kwargs())
    static_grads = [torch.zeros_like(p) for p in gp]
    for p, g in zip(gp, static_grads):
        p.grad = g

    def load_grads(step):
        for s, g in zip(static_grads, problem.grads(step, torch.float32)):
            s.copy_(g)

    warmup = 3
    side = torch.cuda.Stream()  # warm-up on a side stream before capture, as torch.cuda.graph documents
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for t in range(warmup):
            load_grads(t)
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    train(eager, problem, ep, 0, warmup)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    torch.cuda.synchronize()
    assert_matches(graphed, gp, eager, ep, **TOLERANCES[torch.float32])  # capturing must not execute the step

    for t in range(warmup, STEPS):
        if t == STEPS // 2 and lr_kind == "device_tensor":
            for opt in (graphed, eager):
                opt.param_groups[0]["lr"].mul_(0.3)
        load_grads(t)
        graph.replay()
        problem.set_grads(ep, t)
        eager.step()
    torch.cuda.synchronize()
    assert_matches(graphed, gp, eager, ep, **TOLERANCES[torch.float32])
