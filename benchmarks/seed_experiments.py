"""The seed tutorials' MNIST experiments, with torch.optim and fusedopt side by side in one run.

    python -m benchmarks.seed_experiments optimizers --data-root ../shared/data
    python -m benchmarks.seed_experiments schedules --data-root ../shared/data

Model and data as in the tutorials: a 784-100-10 feed-forward net with ReLU, cross-entropy, batches of 100,
seed 0, MNIST images scaled to [0, 1]. `optimizers` trains 3,000 iterations (5 epochs) with each algorithm's
tutorial settings and compares the final test accuracy with the published one (and adds rows for the algorithms
the tutorial did not cover: NAdam, RAdam, Rprop, ASGD, Lion, LAMB); `schedules` trains SGD Nesterov
(lr 0.1, momentum 0.9) under StepLR for 5 epochs and ReduceLROnPlateau (mode 'max' on test accuracy) for 10,
printing the learning rate and accuracy of every epoch.

Departures from the tutorials, each so that both implementations see exactly the same run: the whole data set is
held as one tensor and shuffled by a generator of its own (the tutorials' DataLoader draws its shuffle from the
global RNG, which then depends on everything else that ran); accuracy is measured once per epoch, at its end,
and that is the value ReduceLROnPlateau gets (the tutorials passed the last of their every-500-iterations
measurements); schedulers step after the epoch, as torch.optim.lr_scheduler requires today, which gives each
epoch the same learning rate the tutorials printed. The tutorials' "every epoch, larger gamma" code used
step_size=2 while its text and formula say every epoch; we run step_size=1, gamma=0.96 as the text says.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS_DIR, OptSpec, default_device, make_optimizer, result_stem, run_metadata

# column label -> benchmarks.common.IMPLS key; torch's single-tensor for-loop is its reference implementation
IMPLS = {"torch.optim": "forloop", "fusedopt": "fusedopt"}
BATCH_SIZE = 100
TOLERANCE = 0.3  # accuracy points fusedopt may differ from torch.optim before a run is flagged


@dataclass(frozen=True)
class SeedOptimizer:
    spec: OptSpec
    published: float | None  # the tutorial's final test accuracy (%) after 3,000 iterations (None: not in it)


# The tutorial's settings: lr 0.1 for the SGD family, torch's defaults for the adaptive methods.
SEED_OPTIMIZERS = {
    "sgd": SeedOptimizer(OptSpec("SGD", dict(lr=0.1)), 95.78),
    "sgd_momentum": SeedOptimizer(OptSpec("SGD", dict(lr=0.1, momentum=0.9)), 97.69),
    "sgd_nesterov": SeedOptimizer(OptSpec("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)), 97.58),
    "adam": SeedOptimizer(OptSpec("Adam"), 97.20),
    "adagrad": SeedOptimizer(OptSpec("Adagrad"), 95.51),
    "adadelta": SeedOptimizer(OptSpec("Adadelta"), 97.45),
    "adamax": SeedOptimizer(OptSpec("Adamax"), 96.58),
    "rmsprop": SeedOptimizer(OptSpec("RMSprop"), 97.1),
}
# Beyond the tutorial: the rest of the family, in the tutorial's spirit (torch's defaults for the adaptive
# methods, lr 0.1 for the SGD family, so ASGD too); Lion at 3e-4 (its paper: 3-10x below AdamW's lr) and LAMB at
# 1e-2 (a large-batch method: its defaults crawl at batch 100). For Lion and LAMB, which torch.optim lacks, the
# "torch.optim" column runs fusedopt.references, their plain-PyTorch reference.
SEED_OPTIMIZERS.update({
    "nadam": SeedOptimizer(OptSpec("NAdam"), None),
    "radam": SeedOptimizer(OptSpec("RAdam"), None),
    "rprop": SeedOptimizer(OptSpec("Rprop"), None),
    "asgd": SeedOptimizer(OptSpec("ASGD", dict(lr=0.1)), None),
    "lion": SeedOptimizer(OptSpec("Lion", dict(lr=3e-4)), None),
    "lamb": SeedOptimizer(OptSpec("LAMB", dict(lr=1e-2)), None),
})
NESTEROV = SEED_OPTIMIZERS["sgd_nesterov"].spec


@dataclass(frozen=True)
class Schedule:
    scheduler: str  # class name, looked up in the chosen backend's lr_scheduler module
    kwargs: dict
    epochs: int
    seed_lrs: list = field(default_factory=list)  # the LR of each epoch as the tutorial printed it
    seed_accuracy: list = field(default_factory=list)  # per-epoch test accuracy the tutorial printed, if any

    @property
    def needs_metric(self) -> bool:  # plateau schedulers step on the measured accuracy
        return "Plateau" in self.scheduler


SCHEDULES = {
    "step1_g0.1": Schedule("StepLR", dict(step_size=1, gamma=0.1), 5, [0.1, 0.01, 0.001, 1e-4, 1e-5]),
    "step2_g0.1": Schedule("StepLR", dict(step_size=2, gamma=0.1), 5, [0.1, 0.1, 0.01, 0.01, 0.001]),
    "step1_g0.96": Schedule("StepLR", dict(step_size=1, gamma=0.96), 5, [0.1, 0.096, 0.09216, 0.0884736, 0.08493466]),
    "plateau_f0.1": Schedule("ReduceLROnPlateau", dict(mode="max", factor=0.1, patience=0), 10,
                             [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.01, 0.001, 1e-4],
                             [96.26, 96.96, 96.78, 97.7, 98.02, 98.03, 98.05, 98.01, 98.05, 98.04]),
    "plateau_f0.5": Schedule("ReduceLROnPlateau", dict(mode="max", factor=0.5, patience=0), 10,
                             [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025, 0.0125],
                             [96.26, 96.96, 96.78, 97.62, 97.86, 97.95, 97.87, 98.0, 97.95, 98.01]),
}

# Where scheduler classes come from. fusedopt's device-side schedulers do not exist yet; once
# fusedopt.lr_scheduler provides same-named classes, `--scheduler-backend fusedopt` uses them unchanged.
SCHEDULER_BACKENDS = {"torch": "torch.optim.lr_scheduler", "fusedopt": "fusedopt.lr_scheduler"}


def scheduler_class(backend: str, name: str):
    try:
        return getattr(importlib.import_module(SCHEDULER_BACKENDS[backend]), name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"scheduler backend {backend!r} has no {name}: {exc}") from exc


# ------------------------------------------------------------------------------------------------- data
@dataclass
class MNIST:
    train_x: torch.Tensor  # (60000, 784) float in [0, 1], as ToTensor() then view(-1, 784) gives
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@functools.lru_cache(maxsize=2)
def load_mnist(root: str = "./data", download: bool = True, device: str = "cpu") -> MNIST:
    from torchvision.datasets import MNIST as TorchvisionMNIST

    def tensors(train):
        ds = TorchvisionMNIST(root=root, train=train, download=download)
        return ds.data.reshape(len(ds.data), -1).float().div(255).to(device), ds.targets.to(device)

    return MNIST(*tensors(True), *tensors(False))


# ------------------------------------------------------------------------------------------------ training
def feedforward_net() -> nn.Module:
    return nn.Sequential(nn.Linear(28 * 28, 100), nn.ReLU(), nn.Linear(100, 10))


@torch.no_grad()
def accuracy(model: nn.Module, data: MNIST) -> float:
    return 100.0 * (model(data.test_x).argmax(1) == data.test_y).sum().item() / len(data.test_y)


def train(spec: OptSpec, impl: str, data: MNIST, *, iterations: int, iters_per_epoch: int | None = None,
          schedule: Schedule | None = None, scheduler_backend: str = "torch", seed: int = 0) -> list[dict]:
    """Train the tutorial's net; one record (epoch, lr, loss, accuracy) per epoch, accuracy at the epoch's end.

    The same seed gives the same initial weights and the same batches whatever the optimizer, so torch.optim and
    fusedopt runs differ only by the optimizer's arithmetic."""
    torch.manual_seed(seed)
    model = feedforward_net().to(data.train_x.device)
    optimizer = make_optimizer(spec, IMPLS[impl], model.parameters())
    scheduler = None
    if schedule is not None:
        scheduler = scheduler_class(scheduler_backend, schedule.scheduler)(optimizer, **schedule.kwargs)
    shuffle = torch.Generator().manual_seed(seed)
    n = len(data.train_y)
    per_epoch = min(iters_per_epoch or n // BATCH_SIZE, n // BATCH_SIZE)
    history, done = [], 0
    while done < iterations:
        lr = float(optimizer.param_groups[0]["lr"])  # float(): a device-side scheduler may keep a tensor here
        order = torch.randperm(n, generator=shuffle).to(data.train_x.device)
        for batch in order[: min(per_epoch, iterations - done) * BATCH_SIZE].split(BATCH_SIZE):
            loss = F.cross_entropy(model(data.train_x[batch]), data.train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
        history.append(dict(epoch=len(history), lr=lr, loss=loss.item(), accuracy=accuracy(model, data)))
        if scheduler is not None and schedule.needs_metric:
            scheduler.step(history[-1]["accuracy"])
        elif scheduler is not None:
            scheduler.step()
    return history


# --------------------------------------------------------------------------------------------- experiments
def run_optimizers(data: MNIST, names, iterations: int, seed: int = 0, log=print) -> list[dict]:
    """Final accuracy of every optimizer with each implementation; 'flagged' when they differ by > TOLERANCE."""
    rows = []
    for name in names:
        row = dict(optimizer=name, published=SEED_OPTIMIZERS[name].published)
        for label in IMPLS:
            t0 = time.perf_counter()
            history = train(SEED_OPTIMIZERS[name].spec, label, data, iterations=iterations, seed=seed)
            row[label] = history[-1]["accuracy"]
            row[f"{label} s"] = time.perf_counter() - t0
        row["diff"] = row["fusedopt"] - row["torch.optim"]
        row["flagged"] = abs(row["diff"]) > TOLERANCE
        rows.append(row)
        log(f"  {name}: torch.optim {row['torch.optim']:.2f}% ({row['torch.optim s']:.1f} s), "
            f"fusedopt {row['fusedopt']:.2f}% ({row['fusedopt s']:.1f} s)")
    return rows


def run_schedules(data: MNIST, names, epochs=None, iters_per_epoch=None, backend="torch", seed=0) -> dict:
    """Per-epoch history of every schedule with each implementation: {schedule: {impl label: history}}."""
    out = {}
    for name in names:
        schedule = SCHEDULES[name]
        n_epochs = epochs or schedule.epochs
        per_epoch = iters_per_epoch or len(data.train_y) // BATCH_SIZE
        out[name] = {label: train(NESTEROV, label, data, iterations=n_epochs * per_epoch, iters_per_epoch=per_epoch,
                                  schedule=schedule, scheduler_backend=backend, seed=seed)
                     for label in IMPLS}
    return out


def print_optimizer_table(rows, iterations):
    print(f"\nFinal test accuracy (%) after {iterations} iterations; published = the tutorial's, "
          f"after 3000 iterations with its own torch version and RNG stream (– where the tutorial has none); "
          f"for Lion and LAMB the torch.optim column is fusedopt.references")
    print(f"{'optimizer':<13} {'published':>9} {'torch.optim':>11} {'fusedopt':>9} {'diff':>6}  flag")
    for r in rows:
        published = "–" if r["published"] is None else f"{r['published']:.2f}"
        print(f"{r['optimizer']:<13} {published:>9} {r['torch.optim']:>11.2f} {r['fusedopt']:>9.2f} "
              f"{r['diff']:>+6.2f}  {'DIFFERS by more than %.1f points' % TOLERANCE if r['flagged'] else ''}")


def print_schedule(name, runs):
    schedule = SCHEDULES[name]
    arguments = ", ".join(f"{k}={v}" for k, v in schedule.kwargs.items())
    print(f"\n{name}: SGD Nesterov lr 0.1, {schedule.scheduler}({arguments})")
    print(f"{'epoch':>5} {'seed LR':>9} {'LR torch.optim':>14} {'LR fusedopt':>12} {'seed acc':>8} "
          f"{'acc torch.optim':>15} {'acc fusedopt':>12}")
    torch_run, fused_run = runs["torch.optim"], runs["fusedopt"]
    for e, (t, f) in enumerate(zip(torch_run, fused_run)):
        seed_lr = f"{schedule.seed_lrs[e]:.4g}" if e < len(schedule.seed_lrs) else ""
        seed_acc = f"{schedule.seed_accuracy[e]:.2f}" if e < len(schedule.seed_accuracy) else ""
        print(f"{e:>5} {seed_lr:>9} {t['lr']:>14.4g} {f['lr']:>12.4g} {seed_acc:>8} {t['accuracy']:>15.2f} "
              f"{f['accuracy']:>12.2f}")


def plot_schedules(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lr, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, runs) in enumerate(results.items()):
        color = f"C{i}"
        for label, style in (("fusedopt", "-"), ("torch.optim", ":")):
            hist = runs[label]
            epochs = [h["epoch"] for h in hist]
            ax_lr.step(epochs, [h["lr"] for h in hist], style, where="post", color=color,
                       label=f"{name} ({label})", marker="o" if label == "fusedopt" else None, markersize=3)
            ax_acc.plot(epochs, [h["accuracy"] for h in hist], style, color=color, marker=".")
    ax_lr.set(yscale="log", xlabel="epoch", ylabel="learning rate", title="LR of each epoch (SGD Nesterov)")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy at the end of each epoch")
    ax_lr.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=["optimizers", "schedules"],
                    help="optimizers: every seed optimizer's test accuracy; schedules: the seed LR schedules")
    ap.add_argument("--data-root", default=None,
                    help="MNIST root as torchvision expects it (default: ./data, downloaded if missing). "
                         "An explicit root is read offline unless --download is given")
    ap.add_argument("--download", action="store_true",
                    help="let torchvision download into --data-root (default: off)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--seed", type=int, default=0, help="model and data-order seed (default: %(default)s)")
    ap.add_argument("--iterations", type=int, default=3000,
                    help="optimizers: training iterations (default: %(default)s, as the seed)")
    ap.add_argument("--optimizers", nargs="+", default=list(SEED_OPTIMIZERS), choices=list(SEED_OPTIMIZERS),
                    metavar="NAME", help="optimizers: which ones, any of: %(choices)s (default: all)")
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES), metavar="NAME",
                    help="schedules: which ones, any of: %(choices)s (default: all)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="schedules: epochs (default: the seed's, 5 for StepLR, 10 for the plateau schedule)")
    ap.add_argument("--iters-per-epoch", type=int, default=None,
                    help="schedules: shorten epochs to this many iterations (default: full epochs, 600)")
    ap.add_argument("--scheduler-backend", choices=list(SCHEDULER_BACKENDS), default="torch",
                    help="schedules: whose schedulers drive fusedopt, any of: %(choices)s (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help="folder for the JSON record and PNG (default: benchmarks/results)")
    ap.add_argument("--strict", action="store_true",
                    help="exit with status 1 when a result is flagged (default: off)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    root, download = (args.data_root, args.download) if args.data_root else ("./data", True)
    data = load_mnist(root, download, str(device))
    meta = run_metadata(device)
    print(f"{args.experiment} on {meta['device_name']} | torch {meta['torch']} | fusedopt commit "
          f"{meta['fusedopt_commit']} (extension loaded: {meta.get('fusedopt_extension_available')})")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / result_stem(f"seed_{args.experiment}", device)
    record = {"meta": meta, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    if args.experiment == "optimizers":
        rows = run_optimizers(data, args.optimizers, args.iterations, args.seed)
        print_optimizer_table(rows, args.iterations)
        record["results"] = rows
        flagged = [r["optimizer"] for r in rows if r["flagged"]]
        if flagged:
            print(f"\nFLAGGED: fusedopt differs from torch.optim by more than {TOLERANCE} points: {', '.join(flagged)}")
    else:
        results = run_schedules(data, args.schedules, args.epochs, args.iters_per_epoch, args.scheduler_backend,
                                args.seed)
        for name, runs in results.items():
            print_schedule(name, runs)
        record["results"] = results
        plot_schedules(results, stem.with_suffix(".png"))
        print(f"\nwrote {stem.with_suffix('.png')}")
        flagged = [n for n, runs in results.items()
                   if any(abs(t["accuracy"] - f["accuracy"]) > TOLERANCE
                          for t, f in zip(runs["torch.optim"], runs["fusedopt"]))]
        if flagged:
            print(f"FLAGGED: fusedopt's accuracy differs from torch.optim's by more than {TOLERANCE} points in "
                  f"{', '.join(flagged)}")
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"wrote {stem.with_suffix('.json')}")
    return 1 if flagged and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
