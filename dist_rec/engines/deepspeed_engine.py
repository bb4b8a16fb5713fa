"""DeepSpeed ZeRO (stage 1 or 2) owning the dense parameters of a model whose
embedding tables ``DistributedModelParallel`` shards.

The split of work is the same as under DDP: the sharded collections run
their all-to-alls and fused in-place row updates inside the backward, and
the dense parameters get gradients averaged over all ranks and one step of
the dense optimizer. Here ZeRO does the averaging (stage 1: after the
backward; stage 2: in buckets during it) and partitions the optimizer state
(and with stage 2 the gradients) over the ranks.

DeepSpeed only ever sees the dense parameters: it broadcasts every
parameter of its module from rank 0 at start, which would overwrite (or,
with shapes that differ per rank, break on) the table shards. A
``DenseView`` runs the whole model but lists only the parameters that are
not in a sharded collection.

The dense optimizer is the trainer's own torch optimizer handed to
DeepSpeed as a client optimizer: ZeRO steps it on flat fp32 partitions,
element for element the arithmetic of the same optimizer under DDP.

DeepSpeed is optional (``make install`` installs it; see
docs/deepspeed.md); it is imported the first time an engine is built.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterator, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dist_rec.config import ZERO_STAGES
from dist_rec.sharding.model_parallel import DistributedModelParallel

_INSTALL_HINT = (
    "DeepSpeed is not installed. It is an optional dependency of dist_rec: `make install` installs it, or by hand "
    "`DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 pip install --no-build-isolation --no-deps "
    "-r requirements-deepspeed.txt` (see docs/deepspeed.md)."
)


def import_deepspeed(device: torch.device = torch.device("cpu")):
    """``deepspeed``, imported for ``device``, or an ImportError saying how
    to install it.

    DeepSpeed picks its accelerator once, at its first import; on a host
    with a GPU it would pick CUDA and move a CPU model there. A CPU run
    therefore asks for the CPU accelerator before that import.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError as error:
        raise ImportError(f"{_INSTALL_HINT} ({error})") from error
    accelerator = get_accelerator().device_name()
    if accelerator != device.type:
        raise RuntimeError(
            f"DeepSpeed's accelerator is {accelerator!r} but the model trains on {device}; set DS_ACCELERATOR="
            f"{device.type} before DeepSpeed is first imported."
        )
    # DeepSpeed logs its whole configuration at INFO on every rank.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


class DenseView(nn.Module):
    """The model as DeepSpeed must see it: its forward, and only its dense
    parameters (those outside the sharded collections)."""

    def __init__(self, sharded: DistributedModelParallel) -> None:
        super().__init__()
        self.model = sharded.unwrapped
        self._hidden = {id(p) for m in sharded.sharded_modules() for p in m.parameters()}

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[Tuple[str, nn.Parameter]]:
        for name, param in super().named_parameters(prefix, recurse, remove_duplicate):
            if id(param) not in self._hidden:
                yield name, param

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def deepspeed_config(zero_stage: int, micro_batch_size: int) -> Dict[str, Any]:
    """The engine's config: ZeRO ``zero_stage`` in fp32, one micro-batch
    per step, no clipping, no loss scaling: DDP's arithmetic."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"Invalid zero_stage={zero_stage!r}. Must be one of {list(ZERO_STAGES)}.")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "zero_optimization": {
            "stage": zero_stage,
            # Overlap needs side streams (CUDA); on CPU it would only reorder.
            "overlap_comm": False,
        },
        # torch's SGD is not on DeepSpeed's list of ZeRO-tested optimizers;
        # ZeRO 1/2 only need an optimizer that steps each element alone.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedDenseEngine:
    """A DeepSpeed ZeRO engine for the dense parameters of ``sharded``.

    Args:
        sharded (DistributedModelParallel): built with ``wrap_dense=False``.
        optimizer (torch.optim.Optimizer): the dense optimizer, over the
            dense parameters (SGD, Adagrad or Adam; elementwise optimizers
            only: ZeRO steps each rank's slice of the flat parameters).
        zero_stage (int): 1 (optimizer state partitioned) or 2 (gradients
            too).
        micro_batch_size (int): samples per rank per step (DeepSpeed's
            bookkeeping only; the loss is what the caller makes of them).

    One step: ``loss = loss_fn(engine(*inputs), ...)``, ``engine.backward(loss)``,
    ``engine.step()`` (which zeroes the gradients), then ``sharded.sync()``.
    """

    def __init__(self, sharded: DistributedModelParallel, optimizer: torch.optim.Optimizer, zero_stage: int, micro_batch_size: int) -> None:
        if not dist.is_initialized() or dist.get_world_size() < 2:
            raise RuntimeError("DeepSpeed ZeRO partitions over a process group of 2 or more ranks; this process has none.")
        if sharded.module is not sharded.unwrapped:
            raise RuntimeError("The model is already under DDP; build DistributedModelParallel with wrap_dense=False.")
        device = next(iter(sharded.unwrapped.parameters())).device
        deepspeed = import_deepspeed(device)
        if device.type == "cpu":
            # DeepSpeed insists on LOCAL_RANK (torchrun sets it) even where it
            # picks no device; processes spawned by hand (tests) have none.
            os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
        self.zero_stage = zero_stage
        self.version = deepspeed.__version__
        self.view = DenseView(sharded)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.view,
            optimizer=optimizer,
            config=deepspeed_config(zero_stage, micro_batch_size),
            dist_init_required=False,
        )

    def describe(self) -> str:
        count = sum(p.numel() for p in self.view.parameters() if p.requires_grad)
        name = type(self.optimizer.optimizer).__name__ if hasattr(self.optimizer, "optimizer") else type(self.optimizer).__name__
        return f"DeepSpeed {self.version} ZeRO-{self.zero_stage} (fp32, {name}) over {count:,} dense parameters"

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()
