"""Background replica sync (ShadowSync) under the fault-tolerant launcher,
for real: a rank SIGKILLed mid-run (``fault.inject``), worker processes
spawned by ``dist_rec.fault.launch``, gloo over loopback.

The survivors abandon their rounds with the aborted groups, recover in
place, and every rank of the new epoch (a replacement too) starts the
rounds again on the re-formed groups once the state is restored; the job
finishes. That rounds ran after the recovery is read from the event log:
each rank's ``restored`` event carries its round counts at the restore,
its ``done`` event the counts at the end.
"""

import pytest
from launching import run_job

BASE = ["train.eval_every=0", "train.log_every=10", "fault.heartbeat_s=0.5", "fault.timeout_s=20",
        "sync.interval_s=0.02"]  # fmt: skip


def _rounds_after_the_last_restore(job, rank: int, incarnation: int, key: str) -> int:
    restored = [e for e in job.events("restored") if e["rank"] == rank and e["incarnation"] == incarnation]
    (done,) = [e for e in job.events("done") if e["rank"] == rank and e["incarnation"] == incarnation]
    assert restored, f"rank {rank}.{incarnation} never restored"
    return done[key] - restored[-1][key]


def test_2d_background_rounds_resume_after_a_replica_rebuild(tmp_path):
    # Steps enough that the two survivors, training on alone at ~100 steps/s, are still running when rank 2's group
    # is back: its other rank may first wait 10 s for a round thread stuck in a collective (sync.abandon's
    # timeout), and at 600 steps the survivors once finished before it (CI, 2026-12-07).
    job = run_job(tmp_path, 4, [*BASE, "sharding.type=table_wise", "sharding.replicas=2", "train.batch_size=32",
                                "train.steps=2500", "sync.dense=ma", "sync.mode=background",
                                "sync.embeddings=background", 'fault.inject=["rank=2 step=40"]'])  # fmt: skip
    assert job.proc.returncode == 0, job.log[-6000:]
    summary = job.summary()
    assert summary["steps"] == 2500 and summary["lost_samples"] == 0
    assert "replica rebuild" in {f["recovery"] for f in summary["failures"]}, summary["failures"]
    assert summary["dense_sync"]["rounds"] > 0 and summary["embedding_sync"]["rounds"] > 0
    # While rank 2's replica group was out (the degraded epoch), ranks 0 and 1 ran dense rounds over the two of
    # them (at least the agreed stop of the switch back), and no embedding rounds (one copy of each shard).
    (degraded,) = {e["epoch"] for e in job.events("restored") if e["recovery"] == "degraded"}
    for rank in (0, 1):
        at = {e["epoch"]: e for e in job.events("restored") if e["rank"] == rank}
        back = at[min(epoch for epoch in at if epoch > degraded)]  # the epoch rank 2's group came back in
        assert back["dense_sync_rounds"] > at[degraded]["dense_sync_rounds"], at
        assert back["embedding_sync_rounds"] == at[degraded]["embedding_sync_rounds"], at
    # Every rank of the final epoch, the replacement of rank 2 among them, ran rounds on its new groups
    # (more than the one round of the agreed stop at the end).
    for rank, incarnation in ((0, 0), (1, 0), (2, 1), (3, 0)):
        for key in ("dense_sync_rounds", "embedding_sync_rounds"):
            after = _rounds_after_the_last_restore(job, rank, incarnation, key)
            assert after >= 3, f"rank {rank}.{incarnation}: {after} {key} after its last restore\n{job.log[-4000:]}"


@pytest.mark.parametrize("rule, mode", [("ma", "background"), ("bmuf", "foreground")])
def test_1d_dense_rounds_resume_after_a_partial_recovery(tmp_path, rule, mode):
    # Foreground rounds every 3 steps: the survivor (40 steps in) and the replacement (none) count the steps
    # afresh from the restore, or they would sum at different steps and wait on each other.
    job = run_job(tmp_path, 2, [*BASE, "sharding.type=table_wise", "train.batch_size=64", "train.steps=200",
                                f"train.checkpoint_dir={tmp_path / 'ckpt'}", "train.checkpoint_every=20",
                                f"sync.dense={rule}", f"sync.mode={mode}", "sync.every=3",
                                'fault.inject=["rank=1 step=40"]'])  # fmt: skip
    assert job.proc.returncode == 0, job.log[-6000:]
    summary = job.summary()
    assert summary["steps"] == 200
    (failure,) = summary["failures"]
    assert failure["recovery"] == "partial recovery"
    assert summary["dense_sync"]["mode"] == mode and "embedding_sync" not in summary
    for rank, incarnation in ((0, 0), (1, 1)):
        after = _rounds_after_the_last_restore(job, rank, incarnation, "dense_sync_rounds")
        if mode == "foreground":
            (resume,) = {e["resume_step"] for e in job.events("restored")}
            assert after == (200 - resume) // 3, f"rank {rank}.{incarnation}: {after} rounds in {200 - resume} steps"
        else:
            assert after >= 3, f"rank {rank}.{incarnation}: {after} dense rounds after its restore\n{job.log[-4000:]}"
