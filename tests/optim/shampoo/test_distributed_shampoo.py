"""Distributed Shampoo on 2 and 4 gloo ranks under DDP equals one process
on the global batch; each rank keeps only its blocks' state; checkpoints
round-trip exactly, onto another number of ranks too."""

import copy
import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_rec.optim import DDPShampooConfig, DistributedShampoo
from dist_rec.testing.multi_process import run_multi_process

SETTINGS = dict(
    lr=0.02, betas=(0.9, 0.99), epsilon=1e-8, momentum=0.5, weight_decay=1e-3, max_preconditioner_dim=16,
    precondition_frequency=3, grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8,
)
STEPS = 20
# DDP's average of the ranks' gradients and one process's mean over the
# global batch differ in the last bit; Shampoo magnifies such differences by
# up to about 1/epsilon in directions its statistics have barely seen.
FLOAT64_TOLERANCE = 1e-7
GLOBAL_BATCH = 16  # split over the ranks, so any world size trains the same model


class Net(nn.Module):
    """Blocks of every order: a 3-D parameter, split and merged matrices,
    vectors, a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(12, 40)
        self.second = nn.Linear(40, 24)
        self.out = nn.Linear(24, 1)
        self.mix = nn.Parameter(torch.randn(3, 4, 2))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        h = torch.relu(self.first(x))
        h = torch.relu(self.second(h))
        return self.scale * self.out(h).squeeze(-1) + (x[:, :8].reshape(-1, 4, 2) * self.mix.sum(0)).sum((1, 2))


def _data(step: int, dtype):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 12, generator=g, dtype=dtype)
    y = torch.randn(GLOBAL_BATCH, generator=g, dtype=dtype)
    return x, y


def _model(dtype):
    torch.manual_seed(0)
    return Net().to(dtype)


def _train(model, optimizer, steps, rank, world, dtype, first=0):
    """Steps on this rank's share of each global batch."""
    local = GLOBAL_BATCH // world
    for step in range(first, first + steps):
        x, y = _data(step, dtype)
        rows = slice(rank * local, (rank + 1) * local)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        optimizer.step()


def _single_process(dtype, steps=STEPS):
    model = _model(dtype)
    optimizer = DistributedShampoo(model.parameters(), **SETTINGS)
    _train(model, optimizer, steps, 0, 1, dtype)
    return model, optimizer


def _ddp_rank(rank, world_size, out, dtype_name, communication_dtype, save_at=None, load_from=None, bucket_numel=None):
    dtype = getattr(torch, dtype_name)
    model = _model(dtype)
    ddp = nn.parallel.DistributedDataParallel(model)
    config = DDPShampooConfig(
        communication_dtype=getattr(torch, communication_dtype) if communication_dtype else None,
        **({"bucket_numel": bucket_numel} if bucket_numel else {}),
    )
    optimizer = DistributedShampoo(ddp.parameters(), **SETTINGS, distributed_config=config)
    first = 0
    if load_from is not None:
        saved = torch.load(load_from, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        first = saved["step"]
    stop = save_at if save_at is not None else STEPS
    shadow = copy.deepcopy(model)  # one-process Shampoo fed the same averaged gradients
    shadow_optimizer = DistributedShampoo(shadow.parameters(), **SETTINGS)
    if load_from is not None:
        shadow_optimizer.load_state_dict(saved["optimizer"])
    worst = 0.0
    local = GLOBAL_BATCH // world_size
    for step in range(first, stop):
        x, y = _data(step, dtype)
        rows = slice(rank * local, (rank + 1) * local)
        optimizer.zero_grad()
        nn.functional.mse_loss(ddp(x[rows]), y[rows]).backward()
        for p, q in zip(model.parameters(), shadow.parameters()):
            q.grad = p.grad.clone()
        optimizer.step()
        shadow_optimizer.step()
        for p, q in zip(model.parameters(), shadow.parameters()):
            worst = max(worst, float((p.detach() - q.detach()).abs().max()))
    if save_at is not None:
        state = optimizer.state_dict()  # a collective: every rank gathers every block
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": state, "step": save_at}, f"{out}/checkpoint.pt")
        dist.barrier()
        return
    report = {
        "worst_vs_one_process": worst,
        "state_bytes": optimizer.state_bytes(),
        "owned": [[b.param_index, b.index] for b in optimizer.owned_blocks()],
    }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f)
    torch.save(model.state_dict(), f"{out}/rank{rank}.pt")


def _assert_close(state, reference: nn.Module, tol: float):
    for name, value in reference.state_dict().items():
        diff = float((state[name].double() - value.double()).abs().max())
        assert diff <= tol, f"{name}: {diff:.2e} > {tol:.0e}"


@pytest.mark.parametrize("world,bucket_numel", [(2, None), (4, None), (2, 1)], ids=["2", "4", "2-bucket-per-block"])
def test_distributed_equals_single_process_and_splits_the_state(tmp_path, world, bucket_numel):
    """float32 under DDP, fp32 communication: each rank's parameters equal a
    one-process Shampoo stepped on the same averaged gradients, every step
    (one bucket for all directions, or one per block)."""
    run_multi_process(
        _ddp_rank, world_size=world, out=str(tmp_path), dtype_name="float32", communication_dtype="float32",
        bucket_numel=bucket_numel,
    )
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert max(r["worst_vs_one_process"] for r in reports) <= 1e-6
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(torch.equal(state[k], states[0][k]) for state in states for k in state)  # one update everywhere
    _, single = _single_process(torch.float32, steps=1)
    owned = sorted(tuple(b) for r in reports for b in r["owned"])
    assert owned == sorted((b.param_index, b.index) for b in single.blocks)  # each block on exactly one rank
    per_rank = [r["state_bytes"] for r in reports]
    _, full = _single_process(torch.float32)
    assert sum(per_rank) == full.state_bytes()
    assert max(per_rank) < (0.75 if world == 2 else 0.5) * full.state_bytes()


@pytest.mark.parametrize("communication", ["float32", None])
def test_float64_distributed_equals_one_process_on_the_global_batch(tmp_path, communication):
    """End to end, DDP's averaging included: float64 parameters, the update
    sent in fp32 (rounded) or float64."""
    run_multi_process(_ddp_rank, world_size=2, out=str(tmp_path), dtype_name="float64", communication_dtype=communication)
    reference, _ = _single_process(torch.float64)
    for r in range(2):
        _assert_close(torch.load(tmp_path / f"rank{r}.pt"), reference, 1e-6 if communication else FLOAT64_TOLERANCE)


def test_bf16_communication_keeps_the_ranks_identical(tmp_path):
    run_multi_process(_ddp_rank, world_size=2, out=str(tmp_path), dtype_name="float32", communication_dtype="bfloat16")
    reference, _ = _single_process(torch.float32)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # The updates really travelled rounded (the run differs from fp32's), and
    # every rank applied the same rounded update.
    ours = torch.cat([states[0][k].reshape(-1) for k in states[0]])
    theirs = torch.cat([v.reshape(-1) for v in reference.state_dict().values()])
    assert torch.isfinite(ours).all() and not torch.equal(ours, theirs)


@pytest.mark.parametrize("saved_on,loaded_on", [(2, 4), (4, 2), (2, 1)])
def test_checkpoint_round_trip_onto_another_world_size(tmp_path, saved_on, loaded_on):
    """Saved after 9 steps on one number of ranks, resumed on another: the
    run ends where an uninterrupted one does (float64, so that DDP's
    averaging order does not matter)."""
    run_multi_process(
        _ddp_rank, world_size=saved_on, out=str(tmp_path), dtype_name="float64", communication_dtype=None, save_at=9
    )
    checkpoint = tmp_path / "checkpoint.pt"
    reference, _ = _single_process(torch.float64)
    if loaded_on == 1:
        model = _model(torch.float64)
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer = DistributedShampoo(model.parameters(), **SETTINGS)
        optimizer.load_state_dict(saved["optimizer"])
        _train(model, optimizer, STEPS - 9, 0, 1, torch.float64, first=9)
        _assert_close(model.state_dict(), reference, FLOAT64_TOLERANCE)
        return
    run_multi_process(
        _ddp_rank, world_size=loaded_on, out=str(tmp_path), dtype_name="float64", communication_dtype=None,
        load_from=str(checkpoint),
    )
    for r in range(loaded_on):
        assert json.loads((tmp_path / f"rank{r}.json").read_text())["worst_vs_one_process"] == 0.0
        _assert_close(torch.load(tmp_path / f"rank{r}.pt"), reference, FLOAT64_TOLERANCE)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_invalid_bucket_numel_is_refused(bad):
    with pytest.raises(ValueError, match=f"Invalid bucket_numel={bad!r}. Must be an int >= 1."):
        DDPShampooConfig(bucket_numel=bad)


def test_buckets_cut_the_stepped_blocks_in_order():
    from dist_rec.optim.shampoo.blocking import param_blocks
    from dist_rec.optim.shampoo.distributor import buckets

    blocks = list(param_blocks(0, (10, 4), 4)) + list(param_blocks(1, (6,), 4))  # 3 blocks of 16, 16, 8 + 2 of 4, 2
    stepped = list(range(len(blocks)))
    cut = buckets(stepped, blocks, 20)
    assert [b for bucket in cut for b in bucket] == stepped
    assert all(sum(blocks[b].numel for b in bucket[:-1]) < 20 for bucket in cut)
    assert buckets(stepped, blocks, 1) == [[b] for b in stepped]
    assert buckets([], blocks, 20) == []
