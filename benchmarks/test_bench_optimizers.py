"""pytest-benchmark suite: one step of every optimizer, fusedopt vs torch.optim, on a small parameter set.

    pytest benchmarks --benchmark-only                          # a table per optimizer (benchmark.group)
    pytest benchmarks --benchmark-only --benchmark-autosave     # keep the run in .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare      # compare with the last saved run

CUDA when available, else CPU. Runs a fixed number of rounds, so the suite takes about a minute on 2 CPU cores.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks.common import IMPLS, OPTIMIZERS, default_device, make_optimizer, probe, synchronize  # noqa: E402

DEVICE = default_device()
# a few matrices and many vectors, like a small model: per-tensor overhead and bandwidth both matter
SHAPES = [(512, 512)] * 4 + [(512, 2048)] * 2 + [(512,)] * 40 + [(64, 64)] * 60


@pytest.fixture(scope="module")
def params():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    out = []
    for shape in SHAPES:
        p = torch.randn(shape, device=DEVICE, generator=gen).mul_(0.02).requires_grad_()
        p.grad = torch.randn(shape, device=DEVICE, generator=gen).mul_(1e-3)  # set once, reused by every step
        out.append(p)
    return out


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step(benchmark, params, name, impl):
    spec = OPTIMIZERS[name]
    why = probe(spec, impl, DEVICE, torch.float32)
    if why:
        pytest.skip(f"torch.optim.{spec.torch_name} {impl}: {why}")
    if impl == "fusedopt":
        import fusedopt
        if not fusedopt.EXTENSION_AVAILABLE:
            pytest.skip("fusedopt's compiled extension is not loaded: nothing fused to measure")
    optimizer = make_optimizer(spec, impl, params)
    benchmark.group = f"{name} ({DEVICE.type}, {sum(p.numel() for p in params) / 1e6:.1f}M params)"
    benchmark.extra_info.update(optimizer=name, impl=impl, device=str(DEVICE))

    def step():
        optimizer.step()
        synchronize(DEVICE)  # on CUDA the kernel's time, not just its launch

    benchmark.pedantic(step, warmup_rounds=3, rounds=30 if DEVICE.type == "cpu" else 200, iterations=1)
