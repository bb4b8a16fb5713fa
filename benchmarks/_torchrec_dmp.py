"""TorchRec ``DistributedModelParallel`` on CPU processes joined by gloo.

What ``bench_sharded.py`` needs from TorchRec 1.8.0, kept apart because it
is the fiddly part: a DLRM (``torchrec.models.dlrm.DLRM`` or
``dist_rec.models.DLRM``) holding a
``torchrec.EmbeddingBagCollection`` built on the ``meta`` device, the
embedding parameters marked for a fused in-backward
``torchrec.optim.RowWiseAdagrad`` (FBGEMM ``EXACT_ROWWISE_ADAGRAD``), a plan
from ``EmbeddingShardingPlanner`` (topology ``compute_device="cpu"``) with
every table constrained to one sharding type, sharded by
``EmbeddingBagCollectionSharder`` and wrapped by DMP, which puts the dense
part (the MLPs) under DDP. The dense optimizer is ``torch.optim.Adagrad``
over DMP's non-sharded parameters (``in_backward_optimizer_filter``), in a
``KeyedOptimizerWrapper`` as TorchRec's own DLRM example does.

Under dist_rec's DLRM the collection sits in a ``ConfigOrder`` wrapper: a sharded collection
returns its pooled embeddings grouped by shard (table-wise: rank 0's tables,
then rank 1's, ...), not in the configured feature order that
``dist_rec.models.DLRM`` reads positionally (``kt.values()``), which would
feed the dot interaction a permuted feature order, a different model from
the unsharded one. TorchRec's own DLRM reorders too (its ``SparseArch``
stacks ``kt.to_dict()`` by feature name).

The caller has initialised the default (gloo) process group.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.fx
from torch import nn

# sharding type of bench_sharded -> TorchRec's ShardingType value
SHARDING_TYPES = {
    "table_wise": "table_wise",
    "row_wise": "row_wise",
    "column_wise": "column_wise",
    "table_row_wise": "table_row_wise",
    "data_parallel": "data_parallel",
}


def tables(names: Sequence[str], keys: Sequence[str], rows: Sequence[int], dim: int, pooling: str = "sum"):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    return [
        EmbeddingBagConfig(
            name=name, embedding_dim=dim, num_embeddings=n, feature_names=[key], pooling=PoolingType[pooling.upper()]
        )
        for name, key, n in zip(names, keys, rows)
    ]


class ConfigOrder(nn.Module):
    """A collection whose output KeyedTensor is in its configured feature
    order (a no-op when it already is, as row-wise)."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc
        self.keys = [f for c in ebc.embedding_bag_configs() for f in c.feature_names]

    def embedding_bag_configs(self):
        return self.ebc.embedding_bag_configs()

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        kt = self.ebc(features)
        if isinstance(kt, torch.fx.Proxy):
            # Traced by TrainPipelineSparseDist, which only looks for the
            # collection's input: no branch on the keys.
            pooled = kt.to_dict()
            return _Columns(self.keys, torch.cat([pooled[k] for k in self.keys], dim=1))
        if kt.keys() == self.keys:
            return kt
        pooled = kt.to_dict()
        values = torch.cat([pooled[k] for k in self.keys], dim=1)
        return KeyedTensor(keys=self.keys, length_per_key=[pooled[k].shape[1] for k in self.keys], values=values)


class _Columns:
    """Pooled columns in a known key order (what a trace of ``ConfigOrder``
    hands the DLRM: its keys are plain strings, its values a Proxy)."""

    def __init__(self, keys: List[str], values) -> None:
        self._keys, self._values = keys, values

    def keys(self) -> List[str]:
        return self._keys

    def values(self):
        return self._values


class TrainModule(nn.Module):
    """``model(batch) -> (loss, (loss, logits))``, the interface of
    TorchRec's ``TrainPipelineSparseDist`` (as its ``DLRMTrain``; the
    pipeline's ``progress`` returns the second part): BCE-with-logits, mean
    over the batch, on a ``torchrec.datasets.utils.Batch``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        logits = self.model(batch.dense_features, batch.sparse_features).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach())


def train_pipeline(dmp, optimizer):
    """TorchRec's ``TrainPipelineSparseDist`` on the CPU: the next batch's
    input dist (splits, then lengths/ids all-to-all) runs during the current
    step. ``dmp`` must wrap a ``TrainModule``."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    return TrainPipelineSparseDist(dmp, optimizer, device=torch.device("cpu"))


def _sharder(allow_cpu_row_wise: bool):
    """``EmbeddingBagCollectionSharder``; with ``allow_cpu_row_wise`` one that
    also offers row-wise and table-row-wise on the CPU.

    TorchRec 1.8.0's ``EmbeddingBagCollectionSharder.sharding_types("cpu")``
    offers only data_parallel, table_wise, column_wise and
    table_column_wise (row_wise, table_row_wise and grid_shard are listed for
    "cuda" only), so a row-wise constraint on a CPU topology makes the planner
    fail: "No available sharding type and compute kernel combination after
    applying user provided constraints for <table> ... compute device: cpu".
    The sharding itself (bucketised KJT all-to-all in, reduce-scatter of the
    pooled embeddings out, the FBGEMM CPU TBE for the local rows) runs on CPU
    with gloo, so the subclass only lifts the filter.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.types import ShardingType

    if not allow_cpu_row_wise:
        return EmbeddingBagCollectionSharder()

    class CPURowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> List[str]:
            types = super().sharding_types(compute_device_type)
            if compute_device_type == "cpu":
                types += [t.value for t in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE) if t.value not in types]
            return types

    return CPURowWiseEmbeddingBagCollectionSharder()


def build_dmp(
    configs,
    make_model: Callable[[nn.Module], nn.Module],
    sharding_type: str,
    sparse_lr: float,
    eps: float,
    dense_lr: float,
    batch_size: int,
    allow_cpu_row_wise: bool = True,
    reorder: bool = True,
) -> Tuple[nn.Module, torch.optim.Optimizer]:
    """``(dmp, dense optimizer)``: ``make_model(ebc)`` sharded by TorchRec;
    with ``reorder`` the collection is wrapped in ``ConfigOrder`` (for a
    model that reads the pooled columns by position; TorchRec's own DLRM
    reorders them itself and takes the collection as it is).

    ``make_model`` builds the dense part on the CPU (seed it first for the
    same MLPs on every side); the collection is on ``meta`` and DMP
    allocates its shards (initial values: ``load_tables`` afterwards).
    """
    import torchrec.optim
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"Invalid sharding_type={sharding_type!r}. Must be one of {', '.join(SHARDING_TYPES)}.")
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    model = make_model(ConfigOrder(ebc) if reorder else ebc)
    # Marks the tables for a fused optimizer: the sharder turns this into the
    # TBE's EXACT_ROWWISE_ADAGRAD, applied in the backward.
    apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, ebc.parameters(), {"lr": sparse_lr, "eps": eps})

    world_size = dist.get_world_size()
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu")
    constraints = {c.name: ParameterConstraints(sharding_types=[SHARDING_TYPES[sharding_type]]) for c in configs}
    sharders = [_sharder(allow_cpu_row_wise)]
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, batch_size=batch_size, debug=False)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adagrad(params, lr=dense_lr),
    )
    return dmp, dense


def plan_summary(dmp) -> Dict[str, List[str]]:
    """``{table: [sharding type, compute kernel, ranks]}`` from DMP's plan."""
    out = {}
    for module_plan in dmp.plan.plan.values():
        for name, p in module_plan.items():
            ranks = sorted({s.placement.rank() for s in p.sharding_spec.shards}) if p.sharding_spec else p.ranks
            out[name] = [p.sharding_type, p.compute_kernel, ranks]
    return out


def fused_optimizer_names(dmp) -> List[str]:
    """The FBGEMM optimizer of every TBE (one per group of tables) of this rank."""
    names = []
    for _, optimizer in dmp.fused_optimizer.optimizers:
        for _, inner in getattr(optimizer, "optimizers", [("", optimizer)]):
            emb = getattr(inner, "_emb_module", None)
            if emb is not None:
                names.append(str(getattr(emb.optimizer, "name", emb.optimizer)))
    return names


@torch.no_grad()
def load_tables(dmp, full_weight: Callable[[str], torch.Tensor]) -> None:
    """Writes ``full_weight(table)`` (the whole table) into this rank's
    shards of every sharded table (state_dict entries are ShardedTensors whose
    local shards alias the TBE weights)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in dmp.state_dict().items():
        if not isinstance(value, ShardedTensor):
            continue
        if not value.local_shards():
            continue  # a table-wise table of another rank
        weight = full_weight(key.split(".")[-2])
        for shard in value.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(weight[r0 : r0 + nr, c0 : c0 + nc])


@torch.no_grad()
def gather_tables(dmp) -> Dict[str, torch.Tensor]:
    """Every table in full on every rank (for checks, small tables only)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for key, value in dmp.state_dict().items():
        if not isinstance(value, ShardedTensor):
            continue
        full = torch.zeros(value.size())
        for shard in value.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            full[r0 : r0 + nr, c0 : c0 + nc] = shard.tensor
        dist.all_reduce(full)
        out[key.split(".")[-2]] = full
    return out
