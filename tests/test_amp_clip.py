"""max_grad_norm (global grad-norm clipping applied inside the step) and torch.amp.GradScaler support (grads
unscaled and inf/NaN-checked inside the step), alone and together and with a per_step device LR schedule,
against torch.optim + torch.nn.utils.clip_grad_norm_ + the same GradScaler (+ torch's scheduler stepped on the
non-skipped steps only). Driven by one table of cases; CPU always, CUDA through conftest.DEVICES."""
import dataclasses
import inspect
import math
import re
import zlib

import pytest
import torch

from conftest import (
    DEVICES,
    DTYPE_IDS,
    ILL_CONDITIONED_FP32_TOLERANCE,
    SHAPE_SETS,
    STEPS,
    TOLERANCES,
    Problem,
    assert_matches,
    assert_moved,
    assert_state_identical,
    bits,
    clone_state,
)
from registry import ENTRIES, ENTRY_BY_NAME, entry_params

FP32, FP64 = torch.float32, torch.float64
MIXED = (FP32, FP64)  # params alternate dtypes: two launches per step, yet one global norm and one skip decision

# The grads are N(0, 1) on the "groups" shape set (43 or 44 elements per step), so their global norm is
# about 6.6 and moves by about +-0.7 from step to step (the reference run asserts which steps clipped).
STRADDLE = 6.6  # clips on some steps and not on others
ALWAYS = 1.0
NEVER = 1e3  # never clips: the result must be the unclipped one

# Power-of-two scales: scaling and unscaling are exact, so fusedopt and torch see the same unscaled values.
# growth_interval=4: the scale also grows during the run.
SCALER_KWARGS = {"init_scale": 2.0**10, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 4}
# step -> (param index, value) written into one element of that param's scaled grad, so the step is skipped.
# Step 0: a skipped *first* step (torch creates no state at all); 7 and 8: two in a row. In MIXED cases the
# odd params are fp64, so inf/NaN appear in the fp32 launch (0, 4) and in the fp64 one (1, 3, 5): both skip.
NONFINITE = {0: (3, math.inf), 7: (0, math.nan), 8: (5, -math.inf), 21: (4, math.nan), 33: (1, math.inf)}

# name -> factory(module, optimizer, **kwargs): fusedopt.lr_scheduler (per_step=True) or torch.optim.lr_scheduler.
# T_max is shorter than the run, so the cosine passes its minimum and turns back up.
SCHEDULES = {
    "cosine": lambda mod, opt, **kw: mod.CosineAnnealingLR(opt, T_max=STEPS // 2, eta_min=1e-4, **kw),
    "step": lambda mod, opt, **kw: mod.StepLR(opt, step_size=4, gamma=0.7, **kw),
}


@dataclasses.dataclass(frozen=True)
class Case:
    entry: str  # registry name
    opt_id: str  # registry option set
    max_grad_norm: float = None
    amp: str = None  # None | "scaler": scaler.step(opt) alone | "unscale_": scaler.unscale_(opt) first
    dtypes: tuple = (FP32,)  # param i has dtypes[i % len(dtypes)]
    schedule: str = None  # a SCHEDULES key
    user_clip: bool = False  # the fused run clips as torch users do (unscale_ + clip_grad_norm_), not in-kernel

    @property
    def id(self):
        parts = [self.entry, self.opt_id, "+".join(DTYPE_IDS[d] for d in self.dtypes)]
        if self.max_grad_norm is not None:
            parts.append(("user_clip" if self.user_clip else "clip") + f"{self.max_grad_norm:g}")
        parts += [x for x in (self.amp, self.schedule) if x]
        return "-".join(parts)


def _clips_itself(entry):
    """Whether the reference takes max_grad_norm and clips by it in its own step (LAMB)."""
    return "max_grad_norm" in inspect.signature(entry.torch_cls).parameters


def _rich(name):
    return ENTRY_BY_NAME[name].representative[-1]


CASES = (
    # max_grad_norm alone, every algorithm's richest option set; the norm crosses the threshold
    *(Case(e.name, _rich(e.name), max_grad_norm=STRADDLE) for e in ENTRIES),
    Case("sgd", "momentum", max_grad_norm=NEVER),
    Case("adam", "defaults", max_grad_norm=ALWAYS, dtypes=(FP64,)),
    Case("rmsprop", "centered_momentum", max_grad_norm=ALWAYS, dtypes=(FP64,)),
    Case("sgd", "nesterov_wd_maximize", max_grad_norm=ALWAYS, dtypes=MIXED),
    Case("adamw", "amsgrad_wd_maximize", max_grad_norm=STRADDLE, dtypes=MIXED),
    # GradScaler alone: unscaling and the inf/NaN skip in the kernel, every algorithm
    *(Case(e.name, _rich(e.name), amp="scaler") for e in ENTRIES),
    Case("adam", "defaults", amp="scaler", dtypes=(FP64,)),
    Case("rmsprop", "all_options", amp="scaler", dtypes=MIXED),
    # scaler.unscale_(opt) before scaler.step(opt) (torch's pattern for clipping): the grads arrive unscaled
    Case("sgd", "momentum", amp="unscale_"),
    Case("adam", "amsgrad_wd_maximize", max_grad_norm=ALWAYS, amp="unscale_", user_clip=True),
    Case("rmsprop", "momentum", max_grad_norm=STRADDLE, amp="unscale_"),
    # GradScaler + max_grad_norm: the norm is that of the unscaled grads
    Case("sgd", "nesterov_wd_maximize", max_grad_norm=STRADDLE, amp="scaler"),
    Case("adam", "amsgrad_wd_maximize", max_grad_norm=ALWAYS, amp="scaler", dtypes=MIXED),
    Case("adagrad", "all_options", max_grad_norm=ALWAYS, amp="scaler", dtypes=(FP64,)),
    Case("rmsprop", "all_options", max_grad_norm=STRADDLE, amp="scaler"),
    # a per_step device schedule: advanced by the non-skipped steps only
    Case("adam", "defaults", amp="scaler", schedule="cosine"),
    Case("sgd", "momentum", max_grad_norm=STRADDLE, amp="scaler", schedule="step"),
    Case("adamw", "defaults", amp="unscale_", schedule="step", dtypes=MIXED),
    Case("rmsprop", "centered_momentum", max_grad_norm=ALWAYS, schedule="cosine"),
)
assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


def _params(problem, dtypes):
    by_dtype = {d: problem.params(d) for d in dtypes}
    return [by_dtype[dtypes[i % len(dtypes)]][i] for i in range(len(problem.specs))]


def _grads(problem, t, dtypes, scale, nonfinite):
    """Step t's grads in each param's dtype, times `scale`, with NONFINITE[t] written in when `nonfinite`."""
    by_dtype = {d: problem.grads(t, d) for d in dtypes}
    grads = [by_dtype[dtypes[i % len(dtypes)]][i] for i in range(len(problem.specs))]
    grads = [None if g is None else g * scale for g in grads]
    if nonfinite:
        i, value = NONFINITE[t]
        assert grads[i] is not None, "NONFINITE must name a param that has a grad at that step"
        grads[i].view(-1)[t % grads[i].numel()] = value
    return grads


def _scaler(device):
    scaler = torch.amp.GradScaler(device, **SCALER_KWARGS)
    scaler.scale(torch.ones((), device=device))  # creates the scale tensor, as scaler.scale(loss) would
    return scaler


class _Run:
    """One optimizer stepping through a case: fusedopt as the features are meant to be used (max_grad_norm,
    scaler.step, a per_step schedule), or the torch.optim reference (scaler.unscale_ + clip_grad_norm_ on the
    unscaled grads, torch's scheduler stepped only when the scaler did not skip)."""

    def __init__(self, case, problem, fused):
        entry = ENTRY_BY_NAME[case.entry]
        self.case, self.fused = case, fused
        self.params = _params(problem, case.dtypes)
        kwargs = dict(entry.option_sets[case.opt_id])
        if fused and case.max_grad_norm is not None and not case.user_clip:
            kwargs["max_grad_norm"] = case.max_grad_norm
        elif case.max_grad_norm is not None and _clips_itself(entry):
            kwargs["max_grad_norm"] = None  # the case clips outside the step (apply): not twice
        cls = entry.fused_cls if fused else entry.torch_cls
        self.opt = cls(problem.param_arg(self.params, entry.group_overrides), **kwargs)
        self.scaler = _scaler(problem.device.type) if case.amp else None
        self.sched = None
        if case.schedule and fused:
            from fusedopt import lr_scheduler  # imported here: only the schedule cases need the module

            self.sched = SCHEDULES[case.schedule](lr_scheduler, self.opt, per_step=True)
        elif case.schedule:
            self.sched = SCHEDULES[case.schedule](torch.optim.lr_scheduler, self.opt)
        self.scales = []  # the scale after each update()
        self.clipped = []  # reference: whether each non-skipped step clipped

    def scale(self):
        return self.scaler.get_scale() if self.scaler else 1.0

    def set_grads(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.clone()

    def apply(self, skipped):
        case, opt, scaler = self.case, self.opt, self.scaler
        clips_here = case.max_grad_norm is not None and (not self.fused or case.user_clip)
        if scaler is not None and (case.amp == "unscale_" or clips_here):
            scaler.unscale_(opt)
        if clips_here:
            norm = torch.nn.utils.clip_grad_norm_(self.params, case.max_grad_norm)
            if not skipped:
                self.clipped.append(float(norm) + 1e-6 > case.max_grad_norm)
        if scaler is None:
            opt.step()
        else:
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            self.scales.append(scaler.get_scale())
            assert (self.scales[-1] < before) == skipped, "the scaler's skip decision is not the expected one"
        if self.sched is not None and (self.fused or not skipped):
            self.sched.step()  # a no-op for a per_step schedule: the optimizer step advanced it already

    def step(self, grads, skipped):
        self.set_grads(grads)
        self.apply(skipped)


def _tolerance(case):
    entry = ENTRY_BY_NAME[case.entry]
    if FP32 not in case.dtypes:
        return TOLERANCES[FP64]
    # Mixed cases use the fp32 tolerance for their fp64 params too: torch's global norm (hence the clip
    # factor every param gets) includes an fp32-computed norm of the fp32 grads.
    kwargs = entry.option_sets[case.opt_id]
    groups = [kwargs] + [{**kwargs, **o} for o in entry.group_overrides]
    ill = any(g.get(option) for g in groups for option in entry.ill_conditioned)
    return ILL_CONDITIONED_FP32_TOLERANCE if ill else TOLERANCES[FP32]


def _assert_grads_untouched(params, grads):
    for i, (p, g) in enumerate(zip(params, grads)):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(bits(p.grad), bits(g)), f"param {i}: step() modified p.grad"


def _assert_lrs_match(fused_sched, ref_sched, device):
    lrs = fused_sched.lrs
    assert lrs.dtype == torch.float64 and lrs.device.type == device, f"scheduler.lrs: {lrs.dtype} on {lrs.device}"
    expected = ref_sched.get_last_lr()
    assert fused_sched.get_last_lr() == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lrs.cpu().tolist() == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_matches_torch(case, device):
    """STEPS steps: params, every state buffer, step counters, the scale sequence and the LRs agree with the
    torch reference; p.grad keeps the values the user set (the factor is applied in the kernel); a skipped
    step leaves params, state and the device LRs bit-identical."""
    problem = Problem("groups", device, seed=zlib.crc32(case.id.encode()))
    fused, ref = _Run(case, problem, fused=True), _Run(case, problem, fused=False)
    skips = set(NONFINITE) if case.amp else set()
    first_update = min(set(range(STEPS)) - skips)
    for t in range(STEPS):
        skipped = t in skips
        assert fused.scale() == ref.scale()
        grads = _grads(problem, t, case.dtypes, fused.scale(), nonfinite=skipped)
        params_before = [bits(p).clone() for p in fused.params]
        state_before = clone_state(fused.opt)
        lrs_before = fused.sched.lrs.clone() if fused.sched else None
        fused.step(grads, skipped)
        ref.step(grads, skipped)
        if case.amp != "unscale_":  # (with unscale_, GradScaler itself unscales p.grad in place, as in torch)
            _assert_grads_untouched(fused.params, grads)
        if not skipped:
            continue
        changed = [i for i, (p, b) in enumerate(zip(fused.params, params_before)) if not torch.equal(bits(p), b)]
        assert not changed, f"step {t} was skipped, yet it modified params {changed}"
        if t > first_update:
            assert_state_identical(fused.opt, state_before)
        else:  # torch has no state yet; fusedopt may have created it, but must not have counted the step
            steps = [float(s["step"]) for s in fused.opt.state.values() if "step" in s]
            assert not any(steps), f"a skipped first step advanced step counters: {steps}"
        if lrs_before is not None:
            assert torch.equal(bits(fused.sched.lrs), bits(lrs_before)), f"skipped step {t} advanced the schedule"

    assert fused.scales == ref.scales
    if case.max_grad_norm is not None:  # guards the case against testing something else than it says
        expected = {STRADDLE: {True, False}, ALWAYS: {True}, NEVER: {False}}[case.max_grad_norm]
        assert set(ref.clipped) == expected, f"the reference clipped on steps {ref.clipped}"
    assert_moved(ref.params, _params(problem, case.dtypes))
    assert_matches(fused.opt, fused.params, ref.opt, ref.params, **_tolerance(case))
    if case.schedule:
        _assert_lrs_match(fused.sched, ref.sched, device)


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------
BAD_MAX_GRAD_NORMS = [0, 0.0, -1.0, -math.inf, math.inf, math.nan, "1.0", [1.0]]


@pytest.mark.parametrize("value", BAD_MAX_GRAD_NORMS, ids=repr)
@pytest.mark.parametrize("entry", entry_params())
def test_invalid_max_grad_norm_raises(entry, value):
    """Rejected with the same wording everywhere; except that a reference which clips itself (LAMB) accepts 0 as
    "no clipping", and so does its fused class."""
    p = torch.ones(3, requires_grad=True)
    if _clips_itself(entry) and value == 0:
        assert entry.torch_cls([torch.ones(3, requires_grad=True)], max_grad_norm=value).max_grad_norm == 0
        assert entry.fused_cls([p], max_grad_norm=value).max_grad_norm == 0
        return
    with pytest.raises(ValueError, match="^" + re.escape(f"Invalid max_grad_norm value: {value}") + "$"):
        entry.fused_cls([p], max_grad_norm=value)
    assert torch.equal(p.detach(), torch.ones(3)) and p.grad is None


@pytest.mark.parametrize("entry", entry_params())
def test_max_grad_norm_is_keyword_only_and_defaults_to_none(entry):
    """None (no clipping) by default; a reference that clips itself (LAMB) sets the default instead."""
    param = inspect.signature(entry.fused_cls).parameters["max_grad_norm"]
    default = inspect.signature(entry.torch_cls).parameters["max_grad_norm"].default if _clips_itself(entry) else None
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default == default
    assert entry.fused_cls([torch.zeros(2, requires_grad=True)]).max_grad_norm == default
    for value in (None, 1, 0.25, 1e30):  # ints and tiny / huge positive values are valid
        assert entry.fused_cls([torch.zeros(2, requires_grad=True)], max_grad_norm=value).max_grad_norm == value


BAD_PARAM = 4  # the (2, 5) param of the last group: earlier params and groups are valid
# every param has a grad at every step, so the failing step uses the same params as the cached plan
SPECS_ALWAYS = tuple(dataclasses.replace(s, grad="always") for s in SHAPE_SETS["groups"])


def _bad_grad(kind, p):
    if kind == "sparse":
        return torch.randn(p.shape, device=p.device).to_sparse()
    if kind == "wrong_dtype":
        return torch.randn(p.shape, device=p.device, dtype=torch.float64)
    if kind == "wrong_shape_same_numel":
        return torch.randn(tuple(reversed(p.shape)), device=p.device)
    raise ValueError(kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["sparse", "wrong_dtype", "wrong_shape_same_numel"])
@pytest.mark.parametrize("variant", ["clip", "clip_amp_schedule"])
@pytest.mark.parametrize("entry", entry_params())
def test_bad_grad_raises_before_anything_is_modified(entry, variant, kind, device):
    """A step with an unusable grad raises before the norm / inf reduction or any update leaves a trace:
    params, state, p.grad, the scale and the device LRs are unchanged, and the next steps match torch
    (e.g. no half-accumulated grad norm is carried into them)."""
    amp = variant == "clip_amp_schedule"
    case = Case(entry.name, _rich(entry.name), max_grad_norm=ALWAYS, amp="scaler" if amp else None,
                schedule="cosine" if amp else None)
    problem = Problem(SPECS_ALWAYS, device, seed=8)
    fused, ref = _Run(case, problem, fused=True), _Run(case, problem, fused=False)
    for t in range(3):
        grads = _grads(problem, t, case.dtypes, ref.scale(), nonfinite=False)
        fused.step(grads, False)
        ref.step(grads, False)

    fused.set_grads(_grads(problem, 3, case.dtypes, fused.scale(), nonfinite=False))
    bad = _bad_grad(kind, fused.params[BAD_PARAM])
    if kind == "sparse":
        fused.params[BAD_PARAM].grad = bad
    else:
        fused.params[BAD_PARAM].grad.data = bad  # bypasses the setter's checks, as a buggy hook could
    params_before = [bits(p).clone() for p in fused.params]
    grads_before = [None if p.grad.is_sparse else bits(p.grad).clone() for p in fused.params]
    state_before = clone_state(fused.opt)
    scale_before = fused.scale()
    lrs_before = fused.sched.lrs.clone() if amp else None
    with pytest.raises(RuntimeError):
        fused.apply(skipped=False)
    changed = [i for i, (p, b) in enumerate(zip(fused.params, params_before)) if not torch.equal(bits(p), b)]
    assert not changed, f"params {changed} were modified by the failed step"
    assert_state_identical(fused.opt, state_before)
    for i, (p, b) in enumerate(zip(fused.params, grads_before)):
        assert b is None or torch.equal(bits(p.grad), b), f"param {i}: the failed step modified p.grad"
    assert fused.scale() == scale_before
    if amp:
        assert torch.equal(bits(fused.sched.lrs), bits(lrs_before)), "the failed step advanced the schedule"

    # GradScaler deletes the grad_scale / found_inf it set on the optimizer only after a step that returned
    # (its next step() would multiply a leftover grad_scale in); its pending inf check is simply redone.
    for name in ("grad_scale", "found_inf"):
        fused.opt.__dict__.pop(name, None)
    for t in range(3, 6):
        grads = _grads(problem, t, case.dtypes, ref.scale(), nonfinite=False)
        fused.step(grads, False)
        ref.step(grads, False)
    assert fused.scales == ref.scales  # the failed step made no update()
    assert_matches(fused.opt, fused.params, ref.opt, ref.params, **_tolerance(case))
    if amp:
        _assert_lrs_match(fused.sched, ref.sched, device)
