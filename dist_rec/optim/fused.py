"""Optimizers applied inside the embedding backward pass (FBGEMM "exact").

These are configurations, not ``torch.optim.Optimizer``s: an
``EmbeddingBagCollection`` built with one calls the matching fused kernel from
its backward, which sums each touched row's gradient over the batch and
updates the row and its state in place. No dense gradient of a table exists.

Hyper-parameters are read at every backward, so a schedule may change
``lr`` between steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from dist_rec.ops.embedding_bag import WeightDecayMode, _ops

# (feature_table, feature_pooling, feature_column) of one lookup call.
Layout = Tuple[List[int], List[int], List[int]]


def _check_hyper(name: str, value, minimum: float, strict: bool, note: str = "") -> None:
    """Refuses a hyper-parameter that is not a finite number within its range:
    ``lr=inf`` or a NaN would write non-finite values into every row it steps."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Invalid {name}={value!r}. Must be a number.") from None
    rule = f"{'>' if strict else '>='} {minimum:g}{note}"
    if not math.isfinite(number):
        raise ValueError(f"Invalid {name}={value}. Must be finite and {rule}.")
    if number < minimum or (strict and number == minimum):
        raise ValueError(f"Invalid {name}={value}. Must be {rule}.")


def _weight_decay_mode(value) -> WeightDecayMode:
    if isinstance(value, WeightDecayMode):
        return value
    names = {"none": WeightDecayMode.NONE, "l2": WeightDecayMode.L2, "decoupled": WeightDecayMode.DECOUPLED}
    if isinstance(value, str) and value.lower() in names:
        return names[value.lower()]
    raise ValueError(f"Invalid weight_decay_mode={value!r}. Must be 'none', 'l2' or 'decoupled'.")


@dataclass(kw_only=True)
class FusedOptimizer:
    """Base of the fused optimizers: validation and the state each row keeps.

    Subclasses name their per-row states in ``state_names`` (each a float32
    tensor with one value per row) and implement ``backward_``.
    """

    lr: float = 0.01
    weight_decay: float = 0.0
    weight_decay_mode: str = "none"

    state_names: ClassVar[Tuple[str, ...]] = ()
    # Declared by a class next to its ``backward_``: whether that backward,
    # on CPU tensors, raises before it steps a row when the gradient holds
    # NaN or inf (the built-in kernels test it in the copy of the gradient
    # they make anyway). See ``refuses_non_finite_gradient``.
    backward_refuses_non_finite: ClassVar[bool] = False
    # name -> (minimum, minimum excluded, note): checked at every assignment.
    _ranges: ClassVar[Dict[str, Tuple[float, bool, str]]] = {"lr": (0.0, False, ""), "weight_decay": (0.0, False, "")}

    def __setattr__(self, name: str, value) -> None:
        """Checks numeric hyper-parameters when set, in the constructor and
        afterwards: a schedule changing ``lr`` between steps is checked too
        (the kernels read the values at every backward)."""
        bounds = self._ranges.get(name)
        if bounds is not None:
            _check_hyper(name, value, *bounds)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        self._decay_mode = _weight_decay_mode(self.weight_decay_mode)

    def init_state(self, num_rows: int, allocate=torch.zeros) -> Dict[str, torch.Tensor]:
        """Fresh per-row state for a table of ``num_rows`` rows."""
        return {name: allocate(num_rows) for name in self.state_names}

    def backward_(
        self,
        weights: Sequence[torch.Tensor],
        states: Sequence[Dict[str, torch.Tensor]],
        layout: Layout,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor],
        grad_output: torch.Tensor,
    ) -> None:
        """Applies one step to every row the batch touched, in place."""
        raise NotImplementedError

    def refuses_non_finite_gradient(self) -> bool:
        """Whether the ``backward_`` this optimizer runs refuses a NaN or inf
        gradient itself (callers then need not test it first): as declared
        by the class that defines that ``backward_``, so a subclass or mixin
        with a backward of its own, or one set on the instance, is tested."""
        if "backward_" in vars(self):
            return False
        for cls in type(self).__mro__:
            if "backward_" in vars(cls):
                return bool(vars(cls).get("backward_refuses_non_finite", False))
        return False

    def _decay(self) -> Tuple[float, int]:
        return float(self.weight_decay), int(_weight_decay_mode(self.weight_decay_mode))


@dataclass(kw_only=True)
class SGD(FusedOptimizer):
    """Sparse SGD: ``w -= lr * (g + weight_decay * w)`` on touched rows."""

    backward_refuses_non_finite: ClassVar[bool] = True

    def backward_(self, weights, states, layout, indices, offsets, per_sample_weights, grad_output) -> None:
        _ops.embedding_bag_backward_sgd_(
            list(weights), *layout, indices, offsets, per_sample_weights, grad_output, float(self.lr), *self._decay()
        )


@dataclass(kw_only=True)
class RowWiseAdagrad(FusedOptimizer):
    """Exact row-wise AdaGrad, as FBGEMM's ``EXACT_ROWWISE_ADAGRAD``.

    Per touched row r, with g_r its gradient summed over the batch:
    ``m_r += mean(g_r^2)``; ``w_r -= lr * g_r / (sqrt(m_r) + eps)``. One float
    of state per row (``momentum1``). Weight decay: ``"l2"`` adds
    ``weight_decay * w`` to g (state included); ``"decoupled"`` shrinks the
    row by ``1 - lr * weight_decay``. Decay applies to every table.

    Args:
        lr (float): learning rate. (Default: 0.01)
        eps (float): added to sqrt(m). (Default: 1e-8)
        weight_decay (float): decay coefficient. (Default: 0.0)
        weight_decay_mode (str): "none", "l2" or "decoupled". (Default: "none")
    """

    eps: float = 1e-8
    state_names: ClassVar[Tuple[str, ...]] = ("momentum1",)
    backward_refuses_non_finite: ClassVar[bool] = True
    _ranges: ClassVar[Dict[str, Tuple[float, bool, str]]] = {**FusedOptimizer._ranges, "eps": (0.0, True, "")}

    # -- row blocks stepped outside the fused kernel (column-wise blocks that
    # agree a row's state first): the kernel's arithmetic, on float32 rows.

    def row_sum_of_squares(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Per row, the sum over its columns of the squared gradient (with
        L2 decay added, as the accumulator sees it): ``[U]``. Blocks of a
        row add theirs before ``step_rows``."""
        decay, mode = self._decay()
        if mode == WeightDecayMode.L2:
            grad = grad + decay * rows
        return grad.pow(2).sum(dim=1)

    def step_rows(
        self, rows: torch.Tensor, grad: torch.Tensor, state: Dict[str, torch.Tensor], mean_square: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """One step of rows ``[U, D]`` (float32) with their summed gradient,
        given their state and the row's ``mean(g^2)`` over all its columns:
        ``(new rows, new state)``."""
        accumulator = state["momentum1"] + mean_square
        return self._step(rows, grad, accumulator), {"momentum1": accumulator}

    def _step(self, rows: torch.Tensor, grad: torch.Tensor, accumulator: torch.Tensor) -> torch.Tensor:
        decay, mode = self._decay()
        multiplier = self.lr / (accumulator.sqrt() + self.eps)
        if mode == WeightDecayMode.L2:
            return rows - multiplier[:, None] * (grad + decay * rows)
        if mode == WeightDecayMode.DECOUPLED:
            return (1.0 - self.lr * decay) * rows - multiplier[:, None] * grad
        return rows - multiplier[:, None] * grad

    def backward_(self, weights, states, layout, indices, offsets, per_sample_weights, grad_output) -> None:
        _ops.embedding_bag_backward_rowwise_adagrad_(
            list(weights),
            [s["momentum1"] for s in states],
            *layout,
            indices,
            offsets,
            per_sample_weights,
            grad_output,
            float(self.lr),
            float(self.eps),
            *self._decay(),
        )


@dataclass(kw_only=True)
class MomentumScaledRowWiseAdagrad(RowWiseAdagrad):
    """Row-wise AdaGrad for replicated tables (2D sparse parallelism).

    Each replica keeps the accumulator agreed at the last sync
    (``momentum1``) and its own increment since then (``momentum1_increment``,
    d). A step uses ``w -= lr * g / (sqrt(momentum1 + s * d) + eps)`` with
    ``d += mean(g^2)``; ``sync()`` folds ``s * mean over replicas of d`` into
    ``momentum1``, zeroes d and averages the weights. Plain averaging of
    per-replica accumulators shrinks steps by up to 1/sqrt(replicas); scaling
    the local increment by s (1 <= s <= replicas) compensates. With one
    replica, s = 1 and a sync every step this is exactly ``RowWiseAdagrad``.

    Args:
        lr, eps, weight_decay, weight_decay_mode: as ``RowWiseAdagrad``.
        momentum_scale (float): s. (Default: 1.0)
    """

    momentum_scale: float = 1.0
    state_names: ClassVar[Tuple[str, ...]] = ("momentum1", "momentum1_increment")
    backward_refuses_non_finite: ClassVar[bool] = True
    _ranges: ClassVar[Dict[str, Tuple[float, bool, str]]] = {
        **RowWiseAdagrad._ranges,
        "momentum_scale": (1.0, False, " (and at most the replica count)"),
    }

    def step_rows(self, rows, grad, state, mean_square):
        """As ``RowWiseAdagrad.step_rows``: the increment grows, the agreed
        accumulator is only read."""
        increment = state["momentum1_increment"] + mean_square
        accumulator = state["momentum1"] + self.momentum_scale * increment
        return self._step(rows, grad, accumulator), {"momentum1_increment": increment}

    def backward_(self, weights, states, layout, indices, offsets, per_sample_weights, grad_output) -> None:
        _ops.embedding_bag_backward_momentum_scaled_rowwise_adagrad_(
            list(weights),
            [s["momentum1"] for s in states],
            [s["momentum1_increment"] for s in states],
            *layout,
            indices,
            offsets,
            per_sample_weights,
            grad_output,
            float(self.lr),
            float(self.eps),
            float(self.momentum_scale),
            *self._decay(),
        )

    @torch.no_grad()
    def sync(
        self,
        weights: Sequence[torch.Tensor],
        states: Sequence[Dict[str, torch.Tensor]],
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
    ) -> None:
        """Agrees the accumulators (and averages the weights) over the replicas
        in ``process_group`` (all of them: a collective), or folds this
        replica's increment in when there is no group."""
        replicas = 1
        if process_group is not None:
            import torch.distributed as dist

            replicas = dist.get_world_size(process_group)
        for weight, state in zip(weights, states):
            increment = state["momentum1_increment"]
            if replicas > 1:
                dist.all_reduce(increment, group=process_group)
                increment.div_(replicas)
                averaged = weight.to(torch.float32) if weight.dtype != torch.float32 else weight
                dist.all_reduce(averaged, group=process_group)
                averaged.div_(replicas)
                if averaged is not weight:
                    weight.copy_(averaged)
            state["momentum1"].add_(increment, alpha=self.momentum_scale)
            increment.zero_()
