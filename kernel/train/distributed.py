"""Training on several processes: what ``torchrun`` says about this one, the process group, and the DDP wrapper.

Started by ``torchrun`` (one process per GPU; ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from the environment) the
process group starts with NCCL on GPUs and Gloo on CPUs, with a collective timeout sized for validation; under
``torchrun`` even one process runs DDP and the collectives, so a one-GPU ``torchrun`` run tests the multi-GPU path.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernel.train.nets import Trainee

log = logging.getLogger(__name__)

# collective timeout (minutes): rank 0 scores the gathered validation and writes two checkpoints while the
# others wait at a barrier; PyTorch's 10-minute default is too short for ~100k images at 448-896 px
DIST_TIMEOUT_MIN = 120


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # a process group runs: DDP and collectives (torchrun, or several processes)

    @property
    def main(self) -> bool:
        return self.rank == 0


#: set by ``torchrun`` (torch.distributed.elastic) in every process it starts
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"


def setup_distributed(device: str | None = None, timeout_min: float = None) -> Dist:
    """Read torchrun's environment; start the process group when there is more than one process.
    ``timeout_min``: how long a collective (a barrier while rank 0 scores validation and writes checkpoints)
    may wait before the job is killed; PyTorch's default is 10 minutes. The group starts when there is more than
    one process or the process was started by ``torchrun`` (then also for one: the multi-GPU path on one GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":  # "cuda" without an index: this rank's own GPU (set_device refuses it)
        dev = dev if dev.index is not None else torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if (world > 1 or TORCHRUN_ENV in os.environ) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min or DIST_TIMEOUT_MIN))
        log.info("process group: %s backend, rank %d of %d on %s", dist.get_backend(), rank, world, dev)
    return Dist(rank, world, local, dev, distributed=dist.is_available() and dist.is_initialized())


def wrap_trainee(net, env: Dist, sync_bn: bool, find_unused: bool = False) -> torch.nn.Module:
    """:class:`Trainee` of ``net``; with several processes in DDP (SyncBatchNorm first when ``sync_bn`` and on
    GPUs; on CPUs a warning says BatchNorm statistics stay per process). ``find_unused``: some parameters are
    frozen (``train_only``)."""
    trainee = Trainee(net)
    if not env.distributed:
        return trainee
    if sync_bn and env.device.type == "cuda":
        trainee = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trainee)
    elif sync_bn:
        log.warning("SyncBatchNorm needs GPUs: BatchNorm statistics stay per process on %s", env.device)
    return torch.nn.parallel.DistributedDataParallel(
        trainee, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        find_unused_parameters=find_unused)


def _all_finite(x: torch.Tensor, env: Dist) -> bool:
    ok = torch.isfinite(x.detach()).all().float().reshape(1)
    if env.distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


