"""DTensor params (FSDP2, tensor parallel, HSDP, several meshes) against torch.optim, in gloo process groups on
the CPU that this file spawns itself (127.0.0.1, free ports).

The cases live in tests/distributed_cases.py. To keep CI short, each world size is spawned once and runs all of
its cases in order (2 ranks: FSDP2 with every Fused* class (uneven and empty shards) and with bf16 params in the
low-precision modes, clipping with a device schedule, GradScaler and ShardedGradScaler with an inf on one rank,
two meshes plus a plain tensor, bad input, DCP checkpoints both ways and full state dicts, DDP/ZeRO; 4 ranks:
FSDP + TP on a 2-D mesh with HSDP, a dp slice and a second mesh; 1 rank: loading the 2-rank checkpoint); each
test below then reads its case's verdict, gathered from every rank.
"""
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

import distributed_cases

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is required")

GROUP_TIMEOUT_S = 300  # a hung collective must fail the tests, not the CI job


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, tmpdir, source_dir="", names=None):
    """Runs the cases of `world` (default: all) in one spawned group; returns {case: [mismatch, ...]} (a case
    missing from it did not run)."""
    names = list(names or distributed_cases.CASES[world])
    context = torch.multiprocessing.start_processes(
        distributed_cases.run_group, args=(world, _free_port(), str(tmpdir), str(source_dir), names),
        nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world}-rank group did not finish in {GROUP_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    path = os.path.join(tmpdir, f"verdicts_{world}.json")
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmpdir = tmp_path_factory.mktemp("dist2")
    return tmpdir, _spawn(2, tmpdir)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _spawn(4, tmp_path_factory.mktemp("dist4"))


@pytest.fixture(scope="module")
def one_rank(two_ranks, tmp_path_factory):
    source, _ = two_ranks
    return _spawn(1, tmp_path_factory.mktemp("dist1"), source)


def _check(verdicts, name):
    assert name in verdicts, f"case {name} did not run (an earlier case broke the group)"
    assert not verdicts[name], "\n".join(verdicts[name])


@pytest.mark.parametrize("name", list(distributed_cases.CASES[2]))
def test_two_ranks(two_ranks, name):
    _check(two_ranks[1], name)


@pytest.mark.parametrize("name", list(distributed_cases.CASES[4]))
def test_four_ranks(four_ranks, name):
    _check(four_ranks, name)


@pytest.mark.parametrize("name", list(distributed_cases.CASES[1]))
def test_two_rank_checkpoint_on_one_rank(one_rank, name):
    _check(one_rank, name)
