"""The one data-driven registry the fusedopt tests are parametrized from.

Each entry pairs a fusedopt class (by name, resolved lazily so that a missing class fails the tests that
need it instead of the whole collection) with its torch.optim reference, the option sets that cover
every constructor option and their combinations, per-group overrides for multi-group runs, and invalid
constructor arguments. The expected exception type and message of every invalid input are read from
torch.optim itself at import time, so they follow torch instead of being copied by hand.
"""
import re
from dataclasses import dataclass, field

import torch

# The references of the algorithms torch.optim lacks (Lion, LAMB). fusedopt's import never fails (without the
# compiled extension it warns and falls back), and references.py needs nothing but torch, so importing it here
# cannot break collection; the error cases below need the classes at import time anyway.
from fusedopt import references


@dataclass(frozen=True)
class Entry:
    name: str  # short id used in test names
    fused_name: str  # attribute of the fusedopt package
    torch_cls: type
    # option-set id -> constructor kwargs; "defaults" (no kwargs) must stay first: it checks the defaults.
    option_sets: dict
    # Hyperparameters for param groups 1 and 2 of multi-group runs (group 0 uses the constructor kwargs).
    group_overrides: tuple
    # Option sets run with the expensive shape sets / every dtype: the defaults and the richest combination.
    representative: tuple
    # Invalid constructor kwargs, checked against torch's own validation (see error_cases()).
    bad_kwargs: tuple
    # State keys torch creates for some option set; a sanity check that option sets reach every buffer.
    state_keys: frozenset = field(default_factory=frozenset)
    # Options that make the update ill-conditioned in fp32 when set in any group: such fp32 runs are
    # compared with conftest.ILL_CONDITIONED_FP32_TOLERANCE instead of rtol=1e-5 (the reason is there).
    ill_conditioned: tuple = ()
    # fp16/bf16 runs: fusedopt's error against an fp64 run may be at most this many times torch's own (+ a
    # floor); None: conftest.LOWP_ERROR_RATIO
    lowp_error_ratio: float | None = None

    @property
    def fused_cls(self):
        import fusedopt

        return getattr(fusedopt, self.fused_name)


_COMMON_BAD = (
    {"lr": -1.0},
    {"lr": torch.tensor([0.1, 0.2])},  # tensor lr must be 1-element
)
# Every algorithm but SGD (which only checks `lr < 0`) rejects a NaN lr.
_NAN_LR = ({"lr": float("nan")},)

ENTRIES = (
    Entry(
        name="sgd",
        fused_name="FusedSGD",
        torch_cls=torch.optim.SGD,
        option_sets={
            "defaults": {},
            "plain": {"lr": 0.1},
            "momentum": {"lr": 0.1, "momentum": 0.9},
            "momentum_dampening": {"lr": 0.1, "momentum": 0.9, "dampening": 0.3},
            "nesterov": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
            "weight_decay": {"lr": 0.1, "weight_decay": 0.05},
            "maximize": {"lr": 0.1, "maximize": True},
            "momentum_dampening_wd_maximize": {
                "lr": 0.05, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.01, "maximize": True,
            },
            "nesterov_wd_maximize": {
                "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.02, "maximize": True,
            },
        },
        group_overrides=({"lr": 0.03, "weight_decay": 0.1}, {"momentum": 0.5, "maximize": True}),
        representative=("defaults", "nesterov_wd_maximize"),
        bad_kwargs=_COMMON_BAD + (
            {"momentum": -0.1},
            {"weight_decay": -0.01},
            {"nesterov": True},  # nesterov needs momentum
            {"nesterov": True, "momentum": 0.9, "dampening": 0.1},  # ... and zero dampening
        ),
        state_keys=frozenset({"momentum_buffer"}),
    ),
    Entry(
        name="adam",
        fused_name="FusedAdam",
        torch_cls=torch.optim.Adam,
        option_sets={
            "defaults": {},
            "lr": {"lr": 1e-2},
            "amsgrad": {"lr": 1e-2, "amsgrad": True},
            "weight_decay": {"lr": 1e-2, "weight_decay": 0.1},
            "maximize": {"lr": 1e-2, "maximize": True},
            "betas_eps": {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6},
            "decoupled_weight_decay": {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
            "amsgrad_wd_maximize": {
                "lr": 1e-2, "betas": (0.85, 0.95), "weight_decay": 0.05, "amsgrad": True, "maximize": True,
            },
        },
        group_overrides=({"lr": 3e-3, "betas": (0.5, 0.6)}, {"weight_decay": 0.2, "amsgrad": True, "eps": 1e-4}),
        representative=("defaults", "amsgrad_wd_maximize"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"eps": -1e-8},
            {"betas": (1.0, 0.999)},
            {"betas": (-0.1, 0.999)},
            {"betas": (0.9, 1.0)},
            {"weight_decay": -0.1},
            {"betas": (torch.tensor(0.9), 0.999)},  # mixed float / tensor betas
        ),
        state_keys=frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    ),
    Entry(
        name="adamw",
        fused_name="FusedAdamW",
        torch_cls=torch.optim.AdamW,
        option_sets={
            "defaults": {},
            "lr": {"lr": 1e-2},
            "amsgrad": {"lr": 1e-2, "amsgrad": True},
            "weight_decay": {"lr": 1e-2, "weight_decay": 0.3},
            "no_weight_decay": {"lr": 1e-2, "weight_decay": 0.0},
            "maximize": {"lr": 1e-2, "maximize": True},
            "amsgrad_wd_maximize": {
                "lr": 1e-2, "betas": (0.85, 0.95), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True,
                "maximize": True,
            },
        },
        group_overrides=({"lr": 3e-3, "betas": (0.5, 0.6)}, {"weight_decay": 0.0, "amsgrad": True, "eps": 1e-4}),
        representative=("defaults", "amsgrad_wd_maximize"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"eps": -1e-8},
            {"betas": (1.0, 0.999)},
            {"betas": (0.9, -0.5)},
            {"weight_decay": -0.1},
        ),
        state_keys=frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    ),
    Entry(
        name="adagrad",
        fused_name="FusedAdagrad",
        torch_cls=torch.optim.Adagrad,
        option_sets={
            "defaults": {},
            "lr_decay": {"lr": 0.1, "lr_decay": 0.01},
            "initial_accumulator_value": {"lr": 0.1, "initial_accumulator_value": 0.5},
            "weight_decay": {"weight_decay": 0.1},
            "eps": {"eps": 1e-3},
            "maximize": {"maximize": True},
            "all_options": {
                "lr": 0.05, "lr_decay": 0.05, "initial_accumulator_value": 0.1, "weight_decay": 0.05,
                "eps": 1e-6, "maximize": True,
            },
        },
        # torch initializes every param's "sum" from the *constructor's* initial_accumulator_value, never
        # from a group's; the override in group 2 checks fusedopt does the same.
        group_overrides=({"lr": 0.2, "lr_decay": 0.1}, {"weight_decay": 0.1, "initial_accumulator_value": 2.0}),
        representative=("defaults", "all_options"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"lr_decay": -0.1},
            {"weight_decay": -0.1},
            {"initial_accumulator_value": -1.0},
            {"eps": -1e-10},
        ),
        state_keys=frozenset({"step", "sum"}),
    ),
    Entry(
        name="adadelta",
        fused_name="FusedAdadelta",
        torch_cls=torch.optim.Adadelta,
        option_sets={
            "defaults": {},
            "lr": {"lr": 0.5},
            "rho": {"rho": 0.5},
            "eps": {"eps": 1e-3},
            "weight_decay": {"weight_decay": 0.1},
            "maximize": {"maximize": True},
            "all_options": {"lr": 2.0, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.05, "maximize": True},
        },
        group_overrides=({"lr": 0.3, "rho": 0.95}, {"eps": 1e-2, "weight_decay": 0.2}),
        representative=("defaults", "all_options"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"rho": -0.1},
            {"rho": 1.5},
            {"eps": -1e-6},
            {"weight_decay": -0.1},
        ),
        state_keys=frozenset({"step", "square_avg", "acc_delta"}),
    ),
    Entry(
        name="adamax",
        fused_name="FusedAdamax",
        torch_cls=torch.optim.Adamax,
        option_sets={
            "defaults": {},
            "betas": {"lr": 1e-2, "betas": (0.5, 0.9)},
            "eps": {"lr": 1e-2, "eps": 1e-3},
            "weight_decay": {"lr": 1e-2, "weight_decay": 0.1},
            "maximize": {"lr": 1e-2, "maximize": True},
            "all_options": {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05, "maximize": True},
        },
        group_overrides=({"lr": 5e-3, "betas": (0.3, 0.5)}, {"eps": 1e-2, "weight_decay": 0.2}),
        representative=("defaults", "all_options"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"eps": -1e-8},
            {"betas": (1.0, 0.999)},
            {"betas": (0.9, 1.0)},
            {"weight_decay": -0.1},
        ),
        state_keys=frozenset({"step", "exp_avg", "exp_inf"}),
    ),
    Entry(
        name="rmsprop",
        fused_name="FusedRMSprop",
        torch_cls=torch.optim.RMSprop,
        option_sets={
            "defaults": {},
            "alpha": {"alpha": 0.9},
            "eps": {"eps": 1e-4},
            "weight_decay": {"weight_decay": 0.1},
            "momentum": {"momentum": 0.9},
            "centered": {"centered": True},
            "maximize": {"maximize": True},
            "centered_momentum": {"centered": True, "momentum": 0.5},
            "all_options": {
                "lr": 5e-3, "alpha": 0.95, "eps": 1e-6, "weight_decay": 0.05, "momentum": 0.7, "centered": True,
                "maximize": True,
            },
        },
        group_overrides=({"lr": 2e-2, "alpha": 0.5}, {"momentum": 0.3, "centered": True}),
        representative=("defaults", "all_options"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"eps": -1e-8},
            {"momentum": -0.1},
            {"weight_decay": -0.1},
            {"alpha": -0.5},
        ),
        state_keys=frozenset({"step", "square_avg", "momentum_buffer", "grad_avg"}),
        # centered: sqrt(square_avg - grad_avg**2) cancels catastrophically when the grad barely varies
        ill_conditioned=("centered",),
    ),
    Entry(
        name="nadam",
        fused_name="FusedNAdam",
        torch_cls=torch.optim.NAdam,
        option_sets={
            "defaults": {},
            "lr": {"lr": 1e-2},
            "betas_eps": {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6},
            # a large momentum_decay moves mu_t = beta1 (1 - 0.96^(t psi) / 2) visibly within 50 steps
            "momentum_decay": {"lr": 1e-2, "momentum_decay": 0.1},
            "no_momentum_decay": {"lr": 1e-2, "momentum_decay": 0.0},
            "weight_decay": {"lr": 1e-2, "weight_decay": 0.1},
            "decoupled_weight_decay": {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
            "maximize": {"lr": 1e-2, "maximize": True},
            "wd_maximize": {"lr": 1e-2, "weight_decay": 0.05, "momentum_decay": 0.02, "maximize": True},
            "all_options": {
                "lr": 1e-2, "betas": (0.85, 0.95), "eps": 1e-6, "weight_decay": 0.05, "momentum_decay": 0.01,
                "decoupled_weight_decay": True, "maximize": True,
            },
        },
        group_overrides=(
            {"lr": 3e-3, "betas": (0.5, 0.6), "momentum_decay": 0.1},
            {"weight_decay": 0.2, "decoupled_weight_decay": True, "eps": 1e-4},
        ),
        representative=("defaults", "all_options"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"eps": -1e-8},
            {"betas": (1.0, 0.999)},
            {"betas": (0.9, 1.0)},
            {"weight_decay": -0.1},
            {"momentum_decay": -0.1},
        ),
        state_keys=frozenset({"step", "mu_product", "exp_avg", "exp_avg_sq"}),
    ),
    Entry(
        name="radam",
        fused_name="FusedRAdam",
        torch_cls=torch.optim.RAdam,
        # Every beta2 >= 0.9 here takes the un-rectified branch (rho_t <= 5) on steps 1-5 and the rectified
        # one from step 6 (beta2 = 0.8: from step 7); beta2 <= 0.6 gives rho_inf <= 4: never rectified.
        option_sets={
            "defaults": {},
            "lr": {"lr": 1e-2},
            "betas_eps": {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-6},
            "betas_slow_rect": {"lr": 1e-2, "betas": (0.9, 0.8)},
            "never_rectified": {"lr": 1e-2, "betas": (0.9, 0.5)},
            "weight_decay": {"lr": 1e-2, "weight_decay": 0.1},
            "decoupled_weight_decay": {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
            "maximize": {"lr": 1e-2, "maximize": True},
            "wd_maximize": {"lr": 1e-2, "weight_decay": 0.05, "maximize": True},
            "all_options": {
                "lr": 1e-2, "betas": (0.85, 0.99), "eps": 1e-6, "weight_decay": 0.05,
                "decoupled_weight_decay": True, "maximize": True,
            },
        },
        group_overrides=(
            {"lr": 3e-3, "betas": (0.5, 0.6)},
            {"weight_decay": 0.2, "decoupled_weight_decay": True, "eps": 1e-4},
        ),
        representative=("defaults", "all_options"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"eps": -1e-8},
            {"betas": (1.0, 0.999)},
            {"betas": (0.9, 1.0)},
            {"weight_decay": -0.1},
        ),
        state_keys=frozenset({"step", "exp_avg", "exp_avg_sq"}),
    ),
    Entry(
        name="rprop",
        fused_name="FusedRprop",
        torch_cls=torch.optim.Rprop,
        option_sets={
            "defaults": {},
            "lr": {"lr": 0.05},
            "etas": {"etas": (0.3, 1.5)},
            # lr 0.01 -> one decrease reaches the minimum, one increase the maximum: both clamps are hit
            "step_sizes": {"lr": 0.01, "step_sizes": (0.005, 0.012)},
            "maximize": {"maximize": True},
            "all_options": {"lr": 0.02, "etas": (0.4, 1.3), "step_sizes": (0.008, 0.03), "maximize": True},
        },
        # torch seeds each param's step_size from its group's lr when the state is created
        group_overrides=({"lr": 0.03, "etas": (0.6, 1.1)}, {"step_sizes": (1e-4, 0.02), "maximize": True}),
        representative=("defaults", "all_options"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"etas": (1.0, 1.2)},
            {"etas": (0.0, 1.2)},
            {"etas": (0.5, 1.0)},
            {"etas": (1.2, 0.5)},
        ),
        state_keys=frozenset({"step", "prev", "step_size"}),
    ),
    Entry(
        name="asgd",
        fused_name="FusedASGD",
        torch_cls=torch.optim.ASGD,
        # With the default t0 = 1e6, mu stays 1 and ax is a copy of the param; t0 = 3 (mu = 1 / (t - 1 - t0)
        # from step t0 + 3 = 6 on) and 2.5 (a non-integer t0) reach the averaging branch in a 50-step run. A
        # lambd far above the default 1e-4 makes eta = lr / (1 + lambd lr t)^alpha and the decay visible.
        option_sets={
            "defaults": {},
            "lr": {"lr": 0.05},
            "lambd": {"lambd": 0.5},
            "alpha": {"lambd": 0.5, "alpha": 0.5},
            "t0": {"t0": 3},
            "weight_decay": {"weight_decay": 0.1},
            "maximize": {"maximize": True},
            "all_options": {
                "lr": 0.05, "lambd": 0.3, "alpha": 0.6, "t0": 2.5, "weight_decay": 0.05, "maximize": True,
            },
        },
        # torch seeds each param's eta from its group's lr when the state is created
        group_overrides=({"lr": 0.03, "t0": 5, "alpha": 0.9}, {"lambd": 0.1, "weight_decay": 0.2, "t0": 0}),
        representative=("defaults", "all_options"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"weight_decay": -0.1},
        ),
        state_keys=frozenset({"step", "eta", "mu", "ax"}),
    ),
    Entry(
        name="lion",
        fused_name="FusedLion",
        torch_cls=references.Lion,
        option_sets={
            "defaults": {},
            "lr": {"lr": 1e-3},
            "betas": {"lr": 1e-3, "betas": (0.5, 0.9)},
            "weight_decay": {"lr": 1e-3, "weight_decay": 0.5},
            "maximize": {"lr": 1e-3, "maximize": True},
            # lr 1e-2: Lion moves every element by lr, and an lr near half a bf16 ulp of the weights (1e-3 at
            # |w| ~ 0.3) makes any run's trajectory a matter of rounding ties (fused rounds once per step, the
            # reference twice), not of the algorithm
            "all_options": {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1, "maximize": True},
        },
        group_overrides=({"lr": 3e-3, "betas": (0.95, 0.98)}, {"weight_decay": 0.3, "maximize": True}),
        representative=("defaults", "all_options"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"betas": (1.0, 0.99)},
            {"betas": (-0.1, 0.99)},
            {"betas": (0.9, 1.0)},
            {"weight_decay": -0.1},
        ),
        state_keys=frozenset({"step", "exp_avg"}),
        # sign(c) flips with any rounding of c near zero and each flip moves an element by 2 lr, so in bf16 the
        # worst element's error counts flips (measured: torch 0.08, fusedopt 0.21 at lr 1e-2 over 50 steps)
        lowp_error_ratio=4.0,
    ),
    Entry(
        name="lamb",
        fused_name="FusedLAMB",
        torch_cls=references.LAMB,
        # max_grad_norm (default 1.0) is a constructor option, not a param-group entry: the clipping is global.
        option_sets={
            "defaults": {},
            "lr": {"lr": 1e-2},
            "betas_eps": {"lr": 1e-2, "betas": (0.8, 0.9), "eps": 1e-4},
            "no_weight_decay": {"lr": 1e-2, "weight_decay": 0.0},
            "weight_decay": {"lr": 1e-2, "weight_decay": 0.1},
            "no_clipping": {"lr": 1e-2, "max_grad_norm": None},
            "loose_clipping": {"lr": 1e-2, "max_grad_norm": 1e6},  # the factor is computed and is 1
            "maximize": {"lr": 1e-2, "maximize": True},
            "all_options": {
                "lr": 1e-2, "betas": (0.85, 0.95), "eps": 1e-5, "weight_decay": 0.05, "max_grad_norm": 5.0,
                "maximize": True,
            },
        },
        group_overrides=({"lr": 3e-3, "betas": (0.5, 0.6)}, {"weight_decay": 0.0, "eps": 1e-3, "maximize": True}),
        representative=("defaults", "all_options"),
        bad_kwargs=_COMMON_BAD + _NAN_LR + (
            {"eps": -1e-8},
            {"betas": (1.0, 0.999)},
            {"betas": (0.9, 1.0)},
            {"weight_decay": -0.1},
            {"max_grad_norm": -1.0},
            {"max_grad_norm": float("nan")},
            {"max_grad_norm": float("inf")},
        ),
        state_keys=frozenset({"step", "exp_avg", "exp_avg_sq"}),
    ),
)

ENTRY_BY_NAME = {e.name: e for e in ENTRIES}


# --------------------------------------------------------------------------------------------------
# Error inputs, with the exception torch raises for them.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorCase:
    id: str
    kwargs: dict
    # builds the params argument from a valid parameter tensor (None: [param])
    make_params: object
    exc_type: type
    match: str  # a regex matching the whole message


def _kwargs_id(kwargs):
    def fmt(v):
        if isinstance(v, torch.Tensor):
            return f"tensor{list(v.shape)}"
        if isinstance(v, tuple):
            return "(" + ",".join(fmt(x) for x in v) + ")"
        return repr(v)

    return ",".join(f"{k}={fmt(v)}" for k, v in kwargs.items())


def _leaf():
    return torch.zeros(3, requires_grad=True)


# Invalid `params` arguments: rejected by the common Optimizer machinery, identically for every algorithm.
PARAMS_ERRORS = (
    ("empty_params", lambda p: []),
    ("bare_tensor_params", lambda p: p),
    ("group_params_set", lambda p: [{"params": {p}}]),
    ("non_tensor_param", lambda p: [p, 1.0]),
    ("non_leaf_param", lambda p: [p * 2]),
    ("param_in_two_groups", lambda p: [{"params": [p]}, {"params": [p], "lr": 0.5}]),
    ("group_not_dict", lambda p: [{"params": [p]}, [p]]),
)


def _torch_raises(entry, kwargs, make_params):
    params = make_params(_leaf()) if make_params else [_leaf()]
    try:
        entry.torch_cls(params, **kwargs)
    except Exception as e:  # noqa: BLE001 - we record whatever torch raises
        return type(e), "^" + re.escape(str(e)) + "$"
    raise AssertionError(f"{entry.torch_cls.__module__}.{entry.torch_cls.__name__} accepted {kwargs}; fix the registry")


def error_cases(entry):
    cases = []
    for kwargs in entry.bad_kwargs:
        exc, match = _torch_raises(entry, kwargs, None)
        cases.append(ErrorCase(_kwargs_id(kwargs), kwargs, None, exc, match))
    for case_id, make in PARAMS_ERRORS:
        exc, match = _torch_raises(entry, {}, make)
        cases.append(ErrorCase(case_id, {}, make, exc, match))
    return cases


ERROR_CASES = [(e, c) for e in ENTRIES for c in error_cases(e)]


# --------------------------------------------------------------------------------------------------
# Parametrization helpers.
# --------------------------------------------------------------------------------------------------
def option_params(representative_only=False):
    """(entry, option-set id) pairs as pytest params with readable ids."""
    import pytest

    out = []
    for e in ENTRIES:
        for opt_id in e.option_sets:
            if representative_only and opt_id not in e.representative:
                continue
            out.append(pytest.param(e, opt_id, id=f"{e.name}-{opt_id}"))
    return out


def entry_params():
    import pytest

    return [pytest.param(e, id=e.name) for e in ENTRIES]
