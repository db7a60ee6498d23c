"""fusedopt.references (Lion, LAMB) checked independently of fusedopt's kernels.

- Against float64 NumPy transcriptions of the papers' pseudo-code (Lion: Chen et al. 2023, Algorithm 2; LAMB:
  NVIDIA apex FusedLAMB with adam_w_mode, grad averaging, bias correction and NVLAMB's trust ratio), for
  every option set and the group overrides of the registry rows, with grads that come and go.
- Against independent public implementations when they are installed
  (`pip install lion-pytorch torch-optimi pytorch-optimizer`); skipped with the reason otherwise.
- Validation (type and message in torch.optim's wording), sparse grads, state layout, state_dict round trip,
  maximize, weight decay, zero-norm trust ratio, clipping on/off without touching `.grad`.
"""
import copy
import io
import math

import numpy as np
import pytest
import torch

from conftest import DEVICES, PSpec, Problem
from fusedopt.references import LAMB, Lion
from registry import ENTRY_BY_NAME

STEPS = 20
FP64_TOL = {"rtol": 1e-12, "atol": 1e-14}
LION, LAMB_ENTRY = ENTRY_BY_NAME["lion"], ENTRY_BY_NAME["lamb"]


def _option_params(entry):
    return [pytest.param(opt_id, id=opt_id) for opt_id in entry.option_sets]


# --------------------------------------------------------------------------------------------------
# float64 transcriptions of the papers' pseudo-code
# --------------------------------------------------------------------------------------------------
def lion_paper(theta, m, g, *, lr, betas, weight_decay, maximize):
    """Chen et al. 2023, Algorithm 2 (one param): returns the new (theta, m)."""
    beta1, beta2 = betas
    g = -g if maximize else g
    c = beta1 * m + (1 - beta1) * g
    theta = theta - lr * (np.sign(c) + weight_decay * theta)
    m = beta2 * m + (1 - beta2) * g
    return theta, m


def lamb_apex(theta, m, v, g, t, *, lr, betas, eps, weight_decay, maximize):
    """apex FusedLAMB, adam_w_mode=True, grad_averaging, bias_correction, use_nvlamb (one param, step t,
    already clipped gradient): returns the new (theta, m, v)."""
    beta1, beta2 = betas
    g = -g if maximize else g
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    update = (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps) + weight_decay * theta
    param_norm, update_norm = np.linalg.norm(theta), np.linalg.norm(update)
    ratio = param_norm / update_norm if param_norm != 0 and update_norm != 0 else 1.0
    return theta - lr * ratio * update, m, v


def clip_factor(grads, max_grad_norm):
    """torch.nn.utils.clip_grad_norm_'s factor for the global norm of `grads`."""
    if not max_grad_norm:
        return 1.0
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    return min(1.0, max_grad_norm / (norm + 1e-6))


def _tensor(array):
    return torch.as_tensor(np.asarray(array, dtype=np.float64))  # 0-dim results are NumPy scalars


class Transcription:
    """Runs the NumPy pseudo-code beside an optimizer: same hyperparameters per group, lazy per-param state
    (created on a param's first grad, as torch.optim does), grads taken from the params before each step."""

    def __init__(self, opt, is_lamb):
        self.opt, self.is_lamb = opt, is_lamb
        self.theta = {p: p.detach().numpy().copy() for g in opt.param_groups for p in g["params"]}
        self.state = {}

    def step(self):
        groups = self.opt.param_groups
        with_grad = [[p for p in g["params"] if p.grad is not None] for g in groups]
        grads = {p: p.grad.numpy().astype(np.float64) for ps in with_grad for p in ps}
        scale = clip_factor(list(grads.values()), self.opt.max_grad_norm) if self.is_lamb else 1.0
        for group, params in zip(groups, with_grad):
            hyper = {k: group[k] for k in ("lr", "betas", "weight_decay", "maximize")}
            for p in params:
                st = self.state.setdefault(p, {"t": 0, "m": np.zeros(p.shape), "v": np.zeros(p.shape)})
                st["t"] += 1
                if self.is_lamb:
                    self.theta[p], st["m"], st["v"] = lamb_apex(
                        self.theta[p], st["m"], st["v"], grads[p] * scale, st["t"], eps=group["eps"], **hyper)
                else:
                    self.theta[p], st["m"] = lion_paper(self.theta[p], st["m"], grads[p], **hyper)

    def check(self):
        for p, theta in self.theta.items():
            torch.testing.assert_close(p.detach(), _tensor(theta), **FP64_TOL)
            st, ref = self.opt.state.get(p, {}), self.state.get(p)
            if ref is None:
                assert st == {}, "a param that never had a grad got state"
                continue
            assert st["step"].item() == ref["t"]
            torch.testing.assert_close(st["exp_avg"], _tensor(ref["m"]), **FP64_TOL)
            if self.is_lamb:
                torch.testing.assert_close(st["exp_avg_sq"], _tensor(ref["v"]), **FP64_TOL)


@pytest.mark.parametrize("entry,opt_id", [
    pytest.param(e, o, id=f"{e.name}-{o}") for e in (LION, LAMB_ENTRY) for o in e.option_sets])
@pytest.mark.parametrize("shape_set", ["groups", "none_grads"])
def test_matches_paper_pseudocode(entry, opt_id, shape_set):
    problem = Problem(shape_set, "cpu", seed=3)
    params = problem.params(torch.float64)
    opt = entry.torch_cls(problem.param_arg(params, entry.group_overrides), **entry.option_sets[opt_id])
    ref = Transcription(opt, is_lamb=entry is LAMB_ENTRY)
    for t in range(STEPS):
        problem.set_grads(params, t)
        ref.step()
        opt.step()
    ref.check()


def test_defaults():
    p = [torch.zeros(2, requires_grad=True)]
    lion, lamb = Lion(p), LAMB(p)
    assert {k: v for k, v in lion.defaults.items()} == {
        "lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0, "maximize": False}
    assert lamb.defaults == {
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "maximize": False}
    assert lamb.max_grad_norm == 1.0


# --------------------------------------------------------------------------------------------------
# Cross-checks against public implementations (float64: identical math up to rounding)
# --------------------------------------------------------------------------------------------------
CROSS_SPECS = (PSpec((16,)), PSpec((3, 5)), PSpec(()))  # norms below pytorch-optimizer's LAMB clamp anyway


def _run_pair(ours, theirs, problem, params_ours, params_theirs, negate_theirs=False, before_theirs=None):
    for t in range(STEPS):
        problem.set_grads(params_ours, t)
        problem.set_grads(params_theirs, t)
        if negate_theirs:  # maximize == minimizing the negated objective
            for p in params_theirs:
                p.grad = -p.grad
        ours.step()
        if before_theirs:
            before_theirs(t + 1)
        theirs.step()


def _lion_pair(opt_id, make_theirs, has_maximize):
    kwargs = dict(LION.option_sets[opt_id])
    problem = Problem(CROSS_SPECS, "cpu", seed=5)
    mine, other = problem.params(torch.float64), problem.params(torch.float64)
    ours = Lion(mine, **kwargs)
    maximize = kwargs.pop("maximize", False)
    theirs = make_theirs(other, {"lr": 1e-4, **kwargs}, maximize if has_maximize else None)
    _run_pair(ours, theirs, problem, mine, other, negate_theirs=maximize and not has_maximize)
    for a, b in zip(mine, other):
        torch.testing.assert_close(a.detach(), b.detach(), **FP64_TOL)
        torch.testing.assert_close(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"], **FP64_TOL)


@pytest.mark.parametrize("opt_id", _option_params(LION))
def test_lion_matches_lion_pytorch(opt_id):
    lion_pytorch = pytest.importorskip("lion_pytorch", reason="lion-pytorch is not installed")
    _lion_pair(opt_id, lambda ps, kw, _: lion_pytorch.Lion(ps, use_triton=False, **kw), has_maximize=False)


@pytest.mark.parametrize("opt_id", _option_params(LION))
def test_lion_matches_pytorch_optimizer(opt_id):
    pto = pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer is not installed")
    _lion_pair(
        opt_id,
        lambda ps, kw, maximize: pto.Lion(ps, weight_decouple=True, foreach=False, maximize=maximize, **kw),
        has_maximize=True,
    )


@pytest.mark.parametrize("opt_id", _option_params(LION))
def test_lion_matches_torch_optimi(opt_id):
    optimi = pytest.importorskip("optimi", reason="torch-optimi is not installed")
    _lion_pair(
        opt_id,
        lambda ps, kw, _: optimi.Lion(ps, foreach=False, triton=False, kahan_sum=False, **kw),
        has_maximize=False,
    )


# pytorch-optimizer's Lamb is the same algorithm written differently: it divides the step size by
# 1 - beta1^t instead of the first moment, leaves the second moment uncorrected (eps is added to sqrt(v), not
# to sqrt(v / (1 - beta2^t))), adds eps to the update norm of the trust ratio and to the clipping norm (instead
# of 1e-6), and clamps the weight norm at 10 (lifted here). The trust ratio cancels the overall scale of the
# update, so with its lr multiplied by 1 - beta1^t and its eps by sqrt(1 - beta2^t) each step, the two differ
# only by eps in the trust ratio and the clipping norm: relative differences of eps / ||update||, largest for
# the 1-element param, whose update norm is |m| / (sqrt(v) + eps) (measured: 6e-5 with eps = 1e-4 and with
# eps = 1e-5; tolerance 10 eps). Its weight decay
# is added to the uncorrected update, so the comparison runs with weight_decay=0 (the NumPy transcription
# above checks the weight decay).


@pytest.mark.parametrize("opt_id", _option_params(LAMB_ENTRY))
def test_lamb_matches_pytorch_optimizer(opt_id):
    pto = pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer is not installed")
    kwargs = {**LAMB_ENTRY.option_sets[opt_id], "weight_decay": 0.0}
    problem = Problem(CROSS_SPECS, "cpu", seed=7)
    mine, other = problem.params(torch.float64), problem.params(torch.float64)
    ours = LAMB(mine, **kwargs)
    max_grad_norm = kwargs.pop("max_grad_norm", 1.0)
    lr = kwargs.pop("lr", 1e-3)
    beta1, beta2 = kwargs.get("betas", (0.9, 0.999))
    eps = kwargs.pop("eps", 1e-6)
    theirs = pto.Lamb(other, lr=lr, eps=eps, pre_norm=bool(max_grad_norm), max_grad_norm=max_grad_norm or 0.0,
                      foreach=False, **kwargs)
    theirs.clamp = math.inf

    def set_lr(t):
        for group in theirs.param_groups:
            group["lr"] = lr * (1 - beta1**t)
            group["eps"] = eps * (1 - beta2**t) ** 0.5

    _run_pair(ours, theirs, problem, mine, other, before_theirs=set_lr)
    tol = {"rtol": max(1e-5, 10 * eps), "atol": max(1e-6, 10 * eps)}
    for a, b in zip(mine, other):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[a][key], theirs.state[b][key], **tol)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
# The messages torch.optim.AdamW gives for the same arguments: our wording must be torch's.
SHARED_BAD = (
    {"lr": -1.0}, {"lr": float("nan")}, {"lr": torch.tensor([0.1, 0.2])}, {"betas": (1.0, 0.9)},
    {"betas": (-0.5, 0.9)}, {"betas": (0.9, 1.0)}, {"betas": (0.9, float("nan"))}, {"weight_decay": -0.1},
)


def _message(cls, kwargs):
    with pytest.raises(Exception) as info:
        cls([torch.zeros(2, requires_grad=True)], **kwargs)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("cls", [Lion, LAMB])
@pytest.mark.parametrize("kwargs", SHARED_BAD, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_validation_like_torch(cls, kwargs):
    assert _message(cls, kwargs) == _message(torch.optim.AdamW, kwargs)


def test_lamb_validation():
    assert _message(LAMB, {"eps": -1e-8}) == _message(torch.optim.AdamW, {"eps": -1e-8})
    for bad in (-1.0, float("nan"), float("inf"), True, "1.0"):
        assert _message(LAMB, {"max_grad_norm": bad}) == (ValueError, f"Invalid max_grad_norm value: {bad}")
    for off in (None, 0, 0.0):
        assert LAMB([torch.zeros(2, requires_grad=True)], max_grad_norm=off).max_grad_norm == off


@pytest.mark.parametrize("cls", [Lion, LAMB])
@pytest.mark.parametrize("flag", ["foreach", "fused", "capturable", "differentiable"])
def test_variant_flags_not_offered(cls, flag):
    with pytest.raises(TypeError, match=flag):
        cls([torch.zeros(2, requires_grad=True)], **{flag: False})


@pytest.mark.parametrize("cls", [Lion, LAMB])
def test_sparse_grad_raises_without_writing(cls):
    dense, sparse = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = cls([{"params": [dense]}, {"params": [sparse]}], lr=0.1)
    dense.grad = torch.ones(3)
    sparse.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match=f"^{cls.__name__} does not support sparse gradients$"):
        opt.step()
    assert torch.equal(dense.detach(), torch.ones(3)) and len(opt.state) == 0


# --------------------------------------------------------------------------------------------------
# Behaviour
# --------------------------------------------------------------------------------------------------
def _train(cls, kwargs, problem, params, steps, start=0, negate=False):
    opt = cls(problem.param_arg(params, ({}, {})), **kwargs) if not isinstance(cls, torch.optim.Optimizer) else cls
    for t in range(start, start + steps):
        problem.set_grads(params, t)
        if negate:
            for p in params:
                p.grad = None if p.grad is None else -p.grad
        opt.step()
    return opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [Lion, LAMB])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_layout(cls, dtype, device):
    """step: float32 0-dim on the param's device; buffers: the param's dtype, shape and layout; no state
    for params without grads."""
    problem = Problem("none_grads", device, seed=1)
    params = problem.params(dtype)
    opt = _train(cls, {"lr": 0.01}, problem, params, 3)
    keys = {"step", "exp_avg"} | ({"exp_avg_sq"} if cls is LAMB else set())
    for spec, p in zip(problem.specs, params):
        st = opt.state.get(p, {})
        if spec.grad == "never" or (spec.grad == "late"):
            assert st == {}
            continue
        assert set(st) == keys
        assert st["step"].dtype == torch.float32 and st["step"].shape == () and st["step"].device == p.device
        for key in keys - {"step"}:
            assert st[key].dtype == dtype and st[key].shape == p.shape and st[key].stride() == p.stride()
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("cls,kwargs", [(Lion, {"lr": 0.01, "weight_decay": 0.1}), (LAMB, {"lr": 0.01})])
def test_state_dict_round_trip(cls, kwargs):
    """Save after 10 steps (through torch.save), load into a new optimizer, 10 more: bit-identical to 20."""
    problem = Problem("groups", "cpu", seed=2)
    straight = problem.params(torch.float32)
    _train(cls, kwargs, problem, straight, 20)
    first, second = problem.params(torch.float32), problem.params(torch.float32)
    opt = _train(cls, kwargs, problem, first, 10)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    with torch.no_grad():
        for a, b in zip(second, first):
            a.copy_(b)
    resumed = cls(problem.param_arg(second, ({}, {})), **kwargs)
    resumed.load_state_dict(torch.load(buf))
    _train(resumed, kwargs, problem, second, 10, start=10)
    for a, b in zip(second, straight):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,kwargs", [(Lion, {"lr": 0.01, "weight_decay": 0.1}), (LAMB, {"lr": 0.01})])
def test_maximize_is_minimizing_the_negated_grad(cls, kwargs):
    problem = Problem("groups", "cpu", seed=4)
    up, down = problem.params(torch.float32), problem.params(torch.float32)
    opt_up = _train(cls, {**kwargs, "maximize": True}, problem, up, 10)
    opt_down = _train(cls, kwargs, problem, down, 10, negate=True)
    for a, b in zip(up, down):
        assert torch.equal(a, b)
        state_up, state_down = opt_up.state.get(a, {}), opt_down.state.get(b, {})
        assert state_up.keys() == state_down.keys()
        for key, value in state_up.items():  # the moments hold the negated grad in both runs
            assert torch.equal(value, state_down[key]), key


def test_lion_sign_of_zero_and_weight_decay():
    """A zero grad on zero momentum: c = 0, sign(0) = 0, so only the weight decay moves the param."""
    p = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    opt = Lion([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.1 * 0.5))
    p.grad = torch.tensor([3.0, -1e-30, 0.0])
    opt.step()  # m = 0 on this step: sign(c) = sign(g)
    expected = torch.tensor([1.0, -2.0, 0.5]) * 0.95 * 0.95 - 0.1 * torch.tensor([1.0, -1.0, 0.0])
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lamb_zero_param_norm_uses_trust_one(weight_decay):
    """A zero param: ‖p‖ = 0, the trust ratio is 1 and the step is the plain (bias-corrected) Adam step."""
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    opt = LAMB([p], lr=0.1, weight_decay=weight_decay, max_grad_norm=None)
    p.grad = g.clone()
    opt.step()
    # step 1: m / (1 - b1) = g and v / (1 - b2) = g^2, so the update is g / (|g| + eps)
    torch.testing.assert_close(p.detach(), -0.1 * g / (g.abs() + 1e-6), **FP64_TOL)


def test_lamb_zero_update_norm_leaves_param():
    """A zero grad on zero moments with weight_decay 0: the update is 0, the trust ratio 1 (not 0/0)."""
    p = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = LAMB([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.zeros(2)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("max_grad_norm", [None, 0.0, 1.0, 1e6])
def test_lamb_clipping(max_grad_norm):
    """Clipping scales every grad of every group by the global factor; .grad itself is never modified."""
    problem = Problem("groups", "cpu", seed=6)
    clipped, manual = problem.params(torch.float64), problem.params(torch.float64)
    opt = LAMB(problem.param_arg(clipped, LAMB_ENTRY.group_overrides), max_grad_norm=max_grad_norm)
    ref = LAMB(problem.param_arg(manual, LAMB_ENTRY.group_overrides), max_grad_norm=None)
    for t in range(5):
        problem.set_grads(clipped, t)
        grads = [None if p.grad is None else p.grad.clone() for p in clipped]
        present = [g for g in grads if g is not None]
        factor = clip_factor([g.numpy() for g in present], max_grad_norm)
        if max_grad_norm == 1.0:
            assert factor < 1  # the grads of this problem have a global norm well above 1
        for p, g in zip(manual, grads):
            p.grad = None if g is None else g * factor
        opt.step()
        ref.step()
        for p, g in zip(clipped, grads):
            assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    for a, b in zip(clipped, manual):
        torch.testing.assert_close(a.detach(), b.detach(), **FP64_TOL)


def test_lion_complex_is_its_real_view():
    z = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    oz, orr = Lion([z], lr=0.1, weight_decay=0.1), Lion([r], lr=0.1, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        g = torch.randn(4, 2, generator=gen)
        z.grad, r.grad = torch.view_as_complex(g.clone()), g.clone()
        oz.step()
        orr.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())


@pytest.mark.parametrize("cls", [Lion, LAMB])
def test_closure_and_tensor_lr(cls):
    p = torch.ones(3, requires_grad=True)
    q = copy.deepcopy(p)
    opt, ref = cls([p], lr=torch.tensor(0.01)), cls([q], lr=0.01)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    q.grad = 2 * torch.ones(3)
    ref.step()
    assert torch.equal(p, q)
