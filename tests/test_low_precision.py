"""Low-precision training (issue 11): `param_rounding` ("nearest" | "stochastic" | "kahan"), `master_weights`,
`state_dtype` and `seed` on every Fused* optimizer (fusedopt/_low_precision.py documents them).

- Every registry class x every mode: a few steps on awkward shapes track the fp32 trajectory, the state has the
  documented keys and dtypes, and fp32 / fp64 / complex64 params in the same optimizer update bit for bit as
  without the options.
- bf16 weights near 1 at lr 1e-4 for 1,000 steps: round-to-nearest provably loses every update, the three
  modes track fp32.
- Stochastic rounding: unbiased (params and state buffers), reproducible by seed and by torch.manual_seed,
  CPU and CUDA identical.
- Validation, state dicts (exact resume, torch.optim interchange), GradScaler, max_grad_norm, device schedules.

CPU always; CUDA through conftest.DEVICES (skipped without a GPU).
"""
import contextlib
import dataclasses
import inspect
import io
import math
import re

import pytest
import torch

import fusedopt
from fusedopt import _low_precision, lr_scheduler

from conftest import (
    DEVICES,
    LOWP_ERROR_RATIO,
    TOLERANCES,
    PSpec,
    Problem,
    assert_state_identical,
    bits,
    clone_state,
    threads,
)
from registry import ENTRIES, ENTRY_BY_NAME, entry_params

BF16, FP16, FP32, FP64, C64 = torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.complex64
LOW = (BF16, FP16)
EXTRAS = _low_precision.EXTRA_KEYS
RNG_KEY = _low_precision.RNG_KEY
COMPLEX_PARAM, COMPLEX_GRAD = 1 - 0.5j, 0.5 + 1j  # complex params and grads with both parts non-zero


@dataclasses.dataclass(frozen=True)
class Mode:
    options: dict  # the constructor options
    dtype: torch.dtype  # the params the mode is about; the other float dtypes ride along, unaffected
    extra: str = None  # the state key the mode adds to those params
    state_dtype: torch.dtype = None  # their state buffers' dtype (None: theirs)
    # The distance to the fp32 run after STEPS_TRACKED steps, as an RMS over the params' elements in bf16 ulps
    # (of each fp32 value), must stay below this. What one rounding per step predicts: stochastic, a sum of 10
    # independent errors of variance p (1 - p) ulp**2 <= ulp**2 / 4, at most sqrt(10) / 2 = 1.58; master and
    # Kahan, a single rounding to nearest, 1 / sqrt(12) = 0.29; master + stochastic, one stochastic rounding,
    # sqrt(1 / 6) = 0.41; round-to-nearest every step (fp32 state), a random walk, 0.29 sqrt(10) = 0.91.
    # Measured maxima over the registry (CPU, seed 3): 1.36, 0.50, 0.68, 0.97 (0.29 to 0.41 but for RMSprop and
    # Lion, whose bf16 moments or sign flips move the trajectory itself; Lion's fp32-state run 2.6, hence its
    # registry lowp_error_ratio doubling the bound); bf16 state for fp32 params 0.43. The plain bf16 run: 0.97.
    # master + stochastic depends on the random stream through RMSprop's stochastically rounded bf16 moments:
    # 0.75 to 1.10 over rounding seeds 11 to 15, hence 1.25.
    rms_ulps: float = 1.0

    @property
    def stochastic(self):
        return self.options.get("param_rounding") == "stochastic"


MODES = {
    "stochastic": Mode({"param_rounding": "stochastic", "seed": 11}, BF16, rms_ulps=1.6),
    "kahan": Mode({"param_rounding": "kahan"}, BF16, extra="kahan_comp", rms_ulps=0.6),
    "master": Mode({"master_weights": True}, BF16, extra="master_param", rms_ulps=0.6),
    "master_stochastic": Mode({"master_weights": True, "param_rounding": "stochastic", "seed": 11}, BF16,
                              extra="master_param", rms_ulps=1.25),
    "state_bf16": Mode({"state_dtype": BF16}, FP32, state_dtype=BF16, rms_ulps=0.6),
    "state_fp32": Mode({"state_dtype": FP32}, BF16, state_dtype=FP32, rms_ulps=1.6),
}
EXACT_DTYPES = (FP32, FP64, C64)  # update exactly as with the default options, but the mode's own dtype
STEPS_TRACKED = 10
# The registry's lrs times this in the tracking test: the fp32 run then moves every class's params by at least
# 7 ulps RMS (Adam at lr 1e-2: 2), so that a lost update could not pass for a rounding error.
LR_SCALE = 4

# awkward shapes in two groups: transposed, strided, channels_last, a stride-0 grad, 0-d, empty, > 4096
SPECS = (
    PSpec((5, 7), layout="transposed"),
    PSpec((6, 5), layout="strided", grad_layout="strided"),
    PSpec((2, 3, 4, 5), layout="channels_last"),
    PSpec((8, 3), grad_layout="expanded"),
    PSpec(()),
    PSpec((0,)),
    PSpec((4097,), group=1),
    PSpec((3, 4), group=1, grad_layout="transposed"),
)


def test_the_extension_is_loaded():
    assert fusedopt.EXTENSION_AVAILABLE, f"fusedopt._C failed to load: {fusedopt._ops.EXTENSION_ERROR}"
    assert _low_precision.rounding_modes() == ("nearest", "stochastic", "kahan")


# --------------------------------------------------------------------------------------------------
# Helpers: params of several dtypes in one optimizer, built from one Problem
# --------------------------------------------------------------------------------------------------
def _params(problem, dtype, via=None):
    if dtype.is_complex:
        return [(p.detach().to(dtype) * COMPLEX_PARAM).requires_grad_() for p in problem.params(FP32)]
    return problem.params(dtype, via=via)


def _grads(problem, t, dtype, via=None, scale=1.0):
    if dtype.is_complex:
        return [None if g is None else g.to(dtype) * COMPLEX_GRAD * scale for g in problem.grads(t, FP32)]
    grads = problem.grads(t, dtype, via=via)
    return grads if scale == 1.0 else [None if g is None else g * scale for g in grads]


def _kwargs(entry):
    """The richest option set; LAMB unclipped, as its global norm couples every param (clipping has its test)."""
    kwargs = dict(entry.option_sets[entry.representative[-1]])
    if entry.name == "lamb":
        kwargs["max_grad_norm"] = None
    return kwargs


class Run:
    """One optimizer over params of several dtypes (each dtype: one copy of every spec), groups as the specs say."""

    def __init__(self, entry, problem, dtypes, options=None, via=None, kwargs=None, cls=None):
        self.problem, self.via = problem, via
        self.params = {d: _params(problem, d, via) for d in dtypes}
        groups = []
        for g in range(problem.num_groups):
            members = [p for d in dtypes for p, s in zip(self.params[d], problem.specs) if s.group == g]
            groups.append({"params": members, **(entry.group_overrides[g - 1] if g else {})})
        cls = cls or entry.fused_cls
        self.opt = cls(groups, **(_kwargs(entry) if kwargs is None else kwargs), **(options or {}))

    def set_grads(self, t, scale=1.0):
        for d, params in self.params.items():
            for p, g in zip(params, _grads(self.problem, t, d, self.via, scale)):
                p.grad = g

    def train(self, start, stop):
        torch_class = type(self.opt).__module__.startswith("torch.optim")
        with threads(1) if torch_class else contextlib.nullcontext():
            for t in range(start, stop):
                self.set_grads(t)
                self.opt.step()
        return self

    def state(self, p):
        return self.opt.state.get(p, {})


def _assert_same_bits(what, a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, \
        f"{what}: {a.dtype} {tuple(a.shape)} != {b.dtype} {tuple(b.shape)}"
    assert torch.equal(bits(a), bits(b)), f"{what}: differs"


def _assert_identical(what, run_a, params_a, run_b, params_b):
    """Params and every state entry bit for bit."""
    for i, (p, q) in enumerate(zip(params_a, params_b)):
        _assert_same_bits(f"{what} param {i}", p.detach(), q.detach())
        sa, sb = run_a.state(p), run_b.state(q)
        assert set(sa) == set(sb), f"{what} param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sa:
            _assert_same_bits(f"{what} param {i} state[{key!r}]", sa[key], sb[key])


def _counter(opt):
    """The stochastic-rounding counter of the optimizer's one device, as its state dict saves it."""
    (counter,) = opt.state_dict()[RNG_KEY]["counters"].values()
    return counter


def _stochastic_launches(opt):
    return sum(launch.rounding == "stochastic" for launch in opt._plan.launches)


def _checkpoint(sd):
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: the state dict must be plain data


# --------------------------------------------------------------------------------------------------
# Every class x every mode
# --------------------------------------------------------------------------------------------------
def _registry_modes():
    return [pytest.param(e, m, id=f"{e.name}-{m}") for e in ENTRIES for m in MODES]


def _bf16_ulps(values):
    """One bf16 ulp at each value's magnitude."""
    magnitude = values.abs().clamp_min(torch.finfo(BF16).tiny)
    return torch.finfo(BF16).eps * torch.exp2(torch.floor(torch.log2(magnitude)))


def _with_lr_scale(entry, factor):
    """The entry and its richest kwargs with every lr (constructor and group overrides) times `factor`."""
    kwargs = _kwargs(entry)
    kwargs["lr"] = factor * kwargs.get("lr", inspect.signature(entry.torch_cls.__init__).parameters["lr"].default)
    overrides = tuple({**o, **({"lr": factor * o["lr"]} if "lr" in o else {})} for o in entry.group_overrides)
    return dataclasses.replace(entry, group_overrides=overrides), kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry,mode_id", _registry_modes())
def test_mode_tracks_fp32_and_leaves_other_dtypes_exact(entry, mode_id, device):
    mode = MODES[mode_id]
    problem = Problem(SPECS, device, seed=3)
    exact = tuple(d for d in EXACT_DTYPES if d != mode.dtype)
    dtypes = (mode.dtype,) + exact
    scaled, kwargs = _with_lr_scale(entry, LR_SCALE)
    run = Run(scaled, problem, dtypes, mode.options, kwargs=kwargs).train(0, STEPS_TRACKED)
    plain = Run(scaled, problem, dtypes, kwargs=kwargs).train(0, STEPS_TRACKED)  # the same, default options
    ref = Run(scaled, problem, (FP32,), via=mode.dtype, kwargs=kwargs).train(0, STEPS_TRACKED)  # fp32 twins

    # the other dtypes: exactly as without the options
    for d in exact:
        _assert_identical(f"{d} with {mode_id}", run, run.params[d], plain, plain.params[d])

    # the mode's params: track the fp32 run
    start = torch.cat([p.detach().double().flatten() for p in _params(problem, FP32, via=mode.dtype)])
    mine = torch.cat([p.detach().double().flatten() for p in run.params[mode.dtype]])
    fp32 = torch.cat([p.detach().double().flatten() for p in ref.params[FP32]])
    assert torch.isfinite(mine).all()
    ulp = _bf16_ulps(fp32).pow(2).mean().sqrt()
    moved, error = float((fp32 - start).pow(2).mean().sqrt() / ulp), float((mine - fp32).pow(2).mean().sqrt() / ulp)
    bound = mode.rms_ulps * (entry.lowp_error_ratio or LOWP_ERROR_RATIO) / LOWP_ERROR_RATIO
    assert moved >= 2 * bound, f"the fp32 run moved {moved:.3g} ulps RMS: too little to tell a lost update"
    assert error <= bound, f"{mode_id}: {error:.3g} bf16 ulps RMS from the fp32 run (bound {bound:.3g})"

    # the mode's state: torch's keys plus the extra, buffers in the state dtype, scalars float32
    state_dtype = mode.state_dtype or mode.dtype
    scalars = set(fusedopt._ops.spec(entry.fused_cls._op_name).scalars)
    for i, (p, q) in enumerate(zip(run.params[mode.dtype], plain.params[mode.dtype])):
        mine, theirs = run.state(p), plain.state(q)
        assert set(mine) == set(theirs) | ({mode.extra} if mode.extra else set()), \
            f"param {i}: state keys {sorted(mine)}, expected {sorted(theirs)} + {mode.extra}"
        for key, value in mine.items():
            assert value.device == p.device and value.shape == (() if key in scalars else p.shape)
            expected = {"master_param": FP32, "kahan_comp": mode.dtype}.get(
                key, FP32 if key in scalars else state_dtype)
            assert value.dtype == expected, f"param {i}: state[{key!r}] is {value.dtype}, expected {expected}"
        eps = torch.finfo(mode.dtype).eps
        if mode.extra == "master_param":
            master = mine["master_param"]
            if not mode.stochastic:  # the param is the master's rounding to nearest
                _assert_same_bits(f"param {i} vs its master", p.detach(), master.to(mode.dtype))
            else:  # one of the two neighbours of the master
                assert ((p.detach().float() - master).abs() <= eps * master.abs() + 1e-30).all()
        if mode.extra == "kahan_comp":  # what rounding dropped: less than one ulp of the param
            comp = mine["kahan_comp"].float()
            assert (comp.abs() <= eps * p.detach().float().abs() + 1e-30).all()
    for p in run.params.get(C64, []):  # complex params keep complex state: there is no complex bfloat16
        assert all(v.dtype == C64 for k, v in run.state(p).items() if k not in scalars)

    if mode.stochastic:  # one draw per stochastic launch and step
        launches = _stochastic_launches(run.opt)
        assert launches >= 1 and _counter(run.opt) == STEPS_TRACKED * launches
    else:
        assert run.opt.low_precision.seed is None and RNG_KEY not in run.opt.state_dict()


@pytest.mark.parametrize("mode_id", ["kahan", "master"])
def test_plain_sgd_keeps_only_the_extra(mode_id):
    """Plain SGD keeps no state in torch; a bf16 param still needs its extra buffer, and nothing else."""
    mode = MODES[mode_id]
    p, q = torch.full((5,), 1.5, dtype=BF16, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = fusedopt.FusedSGD([p, q], lr=0.1, **mode.options)
    p.grad, q.grad = torch.full((5,), 0.25, dtype=BF16), torch.ones(3)
    opt.step()
    assert set(opt.state[p]) == {mode.extra} and q not in opt.state
    if mode_id == "master":
        assert torch.equal(opt.state[p]["master_param"], torch.full((5,), 1.475))
    assert torch.equal(q.detach(), torch.full((3,), 0.9))


def test_fp32_launches_are_called_as_without_the_options():
    """Only the bf16 launch gets the low-precision arguments; an fp32 launch's call is the default one."""
    p, q = torch.ones(4, dtype=BF16, requires_grad=True), torch.ones(4, requires_grad=True)
    for options, bf16_args in (
        ({"param_rounding": "kahan"}, {"kahan_comp", "param_rounding"}),
        ({"master_weights": True}, {"master_params"}),
        ({"master_weights": True, "param_rounding": "stochastic"}, {"master_params", "param_rounding", "rng_state"}),
        ({"param_rounding": "stochastic"}, {"param_rounding", "rng_state"}),
    ):
        opt = fusedopt.FusedAdam([p, q], **options)
        p.grad, q.grad = torch.ones(4, dtype=BF16), torch.ones(4)
        calls = {args["params"][0].dtype: args for _, args in opt._op_invocations()}
        new = {"master_params", "kahan_comp", "param_rounding", "rng_state"}
        assert new & set(calls[BF16]) == bf16_args, options
        assert not new & set(calls[FP32]), options


# --------------------------------------------------------------------------------------------------
# Lost updates: bf16 weights near 1, lr 1e-4, 1,000 steps
# --------------------------------------------------------------------------------------------------
LOST_LR, LOST_STEPS, LOST_N = 1e-4, 1000, 4096
# Adam's moments in float32 here, in every run: this test is about the params. (In bf16 with round-to-nearest
# exp_avg_sq stalls too, where 0.001 * (g**2 - v) drops below half its ulp, at about g**2 / 3 from zero.)
LOST_CLASSES = {"sgd": (fusedopt.FusedSGD, {}), "adam": (fusedopt.FusedAdam, {"state_dtype": FP32})}


def _lost_update_run(name, dtype, options, via=None):
    """Weights in [1.25, 1.75] (one ulp = eps(dtype) there and after 1,000 steps of at most 1.5e-4), a constant
    grad in [0.5, 1.5]: every update (SGD: lr * g, Adam: ~lr) is below half an ulp in bf16 (2**-8) and fp16
    (2**-11). `via`: the fp32 run starts from the low-precision run's values."""
    generator = torch.Generator().manual_seed(0)
    start = (1.25 + 0.5 * torch.rand(LOST_N, generator=generator)).to(via or dtype).to(dtype)
    grad = (0.5 + torch.rand(LOST_N, generator=generator)).to(via or dtype).to(dtype)
    param = start.clone().requires_grad_()
    cls, state_options = LOST_CLASSES[name]
    opt = cls([param], lr=LOST_LR, **state_options, **options)
    for _ in range(LOST_STEPS):
        param.grad = grad.clone()
        opt.step()
    return start, param.detach(), opt


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_small_updates_are_lost_to_nearest_but_not_to_the_modes(name, dtype):
    start, fp32, _ = _lost_update_run(name, FP32, {}, via=dtype)
    fp32 = fp32.double()
    moved = (fp32 - start.double()).abs()
    assert moved.min() > 0.03, "the fp32 run must move every weight by many ulps"
    eps = torch.finfo(dtype).eps  # one ulp in [1, 2)

    # nearest: provably stalled, every weight exactly where it started
    start, nearest, _ = _lost_update_run(name, dtype, {})
    assert torch.equal(bits(nearest), bits(start)), "round-to-nearest kept a sub-half-ulp update"

    # master weights: the master copy is the fp32 trajectory (the same fp32 arithmetic), the param its rounding
    _, master, opt = _lost_update_run(name, dtype, {"master_weights": True})
    master_copy = opt.state[opt.param_groups[0]["params"][0]]["master_param"]
    torch.testing.assert_close(master_copy.double(), fp32, rtol=1e-6, atol=0)
    assert (master.double() - fp32).abs().max() <= 0.5 * eps

    # Kahan: param + compensation tracks fp32 up to the compensation's own roundings (to the param dtype, at
    # most half its ulp, eps / 4 of the param's ulp, per step: 1.95 ulps in bf16, 0.24 in fp16 after 1,000 steps
    # in the worst case; measured 0.49 and 0.06): asserted half the worst case, and the param within half an ulp
    # more (measured 0.81 and 0.55)
    _, kahan, opt = _lost_update_run(name, dtype, {"param_rounding": "kahan"})
    comp = opt.state[opt.param_groups[0]["params"][0]]["kahan_comp"].double()
    drift = LOST_STEPS * eps / 4 / 2
    assert (kahan.double() + comp - fp32).abs().max() <= drift * eps
    assert (kahan.double() - fp32).abs().max() <= (0.5 + drift) * eps

    # stochastic: each weight is the fp32 one plus a sum of independent zero-mean rounding errors of variance
    # p (1 - p) ulp**2 per step (p = update / ulp), so its error is about sqrt(steps * update * ulp) (bf16:
    # ~0.028, 28% of the distance moved; fp16 ~0.01): the mean over 4,096 weights must be within 5 standard
    # errors of the fp32 trajectory and the spread within 25% of the prediction
    _, stochastic, _ = _lost_update_run(name, dtype, {"param_rounding": "stochastic", "seed": 5})
    error = stochastic.double() - fp32
    step = moved / LOST_STEPS
    predicted = torch.sqrt(LOST_STEPS * step * (eps - step))  # per weight
    rms, predicted_rms = error.pow(2).mean().sqrt(), predicted.pow(2).mean().sqrt()
    assert abs(float(error.mean())) <= 5 * float(predicted_rms) / math.sqrt(LOST_N), float(error.mean())
    assert 0.75 * predicted_rms <= rms <= 1.25 * predicted_rms, (float(rms), float(predicted_rms))
    assert abs(float(error.mean())) < 0.05 * float(moved.mean())  # nearest: 100% of it


# --------------------------------------------------------------------------------------------------
# Stochastic rounding: unbiased, reproducible, the same on every device
# --------------------------------------------------------------------------------------------------
# (start value, direction): values exact in bf16 and fp16, moved away from zero so they stay in their binade
UNBIASED_STARTS = ((1.0, 1.0), (-3.0, -1.0), (0.75, 1.0), (100.0, 1.0))
UNBIASED_FRACTIONS = (77 / 256, 1 / 2, 3 / 256, 253 / 256)  # of an ulp, exact in fp32
UNBIASED_BLOCK = 2**14  # elements per (start, fraction)
UNBIASED_LR = 2.0**-20


def _ulp(value, dtype):
    return 2.0 ** math.floor(math.log2(abs(value))) * torch.finfo(dtype).eps


def _unbiased_problem(dtype, device):
    """One SGD step whose fp32 result lies `fraction` of an ulp beyond each block's start: w - lr * g is exact
    in fp32 (lr a power of two, g = -direction * fraction * ulp / lr), so the rounded mean must equal it."""
    starts, grads, exact, ulps = [], [], [], []
    for value, direction in UNBIASED_STARTS:
        ulp = _ulp(value, dtype)
        for fraction in UNBIASED_FRACTIONS:
            starts.append(torch.full((UNBIASED_BLOCK,), value))
            grads.append(torch.full((UNBIASED_BLOCK,), -direction * fraction * ulp / UNBIASED_LR))
            exact.append(value + direction * fraction * ulp)
            ulps.append(ulp)
    param = torch.cat(starts).to(device=device, dtype=dtype).requires_grad_()
    grad = torch.cat(grads).to(device=device, dtype=FP32)
    assert torch.equal(grad.to(dtype).float(), grad), "the grads must be exact in the param dtype"
    return param, grad.to(dtype), exact, ulps


def _round_once(dtype, device, seed, steps=1):
    """The stochastic roundings of `steps` steps from the same start (the param is reset in between): one
    tensor per step."""
    param, grad, _, _ = _unbiased_problem(dtype, device)
    start = param.detach().clone()
    opt = fusedopt.FusedSGD([param], lr=UNBIASED_LR, param_rounding="stochastic", seed=seed)
    results = []
    for _ in range(steps):
        with torch.no_grad():
            param.copy_(start)
        param.grad = grad.clone()
        opt.step()
        results.append(param.detach().clone())
    return results, opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_stochastic_rounding_is_unbiased(dtype, device):
    param, _, exact, ulps = _unbiased_problem(dtype, device)
    starts = param.detach().double().cpu().split(UNBIASED_BLOCK)
    results, opt = _round_once(dtype, device, seed=1, steps=2)
    assert _counter(opt) == 2
    for result in results:
        for block, start, value, ulp in zip(result.double().cpu().split(UNBIASED_BLOCK), starts, exact, ulps):
            up = start + (value - start) / abs(value - start) * ulp
            assert ((block == start) | (block == up)).all(), "a rounding that is not one of the two neighbours"
            fraction = abs(value - float(start[0])) / ulp
            # the share rounded away is binomial(n, fraction): within 5 standard deviations
            share = float((block == up).double().mean())
            assert abs(share - fraction) <= 5 * math.sqrt(fraction * (1 - fraction) / UNBIASED_BLOCK), \
                (value, share, fraction)
            assert abs(float(block.mean()) - value) <= 5 * ulp * math.sqrt(fraction * (1 - fraction) / UNBIASED_BLOCK)
    # the counter moved on: the second step drew other bits
    assert not torch.equal(results[0], results[1])
    # round-to-nearest from the same start: every element to its nearest neighbour (the 1/2 fraction to even)
    param, grad, exact, ulps = _unbiased_problem(dtype, device)
    nearest = fusedopt.FusedSGD([param], lr=UNBIASED_LR)
    param.grad = grad
    nearest.step()
    assert torch.equal(param.detach(), torch.tensor(exact, dtype=FP32).repeat_interleave(UNBIASED_BLOCK)
                       .to(device=device, dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_fp16_rounding_below_its_normal_range_is_unbiased(device):
    """Below 2^-14 fp16's spacing stays 2^-24 (storage.h shifts such values into [2^-14, 2^-13) to round them):
    through its subnormals, below 2^-24 and just under 2^-14, in either sign, each value rounds to one of its two
    neighbours, away from zero in the share its distance says, and a negative value rounding to zero keeps -0."""
    spacing, n = 2.0**-24, 4096
    multiples = [0.3, 1.7, 100.25, 1023.6]
    values = [sign * m * spacing for m in multiples for sign in (1, -1)]
    param = torch.zeros(len(values) * n, dtype=FP16, device=device, requires_grad=True)
    opt = fusedopt.FusedSGD([param], lr=0.0, master_weights=True, param_rounding="stochastic", seed=6)
    param.grad = torch.zeros_like(param)
    opt.step()  # creates the master copy; lr 0 leaves it as it is set below
    opt.state[param]["master_param"].copy_(torch.tensor(values, dtype=FP32).repeat_interleave(n))
    opt.step()
    for value, block in zip(values, param.detach().cpu().split(n)):
        low = math.trunc(value / spacing) * spacing
        away = low + math.copysign(spacing, value)
        got = block.double()
        assert ((got == low) | (got == away)).all(), (value, got.unique().tolist())
        fraction = abs(value - low) / spacing
        share = float((got == away).double().mean())
        assert abs(share - fraction) <= 5 * math.sqrt(fraction * (1 - fraction) / n), (value, share, fraction)
        zeros = block[got == 0]
        assert bool((torch.signbit(zeros) == (value < 0)).all()), value


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_values_past_the_largest_finite_keep_it_in_either_sign(device):
    """Between 65504 and fp16's overflow threshold (65520) the far neighbour is inf, at no finite distance:
    stochastic rounding keeps +-65504, as round-to-nearest does, for negative values as for positive ones."""
    start = torch.tensor([65504.0, -65504.0]).repeat_interleave(512).to(device=device, dtype=FP16)
    param = start.clone().requires_grad_()
    opt = fusedopt.FusedSGD([param], lr=1.0, param_rounding="stochastic", seed=3)
    param.grad = -start.sign() * 12  # |p| = 65516
    opt.step()
    assert torch.equal(param.detach(), start)


@pytest.mark.parametrize("device", DEVICES)
def test_neighbouring_elements_round_independently(device):
    """bf16 elements 2j and 2j + 1 take the two halves of one 32-bit draw (storage.h's random_bits16), and a
    vector kernel handles 16 or 32 of them at once: the roundings of neighbours at those distances must still be
    independent (each rounds up with probability 1/2 here, both with 1/4)."""
    n = 2**16
    param = torch.ones(n, dtype=BF16, device=device, requires_grad=True)
    opt = fusedopt.FusedSGD([param], lr=1.0, param_rounding="stochastic", seed=7)
    param.grad = torch.full((n,), -(2.0**-8), dtype=BF16, device=device)  # half of bf16's ulp at 1
    opt.step()
    rounded = param.detach().double().cpu()
    assert ((rounded == 1) | (rounded == 1 + 2.0**-7)).all()
    up = (rounded > 1).double()
    assert abs(float(up.mean()) - 0.5) <= 5 * math.sqrt(0.25 / n)
    for lag in (1, 2, 8, 16, 32):
        starts = torch.arange(0, n - lag, 2 * lag if lag == 1 else 1)
        both = float((up[starts] * up[starts + lag]).mean())
        assert abs(both - 0.25) <= 5 * math.sqrt(0.25 * 0.75 / len(starts)), (lag, both)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_of_state_buffers_is_unbiased(device):
    """fp32 params with bf16 state: SGD's first momentum buffer is the grad, rounded stochastically; with
    nearest, every element rounds down (77/256 of an ulp above 1)."""
    n = 2**16
    value = 1 + 77 / 256 * 2.0**-7
    for rounding, expected_share in (("stochastic", 77 / 256), ("nearest", 0.0)):
        param = torch.zeros(n, device=device, requires_grad=True)
        opt = fusedopt.FusedSGD([param], lr=0.0, momentum=0.9, state_dtype=BF16, param_rounding=rounding, seed=3)
        param.grad = torch.full((n,), value, device=device)
        opt.step()
        buffer = opt.state[param]["momentum_buffer"]
        assert buffer.dtype == BF16
        buffer = buffer.double().cpu()
        assert ((buffer == 1) | (buffer == 1 + 2.0**-7)).all()
        share = float((buffer > 1).double().mean())
        assert abs(share - expected_share) <= 5 * math.sqrt(expected_share * (1 - expected_share) / n)
        if rounding == "stochastic":
            assert abs(float(buffer.mean()) - value) <= 5 * 2.0**-7 * math.sqrt(0.3 * 0.7 / n)
        assert torch.equal(param.detach(), torch.zeros(n, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_the_seed_makes_runs_reproducible(device):
    (a,), _ = _round_once(BF16, device, seed=123)
    (b,), _ = _round_once(BF16, device, seed=123)
    (c,), _ = _round_once(BF16, device, seed=124)
    assert torch.equal(bits(a), bits(b))
    assert not torch.equal(a, c)


def test_torch_manual_seed_fixes_the_default_seed():
    p = torch.zeros(3, dtype=BF16, requires_grad=True)
    seeds = []
    for manual in (0, 0, 1):
        torch.manual_seed(manual)
        seeds.append(fusedopt.FusedAdam([p], param_rounding="stochastic").low_precision.seed)
    assert seeds[0] == seeds[1] != seeds[2]
    assert isinstance(seeds[0], int) and 0 <= seeds[0] < 2**62
    # other optimizers draw nothing from torch's generator, as torch.optim's do not
    state = torch.get_rng_state()
    opt = fusedopt.FusedAdam([p], master_weights=True, state_dtype=FP32)
    assert torch.equal(state, torch.get_rng_state()) and opt.low_precision.seed is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_round_identically():
    for dtype in LOW:
        (on_cpu,), _ = _round_once(dtype, "cpu", seed=77)
        (on_cuda,), _ = _round_once(dtype, "cuda", seed=77)
        assert torch.equal(bits(on_cpu), bits(on_cuda.cpu())), dtype


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
_ROUNDING = r"Invalid param_rounding value: {} \(expected one of 'nearest', 'stochastic', 'kahan'\)"
_MASTER = r"Invalid master_weights value: {} \(expected True or False\)"
_STATE = r"Invalid state_dtype value: {} \(expected None, torch.float32 or torch.bfloat16\)"
_SEED = r"Invalid seed value: {} \(expected None or an int in \[-2\*\*63, 2\*\*63\)\)"
BAD_OPTIONS = (
    ({"param_rounding": "round"}, _ROUNDING.format("'round'")),
    ({"param_rounding": "Nearest"}, _ROUNDING.format("'Nearest'")),
    ({"param_rounding": None}, _ROUNDING.format("None")),
    ({"param_rounding": 1}, _ROUNDING.format("1")),
    ({"master_weights": 1}, _MASTER.format("1")),
    ({"master_weights": "yes"}, _MASTER.format("'yes'")),
    ({"master_weights": None}, _MASTER.format("None")),
    ({"state_dtype": torch.float16}, _STATE.format(r"torch\.float16")),
    ({"state_dtype": torch.float64}, _STATE.format(r"torch\.float64")),
    ({"state_dtype": torch.int32}, _STATE.format(r"torch\.int32")),
    ({"state_dtype": "bfloat16"}, _STATE.format("'bfloat16'")),
    ({"seed": 1.5}, _SEED.format(r"1\.5")),
    ({"seed": "1"}, _SEED.format("'1'")),
    ({"seed": True}, _SEED.format("True")),
    ({"seed": 2**63}, _SEED.format(str(2**63))),
    ({"param_rounding": "kahan", "master_weights": True},
     r"param_rounding='kahan' and master_weights=True exclude each other: .*"),
    # ours are checked first, so also with an argument torch would reject
    ({"param_rounding": "kahan", "master_weights": True, "lr": -1.0}, r"param_rounding='kahan' and .*"),
)


@pytest.mark.parametrize("options,match", [pytest.param(o, m, id=",".join(f"{k}={v!r}" for k, v in o.items()))
                                           for o, m in BAD_OPTIONS])
@pytest.mark.parametrize("entry", entry_params())
def test_bad_options_raise_and_change_nothing(entry, options, match):
    p = torch.ones(3, dtype=BF16, requires_grad=True)
    generator = torch.get_rng_state()
    with pytest.raises(ValueError, match="^" + match + "$"):
        entry.fused_cls([p], **options)
    assert torch.equal(p.detach(), torch.ones(3, dtype=BF16)) and p.grad is None
    assert torch.equal(generator, torch.get_rng_state()), "a failing constructor drew from torch's generator"


@pytest.mark.parametrize("entry", entry_params())
def test_options_are_keyword_only_and_read_back(entry):
    parameters = inspect.signature(entry.fused_cls).parameters
    for name, default in _low_precision.OPTIONS.items():
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY and parameters[name].default == default
    p = torch.ones(3, requires_grad=True)
    defaults = entry.fused_cls([p]).low_precision
    assert (defaults.param_rounding, defaults.master_weights, defaults.state_dtype, defaults.seed) == \
        ("nearest", False, None, None)
    for options in ({"param_rounding": "stochastic", "seed": 0}, {"param_rounding": "kahan", "state_dtype": FP32},
                    {"master_weights": True, "param_rounding": "stochastic", "seed": -(2**63)},
                    {"state_dtype": BF16, "seed": 2**63 - 1}):
        options_read = entry.fused_cls([p], **options).low_precision
        for name, value in options.items():
            assert getattr(options_read, name) == value
        with pytest.raises(AttributeError):
            options_read.param_rounding = "nearest"  # the plan is built from them: fixed at construction


# --------------------------------------------------------------------------------------------------
# State: lazily created, checked, converted
# --------------------------------------------------------------------------------------------------
def test_a_state_of_the_wrong_dtype_is_rejected_before_anything_changes():
    p, q = torch.ones(4, requires_grad=True), torch.ones(4, dtype=BF16, requires_grad=True)
    opt = fusedopt.FusedAdam([p, q], lr=0.1, state_dtype=BF16, master_weights=True)
    p.grad, q.grad = torch.ones(4), torch.ones(4, dtype=BF16)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == BF16 and opt.state[q]["master_param"].dtype == FP32
    cases = (
        (p, "exp_avg", lambda t: t.float(), "a state buffer must match its param in shape and device and be "
                                            "torch.bfloat16"),
        (q, "master_param", lambda t: t.to(BF16), "'master_param' must match its param in shape and device and be "
                                                  "torch.float32"),
        (q, "master_param", lambda t: t[:2], "'master_param' must match"),
    )
    for param, key, change, message in cases:
        good = opt.state[param][key]
        opt.state[param][key] = change(good)
        snapshot, values = clone_state(opt), (p.detach().clone(), q.detach().clone())
        with pytest.raises(RuntimeError, match=re.escape(message)):
            opt.step()
        assert_state_identical(opt, snapshot)
        assert torch.equal(p.detach(), values[0]) and torch.equal(q.detach(), values[1])
        opt.state[param][key] = good
    opt.step()


@pytest.mark.parametrize("mode_id", ["kahan", "master", "state_fp32"])
def test_a_cached_plan_notices_an_extra_or_buffer_changed_in_place(mode_id):
    """`.data = ...` keeps the tensor object the plan holds: the plan's guard still sees the new dtype."""
    mode = MODES[mode_id]
    q = torch.ones(4, dtype=BF16, requires_grad=True)
    opt = fusedopt.FusedAdam([q], lr=0.1, **mode.options)
    q.grad = torch.ones(4, dtype=BF16)
    opt.step()
    key = mode.extra or "exp_avg"
    good = opt.state[q][key].data
    opt.state[q][key].data = good.double()
    with pytest.raises(RuntimeError, match=re.escape(f"state[{key!r}]")):
        opt.step()
    opt.state[q][key].data = good
    opt.step()


def test_kahan_comp_must_have_the_param_dtype():
    q = torch.ones(4, dtype=BF16, requires_grad=True)
    opt = fusedopt.FusedSGD([q], lr=0.1, param_rounding="kahan")
    q.grad = torch.ones(4, dtype=BF16)
    opt.step()
    opt.state[q]["kahan_comp"] = opt.state[q]["kahan_comp"].float()
    with pytest.raises(RuntimeError, match=re.escape("'kahan_comp' must match its param in shape, dtype and device")):
        opt.step()


def test_state_created_by_torch_is_converted():
    """Adagrad creates `sum` in its constructor, in the param's dtype: it is kept in the state dtype."""
    p = torch.ones(3, requires_grad=True)
    opt = fusedopt.FusedAdagrad([p], initial_accumulator_value=0.3, state_dtype=BF16)
    assert opt.state[p]["sum"].dtype == BF16 and torch.equal(opt.state[p]["sum"], torch.full((3,), 0.3).to(BF16))
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state[p]["sum"].dtype == BF16


@pytest.mark.parametrize("mode_id", ["kahan", "master", "master_stochastic"])
def test_a_torch_state_gets_its_extras_when_loaded(mode_id):
    """torch.optim's state lacks master_param / kahan_comp: they are created at the next step, the master from
    the param's current value, the compensation at zero."""
    mode = MODES[mode_id]
    problem = Problem(SPECS, "cpu", seed=4)
    torch_run = Run(ENTRY_BY_NAME["adam"], problem, (BF16,), cls=torch.optim.Adam).train(0, 3)
    run = Run(ENTRY_BY_NAME["adam"], problem, (BF16,), mode.options)
    with torch.no_grad():
        for p, q in zip(run.params[BF16], torch_run.params[BF16]):
            p.copy_(q)
    run.opt.load_state_dict(_checkpoint(torch_run.opt.state_dict()))
    run.set_grads(3)
    run.opt._op_invocations()  # creates the state as step() would, without stepping
    for p in run.params[BF16]:
        extra = run.state(p)[mode.extra]
        expected = p.detach().float() if mode.extra == "master_param" else torch.zeros_like(p)
        _assert_same_bits(mode.extra, extra, expected)
    run.opt.step()


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------
CHECKPOINT_AT, RESUMED_STEPS = 4, 4


@pytest.mark.parametrize("dst_stepped", [False, True], ids=["fresh_dst", "stepped_dst"])
@pytest.mark.parametrize("entry,mode_id", _registry_modes())
def test_resume_is_exact(entry, mode_id, dst_stepped):
    """Continuing after save + load (a new optimizer, possibly one that has stepped already and has another
    seed) equals continuing without, bit for bit: params, every state entry, the random stream."""
    mode = MODES[mode_id]
    problem = Problem(SPECS, "cpu", seed=5)
    dtypes = (mode.dtype, FP32) if mode.dtype != FP32 else (FP32, FP64)
    src = Run(entry, problem, dtypes, mode.options).train(0, CHECKPOINT_AT)
    saved = _checkpoint(src.opt.state_dict())
    weights = {d: [p.detach().clone() for p in ps] for d, ps in src.params.items()}
    src.train(CHECKPOINT_AT, CHECKPOINT_AT + RESUMED_STEPS)

    if mode.stochastic:
        assert saved[RNG_KEY] == {"seed": 11, "counters": {"cpu": CHECKPOINT_AT * _stochastic_launches(src.opt)}}
    else:
        assert RNG_KEY not in saved
    for index, state in saved["state"].items():
        if mode.extra and mode.extra in state:
            assert state[mode.extra].dtype == (FP32 if mode.extra == "master_param" else mode.dtype)

    options = {**mode.options, "seed": 999} if mode.stochastic else mode.options
    dst = Run(entry, problem, dtypes, options)
    if dst_stepped:
        dst.train(20, 22)  # other grads: a state and a counter to replace
    with torch.no_grad():
        for d, ps in dst.params.items():
            for p, w in zip(ps, weights[d]):
                p.copy_(w)  # the model's weights are restored separately, as in a real resume
    dst.opt.load_state_dict(saved)
    dst.train(CHECKPOINT_AT, CHECKPOINT_AT + RESUMED_STEPS)
    for d in dtypes:
        _assert_identical(f"{d}", dst, dst.params[d], src, src.params[d])
    if mode.stochastic:
        assert dst.opt.low_precision.seed == 11
        assert _counter(dst.opt) == _counter(src.opt)
        assert dst.opt.state_dict()[RNG_KEY] == src.opt.state_dict()[RNG_KEY]


@pytest.mark.parametrize("entry,mode_id", _registry_modes())
def test_state_dicts_load_into_torch(entry, mode_id):
    """state_dict_for_torch() is what torch.optim would have saved; torch.optim also loads state_dict() as it
    is (it ignores the extras and "fusedopt_rng") and then steps exactly as from state_dict_for_torch()."""
    mode = MODES[mode_id]
    problem = Problem(SPECS, "cpu", seed=6)
    dtypes = (mode.dtype, FP64)
    src = Run(entry, problem, dtypes, mode.options).train(0, CHECKPOINT_AT)
    full, for_torch = src.opt.state_dict(), src.opt.state_dict_for_torch()
    params = [p for group in src.opt.param_groups for p in group["params"]]
    assert set(for_torch) == {"state", "param_groups"} and for_torch["param_groups"] == full["param_groups"]
    scalars = set(fusedopt._ops.spec(entry.fused_cls._op_name).scalars)
    for index, state in for_torch["state"].items():
        assert not set(state) & set(EXTRAS)
        for key, value in state.items():
            if key not in scalars:
                assert value.dtype == params[index].dtype, key

    def resumed(state_dict, cls):
        run = Run(entry, problem, dtypes, cls=cls)
        with torch.no_grad():
            for d, ps in run.params.items():
                for p, w in zip(ps, src.params[d]):
                    p.copy_(w)
        run.opt.load_state_dict(_checkpoint(state_dict))
        return run.train(CHECKPOINT_AT, CHECKPOINT_AT + RESUMED_STEPS)

    from_full, from_for_torch = resumed(full, entry.torch_cls), resumed(for_torch, entry.torch_cls)
    for d in dtypes:
        for i, (p, q) in enumerate(zip(from_full.params[d], from_for_torch.params[d])):
            assert torch.isfinite(p.detach()).all()
            _assert_same_bits(f"{d} param {i}", p.detach(), q.detach())
    # fusedopt with the default options continues from state_dict_for_torch() as torch does (fp32/fp64 params)
    if mode.dtype == FP32:
        fused = resumed(for_torch, entry.fused_cls)
        tolerance = TOLERANCES[FP32] if not entry.ill_conditioned else {"rtol": 1e-4, "atol": 1e-4}
        for p, q in zip(fused.params[FP32], from_for_torch.params[FP32]):
            torch.testing.assert_close(p.detach(), q.detach(), **tolerance)


def test_torch_optim_ignores_unknown_top_level_keys():
    """What loading state_dict() into torch.optim relies on."""
    p = torch.ones(3, requires_grad=True)
    opt = torch.optim.Adam([p])
    sd = opt.state_dict()
    sd[RNG_KEY] = {"seed": 1, "counters": {"cpu": 3}}
    opt.load_state_dict(sd)
    assert set(opt.state_dict()) == {"state", "param_groups"}


def test_a_malformed_rng_entry_is_rejected_before_loading():
    p = torch.ones(3, dtype=BF16, requires_grad=True)
    opt = fusedopt.FusedAdam([p], param_rounding="stochastic", seed=1)
    p.grad = torch.ones(3, dtype=BF16)
    opt.step()
    sd = _checkpoint(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.5
    sd[RNG_KEY] = {"seed": "x"}
    with pytest.raises(ValueError, match="Invalid 'fusedopt_rng' entry"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 1e-3


def test_a_state_dict_without_the_stream_keeps_the_current_one():
    """torch.optim's state dict (no "fusedopt_rng") into a stochastic optimizer: its seed and counter stay."""
    p = torch.ones(3, dtype=BF16, requires_grad=True)
    opt = fusedopt.FusedAdam([p], param_rounding="stochastic", seed=4)
    p.grad = torch.ones(3, dtype=BF16)
    opt.step()
    opt.load_state_dict(opt.state_dict_for_torch())
    assert opt.low_precision.seed == 4 and _counter(opt) == 1


def test_extras_the_options_do_not_use_are_dropped_on_load():
    p = torch.ones(3, dtype=BF16, requires_grad=True)
    opt = fusedopt.FusedAdam([p], master_weights=True)
    p.grad = torch.ones(3, dtype=BF16)
    opt.step()
    kahan = fusedopt.FusedAdam([p], param_rounding="kahan")
    kahan.load_state_dict(opt.state_dict())
    assert "master_param" not in kahan.state[p]
    kahan.step()
    assert set(kahan.state[p]) == {"step", "exp_avg", "exp_avg_sq", "kahan_comp"}


# --------------------------------------------------------------------------------------------------
# With GradScaler, max_grad_norm and device schedules
# --------------------------------------------------------------------------------------------------
SCALE = 2.0**4
SKIPPED = 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode_id", ["stochastic", "kahan", "master_stochastic"])
def test_grad_scaler_skips_and_unscales(mode_id, device):
    """An inf grad skips the step: params, master copies, compensations, moments and the random stream are
    left as they were. The other steps unscale exactly (a power-of-two scale): the result equals an unscaled
    run that never saw the skipped step, bit for bit."""
    mode = MODES[mode_id]
    entry = ENTRY_BY_NAME["adam"]
    problem = Problem(SPECS, device, seed=8)
    scaled = Run(entry, problem, (BF16, FP32), mode.options)
    plain = Run(entry, problem, (BF16, FP32), mode.options)
    scaler = torch.amp.GradScaler(device, init_scale=SCALE, growth_interval=1000)
    scaler.scale(torch.ones((), device=device))
    for t in range(5):
        scale = scaler.get_scale()
        scaled.set_grads(t, scale=scale)
        if t == SKIPPED:
            scaled.params[BF16][0].grad.view(-1)[3] = math.inf
            before = clone_state(scaled.opt)
            weights = [p.detach().clone() for d in (BF16, FP32) for p in scaled.params[d]]
            counter = _counter(scaled.opt) if mode.stochastic else None
        scaler.step(scaled.opt)
        scaler.update()
        if t == SKIPPED:
            assert scaler.get_scale() == scale / 2
            assert_state_identical(scaled.opt, before)
            now = [p.detach() for d in (BF16, FP32) for p in scaled.params[d]]
            assert all(torch.equal(bits(p), bits(w)) for p, w in zip(now, weights))
            if mode.stochastic:
                assert _counter(scaled.opt) == counter
            continue
        plain.set_grads(t)
        plain.opt.step()
    for d in (BF16, FP32):
        _assert_identical(f"{d}", scaled, scaled.params[d], plain, plain.params[d])


def _fp32_twins(entry, problem, extra_kwargs=None, schedule=None, steps=8):
    """bf16 params with master_weights=True and state_dtype=float32 against fp32 params (the same values and
    grads): the masters and the state follow the fp32 run, and each param is its master rounded to nearest."""
    kwargs = {**_kwargs(entry), **(extra_kwargs or {})}
    run = Run(entry, problem, (BF16,), {"master_weights": True, "state_dtype": FP32}, kwargs=kwargs)
    ref = Run(entry, problem, (FP32,), via=BF16, kwargs=kwargs)
    schedules = [schedule(run.opt), schedule(ref.opt)] if schedule else []
    run.train(0, steps)
    ref.train(0, steps)
    tolerance = TOLERANCES[FP32] if not entry.ill_conditioned else {"rtol": 1e-4, "atol": 1e-4}
    scalars = set(fusedopt._ops.spec(entry.fused_cls._op_name).scalars)
    for i, (p, r) in enumerate(zip(run.params[BF16], ref.params[FP32])):
        master = run.state(p)["master_param"]
        torch.testing.assert_close(master, r.detach(), **tolerance, msg=lambda m: f"param {i} master: {m}")
        _assert_same_bits(f"param {i} vs its master", p.detach(), master.to(BF16))
        for key, value in ref.state(r).items():
            if key not in scalars:
                torch.testing.assert_close(run.state(p)[key], value, **tolerance)
    return run, ref, schedules


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", entry_params())
def test_master_weights_with_fp32_state_is_fp32_training(entry, device):
    _fp32_twins(entry, Problem(SPECS, device, seed=9))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sgd", "adam", "lamb"])
def test_master_weights_with_max_grad_norm(name, device):
    """Clipping by the global norm of the bf16 grads: the same factor as the fp32 run of the same grad values."""
    entry = ENTRY_BY_NAME[name]
    _fp32_twins(entry, Problem(SPECS, device, seed=10), {"max_grad_norm": 1.0})


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_draws_once_per_update_launch_with_clipping(device):
    """With clipping the grads are reduced (in the same launch, or before the updates on several launches):
    a reduce-only launch rounds nothing and must not advance the stream."""
    problem = Problem(SPECS, device, seed=12)
    run = Run(ENTRY_BY_NAME["adam"], problem, (BF16, FP32),
              {"param_rounding": "stochastic", "state_dtype": BF16, "seed": 2}, kwargs={"max_grad_norm": 1.0})
    unclipped = Run(ENTRY_BY_NAME["adam"], problem, (BF16, FP32),
                    {"param_rounding": "stochastic", "state_dtype": BF16, "seed": 2}, kwargs={})
    run.train(0, 3)
    unclipped.train(0, 3)
    assert _stochastic_launches(run.opt) == 2  # bf16 params; fp32 params with bf16 state
    assert _counter(run.opt) == 3 * 2 == _counter(unclipped.opt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_master_weights_with_a_device_schedule(name, device):
    entry = ENTRY_BY_NAME[name]
    run, ref, _ = _fp32_twins(entry, Problem(SPECS, device, seed=13),
                              schedule=lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=5, per_step=True))
    assert run.opt.param_groups[0]["lr"].item() == ref.opt.param_groups[0]["lr"].item() != _kwargs(entry).get("lr")


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_with_a_device_schedule_resumes_exactly(device):
    """A per-step schedule advanced in the launch, stochastic rounding, a checkpoint in between."""
    entry = ENTRY_BY_NAME["adamw"]
    problem = Problem(SPECS, device, seed=14)

    def make():
        run = Run(entry, problem, (BF16,), {"param_rounding": "stochastic", "seed": 21})
        return run, lr_scheduler.StepLR(run.opt, step_size=2, gamma=0.5, per_step=True)

    src, src_sched = make()
    src.train(0, 3)
    saved = _checkpoint({"opt": src.opt.state_dict(), "sched": src_sched.state_dict()})
    weights = [p.detach().clone() for p in src.params[BF16]]
    src.train(3, 7)
    dst, dst_sched = make()
    with torch.no_grad():
        for p, w in zip(dst.params[BF16], weights):
            p.copy_(w)
    dst.opt.load_state_dict(saved["opt"])
    dst_sched.load_state_dict(saved["sched"])
    dst.train(3, 7)
    _assert_identical("bf16", dst, dst.params[BF16], src, src.params[BF16])
