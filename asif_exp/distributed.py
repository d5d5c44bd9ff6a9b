"""Processes of one sharded job (torch.distributed: gloo on CPU, NCCL on GPU): joining the
group, who is rank 0, who goes first. The sharded top-k pass itself is the engine's
(`asif_exp.methods.asif.topk.sharded_topk`).

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
from collections.abc import Iterator

import torch
import torch.distributed as dist

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
