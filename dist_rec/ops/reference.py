"""Loop-simple, plain-PyTorch references for every op in ``dist_rec.ops``.

They follow the op definitions line by line and trade all speed for being
obviously right; tests compare the kernels against them (often in float64).
Each takes the same arguments as its op (see
``csrc/embedding_bag/embedding_bag_ops.cpp``), plus ``dtype``: the precision
the reference computes in.

Where semantics are a choice, they follow FBGEMM's "exact" TBE optimizers:
a row's gradient is summed over the whole batch before the update, only rows
the batch touched are updated (their state too), and weight decay is
``L2`` (added to the gradient) or ``DECOUPLED`` (the row shrinks by
``1 - lr * weight_decay``). Unlike FBGEMM's CPU path, decay applies to every
table, including tables looked up by a single feature.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from dist_rec.ops.embedding_bag import PoolingMode, WeightDecayMode


def _bags(feature_table, feature_pooling, feature_column, offsets):
    """Yields (feature, sample, table, column, start, end, is_mean) per bag."""
    num_features = len(feature_table)
    batch = (len(offsets) - 1) // num_features
    for f in range(num_features):
        for b in range(batch):
            start, end = int(offsets[f * batch + b]), int(offsets[f * batch + b + 1])
            yield f, b, feature_table[f], feature_column[f], start, end, feature_pooling[f] == PoolingMode.MEAN


def _position_weight(p, start, end, is_mean, per_sample_weights, dtype):
    w = torch.tensor(1.0, dtype=dtype) if per_sample_weights is None else per_sample_weights[p].to(dtype)
    if is_mean:
        w = w * (1.0 / (end - start))
    return w


def embedding_bag_forward_ref(
    weights: Sequence[torch.Tensor],
    feature_table: Sequence[int],
    feature_pooling: Sequence[int],
    feature_column: Sequence[int],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """out[b, column_f : column_f + D] = sum over the bag of w_p * row_p
    (times 1/L for mean pooling; an empty bag gives zeros)."""
    num_features = len(feature_table)
    batch = (len(offsets) - 1) // num_features
    out_dim = sum(weights[t].shape[1] for t in feature_table)
    out = torch.zeros(batch, out_dim, dtype=dtype)
    for f, b, t, column, start, end, is_mean in _bags(feature_table, feature_pooling, feature_column, offsets):
        dim = weights[t].shape[1]
        for p in range(start, end):
            row = weights[t][int(indices[p])].to(dtype)
            out[b, column : column + dim] += _position_weight(p, start, end, is_mean, per_sample_weights, dtype) * row
    return out


def embedding_bag_backward_row_grad_ref(
    weights: Sequence[torch.Tensor],
    feature_table: Sequence[int],
    feature_pooling: Sequence[int],
    feature_column: Sequence[int],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    grad_output: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per table: sorted unique touched ids, and each one's summed gradient."""
    sums: list[dict[int, torch.Tensor]] = [{} for _ in weights]
    for f, b, t, column, start, end, is_mean in _bags(feature_table, feature_pooling, feature_column, offsets):
        dim = weights[t].shape[1]
        for p in range(start, end):
            row = int(indices[p])
            g = _position_weight(p, start, end, is_mean, per_sample_weights, dtype) * grad_output[b, column : column + dim].to(dtype)
            sums[t][row] = sums[t][row] + g if row in sums[t] else g
    row_ids, row_grads = [], []
    for t, table_sums in enumerate(sums):
        ids = sorted(table_sums)
        row_ids.append(torch.tensor(ids, dtype=torch.int64))
        dim = weights[t].shape[1]
        row_grads.append(torch.stack([table_sums[i] for i in ids]) if ids else torch.zeros(0, dim, dtype=dtype))
    return row_ids, row_grads


def embedding_bag_per_sample_weights_grad_ref(
    weights: Sequence[torch.Tensor],
    feature_table: Sequence[int],
    feature_pooling: Sequence[int],
    feature_column: Sequence[int],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    grad_output: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """d out / d per_sample_weights[p] = (1/L if mean) * <row_p, grad of p's bag>."""
    out = torch.zeros(len(indices), dtype=dtype)
    for f, b, t, column, start, end, is_mean in _bags(feature_table, feature_pooling, feature_column, offsets):
        dim = weights[t].shape[1]
        for p in range(start, end):
            row = weights[t][int(indices[p])].to(dtype)
            scale = 1.0 / (end - start) if is_mean else 1.0
            out[p] = scale * torch.dot(row, grad_output[b, column : column + dim].to(dtype))
    return out


def sgd_update_ref(weight, row_ids, row_grads, learning_rate, weight_decay=0.0, weight_decay_mode=WeightDecayMode.NONE):
    """In place on one table: w -= lr * (g + weight_decay * w) for touched rows
    (L2 and decoupled decay coincide for SGD)."""
    w = weight[row_ids].to(row_grads.dtype)
    g = row_grads
    if weight_decay_mode != WeightDecayMode.NONE:
        g = g + weight_decay * w
    weight[row_ids] = (w - learning_rate * g).to(weight.dtype)


def _adagrad_row_step(w, g, accumulator, learning_rate, eps, weight_decay, weight_decay_mode):
    """The row update of FBGEMM's exact row-wise AdaGrad given the accumulator
    value to step with (one per row)."""
    multiplier = learning_rate / (accumulator.sqrt() + eps)
    if weight_decay_mode == WeightDecayMode.L2:
        return w - multiplier[:, None] * (g + weight_decay * w)
    if weight_decay_mode == WeightDecayMode.DECOUPLED:
        return (1.0 - learning_rate * weight_decay) * w - multiplier[:, None] * g
    return w - multiplier[:, None] * g


def _mean_square(w, g, weight_decay, weight_decay_mode):
    if weight_decay_mode == WeightDecayMode.L2:
        g = g + weight_decay * w
    return g.pow(2).mean(dim=1)


def rowwise_adagrad_update_ref(
    weight, momentum1, row_ids, row_grads, learning_rate, eps, weight_decay=0.0, weight_decay_mode=WeightDecayMode.NONE
):
    """In place on one table (FBGEMM's oracle): m += mean(g^2);
    w -= lr * g / (sqrt(m) + eps), for touched rows only."""
    w = weight[row_ids].to(row_grads.dtype)
    m = momentum1[row_ids].to(row_grads.dtype) + _mean_square(w, row_grads, weight_decay, weight_decay_mode)
    momentum1[row_ids] = m.to(momentum1.dtype)
    weight[row_ids] = _adagrad_row_step(w, row_grads, m, learning_rate, eps, weight_decay, weight_decay_mode).to(weight.dtype)


def momentum_scaled_rowwise_adagrad_update_ref(
    weight,
    momentum_sync,
    momentum_local,
    row_ids,
    row_grads,
    learning_rate,
    eps,
    momentum_scale,
    weight_decay=0.0,
    weight_decay_mode=WeightDecayMode.NONE,
):
    """In place on one table (DESIGN.md): d += mean(g^2);
    w -= lr * g / (sqrt(m_sync + s * d) + eps); m_sync is only read."""
    w = weight[row_ids].to(row_grads.dtype)
    d = momentum_local[row_ids].to(row_grads.dtype) + _mean_square(w, row_grads, weight_decay, weight_decay_mode)
    momentum_local[row_ids] = d.to(momentum_local.dtype)
    accumulator = momentum_sync[row_ids].to(row_grads.dtype) + momentum_scale * d
    weight[row_ids] = _adagrad_row_step(w, row_grads, accumulator, learning_rate, eps, weight_decay, weight_decay_mode).to(
        weight.dtype
    )


def momentum_scaled_sync_ref(momentum_sync, momentum_locals, weights, momentum_scale):
    """One sync over replicas (lists, one entry per replica), in place:
    m_sync += s * mean_i(d_i); d_i = 0; w_i = mean_i(w_i)."""
    mean_increment = torch.stack(list(momentum_locals)).mean(dim=0)
    momentum_sync += momentum_scale * mean_increment
    for d in momentum_locals:
        d.zero_()
    mean_weight = torch.stack([w.to(torch.float64) for w in weights]).mean(dim=0)
    for w in weights:
        w.copy_(mean_weight.to(w.dtype))


def fused_backward_ref(
    optimizer: str,
    weights,
    states,
    layout,
    indices,
    offsets,
    per_sample_weights,
    grad_output,
    dtype: torch.dtype = torch.float64,
    **hyper,
):
    """The fused backward op's reference: row gradients, then the named
    optimizer's update on every table, in place. ``states`` holds one list
    per state tensor of the optimizer (e.g. ``[momentum1]``)."""
    row_ids, row_grads = embedding_bag_backward_row_grad_ref(
        weights, *layout, indices, offsets, per_sample_weights, grad_output, dtype=dtype
    )
    for t, weight in enumerate(weights):
        table_states = [s[t] for s in states]
        if optimizer == "sgd":
            sgd_update_ref(weight, row_ids[t], row_grads[t], **hyper)
        elif optimizer == "rowwise_adagrad":
            rowwise_adagrad_update_ref(weight, *table_states, row_ids[t], row_grads[t], **hyper)
        elif optimizer == "momentum_scaled_rowwise_adagrad":
            momentum_scaled_rowwise_adagrad_update_ref(weight, *table_states, row_ids[t], row_grads[t], **hyper)
        else:
            raise ValueError(f"Invalid {optimizer=}. Must be sgd, rowwise_adagrad or momentum_scaled_rowwise_adagrad.")
