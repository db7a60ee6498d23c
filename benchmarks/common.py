"""What every benchmark shares: the optimizer registry, the implementations compared, and run metadata.

One table (OPTIMIZERS) drives bench_step, train_loop and the pytest-benchmark suite, so adding an optimizer
or an option is one line here, never a new function.
"""
from __future__ import annotations

import datetime
import os
import platform
import random
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class OptSpec:
    """One benchmarked configuration of an algorithm: torch_name is its torch.optim class, or for the algorithms
    torch.optim lacks (Lion, LAMB) its reference in fusedopt.references; fusedopt's class is 'Fused' + torch_name."""
    torch_name: str
    kwargs: dict = field(default_factory=dict)


# lr is always explicit so that param-group variants can scale it; the other values are torch's defaults.
OPTIMIZERS: dict[str, OptSpec] = {
    "sgd": OptSpec("SGD", dict(lr=0.01)),
    "sgd_momentum": OptSpec("SGD", dict(lr=0.01, momentum=0.9)),
    "sgd_nesterov": OptSpec("SGD", dict(lr=0.01, momentum=0.9, nesterov=True)),
    "adam": OptSpec("Adam", dict(lr=1e-3)),
    "adam_amsgrad": OptSpec("Adam", dict(lr=1e-3, amsgrad=True)),
    "adamw": OptSpec("AdamW", dict(lr=1e-3)),
    "adagrad": OptSpec("Adagrad", dict(lr=1e-2)),
    "adadelta": OptSpec("Adadelta", dict(lr=1.0)),
    "adamax": OptSpec("Adamax", dict(lr=2e-3)),
    "rmsprop": OptSpec("RMSprop", dict(lr=1e-2)),
    "rmsprop_centered": OptSpec("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True)),
    "nadam": OptSpec("NAdam", dict(lr=2e-3)),
    "radam": OptSpec("RAdam", dict(lr=1e-3)),
    "rprop": OptSpec("Rprop", dict(lr=1e-2)),
    "asgd": OptSpec("ASGD", dict(lr=1e-2)),
    "lion": OptSpec("Lion", dict(lr=1e-4)),
    "lamb": OptSpec("LAMB", dict(lr=1e-3)),
}

# Minimum memory traffic of one step, in arrays of the parameter's size read and written per element.
# A fused kernel touches each array once; torch's for-loop/foreach paths touch some several times, which is
# exactly what the "% of add_" column exposes. Weight decay, maximize, lr/bias corrections add no traffic.
#
#   algorithm   reads                        writes                 arrays  fp32 B/elem  bf16 B/elem
#   SGD         p, g                         p                      3       12           6
#   + momentum  + momentum_buffer            + momentum_buffer      5       20           10   (nesterov too)
#   Adam/AdamW  p, g, exp_avg, exp_avg_sq    p, exp_avg, exp_avg_sq 7       28           14
#   + amsgrad   + max_exp_avg_sq             + max_exp_avg_sq       9       36           18
#   Adagrad     p, g, sum                    p, sum                 5       20           10
#   Adadelta    p, g, square_avg, acc_delta  p, square_avg, acc_d.  7       28           14
#   Adamax      p, g, exp_avg, exp_inf       p, exp_avg, exp_inf    7       28           14
#   RMSprop     p, g, square_avg             p, square_avg          5       20           10
#   + momentum  + momentum_buffer            + momentum_buffer      +2      +8           +4
#   + centered  + grad_avg                   + grad_avg             +2      +8           +4
#   NAdam/RAdam p, g, exp_avg, exp_avg_sq    p, exp_avg, exp_avg_sq 7       28           14
#   Rprop       p, g, prev, step_size        p, prev, step_size     7       28           14
#   ASGD        p, g, ax                     p, ax                  5       20           10
#   Lion        p, g, exp_avg                p, exp_avg             5       20           10
#   LAMB        p, g, exp_avg, exp_avg_sq    p, exp_avg, exp_avg_sq 7       28           14   (one-pass bound;
#               the trust ratio needs whole-tensor norms first, so a fused step reads p, m, v twice: 10 arrays)
#   add_ (ref.) a, b                         a                      3       12           6
#
# Bytes assume optimizer state in the parameter dtype, as torch.optim keeps it.
BASE_ARRAYS = {"SGD": (2, 1), "Adam": (4, 3), "AdamW": (4, 3), "Adagrad": (3, 2), "Adadelta": (4, 3),
               "Adamax": (4, 3), "RMSprop": (3, 2), "NAdam": (4, 3), "RAdam": (4, 3), "Rprop": (4, 3),
               "ASGD": (3, 2), "Lion": (3, 2), "LAMB": (4, 3)}
OPTION_ARRAYS = {"momentum": (1, 1), "amsgrad": (1, 1), "centered": (1, 1)}  # added when the option is truthy
ADD_ARRAYS = 3


def traffic_arrays(spec: OptSpec) -> int:
    """Arrays of parameter size read + written by one step (see the table above)."""
    reads, writes = BASE_ARRAYS[spec.torch_name]
    for option, (r, w) in OPTION_ARRAYS.items():
        if spec.kwargs.get(option):
            reads, writes = reads + r, writes + w
    return reads + writes


def state_arrays(spec: OptSpec) -> int:
    """Per-element state buffers one optimizer instance allocates (traffic minus p read/write and g read)."""
    return traffic_arrays(spec) - 3


# The implementations compared: where the class comes from and the flags that select torch's code path.
IMPLS: dict[str, tuple[str, dict]] = {
    "fusedopt": ("fusedopt", {}),
    "forloop": ("torch", {"foreach": False}),
    "foreach": ("torch", {"foreach": True}),
    "fused": ("torch", {"fused": True}),
}
TORCH_IMPLS = [name for name, (src, _) in IMPLS.items() if src == "torch"]
# fusedopt's low-precision modes (README: Low-precision training), timed beside plain fusedopt on request
# (bench_step --rounding). They change how bf16/fp16 params and state are stored; fp32 ones update as nearest.
ROUNDING_IMPLS: dict[str, tuple[str, dict]] = {
    "fusedopt+stochastic": ("fusedopt", {"param_rounding": "stochastic", "seed": 0}),
    "fusedopt+kahan": ("fusedopt", {"param_rounding": "kahan"}),
    "fusedopt+master": ("fusedopt", {"master_weights": True}),
}


def optimizer_class(torch_name: str, source: str):
    """fusedopt's class, or torch.optim's; for an algorithm torch.optim lacks, fusedopt's plain-PyTorch reference
    stands in for torch (it is a single-tensor for-loop, so it has no foreach/fused variants)."""
    if source == "fusedopt":
        import fusedopt  # imported late so torch-only code paths work while the package is being built
        return getattr(fusedopt, "Fused" + torch_name)
    if hasattr(torch.optim, torch_name):
        return getattr(torch.optim, torch_name)
    from fusedopt import references
    return getattr(references, torch_name)


def _is_reference(cls) -> bool:
    return cls.__module__.startswith("fusedopt.references")


def make_optimizer(spec: OptSpec, impl: str, params, **overrides):
    """Build `spec` with implementation `impl` (IMPLS or ROUNDING_IMPLS) over `params` (tensors or param-group dicts)."""
    source, flags = {**IMPLS, **ROUNDING_IMPLS}[impl]
    cls = optimizer_class(spec.torch_name, source)
    if _is_reference(cls):
        # the reference is the for-loop; asking it for foreach/fused raises TypeError ("–" in the tables)
        flags = {} if flags == {"foreach": False} else flags
    return cls(params, **{**spec.kwargs, **flags, **overrides})


def probe(spec: OptSpec, impl: str, device, dtype) -> str | None:
    """None if `impl` can step `spec` for this device and dtype, else why not.

    Support differs by torch version, device and dtype (e.g. fused=True exists for SGD/Adam/AdamW/Adagrad only),
    so we try a step on two tiny tensors instead of hard-coding a matrix.
    """
    params = [torch.zeros(8, device=device, dtype=dtype, requires_grad=True) for _ in range(2)]
    for p in params:
        p.grad = torch.ones_like(p)
    try:
        make_optimizer(spec, impl, params).step()
    except Exception as exc:  # noqa: BLE001 - any failure means "not supported here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__
    return None


def round_orders(names, rounds: int, seed: int = 0) -> list[list]:
    """The order of `names` in each of `rounds` rounds (every name once a round), balanced for what ran just before.

    A step's time depends on the step before it: one that streamed other memory leaves dirty cache lines for the
    next to write back (on a 2-core AMD EPYC every optimizer's 7M-param SGD step took 7-9% longer right after the
    add_ reference than after another optimizer). Rotating one list keeps its cyclic order, so each name follows
    the same one in all but one position of a round: bench_step's fusedopt followed add_ in 4 rounds of 5. Here
    the rounds are the rows of a Williams design (each row a permutation; over a cycle of n rows, 2n for an odd
    n, every name directly follows every other the same number of times within rounds, and an odd n's rows
    alternate with mirrored ones so that a partial cycle is near-balanced too), and each cycle relabels the
    names by a seeded permutation, so that the joins between rounds do not favour one pair either. A caller's
    timed rounds should start a cycle (a call of their own, not the tail of the warm-up's): bench_step's CPU
    default, 10 rounds of 4 implementations and add_, is one whole cycle; --quick's 5 rounds are half of one."""
    names = list(names)
    n = len(names)
    if n == 0:
        return [[] for _ in range(rounds)]
    base, low, high = [0], 1, n - 1
    while len(base) < n:  # 0, 1, n-1, 2, n-2, ...: consecutive differences all distinct mod n
        base.append(low)
        low += 1
        if len(base) < n:
            base.append(high)
            high -= 1
    rows = [[(b + i) % n for b in base] for i in range(n)]
    if n % 2:  # odd n: the mirrored rows complete the balance; row k alternates plain and mirrored
        rows = [rows[k % n] if k % 2 == 0 else rows[k % n][::-1] for k in range(2 * n)]
    rng = random.Random(seed)
    orders, labels = [], list(range(n))
    for r in range(rounds):
        if r and r % len(rows) == 0:
            last = labels[rows[-1][-1]]  # by index: names need not compare (train_loop passes its variants)
            rng.shuffle(labels)
            first, second = rows[0][:2] if n > 1 else (0, 0)
            if labels[first] == last:  # no name twice in a row across the join
                labels[first], labels[second] = labels[second], labels[first]
        orders.append([names[labels[i]] for i in rows[r % len(rows)]])
    return orders


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_kind(device: torch.device) -> str:
    """Short tag for file names: 'cpu-<cpu model>' or 'cuda-<gpu model>', so results name their machine."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).replace("NVIDIA", "")
    elif device.type == "cpu":
        name = re.sub(r"\((R|TM)\)|CPU|Processor|\d+-Core", "", cpu_model())
    else:
        return device.type
    return device.type + "-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:40]


def cpu_isa() -> str:
    """The widest x86 vector extension the CPU reports (what vectorized CPU kernels can use on this machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return platform.machine()
    for isa in ("avx512_bf16", "avx512f", "avx2", "avx", "sse4_2"):
        if isa in flags:
            return isa
    return platform.machine()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD of the checkout the benchmark ran from, with '+dirty' when the tree has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown (no commit)"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(device: torch.device) -> dict:
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        # the instruction set torch's own CPU kernels dispatch to (ATen's at::get_cpu_capability())
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other processes competing for the cores distort CPU timings badly (OpenMP barriers), so record it
        "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "fusedopt_commit": git_commit(),
    }
    try:
        import fusedopt
        meta["fusedopt_version"] = getattr(fusedopt, "__version__", "unknown")
        meta["fusedopt_extension_available"] = bool(getattr(fusedopt, "EXTENSION_AVAILABLE", False))
    except ImportError as exc:
        meta["fusedopt_import_error"] = str(exc)
    return meta


def load_warning(meta: dict, device: torch.device) -> str | None:
    """A warning when other processes compete for the CPU (they distort CPU timings badly: OpenMP barriers)."""
    load, cores = meta.get("load_average_1m_at_start"), os.cpu_count() or 1
    if device.type == "cpu" and load is not None and load > 0.5 * cores:
        return (f"WARNING: load average {load:.1f} on {cores} cores: other processes are competing for the CPU "
                "and will distort these timings.")
    return None


def result_stem(prefix: str, device: torch.device) -> str:
    """'<prefix>_<device kind>_<date-time>': results of different machines and days never overwrite each other."""
    return f"{prefix}_{device_kind(device)}_{datetime.datetime.now():%Y%m%d-%H%M%S}"


def argument_parser(doc: str):
    """A benchmark's parser: its docstring's first line as the description, the rest as the --help epilog."""
    import argparse

    return argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc.split("\n", 1)[1],
                                   formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=110))


def save_figure(fig, title: str, path) -> None:
    """Title, tight layout, PNG at 110 dpi, closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
