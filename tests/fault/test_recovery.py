"""A dead or hung rank under the fault-tolerant launcher, for real: worker
processes spawned by ``dist_rec.fault.launch``, failures acted out by
SIGKILL and SIGSTOP (``fault.inject``), gloo over loopback.

Each test checks what the issue asks of recovery: survivors keep their
state and read no checkpoint; a replacement holds exactly its shards of
the last checkpoint (1D) or of the live replica (2D); the portion of lost
samples is counted; the other replica group trains on while the
replacement starts; a hung rank is detected within the timeout, with the
wait logged; a kill during a save, and a replacement dying in its own
recovery, are survived too.
"""

import json
import math
import random

import pytest

from launching import assert_shards_equal, run_job

BASE = ["train.eval_every=0", "train.log_every=10", "fault.heartbeat_s=0.5", "train.batch_size=64"]


def _checkpointed(every: int, root):
    return [f"train.checkpoint_dir={root / 'ckpt'}", f"train.checkpoint_every={every}"]


def assert_fresh_rows(shards, what: str) -> None:
    """Rows drawn from their table's default init range (table-wise: a shard
    is the whole table), with a zero optimizer state."""
    for key, (weight, state) in shards.items():
        bound = math.sqrt(1.0 / weight.shape[0])
        assert weight.abs().max() <= bound and weight.std() > 0, f"{what}: {key} is not freshly initialised"
        for name, tensor in state.items():
            assert not tensor.any(), f"{what}: {key}'s {name} is not zero"


def test_1d_partial_recovery_keeps_survivors_and_restores_only_the_lost_shard(tmp_path):
    kill = random.Random().randint(25, 55)  # a random step, logged on failure
    every = 20
    job = run_job(tmp_path, 2, [*BASE, *_checkpointed(every, tmp_path), "sharding.type=table_wise", "train.steps=80",
                                "fault.timeout_s=20", f'fault.inject=["rank=1 step={kill}"]'])  # fmt: skip
    assert job.proc.returncode == 0, f"kill at step {kill}\n{job.log[-6000:]}"
    # Rank 0 survives: its tables when training resumes are its tables at the failure.
    failure = job.dump(0, 0, f"failure-{kill}")
    restored = job.dump(0, 0, "restored-1")
    assert restored["role"] == "survivor" and restored["step"] == kill
    assert_shards_equal(restored["shards"], failure["shards"], f"rank 0 (kill at {kill})")
    assert [e["own_restored_bytes"] for e in job.events("restored") if e["rank"] == 0] == [0]  # it read nothing
    # Rank 1's replacement holds exactly its shards of the last checkpoint.
    replacement = job.dump(1, 1, "restored-1")
    assert replacement["role"] == "replacement" and replacement["step"] == kill
    # The newest checkpoint published at the failure: the save at the last multiple of ``every`` is written in
    # the background, and when the kill came while it was in flight the one before is the last good one (before
    # step 40 that is none: the lost shards then start over from fresh initial rows, step 0).
    checkpoint = replacement["checkpoint"] or {"step": 0, "shards": None}
    assert checkpoint["step"] in (kill // every * every, kill // every * every - every), kill
    if checkpoint["shards"] is None:
        assert "no checkpoint yet: the lost shards restart from fresh initial rows" in job.log, kill
        assert_fresh_rows(replacement["shards"], f"rank 1's replacement (kill at {kill}, no checkpoint yet)")
    else:
        assert_shards_equal(replacement["shards"], checkpoint["shards"], "rank 1's replacement vs the checkpoint")
    # The portion of lost samples: the steps since that checkpoint, on the lost shards.
    summary = job.summary()
    assert summary["steps"] == 80
    (failure_record,) = summary["failures"]
    assert failure_record["recovery"] == "partial recovery"
    assert failure_record["checkpoint_step"] == checkpoint["step"], kill
    assert failure_record["lost_samples"] == (kill - checkpoint["step"]) * 128
    assert 0 < failure_record["lost_fraction"] < 1
    expected = failure_record["lost_samples"] * failure_record["lost_fraction"] / summary["examples"]
    assert summary["portion_of_lost_samples"] == pytest.approx(expected)


def test_2d_replica_rebuild_loses_nothing_and_the_other_group_trains_on(tmp_path):
    job = run_job(tmp_path, 4, [*BASE, "sharding.type=table_wise", "sharding.replicas=2", "train.batch_size=32",
                                "train.steps=700", "fault.timeout_s=20", 'fault.inject=["rank=2 step=40"]'])  # fmt: skip
    assert job.proc.returncode == 0, job.log[-6000:]
    (kill,) = [e["time"] for e in job.events("injected")]
    back = min(e["time"] for e in job.events("step") if e["rank"] == 2 and e["incarnation"] == 1)
    # Ranks 0 and 1 (the other replica group) step on while rank 2's replacement starts and rebuilds.
    # (the replacement is a spare built ahead, so the window is short: a second or two of steps)
    steps_meanwhile = sorted({e["step"] for e in job.events("step") if e["rank"] == 0 and kill < e["time"] < back})
    assert len(steps_meanwhile) >= 2, f"steps {steps_meanwhile} of rank 0 between the kill and the replacement's first step"
    full = [e["epoch"] for e in job.events("joined") if e["rank"] == 2 and e["incarnation"] == 1][0]
    # The rebuilt shards equal the live replica's, bitwise, at the rejoin ...
    for live, rebuilt in ((0, (2, 1)), (1, (3, 0))):
        a, b = job.dump(live, 0, f"restored-{full}"), job.dump(*rebuilt, f"restored-{full}")
        assert b["role"] in ("replacement", "rejoiner") and a["step"] == b["step"]
        assert_shards_equal(b["shards"], a["shards"], f"rank {rebuilt[0]} rebuilt from rank {live}")
    # ... and all replicas are equal after the next sync.
    for pair in ((0, (2, 1)), (1, (3, 0))):
        assert_shards_equal(job.dump(pair[0], 0, f"synced-{full}")["shards"], job.dump(*pair[1], f"synced-{full}")["shards"],
                            f"replicas {pair} after the first sync")  # fmt: skip
    summary = job.summary()
    assert summary["steps"] == 700 and summary["lost_samples"] == 0
    assert {f["recovery"] for f in summary["failures"]} == {"degraded", "replica rebuild"}


def test_a_hung_rank_is_detected_within_the_timeout_and_the_wait_is_logged(tmp_path):
    timeout = 6.0
    job = run_job(tmp_path, 2, [*BASE, *_checkpointed(20, tmp_path), "sharding.type=row_wise", "train.steps=60",
                                f"fault.timeout_s={timeout}", "fault.warn_after_s=2",
                                'fault.inject=["rank=1 step=30 signal=stop"]'])  # fmt: skip
    assert job.proc.returncode == 0, job.log[-6000:]
    (stopped,) = [e["time"] for e in job.events("injected")]
    detected = min(e["time"] for e in job.events("failure") if e["rank"] == 0)
    assert detected - stopped <= timeout + 3, f"detected {detected - stopped:.1f} s after the stop"
    resumed = [e["time"] for e in job.events("restored") if e["rank"] == 0]
    assert resumed and resumed[0] - stopped <= timeout + 20
    # While it waited, the survivor said what for, since when, and who was silent.
    assert "rank 0.0] waiting" in job.log and "since" in job.log and "rank 1 silent for" in job.log, job.log[-4000:]
    assert job.summary()["failures"][0]["recovery"] == "partial recovery"


def test_a_kill_during_a_save_keeps_the_previous_checkpoint_for_recovery(tmp_path):
    job = run_job(tmp_path, 2, [*BASE, *_checkpointed(20, tmp_path), "sharding.type=table_wise", "train.steps=80",
                                "fault.timeout_s=20", 'fault.inject=["rank=1 step=40 at=checkpoint"]'])  # fmt: skip
    assert job.proc.returncode == 0, job.log[-6000:]
    replacement = job.dump(1, 1, "restored-1")
    # The save of step 40 is written in the background: training may have gone on when the kill came (a step or
    # so, more when the writer thread waits for the interpreter), never past the next save, which waits for it.
    assert 40 <= replacement["step"] <= 60 and replacement["checkpoint"]["step"] == 20, replacement["step"]
    assert_shards_equal(replacement["shards"], replacement["checkpoint"]["shards"], "restored from the step-20 checkpoint")
    assert job.summary()["failures"][0]["lost_samples"] == (replacement["step"] - 20) * 128
    assert not list((tmp_path).glob("ckpt.tmp-*")) and not list(tmp_path.glob("ckpt.old-*"))


def test_the_job_recovers_when_the_replacement_dies_during_its_own_recovery(tmp_path):
    job = run_job(tmp_path, 2, [*BASE, *_checkpointed(20, tmp_path), "sharding.type=table_wise", "train.steps=60",
                                "fault.timeout_s=20",
                                'fault.inject=["rank=1 step=50", "rank=1 at=restore incarnation=1"]'])  # fmt: skip
    assert job.proc.returncode == 0, job.log[-6000:]
    assert [e["incarnation"] for e in job.events("injected")] == [0, 1]
    final = job.dump(1, 2, [n for n in job.dump_names() if n.startswith("rank1.2.restored")][0].split(".", 2)[2][:-3])
    assert final["role"] == "replacement" and final["step"] == 50
    # (a kill at step 50 finds the step-20 checkpoint published, or the step-40 one: the background write of the
    # step-40 save waited for the step-20 one)
    assert final["checkpoint"] is not None and final["checkpoint"]["step"] in (20, 40)
    assert_shards_equal(final["shards"], final["checkpoint"]["shards"], "the second replacement vs the checkpoint")
    assert job.summary()["steps"] == 60


def test_the_chaos_script_kills_a_random_rank_and_the_job_survives(tmp_path):
    import subprocess

    from dist_rec.fault import chaos
    from launching import REPO, command, free_port, job_env

    port = free_port()
    overrides = [f"train.output_dir={tmp_path / 'out'}", *BASE, *_checkpointed(100, tmp_path), "sharding.type=row_wise",
                 "train.steps=1500", "train.batch_size=32", "fault.timeout_s=20"]  # fmt: skip
    launcher = subprocess.Popen(command(2, port, overrides), env=job_env(tmp_path), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert chaos.main(["--store", f"127.0.0.1:{port}", "--every", "6", "--count", "1", "--duration", "60",
                           "--seed", "3"]) == 0  # fmt: skip
        log = launcher.communicate(timeout=300)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, log[-5000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 1500 and len(summary["failures"]) == 1
    assert summary["failures"][0]["recovery"] == "partial recovery"
