"""Optimizer step time: fusedopt vs torch.optim's for-loop, foreach and fused implementations.

    python -m benchmarks.bench_step                 # all optimizers, default workloads, fp32
    python -m benchmarks.bench_step --quick         # about a minute on 2 CPU cores
    python -m benchmarks.bench_step --optimizers adam sgd_momentum --workloads small --dtypes fp32 bf16

Method: the gradients are set once and every step reuses them, so only the optimizer is timed. All
implementations of one optimizer step the same parameter tensors (each keeps its own state), run round-robin
one step at a time in a rotating order, so clock or thermal drift hits them all alike; we report medians.
CPU samples are time.perf_counter around one step; CUDA samples are CUDA events around one step, after a
synchronize, so launch overhead counts but earlier queued work does not. Bandwidth is the algorithm's minimum
traffic (table in benchmarks/common.py) over the step time, given as a percentage of an in-place
`a.add_(b)` over the same number of elements, timed in the same round-robin (a step streams more arrays at
once than add_, so on some machines it can exceed 100%).

Defaults: CUDA 50 timed steps after 10 warm-up, workloads transformer (24.6M params, 148 tensors), small
(2,000 x 1,024), groups (the transformer in 4 param groups) and large (~1.3B params, scaled to the free memory);
CPU 10 after 2, large skipped. --quick: 5 (CPU) or 20 (CUDA) steps and a d=192 transformer (7.0M params).
Measured on 2 CPU cores: the defaults take ~1.5 min, --quick ~30 s.
"""
from __future__ import annotations

import argparse
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

from benchmarks.common import (ADD_ARRAYS, IMPLS, OPTIMIZERS, RESULTS_DIR, TORCH_IMPLS, OptSpec, default_device,
                               make_optimizer, probe, result_stem, run_metadata, state_arrays, synchronize,
                               traffic_arrays)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    tensors: list[tuple[str, tuple[int, ...]]]  # (role, shape); role picks the param group in "groups"
    grouped: bool = False
    note: str = ""

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


def param_groups(workload: Workload, params, spec: OptSpec):
    if not workload.grouped:
        return params
    groups = []
    for role, (lr_mult, weight_decay) in GROUPS.items():
        members = [p for (r, _), p in zip(workload.tensors, params) if r == role]
        groups.append({"params": members, "lr": spec.kwargs["lr"] * lr_mult, "weight_decay": weight_decay})
    return groups


# ------------------------------------------------------------------------------------------------- timing
def time_round_robin(fns: dict, reps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved one at a time in a rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    raw = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)  # rotate so that no implementation always runs right after the same one
        for name in names[k:] + names[:k]:
            if device.type == "cuda":
                # an empty queue first: the sample covers this step's launches and kernels, nothing queued earlier
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                raw[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fns[name]()
                raw[name].append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {n: [s.elapsed_time(e) / 1e3 for s, e in pairs] for n, pairs in raw.items()}
    return raw


def bench_case(workload, params, dtype_name, device, spec_name, reps, warmup, add_ref):
    """Time every supported implementation of one optimizer on one workload; one record per implementation."""
    spec, dtype = OPTIMIZERS[spec_name], DTYPES[dtype_name]
    why_not = {impl: probe(spec, impl, device, dtype) for impl in IMPLS}  # None where supported
    opts = {impl: make_optimizer(spec, impl, param_groups(workload, params, spec))
            for impl, why in why_not.items() if why is None}
    samples = time_round_robin({**{i: o.step for i, o in opts.items()}, "add_": add_ref}, reps, warmup, device)
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    del opts
    add_gbps = ADD_ARRAYS * dtype.itemsize * workload.numel / statistics.median(samples.pop("add_")) / 1e9
    bytes_per_elem = traffic_arrays(spec) * dtype.itemsize
    fused_median = statistics.median(samples["fusedopt"]) if "fusedopt" in samples else None
    records = []
    for impl, why in why_not.items():
        rec = dict(workload=workload.name, dtype=dtype_name, optimizer=spec_name, impl=impl,
                   numel=workload.numel, n_tensors=len(workload.tensors), bytes_per_elem=bytes_per_elem)
        if why is not None:
            records.append({**rec, "skipped": why})
            continue
        median = statistics.median(samples[impl])
        gbps = bytes_per_elem * workload.numel / median / 1e9
        records.append({**rec, "median_s": median, "samples_s": samples[impl], "gbps": gbps,
                        "pct_of_add": 100 * gbps / add_gbps, "add_gbps": add_gbps, "params_finite": finite,
                        "fusedopt_speedup": fused_median and median / fused_median})
    return records


# ------------------------------------------------------------------------------------------------ reports
def print_table(records, file=sys.stdout):
    header = (f"{'workload':<12} {'dtype':<5} {'optimizer':<16} {'impl':<9} {'median ms':>10} "
              f"{'fusedopt x':>10} {'GB/s':>8} {'% add_':>7}")
    print(header, file=file)
    print("-" * len(header), file=file)
    previous = None
    for r in records:
        key = (r["workload"], r["dtype"], r["optimizer"])
        lead = f"{r['workload']:<12} {r['dtype']:<5} {r['optimizer']:<16}" if key != previous else " " * 35
        if previous and key[:2] != previous[:2]:
            print(file=file)
        previous = key
        if "skipped" in r:
            print(f"{lead} {r['impl']:<9} {'not supported':>10}  ({r['skipped'].split(':')[0]})", file=file)
            continue
        speedup = "" if r["impl"] == "fusedopt" or r["fusedopt_speedup"] is None else f"{r['fusedopt_speedup']:.2f}x"
        flag = "" if r["params_finite"] else "  NON-FINITE PARAMS"
        print(f"{lead} {r['impl']:<9} {1e3 * r['median_s']:>10.3f} {speedup:>10} {r['gbps']:>8.1f} "
              f"{r['pct_of_add']:>6.0f}%{flag}", file=file)
    print("\nfusedopt x = torch implementation's median step time / fusedopt's (above 1: fusedopt is faster).",
          file=file)
    per_elem = dict.fromkeys(f"{r['optimizer']} {r['dtype']} {r['bytes_per_elem']}" for r in records)
    print("GB/s counts the minimum traffic per element (benchmarks/common.py), in bytes: " + ", ".join(per_elem)
          + f"; add_ moves {ADD_ARRAYS} arrays.", file=file)


def plot_speedups(records, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    panels = list(dict.fromkeys((r["workload"], r["dtype"]) for r in records))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels) + 0.6), squeeze=False)
    width = 0.8 / len(TORCH_IMPLS)
    for ax, (wl, dt) in zip(axes[:, 0], panels):
        rows = [r for r in records if (r["workload"], r["dtype"]) == (wl, dt) and r.get("fusedopt_speedup")]
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
        ax.set_title(f"{wl} ({dt})", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(TORCH_IMPLS), fontsize=8)
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--workloads", nargs="+", default=None, choices=["transformer", "small", "groups", "large"],
                    help="default: transformer small groups, plus large on CUDA")
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per implementation (CPU 10, CUDA 50)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (CPU 2, CUDA 10)")
    ap.add_argument("--quick", action="store_true", help="smaller transformer and fewer reps (~1 min on 2 cores)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON record and PNG chart")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    on_gpu = device.type == "cuda"
    reps = args.reps or ((20 if on_gpu else 5) if args.quick else (50 if on_gpu else 10))
    warmup = args.warmup if args.warmup is not None else ((5 if on_gpu else 1) if args.quick else (10 if on_gpu else 2))
    names = args.workloads or (["transformer", "small", "groups"] + (["large"] if on_gpu else []))
    specs = [OPTIMIZERS[o] for o in args.optimizers]

    meta = run_metadata(device)
    print(f"device: {meta['device_name']} ({device}) | torch {meta['torch']} | threads {meta['torch_threads']} | "
          f"fusedopt {meta.get('fusedopt_version')} commit {meta['fusedopt_commit']}")
    if not meta.get("fusedopt_extension_available"):
        print("WARNING: fusedopt's compiled extension is not loaded: 'fusedopt' rows time its fallback path.")
    print(f"reps {reps}, warm-up {warmup}; median of interleaved single-step samples")
    if device.type == "cpu" and (meta["load_average_1m_at_start"] or 0) > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {meta['load_average_1m_at_start']:.1f} on {os.cpu_count()} cores: other "
              "processes are competing for the CPU and will distort these timings.")

    plan, skipped = [], []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        workloads, messages = build_workloads(names, device, args.quick, specs, dtype.itemsize)
        skipped += [f"{dtype_name}: {m}" for m in messages]
        plan += [(wl, dtype_name) for wl in workloads]
    for message in dict.fromkeys(skipped):
        print("note:", message)

    records = []
    bar = tqdm(total=len(plan) * len(specs), desc="bench_step", unit="case", dynamic_ncols=True)
    for wl, dtype_name in plan:
        dtype = DTYPES[dtype_name]
        params = make_params(wl, device, dtype)
        a = torch.randn(wl.numel, device=device, dtype=dtype)
        b = torch.randn(wl.numel, device=device, dtype=dtype).mul_(1e-6)  # tiny: a stays finite over many adds
        for name in args.optimizers:
            bar.set_postfix_str(f"{wl.name} {dtype_name} {name}")
            records += bench_case(wl, params, dtype_name, device, name, reps, warmup, functools.partial(a.add_, b))
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()  # each case's optimizer state is dropped before the next allocates
            bar.update()
        del params, a, b
    bar.close()

    meta["load_average_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
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
    print(f"\nwrote {json_path}\nwrote {png_path}")
    return records


if __name__ == "__main__":
    main()
