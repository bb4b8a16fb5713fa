"""``DistributedShampoo``: blocked Shampoo with grafting for dense parameters.

Shampoo preconditions each block of a gradient by one Kronecker factor per
dimension, ``F_i ~ sum G G^T`` contracted over the other dimensions, applied
as ``F_i^(-1/2k)``: a full-matrix-AdaGrad-like step at the memory of k
matrices. Grafting keeps the step *size* of a simple optimizer (AdaGrad,
RMSprop, Adam, SGD) and takes only the *direction* from Shampoo, so a
learning-rate schedule tuned for that optimizer carries over. The exact
algorithm, step by step, is in ``docs/shampoo.md``; the tests compare against a
loop-simple reference written from that page.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from dist_rec.optim.shampoo.blocking import Block, param_blocks
from dist_rec.optim.shampoo.distributor import DDPShampooConfig, DirectionBucket, assign_blocks, buckets
from dist_rec.optim.shampoo.matrix_functions import inverse_root

GRAFTING_TYPES = ("adagrad", "rmsprop", "adam", "sgd", "none")
_GRAFTING_WITH_STATE = ("adagrad", "rmsprop", "adam")
_STATE_KEYS = ("factors", "roots", "graft", "first_moment", "momentum")


def _invalid(name: str, value: Any, must: str) -> ValueError:
    return ValueError(f"Invalid {name}={value!r}. Must be {must}.")


def _validate(group: Dict[str, Any]) -> None:
    lr, (beta1, beta2) = group["lr"], group["betas"]
    checks = [
        ("lr", lr, lr >= 0.0, ">= 0.0"),
        ("betas[0]", beta1, 0.0 <= beta1 < 1.0, "in [0.0, 1.0)"),
        ("betas[1]", beta2, 0.0 < beta2 <= 1.0, "in (0.0, 1.0]"),
        ("epsilon", group["epsilon"], group["epsilon"] > 0.0, "> 0.0"),
        ("momentum", group["momentum"], 0.0 <= group["momentum"] < 1.0, "in [0.0, 1.0)"),
        ("dampening", group["dampening"], 0.0 <= group["dampening"] < 1.0, "in [0.0, 1.0)"),
        ("weight_decay", group["weight_decay"], group["weight_decay"] >= 0.0, ">= 0.0"),
        ("max_preconditioner_dim", group["max_preconditioner_dim"], group["max_preconditioner_dim"] >= 1, ">= 1"),
        ("precondition_frequency", group["precondition_frequency"], group["precondition_frequency"] >= 1, ">= 1"),
        (
            "start_preconditioning_step",
            group["start_preconditioning_step"],
            group["start_preconditioning_step"] == -1 or group["start_preconditioning_step"] >= 1,
            "-1 (= precondition_frequency) or >= 1",
        ),
        ("grafting", group["grafting"], group["grafting"] in GRAFTING_TYPES, f"one of {list(GRAFTING_TYPES)}"),
        ("grafting_epsilon", group["grafting_epsilon"], group["grafting_epsilon"] > 0.0, "> 0.0"),
        ("grafting_beta2", group["grafting_beta2"], 0.0 < group["grafting_beta2"] <= 1.0, "in (0.0, 1.0]"),
    ]
    for name, value, ok, must in checks:
        if not ok:
            raise _invalid(name, value, must)
    if group["nesterov"] and group["momentum"] == 0.0:
        raise _invalid("nesterov", True, "False when momentum=0.0 (Nesterov needs momentum)")
    norm = group["max_grad_norm"]
    if norm is not None and not norm > 0.0:
        raise _invalid("max_grad_norm", norm, "None or > 0.0")
    override = group["inv_root_override"]
    roots = [override] if isinstance(override, int) else list(override)
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in roots):
        raise _invalid("inv_root_override", override, "an int >= 0 or a list of ints >= 0")


def _root_for(order: int, override: Union[int, Sequence[int]]) -> int:
    if isinstance(override, int):
        return override if override > 0 else 2 * order
    if order <= len(override) and override[order - 1] > 0:
        return override[order - 1]
    return 2 * order


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    return param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32


def _contract_all_but(g: torch.Tensor, dim: int) -> torch.Tensor:
    """``g`` contracted with itself over every dimension but ``dim``."""
    if g.dim() == 1:
        return torch.outer(g, g)
    if g.dim() == 2:
        return g @ g.T if dim == 0 else g.T @ g
    others = [d for d in range(g.dim()) if d != dim]
    return torch.tensordot(g, g, dims=(others, others))


def _precondition(d: torch.Tensor, roots: List[torch.Tensor]) -> torch.Tensor:
    """Every dimension ``i`` of ``d`` multiplied by the symmetric ``roots[i]``."""
    if d.dim() == 1:
        return roots[0] @ d
    if d.dim() == 2:
        return roots[0] @ d @ roots[1]
    for root in roots:  # contracting dim 0 moves the new dim last: k turns restore the order
        d = torch.tensordot(d, root, dims=([0], [0]))
    return d


class DistributedShampoo(torch.optim.Optimizer):
    """Shampoo with grafting, blocking and (optionally) its work spread over
    data-parallel ranks.

    Args (the published implementation's names and meanings):
        params: parameters or parameter groups.
        lr (float): learning rate. (Default: 1e-2)
        betas (Tuple[float, float]): ``beta1`` for the EMA of the gradient
            (0 turns it off), ``beta2`` for the factor statistics (1 sums
            them). (Default: (0.9, 1.0))
        epsilon (float): damping added to the factors' eigenvalues.
            (Default: 1e-12)
        momentum (float), dampening (float), nesterov (bool): heavy-ball or
            Nesterov momentum on the grafted direction. (Default: 0, 0, False)
        weight_decay (float): L2 added to the gradient, or with
            ``use_decoupled_weight_decay`` added to the direction. (Default: 0)
        use_decoupled_weight_decay (bool): (Default: True)
        max_preconditioner_dim (int): largest factor side; bigger dims are
            split into blocks. (Default: 1024)
        precondition_frequency (int): steps between root computations.
            (Default: 1)
        start_preconditioning_step (int): first step that uses Shampoo's
            direction (before it, the grafting direction alone); -1 means
            ``precondition_frequency``. (Default: -1)
        use_bias_correction (bool): bias-correct the EMAs. (Default: True)
        grafting (str): "adagrad", "rmsprop", "adam", "sgd" or "none".
            (Default: "adagrad")
        grafting_epsilon (float), grafting_beta2 (float): the grafting
            optimizer's epsilon and second-moment decay. (Default: 1e-10, 1.0)
        inv_root_override (int or list of int): the root r of ``F^(-1/r)``;
            0 gives 2 x the block's order. (Default: 0)
        max_grad_norm (Optional[float]): clip the group's gradient norm.
        distributed_config (Optional[DDPShampooConfig]): spread the blocks
            over the ranks of a data-parallel group (requires identical
            gradients on every rank, as under DDP). (Default: None)

    Example::

        opt = DistributedShampoo(model.parameters(), lr=0.01, grafting="adagrad",
                                 distributed_config=DDPShampooConfig())
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: Tuple[float, float] = (0.9, 1.0),
        epsilon: float = 1e-12,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        use_decoupled_weight_decay: bool = True,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 1,
        start_preconditioning_step: int = -1,
        use_bias_correction: bool = True,
        grafting: str = "adagrad",
        grafting_epsilon: float = 1e-10,
        grafting_beta2: float = 1.0,
        inv_root_override: Union[int, Sequence[int]] = 0,
        max_grad_norm: Optional[float] = None,
        distributed_config: Optional[DDPShampooConfig] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            epsilon=epsilon,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            use_decoupled_weight_decay=use_decoupled_weight_decay,
            max_preconditioner_dim=max_preconditioner_dim,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            use_bias_correction=use_bias_correction,
            grafting=grafting.lower() if isinstance(grafting, str) else grafting,
            grafting_epsilon=grafting_epsilon,
            grafting_beta2=grafting_beta2,
            inv_root_override=inv_root_override,
            max_grad_norm=max_grad_norm,
        )
        self._blocks: Optional[List[Block]] = None
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate(group)
        if distributed_config is not None and not isinstance(distributed_config, DDPShampooConfig):
            raise _invalid("distributed_config", distributed_config, "None or a DDPShampooConfig")
        if distributed_config is not None and not dist.is_initialized():
            raise RuntimeError("DistributedShampoo: distributed_config needs torch.distributed initialised.")
        self.distributed_config = distributed_config

        self._params: List[torch.Tensor] = [p for group in self.param_groups for p in group["params"]]
        self._group_of: List[Dict[str, Any]] = [group for group in self.param_groups for _ in group["params"]]
        for index, p in enumerate(self._params):
            if not p.is_contiguous():
                raise ValueError(f"DistributedShampoo: parameter {index} (shape {tuple(p.shape)}) is not contiguous.")
        self._blocks = [
            block
            for index, p in enumerate(self._params)
            for block in param_blocks(index, p.shape, self._group_of[index]["max_preconditioner_dim"])
        ]
        self._blocks_of: List[List[int]] = [[] for _ in self._params]
        for b, block in enumerate(self._blocks):
            self._blocks_of[block.param_index].append(b)
        group = distributed_config.process_group if distributed_config else None
        self._world = dist.get_world_size(group) if distributed_config else 1
        self._rank = dist.get_rank(group) if distributed_config else 0
        self._owners = assign_blocks(self._blocks, self._world)
        self._steps: List[int] = [0] * len(self._params)
        self._block_state: Dict[int, Dict[str, Any]] = {}

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if self._blocks is not None:
            raise RuntimeError("DistributedShampoo: pass every parameter group to the constructor (blocks are fixed then).")
        super().add_param_group(param_group)

    # -- the step -------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tasks: Dict[int, Tuple[torch.Tensor, Dict[str, Any], int]] = {}  # block -> (gradient, group, step)
        first = 0
        for group in self.param_groups:
            self._step_group(group, first, tasks)
            first += len(group["params"])
        if self.distributed_config is None:
            directions = {b: self._direction(b, *task) for b, task in tasks.items()}
            for b, direction in directions.items():
                self._apply(b, direction)
            return loss
        # Each bucket's directions travel while the next bucket's compute;
        # the updates are applied once every direction is computed.
        config = self.distributed_config
        dtype = config.communication_dtype or self._widest_dtype()
        device = self._params[0].device
        in_flight: List[DirectionBucket] = []
        for bucket in buckets(list(tasks), self._blocks, config.bucket_numel):
            exchange = DirectionBucket(
                bucket, self._owners, self._blocks, self._rank, self._world, dtype, device, config.process_group
            )
            for b in bucket:
                if self._owners[b] == self._rank:
                    exchange.put(b, self._direction(b, *tasks[b]))
            exchange.start()
            in_flight.append(exchange)
        for exchange in in_flight:
            for b, direction in exchange.finish().items():
                self._apply(b, direction)
        return loss

    def _step_group(
        self, group: Dict[str, Any], first: int, tasks: Dict[int, Tuple[torch.Tensor, Dict[str, Any], int]]
    ) -> None:
        """Adds the group's stepped blocks to ``tasks``: each with its
        parameter's (clipped, L2-decayed) gradient, the group and the step."""
        indices = [first + i for i, p in enumerate(group["params"]) if p.grad is not None]
        if not indices:
            return
        grads = {i: self._params[i].grad for i in indices}
        for i, g in grads.items():
            if g.is_sparse:
                raise RuntimeError(f"DistributedShampoo: parameter {i} has a sparse gradient; Shampoo needs dense ones.")
        if group["max_grad_norm"] is not None:
            norms = torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])
            total = torch.linalg.vector_norm(norms)
            scale = torch.clamp(group["max_grad_norm"] / total, max=1.0)
            grads = {i: g * scale.to(g.dtype) for i, g in grads.items()}
        decay = group["weight_decay"]
        if decay > 0.0 and not group["use_decoupled_weight_decay"]:
            grads = {i: g + decay * self._params[i] for i, g in grads.items()}
        for i, g in grads.items():
            self._steps[i] += 1
            for b in self._blocks_of[i]:
                tasks[b] = (g, group, self._steps[i])

    def _apply(self, b: int, direction: torch.Tensor) -> None:
        block = self._blocks[b]
        param = self._params[block.param_index]
        target = block.of(param)
        target.add_(direction.to(param.dtype), alpha=-self._group_of[block.param_index]["lr"])

    def _direction(self, b: int, grad: torch.Tensor, group: Dict[str, Any], t: int) -> torch.Tensor:
        """Block ``b``'s search direction at its step ``t`` (docs/shampoo.md,
        steps 3.1-3.8), updating its statistics on the way."""
        block = self._blocks[b]
        param = self._params[block.param_index]
        state = self._state(b)
        dtype = _state_dtype(param)
        g = block.of(grad).to(dtype).contiguous()  # one copy of a strided block, not one per matmul
        beta1, beta2 = group["betas"]
        correct = group["use_bias_correction"]
        grafting = group["grafting"]

        weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
        for i, factor in enumerate(state["factors"]):
            if beta2 != 1.0:
                factor.mul_(beta2)
            if g.dim() == 2:  # accumulate in place: no temporary
                factor.addmm_(g, g.T, alpha=weight) if i == 0 else factor.addmm_(g.T, g, alpha=weight)
            else:
                factor.add_(_contract_all_but(g, i), alpha=weight)

        if grafting in _GRAFTING_WITH_STATE:
            graft = self._buffer(state, "graft", g)
            if grafting == "adagrad":
                graft.addcmul_(g, g)
            else:
                graft.mul_(group["grafting_beta2"]).addcmul_(g, g, value=1.0 - group["grafting_beta2"])

        if beta1 > 0.0:
            moment = self._buffer(state, "first_moment", g)
            moment.mul_(beta1).add_(g, alpha=1.0 - beta1)
            d = moment / (1.0 - beta1**t) if correct else moment
        else:
            d = g

        start = group["start_preconditioning_step"]
        start = group["precondition_frequency"] if start == -1 else start
        if state["factors"] and t >= start and (t - start) % group["precondition_frequency"] == 0:
            scale = 1.0 - beta2**t if correct and beta2 < 1.0 else 1.0
            r = _root_for(block.order, group["inv_root_override"])
            for i, factor in enumerate(state["factors"]):
                root = inverse_root(factor / scale if scale != 1.0 else factor, r, group["epsilon"])
                if root is None:
                    state["root_failures"] += 1
                else:
                    state["roots"][i] = root

        if grafting in ("adagrad", "rmsprop"):
            graft_direction = d / (state["graft"].sqrt() + group["grafting_epsilon"])
        elif grafting == "adam":
            second = state["graft"] / (1.0 - group["grafting_beta2"] ** t) if correct else state["graft"]
            graft_direction = d / (second.sqrt() + group["grafting_epsilon"])
        else:
            graft_direction = d

        if t < start:
            x = graft_direction
        else:
            s = _precondition(d, state["roots"]) if state["roots"] else d
            if grafting == "none":
                x = s
            else:
                s_norm = torch.linalg.vector_norm(s)
                ratio = torch.linalg.vector_norm(graft_direction) / s_norm
                x = s * torch.where(s_norm > 0, ratio, torch.ones_like(ratio))

        decay = group["weight_decay"]
        if decay > 0.0 and group["use_decoupled_weight_decay"]:
            x = x + decay * block.of(param).to(dtype)

        momentum = group["momentum"]
        if momentum > 0.0:
            buffer = self._buffer(state, "momentum", g)
            buffer.mul_(momentum).add_(x, alpha=1.0 - group["dampening"])
            x = x + momentum * buffer if group["nesterov"] else buffer
        return x

    # -- state --------------------------------------------------------------

    def _state(self, b: int) -> Dict[str, Any]:
        state = self._block_state.get(b)
        if state is None:
            block = self._blocks[b]
            param = self._params[block.param_index]
            options = dict(dtype=_state_dtype(param), device=param.device)
            state = {
                "factors": [torch.zeros(n, n, **options) for n in block.shape],
                "roots": [torch.eye(n, **options) for n in block.shape],
                "graft": None,
                "first_moment": None,
                "momentum": None,
                "root_failures": 0,
            }
            self._block_state[b] = state
        return state

    @staticmethod
    def _buffer(state: Dict[str, Any], name: str, like: torch.Tensor) -> torch.Tensor:
        if state[name] is None:
            state[name] = torch.zeros_like(like)
        return state[name]

    def _widest_dtype(self) -> torch.dtype:
        return torch.float64 if any(p.dtype == torch.float64 for p in self._params) else torch.float32

    @property
    def blocks(self) -> List[Block]:
        """Every parameter's blocks, in parameter order."""
        return list(self._blocks)

    def owned_blocks(self) -> List[Block]:
        """The blocks whose statistics this rank keeps."""
        return [block for b, block in enumerate(self._blocks) if self._owners[b] == self._rank]

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (factors, roots, grafting,
        moments): what distributing the blocks divides."""
        total = 0
        for state in self._block_state.values():
            for key in _STATE_KEYS:
                value = state[key]
                for t in value if isinstance(value, list) else [value]:
                    if t is not None:
                        total += t.numel() * t.element_size()
        return total

    def root_failures(self) -> int:
        """Root computations that failed (in this rank's blocks) and kept the
        previous root."""
        return sum(state["root_failures"] for state in self._block_state.values())

    def state_dict(self) -> Dict[str, Any]:
        """The whole state, every block included. In distributed mode this
        is a collective: every rank must call it, and each gets the same,
        world-size-independent dict (loadable on any number of ranks)."""
        blocks = {b: _copy_state(state, torch.device("cpu") if self.distributed_config else None)
                  for b, state in self._block_state.items()}
        if self.distributed_config is not None:
            everyone: List[Optional[Dict[int, Dict]]] = [None] * self._world
            dist.all_gather_object(everyone, blocks, group=self.distributed_config.process_group)
            blocks = {b: s for theirs in everyone for b, s in theirs.items()}
        state: Dict[int, Dict[str, Any]] = {}
        for i in range(len(self._params)):
            state[i] = {"step": self._steps[i], "blocks": {}}
        for b in sorted(blocks):
            block = self._blocks[b]
            state[block.param_index]["blocks"][block.index] = blocks[b]
        groups, start = [], 0
        for group in self.param_groups:
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(saved)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores a ``state_dict()`` (from any number of ranks), keeping
        only this rank's blocks; refuses one saved for other shapes or
        blocking, naming the parameter and block."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            raise ValueError("DistributedShampoo: not a DistributedShampoo state_dict (keys 'state', 'param_groups').")
        saved_groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        if [len(g["params"]) for g in saved_groups] != sizes:
            raise ValueError(
                f"DistributedShampoo: the state_dict has parameter groups of "
                f"{[len(g['params']) for g in saved_groups]} parameters; this optimizer has {sizes}."
            )
        for group, saved in zip(self.param_groups, saved_groups):
            if saved.get("max_preconditioner_dim") != group["max_preconditioner_dim"]:
                raise ValueError(
                    f"DistributedShampoo: the state_dict was saved with max_preconditioner_dim="
                    f"{saved.get('max_preconditioner_dim')}; this optimizer uses {group['max_preconditioner_dim']} "
                    "(the blocks differ)."
                )
        restored: Dict[int, Dict[str, Any]] = {}
        steps = [0] * len(self._params)
        for i, entry in state_dict["state"].items():
            if not 0 <= int(i) < len(self._params):
                raise ValueError(f"DistributedShampoo: the state_dict holds parameter {i}; this optimizer has {len(self._params)}.")
            i = int(i)
            steps[i] = int(entry["step"])
            for j, saved in entry["blocks"].items():
                if not 0 <= int(j) < len(self._blocks_of[i]):
                    raise ValueError(
                        f"DistributedShampoo: parameter {i} (shape {tuple(self._params[i].shape)}) has "
                        f"{len(self._blocks_of[i])} blocks; the state_dict holds block {j}."
                    )
                b = self._blocks_of[i][int(j)]
                self._check_block_state(b, saved)
                if self._owners[b] == self._rank:
                    restored[b] = _copy_state(saved, self._params[i].device, _state_dtype(self._params[i]))
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value
            _validate(group)
        self._steps = steps
        self._block_state = restored

    def _check_block_state(self, b: int, saved: Dict[str, Any]) -> None:
        block = self._blocks[b]
        where = f"DistributedShampoo: parameter {block.param_index} block {block.index} (shape {block.shape})"
        if not isinstance(saved, dict) or not set(_STATE_KEYS) <= set(saved):
            raise ValueError(f"{where}: the saved block state lacks {sorted(set(_STATE_KEYS) - set(saved or {}))}.")
        for key in ("factors", "roots"):
            shapes = [tuple(t.shape) for t in saved[key]]
            if shapes != [(n, n) for n in block.shape]:
                raise ValueError(f"{where}: saved {key} are {shapes}; expected {[(n, n) for n in block.shape]}.")
        for key in ("graft", "first_moment", "momentum"):
            if saved[key] is not None and tuple(saved[key].shape) != block.shape:
                raise ValueError(f"{where}: saved {key} has shape {tuple(saved[key].shape)}; expected {block.shape}.")


def _copy_state(state: Dict[str, Any], device=None, dtype=None) -> Dict[str, Any]:
    def copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        return t.detach().to(device=device or t.device, dtype=dtype or t.dtype, copy=True)

    return {
        "factors": [copy(t) for t in state["factors"]],
        "roots": [copy(t) for t in state["roots"]],
        "graft": copy(state["graft"]),
        "first_moment": copy(state["first_moment"]),
        "momentum": copy(state["momentum"]),
        "root_failures": int(state["root_failures"]),
    }


__all__ = ["DistributedShampoo", "DDPShampooConfig", "GRAFTING_TYPES"]
