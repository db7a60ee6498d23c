"""End-to-end training throughput: a small GPT-style transformer with an LR schedule, torch.optim vs fusedopt.

    python -m benchmarks.train_loop                       # CUDA if available, else CPU (smaller model)
    python -m benchmarks.train_loop --optimizer adam --steps 200

Every variant starts from the same weights and sees the same batches (random tokens, next-token loss), so the
final losses should agree; the steps/s show what a faster step buys in a whole iteration. On CUDA one more
variant captures forward + backward + fusedopt's step in a CUDA graph and replays it: the learning rate is a
device tensor that the scheduler fills in place between replays, so the schedule still applies.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import IMPLS, OPTIMIZERS, default_device, make_optimizer, probe, run_metadata, synchronize


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos.weight[:t]
        return self.head(self.norm(self.blocks(x, mask=self.mask[:t, :t], is_causal=True)))


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to 10%: the usual transformer schedule, as a LambdaLR factor."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def loss_fn(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def run_eager(model, optimizer, scheduler, batches, steps, warmup, device):
    def step(i):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batches[i % len(batches)])
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss
    for i in range(warmup):
        step(i)
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    synchronize(device)
    return steps / (time.perf_counter() - t0), loss.item()


def run_graph(model, optimizer, scheduler, batches, steps, warmup, device):
    """Forward + backward + step captured once, replayed per iteration (torch.cuda.graphs' whole-network recipe).

    Unlike that recipe, grads are zeroed in place rather than set to None, so they keep their addresses from the
    first warm-up step on: fusedopt caches a table of tensor addresses and re-uploads it when they change, and
    with stable grads no upload is captured, so each replay is exactly forward, backward and one step kernel."""
    static_batch = batches[0].clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires, so lazy state is allocated
        for i in range(warmup):
            optimizer.zero_grad(set_to_none=False)
            static_batch.copy_(batches[i % len(batches)])
            loss_fn(model, static_batch).backward()
            optimizer.step()
            scheduler.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.zero_grad(set_to_none=False)  # captured memsets; backward then accumulates into the same grads
        static_loss = loss_fn(model, static_batch)
        static_loss.backward()
        optimizer.step()
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        static_batch.copy_(batches[i % len(batches)])
        graph.replay()
        scheduler.step()  # fills the device lr tensor the captured step reads
    synchronize(device)
    return steps / (time.perf_counter() - t0), static_loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (CUDA 300, CPU 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (CUDA 20, CPU 3)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    on_gpu = device.type == "cuda"
    steps = args.steps or (300 if on_gpu else 20)
    warmup = args.warmup if args.warmup is not None else (20 if on_gpu else 3)
    # GPU: ~20M params, a size where the optimizer is a visible share of an iteration; CPU: small enough to finish
    shape = dict(vocab=8192, d=384, layers=6, heads=6, ctx=128) if on_gpu else dict(vocab=2048, d=128, layers=2,
                                                                                     heads=4, ctx=64)
    batch = 32 if on_gpu else 8
    spec = OPTIMIZERS[args.optimizer]

    torch.manual_seed(args.seed)
    reference = TinyGPT(**shape).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    batches = [torch.randint(shape["vocab"], (batch, shape["ctx"] + 1), device=device, generator=gen)
               for _ in range(8)]
    meta = run_metadata(device)
    n_params = sum(p.numel() for p in reference.parameters())
    print(f"train_loop on {meta['device_name']} | torch {meta['torch']} | fusedopt extension loaded: "
          f"{meta.get('fusedopt_extension_available')} | {args.optimizer}, {n_params / 1e6:.1f}M params, "
          f"batch {batch}x{shape['ctx']}, {warmup} warm-up + {steps} timed steps")

    variants = [(impl, run_eager) for impl in IMPLS if probe(spec, impl, device, torch.float32) is None]
    if on_gpu and meta.get("fusedopt_extension_available"):  # torch's fallback step is not capturable like this
        variants.append(("fusedopt", run_graph))
    results = []
    for impl, runner in variants:
        model = copy.deepcopy(reference)
        graphed = runner is run_graph
        # A captured step must read lr from device memory: a python float would be frozen into the graph.
        # fusedopt's kernels take a 0-dim device lr tensor that way and keep `step` on the device already.
        extra = dict(lr=torch.tensor(spec.kwargs["lr"], device=device)) if graphed else {}
        optimizer = make_optimizer(spec, impl, model.parameters(), **extra)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, warmup + steps))
        label = ("fusedopt" if impl == "fusedopt" else f"torch {impl}") + (" + CUDA graph" if graphed else "")
        try:
            rate, loss = runner(model, optimizer, scheduler, batches, steps, warmup, device)
        except Exception as exc:  # noqa: BLE001 - report the variant that cannot run, keep the others
            print(f"  {label:<24} failed: {type(exc).__name__}: {exc}")
            continue
        results.append((label, rate, loss))
        print(f"  {label:<24} {rate:8.2f} steps/s   final loss {loss:.4f}")
    base = next((rate for label, rate, _ in results if label == "torch foreach"), None)
    if base:
        speedups = ", ".join(f"{label} {rate / base:.2f}x" for label, rate, _ in results)
        print(f"\nspeed-up over torch foreach: {speedups}")
    return results


if __name__ == "__main__":
    main()
