"""The CUDA launch path by design (issue 13): steps captured in CUDA graphs own a snapshot of their table (an eager
step, a second graph or load_state_dict cannot change what a graph replays); several launches per step under
GradScaler + clipping, captured; per-kernel residency (a FusedSGD first, then kernels with fewer resident
blocks and more chunks than they fit); the two-launch fallback; fp16/bf16 under in-kernel unscaling and
clipping; misaligned grads; bitwise-deterministic clipping; side streams; a tensor over 2**31 elements; global
clipping over several devices. Each compared with torch.optim + torch's GradScaler and clip_grad_norm_.
Every test skips without a GPU."""
import math

import pytest
import torch

import fusedopt
from fusedopt import _ops, references

from conftest import TOLERANCES, assert_matches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SCALER_KWARGS = {"init_scale": 2.0**10, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3}
MAX_GRAD_NORM = 1.0  # the grads below have norms of 10-100: every step clips
# low-precision params: fusedopt rounds once per element from fp32 math, torch.optim per operation, so the
# two differ by a few ulps of the dtype per step
LOWP_TOLERANCE = {torch.float16: {"rtol": 1e-2, "atol": 1e-2}, torch.bfloat16: {"rtol": 5e-2, "atol": 6e-2}}


def _tolerance(dtypes):
    tolerance = dict(TOLERANCES[torch.float32])
    for dtype in dtypes:
        for key, value in LOWP_TOLERANCE.get(dtype, {}).items():
            tolerance[key] = max(tolerance[key], value)
    return tolerance


def _make_params(shapes, dtypes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator).to("cuda", dtypes[i % len(dtypes)]).requires_grad_()
            for i, s in enumerate(shapes)]


def _grads(params, t, scale=1.0, nonfinite=False):
    generator = torch.Generator().manual_seed(1000 + t)
    grads = [(torch.randn(p.shape, generator=generator) * scale).to("cuda", p.dtype) for p in params]
    if nonfinite:
        grads[t % len(grads)].view(-1)[0] = math.inf
    return grads


SHAPES = [(3,), (70001,), (300, 301), (1,), (4096,), (17, 5)]
MIXED = (torch.float32, torch.bfloat16)  # two launches on one device


def _scaled_step(opt, scaler):
    """opt.step(), through the GradScaler when there is one."""
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


def _scale_of(scaler):
    return scaler.get_scale() if scaler else 1.0


class _Fused:
    """fusedopt with in-step scaler and clipping; `static` grads (refilled in place) for graph capture."""

    def __init__(self, cls, kwargs, shapes, dtypes, scaler=True, max_grad_norm=MAX_GRAD_NORM):
        self.params = _make_params(shapes, dtypes)
        self.opt = cls(self.params, max_grad_norm=max_grad_norm, **kwargs)
        self.scaler = torch.amp.GradScaler("cuda", **SCALER_KWARGS) if scaler else None
        if self.scaler is not None:
            self.scaler.scale(torch.ones((), device="cuda"))
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def fill(self, grads):
        for p, g in zip(self.params, grads):
            p.grad.copy_(g)

    def step(self):
        _scaled_step(self.opt, self.scaler)

    def scale(self):
        return _scale_of(self.scaler)


class _Reference:
    """torch.optim: unscale_, clip_grad_norm_, scaler.step, update."""

    def __init__(self, cls, kwargs, shapes, dtypes, scaler=True, max_grad_norm=MAX_GRAD_NORM):
        self.params = _make_params(shapes, dtypes)
        if cls is references.LAMB:
            kwargs = {**kwargs, "max_grad_norm": None}  # clipped below, as for torch.optim: not twice
        self.opt = cls(self.params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.scaler = torch.amp.GradScaler("cuda", **SCALER_KWARGS) if scaler else None
        if self.scaler is not None:
            self.scaler.scale(torch.ones((), device="cuda"))

    def step_with(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        _scaled_step(self.opt, self.scaler)

    def scale(self):
        return _scale_of(self.scaler)


def _capture(fused):
    """Warm up on a side stream (torch.cuda.graph's recipe), then capture one step with new grad tensors (as
    zero_grad(set_to_none=True) and a backward would give), so the capture changes the table. The warm-up's
    grads stay alive filled with NaN: a launch that still read them would turn params NaN or skip forever."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused.step()  # grads are zero: an unclipped update that creates the state
    torch.cuda.current_stream().wait_stream(side)
    fused.stale_grads = [p.grad for p in fused.params]
    for p in fused.params:
        p.grad = torch.zeros_like(p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.step()
    for g in fused.stale_grads:
        g.fill_(float("nan"))
    return graph


ADAMW = (fusedopt.FusedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1))
SGD = (fusedopt.FusedSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9))
# per-tensor sums behind a second grid barrier (a third launch in the fallback)
LAMB = (fusedopt.FusedLAMB, references.LAMB, dict(lr=1e-2, weight_decay=0.1))


def _pair(spec, dtypes, shapes=SHAPES, scaler=True, max_grad_norm=MAX_GRAD_NORM):
    fused_cls, torch_cls, kwargs = spec
    return (_Fused(fused_cls, kwargs, shapes, dtypes, scaler, max_grad_norm),
            _Reference(torch_cls, kwargs, shapes, dtypes, scaler, max_grad_norm))


def _warm_reference(ref):
    """The reference version of _capture's warm-up step (zero grads, no clipping effect)."""
    ref.step_with([torch.zeros_like(p) for p in ref.params])


# ---- graphs ----

@pytest.mark.parametrize("spec", [ADAMW, SGD, LAMB], ids=["adamw", "sgd_momentum", "lamb"])
def test_capture_with_several_launches_scaler_and_clipping_matches_torch(spec):
    """fp32 + bf16 params: two launches per step, each reducing before either updates, captured in one graph.
    Replays clip (every step here), skip the steps with an inf grad and back the scale off, like torch."""
    fused, ref = _pair(spec, MIXED)
    graph = _capture(fused)
    _warm_reference(ref)
    for t in range(12):
        skipped = t in (4, 9)
        assert fused.scale() == ref.scale()
        grads = _grads(fused.params, t, scale=fused.scale(), nonfinite=skipped)
        fused.fill(grads)
        graph.replay()
        ref.step_with(grads)
    torch.cuda.synchronize()
    assert fused.scale() == ref.scale()
    steps = {float(s["step"]) for s in fused.opt.state.values() if "step" in s}
    assert steps in (set(), {11.0}), f"the replays advanced the step counters to {steps}, not by one per step"
    assert_matches(fused.opt, fused.params, ref.opt, ref.params, **_tolerance(MIXED))


def _replay_run(fused, graph, steps, eager_at=(), eager_same_grads_at=()):
    for t in range(steps):
        grads = _grads(fused.params, t, scale=fused.scale())
        if t in eager_same_grads_at:  # an eager step on the graph's own grad tensors
            fused.fill(grads)
            fused.step()
        elif t in eager_at:  # a ragged batch: new grad tensors, an eager step
            saved = [p.grad for p in fused.params]
            for p, g in zip(fused.params, grads):
                p.grad = g.clone()
            fused.step()
            for p, g in zip(fused.params, saved):
                p.grad = g
        else:
            fused.fill(grads)
            graph.replay()


def test_eager_steps_after_capture_do_not_change_what_the_graph_replays():
    """An eager step on the captured grads right after the capture (before the first replay: the eager device
    table must get what the capture changed), and eager steps with new grad tensors between replays: the
    eager steps use their own grads, the replays the graph's; all equals an all-eager run."""
    fused, _ = _pair(ADAMW, MIXED)
    graph = _capture(fused)
    _replay_run(fused, graph, 8, eager_at=(3, 4, 6), eager_same_grads_at=(0,))
    eager, _ = _pair(ADAMW, MIXED)
    eager.step()  # _capture's warm-up step
    for t in range(8):
        eager.fill(_grads(eager.params, t, scale=eager.scale()))
        eager.step()
    torch.cuda.synchronize()
    assert_matches(fused.opt, fused.params, eager.opt, eager.params, **TOLERANCES[torch.float32])


def test_two_graphs_of_one_optimizer_replay_their_own_tables():
    """Two captures of one optimizer with different grad tensors: each graph reads the grads it captured."""
    fused, _ = _pair(ADAMW, (torch.float32,), scaler=False)
    graph_a = _capture(fused)
    grads_a = [p.grad for p in fused.params]
    for p in fused.params:
        p.grad = torch.zeros_like(p)  # new grad tensors: the second capture's table differs
    graph_b = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph_b):
        fused.step()
    grads_b = [p.grad for p in fused.params]
    eager, _ = _pair(ADAMW, (torch.float32,), scaler=False)
    eager.step()
    for t in range(6):
        grads = _grads(fused.params, t)
        use_a = t % 2 == 0
        for target, g in zip(grads_a if use_a else grads_b, grads):
            target.copy_(g)
        for other in (grads_b if use_a else grads_a):
            other.fill_(float("nan"))  # a graph that read the other graph's grads would turn the params NaN
        (graph_a if use_a else graph_b).replay()
        eager.fill(grads)
        eager.step()
    torch.cuda.synchronize()
    assert_matches(fused.opt, fused.params, eager.opt, eager.params, **TOLERANCES[torch.float32])


def test_load_state_dict_after_capture_keeps_the_graph_valid():
    """load_state_dict drops the launch plan and its tables; the graph owns its snapshot and still replays on
    the (same) state tensors, as long as load_state_dict left them in place."""
    fused, _ = _pair(ADAMW, (torch.float32,), scaler=False)
    graph = _capture(fused)
    # torch's load_state_dict puts new state tensors in place; the graph keeps updating the ones it captured,
    # which this test keeps alive (freeing memory a graph writes is the user's error, as with torch.optim)
    captured_state = {p: dict(s) for p, s in fused.opt.state.items()}
    fused.opt.load_state_dict(fused.opt.state_dict())
    torch.cuda.empty_cache()
    torch._C._host_emptyCache()  # the dropped plan's host tables go back to the system
    scribble = [torch.full((1 << 16,), -1, dtype=torch.int64, pin_memory=True) for _ in range(8)]
    eager, _ = _pair(ADAMW, (torch.float32,), scaler=False)
    eager.step()
    for t in range(4):
        fused.fill(_grads(fused.params, t))
        graph.replay()
        eager.fill(_grads(eager.params, t))
        eager.step()
    torch.cuda.synchronize()
    assert captured_state and scribble
    for p, q in zip(fused.params, eager.params):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])


# ---- residency, cooperative launch and its fallback ----

@pytest.mark.parametrize("dtype,kwargs", [
    (torch.float32, dict(lr=1e-3)),
    (torch.bfloat16, dict(lr=1e-3, amsgrad=True)),
    (torch.float32, dict(lr=1e-3, amsgrad=True)),
], ids=["fp32", "bf16_amsgrad", "fp32_amsgrad"])
def test_cooperative_launch_after_fusedsgd_with_more_chunks_than_resident_blocks(dtype, kwargs):
    """A FusedSGD step first (its kernel fits more blocks per SM), then Adam with clipping and a scaler over
    more 16,384-element chunks than the device holds resident blocks of any kernel: the grid is sized for
    the Adam kernel, so its cooperative launch fits."""
    sgd_param = torch.zeros(10, device="cuda", requires_grad=True)
    sgd_param.grad = torch.ones_like(sgd_param)
    fusedopt.FusedSGD([sgd_param], lr=0.1).step()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chunks = 4 * sms + 7  # more than 4 blocks per SM: more than any Adam kernel keeps resident
    shapes = [(16384,)] * chunks
    fused, ref = _pair((fusedopt.FusedAdam, torch.optim.Adam, kwargs), (dtype,), shapes=shapes)
    fused.step()
    _warm_reference(ref)
    for t in range(3):
        grads = _grads(fused.params, t, scale=fused.scale())
        fused.fill(grads)
        fused.step()
        ref.step_with(grads)
    torch.cuda.synchronize()
    assert_matches(fused.opt, fused.params, ref.opt, ref.params, **_tolerance((dtype,)))


def _run_bits(spec, dtypes, steps=4, shapes=SHAPES):
    fused, _ = _pair(spec, dtypes, shapes=shapes)
    fused.step()
    for t in range(steps):
        fused.fill(_grads(fused.params, t, scale=fused.scale()))
        fused.step()
    torch.cuda.synchronize()
    return [p.detach().clone() for p in fused.params]


@pytest.mark.parametrize("spec", [ADAMW, LAMB], ids=["adamw", "lamb"])
def test_two_launch_fallback_equals_the_cooperative_launch_bit_for_bit(spec):
    """Without cooperative launch (devices that lack it, MPS limits) a reduce+update step runs as two
    launches (three for LAMB's per-tensor sums); all add the per-block and per-chunk partials in a fixed order,
    so the results are identical."""
    shapes = SHAPES + [(2_000_000,)]
    cooperative = _run_bits(spec, (torch.float32,), shapes=shapes)
    previous = _ops._C._set_cooperative_launch(False)
    try:
        fallback = _run_bits(spec, (torch.float32,), shapes=shapes)
    finally:
        _ops._C._set_cooperative_launch(previous)
    for a, b in zip(cooperative, fallback):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", [ADAMW, LAMB], ids=["adamw", "lamb"])
def test_clipping_is_bitwise_deterministic(spec):
    """Two identical runs with a global norm over many blocks (several launches), and LAMB's per-tensor norms
    over many chunks: identical bits."""
    shapes = SHAPES + [(3_000_000,), (1_000_003,)]
    first = _run_bits(spec, MIXED, steps=5, shapes=shapes)
    second = _run_bits(spec, MIXED, steps=5, shapes=shapes)
    for a, b in zip(first, second):
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b)


# ---- dtypes, layouts, streams ----

LOWP_MAX_GRAD_NORM = 100.0  # clips the ~425-norm grads by ~1/4: unscaled grads stay well inside fp16's range


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("spec", [ADAMW, SGD], ids=["adamw", "sgd_momentum"])
def test_low_precision_params_under_in_kernel_unscale_and_clipping(spec, dtype):
    """fp16/bf16 params with GradScaler and clipping in the kernel. torch's GradScaler refuses to unscale fp16
    grads, so the reference gets the unscaled grads (exact: power-of-two scales) and skips the inf steps."""
    fused_cls, torch_cls, kwargs = spec
    fused = _Fused(fused_cls, kwargs, SHAPES, (dtype,), scaler=True, max_grad_norm=LOWP_MAX_GRAD_NORM)
    ref = _Reference(torch_cls, kwargs, SHAPES, (dtype,), scaler=False, max_grad_norm=LOWP_MAX_GRAD_NORM)
    fused.step()
    _warm_reference(ref)
    for t in range(10):
        skipped = t == 5
        scale = fused.scale()
        grads = _grads(fused.params, t, scale=scale, nonfinite=skipped)
        fused.fill(grads)
        fused.step()
        if not skipped:
            ref.step_with([(g.float() / scale).to(dtype) for g in grads])
        assert (fused.scale() < scale) == skipped
    torch.cuda.synchronize()
    assert_matches(fused.opt, fused.params, ref.opt, ref.params, **_tolerance((dtype,)))


def test_misaligned_grads_under_clipping():
    """Grads that are views at an odd element offset (no 16-byte loads) in the reduction and the update."""
    fused, ref = _pair(ADAMW, (torch.float32,), scaler=False)
    fused.step()
    _warm_reference(ref)
    for t in range(5):
        grads = _grads(fused.params, t)
        for p, g in zip(fused.params, grads):
            backing = torch.empty(g.numel() + 1, device="cuda", dtype=g.dtype)
            p.grad = backing[1:].view(g.shape)
            p.grad.copy_(g)
        fused.opt.step()
        ref.step_with(grads)
    torch.cuda.synchronize()
    assert_matches(fused.opt, fused.params, ref.opt, ref.params, **TOLERANCES[torch.float32])


def test_steps_on_a_side_stream_match_the_default_stream():
    default = _run_bits(ADAMW, MIXED)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = _run_bits(ADAMW, MIXED)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(default, on_side):
        assert torch.equal(a.float(), b.float())


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def test_a_tensor_over_2_31_elements_under_clipping():
    """bf16 SGD over 2**31 + 3 elements with max_grad_norm: 64-bit indexing in the reduction and the update.
    Grad 1 everywhere: the norm is sqrt(n), every element moves by lr * max_norm / (sqrt(n) + 1e-6)."""
    if _free_gib() < 20:
        pytest.skip("needs 20 GiB of free GPU memory")
    n = 2**31 + 3
    param = torch.zeros(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    param.grad = torch.ones_like(param)
    lr = 2.0**20
    fusedopt.FusedSGD([param], lr=lr, max_grad_norm=1.0).step()
    torch.cuda.synchronize()
    expected = torch.tensor(-lr / (math.sqrt(n) + 1e-6), dtype=torch.float32).to(torch.bfloat16).item()
    for index in (0, 2**31 - 1, 2**31, n - 1):  # within one bf16 ulp: fp32 product vs double quotient
        actual = param[index].item()
        assert abs(actual - expected) <= 2**-7 * abs(expected), f"element {index}: {actual} != {expected}"
    del param


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_clipping_uses_the_global_norm_over_several_devices():
    """Params on two devices: one global norm (clip_grad_norm_'s), not one per device."""
    generator = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=generator) for s in SHAPES]
    devices = [f"cuda:{i % 2}" for i in range(len(init))]
    fused_params = [t.clone().to(d).requires_grad_() for t, d in zip(init, devices)]
    ref_params = [t.clone().to(d).requires_grad_() for t, d in zip(init, devices)]
    fused = fusedopt.FusedAdamW(fused_params, lr=1e-2, max_grad_norm=MAX_GRAD_NORM)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    for t in range(5):
        grads = [torch.randn(p.shape, generator=generator) * (10.0 if i % 2 else 0.1)
                 for i, p in enumerate(fused_params)]
        for fp, rp, g in zip(fused_params, ref_params, grads):
            fp.grad, rp.grad = g.to(fp.device), g.to(rp.device)
        torch.nn.utils.clip_grad_norm_(ref_params, MAX_GRAD_NORM, foreach=False)
        ref.step()
        fused.step()
    for d in (0, 1):
        torch.cuda.synchronize(d)
    for fp, rp in zip(fused_params, ref_params):
        torch.testing.assert_close(fp, rp, **TOLERANCES[torch.float32])
