"""Jagged batch types, shaped like TorchRec's so users can swap libraries.

``KeyedJaggedTensor`` holds several sparse features of one batch: for each
key (feature) and each sample a variable-length list of ids, stored
feature-major as one flat ``values`` tensor with ``lengths`` (or ``offsets``)
of ``len(keys) * stride`` bags. ``KeyedTensor`` is the pooled result: a dense
``[B, sum of dims]`` tensor whose columns are grouped by key;
``FeatureBlocks`` the same before a sharded lookup joins its ranks' blocks.

The embedding modules take these, and equally TorchRec's own
``torchrec.sparse.jagged_tensor.KeyedJaggedTensor`` (anything with the same
accessors), without conversion.

Shape legend: F keys, B stride (batch size), N values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """An integer dtype other than bool: what lengths, offsets and ids may be."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_integer_bags(keys: Sequence[str], lengths: Optional[torch.Tensor], offsets: Optional[torch.Tensor]) -> None:
    """Refuses float (or bool) lengths and offsets: they used to be cast to
    the ids' dtype downstream, silently truncating a fractional length into a
    different batch."""
    for name, tensor in (("lengths", lengths), ("offsets", offsets)):
        if tensor is not None and not is_integer_dtype(tensor.dtype):
            raise TypeError(
                f"Invalid {name} dtype={tensor.dtype} for features {list(keys)}. "
                "Must be an integer dtype (torch.int32 or torch.int64)."
            )


def _offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(lengths.numel() + 1, dtype=lengths.dtype, device=lengths.device)
    torch.cumsum(lengths, dim=0, out=offsets[1:])
    return offsets


class JaggedTensor:
    """One feature's jagged batch: ``values`` split into bags by ``lengths``."""

    def __init__(
        self,
        values: torch.Tensor,
        *,
        lengths: Optional[torch.Tensor] = None,
        offsets: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> None:
        if lengths is None and offsets is None:
            raise ValueError("JaggedTensor needs lengths or offsets.")
        self._values = values
        self._lengths = lengths
        self._offsets = offsets
        self._weights = weights

    def values(self) -> torch.Tensor:
        return self._values

    def lengths(self) -> torch.Tensor:
        if self._lengths is None:
            self._lengths = self._offsets[1:] - self._offsets[:-1]
        return self._lengths

    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            self._offsets = _offsets_from_lengths(self._lengths)
        return self._offsets

    def weights(self) -> torch.Tensor:
        if self._weights is None:
            raise ValueError("This JaggedTensor has no weights; use weights_or_none().")
        return self._weights

    def weights_or_none(self) -> Optional[torch.Tensor]:
        return self._weights

    def to_dense(self) -> List[torch.Tensor]:
        """The bags as a list of 1-D tensors."""
        return list(torch.split(self._values, self.lengths().tolist()))

    def __repr__(self) -> str:
        return f"JaggedTensor(values={self._values}, lengths={self.lengths()})"


class KeyedJaggedTensor:
    """Sparse features of a batch, feature-major, as in TorchRec.

    Args:
        keys (List[str]): feature names, in the order their bags are stored.
        values (Tensor): all ids, ``[N]``, int32 or int64.
        lengths (Optional[Tensor]): bag sizes, ``[F * B]``, feature-major.
        offsets (Optional[Tensor]): bag boundaries, ``[F * B + 1]``; give
            ``lengths`` or ``offsets`` (or both, consistent).
        weights (Optional[Tensor]): per-id weights ``[N]`` (weighted features).
        stride (Optional[int]): batch size B; inferred as ``len(lengths) / F``.

    All arguments after ``values`` are keyword-only: TorchRec puts ``weights``
    third and other libraries put ``lengths`` third, and a silent swap would
    train on garbage.

    Example::

        kjt = KeyedJaggedTensor(
            keys=["f0", "f1"],
            values=torch.tensor([1, 2, 3, 4, 5]),
            lengths=torch.tensor([2, 0, 1, 2]),   # f0: [1, 2], []; f1: [3], [4, 5]
        )
        kjt["f1"].to_dense()  # [tensor([3]), tensor([4, 5])]
    """

    def __init__(
        self,
        keys: Sequence[str],
        values: torch.Tensor,
        *,
        lengths: Optional[torch.Tensor] = None,
        offsets: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
        stride: Optional[int] = None,
    ) -> None:
        self._keys = list(keys)
        if len(set(self._keys)) != len(self._keys):
            raise ValueError(f"Invalid keys={self._keys}. Must be unique feature names.")
        if lengths is None and offsets is None:
            raise ValueError("KeyedJaggedTensor needs lengths or offsets.")
        check_integer_bags(self._keys, lengths, offsets)
        self._values = values
        self._lengths = lengths
        self._offsets = offsets
        self._weights = weights
        num_bags = lengths.numel() if lengths is not None else offsets.numel() - 1
        num_keys = len(self._keys)
        if stride is None:
            if num_keys == 0:
                stride = 0
            elif num_bags % num_keys != 0:
                kind = "lengths" if lengths is not None else "offsets - 1"
                raise ValueError(
                    f"Invalid {kind} count {num_bags} for {num_keys} keys {self._keys}. "
                    f"Must be len(keys) x batch size."
                )
            else:
                stride = num_bags // num_keys
        elif num_bags != num_keys * stride:
            raise ValueError(
                f"Invalid lengths count {num_bags}. Must be len(keys) x stride = {num_keys} x {stride} = {num_keys * stride}."
            )
        self._stride = stride
        self._length_per_key: Optional[List[int]] = None

    @classmethod
    def from_lengths_sync(
        cls,
        keys: Sequence[str],
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        stride: Optional[int] = None,
    ) -> "KeyedJaggedTensor":
        return cls(keys, values, lengths=lengths, weights=weights, stride=stride)

    @classmethod
    def from_offsets_sync(
        cls,
        keys: Sequence[str],
        values: torch.Tensor,
        offsets: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        stride: Optional[int] = None,
    ) -> "KeyedJaggedTensor":
        return cls(keys, values, offsets=offsets, weights=weights, stride=stride)

    @classmethod
    def from_jt_dict(cls, jt_dict: Dict[str, JaggedTensor]) -> "KeyedJaggedTensor":
        """Concatenates per-feature ``JaggedTensor``s (same batch size)."""
        keys = list(jt_dict)
        jts = [jt_dict[k] for k in keys]
        has_weights = [jt.weights_or_none() is not None for jt in jts]
        if any(has_weights) and not all(has_weights):
            raise ValueError("Either every JaggedTensor has weights or none does.")
        return cls(
            keys,
            torch.cat([jt.values() for jt in jts]),
            lengths=torch.cat([jt.lengths() for jt in jts]),
            weights=torch.cat([jt.weights() for jt in jts]) if all(has_weights) and jts else None,
        )

    def keys(self) -> List[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def weights(self) -> torch.Tensor:
        if self._weights is None:
            raise ValueError("This KeyedJaggedTensor has no weights; use weights_or_none().")
        return self._weights

    def weights_or_none(self) -> Optional[torch.Tensor]:
        return self._weights

    def lengths(self) -> torch.Tensor:
        if self._lengths is None:
            self._lengths = self._offsets[1:] - self._offsets[:-1]
        return self._lengths

    def offsets(self) -> torch.Tensor:
        if self._offsets is None:
            self._offsets = _offsets_from_lengths(self._lengths)
        return self._offsets

    def lengths_or_none(self) -> Optional[torch.Tensor]:
        """The lengths as given (or computed so far), as TorchRec has it."""
        return self._lengths

    def offsets_or_none(self) -> Optional[torch.Tensor]:
        """The offsets as given (or computed so far), as TorchRec has it."""
        return self._offsets

    def stride(self) -> int:
        return self._stride

    def length_per_key(self) -> List[int]:
        """Number of values of each key."""
        if self._length_per_key is None:
            if self._stride == 0 or not self._keys:
                self._length_per_key = [0] * len(self._keys)
            else:
                per_key = self.lengths().view(len(self._keys), self._stride).sum(dim=1)
                self._length_per_key = [int(x) for x in per_key.tolist()]
        return self._length_per_key

    def offset_per_key(self) -> List[int]:
        out = [0]
        for n in self.length_per_key():
            out.append(out[-1] + n)
        return out

    def __getitem__(self, key: str) -> JaggedTensor:
        try:
            f = self._keys.index(key)
        except ValueError:
            raise KeyError(f"Unknown feature {key!r}; this KeyedJaggedTensor has keys {self._keys}.") from None
        start, end = self.offset_per_key()[f], self.offset_per_key()[f + 1]
        bags = slice(f * self._stride, (f + 1) * self._stride)
        return JaggedTensor(
            self._values[start:end],
            lengths=self.lengths()[bags],
            weights=None if self._weights is None else self._weights[start:end],
        )

    def to_dict(self) -> Dict[str, JaggedTensor]:
        return {key: self[key] for key in self._keys}

    def to(self, device: torch.device, non_blocking: bool = False) -> "KeyedJaggedTensor":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return KeyedJaggedTensor(
            self._keys,
            move(self._values),
            lengths=move(self._lengths),
            offsets=move(self._offsets),
            weights=move(self._weights),
            stride=self._stride,
        )

    def __repr__(self) -> str:
        return f"KeyedJaggedTensor(keys={self._keys}, stride={self._stride}, values={self._values}, lengths={self.lengths()})"


class KeyedTensor:
    """Pooled embeddings of a batch: ``values()`` is ``[B, sum of dims]``,
    key ``k`` owning ``length_per_key()[k]`` consecutive columns."""

    def __init__(self, keys: Sequence[str], length_per_key: Sequence[int], values: torch.Tensor, key_dim: int = 1) -> None:
        self._keys = list(keys)
        self._length_per_key = list(length_per_key)
        self._values = values
        self._key_dim = key_dim
        self._offset_per_key: Optional[List[int]] = None

    def keys(self) -> List[str]:
        return self._keys

    def values(self) -> torch.Tensor:
        return self._values

    def key_dim(self) -> int:
        return self._key_dim

    def length_per_key(self) -> List[int]:
        return self._length_per_key

    def offset_per_key(self) -> List[int]:
        if self._offset_per_key is None:
            offsets = [0]
            for n in self._length_per_key:
                offsets.append(offsets[-1] + n)
            self._offset_per_key = offsets
        return self._offset_per_key

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            k = self._keys.index(key)
        except ValueError:
            raise KeyError(f"Unknown key {key!r}; this KeyedTensor has keys {self._keys}.") from None
        start = self.offset_per_key()[k]
        return self._values.narrow(self._key_dim, start, self._length_per_key[k])

    def to_dict(self) -> Dict[str, torch.Tensor]:
        return {key: self[key] for key in self._keys}

    def __repr__(self) -> str:
        return f"KeyedTensor(keys={self._keys}, length_per_key={self._length_per_key}, values={self._values})"


@dataclass
class FeatureBlocks:
    """Pooled embeddings left where an all-to-all delivered them, not yet
    joined into a ``KeyedTensor``'s ``[B, sum of dims]``: ``values`` holds
    row-major blocks ``[B, block_widths[r]]`` one after another (one per
    source rank), and key ``k`` is columns ``[feature_column[k],
    feature_column[k] + dim)`` of block ``feature_block[k]``. A consumer that
    reads this layout (``dist_rec.ops.dot_interaction_blocks``) skips the
    copy into key order and, in the backward, its split."""

    keys: List[str]
    values: torch.Tensor
    block_widths: List[int]
    feature_block: List[int]
    feature_column: List[int]
