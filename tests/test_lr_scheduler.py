"""fusedopt.lr_scheduler against torch.optim.lr_scheduler: same lr (and cycled momentum) sequences, same params
after training, per-step mode, the seed experiments' schedules, state_dict round trips, errors, and the op."""
import io
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.optim import lr_scheduler as torch_sched

import fusedopt
from fusedopt import lr_scheduler as fused_sched

from conftest import DEVICES, TOLERANCES

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))
from benchmarks.seed_experiments import SCHEDULES as SEED_SCHEDULES  # noqa: E402

# The CPU op runs torch's formulas in torch's operation order in double precision: bit-identical sequences.
# CUDA's cos/pow/exp and FMA contraction may differ from the host libm by an ulp per step.
LR_TOL = dict(rel=1e-9, abs=1e-12)
EXACT = dict(rel=0, abs=0)


def lr_tol(device):
    return EXACT if torch.device(device).type == "cpu" else LR_TOL

PARAM_TOL = TOLERANCES[torch.float64]
STEPS = 300
GROUP_LRS = (0.1, 0.03)

OPTIMIZERS = {
    "sgd": (fusedopt.FusedSGD, torch.optim.SGD, dict(momentum=0.9)),
    "adam": (fusedopt.FusedAdam, torch.optim.Adam, {}),
    # NAdam's mu_t and mu_product follow the cycled beta1; RAdam's rectification does not depend on it
    "nadam": (fusedopt.FusedNAdam, torch.optim.NAdam, dict(momentum_decay=0.1)),
    "radam": (fusedopt.FusedRAdam, torch.optim.RAdam, {}),
}


@dataclass(frozen=True)
class Case:
    id: str
    optimizer: str
    scheduler: str  # class name, the same in both modules
    kwargs: dict = field(default_factory=dict)
    children: tuple = ()  # (class name, kwargs) of a SequentialLR/ChainedScheduler's schedulers
    milestones: tuple = ()

    @property
    def cycles_momentum(self):
        return self.scheduler in ("CyclicLR", "OneCycleLR") and self.kwargs.get("cycle_momentum", True)


_CYCLIC = dict(base_lr=[0.01, 0.002], max_lr=[0.1, 0.05], step_size_up=20, step_size_down=13)
CASES = [
    Case("step", "sgd", "StepLR", dict(step_size=7, gamma=0.5)),
    Case("multistep", "adam", "MultiStepLR", dict(milestones=[0, 30, 30, 100, 250], gamma=0.3)),
    Case("constant", "sgd", "ConstantLR", dict(factor=0.25, total_iters=40)),
    Case("linear_warmup", "adam", "LinearLR", dict(start_factor=0.01, end_factor=1.0, total_iters=50)),
    Case("linear_decay", "sgd", "LinearLR", dict(start_factor=1.0, end_factor=0.1, total_iters=120)),
    Case("exponential", "sgd", "ExponentialLR", dict(gamma=0.99)),
    Case("polynomial", "adam", "PolynomialLR", dict(total_iters=200, power=2.0)),
    Case("cosine", "sgd", "CosineAnnealingLR", dict(T_max=60, eta_min=0.001)),
    Case("warm_restarts_T1", "adam", "CosineAnnealingWarmRestarts", dict(T_0=25, eta_min=1e-4)),
    Case("warm_restarts_T2", "sgd", "CosineAnnealingWarmRestarts", dict(T_0=10, T_mult=2)),
    *[Case(f"cyclic_{mode}_{opt}{'' if cycle else '_nomomentum'}", opt, "CyclicLR",
           dict(_CYCLIC, mode=mode, gamma=0.995, cycle_momentum=cycle))
      for mode in ("triangular", "triangular2", "exp_range") for opt in ("sgd", "adam") for cycle in (True, False)],
    Case("onecycle_cos_sgd", "sgd", "OneCycleLR", dict(max_lr=[0.1, 0.05], total_steps=STEPS)),
    Case("onecycle_linear_adam", "adam", "OneCycleLR", dict(max_lr=0.01, total_steps=STEPS, anneal_strategy="linear")),
    Case("onecycle_three_phase_adam", "adam", "OneCycleLR", dict(max_lr=0.02, epochs=3, steps_per_epoch=100,
                                                                 three_phase=True, pct_start=0.25)),
    Case("onecycle_cos_nadam", "nadam", "OneCycleLR", dict(max_lr=0.01, total_steps=STEPS)),
    Case("onecycle_linear_radam", "radam", "OneCycleLR",
         dict(max_lr=0.01, total_steps=STEPS, anneal_strategy="linear")),
    Case("onecycle_nomomentum_sgd", "sgd", "OneCycleLR", dict(max_lr=0.1, total_steps=STEPS, cycle_momentum=False)),
    Case("sequential_warmup_cosine", "sgd", "SequentialLR", {},
         (("LinearLR", dict(start_factor=0.1, total_iters=20)), ("CosineAnnealingLR", dict(T_max=100))), (20,)),
    Case("sequential_three", "adam", "SequentialLR", {},
         (("ConstantLR", dict(factor=0.5, total_iters=10)), ("ExponentialLR", dict(gamma=0.98)),
          ("StepLR", dict(step_size=30, gamma=0.5))), (15, 120)),
    Case("sequential_warm_restarts", "sgd", "SequentialLR", {},
         (("LinearLR", dict(start_factor=0.5, total_iters=5)), ("CosineAnnealingWarmRestarts", dict(T_0=30))), (10,)),
    Case("chained_constant_exponential", "sgd", "ChainedScheduler", {},
         (("ConstantLR", dict(factor=0.1, total_iters=20)), ("ExponentialLR", dict(gamma=0.99)))),
    Case("chained_linear_cosine", "adam", "ChainedScheduler", {},
         (("LinearLR", dict(start_factor=0.2, total_iters=30)), ("CosineAnnealingLR", dict(T_max=50)))),
]


def make_params(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [[(4, 3), (5,)], [(7,)]]
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in group] for group in shapes]


def param_groups(params):
    return [{"params": group, "lr": lr} for group, lr in zip(params, GROUP_LRS)]


def set_grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for group in params:
        for p in group:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)


def build(module, optimizer, case, **extra):
    cls = getattr(module, case.scheduler)
    if case.scheduler == "SequentialLR":
        children = [getattr(module, name)(optimizer, **kw) for name, kw in case.children]
        return cls(optimizer, children, milestones=list(case.milestones), **extra)
    if case.scheduler == "ChainedScheduler":
        return cls([getattr(module, name)(optimizer, **kw) for name, kw in case.children], **extra)
    return cls(optimizer, **case.kwargs, **extra)


def torch_momenta(optimizer):
    return [g["betas"][0] if "betas" in g else g["momentum"] for g in optimizer.param_groups]


def make_pair(case, device, **extra):
    fused_cls, torch_cls, kwargs = OPTIMIZERS[case.optimizer]
    torch_params, fused_params = make_params(device), make_params(device)
    torch_opt = torch_cls(param_groups(torch_params), **kwargs)
    fused_opt = fused_cls(param_groups(fused_params), **kwargs)
    return (torch_opt, torch_params, build(torch_sched, torch_opt, case),
            fused_opt, fused_params, build(fused_sched, fused_opt, case, **extra))


def assert_same_schedule(case, torch_opt, torch_sch, fused_opt, fused_sch, where):
    tol = lr_tol(fused_sch.lrs.device)
    expected = torch_sch.get_last_lr()
    assert fused_sch.get_last_lr() == pytest.approx(expected, **tol), where
    assert [float(g["lr"]) for g in fused_opt.param_groups] == pytest.approx(
        [float(g["lr"]) for g in torch_opt.param_groups], **tol), where
    if case.cycles_momentum:
        assert fused_sch.get_last_momentum() == pytest.approx(torch_momenta(torch_opt), **tol), where


def assert_params_equal(fused_params, torch_params):
    for fg, tg in zip(fused_params, torch_params):
        for f, t in zip(fg, tg):
            torch.testing.assert_close(f, t, **PARAM_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_torch(case, device):
    torch_opt, torch_params, torch_sch, fused_opt, fused_params, fused_sch = make_pair(case, device)
    assert_same_schedule(case, torch_opt, torch_sch, fused_opt, fused_sch, "after construction")
    for step in range(STEPS):
        set_grads(torch_params, step)
        set_grads(fused_params, step)
        torch_opt.step()
        fused_opt.step()
        torch_sch.step()
        fused_sch.step()
        assert_same_schedule(case, torch_opt, torch_sch, fused_opt, fused_sch, f"step {step}")
    assert_params_equal(fused_params, torch_params)


PER_STEP_CASES = [c for c in CASES if c.id in (
    "step", "cosine", "warm_restarts_T2", "cyclic_triangular2_sgd", "cyclic_exp_range_adam", "onecycle_cos_sgd",
    "sequential_warmup_cosine", "chained_constant_exponential", "onecycle_cos_nadam")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("also_step_scheduler", [False, True], ids=["optimizer_only", "both"])
@pytest.mark.parametrize("case", PER_STEP_CASES, ids=lambda c: c.id)
def test_per_step_matches_torch(case, device, also_step_scheduler):
    """per_step=True: the optimizer's fused step advances the schedule; scheduler.step() is a no-op."""
    torch_opt, torch_params, torch_sch, fused_opt, fused_params, fused_sch = make_pair(case, device, per_step=True)
    for step in range(120):
        set_grads(torch_params, step)
        set_grads(fused_params, step)
        torch_opt.step()
        fused_opt.step()
        torch_sch.step()
        if also_step_scheduler:
            fused_sch.step()
        assert_same_schedule(case, torch_opt, torch_sch, fused_opt, fused_sch, f"step {step}")
    if hasattr(torch_sch, "last_epoch"):  # torch's ChainedScheduler has none
        assert fused_sch.last_epoch == torch_sch.last_epoch
    assert_params_equal(fused_params, torch_params)


# ---- the seed slides' decay formulas ----
def seed_time_based(lr0, d, epochs):
    lrs = [lr0]  # eta_{n+1} = eta_n / (1 + d n)
    for n in range(epochs - 1):
        lrs.append(lrs[-1] / (1 + d * n))
    return lrs


def seed_exponential(lr0, d, epochs):
    return [lr0 * math.exp(-d * n) for n in range(epochs)]  # eta_n = eta_0 e^{-d n}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls_name, formula, decay", [
    ("TimeBasedDecayLR", seed_time_based, 0.01), ("TimeBasedDecayLR", seed_time_based, 0.2),
    ("ExponentialDecayLR", seed_exponential, 0.05), ("ExponentialDecayLR", seed_exponential, 0.3)])
def test_seed_decay_formulas(device, cls_name, formula, decay):
    params = make_params(device)
    opt = fusedopt.FusedSGD(param_groups(params), momentum=0.9)
    sched = getattr(fused_sched, cls_name)(opt, decay=decay)
    observed = [sched.get_last_lr()]
    for step in range(60):
        set_grads(params, step)
        opt.step()
        sched.step()
        observed.append(sched.get_last_lr())
    for g, lr0 in enumerate(GROUP_LRS):
        assert [lrs[g] for lrs in observed] == pytest.approx(formula(lr0, decay, 61), rel=1e-12, abs=0)


# ---- the seed experiments' schedules (StepLR and ReduceLROnPlateau as in benchmarks/seed_experiments.py) ----
def single_group_pair(device, lr=0.1):
    torch_p, fused_p = make_params(device), make_params(device)
    torch_opt = torch.optim.SGD([p for g in torch_p for p in g], lr=lr, momentum=0.9, nesterov=True)
    fused_opt = fusedopt.FusedSGD([p for g in fused_p for p in g], lr=lr, momentum=0.9, nesterov=True)
    return torch_opt, torch_p, fused_opt, fused_p


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SEED_SCHEDULES))
@pytest.mark.parametrize("metric_kind", ["tensor", "float"])
def test_seed_experiment_schedules(device, name, metric_kind):
    schedule = SEED_SCHEDULES[name]
    if not schedule.needs_metric and metric_kind == "float":
        pytest.skip("StepLR takes no metric")
    torch_opt, torch_p, fused_opt, fused_p = single_group_pair(device)
    torch_s = getattr(torch_sched, schedule.scheduler)(torch_opt, **schedule.kwargs)
    fused_s = getattr(fused_sched, schedule.scheduler)(fused_opt, **schedule.kwargs)
    lrs = []
    for epoch in range(schedule.epochs):
        lrs.append(fused_s.get_last_lr()[0])
        assert fused_s.get_last_lr() == pytest.approx(torch_s.get_last_lr(), **lr_tol(device))
        for it in range(3):
            set_grads(torch_p, 10 * epoch + it)
            set_grads(fused_p, 10 * epoch + it)
            torch_opt.step()
            fused_opt.step()
        if schedule.needs_metric:
            accuracy = schedule.seed_accuracy[epoch]
            torch_s.step(accuracy)
            fused_s.step(torch.tensor(accuracy) if metric_kind == "tensor" else accuracy)
        else:
            torch_s.step()
            fused_s.step()
    assert lrs == pytest.approx(schedule.seed_lrs, rel=1e-6)  # the LRs the tutorials printed
    assert_params_equal(fused_p, torch_p)


def plateau_metrics(kind, n=120, seed=0):
    rng = random.Random(seed)
    if kind == "noisy_decreasing":
        return [1.0 / (1 + 0.05 * i) + rng.uniform(-0.02, 0.02) for i in range(n)]
    if kind == "with_nan":
        return [float("nan") if rng.random() < 0.2 else rng.uniform(0, 1) for _ in range(n)]
    return [rng.choice([0.5, 0.5, 0.51, 0.49, rng.uniform(0.4, 0.6)]) for _ in range(n)]  # plateaus and ties


PLATEAU_OPTIONS = [
    dict(),
    dict(mode="max", factor=0.5, patience=0),
    dict(mode="min", threshold=0.01, threshold_mode="abs", patience=2, cooldown=3),
    dict(mode="max", threshold=0.05, threshold_mode="rel", patience=1, cooldown=1, min_lr=[0.02, 0.001]),
    dict(mode="min", factor=0.9, patience=0, min_lr=0.05, eps=1e-3),
    dict(mode="max", threshold=0.0, threshold_mode="abs", patience=3, eps=0.0, factor=0.7),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metrics", ["noisy_decreasing", "with_nan", "plateaus"])
@pytest.mark.parametrize("options", PLATEAU_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_plateau_matches_torch(device, metrics, options):
    torch_p, fused_p = make_params(device), make_params(device)
    torch_opt = torch.optim.SGD(param_groups(torch_p), momentum=0.9)
    fused_opt = fusedopt.FusedSGD(param_groups(fused_p), momentum=0.9)
    torch_s = torch_sched.ReduceLROnPlateau(torch_opt, **options)
    fused_s = fused_sched.ReduceLROnPlateau(fused_opt, **options)
    for i, metric in enumerate(plateau_metrics(metrics)):
        set_grads(torch_p, i)
        set_grads(fused_p, i)
        torch_opt.step()
        fused_opt.step()
        torch_s.step(metric)
        fused_s.step(torch.tensor([metric], dtype=torch.float64, device=device) if i % 2 else metric)
        assert fused_s.get_last_lr() == pytest.approx(torch_s.get_last_lr(), **lr_tol(device)), f"epoch {i}"
    assert fused_s.num_bad_epochs == torch_s.num_bad_epochs
    assert fused_s.cooldown_counter == torch_s.cooldown_counter
    assert fused_s.best == torch_s.best
    assert fused_s.last_epoch == torch_s.last_epoch
    assert_params_equal(fused_p, torch_p)


# ---- state_dict round trip ----
ROUND_TRIP_CASES = [c for c in CASES if c.id in (
    "warm_restarts_T2", "cyclic_triangular2_adam", "onecycle_cos_sgd", "sequential_warmup_cosine",
    "chained_constant_exponential")]


def run_steps(opt, params, sched, start, stop):
    for step in range(start, stop):
        set_grads(params, step)
        opt.step()
        sched.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ROUND_TRIP_CASES, ids=lambda c: c.id)
def test_state_dict_round_trip(case, device):
    fused_cls, _, kwargs = OPTIMIZERS[case.optimizer]
    params = make_params(device)
    opt = fused_cls(param_groups(params), **kwargs)
    sched = build(fused_sched, opt, case)
    run_steps(opt, params, sched, 0, 37)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": params}, buffer)
    epoch_at_save = sched.last_epoch
    run_steps(opt, params, sched, 37, 80)
    expected_lrs = sched.get_last_lr()

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_params = [[p.clone() for p in group] for group in saved["params"]]
    resumed_opt = fused_cls(param_groups(resumed_params), **kwargs)
    resumed_sched = build(fused_sched, resumed_opt, case)
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    assert resumed_sched.last_epoch == epoch_at_save
    run_steps(resumed_opt, resumed_params, resumed_sched, 37, 80)
    assert resumed_sched.get_last_lr() == expected_lrs
    if case.cycles_momentum:
        assert resumed_sched.get_last_momentum() == sched.get_last_momentum()
    assert_params_equal(resumed_params, params)


@pytest.mark.parametrize("device", DEVICES)
def test_plateau_state_dict_round_trip(device):
    metrics = plateau_metrics("plateaus")
    params = make_params(device)
    opt = fusedopt.FusedSGD(param_groups(params), momentum=0.9)
    sched = fused_sched.ReduceLROnPlateau(opt, patience=1, cooldown=2)
    for m in metrics[:40]:
        sched.step(m)
    state = sched.state_dict()
    for m in metrics[40:]:
        sched.step(m)
    opt2 = fusedopt.FusedSGD(param_groups(make_params(device)), momentum=0.9)
    sched2 = fused_sched.ReduceLROnPlateau(opt2, patience=1, cooldown=2)
    sched2.load_state_dict(state)
    for m in metrics[40:]:
        sched2.step(m)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert (sched2.best, sched2.num_bad_epochs, sched2.cooldown_counter) == (
        sched.best, sched.num_bad_epochs, sched.cooldown_counter)


def test_load_state_dict_of_another_schedule_raises():
    opt = fusedopt.FusedSGD(param_groups(make_params("cpu")), momentum=0.9)
    state = fused_sched.StepLR(opt, step_size=3).state_dict()
    with pytest.raises(ValueError, match="same arguments"):
        fused_sched.StepLR(opt, step_size=4).load_state_dict(state)


def test_reinstalls_lr_view_after_optimizer_load_state_dict():
    opt = fusedopt.FusedSGD(param_groups(make_params("cpu")), momentum=0.9)
    sched = fused_sched.ExponentialLR(opt, gamma=0.5)
    opt.param_groups[0]["lr"] = 0.25  # e.g. what the optimizer's load_state_dict does
    sched.step()
    assert sched.get_last_lr() == [0.125, 0.015]
    assert opt.param_groups[0]["lr"] is sched._lr_views[0]


# ---- errors ----
def _torch_error(make):
    try:
        make()
    except Exception as error:  # noqa: BLE001 - the expected type and message are whatever torch raises
        return type(error), str(error)
    raise AssertionError("torch accepted the input")


ERROR_CASES = [
    ("ConstantLR", dict(factor=1.5)),
    ("LinearLR", dict(start_factor=0.0)),
    ("LinearLR", dict(end_factor=1.5)),
    ("CosineAnnealingWarmRestarts", dict(T_0=0)),
    ("CosineAnnealingWarmRestarts", dict(T_0=5, T_mult=0)),
    ("CosineAnnealingWarmRestarts", dict(T_0=5, eta_min="0")),
    ("CyclicLR", dict(base_lr=0.01, max_lr=0.1, mode="sawtooth")),
    ("CyclicLR", dict(base_lr=[0.01], max_lr=0.1)),
    ("OneCycleLR", dict(max_lr=0.1)),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=0)),
    ("OneCycleLR", dict(max_lr=0.1, epochs=0, steps_per_epoch=10)),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=10, pct_start=1.5)),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=10, anneal_strategy="step")),
    ("OneCycleLR", dict(max_lr=[0.1, 0.2, 0.3], total_steps=10)),
    ("ReduceLROnPlateau", dict(factor=1.0)),
    ("ReduceLROnPlateau", dict(mode="median")),
    ("ReduceLROnPlateau", dict(threshold_mode="log")),
    ("ReduceLROnPlateau", dict(min_lr=[0.1])),
    ("ExponentialLR", dict(gamma=0.9, last_epoch=3)),  # resuming without initial_lr: KeyError
]


@pytest.mark.parametrize("name, kwargs", ERROR_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ERROR_CASES)])
def test_errors_match_torch(name, kwargs):
    torch_opt = torch.optim.SGD(param_groups(make_params("cpu")), momentum=0.9)
    fused_opt = fusedopt.FusedSGD(param_groups(make_params("cpu")), momentum=0.9)
    error_type, message = _torch_error(lambda: getattr(torch_sched, name)(torch_opt, **kwargs))
    with pytest.raises(error_type) as raised:
        getattr(fused_sched, name)(fused_opt, **kwargs)
    assert str(raised.value) == message


@pytest.mark.parametrize("name, kwargs", [("CyclicLR", dict(base_lr=0.01, max_lr=0.1)),
                                          ("OneCycleLR", dict(max_lr=0.1, total_steps=10))])
def test_cycle_momentum_without_momentum_matches_torch(name, kwargs):
    torch_opt = torch.optim.Adagrad(param_groups(make_params("cpu")))
    fused_opt = fusedopt.FusedAdagrad(param_groups(make_params("cpu")))
    error_type, message = _torch_error(lambda: getattr(torch_sched, name)(torch_opt, **kwargs))
    with pytest.raises(error_type, match="optimizer must support momentum or beta1") as raised:
        getattr(fused_sched, name)(fused_opt, **kwargs)
    assert str(raised.value) == message


def test_composite_errors_match_torch():
    torch_opt = torch.optim.SGD(param_groups(make_params("cpu")), momentum=0.9)
    fused_opt = fusedopt.FusedSGD(param_groups(make_params("cpu")), momentum=0.9)
    for module, opt in ((torch_sched, torch_opt), (fused_sched, fused_opt)):
        with pytest.raises(ValueError, match="one more than the number of milestone points"):
            module.SequentialLR(opt, [module.StepLR(opt, 3), module.StepLR(opt, 5)], milestones=[])
        with pytest.raises(ValueError, match="expects at least one scheduler"):
            module.SequentialLR(opt, [], milestones=[])
        with pytest.raises(ValueError, match="does not support `ReduceLROnPlateau`"):
            module.ChainedScheduler([module.StepLR(opt, 3), module.ReduceLROnPlateau(opt)])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_onecycle_past_total_steps_matches_torch():
    torch_opt = torch.optim.SGD(param_groups(make_params("cpu")), momentum=0.9)
    fused_opt = fusedopt.FusedSGD(param_groups(make_params("cpu")), momentum=0.9)
    torch_s = torch_sched.OneCycleLR(torch_opt, max_lr=0.1, total_steps=3)
    fused_s = fused_sched.OneCycleLR(fused_opt, max_lr=0.1, total_steps=3)
    for _ in range(3):
        torch_s.step()
        fused_s.step()
    error_type, message = _torch_error(torch_s.step)
    with pytest.raises(error_type) as raised:
        fused_s.step()
    assert str(raised.value) == message


def test_own_errors():
    params = make_params("cpu")
    with pytest.raises(ValueError, match="torch.optim.lr_scheduler.CyclicLR"):
        fused_sched.CyclicLR(fusedopt.FusedSGD(param_groups(params), momentum=0.9), 0.01, 0.1, scale_fn=lambda x: 1.0)
    with pytest.raises(TypeError, match="needs a fusedopt optimizer"):
        fused_sched.StepLR(torch.optim.SGD(param_groups(params)), step_size=2)
    with pytest.raises(TypeError, match="is not an Optimizer"):
        fused_sched.StepLR(object(), step_size=2)
    mixed = [{"params": [torch.zeros(3)]}, {"params": [torch.zeros(3, device="meta")]}]
    with pytest.raises(ValueError, match="one device"):
        fused_sched.StepLR(fusedopt.FusedSGD(mixed, lr=0.1), step_size=2)
    with pytest.raises(ValueError, match="non-negative decay"):
        fused_sched.TimeBasedDecayLR(fusedopt.FusedSGD(param_groups(params)), decay=-0.1)
    opt = fusedopt.FusedSGD(param_groups(params), momentum=0.9)
    warmup = fused_sched.LinearLR(opt, total_iters=3)
    cosine = fused_sched.CosineAnnealingLR(opt, T_max=10)
    fused_sched.SequentialLR(opt, [warmup, cosine], milestones=[3])
    with pytest.raises(RuntimeError, match="call step\\(\\) on the SequentialLR"):
        warmup.step()
    with pytest.raises(ValueError, match="nested composites"):
        fused_sched.ChainedScheduler([fused_sched.ChainedScheduler([fused_sched.StepLR(opt, 2)])])


def test_registers_on_the_optimizer_and_installs_views():
    opt = fusedopt.FusedAdam(param_groups(make_params("cpu")))
    sched = fused_sched.OneCycleLR(opt, max_lr=0.01, total_steps=10)
    assert opt._device_schedule.stepping == [] and opt._device_schedule.momenta is sched.momenta
    assert opt._device_schedule.lrs is sched.lrs and sched.per_step is False
    assert sched.lrs.dtype == torch.float64 and sched.lrs.shape == (2,)
    assert sched.program.is_contiguous() and sched.state.is_contiguous() and sched.program.shape[0] == 2
    for g, group in enumerate(opt.param_groups):
        assert group["lr"].data_ptr() == sched.lrs[g].data_ptr() and group["lr"].dim() == 0
        assert isinstance(group["initial_lr"], float) and isinstance(group["betas"][0], float)
    assert sched.momentum_tensors().tolist() == pytest.approx([0.95, 0.95])


# ---- the op ----
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    opt = fusedopt.FusedSGD(param_groups(make_params(device)), momentum=0.9)
    cyclic = fused_sched.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=4)
    torch.library.opcheck(torch.ops.fusedopt.advance_schedule_,
                          (cyclic.lrs.clone(), cyclic.state.clone(), cyclic.program, cyclic.momenta.clone()))
    plateau = fused_sched.ReduceLROnPlateau(opt)
    torch.library.opcheck(torch.ops.fusedopt.advance_schedule_,
                          (plateau.lrs.clone(), plateau.state.clone(), plateau.program, None,
                           torch.tensor([0.5], dtype=torch.float64, device=device)))


def test_op_validates_before_writing():
    opt = fusedopt.FusedSGD(param_groups(make_params("cpu")), momentum=0.9)
    sched = fused_sched.StepLR(opt, step_size=1)
    lrs, state = sched.lrs.clone(), sched.state.clone()
    op = torch.ops.fusedopt.advance_schedule_
    with pytest.raises(RuntimeError, match="must be float64"):
        op(lrs, state, sched.program.float())
    with pytest.raises(RuntimeError, match="state must have shape"):
        op(lrs, state[:1].clone(), sched.program)
    with pytest.raises(RuntimeError, match="metric must have exactly one element"):
        op(lrs, state, sched.program, None, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(lrs, sched.lrs) and torch.equal(state, sched.state)


# ---- torch.optim.lr_scheduler with every Fused* optimizer, unchanged ----
FUSED_CLASSES = ["FusedSGD", "FusedAdam", "FusedAdamW", "FusedAdagrad", "FusedAdadelta", "FusedAdamax", "FusedRMSprop"]
TORCH_SCHEDULERS = {
    "StepLR": lambda opt: torch_sched.StepLR(opt, step_size=3, gamma=0.5),
    "LambdaLR": lambda opt: torch_sched.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
    "MultiplicativeLR": lambda opt: torch_sched.MultiplicativeLR(opt, lambda epoch: 0.9),
    "OneCycleLR": lambda opt: torch_sched.OneCycleLR(
        opt, max_lr=0.05, total_steps=40,
        cycle_momentum="momentum" in opt.defaults or "betas" in opt.defaults),
}


@pytest.mark.parametrize("scheduler", list(TORCH_SCHEDULERS))
@pytest.mark.parametrize("fused_name", FUSED_CLASSES)
def test_torch_schedulers_drive_fused_optimizers(fused_name, scheduler):
    fused_cls = getattr(fusedopt, fused_name)
    torch_cls = fused_cls._torch_class()
    kwargs = dict(momentum=0.5) if fused_name in ("FusedSGD", "FusedRMSprop") else {}
    torch_p, fused_p = make_params("cpu"), make_params("cpu")
    torch_opt, fused_opt = torch_cls(param_groups(torch_p), **kwargs), fused_cls(param_groups(fused_p), **kwargs)
    torch_s, fused_s = TORCH_SCHEDULERS[scheduler](torch_opt), TORCH_SCHEDULERS[scheduler](fused_opt)
    for step in range(30):
        set_grads(torch_p, step)
        set_grads(fused_p, step)
        torch_opt.step()
        fused_opt.step()
        torch_s.step()
        fused_s.step()
    assert fused_s.get_last_lr() == torch_s.get_last_lr()
    assert_params_equal(fused_p, torch_p)


def test_per_step_schedule_keeps_advancing_beside_a_plateau():
    """A ReduceLROnPlateau created after a per-step schedule must not stop the optimizer advancing it; both
    act on the same lr, as torch's two schedulers do on the group lr."""
    fused_param, ref_param = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    fused = fusedopt.FusedSGD([fused_param], lr=0.1, momentum=0.9)
    cosine = fused_sched.CosineAnnealingLR(fused, T_max=20, per_step=True)
    plateau = fused_sched.ReduceLROnPlateau(fused, factor=0.5, patience=0)
    ref = torch.optim.SGD([ref_param], lr=0.1, momentum=0.9)
    ref_cosine = torch_sched.CosineAnnealingLR(ref, T_max=20)
    ref_plateau = torch_sched.ReduceLROnPlateau(ref, factor=0.5, patience=0)
    for step in range(16):
        fused_param.grad, ref_param.grad = torch.ones(3), torch.ones(3)
        fused.step()
        ref.step()
        ref_cosine.step()
        if step % 4 == 3:  # an ever-worse metric: every plateau step reduces
            plateau.step(torch.tensor(float(step)))
            ref_plateau.step(float(step))
        assert cosine.get_last_lr()[0] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12)
    torch.testing.assert_close(fused_param, ref_param)


# ---- issue 14: several schedulers on one optimizer, and the divergences a differential run found ----
def _ones_grad_pair(momentum=0.9, n=3):
    """A fused and a torch SGD on one float64 param each, lr 0.1; grads are ones."""
    fused_p = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    torch_p = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    return (fusedopt.FusedSGD([fused_p], lr=0.1, momentum=momentum), fused_p,
            torch.optim.SGD([torch_p], lr=0.1, momentum=momentum), torch_p)


def _step_both_with_ones(fused, fused_p, ref, torch_p):
    """One optimizer step of each of the pair, with grads of ones."""
    fused_p.grad, torch_p.grad = torch.ones_like(fused_p), torch.ones_like(torch_p)
    fused.step()
    ref.step()


def _lr(opt):
    return float(opt.param_groups[0]["lr"])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("second", ["ReduceLROnPlateau", "StepLR"])
def test_momentum_cycling_survives_a_later_scheduler(optimizer, second):
    """Bug 1: a per-epoch scheduler built after OneCycleLR must not drop the cycled momentum / beta1."""
    fused_cls, torch_cls, kwargs = OPTIMIZERS[optimizer]
    fused_p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    torch_p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    fused_opt, torch_opt = fused_cls([fused_p], lr=0.1, **kwargs), torch_cls([torch_p], lr=0.1, **kwargs)
    pairs = []
    for module, opt in ((fused_sched, fused_opt), (torch_sched, torch_opt)):
        s1 = module.OneCycleLR(opt, max_lr=1.0, total_steps=10)
        s2 = module.ReduceLROnPlateau(opt) if second == "ReduceLROnPlateau" else module.StepLR(opt, 3)
        pairs.append((s1, s2))
    for step in range(6):
        for p, opt, (s1, s2) in ((fused_p, fused_opt, pairs[0]), (torch_p, torch_opt, pairs[1])):
            p.grad = torch.full_like(p, 1.0 + step)
            opt.step()
            s1.step()
            s2.step(1.0) if second == "ReduceLROnPlateau" else s2.step()
        assert pairs[0][0].get_last_momentum() == pytest.approx(torch_momenta(torch_opt), rel=1e-12)
        assert _lr(fused_opt) == pytest.approx(_lr(torch_opt), rel=1e-12)
        torch.testing.assert_close(fused_p, torch_p, **PARAM_TOL)


def test_issue_reproducer_onecycle_then_plateau():
    fused, fused_p, ref, torch_p = _ones_grad_pair()
    s1, s2 = fused_sched.OneCycleLR(fused, max_lr=1.0, total_steps=10), fused_sched.ReduceLROnPlateau(fused)
    r1, r2 = torch_sched.OneCycleLR(ref, max_lr=1.0, total_steps=10), torch_sched.ReduceLROnPlateau(ref)
    for _ in range(4):
        _step_both_with_ones(fused, fused_p, ref, torch_p)
        s1.step()
        s2.step(1.0)
        r1.step()
        r2.step(1.0)
    assert torch_p[0].item() == pytest.approx(-6.7185, abs=1e-4)  # the issue's torch value
    torch.testing.assert_close(fused_p, torch_p, **PARAM_TOL)


@pytest.mark.parametrize("modes", ["step+step", "step+epoch", "epoch+step", "epoch+epoch"])
def test_two_schedulers_compose_as_torch(modes):
    """Bug 2: ExponentialLR(0.5) and StepLR(2, 0.1) on one optimizer: each advances, per step or per epoch.
    torch steps them in construction order; fusedopt's launch advances the per-step ones before the per-epoch
    ones' step() calls, so torch's loop below steps the per-step ones first."""
    first_per_step, second_per_step = (m == "step" for m in modes.split("+"))
    fused, fused_p, ref, torch_p = _ones_grad_pair(momentum=0.0)
    a = fused_sched.ExponentialLR(fused, 0.5, per_step=first_per_step)
    b = fused_sched.StepLR(fused, 2, 0.1, per_step=second_per_step)
    ra, rb = torch_sched.ExponentialLR(ref, 0.5), torch_sched.StepLR(ref, 2, 0.1)
    order = sorted([(ra, first_per_step), (rb, second_per_step)], key=lambda pair: not pair[1])
    fused_lrs, torch_lrs = [], []
    for _ in range(6):
        _step_both_with_ones(fused, fused_p, ref, torch_p)
        a.step()
        b.step()
        for sched, _ in order:
            sched.step()
        fused_lrs.append(_lr(fused))
        torch_lrs.append(_lr(ref))
    assert fused_lrs == pytest.approx(torch_lrs, rel=1e-12)
    if modes == "step+step":
        assert torch_lrs[:4] == pytest.approx([0.05, 0.0025, 0.00125, 6.25e-05])
        assert a.last_epoch == b.last_epoch == 6
    torch.testing.assert_close(fused_p, torch_p, **PARAM_TOL)


def test_three_per_step_schedulers_and_a_composite():
    """Per-step schedulers (a leaf, a SequentialLR over two leaves, a CyclicLR) all advance in the launch."""
    fused, fused_p, ref, torch_p = _ones_grad_pair()
    built = []
    for module, opt, extra in ((fused_sched, fused, dict(per_step=True)), (torch_sched, ref, {})):
        exp = module.ExponentialLR(opt, 0.97, **extra)
        seq = module.SequentialLR(opt, [module.ConstantLR(opt, 0.5, total_iters=3),
                                        module.CosineAnnealingLR(opt, T_max=7.5)], milestones=[4], **extra)
        cyc = module.CyclicLR(opt, 0.01, 0.2, step_size_up=3, **extra)
        built.append((exp, seq, cyc))
    assert _lr(fused) == pytest.approx(_lr(ref), rel=1e-12)
    for step in range(20):
        fused_p.grad, torch_p.grad = torch.full_like(fused_p, 0.5), torch.full_like(torch_p, 0.5)
        fused.step()
        ref.step()
        for sched in built[1]:
            sched.step()
        assert _lr(fused) == pytest.approx(_lr(ref), rel=1e-9), step
        assert built[0][2].get_last_momentum() == pytest.approx(torch_momenta(ref), rel=1e-9)
    assert built[0][1].last_epoch == built[1][1].last_epoch
    torch.testing.assert_close(fused_p, torch_p, **PARAM_TOL)


def test_per_step_schedule_advances_on_a_step_without_grads():
    """Issue 7: torch's loop steps the scheduler even when no param had a grad; so does the fused step."""
    fused, fused_p, ref, torch_p = _ones_grad_pair()
    sched = fused_sched.StepLR(fused, 2, 0.5, per_step=True)
    ref_sched = torch_sched.StepLR(ref, 2, 0.5)
    # the fused step advances it itself: no step hook, which would put every step through torch's hook wrapper
    assert not fused._optimizer_step_pre_hooks and not fused._optimizer_step_post_hooks
    for step in range(7):
        grad = None if step in (1, 2, 5) else torch.ones_like(fused_p)
        fused_p.grad, torch_p.grad = grad, None if grad is None else grad.clone()
        fused.step()
        ref.step()
        ref_sched.step()
        assert _lr(fused) == _lr(ref), step
    assert sched.last_epoch == ref_sched.last_epoch
    torch.testing.assert_close(fused_p, torch_p, **PARAM_TOL)


@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("T_max", [2.5, 7.25, 3])
def test_cosine_float_t_max(T_max, per_step):
    """Issue 7: torch computes CosineAnnealingLR with a float T_max as given (no truncation)."""
    fused, fused_p, ref, torch_p = _ones_grad_pair()
    sched = fused_sched.CosineAnnealingLR(fused, T_max=T_max, eta_min=0.01, per_step=per_step)
    ref_sched = torch_sched.CosineAnnealingLR(ref, T_max=T_max, eta_min=0.01)
    for step in range(25):
        _step_both_with_ones(fused, fused_p, ref, torch_p)
        sched.step()
        ref_sched.step()
        assert _lr(fused) == pytest.approx(_lr(ref), rel=1e-12, abs=1e-15), step


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("name, kwargs", [("ConstantLR", dict(factor=0.25, total_iters=2.5)),
                                          ("LinearLR", dict(start_factor=0.2, total_iters=3.5)),
                                          ("PolynomialLR", dict(total_iters=4.5, power=1.5))])
def test_float_total_iters(name, kwargs):
    fused, _, ref, _ = _ones_grad_pair()
    sched, ref_sched = getattr(fused_sched, name)(fused, **kwargs), getattr(torch_sched, name)(ref, **kwargs)
    for step in range(8):
        sched.step()
        ref_sched.step()
        assert _lr(fused) == pytest.approx(_lr(ref), rel=1e-12), step


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_cyclic_after_another_scheduler_starts_at_initial_lr():
    """Issue 4: torch's CyclicLR constructor steps with the group's initial_lr (set by the earlier scheduler)."""
    fused, _, ref, _ = _ones_grad_pair()
    lrs = []
    for module, opt in ((fused_sched, fused), (torch_sched, ref)):
        chained = module.ChainedScheduler([module.StepLR(opt, 3, 0.5), module.CyclicLR(opt, 0.01, 0.1, step_size_up=4)])
        seq = [_lr(opt)]
        for _ in range(10):
            chained.step()
            seq.append(_lr(opt))
        lrs.append(seq)
    assert lrs[1][0] == 0.1
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-12)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_onecycle_in_sequential_past_total_steps_raises_like_torch():
    """Issue 6: torch's ValueError from the OneCycleLR child, raised before anything changes."""
    fused, _, ref, _ = _ones_grad_pair()
    scheds = [module.SequentialLR(opt, [module.ConstantLR(opt, 0.5, total_iters=2),
                                        module.OneCycleLR(opt, max_lr=0.5, total_steps=4)], milestones=[3])
              for module, opt in ((fused_sched, fused), (torch_sched, ref))]
    for _ in range(7):
        for s in scheds:
            s.step()
    error_type, message = _torch_error(scheds[1].step)
    lr_before = _lr(fused)
    with pytest.raises(error_type) as raised:
        scheds[0].step()
    assert str(raised.value) == message
    assert _lr(fused) == lr_before


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_chained_state_dict_restores_children_counters():
    """Issue 6: after a round trip the OneCycleLR child raises at the same step as without one (and as torch)."""
    def build_chain(module, opt):
        return module.ChainedScheduler([module.ExponentialLR(opt, 0.9), module.OneCycleLR(opt, 0.5, total_steps=6)])

    fused, _, ref, _ = _ones_grad_pair()
    chain, ref_chain = build_chain(fused_sched, fused), build_chain(torch_sched, ref)
    for _ in range(3):
        chain.step()
        ref_chain.step()
    state = chain.state_dict()
    resumed_opt = _ones_grad_pair()[0]
    resumed = build_chain(fused_sched, resumed_opt)
    resumed.load_state_dict(state)
    for _ in range(3):
        resumed.step()
        ref_chain.step()
        assert _lr(resumed_opt) == pytest.approx(_lr(ref), rel=1e-12)
    error_type, message = _torch_error(ref_chain.step)
    with pytest.raises(error_type) as raised:
        resumed.step()
    assert str(raised.value) == message


@pytest.mark.parametrize("make", [
    lambda m, o: m.ConstantLR(o, factor=0.0, total_iters=3),
    lambda m, o: m.CosineAnnealingLR(o, T_max=0),
    lambda m, o: m.OneCycleLR(o, max_lr=0.5, total_steps=5, pct_start=1.0),
    lambda m, o: m.SequentialLR(o, [m.ExponentialLR(o, 0.9), m.LinearLR(o, 0.5, total_iters=0)], milestones=[2]),
    lambda m, o: m.SequentialLR(o, [m.ExponentialLR(o, 0.9), m.PolynomialLR(o, total_iters=0)], milestones=[2]),
], ids=["constant_factor0", "cosine_tmax0", "onecycle_empty_last_phase", "sequential_linear0", "sequential_poly0"])
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_division_by_zero_raises_at_construction(make):
    """Issue 6: inputs on which torch raises ZeroDivisionError in a later step raise ValueError at construction,
    leaving the lr finite (never NaN)."""
    fused, _, ref, _ = _ones_grad_pair()
    torch_sched_ = make(torch_sched, ref)
    with pytest.raises(ZeroDivisionError):
        for _ in range(10):
            torch_sched_.step()
    with pytest.raises(ValueError, match="ZeroDivisionError"):
        make(fused_sched, fused)
    assert math.isfinite(_lr(fused))


@pytest.mark.parametrize("second", ["OneCycleLR", "CyclicLR"])
@pytest.mark.parametrize("composite", [False, True], ids=["leaf", "in_chained"])
@pytest.mark.parametrize("per_step", [False, True])
def test_onecycle_reads_bounds_a_later_constructor_wrote(second, composite, per_step):
    """Issue 5: torch's OneCycleLR reads max/min lr and the momentum bounds from the param group at every step,
    where a later OneCycleLR (or a momentum-cycling CyclicLR) constructor overwrote them."""
    fused, fused_p, ref, torch_p = _ones_grad_pair()
    built = []
    for module, opt, extra in ((fused_sched, fused, dict(per_step=per_step)), (torch_sched, ref, {})):
        first = module.OneCycleLR(opt, max_lr=0.5, total_steps=30, base_momentum=0.7, max_momentum=0.9,
                                  **({} if composite else extra))
        if composite:
            first = module.ChainedScheduler([first], **extra)
        if second == "OneCycleLR":
            later = module.OneCycleLR(opt, max_lr=0.2, total_steps=60, div_factor=5.0, base_momentum=0.6,
                                      max_momentum=0.8, **extra)
        else:
            later = module.CyclicLR(opt, 0.01, 0.1, step_size_up=4, base_momentum=0.5, max_momentum=0.85, **extra)
        built.append((first, later))
    for step in range(25):
        _step_both_with_ones(fused, fused_p, ref, torch_p)
        for sched in built[0] + built[1]:
            sched.step()
        assert _lr(fused) == pytest.approx(_lr(ref), rel=1e-9), step
        assert fused._device_schedule.momenta.tolist() == pytest.approx(torch_momenta(ref), rel=1e-9), step
    torch.testing.assert_close(fused_p, torch_p, **PARAM_TOL)


@pytest.mark.parametrize("per_step", [False, True])
def test_cosine_float_t_max_restart_missed_by_rounding_stays_finite(per_step):
    """T_max=0.56: at epoch 15, (14 - 0.56) % 1.12 rounds to nonzero, so torch takes the ratio form and divides
    by 1 + cos(25 pi) == 0 (ZeroDivisionError). The device takes the restart branch: a finite lr."""
    fused, _, ref, _ = _ones_grad_pair()
    sched = fused_sched.CosineAnnealingLR(fused, T_max=0.56, per_step=per_step)
    ref_sched = torch_sched.CosineAnnealingLR(ref, T_max=0.56)
    for epoch in range(1, 15):
        fused.step()
        ref.step()
        sched.step()
        ref_sched.step()
        assert _lr(fused) == pytest.approx(_lr(ref), rel=1e-9, abs=1e-15), epoch
    fused.step()
    sched.step()
    with pytest.raises(ZeroDivisionError):
        ref_sched.step()
    restart = _lr(ref) + 0.1 * (1 - math.cos(math.pi / 0.56)) / 2  # torch's restart branch, eta_min 0
    assert _lr(fused) == pytest.approx(restart, rel=1e-12)
