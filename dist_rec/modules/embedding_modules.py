"""``EmbeddingBagCollection``: many pooled embedding tables, one fused lookup.

A drop-in for TorchRec's unsharded ``EmbeddingBagCollection``: same table
configs, ``KeyedJaggedTensor`` in (ours or TorchRec's), ``KeyedTensor`` out,
``state_dict`` keys ``embedding_bags.<table>.weight``. Two ways to train:

* with ``optimizer=`` one of ``dist_rec.optim``'s fused optimizers, the
  backward pass updates the touched rows in place (FBGEMM TBE style); the
  tables do not require grad, so dense optimizers and DDP skip them;
* without, the tables are ordinary parameters with dense gradients, for any
  ``torch.optim`` optimizer (as TorchRec's unsharded module).

Tables live on 2 MiB huge pages (see ``dist_rec.ops.empty_hugepage``), held
by an ``InMemoryStorage`` (``dist_rec.placement``) whose tensors are the
``nn.EmbeddingBag`` weights themselves: the lookup and the fused update go
through it, as they do for the shards of a sharded collection.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from dist_rec.modules.embedding_configs import EmbeddingBagConfig, PoolingType, as_embedding_bag_config
from dist_rec.ops.embedding_bag import PoolingMode, _ops, check_finite_per_sample_weights, empty_hugepage
from dist_rec.ops.fused_lookup import fused_lookup
from dist_rec.optim.fused import FusedOptimizer, MomentumScaledRowWiseAdagrad
from dist_rec.placement import InMemoryStorage, TableSpec
from dist_rec.sparse.jagged_tensor import KeyedTensor, is_integer_dtype

_POOLING_MODE = {PoolingType.SUM: PoolingMode.SUM, PoolingType.MEAN: PoolingMode.MEAN}


class EmbeddingBagCollection(nn.Module):
    """Pooled embedding tables looked up together, optimizer optionally fused.

    Args:
        tables (List[EmbeddingBagConfig]): the tables (ours or TorchRec's
            configs). Table names and feature names must be unique; all
            tables share one data type.
        is_weighted (bool): bags carry per-id weights (the input's
            ``weights()``), as in TorchRec. (Default: False)
        device (Optional[torch.device]): "cpu" or a CUDA device (needs the
            extension built with CUDA), or "meta": no storage, for a model
            whose tables only ever exist sharded. (Default: CPU)
        optimizer (Optional[FusedOptimizer]): fused sparse optimizer applied
            in the backward pass, or None for dense gradients. (Default: None)

    Example::

        ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="t0", embedding_dim=64, num_embeddings=10_000,
                                       feature_names=["f0", "f1"])],
            optimizer=RowWiseAdagrad(lr=0.05))
        out = ebc(kjt)                 # KeyedTensor: out.values() is [B, 128]
        out.values().backward(grad)    # rows of t0 updated in place
    """

    def __init__(
        self,
        tables: Sequence[Any],
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        optimizer: Optional[FusedOptimizer] = None,
    ) -> None:
        super().__init__()
        configs = [as_embedding_bag_config(t) for t in tables]
        _check_configs(configs)
        device = torch.device(device if device is not None else "cpu")
        if device.type not in ("cpu", "cuda", "meta"):
            raise NotImplementedError(
                f"EmbeddingBagCollection on device={device!s} is not supported; use cpu, cuda, or meta "
                "(tables without storage, to be sharded by DistributedModelParallel)."
            )
        if optimizer is not None and not isinstance(optimizer, FusedOptimizer):
            raise TypeError(
                f"Invalid optimizer={optimizer!r}. Must be a dist_rec.optim fused optimizer "
                "(RowWiseAdagrad, MomentumScaledRowWiseAdagrad, SGD) or None."
            )
        self._configs = configs
        self._is_weighted = is_weighted
        self._optimizer = optimizer
        self._warned_ignored_weights = False  # weights given to an unweighted collection: warned once

        self._device = device
        self.embedding_bags = nn.ModuleDict()
        for config in configs:
            weight = self._empty((config.num_embeddings, config.embedding_dim), config.dtype)
            bag = nn.EmbeddingBag(
                config.num_embeddings,
                config.embedding_dim,
                mode="sum" if config.pooling == PoolingType.SUM else "mean",
                include_last_offset=True,
                _weight=weight,
            )
            bag.weight.requires_grad_(optimizer is None)
            self.embedding_bags[config.name] = bag
        self._storage = InMemoryStorage(
            [TableSpec(c.name, c.num_embeddings, c.embedding_dim, c.dtype) for c in configs],
            optimizer.state_names if optimizer is not None else (),
            device,
            weights=[bag.weight for bag in self.embedding_bags.values()],
        )
        self.reset_parameters()

        # Output columns follow the configs' feature order, as in TorchRec.
        self._feature_names: List[str] = []
        self._feature_dims: List[int] = []
        self._feature_slot: Dict[str, Tuple[int, int, int]] = {}  # name -> (table, pooling, column)
        column = 0
        for t, config in enumerate(configs):
            for name in config.feature_names:
                self._feature_names.append(name)
                self._feature_dims.append(config.embedding_dim)
                self._feature_slot[name] = (t, int(_POOLING_MODE[config.pooling]), column)
                column += config.embedding_dim
        self._layouts: Dict[Tuple[str, ...], Tuple[List[int], List[int], List[int]]] = {}
        # Puts fused lookups in the autograd graph though the tables do not require grad.
        self._grad_anchor = torch.empty(0, device=device, requires_grad=True)

    # -- parameters and state ------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Uniform init in [weight_init_min, weight_init_max]; fresh optimizer state."""
        for config, bag in zip(self._configs, self.embedding_bags.values()):
            bag.weight.uniform_(config.weight_init_min, config.weight_init_max)
        self._storage.reset_state_()

    def _empty(self, size, dtype: torch.dtype) -> torch.Tensor:
        """Big tables on the CPU go on huge pages; on a GPU (or meta), plain memory."""
        if self._device.type == "cpu":
            return empty_hugepage(size, dtype)
        return torch.empty(size, dtype=dtype, device=self._device)

    @property
    def device(self) -> torch.device:
        return self._device

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def optimizer(self) -> Optional[FusedOptimizer]:
        return self._optimizer

    @property
    def storage(self) -> InMemoryStorage:
        """The storage of the tables' rows and optimizer state (the door a
        sharded collection reads this one's rows through)."""
        return self._storage

    def _apply(self, fn, recurse=True):
        # ``.to()`` / ``.cuda()`` may replace the parameters: the storage then
        # holds the new tensors (the optimizer state stays where it was made).
        super()._apply(fn, recurse)
        self._storage.rebind_weights([bag.weight for bag in self.embedding_bags.values()])
        return self

    def optimizer_state(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Per table, the fused optimizer's per-row state (live tensors)."""
        if self._optimizer is None:
            return {}
        return {config.name: dict(self._storage.state(t)) for t, config in enumerate(self._configs)}

    @torch.no_grad()
    def load_optimizer_state(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Copies state saved by ``optimizer_state()`` into this collection."""
        expected = self.optimizer_state()
        if set(state) != set(expected):
            raise ValueError(f"Optimizer state has tables {sorted(state)}; this collection has {sorted(expected)}.")
        for table, names in expected.items():
            if set(state[table]) != set(names):
                raise ValueError(f"Optimizer state of table {table!r} has {sorted(state[table])}; expected {sorted(names)}.")
            for name, tensor in names.items():
                if state[table][name].shape != tensor.shape:
                    raise ValueError(
                        f"Optimizer state {table}.{name} has shape {tuple(state[table][name].shape)}; "
                        f"expected {tuple(tensor.shape)}."
                    )
                tensor.copy_(state[table][name])

    def sync(self, process_group: Optional["torch.distributed.ProcessGroup"] = None) -> None:
        """Momentum-scaled row-wise AdaGrad only: agree accumulators and
        average weights over the replicas in ``process_group`` (or fold the
        local increments in when there is none)."""
        if not isinstance(self._optimizer, MomentumScaledRowWiseAdagrad):
            raise TypeError(f"sync() needs MomentumScaledRowWiseAdagrad; this collection uses {self._optimizer!r}.")
        tables = range(len(self._configs))
        self._optimizer.sync(
            [self._storage.weight(t) for t in tables], [self._storage.state(t) for t in tables], process_group
        )

    # -- lookup --------------------------------------------------------------

    def forward(self, features) -> KeyedTensor:
        """Pools every feature of ``features`` (a KeyedJaggedTensor, ours or
        TorchRec's) into ``[B, sum of dims]`` columns, in config order.

        A bad input is refused naming the feature and table (ids out of
        range, tensors off the tables' device, non-integer lengths, NaN or inf
        weights, lengths that do not match the values); weights given to a
        collection built without ``is_weighted`` are ignored, with one warning."""
        keys = list(features.keys())
        variable_stride = getattr(features, "variable_stride_per_key", None)
        if variable_stride is not None and variable_stride():
            raise NotImplementedError(
                "A KeyedJaggedTensor with a different batch size per feature (TorchRec's variable batch) "
                "is not supported by EmbeddingBagCollection yet."
            )
        layout = self._layout(keys)
        values = features.values()
        self._check_input_tensors(keys, features, values)
        offsets = features.offsets()
        if (offsets.numel() - 1) % len(keys) != 0:
            raise ValueError(
                f"Invalid lengths count {offsets.numel() - 1} for {len(keys)} features {keys}. "
                "Must be number of features x batch size."
            )
        if offsets.dtype != values.dtype:
            offsets = offsets.to(values.dtype)
        per_sample_weights = features.weights_or_none()
        if not self._is_weighted:
            if per_sample_weights is not None and not self._warned_ignored_weights:
                self._warned_ignored_weights = True
                warn_ignored_weights("EmbeddingBagCollection", self._features_and_tables(keys))
            per_sample_weights = None
        elif per_sample_weights is None:
            raise ValueError("This EmbeddingBagCollection has is_weighted=True but the input has no weights.")
        try:
            check_finite_per_sample_weights("embedding_bag_forward", per_sample_weights, offsets, layout[0])
            if self._optimizer is None:
                weights = [bag.weight for bag in self.embedding_bags.values()]
                pooled = _ops.embedding_bag_forward(weights, *layout, values, offsets, per_sample_weights)
            else:
                apply_grad = functools.partial(self._apply_fused_update, layout, values, offsets, per_sample_weights)
                pooled = fused_lookup(self._grad_anchor, self._storage, layout, values, offsets, per_sample_weights, apply_grad)
        except (IndexError, ValueError, TypeError) as error:
            raise self._explain(error, keys, features) from None
        return KeyedTensor(self._feature_names, self._feature_dims, pooled)

    def _features_and_tables(self, keys: List[str]) -> str:
        """``features [...] (tables [...])``, for messages about a whole input tensor."""
        tables = list(dict.fromkeys(self._configs[self._feature_slot[k][0]].name for k in keys))
        return f"features {keys} (tables {tables})"

    def _check_input_tensors(self, keys: List[str], features, values: torch.Tensor) -> None:
        """Refuses ids, lengths, offsets or weights on another device than the
        tables (meta ids used to return uninitialised rows) and non-integer
        lengths, offsets or ids (float lengths used to be cast silently).
        Only dtypes and devices are read: no pass over the data."""
        device = next(iter(self.embedding_bags.values())).weight.device
        lengths = features.lengths_or_none() if hasattr(features, "lengths_or_none") else None
        given_offsets = features.offsets_or_none() if hasattr(features, "offsets_or_none") else None
        if lengths is None and given_offsets is None:
            given_offsets = features.offsets()
        weights = features.weights_or_none() if self._is_weighted else None
        given = (("values", values), ("lengths", lengths), ("offsets", given_offsets), ("weights", weights))
        for name, tensor in given:
            if tensor is not None and tensor.device != device:
                raise ValueError(
                    f"Invalid {name} device={tensor.device} for {self._features_and_tables(keys)}. "
                    f"Must be {device}, the device of the tables."
                )
        if values.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"Invalid values dtype={values.dtype} for {self._features_and_tables(keys)}. "
                "Must be torch.int32 or torch.int64."
            )
        for name, tensor in (("lengths", lengths), ("offsets", given_offsets)):
            if tensor is not None and not is_integer_dtype(tensor.dtype):
                raise TypeError(
                    f"Invalid {name} dtype={tensor.dtype} for {self._features_and_tables(keys)}. "
                    "Must be an integer dtype (torch.int32 or torch.int64)."
                )

    def _apply_fused_update(self, layout, values, offsets, per_sample_weights, grad_output: torch.Tensor) -> None:
        """The backward of a fused lookup: one optimizer step on the touched rows."""
        checked_in_update = self._storage.fused_update_refuses_non_finite(self._optimizer, grad_output)
        with refusing_non_finite_gradient(grad_output, [c.name for c in self._configs], checked_in_update):
            self._storage.fused_update(self._optimizer, layout, values, offsets, per_sample_weights, grad_output)

    def _layout(self, keys: List[str]) -> Tuple[List[int], List[int], List[int]]:
        """(table, pooling, output column) of each input key, cached per key order."""
        layout = self._layouts.get(tuple(keys))
        if layout is None:
            check_feature_keys(keys, self._feature_names, self._configs, "EmbeddingBagCollection")
            slots = [self._feature_slot[k] for k in keys]
            layout = tuple([list(x) for x in zip(*slots)])
            self._layouts[tuple(keys)] = layout
        return layout

    def _explain(self, error: Exception, keys: List[str], features) -> Exception:
        """The kernel's message with feature and table names put in."""
        if isinstance(error, ValueError) and "offsets must" in str(error):
            explained = self._explain_offsets(keys, features)
            if explained is not None:
                return explained
        message = str(error)
        message = re.sub(r"feature slot (\d+)", lambda m: f"feature {keys[int(m.group(1))]!r}", message)
        message = re.sub(r"table (\d+)", lambda m: f"table {self._configs[int(m.group(1))].name!r}", message)
        # The op's argument names, in KeyedJaggedTensor terms.
        for op_name, kjt_name in (("per_sample_weights", "weights"), ("indices", "values"), ("per index", "per value")):
            message = message.replace(op_name, kjt_name)
        return type(error)(f"EmbeddingBagCollection: {message}")

    def _explain_offsets(self, keys: List[str], features) -> Optional[ValueError]:
        """A bad length or a lengths/values mismatch, named by feature, table
        and sample (the kernel knows only offsets); None if neither."""
        lengths, offsets, stride = features.lengths(), features.offsets(), features.stride()
        if stride <= 0:
            return None
        negative = (lengths < 0).nonzero()
        if negative.numel() > 0:
            bag = int(negative[0])
            f, b = divmod(bag, stride)
            return ValueError(
                f"Invalid length {int(lengths[bag])} for feature {keys[f]!r} (table "
                f"{self._configs[self._feature_slot[keys[f]][0]].name!r}), sample {b}: "
                "lengths must be >= 0 and offsets non-decreasing."
            )
        num_values, end = features.values().numel(), int(offsets[-1])
        if int(offsets[0]) != 0 or end == num_values:
            return None
        mismatch = f"offsets must end at len(values)={num_values}; offsets[-1]={end}"
        if end > num_values:
            # The first bag that runs past the values.
            bag = int((offsets[1:] > num_values).nonzero()[0])
            f, b = divmod(bag, stride)
            return ValueError(
                f"Invalid length {int(lengths[bag])} for feature {keys[f]!r} (table "
                f"{self._configs[self._feature_slot[keys[f]][0]].name!r}), sample {b}: its bag ends at "
                f"{int(offsets[bag + 1])}, past the {num_values} values; {mismatch}."
            )
        last = keys[-1]
        return ValueError(
            f"Invalid lengths for feature {last!r} (table {self._configs[self._feature_slot[last][0]].name!r}), "
            f"the last one: the bags end at {end} but there are {num_values} values; {mismatch}."
        )


def state_dict_key(table: str) -> str:
    """The ``state_dict`` key of a table's weight, as TorchRec names it."""
    return f"embedding_bags.{table}.weight"


def check_finite_gradient(grad_output: torch.Tensor, tables) -> None:
    """Refuses to step rows with a NaN or inf gradient: it would poison them
    and their optimizer state for good (a diverging loss, a bad input).
    Checked on the CPU only: on a GPU the test would cost a synchronisation
    per step (there the loss check and the save's check catch it)."""
    if grad_output.device.type != "cpu" or grad_output.numel() == 0:
        return
    # A sum is ~30x cheaper than an element-wise test and not finite whenever an element is not (or when finite
    # elements overflow it: then the element-wise test decides).
    if not bool(torch.isfinite(grad_output.sum())) and not bool(torch.isfinite(grad_output).all()):
        raise _non_finite_gradient_error(tables)


@contextlib.contextmanager
def refusing_non_finite_gradient(grad_output: torch.Tensor, tables, checked_in_update: bool):
    """Runs an update of rows that must not see a NaN or inf gradient (see
    ``check_finite_gradient``). The CPU kernels test the gradient in the copy
    they make of it anyway and raise before they step a row: where the update
    is theirs alone (``checked_in_update``, from the storage's
    ``fused_update_refuses_non_finite``), the separate pass over it (0.4-2.8
    ms a step at the standard configs) is skipped. Their error becomes the
    same FloatingPointError on every path."""
    if not checked_in_update:
        check_finite_gradient(grad_output, tables)
    try:
        yield
    except RuntimeError as error:
        if _KERNEL_NON_FINITE not in str(error):
            raise
        raise _non_finite_gradient_error(tables, str(error).splitlines()[0]) from None


_KERNEL_NON_FINITE = "grad_output holds NaN or inf"


def _non_finite_gradient_error(tables, detail: str = "") -> FloatingPointError:
    return FloatingPointError(
        f"The gradient of the pooled embeddings of tables {list(tables)} holds NaN or inf; the rows were not "
        "updated. The loss diverged or an input is not finite: lower the learning rates or check the data."
        + (f" ({detail})" if detail else "")
    )


def warn_ignored_weights(collection: str, features_and_tables: str) -> None:
    """The once-per-collection warning for per-id weights given to a
    collection built without ``is_weighted`` (sharded or not)."""
    warnings.warn(
        f"{collection}: the input carries per-id weights for {features_and_tables}, but this collection was built "
        "with is_weighted=False: they are ignored. Build it with is_weighted=True to pool with them.",
        stacklevel=3,
    )


def check_feature_keys(keys: List[str], feature_names: List[str], configs, what: str) -> None:
    """Refuses an input whose keys are not exactly the collection's features."""
    known = set(feature_names)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(
            f"Unknown feature names {unknown} in the input. This {what} has features {feature_names} "
            f"(tables {[c.name for c in configs]})."
        )
    missing = [f for f in feature_names if f not in keys]
    if missing:
        raise ValueError(f"The input lacks features {missing}; it has keys {keys}.")


def _check_configs(configs: List[EmbeddingBagConfig]) -> None:
    if not configs:
        raise ValueError("Invalid tables=[]. Must hold at least one EmbeddingBagConfig.")
    seen_tables, seen_features = set(), {}
    for config in configs:
        if config.name in seen_tables:
            raise ValueError(f"Duplicate table name {config.name!r}.")
        seen_tables.add(config.name)
        for feature in config.feature_names:
            if feature in seen_features:
                raise ValueError(
                    f"Duplicate feature name {feature!r} in tables {seen_features[feature]!r} and {config.name!r}."
                )
            seen_features[feature] = config.name
    data_types = {config.data_type for config in configs}
    if len(data_types) > 1:
        raise NotImplementedError(
            "All tables of one EmbeddingBagCollection must share a data_type for now; got "
            + ", ".join(f"{c.name}={c.data_type.value}" for c in configs)
        )
