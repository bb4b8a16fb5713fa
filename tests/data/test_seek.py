"""A resume seeks the training stream instead of reading it again: the
batches from global batch ``k`` on equal those a fresh stream yields after
``k`` global batches, and reaching them costs the same whatever ``k`` is
(counted: blocks generated, lines parsed)."""

import numpy as np
import pytest
import torch

from dist_rec.data import synthetic
from dist_rec.data.binary import BinaryDataset, write_binary_dataset
from dist_rec.data.criteo import CriteoTextDataset
from dist_rec.data.synthetic import SyntheticConfig, SyntheticDataset

from test_criteo import SIZES, random_lines, write


def _same(a, b) -> None:
    assert torch.equal(a.dense_features, b.dense_features) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 3)])
def test_synthetic_stream_seeks_without_generating_what_came_before(monkeypatch, rank, world):
    data = SyntheticDataset(SyntheticConfig(num_embeddings_per_feature=[50, 80, 30]))
    fresh = _take(data.batches(64, rank, world), 12)
    generated = []
    real = synthetic._Teacher.generate
    monkeypatch.setattr(synthetic._Teacher, "generate", lambda self, split, first, count=1:
                        generated.extend(range(first, first + count)) or real(self, split, first, count))  # fmt: skip
    for start in (0, 5, 9):
        generated.clear()
        seeked = _take(SyntheticDataset(data.config).batches(64, rank, world, start_step=start), 12 - start)
        for a, b in zip(seeked, fresh[start:]):
            _same(a, b)
        block = data.config.block_size
        first_block = (start * 64 * world + rank * 64) // block
        assert min(generated) == first_block  # nothing before the resume point is generated
    # Far ahead: one block of generation, not the ones before it.
    generated.clear()
    next(SyntheticDataset(data.config).batches(64, rank, world, start_step=10**6))
    assert len(set(generated)) <= 2


def test_binary_stream_seeks(tmp_path):
    data = SyntheticDataset(SyntheticConfig(num_embeddings_per_feature=[50, 80, 30]), "eval", num_samples=3000)
    write_binary_dataset(tmp_path / "bin", data.batches(500, drop_last=False), data.sparse_feature_names, [50, 80, 30])
    binary = BinaryDataset(tmp_path / "bin")
    fresh = list(binary.batches(100, 1, 2))
    for start in (0, 3, len(fresh) - 1):
        for a, b in zip(binary.batches(100, 1, 2, start_step=start), fresh[start:]):
            _same(a, b)
    assert list(binary.batches(100, 1, 2, start_step=len(fresh))) == []


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_criteo_text_seeks_to_a_noted_chunk_and_parses_at_most_one_more(tmp_path, monkeypatch, on_error):
    lines = random_lines(1500, seed=3)
    if on_error == "skip":
        lines[17] = "not a criteo line"
    path = write(tmp_path / "day.tsv", lines)
    reader = CriteoTextDataset([path], SIZES, on_error=on_error, chunk_bytes=8192)
    fresh = list(reader.batches(40, 1, 3))
    notes = reader.seek_state()
    assert len(notes) > 20  # a note per chunk read
    from dist_rec.data import criteo

    parsed = []
    real = criteo._parse_lines
    monkeypatch.setattr(criteo, "_parse_lines", lambda buf, s, e, m: parsed.append(len(s)) or real(buf, s, e, m))
    for start in (0, 4, len(fresh) - 2):
        resumed = CriteoTextDataset([path], SIZES, on_error=on_error, chunk_bytes=8192)
        resumed.restore_seek_state(notes)
        parsed.clear()
        got = list(resumed.batches(40, 1, 3, start_step=start))
        assert len(got) == len(fresh) - start
        for a, b in zip(got, fresh[start:]):
            _same(a, b)
        # Lines parsed before the first batch: at most one chunk's worth beyond the batches' own lines.
        per_chunk = max(len(c) for c in np.array_split(np.arange(len(lines)), len(notes)))
        assert sum(parsed) <= (len(fresh) - start) * 40 * (3 if on_error == "skip" else 1) + 3 * per_chunk


def test_criteo_text_seeks_without_notes_by_scanning_lines(tmp_path):
    path = write(tmp_path / "day.tsv", random_lines(700, seed=4))
    fresh = list(CriteoTextDataset([path], SIZES, chunk_bytes=4096).batches(50, 0, 2))
    got = list(CriteoTextDataset([path], SIZES, chunk_bytes=4096).batches(50, 0, 2, start_step=3))
    assert len(got) == len(fresh) - 3
    for a, b in zip(got, fresh[3:]):
        _same(a, b)
    with pytest.raises(ValueError, match="start_step"):
        CriteoTextDataset([path], SIZES).batches(50, start_step=-1)
