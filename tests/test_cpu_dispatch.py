"""The CPU kernel variants (csrc/cpu/update_kernels.cpp, compiled once per instruction set) and their dispatch.

Every variant evaluates the same rule on Vectorized registers of a different width, the build turns FMA
contraction off (-ffp-contract=off) and sqrt, division and the bf16/fp16 conversions round to nearest even in
every instruction set, so each variant must match the baseline ("default") one bit for bit, params and every
state buffer, over many steps, on tensors whose sizes leave partial registers and span several chunks.
"""
import glob
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fusedopt
from conftest import PSpec, Problem, bits, run
from registry import ENTRIES, option_params

pytestmark = pytest.mark.skipif(not fusedopt.EXTENSION_AVAILABLE, reason="fusedopt extension not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTOR_VARIANTS = ("avx2", "avx512")
STEPS = int(os.environ.get("FUSEDOPT_DISPATCH_STEPS", "12"))
# Sizes around every register width (8/16 fp32, 4/8 fp64, 16/32 bf16 lanes), a scalar, a 2-D transposed param
# (a dense copy) and one tensor over two 16,384-element chunks whose second chunk ends in a partial register.
SPECS = (
    PSpec((16384 * 2 + 37,)),
    PSpec((1,)),
    PSpec(()),
    PSpec((7,)),
    PSpec((33,)),
    PSpec((65,), group=1),
    PSpec((300, 31), layout="transposed", group=1),
    PSpec((12, 5), group=2, grad="odd_none"),
)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def ops():
    return torch.ops.fusedopt


def available():
    return list(ops()._cpu_variants())


@pytest.fixture
def restore_variant():
    yield
    ops()._set_cpu_variant("")


def vector_variants():
    variants = [v for v in VECTOR_VARIANTS if v in available()]
    if not variants:
        pytest.skip(f"this CPU has no AVX2 or AVX-512 (available: {', '.join(available())})")
    return variants


def run_with_variant(variant, entry, kwargs, dtype):
    ops()._set_cpu_variant(variant)
    problem = Problem(SPECS, "cpu", seed=3)
    return run(entry.fused_cls, problem, dtype, kwargs, entry.group_overrides, steps=STEPS)


def assert_identical_runs(opt, params, ref_opt, ref_params, variant, reference="the default variant"):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert torch.equal(bits(p), bits(q)), f"{variant}: param {i} differs from {reference}"
        state, ref_state = opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert set(state) == set(ref_state), f"{variant}: param {i}: state keys differ"
        for key, value in ref_state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(bits(state[key]), bits(value)), f"{variant}: param {i}: state[{key!r}] differs"


def assert_variants_match_default(entry, kwargs, dtype):
    variants = vector_variants()
    ref_opt, ref_params = run_with_variant("default", entry, kwargs, dtype)
    init = Problem(SPECS, "cpu", seed=3).params(dtype)
    assert any(not torch.equal(p, q) for p, q in zip(ref_params, init)), "the run did not move the params"
    for variant in variants:
        opt, params = run_with_variant(variant, entry, kwargs, dtype)
        assert_identical_runs(opt, params, ref_opt, ref_params, variant)


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("entry, opt_id", option_params(representative_only=True))
def test_variants_match_default_bit_for_bit(entry, opt_id, dtype_id, restore_variant):
    assert_variants_match_default(entry, entry.option_sets[opt_id], DTYPES[dtype_id])


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in ENTRIES])
def test_clipping_variants_match_default_bit_for_bit(entry, dtype_id, restore_variant):
    """The grad-statistics pass (the sum of squares max_grad_norm clips by) is vectorized per variant with a fixed
    order of additions: the global norm, so the clip factor, params and state, must match the baseline's bits.
    0.5 is far below these grads' norm, so every step clips."""
    kwargs = {**entry.option_sets[entry.representative[0]], "max_grad_norm": 0.5}
    assert_variants_match_default(entry, kwargs, DTYPES[dtype_id])


def _grad_statistics(variant, dtype, poison=None, spread=0):
    """grad_stats ([sum of squares, non-finite count]) after the op's reduce phase alone on SPECS' grads, in
    `variant`; `poison`: (tensor index, element index) of a grad element set to inf first; `spread`: the grads'
    magnitudes spread over 2^-spread .. 2^spread times a normal draw."""
    ops()._set_cpu_variant(variant)
    problem = Problem(SPECS, "cpu", seed=3)
    params = problem.params(dtype)
    for i, p in enumerate(params):
        g = torch.Generator().manual_seed(100 + i)
        scale = torch.exp2(torch.randint(-spread, spread + 1, p.shape, generator=g))
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(dtype)
    if poison is not None:
        params[poison[0]].grad.view(-1)[poison[1]] = float("inf")
    op, kwargs = fusedopt.FusedSGD(params, lr=0.1)._op_invocations()[0]
    stats = torch.zeros(2, dtype=torch.float64)
    op(**{**kwargs, "phases": 1, "grad_stats": stats})  # kReduceGrads: nothing is updated
    return stats, params


@pytest.mark.parametrize("spread", [0, 12])
@pytest.mark.parametrize("dtype_id", list(DTYPES))
def test_grad_statistics_match_default_bit_for_bit(dtype_id, spread, restore_variant):
    """The sum of squares itself, whose low bits the clip factor's rounding to float can hide: every variant adds
    the same squares in the same order. It also matches float64 arithmetic to rounding. Two spreads of
    magnitudes: adding the accumulators in another order changed the bf16 sum with the first and the fp32 sum
    with the second (fp16 squares add exactly in double, in any order)."""
    dtype = DTYPES[dtype_id]
    expected, params = _grad_statistics("default", dtype, spread=spread)
    exact = sum(float(p.grad.double().square().sum()) for p in params)
    assert expected[1] == 0 and abs(float(expected[0]) - exact) <= 1e-12 * exact
    for variant in vector_variants():
        stats, _ = _grad_statistics(variant, dtype, spread=spread)
        assert torch.equal(stats, expected), f"{variant}: {stats.tolist()} != default's {expected.tolist()}"


@pytest.mark.parametrize("where", [(0, 5), (0, 16384 * 2 + 36), (3, 6)], ids=["whole-register", "tail", "small"])
@pytest.mark.parametrize("dtype_id", list(DTYPES))
def test_grad_statistics_see_an_inf_anywhere(dtype_id, where, restore_variant):
    """A non-finite grad element is counted whether it lies in a whole register or in a tensor's last, partial
    one, in every variant."""
    for variant in ["default"] + list(VECTOR_VARIANTS):
        if variant not in available():
            continue
        stats, _ = _grad_statistics(variant, DTYPES[dtype_id], poison=where)
        assert stats[1] >= 1, f"{variant}: the inf grad at {where} went unnoticed"


# The stored path (csrc/cpu/stored_update.h) in every variant: stochastic bf16 rounding and Kahan's nearest
# rounding run in AVX2/AVX-512 integer lanes there, and must give the bits of the baseline's scalar functions
# (storage.h): (options, param dtype) per case, the state dtype following the options.
STORED_MODES = {
    "stochastic-bf16": ({"param_rounding": "stochastic", "seed": 5}, torch.bfloat16),
    "stochastic-fp16": ({"param_rounding": "stochastic", "seed": 5}, torch.float16),
    "kahan-bf16": ({"param_rounding": "kahan"}, torch.bfloat16),
    "kahan-fp16": ({"param_rounding": "kahan"}, torch.float16),
    "master-stochastic-bf16": ({"master_weights": True, "param_rounding": "stochastic", "seed": 5}, torch.bfloat16),
    "master-stochastic-fp16": ({"master_weights": True, "param_rounding": "stochastic", "seed": 5}, torch.float16),
    "fp32-state-bf16": ({"state_dtype": torch.float32}, torch.bfloat16),
    "fp32-state-fp16": ({"state_dtype": torch.float32}, torch.float16),
    "bf16-state-stochastic-fp32": ({"state_dtype": torch.bfloat16, "param_rounding": "stochastic", "seed": 5},
                                   torch.float32),
}


@pytest.mark.parametrize("mode", list(STORED_MODES))
@pytest.mark.parametrize("entry, opt_id", option_params(representative_only=True))
def test_stored_path_variants_match_default_bit_for_bit(entry, opt_id, mode, restore_variant):
    options, dtype = STORED_MODES[mode]
    assert_variants_match_default(entry, {**entry.option_sets[opt_id], **options}, dtype)


# The stored path's fixed-layout kernels (csrc/cpu_kernels.h: kFixedLayouts, the modes a user names) against its
# general kernel, which reads the same layout from the table: the same bits, in every variant. Per mode: its
# options, the params' dtype and the name of the kernel that serves it (kFixedLayouts' names; "general" is the
# general kernel).
FIXED_LAYOUTS = {
    "stochastic-bf16": ({"param_rounding": "stochastic", "seed": 5}, torch.bfloat16, "stochastic"),
    "kahan-bf16": ({"param_rounding": "kahan"}, torch.bfloat16, "kahan"),
    "master-bf16": ({"master_weights": True}, torch.bfloat16, "master"),
    "master-stochastic-bf16": ({"master_weights": True, "param_rounding": "stochastic", "seed": 5},
                               torch.bfloat16, "master+stochastic"),
    "fp32-state-bf16": ({"state_dtype": torch.float32}, torch.bfloat16, "fp32-state"),
    "stochastic-fp16": ({"param_rounding": "stochastic", "seed": 5}, torch.float16, "stochastic-fp16"),
    "kahan-fp16": ({"param_rounding": "kahan"}, torch.float16, "kahan-fp16"),
    "master-fp16": ({"master_weights": True}, torch.float16, "master-fp16"),
    "master-stochastic-fp16": ({"master_weights": True, "param_rounding": "stochastic", "seed": 5},
                               torch.float16, "master+stochastic-fp16"),
    "fp32-state-fp16": ({"state_dtype": torch.float32}, torch.float16, "fp32-state-fp16"),
}


@pytest.fixture
def restore_layouts():
    yield
    ops()._set_fixed_layouts(True)


def run_stored(variant, fixed, entry, kwargs, dtype):
    """run_with_variant on `dtype` params with the fixed-layout kernels on or off, and the stored-path launches
    each kernel slot ran meanwhile."""
    ops()._set_fixed_layouts(fixed)
    before = ops()._stored_launches()
    opt, params = run_with_variant(variant, entry, kwargs, dtype)
    after = ops()._stored_launches()
    return opt, params, {name: after[name] - before[name] for name in after if after[name] != before[name]}


@pytest.mark.parametrize("mode", list(FIXED_LAYOUTS))
@pytest.mark.parametrize("entry, opt_id", option_params(representative_only=True))
def test_fixed_layout_kernels_match_the_general_kernel(entry, opt_id, mode, restore_variant, restore_layouts):
    options, dtype, kernel = FIXED_LAYOUTS[mode]
    kwargs = {**entry.option_sets[opt_id], **options}
    for variant in available():
        ref_opt, ref_params, general = run_stored(variant, False, entry, kwargs, dtype)
        opt, params, fixed = run_stored(variant, True, entry, kwargs, dtype)
        assert list(general) == ["general"] and general["general"] > 0, f"{variant}: launches {general}"
        assert fixed == {kernel: general["general"]}, f"{variant}: expected every launch in {kernel}, got {fixed}"
        assert_identical_runs(opt, params, ref_opt, ref_params, f"{variant}, fixed layout {mode}", "the general kernel")


def _edge_problem(dtype):
    """(params, grads) whose SGD updates (lr 1) land on the dtype's edge cases: zeros of both signs, subnormals,
    values past the largest finite one (to round to it or overflow to inf), inf, NaN, and random values across
    the whole range, over full and partial registers."""
    gen = torch.Generator().manual_seed(11)
    info = torch.finfo(dtype)
    big, tiny = float(info.max), float(info.smallest_normal)
    fixed = [(0.0, -tiny / 8), (-0.0, tiny / 8), (0.0, 0.0), (-0.0, 0.0), (tiny, tiny / 3), (-tiny, -tiny / 5),
             (big, -big / 2**13), (-big, big / 2**13), (big, -big / 2**12), (-big, big / 2**11), (big, -big / 2**9),
             (big, -big),
             (1.0, -1e-3), (-1.0, 1e-3), (float("nan"), 0.0), (float("inf"), 1.0), (float("-inf"), -1.0),
             (1.0, float("nan"))]
    params = [torch.tensor([p for p, _ in fixed])]
    grads = [torch.tensor([g for _, g in fixed])]
    for scale in (tiny / 4, tiny * 4, 1.0, big / 2):  # subnormal, small, unit, near overflow
        params.append(torch.randn(1000, generator=gen) * scale)
        grads.append(torch.randn(1000, generator=gen) * scale / 3)
    param = torch.cat(params).to(dtype)
    return param, torch.cat(grads).to(dtype)


@pytest.mark.parametrize("dtype_id", ["bf16", "fp16"])
def test_stochastic_rounding_of_edge_values_matches_default(dtype_id, restore_variant):
    variants = vector_variants()
    start, grad = _edge_problem(DTYPES[dtype_id])

    def rounded(variant):
        ops()._set_cpu_variant(variant)
        param = start.clone().requires_grad_()
        opt = fusedopt.FusedSGD([param], lr=1.0, param_rounding="stochastic", seed=9)
        results = []
        for _ in range(3):
            with torch.no_grad():
                param.copy_(start)
            param.grad = grad.clone()
            opt.step()
            results.append(param.detach().clone())
        return results

    reference = rounded("default")
    assert reference[0].isinf().any() and reference[0].isnan().any() and not torch.equal(reference[0], reference[1])
    for variant in variants:
        for step, (got, want) in enumerate(zip(rounded(variant), reference)):
            differ = ((bits(got) != bits(want)).nonzero().flatten() // got.element_size()).unique()  # elements
            assert differ.numel() == 0, (f"{variant}, step {step}: elements {differ[:8].tolist()} differ: "
                                         f"{got[differ[:8]].tolist()} vs {want[differ[:8]].tolist()}")


def _fp32_values_across_fp16():
    """fp32 values with random 23-bit mantissas and both signs at every exponent fp16's stochastic rounding treats
    apart (below its subnormals' 2^-24 spacing, through them, its normal range, past its largest finite value),
    and the boundaries themselves with their fp32 neighbours."""
    gen = torch.Generator().manual_seed(3)
    exponents = torch.arange(-30, 18, dtype=torch.float64).repeat_interleave(96)
    mantissas = 1 + torch.randint(0, 2**23, exponents.shape, generator=gen, dtype=torch.float64) / 2**23
    signs = torch.randint(0, 2, exponents.shape, generator=gen, dtype=torch.float64) * 2 - 1
    spread = (signs * mantissas * 2**exponents).float()
    edges = torch.tensor([2.0**-25, 2.0**-24, 2.0**-14, 65504.0, 65512.0, 65520.0, 65536.0, 1.0, 0.0,
                          float("inf"), float("nan")])
    edges = torch.cat([edges, torch.nextafter(edges, torch.zeros(())), torch.nextafter(edges, edges * 2 + 1)])
    return torch.cat([spread, edges, -edges])


def test_stochastic_fp16_rounding_of_any_fp32_value_matches_default(restore_variant):
    """fp32 master copies rounded stochastically into fp16 params (SGD with lr 0 leaves the master as it is): every
    vector variant gives the baseline's bits over three steps' draws, each result is one of the value's two fp16
    neighbours, and a value past 65504 but short of fp16's overflow threshold keeps 65504 in either sign."""
    variants = vector_variants()
    values = _fp32_values_across_fp16()

    def rounded(variant):
        ops()._set_cpu_variant(variant)
        param = torch.zeros(values.shape, dtype=torch.float16, requires_grad=True)
        opt = fusedopt.FusedSGD([param], lr=0.0, master_weights=True, param_rounding="stochastic", seed=4)
        param.grad = torch.zeros_like(param)
        opt.step()  # creates the master copy
        results = []
        for _ in range(3):
            opt.state[param]["master_param"].copy_(values)
            opt.step()
            results.append(param.detach().clone())
        return results

    reference = rounded("default")
    finite = values.abs() < 65520
    spacing = torch.clamp(2.0 ** (torch.floor(torch.log2(values.double().abs())) - 10), min=2.0**-24)
    overflows = ~finite & ~values.isnan()
    for got in reference:
        assert ((got.double() - values.double()).abs()[finite] <= spacing[finite]).all()
        assert torch.equal(got[overflows].double(), values[overflows].double().sign() * math.inf)
        assert got[values.isnan()].isnan().all()
        past = (values.abs() > 65504) & finite
        assert past.sum() >= 4 and torch.equal(got[past].double(), values[past].double().sign() * 65504)
    assert not torch.equal(bits(reference[0]), bits(reference[1]))
    for variant in variants:
        for step, (got, want) in enumerate(zip(rounded(variant), reference)):
            differ = (bits(got) != bits(want)).nonzero().flatten() // 2
            assert differ.numel() == 0, (f"{variant}, step {step}: values {values[differ[:8]].tolist()} rounded to "
                                         f"{got[differ[:8]].tolist()}, the baseline to {want[differ[:8]].tolist()}")


def test_default_variant_is_the_best_torch_would_use():
    names = available()
    assert names[0] == "default"
    torch_choice = torch.backends.cpu.get_cpu_capability().lower()  # "default", "avx2", "avx512" on x86
    order = ["default", "avx2", "avx512"]
    allowed = order[: order.index(torch_choice) + 1] if torch_choice in order else ["default"]
    assert ops()._cpu_variant() == [v for v in names if v in allowed][-1]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_aten_cpu_capability_selects_the_variant(capability):
    """ATEN_CPU_CAPABILITY, which caps torch's own kernels, caps fusedopt's too (checked in a fresh process)."""
    if capability not in available():
        pytest.skip(f"this CPU has no {capability}")
    code = "import torch, fusedopt; print(torch.ops.fusedopt._cpu_variant())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == capability


def test_bad_variant_names(restore_variant):
    with pytest.raises(RuntimeError, match="unknown CPU kernel variant 'sse9'"):
        ops()._set_cpu_variant("sse9")
    for name in VECTOR_VARIANTS:
        if name not in available():
            with pytest.raises(RuntimeError, match=f"the {name} CPU kernels are not available here"):
                ops()._set_cpu_variant(name)
    ops()._set_cpu_variant("default")
    assert ops()._cpu_variant() == "default"


def _objects():
    return sorted(glob.glob(os.path.join(ROOT, "build", "temp*", "*_kernels_*.o")))


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not installed")
@pytest.mark.parametrize("variant", VECTOR_VARIANTS)
def test_variant_objects_define_nothing_outside_their_namespace(variant):
    """The linker keeps one copy of each weak (inline, template) symbol. A non-local function defined in the
    AVX2/AVX-512 object could therefore replace the baseline's and run on a CPU without those instructions:
    every global or weak symbol such an object defines must live in its capability's namespace, except the
    kernel table (data, shared on purpose)."""
    objects = [o for o in _objects() if o.endswith(f"_{variant}.o")]
    if not objects:
        pytest.skip("no build/temp*/<algorithm>_kernels_<variant>.o here (built out of tree, e.g. by pip)")
    namespace = f"::{variant.upper()}::"
    foreign = []
    for obj in objects:  # every algorithm's object of this variant
        listing = subprocess.run(["nm", "-C", "--defined-only", obj], capture_output=True, text=True,
                                 check=True).stdout
        for line in listing.splitlines():
            _, kind, name = line.split(" ", 2)
            if kind.islower() and kind not in "uvw":  # file-local: cannot stand in for another object's symbol
                continue
            if namespace in name or name.endswith("::by_variant"):
                continue
            foreign.append(f"{os.path.basename(obj)}: {kind} {name}")
    assert not foreign, f"symbols outside {namespace}: {foreign[:10]}"
