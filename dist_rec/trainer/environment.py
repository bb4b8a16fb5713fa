"""Where a training process runs: its rank, the job's size, its device."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from dist_rec.config import ConfigError, TrainConfig
from dist_rec.distributed import init_process_group


@dataclass
class Environment:
    """Where this process runs: its rank, the group, the device."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    backend: Optional[str] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_environment(config: TrainConfig) -> Environment:
    """Joins the job's default process group when launched by torchrun
    (``dist_rec.distributed.init_process_group``); picks the device, the
    backend and the thread count."""
    run = config.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    use_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("Invalid train.device='cuda'. Must be 'cpu' or 'auto' on a machine without a GPU.")
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = run.backend if run.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("Invalid train.backend='nccl'. Must be 'gloo' or 'auto' when training on the CPU.")
    threads = run.threads or max(1, (os.cpu_count() or 1) // max(local_world_size, 1))
    torch.set_num_threads(threads)
    env = Environment(rank, world_size, local_world_size, backend if world_size > 1 else None, device)
    if env.distributed and not dist.is_initialized():
        init_process_group(backend)
    return env
