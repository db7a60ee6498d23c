"""Shortened seed experiments on the real MNIST: fusedopt must train like torch.optim and follow the schedules.

The data is read from $FUSEDOPT_DATA_ROOT, by default the `shared/data` folder beside the repository; the tests
skip when it is absent. Everything runs on the CPU in well under a minute.
"""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # benchmarks/ is not installed with the package; appended (not prepended) so an installed fusedopt still wins
    sys.path.append(str(REPO_ROOT))

from benchmarks import seed_experiments as seed  # noqa: E402

DATA_ROOT = Path(os.environ.get("FUSEDOPT_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
pytestmark = pytest.mark.skipif(
    not all((DATA_ROOT / "MNIST" / "raw" / f).exists() for f in MNIST_FILES),
    reason=f"MNIST not found under {DATA_ROOT}/MNIST/raw (set FUSEDOPT_DATA_ROOT to a torchvision MNIST root)",
)

ITERATIONS = 200  # the tutorials train 3,000; 200 already reach ~90% on every optimizer
MIN_ACCURACY = 80.0  # chance is 10%
MARGIN = 0.5  # accuracy points fusedopt may differ from torch.optim on identical runs (rounding only)


@pytest.fixture(scope="module")
def mnist():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a 784-100-10 net gains nothing from threads, and loses much on a loaded machine
    yield seed.load_mnist(str(DATA_ROOT), False, "cpu")
    torch.set_num_threads(previous)


def test_optimizers_train_like_torch(mnist):
    rows = seed.run_optimizers(mnist, list(seed.SEED_OPTIMIZERS), ITERATIONS, log=lambda *_: None)
    for row in rows:
        name = row["optimizer"]
        assert row["torch.optim"] > MIN_ACCURACY, f"{name}: torch.optim reached only {row['torch.optim']:.2f}%"
        assert row["fusedopt"] > MIN_ACCURACY, f"{name}: fusedopt reached only {row['fusedopt']:.2f}%"
        assert abs(row["diff"]) <= MARGIN, (
            f"{name}: fusedopt {row['fusedopt']:.2f}% vs torch.optim {row['torch.optim']:.2f}% in the same run")


def expected_step_lrs(lr, step_size, gamma, epochs):
    return [lr * gamma ** (epoch // step_size) for epoch in range(epochs)]


def expected_plateau_lrs(lr, factor, accuracies, threshold=1e-4):
    """ReduceLROnPlateau(mode='max', patience=0) by hand: cut the LR after every epoch that does not beat the
    best accuracy so far by the relative threshold."""
    lrs, best = [lr], -math.inf
    for acc in accuracies[:-1]:
        if acc > best * (1 + threshold):
            best = acc
        else:
            lr *= factor
        lrs.append(lr)
    return lrs


@pytest.mark.parametrize("name", [n for n, s in seed.SCHEDULES.items() if not s.needs_metric])
def test_step_schedules(mnist, name):
    schedule = seed.SCHEDULES[name]
    runs = seed.run_schedules(mnist, [name], epochs=4, iters_per_epoch=30)[name]
    expected = expected_step_lrs(0.1, schedule.kwargs["step_size"], schedule.kwargs["gamma"], 4)
    for label, history in runs.items():
        assert [h["lr"] for h in history] == pytest.approx(expected, rel=1e-9), label
        assert history[-1]["accuracy"] > MIN_ACCURACY, label
    # over the tutorial's 5 epochs the same rule gives the LRs the tutorial states
    assert expected_step_lrs(0.1, schedule.kwargs["step_size"], schedule.kwargs["gamma"], 5) == pytest.approx(
        schedule.seed_lrs, rel=1e-6)
    for t, f in zip(runs["torch.optim"], runs["fusedopt"]):
        assert abs(t["accuracy"] - f["accuracy"]) <= MARGIN


@pytest.mark.parametrize("name", [n for n, s in seed.SCHEDULES.items() if s.needs_metric])
def test_plateau_schedules(mnist, name):
    factor = seed.SCHEDULES[name].kwargs["factor"]
    runs = seed.run_schedules(mnist, [name], epochs=5, iters_per_epoch=30)[name]
    for label, history in runs.items():
        accuracies = [h["accuracy"] for h in history]
        assert [h["lr"] for h in history] == pytest.approx(expected_plateau_lrs(0.1, factor, accuracies), rel=1e-9)
        assert accuracies[-1] > MIN_ACCURACY, label
    # and the rule reproduces the tutorial's own printed LRs from its printed accuracies
    s = seed.SCHEDULES[name]
    assert expected_plateau_lrs(0.1, factor, s.seed_accuracy) == pytest.approx(s.seed_lrs, rel=1e-9)
