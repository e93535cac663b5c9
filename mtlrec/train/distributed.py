"""Data-parallel training on ``torch.distributed``, for runs launched by ``torchrun``.

``mtlrec train`` runs unchanged under ``torchrun --nproc_per_node N``: every process (rank)
holds a full replica of the model, takes its share of every global batch, and all replicas apply
the same update, so a run with N ranks follows the same trajectory as one process with the same
``train.batch_size`` (up to floating-point summation order).

Design, and why:

* **Global batch semantics.** ``train.batch_size`` is the global batch B; each rank gets B / N
  rows of each step (a :class:`~mtlrec.errors.ConfigError` when N does not divide B). All ranks
  draw the same epoch permutation from the same seeded generator and rank r takes the r-th
  contiguous part of every global batch, so a step sees exactly the rows a single process
  would: results do not depend on N, and a checkpoint written with N ranks resumes with any other.
* **Exact losses across shards.** A task's loss is a mean over the rows where it is observed (a
  conversion after a click: clicked rows only), so the mean of the ranks' local means is not the
  global mean when the ranks see different numbers of clicks. :func:`sync_losses` weights each
  rank's local mean by its count over the all-reduced global count and sums the shares with an
  all-reduce whose backward is the identity. Every rank then holds the global loss values
  (balancers that look at loss values — UW, DWA, FAMO, GradNorm, DB-MTL — see the same numbers on
  every rank), and each rank's backward produces its *share* of the global gradient: the shares
  add up to the gradient of the global-batch loss exactly, for any differentiable function of the
  losses, including DB-MTL's logarithm.
* **A manual all-reduce of ``.grad``, not DistributedDataParallel.** DDP hooks into one
  ``loss.backward()``; gradient balancers instead call ``autograd.grad`` once per task and write
  ``.grad`` themselves, and loss-weighting balancers own parameters outside the model. Summing the
  gradient shares after ``balancer.backward`` (:func:`reduce_grads`, bucketed flat buffers)
  works the same way for every balancer. The cost is no overlap of communication with the
  backward pass, which matters little for these models (communication is small next to the
  embedding lookups, and one bucket per 16M floats keeps the number of calls low).
* **Gradient balancers** need the global per-task gradients *before* the surgery (PCGrad of the
  summed gradients is not the sum of per-rank PCGrads): :func:`mtlrec.balance.grads.task_gradients`
  all-reduces the [T, D] matrix and each task's own-parameter gradients. The combined update is
  then the same on every rank, and :class:`~mtlrec.balance.grads.TaskGrads` writes it as a 1/N
  share so the trainer's uniform sum restores it (exact for N a power of two). Random choices
  inside balancers (PCGrad's task order, RLW) come from generators seeded identically on
  every rank.
* **Evaluation** runs on contiguous shards of the validation/test split and gathers the
  predictions (:func:`all_gather_tensor`), so AUC is computed over the union, on rank 0, and the
  metrics are broadcast; early stopping is decided on rank 0 and broadcast. Checkpoints and result
  files are written by rank 0 only.
* **Seeds.** Every rank seeds identically: model initialisation is the same everywhere, the data
  order of every rank derives from the one seeded generator, and the global torch RNG (dropout)
  stays in step on all ranks, so nothing that draws from it can make the replicas drift.

Backend: NCCL when the run trains on a CUDA device and CUDA is available, Gloo otherwise (CPU);
``MTLREC_DIST_BACKEND`` overrides it. Nothing here does anything in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from mtlrec.errors import ConfigError, MTLRecError

if TYPE_CHECKING:
    from mtlrec.data.table import TensorTable
    from mtlrec.models.base import MTLModel

T = TypeVar("T")

#: Elements per all-reduce call when gradients are flattened into buckets (64 MiB of float32).
BUCKET_NUMEL = 1 << 24

_owned = False  # True when init() created the process group (and cleanup() may destroy it)


# --- launch and process group ------------------------------------------------------------------
def launched() -> bool:
    """True inside a process started by torchrun (or any launcher setting RANK/WORLD_SIZE) with
    more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: str = "cpu") -> str:
    """NCCL for a CUDA device when CUDA is available, Gloo otherwise (or MTLREC_DIST_BACKEND)."""
    forced = os.environ.get("MTLREC_DIST_BACKEND")
    if forced:
        return forced
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return "nccl"
    return "gloo"


def init(device: str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Returns True when this call created the group (the caller then calls :func:`cleanup`);
    False in a single process or when a group already exists (e.g. the user's own code)."""
    global _owned
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise MTLRecError("torch.distributed is not available in this torch build")
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    _owned = True
    return True


def cleanup() -> None:
    """Leave the process group if :func:`init` created it."""
    global _owned
    if _owned and dist.is_initialized():
        # Without a last barrier a rank that finishes first tears down gloo while its peer is
        # still talking to it, and the peer aborts ("terminate called without an active
        # exception").
        dist.barrier()
        dist.destroy_process_group()
    _owned = False


def active() -> bool:
    """A process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- batches -----------------------------------------------------------------------------------
def local_batch_size(batch_size: int, processes: int | None = None) -> int:
    """This rank's rows per step: ``train.batch_size`` is the global batch."""
    n = world() if processes is None else processes
    if batch_size % n:
        raise ConfigError(
            f"train.batch_size {batch_size} is the global batch and must be divisible by the "
            f"number of processes ({n}); use e.g. {batch_size - batch_size % n or n}"
        )
    return batch_size // n


def shard_bounds(n: int, rank_: int, world_: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank_``'s contiguous part of ``n`` rows (the first n % world
    ranks get one row more)."""
    base, extra = divmod(n, world_)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


# --- collectives -------------------------------------------------------------------------------
def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (moved to the backend's device and back)."""
    if not active():
        return tensor
    dev = _comm_device()
    if tensor.device == dev:
        dist.all_reduce(tensor)
        return tensor
    buf = tensor.to(dev)
    dist.all_reduce(buf)
    tensor.copy_(buf)
    return tensor


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order; the first dimension may
    differ between ranks (sizes are gathered first, parts padded to the largest)."""
    if not active():
        return tensor
    dev = _comm_device()
    local = tensor.detach().to(dev).contiguous()
    size = torch.tensor([local.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    if local.shape[0] < longest:
        pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    parts = [torch.empty_like(local) for _ in counts]
    dist.all_gather(parts, local)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)])
    return out.to(tensor.device)


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (pickled); the value itself in one process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def main_then_broadcast(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank. A user error raised there is
    raised on every rank too, so no rank is left waiting in a collective."""
    if not active():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            outcome = (True, fn())
        except MTLRecError as exc:
            outcome = (False, exc)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def all_reduce_flat(
    tensors: Sequence[torch.Tensor | None],
    like: Sequence[torch.Tensor] | None = None,
    bucket_numel: int = BUCKET_NUMEL,
) -> list[torch.Tensor | None]:
    """Sum a list of tensors over ranks, one all-reduce per bucket of flat buffers.

    ``None`` travels as zeros shaped like ``like[i]``; an entry comes back ``None`` only when it
    is ``None`` on every rank (as after a plain backward over the union of the ranks' rows), so
    an optimizer skips it exactly as in a single process. Returned tensors are views of the
    reduced buffers, shaped like the inputs."""
    if not active():
        return list(tensors)
    filled: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        if t is None:
            if like is None:
                raise ValueError("all_reduce_flat: a None entry needs `like` for its shape")
            t = torch.zeros_like(like[i])
        filled.append((t.to_dense() if t.is_sparse else t).detach())  # all-reduced densely
    out: list[torch.Tensor | None] = [None] * len(filled)
    start = 0
    while start < len(filled):
        # A bucket holds whole tensors (at least one) up to bucket_numel elements.
        stop, numel = start, 0
        while stop < len(filled):
            n = filled[stop].numel()
            if stop > start and numel + n > bucket_numel:
                break
            numel += n
            stop += 1
        group = filled[start:stop]
        dtype, device = group[0].dtype, group[0].device
        flags = [tensors[i] is not None for i in range(start, stop)]
        flat = torch.cat(
            [t.reshape(-1).to(dtype) for t in group]
            + [torch.tensor(flags, dtype=dtype, device=device)]
        )
        all_reduce_(flat)
        seen = flat[numel:].tolist()
        chunks = flat[:numel].split([t.numel() for t in group])
        for k, (t, chunk) in enumerate(zip(group, chunks)):
            if seen[k] > 0:
                out[start + k] = chunk.view(t.shape).to(t.dtype)
        start = stop
    return out


def reduce_grads(params: Sequence[torch.nn.Parameter], bucket_numel: int = BUCKET_NUMEL) -> None:
    """Sum every parameter's ``.grad`` share over ranks (bucketed flat all-reduce)."""
    if not active():
        return
    reduced = all_reduce_flat([p.grad for p in params], like=params, bucket_numel=bucket_numel)
    for p, g in zip(params, reduced):
        p.grad = g


class _SumShares(torch.autograd.Function):
    """Forward: all-reduce (sum) of the ranks' shares. Backward: the identity, so each rank's
    backward yields the gradient of its own share; the shares' gradients sum to the global one."""

    @staticmethod
    def forward(ctx, shares: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_(shares.detach().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def loss_weights(model: MTLModel, batch: TensorTable) -> torch.Tensor:
    """[T] the number each task's local loss is a mean over.

    The base class's losses are means over each task's observed rows (its upstream task
    positive); models that override ``task_losses`` (ESMM, AITM, the debiasing family) average
    over all rows of the batch. A model whose losses are normalised otherwise can say so with a
    ``loss_weights(batch) -> [T]`` method."""
    from mtlrec.models.base import MTLModel

    custom = getattr(model, "loss_weights", None)
    if callable(custom):
        return torch.as_tensor(custom(batch), dtype=torch.float64)
    if type(model).task_losses is MTLModel.task_losses:
        return model.observed_mask(batch.labels).sum(0).double()
    return torch.full((model.num_tasks,), float(len(batch)), dtype=torch.float64)


def sync_losses(
    losses: torch.Tensor,
    weights: torch.Tensor,
    aux_loss: torch.Tensor | None,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global-batch losses from this rank's local means, differentiable back to this rank's share.

    ``losses`` [T] are local means over ``weights`` [T] rows each (0 for an empty share); the
    auxiliary loss is taken as a mean over the ``rows`` rows of the local batch. Returns the
    global values, the same on every rank; backward through them gives this rank's share of the
    global gradient (a sum over ranks, see :func:`reduce_grads`)."""
    if not active():
        return losses, aux_loss
    has_aux = aux_loss is not None
    local_w = torch.cat([weights.double().cpu(), torch.tensor([float(rows)] if has_aux else [])])
    total_w = all_reduce_(local_w.clone())
    frac = torch.where(total_w > 0, local_w / total_w.clamp_min(1.0), torch.zeros_like(local_w))
    values = losses if not has_aux else torch.cat([losses, aux_loss.reshape(1).to(losses)])
    frac = frac.to(values)
    shares = torch.where(frac > 0, values * frac, torch.zeros_like(values))
    summed = _SumShares.apply(shares)
    if not has_aux:
        return summed, None
    return summed[:-1], summed[-1]


def check_replicas(params: Sequence[torch.nn.Parameter]) -> None:
    """Raise on every rank if any parameter differs from rank 0's (bitwise).

    Replicas stay equal by construction; this cheap check (one float per tensor, once per
    epoch) turns a future bug that lets them drift into an error instead of silently wrong
    results."""
    if not active() or not params:
        return
    local = torch.stack([p.detach().double().sum() for p in params]).cpu()
    reference = broadcast_object(local if is_main() else None)
    differs = torch.tensor([float((local != reference).sum())])
    all_reduce_(differs)
    if differs.item() > 0:
        raise RuntimeError(
            "data-parallel replicas drifted apart (parameters differ from rank 0's); "
            "please report this with the model and balancer used"
        )
