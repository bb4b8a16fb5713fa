"""Row access statistics against a plain reference (np.bincount over all
ids of the sampled batches), on small random data with repeated ids, empty
bags and a table read by two features; save/load round trips; the CLI."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_rec.data.batch import Batch
from dist_rec.modules.embedding_configs import EmbeddingBagConfig
from dist_rec.planner.access_stats import AccessStats, TableAccessStats, collect_access_stats, main
from dist_rec.sparse.jagged_tensor import KeyedJaggedTensor

# Table "a" is read by features fa and fb, table "b" by fc.
TABLES = [
    EmbeddingBagConfig(num_embeddings=50, embedding_dim=4, name="a", feature_names=["fa", "fb"]),
    EmbeddingBagConfig(num_embeddings=7, embedding_dim=4, name="b", feature_names=["fc"]),
]
ROWS = {"fa": 50, "fb": 50, "fc": 7}
TINY_CONFIG = Path(__file__).resolve().parents[2] / "launch" / "configs" / "tiny.yaml"


class RandomBags:
    """Batches of random bags (lengths 0..3, so empty bags and repeated
    ids are common), skewed ids; ``batches`` as a dataset's."""

    def __init__(self, num_batches=6, seed=0):
        rng = np.random.default_rng(seed)
        self.batches_data = []
        for _ in range(num_batches):
            b = int(rng.integers(3, 9))
            lengths = {f: rng.integers(0, 4, size=b) for f in ROWS}
            values = {f: (rng.zipf(1.5, size=int(lengths[f].sum())) - 1) % ROWS[f] for f in ROWS}
            self.batches_data.append((b, lengths, values))

    def batches(self, batch_size, rank=0, world_size=1, drop_last=True):
        assert (rank, world_size, drop_last) == (0, 1, True)
        for b, lengths, values in self.batches_data:
            kjt = KeyedJaggedTensor(
                list(ROWS),
                torch.from_numpy(np.concatenate([values[f] for f in ROWS]).astype(np.int64)),
                lengths=torch.from_numpy(np.concatenate([lengths[f] for f in ROWS]).astype(np.int64)),
                stride=b,
            )
            yield Batch(torch.zeros(b, 1), kjt, torch.zeros(b))


def reference(data, num_batches):
    """Per table: counts by np.bincount over all ids, bags, non-empty bags, samples."""
    used = data.batches_data[:num_batches]
    out = {}
    for t in TABLES:
        ids = np.concatenate([values[f] for _, _, values in used for f in t.feature_names])
        lengths = np.concatenate([lengths[f] for _, lengths, _ in used for f in t.feature_names])
        out[t.name] = dict(
            counts=np.bincount(ids, minlength=t.num_embeddings),
            bags=lengths.size,
            nonempty=int((lengths > 0).sum()),
            samples=sum(b for b, _, _ in used),
        )
    return out


@pytest.mark.parametrize("num_batches", [1, 4, 100])  # 100: more than the data has
def test_counts_and_summaries_match_a_plain_reference(num_batches):
    data = RandomBags()
    stats = collect_access_stats(data, TABLES, num_batches=num_batches, batch_size=8)
    ref = reference(data, num_batches)
    assert stats.num_batches == min(num_batches, 6)
    for t in TABLES:
        s, r = stats[t.name], ref[t.name]
        assert s.counts.dtype == np.int64
        np.testing.assert_array_equal(s.counts, r["counts"])
        assert s.num_samples == r["samples"]
        assert s.num_bags == r["bags"] == r["samples"] * len(t.feature_names)
        assert s.pooling_factor == pytest.approx(r["counts"].sum() / r["bags"])
        assert s.coverage == pytest.approx(r["nonempty"] / r["bags"])
        assert s.untouched_fraction == pytest.approx(np.mean(r["counts"] == 0))
        assert s.accesses_per_sample == pytest.approx(r["counts"].sum() / r["samples"])
        # CDF over rows sorted hottest first
        hottest = np.sort(r["counts"])[::-1]
        expected = np.concatenate([[0.0], np.cumsum(hottest) / hottest.sum()])
        np.testing.assert_allclose(s.cdf(), expected)
        assert s.cdf()[s.used_rows] == 1.0


def test_cdf_at_and_hot_order():
    s = TableAccessStats("t", np.array([0, 5, 2, 5, 0, 8, 0, 0, 0, 0]), num_samples=4, num_bags=4, nonempty_bags=4)
    # hottest first, ties by id (rows 1 and 3 both read 5 times), never-read rows last by id
    np.testing.assert_array_equal(s.hot_order(), [5, 1, 3, 2, 0, 4, 6, 7, 8, 9])
    np.testing.assert_array_equal(s.remap()[s.hot_order()], np.arange(10))
    assert s.cdf_at(0.0) == 0.0
    assert s.cdf_at(0.1) == pytest.approx(8 / 20)
    assert s.cdf_at(0.3) == pytest.approx(18 / 20)
    assert s.cdf_at(0.4) == 1.0 == s.cdf_at(1.0)  # 4 rows used: the rest need no fast memory
    np.testing.assert_allclose(s.cdf_at(np.array([0.1, 0.2])), [0.4, 0.65])
    with pytest.raises(ValueError, match=re.escape("Invalid fraction=1.5 for table 't'. Must be in [0, 1].")):
        s.cdf_at(1.5)


def test_a_table_never_read_loses_nothing():
    s = TableAccessStats("cold", np.zeros(5, dtype=np.int64), num_samples=3, num_bags=3, nonempty_bags=0)
    assert s.cdf_at(0.0) == 1.0 and s.untouched_fraction == 1.0 and s.pooling_factor == 0.0


def test_save_load_round_trip(tmp_path):
    stats = collect_access_stats(RandomBags(), TABLES, num_batches=5, batch_size=8)
    stats.save(tmp_path / "stats")
    back = AccessStats.load(tmp_path / "stats")
    assert (back.batch_size, back.num_batches, list(back)) == (8, 5, ["a", "b"])
    for name in stats:
        np.testing.assert_array_equal(back[name].counts, stats[name].counts)
        assert back[name].summary() == stats[name].summary()
    summary = json.loads((tmp_path / "stats" / "summary.json").read_text())
    assert summary["tables"][0]["feature_names"] == ["fa", "fb"]
    assert "Access statistics of 2 tables over 5 batches (40 samples)" in str(back)


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match=re.escape("no access statistics (summary.json is missing)")):
        AccessStats.load(tmp_path)


def test_errors_name_the_table_and_feature():
    short = [EmbeddingBagConfig(num_embeddings=3, embedding_dim=4, name="a", feature_names=["fa"])]
    with pytest.raises(ValueError, match=r"Feature 'fa' of table 'a' has id \d+, outside the table's 3 rows."):
        collect_access_stats(RandomBags(), short, num_batches=6, batch_size=8)
    missing = [EmbeddingBagConfig(num_embeddings=3, embedding_dim=4, name="z", feature_names=["nope"])]
    with pytest.raises(ValueError, match=re.escape("Table 'z' reads feature 'nope', which the batches do not have")):
        collect_access_stats(RandomBags(), missing, num_batches=1, batch_size=8)
    with pytest.raises(ValueError, match=re.escape("Invalid num_batches=0. Must be an int >= 1.")):
        collect_access_stats(RandomBags(), TABLES, num_batches=0, batch_size=8)


def test_cli_on_the_tiny_config(tmp_path, capsys):
    out = tmp_path / "stats"
    assert main(["--config", str(TINY_CONFIG), "--batches", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Access statistics of 4 tables over 3 batches (192 samples)" in printed
    assert "t_cat_0" in printed
    assert (out / "access_cdf.png").stat().st_size > 0
    stats = AccessStats.load(out)
    assert stats["t_cat_3"].num_embeddings == 300
    assert stats["t_cat_0"].num_samples == 192
