"""The op layer: registration, schemas (torch.library.opcheck), the build, and the table cache."""
import os
import shutil

import pytest
import torch

import fusedopt
from fusedopt import _ops

from conftest import DEVICES
from registry import ENTRIES

# Every registered class with its defaults and its richest option set; several param groups, awkward sizes.
OP_CASES = [pytest.param(entry.name, entry.option_sets[opt_id], id=f"{entry.name}-{opt_id}")
            for entry in ENTRIES for opt_id in entry.representative]
# The ops each registered class runs (resolved in the test, so a missing class fails only its own cases).
OP_SOURCES = [entry.name for entry in ENTRIES] + ["advance_schedule_"]


def test_extension_is_loaded():
    # CI must test the compiled kernels, never the torch fallback.
    assert fusedopt.EXTENSION_AVAILABLE, f"fusedopt._C failed to load: {_ops.EXTENSION_ERROR}"


def _cuda_build_expected():
    return (torch.version.cuda is not None and shutil.which("nvcc") is not None
            and os.environ.get("FUSEDOPT_CPU_ONLY", "0") != "1")


@pytest.mark.parametrize("source", OP_SOURCES)
def test_kernels_registered_for_every_built_device(source):
    name = source if source.endswith("_") else _entry(source).fused_cls._op_name
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has_kernel(f"fusedopt::{name}", "CPU")
    if _cuda_build_expected():  # a CUDA kernel that did not compile must fail CI, GPU or not
        assert has_kernel(f"fusedopt::{name}", "CUDA")


def _optimizer_with_grads(cls, options, device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    shapes = [(1,), (4097,), (0, 3), (3, 5)]
    params = [torch.randn(s, generator=generator, dtype=dtype).to(device).requires_grad_() for s in shapes]
    lr = options.get("lr", cls._torch_class()([torch.zeros(1)]).defaults["lr"])
    optimizer = cls([{"params": params[:2]}, {"params": params[2:], "lr": lr / 2}], **options)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=dtype).to(device)
    return optimizer


def _entry(name):
    return next(entry for entry in ENTRIES if entry.name == name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,options", OP_CASES)
def test_opcheck(name, options, device):
    optimizer = _optimizer_with_grads(_entry(name).fused_cls, options, device)
    invocations = optimizer._op_invocations()
    assert len(invocations) == 1  # one launch for all groups of one device and dtype
    op, kwargs = invocations[0]
    # Params are leaves that require grad; the op, like torch's fused optimizer ops, runs outside autograd.
    kwargs = {k: [t.detach() for t in a] if isinstance(a, list) and a and torch.is_tensor(a[0]) and a[0].requires_grad
              else a for k, a in kwargs.items()}
    torch.library.opcheck(op, (), kwargs)


def test_lists_of_wrong_length_are_rejected_before_any_write():
    optimizer = _optimizer_with_grads(fusedopt.FusedAdam, dict(lr=0.01), "cpu")
    op, kwargs = optimizer._op_invocations()[0]
    params = [p.detach().clone() for p in kwargs["params"]]
    with pytest.raises(RuntimeError, match="grads"):
        op(**{**kwargs, "grads": kwargs["grads"][:-1]})
    assert all(torch.equal(a, b) for a, b in zip(params, kwargs["params"]))


@pytest.mark.parametrize("argument,spoil,message", [
    ("group_ends", lambda ends: ends[::-1], "group_ends must be non-decreasing"),
    ("group_ends", lambda ends: ends[:-1] + [ends[-1] - 1], "group_ends must end at the number of params"),
    ("hyper", lambda hyper: hyper[:-1], "hyperparameters for each of 2 groups, got 7"),
    ("fresh_state", lambda flags: flags[:-1], "got 4 params but 3 fresh_state flags"),
])
def test_list_arguments_are_checked_before_any_write(argument, spoil, message):
    """The int[] and float[] arguments, read in place from the call (ScalarSpan): a wrong one raises, naming it,
    before any param or state changes."""
    optimizer = _optimizer_with_grads(fusedopt.FusedSGD, dict(lr=0.01, momentum=0.9), "cpu")
    op, kwargs = optimizer._op_invocations()[0]
    assert len(kwargs["fresh_state"]) == 4 and kwargs["group_ends"] == [2, 4]
    written = [t.detach().clone() for t in kwargs["params"] + kwargs["momentum_buffer"]]
    with pytest.raises(RuntimeError, match=message):
        op(**{**kwargs, argument: spoil(list(kwargs[argument]))})
    assert all(torch.equal(a, b) for a, b in zip(written, kwargs["params"] + kwargs["momentum_buffer"]))
    op(**kwargs)  # the same call with its own lists runs
    assert not torch.equal(written[1], kwargs["params"][1])


def test_table_is_rewritten_only_when_pointers_or_hyperparameters_change():
    optimizer = _optimizer_with_grads(fusedopt.FusedAdam, dict(lr=0.01), "cpu")
    optimizer.step()
    launch = optimizer._plan.launches[0]
    table = launch.host_table.clone()
    for p in optimizer.param_groups[0]["params"]:
        p.grad.normal_()  # same storage: same table
    optimizer.step()
    assert torch.equal(table, launch.host_table)
    optimizer.param_groups[1]["lr"] = 0.5  # a hyperparameter change reaches the table
    optimizer.step()
    assert not torch.equal(table, launch.host_table)
    assert optimizer._plan.launches[0] is launch  # ... without rebuilding the plan


def test_groups_with_different_options_share_device_tables_per_option_set():
    params = [torch.randn(8, requires_grad=True) for _ in range(4)]
    optimizer = fusedopt.FusedSGD([{"params": params[:2], "momentum": 0.9}, {"params": params[2:]}], lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    assert len(optimizer._op_invocations()) == 2  # momentum and plain SGD are different kernels


def test_missing_extension_warns_once_and_falls_back_to_torch():
    # A fresh interpreter where fusedopt._C cannot be imported, as on a machine where the build failed.
    code = """
import sys, warnings
sys.modules["fusedopt._C"] = None
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fusedopt
    import fusedopt.optimizers
import torch
assert not fusedopt.EXTENSION_AVAILABLE
assert len([w for w in caught if "fusedopt" in str(w.message)]) == 1, [str(w.message) for w in caught]
torch.manual_seed(0)
a = torch.randn(10, requires_grad=True); b = a.detach().clone().requires_grad_()
fused, ref = fusedopt.FusedAdam([a], lr=0.1), torch.optim.Adam([b], lr=0.1)
for _ in range(3):
    g = torch.randn(10); a.grad = g.clone(); b.grad = g.clone(); fused.step(); ref.step()
assert torch.equal(a, b)
print("fallback ok")
"""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stderr
