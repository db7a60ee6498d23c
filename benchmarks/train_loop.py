"""Training-loop throughput: the loops users actually run, torch.optim vs fusedopt, timed honestly.

    python -m benchmarks.train_loop                          # every scenario; CUDA if available, else CPU
    python -m benchmarks.train_loop --scenarios hf --rounds 10
    python -m benchmarks.train_loop --compile                # add torch.compile'd torch.optim steps on the CPU

Scenarios (a small GPT-style transformer, random tokens, next-token loss):
  hf        Hugging Face-style: AdamW, linear warm-up + cosine LambdaLR stepped every iteration,
            clip_grad_norm_(params, 1.0), bf16 autocast, zero_grad(set_to_none=True)
  amp_fp16  the fp16 loop: AdamW, fp16 autocast, torch.amp.GradScaler, the same per-iteration LambdaLR
  sgd_steplr  SGD momentum 0.9, StepLR stepped once per epoch (the seeds' loop), fp32

Variants of each scenario:
  torch forloop / foreach / fused   torch.optim with torch's clip_grad_norm_, GradScaler and scheduler
  torch compiled                    torch.compile(optimizer.step) of the foreach optimizer, lr a tensor (on
                                    by default on CUDA; opt in with --compile on the CPU, where compiling is slow)
  fusedopt + torch features         the Fused* class in exactly the torch loop (torch's scheduler, clipping)
  fusedopt own features             max_grad_norm= in the step, scaler.step(opt) (unscale + inf check in the
                                    step), fusedopt.lr_scheduler (per_step=True for per-iteration schedules)
  fusedopt own + CUDA graph         the previous one, forward + backward + step captured once (CUDA only)

Method: every variant has its own copy of the same initial model and sees the same batches in the same order. After
a warm-up (on CUDA a few seconds of matmuls first, to bring the GPU to its clocks, then --warmup iterations of every
variant), the variants run interleaved in rounds (A B C ... B A C ..., each round's order from common.round_orders:
every variant follows every other equally often), --iters iterations per turn; each turn is timed with a synchronize
at both ends and gives one steps/s sample; we report medians over rounds. Inside each iteration the "optimizer
phase" (clipping, scaler step/update, optimizer.step, scheduler step) is timed on the host (perf_counter) and, on
CUDA, on the device (events around it). After the timed rounds, one extra iteration of each variant is profiled on
CUDA to count kernels (device-side ops), launch calls and host syncs (torch.cuda.set_sync_debug_mode warnings); on
the CPU those columns are "n/a". The final losses must agree across variants (same data, same math): they are
printed as a check. Terminal table, JSON record and PNG chart under benchmarks/results/.

Defaults: CPU 2 warm-up iterations, 5 rounds of 3 iterations, a d=128 2-layer model (0.67M params): measured
on 2 cores of an AMD EPYC shared with other jobs, 32 s at load average 1.6, 4 min 30 s at load average 5-8.
CUDA 20 warm-up, 15 rounds of 20 iterations, a d=384 6-layer model (17.0M params).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from benchmarks import common
from benchmarks.common import (OPTIMIZERS, RESULTS_DIR, default_device, load_warning, make_optimizer, probe,
                               result_stem, round_orders, run_metadata, synchronize)


# ------------------------------------------------------------------------------------------------ the model
class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos.weight[:t]
        return self.head(self.norm(self.blocks(x, mask=self.mask[:t, :t], is_causal=True)))


MODEL_SHAPES = {  # GPU: a size where the optimizer is a visible share of an iteration; CPU: a few minutes in all
    "cuda": (dict(vocab=8192, d=384, layers=6, heads=6, ctx=128), 32),
    "cpu": (dict(vocab=1024, d=128, layers=2, heads=4, ctx=64), 8),
}


def loss_fn(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


# -------------------------------------------------------------------------------------------- the scenarios
WARMUP_FRACTION = 0.1  # of the schedule's length: linear warm-up, then cosine down to FINAL_LR_FRACTION
FINAL_LR_FRACTION = 0.1


@dataclass(frozen=True)
class Scenario:
    title: str
    optimizer: str                     # key of benchmarks.common.OPTIMIZERS
    amp_dtype: torch.dtype | None      # autocast dtype, None for fp32
    scaler: bool                       # torch.amp.GradScaler
    clip: float | None                 # max global grad norm
    schedule: str                      # "warmup_cosine" (every iteration) or "step_epoch" (StepLR per epoch)
    epoch_len: int = 10                # iterations per "epoch" for per-epoch schedules
    step_size: int = 2                 # StepLR step_size, in epochs
    extra_kwargs: dict = field(default_factory=dict)


SCENARIOS = {
    "hf": Scenario("HF-style: AdamW, warm-up + cosine LambdaLR per iteration, clip_grad_norm_ 1.0, bf16 autocast",
                   "adamw", torch.bfloat16, scaler=False, clip=1.0, schedule="warmup_cosine",
                   extra_kwargs=dict(weight_decay=0.01)),
    "amp_fp16": Scenario("fp16 autocast + torch.amp.GradScaler: AdamW, warm-up + cosine LambdaLR per iteration",
                         "adamw", torch.float16, scaler=True, clip=None, schedule="warmup_cosine",
                         extra_kwargs=dict(weight_decay=0.01)),
    "sgd_steplr": Scenario("SGD momentum 0.9, StepLR per epoch (10 iterations), fp32", "sgd_momentum", None,
                           scaler=False, clip=None, schedule="step_epoch"),
}


def warmup_cosine_lambda(warmup: int, total: int):
    """LambdaLR factor: linear warm-up (step+1)/warmup, then cosine from 1 down to FINAL_LR_FRACTION at `total`.

    The same curve as fusedopt's LinearLR(1/warmup, 1, warmup-1) then CosineAnnealingLR(eta_min=0.1 lr), so the
    torch and fusedopt variants train with the same learning rates."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def torch_scheduler(scenario: Scenario, opt, total: int):
    if scenario.schedule == "warmup_cosine":
        warmup = max(1, int(WARMUP_FRACTION * total))
        return torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_lambda(warmup, total))
    return torch.optim.lr_scheduler.StepLR(opt, step_size=scenario.step_size, gamma=0.1)


def fusedopt_scheduler(scenario: Scenario, opt, total: int):
    """The same learning rates from fusedopt.lr_scheduler, advanced on the device (per_step inside the step)."""
    from fusedopt import lr_scheduler
    if scenario.schedule == "warmup_cosine":
        warmup = max(1, int(WARMUP_FRACTION * total))
        lr = opt.param_groups[0]["lr"]
        ramp = lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1),
                                     per_step=True)
        cosine = lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=FINAL_LR_FRACTION * lr,
                                                per_step=True)
        return lr_scheduler.SequentialLR(opt, [ramp, cosine], milestones=[warmup], per_step=True)
    return lr_scheduler.StepLR(opt, step_size=scenario.step_size, gamma=0.1)


def per_iteration_schedule(scenario: Scenario) -> bool:
    return scenario.schedule == "warmup_cosine"


# --------------------------------------------------------------------------------------------- the variants
@dataclass
class Variant:
    """One way of running a scenario: a model copy, its optimizer, scheduler and scaler, and its counters."""
    label: str
    family: str                         # "torch" or "fusedopt": the ratio column compares with the best torch
    own_features: bool                  # fusedopt's max_grad_norm / in-step scaler / device schedule
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: object
    scaler: torch.amp.GradScaler | None
    graphed: bool = False
    iteration: int = 0                  # iterations run so far: selects the batch, drives per-epoch schedules
    graph: object = None
    static_batch: torch.Tensor | None = None
    static_loss: torch.Tensor | None = None
    last_loss: torch.Tensor | None = None
    rates: list = field(default_factory=list)       # steps/s per round
    host_s: list = field(default_factory=list)      # optimizer phase, host clock, per iteration
    device_events: list = field(default_factory=list)  # (start, end) CUDA events around the optimizer phase
    counts: dict = field(default_factory=dict)
    error: str | None = None


def build_variants(scenario: Scenario, reference: nn.Module, device, total: int, compile_step: bool) -> tuple:
    """Every variant that can run here, and (label, why not) for those that cannot."""
    spec = OPTIMIZERS[scenario.optimizer]
    kwargs = dict(scenario.extra_kwargs)
    variants, missing = [], []

    def new(label, family, impl, own=False, graphed=False, compiled=False, **overrides):
        model = copy.deepcopy(reference)
        try:
            opt = make_optimizer(spec, impl, model.parameters(), **{**kwargs, **overrides})
            sched = fusedopt_scheduler(scenario, opt, total) if own else torch_scheduler(scenario, opt, total)
        except Exception as exc:  # noqa: BLE001 - report the variant that cannot be built, keep the others
            missing.append((label, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"))
            return
        if compiled:
            # after the scheduler, which wraps the bound opt.step to track calls; scaler.step(opt) calls this too
            opt.step = torch.compile(opt.step)
        scaler = torch.amp.GradScaler(device.type) if scenario.scaler else None
        variants.append(Variant(label, family, own, model, opt, sched, scaler, graphed=graphed))

    for impl in ("forloop", "foreach", "fused"):
        why = probe(spec, impl, device, torch.float32)
        if why is None:
            new(f"torch {impl}", "torch", impl)
        else:
            missing.append((f"torch {impl}", why))
    if compile_step:
        # a float lr changed every iteration would recompile the step each time: torch's recipe is a tensor lr
        # (foreach=None, as in torch's recipe: torch refuses a tensor lr with foreach=True unless capturable)
        new("torch compiled", "torch", "foreach", compiled=True, foreach=None,
            lr=torch.tensor(spec.kwargs["lr"], device=device))
    else:
        missing.append(("torch compiled", "off (pass --compile)"))
    import fusedopt
    if not fusedopt.EXTENSION_AVAILABLE:
        missing.append(("fusedopt", "compiled extension not loaded"))
        return variants, missing
    new("fusedopt + torch features", "fusedopt", "fusedopt")
    own = dict(max_grad_norm=scenario.clip) if scenario.clip else {}
    new("fusedopt own features", "fusedopt", "fusedopt", own=True, **own)
    if device.type == "cuda":
        new("fusedopt own + CUDA graph", "fusedopt", "fusedopt", own=True, graphed=True, **own)
    else:
        missing.append(("fusedopt own + CUDA graph", "CUDA only"))
    return variants, missing


# ------------------------------------------------------------------------------------------- one iteration
def autocast(scenario: Scenario, device):
    # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture (torch.cuda.graph
    # docs); the eager variants use the same setting so that all of them do the same casts
    return torch.autocast(device.type, dtype=scenario.amp_dtype or torch.float32,
                          enabled=scenario.amp_dtype is not None, cache_enabled=False)


def forward_backward(v: Variant, scenario: Scenario, batch, device):
    with autocast(scenario, device):
        loss = loss_fn(v.model, batch)
    (v.scaler.scale(loss) if v.scaler else loss).backward()
    return loss.detach()


def optimizer_phase(v: Variant, scenario: Scenario):
    """Everything after backward: clipping, the step (through the scaler), the scheduler."""
    if v.own_features:
        # clipping, unscaling and the inf check happen inside the fused step; per-step schedules too
        if v.scaler:
            v.scaler.step(v.opt)
            v.scaler.update()
        else:
            v.opt.step()
    else:
        if v.scaler:
            if scenario.clip:
                v.scaler.unscale_(v.opt)
                torch.nn.utils.clip_grad_norm_(v.model.parameters(), scenario.clip)
            v.scaler.step(v.opt)
            v.scaler.update()
        else:
            if scenario.clip:
                torch.nn.utils.clip_grad_norm_(v.model.parameters(), scenario.clip)
            v.opt.step()
    if per_iteration_schedule(scenario):
        v.sched.step()  # fusedopt's per_step scheduler: a no-op, the step advanced it


def epoch_boundary(v: Variant, scenario: Scenario):
    """Per-epoch schedules step at the end of every epoch_len iterations (outside the timed optimizer phase)."""
    if not per_iteration_schedule(scenario) and v.iteration % scenario.epoch_len == 0:
        v.sched.step()


def eager_iteration(v: Variant, scenario: Scenario, batches, device, timed: bool):
    batch = batches[v.iteration % len(batches)]
    v.opt.zero_grad(set_to_none=True)
    loss = forward_backward(v, scenario, batch, device)
    if timed and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    optimizer_phase(v, scenario)
    host = time.perf_counter() - t0
    if timed:
        v.host_s.append(host)
        if device.type == "cuda":
            end.record()
            v.device_events.append((start, end))
    v.iteration += 1
    epoch_boundary(v, scenario)
    v.last_loss = loss


def graph_iteration(v: Variant, scenario: Scenario, batches, device, timed: bool):
    """One replay of forward + backward + step; the host only copies the batch in and replays."""
    v.static_batch.copy_(batches[v.iteration % len(batches)])
    t0 = time.perf_counter()
    v.graph.replay()
    if timed:
        v.host_s.append(time.perf_counter() - t0)  # host cost of the whole replay; the step is inside the graph
    v.iteration += 1
    epoch_boundary(v, scenario)
    v.last_loss = v.static_loss


def capture(v: Variant, scenario: Scenario, batches, device, warmup: int):
    """torch.cuda.graph's whole-network recipe: warm up on a side stream, then capture one iteration.

    Grads are set to None before capture, so backward allocates them in the graph's pool and every replay
    writes the same grad tensors; fusedopt's step (with the in-step scaler, clipping and per-step schedule)
    is captured with them. A float lr is fine: the per-step schedule keeps the lrs on the device."""
    v.static_batch = batches[0].clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(3, warmup)):
            eager_iteration(v, scenario, batches, device, timed=False)
    torch.cuda.current_stream(device).wait_stream(side)
    v.graph = torch.cuda.CUDAGraph()
    v.opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(v.graph):
        v.static_loss = forward_backward(v, scenario, v.static_batch, device)
        optimizer_phase(v, scenario)
    synchronize(device)


def run_iteration(v, scenario, batches, device, timed):
    (graph_iteration if v.graphed else eager_iteration)(v, scenario, batches, device, timed)


# ---------------------------------------------------------------------------------------------- counting
def count_cuda_work(v: Variant, scenario: Scenario, batches, device) -> dict:
    """One profiled iteration: device-side ops (kernels, memcpy, memset) of the optimizer phase and of the whole
    iteration, CUDA launch calls made by the host, and host syncs seen by torch's sync debug mode."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def device_ops(prof):
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        return len(events), sum(e.time_range.elapsed_us() for e in events)

    def launches(prof):
        # runtime (cudaLaunchKernel, cudaGraphLaunch, ...) and driver (cuLaunchKernel: Triton kernels) calls
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CPU and "Launch" in e.name
                   and e.name.startswith("cu"))

    synchronize(device)
    counts = {}
    previous = torch.cuda.get_sync_debug_mode()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")  # only around the iteration: the profiler's flush syncs too
            try:
                run_iteration(v, scenario, batches, device, timed=False)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        synchronize(device)
    counts["syncs_per_iter"] = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    counts["device_ops_per_iter"], _ = device_ops(prof)
    counts["launch_calls_per_iter"] = launches(prof)
    if not v.graphed:
        # the optimizer phase alone: forward/backward outside the profiled region
        batch = batches[v.iteration % len(batches)]
        v.opt.zero_grad(set_to_none=True)
        forward_backward(v, scenario, batch, device)
        synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            optimizer_phase(v, scenario)
            synchronize(device)
        v.iteration += 1
        epoch_boundary(v, scenario)
        counts["opt_device_ops"], counts["opt_kernel_us"] = device_ops(prof)
        counts["opt_launch_calls"] = launches(prof)
    return counts


# ------------------------------------------------------------------------------------------------ running
def warm_gpu(device, seconds: float = 3.0):
    """Matmuls until the GPU has run `seconds` at load: the first variant must not meet a GPU at idle clocks."""
    a = torch.randn(4096, 4096, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a = torch.tanh(a @ a)
        synchronize(device)


def run_scenario(name, scenario: Scenario, args, device, bar) -> dict:
    shape, batch_size = MODEL_SHAPES["cuda" if device.type == "cuda" else "cpu"]
    torch.manual_seed(args.seed)
    reference = TinyGPT(**shape).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batches = [torch.randint(shape["vocab"], (batch_size, shape["ctx"] + 1), device=device, generator=gen)
               for _ in range(8)]
    total = args.warmup + args.rounds * args.iters + 2  # + the two counted iterations: schedule covers the run
    variants, missing = build_variants(scenario, reference, device, total, args.compile)
    bar.total += len(variants) * (1 + args.rounds)  # a warm-up turn and a turn per round for each variant
    bar.refresh()
    bar.set_postfix_str(f"{name}: warm-up")
    for v in variants:
        try:
            if v.graphed:
                capture(v, scenario, batches, device, args.warmup)
            else:
                for _ in range(args.warmup):
                    run_iteration(v, scenario, batches, device, timed=False)
            synchronize(device)
        except Exception as exc:  # noqa: BLE001 - report the variant that cannot run, keep the others
            v.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        bar.update(1)
    live = [v for v in variants if v.error is None]
    for r, order in enumerate(round_orders(live, args.rounds)):  # balanced for which variant ran just before
        for v in order:
            bar.set_postfix_str(f"{name}: round {r + 1}/{args.rounds} {v.label}")
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.iters):
                run_iteration(v, scenario, batches, device, timed=True)
            synchronize(device)
            v.rates.append(args.iters / (time.perf_counter() - t0))
        bar.update(len(variants))
    for v in live:
        if device.type == "cuda":
            try:
                v.counts = count_cuda_work(v, scenario, batches, device)
            except Exception as exc:  # noqa: BLE001 - counting is extra information, the timings stand
                v.counts = {"error": f"{type(exc).__name__}: {exc}"}
    synchronize(device)
    n_params = sum(p.numel() for p in reference.parameters())
    records = [variant_record(v, device) for v in variants]
    best_torch = max((r["steps_per_s"] for r in records if r["family"] == "torch" and "steps_per_s" in r),
                     default=None)
    for r in records:
        if "steps_per_s" in r and best_torch:
            r["x_best_torch"] = r["steps_per_s"] / best_torch
    return {"scenario": name, "title": scenario.title, "optimizer": scenario.optimizer, "n_params": n_params,
            "model": shape, "batch": batch_size, "schedule_length": total, "variants": records,
            "not_run": [{"label": label, "why": why} for label, why in missing]}


def variant_record(v: Variant, device) -> dict:
    rec = {"label": v.label, "family": v.family}
    if v.error:
        return {**rec, "error": v.error}
    rec.update(steps_per_s=statistics.median(v.rates), steps_per_s_rounds=v.rates,
               iterations=v.iteration, final_loss=float(v.last_loss))
    if v.host_s:
        rec["host_ms"] = 1e3 * statistics.median(v.host_s)
        rec["host_ms_is"] = "whole replay" if v.graphed else "optimizer phase"
    if device.type == "cuda" and v.device_events:
        rec["device_ms"] = statistics.median(s.elapsed_time(e) for s, e in v.device_events)
    elif device.type != "cuda":
        rec["device_ms"] = rec["host_ms"]  # on the CPU the step runs on the calling thread: same clock
    rec.update(v.counts)
    return rec


# ------------------------------------------------------------------------------------------------ reports
def fmt(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def print_scenario(res: dict, device, file=None):
    file = file or sys.stdout  # looked up per call: a redirected stdout (capsys, contextlib) is honoured
    on_gpu = device.type == "cuda"
    print(f"\n[{res['scenario']}] {res['title']}  ({res['n_params'] / 1e6:.2f}M params, batch "
          f"{res['batch']}x{res['model']['ctx']})", file=file)
    header = (f"  {'variant':<28} {'steps/s':>8} {'x best torch':>12} {'step host ms':>12} {'step dev ms':>11} "
              f"{'opt kernels':>11} {'launches/it':>11} {'syncs/it':>8} {'final loss':>10}")
    print(header, file=file)
    for r in res["variants"]:
        if "error" in r:
            print(f"  {r['label']:<28} failed: {r['error']}", file=file)
            continue
        host = fmt(r.get("host_ms"), ".3f") + ("*" if r.get("host_ms_is") == "whole replay" else "")
        device_ms = r.get("device_ms")
        print(f"  {r['label']:<28} {r['steps_per_s']:>8.2f} {fmt(r.get('x_best_torch'), '.2f'):>12} "
              f"{host:>12} {fmt(device_ms, '.3f', 'in graph'):>11} "
              f"{fmt(r.get('opt_device_ops'), 'd', 'in graph' if on_gpu else 'n/a'):>11} "
              f"{fmt(r.get('launch_calls_per_iter'), 'd'):>11} {fmt(r.get('syncs_per_iter'), 'd'):>8} "
              f"{r['final_loss']:>10.4f}", file=file)
    for m in res["not_run"]:
        print(f"  {m['label']:<28} –  ({m['why']})", file=file)


def print_legend(device, file=None):
    file = file or sys.stdout  # looked up per call: a redirected stdout (capsys, contextlib) is honoured
    print("\nsteps/s: median over rounds of whole iterations (zero_grad, forward, backward, optimizer phase). "
          "x best torch: over the fastest torch.optim variant of the scenario.\nstep host ms: median host time "
          "of the optimizer phase (clipping, scaler, step, scheduler)" + ("; * = host time of the whole graph "
                                                                          "replay." if device.type == "cuda"
                                                                          else "."), file=file)
    if device.type == "cuda":
        print("step dev ms: CUDA events around the optimizer phase. opt kernels: device ops (kernels, memcpy, "
              "memset) of the optimizer phase, profiled. launches/it: CUDA launch calls per iteration. syncs/it: "
              "host syncs per iteration (torch.cuda.set_sync_debug_mode).", file=file)
    else:
        print("step dev ms: on the CPU the step runs on the host, so this is the host time. Kernel, launch and "
              "sync counts are CUDA notions: n/a on the CPU.", file=file)


def plot(results: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 1.2 + 0.45 * sum(len(r["variants"]) for r in results)
                                                    + 0.6 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        rows = [r for r in res["variants"] if "steps_per_s" in r]
        labels = [r["label"] for r in rows]
        values = [r["steps_per_s"] for r in rows]
        colors = ["C0" if r["family"] == "torch" else "C1" for r in rows]
        bars = ax.barh(range(len(rows)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.1f}" + (f" ({r['x_best_torch']:.2f}x)" if "x_best_torch" in r else "")
                                   for v, r in zip(values, rows)], fontsize=7, padding=2)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(values, default=1) * 1.3)
        ax.set_xlabel("steps/s (median over rounds)", fontsize=8)
        ax.set_title(f"[{res['scenario']}] {res['title']}", fontsize=8, loc="left")
    common.save_figure(fig, title, path)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = common.argument_parser(__doc__)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS),
                    help="training loops to run (default: all: %(default)s)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds; each gives one steps/s sample per variant (default: CUDA 15, CPU 5)")
    ap.add_argument("--iters", type=int, default=None,
                    help="iterations per variant per round (default: CUDA 20, CPU 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed iterations of every variant before the rounds (default: CUDA 20, CPU 2)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="add a torch.compile'd torch.optim step (default: on with CUDA, off on the CPU, where "
                         "compiling takes minutes)")
    ap.add_argument("--seed", type=int, default=0, help="model and data seed (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help="folder for the JSON record and PNG chart (default: benchmarks/results)")
    args = ap.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    on_gpu = device.type == "cuda"
    args.rounds = args.rounds or (15 if on_gpu else 5)
    args.iters = args.iters or (20 if on_gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (20 if on_gpu else 2)
    args.compile = on_gpu if args.compile is None else args.compile
    meta = run_metadata(device)
    if on_gpu:
        meta["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    print(f"train_loop on {meta['device_name']} ({device}; CPU ISA {meta['cpu_isa']}, torch CPU capability "
          f"{meta['torch_cpu_capability']}) | torch {meta['torch']} | threads "
          f"{meta['torch_threads']} | fusedopt commit {meta['fusedopt_commit']} | extension loaded: "
          f"{meta.get('fusedopt_extension_available')}\n{args.warmup} warm-up iterations, {args.rounds} interleaved "
          f"rounds of {args.iters} iterations per variant, medians over rounds")
    if load_warning(meta, device):
        print(load_warning(meta, device))
    if on_gpu:
        warm_gpu(device)
    bar = tqdm(total=0, desc="train_loop", unit="turn", dynamic_ncols=True, file=sys.stderr)
    results = [run_scenario(name, SCENARIOS[name], args, device, bar) for name in args.scenarios]
    bar.close()
    for res in results:
        print_scenario(res, device)
    print_legend(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = result_stem("train_loop", device)
    record = {"meta": meta, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "scenarios": results}
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    json_path.write_text(json.dumps(record, indent=1))
    plot(results, png_path, f"train_loop on {meta['device_name']} ({device.type}, torch {meta['torch']}, "
                            f"{meta['date'][:10]})")
    print(f"\nwrote {json_path}\nwrote {png_path}")
    return results


if __name__ == "__main__":
    main()
