"""The seeds' MNIST network trained in pure bf16 with each rounding mode, next to fp32 (issue 11).

    python -m benchmarks.seed_low_precision --data-root ../shared/data
    python -m benchmarks.seed_low_precision --data-root ../shared/data --iterations 3000 --optimizers adam

Model, data and settings are benchmarks/seed_experiments.py's: the 784-100-10 ReLU net, cross-entropy, batches
of 100, MNIST scaled to [0, 1], the data order drawn by a generator of its own, seed 0; Adam at torch's default
lr (1e-3) and SGD momentum at lr 0.1, momentum 0.9 (the tutorial's), each also at a 10x smaller lr, where a
bf16 weight rounded to nearest loses most updates (an update below half an ulp, 2**-9 * |w|, is dropped).

Columns: "fp32" trains the float32 net with fusedopt's default options (the reference trajectory); the others
train the same net after model.to(torch.bfloat16), with bf16 inputs (the loss is taken on the logits cast to
float32, as mixed-precision loops do; every weight, activation and gradient is bf16) with fusedopt's
param_rounding="nearest" (torch's behaviour), "stochastic" (seeded with --seed), "kahan", and master_weights=True
(an fp32 master copy; the bf16 params receive its nearest rounding), and "torch.optim bf16" (torch's for-loop
implementation on the same bf16 net: the peer of "nearest"). All bf16 runs start from the same weights (the
fp32 run's, rounded) and see the same batches. A run is reproducible bit for bit for a given seed and --threads
(checked: two runs gave identical loss curves; 1 and 2 threads differ in the last bits of the matmuls).

Reported per (optimizer, lr, column): the test accuracy of the trained net (the bf16 net as it is, for master
too), the train loss at the end (the mean over the last --log-every iterations), and "moved": how far the
weights travelled from their start, ||w_end - w_start||, relative to the fp32 run's (a stalled run moves less;
stochastic rounding's zero-mean rounding errors add up to a small random walk, which adds a little). The PNG has
one column of panels per optimizer x lr: the train loss of every column (mean over each --log-every iterations),
and below it each column's loss minus the fp32 run's. Outputs, named by result_stem (benchmarks/common.py):
benchmarks/results/seed_low_precision_<device>_<date>.json (every run's curve), .txt (the tables) and .png.

Duration of the default run (24 runs of 3,000 iterations, one thread), measured on the 2-core AMD EPYC:
94 s (100 s with start-up) at load average 0.8-1.0, about 4 s a run. With two threads, while other jobs took
the cores (load 1.1 rising to 4.0), it took 341 s: torch's OpenMP barriers suffer. Every run prints its own
duration at the end.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks import common
from benchmarks.common import RESULTS_DIR, default_device, make_optimizer, optimizer_class, result_stem, run_metadata
from benchmarks.seed_experiments import (BATCH_SIZE, MNIST, SEED_OPTIMIZERS, accuracy, feedforward_net,
                                         load_mnist)

DEFAULT_ITERATIONS = 3000

OPTIMIZERS = ["adam", "sgd_momentum"]  # seed_experiments.SEED_OPTIMIZERS keys: the seed's settings
LR_SCALES = [1.0, 0.1]  # the seed's lr and 10x smaller


@dataclass(frozen=True)
class Column:
    dtype: torch.dtype
    impl: str  # benchmarks.common.IMPLS key
    options: dict  # fusedopt's low-precision options
    color: str
    style: str = "-"


COLUMNS = {
    "fp32": Column(torch.float32, "fusedopt", {}, "black", "--"),
    "nearest": Column(torch.bfloat16, "fusedopt", {}, "C3"),
    "stochastic": Column(torch.bfloat16, "fusedopt", dict(param_rounding="stochastic"), "C0"),
    "kahan": Column(torch.bfloat16, "fusedopt", dict(param_rounding="kahan"), "C2"),
    "master": Column(torch.bfloat16, "fusedopt", dict(master_weights=True), "C1"),
    "torch.optim bf16": Column(torch.bfloat16, "forloop", {}, "C7", ":"),
}


def seed_lr(name: str) -> float:
    """The seed's lr: the spec's, else the torch class's default (Adam: 1e-3)."""
    spec = SEED_OPTIMIZERS[name].spec
    if "lr" in spec.kwargs:
        return spec.kwargs["lr"]
    return inspect.signature(optimizer_class(spec.torch_name, "torch")).parameters["lr"].default


def as_dtype(data: MNIST, dtype: torch.dtype) -> MNIST:
    if dtype == data.train_x.dtype:
        return data
    return MNIST(data.train_x.to(dtype), data.train_y, data.test_x.to(dtype), data.test_y)


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def train(name: str, lr: float, column: Column, data: MNIST, *, iterations: int, seed: int, log_every: int) -> dict:
    """One run: seed_experiments.train's loop (same init, same batches) in the column's dtype and options."""
    spec = SEED_OPTIMIZERS[name].spec
    torch.manual_seed(seed)
    model = feedforward_net().to(data.train_x.device)  # float32 init, as the seed's; then cast
    model = model.to(column.dtype)
    start = flat_weights(model)
    options = dict(column.options)
    if options.get("param_rounding") == "stochastic":
        options["seed"] = seed
    optimizer = make_optimizer(spec, column.impl, model.parameters(), lr=lr, **options)
    data = as_dtype(data, column.dtype)
    shuffle = torch.Generator().manual_seed(seed)
    n = len(data.train_y)
    per_epoch = n // BATCH_SIZE
    losses = torch.empty(iterations, dtype=torch.float32)
    done = 0
    t0 = time.perf_counter()
    while done < iterations:
        order = torch.randperm(n, generator=shuffle).to(data.train_x.device)
        for batch in order[: min(per_epoch, iterations - done) * BATCH_SIZE].split(BATCH_SIZE):
            loss = F.cross_entropy(model(data.train_x[batch]).float(), data.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[done] = loss.detach()
            done += 1
    seconds = time.perf_counter() - t0
    windows = losses[: iterations // log_every * log_every].view(-1, log_every).mean(1)
    end = flat_weights(model)
    return dict(optimizer=name, lr=lr, column=column_name(column), dtype=str(column.dtype).replace("torch.", ""),
                impl=column.impl, options={k: str(v) for k, v in column.options.items()},
                accuracy=accuracy(model, data), final_loss=float(windows[-1]) if len(windows) else float(losses[-1]),
                curve=[[(i + 1) * log_every, float(v)] for i, v in enumerate(windows)],
                loss_finite=bool(torch.isfinite(losses).all()), movement=float((end - start).norm()),
                iterations=iterations, seconds=seconds, weights_end=end)


def column_name(column: Column) -> str:
    return next(k for k, v in COLUMNS.items() if v is column)


# ----------------------------------------------------------------------------------------------- reports
def tables(results, columns, iterations, log_every) -> str:
    cases = list(dict.fromkeys((r["optimizer"], r["lr"]) for r in results))
    get = {(r["optimizer"], r["lr"], r["column"]): r for r in results}
    width = max(10, *(len(c) + 1 for c in columns))
    head = f"{'optimizer':<13} {'lr':>7}" + "".join(f"{c:>{width}}" for c in columns)
    out = []
    for title, key, fmt in (
            (f"Test accuracy (%) after {iterations} iterations", "accuracy", "{:.2f}"),
            (f"Train loss at the end (mean of the last {log_every} iterations)", "final_loss", "{:.4f}"),
            ("Weights moved from their start, ||w_end - w_start||, relative to the fp32 run's", "moved", "{:.3f}"),
            ("Seconds per run", "seconds", "{:.1f}")):
        out += ["", title, head, "-" * len(head)]
        for opt, lr in cases:
            cells = []
            for c in columns:
                r = get.get((opt, lr, c))
                if r is None:
                    cells.append(f"{'–':>{width}}")
                    continue
                mark = "" if r["loss_finite"] else "!"
                cells.append(f"{fmt.format(r[key]) + mark:>{width}}")
            out.append(f"{opt:<13} {lr:>7.0e}" + "".join(cells))
    out.append("\n! = a non-finite training loss in the run. fp32: float32 net and fusedopt; the other columns: the "
               "bf16 net (fusedopt's modes, and torch.optim's for-loop).")
    return "\n".join(out)


def plot(results, columns, path: Path, title: str, smooth: int = 5):
    """Per optimizer x lr: the loss curves (top), and each column's loss minus the fp32 run's, as a moving mean
    over `smooth` curve points (bottom), where the columns' gaps show that the top panel's scale hides."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter

    cases = list(dict.fromkeys((r["optimizer"], r["lr"]) for r in results))
    get = {(r["optimizer"], r["lr"], r["column"]): r for r in results}
    fig, axes = plt.subplots(2, len(cases), figsize=(5.2 * len(cases), 8), squeeze=False,
                             gridspec_kw=dict(height_ratios=(3, 2)))
    for j, (opt, lr) in enumerate(cases):
        ax, dax = axes[0][j], axes[1][j]
        ref = get.get((opt, lr, "fp32"))
        for c in columns:
            r = get.get((opt, lr, c))
            if r is None or not r["curve"]:
                continue
            xs, ys = zip(*r["curve"])
            col = COLUMNS[c]
            ax.plot(xs, ys, col.style, color=col.color, linewidth=1.1, label=f"{c} ({r['accuracy']:.2f}%)")
            if ref is not None and c != "fp32" and len(ref["curve"]) == len(ys):
                diff = torch.tensor(ys, dtype=torch.float64) - torch.tensor([v for _, v in ref["curve"]],
                                                                            dtype=torch.float64)
                k = max(1, min(smooth, len(diff)))
                mean = diff.unfold(0, k, 1).mean(1)
                dax.plot(xs[k - 1:], mean.tolist(), col.style, color=col.color, linewidth=1.1, label=c)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FuncFormatter(  # label 2, 3 and 5 between the decades, not every tick
            lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 3, 5) else ""))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set(xlabel="iteration", ylabel="train loss (window mean)", title=f"{opt}, lr {lr:g}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title="column (test accuracy)", title_fontsize=7)
        dax.axhline(0, color="black", linewidth=0.8)
        dax.set(xlabel="iteration", ylabel=f"loss - fp32's (mean of {smooth} points)")
        dax.grid(alpha=0.3)
    common.save_figure(fig, title, path)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = common.argument_parser(__doc__)
    ap.add_argument("--data-root", default=None,
                    help="MNIST root as torchvision expects it (default: ./data, downloaded if missing). "
                         "An explicit root is read offline unless --download is given")
    ap.add_argument("--download", action="store_true", help="let torchvision download into --data-root "
                                                             "(default: off)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                    help="training iterations per run (default: %(default)s = 5 epochs, as the seed; the "
                         "docstring gives the default run's measured duration)")
    ap.add_argument("--optimizers", nargs="+", default=OPTIMIZERS, choices=OPTIMIZERS, metavar="NAME",
                    help="any of: %(choices)s, at the seed's settings (default: both)")
    ap.add_argument("--lr-scales", nargs="+", type=float, default=LR_SCALES, metavar="X",
                    help="multiples of the seed's lr to run (default: 1 0.1)")
    ap.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=list(COLUMNS), metavar="NAME",
                    help="what to train, any of: %(choices)s (default: all)")
    ap.add_argument("--log-every", type=int, default=50,
                    help="iterations per point of the loss curves, and of the end loss (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="model, data-order and stochastic-rounding seed (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default: %(default)s: the net is tiny, one thread is about as fast "
                         "on 2 cores, suffers far less from other jobs, and gives the same bits whatever the machine's "
                         "core count; 0 = torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help="folder for the JSON, TXT and PNG (default: benchmarks/results)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # before run_metadata, which records it
    device = torch.device(args.device) if args.device else default_device()
    root, download = (args.data_root, args.download) if args.data_root else ("./data", True)
    data = load_mnist(root, download, str(device))
    meta = run_metadata(device)
    print(f"seed_low_precision on {meta['device_name']} ({device}; CPU {meta['cpu_model']}, ISA {meta['cpu_isa']}, "
          f"{meta['cpu_cores']} cores, torch threads {meta['torch_threads']}) | torch {meta['torch']} | "
          f"fusedopt commit {meta['fusedopt_commit']} (extension loaded: "
          f"{meta.get('fusedopt_extension_available')}) | load average {meta['load_average_1m_at_start']:.2f}")
    runs = [(name, seed_lr(name) * scale, c) for name in args.optimizers for scale in args.lr_scales
            for c in args.columns]
    results = []
    bar = tqdm(runs, desc="seed_low_precision", unit="run", dynamic_ncols=True)
    for name, lr, c in bar:
        bar.set_postfix_str(f"{name} lr {lr:g} {c}")
        try:
            results.append(train(name, lr, COLUMNS[c], data, iterations=args.iterations, seed=args.seed,
                                 log_every=args.log_every))
        except Exception as exc:  # noqa: BLE001 - one failing mode must not hide the others; reported below
            print(f"\nFAILED: {name} lr {lr:g} {c}: {type(exc).__name__}: {exc}", file=sys.stderr)
            results.append(dict(optimizer=name, lr=lr, column=c, error=f"{type(exc).__name__}: {exc}"))
    bar.close()
    failed = [r for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    for r in results:  # movement relative to the fp32 run of the same optimizer and lr
        ref = next((f for f in results if (f["optimizer"], f["lr"], f["column"]) == (r["optimizer"], r["lr"], "fp32")),
                   None)
        r["moved"] = r["movement"] / ref["movement"] if ref else math.nan
    for r in results:
        r.pop("weights_end")

    meta["load_average_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta["duration_s"] = time.perf_counter() - started
    text = tables(results, args.columns, args.iterations, args.log_every)
    if failed:
        text += "\n\nFAILED runs:\n" + "\n".join(f"  {r['optimizer']} lr {r['lr']:g} {r['column']}: {r['error']}"
                                                  for r in failed)
    text += (f"\n\n{meta['device_name']} ({device}, {meta['cpu_isa']}, {meta['cpu_cores']} cores, torch threads "
             f"{meta['torch_threads']}); load average "
             f"(1 min) {meta['load_average_1m_at_start']:.2f} at start, {meta['load_average_1m_at_end']:.2f} at end; "
             f"took {meta['duration_s']:.0f} s")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / result_stem("seed_low_precision", device)
    record = {"meta": meta, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "results": results, "failed": failed}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    stem.with_suffix(".txt").write_text(text + "\n")
    if results:
        plot(results, args.columns, stem.with_suffix(".png"),
             f"MNIST 784-100-10, pure bf16 vs fp32, {args.iterations} iterations, on {meta['device_name']} "
             f"({meta['date'][:10]})")
    print(f"\nwrote {stem.with_suffix('.json')}\nwrote {stem.with_suffix('.txt')}\nwrote {stem.with_suffix('.png')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
