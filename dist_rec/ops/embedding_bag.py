"""Python face of the pooled-embedding ops (``torch.ops.dist_rec.*``).

The kernels live in ``csrc/embedding_bag``; this module loads them and
registers, for each op, a fake (meta) kernel so the ops trace under
``torch.compile`` / ``FakeTensorMode``, and autograd for the functional
forward. The fused backward ops update weights and optimizer state in place
and are called from an autograd ``Function`` (see ``fused_lookup.py``).

Argument conventions are documented with the schemas in
``csrc/embedding_bag/embedding_bag_ops.cpp``: ``weights`` is a list of
``[rows_t, dim_t]`` tables; ``feature_table``, ``feature_pooling`` and
``feature_column`` describe each feature slot of the (feature-major) jagged
input; ``indices``/``offsets`` are the jagged ids.

Shape legend: B batch, F feature slots, N indices, U unique rows, D dim.
"""

from __future__ import annotations

import enum
from typing import Optional, Sequence

import torch

import dist_rec._C  # noqa: F401  (registers torch.ops.dist_rec.*)

_ops = torch.ops.dist_rec


class PoolingMode(enum.IntEnum):
    SUM = 0
    MEAN = 1


class WeightDecayMode(enum.IntEnum):
    """How weight decay enters a row update (FBGEMM's semantics).

    ``L2`` adds ``weight_decay * w`` to the gradient (and so to the row-wise
    AdaGrad accumulator); ``DECOUPLED`` shrinks the row by
    ``1 - lr * weight_decay`` separately from the gradient step.
    """

    NONE = 0
    L2 = 1
    DECOUPLED = 2


# ---------------------------------------------------------------------------
# Fake kernels: output shapes without computing anything
# ---------------------------------------------------------------------------


def _pooled_dim(weights: Sequence[torch.Tensor], feature_table: Sequence[int]) -> int:
    return sum(weights[t].shape[1] for t in feature_table)


def _check_devices(op: str, weights: Sequence[torch.Tensor], **tensors) -> None:
    """Refuses arguments on another device than the tables, in the fake
    kernels. A meta argument sends the whole call to them (Meta outranks CPU
    in dispatch), so without this CPU tables looked up with meta ids returned
    an uninitialised output instead of the kernels' device error."""
    if not weights:
        return
    device = weights[0].device
    for name, value in tensors.items():
        many = isinstance(value, (list, tuple))
        for label, tensor in [(f"{name}[{i}]", v) for i, v in enumerate(value)] if many else [(name, value)]:
            if isinstance(tensor, torch.Tensor) and tensor.device != device:
                raise ValueError(f"{op}: {label} must be on {device} like the weights; it is on {tensor.device}")


@torch.library.register_fake("dist_rec::embedding_bag_forward")
def _forward_fake(weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights):
    _check_devices(
        "embedding_bag_forward", weights, indices=indices, offsets=offsets, per_sample_weights=per_sample_weights
    )
    num_features = len(feature_table)
    torch._check(num_features > 0, lambda: "feature_table must name at least one feature slot")
    batch = (offsets.shape[0] - 1) // num_features
    return weights[0].new_empty((batch, _pooled_dim(weights, feature_table)), dtype=torch.float32)


def _mutating_fake(name: str):
    """The fused updates' fake kernel: nothing to return, devices checked."""
    arg_names = [a.name for a in getattr(_ops, name).default._schema.arguments]

    def fake(*args, **kwargs):
        bound = {**dict(zip(arg_names, args)), **kwargs}
        weights = bound.pop("weights")
        _check_devices(name, weights, **{k: v for k, v in bound.items() if isinstance(v, (torch.Tensor, list, tuple))})
        return None

    return fake


for _name in (
    "embedding_bag_backward_sgd_",
    "embedding_bag_backward_rowwise_adagrad_",
    "embedding_bag_backward_momentum_scaled_rowwise_adagrad_",
):
    torch.library.register_fake(f"dist_rec::{_name}")(_mutating_fake(_name))


@torch.library.register_fake("dist_rec::embedding_bag_backward_row_grad")
def _row_grad_fake(weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights, grad_output):
    _check_devices(
        "embedding_bag_backward_row_grad", weights,
        indices=indices, offsets=offsets, per_sample_weights=per_sample_weights, grad_output=grad_output,
    )  # fmt: skip
    ctx = torch.library.get_ctx()
    row_ids, row_grads = [], []
    for w in weights:
        unique = ctx.new_dynamic_size()
        row_ids.append(indices.new_empty((unique,), dtype=torch.int64))
        row_grads.append(grad_output.new_empty((unique, w.shape[1])))
    return row_ids, row_grads


@torch.library.register_fake("dist_rec::embedding_bag_per_sample_weights_grad")
def _psw_grad_fake(weights, feature_table, feature_pooling, feature_column, indices, offsets, grad_output):
    _check_devices(
        "embedding_bag_per_sample_weights_grad", weights, indices=indices, offsets=offsets, grad_output=grad_output
    )
    return grad_output.new_empty((indices.shape[0],))


# ---------------------------------------------------------------------------
# Autograd of the functional forward (unfused: dense gradients per table)
# ---------------------------------------------------------------------------


def _forward_setup_context(ctx, inputs, output):
    weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights = inputs
    ctx.layout = (list(feature_table), list(feature_pooling), list(feature_column))
    ctx.num_tables = len(weights)
    saved = [*weights, indices, offsets]
    ctx.has_psw = per_sample_weights is not None
    if ctx.has_psw:
        saved.append(per_sample_weights)
    ctx.save_for_backward(*saved)


def _forward_backward(ctx, grad_output):
    saved = ctx.saved_tensors
    weights = list(saved[: ctx.num_tables])
    indices, offsets = saved[ctx.num_tables], saved[ctx.num_tables + 1]
    per_sample_weights = saved[ctx.num_tables + 2] if ctx.has_psw else None
    grad_output = grad_output.contiguous()
    weight_grads = None
    if ctx.needs_input_grad[0]:
        row_ids, row_grads = _ops.embedding_bag_backward_row_grad(
            weights, *ctx.layout, indices, offsets, per_sample_weights, grad_output
        )
        weight_grads = [
            torch.zeros_like(w).index_put_((ids,), g.to(w.dtype))
            for w, ids, g in zip(weights, row_ids, row_grads)
        ]
    psw_grad = None
    if ctx.has_psw and ctx.needs_input_grad[6]:
        psw_grad = _ops.embedding_bag_per_sample_weights_grad(weights, *ctx.layout, indices, offsets, grad_output)
    return weight_grads, None, None, None, None, None, psw_grad


torch.library.register_autograd(
    "dist_rec::embedding_bag_forward", _forward_backward, setup_context=_forward_setup_context
)


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def embedding_bag_forward(
    weights: Sequence[torch.Tensor],
    feature_table: Sequence[int],
    feature_pooling: Sequence[int],
    feature_column: Sequence[int],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pooled lookup of every feature slot in one call: ``[B, sum of dims]``.

    Differentiable with respect to ``weights`` (dense per-table gradients, as
    ``nn.EmbeddingBag`` gives) and ``per_sample_weights``. Training with a
    fused optimizer goes through ``fused_lookup`` instead. NaN or inf
    ``per_sample_weights`` are refused (see ``check_finite_per_sample_weights``).
    """
    _check_devices(
        "embedding_bag_forward", weights, indices=indices, offsets=offsets, per_sample_weights=per_sample_weights
    )
    check_finite_per_sample_weights("embedding_bag_forward", per_sample_weights, offsets, feature_table)
    return _ops.embedding_bag_forward(
        list(weights), list(feature_table), list(feature_pooling), list(feature_column), indices, offsets, per_sample_weights
    )


def check_finite_per_sample_weights(
    op: str, per_sample_weights: Optional[torch.Tensor], offsets: torch.Tensor, feature_table: Sequence[int]
) -> None:
    """Refuses NaN or inf per-id weights, naming the first one's position,
    feature slot, sample and table as the id range errors do: the kernels
    would pool them silently, and a fused backward would write them into the
    rows and their optimizer state for good.

    One sum over the weights (not finite whenever an element is not); the
    element-wise test and the search run only when the sum is not finite.
    """
    if per_sample_weights is None or per_sample_weights.numel() == 0 or per_sample_weights.device.type == "meta":
        return
    if bool(torch.isfinite(per_sample_weights.sum())):
        return
    bad = ~torch.isfinite(per_sample_weights)
    if not bool(bad.any()):
        return  # finite weights whose sum overflowed
    position = int(bad.nonzero()[0])
    value = float(per_sample_weights[position])
    num_bags = max(offsets.numel() - 1, 1)
    target = torch.tensor([position], dtype=offsets.dtype, device=offsets.device)
    bag = min(max(int(torch.searchsorted(offsets, target, right=True)) - 1, 0), num_bags - 1)
    batch = max(num_bags // max(len(feature_table), 1), 1)
    feature = min(bag // batch, len(feature_table) - 1)
    raise ValueError(
        f"{op}: Invalid per-id weight {value} at indices[{position}] (feature slot {feature}, sample "
        f"{bag - feature * batch}) for table {feature_table[feature]}; per_sample_weights must be finite "
        "(a NaN or inf would poison the rows it touches and their optimizer state)"
    )


def embedding_bag_backward_row_grad(
    weights: Sequence[torch.Tensor],
    feature_table: Sequence[int],
    feature_pooling: Sequence[int],
    feature_column: Sequence[int],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    grad_output: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per table: the sorted unique row ids a batch touched, and each row's
    gradient summed over the batch ``[U_t, D_t]`` (float32)."""
    return _ops.embedding_bag_backward_row_grad(
        list(weights),
        list(feature_table),
        list(feature_pooling),
        list(feature_column),
        indices,
        offsets,
        per_sample_weights,
        grad_output.contiguous(),
    )


def empty_hugepage(size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor on 2 MiB transparent huge pages (see
    ``csrc/memory/hugepage_alloc.cpp``); a plain ``torch.empty`` below 2 MiB."""
    return _ops.empty_hugepage(list(size), dtype)


def supported_cpu_isas() -> list[str]:
    """The inner-loop builds this CPU can run, best first."""
    return list(_ops._supported_cpu_isas())


def set_cpu_isa(isa: str) -> str:
    """Force an inner-loop build (``""`` restores the best); returns the old one.
    Process-wide: meant for tests and benchmarks."""
    return _ops._set_cpu_isa(isa)


def set_index_checks(enabled: bool) -> bool:
    """Turn the forward's id range check off or on; returns the old setting.

    Only for measuring what the check costs: with it off, an out-of-range id
    reads arbitrary memory.
    """
    return _ops._set_index_checks(enabled)
