"""Shared harness for the fusedopt tests: devices, tolerances, deterministic problems, comparisons.

A "problem" is a list of parameter specs (shape, memory layout of the param and of its grads, param group,
on which steps the grad is None). From a seed it builds identical parameters and identical per-step grads
as often as asked, so the fused optimizer and its torch.optim reference see exactly the same inputs.
"""
import contextlib
import math
import random
from dataclasses import dataclass

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

STEPS = 50  # optimizer steps per numeric comparison

# fp32/fp64: fused vs torch.optim in the same dtype. Both do the math in that dtype; differences come only
# from operation order / FMA contraction and accumulate over STEPS steps.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
}
# fp32 runs whose options the registry marks ill-conditioned (RMSprop centered: sqrt(square_avg - grad_avg**2)
# cancels catastrophically where the grad barely varies). Measured on the 300-tensor set over 4 seeds:
# torch.optim's own fp32 result is up to 1e-5 (abs) off an fp64 run, fusedopt's 99.9th-percentile error vs
# fp64 equals torch's, but on a handful of the 150k elements the two fp32 roundings differ by up to 4.5e-5.
ILL_CONDITIONED_FP32_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
# fp16/bf16: the fused error against an fp64 reference run (same initial values and grads) must be within
# LOWP_ERROR_RATIO x torch's own error in the same dtype, plus a floor of LOWP_FLOOR_ULPS ulps at the
# reference's magnitude: it only absorbs single-rounding noise where torch's error happens to be ~0 (e.g. a
# momentum buffer that is a copy of the grad).
LOWP_ERROR_RATIO = 2.0
LOWP_FLOOR_ULPS = 1.0

EXACT_DTYPES = (torch.float32, torch.float64)
LOWP_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = EXACT_DTYPES + LOWP_DTYPES
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}

# hyperparameters that fusedopt accepts and ignores, so their values may legitimately differ from torch
IGNORED_FLAGS = frozenset({"foreach", "fused", "capturable"})


# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------
GRAD_PATTERNS = {
    "always": lambda t: True,
    "never": lambda t: False,  # the param never gets a grad: torch creates no state for it (Adagrad: at init)
    "odd_none": lambda t: t % 2 == 0,
    "every3_none": lambda t: t % 3 != 1,
    "late": lambda t: t >= 10,  # state created in the middle of training
}


@dataclass(frozen=True)
class PSpec:
    shape: tuple
    layout: str = "contiguous"  # memory layout of the param
    grad_layout: str = "contiguous"  # memory layout of its grads
    group: int = 0
    grad: str = "always"  # key of GRAD_PATTERNS


def _mixed_specs():
    """300 tensors of assorted shapes in 3 groups: scalars and 1-element tensors, odd sizes, a couple of
    tensors larger than typical multi-tensor chunk sizes (65536), non-contiguous ones, and grads that come
    and go, so a multi-tensor kernel's chunking and per-group hyperparameters are exercised together."""
    rng = random.Random(1234)
    specs = [PSpec((70001,), group=1), PSpec((300, 257), group=2, layout="transposed")]
    while len(specs) < 300:
        i = len(specs)
        kind = rng.random()
        if kind < 0.12:
            shape = rng.choice([(), (1,), (1, 1)])
        elif kind < 0.55:
            shape = (rng.randint(1, 700),)
        elif kind < 0.85:
            shape = (rng.randint(1, 40), rng.randint(1, 40))
        else:
            shape = tuple(rng.randint(1, 8) for _ in range(3))
        layout = "strided" if (len(shape) >= 1 and i % 17 == 0) else "contiguous"
        grad_layout = "transposed" if (len(shape) == 2 and i % 11 == 0) else "contiguous"
        grad = "odd_none" if i % 7 == 0 else "always"
        specs.append(PSpec(shape, layout=layout, grad_layout=grad_layout, group=i % 3, grad=grad))
    return tuple(specs)


SHAPE_SETS = {
    "single": (PSpec((1,)), PSpec(())),
    "large": (PSpec((4097,)),),
    "empty": (PSpec((0,)), PSpec((3, 0, 2)), PSpec((5,))),
    "noncontig": (
        PSpec((5, 7), layout="transposed"),
        PSpec((6, 4), grad_layout="transposed"),
        PSpec((3, 4), layout="transposed", grad_layout="transposed"),
        PSpec((6, 5), layout="strided", grad_layout="strided"),
        PSpec((9,), layout="strided"),
        PSpec((2, 3, 4, 5), layout="channels_last"),
        PSpec((2, 3, 4, 5), grad_layout="channels_last"),
        PSpec((8, 3), grad_layout="expanded"),  # stride-0 grad
    ),
    "none_grads": (
        PSpec((10,)),
        PSpec((10,), grad="odd_none"),
        PSpec((3, 4), grad="every3_none"),
        PSpec((5,), grad="never"),
        PSpec((2, 2), grad="late"),
    ),
    "groups": (
        PSpec((16,), group=0),
        PSpec((3, 3), group=0),
        PSpec((7,), group=1),
        PSpec((1,), group=1),
        PSpec((2, 5), group=2),
        PSpec((), group=2, grad="odd_none"),
    ),
    "mixed": _mixed_specs(),
}
CHEAP_SHAPE_SETS = ("single", "large", "empty", "noncontig", "none_grads", "groups")
HEAVY_SHAPE_SETS = ("mixed",)


def _layout(values, layout):
    """A tensor equal to `values` (same dtype/device) in the requested memory layout."""
    if layout == "contiguous":
        return values.clone()
    if layout == "transposed":  # column-major 2-D
        return values.t().contiguous().t()
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a larger buffer, with a storage offset of 1
        shape = values.shape
        buf = torch.full((*shape[:-1], 2 * shape[-1] + 1), -7.0, dtype=values.dtype, device=values.device)
        out = buf[..., 1::2]
        out.copy_(values)
        return out
    raise ValueError(layout)


class Problem:
    def __init__(self, specs, device, seed=0):
        if isinstance(specs, str):
            specs = SHAPE_SETS[specs]
        self.specs = tuple(specs)
        self.device = torch.device(device)
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.init = [torch.randn(s.shape, generator=gen) for s in self.specs]
        self._grad_numels = [math.prod(self._grad_source_shape(s)) for s in self.specs]

    @staticmethod
    def _grad_source_shape(spec):
        # an "expanded" grad is one row broadcast along dim 0
        return (1, *spec.shape[1:]) if spec.grad_layout == "expanded" else spec.shape

    @property
    def num_groups(self):
        return 1 + max(s.group for s in self.specs)

    def _to(self, x, dtype, via):
        if via is not None:  # round through a low-precision dtype: the fp64 reference of a bf16/fp16 run
            x = x.to(via)
        return x.to(device=self.device, dtype=dtype)

    def params(self, dtype, via=None):
        """Fresh leaf parameters, identical for every call with the same arguments."""
        return [_layout(self._to(v, dtype, via), s.layout).requires_grad_() for v, s in zip(self.init, self.specs)]

    def grads(self, step, dtype, via=None):
        """The grads of step `step` (None where the spec says so); identical for every call."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        flat = torch.randn(sum(self._grad_numels), generator=gen)
        out = []
        for spec, chunk in zip(self.specs, flat.split(self._grad_numels)):
            if not GRAD_PATTERNS[spec.grad](step):
                out.append(None)
                continue
            vals = self._to(chunk.reshape(self._grad_source_shape(spec)), dtype, via)
            if spec.grad_layout == "expanded":
                out.append(vals.expand(spec.shape))
            else:
                out.append(_layout(vals, spec.grad_layout))
        return out

    def set_grads(self, params, step, dtype=None, via=None):
        dtype = dtype or params[0].dtype
        for p, g in zip(params, self.grads(step, dtype, via)):
            p.grad = g

    def param_arg(self, params, group_overrides):
        """The `params` argument: a plain list for one group, else group dicts with the overrides."""
        ngroups = self.num_groups
        if ngroups == 1:
            return list(params)
        groups = []
        for g in range(ngroups):
            extra = dict(group_overrides[g - 1]) if g else {}
            groups.append({"params": [p for p, s in zip(params, self.specs) if s.group == g], **extra})
        return groups


@contextlib.contextmanager
def threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(opt, problem, params, start, stop, via=None):
    """Steps `opt` over steps [start, stop) of `problem`.

    torch.optim references run single-threaded: their elementwise results do not depend on the thread
    count, and on a small loaded CI box tiny OpenMP regions (e.g. sqrt of 4097 floats) cost milliseconds.
    fusedopt runs with the default thread count so that its parallel CPU path is what gets tested."""
    is_reference = type(opt).__module__.startswith("torch.optim")
    with threads(1) if is_reference else contextlib.nullcontext():
        for t in range(start, stop):
            problem.set_grads(params, t, via=via)
            if is_reference:  # torch's CUDA foreach Nesterov adds into the grads, which a stride-0 grad forbids
                for p in params:
                    if p.grad is not None and p.grad.numel() > 1 and 0 in p.grad.stride():
                        p.grad = p.grad.clone()
            opt.step()


def run(cls, problem, dtype, kwargs, group_overrides, steps=STEPS, via=None):
    params = problem.params(dtype, via=via)
    opt = cls(problem.param_arg(params, group_overrides), **kwargs)
    train(opt, problem, params, 0, steps, via=via)
    return opt, params


# --------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------
def param_state(opt, p):
    # opt.state is a defaultdict: .get() does not create entries
    return opt.state.get(p, {})


def check_fused_step(step, p, key="step"):
    """A fused optimizer's scalar state (`step`, NAdam's `mu_product`): a 0-dim float32 tensor on p's device."""
    assert isinstance(step, torch.Tensor), f"state[{key!r}] is {type(step)}, expected a tensor"
    assert step.dtype == torch.float32 and step.dim() == 0, f"state[{key!r}]: {step.dtype}, {step.dim()}-d"
    assert step.device == p.device, f"state[{key!r}] on {step.device}, param on {p.device}"


def scalar_state_keys(opt):
    """The per-param scalar state keys other than `step` (NAdam's `mu_product`): the fused class's declaration
    names them (for a torch.optim class, the declaration of the Fused* class replacing it). They are 0-dim
    tensors whatever the param's shape, compared as numbers."""
    import fusedopt
    from fusedopt import _ops

    cls = type(opt)
    fused = [c for c in (getattr(fusedopt, n) for n in fusedopt.optimizers.__all__)
             if c is cls or c._torch_class() is cls]
    return set(_ops.spec(fused[0]._op_name).scalars) - {"step"} if fused else set()


def assert_scalar_state(fs, rs, key, p, rtol, atol, fused=True):
    if fused:
        check_fused_step(fs[key], p, key)
    assert math.isclose(float(fs[key]), float(rs[key]), rel_tol=rtol, abs_tol=atol), (
        f"state[{key!r}] {float(fs[key])} != torch's {float(rs[key])}")


def assert_matches(fused_opt, fused_params, ref_opt, ref_params, rtol, atol, fused_is_fusedopt=True):
    """Params and every state buffer of two same-dtype runs agree; state key sets are identical."""
    assert len(fused_params) == len(ref_params)
    for i, (fp, rp) in enumerate(zip(fused_params, ref_params)):
        torch.testing.assert_close(fp.detach(), rp.detach(), rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
        fs, rs = param_state(fused_opt, fp), param_state(ref_opt, rp)
        assert set(fs) == set(rs), f"param {i}: state keys {sorted(fs)} != torch's {sorted(rs)}"
        for key in rs:
            if key == "step":
                if fused_is_fusedopt:
                    check_fused_step(fs[key], fp)
                assert float(fs[key]) == float(rs[key]), f"param {i}: step {float(fs[key])} != {float(rs[key])}"
                continue
            if key in scalar_state_keys(fused_opt) | scalar_state_keys(ref_opt):
                assert_scalar_state(fs, rs, key, fp, rtol, atol, fused=fused_is_fusedopt)
                continue
            f, r = fs[key], rs[key]
            assert f.shape == fp.shape and f.dtype == fp.dtype and f.device == fp.device, (
                f"param {i}: state[{key!r}] is {f.dtype} {tuple(f.shape)} on {f.device}, param is "
                f"{fp.dtype} {tuple(fp.shape)} on {fp.device}"
            )
            torch.testing.assert_close(
                f, r.to(f.device), rtol=rtol, atol=atol, msg=lambda m: f"param {i} state[{key!r}]: {m}"
            )


def _errors(fused, tor, ref):
    """Max |fused - ref| and |torch - ref| over the elements where torch's low-precision result is finite.

    The optimizers are elementwise, so an element where torch overflowed (e.g. fp16 Adam: exp_avg_sq
    underflows to 0, exp_avg / eps(0) = inf) does not affect the others; there fused only has to be finite."""
    fused_err = torch_err = 0.0
    for f, t, r in zip(fused, tor, ref):
        if not f.numel():
            continue
        f, t, r = f.detach().double(), t.detach().double().to(f.device), r.detach().double().to(f.device)
        assert torch.isfinite(f)[torch.isfinite(r)].all(), "fusedopt produced non-finite values"
        ok = torch.isfinite(t)
        if ok.any():
            fused_err = max(fused_err, (f - r)[ok].abs().max().item())
            torch_err = max(torch_err, (t - r)[ok].abs().max().item())
    return fused_err, torch_err


def _max_abs(refs):
    vals = [r.detach().abs().max() for r in refs if r.numel()]
    return max(vals).item() if vals else 0.0


def assert_within_torch_error(fused_opt, fused_params, torch_opt, torch_params, ref_opt, ref_params,
                              ratio=None):
    """fused vs a higher-precision reference run: error <= LOWP_ERROR_RATIO x torch's own error (same dtype
    as fused) + floor, for the params and for each state buffer (max over all tensors); state keys and
    step counters must match torch's exactly."""
    ratio = ratio or LOWP_ERROR_RATIO
    dtype = fused_params[0].dtype
    ulp = torch.finfo(dtype).eps
    buckets = {"param": ([], [], [])}
    for i, (fp, tp, rp) in enumerate(zip(fused_params, torch_params, ref_params)):
        assert fp.dtype == tp.dtype
        buckets["param"][0].append(fp)
        buckets["param"][1].append(tp)
        buckets["param"][2].append(rp)
        fs, ts, rs = param_state(fused_opt, fp), param_state(torch_opt, tp), param_state(ref_opt, rp)
        assert set(fs) == set(ts), f"param {i}: state keys {sorted(fs)} != torch's {sorted(ts)}"
        for key in ts:
            if key == "step":
                check_fused_step(fs[key], fp)
                assert float(fs[key]) == float(ts[key]), f"param {i}: step {float(fs[key])} != {float(ts[key])}"
                continue
            if key in scalar_state_keys(fused_opt):  # float32 in every dtype: compared as in fp32
                assert_scalar_state(fs, ts, key, fp, **TOLERANCES[torch.float32])
                continue
            assert fs[key].dtype == fp.dtype and fs[key].shape == fp.shape, f"param {i}: state[{key!r}] dtype/shape"
            b = buckets.setdefault(key, ([], [], []))
            b[0].append(fs[key])
            b[1].append(ts[key])
            b[2].append(rs[key])
    for key, (fused, tor, ref) in buckets.items():
        fused_err, torch_err = _errors(fused, tor, ref)
        bound = ratio * torch_err + LOWP_FLOOR_ULPS * ulp * _max_abs(ref)
        assert fused_err <= bound, (
            f"{key}: fusedopt max error {fused_err:.3g} vs the fp64 reference exceeds {ratio} x "
            f"torch's {torch_err:.3g} (+ floor) = {bound:.3g}"
        )


def assert_moved(ref_params, init_params):
    """Guards against a vacuous comparison: the reference run must actually have changed something."""
    moved = any(p.numel() and not torch.equal(p.detach(), q.detach()) for p, q in zip(ref_params, init_params))
    assert moved, "reference run left every param unchanged: the test compares nothing"


def storage_gaps(p):
    """(storage view, mask of the elements p does NOT cover) for a param with gaps in its storage."""
    n = p.untyped_storage().nbytes() // p.element_size()
    whole = torch.empty(0, dtype=p.dtype, device=p.device).set_(p.untyped_storage(), 0, (n,), (1,))
    covered = torch.zeros(n, dtype=torch.bool, device=p.device)
    covered.as_strided(p.shape, p.stride(), p.storage_offset()).fill_(True)
    return whole, ~covered


def snapshot_gaps(params):
    snaps = []
    for p in params:
        whole, gap = storage_gaps(p.detach())
        snaps.append(whole[gap].clone())
    return snaps


def assert_gaps_untouched(params, snaps):
    """A kernel that writes a strided param as if it were dense clobbers the storage between its elements."""
    for i, (p, snap) in enumerate(zip(params, snaps)):
        whole, gap = storage_gaps(p.detach())
        assert torch.equal(whole[gap], snap), f"param {i}: storage outside the param's elements was written"


def bits(t):
    """The raw bytes of a tensor, so that equality is bitwise (-0.0 != 0.0, NaN == same NaN)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def clone_state(opt):
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for p, s in opt.state.items()}


def assert_state_identical(opt, snapshot):
    """Bit-identical state: same params with state, same keys, same bits."""
    now = {id(p): s for p, s in opt.state.items() if len(s)}
    before = {k: s for k, s in snapshot.items() if len(s)}
    assert set(now) == set(before), "the set of params with state changed"
    for pid, s in before.items():
        assert set(now[pid]) == set(s), f"state keys changed: {sorted(s)} -> {sorted(now[pid])}"
        for k, v in s.items():
            w = now[pid][k]
            if isinstance(v, torch.Tensor):
                assert w.dtype == v.dtype and w.shape == v.shape and w.device == v.device
                assert torch.equal(bits(w), bits(v)), f"state[{k!r}] changed"
            else:
                assert w == v, f"state[{k!r}] changed: {v} -> {w}"



# --------------------------------------------------------------------------------------------------
# Skip reporting: one line per reason with its count, instead of a bare "s" per skipped test
# --------------------------------------------------------------------------------------------------
def _skip_reason(report):
    """The reason pytest recorded for a skipped test ("Skipped: " prefix dropped)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def pytest_report_teststatus(report, config):
    # Without a GPU about half the suite skips: a progress line of "s" says nothing, the summary below says why.
    if report.skipped and not hasattr(report, "wasxfail") and config.get_verbosity() < 1:
        return "skipped", "", "SKIPPED"
    return None


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    if not skipped:
        return
    counts = {}
    for report in skipped:
        reason = _skip_reason(report)
        counts[reason] = counts.get(reason, 0) + 1
    terminalreporter.section(f"{len(skipped)} skipped, by reason")
    for reason, n in sorted(counts.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{n:6d}  {reason}")
