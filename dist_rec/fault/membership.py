"""Membership epochs: who trains together, and in which role.

A fault-tolerant job runs as a sequence of *epochs*. An epoch is a set of
the job's original ranks that form process groups together, numbered
afresh (``rank_of``), each in a role:

* ``survivor``: a process that kept running and holds current state;
* ``rejoiner``: a process that kept its memory but was left out of the
  epochs before (its replica group was broken while the other groups went
  on), so its shards are stale;
* ``replacement``: a fresh process started in a dead rank's place.

The coordinator (``coordinator.py``) publishes epochs; the decisions are
the pure functions here, so they are tested without processes:

* after a failure in a 2D job, the sharding groups whose ranks all live go
  on at once as a smaller job (``degraded_epoch``);
* otherwise (1D, or no whole group left), and when the missing ranks of a
  degraded job are back, every rank forms the next epoch (``full_epoch``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from dist_rec.distributed.grid import grid_ranks

SURVIVOR, REJOINER, REPLACEMENT = "survivor", "rejoiner", "replacement"
ROLES = (SURVIVOR, REJOINER, REPLACEMENT)


@dataclass
class Epoch:
    """One membership epoch (plain data: it travels as JSON in the store)."""

    id: int
    members: List[int]  # original ranks, ascending
    roles: Dict[int, str]  # original rank -> role
    incarnations: Dict[int, int]  # original rank -> the process (incarnation) that takes part
    replicas: int  # replica groups in this epoch (G')
    reason: str = ""

    def __post_init__(self) -> None:
        self.members = sorted(int(r) for r in self.members)
        self.roles = {int(k): v for k, v in self.roles.items()}
        self.incarnations = {int(k): int(v) for k, v in self.incarnations.items()}
        for r in self.members:
            if self.roles.get(r) not in ROLES:
                raise ValueError(f"Epoch {self.id}: rank {r} has role {self.roles.get(r)!r}; must be one of {ROLES}.")

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def prefix(self) -> str:
        """The store prefix this epoch's process groups meet on."""
        return f"ft/epoch/{self.id}/pg"

    def rank_of(self, original_rank: int) -> int:
        """The rank ``original_rank`` has in this epoch's groups."""
        return self.members.index(int(original_rank))

    def includes(self, original_rank: int, incarnation: int) -> bool:
        return int(original_rank) in self.members and self.incarnations.get(int(original_rank)) == int(incarnation)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Epoch":
        return cls(**json.loads(text))

    def describe(self) -> str:
        roles = ", ".join(f"{r}:{self.roles[r]}" for r in self.members)
        return f"epoch {self.id}: ranks [{roles}] as {self.replicas} replica group(s)" + (f" ({self.reason})" if self.reason else "")


@dataclass(frozen=True)
class JobShape:
    """The job as launched: what every epoch is cut from."""

    world_size: int
    replicas: int = 1
    layout: str = "shards_on_host"

    @property
    def group_size(self) -> int:
        return self.world_size // self.replicas

    def sharding_groups(self) -> List[List[int]]:
        return grid_ranks(self.world_size, self.replicas, self.layout)[0]


def whole_groups(shape: JobShape, alive: Iterable[int]) -> List[List[int]]:
    """The sharding groups (original ranks) whose ranks are all in ``alive``."""
    alive = set(alive)
    return [g for g in shape.sharding_groups() if all(r in alive for r in g)]


def degraded_epoch(
    epoch_id: int, shape: JobShape, alive: Iterable[int], incarnations: Dict[int, int], reason: str
) -> Optional[Epoch]:
    """The epoch of the whole sharding groups among ``alive`` when some but
    not all groups are whole (2D): they train on at once while the broken
    groups wait for their replacements. None when that does not apply (one
    replica group, no whole group, or every group whole)."""
    if shape.replicas < 2:
        return None
    groups = whole_groups(shape, alive)
    if not groups or len(groups) == shape.replicas:
        return None
    members = sorted(r for g in groups for r in g)
    return Epoch(
        epoch_id, members, {r: SURVIVOR for r in members}, {r: incarnations[r] for r in members}, len(groups), reason
    )


def full_epoch(
    epoch_id: int,
    shape: JobShape,
    current: Sequence[int],
    joined: Dict[int, Tuple[int, str]],
    reason: str,
) -> Optional[Epoch]:
    """The epoch of every rank, once every rank has joined: ``joined`` maps
    an original rank to ``(incarnation, state)`` with state "fresh" (a
    replacement) or "intact" (kept its memory). Ranks of ``current`` (the
    members of the epoch that was running) that are intact are survivors;
    other intact ranks are rejoiners. None while a rank is missing."""
    if any(r not in joined for r in range(shape.world_size)):
        return None
    current = set(current)
    roles, incarnations = {}, {}
    for r in range(shape.world_size):
        incarnation, state = joined[r]
        incarnations[r] = incarnation
        if state == "fresh":
            roles[r] = REPLACEMENT
        else:
            roles[r] = SURVIVOR if r in current else REJOINER
    return Epoch(epoch_id, list(range(shape.world_size)), roles, incarnations, shape.replicas, reason)


@dataclass
class RestorePlan:
    """Where each rank's state comes from after an epoch forms, decided
    identically on every rank from what every rank reported (``infos``:
    per epoch rank, ``{"rank", "role", "step"}``)."""

    source: Optional[int]  # epoch rank whose dense state, counters and data position everyone takes; None: all fresh
    resume_step: int
    shard_sources: Dict[int, Optional[int]] = field(default_factory=dict)  # per epoch rank: its shards' source, None = checkpoint
    needs_shards: List[int] = field(default_factory=list)  # epoch ranks whose shards are restored

    @property
    def from_checkpoint(self) -> List[int]:
        return [r for r in self.needs_shards if self.shard_sources[r] is None]


_RECENCY = {SURVIVOR: 2, REJOINER: 1, REPLACEMENT: 0}


def restore_plan(infos: Sequence[Dict], replica_groups: Sequence[Sequence[int]]) -> RestorePlan:
    """The restore decisions (see ``RestorePlan``). ``replica_groups`` are
    the new grid's replica groups in epoch ranks (one group per rank in 1D).

    The source of the dense state is the most recent rank: a survivor (then
    a rejoiner) with the most steps, the lowest rank on a tie. A rank's
    shards come from the most recent member of its replica group when
    that member is more recent than it (survivor over rejoiner over
    replacement; more steps first); a replacement whose replica group has
    no live state restores from the checkpoint; a survivor keeps its own."""

    def recency(r: int):
        return (_RECENCY[infos[r]["role"]], int(infos[r]["step"]), -r)

    live = [r for r in range(len(infos)) if infos[r]["role"] != REPLACEMENT]
    source = max(live, key=recency) if live else None
    resume = int(infos[source]["step"]) if source is not None else None
    plan = RestorePlan(source, -1 if resume is None else resume)
    for group in replica_groups:
        best = max(group, key=recency)
        for r in group:
            if infos[r]["role"] == SURVIVOR:
                plan.shard_sources[r] = r
                continue
            if infos[best]["role"] == REPLACEMENT:
                plan.shard_sources[r] = None  # nobody in the group kept the shard: the checkpoint
                plan.needs_shards.append(r)
            elif best == r:
                plan.shard_sources[r] = r  # a rejoiner that is its group's most recent copy keeps it
            else:
                plan.shard_sources[r] = best
                plan.needs_shards.append(r)
    plan.needs_shards.sort()
    return plan
