"""Training configuration: validated dataclasses, YAML files, overrides.

A run is described by one ``TrainConfig`` with seven sections (``data``,
``model``, ``optimizer``, ``train``, ``sharding``, ``checkpoint``, ``fault``). It loads from YAML, and
``section.field=value`` overrides from the command line are applied on top
(values parsed as YAML: ``train.steps=100``,
``model.over_arch_layer_sizes=[64,1]``). Every value is checked where it is
set; a bad one is refused with ``Invalid <section.field>=<value>. Must be
...``, and an unknown key with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from dist_rec.checkpoint.delta import DELTA_BITS
from dist_rec.distributed.grid import LAYOUTS
from dist_rec.planner.plan import ShardingType

DATA_SOURCES = ("synthetic", "criteo_text", "criteo_binary", "text", "parquet", "binary")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam", "shampoo")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "momentum_scaled_rowwise_adagrad", "sgd")
BACKENDS = ("auto", "gloo", "nccl")
SHARDING_CHOICES = (*ShardingType.str_values(), "auto", "planned")
PLACEMENTS = ("recshard", "greedy", "none")
GRID_LAYOUTS = LAYOUTS
DEVICES = ("auto", "cpu", "cuda")
DENSE_ENGINES = ("ddp", "deepspeed")
ZERO_STAGES = (1, 2)
# ZeRO steps the dense optimizer on flat slices of the parameters, so only
# optimizers that update every element on its own are exact under it.
DEEPSPEED_DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")


class ConfigError(ValueError):
    """A configuration value or key that is not allowed."""


def _invalid(name: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"Invalid {name}={value!r}. Must be {rule}.")


@dataclass
class DataConfig:
    """Where samples come from.

    Args:
        source: "synthetic" (generated on the fly, the default workload),
            "criteo_text" (raw Criteo TSV files), "text" or "parquet" (any
            CSV/TSV or Parquet files under ``schema``), or "binary" (a
            directory written by ``python -m dist_rec.data.convert`` or
            ``convert_criteo``; "criteo_binary" is the same).
        train_paths / eval_paths: the files (text, Parquet) or directory
            (binary); relative paths are taken from the working directory.
            eval_paths is the split by file; see eval_fraction for the other.
        schema: the columns of "text" / "parquet" data: a mapping (see
            ``dist_rec.data.Schema`` and docs/data.md) or the path of a YAML
            file holding one.
        num_embeddings_per_feature: rows of each sparse feature's table. For
            synthetic data this also sets the number of sparse features
            (empty: 8 tables of 1000 rows); for Criteo text, 26 values, or
            one value used for all. Binary datasets know their sizes (empty:
            theirs; given, they must agree).
        num_dense_features: dense features (synthetic; the others know theirs).
        zipf_exponent, mean_bag_length, missing_probability, signal_rows,
            interaction_weight, logit_scale, click_rate: the synthetic workload (see
            ``SyntheticConfig``).
        eval_samples: size of the synthetic evaluation set.
        eval_fraction: hold out this fraction of the training data for
            evaluation, chosen by a hash of each sample's index and ``seed``
            (the same samples on any world size). 0: none; needs no eval_paths.
        shuffle: shuffle binary data every epoch, by ``seed`` (the same order
            on any world size). Text is read in file order: convert it.
        prefetch: batches prepared ahead of the step (0: the training
            thread reads them itself).
        prefetch_worker: who prepares them: "process" (a worker process
            forked before the model is built, at idle priority, batches in
            shared memory), "thread", or "auto": a thread for binary data
            (numpy slicing, cheaper than a hand-over between processes), the
            process for the rest (text parsing in Python would hold the
            trainer's GIL). See ``dist_rec.data.prefetch`` and
            benchmarks/bench_data.py.
        on_error: what a malformed line does: "raise" or "skip".
        max_skip_fraction: with on_error "skip", the most of the lines read
            that may be skipped before the run stops with the counts.
        seed: seed of the synthetic data (its teacher and samples), of the
            shuffle and of the held-out split.
    """

    source: str = "synthetic"
    train_paths: List[str] = field(default_factory=list)
    eval_paths: List[str] = field(default_factory=list)
    schema: Any = None
    num_embeddings_per_feature: List[int] = field(default_factory=list)
    num_dense_features: int = 13
    zipf_exponent: float = 1.1
    mean_bag_length: float = 1.0
    missing_probability: float = 0.02
    signal_rows: int = 50
    interaction_weight: float = 0.3
    logit_scale: float = 1.6
    click_rate: float = 0.25
    eval_samples: int = 65536
    eval_fraction: float = 0.0
    shuffle: bool = False
    prefetch: int = 2
    prefetch_worker: str = "auto"
    on_error: str = "raise"
    max_skip_fraction: float = 0.01
    seed: int = 0

    def synthetic_config(self):
        """The ``SyntheticConfig`` these settings describe (it validates them)."""
        from dist_rec.data.synthetic import SyntheticConfig

        return SyntheticConfig(
            num_embeddings_per_feature=list(self.num_embeddings_per_feature or [1000] * 8),
            num_dense_features=self.num_dense_features,
            zipf_exponent=self.zipf_exponent,
            mean_bag_length=self.mean_bag_length,
            missing_probability=self.missing_probability,
            signal_rows=self.signal_rows,
            interaction_weight=self.interaction_weight,
            logit_scale=self.logit_scale,
            click_rate=self.click_rate,
            seed=self.seed,
        )

    def validate(self, prefix: str = "data") -> None:
        if self.source not in DATA_SOURCES:
            raise _invalid(f"{prefix}.source", self.source, f"one of {list(DATA_SOURCES)}")
        if any(n < 1 for n in self.num_embeddings_per_feature):
            raise _invalid(f"{prefix}.num_embeddings_per_feature", self.num_embeddings_per_feature, "integers >= 1")
        if self.source != "synthetic" and not self.train_paths:
            raise _invalid(f"{prefix}.train_paths", self.train_paths, f"at least one path for source={self.source!r}")
        if self.source == "criteo_text" and len(self.num_embeddings_per_feature) not in (1, 26):
            raise _invalid(
                f"{prefix}.num_embeddings_per_feature",
                self.num_embeddings_per_feature,
                "26 values (one per Criteo categorical feature) or a single value for all",
            )
        if self.source in ("text", "parquet"):
            if self.schema is None:
                raise _invalid(f"{prefix}.schema", None, f"a mapping or a YAML file path for source={self.source!r} "
                                                         "(see docs/data.md)")  # fmt: skip
            if not isinstance(self.schema, (dict, str)):
                raise _invalid(f"{prefix}.schema", self.schema, "a mapping or a YAML file path")
            if self.num_embeddings_per_feature:
                raise _invalid(f"{prefix}.num_embeddings_per_feature", self.num_embeddings_per_feature,
                               f"empty for source={self.source!r}: the schema gives the table sizes")  # fmt: skip
        elif self.schema is not None:
            raise _invalid(f"{prefix}.schema", self.schema, f"unset for source={self.source!r} (text and parquet only)")
        if self.source in ("binary", "criteo_binary") and (len(self.train_paths) != 1 or len(self.eval_paths) > 1):
            raise _invalid(f"{prefix}.train_paths", self.train_paths,
                           f"one directory (and {prefix}.eval_paths at most one) for source={self.source!r}")  # fmt: skip
        try:
            self.synthetic_config()
        except ValueError as error:  # same rules, named as this config names them
            raise ConfigError(str(error).replace("Invalid ", f"Invalid {prefix}.", 1)) from None
        _check(self.eval_samples >= 1, f"{prefix}.eval_samples", self.eval_samples, ">= 1")
        _check(self.seed >= 0, f"{prefix}.seed", self.seed, ">= 0")
        _check(0.0 <= self.eval_fraction < 1.0, f"{prefix}.eval_fraction", self.eval_fraction, "in [0, 1)")
        if self.eval_fraction and self.source == "synthetic":
            raise _invalid(f"{prefix}.eval_fraction", self.eval_fraction, "0 for synthetic data (it has its own "
                           "evaluation set, data.eval_samples)")  # fmt: skip
        if self.eval_fraction and self.eval_paths:
            raise _invalid(f"{prefix}.eval_fraction", self.eval_fraction, f"0 when {prefix}.eval_paths are given "
                           "(split by file or by fraction, not both)")  # fmt: skip
        if self.shuffle and self.source not in ("binary", "criteo_binary"):
            raise _invalid(f"{prefix}.shuffle", self.shuffle, "false unless the data is binary: convert text with "
                           "python -m dist_rec.data.convert (or convert_criteo) to shuffle it")  # fmt: skip
        _check(self.prefetch >= 0, f"{prefix}.prefetch", self.prefetch, ">= 0 (0: the training thread reads)")
        if self.prefetch_worker not in ("auto", "process", "thread"):
            raise _invalid(f"{prefix}.prefetch_worker", self.prefetch_worker, "'auto', 'process' or 'thread'")
        if self.on_error not in ("raise", "skip"):
            raise _invalid(f"{prefix}.on_error", self.on_error, "'raise' or 'skip'")
        _check(0.0 <= self.max_skip_fraction <= 1.0, f"{prefix}.max_skip_fraction", self.max_skip_fraction, "in [0, 1]")


@dataclass
class ModelConfig:
    """DLRM's shape.

    Args:
        embedding_dim: every table's dimension; must equal the last dense
            arch layer (the dot interaction multiplies them).
        dense_arch_layer_sizes: bottom MLP widths.
        over_arch_layer_sizes: top MLP widths, ending in 1 (the logit).
        interaction: "dot" (DLRM's pairwise dots) or "dcn" (a DCN v2
            low-rank cross network, ``DLRM_DCN``).
        dcn_num_layers, dcn_low_rank: the cross network's depth and rank.
        meta_init: build the tables on the meta device, so that each rank
            allocates and initialises only its own shards (tables larger
            than one rank's memory; TorchRec's meta-device model). The
            rows' initial values then depend on the sharding. Needs a
            sharded (distributed) run.
    """

    embedding_dim: int = 16
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 16])
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [128, 64, 1])
    interaction: str = "dot"
    dcn_num_layers: int = 3
    dcn_low_rank: int = 64
    meta_init: bool = False

    def validate(self, prefix: str = "model") -> None:
        _check(self.embedding_dim >= 1, f"{prefix}.embedding_dim", self.embedding_dim, ">= 1")
        for name in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
            sizes = getattr(self, name)
            if not sizes or any(s < 1 for s in sizes):
                raise _invalid(f"{prefix}.{name}", sizes, "a non-empty list of integers >= 1")
        if self.dense_arch_layer_sizes[-1] != self.embedding_dim:
            raise _invalid(
                f"{prefix}.dense_arch_layer_sizes",
                self.dense_arch_layer_sizes,
                f"a list ending in embedding_dim={self.embedding_dim} (the dot interaction needs equal widths)",
            )
        if self.interaction not in ("dot", "dcn"):
            raise _invalid(f"{prefix}.interaction", self.interaction, "'dot' or 'dcn'")
        _check(self.dcn_num_layers >= 1, f"{prefix}.dcn_num_layers", self.dcn_num_layers, ">= 1")
        _check(self.dcn_low_rank >= 1, f"{prefix}.dcn_low_rank", self.dcn_low_rank, ">= 1")
        if self.over_arch_layer_sizes[-1] != 1:
            raise _invalid(f"{prefix}.over_arch_layer_sizes", self.over_arch_layer_sizes, "a list ending in 1 (one logit)")


@dataclass
class ShampooConfig:
    """``DistributedShampoo``'s settings for ``optimizer.dense: shampoo`` (the
    optimizer's own names; see docs/shampoo.md). Its learning rate is
    ``optimizer.dense_lr``.

    Args:
        distributed: with several processes, spread the blocks over the ranks
            (each keeps and computes its share; one all-gather per step).
        communication_dtype: "" (the parameters' dtype), "float32",
            "bfloat16" or "float16" for that all-gather.
    """

    betas: List[float] = field(default_factory=lambda: [0.9, 1.0])
    epsilon: float = 1e-12
    momentum: float = 0.0
    weight_decay: float = 0.0
    use_decoupled_weight_decay: bool = True
    max_preconditioner_dim: int = 1024
    precondition_frequency: int = 1
    start_preconditioning_step: int = -1
    use_bias_correction: bool = True
    grafting: str = "adagrad"
    grafting_epsilon: float = 1e-10
    grafting_beta2: float = 1.0
    max_grad_norm: Optional[float] = None
    distributed: bool = True
    communication_dtype: str = ""

    def optimizer_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of ``DistributedShampoo`` (lr and
        distribution aside)."""
        kwargs = dataclasses.asdict(self)
        for key in ("distributed", "communication_dtype"):
            kwargs.pop(key)
        kwargs["betas"] = tuple(kwargs["betas"])
        return kwargs

    def validate(self, prefix: str = "optimizer.shampoo") -> None:
        if len(self.betas) != 2:
            raise _invalid(f"{prefix}.betas", self.betas, "a list of two numbers [beta1, beta2]")
        if self.communication_dtype not in ("", "float32", "bfloat16", "float16"):
            raise _invalid(f"{prefix}.communication_dtype", self.communication_dtype, "'', 'float32', 'bfloat16' or 'float16'")
        import torch

        from dist_rec.optim.shampoo import DistributedShampoo

        try:  # the optimizer's own checks, on a stand-in parameter
            DistributedShampoo([torch.zeros(1, requires_grad=True)], **self.optimizer_kwargs())
        except ValueError as error:
            raise ConfigError(f"{prefix}: {error}") from None


@dataclass
class OptimizerConfig:
    """Dense and sparse optimizers.

    Args:
        dense: "sgd", "adagrad", "adam" or "shampoo" (``DistributedShampoo``,
            settings under ``shampoo``), for the MLPs (DDP-averaged).
        dense_lr: its learning rate.
        shampoo: Shampoo's settings (used when dense is "shampoo").
        sparse: the fused embedding optimizer: "rowwise_adagrad",
            "momentum_scaled_rowwise_adagrad" or "sgd".
        sparse_lr, sparse_eps: its learning rate and epsilon.
        sparse_weight_decay, sparse_weight_decay_mode: "none", "l2" or "decoupled".
        sparse_momentum_scale: s of momentum-scaled row-wise AdaGrad (1 <= s
            <= replicas).
    """

    dense: str = "adagrad"
    dense_lr: float = 0.01
    sparse: str = "rowwise_adagrad"
    sparse_lr: float = 0.05
    sparse_eps: float = 1e-8
    sparse_weight_decay: float = 0.0
    sparse_weight_decay_mode: str = "none"
    sparse_momentum_scale: float = 1.0
    shampoo: ShampooConfig = field(default_factory=ShampooConfig)

    def validate(self, prefix: str = "optimizer") -> None:
        if self.dense not in DENSE_OPTIMIZERS:
            raise _invalid(f"{prefix}.dense", self.dense, f"one of {list(DENSE_OPTIMIZERS)}")
        if self.dense == "shampoo":
            self.shampoo.validate(f"{prefix}.shampoo")
        if self.sparse not in SPARSE_OPTIMIZERS:
            raise _invalid(f"{prefix}.sparse", self.sparse, f"one of {list(SPARSE_OPTIMIZERS)}")
        _check(self.dense_lr > 0, f"{prefix}.dense_lr", self.dense_lr, "> 0")
        _check(self.sparse_lr > 0, f"{prefix}.sparse_lr", self.sparse_lr, "> 0")
        _check(self.sparse_eps > 0, f"{prefix}.sparse_eps", self.sparse_eps, "> 0")
        _check(self.sparse_momentum_scale >= 1, f"{prefix}.sparse_momentum_scale", self.sparse_momentum_scale, ">= 1")
        _check(self.sparse_weight_decay >= 0, f"{prefix}.sparse_weight_decay", self.sparse_weight_decay, ">= 0")
        if self.sparse_weight_decay_mode not in ("none", "l2", "decoupled"):
            raise _invalid(f"{prefix}.sparse_weight_decay_mode", self.sparse_weight_decay_mode, "'none', 'l2' or 'decoupled'")


@dataclass
class RunConfig:
    """The loop.

    Args:
        batch_size: samples per rank per step (the global batch is this
            times the number of processes).
        steps: training steps (0: ``epochs`` passes over finite training
            data). With both, the run ends at whichever comes first, and
            says so when the data ran out before ``steps``.
        epochs: passes over finite training data (binary data is shuffled
            anew each epoch with data.shuffle).
        eval_every: evaluate every this many steps (0: only at the end).
        log_every: progress line every this many steps.
        eval_batch_size: samples per rank per evaluation batch.
        seed: model initialisation seed.
        output_dir: where metrics.jsonl, the plot and the resolved config go.
        backend: "auto" (NCCL with GPUs, else gloo), "gloo" or "nccl".
        device: "auto", "cpu" or "cuda".
        threads: intra-op threads per process (0: cores / local processes).
        pin_cores: under torchrun with several processes on a host, pin
            each to its own block of the CPUs it may run on (its affinity;
            a core's hyperthreads kept together), its threads and its data
            worker too. Off where other jobs share the cores or where the
            launcher already binds each rank (``srun --cpu-bind``,
            ``numactl``). Not under the fault-tolerant launcher.
        keep_freed_memory: have glibc's malloc keep what a step frees for
            the next step instead of unmapping it, which spares the kernel
            faulting in and zeroing the same pages every step
            (``dist_rec.trainer.environment.keep_freed_memory``); the
            process's resident memory then stays near its peak (up to 1 GiB
            of free heap is kept). Leaves malloc settings of your own
            (``MALLOC_*_``, ``GLIBC_TUNABLES``, a preloaded jemalloc or
            tcmalloc) alone.
        checkpoint_dir: where sharded checkpoints go ("" : none). A run
            whose checkpoint_dir holds a checkpoint resumes from it (any
            world size or sharding with the same global batch).
        checkpoint_every: save every this many steps (0: only at the end).
        dense_engine: who owns the dense parameters: "ddp" (DistributedDataParallel)
            or "deepspeed" (DeepSpeed ZeRO, an optional install; 2 or more
            processes; see docs/deepspeed.md). The tables are sharded by
            dist_rec either way.
        zero_stage: DeepSpeed ZeRO stage with dense_engine="deepspeed": 1
            (optimizer state partitioned over the ranks) or 2 (gradients too).
    """

    batch_size: int = 512
    steps: int = 1000
    epochs: int = 1
    eval_every: int = 0
    log_every: int = 50
    eval_batch_size: int = 8192
    seed: int = 0
    output_dir: str = "runs/latest"
    backend: str = "auto"
    device: str = "auto"
    threads: int = 0
    pin_cores: bool = True
    keep_freed_memory: bool = True
    checkpoint_dir: str = ""
    checkpoint_every: int = 0
    dense_engine: str = "ddp"
    zero_stage: int = 2

    def validate(self, prefix: str = "train") -> None:
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, ">= 1")
        _check(self.steps >= 0, f"{prefix}.steps", self.steps, ">= 0")
        _check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, ">= 1")
        _check(self.eval_every >= 0, f"{prefix}.eval_every", self.eval_every, ">= 0 (0: only at the end)")
        _check(self.log_every >= 1, f"{prefix}.log_every", self.log_every, ">= 1")
        _check(self.eval_batch_size >= 1, f"{prefix}.eval_batch_size", self.eval_batch_size, ">= 1")
        _check(self.threads >= 0, f"{prefix}.threads", self.threads, ">= 0 (0: automatic)")
        _check(self.checkpoint_every >= 0, f"{prefix}.checkpoint_every", self.checkpoint_every, ">= 0 (0: only at the end)")
        if self.backend not in BACKENDS:
            raise _invalid(f"{prefix}.backend", self.backend, f"one of {list(BACKENDS)}")
        if self.device not in DEVICES:
            raise _invalid(f"{prefix}.device", self.device, f"one of {list(DEVICES)}")
        if self.dense_engine not in DENSE_ENGINES:
            raise _invalid(f"{prefix}.dense_engine", self.dense_engine, f"one of {list(DENSE_ENGINES)}")
        if self.zero_stage not in ZERO_STAGES:
            raise _invalid(f"{prefix}.zero_stage", self.zero_stage, f"one of {list(ZERO_STAGES)} (DeepSpeed ZeRO stage)")


@dataclass
class ShardingConfig:
    """How the embedding tables are spread over the processes.

    Args:
        type: "data_parallel" (a full copy per process, updates agreed over
            all), "table_wise", "row_wise", "column_wise", "table_row_wise"
            (every table the same way), "auto" (the greedy planner), or
            "planned": tables placed table-wise by access statistics of the
            training data, their hottest rows in memory and the rest on SSD
            as ``placement`` says (docs/planner.md, "Tiered placement").
        plan: a JSON plan file (``ShardingPlan.save``); overrides ``type``.
        placement: for "planned": "recshard" (the RecShard MILP: per table
            the hot rows that minimise the slowest rank's expected cost),
            "greedy" (whole tables in memory, largest first, until
            ``fast_memory_mb`` is full; the rest on SSD) or "none" (every
            row in memory: the greedy planner under ``fast_memory_mb``).
        fast_memory_mb: per rank, the memory for rows and their optimizer
            state ("planned"; 0: the planner's automatic budget).
        ssd_memory_mb: per rank, the SSD space for cold rows (0: the free
            space of ``tier_dir``).
        tier_dir: where cold rows live (a directory on an SSD; not tmpfs).
            Empty: ``<train.output_dir>/tiers``.
        stats_batches: batches of the training stream the access statistics
            are counted on (saved beside the plan).
        replicas: G of 2D parallelism: the processes form G groups that
            each hold all tables sharded over their own ranks. 1: no 2D.
        sync_every: replicas are synchronised every this many steps.
        layout: "shards_on_host" (a sharding group is consecutive ranks)
            or "replicas_on_host".
        memory_per_rank_mb: the planner's budget per rank (0: automatic);
            with ``type: table_wise``, the bound of each rank's tables (0: none).
    """

    type: str = "data_parallel"
    plan: str = ""
    replicas: int = 1
    sync_every: int = 1
    layout: str = "shards_on_host"
    memory_per_rank_mb: int = 0
    placement: str = "recshard"
    fast_memory_mb: float = 0.0
    ssd_memory_mb: float = 0.0
    tier_dir: str = ""
    stats_batches: int = 100

    def validate(self, prefix: str = "sharding") -> None:
        if self.type not in SHARDING_CHOICES:
            raise _invalid(f"{prefix}.type", self.type, f"one of {list(SHARDING_CHOICES)}")
        if self.layout not in GRID_LAYOUTS:
            raise _invalid(f"{prefix}.layout", self.layout, f"one of {list(GRID_LAYOUTS)}")
        _check(self.replicas >= 1, f"{prefix}.replicas", self.replicas, ">= 1")
        _check(self.sync_every >= 1, f"{prefix}.sync_every", self.sync_every, ">= 1")
        _check(self.memory_per_rank_mb >= 0, f"{prefix}.memory_per_rank_mb", self.memory_per_rank_mb, ">= 0 (0: automatic)")
        if self.plan and not Path(self.plan).is_file():
            raise _invalid(f"{prefix}.plan", self.plan, "a JSON plan file that exists")
        if self.placement not in PLACEMENTS:
            raise _invalid(f"{prefix}.placement", self.placement, f"one of {list(PLACEMENTS)}")
        _check(self.fast_memory_mb >= 0, f"{prefix}.fast_memory_mb", self.fast_memory_mb, ">= 0 (0: automatic)")
        _check(self.ssd_memory_mb >= 0, f"{prefix}.ssd_memory_mb", self.ssd_memory_mb, ">= 0 (0: the free disk)")
        _check(self.stats_batches >= 1, f"{prefix}.stats_batches", self.stats_batches, ">= 1")
        if self.type == "planned" and self.placement != "none" and self.fast_memory_mb == 0:
            raise _invalid(f"{prefix}.fast_memory_mb", self.fast_memory_mb,
                           "> 0 with sharding.type=planned: the memory budget the hot rows get")  # fmt: skip


CHECKPOINT_POLICIES = ("full", "incremental", "mfu", "ssu")


@dataclass
class CheckpointConfig:
    """How checkpoints are written (where and how often: ``train.checkpoint_dir``,
    ``train.checkpoint_every``; see docs/checkpoint.md).

    Args:
        policy: "full" (every row at every save), "incremental" (the rows
            touched since the previous save; a full base every ``base_every``
            saves; exact), "mfu" (CPR-MFU: the ``mfu_fraction`` most used rows
            of each shard at every save, the rest at bases) or "ssu" (CPR-SSU:
            a ``ssu_fraction`` sample of the touched rows at every save).
        async_save: copy what a save needs and write it in the background
            (training stalls only for the copy); False writes in the step.
        base_every: a full save every this many saves (non-full policies).
        mfu_fraction, ssu_fraction: the policies' shares of rows.
        delta_bits: 32 stores a delta's weights exact; 8 or 4 stores each
            saved row's change since the previous save quantised to that
            many bits (Check-N-Run; a restored row is off by at most half
            of its row's step; bases stay exact).
        keep_last: complete checkpoints kept (with the bases their deltas need).
        auto_interval: choose the interval from ``fault.mtbf_s`` and the
            measured save cost (Young/Daly, or the largest interval whose
            expected PLS stays under ``target_pls`` under partial recovery),
            instead of ``train.checkpoint_every``.
        target_pls: the portion of lost samples partial recovery may cost.
    """

    policy: str = "full"
    async_save: bool = True
    base_every: int = 5
    mfu_fraction: float = 0.1
    ssu_fraction: float = 0.1
    delta_bits: int = 32
    keep_last: int = 2
    auto_interval: bool = False
    target_pls: float = 0.01

    def validate(self, prefix: str = "checkpoint") -> None:
        if self.policy not in CHECKPOINT_POLICIES:
            raise _invalid(f"{prefix}.policy", self.policy, f"one of {list(CHECKPOINT_POLICIES)}")
        _check(self.base_every >= 1, f"{prefix}.base_every", self.base_every, ">= 1")
        _check(0 < self.mfu_fraction <= 1, f"{prefix}.mfu_fraction", self.mfu_fraction, "in (0, 1]")
        _check(0 < self.ssu_fraction <= 1, f"{prefix}.ssu_fraction", self.ssu_fraction, "in (0, 1]")
        if self.delta_bits not in DELTA_BITS:
            raise _invalid(f"{prefix}.delta_bits", self.delta_bits, f"one of {list(DELTA_BITS)}")
        if self.delta_bits != 32 and self.policy == "full":
            raise _invalid(f"{prefix}.delta_bits", self.delta_bits,
                           f"32 with {prefix}.policy='full' (full saves have no deltas to quantise)")  # fmt: skip
        _check(self.keep_last >= 1, f"{prefix}.keep_last", self.keep_last, ">= 1")
        _check(0 < self.target_pls < 1, f"{prefix}.target_pls", self.target_pls, "in (0, 1)")


@dataclass
class FaultConfig:
    """Failure detection and recovery (see docs/fault_tolerance.md).

    Args:
        timeout_s: every collective of a step, of evaluation and of a
            checkpoint waits at most this long for a peer: a hung or
            unreachable rank becomes an error, never a hang (a dead one is
            noticed at once). Under the fault-tolerant launcher it is also
            how long a silent heartbeat takes to mean a dead rank.
        heartbeat_s: how often a worker tells the job's store it is alive
            (fault-tolerant launcher).
        warn_after_s: the training thread waiting this long is logged (what
            for, since when, which peers are silent), and again as often.
        inject: failures to act out, one string each (tests, benchmarks):
            "rank=1 step=300", "rank=2 step=1500 signal=stop",
            "rank=0 step=400 at=checkpoint", "rank=1 at=restore incarnation=1".
        event_log: append the fault events (and every step) to
            <output_dir>/fault_events.jsonl under the fault-tolerant launcher.
        mtbf_s: the expected seconds between failures, for
            ``checkpoint.auto_interval`` (0: unknown; measured from the
            failures seen).
    """

    timeout_s: float = 60.0
    heartbeat_s: float = 1.0
    warn_after_s: float = 10.0
    inject: List[str] = field(default_factory=list)
    event_log: bool = True
    mtbf_s: float = 0.0

    def validate(self, prefix: str = "fault") -> None:
        _check(self.timeout_s > 0, f"{prefix}.timeout_s", self.timeout_s, "> 0")
        _check(0 < self.heartbeat_s <= self.timeout_s / 3, f"{prefix}.heartbeat_s", self.heartbeat_s,
               f"> 0 and at most a third of fault.timeout_s={self.timeout_s}")  # fmt: skip
        _check(self.warn_after_s > 0, f"{prefix}.warn_after_s", self.warn_after_s, "> 0")
        _check(self.mtbf_s >= 0, f"{prefix}.mtbf_s", self.mtbf_s, ">= 0 (0: unknown)")
        from dist_rec.fault.inject import parse_all

        error = parse_all(self.inject)
        if error is not None:
            raise ConfigError(error.replace("Invalid failure", f"Invalid {prefix}.inject entry", 1))


SYNC_DENSE = ("ddp", "ma", "easgd", "bmuf", "none")
SYNC_MODES = ("background", "foreground")
SYNC_EMBEDDINGS = ("every_n", "background")


@dataclass
class SyncConfig:
    """How the dense layers' replicas agree (see docs/shadow_sync.md).

    Args:
        dense: "ddp" (gradients all-reduced in every backward), or a
            replica-averaging rule run on parameters: "ma" (model
            averaging), "easgd" (elastic averaging), "bmuf" (block momentum);
            "none": the replicas never agree (a benchmark's baseline).
        mode: "background" (ShadowSync: rounds in a thread of their own,
            never on the training thread) or "foreground" (every ``every``
            steps, on the training thread).
        every: foreground: the interval in steps; background: the least
            optimizer steps between two rounds' starts (BMUF's block: its
            momentum is meant per block of steps; background BMUF at 1.2
            rounds per step reached AUC 0.68 on the main job, at one round
            per 3 steps 0.814).
        interval_s: background: least pause between rounds (0: back to back).
        duty: background: the largest share of wall time spent in rounds,
            in (0, 1]: after a round of t seconds the next waits
            t * (1 - duty) / duty (the rounds' copies and sums share the
            cores with the training; 1: back to back).
        alpha: EASGD's moving rate, in (0, 1].
        block_momentum: BMUF's block momentum mu, in [0, 1).
        block_lr: BMUF's block learning rate eta, > 0.
        nesterov: BMUF's Nesterov variant.
        embeddings: 2D embedding replicas: "every_n" (averaged in the
            foreground every ``sharding.sync_every`` steps) or "background"
            (ShadowSync's rounds on the shards).
    """

    dense: str = "ddp"
    mode: str = "background"
    every: int = 1
    interval_s: float = 0.0
    duty: float = 0.25
    alpha: float = 0.25
    block_momentum: float = 0.875
    block_lr: float = 1.0
    nesterov: bool = False
    embeddings: str = "every_n"

    def validate(self, prefix: str = "sync") -> None:
        _check(self.dense in SYNC_DENSE, f"{prefix}.dense", self.dense, f"one of {list(SYNC_DENSE)}")
        _check(self.mode in SYNC_MODES, f"{prefix}.mode", self.mode, f"one of {list(SYNC_MODES)}")
        _check(self.every >= 1, f"{prefix}.every", self.every, ">= 1")
        _check(self.interval_s >= 0, f"{prefix}.interval_s", self.interval_s, ">= 0")
        _check(0 < self.duty <= 1, f"{prefix}.duty", self.duty, "in (0, 1]")
        _check(0 < self.alpha <= 1, f"{prefix}.alpha", self.alpha, "in (0, 1]")
        _check(0 <= self.block_momentum < 1, f"{prefix}.block_momentum", self.block_momentum, "in [0, 1)")
        _check(self.block_lr > 0, f"{prefix}.block_lr", self.block_lr, "> 0")
        _check(self.embeddings in SYNC_EMBEDDINGS, f"{prefix}.embeddings", self.embeddings, f"one of {list(SYNC_EMBEDDINGS)}")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: RunConfig = field(default_factory=RunConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)

    def validate(self) -> "TrainConfig":
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate(section.name)
        if self.data.source == "synthetic" and self.train.steps == 0:
            raise _invalid("train.steps", 0, ">= 1 for synthetic data (its training stream is endless)")
        if self.train.dense_engine == "deepspeed":
            self.check_deepspeed()
        return self

    def check_deepspeed(self) -> None:
        """What the DeepSpeed dense engine cannot do, refused before a run
        (the trainer asks again: a config can be edited after loading)."""
        dense = self.optimizer.dense
        if dense not in DEEPSPEED_DENSE_OPTIMIZERS:
            why = (
                " (Shampoo preconditions whole parameter blocks and distributes its own work; ZeRO would hand it flat "
                "slices: use train.dense_engine='ddp')"
                if "shampoo" in dense
                else ""
            )
            raise _invalid(
                "optimizer.dense", dense, f"one of {list(DEEPSPEED_DENSE_OPTIMIZERS)} with train.dense_engine='deepspeed'{why}"
            )
        if self.train.checkpoint_dir:
            raise _invalid(
                "train.checkpoint_dir",
                self.train.checkpoint_dir,
                "'' with train.dense_engine='deepspeed' (the ZeRO-partitioned dense optimizer state is not checkpointed; "
                "use train.dense_engine='ddp' for runs that save and resume)",
            )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        return _build(cls, values or {}, "").validate()


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise _invalid(name, value, rule)


def _build(cls, values: Dict[str, Any], prefix: str):
    """A dataclass from a nested dict, type-checking every leaf."""
    if not isinstance(values, dict):
        raise ConfigError(f"Invalid {prefix.rstrip('.') or 'config'}={values!r}. Must be a mapping of settings.")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in values if k not in known]
    if unknown:
        where = f"under {prefix.rstrip('.')!r}" if prefix else "at the top level"
        raise ConfigError(f"Unknown config key {prefix + unknown[0]!r}. Valid keys {where}: {sorted(known)}.")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        full = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, full + ".")
        else:
            kwargs[name] = _coerce(hint, value, full)
    return cls(**kwargs)


def _coerce(hint, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise _invalid(name, value, f"a list of {item.__name__}")
        return [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, name)
    if hint is bool:
        if not isinstance(value, bool):
            raise _invalid(name, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(name, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _invalid(name, value, "a number")
        if not math.isfinite(value):  # YAML reads .inf and .nan: no setting takes them
            raise _invalid(name, value, "a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _invalid(name, value, "a string")
        return value
    return value


def parse_override(text: str) -> "tuple[List[str], Any]":
    """``section.field=value`` -> (["section", "field"], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"Invalid override {text!r}. Must be section.field=value, e.g. train.steps=100.")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"Invalid override {text!r}. Must be section.field=value, e.g. train.steps=100.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"Invalid value in override {text!r}: {error}") from None
    return path, value


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of ``path`` (YAML; defaults when None) with overrides applied."""
    values: Dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"Cannot read config file {path}: {error.strerror}") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"Config file {path} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections, not {type(values).__name__}.")
    return TrainConfig.from_dict(apply_overrides(values, overrides))


def apply_overrides(values: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """``values`` (a config's nested mapping) with ``section.field=value``
    overrides set in place; returns it."""
    for override in overrides:
        keys, value = parse_override(override)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Invalid override {override!r}: {key!r} is not a section.")
        node[keys[-1]] = value
    return values
