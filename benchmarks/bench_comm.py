"""Per-rank communication volume of 1D and 2D sparse parallelism: measured
and modelled.

What each rank sends to other ranks in one training step, by kind of
traffic, as ``dist_rec.sharding.comm.COMM_STATS`` counts it:

* ``input_dist``            the input all-to-alls inside the sharding group:
                            a counts exchange (3 int64 per peer: batch, ids, refused flag), then per
                            destination, for every (feature, shard) slot it
                            holds, a ``[B]`` int64 lengths vector and the
                            slot's ids (int64);
* ``output_dist``           pooled float32 shard columns back to the sample
                            owners (``[B_q, width]`` to each peer q);
* ``output_dist_backward``  their gradients, the other way;
* ``replica_sync``          the all-reduce of every local shard's rows and
                            per-row optimizer state over the replica group
                            (2D only), counted as a ring all-reduce sends:
                            ``2 (G - 1) / G`` of the tensor per rank, every
                            ``sync_every`` steps.

Not counted (not part of this comparison): the dense parameters' DDP
all-reduce (the same for 1D and 2D), and a one-int64 all-reduce per forward
by which the group agrees the input was valid.

**Measured.** ``T`` spawned gloo processes (``dist_rec.testing.
multi_process``) train a small DLRM-like model: ``--tables`` tables of
``--rows`` rows, dims ``--dims`` (one feature per table), under
``dist_rec.sharding.DistributedModelParallel(model, sharding_type=...,
replicas=G, sync_every=N)`` with fused ``RowWiseAdagrad``; the dense part is a
linear head on the pooled embeddings, under DDP. Every rank feeds its own
``--batch`` samples per step, bag lengths uniform in ``[--min-ids,
--max-ids]``, ids uniform over the table. After ``--steps`` steps (each with
``.sync()``), every rank's counters are divided by the steps; reported: the
mean over ranks per kind and the largest rank's total. Grids: 1D (G = 1)
and 2D at ``T = 4`` (G = 2) and ``T = 8`` (G = 2 and 4), row-wise and
table-wise, plus one row-wise 2D run with ``sync_every`` = ``--steps``.

**Modelled.** ``predict`` gives every rank's expected bytes per step from
the workload's geometry (docs/communication.md has the formulas). Each
measured row is shown next to it; the only random term is the number of ids
that cross to other ranks, so a second check replaces its expectation by
the count each rank actually sent (computed from its batches, apart from
dist_rec): that must match to the byte.

**Extrapolated.** The model alone, for a Criteo-Terabyte-like DLRM (the 26
MLPerf DLRM-DCNv2 tables, dim 128, 512 samples per rank; one-hot and the
MLPerf multi-hot sizes), row-wise over ``T = 8 .. 4096`` ranks with ``G = 1,
2, 4, 8, 16`` replicas: per-rank all-to-all bytes per step, replica-sync
bytes per sync, and the ``sync_every`` from which 2D sends fewer bytes than
1D. ``--plot`` draws it; ``--doc`` writes the tables into
docs/communication.md.

Usage::

    python benchmarks/bench_comm.py --markdown docs/benchmarks.md \\
        --doc docs/communication.md --plot docs/images/comm_volume.png
    python benchmarks/bench_comm.py --model-only --plot /tmp/comm.png
"""

from __future__ import annotations

import argparse
import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from harness import command_line, machine_summary, markdown_table, run_ranks, update_section, write_json

KINDS = ("input_dist", "output_dist", "output_dist_backward", "replica_sync")
A2A_KINDS = KINDS[:3]
ID_BYTES = 8  # ids travel as int64
LENGTH_BYTES = 8  # so do bag lengths
FLOAT_BYTES = 4  # pooled rows, gradients, weights and state: float32

# MLPerf DLRM-DCNv2 (Criteo 1TB, tables capped at 40M rows) cardinalities and
# multi-hot sizes, as in TorchRec's DLRM example.
CRITEO_TB_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip
CRITEO_TB_MULTI_HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
EXTRAPOLATION_WORLDS = tuple(2**k for k in range(3, 13))  # 8 .. 4096
EXTRAPOLATION_REPLICAS = (1, 2, 4, 8, 16)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What the model needs to know about a job: one feature per table.

    Args:
        name (str): for tables and plots.
        rows (Sequence[int]): rows of each table.
        dims (Sequence[int]): embedding dim of each table (D_t).
        batch (int): samples per rank per step (B).
        ids_per_bag (Sequence[float]): mean ids per bag of each table's
            feature (P_t).
        state_floats (int): float32 optimizer state per row (1 for row-wise
            AdaGrad). (Default: 1)
    """

    name: str
    rows: Tuple[int, ...]
    dims: Tuple[int, ...]
    batch: int
    ids_per_bag: Tuple[float, ...]
    state_floats: int = 1

    def __post_init__(self) -> None:
        if not (len(self.rows) == len(self.dims) == len(self.ids_per_bag)) or not self.rows:
            raise ValueError(
                f"Invalid workload {self.name!r}: {len(self.rows)} rows, {len(self.dims)} dims and "
                f"{len(self.ids_per_bag)} ids_per_bag. Must be one of each per table, at least one table."
            )

    @property
    def width(self) -> int:
        """W: pooled floats per sample, all features."""
        return sum(self.dims)


def rows_per_rank(rows: int, group_size: int) -> np.ndarray:
    """Rows of one table on each rank of the group under row-wise sharding,
    as ``dist_rec.planner.plan.even_splits`` cuts them (the first ``rows %
    L`` ranks one more; with fewer rows than ranks, the last ranks none)."""
    base, extra = divmod(rows, group_size)
    return base + (np.arange(group_size) < extra).astype(np.int64)


def table_configs(rows: Sequence[int], dims: Sequence[int]) -> list:
    """The workload's tables as ``EmbeddingBagConfig``s: table ``t{t}`` of
    ``rows[t]`` rows and ``dims[t]`` columns, read by feature ``f{t}``."""
    from dist_rec import EmbeddingBagConfig

    return [
        EmbeddingBagConfig(name=f"t{t}", embedding_dim=d, num_embeddings=r, feature_names=[f"f{t}"])
        for t, (r, d) in enumerate(zip(rows, dims))
    ]


def table_wise_ranks(workload: Workload, group_size: int) -> np.ndarray:
    """The rank of its sharding group each table is on under table-wise
    sharding: the placement of ``dist_rec.planner.table_wise_plan``, which
    ``DistributedModelParallel(sharding_type="table_wise")`` shards by
    (the tables of ``table_configs``)."""
    from types import SimpleNamespace

    from dist_rec.planner import table_wise_plan

    configs = table_configs(workload.rows, workload.dims)
    state = SimpleNamespace(state_names=("state",) * workload.state_floats)  # bytes per row, as the fused optimizer's
    plan = table_wise_plan(configs, group_size, optimizer=state)
    return np.array([plan.tables[c.name].ranks[0] for c in configs])


def predict(
    workload: Workload, world_size: int, replicas: int, sharding_type: str, sync_every: int = 1
) -> Dict[str, np.ndarray]:
    """Expected bytes each rank of a sharding group sends to other ranks per
    step, by kind: ``{kind: [L] array}`` (every sharding group of the grid
    is alike), plus the input's parts ``input_lengths`` (counts and lengths,
    exact) and ``input_ids`` (ids, an expectation over uniform ids).

    With L = T / G ranks per group, B samples per rank, table t of R_t rows,
    dim D_t, P_t ids per bag, S state floats per row, per rank r:

    row-wise (every table over all L ranks; a table with R_t < L rows has
    n_t = R_t shards, on ranks 0 .. R_t - 1; rank r holds R_tr rows):
        input   = 16 (L - 1) + sum_t 8 B (n_t - [r holds t])
                             + sum_t 8 B P_t (1 - R_tr / R_t)
        W_r     = sum_{t held by r} D_t   (pooled width rank r serves)
        out fwd = 4 B (L - 1) W_r
        out bwd = 4 B sum_{q != r} W_q
        sync    = 2 (G - 1) / G * sum_{t held} 4 R_tr (D_t + S) / N
    table-wise (table t on rank p_t, where ``DistributedModelParallel
    (sharding_type="table_wise")`` puts it: ``table_wise_ranks``):
        input   = 16 (L - 1) + sum_{t not on r} 8 B (1 + P_t)
        out fwd, out bwd as row-wise, with W_r = sum_{t on r} D_t
        sync    = 2 (G - 1) / G * sum_{t on r} 4 R_t (D_t + S) / N
    When every rank serves the same width (row-wise over tables with at
    least L rows) out fwd = out bwd = 4 B W (L - 1).
    """
    if replicas < 1 or world_size % replicas != 0:
        raise ValueError(f"Invalid replicas={replicas}. Must be >= 1 and divide world_size={world_size}.")
    if sync_every < 1:
        raise ValueError(f"Invalid sync_every={sync_every}. Must be >= 1.")
    L, G, B = world_size // replicas, replicas, workload.batch
    ranks = np.arange(L)
    counts = np.full(L, 3 * LENGTH_BYTES * (L - 1), dtype=np.float64)
    lengths = np.zeros(L)
    ids = np.zeros(L)
    width = np.zeros(L)  # pooled floats per sample this rank returns
    shard_floats = np.zeros(L)  # floats of rows + state this rank holds
    placed = table_wise_ranks(workload, L) if sharding_type == "table_wise" else None
    for t, (rows, dim, p) in enumerate(zip(workload.rows, workload.dims, workload.ids_per_bag)):
        if sharding_type == "row_wise":
            local_rows = rows_per_rank(rows, L)
            holds = local_rows > 0
            lengths += LENGTH_BYTES * B * (int(holds.sum()) - holds)
            ids += ID_BYTES * B * p * (1.0 - local_rows / rows)
        elif sharding_type == "table_wise":
            holds = ranks == placed[t]
            local_rows = np.where(holds, rows, 0)
            lengths += LENGTH_BYTES * B * ~holds
            ids += ID_BYTES * B * p * ~holds
        else:
            raise ValueError(f"Invalid sharding_type={sharding_type!r}. Must be row_wise or table_wise.")
        width += dim * holds
        shard_floats += local_rows * (dim + workload.state_floats)
    # Forward: rank r returns its W_r pooled columns for every peer's B
    # samples. Backward: rank r sends the gradient of its own B samples'
    # columns to every peer that pooled them, W_q to peer q.
    output = FLOAT_BYTES * B * (L - 1) * width
    output_backward = FLOAT_BYTES * B * (width.sum() - width)
    sync = 2 * (G - 1) / G * FLOAT_BYTES * shard_floats / sync_every
    return {
        "input_dist": counts + lengths + ids,
        "input_lengths": counts + lengths,
        "input_ids": ids,
        "output_dist": output,
        "output_dist_backward": output_backward,
        "replica_sync": sync,
    }


def a2a_total(per_kind: Dict[str, np.ndarray]) -> np.ndarray:
    return sum(per_kind[k] for k in A2A_KINDS)


def human_bytes(n: float) -> str:
    """Bytes with a binary unit: ``1.5 KiB``, ``27.9 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1000 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


# ---------------------------------------------------------------------------
# Measurement: spawned gloo ranks
# ---------------------------------------------------------------------------


class _SparseModel(torch.nn.Module):
    """The embedding collection and a linear head on its pooled output: the
    smallest model with DLRM's traffic (mixed dims rule out the dot
    interaction, which wants one dim)."""

    def __init__(self, collection, width: int) -> None:
        super().__init__()
        self.sparse = collection
        self.head = torch.nn.Linear(width, 1)

    def forward(self, features) -> torch.Tensor:
        return self.head(self.sparse(features).values()).squeeze(1)


def _build_model(rows: Sequence[int], dims: Sequence[int], seed: int) -> _SparseModel:
    from dist_rec import EmbeddingBagCollection
    from dist_rec.optim import RowWiseAdagrad

    torch.manual_seed(seed)  # every rank builds the same tables; each copies its shards
    collection = EmbeddingBagCollection(table_configs(rows, dims), optimizer=RowWiseAdagrad(lr=0.05, eps=1e-8))
    return _SparseModel(collection, sum(dims))


def _rank_batch(rows: Sequence[int], batch: int, min_ids: int, max_ids: int, seed: int, rank: int, step: int):
    """This rank's samples of one step: bag lengths uniform in [min_ids,
    max_ids], ids uniform over each table. Returns (kjt, labels, ids per
    table)."""
    from dist_rec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed * 1_000_003 + 1_000 * step + rank)
    lengths = torch.randint(min_ids, max_ids + 1, (len(rows), batch), generator=g)
    ids = [torch.randint(0, r, (int(lengths[t].sum()),), generator=g) for t, r in enumerate(rows)]
    kjt = KeyedJaggedTensor([f"f{t}" for t in range(len(rows))], torch.cat(ids), lengths=lengths.reshape(-1))
    return kjt, torch.randint(0, 2, (batch,), generator=g).float(), ids


def _ids_sent(
    ids: Sequence[torch.Tensor],
    rows: Sequence[int],
    table_ranks: Optional[Sequence[int]],
    group_rank: int,
    group_size: int,
) -> int:
    """Ids of this rank's batch that belong to shards on other ranks of its
    group, worked out from the plan's geometry alone (not from dist_rec's
    routing): ``table_ranks`` is each table's rank when table-wise, None
    when row-wise."""
    sent = 0
    for t, (table_ids, r) in enumerate(zip(ids, rows)):
        if table_ranks is not None:
            sent += 0 if table_ranks[t] == group_rank else table_ids.numel()
        else:
            local = rows_per_rank(r, group_size)
            start = int(local[:group_rank].sum())
            end = start + int(local[group_rank])
            sent += int(((table_ids < start) | (table_ids >= end)).sum())
    return sent


def _measure_rank(
    rank: int, world_size: int, configs, rows, dims, batch, min_ids, max_ids, steps, seed
) -> Optional[List[dict]]:
    """Every config of this world in turn: build, train ``steps`` steps,
    gather every rank's counters on rank 0, which returns them."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from dist_rec.sharding import COMM_STATS, DistributedModelParallel

    torch.set_num_threads(1)
    results = []
    for config in configs:
        model = _build_model(rows, dims, seed)
        dmp = DistributedModelParallel(
            model, sharding_type=config["sharding_type"], replicas=config["replicas"], sync_every=config["sync_every"]
        )
        dense_optimizer = torch.optim.SGD(dmp.unwrapped.head.parameters(), lr=0.01)
        group_rank, group_size = dist.get_rank(dmp.process_groups.sharding_group), dmp.grid.group_size
        plan = next(iter(dmp.plans.values()))
        table_ranks = None  # row-wise
        if config["sharding_type"] == "table_wise":
            table_ranks = [plan.tables[f"t{t}"].ranks[0] for t in range(len(rows))]
        COMM_STATS.reset()
        ids_sent, ids_total = 0, 0
        for step in range(steps):
            kjt, labels, ids = _rank_batch(rows, batch, min_ids, max_ids, seed, rank, step)
            ids_sent += _ids_sent(ids, rows, table_ranks, group_rank, group_size)
            ids_total += sum(t.numel() for t in ids)
            loss = F.binary_cross_entropy_with_logits(dmp(kjt), labels)
            dense_optimizer.zero_grad()
            loss.backward()
            dense_optimizer.step()
            dmp.sync()
        record = dict(
            bytes=COMM_STATS.snapshot(),
            calls=dict(COMM_STATS.calls),
            ids_sent=ids_sent,
            ids_total=ids_total,
            group_rank=group_rank,
        )
        gathered = [None] * world_size
        dist.all_gather_object(gathered, record)
        results.append(dict(config=config, ranks=gathered))
        del dmp, model
    return results if rank == 0 else None


def measured_configs(world_size: int, steps: int) -> List[dict]:
    """1D and every 2D grid with L >= 2 of this world, row- and table-wise;
    on the largest world also one row-wise 2D run syncing once in ``steps``."""
    out = []
    for sharding_type in ("row_wise", "table_wise"):
        replicas = [g for g in (1, 2, 4, 8) if world_size % g == 0 and world_size // g >= 2]
        for g in replicas:
            out.append(dict(replicas=g, sharding_type=sharding_type, sync_every=1))
        if sharding_type == "row_wise" and world_size >= 8 and steps > 1:
            out.append(dict(replicas=2, sharding_type=sharding_type, sync_every=steps))
    return out


def measure(args) -> List[dict]:
    """Runs every world's configs; one row per (T, G, sharding, N)."""
    rows_out = []
    for world_size in args.worlds:
        configs = measured_configs(world_size, args.steps)
        started = time.time()
        results = run_ranks(
            _measure_rank,
            world_size,
            args.timeout,
            configs=configs,
            rows=[args.rows] * len(args.dims),
            dims=list(args.dims),
            batch=args.batch,
            min_ids=args.min_ids,
            max_ids=args.max_ids,
            steps=args.steps,
            seed=args.seed,
        )[0]
        print(f"T = {world_size}: {len(configs)} configs in {time.time() - started:.0f} s", flush=True)
        for result in results:
            rows_out.append(summarise(result, world_size, args))
    add_ratios(rows_out)
    return rows_out


def measured_workload(args, ids_per_bag: Optional[float] = None) -> Workload:
    p = (args.min_ids + args.max_ids) / 2 if ids_per_bag is None else ids_per_bag
    return Workload(
        name="measured",
        rows=(args.rows,) * len(args.dims),
        dims=tuple(args.dims),
        batch=args.batch,
        ids_per_bag=(p,) * len(args.dims),
    )


def summarise(result: dict, world_size: int, args) -> dict:
    """Per step, per rank: measured mean per kind, the largest rank's total,
    the model's mean per kind, and the largest gap to the model once the
    expected ids are replaced by the ids each rank really sent."""
    config, ranks, steps = result["config"], result["ranks"], args.steps
    G, N, sharding_type = config["replicas"], config["sync_every"], config["sharding_type"]
    model = predict(measured_workload(args), world_size, G, sharding_type, N)
    measured = {k: [r["bytes"].get(k, 0) / steps for r in ranks] for k in KINDS}
    unexpected = sorted({k for r in ranks for k in r["bytes"]} - set(KINDS))
    if unexpected:
        raise RuntimeError(f"COMM_STATS counted kinds this benchmark does not model: {unexpected}")
    exact_gap = 0.0
    for i, r in enumerate(ranks):
        q = r["group_rank"]
        realised = dict(model)
        realised["input_dist"] = model["input_lengths"] + ID_BYTES * r["ids_sent"] / steps
        for k in KINDS:
            exact_gap = max(exact_gap, abs(measured[k][i] - float(realised[k][q])))
    group_ranks = [r["group_rank"] for r in ranks]
    totals = [sum(measured[k][i] for k in KINDS) for i in range(len(ranks))]
    model_totals = [sum(float(model[k][q]) for k in KINDS) for q in group_ranks]
    return dict(
        T=world_size,
        G=G,
        L=world_size // G,
        sharding=sharding_type,
        N=N,
        measured={k: float(np.mean(v)) for k, v in measured.items()},
        model={k: float(np.mean([model[k][q] for q in group_ranks])) for k in KINDS},
        max_total=max(totals),
        model_max_total=max(model_totals),
        exact_gap=exact_gap,
        ids_per_bag=sum(r["ids_total"] for r in ranks) / (len(ranks) * steps * args.batch * len(args.dims)),
        calls={k: ranks[0]["calls"].get(k, 0) / steps for k in KINDS},
    )


def add_ratios(rows: List[dict]) -> None:
    """1D / 2D all-to-all bytes per rank at the same T and sharding, and the
    model's ratio for the output part: (L_1D - 1) / (L_2D - 1) row-wise,
    (L_1D - 1) L_2D / ((L_2D - 1) L_1D) table-wise (mean over ranks)."""
    for row in rows:
        same = lambda r: r["T"] == row["T"] and r["sharding"] == row["sharding"]  # noqa: E731
        base = next((r for r in rows if same(r) and r["G"] == 1 and r["N"] == 1), None)
        row["a2a_ratio"] = row["output_ratio"] = row["output_ratio_theory"] = None
        if base is None or row["G"] == 1:
            continue
        a2a = lambda r: sum(r["measured"][k] for k in A2A_KINDS)  # noqa: E731
        row["a2a_ratio"] = a2a(base) / a2a(row)
        row["output_ratio"] = base["measured"]["output_dist"] / row["measured"]["output_dist"]
        row["output_ratio_theory"] = base["model"]["output_dist"] / row["model"]["output_dist"]


def measured_table(rows: List[dict]) -> str:
    """Markdown: KiB per rank per step, measured (model) per kind."""
    kib = lambda b: f"{b / 1024:.1f}"  # noqa: E731
    header = [
        "T", "G", "L", "sharding", "N", "input a2a", "output a2a fwd", "output a2a bwd", "replica sync",
        "total, mean rank", "total, max rank", "measured / model", "gap with realised ids", "a2a 1D/2D",
        "output fwd 1D/2D (model)",
    ]  # fmt: skip
    lines = []
    for r in rows:
        cells = [str(r["T"]), str(r["G"]), str(r["L"]), r["sharding"], str(r["N"])]
        cells += [f"{kib(r['measured'][k])} ({kib(r['model'][k])})" for k in KINDS]
        total, model_total = sum(r["measured"].values()), sum(r["model"].values())
        cells += [
            f"{kib(total)} ({kib(model_total)})",
            f"{kib(r['max_total'])} ({kib(r['model_max_total'])})",
            f"{total / model_total:.4f}",
            f"{r['exact_gap']:.0f} B",
            "-" if r["a2a_ratio"] is None else f"{r['a2a_ratio']:.2f}",
            "-" if r["output_ratio"] is None else f"{r['output_ratio']:.3f} ({r['output_ratio_theory']:.3f})",
        ]
        lines.append(cells)
    return markdown_table(header, lines)


# ---------------------------------------------------------------------------
# Extrapolation: the model alone, Criteo-Terabyte-like DLRM
# ---------------------------------------------------------------------------


def criteo_workloads(batch: int, dim: int) -> List[Workload]:
    rows = CRITEO_TB_ROWS
    return [
        Workload("one-hot", rows, (dim,) * len(rows), batch, (1.0,) * len(rows)),
        Workload("multi-hot", rows, (dim,) * len(rows), batch, tuple(float(p) for p in CRITEO_TB_MULTI_HOT)),
    ]


def extrapolate(workloads: Sequence[Workload]) -> Dict[str, Dict[Tuple[int, int], dict]]:
    """Row-wise, per (T, G) with L >= 2: mean per-rank all-to-all bytes per
    step, replica-sync bytes per sync, and break-even ``sync_every``: 2D sends
    fewer bytes per step than 1D once N exceeds it."""
    out: Dict[str, Dict[Tuple[int, int], dict]] = {}
    for w in workloads:
        table = {}
        for T in EXTRAPOLATION_WORLDS:
            base = float(a2a_total(predict(w, T, 1, "row_wise")).mean())
            for G in EXTRAPOLATION_REPLICAS:
                if T % G or T // G < 2:
                    continue
                p = predict(w, T, G, "row_wise", 1)
                a2a, sync = float(a2a_total(p).mean()), float(p["replica_sync"].mean())
                saved = base - a2a
                tw = a2a_total(predict(w, T, G, "table_wise", 1))
                table[(T, G)] = dict(
                    a2a=a2a,
                    tw_a2a_mean=float(tw.mean()),
                    tw_a2a_max=float(tw.max()),
                    output=float(p["output_dist"].mean() + p["output_dist_backward"].mean()),
                    input=float(p["input_dist"].mean()),
                    sync=sync,
                    break_even=sync / saved if G > 1 and saved > 0 else None,
                )
        out[w.name] = table
    return out


def bytes_optimal_group_size(workload: Workload, sync_every: int) -> Tuple[float, float, float]:
    """Row-wise: the sharding-group size L* that minimises a rank's bytes
    per step, ``(L*, a, S)``. Per rank, all-to-all ~ a (L - 1) with ``a =
    8 B W + 8 B F + 16`` (pooled rows out and their gradients back, lengths,
    counts, per peer) and replica sync = 2 (1 - L / T) S / (L N) with S the
    bytes of one replica's rows and state; d/dL = 0 gives ``L* = sqrt(2 S /
    (a N))``, whatever T is (for T >> L*). Then G = T / L*."""
    B, F = workload.batch, len(workload.rows)
    a = 2 * FLOAT_BYTES * B * workload.width + LENGTH_BYTES * B * F + 2 * LENGTH_BYTES
    S = FLOAT_BYTES * sum(r * (d + workload.state_floats) for r, d in zip(workload.rows, workload.dims))
    return (2 * S / (a * sync_every)) ** 0.5, a, S


def optimal_group_table(workload: Workload, world_size: int = 4096) -> str:
    """Markdown: L* for several N, and what a rank holds and sends there."""
    title = (
        f"**Bytes-optimal sharding group size L* = sqrt(2 S / (a N)), row-wise, {workload.name}** "
        f"(S = {human_bytes(bytes_optimal_group_size(workload, 1)[2])} per replica, "
        f"a = {human_bytes(bytes_optimal_group_size(workload, 1)[1])} per peer per step; "
        f"bytes per step from `predict` at T = {world_size}, L = the power of two nearest L*)"
    )
    header = [
        "sync_every N", "L*", "shard per rank at L*", f"G = T / L at T = {world_size}", "a2a per step",
        "sync per step", "total per step", "1D total per step",
    ]  # fmt: skip
    lines = []
    one_d = float(a2a_total(predict(workload, world_size, 1, "row_wise")).mean())
    for N in (1, 10, 100, 1000, 10000):
        best, _, S = bytes_optimal_group_size(workload, N)
        L = 2 ** max(1, round(np.log2(best)))
        G = world_size // L
        p = predict(workload, world_size, G, "row_wise", N)
        a2a, sync = float(a2a_total(p).mean()), float(p["replica_sync"].mean())
        lines.append([
            N, f"{best:.1f}", human_bytes(S / best), f"{G} (L = {L})", human_bytes(a2a), human_bytes(sync),
            human_bytes(a2a + sync), human_bytes(one_d),
        ])  # fmt: skip
    return f"{title}\n\n{markdown_table(header, lines)}"


def extrapolation_tables(ext: Dict[str, Dict[Tuple[int, int], dict]], workloads: Sequence[Workload]) -> str:
    """Markdown: one table per quantity, T down, G across."""

    def grid(title: str, cell) -> str:
        header = ["T", *(f"G = {g}" for g in EXTRAPOLATION_REPLICAS)]
        lines = [[T, *(cell(T, g) for g in EXTRAPOLATION_REPLICAS)] for T in EXTRAPOLATION_WORLDS]
        return f"**{title}**\n\n{markdown_table(header, lines)}"

    def value(name, key, fmt):
        def cell(T, G):
            entry = ext[name].get((T, G))
            if entry is None:
                return "-"
            return fmt(entry[key]) if entry[key] is not None else "-"

        return cell

    n_fmt = lambda n: f"{n:.3g}" if n < 1000 else f"{n:,.0f}"  # noqa: E731
    parts = [
        grid(
            "All-to-all bytes per rank per step (input + output fwd + bwd), one-hot (P = 1)",
            value("one-hot", "a2a", human_bytes),
        ),
        grid(
            "All-to-all bytes per rank per step, multi-hot (MLPerf sizes, mean P = 8.2)",
            value("multi-hot", "a2a", human_bytes),
        ),
        grid("Replica-sync bytes per rank per sync (divide by N for per step)", value("one-hot", "sync", human_bytes)),
        grid(
            "For comparison, table-wise (each table on one rank of the group, placed by table_wise_plan): "
            "all-to-all bytes per step of the busiest rank, one-hot",
            value("one-hot", "tw_a2a_max", human_bytes),
        ),
        grid(
            "Break-even sync_every N*: 2D sends fewer bytes per step than 1D when N > N* (one-hot / multi-hot)",
            lambda T, G: "-"
            if ext["one-hot"].get((T, G), {}).get("break_even") is None
            else f"{n_fmt(ext['one-hot'][(T, G)]['break_even'])} / {n_fmt(ext['multi-hot'][(T, G)]['break_even'])}",
        ),
    ]
    parts.append(optimal_group_table(workloads[0]))
    return "\n\n".join(parts)


def plot(ext: Dict[str, Dict[Tuple[int, int], dict]], path: Path, batch: int, dim: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    colours = dict(zip(EXTRAPOLATION_REPLICAS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    gib = 1024**3

    def series(name, G, key):
        Ts = [T for T in EXTRAPOLATION_WORLDS if (T, G) in ext[name] and ext[name][(T, G)][key] is not None]
        return Ts, [ext[name][(T, G)][key] for T in Ts]

    ax = axes[0][0]
    for G in EXTRAPOLATION_REPLICAS:
        Ts, ys = series("one-hot", G, "a2a")
        ax.plot(Ts, [y / gib for y in ys], "-", color=colours[G], marker="o", ms=3, label=f"G={G} all")
        for name, style in (("one-hot", "--"), ("multi-hot", ":")):
            Ts, ys = series(name, G, "input")
            ax.plot(Ts, [y / gib for y in ys], style, color=colours[G], label=f"G={G} input {name}" if G == 1 else None)
    ax.set_title("All-to-all per rank per step: all (solid), input part one-hot (--), multi-hot (:)")
    ax.set_ylabel("GiB / step")

    ax = axes[0][1]
    for G in EXTRAPOLATION_REPLICAS[1:]:
        Ts, ys = series("one-hot", G, "sync")
        ax.plot(Ts, [y / gib for y in ys], color=colours[G], marker="o", ms=3, label=f"G={G}")
    ax.set_title("Replica sync per rank per sync (per step: / N)")
    ax.set_ylabel("GiB / sync")

    ax = axes[1][0]
    for N, style in ((1, ":"), (10, "--"), (100, "-")):
        for G in EXTRAPOLATION_REPLICAS:
            Ts = [T for T in EXTRAPOLATION_WORLDS if (T, G) in ext["one-hot"]]
            ys = [(ext["one-hot"][(T, G)]["a2a"] + ext["one-hot"][(T, G)]["sync"] / N) / gib for T in Ts]
            ax.plot(Ts, ys, style, color=colours[G], label=f"G={G}" if N == 100 else None)
    ax.set_title("Total per rank per step, one-hot: N = 100 (solid), 10 (dashed), 1 (dotted)")
    ax.set_ylabel("GiB / step")

    ax = axes[1][1]
    for G in EXTRAPOLATION_REPLICAS[1:]:
        Ts, ys = series("one-hot", G, "break_even")
        ax.plot(Ts, ys, color=colours[G], marker="o", ms=3, label=f"G={G}")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_title("Break-even sync_every N*: 2D sends fewer bytes when N > N*\n(one-hot; multi-hot within 1%)")
    ax.set_ylabel("steps")

    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (ranks)")
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"Row-wise sharding, Criteo-Terabyte-like DLRM (26 tables, {sum(CRITEO_TB_ROWS) / 1e6:.0f}M rows, D={dim}, "
        f"B={batch} per rank, row-wise AdaGrad): model"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------
# Reports and CLI
# ---------------------------------------------------------------------------


def measured_text(rows: List[dict], args, command: str) -> str:
    p_real = np.mean([r["ids_per_bag"] for r in rows]) if rows else float("nan")
    return f"""## Communication volume per rank, 1D vs 2D (gloo, CPU processes)

Machine: {machine_summary()}. Byte counts do not depend on the machine.

Command: `{command}` ({datetime.date.today().isoformat()}).

Each rank's bytes sent to other ranks per training step, as
`dist_rec.sharding.COMM_STATS` counts them, mean over ranks, in KiB; in
brackets the model of `benchmarks/bench_comm.py` (`predict`, see
docs/communication.md). Workload: {len(args.dims)} tables x {args.rows:,} rows,
dims {", ".join(map(str, args.dims))} (W = {sum(args.dims)}), one feature per
table, B = {args.batch} samples per rank per step, {args.min_ids}..{args.max_ids} ids per bag
(model P = {(args.min_ids + args.max_ids) / 2:g}; realised {p_real:.4f}), ids uniform;
`DistributedModelParallel(sharding_type=..., replicas=G, sync_every=N)`, fused
row-wise AdaGrad, {args.steps} steps. T = L x G ranks. "gap with realised ids": the
largest difference, over ranks and kinds, between measured bytes and the
model once its expected id count is replaced by the ids each rank actually
sent to other ranks. 1D/2D: all-to-all bytes per rank at G = 1 over those
at this G (same T).

{measured_table(rows)}
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[4, 8], help="T values to measure (spawned ranks)")
    parser.add_argument("--rows", type=int, default=20_000, help="rows per table")
    parser.add_argument(
        "--dims", type=int, nargs="+", default=[16, 32, 64, 16, 32, 64, 16, 32], help="dim of each table"
    )
    parser.add_argument("--batch", type=int, default=256, help="samples per rank per step")
    parser.add_argument("--min-ids", type=int, default=1)
    parser.add_argument("--max-ids", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per world")
    parser.add_argument("--ext-batch", type=int, default=512, help="extrapolation: samples per rank")
    parser.add_argument("--ext-dim", type=int, default=128, help="extrapolation: embedding dim")
    parser.add_argument("--model-only", action="store_true", help="skip the measurement, extrapolate only")
    parser.add_argument("--markdown", type=Path, help="write the measured table into this page's comm section")
    parser.add_argument(
        "--doc", type=Path, help="write the measured and extrapolation tables into docs/communication.md"
    )
    parser.add_argument("--plot", type=Path, help="write the extrapolation plot (PNG)")
    parser.add_argument("--json", type=Path, help="write every number as JSON")
    args = parser.parse_args(argv)
    if any(t < 2 for t in args.worlds):
        parser.error(f"Invalid --worlds={args.worlds}. Must be >= 2.")
    if not 0 <= args.min_ids <= args.max_ids:
        parser.error(f"Invalid --min-ids={args.min_ids} / --max-ids={args.max_ids}. Must be 0 <= min <= max.")
    if args.steps < 1 or args.batch < 1 or args.rows < max(args.worlds):
        parser.error("--steps and --batch must be >= 1 and --rows at least the largest world")
    command = command_line(__file__, argv)

    rows: List[dict] = []
    if not args.model_only:
        rows = measure(args)
        print()
        print(measured_table(rows))
        worst = max(abs(sum(r["measured"].values()) / sum(r["model"].values()) - 1) for r in rows)
        gap = max(r["exact_gap"] for r in rows)
        print(f"\nmodel vs measured: worst total {worst:.2%} off with nominal P; {gap:.0f} B with realised ids")

    workloads = criteo_workloads(args.ext_batch, args.ext_dim)
    ext = extrapolate(workloads)
    tables = extrapolation_tables(ext, workloads)
    print()
    print(tables)
    if args.plot:
        plot(ext, args.plot, args.ext_batch, args.ext_dim)
    if args.json:
        write_json(
            args.json,
            dict(
                command=command,
                measured=rows,
                extrapolation={name: {f"{T}x{G}": v for (T, G), v in t.items()} for name, t in ext.items()},
            ),
            indent=1,
        )
    if args.markdown and rows:
        update_section(args.markdown, "comm", measured_text(rows, args, command))
    if args.doc:
        if rows:
            update_section(args.doc, "comm_measured", measured_text(rows, args, command).split("\n", 2)[2])
        update_section(args.doc, "comm_extrapolation", f"Command: `{command}`.\n\n{tables}")


if __name__ == "__main__":
    main()
