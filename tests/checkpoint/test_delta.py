"""A delta file's encodings (dist_rec/checkpoint/delta.py) against plain
references: row ids and bitmaps, and quantised changes within half a step."""

import pytest
import torch

from dist_rec.checkpoint.delta import (
    decode_rows,
    decode_weights,
    dequantise,
    encode_rows,
    encode_weights,
    expected_tensors,
    quantise,
    saved_row_count,
)
from dist_rec.checkpoint.files import CheckpointError


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_rows,count", [(1000, 0), (1000, 3), (1000, 16), (1000, 700), (1000, 1000), (9, 9), (1, 1)])
def test_rows_come_back_as_their_global_ids(seed, num_rows, count):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(num_rows, generator=g)[:count].sort().values
    encoded = encode_rows(rows, 500, num_rows)
    assert ("rows" in encoded) == (count * 64 <= num_rows)  # ids only while smaller than a bitmap
    assert torch.equal(decode_rows(encoded, 500, num_rows), rows + 500)
    assert saved_row_count(encoded) == count
    if count > 1:  # the weights follow the rows' order, which a bitmap cannot keep: only ascending rows
        with pytest.raises(ValueError, match="ascending"):
            encode_rows(rows.flip(0), 500, num_rows)


def _reference_quantise(change: torch.Tensor, bits: int):
    """Float64: each row's codes' range holds the row, so no value is off by more than half a step."""
    low = change.double().min(dim=1).values
    step = (change.double().max(dim=1).values - low) / ((1 << bits) - 1)
    return low, step


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cols", [1, 2, 7, 16, 64])
def test_quantised_changes_are_within_half_a_step(seed, bits, cols):
    g = torch.Generator().manual_seed(seed)
    change = torch.randn(50, cols, generator=g) * torch.logspace(-6, 2, 50).unsqueeze(1)
    change[3] = 0.25  # a row without range
    change[4] += 1e3  # an offset much larger than the range
    coded = quantise(change, bits)
    assert coded["weight_q"].dtype == torch.uint8
    assert coded["weight_q"].shape[1] == (cols if bits == 8 or cols == 1 else (cols + 1) // 2)
    back = dequantise(coded, cols)
    low, step = _reference_quantise(change, bits)
    # The stored offset and step are bfloat16 (rounded outward): half of the
    # stored step, plus float32 rounding of the values themselves.
    stored_step = coded["weight_step"].double()
    assert bool((stored_step >= step).all()) and bool((stored_step <= step * 1.01 + 1e-30 + low.abs() * 2**-7 / ((1 << bits) - 1)).all())
    bound = stored_step[:, None] / 2 + change.double().abs() * 2**-23 + 1e-30
    assert bool(((back.double() - change.double()).abs() <= bound).all())
    assert torch.equal(back[3], change[3])


def test_the_saver_s_reference_moves_by_exactly_what_a_load_adds():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(30, 12, generator=g)
    reference = base.clone()
    rows = torch.tensor([1, 4, 5, 17, 29])
    live = base[rows] + torch.randn(5, 12, generator=g) * 0.01
    coded = encode_weights(live, 4, reference, rows)
    assert set(coded) == {"weight_q", "weight_low", "weight_step"}
    # A load applies the change to the base's rows; a column block of them too.
    picked = torch.arange(5)
    loaded = decode_weights(coded, picked, 12, slice(0, 12), base[rows])
    assert torch.equal(loaded, reference[rows])
    part = decode_weights(coded, picked[1:3], 12, slice(4, 9), base[rows][1:3, 4:9])
    assert torch.equal(part, reference[rows][1:3, 4:9])
    assert torch.equal(reference[~torch.isin(torch.arange(30), rows)], base[~torch.isin(torch.arange(30), rows)])
    assert (reference[rows] - live).abs().max() < 0.01
    nothing = encode_weights(live[:0], 4, reference, rows[:0])  # a delta of no rows
    assert nothing["weight_q"].shape == (0, 6) and dequantise(nothing, 12).shape == (0, 12)
    with pytest.raises(CheckpointError, match="deltas/m/t/r0_c0.pt: a 8-bit delta needs the saver's reference"):
        encode_weights(live, 8, None, rows, "deltas/m/t/r0_c0.pt")
    assert torch.equal(encode_weights(live, 32, None, rows)["weight"], live)


def test_expected_tensors_follow_the_encoding():
    q4 = {"row_bits": {}, "weight_q": {"shape": [7, 8]}, "weight_low": {}, "weight_step": {}}
    assert expected_tensors(q4, 7, 100, 16, "float32") == {
        "row_bits": ([13], "uint8"), "weight_q": ([7, 8], "uint8"), "weight_low": ([7], "bfloat16"),
        "weight_step": ([7], "bfloat16"),
    }  # fmt: skip
    assert expected_tensors({"rows": {}, "weight": {}}, 2, 100, 16, "float16") == {
        "rows": ([2], "int64"), "weight": ([2, 16], "float16")
    }
    # A width neither 4- nor 8-bit codes have is expected at the 8-bit width (and then refused by the caller).
    assert expected_tensors({"rows": {}, "weight_q": {"shape": [2, 5]}}, 2, 100, 16, "float32")["weight_q"] == ([2, 16], "uint8")
