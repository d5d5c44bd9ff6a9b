"""The top-k pass sharded over processes (torch.distributed: gloo on CPU, NCCL on GPU).

Started by `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment) or as the tasks of
one SLURM job (the Hydra submitit launcher with `tasks_per_node` > 1: submitit's environment is
turned into torch's); a plain `python -m asif_exp` is one process and never touches
torch.distributed.

    torchrun --nproc_per_node=2 -m asif_exp anchors=... benchmark=... 'asif.n=[...]' device=cpu

Each process (rank) takes one id range of the anchor pairs (both modalities) and runs the same
streaming pass over it, keeping a per-row top-k_max with global anchor ids and a snapshot at
every n of the grid that reaches its range. The exact top-k of the first n anchors is then
`select_topk` over every rank's list for n (gathered on all ranks): selection is by (value desc,
id asc) everywhere, so N ranks give the top-k of one process, ties included. Embedding happens
on rank 0 first (it fills the cache; the others then read it); scoring, metrics and results.json
happen on rank 0 only.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)

# How long ranks wait for each other: rank 0 may be encoding anchors while the others wait.
TIMEOUT = datetime.timedelta(hours=6)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def _slurm_to_torch_environment() -> None:
    """Tasks of one SLURM job (submitit): RANK, WORLD_SIZE, MASTER_ADDR, ... from SLURM's."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    if "SUBMITIT_EXECUTOR" not in os.environ:  # srun of something else: not ours to set up
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export()


def setup(device: str) -> int:
    """Join the process group this process was started in, if any; the world size."""
    _slurm_to_torch_environment()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size < 2 or world_size() > 1:
        return world_size()
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" is this GPU
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    log.info("rank %d of %d (%s)", dist.get_rank(), size, dist.get_backend())
    if dist.get_rank() > 0:  # rank 0's log file is the job's (SLURM tasks share the job's dir)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
    return size


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. it fills the embedding cache), then the others."""
    if world_size() > 1 and not is_main():
        dist.barrier()
    yield
    if world_size() > 1 and is_main():
        dist.barrier()


def from_main(value):
    """Rank 0's `value`, on every rank (a decision all ranks must share)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Anchor ids [low, high) of `rank` among `size`: consecutive, sizes differing by at most 1."""
    return n * rank // size, n * (rank + 1) // size


def sharded_topk(
    queries: Tensor,
    anchors,
    ns: Sequence[int],
    k_max: int,
    options,
    desc: str = "top-k",
    progress: bool = True,
    to_cpu: bool = True,
    normalize_anchors: bool = False,
) -> dict:
    """`streaming_topk` over this rank's shard of the anchors, merged exactly over all ranks:
    every rank returns the top-k_max of each n of `ns`, as one process would compute it."""
    from asif_exp.methods.asif.topk import TopK, select_topk, streaming_topk

    me, size = rank(), world_size()
    ns = sorted(set(ns))
    n_max = ns[-1]
    low, high = shard_range(n_max, me, size)
    local_ns = sorted({min(n, high) - low for n in ns if n > low})
    local = {}
    if local_ns:
        local = streaming_topk(
            queries,
            anchors[low:high],
            local_ns,
            k_max,
            options,
            f"{desc}, shard {me + 1}/{size}",
            progress and me == 0,
            to_cpu=False,
            normalize_anchors=normalize_anchors,
        )
    device = options.resolved_device()
    rows = queries.shape[0]
    out = {}
    for n in ns:
        # This rank's list for n, padded to k_max (-inf never beats a similarity).
        values = torch.full((rows, k_max), -torch.inf, device=device)
        ids = torch.full((rows, k_max), n_max, dtype=torch.long, device=device)
        if n > low:
            part = local[min(n, high) - low]
            width = part.values.shape[1]
            values[:, :width], ids[:, :width] = part.values, part.indices + low
        every_values = [torch.empty_like(values) for _ in range(size)]
        every_ids = [torch.empty_like(ids) for _ in range(size)]
        dist.all_gather(every_values, values)
        dist.all_gather(every_ids, ids)
        top_values, top_ids = select_topk(
            torch.cat(every_values, 1), torch.cat(every_ids, 1), min(k_max, n)
        )
        if to_cpu:
            top_values, top_ids = top_values.cpu(), top_ids.cpu()
        out[n] = TopK(top_values, top_ids, n)
    return out
