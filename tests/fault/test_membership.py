"""Membership decisions as plain functions: which ranks go on after a
failure, who is a survivor, a rejoiner or a replacement, and where each
rank's state comes from."""

import pytest

from dist_rec.fault.membership import (
    REJOINER,
    REPLACEMENT,
    SURVIVOR,
    Epoch,
    JobShape,
    degraded_epoch,
    full_epoch,
    restore_plan,
    whole_groups,
)

SHAPE_2X2 = JobShape(world_size=4, replicas=2)  # sharding groups [0, 1] and [2, 3]


def test_whole_groups_and_the_degraded_epoch_of_a_2d_job():
    assert whole_groups(SHAPE_2X2, [0, 1, 3]) == [[0, 1]]
    epoch = degraded_epoch(5, SHAPE_2X2, [0, 1, 3], {0: 0, 1: 0, 3: 0}, "rank 2 died")
    assert epoch.members == [0, 1] and epoch.replicas == 1 and epoch.world_size == 2
    assert epoch.roles == {0: SURVIVOR, 1: SURVIVOR} and epoch.rank_of(1) == 1
    # No whole group left, every group whole, or 1D: nobody goes on alone.
    assert degraded_epoch(5, SHAPE_2X2, [0, 3], {0: 0, 3: 0}, "") is None
    assert degraded_epoch(5, SHAPE_2X2, [0, 1, 2, 3], {r: 0 for r in range(4)}, "") is None
    assert degraded_epoch(5, JobShape(2), [0], {0: 0}, "") is None


def test_degraded_epochs_renumber_ranks_keeping_positions_in_both_layouts():
    shape = JobShape(world_size=6, replicas=3, layout="replicas_on_host")  # groups [0,3], [1,4], [2,5]
    epoch = degraded_epoch(1, shape, [0, 2, 3, 5], {r: 0 for r in range(6)}, "")
    assert epoch.members == [0, 2, 3, 5] and epoch.replicas == 2
    # New grid (replicas_on_host, 2 replicas): sharding groups [0, 2] and [1, 3] in epoch ranks,
    # i.e. original [0, 3] and [2, 5]: each rank keeps its position (its shard).
    assert [epoch.members[r] for r in (0, 2)] == [0, 3] and [epoch.members[r] for r in (1, 3)] == [2, 5]


def test_the_full_epoch_waits_for_every_rank_and_names_roles():
    joined = {0: (0, "intact"), 1: (0, "intact"), 2: (1, "fresh")}
    assert full_epoch(3, SHAPE_2X2, [0, 1], joined, "") is None  # rank 3 missing
    joined[3] = (0, "intact")
    epoch = full_epoch(3, SHAPE_2X2, [0, 1], joined, "ranks back")
    assert epoch.roles == {0: SURVIVOR, 1: SURVIVOR, 2: REPLACEMENT, 3: REJOINER}
    assert epoch.incarnations == {0: 0, 1: 0, 2: 1, 3: 0}
    assert epoch.includes(2, 1) and not epoch.includes(2, 0)
    assert Epoch.from_json(epoch.to_json()) == epoch


def _infos(*rows):
    return [{"rank": r, "role": role, "step": step} for r, (role, step) in enumerate(rows)]


def test_restore_plan_1d_partial_recovery():
    infos = _infos((SURVIVOR, 41), (REPLACEMENT, 0), (SURVIVOR, 42))
    plan = restore_plan(infos, [[0], [1], [2]])
    assert plan.source == 2 and plan.resume_step == 42  # the most recent survivor
    assert plan.needs_shards == [1] and plan.from_checkpoint == [1]
    assert plan.shard_sources == {0: 0, 1: None, 2: 2}


def test_restore_plan_2d_rebuilds_from_the_live_replica():
    # Grid of 2 x 2 in epoch ranks: replica groups [0, 2] and [1, 3].
    infos = _infos((SURVIVOR, 300), (SURVIVOR, 300), (REPLACEMENT, 0), (REJOINER, 120))
    plan = restore_plan(infos, [[0, 2], [1, 3]])
    assert plan.source == 0 and plan.resume_step == 300
    assert plan.needs_shards == [2, 3] and plan.from_checkpoint == []
    assert plan.shard_sources[2] == 0 and plan.shard_sources[3] == 1


def test_restore_plan_falls_back_to_the_checkpoint_when_every_replica_of_a_shard_died():
    infos = _infos((REPLACEMENT, 0), (SURVIVOR, 80), (REPLACEMENT, 0), (SURVIVOR, 80))
    plan = restore_plan(infos, [[0, 2], [1, 3]])
    assert plan.source == 1 and plan.from_checkpoint == [0, 2]
    assert plan.shard_sources[1] == 1 and plan.shard_sources[3] == 3


def test_restore_plan_with_no_live_state_is_a_full_restart():
    plan = restore_plan(_infos((REPLACEMENT, 0), (REPLACEMENT, 0)), [[0], [1]])
    assert plan.source is None and plan.from_checkpoint == [0, 1]


def test_a_rejoiner_that_is_its_groups_most_recent_copy_keeps_its_shards():
    infos = _infos((REJOINER, 50), (REJOINER, 50), (REPLACEMENT, 0), (REJOINER, 40))
    plan = restore_plan(infos, [[0, 2], [1, 3]])
    assert plan.source == 0 and plan.shard_sources[0] == 0 and plan.shard_sources[2] == 0
    assert plan.shard_sources[3] == 1 and plan.needs_shards == [2, 3]


def test_epoch_roles_are_checked():
    with pytest.raises(ValueError, match="role"):
        Epoch(0, [0, 1], {0: SURVIVOR, 1: "zombie"}, {0: 0, 1: 0}, 1)
