"""The synthetic workload: deterministic, independent of how it is split,
Zipf-shaped, and with a teacher that is the best predictor."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dist_rec.data.synthetic import SyntheticConfig, SyntheticDataset
from dist_rec.metrics import auc


def _config(**kw):
    base = dict(num_embeddings_per_feature=[50, 1000, 7], num_dense_features=3, block_size=32, seed=3)
    base.update(kw)
    return SyntheticConfig(**base)


def _flatten(batches):
    """(dense, labels, per-feature list of per-sample id lists) of many batches."""
    dense, labels, bags = [], [], None
    for batch in batches:
        dense.append(batch.dense_features)
        labels.append(batch.labels)
        kjt = batch.sparse_features
        per_key = [[j.tolist() for j in kjt[k].to_dense()] for k in kjt.keys()]
        bags = per_key if bags is None else [a + b for a, b in zip(bags, per_key)]
    return torch.cat(dense), torch.cat(labels), bags


def _take(dataset, batch_size, steps, rank=0, world_size=1):
    return [b for _, b in zip(range(steps), dataset.batches(batch_size, rank, world_size))]


def test_same_seed_same_data_and_another_seed_other_data():
    first = _flatten(_take(SyntheticDataset(_config()), 40, 3))
    again = _flatten(_take(SyntheticDataset(_config()), 40, 3))
    other = _flatten(_take(SyntheticDataset(_config(seed=4)), 40, 3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]) and first[2] == again[2]
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("batch_size,world_size", [(40, 2), (13, 3), (32, 1)])
def test_ranks_split_the_single_process_stream_without_overlap(batch_size, world_size):
    steps = 4
    config = _config(mean_bag_length=2.0)
    single = _flatten(_take(SyntheticDataset(config), batch_size * world_size, steps))
    per_rank = [_take(SyntheticDataset(config), batch_size, steps, r, world_size) for r in range(world_size)]
    # Global step s = rank 0's batch s, then rank 1's, ...
    joined = _flatten([per_rank[r][s] for s in range(steps) for r in range(world_size)])
    assert torch.equal(joined[0], single[0]) and torch.equal(joined[1], single[1]) and joined[2] == single[2]


def test_eval_split_is_finite_and_differs_from_train():
    evaluation = SyntheticDataset(_config(), "eval", num_samples=100)
    sizes = [b.batch_size for b in evaluation.batches(30, drop_last=False)]
    assert sizes == [30, 30, 30, 10]
    train = next(SyntheticDataset(_config()).batches(30))
    assert not torch.equal(next(evaluation.batches(30)).dense_features, train.dense_features)
    with pytest.raises(ValueError, match="Invalid num_samples=None"):
        SyntheticDataset(_config(), "eval")


def test_ids_in_range_zipf_shaped_and_bag_lengths_as_asked():
    config = _config(num_embeddings_per_feature=[1000, 1000], zipf_exponent=1.2, mean_bag_length=3.0,
                     missing_probability=0.1, block_size=256)
    kjt = next(SyntheticDataset(config).batches(20000)).sparse_features
    lengths = kjt.lengths().double()
    # 1 + Poisson(2), with 10% of bags emptied: mean 0.9 * 3.
    assert lengths.mean().item() == pytest.approx(2.7, rel=0.03)
    assert (lengths == 0).double().mean().item() == pytest.approx(0.1, abs=0.01)
    ids = kjt["cat_0"].values()
    assert ids.min() >= 0 and ids.max() < 1000
    frequency = np.bincount(ids.numpy(), minlength=1000)
    counts = np.sort(frequency)[::-1].astype(float)
    # The log-log slope of frequency against rank is about -s in the head.
    slope = np.polyfit(np.log(np.arange(1, 51)), np.log(counts[:50]), 1)[0]
    assert slope == pytest.approx(-1.2, abs=0.15)
    # The hottest rows are scattered over the table, not ids 0, 1, 2, ...
    assert sorted(np.argsort(frequency)[::-1][:5].tolist()) != [0, 1, 2, 3, 4]


def test_uniform_ids_when_exponent_is_zero():
    config = _config(num_embeddings_per_feature=[10], zipf_exponent=0.0, block_size=512)
    counts = torch.bincount(next(SyntheticDataset(config).batches(20000)).sparse_features.values(), minlength=10)
    assert (counts.double() / counts.double().mean() - 1).abs().max() < 0.1


def test_click_rate_and_the_teacher_beats_a_noisier_predictor():
    config = _config(click_rate=0.3, block_size=256)
    evaluation = SyntheticDataset(config, "eval", num_samples=20000)
    labels = torch.cat([b.labels for b in evaluation.batches(5000, drop_last=False)])
    assert labels.mean().item() == pytest.approx(0.3, abs=0.02)
    teacher = evaluation.teacher_auc()
    assert 0.7 < teacher < 0.95
    block = evaluation.samples(0, 20000)
    assert torch.equal(torch.from_numpy(block.labels), labels)
    noisy = torch.from_numpy(block.teacher_probability) + 0.2 * torch.randn(20000, dtype=torch.float64)
    assert auc(noisy, torch.from_numpy(block.labels)) < teacher


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_embeddings_per_feature", [], "Invalid num_embeddings_per_feature=[]"),
        ("zipf_exponent", -0.5, "Invalid zipf_exponent=-0.5. Must be >= 0"),
        ("mean_bag_length", 0, "Invalid mean_bag_length=0. Must be > 0"),
        ("click_rate", 1.0, "Invalid click_rate=1.0. Must be in (0, 1)"),
    ],
)
def test_invalid_config_is_refused(field, value, message):
    with pytest.raises(ValueError) as info:
        _config(**{field: value})
    assert message in str(info.value)


@pytest.mark.parametrize("most", [1, 3])  # one-hot (one gather per bag) and multi-hot (bincount)
@pytest.mark.parametrize("seed", [0, 1])
def test_bag_means_are_the_bincount_means_bit_for_bit(most, seed):
    from dist_rec.data.synthetic import _bag_means

    rng = np.random.default_rng(seed)
    row_terms = np.concatenate([rng.standard_normal((50, 5)), np.zeros((1, 5))])
    row_terms[::7, 2] = -0.0
    lengths = rng.integers(0, most + 1, size=200)
    bag_of_value = np.repeat(np.arange(lengths.size), lengths)
    rows = rng.integers(0, 50, size=bag_of_value.size)
    signal = rng.random(bag_of_value.size)
    # The reference: what the teacher computed before, one bincount per column.
    expected = np.stack([np.bincount(bag_of_value, signal * row_terms[rows, j], lengths.size) / np.maximum(lengths, 1)
                         for j in range(5)], axis=1)  # fmt: skip
    got = _bag_means(row_terms, rows, signal, bag_of_value, lengths)
    assert got.tobytes() == expected.tobytes()
    assert _bag_means(row_terms, rows[:0], signal[:0], bag_of_value[:0], lengths[:0]).shape == (0, 5)


@pytest.mark.parametrize("mean_bag_length, missing", [(1.0, 0.02), (1.0, 0.0), (3.0, 0.1)])
def test_a_batch_of_blocks_made_at_once_has_the_bits_of_block_by_block(mean_bag_length, missing):
    from dist_rec.data.synthetic import _slice

    config = _config(block_size=16, mean_bag_length=mean_bag_length, missing_probability=missing)
    at_once, by_block = SyntheticDataset(config), SyntheticDataset(config)
    for start, stop in [(0, 64), (40, 100), (16, 32)]:
        first = start // 16
        blocks = _concat_blocks([by_block._block(b) for b in range(first, (stop - 1) // 16 + 1)])
        expected = _slice(blocks, start - first * 16, stop - first * 16)
        got = at_once.samples(start, stop)
        for field in ("dense", "lengths", "values", "sample_offsets", "labels", "teacher_probability"):
            assert getattr(got, field).tobytes() == getattr(expected, field).tobytes(), (start, stop, field)


def _concat_blocks(parts):
    """Consecutive blocks as one (the offsets of each continue the last's)."""
    from dist_rec.data.synthetic import _Block

    offsets = [parts[0].sample_offsets]
    for p in parts[1:]:
        offsets.append(p.sample_offsets[1:] + offsets[-1][-1])
    fields = ("dense", "lengths", "values", "labels", "teacher_probability")
    joined = {f: np.concatenate([getattr(p, f) for p in parts]) for f in fields}
    return _Block(sample_offsets=np.concatenate(offsets), **joined)


def _numpy_has_avx512f() -> bool:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return bool(__cpu_features__.get("AVX512F"))


# Each case's fingerprint on a CPU with AVX-512F (recorded on the earlier
# machines) and without (recorded on an AMD EPYC with AVX2, 2026-12-06, where
# the first ones failed for all but one case). On that machine numpy 2.3.5,
# 2.4.0 and 2.4.6, NPY_DISABLE_CPU_FEATURES and ATEN_CPU_CAPABILITY all gave
# the same bits; numpy has float64 exp and log loops for AVX-512F only (libm
# elsewhere), the likely cause, not confirmed on an AVX-512 CPU.
@pytest.mark.parametrize(
    "settings,fingerprints",
    [
        ({}, ("20d521f600c25452", "4c423ab4457feca6")),  # the main job's: one-hot bags, 2% missing
        ({"missing_probability": 0.0}, ("ba64ffe05df00202", "3762c967cb9312fb")),
        ({"mean_bag_length": 3.0, "missing_probability": 0.1}, ("4c67b07cf6dba3ee", "4c8861929511eccd")),  # multi-hot
        ({"zipf_exponent": 1.0, "teacher_rows_cap": 1000}, ("f69dbe1855275501", "e9a6fb6ed2684eda")),  # capped teacher tables
        ({"zipf_exponent": 0.0}, ("390e2608c7ac5e72", "942839a3af11758a")),
        # recorded from commit d165d9f (before the precomputed rank tables; it made the same bits as the first)
        ({"signal_rows": 0}, ("e68540109f7ec90f", "1298aeec4ddc8661")),
        ({"block_size": 1, "teacher_dim": 1}, ("401e2df57e62ddd9", "401e2df57e62ddd9")),
        ({"teacher_dim": 9, "missing_probability": 0.3}, ("382195efba7a148f", "35bc202fc28b61ff")),
        ({"mean_bag_length": 0.6}, ("5aa33bb8098b930e", "a1ae70ea25db7cd4")),
    ],
)
def test_the_samples_keep_their_bits(settings, fingerprints):
    """The generator is made faster from time to time; its samples must not
    change (runs, checkpoints and published figures depend on them). These
    fingerprints were recorded before the speed-ups of 2026-12-05."""
    import hashlib

    import yaml

    sizes = yaml.safe_load((Path(__file__).resolve().parents[2] / "launch/configs/default.yaml").read_text())["data"][
        "num_embeddings_per_feature"
    ]
    dataset = SyntheticDataset(SyntheticConfig(num_embeddings_per_feature=sizes, seed=0, **settings))
    digest = hashlib.sha256()
    for index in range(4):
        block = dataset._block(index)
        for array in (block.dense, block.lengths, block.values, block.labels, block.teacher_probability):
            digest.update(np.ascontiguousarray(array).tobytes())
    assert digest.hexdigest()[:16] == fingerprints[0 if _numpy_has_avx512f() else 1]


@pytest.mark.parametrize(
    "settings",
    [{}, {"missing_probability": 0.0}, {"missing_probability": 0.9}, {"mean_bag_length": 0.5},
     {"zipf_exponent": 1.0, "teacher_rows_cap": 1000}, {"zipf_exponent": 0.0}, {"signal_rows": 0},
     {"block_size": 1, "teacher_dim": 1}],
)  # fmt: skip
def test_rank_tables_give_the_bits_of_the_per_id_teacher(settings, monkeypatch):
    """Tables small enough are precomputed per (feature, rank); larger ones
    are worked id by id. Both must make the same samples, bit for bit (the
    arithmetic after the bags' terms is shared: the fingerprints above pin it)."""
    import dist_rec.data.synthetic as synthetic

    config = SyntheticConfig(num_embeddings_per_feature=[7, 1, 300, 5000, 40, 9, 2, 1000, 64, 3], seed=3, **settings)
    tabled = SyntheticDataset(config)
    assert tabled._teacher.by_rank is not None
    monkeypatch.setattr(synthetic, "_RANK_TABLES_MAX_BYTES", 0)
    per_id = SyntheticDataset(config)
    assert per_id._teacher.by_rank is None
    for start, stop in [(0, 1), (5, 700), (1000, 1256)]:
        a, b = tabled.samples(start, stop), per_id.samples(start, stop)
        for field in ("dense", "lengths", "values", "sample_offsets", "labels", "teacher_probability"):
            x, y = np.ascontiguousarray(getattr(a, field)), np.ascontiguousarray(getattr(b, field))
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), field
