"""``DistributedModelParallel``: shard a model's embedding tables, keep its
dense part data-parallel.

The drop-in for TorchRec's wrapper of the same name (and, with
``replicas > 1``, for its 2D ``DMPCollection``): it takes a model holding
fused ``EmbeddingBagCollection``s and a plan (or a sharding type, or
nothing: the planner decides), swaps each collection for a
``ShardedEmbeddingBagCollection``, and wraps the model in DDP with the
sharded tables left out. The forward is the model's.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from dist_rec.distributed import ProcessGroups, ShardingGrid
from dist_rec.modules.embedding_modules import EmbeddingBagCollection
from dist_rec.planner import Topology, plan_sharding, table_wise_plan
from dist_rec.planner.plan import ShardingPlan, ShardingType, uniform_plan
from dist_rec.sharding.sharded_ebc import ShardedEmbeddingBagCollection

PlanArg = Union[None, ShardingPlan, Dict[str, ShardingPlan]]


class DistributedModelParallel(nn.Module):
    """A model with sharded embedding tables and data-parallel dense layers.

    Args:
        module (nn.Module): the model; its fused ``EmbeddingBagCollection``s
            are sharded (collections without a fused optimizer are left to
            DDP as ordinary parameters).
        plan: a ``ShardingPlan`` for every collection, or one per collection
            by module path (e.g. ``{"sparse_arch": plan}``), or None.
        sharding_type (Optional[ShardingType | str]): with no plan, shard
            every table this way (table-wise: ``table_wise_plan``, each table
            on one rank, the ranks balanced as the greedy planner balances
            them; the other types: ``uniform_plan``); with neither, the
            greedy planner decides. ``memory_per_rank`` bounds table-wise
            placement too.
        replicas (int): G, the number of replica groups (2D parallelism).
            (Default: 1)
        sync_every (int): replicas are synchronised every this many calls of
            ``sync()``. (Default: 1)
        layout (str): "shards_on_host" or "replicas_on_host" (see
            ``dist_rec.distributed.grid``).
        memory_per_rank (Optional[int]): bytes per rank the planner may use.
        device (Optional[torch.device]): device of the shards and the model.
        wrap_dense (bool): wrap the model in DDP (the sharded tables left
            out). False leaves the dense parameters to another engine (e.g.
            DeepSpeed ZeRO), which must then average their gradients.
            (Default: True)
        process_groups (Optional[ProcessGroups]): the owner of every group
            the model runs on; made here from ``replicas`` and ``layout``
            when None. After ``process_groups.rebuild()`` the DDP wrapper is
            made again on the new default group.
        storage_dir (Optional[str]): where shards the plan places on "ssd"
            keep their files.
        initial_sync (bool): make the replicas of every shard, the
            data-parallel tables and the dense layers equal at construction
            (broadcasts). False for a process that joins a running job
            (recovery): the job's state reaches it afterwards, and its
            construction must issue exactly the collectives a rebuild of the
            running processes' groups issues. (Default: True)
        row_orders (Optional[Dict[str, array]]): per table, its row ids
            hottest first, for plans that split tables over two tiers
            (``dist_rec.planner.recshard``; see ``ShardedEmbeddingBagCollection``).

    Call ``sync()`` after every optimizer step (a no-op with one replica and
    an optimizer without per-replica increments).
    """

    def __init__(
        self,
        module: nn.Module,
        plan: PlanArg = None,
        sharding_type: Optional[str] = None,
        replicas: int = 1,
        sync_every: int = 1,
        layout: str = "shards_on_host",
        memory_per_rank: Optional[int] = None,
        device: Optional[torch.device] = None,
        wrap_dense: bool = True,
        process_groups: Optional[ProcessGroups] = None,
        storage_dir: Optional[str] = None,
        initial_sync: bool = True,
        row_orders: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError(
                "DistributedModelParallel needs torch.distributed initialised (torchrun, or "
                "dist_rec.distributed.init_process_group)."
            )
        if sync_every < 1:
            raise ValueError(f"Invalid sync_every={sync_every}. Must be >= 1.")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if process_groups is None:
            process_groups = ProcessGroups(replicas=replicas, layout=layout, device=device)
        elif (process_groups.replicas, process_groups.layout) != (replicas, layout) and replicas != 1:
            raise ValueError(
                f"Invalid replicas={replicas}, layout={layout!r}: the process groups given are "
                f"{process_groups.replicas} replicas, {process_groups.layout!r}."
            )
        self.process_groups = process_groups
        self.sync_every = sync_every
        self._steps = 0
        self.plans: Dict[str, ShardingPlan] = {}
        self.sharded: Dict[str, ShardedEmbeddingBagCollection] = {}
        for path, collection in _fused_collections(module):
            chosen = self._plan_for(path, collection, plan, sharding_type, memory_per_rank)
            sharded = ShardedEmbeddingBagCollection(
                collection.embedding_bag_configs(),
                chosen,
                collection.optimizer,
                is_weighted=collection.is_weighted(),
                process_groups=process_groups,
                device=device,
                source=collection,
                storage_dir=storage_dir,
                initial_sync=initial_sync,
                row_orders=row_orders,
            )
            _replace_submodule(module, path, sharded)
            self.plans[path] = chosen
            self.sharded[path] = sharded
        # The sharded collections register no parameters or buffers (their
        # rows live in storages), so DDP and dense optimizers never see them.
        self.unwrapped = module
        self._device = device
        self._wrap_dense = wrap_dense
        self.module = self._wrap(module, init_sync=initial_sync)
        process_groups.on_rebuild(lambda groups: self._rewrap())

    @property
    def grid(self) -> ShardingGrid:
        """Where this rank sits in the 2D grid (plain ranks)."""
        return self.process_groups.grid

    def _wrap(self, module: nn.Module, init_sync: bool = True) -> nn.Module:
        """The dense layers under DDP over every rank (the sharded tables
        hold no parameters it could see), or bare for another engine.
        ``init_sync``: DDP's broadcast of rank 0's parameters at
        construction (a collective)."""
        trainable = any(p.requires_grad for p in module.parameters())
        if self._wrap_dense and dist.get_world_size() > 1 and trainable:
            return nn.parallel.DistributedDataParallel(
                module,
                device_ids=[self._device] if self._device.type == "cuda" else None,
                forward_sync_buffers=False,
                init_sync=init_sync,
            )
        return module

    def _rewrap(self) -> None:
        """DDP holds the default group it was made on: after a rebuild of the
        groups it is made again (the parameters are the same tensors, already
        agreed: no broadcast, so that a rebuild issues no collective here)."""
        self.module = self._wrap(self.unwrapped, init_sync=False)

    def _plan_for(self, path, collection, plan: PlanArg, sharding_type, memory_per_rank) -> ShardingPlan:
        size = self.grid.group_size
        if isinstance(plan, ShardingPlan):
            return plan
        if isinstance(plan, dict):
            if path not in plan:
                raise ValueError(f"No plan for the collection at {path!r}; plans given for {sorted(plan)}.")
            return plan[path]
        configs = collection.embedding_bag_configs()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        host = local_world if size % local_world == 0 and local_world <= size else size
        if sharding_type is not None:
            sharding_type = ShardingType.from_str(sharding_type)
            if sharding_type == ShardingType.TABLE_WISE:
                return table_wise_plan(configs, size, collection.optimizer, memory_per_rank, local_world_size=host)
            return uniform_plan(configs, sharding_type, size, local_world_size=host)
        budget = memory_per_rank if memory_per_rank is not None else _default_memory_budget(size)
        topology = Topology(world_size=size, memory_per_rank_bytes=budget, local_world_size=host)
        return plan_sharding(configs, topology, optimizer=collection.optimizer)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def broadcast_initial_state(self) -> None:
        """What construction with ``initial_sync`` agrees: every replica of a
        shard and every data-parallel copy as the first one, the dense
        layers as rank 0's (collectives; for processes that were all built
        with ``initial_sync=False``)."""
        for sharded in self.sharded.values():
            if not sharded.initialised:
                sharded.reset_parameters()
            sharded.broadcast_initial_state()
        for tensor in [*self.unwrapped.parameters(), *self.unwrapped.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def sync(self) -> None:
        """Counts a step; every ``sync_every`` steps agrees the replicas of
        every sharded table (and folds momentum-scaled increments in)."""
        self._steps += 1
        if self._steps % self.sync_every == 0:
            for sharded in self.sharded.values():
                sharded.sync_replicas()

    @property
    def sync_steps(self) -> int:
        """Calls of ``sync()`` so far (checkpoints keep it, so that
        ``sync_every > 1`` keeps its phase across a resume)."""
        return self._steps

    @sync_steps.setter
    def sync_steps(self, value: int) -> None:
        self._steps = int(value)

    def sharded_modules(self) -> List[ShardedEmbeddingBagCollection]:
        return list(self.sharded.values())


def _fused_collections(module: nn.Module):
    return [
        (path, m) for path, m in module.named_modules() if isinstance(m, EmbeddingBagCollection) and m.optimizer is not None
    ]


def _replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    if not path:
        raise ValueError("DistributedModelParallel shards collections inside a model; wrap the collection in a module.")
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _default_memory_budget(ranks_per_group: int) -> int:
    """Half of this host's memory split over its ranks: a conservative
    budget when none is given."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        total = pages * page_size
    except (ValueError, OSError):
        total = 16 << 30
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks_per_group))
    return total // 2 // max(local, 1)
