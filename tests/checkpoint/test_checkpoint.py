"""Sharded checkpoints: resharding on load, refusals, atomic publishing.

Every test spawns gloo ranks. The model is a small DLRM whose fused
``EmbeddingBagCollection`` is sharded by ``DistributedModelParallel``, with
a dense Adagrad. Batches come from a seed per step so that the *global*
batch of a step is the same whatever the world size: it is cut into equal
per-rank slices in rank order. Sharded embedding gradients are averaged
over the ranks of a sharding group and dense gradients over all ranks
(DDP), so N ranks with B samples each train exactly as N/2 ranks with 2B.

Run A trains, saves, and records the global outputs of the steps after the
save; run B, on another world size and plan, loads and must reproduce them.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_rec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from dist_rec.checkpoint import (
    CheckpointError,
    CheckpointReader,
    dense_state_dict,
    load_checkpoint,
    read_manifest,
    restore_local_shards,
    save_checkpoint,
)
from dist_rec.checkpoint import checkpoint as checkpoint_module
from dist_rec.checkpoint.manifest import overlap
from dist_rec.models import DLRM
from dist_rec.optim import SGD, MomentumScaledRowWiseAdagrad, RowWiseAdagrad
from dist_rec.sharding import DistributedModelParallel, ShardingPlan, table_sharding, uniform_plan
from dist_rec.testing.multi_process import run_multi_process

DIM = 8
DENSE_IN = 5
TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=DIM, num_embeddings=23, feature_names=["f0", "f1"]),
    EmbeddingBagConfig(name="t1", embedding_dim=DIM, num_embeddings=9, feature_names=["f2"]),
    EmbeddingBagConfig(name="t2", embedding_dim=DIM, num_embeddings=40, feature_names=["f3"]),
]
KEYS = ["f0", "f1", "f2", "f3"]
ROWS = {"f0": 23, "f1": 23, "f2": 9, "f3": 40}
GLOBAL_BATCH = 16
SAVE_AT = 3  # run A trains steps 0..2, saves, then steps 3..5
LAST = 6


# -- model and data -----------------------------------------------------------------


def _plan(world: int, spec) -> ShardingPlan:
    plan = ShardingPlan(world)
    for t in TABLES:
        kind, ranks = spec[t.name]
        plan.tables[t.name] = table_sharding(t.name, t.num_embeddings, t.embedding_dim, kind, ranks)
    plan.validate()
    return plan


# 1D, 4 ranks: row-wise, column-wise, table-wise.
PLAN_A_1D = {"t0": ("row_wise", [0, 1, 2, 3]), "t1": ("column_wise", [0, 1, 2, 3]), "t2": ("table_wise", [3])}
# 1D, 2 ranks: every table cut another way, one data-parallel.
PLAN_B_1D = {"t0": ("column_wise", [1, 0]), "t1": ("row_wise", [0, 1]), "t2": ("data_parallel", [])}
# 2D: groups of 2 ranks (x 2 replicas), then groups of 1 rank (x 2 replicas).
PLAN_A_2D = {"t0": ("row_wise", [0, 1]), "t1": ("table_wise", [1]), "t2": ("column_wise", [0, 1])}
PLAN_B_2D = {"t0": ("table_wise", [0]), "t1": ("column_wise", [0]), "t2": ("row_wise", [0])}


def _sparse_optimizer(name: str):
    if name == "rowwise_adagrad":
        return RowWiseAdagrad(lr=0.1, eps=1e-3)
    if name == "momentum_scaled":
        return MomentumScaledRowWiseAdagrad(lr=0.1, eps=1e-3, momentum_scale=1.5)
    return SGD(lr=0.1)


def _build(plan_spec, replicas=1, optimizer="rowwise_adagrad", seed=0, tables=TABLES):
    world = dist.get_world_size()
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables, optimizer=_sparse_optimizer(optimizer))
    model = DLRM(ebc, dense_in_features=DENSE_IN, dense_arch_layer_sizes=[16, DIM], over_arch_layer_sizes=[16, 1])
    plan = _plan(world // replicas, plan_spec) if isinstance(plan_spec, dict) else plan_spec
    dmp = DistributedModelParallel(model, plan=plan, replicas=replicas)
    dense_optimizer = torch.optim.Adagrad([p for p in dmp.module.parameters() if p.requires_grad], lr=0.05)
    return dmp, dense_optimizer


def _global_batch(step: int):
    g = torch.Generator().manual_seed(500 + step)
    lengths = torch.randint(0, 4, (len(KEYS), GLOBAL_BATCH), generator=g)
    values = [torch.randint(0, ROWS[k], (int(lengths[f].sum()),), generator=g) for f, k in enumerate(KEYS)]
    dense = torch.randn(GLOBAL_BATCH, DENSE_IN, generator=g)
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g).float()
    return lengths, values, dense, labels


def _rank_batch(rank: int, world: int, step: int):
    """Slice ``rank`` of ``world`` equal slices of the step's global batch."""
    lengths, values, dense, labels = _global_batch(step)
    size = GLOBAL_BATCH // world
    a, b = rank * size, (rank + 1) * size
    mine = []
    for f in range(len(KEYS)):
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths[f].cumsum(0)])
        mine.append(values[f][int(offsets[a]) : int(offsets[b])])
    kjt = KeyedJaggedTensor(KEYS, torch.cat(mine), lengths=lengths[:, a:b].reshape(-1))
    return dense[a:b], kjt, labels[a:b]


def _train_step(dmp, dense_optimizer, step: int) -> torch.Tensor:
    """One step; returns the global logits of its forward (all ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dense, kjt, labels = _rank_batch(rank, world, step)
    logits = dmp(dense, kjt).squeeze(1)
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    dense_optimizer.zero_grad()
    loss.backward()
    dense_optimizer.step()
    dmp.sync()
    gathered = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(gathered, logits.detach().contiguous())
    return torch.cat(gathered)


def _snapshot(dmp, dense_optimizer=None):
    """Copies of every tensor a checkpoint restores on this rank."""
    out = {}
    for path, sharded in dmp.sharded.items():
        for local in sharded.local_shards() + sharded.data_parallel_tables():
            key = (path, local.table, local.shard.row_offset, local.shard.col_offset)
            weight, state = local.read()
            out[key + ("weight",)] = weight.detach().clone()
            for name, tensor in state.items():
                out[key + (name,)] = tensor.detach().clone()
    for name, tensor in dense_state_dict(dmp).items():
        out[("dense", name)] = tensor.detach().clone()
    if dense_optimizer is not None:
        for index, state in dense_optimizer.state_dict()["state"].items():
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[("dense_optimizer", index, name)] = value.detach().clone()
    return out


def _assert_same(actual, expected, what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: {sorted(map(str, actual.keys() ^ expected.keys()))}"
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=lambda m: f"{what} {key}: {m}")


def _differs(a, b) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


# -- resharding: continue training on another world / plan / grid ------------------


def _run_a(rank, world_size, root, plan_spec, replicas, optimizer):
    dmp, dense_optimizer = _build(plan_spec, replicas, optimizer, seed=1)
    for step in range(SAVE_AT):
        _train_step(dmp, dense_optimizer, step)
    save_checkpoint(os.path.join(root, "ckpt"), dmp, dense_optimizer, step=SAVE_AT, extra={"next_step": SAVE_AT})
    outputs = {step: _train_step(dmp, dense_optimizer, step) for step in range(SAVE_AT, LAST)}
    if rank == 0:
        torch.save(outputs, os.path.join(root, "outputs_a.pt"))


def _run_b(rank, world_size, root, plan_spec, replicas, optimizer, round_trip):
    # Another seed: anything not restored by the checkpoint would show.
    dmp, dense_optimizer = _build(plan_spec, replicas, optimizer, seed=2)
    resumed = load_checkpoint(os.path.join(root, "ckpt"), dmp, dense_optimizer)
    assert resumed["step"] == SAVE_AT and resumed["extra"] == {"next_step": SAVE_AT}, resumed
    expected = torch.load(os.path.join(root, "outputs_a.pt"))
    for step in range(resumed["step"], LAST):
        out = _train_step(dmp, dense_optimizer, step)
        torch.testing.assert_close(out, expected[step], rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step} on rank {rank}: {m}")
    if not round_trip:
        return

    # Round trip on the same world and plan: identical weights and state.
    second = os.path.join(root, "ckpt_b")
    save_checkpoint(second, dmp, dense_optimizer, step=LAST)
    fresh, fresh_optimizer = _build(plan_spec, replicas, optimizer, seed=3)
    _train_step(fresh, fresh_optimizer, 0)  # fills the dense optimizer state too
    assert _differs(_snapshot(fresh, fresh_optimizer), _snapshot(dmp, dense_optimizer))
    assert load_checkpoint(second, fresh, fresh_optimizer)["step"] == LAST
    _assert_same(_snapshot(fresh, fresh_optimizer), _snapshot(dmp, dense_optimizer), "round trip")

    # Partial recovery: one rank reloads one table's shards alone (no collective).
    if rank == 1:
        local = next(s for s in fresh.sharded["sparse_arch"].local_shards() if s.table == "t0")
        weight, state = local.read()
        local.write(torch.zeros_like(weight), {"momentum1": torch.full_like(state["momentum1"], 7.0)})
        restored = restore_local_shards(second, fresh, tables=["t0"])
        assert [s.table for s in restored] == ["t0"]
        _assert_same(_snapshot(fresh, fresh_optimizer), _snapshot(dmp, dense_optimizer), "restore_local_shards")
    dist.barrier()


def _check_read_rectangle(directory: Path) -> None:
    """Any rectangle, read alone, equals that part of the table assembled by
    hand from its saved blocks; row-wise state agrees across column blocks."""
    reader = CheckpointReader(directory)
    weight = torch.full((9, DIM), float("nan"))
    states = []
    for entry in reader.entries("sparse_arch", "t1"):  # column-wise over 4 ranks: 4 blocks of 2 columns
        saved = torch.load(directory / entry["file"])
        c0, nc = entry["col_offset"], entry["num_cols"]
        weight[:, c0 : c0 + nc] = saved["weight"]
        states.append(saved["momentum1"])
    assert len(states) == 4 and all(torch.equal(s, states[0]) for s in states) and bool((states[0] > 0).any())
    block, state = reader.read_rectangle("sparse_arch", "t1", (2, 5, 1, 6))  # meets 3 of the 4 blocks
    assert torch.equal(block, weight[2:7, 1:7]) and torch.equal(state["momentum1"], states[0][2:7])


def test_reshard_1d_four_ranks_to_two_continues_training(tmp_path):
    """Saved on 4 ranks (row-, column-, table-wise), loaded on 2 (column-,
    row-wise, data-parallel): the continued run gives run A's outputs."""
    run_multi_process(_run_a, world_size=4, timeout=300, root=str(tmp_path), plan_spec=PLAN_A_1D, replicas=1, optimizer="rowwise_adagrad")
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest["world_size"] == 4 and manifest["step"] == SAVE_AT
    assert {e["file"] for e in manifest["files"]} >= {
        "dense.pt", "shards/sparse_arch/t0/r0_c0.pt", "shards/sparse_arch/t0/r18_c0.pt",
        "shards/sparse_arch/t1/r0_c6.pt", "shards/sparse_arch/t2/r0_c0.pt",
    }
    _check_read_rectangle(tmp_path / "ckpt")
    run_multi_process(
        _run_b, world_size=2, timeout=300, root=str(tmp_path), plan_spec=PLAN_B_1D, replicas=1,
        optimizer="rowwise_adagrad", round_trip=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt_b", "outputs_a.pt"]


def test_reshard_2d_two_by_two_to_one_by_two_continues_training(tmp_path):
    """2D (2 ranks x 2 replicas) with momentum-scaled row-wise AdaGrad (two
    state tensors), loaded on 1 rank x 2 replicas with whole-table shards;
    only the first sharding group wrote shards."""
    run_multi_process(_run_a, world_size=4, timeout=300, root=str(tmp_path), plan_spec=PLAN_A_2D, replicas=2, optimizer="momentum_scaled")
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest["grid"]["replicas"] == 2 and manifest["grid"]["sharding_groups"] == [[0, 1], [2, 3]]
    shards = [e for e in manifest["files"] if e["kind"] == "shard"]
    assert len(shards) == 2 + 1 + 2 and {e["written_by"] for e in shards} == {0, 1}
    assert all(set(e["tensors"]) == {"weight", "momentum1", "momentum1_increment"} for e in shards)
    run_multi_process(
        _run_b, world_size=2, timeout=300, root=str(tmp_path), plan_spec=PLAN_B_2D, replicas=2,
        optimizer="momentum_scaled", round_trip=False,
    )


# -- refusals --------------------------------------------------------------------------


def _expect_refusal(directory, dmp, dense_optimizer, *fragments):
    before = _snapshot(dmp, dense_optimizer)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(directory, dmp, dense_optimizer)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    _assert_same(_snapshot(dmp, dense_optimizer), before, f"model after refusing {directory}")
    return message


def _bad_copy(root: Path, name: str, damage) -> Path:
    """Rank 0 copies the good checkpoint and damages the copy."""
    target = root / name
    if dist.get_rank() == 0:
        shutil.copytree(root / "good", target)
        damage(target)
    dist.barrier()
    return target


def _edit_manifest(edit):
    def damage(directory: Path) -> None:
        manifest = json.loads((directory / "manifest.json").read_text())
        edit(manifest)
        (directory / "manifest.json").write_text(json.dumps(manifest))

    return damage


def _flip_bytes(directory: Path) -> None:
    path = directory / "shards/sparse_arch/t0/r0_c0.pt"
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(directory: Path) -> None:
    path = directory / "data_parallel/sparse_arch/t2.pt"
    path.write_bytes(path.read_bytes()[:-100])


def _refusals_rank(rank, world_size, root):
    root = Path(root)
    dmp, dense_optimizer = _build(PLAN_B_1D, seed=1)
    _train_step(dmp, dense_optimizer, 0)
    save_checkpoint(root / "good", dmp, dense_optimizer, step=1)
    _train_step(dmp, dense_optimizer, 1)  # the live model now differs from the checkpoint

    # Corrupt shard: t0's columns 0..3 live on rank 1 only; every rank names the file.
    bad = _bad_copy(root, "corrupt", _flip_bytes)
    _expect_refusal(bad, dmp, dense_optimizer, "rank 1:", "shards/sparse_arch/t0/r0_c0.pt", "sha256", "corrupt file")
    bad = _bad_copy(root, "truncated", _truncate)
    _expect_refusal(bad, dmp, dense_optimizer, "ranks 0, 1:", "data_parallel/sparse_arch/t2.pt", "bytes, the manifest records", "truncated")
    bad = _bad_copy(root, "missing", lambda d: (d / "shards/sparse_arch/t1/r5_c0.pt").unlink())
    _expect_refusal(bad, dmp, dense_optimizer, "shards/sparse_arch/t1/r5_c0.pt: missing")
    bad = _bad_copy(root, "version", _edit_manifest(lambda m: m.update(version=99)))
    _expect_refusal(bad, dmp, dense_optimizer, "unsupported checkpoint format version 99", "reads versions 1")
    bad = _bad_copy(root, "eps", _edit_manifest(lambda m: m["modules"]["sparse_arch"]["optimizer"]["hyperparameters"].update(eps=0.5)))
    _expect_refusal(bad, dmp, dense_optimizer, "fused optimizer RowWiseAdagrad differs: eps=0.5 in the checkpoint, 0.001 in the model")
    _expect_refusal(root / "nowhere", dmp, dense_optimizer, "No checkpoint at", "does not exist")

    # Checkpoints of other models: a table of another size, another fused optimizer.
    bigger = [EmbeddingBagConfig(name="t0", embedding_dim=DIM, num_embeddings=24, feature_names=["f0", "f1"])] + TABLES[1:]
    other, other_optimizer = _build(uniform_plan(bigger, "row_wise", world_size), tables=bigger)
    save_checkpoint(root / "bigger", other, other_optimizer)
    _expect_refusal(
        root / "bigger", dmp, dense_optimizer,
        "Table 't0' of module 'sparse_arch' differs: num_embeddings 24 in the checkpoint, 23 in the model",
    )
    sgd, sgd_optimizer = _build(PLAN_B_1D, optimizer="sgd")
    save_checkpoint(root / "sgd", sgd, sgd_optimizer)
    _expect_refusal(root / "sgd", dmp, dense_optimizer, "trained with fused optimizer SGD (state [])", "RowWiseAdagrad (state ['momentum1'])")
    # Another dense optimizer.
    other_dense = torch.optim.SGD([p for p in dmp.module.parameters() if p.requires_grad], lr=0.1)
    _expect_refusal(root / "good", dmp, other_dense, "the dense optimizer was Adagrad; the model uses SGD")

    # The good checkpoint still loads, into a model with yet another plan.
    resumed, resumed_optimizer = _build(PLAN_A_1D if world_size == 4 else {t.name: ("table_wise", [1]) for t in TABLES})
    assert load_checkpoint(root / "good", resumed, resumed_optimizer)["step"] == 1


def test_refusals_raise_on_every_rank_and_leave_the_model_untouched(tmp_path):
    run_multi_process(_refusals_rank, world_size=2, timeout=300, root=str(tmp_path))


# -- atomic publishing ------------------------------------------------------------------


class SimulatedCrash(BaseException):
    """Escapes save_checkpoint like a killed process would (not an Exception)."""


def _siblings(root: Path, mark: str):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("ckpt" + mark))


def _interrupted_rank(rank, world_size, root):
    root = Path(root)
    ckpt = root / "ckpt"
    dmp, dense_optimizer = _build(PLAN_B_1D, seed=1)
    _train_step(dmp, dense_optimizer, 0)
    save_checkpoint(ckpt, dmp, dense_optimizer, step=1)
    saved = _snapshot(dmp, dense_optimizer)
    _train_step(dmp, dense_optimizer, 1)

    # A crash on every rank after its first file: the temp dir stays, unfinished.
    def crash(stage, path):
        if stage == "file_written":
            raise SimulatedCrash(str(path))

    checkpoint_module._fault_hook = crash
    with pytest.raises(SimulatedCrash):
        save_checkpoint(ckpt, dmp, dense_optimizer, step=2)
    checkpoint_module._fault_hook = None
    dist.barrier()
    leftovers = _siblings(root, ".tmp-")
    assert len(leftovers) == 1 and not (root / leftovers[0] / "manifest.json").exists()
    assert read_manifest(ckpt)["step"] == 1
    with pytest.raises(CheckpointError, match="is not a complete checkpoint: it has no manifest.json"):
        load_checkpoint(root / leftovers[0], dmp, dense_optimizer)

    # Errors while publishing (rank 0): every rank raises, the old checkpoint stays.
    for stage in ("manifest_written", "renamed_old"):
        def fail(s, path, stage=stage):
            if s == stage and rank == 0:
                raise RuntimeError(f"disk gone at {stage}")

        checkpoint_module._fault_hook = fail
        with pytest.raises(CheckpointError, match=f"rank 0: RuntimeError: disk gone at {stage}"):
            save_checkpoint(ckpt, dmp, dense_optimizer, step=2)
        checkpoint_module._fault_hook = None
        assert read_manifest(ckpt)["step"] == 1
        assert _siblings(root, ".tmp-") == [] and _siblings(root, ".old-") == [], (stage, sorted(p.name for p in root.iterdir()))  # the crash leftover is gone too
        dist.barrier()  # before rank 0 starts the next save

    # The last good checkpoint is what loads.
    assert load_checkpoint(ckpt, dmp, dense_optimizer)["step"] == 1
    _assert_same(_snapshot(dmp, dense_optimizer), saved, "after interrupted saves")

    # A crash between the two renames of publishing leaves no ckpt, only ckpt.old-*:
    # load reads it, the next save puts it back and replaces it.
    if rank == 0:
        os.replace(ckpt, root / "ckpt.old-crashed")
    dist.barrier()
    with pytest.warns(UserWarning, match="interrupted") if rank == 0 else contextlib.nullcontext():
        assert load_checkpoint(ckpt, dmp, dense_optimizer)["step"] == 1
    save_checkpoint(ckpt, dmp, dense_optimizer, step=3)
    assert read_manifest(ckpt)["step"] == 3 and _siblings(root, ".old-") == [] and _siblings(root, ".tmp-") == []

    # A directory that is not a checkpoint is never replaced.
    if rank == 0:
        (root / "user").mkdir()
        (root / "user" / "notes.txt").write_text("keep me")
    dist.barrier()
    with pytest.raises(CheckpointError, match="is not a dist_rec checkpoint"):
        save_checkpoint(root / "user", dmp, dense_optimizer)
    assert (root / "user" / "notes.txt").read_text() == "keep me"


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path):
    run_multi_process(_interrupted_rank, world_size=2, timeout=300, root=str(tmp_path))


# -- pure helpers ----------------------------------------------------------------------


def test_overlap_of_rectangles():
    assert overlap((0, 6, 0, 8), (4, 10, 2, 2)) == (4, 2, 2, 2)
    assert overlap((0, 6, 0, 8), (6, 3, 0, 8)) is None  # adjacent rows do not meet
    assert overlap((0, 23, 0, 4), (0, 23, 4, 4)) is None
    assert overlap((5, 5, 0, 8), (0, 23, 0, 8)) == (5, 5, 0, 8)
