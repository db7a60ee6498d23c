"""Numerics and torch.optim-compatible behaviour of every fusedopt optimizer, driven by tests/registry.py."""
import dataclasses
import inspect
import zlib

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.profiler import ProfilerActivity, profile

from conftest import (
    ALL_DTYPES,
    CHEAP_SHAPE_SETS,
    DEVICES,
    DTYPE_IDS,
    HEAVY_SHAPE_SETS,
    ILL_CONDITIONED_FP32_TOLERANCE,
    IGNORED_FLAGS,
    SHAPE_SETS,
    STEPS,
    TOLERANCES,
    Problem,
    assert_gaps_untouched,
    assert_matches,
    assert_moved,
    assert_within_torch_error,
    run,
    snapshot_gaps,
    train,
)
from registry import ENTRIES, entry_params, option_params


# group overrides that change only numbers, not the options that select a compiled kernel variant
LR_ONLY_OVERRIDES = ({"lr": 0.0123}, {"lr": 0.00456})


def _seed(*parts):
    return zlib.crc32("/".join(map(str, parts)).encode())


def test_extension_is_compiled():
    """CI must exercise the compiled kernels, not the pure-PyTorch fallback."""
    import fusedopt

    assert fusedopt.EXTENSION_AVAILABLE is True, "fusedopt._C is missing: the tests would only cover the fallback"


# --------------------------------------------------------------------------------------------------
# Numerics against torch.optim
# --------------------------------------------------------------------------------------------------
def _numeric_cases():
    """Every option set in fp32 on every cheap shape set; in fp64/fp16/bf16 every option set on the 4097-
    element tensor (vector body + tail) and the non-contiguous set, the representative option sets on every
    cheap shape set; the 300-tensor set with the richest option set in every dtype (and the defaults in fp32)."""
    cases = []
    for e in ENTRIES:
        for opt_id in e.option_sets:
            rep = opt_id in e.representative
            for shape_set in CHEAP_SHAPE_SETS:
                for dtype in ALL_DTYPES:
                    if dtype == torch.float32 or rep or shape_set in ("large", "noncontig"):
                        cases.append((e, opt_id, dtype, shape_set))
            for shape_set in HEAVY_SHAPE_SETS:
                if opt_id == e.representative[-1]:
                    cases += [(e, opt_id, dtype, shape_set) for dtype in ALL_DTYPES]
                elif opt_id in e.representative:
                    cases.append((e, opt_id, torch.float32, shape_set))
    return [
        pytest.param(e, o, d, s, id=f"{e.name}-{o}-{DTYPE_IDS[d]}-{s}")
        for e, o, d, s in cases
    ]


def _ill_conditioned(entry, kwargs, problem):
    groups = [kwargs] + [{**kwargs, **o} for o in entry.group_overrides[: problem.num_groups - 1]]
    return any(g.get(option) for g in groups for option in entry.ill_conditioned)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry,opt_id,dtype,shape_set", _numeric_cases())
def test_matches_torch(entry, opt_id, dtype, shape_set, device):
    """STEPS steps on identical params and grads: params, every state buffer and the step counters agree
    with torch.optim (fp32/fp64), or are at least as accurate as torch's own low-precision run (fp16/bf16)."""
    kwargs = entry.option_sets[opt_id]
    problem = Problem(shape_set, device, seed=_seed(entry.name, opt_id, shape_set))
    fused_params = problem.params(dtype)
    gaps = snapshot_gaps(fused_params)
    fused = entry.fused_cls(problem.param_arg(fused_params, entry.group_overrides), **kwargs)
    train(fused, problem, fused_params, 0, STEPS)
    assert_gaps_untouched(fused_params, gaps)

    ref, ref_params = run(entry.torch_cls, problem, dtype, kwargs, entry.group_overrides)
    if dtype in TOLERANCES:
        assert_moved(ref_params, problem.params(dtype))
        ill = dtype == torch.float32 and _ill_conditioned(entry, kwargs, problem)
        tol = ILL_CONDITIONED_FP32_TOLERANCE if ill else TOLERANCES[dtype]
        assert_matches(fused, fused_params, ref, ref_params, **tol)
    else:
        ref64, ref64_params = run(entry.torch_cls, problem, torch.float64, kwargs, entry.group_overrides, via=dtype)
        assert_moved(ref64_params, problem.params(torch.float64, via=dtype))
        assert_within_torch_error(fused, fused_params, ref, ref_params, ref64, ref64_params,
                                  ratio=entry.lowp_error_ratio)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry,opt_id", option_params(representative_only=True))
def test_mixed_dtypes_in_one_optimizer(entry, opt_id, device):
    """Params of all four dtypes in one optimizer (so at least one launch per dtype): each param ends where
    it ends in an optimizer whose params all have its dtype (verified against torch by test_matches_torch)."""
    kwargs = entry.option_sets[opt_id]
    if "max_grad_norm" in inspect.signature(entry.torch_cls).parameters:
        # a class that clips by default (LAMB) couples every param through the global norm: compare unclipped
        kwargs = {**kwargs, "max_grad_norm": None}
    problem = Problem("groups", device, seed=_seed(entry.name, opt_id, "mixed_dtypes"))
    dtypes = [ALL_DTYPES[i % len(ALL_DTYPES)] for i in range(len(problem.specs))]
    per_dtype = {d: problem.params(d) for d in ALL_DTYPES}
    mixed = [problem.params(d)[i] for i, d in enumerate(dtypes)]
    opt = entry.fused_cls(problem.param_arg(mixed, entry.group_overrides), **kwargs)
    singles = {d: entry.fused_cls(problem.param_arg(ps, entry.group_overrides), **kwargs) for d, ps in per_dtype.items()}
    for t in range(STEPS):
        grads = {d: problem.grads(t, d) for d in ALL_DTYPES}
        for i, (p, d) in enumerate(zip(mixed, dtypes)):
            p.grad = None if grads[d][i] is None else grads[d][i].clone()
        opt.step()
        for d, ps in per_dtype.items():
            for p, g in zip(ps, grads[d]):
                p.grad = g
            singles[d].step()
    for i, (p, d) in enumerate(zip(mixed, dtypes)):
        q = per_dtype[d][i]
        tol = TOLERANCES.get(d, {"rtol": 2 * torch.finfo(d).eps, "atol": 1e-6})  # same kernel: rounding only
        torch.testing.assert_close(p.detach(), q.detach(), **tol, msg=lambda m: f"param {i} ({d}): {m}")
        ps, qs = opt.state.get(p, {}), singles[d].state.get(q, {})
        assert set(ps) == set(qs)
        for key in qs:
            torch.testing.assert_close(ps[key], qs[key], **tol, msg=lambda m: f"param {i} ({d}) {key}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lr_kind", ["float", "tensor_0d", "tensor_1elem", "tensor_on_param_device"])
@pytest.mark.parametrize("entry,opt_id", option_params(representative_only=True))
def test_lr_tensor_and_schedule(entry, opt_id, lr_kind, device):
    """lr as a float or a 1-element tensor, changed mid-training the way LR schedulers do (assigning a
    float into the group, fill_() on a tensor lr): fusedopt must read it at every step, never cache it."""
    kwargs = dict(entry.option_sets[opt_id])
    lr = kwargs.get("lr", inspect.signature(entry.torch_cls.__init__).parameters["lr"].default)
    if lr_kind == "tensor_0d":
        lr = torch.tensor(lr)
    elif lr_kind == "tensor_1elem":
        lr = torch.tensor([lr])
    elif lr_kind == "tensor_on_param_device":  # fusedopt reads such an lr in the kernel (no host sync)
        lr = torch.tensor(lr, device=device)
    kwargs["lr"] = lr
    ref_kwargs = dict(kwargs, lr=float(lr))  # the reference always gets the same value as a float
    problem = Problem("groups", device, seed=_seed(entry.name, opt_id, lr_kind))
    dtype = torch.float32
    fused_params, ref_params = problem.params(dtype), problem.params(dtype)
    fused = entry.fused_cls(problem.param_arg(fused_params, entry.group_overrides), **kwargs)
    ref = entry.torch_cls(problem.param_arg(ref_params, entry.group_overrides), **ref_kwargs)
    half = STEPS // 2
    train(fused, problem, fused_params, 0, half)
    train(ref, problem, ref_params, 0, half)

    seen = set()
    for group in fused.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            if id(group["lr"]) not in seen:  # groups without an lr override share the user's tensor
                seen.add(id(group["lr"]))
                group["lr"].fill_(group["lr"].item() * 0.3)
        else:
            group["lr"] *= 0.3
    for fg, rg in zip(fused.param_groups, ref.param_groups):
        rg["lr"] = float(fg["lr"])
    assert (lr_kind == "float") == (not seen)

    train(fused, problem, fused_params, half, STEPS)
    train(ref, problem, ref_params, half, STEPS)
    assert_matches(fused, fused_params, ref, ref_params, **TOLERANCES[dtype])


# --------------------------------------------------------------------------------------------------
# The registry itself, and the API surface
# --------------------------------------------------------------------------------------------------
def _hyper(group):
    return {k: v for k, v in group.items() if k != "params" and k not in IGNORED_FLAGS}


def _torch_options(entry):
    params = inspect.signature(entry.torch_cls.__init__).parameters
    return {n: p for n, p in params.items() if n not in ("self", "params")}


@pytest.mark.parametrize("entry", entry_params())
def test_registry_covers_every_option_and_state_buffer(entry):
    """Guards the registry: the option sets must set every constructor option torch has (but the ignored
    flags) and, between them, make torch create every state buffer the algorithm has."""
    options = set(_torch_options(entry)) - IGNORED_FLAGS - {"differentiable"}
    used = set().union(*(kw.keys() for kw in entry.option_sets.values()))
    assert options <= used, f"option sets never set {sorted(options - used)}"
    assert next(iter(entry.option_sets)) == "defaults" and entry.option_sets["defaults"] == {}
    keys = set()
    for kw in entry.option_sets.values():
        p = torch.zeros(3, requires_grad=True)
        opt = entry.torch_cls([p], **kw)
        p.grad = torch.ones(3)
        opt.step()
        keys |= set(opt.state[p])
    assert keys == entry.state_keys


@pytest.mark.parametrize("entry", entry_params())
def test_positional_arguments_like_torch(entry):
    """The positional-or-keyword arguments, passed positionally in torch's order, mean the same thing."""
    rich = entry.option_sets[entry.representative[-1]]
    args = []
    for name, p in _torch_options(entry).items():
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        args.append(rich.get(name, p.default))
    assert args, "torch takes no positional hyperparameters?"
    fused = entry.fused_cls([torch.zeros(2, requires_grad=True)], *args)
    ref = entry.torch_cls([torch.zeros(2, requires_grad=True)], *args)
    assert _hyper(fused.defaults) == _hyper(ref.defaults)
    for name, p in _torch_options(entry).items():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:  # torch rejects these positionally; so must fusedopt
            with pytest.raises(TypeError):
                entry.fused_cls([torch.zeros(2, requires_grad=True)], *args, p.default)
            break


@pytest.mark.parametrize("entry,opt_id", option_params())
def test_param_groups_and_defaults_match_torch(entry, opt_id):
    kwargs = entry.option_sets[opt_id]
    problem = Problem("groups", "cpu")
    fp, rp = problem.params(torch.float32), problem.params(torch.float32)
    fused = entry.fused_cls(problem.param_arg(fp, entry.group_overrides), **kwargs)
    ref = entry.torch_cls(problem.param_arg(rp, entry.group_overrides), **kwargs)
    assert set(fused.defaults) == set(ref.defaults)
    assert _hyper(fused.defaults) == _hyper(ref.defaults)
    assert len(fused.param_groups) == len(ref.param_groups)
    for fg, rg in zip(fused.param_groups, ref.param_groups):
        assert set(fg) == set(rg)
        assert _hyper(fg) == _hyper(rg)
    for fg, expected in zip(fused.param_groups, problem.param_arg(fp, entry.group_overrides)):
        assert len(fg["params"]) == len(expected["params"])
        assert all(p is q for p, q in zip(fg["params"], expected["params"])), "groups must hold the user's tensors"


@pytest.mark.parametrize("entry,opt_id", option_params(representative_only=True))
def test_cpu_step_is_one_fused_op(entry, opt_id):
    """On CPU a warm step over 3 param groups (same options, different lrs) is a single torch.ops.fusedopt
    op and no other aten op."""
    # steady state: the same params have grads at every step (a change there may rebuild cached work)
    problem = Problem([dataclasses.replace(s, grad="always") for s in SHAPE_SETS["groups"]], "cpu")
    params = problem.params(torch.float32)
    opt = entry.fused_cls(problem.param_arg(params, LR_ONLY_OVERRIDES), **entry.option_sets[opt_id])
    train(opt, problem, params, 0, 2)  # lazy state initialization happens here
    problem.set_grads(params, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    events = list(prof.events())
    fused_ops = [e for e in events if e.name.startswith("fusedopt::")]
    assert len(fused_ops) == 1, f"expected one fusedopt op per step, got {[e.name for e in fused_ops]}"

    def inside_fused(e):
        while e is not None:
            if e is fused_ops[0]:
                return True
            e = e.cpu_parent
        return False

    stray = [e.name for e in events if e.name.startswith("aten::") and not inside_fused(e)]
    assert not stray, f"ops launched outside the fused op: {stray}"


# --------------------------------------------------------------------------------------------------
# Optimizer protocol: closures, zero_grad, add_param_group, hooks
# --------------------------------------------------------------------------------------------------
def _torch_adagrad_inits_added_groups():
    first, added = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adagrad([first])
    opt.add_param_group({"params": [added]})
    first.grad, added.grad = torch.ones(2), torch.ones(2)
    try:
        opt.step()
    except KeyError:
        return False
    return True


def _pair(entry, device, problem, kwargs, groups=slice(None)):
    fp, rp = problem.params(torch.float32), problem.params(torch.float32)
    fused = entry.fused_cls(problem.param_arg(fp, entry.group_overrides)[groups], **kwargs)
    ref = entry.torch_cls(problem.param_arg(rp, entry.group_overrides)[groups], **kwargs)
    return fused, fp, ref, rp


def _rich(entry):
    return entry.option_sets[entry.representative[-1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", entry_params())
def test_closure(entry, device):
    """step(closure) re-evaluates the loss with grad enabled (even under no_grad) and returns it."""
    problem = Problem("groups", device, seed=1)
    fused, fp, ref, rp = _pair(entry, device, problem, _rich(entry))
    targets = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(device) for i, p in enumerate(fp)]

    def make_closure(params, record):
        def closure():
            record.append(torch.is_grad_enabled())
            for p in params:
                p.grad = None
            loss = sum(((p - t) ** 2 * (i + 1)).sum() for i, (p, t) in enumerate(zip(params, targets)))
            loss.backward()
            record.append(loss)
            return loss

        return closure

    for _ in range(10):
        frec, rrec = [], []
        with torch.no_grad():
            floss = fused.step(make_closure(fp, frec))
            rloss = ref.step(make_closure(rp, rrec))
        assert len(frec) == len(rrec) == 2, "the closure must run exactly once per step"
        assert frec[0] is True and rrec[0] is True
        assert floss is frec[1], "step(closure) must return the closure's loss"
        torch.testing.assert_close(floss, rloss, **TOLERANCES[torch.float32])
    assert fused.step() is None
    ref.step()
    assert_matches(fused, fp, ref, rp, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("set_to_none", [True, False, "default"])
@pytest.mark.parametrize("entry", entry_params())
def test_zero_grad(entry, set_to_none, device):
    """After zero_grad(set_to_none=True) params are skipped; after set_to_none=False they step with a zero
    grad (weight decay, momentum and step counters still move) -- as in torch."""
    problem = Problem("groups", device, seed=2)
    fused, fp, ref, rp = _pair(entry, device, problem, _rich(entry))
    train(fused, problem, fp, 0, 5)
    train(ref, problem, rp, 0, 5)
    for opt in (fused, ref):
        opt.zero_grad() if set_to_none == "default" else opt.zero_grad(set_to_none=set_to_none)
    for f, r in zip(fp, rp):
        assert (f.grad is None) == (r.grad is None)
        if set_to_none is False:
            assert f.grad is not None and not f.grad.any()
    fused.step()
    ref.step()
    assert_matches(fused, fp, ref, rp, **TOLERANCES[torch.float32])
    train(fused, problem, fp, 5, 10)
    train(ref, problem, rp, 5, 10)
    assert_matches(fused, fp, ref, rp, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry,opt_id", option_params(representative_only=True))
def test_add_param_group_mid_training(entry, opt_id, device):
    if entry.torch_cls is torch.optim.Adagrad and not _torch_adagrad_inits_added_groups():
        pytest.skip(f"torch {torch.__version__}'s Adagrad creates state only in its constructor (no reference)")
    problem = Problem("groups", device, seed=3)
    kwargs = entry.option_sets[opt_id]
    fused, fp, ref, rp = _pair(entry, device, problem, kwargs, groups=slice(0, 2))
    half = STEPS // 2
    train(fused, problem, fp, 0, half)  # grads of the not-yet-added params are set but must be ignored
    train(ref, problem, rp, 0, half)
    assert_matches(fused, fp, ref, rp, **TOLERANCES[torch.float32])
    fused.add_param_group(problem.param_arg(fp, entry.group_overrides)[2])
    ref.add_param_group(problem.param_arg(rp, entry.group_overrides)[2])
    assert _hyper(fused.param_groups[2]) == _hyper(ref.param_groups[2])
    train(fused, problem, fp, half, STEPS)
    train(ref, problem, rp, half, STEPS)
    assert_matches(fused, fp, ref, rp, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("entry", entry_params())
def test_step_is_seen_as_torch_shows_it(entry):
    """torch's step wrapper enters the profiler range "Optimizer.step#<class>.step" and runs the global step
    hooks; fusedopt's (FusedOptimizer.profile_hook_step) skips it only while nothing would see it, so both show
    under a profiler and with global hooks, and the steps with and without them update as torch's do."""
    problem = Problem("groups", "cpu", seed=5)
    fp, rp = problem.params(torch.float32), problem.params(torch.float32)
    fused = entry.fused_cls(problem.param_arg(fp, entry.group_overrides), **_rich(entry))
    ref = entry.torch_cls(problem.param_arg(rp, entry.group_overrides), **_rich(entry))
    name = f"Optimizer.step#{type(fused).__name__}.step"
    log = []
    for step in range(4):
        problem.set_grads(fp, step)
        problem.set_grads(rp, step)
        ref.step()
        if step == 1:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fused.step()
            assert [e.name for e in prof.events()].count(name) == 1, f"no {name} range under the profiler"
        elif step == 2:
            pre = register_optimizer_step_pre_hook(lambda o, a, k: log.append(("pre", o)))
            post = register_optimizer_step_post_hook(lambda o, a, k: log.append(("post", o)))
            try:
                fused.step()
            finally:
                pre.remove()
                post.remove()
        else:
            fused.step()
    assert log == [("pre", fused), ("post", fused)], "the global step hooks must run once each, around the step"
    assert_matches(fused, fp, ref, rp, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", entry_params())
def test_step_hooks(entry, device):
    """Pre hooks run before the update, post hooks after, both with (optimizer, args, kwargs); a pre hook
    may replace args/kwargs (here: inject a closure); removed hooks stop running."""
    problem = Problem("single", device, seed=4)
    logs = []
    for cls, params in ((entry.fused_cls, problem.params(torch.float32)), (entry.torch_cls, problem.params(torch.float32))):
        opt = cls(params, **_rich(entry))
        log = []
        closure_calls = []

        def closure(params=params, closure_calls=closure_calls):
            closure_calls.append(1)
            problem.set_grads(params, 0)
            return torch.tensor(1.5)

        def pre(o, args, kwargs, opt=opt, params=params, log=log, closure=closure):
            assert o is opt and args[0] is opt
            log.append(("pre", len(args), dict(kwargs), params[0].detach().clone()))
            return args, {"closure": closure}

        def post(o, args, kwargs, opt=opt, params=params, log=log):
            assert o is opt
            log.append(("post", len(args), sorted(kwargs), params[0].detach().clone()))

        h_pre, h_post = opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)
        loss = opt.step()
        assert closure_calls == [1], "the closure injected by the pre hook was not used"
        assert loss == 1.5
        h_pre.remove()
        h_post.remove()
        problem.set_grads(params, 1)
        opt.step()
        assert len(log) == 2, "removed hooks must not run"
        assert log[0][0] == "pre" and log[1][0] == "post"
        assert not torch.equal(log[0][3], log[1][3]), "the pre hook must see the params before the update"
        logs.append((log, [p.detach().clone() for p in params]))
    (flog, fparams), (rlog, rparams) = logs
    assert [x[:3] for x in flog] == [x[:3] for x in rlog]
    for f, r in zip(fparams, rparams):
        torch.testing.assert_close(f, r, **TOLERANCES[torch.float32])
