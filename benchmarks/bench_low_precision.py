"""Low-precision training (issue 11): measured memory per param, and step time per rounding mode.

    python -m benchmarks.bench_low_precision                      # both parts, CPU (and CUDA when present)
    python -m benchmarks.bench_low_precision --parts memory       # the memory table only (a few seconds)
    python -m benchmarks.bench_low_precision --parts step --reps 100 --optimizers adamw

memory: a model-sized set of tensors (5 tensors, 4.2M params: a 1024 x 1024 embedding, a 3072 x 1024 qkv
weight and three vectors) gets random grads and takes --memory-steps optimizer steps; then the bytes of every
unique storage among the params and the optimizer state (found through `optimizer.state`, deduplicated by
storage address: views of one buffer count once) are summed and divided by the number of params. Measured, not
computed: the "expected" column is the byte model below, and a row whose measurement differs from it by more
than 0.01 B/param is flagged. On CUDA a second measurement, the caching allocator's growth from before the
optimizer was built to after its steps (torch.cuda.memory_allocated), also counts buffers the optimizer holds
outside `optimizer.state`. Rows: torch's fused AdamW on fp32 and on bf16 params, FusedAdamW with every mode
and state_dtype, and the peers where they import here: torchao's `_AdamW(bf16_stochastic_round=True)` and
optimi's `AdamW(kahan_sum=True)` ("not installed" otherwise).

step: FusedAdamW and FusedSGD(momentum=0.9) over --tensors tensors of 2**--numel-log2 bf16 (--step-dtype fp16:
fp16, whose bytes are the same) elements (10 x 2**20
by default), one optimizer per mode (nearest, stochastic, kahan, master_weights, master_weights + stochastic,
state_dtype=float32), each on its own copy of the same params and sharing the same grads (set once), with torch's
fused and foreach implementations of the same algorithm on bf16 params as peers, the other libraries' modes
where they import here (torchao's `_AdamW(bf16_stochastic_round=True)` beside fusedopt stochastic, bf16 only;
optimi's `AdamW` and `SGD` with `kahan_sum=True` beside fusedopt kahan; `pip install -e ".[peers]"`), and
an in-place bf16 `a.add_(b)` over the same number of elements as the bandwidth reference, all timed round-robin
(one step each per round, in balanced orders, after warm-up; medians; the method of bench_step). GB/s counts each mode's
minimum traffic (the byte model below) over its median step time, and "% add_" gives it as a share of add_'s
GB/s. The claim checked: a mode costs at most the extra bytes it moves, i.e. its time / nearest's time <= its
bytes / nearest's bytes, within --tolerance (stochastic moves no extra byte, so its time must match nearest's);
a peer's row gives fusedopt's speed-up over it in the same mode.

Byte model (bytes per element of one step; bf16 params and grads; p = param, g = grad):

    mode                   what one step reads and writes                    AdamW (7 arrays)   SGD momentum (5)
    nearest (torch's)      p r/w 2+2, g r 2, state r/w 2+2 per buffer          14                 10
    stochastic             the same arrays (the random bits are computed)      14                 10
    kahan                  + compensation r/w (bf16) 2+2                       18                 14
    master_weights         p written only 2 (the rule reads the fp32 master),
                           + master r/w 4+4                                    20                 16
    master + stochastic    as master_weights                                   20                 16
    state_dtype=float32    state r/w 4+4 per buffer instead of 2+2             22                 14
    add_ (reference)       a r/w 2+2, b r 2                                    6

Memory model (bytes per param, params + state): fp32 params with fp32 AdamW moments 4 + 8 = 12; bf16 params
with bf16 moments 2 + 4 = 6; kahan + 2; master_weights + 4; fp32 params with bf16 moments 4 + 4 = 8; bf16 params
with fp32 moments 2 + 8 = 10; the `step` scalars add 4 bytes per tensor (about 0.000005 B/param here).

Outputs, named by result_stem (benchmarks/common.py): benchmarks/results/bench_low_precision_<device>_<date>.json
(metadata, every sample), .txt (the tables as printed) and .png (memory bars; step time per mode against its
byte budget), one set per device.

Duration, measured on the 2-core AMD EPYC (torch 2.14): the default run (memory, then step with 50 reps) 18 s
at load average 0.6-0.9; --parts step --reps 100 17 s. When other jobs took the cores during the run it took 56-90 s
and the timings were useless (torch's OpenMP rows 10-40x slower): run it on a quiet machine. Every run prints its
own duration and the load average at its start and end.
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
from benchmarks.bench_step import time_round_robin
from benchmarks.common import (OPTIMIZERS, RESULTS_DIR, default_device, load_warning, make_optimizer, probe,
                               result_stem, run_metadata, traffic_arrays)

ADD_BYTES_PER_ELEM = 6  # bf16 a.add_(b): a read and written, b read

# ------------------------------------------------------------------------------------------------ the modes
# label -> fusedopt's constructor options (fusedopt/_low_precision.py)
MODES: dict[str, dict] = {
    "nearest": {},
    "stochastic": dict(param_rounding="stochastic"),
    "kahan": dict(param_rounding="kahan"),
    "master": dict(master_weights=True),
    "master+stochastic": dict(master_weights=True, param_rounding="stochastic"),
    "state fp32": dict(state_dtype=torch.float32),
}
STEP_OPTIMIZERS = ["adamw", "sgd_momentum"]  # benchmarks.common.OPTIMIZERS keys
PEER_IMPLS = ["fused", "foreach"]  # torch's implementations timed next to fusedopt's modes (bf16 params)


def step_bytes_per_elem(spec, mode: str | None, param_itemsize: int = 2) -> int:
    """Minimum bytes one step moves per element for bf16 params (the byte model in the docstring). mode None:
    a torch implementation, which keeps its state in the param dtype (nearest's traffic)."""
    options = MODES[mode] if mode else {}
    state_buffers = (traffic_arrays(spec) - 3) // 2  # read + written once each
    state_itemsize = options["state_dtype"].itemsize if options.get("state_dtype") else param_itemsize
    param_bytes = 2 * param_itemsize  # read and written
    extra = 0
    if options.get("master_weights"):
        param_bytes = param_itemsize  # written only: the update is computed on the fp32 master copy
        extra = 2 * 4  # master read and written
    elif options.get("param_rounding") == "kahan":
        extra = 2 * param_itemsize  # compensation read and written
    return param_bytes + param_itemsize + 2 * state_buffers * state_itemsize + extra


# -------------------------------------------------------------------------------------------- memory part
# 5 tensors, 4,199,424 params: an embedding, a fused qkv weight, a LayerNorm's weight and bias, the qkv bias
MEMORY_SHAPES = [(1024, 1024), (3072, 1024), (1024,), (1024,), (3072,)]


@dataclass
class MemoryRow:
    label: str
    param_dtype: torch.dtype
    build: object  # params -> optimizer; may raise ImportError ("not installed")
    expected: float  # bytes per param from the memory model
    note: str = ""


def _fused(name, **options):
    def build(params):
        import fusedopt
        return getattr(fusedopt, name)(params, lr=1e-3, **options)
    return build


def _torch_adamw(params):
    """torch's fused AdamW where it steps these params, else its foreach implementation."""
    impl = "fused" if probe(OPTIMIZERS["adamw"], "fused", params[0].device, params[0].dtype) is None else "foreach"
    return make_optimizer(OPTIMIZERS["adamw"], impl, params)


def _torchao_adamw(params, **kwargs):
    from torchao.optim import _AdamW  # ImportError -> "not installed"
    return _AdamW(params, **{"lr": 1e-3, **kwargs}, bf16_stochastic_round=True)


def _optimi_kahan_adamw(params, **kwargs):
    import optimi  # ImportError -> "not installed"
    return optimi.AdamW(params, **{"lr": 1e-3, **kwargs}, kahan_sum=True)


def _optimi_kahan_sgd(params, **kwargs):
    import optimi  # ImportError -> "not installed"
    return optimi.SGD(params, **kwargs, kahan_sum=True)


BF16, FP32 = torch.bfloat16, torch.float32
MEMORY_ROWS = [
    MemoryRow("torch AdamW fused, fp32 params", FP32, _torch_adamw, 12, "the baseline"),
    MemoryRow("torch AdamW fused, bf16 params", BF16, _torch_adamw, 6, "round to nearest: loses small updates"),
    MemoryRow("FusedAdamW fp32", FP32, _fused("FusedAdamW"), 12),
    MemoryRow("FusedAdamW bf16 nearest", BF16, _fused("FusedAdamW"), 6),
    MemoryRow("FusedAdamW bf16 stochastic", BF16, _fused("FusedAdamW", param_rounding="stochastic", seed=0), 6),
    MemoryRow("FusedAdamW bf16 kahan", BF16, _fused("FusedAdamW", param_rounding="kahan"), 8, "+ kahan_comp bf16"),
    MemoryRow("FusedAdamW bf16 master_weights", BF16, _fused("FusedAdamW", master_weights=True), 10,
              "+ master_param fp32"),
    MemoryRow("FusedAdamW bf16 master + state fp32", BF16,
              _fused("FusedAdamW", master_weights=True, state_dtype=FP32), 14, "apex-style mixed precision"),
    MemoryRow("FusedAdamW fp32, state_dtype bf16", FP32, _fused("FusedAdamW", state_dtype=BF16), 8,
              "bf16 moments"),
    MemoryRow("FusedAdamW bf16, state_dtype fp32", BF16, _fused("FusedAdamW", state_dtype=FP32), 10,
              "fp32 moments"),
    MemoryRow("torchao _AdamW bf16_stochastic_round", BF16, _torchao_adamw, 6, "peer"),
    MemoryRow("optimi AdamW kahan_sum", BF16, _optimi_kahan_adamw, 8, "peer"),
]
MEMORY_FLAG = 0.01  # B/param between measured and expected before a row is flagged


def tensors_in(obj):
    """Every tensor in a (nested) state entry."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


def storage_bytes(tensors, seen: dict | None = None) -> int:
    """Bytes of the unique storages behind `tensors` not already in `seen` (which it updates): views of one
    buffer, or a state tensor sharing a param's storage, count once."""
    seen = {} if seen is None else seen
    added = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen[key] = storage.nbytes()
            added += storage.nbytes()
    return added


def measure_memory(row: MemoryRow, device, steps: int, seed: int) -> dict:
    """One row of the memory table: bytes per param of params and of optimizer state after `steps` steps."""
    rec = dict(label=row.label, param_dtype=str(row.param_dtype).replace("torch.", ""), expected=row.expected,
               note=row.note)
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, device=device, dtype=row.param_dtype, generator=gen).mul_(0.02).requires_grad_()
              for s in MEMORY_SHAPES]
    numel = sum(p.numel() for p in params)
    try:
        gc.collect()
        common.synchronize(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        optimizer = row.build(params)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, device=device, dtype=p.dtype, generator=gen).mul_(1e-3)
            optimizer.step()
    except ImportError as exc:
        return {**rec, "skipped": f"not installed ({type(exc).__name__}: {exc})"}
    except Exception as exc:  # noqa: BLE001 - a peer that cannot step here: the row says why
        return {**rec, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    if row.build is _torch_adamw and not optimizer.defaults.get("fused"):
        rec["label"] = row.label.replace("fused", "foreach")  # torch's fused AdamW cannot step these here
    for p in params:
        p.grad = None  # grads are not the optimizer's memory
    gc.collect()
    common.synchronize(device)
    seen: dict = {}
    param_bytes = storage_bytes(params, seen)
    state_tensors = list(tensors_in(list(optimizer.state.values())))
    state_bytes = storage_bytes(state_tensors, seen)
    rec.update(numel=numel, n_tensors=len(params), steps=steps, param_bytes=param_bytes, state_bytes=state_bytes,
               params_per_param=param_bytes / numel, state_per_param=state_bytes / numel,
               measured=(param_bytes + state_bytes) / numel,
               state_keys=sorted({f"{k}:{str(v.dtype).replace('torch.', '')}" if torch.is_tensor(v) else k
                                  for s in optimizer.state.values() for k, v in s.items()}),
               params_finite=all(bool(torch.isfinite(p).all()) for p in params))
    if device.type == "cuda":
        # what the optimizer added to the allocator, also outside optimizer.state (the params were there before)
        rec["allocator_growth_per_param"] = (torch.cuda.memory_allocated(device) - before) / numel
        rec["allocator_per_param"] = rec["params_per_param"] + rec["allocator_growth_per_param"]
    rec["flagged"] = abs(rec["measured"] - row.expected) > MEMORY_FLAG
    del optimizer, params
    gc.collect()
    return rec


def memory_table(records, device) -> str:
    cuda = device.type == "cuda"
    head = (f"{'optimizer and mode':<38} {'params':>6} {'state':>6} {'total':>7} {'expected':>8} {'vs fp32':>7}"
            + (f" {'allocator':>9}" if cuda else "") + "  state keys")
    lines = [f"Memory: bytes per param of params + optimizer state, measured after the steps "
             f"({len(MEMORY_SHAPES)} tensors, {sum(math.prod(s) for s in MEMORY_SHAPES):,} params, {device})",
             head, "-" * len(head)]
    baseline = next((r["measured"] for r in records if "measured" in r), None)
    for r in records:
        if "skipped" in r:
            lines.append(f"{r['label']:<38} {'–':>6} {'–':>6} {'–':>7} {r['expected']:>8.0f}  {r['skipped']}")
            continue
        flag = "  DIFFERS FROM THE MODEL" if r["flagged"] else ""
        flag += "" if r["params_finite"] else "  NON-FINITE PARAMS"
        alloc = f" {r['allocator_per_param']:>9.3f}" if cuda else ""
        lines.append(f"{r['label']:<38} {r['params_per_param']:>6.3f} {r['state_per_param']:>6.3f} "
                     f"{r['measured']:>7.3f} {r['expected']:>8.0f} {100 * r['measured'] / baseline:>6.0f}%{alloc}"
                     f"  {', '.join(r['state_keys'])}{flag}")
    lines.append("params / state / total: bytes per param, summed over unique storages (dedup by address); "
                 "expected: the memory model (docstring); vs fp32: total / torch fused AdamW fp32's.")
    if cuda:
        lines.append("allocator: params + torch.cuda.memory_allocated growth from before the optimizer's "
                     "construction to after its steps (counts buffers outside optimizer.state too).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- step part
@dataclass
class StepCase:
    optimizer: str  # OPTIMIZERS key
    label: str  # "fusedopt <mode>" or "torch <impl>"
    impl: str
    mode: str | None  # MODES key for fusedopt, None for torch
    bytes_per_elem: int
    skipped: str | None = None
    peer: LowPrecisionPeer | None = None  # impl "peer": the other library's optimizer it builds


# --step-dtype: the low-precision param dtypes the step part times (both 2 bytes, so one byte model serves them).
STEP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LowPrecisionPeer:
    """Another library's optimizer with one of fusedopt's modes, timed beside that mode (same bytes moved)."""
    label: str
    build: object  # (params, **the spec's kwargs) -> optimizer; may raise ImportError ("not installed")
    mode: str  # the MODES key it does the same work as
    param_dtypes: tuple = (torch.bfloat16, torch.float16)  # where it does that work (elsewhere a skipped row)


# The peers issue 11 names, per STEP_OPTIMIZERS key: torchao rounds stochastically (bf16 only: fp16 params it
# rounds to nearest), optimi sums with Kahan compensation. Each gets the spec's hyperparameters, as torch's rows do.
LOW_PRECISION_PEERS = {
    "adamw": [LowPrecisionPeer("torchao _AdamW stochastic", _torchao_adamw, "stochastic", (torch.bfloat16,)),
              LowPrecisionPeer("optimi AdamW kahan", _optimi_kahan_adamw, "kahan")],
    "sgd_momentum": [LowPrecisionPeer("optimi SGD kahan", _optimi_kahan_sgd, "kahan")],
}


def step_cases(name: str, device, dtype) -> list[StepCase]:
    spec = OPTIMIZERS[name]
    cases = [StepCase(name, f"fusedopt {mode}", "fusedopt", mode, step_bytes_per_elem(spec, mode)) for mode in MODES]
    for impl in PEER_IMPLS:
        cases.append(StepCase(name, f"torch {impl}", impl, None, step_bytes_per_elem(spec, None),
                              skipped=probe(spec, impl, device, dtype)))
    for peer in LOW_PRECISION_PEERS.get(name, []):
        cases.append(StepCase(name, peer.label, "peer", peer.mode, step_bytes_per_elem(spec, peer.mode), peer=peer,
                              skipped=None if dtype in peer.param_dtypes else f"not its {peer.mode} mode on {dtype}"))
    return cases


def build_case(case: StepCase, spec, params, seed: int):
    """The optimizer a step case times: fusedopt with its mode's options, torch's implementation, or a peer."""
    if case.peer is not None:
        return case.peer.build(params, **spec.kwargs)
    options = dict(MODES[case.mode]) if case.mode else {}
    if options.get("param_rounding") == "stochastic":
        options["seed"] = seed
    return make_optimizer(spec, case.impl, params, **options)


def bench_optimizer(name: str, device, n_tensors: int, numel: int, reps: int, warmup: int, seed: int,
                    dtype_name: str = "bf16"):
    """Time every mode of one optimizer and its torch peers on `dtype_name` params (STEP_DTYPES), round-robin
    with the add_ reference."""
    spec = OPTIMIZERS[name]
    dtype = STEP_DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(seed)
    base = [torch.randn(numel, device=device, dtype=dtype, generator=gen).mul_(0.02) for _ in range(n_tensors)]
    grads = [torch.randn(numel, device=device, dtype=dtype, generator=gen).mul_(1e-3) for _ in range(n_tensors)]
    cases = step_cases(name, device, dtype)
    fns, params_of = {}, {}
    for case in cases:
        if case.skipped:
            continue
        params = [b.clone().requires_grad_() for b in base]  # its own params: a master copy owns its param
        for p, g in zip(params, grads):
            p.grad = g  # shared and never written: every optimizer reads the same grads
        try:
            opt = build_case(case, spec, params, seed)
        except ImportError as exc:
            case.skipped = f"not installed ({exc})"
            continue
        except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal
            case.skipped = f"{type(exc).__name__}: {exc}"
            continue
        fns[case.label], params_of[case.label] = opt.step, params
    total = n_tensors * numel
    a = torch.randn(total, device=device, dtype=dtype, generator=gen)
    b = torch.randn(total, device=device, dtype=dtype, generator=gen).mul_(1e-6)
    try:
        samples = time_round_robin({**fns, "add_": functools.partial(a.add_, b)}, reps, warmup, device)
    except Exception as exc:  # noqa: BLE001 - one mode failing must not hide the others: time them one by one
        samples = {}
        for label, fn in {**fns, "add_": functools.partial(a.add_, b)}.items():
            try:
                samples[label] = time_round_robin({label: fn}, reps, warmup, device)[label]
            except Exception as exc2:  # noqa: BLE001
                next(c for c in cases if c.label == label).skipped = f"step failed: {type(exc2).__name__}: {exc2}"
        print(f"note: round-robin timing of {name} failed ({type(exc).__name__}: {exc}); timed one by one",
              file=sys.stderr)
    add_s = statistics.median(samples.pop("add_"))
    add_gbps = ADD_BYTES_PER_ELEM * total / add_s / 1e9
    records = []
    nearest = samples.get("fusedopt nearest")
    nearest_median = statistics.median(nearest) if nearest else None
    nearest_bytes = step_bytes_per_elem(spec, "nearest")
    for case in cases:
        rec = dict(optimizer=name, label=case.label, impl=case.impl, mode=case.mode, dtype=dtype_name, numel=total,
                   n_tensors=n_tensors, bytes_per_elem=case.bytes_per_elem, add_median_s=add_s, add_gbps=add_gbps)
        if case.skipped or case.label not in samples:
            records.append({**rec, "skipped": case.skipped or "not timed"})
            continue
        s = samples[case.label]
        median = statistics.median(s)
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [median, median, median]
        gbps = case.bytes_per_elem * total / median / 1e9
        rec.update(median_s=median, samples_s=s, spread=(q[2] - q[0]) / median, gbps=gbps,
                   pct_of_add=100 * gbps / add_gbps,
                   params_finite=all(bool(torch.isfinite(p).all()) for p in params_of[case.label]),
                   param_dtype=str(params_of[case.label][0].dtype))
        if nearest_median is not None:
            rec["time_vs_nearest"] = median / nearest_median
            rec["bytes_vs_nearest"] = case.bytes_per_elem / nearest_bytes
        same_mode = samples.get(f"fusedopt {case.mode}")
        if case.impl == "peer" and same_mode:
            rec["fusedopt_speedup"] = median / statistics.median(same_mode)  # > 1: fusedopt's mode is faster
        records.append(rec)
    return records


def judge(records, tolerance: float) -> None:
    """Adds 'verdict' to fusedopt's non-nearest modes: is time / nearest's <= bytes / nearest's (+ tolerance)?"""
    for r in records:
        if r.get("impl") == "fusedopt" and r.get("mode") != "nearest" and "time_vs_nearest" in r:
            budget = r["bytes_vs_nearest"] * (1 + tolerance)
            r["time_budget_vs_nearest"] = budget
            r["verdict"] = "ok" if r["time_vs_nearest"] <= budget else "OVER"


def step_table(records, device, meta, reps, warmup, tolerance) -> str:
    first = next(r for r in records)
    dtype = first["dtype"]
    head = (f"{'optimizer':<13} {'implementation / mode':<28} {'B/elem':>6} {'median ms':>9} {'IQR':>5} "
            f"{'GB/s':>6} {'% add_':>6} {'time/nearest':>12} {'bytes/nearest':>13}  claim")
    lines = [f"Step time, {dtype} params: {first['n_tensors']} tensors x {first['numel'] // first['n_tensors']:,} "
             f"elements on {meta['device_name']} ({device}; CPU ISA {meta['cpu_isa']}, {meta['cpu_cores']} cores, "
             f"torch threads {meta['torch_threads']}); median of {reps} round-robin steps after {warmup} warm-up",
             head, "-" * len(head)]
    previous = None
    for r in records:
        lead = f"{r['optimizer']:<13}" if r["optimizer"] != previous else " " * 13
        if previous and r["optimizer"] != previous:
            lines.append(f"{'':<13} {f'add_ ({dtype}, reference)':<28} {ADD_BYTES_PER_ELEM:>6} "
                         f"{1e3 * prev_add:>9.3f} {'':>5} {prev_add_gbps:>6.1f} {'100%':>6}")
            lines.append("")
        previous, prev_add, prev_add_gbps = r["optimizer"], r["add_median_s"], r["add_gbps"]
        if "skipped" in r:
            lines.append(f"{lead} {r['label']:<28} {r['bytes_per_elem']:>6} {'–':>9}  {r['skipped'][:90]}")
            continue
        ratio = (f"{r['time_vs_nearest']:>12.2f} {r['bytes_vs_nearest']:>13.2f}" if "time_vs_nearest" in r
                 else f"{'':>12} {'':>13}")
        verdict = r.get("verdict", "")
        if verdict == "OVER":
            verdict = f"OVER (budget {r['time_budget_vs_nearest']:.2f})"
        if "fusedopt_speedup" in r:
            verdict = f"fusedopt {r['mode']} {r['fusedopt_speedup']:.2f}x faster"
        flag = "" if r["params_finite"] else "  NON-FINITE PARAMS"
        lines.append(f"{lead} {r['label']:<28} {r['bytes_per_elem']:>6} {1e3 * r['median_s']:>9.3f} "
                     f"{100 * r['spread']:>4.0f}% {r['gbps']:>6.1f} {r['pct_of_add']:>5.0f}% {ratio}  {verdict}{flag}")
    lines.append(f"{'':<13} {f'add_ ({dtype}, reference)':<28} {ADD_BYTES_PER_ELEM:>6} {1e3 * prev_add:>9.3f} "
                 f"{'':>5} {prev_add_gbps:>6.1f} {'100%':>6}")
    lines.append(f"B/elem: minimum bytes one step moves per element (byte model in the docstring); IQR: interquartile "
                 f"range / median; claim: time/nearest <= bytes/nearest x {1 + tolerance:.2f} (ok) or not (OVER).")
    lines.append(f"torch rows: torch.optim on the same {dtype} params (state in {dtype}, nearest's bytes); "
                 "– = no such implementation here. Peer rows (torchao, optimi): the same work as the fusedopt mode "
                 "named in their claim, which gives fusedopt's speed-up over them.")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- plots
def plot(memory, steps, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = list(dict.fromkeys(r["optimizer"] for r in steps))
    panels = (1 if memory else 0) + len(opts)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 5.2), squeeze=False)
    axes = list(axes[0])
    if memory:
        ax = axes.pop(0)
        rows = [r for r in memory if "measured" in r]
        ys = range(len(rows))
        ax.barh(ys, [r["params_per_param"] for r in rows], color="C0", label="params")
        ax.barh(ys, [r["state_per_param"] for r in rows], left=[r["params_per_param"] for r in rows], color="C1",
                label="optimizer state")
        for y, r in zip(ys, rows):
            ax.text(r["measured"] + 0.1, y, f"{r['measured']:.2f}", va="center", fontsize=7)
        ax.set_yticks(list(ys), [r["label"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("bytes per param (measured)")
        ax.set_xlim(0, max(r["measured"] for r in rows) * 1.15)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("memory: params + AdamW state", fontsize=9)
    for ax, name in zip(axes, opts):
        rows = [r for r in steps if r["optimizer"] == name and "median_s" in r]
        ys = range(len(rows))
        ax.barh(ys, [1e3 * r["median_s"] for r in rows],
                color=[{"fusedopt": "C2", "peer": "C3"}.get(r["impl"], "C7") for r in rows])
        nearest = next((r for r in rows if r["label"] == "fusedopt nearest"), None)
        for y, r in zip(ys, rows):
            ax.text(1e3 * r["median_s"], y, f" {r['pct_of_add']:.0f}% of add_", va="center", fontsize=7)
            if nearest and r["impl"] == "fusedopt":  # the byte budget: nearest's time scaled by the bytes moved
                budget = 1e3 * nearest["median_s"] * r["bytes_vs_nearest"]
                ax.plot([budget, budget], [y - 0.4, y + 0.4], color="black", linewidth=1.5)
        ax.set_yticks(list(ys), [r["label"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("median step time (ms); black mark: nearest's x bytes / nearest's", fontsize=8)
        ax.set_xlim(0, max(1e3 * r["median_s"] for r in rows) * 1.35)
        ax.set_title(f"{name}, {steps[0]['dtype']} params: step time and byte budget", fontsize=9)
    common.save_figure(fig, title, path)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = common.argument_parser(__doc__)
    ap.add_argument("--parts", nargs="+", default=["memory", "step"], choices=["memory", "step"], metavar="PART",
                    help="what to run, any of: %(choices)s (default: both)")
    ap.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                    help="torch devices, one result set each (default: cpu, plus cuda when available)")
    ap.add_argument("--optimizers", nargs="+", default=STEP_OPTIMIZERS, choices=STEP_OPTIMIZERS, metavar="NAME",
                    help="step: optimizers timed, any of: %(choices)s (default: all)")
    ap.add_argument("--step-dtype", default="bf16", choices=list(STEP_DTYPES),
                    help="step: the params' dtype, one of: %(choices)s (default: %(default)s)")
    ap.add_argument("--tensors", type=int, default=10, help="step: number of param tensors (default: %(default)s)")
    ap.add_argument("--numel-log2", type=int, default=20,
                    help="step: log2 of the elements per tensor (default: %(default)s, i.e. 1,048,576)")
    ap.add_argument("--reps", type=int, default=None,
                    help="step: timed steps per implementation/mode (default: CPU 50, CUDA 200)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="step: untimed steps of each first (default: CPU 3, CUDA 20)")
    ap.add_argument("--tolerance", type=float, default=0.10,
                    help="step: how far a mode's time / nearest's may exceed its bytes / nearest's before it is "
                         "reported OVER (default: %(default)s = 10%%)")
    ap.add_argument("--memory-steps", type=int, default=3,
                    help="memory: optimizer steps before measuring (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the params, grads and stochastic rounding (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help="folder for the JSON, TXT and PNG (default: benchmarks/results)")
    return ap.parse_args(argv)


def run_device(device, args) -> dict:
    started = time.perf_counter()
    on_gpu = device.type == "cuda"
    reps = args.reps or (200 if on_gpu else 50)
    warmup = args.warmup if args.warmup is not None else (20 if on_gpu else 3)
    meta = run_metadata(device)
    print(f"device: {meta['device_name']} ({device}; CPU {meta['cpu_model']}, ISA {meta['cpu_isa']}, torch CPU "
          f"capability {meta['torch_cpu_capability']}, {meta['cpu_cores']} cores) | torch {meta['torch']} | "
          f"threads {meta['torch_threads']} | fusedopt {meta.get('fusedopt_version')} commit "
          f"{meta['fusedopt_commit']} | load average {meta['load_average_1m_at_start']:.2f}")
    if not meta.get("fusedopt_extension_available"):
        print("WARNING: fusedopt's compiled extension is not loaded: the low-precision options need it.")
    if load_warning(meta, device):
        print(load_warning(meta, device))

    todo = (len(MEMORY_ROWS) if "memory" in args.parts else 0) + (len(args.optimizers) if "step" in args.parts else 0)
    bar = tqdm(total=todo, desc=f"bench_low_precision {device}", unit="case", dynamic_ncols=True)
    memory, steps = [], []
    if "memory" in args.parts:
        for row in MEMORY_ROWS:
            bar.set_postfix_str(f"memory: {row.label}")
            memory.append(measure_memory(row, device, args.memory_steps, args.seed))
            bar.update()
    if "step" in args.parts:
        for name in args.optimizers:
            bar.set_postfix_str(f"step: {name}")
            steps += bench_optimizer(name, device, args.tensors, 1 << args.numel_log2, reps, warmup, args.seed,
                                     args.step_dtype)
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            bar.update()
    bar.close()
    judge(steps, args.tolerance)

    meta["load_average_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta["duration_s"] = time.perf_counter() - started
    text = []
    if memory:
        text.append(memory_table(memory, device))
    if steps:
        text.append(step_table(steps, device, meta, reps, warmup, args.tolerance))
    text.append(f"load average (1 min) {meta['load_average_1m_at_start']:.2f} at start, "
                f"{meta['load_average_1m_at_end']:.2f} at end; took {meta['duration_s']:.0f} s")
    text = "\n\n".join(text)
    print("\n" + text)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / result_stem("bench_low_precision", device)
    record = {"meta": meta, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "reps": reps, "warmup": warmup, "modes": {k: {o: str(v) for o, v in m.items()} for k, m in MODES.items()},
              "memory_shapes": MEMORY_SHAPES, "memory": memory, "step": steps}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    stem.with_suffix(".txt").write_text(text + "\n")
    plot(memory, steps, stem.with_suffix(".png"),
         f"fusedopt low precision on {meta['device_name']} ({device}, {meta['cpu_isa']}; {meta['date'][:10]})")
    print(f"\nwrote {stem.with_suffix('.json')}\nwrote {stem.with_suffix('.txt')}\nwrote {stem.with_suffix('.png')}")
    return record


def main(argv=None):
    args = parse_args(argv)
    devices = [torch.device(d) for d in args.devices] if args.devices else (
        [torch.device("cpu")] + ([default_device()] if torch.cuda.is_available() else []))
    return [run_device(device, args) for device in devices]


if __name__ == "__main__":
    main()
