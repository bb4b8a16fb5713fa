"""How a delta file stores its rows: which rows, and their weights exact or
quantised (Check-N-Run).

Row ids. A delta names the rows it saves either by their global ids
(``rows``, int64: 8 bytes a row) or, when it saves more than 1/64 of its
block's rows, by a bitmap over the block (``row_bits``, one bit a row of the
block): on a small table touched all over, the ids alone would cost an
eighth of the weights of 16-wide rows.

Weights. Exact by default (``weight``: base plus deltas equal a full save
bitwise). With ``checkpoint.delta_bits`` 8 or 4 a delta stores, per row,
the change since the value a load would rebuild (the reference: the last
base plus the deltas since, kept by the saver), quantised with its own
offset and step (``weight_q``, ``weight_low``, ``weight_step``; bfloat16
offset and step, 4-bit codes packed two to a byte). The saver then moves
its reference by exactly what a load will add, so the error of a restored
row is the rounding of its last change alone (at most half a step), never
an accumulation over deltas. The row-wise optimizer state (one value a
row) stays exact.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch

from dist_rec.checkpoint.files import CheckpointError

DELTA_BITS = (32, 8, 4)


def encode_rows(rows: torch.Tensor, row_offset: int, num_rows: int) -> Dict[str, torch.Tensor]:
    """``rows`` (ascending local ids of a ``num_rows``-row block at
    ``row_offset``) as global ids or as the block's bitmap, whichever is
    smaller (a bitmap lists rows in ascending order: the weights must too)."""
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("A delta's rows must be ascending and distinct (its weights follow their order).")
    if rows.numel() * 64 <= num_rows:
        return {"rows": rows.to(torch.int64) + row_offset}
    mask = np.zeros(num_rows, dtype=bool)
    mask[rows.numpy()] = True
    return {"row_bits": torch.from_numpy(np.packbits(mask, bitorder="little"))}


def decode_rows(tensors: Dict[str, torch.Tensor], row_offset: int, num_rows: int) -> torch.Tensor:
    """The global ids of the rows a delta file saved (ascending)."""
    if "rows" in tensors:
        return tensors["rows"]
    bits = np.unpackbits(tensors["row_bits"].numpy(), count=num_rows, bitorder="little")
    return torch.from_numpy(np.flatnonzero(bits)) + row_offset


def saved_row_count(tensors: Dict[str, torch.Tensor]) -> int:
    """How many rows a delta file saved (its ids, or the bits set in its bitmap)."""
    if "rows" in tensors:
        return int(tensors["rows"].numel())
    return int(np.unpackbits(tensors["row_bits"].numpy()).sum())


def _round_toward(x: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """``x`` (float32) in ``dtype``, rounded down (or up) instead of to nearest."""
    y = x.to(dtype)
    wrong = (y.float() > x) if down else (y.float() < x)
    if bool(wrong.any()):
        target = torch.full_like(y, -float("inf") if down else float("inf"))
        y = torch.where(wrong, torch.nextafter(y, target), y)
    return y


def quantise(change: torch.Tensor, bits: int) -> Dict[str, torch.Tensor]:
    """Row-wise asymmetric ``bits``-bit codes of ``change`` [rows, cols]
    (float32). The offset is rounded down and the step up, so every value
    lies in the codes' range and is off by at most half a step."""
    levels = (1 << bits) - 1
    low = _round_toward(change.amin(dim=1) if change.shape[1] else change.new_zeros(change.shape[0]), torch.bfloat16, down=True)
    high = change.amax(dim=1) if change.shape[1] else change.new_zeros(change.shape[0])
    step = _round_toward((high - low.float()) / levels, torch.bfloat16, down=False)
    safe = torch.where(step.float() > 0, step.float(), torch.ones_like(high))
    codes = ((change - low.float()[:, None]) / safe[:, None]).round_().clamp_(0, levels).to(torch.uint8)
    if bits == 4 and codes.shape[1] > 1:
        if codes.shape[1] % 2:
            codes = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], dim=1)
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return {"weight_q": codes.contiguous(), "weight_low": low, "weight_step": step}


def dequantise(tensors: Dict[str, torch.Tensor], cols: int) -> torch.Tensor:
    """The float32 changes [rows, ``cols``] that ``quantise`` coded."""
    codes = tensors["weight_q"]
    if codes.shape[1] != cols:  # 4-bit, two codes a byte
        codes = torch.stack([codes & 15, codes >> 4], dim=2).reshape(codes.shape[0], 2 * codes.shape[1])[:, :cols]
    # Two separate operations (never a fused multiply-add): the saver and
    # every load compute the same float32 values bit for bit.
    scaled = codes.float() * tensors["weight_step"].float()[:, None]
    return scaled + tensors["weight_low"].float()[:, None]


def apply_change(current: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """``current`` rows moved by a dequantised ``change``, in ``current``'s dtype."""
    return (current.float() + change).to(current.dtype)


def encode_weights(weight: torch.Tensor, bits: int, reference: Optional[torch.Tensor], rows: torch.Tensor,
                   file: str = "") -> Dict[str, torch.Tensor]:  # fmt: skip
    """The weights of a delta's ``rows``: exact (``bits`` 32), or their
    change since ``reference`` quantised, after which ``reference[rows]``
    holds what a load of this delta rebuilds (``file``: the delta's, for errors)."""
    if bits == 32:
        return {"weight": weight}
    if reference is None:
        raise CheckpointError(f"{file or 'a delta'}: a {bits}-bit delta needs the saver's reference of its block "
                              "(the base it follows was not taken in this process); the next save will be a base.")  # fmt: skip
    previous = reference[rows]
    coded = quantise(weight.float() - previous.float(), bits)
    reference[rows] = apply_change(previous, dequantise(coded, weight.shape[1]))
    return coded


def expected_tensors(recorded: Dict, count: int, num_rows: int, num_cols: int, dtype: str) -> Dict[str, Tuple[list, str]]:
    """Names, shapes and dtypes a delta file of ``count`` rows of a
    ``num_rows`` x ``num_cols`` block holds, given the tensors its manifest
    entry records (their names say its encoding); the optimizer state is
    added by the caller."""
    expected: Dict[str, Tuple[list, str]] = {}
    if "row_bits" in recorded:
        expected["row_bits"] = ([(num_rows + 7) // 8], "uint8")
    else:
        expected["rows"] = ([count], "int64")
    if "weight_q" in recorded:
        shape = list(recorded["weight_q"]["shape"])
        packed = (num_cols + 1) // 2 if num_cols > 1 else num_cols  # 4-bit codes; 8-bit ones are num_cols wide
        width = shape[1] if len(shape) == 2 and shape[1] in (num_cols, packed) else num_cols
        expected["weight_q"] = ([count, width], "uint8")
        expected["weight_low"] = ([count], "bfloat16")
        expected["weight_step"] = ([count], "bfloat16")
    else:
        expected["weight"] = ([count, num_cols], dtype)
    return expected


def decode_weights(tensors: Dict[str, torch.Tensor], picked: torch.Tensor, saved_cols: int, cols: slice,
                   current: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The new value of columns ``cols`` of the ``picked`` rows of a delta
    file (a block ``saved_cols`` wide), given their ``current`` value (a
    quantised delta stores changes, not values)."""
    if "weight" in tensors:
        return tensors["weight"][picked][:, cols]
    coded = {k: tensors[k][picked] for k in ("weight_q", "weight_low", "weight_step")}
    return apply_change(current, dequantise(coded, saved_cols)[:, cols])
