"""Train a small GPT-style model with FSDP2 (+ optional tensor parallel), a fusedopt optimizer, a device LR
schedule and torch.distributed.checkpoint.

    torchrun --nproc-per-node 2 examples/fsdp2_train.py                  # CPU (gloo) or one GPU per rank (nccl)
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --tp 2           # FSDP x TP on a (dp, tp) mesh
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --stop-after 30  # "preempted" after saving step 30
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --resume         # continues from the latest checkpoint

Each block is sharded with ``fully_shard`` (after ``parallelize_module`` with ``--tp``), then the root. The
optimizer is ``FusedAdamW`` over the DTensor params with global-norm clipping inside the step; the learning rate
warms up linearly and then follows a cosine, advanced by the step itself on the device. Every ``--ckpt-every``
steps the model, optimizer and schedule are saved with DCP under ``--ckpt-dir``/step_N (sharded: each rank writes
its shards); ``--resume`` loads the latest, on any number of ranks and any --tp.
"""
import argparse
import math
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import fusedopt
from fusedopt import lr_scheduler


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm1(x)
        # -1 heads: with tensor parallel each rank holds heads / tp of them
        q, k, v = (proj(h).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, d, heads, layers, ctx):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


TP_PLAN = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel(),
           "up": ColwiseParallel(), "down": RowwiseParallel()}


def shard(model, mesh, tp):
    dp_mesh = mesh["dp"]
    for block in model.blocks:
        if tp > 1:
            parallelize_module(block, mesh["tp"], TP_PLAN)
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


def batches(vocab, ctx, batch, dp_rank, device, seed=0):
    """A toy language: each sequence counts upward modulo vocab from a random start (learnable quickly)."""
    generator = torch.Generator().manual_seed(seed * 1000 + dp_rank)
    while True:
        start = torch.randint(0, vocab, (batch, 1), generator=generator)
        seq = (start + torch.arange(ctx + 1)) % vocab
        yield seq[:, :-1].to(device), seq[:, 1:].to(device)


def latest_checkpoint(ckpt_dir):
    steps = sorted(name for name in os.listdir(ckpt_dir) if name.startswith("step_"))
    if not steps:
        raise SystemExit(f"--resume: no step_N checkpoint in {ckpt_dir}")
    return os.path.join(ckpt_dir, steps[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (divides the world size and --heads)")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=97)
    ap.add_argument("--ctx", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--ckpt-dir", default="/tmp/fusedopt_fsdp2_ckpt")
    ap.add_argument("--ckpt-every", type=int, default=30)
    ap.add_argument("--stop-after", type=int, default=None, help="exit after this many steps (a preemption)")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device.type, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)  # the same initial weights on every rank before sharding
    model = GPT(args.vocab, args.d, args.heads, args.layers, args.ctx).to(device)
    shard(model, mesh, args.tp)
    opt = fusedopt.FusedAdamW(model.parameters(), lr=args.lr, weight_decay=0.1, max_grad_norm=1.0)
    warmup = lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=args.warmup)
    cosine = lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps - args.warmup)
    sched = lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[args.warmup], per_step=True)

    first = 0
    if args.resume:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                 "sched": sched.state_dict(), "step": 0}
        path = latest_checkpoint(args.ckpt_dir)
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        sched.load_state_dict(state["sched"])
        first = state["step"]
        if rank == 0:
            print(f"resumed from {path} at step {first}")

    data = batches(args.vocab, args.ctx, args.batch, mesh.get_local_rank("dp"), device, seed=first)
    loss = None
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(first, last):
        idx, target = next(data)
        loss = F.cross_entropy(model(idx).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()  # also advances the schedule, on the device
        opt.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == last - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")
        if (step + 1) % args.ckpt_every == 0:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                     "sched": sched.state_dict(), "step": step + 1}
            path = os.path.join(args.ckpt_dir, f"step_{step + 1:06d}")
            dcp.save(state, checkpoint_id=path)
            if rank == 0:
                print(f"saved step {step + 1} to {path}")
    if rank == 0 and loss is not None:
        print(f"last loss {loss.item():.4f} (a uniform guess: {math.log(args.vocab):.4f})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
