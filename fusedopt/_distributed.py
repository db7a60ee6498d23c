"""DTensor params (FSDP2, tensor parallel, HSDP, several meshes) in the fused step.

Every update rule is element-wise, so a DTensor param is updated through its local shard, in the same launch as
every other param of its (device, dtype, options): the kernel sees ``param._local_tensor``, the local shards of
its state (which stay DTensors with the param's mesh and placements, as torch.optim keeps them, so
``torch.distributed.checkpoint`` saves and reshards them) and of its grad (read in C++, csrc/cached_call.cpp).

The only cross-rank quantity is the gradient statistics [sum of squares, non-finite count] that clipping and
GradScaler need. They are global as ``torch.nn.utils.clip_grad_norm_`` computes them on DTensor grads: summed
over the mesh dimensions where a grad is sharded, counted once over those where it is replicated. A launch holds
only params with the same replication count R (how many ranks hold each element: see ``replicas``; a plain
tensor counts as replicated on every rank), so each launch reduces its grads into its own row of a small
per-device tensor; then, on the stream, the rows are weighted by 1/R, summed and all-reduced once over the ranks
the params' (root) meshes span, and the update launches read that total. No host sync: the statistics never
leave the device, and the collective is ordered on the stream like any other op.

A param on a slice of a larger mesh (FSDP over mesh["dp"] of a (dp, tp) mesh, for params tensor parallel leaves
alone) counts as replicated over the root mesh's other dimensions, which is what FSDP + TP training makes it.
Pipeline stages that share a root mesh but hold different params are not such replicas: give each stage its own
optimizer without max_grad_norm and clip across stages outside it.
"""
import math

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without torch.distributed
    DTensor = None


def is_dtensor(tensor):
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor):
    """The tensor the kernel reads and writes: a DTensor's local shard, any other tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def _root(mesh):
    """The mesh a mesh was sliced from (mesh["dp"] of a (dp, tp) mesh), or the mesh itself."""
    get_root = getattr(mesh, "_get_root_mesh", None)
    return get_root() if get_root is not None else mesh


def replicas(param):
    """How many ranks of the param's root mesh hold each of its elements: the sizes of its Replicate dimensions
    multiplied (1 for FSDP2's Shard(0), the replicate-group size for HSDP), times the dimensions of the root mesh
    its mesh is not a slice of (a param FSDP shards over mesh["dp"] of a (dp, tp) mesh is the same on every tp
    rank); None for a plain tensor."""
    if not is_dtensor(param):
        return None
    mesh = param.device_mesh
    implicit = _root(mesh).size() // mesh.size()
    return implicit * math.prod(mesh.size(d) for d, p in enumerate(param.placements) if p.is_replicate())


def launch_key(param):
    """Extends a launch's (device, dtype, options) key: params of different replication counts go to different
    launches, whose gradient statistics are weighted differently across ranks."""
    return (replicas(param),)


# ---- Checks, before any state is created or any launch runs ----

def _describe(tensor):
    if is_dtensor(tensor):
        return f"a DTensor with placements {tuple(tensor.placements)} on {tensor.device_mesh}"
    return f"a plain {type(tensor).__name__}"


def _same_layout(grad_spec, param_spec):
    """Whether a grad's DTensorSpec (None for a plain grad) has its param's mesh and placements. Identity first:
    FSDP2 builds its grads with the param's own spec, and comparing meshes by value costs microseconds."""
    return grad_spec is param_spec or (
        grad_spec is not None and grad_spec.placements == param_spec.placements
        and (grad_spec.mesh is param_spec.mesh or grad_spec.mesh == param_spec.mesh))


def _grad_matches(param, grad):
    if not is_dtensor(param):
        return not is_dtensor(grad)
    return _same_layout(grad._spec if is_dtensor(grad) else None, param._spec)


def check_params(name, optimizer):
    """Raises for what the fused step cannot do with DTensor params: params on several devices (the global
    gradient statistics are combined on one device per rank), meshes no process group spans, and a grad laid out
    unlike its param."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_dtensor(p) for p in params):
        return
    devices = sorted({str(p.device) for p in params})
    if len(devices) > 1:
        raise RuntimeError(
            f"{name}: with DTensor params every param must be on one device per rank, but they are on {devices}; "
            "use one optimizer per device type")
    _reduction_groups(_distinct([p.device_mesh for p in params if is_dtensor(p)]))  # raises when there is none
    for param in params:
        grad = param.grad
        if grad is not None and not _grad_matches(param, grad):
            raise RuntimeError(
                f"{name}: the gradient of a param that is {_describe(param)} is {_describe(grad)}; a gradient "
                "must have its param's mesh and placements")


# ---- The plan's distributed part ----

class Reduction:
    """What one step needs for DTensor params: the kernel views to re-check, and how each device's gradient
    statistics combine across ranks."""

    def __init__(self, optimizer, plan):
        # (DTensor param, the local tensor the plan's launch holds, its spec)
        self.views = [(p, p._local_tensor, p._spec) for launch in plan.launches for p in launch.params
                      if is_dtensor(p)]
        # every DTensor param's mesh, with a grad or not, so that every rank finds the same groups
        meshes = _distinct([p.device_mesh for g in optimizer.param_groups for p in g["params"] if is_dtensor(p)])
        self.groups, ranks = _reduction_groups(meshes)
        self.rows = {}  # device -> float64 [launches, 2]: each launch's local statistics, zero between steps
        self.weights = {}  # device -> float64 [launches, 2]: (1/R, 1) per launch
        self.row_of = {}  # id(launch) -> its row
        for device, launches in plan.launches_by_device.items():
            rows = torch.zeros(len(launches), 2, dtype=torch.float64, device=device)
            weights = [[1.0 / (replicas(launch.params[0]) or ranks), 1.0] for launch in launches]
            self.rows[device] = rows
            self.weights[device] = torch.tensor(weights, dtype=torch.float64).to(device)
            for index, launch in enumerate(launches):
                self.row_of[id(launch)] = rows[index]

    def still_valid(self):
        """False when FSDP2 (or anything else) replaced a param's local tensor, or a grad's layout is not its
        param's: the plan is rebuilt, which checks the grads again and raises."""
        for param, view, spec in self.views:  # runs every step: attribute reads and identity tests only
            if param._local_tensor is not view or param._spec is not spec:
                return False
            grad = param.grad
            if grad is not None and not _same_layout(getattr(grad, "_spec", None), spec):
                return False
        return True

    def all_reduce(self, device, grad_stats):
        """Between the reduce and the update launches: grad_stats = the global [sum of squares, non-finite
        count], from every launch's row, on the stream."""
        rows = self.rows[device]
        torch.sum(rows * self.weights[device], dim=0, out=grad_stats)
        for group in self.groups:
            dist.all_reduce(grad_stats, op=dist.ReduceOp.SUM, group=group)
        rows.zero_()


def _distinct(meshes):
    found = []
    for mesh in meshes:
        if not any(mesh is m or mesh == m for m in found):
            found.append(mesh)
    return found


def _reduction_groups(meshes):
    """The process groups whose successive all-reduces sum over every rank the meshes' root meshes span, and how
    many ranks that is: the default group when they span it, else every dimension of a root mesh that covers the
    others."""
    roots = _distinct([_root(mesh) for mesh in meshes])
    ranks = set()
    for mesh in roots:
        ranks.update(mesh.mesh.flatten().tolist())
    if ranks == set(range(dist.get_world_size())):
        return [None], len(ranks)
    for mesh in roots:
        if set(mesh.mesh.flatten().tolist()) >= ranks:
            return [mesh.get_group(d) for d in range(mesh.ndim)], len(ranks)
    raise RuntimeError(
        f"fusedopt: the DTensor params' meshes {meshes} span ranks {sorted(ranks)}, which neither the default "
        "process group nor one of the meshes covers; the global gradient norm needs one group over them all")


def plan_reduction(optimizer, plan):
    """The plan's Reduction, or None when the optimizer has no DTensor param."""
    if not any(is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
        return None
    return Reduction(optimizer, plan)


def still_valid(plan):
    reduction = getattr(plan, "distributed", None)
    return reduction is None or reduction.still_valid()


def grad_stats(plan, launch, phases, device_stats, reduce_only):
    """The grad_stats argument of one call: with DTensor params a reduce-only call writes its launch's row;
    every other call reads (and the last one resets) the device's global statistics."""
    reduction = getattr(plan, "distributed", None)
    if reduction is None or phases != reduce_only:
        return device_stats
    return reduction.row_of[id(launch)]


def all_reduce_grad_stats(plan, device, stats_by_device):
    """After the device's last reduce-only call and before its first update: combine the rows across ranks
    into the device's grad_stats (stats_by_device[device])."""
    reduction = getattr(plan, "distributed", None)
    if reduction is not None:
        reduction.all_reduce(device, stats_by_device[device])


def needs_separate_reduce(plan):
    """With DTensor params the reduce and the update of a launch cannot share one launch: the collective runs
    between them."""
    return getattr(plan, "distributed", None) is not None
