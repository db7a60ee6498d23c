"""The benchmarks measure what they say: their modes change what they claim between steps, torch and fusedopt
variants train with the same learning rates and data, unsupported torch implementations print "–", and every
command-line option states its default. Tiny configurations on the CPU: a few seconds in all."""
import json
import math

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import fusedopt  # noqa: E402
from benchmarks import bench_low_precision, bench_step, seed_experiments, train_loop  # noqa: E402
from benchmarks.common import OPTIMIZERS, make_optimizer  # noqa: E402

needs_extension = pytest.mark.skipif(not fusedopt.EXTENSION_AVAILABLE, reason="fusedopt extension not built")


def _params(n=3):
    params = [torch.zeros(5, requires_grad=True) for _ in range(n)]
    grads = [torch.randn(5) for _ in params]
    for p, g in zip(params, grads):
        p.grad = g
    return params, grads


@pytest.mark.parametrize("mode", list(bench_step.MODES))
def test_bench_step_modes_change_what_they_claim(mode):
    params, grads = _params()
    opt = make_optimizer(OPTIMIZERS["adam"], "forloop", params)
    prepare = bench_step.make_prepare(mode, params, grads, opt)
    flags = bench_step.MODES[mode]
    if not any(flags.values()):
        assert prepare is None
        return
    lrs, ptrs = [], []
    for _ in range(3):
        prepare()
        lrs.append(opt.param_groups[0]["lr"])
        ptrs.append([p.grad.data_ptr() for p in params])
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)  # same values: only the tensors (or the lr) change
    if flags["new_grads"]:
        assert all(p.grad is not g for p, g in zip(params, grads))
        assert ptrs[0] != ptrs[1] and ptrs[1] != ptrs[2]  # new storage every step, as after set_to_none
    else:
        assert all(p.grad is g for p, g in zip(params, grads))
    if flags["varying_lr"]:
        assert len(set(lrs)) == 3
    else:
        assert len(set(lrs)) == 1


@needs_extension
def test_bench_step_host_workloads_and_dash_for_missing_torch_impls(tmp_path, capsys):
    records = bench_step.main(["--optimizers", "adadelta", "--workloads", "host", "single", "--modes", "stable",
                               "realistic", "--reps", "2", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert {r["mode"] for r in records} == {"stable", "realistic"}
    fused = [r for r in records if r["impl"] == "fused"]
    assert fused and all("skipped" in r for r in fused)  # torch has no fused Adadelta
    assert "not supported" not in out and "–" in out
    timed = [r for r in records if "median_s" in r]
    assert {r["impl"] for r in timed} == {"fusedopt", "forloop", "foreach"}
    assert {r["workload"] for r in timed} == {"host", "single"}
    for r in timed:
        tensors = bench_step.HOST_TENSORS if r["workload"] == "host" else 1  # single: the step's fixed cost
        assert r["n_tensors"] == tensors and r["clock"] == "host" and r["params_finite"]
        assert math.isclose(r["us_per_tensor"], 1e6 * r["median_s"] / r["n_tensors"])
    saved = json.loads(next(tmp_path.glob("bench_step_cpu*.json")).read_text())
    assert saved["results"] == json.loads(json.dumps(records)) and saved["meta"]["duration_s"] > 0
    assert next(tmp_path.glob("bench_step_cpu*.png")).stat().st_size > 0


@needs_extension
@pytest.mark.parametrize("dtype", list(bench_low_precision.STEP_DTYPES))
def test_bench_low_precision_times_every_mode_on_the_dtype_asked(dtype, tmp_path, capsys):
    (record,) = bench_low_precision.main(["--parts", "step", "--devices", "cpu", "--step-dtype", dtype,
                                          "--optimizers", "sgd_momentum", "--tensors", "2", "--numel-log2", "10",
                                          "--reps", "2", "--warmup", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = [r for r in record["step"] if r["impl"] == "fusedopt"]
    assert {r["mode"] for r in rows} == set(bench_low_precision.MODES)
    expected = str(bench_low_precision.STEP_DTYPES[dtype])
    for r in rows:
        assert r["dtype"] == dtype and r["param_dtype"] == expected and r["params_finite"] and r["median_s"] > 0
        assert r["mode"] == "nearest" or r["verdict"] in ("ok", "OVER")
    assert f"Step time, {dtype} params" in out and f"add_ ({dtype}, reference)" in out
    saved = json.loads(next(tmp_path.glob("bench_low_precision_cpu*.json")).read_text())
    assert saved["args"]["step_dtype"] == dtype and saved["step"] == json.loads(json.dumps(record["step"]))


@needs_extension
def test_bench_low_precision_peer_rows_compare_with_the_same_mode(tmp_path, capsys, monkeypatch):
    """A peer is timed beside the fusedopt mode it names and gets fusedopt's speed-up over it; one whose library
    is missing is a row saying so, not a failure."""
    def torch_sgd(params, **kwargs):  # a stand-in peer that every machine has
        return torch.optim.SGD(params, **kwargs, foreach=False)

    def missing(params, **kwargs):
        raise ImportError("No module named 'nosuchlib'")

    monkeypatch.setitem(bench_low_precision.LOW_PRECISION_PEERS, "sgd_momentum", [
        bench_low_precision.LowPrecisionPeer("stand-in SGD", torch_sgd, "nearest"),
        bench_low_precision.LowPrecisionPeer("missing SGD", missing, "kahan")])
    (record,) = bench_low_precision.main(["--parts", "step", "--devices", "cpu", "--optimizers", "sgd_momentum",
                                          "--tensors", "2", "--numel-log2", "10", "--reps", "3", "--warmup", "0",
                                          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = {r["label"]: r for r in record["step"]}
    timed, absent = rows["stand-in SGD"], rows["missing SGD"]
    nearest = rows["fusedopt nearest"]
    assert timed["impl"] == "peer" and timed["params_finite"] and timed["median_s"] > 0
    assert math.isclose(timed["fusedopt_speedup"], timed["median_s"] / nearest["median_s"])
    assert f"fusedopt nearest {timed['fusedopt_speedup']:.2f}x faster" in out
    assert absent["skipped"].startswith("not installed (") and "nosuchlib" in absent["skipped"]
    assert "median_s" not in absent and "missing SGD" in out


@pytest.mark.parametrize("n", range(1, 9))
def test_round_orders_balance_what_ran_just_before(n):
    """Every round runs each name once; over a cycle (n rounds, 2n for an odd n) every name directly follows every
    other equally often within rounds; no name runs twice in a row across the joins; seeded, so ranks agree."""
    from collections import Counter

    from benchmarks.common import round_orders
    names = [f"impl{i}" for i in range(n)]
    cycle = n if n % 2 == 0 else 2 * n
    orders = round_orders(names, 3 * cycle)
    assert all(sorted(order) == names for order in orders)
    assert orders == round_orders(names, 3 * cycle) and round_orders(names, 0) == []
    for c in range(3):
        within = Counter((order[j - 1], order[j]) for order in orders[c * cycle:(c + 1) * cycle] for j in range(1, n))
        assert set(within) == {(a, b) for a in names for b in names if a != b}
        assert len(set(within.values())) <= 1
    calls = [name for order in orders for name in order]
    if n >= 3:
        assert all(a != b for a, b in zip(calls, calls[1:]))
    if n == 5:  # bench_step's 4 implementations + add_: fusedopt (first) no longer follows add_ (last) most rounds
        first_five = [name for order in orders[:5] for name in order]
        before_first = Counter(a for a, b in zip(first_five, first_five[1:]) if b == names[0])
        assert max(before_first.values()) <= 2


@pytest.mark.parametrize("module, argv", [(bench_step, []), (train_loop, []), (seed_experiments, ["optimizers"]),
                                          (bench_low_precision, [])],
                         ids=["bench_step", "train_loop", "seed_experiments", "bench_low_precision"])
def test_every_option_states_its_default(module, argv, monkeypatch):
    parser = {}
    real_parse = __import__("argparse").ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        parser["p"] = self
        return real_parse(self, args, namespace)

    monkeypatch.setattr("argparse.ArgumentParser.parse_args", capture)
    module.parse_args(argv)
    actions = [a for a in parser["p"]._actions if a.option_strings and a.dest != "help"]
    assert actions
    for action in actions:
        assert action.help and "default" in action.help, f"{action.option_strings}: no default in its help"
    assert "QUICK_DURATION_TEXT" not in (module.__doc__ or "") + parser["p"].format_help()


@needs_extension
@pytest.mark.parametrize("name", ["hf", "amp_fp16"])
def test_train_loop_torch_and_fusedopt_schedules_give_the_same_lrs(name):
    """The warm-up + cosine LambdaLR of the torch variants and the fusedopt.lr_scheduler of the 'own features'
    variants give the same learning rate at every iteration, so their steps/s compare the same training."""
    scenario, total = train_loop.SCENARIOS[name], 40
    p_torch, p_fused = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    o_torch = torch.optim.AdamW([p_torch], lr=1e-3)
    o_fused = fusedopt.FusedAdamW([p_fused], lr=1e-3)
    s_torch = train_loop.torch_scheduler(scenario, o_torch, total)
    s_fused = train_loop.fusedopt_scheduler(scenario, o_fused, total)
    torch_lrs, fused_lrs = [], []
    for _ in range(total):
        torch_lrs.append(o_torch.param_groups[0]["lr"])
        fused_lrs.append(float(o_fused.param_groups[0]["lr"]))
        for p in (p_torch, p_fused):
            p.grad = torch.ones(3)
        o_torch.step()
        o_fused.step()  # per_step=True: the step advances the schedule
        s_torch.step()
        s_fused.step()  # a no-op
    assert len(set(torch_lrs)) > total // 2  # the schedule does move
    assert fused_lrs == pytest.approx(torch_lrs, rel=1e-9)


@needs_extension
def test_train_loop_runs_every_cpu_variant_on_the_same_training(tmp_path, capsys):
    results = train_loop.main(["--scenarios", "sgd_steplr", "--rounds", "2", "--iters", "2", "--warmup", "1",
                               "--device", "cpu", "--no-compile", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    (res,) = results
    ran = [v for v in res["variants"] if "steps_per_s" in v]
    labels = {v["label"] for v in ran}
    assert {"torch forloop", "torch foreach", "fusedopt + torch features", "fusedopt own features"} <= labels
    assert {m["label"] for m in res["not_run"]} >= {"torch compiled", "fusedopt own + CUDA graph"}
    iterations = {v["iterations"] for v in ran}
    assert iterations == {1 + 2 * 2}
    losses = [v["final_loss"] for v in ran]
    # same initial model, same batches, same lr schedule (StepLR per epoch): the same training
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), losses
    for v in ran:
        assert v["steps_per_s"] > 0 and v["device_ms"] == v["host_ms"] and len(v["steps_per_s_rounds"]) == 2
    assert "n/a" in out
    saved = json.loads(next(tmp_path.glob("train_loop_cpu*.json")).read_text())
    assert saved["scenarios"][0]["variants"] == json.loads(json.dumps(res["variants"]))
    assert next(tmp_path.glob("train_loop_cpu*.png")).stat().st_size > 0
