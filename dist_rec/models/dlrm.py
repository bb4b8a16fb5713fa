"""DLRM (Naumov et al. 2019): the recommendation model we train and measure.

    dense features --DenseArch (MLP)--> d                       [B, D]
    sparse features --EmbeddingBagCollection--> e_1 .. e_F      [B, F, D]
    InteractionArch: d and all pairwise dots <v_i, v_j>, i < j, of (d, e_1 .. e_F)
    OverArch (MLP, last layer linear) --> logit                 [B, 1]

Same constructor as TorchRec's ``torchrec.models.dlrm.DLRM``, so code and
configs move across; the collection may be ours (fused optimizer) or
TorchRec's: anything returning a ``KeyedTensor`` whose features all have the
dense arch's output width.

``DLRM_DCN`` swaps the dot interaction for a low-rank cross network (DCN v2,
Wang et al. 2021), as TorchRec's model of the same name.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.modules import module as module_hooks

from dist_rec.ops.interaction import dot_interaction, dot_interaction_blocks
from dist_rec.ops.mlp import fused_mlp
from dist_rec.sparse.jagged_tensor import FeatureBlocks


def _mlp(in_features: int, layer_sizes: Sequence[int], last_activation: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, out_features in enumerate(layer_sizes):
        layers.append(nn.Linear(in_features, out_features))
        if last_activation or i + 1 < len(layer_sizes):
            layers.append(nn.ReLU())
        in_features = out_features
    return nn.Sequential(*layers)


class _MLPArch(nn.Module):
    """An MLP of ``layer_sizes`` widths; subclasses say whether the last
    layer has a ReLU and which setting names the widths (for errors).

    Runs as ``dist_rec.ops.fused_mlp`` (one autograd node, ReLUs in place;
    the same results) where that computes exactly what ``self.model``
    would, else as ``self.model``; ``fused = False`` on an instance always
    runs ``self.model`` (benchmarks/bench_mlp.py times both ways)."""

    last_activation: bool = True
    setting_name: str = "layer_sizes"
    fused: bool = True

    def __init__(self, in_features: int, layer_sizes: Sequence[int]) -> None:
        super().__init__()
        if not layer_sizes:
            raise ValueError(f"Invalid {self.setting_name}=[]. Must hold at least one layer size.")
        self.model = _mlp(in_features, layer_sizes, last_activation=self.last_activation)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        layers = self._fusable_layers(features)
        if layers is None:
            return self.model(features)
        weights, biases, relu = layers
        return fused_mlp(features, weights, biases, relu)

    def _fusable_layers(self, features: torch.Tensor) -> Optional[Tuple[List[Tensor], List[Tensor], List[bool]]]:
        """``(weights, biases, relu)`` when the fused op computes exactly what
        ``self.model`` would: an ``nn.Sequential`` of plain ``Linear`` and
        ``ReLU`` modules, none with hooks (ZeRO-3 style parameter gathers,
        user hooks) and no global ones, a float CPU input of two dims, and
        nothing that needs to see the modules: tracing (fx, jit, dynamo),
        autocast (its cast weights), functorch transforms and forward-mode AD
        (the fused node has no rules for them). Else None."""
        if (
            not self.fused
            or isinstance(features, torch.fx.Proxy)
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or features.device.type != "cpu"
            or features.dim() != 2
            or features.dtype not in (torch.float32, torch.float64)
            or torch.is_autocast_enabled("cpu")
            or torch._C._are_functorch_transforms_active()
            or forward_ad._current_level >= 0
            or type(self.model) is not nn.Sequential
            or _has_hooks(self.model)
            or _global_module_hooks()
        ):
            return None
        weights, biases, relu = [], [], []
        for module in self.model._modules.values():  # (not getattr: this runs every step)
            if _has_hooks(module):
                return None
            if type(module) is nn.Linear:
                weight, bias = module._parameters["weight"], module._parameters["bias"]
                if bias is None or weight.dtype != features.dtype:
                    return None
                weights.append(weight)
                biases.append(bias)
                relu.append(False)
            elif type(module) is nn.ReLU and relu and not relu[-1]:
                relu[-1] = True
            else:
                return None
        return weights, biases, relu


class DenseArch(_MLPArch):
    """MLP over the dense features, ReLU after every layer."""

    setting_name = "dense_arch_layer_sizes"


class InteractionArch(nn.Module):
    """Dot products of every pair among the dense vector and the F pooled
    embeddings, appended to the dense vector: ``[B, D + (F + 1) F / 2]``.

    Runs the fused ``dist_rec.ops.dot_interaction`` (one native pass per
    sample on the CPU; its plain-PyTorch reference elsewhere)."""

    def __init__(self, num_sparse_features: int) -> None:
        super().__init__()
        self.num_sparse_features = num_sparse_features

    def output_features(self, dense_dim: int) -> int:
        f = self.num_sparse_features
        return dense_dim + (f + 1) * f // 2

    reads_blocks = True  # takes FeatureBlocks as they are

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        """``dense`` [B, D], ``sparse`` [B, F, D] or [B, F * D], or
        ``FeatureBlocks`` of the F features in order."""
        if isinstance(sparse, FeatureBlocks):
            return dot_interaction_blocks(dense, sparse.values, sparse.block_widths, sparse.feature_block, sparse.feature_column)
        return dot_interaction(dense, sparse)


class OverArch(_MLPArch):
    """MLP over the interaction output; the last layer is linear (logits)."""

    last_activation = False
    setting_name = "over_arch_layer_sizes"


class DLRM(nn.Module):
    """Deep Learning Recommendation Model with dot interaction.

    Args:
        embedding_bag_collection: pooled embeddings of the sparse features
            (``dist_rec.EmbeddingBagCollection`` or TorchRec's); every feature
            must have dimension ``dense_arch_layer_sizes[-1]``.
        dense_in_features (int): number of dense features.
        dense_arch_layer_sizes (List[int]): bottom MLP widths.
        over_arch_layer_sizes (List[int]): top MLP widths; the last is the
            number of logits (1 for click prediction).

    Example::

        model = DLRM(ebc, dense_in_features=13, dense_arch_layer_sizes=[64, 16],
                     over_arch_layer_sizes=[64, 32, 1])
        logits = model(batch.dense_features, batch.sparse_features)  # [B, 1]
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        dense_arch_layer_sizes: Sequence[int],
        over_arch_layer_sizes: Sequence[int],
    ) -> None:
        super().__init__()
        configs = embedding_bag_collection.embedding_bag_configs()
        dim = dense_arch_layer_sizes[-1] if dense_arch_layer_sizes else None
        for config in configs:
            if config.embedding_dim != dim:
                raise ValueError(
                    f"Table {config.name!r} has embedding_dim={config.embedding_dim}; DLRM's dot interaction "
                    f"needs every table's dim to equal dense_arch_layer_sizes[-1]={dim}."
                )
        self.num_sparse_features = sum(len(c.feature_names) for c in configs)
        self.embedding_dim = dim
        self.feature_names = [f for c in configs for f in c.feature_names]
        self.sparse_arch = embedding_bag_collection
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes)
        self.inter_arch = InteractionArch(self.num_sparse_features)
        self.over_arch = OverArch(self.inter_arch.output_features(dim), over_arch_layer_sizes)

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        # Sparse first: a sharded collection returns while its pooled rows are
        # still travelling, and the dense arch computes in the meantime.
        lookup = self.sparse_arch(sparse_features)
        dense = self.dense_arch(dense_features)
        return self.over_arch(self.inter_arch(dense, self._pooled(lookup)))

    def _pooled(self, lookup):
        """The pooled embeddings as the interaction takes them: the sharded
        lookup's received blocks as they are when both sides allow it (no
        copy into feature order), else ``[B, F * D]`` in config order."""
        if getattr(self.inter_arch, "reads_blocks", False) and hasattr(lookup, "feature_blocks"):
            blocks = lookup.feature_blocks()
            if blocks is not None and blocks.keys == self.feature_names:
                return blocks
        return _in_order(lookup, self.feature_names)


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _global_module_hooks() -> bool:
    """Whether hooks were registered on every module (``nn.modules.module.register_module_forward_hook``...)."""
    return bool(
        module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks
    )


def _in_order(pooled, feature_names) -> torch.Tensor:
    """The pooled ``[B, F * D]`` columns in config feature order. A sharded
    TorchRec collection returns its features grouped by rank; reading its
    columns by position would silently permute the features."""
    keys = list(pooled.keys())
    if keys == feature_names:
        return pooled.values()
    columns = dict(zip(keys, torch.split(pooled.values(), list(pooled.length_per_key()), dim=1)))
    return torch.cat([columns[f] for f in feature_names], dim=1)


class LowRankCrossNet(nn.Module):
    """DCN v2 cross layers with low-rank weights:
    ``x_{l+1} = x_0 * (U_l (V_l x_l) + b_l) + x_l``, so every layer adds one
    more degree of explicit feature crossing at ``2 * in * rank`` weights."""

    def __init__(self, in_features: int, num_layers: int, low_rank: int) -> None:
        super().__init__()
        if num_layers < 1 or low_rank < 1:
            raise ValueError(f"Invalid num_layers={num_layers}, low_rank={low_rank}. Must both be >= 1.")
        self.down = nn.ModuleList(nn.Linear(in_features, low_rank, bias=False) for _ in range(num_layers))
        self.up = nn.ModuleList(nn.Linear(low_rank, in_features, bias=True) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for down, up in zip(self.down, self.up):
            x = x0 * up(down(x)) + x
        return x


class DCNInteractionArch(nn.Module):
    """The dense vector and the F pooled embeddings, concatenated and crossed
    by a ``LowRankCrossNet``: ``[B, D * (F + 1)]``."""

    def __init__(self, num_sparse_features: int, dim: int, num_layers: int, low_rank: int) -> None:
        super().__init__()
        self.in_features = dim * (num_sparse_features + 1)
        self.crossnet = LowRankCrossNet(self.in_features, num_layers, low_rank)

    def output_features(self, dense_dim: int) -> int:
        return self.in_features

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.crossnet(torch.cat([dense, sparse.flatten(1)], dim=1))


class DLRM_DCN(DLRM):
    """DLRM with a DCN v2 cross network in place of the dot interaction.

    Args:
        embedding_bag_collection, dense_in_features, dense_arch_layer_sizes,
            over_arch_layer_sizes: as ``DLRM``.
        dcn_num_layers (int): cross layers. (Default: 3)
        dcn_low_rank (int): rank of each layer's weight. (Default: 64)
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        dense_in_features: int,
        dense_arch_layer_sizes: Sequence[int],
        over_arch_layer_sizes: Sequence[int],
        dcn_num_layers: int = 3,
        dcn_low_rank: int = 64,
    ) -> None:
        super().__init__(embedding_bag_collection, dense_in_features, dense_arch_layer_sizes, over_arch_layer_sizes)
        dim = dense_arch_layer_sizes[-1]
        self.inter_arch = DCNInteractionArch(self.num_sparse_features, dim, dcn_num_layers, dcn_low_rank)
        self.over_arch = OverArch(self.inter_arch.output_features(dim), over_arch_layer_sizes)
