"""The rank side of tests/test_distributed.py: cases that run inside one spawned gloo process group.

Every case builds the same sharded model twice (FSDP2 per layer + root, tensor parallel on a 2-D mesh, ...),
trains one copy with a Fused* optimizer and the other with its torch.optim reference on the same batches, and
compares the full params (``full_tensor()``) and every state buffer after each step. Every rank runs the same
code, so the collectives inside (``full_tensor``, checkpoints) match; mismatches are collected, not raised, so a
failing comparison on one rank cannot leave the others waiting in a collective. ``run_group`` gathers each
case's mismatches from every rank and writes one verdict per case for the parent test.
"""
import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils._pytree import tree_map_only

import fusedopt
from conftest import ILL_CONDITIONED_FP32_TOLERANCE, TOLERANCES
from registry import ENTRY_BY_NAME

TOL = TOLERANCES[torch.float32]
STEPS = 3


# ---- Models and data ----

class MLP(nn.Module):
    """Shapes chosen for FSDP2 on 2 ranks: 16 rows shard evenly, 5 rows unevenly (3 + 2) and the last layer's
    single row leaves rank 1 an empty shard."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 5), nn.Linear(5, 1)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def fsdp_mlp(mesh, seed=0):
    torch.manual_seed(seed)
    model = MLP()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step, rank, rows=4, features=8):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(rows, features, generator=generator)


def backward(model, step, rank, scale=1.0):
    loss = (model(batch(step, rank)) ** 2).mean() * scale
    loss.backward()
    return loss


# ---- Comparisons (collected, never raised mid-case) ----

def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class Mismatches(list):
    def close(self, what, actual, expected, tol=TOL):
        try:
            torch.testing.assert_close(full(actual).detach().float(), full(expected).detach().float(), **tol)
        except AssertionError as error:
            self.append(f"{what}: {error}")

    def true(self, what, condition):
        if not condition:
            self.append(what)

    def models(self, what, fused_model, torch_model, tol=TOL):
        for (name, p), (_, q) in zip(fused_model.named_parameters(), torch_model.named_parameters()):
            self.close(f"{what}: param {name}", p, q, tol)

    def states(self, what, fused_opt, fused_model, torch_opt, torch_model, tol=TOL):
        for (name, p), (_, q) in zip(fused_model.named_parameters(), torch_model.named_parameters()):
            mine, theirs = fused_opt.state.get(p, {}), torch_opt.state.get(q, {})
            self.true(f"{what}: {name} state keys {sorted(mine)} != torch's {sorted(theirs)}", set(mine) == set(theirs))
            for key in sorted(set(mine) & set(theirs)):
                if isinstance(theirs[key], DTensor):
                    self.true(f"{what}: {name} state[{key!r}] is not a DTensor like torch's",
                              isinstance(mine[key], DTensor) and mine[key].placements == theirs[key].placements
                              and mine[key].device_mesh == theirs[key].device_mesh)
                self.close(f"{what}: {name} state[{key!r}]", mine[key], theirs[key], tol)


def entry_optimizers(entry_name, fused_model, torch_model, **extra):
    entry = ENTRY_BY_NAME[entry_name]
    kwargs = entry.option_sets[entry.representative[-1]]
    tol = ILL_CONDITIONED_FP32_TOLERANCE if entry.ill_conditioned else TOL
    return entry.fused_cls(fused_model.parameters(), **kwargs, **extra), \
        entry.torch_cls(torch_model.parameters(), **kwargs), tol


def train_pair(found, what, fused, torch_side, steps, rank, tol=TOL, first=0, before_step=None):
    """Steps both (model, optimizer) pairs on the same batches and compares params and state after each."""
    (fused_model, fused_opt), (torch_model, torch_opt) = fused, torch_side
    for step in range(first, first + steps):
        for model, opt in (fused, torch_side):
            backward(model, step, rank)
            if before_step is not None:
                before_step(model, opt)
            opt.step()
            opt.zero_grad()
        found.models(f"{what} step {step}", fused_model, torch_model, tol)
        found.states(f"{what} step {step}", fused_opt, fused_model, torch_opt, torch_model, tol)


# ---- 2-rank cases ----

def _fsdp_class_case(entry_name):
    def case(ctx):
        found = Mismatches()
        mesh = init_device_mesh("cpu", (ctx.world,))
        fused_model, torch_model = fsdp_mlp(mesh), fsdp_mlp(mesh)
        local_rows = [p.to_local().shape[0] for p in fused_model.parameters()]
        found.true(f"the model has no uneven and empty shards: {local_rows}", 0 in local_rows or ctx.rank == 0)
        fused_opt, torch_opt, tol = entry_optimizers(entry_name, fused_model, torch_model)
        train_pair(found, entry_name, (fused_model, fused_opt), (torch_model, torch_opt), STEPS, ctx.rank, tol)
        return found
    return case


def clip_with_schedule(ctx):
    """max_grad_norm against torch's clip_grad_norm_ on the same DTensor grads (clipping active), with a
    per-step device schedule against torch's SequentialLR."""
    found = Mismatches()
    mesh = init_device_mesh("cpu", (ctx.world,))
    fused_model, torch_model = fsdp_mlp(mesh), fsdp_mlp(mesh)
    max_norm = 0.05
    fused_opt = fusedopt.FusedAdamW(fused_model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=max_norm)
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-2, weight_decay=0.1)
    ls = fusedopt.lr_scheduler
    fused_sched = ls.SequentialLR(fused_opt, [ls.LinearLR(fused_opt, 0.1, total_iters=2),
                                              ls.CosineAnnealingLR(fused_opt, T_max=4)], milestones=[2], per_step=True)
    tls = torch.optim.lr_scheduler
    torch_sched = tls.SequentialLR(torch_opt, [tls.LinearLR(torch_opt, 0.1, total_iters=2),
                                               tls.CosineAnnealingLR(torch_opt, T_max=4)], milestones=[2])
    norms = []
    for step in range(5):
        backward(fused_model, step, ctx.rank)
        fused_opt.step()
        fused_sched.step()
        fused_opt.zero_grad()
        backward(torch_model, step, ctx.rank)
        norms.append(float(torch.nn.utils.clip_grad_norm_(torch_model.parameters(), max_norm).full_tensor()))
        torch_opt.step()
        torch_sched.step()
        torch_opt.zero_grad()
        found.models(f"step {step}", fused_model, torch_model)
        found.states(f"step {step}", fused_opt, fused_model, torch_opt, torch_model)
    found.true(f"clipping was not active: norms {norms}", min(norms) > 2 * max_norm)
    found.true("lr differs", abs(fused_sched.get_last_lr()[0] - torch_sched.get_last_lr()[0]) < 1e-12)
    return found


def _scaler_case(make_scaler):
    return lambda ctx: scaler_inf_on_rank1(ctx, make_scaler)


def scaler_inf_on_rank1(ctx, make_scaler):
    """An inf grad on rank 1 only: the step is skipped on both ranks and both scalers back off, as torch's."""
    found = Mismatches()
    mesh = init_device_mesh("cpu", (ctx.world,))
    fused_model, torch_model = fsdp_mlp(mesh), fsdp_mlp(mesh)
    fused_opt = fusedopt.FusedAdam(fused_model.parameters(), lr=1e-2, max_grad_norm=1.0)
    torch_opt = torch.optim.Adam(torch_model.parameters(), lr=1e-2)
    scalers = [make_scaler() for _ in range(2)]
    for step in range(4):
        before = [full(p).clone() for p in fused_model.parameters()]
        for model, opt, scaler in ((fused_model, fused_opt, scalers[0]), (torch_model, torch_opt, scalers[1])):
            scaler.scale((model(batch(step, ctx.rank)) ** 2).mean()).backward()
            if step == 2 and ctx.rank == 1:
                next(model.parameters()).grad.to_local()[0, 0] = float("inf")
            if opt is torch_opt:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        after = [full(p) for p in fused_model.parameters()]
        unchanged = all(torch.equal(b, a) for b, a in zip(before, after))
        found.true(f"step {step}: skipped={unchanged}, expected skipped={step == 2}", unchanged == (step == 2))
        found.true(f"step {step}: scale {scalers[0].get_scale()} != torch's {scalers[1].get_scale()}",
                   scalers[0].get_scale() == scalers[1].get_scale())
        found.models(f"step {step}", fused_model, torch_model)
        found.states(f"step {step}", fused_opt, fused_model, torch_opt, torch_model)
    scales = [None] * ctx.world
    dist.all_gather_object(scales, scalers[0].get_scale())
    found.true(f"scales differ across ranks: {scales}", len(set(scales)) == 1 and scales[0] == 512.0)
    return found


def _bf16_fsdp_mlp(mesh, seed=0):
    torch.manual_seed(seed)
    model = MLP().to(torch.bfloat16)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _bf16_step(model, opt, step, rank):
    (model(batch(step, rank).to(torch.bfloat16)) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()


def fsdp2_low_precision_checkpoint(ctx):
    """A DCP checkpoint of bf16 FSDP2 params with master weights and float32 moments (DTensors of their own
    dtypes): resuming continues bit for bit, also through a full state dict."""
    found = Mismatches()
    mesh = init_device_mesh("cpu", (ctx.world,))
    options = {"lr": 1e-2, "master_weights": True, "state_dtype": torch.float32}
    model = _bf16_fsdp_mlp(mesh)
    opt = fusedopt.FusedAdamW(model.parameters(), **options)
    for step in range(2):
        _bf16_step(model, opt, step, ctx.rank)
    path = os.path.join(ctx.tmpdir, "low_precision_step2")
    dcp.save(_opt_dicts(model, opt), checkpoint_id=path)
    full_options = StateDictOptions(full_state_dict=True)
    full_state = tree_map_only(torch.Tensor, torch.clone, _opt_dicts(model, opt, full_options))
    for step in range(2, 4):
        _bf16_step(model, opt, step, ctx.rank)
    for how in ("dcp", "full state dict"):
        resumed = _bf16_fsdp_mlp(mesh, seed=1)
        resumed_opt = fusedopt.FusedAdamW(resumed.parameters(), **options)
        if how == "dcp":
            state = _opt_dicts(resumed, resumed_opt)
            dcp.load(state, checkpoint_id=path)
            _load(resumed, resumed_opt, state)
        else:
            _load(resumed, resumed_opt, full_state, full_options)
        for step in range(2, 4):
            _bf16_step(resumed, resumed_opt, step, ctx.rank)
        for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
            found.true(f"{how}: {name} differs", torch.equal(full(p), full(q)))
            mine, theirs = opt.state[p], resumed_opt.state[q]
            found.true(f"{how}: {name} state keys {sorted(theirs)} != {sorted(mine)}", set(mine) == set(theirs))
            for key in sorted(set(mine) & set(theirs)):
                a, b = full(mine[key]), full(theirs[key])
                found.true(f"{how}: {name} state[{key!r}] differs ({a.dtype}, {b.dtype})",
                           a.dtype == b.dtype and torch.equal(a, b))
    return found


def fsdp2_low_precision(ctx):
    """bf16 params sharded by FSDP2 with master_weights, Kahan compensation or float32 state: each rank's local
    shards update exactly as an unsharded copy of the model does from the same (all-gathered) grads, and the
    master copies and compensation buffers are DTensors laid out like their params, as torch.optim's states.
    (Stochastic rounding draws by element index within the kernel's tensor, a shard's here: not compared.)"""
    found = Mismatches()
    mesh = init_device_mesh("cpu", (ctx.world,))
    for options in ({"master_weights": True}, {"param_rounding": "kahan"},
                    {"master_weights": True, "state_dtype": torch.float32}):
        torch.manual_seed(0)
        plain = MLP().to(torch.bfloat16)
        sharded = MLP().to(torch.bfloat16)
        sharded.load_state_dict(plain.state_dict())
        for layer in sharded.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        sharded_opt = fusedopt.FusedAdamW(sharded.parameters(), lr=1e-2, **options)
        plain_opt = fusedopt.FusedAdamW(plain.parameters(), lr=1e-2, **options)
        for step in range(STEPS):
            (sharded(batch(step, ctx.rank).to(torch.bfloat16)) ** 2).mean().backward()
            for p, q in zip(sharded.parameters(), plain.parameters()):
                q.grad = p.grad.full_tensor()
            sharded_opt.step()
            plain_opt.step()
            sharded_opt.zero_grad()
            plain_opt.zero_grad()
            for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
                what = f"{options} step {step}: {name}"
                found.true(f"{what} differs", torch.equal(full(p).detach(), q.detach()))
                mine, theirs = sharded_opt.state[p], plain_opt.state[q]
                found.true(f"{what}: state keys {sorted(mine)} != {sorted(theirs)}", set(mine) == set(theirs))
                for key in sorted(set(mine) & set(theirs)):
                    if key == "step":
                        continue
                    found.true(f"{what}: state[{key!r}] is not a DTensor laid out like its param",
                               isinstance(mine[key], DTensor) and mine[key].placements == p.placements)
                    found.true(f"{what}: state[{key!r}] differs", torch.equal(full(mine[key]), theirs[key]))
    return found


def two_meshes_and_plain(ctx):
    """Params on two meshes and a plain tensor in one optimizer, clipped by the norm over all of them."""
    found = Mismatches()
    mesh_a = init_device_mesh("cpu", (ctx.world,), mesh_dim_names=("a",))
    mesh_b = init_device_mesh("cpu", (1, ctx.world), mesh_dim_names=("r", "s"))  # HSDP-style, replicate size 1
    max_norm = 0.05
    pairs = []
    for _ in range(2):
        model = fsdp_mlp(mesh_a)
        torch.manual_seed(5)
        extra = nn.Parameter(torch.randn(3, 4))
        other = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh_b, [Replicate(), Shard(0)]))
        pairs.append((model, extra, other))
    (fm, fe, fo), (tm, te, to) = pairs
    fused_opt = fusedopt.FusedAdam([{"params": list(fm.parameters())}, {"params": [fe, fo], "lr": 5e-3}],
                                   lr=1e-2, max_grad_norm=max_norm)
    torch_opt = torch.optim.Adam([{"params": list(tm.parameters())}, {"params": [te, to], "lr": 5e-3}], lr=1e-2)
    for step in range(STEPS):
        for model, extra, other in pairs:
            # extra's grad is the same on every rank (a replicated plain param); other's is set directly
            ((model(batch(step, ctx.rank)) ** 2).mean() + (extra ** 2).sum() * 0.1).backward()
            other.grad = distribute_tensor(torch.full((6, 4), 0.3 * (step + 1)), mesh_b, [Replicate(), Shard(0)])
        fused_opt.step()
        grads_a = [p.grad for p in tm.parameters()]
        norm_a = torch.nn.utils.get_total_norm(grads_a).full_tensor()
        norm_b = torch.nn.utils.get_total_norm([to.grad]).full_tensor()
        total = torch.sqrt(norm_a ** 2 + norm_b ** 2 + te.grad.norm() ** 2)
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        found.true(f"clipping not active: norm {float(total)}", coef < 0.5)
        for p in [*tm.parameters(), te, to]:
            p.grad.mul_(coef)
        torch_opt.step()
        fused_opt.zero_grad()
        torch_opt.zero_grad()
        found.models(f"step {step}", fm, tm)
        found.close(f"step {step}: plain param", fe, te)
        found.close(f"step {step}: param on the second mesh", fo, to)
        for key in ("exp_avg", "exp_avg_sq"):
            found.close(f"step {step}: second mesh state {key}", fused_opt.state[fo][key], torch_opt.state[to][key])
    return found


def bad_grads(ctx):
    """A grad laid out unlike its param, or params on two device types: a clear error, nothing written."""
    found = Mismatches()
    mesh = init_device_mesh("cpu", (ctx.world,))
    model = fsdp_mlp(mesh)
    opt = fusedopt.FusedAdam(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    backward(model, 0, ctx.rank)
    opt.step()
    opt.zero_grad()
    backward(model, 1, ctx.rank)
    params = list(model.parameters())
    snapshot = ([p.to_local().clone() for p in params],
                {id(p): {k: v.to_local().clone() if isinstance(v, DTensor) else v.clone()
                         for k, v in opt.state[p].items()} for p in params})
    weight = params[0]
    good_grad = weight.grad.full_tensor()
    other_mesh = init_device_mesh("cpu", (ctx.world,), mesh_dim_names=("other",))
    for what, grad, expected in (("placements", distribute_tensor(good_grad, mesh, [Replicate()]), "Replicate"),
                                 ("mesh", distribute_tensor(good_grad, other_mesh, [Shard(0)]), "other")):
        weight.grad = grad
        try:
            opt.step()
            found.append(f"{what}: no error")
        except RuntimeError as error:
            found.true(f"{what}: unclear error {error}", "placements" in str(error) and expected in str(error))
    meta = nn.Parameter(torch.zeros(2, device="meta"))
    try:
        fusedopt.FusedAdam([*params, meta], lr=1e-2).step()
        found.append("two device types: no error")
    except RuntimeError as error:
        found.true(f"two device types: unclear error {error}", "one device" in str(error))
    unchanged = all(torch.equal(p.to_local(), s) for p, s in zip(params, snapshot[0])) and all(
        torch.equal(v.to_local() if isinstance(v, DTensor) else v, snapshot[1][id(p)][k])
        for p in params for k, v in opt.state[p].items())
    found.true("a bad input changed params or state", unchanged)
    # Fixed grads: the same optimizer steps normally again.
    weight.grad = distribute_tensor(good_grad, mesh, weight.placements)
    opt.step()
    found.true("no step after the fix", not torch.equal(params[0].to_local(), snapshot[0][0]))
    return found


def _opt_dicts(model, opt, options=None):
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, opt, options=options)}


def _load(model, opt, state, options=None):
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, opt, state["optim"], options=options)


def _save_full_params(model, path, rank):
    params = {name: full(p).clone() for name, p in model.named_parameters()}  # a collective: every rank
    if rank == 0:
        torch.save(params, path)


def checkpoints(ctx):
    """DCP both ways mid-training (fusedopt -> torch.optim -> fusedopt), full state dicts, and a checkpoint for
    the 1-rank load in reshard_load()."""
    found = Mismatches()
    mesh = init_device_mesh("cpu", (ctx.world,))
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    fused = fsdp_mlp(mesh)
    fused_opt = fusedopt.FusedAdamW(fused.parameters(), **kwargs)
    for step in range(2):
        backward(fused, step, ctx.rank)
        fused_opt.step()
        fused_opt.zero_grad()
    path = os.path.join(ctx.tmpdir, "fused_step2")
    dcp.save(_opt_dicts(fused, fused_opt), checkpoint_id=path)
    _save_full_params(fused, path + ".params", ctx.rank)
    # torch.optim loads fusedopt's checkpoint; both continue identically.
    loaded = fsdp_mlp(mesh, seed=1)
    loaded_opt = torch.optim.AdamW(loaded.parameters(), **kwargs)
    state = _opt_dicts(loaded, loaded_opt)
    dcp.load(state, checkpoint_id=path)
    _load(loaded, loaded_opt, state)
    train_pair(found, "torch.optim from fusedopt", (fused, fused_opt), (loaded, loaded_opt), 2, ctx.rank, first=2)
    _save_full_params(fused, path + ".after", ctx.rank)  # what the 1-rank load must reproduce
    # fusedopt loads torch.optim's checkpoint.
    path = os.path.join(ctx.tmpdir, "torch_step4")
    dcp.save(_opt_dicts(loaded, loaded_opt), checkpoint_id=path)
    back = fsdp_mlp(mesh, seed=2)
    back_opt = fusedopt.FusedAdamW(back.parameters(), **kwargs)
    state = _opt_dicts(back, back_opt)
    dcp.load(state, checkpoint_id=path)
    _load(back, back_opt, state)
    found.states("fusedopt from torch.optim, loaded", back_opt, back, loaded_opt, loaded)
    train_pair(found, "fusedopt from torch.optim", (back, back_opt), (loaded, loaded_opt), 2, ctx.rank, first=4)
    # Full (unsharded) state dicts, in memory.
    options = StateDictOptions(full_state_dict=True)
    # cloned: a state dict shares its tensors (`step` too) with the optimizer that made it, as torch's does
    full_state = tree_map_only(torch.Tensor, torch.clone, _opt_dicts(back, back_opt, options))
    again = fsdp_mlp(mesh, seed=3)
    again_opt = fusedopt.FusedAdamW(again.parameters(), **kwargs)
    _load(again, again_opt, full_state, options)
    found.models("fusedopt from a full state dict, loaded", again, back)
    found.states("fusedopt from a full state dict, loaded", again_opt, again, back_opt, back)
    train_pair(found, "fusedopt from a full state dict", (again, again_opt), (back, back_opt), 2, ctx.rank, first=6)
    return found


def ddp_and_zero(ctx):
    """Regression: DDP and ZeroRedundancyOptimizer(optimizer_class=FusedAdamW) as before."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    found = Mismatches()
    for mode in ("ddp", "zero"):
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            models.append(DistributedDataParallel(MLP()))
        fused, reference = models
        if mode == "ddp":
            fused_opt = fusedopt.FusedAdamW(fused.parameters(), lr=1e-2)
            torch_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        else:
            fused_opt = ZeroRedundancyOptimizer(fused.parameters(), optimizer_class=fusedopt.FusedAdamW, lr=1e-2)
            torch_opt = ZeroRedundancyOptimizer(reference.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
        for step in range(STEPS):
            for model, opt in ((fused, fused_opt), (reference, torch_opt)):
                backward(model, step, ctx.rank)
                opt.step()
                opt.zero_grad()
            found.models(f"{mode} step {step}", fused, reference)
    return found


# ---- 1-rank case: the 2-rank checkpoint loads with one rank ----

def reshard_load(ctx):
    found = Mismatches()
    path = os.path.join(ctx.source_dir, "fused_step2")
    torch.manual_seed(7)
    model = MLP()
    opt = fusedopt.FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    state = _opt_dicts(model, opt)
    dcp.load(state, checkpoint_id=path)
    _load(model, opt, state)
    saved = torch.load(path + ".params")
    for name, p in model.named_parameters():
        found.close(f"loaded {name}", p, saved[name])
        found.true(f"{name}: step {opt.state[p]['step']}", float(opt.state[p]["step"]) == 2.0)
    for step in (2, 3):  # both ranks' batches at once: the mean loss has the 2-rank average gradient
        x = torch.cat([batch(step, rank) for rank in range(2)])
        (model(x) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    expected = torch.load(path + ".after")
    for name, p in model.named_parameters():
        found.close(f"continued {name}", p, expected[name])
    return found


# ---- 4-rank case: FSDP + tensor parallel on a 2-D mesh, HSDP, a second mesh ----

class TPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 12), nn.Linear(12, 8)  # tensor parallel (+ FSDP over dp)
        self.mid = nn.Linear(8, 8)  # FSDP over the dp slice only: the same on both tp ranks
        self.head = nn.Linear(8, 3)  # FSDP over a 1-D mesh of all 4 ranks: a second mesh
        self.tail = nn.Linear(3, 2)  # HSDP: replicated over dp, sharded over tp

    def forward(self, x):
        return self.tail(torch.tanh(self.head(torch.tanh(self.mid(self.down(torch.relu(self.up(x))))))))


def tp_net(mesh_2d, mesh_1d):
    torch.manual_seed(0)
    model = TPNet()
    parallelize_module(model, mesh_2d["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model.up, mesh=mesh_2d["dp"])
    fully_shard(model.down, mesh=mesh_2d["dp"])
    fully_shard(model.mid, mesh=mesh_2d["dp"])
    fully_shard(model.head, mesh=mesh_1d)
    fully_shard(model.tail, mesh=mesh_2d)
    return model


def fsdp_tp_2d(ctx):
    """FSDP2 + tensor parallel on a 2x2 mesh, FSDP on its dp slice, HSDP and a second mesh in one FusedAdamW,
    clipped by the global norm over every mesh, against torch.optim.AdamW with the same clipping."""
    found = Mismatches()
    mesh_2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    mesh_1d = init_device_mesh("cpu", (ctx.world,), mesh_dim_names=("all",))
    fused, reference = tp_net(mesh_2d, mesh_1d), tp_net(mesh_2d, mesh_1d)
    placements = {tuple(p.placements) for p in fused.parameters()}
    found.true(f"expected Replicate and Shard placements on the 2-D mesh, got {placements}",
               any(any(isinstance(x, Replicate) for x in pl) for pl in placements))
    max_norm = 0.05
    fused_opt = fusedopt.FusedAdamW(fused.parameters(), lr=1e-2, max_grad_norm=max_norm)
    torch_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    dp_rank = mesh_2d.get_local_rank("dp")
    for step in range(STEPS):
        for model in (fused, reference):
            backward(model, step, dp_rank)  # the tp ranks of one dp rank see one batch
        fused_opt.step()
        by_mesh = {}
        for p in reference.parameters():
            by_mesh.setdefault(p.device_mesh, []).append(p)
        total_sq = sum(float(torch.nn.utils.get_total_norm([p.grad for p in params]).full_tensor()) ** 2
                       for params in by_mesh.values())
        coef = min(1.0, max_norm / (total_sq ** 0.5 + 1e-6))
        found.true(f"clipping not active: norm {total_sq ** 0.5}", coef < 0.5)
        for p in reference.parameters():
            p.grad.mul_(coef)
        torch_opt.step()
        fused_opt.zero_grad()
        torch_opt.zero_grad()
        found.models(f"step {step}", fused, reference)
        found.states(f"step {step}", fused_opt, fused, torch_opt, reference)
    return found


CASES = {
    2: {**{f"fsdp2_{name}": _fsdp_class_case(name)
           for name in ("sgd", "adam", "adamw", "adagrad", "adadelta", "adamax", "rmsprop")},
        "clip_with_schedule": clip_with_schedule,
        "grad_scaler_inf_on_rank1": _scaler_case(lambda: torch.amp.GradScaler("cpu", init_scale=1024.0)),
        "sharded_grad_scaler_inf_on_rank1": _scaler_case(lambda: ShardedGradScaler("cpu", init_scale=1024.0)),
        "fsdp2_low_precision": fsdp2_low_precision, "fsdp2_low_precision_checkpoint": fsdp2_low_precision_checkpoint,
        "two_meshes_and_plain": two_meshes_and_plain, "bad_grads": bad_grads, "checkpoints": checkpoints,
        "ddp_and_zero": ddp_and_zero},
    4: {"fsdp_tp_2d": fsdp_tp_2d},
    1: {"reshard_load": reshard_load},
}


# ---- The spawned process ----

class Context:
    def __init__(self, rank, world, tmpdir, source_dir):
        self.rank, self.world, self.tmpdir, self.source_dir = rank, world, tmpdir, source_dir


def run_group(rank, world, port, tmpdir, source_dir, names):
    """One rank: joins the group, runs the named cases in order, and (rank 0) writes every case's verdict."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    ctx = Context(rank, world, tmpdir, source_dir)
    verdicts = {}
    try:
        for name in names:
            try:
                found = list(CASES[world][name](ctx))
            except Exception:  # noqa: BLE001 - reported to the parent test
                found = [traceback.format_exc()]
            everywhere = [None] * world
            dist.all_gather_object(everywhere, found)
            verdicts[name] = [f"rank {r}: {m}" for r, ms in enumerate(everywhere) for m in ms]
            if rank == 0:
                with open(os.path.join(tmpdir, f"verdicts_{world}.json"), "w") as f:
                    json.dump(verdicts, f)
        dist.barrier()  # no rank tears the group down while another still talks in it
    finally:
        dist.destroy_process_group()
