"""Optimizer step time: fusedopt vs torch.optim's for-loop, foreach and fused implementations.

    python -m benchmarks.bench_step                 # all optimizers, default workloads and modes, fp32
    python -m benchmarks.bench_step --quick         # 170 cases (17 optimizers x 5 workloads x 2 modes), 6 steps each
    python -m benchmarks.bench_step --optimizers adam sgd_momentum --workloads small host --dtypes fp32 bf16
    python -m benchmarks.bench_step --workloads host --modes stable new-grads varying-lr realistic
    python -m benchmarks.bench_step --optimizers adamw sgd_momentum --workloads small --dtypes bf16 \
        --rounding stochastic kahan master        # the low-precision modes beside plain fusedopt and torch

Workloads: transformer (24.6M params, 148 tensors), small (2,000 x 1,024), groups (the transformer in 4 param
groups with lr multipliers and weight-decay splits), host (2,000 tensors of 4 elements: the kernel work is nil,
so the step's time is the host's cost, timed on the host clock and reported per tensor), single (one tensor of
4 elements, host clock: the step's fixed cost, what a model with few tensors pays at every step) and large
(~1.3B params, scaled to the free memory; CUDA only by default).

Modes (what changes between two steps; the change is made outside the timer): stable (the grads are set once
and every step reuses them, the lr is constant: the most favourable case for a cached launch table), new-grads
(new grad tensors before every step, as backward after zero_grad(set_to_none=True) leaves them), varying-lr (a
new float lr every step, as a per-iteration LambdaLR sets it), realistic (both).

Method: all implementations of one optimizer step the same parameter tensors (each keeps its own state), run
round-robin one step at a time, every implementation once per round, so clock or thermal drift hits them all
alike, in orders balanced for which step ran just before (benchmarks/common.py's round_orders); we report
medians. CPU samples are time.perf_counter around one step; CUDA samples are CUDA events around one step, after
a synchronize, so launch overhead counts but earlier queued work does not (the host and single workloads:
perf_counter after a synchronize, on CUDA too). Bandwidth is the algorithm's minimum traffic (table in
benchmarks/common.py) over the step time, given as a percentage of an in-place `a.add_(b)` over the same number
of elements, timed in the same round-robin (a step streams more arrays at once than add_, so on some machines it
can exceed 100%).
"–" in the table: torch has no such implementation (e.g. fused=True for Adadelta); the JSON says why.

Defaults: CPU 10 timed steps after 2 warm-up, CUDA 50 after 10. --quick: 5 (CPU) or 20 (CUDA) steps and a
d=192 transformer (7.0M params). Duration, measured on 2 cores of an AMD EPYC (torch 2.14, fp32, default
workloads and modes) that other jobs shared: --quick 52 s at load average 1.1, 280 s at load average 2-4.5
and 1,118 s at load average 9-11 (torch's OpenMP kernels suffer most from competing processes). The default
run: 139 s at load average 1.0. Every run prints its own duration at the end.
"""
from __future__ import annotations

import functools
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import common
from benchmarks.common import (ADD_ARRAYS, IMPLS, OPTIMIZERS, RESULTS_DIR, ROUNDING_IMPLS, TORCH_IMPLS, OptSpec,
                               default_device, load_warning, make_optimizer, probe, result_stem, round_orders,
                               run_metadata, state_arrays, synchronize, traffic_arrays)

# Wall time of a whole run (measured, see the docstring): stated once, here, for the docstring and --help
QUICK_DURATION = "about 3 minutes on 2 cores (measured: 187 s for 17 configurations), longer when other jobs share them"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    tensors: list[tuple[str, tuple[int, ...]]]  # (role, shape); role picks the param group in "groups"
    grouped: bool = False
    note: str = ""
    host_clock: bool = False  # timed on the host clock even on CUDA: the kernel work is nil, the host's cost is all

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors)


def transformer_tensors(layers: int, d: int, vocab: int, ctx: int) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-style parameter list: embeddings, then per layer LN, qkv, proj, LN, MLP (12 tensors), final LN."""
    tensors = [("emb", (vocab, d)), ("emb", (ctx, d))]
    for _ in range(layers):
        tensors += [("vec", (d,)), ("vec", (d,)), ("attn", (3 * d, d)), ("vec", (3 * d,)), ("attn", (d, d)),
                    ("vec", (d,)), ("vec", (d,)), ("vec", (d,)), ("mlp", (4 * d, d)), ("vec", (4 * d,)),
                    ("mlp", (d, 4 * d)), ("vec", (d,))]
    return tensors + [("vec", (d,)), ("vec", (d,))]


# "groups": the usual split of a transformer into decay / no-decay groups, plus lr multipliers, so that a
# per-group hyper-parameter lookup is part of what is timed. role: (lr multiplier, weight_decay)
GROUPS = {"emb": (0.5, 0.0), "attn": (1.0, 0.01), "mlp": (2.0, 0.01), "vec": (1.0, 0.0)}

HOST_TENSORS, HOST_TENSOR_NUMEL = 2000, 4  # the "host" workload: many tiny tensors (norms, biases, adapters)
WORKLOADS = ["transformer", "small", "groups", "host", "single", "large"]
DEFAULT_WORKLOADS = ["transformer", "small", "groups", "host", "single"]  # + large on CUDA

LARGE_SHAPE = dict(layers=24, d=2048, vocab=50304, ctx=2048)  # ~1.3B parameters, GPT-2-XL-sized


def bytes_needed_per_elem(specs: list[OptSpec], itemsize: int) -> int:
    """Device memory per parameter element for one case: p, g, the add_ pair, every implementation's state, and
    two arrays of headroom for the temporaries torch's foreach path allocates."""
    return itemsize * (4 + max(state_arrays(s) for s in specs) * len(IMPLS) + 2)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build_workloads(names, device, quick, specs, itemsize) -> tuple[list[Workload], list[str]]:
    """The requested workloads, scaled for CPU/--quick, and messages for the ones skipped or scaled."""
    messages = []
    # --quick keeps the transformer's ~150 tensors but makes them narrower
    tf_shape = dict(layers=12, d=192 if quick else 384, vocab=8192, ctx=512)
    if quick:
        messages.append("--quick: transformer/groups scaled from d=384 (24.6M params) to d=192 (7.0M params)")
    out = []
    for name in names:
        if name == "transformer":
            out.append(Workload(name, transformer_tensors(**tf_shape), note=f"d={tf_shape['d']}"))
        elif name == "groups":
            out.append(Workload(name, transformer_tensors(**tf_shape), grouped=True, note="4 param groups"))
        elif name == "small":
            out.append(Workload(name, [("vec", (1024,))] * 2000, note="2000 x 1024"))
        elif name == "host":
            # the kernel work is nil: what is left is the host's cost per tensor (timed on the host clock)
            out.append(Workload(name, [("vec", (HOST_TENSOR_NUMEL,))] * HOST_TENSORS,
                                note=f"{HOST_TENSORS} x {HOST_TENSOR_NUMEL}, host clock", host_clock=True))
        elif name == "single":
            # one tiny tensor: the step's fixed host cost (Python, the op call), what a model with few tensors pays
            out.append(Workload(name, [("vec", (HOST_TENSOR_NUMEL,))], note=f"1 x {HOST_TENSOR_NUMEL}, host clock",
                                host_clock=True))
        elif name == "large":
            per_layer = 12 * LARGE_SHAPE["d"] ** 2 + 13 * LARGE_SHAPE["d"]
            fixed = (LARGE_SHAPE["vocab"] + LARGE_SHAPE["ctx"]) * LARGE_SHAPE["d"]
            fit_elems = 0.85 * free_memory(device) / bytes_needed_per_elem(specs, itemsize)
            layers = min(LARGE_SHAPE["layers"], int((fit_elems - fixed) // per_layer))
            if layers < 1:
                messages.append(f"large: skipped, does not fit in {free_memory(device) / 2**30:.0f} GiB free")
                continue
            shape = {**LARGE_SHAPE, "layers": layers}
            wl = Workload(name, transformer_tensors(**shape), note=f"d=2048, {layers} layers")
            if layers < LARGE_SHAPE["layers"]:
                messages.append(f"large: scaled to {layers} of 24 layers ({wl.numel / 1e9:.2f}B params) to fit memory")
            out.append(wl)
        else:
            raise SystemExit(f"unknown workload {name!r}")
    if "large" not in names and device.type == "cpu":
        messages.append("large: skipped on CPU by default (ask for it with --workloads large)")
    return out, messages


def make_params(workload: Workload, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _, shape in workload.tensors:
        p = torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(0.02).requires_grad_()
        # grads are set once: every timed step reuses them, so nothing but the optimizer is measured
        p.grad = torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(1e-3)
        params.append(p)
    return params


# ------------------------------------------------------------------------------------------------- modes
# What changes between steps. "stable" is the most favourable case for a cached launch table (same grads, same
# lr); a real loop gets new grad tensors from every backward (zero_grad(set_to_none=True)) and, with a per-
# iteration scheduler, a new float lr every step. The changes are made before each timed step, outside the timer.
MODES = {
    "stable": dict(new_grads=False, varying_lr=False),
    "new-grads": dict(new_grads=True, varying_lr=False),
    "varying-lr": dict(new_grads=False, varying_lr=True),
    "realistic": dict(new_grads=True, varying_lr=True),
}
DEFAULT_MODES = ["stable", "realistic"]


def lr_factor(step: int) -> float:
    """A different float lr every step (as a per-iteration LambdaLR gives), within [0.5, 1.5] of the base."""
    return 1.0 + 0.5 * math.sin(0.7 * step)


def make_prepare(mode: str, params, base_grads, optimizer):
    """The between-steps change of `mode` for one implementation's optimizer, or None when nothing changes."""
    new_grads, varying_lr = MODES[mode]["new_grads"], MODES[mode]["varying_lr"]
    if not (new_grads or varying_lr):
        return None
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    counter = iter(range(1 << 62))

    def prepare():
        step = next(counter)
        if new_grads:  # fresh tensors, new storage: as backward after zero_grad(set_to_none=True) leaves them
            for p, g in zip(params, base_grads):
                p.grad = g.clone()
        if varying_lr:
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * lr_factor(step)
    return prepare


def param_groups(workload: Workload, params, spec: OptSpec):
    if not workload.grouped:
        return params
    groups = []
    for role, (lr_mult, weight_decay) in GROUPS.items():
        members = [p for (r, _), p in zip(workload.tensors, params) if r == role]
        groups.append({"params": members, "lr": spec.kwargs["lr"] * lr_mult, "weight_decay": weight_decay})
    return groups


# ------------------------------------------------------------------------------------------------- timing
def time_round_robin(fns: dict, reps: int, warmup: int, device: torch.device, prepare: dict | None = None,
                     host_clock: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved one at a time in rounds (common.round_orders).

    prepare[name], when given, runs untimed before every call of fns[name]. host_clock: time the call on the
    host (perf_counter) even on CUDA, after a synchronize, so that the sample is the host's cost of the call."""
    prepare = prepare or {}
    names = list(fns)

    def call(name):
        if prepare.get(name):
            prepare[name]()
        fns[name]()

    for order in round_orders(names, warmup, seed=1):
        for name in order:
            call(name)
    synchronize(device)
    raw = {name: [] for name in names}
    # balanced for which call ran just before (see there); the timed rounds start a cycle of the design
    for order in round_orders(names, reps):
        for name in order:
            if prepare.get(name):
                prepare[name]()
            if device.type == "cuda" and not host_clock:
                # an empty queue first: the sample covers this step's launches and kernels, nothing queued earlier
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                raw[name].append((start, end))
            else:
                synchronize(device)
                t0 = time.perf_counter()
                fns[name]()
                raw[name].append(time.perf_counter() - t0)
    synchronize(device)
    return {n: [s.elapsed_time(e) / 1e3 for s, e in v] if v and isinstance(v[0], tuple) else v
            for n, v in raw.items()}


def bench_case(workload, params, base_grads, dtype_name, device, spec_name, mode, reps, warmup, add_ref,
               impls=tuple(IMPLS)):
    """Time every supported implementation of one optimizer on one workload in one mode; a record per impl."""
    spec, dtype = OPTIMIZERS[spec_name], DTYPES[dtype_name]
    why_not = {impl: probe(spec, impl, device, dtype) for impl in impls}  # None where supported
    for p, g in zip(params, base_grads):
        p.grad = g
    opts = {impl: make_optimizer(spec, impl, param_groups(workload, params, spec))
            for impl, why in why_not.items() if why is None}
    prepare = {impl: make_prepare(mode, params, base_grads, o) for impl, o in opts.items()}
    host_clock = workload.host_clock
    samples = time_round_robin({**{i: o.step for i, o in opts.items()}, "add_": add_ref}, reps, warmup, device,
                               prepare, host_clock)
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    del opts
    for p, g in zip(params, base_grads):
        p.grad = g
    add_gbps = ADD_ARRAYS * dtype.itemsize * workload.numel / statistics.median(samples.pop("add_")) / 1e9
    bytes_per_elem = traffic_arrays(spec) * dtype.itemsize
    fused_median = statistics.median(samples["fusedopt"]) if "fusedopt" in samples else None
    records = []
    for impl, why in why_not.items():
        rec = dict(workload=workload.name, dtype=dtype_name, mode=mode, optimizer=spec_name, impl=impl,
                   numel=workload.numel, n_tensors=len(workload.tensors), bytes_per_elem=bytes_per_elem,
                   clock="host" if host_clock or device.type != "cuda" else "cuda events")
        if why is not None:
            records.append({**rec, "skipped": why})
            continue
        median = statistics.median(samples[impl])
        gbps = bytes_per_elem * workload.numel / median / 1e9
        records.append({**rec, "median_s": median, "samples_s": samples[impl], "gbps": gbps,
                        "us_per_tensor": 1e6 * median / len(workload.tensors),
                        "pct_of_add": 100 * gbps / add_gbps, "add_gbps": add_gbps, "params_finite": finite,
                        "fusedopt_speedup": fused_median and median / fused_median})
    return records


# ------------------------------------------------------------------------------------------------ reports
def print_table(records, file=None):
    file = file or sys.stdout  # looked up per call: a redirected stdout (capsys, contextlib) is honoured
    header = (f"{'workload':<12} {'dtype':<5} {'mode':<10} {'optimizer':<16} {'impl':<19} {'median ms':>10} "
              f"{'fusedopt x':>10} {'GB/s':>8} {'% add_':>7} {'us/tensor':>9}")
    print(header, file=file)
    print("-" * len(header), file=file)
    previous = None
    for r in records:
        key = (r["workload"], r["dtype"], r["mode"], r["optimizer"])
        lead = (f"{r['workload']:<12} {r['dtype']:<5} {r['mode']:<10} {r['optimizer']:<16}" if key != previous
                else " " * 46)
        if previous and key[:3] != previous[:3]:
            print(file=file)
        previous = key
        if "skipped" in r:  # torch has no such implementation here (the reason is in the JSON record)
            print(f"{lead} {r['impl']:<19} {'–':>10}", file=file)
            continue
        speedup = "" if r["impl"] == "fusedopt" or r["fusedopt_speedup"] is None else f"{r['fusedopt_speedup']:.2f}x"
        flag = "" if r["params_finite"] else "  NON-FINITE PARAMS"
        print(f"{lead} {r['impl']:<19} {1e3 * r['median_s']:>10.3f} {speedup:>10} {r['gbps']:>8.1f} "
              f"{r['pct_of_add']:>6.0f}% {r['us_per_tensor']:>9.3f}{flag}", file=file)
    print("\nfusedopt x = torch implementation's median step time / fusedopt's (above 1: fusedopt is faster); "
          "– = torch has no such implementation (reason in the JSON record).", file=file)
    if any(r["impl"] in ROUNDING_IMPLS for r in records):
        print("fusedopt+<rounding>: fusedopt with that low-precision mode (--rounding); its 'fusedopt x' is its time "
              "over plain fusedopt's (the mode's cost); GB/s and % add_ count plain fusedopt's bytes (kahan and "
              "master move more: benchmarks/bench_low_precision.py has the per-mode byte model).", file=file)
    print("mode: stable = same grads and lr every step; new-grads = new grad tensors before every step; "
          "varying-lr = a new float lr every step; realistic = both.", file=file)
    print("host and single workloads: timed on the host clock (the kernel work is nil); us/tensor = median / "
          "tensors (single: the step's fixed cost).", file=file)
    per_elem = dict.fromkeys(f"{r['optimizer']} {r['dtype']} {r['bytes_per_elem']}" for r in records)
    print("GB/s counts the minimum traffic per element (benchmarks/common.py), in bytes: " + ", ".join(per_elem)
          + f"; add_ moves {ADD_ARRAYS} arrays.", file=file)


def plot_speedups(records, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    panels = list(dict.fromkeys((r["workload"], r["dtype"], r["mode"]) for r in records))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels) + 0.6), squeeze=False)
    width = 0.8 / len(TORCH_IMPLS)
    for ax, (wl, dt, mode) in zip(axes[:, 0], panels):
        rows = [r for r in records if (r["workload"], r["dtype"], r["mode"]) == (wl, dt, mode)
                and r.get("fusedopt_speedup")]
        opts = list(dict.fromkeys(r["optimizer"] for r in rows))
        all_ys = [1.0]
        for j, impl in enumerate(TORCH_IMPLS):
            xs, ys = [], []
            for i, opt in enumerate(opts):
                match = [r for r in rows if r["optimizer"] == opt and r["impl"] == impl]
                if match:
                    xs.append(i + (j - (len(TORCH_IMPLS) - 1) / 2) * width)
                    ys.append(match[0]["fusedopt_speedup"])
            # bars grow from 1x, up where fusedopt is faster, down where it is slower
            bars = ax.bar(xs, [y - 1 for y in ys], width, bottom=1, color=f"C{j}", label=f"vs torch {impl}")
            ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], fontsize=7)
            all_ys += ys
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(min(all_ys) / 1.6, max(all_ys) * 1.8)  # room for the value labels
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xticks(range(len(opts)), opts, fontsize=8)
        ax.set_ylabel("fusedopt speed-up")
        ax.set_title(f"{wl} ({dt}, {mode})", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(TORCH_IMPLS), fontsize=8)
    common.save_figure(fig, title, path)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = common.argument_parser(__doc__)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS), metavar="NAME",
                    help="optimizer configurations (benchmarks/common.py), any of: %(choices)s (default: all)")
    ap.add_argument("--workloads", nargs="+", default=None, choices=WORKLOADS, metavar="NAME",
                    help="parameter sets, any of: %(choices)s (default: " + " ".join(DEFAULT_WORKLOADS)
                         + ", plus large on CUDA)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES), metavar="DTYPE",
                    help="param (and state) dtypes, any of: %(choices)s (default: fp32)")
    ap.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES), metavar="MODE",
                    help="what changes between steps, any of: %(choices)s (default: " + " ".join(DEFAULT_MODES)
                         + "); realistic = new grad tensors and a new float lr every step")
    ap.add_argument("--rounding", nargs="+", default=[], choices=[i.split("+")[1] for i in ROUNDING_IMPLS],
                    metavar="MODE",
                    help="also time fusedopt with these low-precision modes, any of: %(choices)s (rows "
                         "fusedopt+<mode>; they matter with --dtypes bf16 or fp16; default: none)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed steps per implementation (default: CPU 10, CUDA 50; --quick: CPU 5, CUDA 20)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps of each implementation first (default: CPU 2, CUDA 10; --quick: CPU 1, "
                         "CUDA 5)")
    ap.add_argument("--quick", action="store_true",
                    help=f"a d=192 transformer (7.0M params) and fewer reps: {QUICK_DURATION} (default: off)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help="folder for the JSON record and PNG chart (default: benchmarks/results)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    on_gpu = device.type == "cuda"
    reps = args.reps or ((20 if on_gpu else 5) if args.quick else (50 if on_gpu else 10))
    warmup = args.warmup if args.warmup is not None else ((5 if on_gpu else 1) if args.quick else (10 if on_gpu else 2))
    names = args.workloads or (DEFAULT_WORKLOADS + (["large"] if on_gpu else []))
    specs = [OPTIMIZERS[o] for o in args.optimizers]
    impls = tuple(IMPLS) + tuple(f"fusedopt+{mode}" for mode in args.rounding)
    started = time.perf_counter()

    meta = run_metadata(device)
    print(f"device: {meta['device_name']} ({device}; CPU ISA {meta['cpu_isa']}, torch CPU capability "
          f"{meta['torch_cpu_capability']}) | torch {meta['torch']} | threads {meta['torch_threads']} | "
          f"fusedopt {meta.get('fusedopt_version')} commit {meta['fusedopt_commit']}")
    if not meta.get("fusedopt_extension_available"):
        print("WARNING: fusedopt's compiled extension is not loaded: 'fusedopt' rows time its fallback path.")
    print(f"reps {reps}, warm-up {warmup}; median of interleaved single-step samples")
    if load_warning(meta, device):
        print(load_warning(meta, device))

    plan, skipped = [], []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        workloads, messages = build_workloads(names, device, args.quick, specs, dtype.itemsize)
        skipped += [f"{dtype_name}: {m}" for m in messages]
        plan += [(wl, dtype_name) for wl in workloads]
    for message in dict.fromkeys(skipped):
        print("note:", message)

    records = []
    bar = tqdm(total=len(plan) * len(specs) * len(args.modes), desc="bench_step", unit="case", dynamic_ncols=True)
    for wl, dtype_name in plan:
        dtype = DTYPES[dtype_name]
        params = make_params(wl, device, dtype)
        base_grads = [p.grad for p in params]
        a = torch.randn(wl.numel, device=device, dtype=dtype)
        b = torch.randn(wl.numel, device=device, dtype=dtype).mul_(1e-6)  # tiny: a stays finite over many adds
        for mode in args.modes:
            for name in args.optimizers:
                bar.set_postfix_str(f"{wl.name} {dtype_name} {mode} {name}")
                records += bench_case(wl, params, base_grads, dtype_name, device, name, mode, reps, warmup,
                                      functools.partial(a.add_, b), impls)
                gc.collect()
                if on_gpu:
                    torch.cuda.empty_cache()  # each case's optimizer state is dropped before the next allocates
                bar.update()
        del params, base_grads, a, b
    bar.close()

    meta["load_average_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta["duration_s"] = time.perf_counter() - started
    print()
    print_table(records)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = result_stem("bench_step", device)
    record = {"meta": meta, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "reps": reps, "warmup": warmup, "notes": list(dict.fromkeys(skipped)),
              "workloads": {wl.name: {"numel": wl.numel, "n_tensors": len(wl.tensors), "note": wl.note}
                            for wl, _ in plan},
              "bytes_per_elem_arrays": {n: traffic_arrays(s) for n, s in OPTIMIZERS.items()},
              "results": records}
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    json_path.write_text(json.dumps(record, indent=1))
    plot_speedups(records, png_path, f"fusedopt step speed-up on {meta['device_name']} ({meta['date'][:10]})")
    print(f"\nwrote {json_path}\nwrote {png_path}\ntook {meta['duration_s']:.0f} s")
    return records


if __name__ == "__main__":
    main()
