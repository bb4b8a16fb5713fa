"""What a config builds: the data, the model, its optimizers, its sharding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

import torch
import torch.distributed as dist

from dist_rec.config import ConfigError, TrainConfig
from dist_rec.data.batch import Dataset
from dist_rec.distributed import ProcessGroups
from dist_rec.models.dlrm import DLRM, DLRM_DCN
from dist_rec.modules.embedding_configs import EmbeddingBagConfig
from dist_rec.modules.embedding_modules import EmbeddingBagCollection
from dist_rec.optim.fused import SGD, FusedOptimizer, MomentumScaledRowWiseAdagrad, RowWiseAdagrad
from dist_rec.optim.shampoo import DDPShampooConfig, DistributedShampoo
from dist_rec.planner.plan import ShardingPlan, ShardingType
from dist_rec.sharding.model_parallel import DistributedModelParallel
from dist_rec.trainer.environment import Environment


@dataclass
class Data:
    train: Dataset
    eval: Optional[Dataset]
    sparse_feature_names: List[str]
    num_embeddings_per_feature: List[int]
    num_dense_features: int
    teacher_auc: Optional[float] = None
    feature_tables: Optional[List[str]] = None  # each feature's table (default: its own)
    is_weighted: bool = False

    def tables(self) -> Dict[str, Tuple[int, List[str]]]:
        """Table name -> (rows, features), in feature order."""
        result: Dict[str, Tuple[int, List[str]]] = {}
        names = self.feature_tables or self.sparse_feature_names
        for feature, table, rows in zip(self.sparse_feature_names, names, self.num_embeddings_per_feature):
            result.setdefault(table, (rows, []))[1].append(feature)
        return result


def build_data(config: TrainConfig) -> Data:
    """The datasets the config describes. A data source that cannot be
    opened (a missing file, a bad schema) is a ``ConfigError``: the command
    line prints it as one ``error:`` line."""
    try:
        return _build_data(config)
    except (ValueError, ImportError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"data: {error}") from error


def _build_data(config: TrainConfig) -> Data:
    data = config.data
    if data.source == "synthetic":
        from dist_rec.data.synthetic import SyntheticDataset

        synthetic = data.synthetic_config()
        train = SyntheticDataset(synthetic, "train")
        evaluation = SyntheticDataset(synthetic, "eval", num_samples=data.eval_samples)
        return Data(train, evaluation, train.sparse_feature_names, synthetic.num_embeddings_per_feature, data.num_dense_features)
    common = dict(on_error=data.on_error, max_skip_fraction=data.max_skip_fraction)
    if data.source == "criteo_text":
        from dist_rec.data.criteo import CriteoTextDataset

        sizes = list(data.num_embeddings_per_feature)
        sizes = sizes * 26 if len(sizes) == 1 else sizes
        train = CriteoTextDataset(data.train_paths, sizes, **common)
        evaluation = CriteoTextDataset(data.eval_paths, sizes, **common) if data.eval_paths else None
    elif data.source in ("text", "parquet"):
        from dist_rec.data.convert import open_table
        from dist_rec.data.schema import Schema

        schema = Schema.load(data.schema) if isinstance(data.schema, str) else Schema.from_dict(data.schema)
        # Vocabularies and moments from the training part only: the held-out samples are the evaluation's.
        held_out = (data.eval_fraction, data.seed) if data.eval_fraction else None
        train = open_table(data.train_paths, schema, data.source, held_out=held_out, **common)
        evaluation = open_table(data.eval_paths, schema, data.source, fitted=train.fitted, **common) if data.eval_paths else None
    else:
        from dist_rec.data.binary import BinaryDataset

        shuffle = data.seed if data.shuffle else None
        train = BinaryDataset(data.train_paths[0], shuffle_seed=shuffle)
        evaluation = BinaryDataset(data.eval_paths[0]) if data.eval_paths else None
        if evaluation is not None:
            _check_same_tables(train, evaluation)
        stored = train.num_embeddings_per_feature
        given = list(data.num_embeddings_per_feature)
        if given and (given * len(stored) if len(given) == 1 else given) != stored:
            raise ConfigError(
                f"Invalid data.num_embeddings_per_feature={given}. Must match the sizes the binary dataset "
                f"{data.train_paths[0]} was written with, {stored} (or be left out: they are read from its meta.json)."
            )
    if data.eval_fraction:
        train, evaluation = _held_out(train, data.eval_fraction, data.seed)
    return Data(train, evaluation, train.sparse_feature_names, list(train.num_embeddings_per_feature),
                train.num_dense_features, feature_tables=getattr(train, "feature_tables", None),
                is_weighted=bool(getattr(train, "is_weighted", False)))  # fmt: skip


def _check_same_tables(train, evaluation) -> None:
    """An evaluation dataset must mean by each id what the training one
    does: the same features, tables, sizes and vocabularies."""
    for what in ("sparse_feature_names", "num_embeddings_per_feature", "feature_tables", "num_dense_features"):
        if getattr(train, what) != getattr(evaluation, what):
            raise ConfigError(f"Invalid data.eval_paths={[str(evaluation.directory)]}: its {what} "
                              f"{getattr(evaluation, what)} differ from the training dataset's {getattr(train, what)}.")  # fmt: skip
    fitted = train.meta["extra"].get("fitted"), evaluation.meta["extra"].get("fitted")
    if fitted[0] != fitted[1]:
        raise ConfigError(f"Invalid data.eval_paths={[str(evaluation.directory)]}: its vocabularies differ from the "
                          f"training dataset's, so its ids name other rows. Convert it with --fitted-from "
                          f"{train.directory}.")  # fmt: skip


def _held_out(dataset, fraction: float, seed: int):
    """(train part, eval part) of ``dataset`` under the held-out split."""
    from dist_rec.data.binary import BinaryDataset
    from dist_rec.data.samples import HeldOutSplit, held_out

    if isinstance(dataset, BinaryDataset):  # by index: no pass over the data
        mask = held_out(np.arange(dataset.num_samples), fraction, seed)
        return dataset.subset(np.flatnonzero(~mask)), BinaryDataset(dataset.directory, select=np.flatnonzero(mask))
    return HeldOutSplit(dataset, fraction, seed, "train"), HeldOutSplit(dataset, fraction, seed, "eval")


def sparse_optimizer(config: TrainConfig) -> FusedOptimizer:
    o = config.optimizer
    common = dict(lr=o.sparse_lr, weight_decay=o.sparse_weight_decay, weight_decay_mode=o.sparse_weight_decay_mode)
    if o.sparse == "sgd":
        return SGD(**common)
    if o.sparse == "rowwise_adagrad":
        return RowWiseAdagrad(eps=o.sparse_eps, **common)
    return MomentumScaledRowWiseAdagrad(eps=o.sparse_eps, momentum_scale=o.sparse_momentum_scale, **common)


def dense_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    o = config.optimizer
    if o.dense == "sgd":
        return torch.optim.SGD(parameters, lr=o.dense_lr)
    if o.dense == "adagrad":
        return torch.optim.Adagrad(parameters, lr=o.dense_lr)
    if o.dense == "shampoo":
        s = o.shampoo
        spread = s.distributed and dist.is_initialized() and dist.get_world_size() > 1
        dtype = getattr(torch, s.communication_dtype) if s.communication_dtype else None
        distributed = DDPShampooConfig(communication_dtype=dtype) if spread else None
        return DistributedShampoo(parameters, lr=o.dense_lr, distributed_config=distributed, **s.optimizer_kwargs())
    return torch.optim.Adam(parameters, lr=o.dense_lr)


def build_model(config: TrainConfig, data: Data, device: torch.device) -> DLRM:
    tables = [
        EmbeddingBagConfig(
            name=f"t_{table}", embedding_dim=config.model.embedding_dim, num_embeddings=rows, feature_names=features
        )
        for table, (rows, features) in data.tables().items()
    ]
    meta = config.model.meta_init
    ebc = EmbeddingBagCollection(tables=tables, is_weighted=data.is_weighted, device="meta" if meta else device,
                                 optimizer=sparse_optimizer(config))  # fmt: skip
    shape = dict(
        dense_in_features=data.num_dense_features,
        dense_arch_layer_sizes=config.model.dense_arch_layer_sizes,
        over_arch_layer_sizes=config.model.over_arch_layer_sizes,
    )
    if config.model.interaction == "dcn":
        model = DLRM_DCN(ebc, **shape, dcn_num_layers=config.model.dcn_num_layers, dcn_low_rank=config.model.dcn_low_rank)
    else:
        model = DLRM(ebc, **shape)
    if meta:  # the dense layers on the device; the tables stay meta until sharded
        for name, child in model.named_children():
            if child is not ebc:
                child.to(device)
        return model
    return model.to(device)


def shard_model(
    model: DLRM,
    config: TrainConfig,
    env: Environment,
    process_groups: Optional[ProcessGroups] = None,
    replicas: Optional[int] = None,
    initial_sync: bool = True,
    data: Optional[Data] = None,
) -> DistributedModelParallel:
    """The model with its tables spread as ``config.sharding`` says and its
    dense layers under DDP (left bare for another dense engine), on
    ``process_groups`` (made from the config when None, with ``replicas``
    replica groups: ``sharding.replicas`` unless a recovery epoch has fewer).
    ``initial_sync=False`` for a process joining a running job."""
    s = config.sharding
    plan = ShardingPlan.load(s.plan) if s.plan else None
    sharding_type = None if plan is not None or s.type in ("auto", "planned") else ShardingType.from_str(s.type)
    replicas = s.replicas if replicas is None else replicas
    if process_groups is None:
        process_groups = ProcessGroups(replicas=replicas, layout=s.layout, device=env.device, timeout_s=config.fault.timeout_s)
    memory_per_rank = s.memory_per_rank_mb << 20 if s.memory_per_rank_mb else None
    storage_dir, row_orders = None, None
    if plan is None and s.type == "planned":
        if s.placement == "none":  # every row in memory: the greedy planner under the memory budget
            memory_per_rank = int(s.fast_memory_mb * 2**20) or memory_per_rank
        else:
            placement = _tiered_placement(model, config, env, data, process_groups.grid.group_size)
            plan, row_orders, storage_dir = placement.plan, placement.row_orders, _tier_dir(config)
    if plan is not None:
        plan = {"sparse_arch": plan}
    return DistributedModelParallel(
        model,
        plan=plan,
        sharding_type=sharding_type,
        replicas=process_groups.replicas,
        sync_every=s.sync_every,
        layout=s.layout,
        memory_per_rank=memory_per_rank,
        device=env.device,
        wrap_dense=config.train.dense_engine == "ddp" and config.sync.dense == "ddp",  # else: replicas averaged on parameters
        process_groups=process_groups,
        storage_dir=storage_dir,
        initial_sync=initial_sync,
        row_orders=row_orders,
    )


def _tier_dir(config: TrainConfig) -> Path:
    return Path(config.sharding.tier_dir) if config.sharding.tier_dir else Path(config.train.output_dir) / "tiers"


def _tiered_placement(model: DLRM, config: TrainConfig, env: Environment, data: Optional[Data], group_size: int):
    """``sharding.type: planned``: the tiered plan from the job's own data."""
    from dist_rec.planner.tiered_planning import plan_tiered_placement

    if data is None:
        raise ValueError("sharding.type=planned needs the training data to plan from (shard_model(..., data=)).")
    s = config.sharding
    placement = plan_tiered_placement(
        model.sparse_arch.embedding_bag_configs(), data.train, world_size=group_size,
        global_batch_size=config.train.batch_size * env.world_size, placement=s.placement,
        fast_bytes=int(s.fast_memory_mb * 2**20), slow_bytes=int(s.ssd_memory_mb * 2**20) or None, tier_dir=_tier_dir(config),
        stats_batches=s.stats_batches, output_dir=config.train.output_dir or None, is_main=env.is_main,
        barrier=dist.barrier if dist.is_initialized() else (lambda: None),
    )  # fmt: skip
    if env.is_main:
        print(placement.describe(), flush=True)
    return placement
