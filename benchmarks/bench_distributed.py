"""Step time on FSDP2-sharded params: fusedopt vs torch.optim (for-loop, foreach, fused) on the same DTensors.

    python -m benchmarks.bench_distributed [--world 2] [--optimizers adamw sgd_momentum] [--quick]

Spawns `--world` ranks (gloo on the CPU, NCCL with one GPU per rank when that many are present, on 127.0.0.1).
Every rank holds the bench_step "transformer" parameter set sharded as FSDP2 shards it (``Shard(0)`` DTensors on
a 1-D mesh, uneven rows included) with DTensor grads set once, and times ``step()`` of each implementation,
interleaved in balanced rounds (common.round_orders), with a barrier (not timed) before each sample so the
ranks step together.
Two variants per optimizer: the plain step, and the step with global-norm clipping (fusedopt: ``max_grad_norm``
inside the step, one all-reduce of two numbers; torch: ``clip_grad_norm_`` on the DTensor grads, then the step).
Rank 0 prints the median per implementation and fusedopt's speed-up over each (measured in the same run), and
writes a JSON record under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.bench_step import transformer_tensors
from benchmarks.common import (IMPLS, OPTIMIZERS, RESULTS_DIR, make_optimizer, result_stem, round_orders,
                               run_metadata)

MAX_GRAD_NORM = 1.0


def sharded_params(tensors, mesh, device, seed):
    """The transformer set as FSDP2 leaves it: nn.Parameter DTensors sharded on dim 0, with sharded grads."""
    from torch.distributed.tensor import Shard, distribute_tensor

    generator = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in tensors:
        full = torch.randn(shape, generator=generator).mul_(0.02).to(device)
        param = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        param.grad = distribute_tensor(torch.randn(shape, generator=generator).mul_(1e-3).to(device), mesh,
                                       [Shard(0)])
        params.append(param)
    return params


def step_fn(opt, params, clip):
    if clip and not hasattr(opt, "max_grad_norm"):
        def run():
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
        return run
    return opt.step


def build_cases(spec_name, tensors, mesh, device, clip):
    """{impl: step function} for every implementation that can step these DTensors (others are reported)."""
    spec = OPTIMIZERS[spec_name]
    fns, skipped = {}, {}
    for impl in IMPLS:
        params = sharded_params(tensors, mesh, device, seed=0)
        extra = {"max_grad_norm": MAX_GRAD_NORM} if clip and impl == "fusedopt" else {}
        try:
            opt = make_optimizer(spec, impl, params, **extra)
            fn = step_fn(opt, params, clip)
            fn()  # creates the state; raises here when the implementation cannot step DTensors
        except Exception as exc:  # noqa: BLE001 - any failure means "not supported here"
            skipped[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            continue
        fns[impl] = fn
    return fns, skipped


def time_steps(fns, reps, warmup, device):
    names = list(fns)
    for order in round_orders(names, warmup, seed=1):  # seeded: every rank runs the same order
        for name in order:
            fns[name]()
    samples = {name: [] for name in names}
    for order in round_orders(names, reps):  # the timed rounds start a cycle of the design
        for name in order:
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def rank_main(rank, world, port, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world and not args.cpu
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    d = 192 if args.quick else 384
    tensors = transformer_tensors(layers=12, d=d, vocab=8192, ctx=512)
    numel = sum(torch.Size(shape).numel() for _, shape in tensors)
    records = []
    for spec_name in args.optimizers:
        for clip in (False, True):
            fns, skipped = build_cases(spec_name, tensors, mesh, device, clip)
            samples = time_steps(fns, args.reps, args.warmup, device)
            medians = {impl: statistics.median(s) * 1e3 for impl, s in samples.items()}
            everywhere = [None] * world
            dist.all_gather_object(everywhere, medians)  # the slowest rank sets the pace of a step
            slowest = {impl: max(m[impl] for m in everywhere) for impl in medians}
            records.append({"optimizer": spec_name, "clip": clip, "ms": slowest, "skipped": skipped,
                            "speedup": {impl: slowest[impl] / slowest["fusedopt"]
                                        for impl in slowest if impl != "fusedopt" and "fusedopt" in slowest}})
            for impl in list(fns):
                del fns[impl]
    if rank == 0:
        meta = run_metadata(device)
        meta.update(world=world, backend=dist.get_backend(), workload=f"transformer d={d}, 12 layers, "
                    f"{len(tensors)} tensors, {numel / 1e6:.1f}M params, Shard(0) over {world} ranks",
                    reps=args.reps, warmup=args.warmup)
        with open(out_path, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def print_table(result):
    meta = result["meta"]
    print(f"{meta['workload']}; {meta['backend']}, {meta['device_name']}, torch {meta['torch']}")
    impls = [i for i in IMPLS if i != "fusedopt"]
    print(f"{'optimizer':<22}{'fusedopt ms':>12}" + "".join(f"{'x ' + i:>12}" for i in impls))
    for r in result["records"]:
        name = r["optimizer"] + (" +clip" if r["clip"] else "")
        cells = "".join(f"{r['speedup'][i]:>12.2f}" if i in r["speedup"] else f"{'-':>12}" for i in impls)
        print(f"{name:<22}{r['ms'].get('fusedopt', float('nan')):>12.2f}{cells}")
        for impl, why in r["skipped"].items():
            print(f"    {impl}: not run ({why})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "sgd_momentum"], choices=list(OPTIMIZERS))
    ap.add_argument("--reps", type=int, default=None, help="timed steps (default: 10 CPU, 50 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 CPU, 10 CUDA)")
    ap.add_argument("--quick", action="store_true", help="a d=192 transformer (7.0M params) and 5 timed steps")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU even when GPUs are present")
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() >= args.world and not args.cpu
    args.reps = args.reps or (5 if args.quick else 50 if on_gpu else 10)
    args.warmup = args.warmup or (2 if not on_gpu else 10)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS_DIR / (result_stem("bench_distributed", torch.device("cuda" if on_gpu else "cpu")) + ".json")
    torch.multiprocessing.spawn(rank_main, args=(args.world, port, args, str(out_path)), nprocs=args.world)
    with open(out_path) as f:
        print_table(json.load(f))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    sys.exit(main())
