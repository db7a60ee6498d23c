"""State-dict compatibility between fusedopt and torch.optim, through real checkpoints."""
import io

import pytest
import torch

from conftest import (
    DEVICES,
    SHAPE_SETS,
    STEPS,
    TOLERANCES,
    PSpec,
    Problem,
    assert_matches,
    check_fused_step,
    run,
    train,
)
from registry import option_params

# several groups, a transposed param, a param that never gets a grad and one whose state only appears after
# the checkpoint, so loading must cope with params with and without state
SPECS = SHAPE_SETS["groups"] + (
    PSpec((5, 7), layout="transposed", group=1),
    PSpec((4,), group=1, grad="never"),
    PSpec((3, 2), group=2, grad="late"),  # first grad at step 10
)
CHECKPOINT_AT = 8
DTYPE = torch.float32


def _checkpoint(sd, map_location):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, map_location=map_location)  # weights_only: the state dict must be plain data


@pytest.mark.parametrize("map_location", DEVICES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dst_stepped", [False, True], ids=["fresh_dst", "stepped_dst"])
@pytest.mark.parametrize("direction", ["fused_to_torch", "torch_to_fused", "fused_to_fused"])
@pytest.mark.parametrize("entry,opt_id", option_params(representative_only=True))
def test_resume_from_checkpoint(entry, opt_id, direction, dst_stepped, device, map_location):
    """Train k steps with one implementation, checkpoint, resume with the other: the result must equal a
    run that used torch.optim all along. The destination is either fresh or has already stepped (rolling
    back to a checkpoint): loading must replace whatever state it had and whatever it cached from it."""
    kwargs = entry.option_sets[opt_id]
    src_cls, dst_cls = {
        "fused_to_torch": (entry.fused_cls, entry.torch_cls),
        "torch_to_fused": (entry.torch_cls, entry.fused_cls),
        "fused_to_fused": (entry.fused_cls, entry.fused_cls),
    }[direction]
    problem = Problem(SPECS, device, seed=5)
    ref, ref_params = run(entry.torch_cls, problem, DTYPE, kwargs, entry.group_overrides, steps=STEPS)

    src, src_params = run(src_cls, problem, DTYPE, kwargs, entry.group_overrides, steps=CHECKPOINT_AT)
    loaded = _checkpoint(src.state_dict(), map_location)

    dst_params = problem.params(DTYPE)
    dst = dst_cls(problem.param_arg(dst_params, entry.group_overrides), **kwargs)
    if dst_stepped:
        train(dst, Problem(SPECS, device, seed=99), dst_params, 0, 12)
    with torch.no_grad():
        for d, s in zip(dst_params, src_params):
            d.copy_(s)  # the model weights are restored separately, as in a real resume
    dst.load_state_dict(loaded)
    train(dst, problem, dst_params, CHECKPOINT_AT, STEPS)
    assert_matches(dst, dst_params, ref, ref_params, **TOLERANCES[DTYPE], fused_is_fusedopt=dst_cls is entry.fused_cls)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry,opt_id", option_params(representative_only=True))
def test_state_dict_layout_matches_torch(entry, opt_id, device):
    """Same param_groups (hyperparameters and param indices) and same per-param state keys and values."""
    kwargs = entry.option_sets[opt_id]
    problem = Problem(SPECS, device, seed=6)
    fused, fp = run(entry.fused_cls, problem, DTYPE, kwargs, entry.group_overrides, steps=CHECKPOINT_AT)
    ref, rp = run(entry.torch_cls, problem, DTYPE, kwargs, entry.group_overrides, steps=CHECKPOINT_AT)
    fsd, rsd = fused.state_dict(), ref.state_dict()
    assert set(fsd) == set(rsd)
    assert len(fsd["param_groups"]) == len(rsd["param_groups"])
    for fg, rg in zip(fsd["param_groups"], rsd["param_groups"]):
        assert fg["params"] == rg["params"]
        assert set(fg) == set(rg)
        assert {k: v for k, v in fg.items() if k not in ("foreach", "fused", "capturable")} == {
            k: v for k, v in rg.items() if k not in ("foreach", "fused", "capturable")
        }
    # an empty state entry means the same as none (torch treats both as "not started"), so ignore them
    fstate = {i: s for i, s in fsd["state"].items() if s}
    assert set(fstate) == set(rsd["state"]), "different params have state"
    for idx, rs in rsd["state"].items():
        fs = fsd["state"][idx]
        assert set(fs) == set(rs), f"param {idx}: state keys {sorted(fs)} != {sorted(rs)}"
        for key, rv in rs.items():
            if key == "step":
                check_fused_step(fs[key], fp[idx])
                assert float(fs[key]) == float(rv)
            else:
                torch.testing.assert_close(fs[key], rv, **TOLERANCES[DTYPE])
