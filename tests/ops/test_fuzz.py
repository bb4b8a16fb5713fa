"""Hypothesis fuzzing of the op boundary: whatever arrives, an op either
computes what the reference computes or raises a Python exception; it never
crashes the process or returns garbage."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dist_rec.ops  # noqa: F401
from dist_rec.ops import reference as ref

ops = torch.ops.dist_rec

CLEAN_ERRORS = (IndexError, ValueError, TypeError, RuntimeError)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


CORRUPTIONS = [
    "weight_dtype",
    "mixed_weight_dtypes",
    "feature_table",
    "pooling",
    "column",
    "negative_length",
    "random_offsets",
    "extra_index",
    "id_out_of_range",
    "negative_id",
    "float_ids",
    "offset_dtype",
    "psw_length",
    "grad_shape",
    "no_features",
]


@st.composite
def op_inputs(draw):
    """A well-formed lookup half the time; otherwise one field bent out of shape."""
    corruption = draw(st.sampled_from([None] * len(CORRUPTIONS) + CORRUPTIONS))
    num_tables = draw(st.integers(1, 3))
    rows = draw(st.lists(st.integers(1, 6), min_size=num_tables, max_size=num_tables))
    # Up to 80 wide: rows that split into several register blocks on every ISA.
    dims = draw(st.lists(st.integers(1, 80), min_size=num_tables, max_size=num_tables))
    weight_dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    if corruption == "weight_dtype":
        weight_dtype = draw(st.sampled_from([torch.float64, torch.int64, torch.int8]))
    weights = [torch.randn(r, d).to(weight_dtype) for r, d in zip(rows, dims)]
    if corruption == "mixed_weight_dtypes" and num_tables > 1:
        weights[-1] = weights[-1].to(torch.float32 if weight_dtype != torch.float32 else torch.float16)

    num_features = 0 if corruption == "no_features" else draw(st.integers(1, 4))
    feature_table = draw(st.lists(st.integers(0, num_tables - 1), min_size=num_features, max_size=num_features))
    feature_pooling = draw(st.lists(st.integers(0, 1), min_size=num_features, max_size=num_features))
    feature_column, column = [], 0
    for t in feature_table:
        feature_column.append(column)
        column += dims[t]
    out_dim = column
    if num_features:
        f = draw(st.integers(0, num_features - 1))
        if corruption == "feature_table":
            feature_table[f] = draw(st.sampled_from([-1, num_tables, 99]))
        elif corruption == "pooling":
            feature_pooling[f] = draw(st.sampled_from([-1, 2, 7]))
        elif corruption == "column":
            feature_column[f] += draw(st.sampled_from([-2, -1, 1, 3]))

    batch = draw(st.integers(0, 4))
    lengths = draw(st.lists(st.integers(0, 5), min_size=num_features * batch, max_size=num_features * batch))
    if corruption == "negative_length" and lengths:
        lengths[draw(st.integers(0, len(lengths) - 1))] = -draw(st.integers(1, 3))
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    num_indices = max(offsets[-1], 0) + (1 if corruption == "extra_index" else 0)
    ids = []
    for f in range(num_features):
        for b in range(batch):
            bag = f * batch + b
            for _ in range(max(lengths[bag], 0)):
                ids.append(draw(st.integers(0, rows[feature_table[f] if 0 <= feature_table[f] < num_tables else 0] - 1)))
    ids = (ids + [0] * num_indices)[:num_indices]
    if corruption == "id_out_of_range" and ids:
        ids[draw(st.integers(0, len(ids) - 1))] = draw(st.sampled_from([6, 7, 1000, 2**31 - 1]))
    if corruption == "negative_id" and ids:
        ids[draw(st.integers(0, len(ids) - 1))] = draw(st.sampled_from([-1, -2, -(2**31)]))
    if corruption == "random_offsets":
        offsets = draw(st.lists(st.integers(-2, num_indices + 2), min_size=0, max_size=num_features * batch + 2))
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    if corruption == "float_ids":
        index_dtype = torch.float32
    offset_dtype = index_dtype
    if corruption == "offset_dtype":
        offset_dtype = torch.int32 if index_dtype == torch.int64 else torch.int64
    psw = torch.rand(num_indices) if draw(st.booleans()) else None
    if corruption == "psw_length":
        psw = torch.rand(num_indices + 1)
    grad = torch.randn(batch + (1 if corruption == "grad_shape" else 0), out_dim)
    return dict(
        weights=weights,
        layout=(feature_table, feature_pooling, feature_column),
        indices=torch.tensor(ids, dtype=index_dtype),
        offsets=torch.tensor(offsets, dtype=offset_dtype),
        psw=psw,
        grad=grad,
        corruption=corruption,
    )


def _grad_fits(x):
    feature_table = x["layout"][0]
    batch = (len(x["offsets"]) - 1) // len(feature_table)
    out_dim = sum(x["weights"][t].shape[1] for t in feature_table)
    return tuple(x["grad"].shape) == (batch, out_dim)


def _is_valid(x):
    weights, (feature_table, feature_pooling, feature_column), indices, offsets, psw = (
        x["weights"],
        x["layout"],
        x["indices"],
        x["offsets"],
        x["psw"],
    )
    if len({w.dtype for w in weights}) != 1 or weights[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if not feature_table or indices.dtype not in (torch.int32, torch.int64) or offsets.dtype != indices.dtype:
        return False
    if any(t < 0 or t >= len(weights) for t in feature_table) or any(p not in (0, 1) for p in feature_pooling):
        return False
    spans = sorted((c, weights[t].shape[1]) for c, t in zip(feature_column, feature_table))
    column = 0
    for c, d in spans:
        if c != column:
            return False
        column += d
    if len(offsets) < 1 or (len(offsets) - 1) % len(feature_table) or int(offsets[0]) != 0:
        return False
    if bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[-1]) != len(indices):
        return False
    batch = (len(offsets) - 1) // len(feature_table)
    for f, t in enumerate(feature_table):
        bag_ids = indices[int(offsets[f * batch]) : int(offsets[(f + 1) * batch])]
        if bool(((bag_ids < 0) | (bag_ids >= weights[t].shape[0])).any()):
            return False
    if psw is not None and len(psw) != len(indices):
        return False
    return True


@FUZZ
@given(op_inputs())
def test_forward_never_crashes(x):
    try:
        out = ops.embedding_bag_forward(x["weights"], *x["layout"], x["indices"], x["offsets"], x["psw"])
    except CLEAN_ERRORS as error:
        assert not _is_valid(x), f"valid input refused: {error}"
        return
    assert _is_valid(x), "invalid input accepted"
    expected = ref.embedding_bag_forward_ref(x["weights"], *x["layout"], x["indices"], x["offsets"], x["psw"])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@FUZZ
@given(op_inputs())
def test_fused_backward_never_crashes(x):
    weights = [w.clone() for w in x["weights"]]
    momentum = [torch.zeros(w.shape[0]) for w in weights]
    try:
        ops.embedding_bag_backward_rowwise_adagrad_(
            weights, momentum, *x["layout"], x["indices"], x["offsets"], x["psw"], x["grad"], 0.1, 1e-8, 0.0, 0
        )
    except CLEAN_ERRORS:
        # Refused before anything was written: the tables are untouched.
        for w, original in zip(weights, x["weights"]):
            assert torch.equal(w, original)
        assert not (_is_valid(x) and _grad_fits(x))
        return
    assert _is_valid(x) and _grad_fits(x)


@FUZZ
@given(op_inputs())
def test_row_grad_never_crashes(x):
    try:
        ops.embedding_bag_backward_row_grad(x["weights"], *x["layout"], x["indices"], x["offsets"], x["psw"], x["grad"])
    except CLEAN_ERRORS:
        assert not (_is_valid(x) and _grad_fits(x))
        return
    assert _is_valid(x) and _grad_fits(x)
