"""``ProcessGroups``: the one owner of a job's process groups and transports.

Components never create a group; they get one from here (the sharding
group of their 2D grid, its replica group, a sub-group of the ranks that
hold one table's column blocks, ...) and ask again at each use rather than
keep it. That is what lets ``rebuild`` tear every group down and form them
again in the same processes, with a new membership, while the components
and their memory stay: after a rank dies (recovery), or in a test.

Creating a group is a collective over the whole job (``new_group``): every
rank must ask for the same groups in the same order. Components that are
built the same way on every rank (the sharded collections, the data-parallel
exchange) do so naturally; ``rebuild`` re-forms the sub-groups in the order
they were first asked for. Sub-groups are described relative to the grid
(every rank, or the same positions of every sharding group), so that a
rebuild with another membership (a replica group left out while its
replacement starts, then taken back) forms them for the new grid, and a
process that joins fresh forms the same groups in the same order by being
built as the others were.

Every group's collectives wait at most ``timeout_s`` for a peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import datetime

import torch
import torch.distributed as dist

from dist_rec.distributed import shm_transport, world
from dist_rec.distributed.abort import abort_communication, store_port
from dist_rec.distributed.grid import ShardingGrid

RebuildListener = Callable[["ProcessGroups"], None]


@dataclass(frozen=True)
class _SubgroupSpec:
    """A sub-group relative to the grid: explicit global ranks (``ranks``),
    every rank (both None), the ranks at ``positions`` of every sharding
    group (one group per replica, keyed ``<key>/<replica>``), or with
    ``copies`` the ranks of every replica group (one group per position,
    keyed ``<key>/<position>``: the copies of one shard)."""

    ranks: Optional[Tuple[int, ...]]
    positions: Optional[Tuple[int, ...]]
    intra_host_transport: bool
    copies: bool = False


class ProcessGroups:
    """Every process group of this process's job, and the intra-host
    transport of each group that all-to-alls run on.

    Args:
        replicas (int): G, the replica groups of 2D sparse parallelism
            (1: plain model parallelism over all ranks). (Default: 1)
        layout (str): "shards_on_host" or "replicas_on_host" (``grid.py``).
        device (torch.device): where the collectives' tensors live; the
            shared-memory all-to-all serves CPU tensors only. (Default: CPU)
        timeout_s (Optional[float]): how long any collective of these groups
            (and of the intra-host transport) waits for a live but silent
            peer; the default group's timeout when None (gloo's default of
            30 minutes if that was not set either).

    A collective: every rank builds it with the same arguments, after the
    default group exists (``dist_rec.distributed.init_process_group``).

    Example::

        init_process_group("gloo")
        groups = ProcessGroups(replicas=2)
        sharded = ShardedEmbeddingBagCollection(tables, plan, optimizer, process_groups=groups)
        ...
        groups.rebuild()          # every group torn down and formed again
    """

    def __init__(
        self,
        replicas: int = 1,
        layout: str = "shards_on_host",
        device: Optional[torch.device] = None,
        timeout_s: Optional[float] = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "ProcessGroups needs the default process group: call dist_rec.distributed.init_process_group first "
                "(torchrun sets the environment it reads)."
            )
        self.replicas = int(replicas)
        self.layout = layout
        self.device = torch.device(device if device is not None else "cpu")
        if timeout_s is None and world.group_timeout() is not None:
            timeout_s = world.group_timeout().total_seconds()
        self.timeout_s = timeout_s
        self._subgroup_specs: Dict[str, _SubgroupSpec] = {}  # in the order first asked for
        self._subgroups: Dict[str, Optional[dist.ProcessGroup]] = {}
        self._listeners: List[RebuildListener] = []
        self._transported: List = []
        self._form(dist.get_rank(), dist.get_world_size())

    # -- what components get ---------------------------------------------------

    @property
    def rank(self) -> int:
        return self.grid.rank

    @property
    def world_size(self) -> int:
        return self.grid.world_size

    @property
    def world(self) -> dist.ProcessGroup:
        """The default group: dense layers (DDP), checkpoints, metrics."""
        return dist.group.WORLD

    @property
    def sharding_group(self) -> dist.ProcessGroup:
        """This rank's sharding group: the ranks sharing one copy of the tables."""
        return self._sharding_group

    @property
    def replica_group(self) -> Optional[dist.ProcessGroup]:
        """The ranks holding this rank's shards in the other sharding groups
        (2D), or None with one replica."""
        return self._replica_group

    def subgroup(self, key: str, ranks: Optional[Sequence[int]] = None, intra_host_transport: bool = False):
        """The group named ``key`` of global ``ranks`` (every rank when None),
        made on first call: a collective over the job, so every rank asks for
        it, in the same order as for its other groups. Returns None on a rank
        outside ``ranks``. ``intra_host_transport`` gives the group a
        shared-memory all-to-all where its ranks share a host."""
        members = None if ranks is None else tuple(sorted(int(r) for r in ranks))
        spec = _SubgroupSpec(members, None, bool(intra_host_transport))
        known = self._subgroup_specs.get(key)
        if known is not None:
            if known != spec:
                raise ValueError(
                    f"Sub-group {key!r} exists with ranks {self._describe(known)}; asked again with "
                    f"{self._describe(spec)}."
                )
            return self._subgroups[key]
        if members is not None and (any(not 0 <= r < self.world_size for r in members) or not members):
            raise ValueError(f"Invalid ranks={list(members)} for sub-group {key!r}. Must be ranks of the job 0..{self.world_size - 1}.")
        self._subgroup_specs[key] = spec
        self._form_subgroup(key, spec)
        return self._subgroups[key]

    def replica_subgroups(self, key: str, positions: Sequence[int]):
        """One group per sharding group (replica) of the ranks at
        ``positions`` in it (e.g. the ranks holding one table's column
        blocks), made on first call (a collective over the job, as
        ``subgroup``). Returns this rank's replica's group (None when this
        rank is not at one of the positions); ``replica_subgroup(key)``
        asks for it later, after any rebuild."""
        spec = _SubgroupSpec(None, tuple(int(p) for p in positions), False)
        known = self._subgroup_specs.get(key)
        if known is not None:
            if known != spec:
                raise ValueError(f"Sub-group family {key!r} exists for positions {list(known.positions)}; asked again with {list(spec.positions)}.")
            return self.replica_subgroup(key)
        if not spec.positions or any(not 0 <= p < self.grid.group_size for p in spec.positions):
            raise ValueError(
                f"Invalid positions={list(spec.positions)} for sub-group family {key!r}. Must be positions in a sharding "
                f"group 0..{self.grid.group_size - 1}."
            )
        self._subgroup_specs[key] = spec
        self._form_subgroup(key, spec)
        return self.replica_subgroup(key)

    def copies_subgroups(self, key: str):
        """One group per replica group (the ranks holding the copies of the
        same shards, as ``replica_group``) that is this ``key``'s own: a
        background round on it never meets the training thread's
        collectives on ``replica_group``. Made on first call (a collective
        over the job, as ``subgroup``) and re-formed for the new grid by
        ``rebuild`` (a replica group out or back). Returns this rank's;
        ``copies_subgroup(key)`` asks for it again."""
        spec = _SubgroupSpec(None, None, False, copies=True)
        known = self._subgroup_specs.get(key)
        if known is not None:
            if known != spec:
                raise ValueError(f"Sub-group {key!r} exists as {self._describe(known)}; asked again as a family of replica groups.")
            return self.copies_subgroup(key)
        self._subgroup_specs[key] = spec
        self._form_subgroup(key, spec)
        return self.copies_subgroup(key)

    def copies_subgroup(self, key: str):
        """This rank's group of the family ``copies_subgroups`` made as ``key``."""
        return self.group(f"{key}/{self.grid.my_sharding_group.index(self.rank)}")

    def replica_subgroup(self, key: str):
        """This rank's replica's group of the family ``replica_subgroups`` made as ``key``."""
        return self.group(f"{key}/{self.grid.replica_index}")

    def group(self, key: str):
        """The sub-group made as ``key`` (None on a rank outside it)."""
        if key not in self._subgroups:
            raise KeyError(f"No sub-group {key!r}; made so far: {list(self._subgroup_specs)}.")
        return self._subgroups[key]

    def on_rebuild(self, listener: RebuildListener) -> None:
        """``listener(self)`` runs after every ``rebuild``, once the new groups
        exist: for a component that must re-make what wraps a group (DDP)."""
        self._listeners.append(listener)

    # -- re-forming ------------------------------------------------------------

    def rebuild(
        self,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        replicas: Optional[int] = None,
        store: Optional[dist.Store] = None,
        prefix: Optional[str] = None,
    ) -> None:
        """Tears every group (and transport) down and forms them again, the
        default group included, in the same processes: a collective over the
        new membership. ``rank`` is this process's rank in it (a replacement
        process may take a dead rank's place). The sharding groups keep
        their size (a plan places shards on a sharding group's ranks); the
        number of ``replicas``, and with it the world size, may change (a
        replica group left out while its replacement starts, then taken
        back). ``store`` and ``prefix`` say where the new default group
        meets (``dist_rec.distributed.world.reform_process_group``).
        Sub-groups are formed again for the new grid, in the order first
        asked for; registered listeners then run."""
        rank = self.rank if rank is None else int(rank)
        replicas = self.replicas if replicas is None else int(replicas)
        world_size = self.grid.group_size * replicas if world_size is None else int(world_size)
        if replicas < 1 or world_size != self.grid.group_size * replicas:
            raise ValueError(
                f"Invalid world_size={world_size}. Must stay {self.grid.group_size} ranks per sharding group x "
                f"{replicas} replica(s) = {self.grid.group_size * replicas}: shards are placed on a sharding group's "
                "ranks by the plan; another group size needs a new plan (load a checkpoint into a new job)."
            )
        self._release_transports()
        world.reform_process_group(rank, world_size, store=store, prefix=prefix)
        self.replicas = replicas
        self._form(rank, world_size)
        for key, spec in self._subgroup_specs.items():
            self._form_subgroup(key, spec)
        for listener in self._listeners:
            listener(self)

    def abort(self, reason: str) -> None:
        """Fails every collective of this process now, and every peer's that
        waits on it (``dist_rec.distributed.abort``); the groups must then be
        rebuilt. Safe to call from another thread than the one blocked."""
        abort_communication(reason, keep_ports=[store_port(world.store())])

    def close(self) -> None:
        """Drops the transports (before the process leaves its groups)."""
        self._release_transports()

    # -- internals -------------------------------------------------------------

    def _form(self, rank: int, world_size: int) -> None:
        """The grid's groups (every sharding group, then every replica group:
        ``new_group`` is a collective over the job) and the sharding group's
        intra-host transport. Each group is new, so sharding collectives never
        interleave with DDP's on the default group."""
        self.grid = ShardingGrid.build(world_size, self.replicas, self.layout, rank)
        self._sharding_group = self._replica_group = None
        for ranks in self.grid.sharding_groups:
            group = self._new_group(ranks)
            if rank in ranks:
                self._sharding_group = group
        if self.replicas > 1:
            for ranks in self.grid.replica_groups:
                group = self._new_group(ranks)
                if rank in ranks:
                    self._replica_group = group
        self._transported = [self._sharding_group]
        shm_transport.intra_host_all_to_all(self._sharding_group, self.device, timeout=self._transport_timeout())

    def _new_group(self, ranks: Sequence[int]):
        kwargs = {"timeout": datetime.timedelta(seconds=self.timeout_s)} if self.timeout_s is not None else {}
        return dist.new_group(ranks=list(ranks), **kwargs)

    def _form_subgroup(self, key: str, spec: _SubgroupSpec) -> None:
        """Forms the sub-group(s) of ``spec`` for the current grid; a family's
        members of replicas that no longer exist are dropped."""
        if spec.copies:
            for position, ranks in enumerate(self.grid.replica_groups):
                self._subgroups[f"{key}/{position}"] = self._new_subgroup(tuple(ranks), False)
            return
        if spec.positions is None:
            self._subgroups[key] = self._new_subgroup(spec.ranks or tuple(range(self.world_size)), spec.intra_host_transport)
            return
        for old in [k for k in self._subgroups if k.startswith(f"{key}/")]:
            del self._subgroups[old]
        for replica, ranks in enumerate(self.grid.sharding_groups):
            self._subgroups[f"{key}/{replica}"] = self._new_subgroup(tuple(ranks[p] for p in spec.positions), False)

    def _new_subgroup(self, ranks: Tuple[int, ...], intra_host_transport: bool):
        group = self._new_group(ranks)
        member = self.rank in ranks
        if intra_host_transport and member:
            self._transported.append(group)
            shm_transport.intra_host_all_to_all(group, self.device, timeout=self._transport_timeout())
        return group if member else None

    @staticmethod
    def _describe(spec: _SubgroupSpec) -> str:
        if spec.copies:
            return "a family of replica groups"
        if spec.positions is not None:
            return f"at positions {list(spec.positions)} of every sharding group"
        return "of every rank" if spec.ranks is None else str(list(spec.ranks))

    def _transport_timeout(self) -> float:
        return shm_transport.DEFAULT_TIMEOUT_S if self.timeout_s is None else float(self.timeout_s)

    def _release_transports(self) -> None:
        for group in self._transported:
            shm_transport.release(group)
        self._transported = []

    def __repr__(self) -> str:
        return f"ProcessGroups({self.grid}, sub-groups {list(self._subgroup_specs)}, generation {world.generation()})"


_DEFAULT: Dict[str, object] = {}


def default_process_groups(device: Optional[torch.device] = None) -> ProcessGroups:
    """A process-wide owner of one replica over every rank, made on the
    first call (a collective) for components built without one."""
    key = (world.generation(), id(dist.group.WORLD))
    groups = _DEFAULT.get("groups")
    if groups is None or _DEFAULT.get("key") != key:
        groups = ProcessGroups(device=device)
        _DEFAULT.update(groups=groups, key=key)
    return groups
