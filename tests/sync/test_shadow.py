"""The background synchroniser (ShadowSync) on real gloo ranks: with the
trainer paused its rounds are the foreground rule's; an update landing
during a round is kept; the replicas agree when to stop, also when one
starts late; and the trainer converges with it on 4 processes."""

import json
import time

import pytest
import torch
import torch.distributed as dist

from dist_rec.sync import ForegroundSync, ShadowSync, make_rule
from dist_rec.testing.multi_process import run_multi_process

WORLD = 3
SHAPES = [(4, 3), (7,), (2, 2, 2)]


def _params(rank):
    g = torch.Generator().manual_seed(50 + rank)
    return [torch.randn(*shape, dtype=torch.float64, generator=g) for shape in SHAPES]


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _gather(x):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return parts


def _sum(x):
    wire = x.clone()
    dist.all_reduce(wire)
    return wire


def _rule(name, start):
    return make_rule(name, WORLD, alpha=0.3, block_momentum=0.6, block_lr=0.9, start=start)


def _rank_paused(rank, world_size, name, late):
    params = _params(rank)
    start = _flat(_params(0))
    group = dist.new_group(list(range(world_size)))
    initial = _flat(params).clone()
    shadow = ShadowSync(params, _rule(name, start), lambda: group)
    if rank == 1 and late:
        time.sleep(1.0)  # a replica that starts its rounds late: the others wait for it, nobody hangs
    shadow.start()
    time.sleep(0.05)
    shadow.stop(timeout_s=30)
    rounds = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(rounds, torch.tensor([shadow.rounds]))
    assert len({int(r) for r in rounds}) == 1 and shadow.rounds >= 1, rounds  # the replicas agreed when to stop
    # The same number of foreground rounds from the same start, on the main thread.
    reference = [p.clone() for p in _params(rank)]
    foreground = ForegroundSync(reference, _rule(name, start), lambda: group, every=1)
    for _ in range(shadow.rounds):
        foreground.after_optimizer_step()
    torch.testing.assert_close(_flat(params), _flat(reference), rtol=0, atol=1e-6)
    assert not torch.equal(_flat(params), initial)


@pytest.mark.parametrize("name", ["ma", "easgd", "bmuf"])
def test_background_rounds_with_the_trainer_paused_equal_the_foreground_rule(name):
    run_multi_process(_rank_paused, world_size=WORLD, name=name, late=name == "ma")


def _rank_planted(rank, world_size, name):
    params = _params(rank)
    start = _flat(_params(0))
    group = dist.new_group(list(range(world_size)))
    rule = _rule(name, start)
    planted, copies = [], []

    def plant(round_index, copy):  # a training step landing between a round's copy and its add
        copies.append(copy.clone())
        update = torch.full((sum(p.numel() for p in params),), 0.01 * (rank + 1) * (round_index + 1), dtype=torch.float64)
        planted.append(update)
        offset = 0
        with torch.no_grad():
            for p in params:
                p.add_(update[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    shadow = ShadowSync(params, rule, lambda: group)
    shadow.between = plant
    shadow.start()
    time.sleep(0.05)
    shadow.stop(timeout_s=30)
    assert shadow.rounds == len(planted) == len(copies) >= 1
    # Replay: each round moves the live parameters by (target of the copy - copy); the planted updates stay.
    x = _flat(_params(rank))
    reference_rule = _rule(name, start)
    for copy, update in zip(copies, planted):
        torch.testing.assert_close(copy, x, rtol=0, atol=1e-12)
        x = x + update
        x = x + (reference_rule.target(copy, _sum) - copy)
    torch.testing.assert_close(_flat(params), x, rtol=0, atol=1e-12)
    lost = _flat(params) - (x - sum(planted))
    torch.testing.assert_close(lost, sum(planted), rtol=0, atol=1e-12)  # every planted update is there, counted


@pytest.mark.parametrize("name", ["ma", "bmuf"])
def test_an_update_made_during_a_round_is_never_lost(name):
    run_multi_process(_rank_planted, world_size=WORLD, name=name)


def test_the_duty_cycle_paces_the_rounds():
    shadow = ShadowSync([torch.zeros(3)], make_rule("ma", 1), lambda: None, interval_s=0.01, duty=0.25)
    assert shadow.pause_after(0.1) == pytest.approx(0.3)  # a round of 0.1 s: 0.3 s of pause, 25% of the time in rounds
    assert shadow.pause_after(0.001) == pytest.approx(0.01)  # never less than interval_s
    assert ShadowSync([torch.zeros(3)], make_rule("ma", 1), lambda: None).pause_after(0.1) == 0  # duty 1: back to back
    with pytest.raises(ValueError, match="sync.duty=0"):
        ShadowSync([torch.zeros(3)], make_rule("ma", 1), lambda: None, duty=0)


def _rank_blocks(rank, world_size):
    import threading

    params = [torch.zeros(4, dtype=torch.float64)]
    group = dist.new_group(list(range(world_size)))
    shadow = ShadowSync(params, make_rule("ma", world_size), lambda: group, min_steps=3)
    started = []
    shadow.between = lambda round_index, copy: started.append(shadow._round_steps)  # the steps its wait saw
    shadow.start()
    for _ in range(10):  # ten optimizer steps, 20 ms apart
        time.sleep(0.02)
        shadow.stepped()
    time.sleep(0.1)
    shadow.stop(timeout_s=30)
    # A round once every block of 3 steps at most (under load a wake-up may come a step late), none between;
    # the stop ends the wait for a block that never comes.
    assert 2 <= len(started) <= 3 and all(b - a >= 3 for a, b in zip([0, *started], started)), started


def test_background_rounds_wait_for_a_block_of_steps():
    run_multi_process(_rank_blocks, world_size=2)


class _AddOne:
    """A rule whose every round moves the parameters by +1."""

    def target(self, x, all_reduce_sum):
        return all_reduce_sum(x) + 1


def _rank_abandoned(rank, world_size):
    import threading

    params = [torch.zeros(5, dtype=torch.float64)]
    group = dist.new_group([0])
    shadow = ShadowSync(params, _AddOne(), lambda: group)
    in_round, release = threading.Event(), threading.Event()

    def hold(round_index, copy):  # the round waits here while its sync is abandoned (as after a failure)
        in_round.set()
        release.wait(30)

    shadow.between = hold
    shadow.start()
    assert in_round.wait(30)
    threading.Timer(0.2, release.set).start()
    assert shadow.abandon(timeout_s=30)
    assert torch.equal(params[0], torch.zeros(5, dtype=torch.float64))  # the round in flight added nothing
    assert shadow.error is None and not shadow.running
    shadow.between = None
    shadow.start()  # rounds start again (after a rebuild: on the new group)
    time.sleep(0.05)
    shadow.stop(timeout_s=30)
    assert shadow.rounds >= 1 and torch.equal(params[0], torch.full((5,), float(shadow.rounds), dtype=torch.float64))


def test_an_abandoned_round_never_adds_and_the_rounds_restart():
    run_multi_process(_rank_abandoned, world_size=1)


def _rank_train(rank, world_size, out, overrides):
    from dist_rec.config import load_config
    from dist_rec.train import Environment, train

    config = load_config(
        "launch/configs/tiny.yaml",
        [f"train.batch_size={64 // world_size}", "train.steps=150", "train.log_every=50", "train.eval_every=0",
         f"train.output_dir={out}", "sync.interval_s=0.005", *overrides],
    )  # fmt: skip
    env = Environment(rank=rank, world_size=world_size, local_world_size=world_size, backend="gloo")
    train(config, env, quiet=True)


def test_background_sync_trains_the_main_job_on_four_processes(tmp_path):
    """Dense replicas averaged in the background (1D), and 2D embedding
    replicas averaged in the background, against DDP: both converge."""
    saves = ["train.checkpoint_every=40", "checkpoint.async_save=true"]  # saves while rounds run: no deadlock
    runs = {
        "ddp": [],
        "dense_ma": ["sync.dense=ma", "sync.mode=background", *saves],
        "embeddings_2d": ["sharding.replicas=2", "sharding.type=table_wise", "sync.embeddings=background", *saves],
    }
    results = {}
    for name, extra in runs.items():
        out = tmp_path / name
        if "checkpoint.async_save=true" in extra:
            extra = [*extra, f"train.checkpoint_dir={tmp_path / name / 'ckpt'}"]
        run_multi_process(_rank_train, world_size=4, timeout=300, out=str(out), overrides=extra)
        results[name] = json.loads((out / "summary.json").read_text())
    assert results["dense_ma"]["dense_sync"]["rounds"] >= 1 and results["dense_ma"]["dense_sync"]["mode"] == "background"
    assert results["embeddings_2d"]["embedding_sync"]["rounds"] >= 1
    for name in ("dense_ma", "embeddings_2d"):
        losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line).get("kind") == "train"]  # fmt: skip
        assert losses[-1] < losses[0], (name, losses)
        auc = results[name]["eval"]["auc"]
        assert auc > 0.6 and abs(auc - results["ddp"]["eval"]["auc"]) < 0.03, (name, results[name]["eval"], results["ddp"]["eval"])
        entries = sorted(p.name for p in (tmp_path / name / "ckpt").iterdir() if p.name.startswith("step-"))
        assert entries == ["step-000000120", "step-000000150"], entries  # saved during the rounds (keep_last 2) and at the end
