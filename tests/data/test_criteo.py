"""The Criteo text reader: exact parsing (against a plain-Python reference),
clear refusal of malformed lines, skip mode, the rank split of
``dist_rec.data.batch`` over a stream, several files as one stream, and
streaming in chunks."""

import gzip
import re

import numpy as np
import pytest
import torch

from dist_rec.data.batch import rank_block_ranges
from dist_rec.data.criteo import DENSE_FEATURE_NAMES, SPARSE_FEATURE_NAMES, CriteoTextDataset

SIZES = [1000 + 37 * f for f in range(26)]


def make_line(label="0", ints=(), cats=()):
    """A line from a label, integers and categories given by position
    (a dict or a prefix list); the rest are missing."""
    ints = dict(ints) if isinstance(ints, dict) else dict(enumerate(ints))
    cats = dict(cats) if isinstance(cats, dict) else dict(enumerate(cats))
    return "\t".join([label] + [ints.get(i, "") for i in range(13)] + [cats.get(i, "") for i in range(26)])


def write(path, lines, final_newline=True):
    path.write_text("\n".join(lines) + ("\n" if final_newline and lines else ""))
    return path


def random_lines(n, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = {}
        for i in range(13):
            kind = rng.integers(10)
            if kind == 0:
                continue  # missing
            if kind == 1:
                ints[i] = str(-int(rng.integers(1, 10)))
            elif kind == 2:
                ints[i] = str(int(rng.integers(10**8, 10**19, dtype=np.uint64)))  # two words or longer
            else:
                ints[i] = str(int(rng.integers(0, 10 ** int(rng.integers(1, 8)))))
        cats = {}
        for i in range(26):
            kind = rng.integers(12)
            if kind == 0:
                continue
            digits = 8 if kind > 3 else int(rng.integers(1, 21))  # up to 16 fast, longer through Python
            text = "".join(rng.choice(list("0123456789abcdefABCDEF"), digits))
            cats[i] = text
        lines.append(make_line(str(int(rng.integers(2))), ints, cats))
    return lines


def reference(line, sizes=SIZES):
    """(label, dense, bags) of one line, the slow obvious way."""
    fields = line.split("\t")
    dense = tuple(float(np.float32(np.log1p(np.float64(max(int(x), 0))))) if x else 0.0 for x in fields[1:14])
    bags = tuple((int(x, 16) % sizes[f],) if x else () for f, x in enumerate(fields[14:]))
    return float(fields[0]), dense, bags


def samples(batches):
    """Per-sample (label, dense, bags) of a list of batches."""
    out = []
    for batch in batches:
        kjt = batch.sparse_features
        size, keys = batch.batch_size, kjt.keys()
        offsets, values = kjt.offsets().tolist(), kjt.values().tolist()
        for i in range(size):
            bags = tuple(tuple(values[offsets[f * size + i] : offsets[f * size + i + 1]]) for f in range(len(keys)))
            out.append((batch.labels[i].item(), tuple(batch.dense_features[i].tolist()), bags))
    return out


def stream(ds):
    return samples(ds.batches(10**6, drop_last=False))


def test_hand_written_lines_parse_to_exact_values(tmp_path):
    lines = [
        make_line("1", ["5", "", "-3", "0", "123456789"], ["68fd1e64", "", "ABCDEF", "0"]),
        make_line("0"),  # everything missing
        make_line("0", {11: "0" * 20, 12: "0" * 20 + "7"}, {25: "ffffffffffffffff"}),
    ]
    ds = CriteoTextDataset([write(tmp_path / "day_0.tsv", lines)], SIZES)
    (batch,) = ds.batches(3)
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (3, 13)
    assert batch.labels.dtype == torch.float32 and batch.labels.tolist() == [1.0, 0.0, 0.0]
    log1p = lambda x: np.float32(np.log1p(np.float64(x)))  # noqa: E731
    expected = np.zeros((3, 13), dtype=np.float32)
    expected[0, :5] = [log1p(5), 0, 0, 0, log1p(123456789)]  # "" and -3 become 0
    expected[2, 12] = log1p(7)
    assert np.array_equal(batch.dense_features.numpy(), expected)
    kjt = batch.sparse_features
    assert kjt.keys() == SPARSE_FEATURE_NAMES and kjt.values().dtype == torch.int64
    assert kjt["cat_0"].lengths().tolist() == [1, 0, 0]
    assert kjt["cat_0"].values().tolist() == [0x68FD1E64 % SIZES[0]]
    assert kjt["cat_1"].lengths().tolist() == [0, 0, 0]  # missing: empty bags
    assert kjt["cat_2"].values().tolist() == [0xABCDEF % SIZES[2]]
    assert kjt["cat_3"].values().tolist() == [0]
    assert kjt["cat_25"].lengths().tolist() == [0, 0, 1]
    assert kjt["cat_25"].values().tolist() == [0xFFFFFFFFFFFFFFFF % SIZES[25]]
    assert kjt.lengths().sum().item() == 4


def test_random_lines_match_reference(tmp_path):
    lines = random_lines(300)
    ds = CriteoTextDataset([write(tmp_path / "a.tsv", lines)], SIZES, chunk_bytes=4096)
    assert stream(ds) == [reference(line) for line in lines]


def test_one_table_size_for_all_features_and_crlf_lines(tmp_path):
    lines = random_lines(20, seed=1)
    path = tmp_path / "crlf.tsv"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    ds = CriteoTextDataset(path, 777)
    assert ds.num_embeddings_per_feature == [777] * 26
    assert stream(ds) == [reference(line, [777] * 26) for line in lines]


def test_dataset_protocol_properties(tmp_path):
    ds = CriteoTextDataset([write(tmp_path / "a.tsv", random_lines(2))], SIZES)
    assert ds.sparse_feature_names == SPARSE_FEATURE_NAMES == [f"cat_{i}" for i in range(26)]
    assert ds.num_dense_features == 13
    assert DENSE_FEATURE_NAMES == [f"int_{i}" for i in range(13)]


GOOD = make_line("1", ["1", "2"], ["a1", "b2"])
MALFORMED = [
    ("\t".join(GOOD.split("\t")[:39]), "expected 40 tab-separated fields, got 39"),
    (GOOD + "\t", "expected 40 tab-separated fields, got 41"),
    ("", "expected 40 tab-separated fields, got 1"),
    (make_line("2"), "label must be 0 or 1, got '2'"),
    (make_line(""), "label must be 0 or 1, got ''"),
    (make_line("0.0"), "label must be 0 or 1, got '0.0'"),
    (make_line("1", {1: "1.5"}), "field 3 (int_1) must be an integer, got '1.5'"),
    (make_line("1", {0: "-"}), "field 2 (int_0) must be an integer, got '-'"),
    (make_line("1", {12: "--4"}), "field 14 (int_12) must be an integer, got '--4'"),
    (make_line("1", {4: "12a"}), "field 6 (int_4) must be an integer, got '12a'"),
    (make_line("1", {4: "1" * 12 + " "}), "field 6 (int_4) must be an integer"),  # two-word path
    (make_line("1", {4: "9" * 30 + "x"}), "field 6 (int_4) must be an integer"),  # Python path
    (make_line("1", {}, {0: "xyz1"}), "field 15 (cat_0) must be a hex string, got 'xyz1'"),
    (make_line("1", {}, {3: "0x1f"}), "field 18 (cat_3) must be a hex string, got '0x1f'"),
    (make_line("1", {}, {25: "12 4"}), "field 40 (cat_25) must be a hex string, got '12 4'"),
    (make_line("1", {}, {7: "é0"}), "field 22 (cat_7) must be a hex string, got 'é0'"),
    (make_line("1", {}, {7: "g" + "0" * 15}), "field 22 (cat_7) must be a hex string"),
    (make_line("1", {}, {7: "0" * 30 + "g"}), "field 22 (cat_7) must be a hex string"),
]


@pytest.mark.parametrize("bad,message", MALFORMED)
def test_malformed_line_is_refused_with_file_and_line(tmp_path, bad, message):
    first = write(tmp_path / "day_0.tsv", [GOOD] * 5)
    second = write(tmp_path / "day_1.tsv", [GOOD, GOOD, bad, GOOD])
    ds = CriteoTextDataset([first, second], SIZES)
    with pytest.raises(ValueError, match=re.escape(f"{second}:3: {message}")):
        list(ds.batches(2, drop_last=False))


def test_malformed_line_is_found_by_the_rank_that_reads_it(tmp_path):
    path = write(tmp_path / "a.tsv", [GOOD] * 6 + [make_line("7")] + [GOOD] * 5)
    ds = CriteoTextDataset([path], SIZES)
    # Blocks of 2 lines over 2 ranks: line 7 (index 6) is block 3, rank 1's.
    assert len(list(ds.batches(2, rank=0, world_size=2))) == 3
    with pytest.raises(ValueError, match=re.escape(f"{path}:7: label must be 0 or 1")):
        list(ds.batches(2, rank=1, world_size=2))


def test_skip_mode_drops_and_counts_malformed_lines(tmp_path):
    good = random_lines(12, seed=2)
    bad = [MALFORMED[0][0], MALFORMED[3][0], MALFORMED[6][0], MALFORMED[12][0], MALFORMED[13][0], ""]
    lines = good[:3] + bad[:2] + good[3:8] + bad[2:] + good[8:]
    path = write(tmp_path / "a.tsv", lines)
    ds = CriteoTextDataset([path], SIZES, on_error="skip", max_skip_fraction=1.0)
    assert stream(ds) == [reference(line) for line in good]
    assert ds.skipped_lines == 6
    assert dict(ds.skipped_by_reason) == {"field_count": 2, "label": 1, "integer": 1, "category": 2}
    assert ds.skipped_examples[0] == f"{path}:4: expected 40 tab-separated fields, got 39"
    assert ds.skipped_examples[1].startswith(f"{path}:5: label must be 0 or 1")
    # Counts are per pass, not cumulative.
    stream(ds)
    assert ds.skipped_lines == 6


def test_skip_mode_splits_blocks_over_valid_lines(tmp_path):
    good = random_lines(21, seed=3)
    lines = [good[0], "bad", *good[1:9], make_line("x"), *good[9:], "\t"]
    ds = CriteoTextDataset([write(tmp_path / "a.tsv", lines)], SIZES, on_error="skip", max_skip_fraction=1.0)
    expected = [reference(line) for line in good]
    for rank in range(2):
        got = samples(ds.batches(3, rank=rank, world_size=2, drop_last=False))
        want = [expected[i] for a, b in rank_block_ranges(21, 3, rank, 2, drop_last=False) for i in range(a, b)]
        assert got == want


@pytest.mark.parametrize("chunk_bytes", [300, 1 << 20])
@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 1), (3, 4), (4, 7)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_split_the_stream_in_blocks(tmp_path, chunk_bytes, world_size, batch_size, drop_last):
    lines = random_lines(103, seed=4)
    ds = CriteoTextDataset([write(tmp_path / "a.tsv", lines)], SIZES, chunk_bytes=chunk_bytes)
    full = [reference(line) for line in lines]
    seen, steps = [], []
    for rank in range(world_size):
        batches = list(ds.batches(batch_size, rank, world_size, drop_last))
        steps.append(len(batches))
        for step, batch in enumerate(batches):
            start = (step * world_size + rank) * batch_size
            assert samples([batch]) == full[start : start + batch_size]
            assert batch.batch_size == batch_size or not drop_last
            seen.extend(range(start, start + batch.batch_size))
    covered = 103 // (world_size * batch_size) * world_size * batch_size if drop_last else 103
    assert sorted(seen) == list(range(covered))  # no overlap, nothing missing
    if drop_last:
        assert len(set(steps)) == 1


def test_drop_last_stops_at_the_first_incomplete_global_batch(tmp_path):
    # W=3, B=4: 29 lines = 2 global batches + one block for rank 0 + 1 line.
    lines = random_lines(29, seed=5)
    ds = CriteoTextDataset([write(tmp_path / "a.tsv", lines)], SIZES)
    assert [len(list(ds.batches(4, r, 3))) for r in range(3)] == [2, 2, 2]
    sizes = [[b.batch_size for b in ds.batches(4, r, 3, drop_last=False)] for r in range(3)]
    assert sizes == [[4, 4, 4], [4, 4, 1], [4, 4]]


def test_files_are_one_stream(tmp_path):
    lines = random_lines(40, seed=6)
    whole = CriteoTextDataset([write(tmp_path / "all.tsv", lines)], SIZES)
    parts = [
        write(tmp_path / "p0.tsv", lines[:7], final_newline=False),  # no newline at the end
        write(tmp_path / "p1.tsv", []),  # empty
        write(tmp_path / "p2.tsv", lines[7:8]),
        write(tmp_path / "p3.tsv", lines[8:], final_newline=False),
    ]
    split = CriteoTextDataset(parts, SIZES, chunk_bytes=500)
    assert stream(split) == stream(whole) == [reference(line) for line in lines]
    for rank in range(3):
        assert samples(split.batches(3, rank, 3)) == samples(whole.batches(3, rank, 3))


def test_streams_lines_longer_than_a_chunk_and_gzip(tmp_path):
    lines = random_lines(30, seed=7)
    path = write(tmp_path / "a.tsv", lines)
    gz = tmp_path / "a.tsv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    expected = [reference(line) for line in lines]
    assert stream(CriteoTextDataset([path], SIZES, chunk_bytes=64)) == expected  # lines are ~200 bytes
    assert stream(CriteoTextDataset([gz], SIZES, chunk_bytes=1000)) == expected


def test_reads_lazily(tmp_path):
    # The fault is far past the first chunk: the first batches come before it is read.
    lines = random_lines(200, seed=8) * 10 + ["bad line"]
    path = write(tmp_path / "a.tsv", lines)
    ds = CriteoTextDataset([path], SIZES, chunk_bytes=8192)
    batches = ds.batches(16)
    first = next(batches)
    assert samples([first]) == [reference(line) for line in lines[:16]]
    with pytest.raises(ValueError, match=re.escape(f"{path}:2001: expected 40")):
        list(batches)


def test_constructor_and_batches_arguments_are_checked(tmp_path):
    path = write(tmp_path / "a.tsv", random_lines(3))
    with pytest.raises(ValueError, match=re.escape("Invalid on_error='ignore'. Must be 'raise' or 'skip'.")):
        CriteoTextDataset([path], SIZES, on_error="ignore")
    with pytest.raises(ValueError, match=r"Invalid num_embeddings_per_feature=.*Must be .* got 25"):
        CriteoTextDataset([path], SIZES[:25])
    with pytest.raises(ValueError, match=r"Invalid num_embeddings_per_feature=.*Must be ints .* cat_3 is 0"):
        CriteoTextDataset([path], SIZES[:3] + [0] + SIZES[4:])
    with pytest.raises(ValueError, match=r"Invalid num_embeddings_per_feature=-1"):
        CriteoTextDataset([path], -1)
    with pytest.raises(ValueError, match=r"Invalid paths=.*Must be existing files; not found: .*nope\.tsv"):
        CriteoTextDataset([path, tmp_path / "nope.tsv"], SIZES)
    with pytest.raises(ValueError, match=r"Invalid paths=\[\]\. Must name at least one file"):
        CriteoTextDataset([], SIZES)
    with pytest.raises(ValueError, match=r"Invalid chunk_bytes=0"):
        CriteoTextDataset([path], SIZES, chunk_bytes=0)
    ds = CriteoTextDataset([path], SIZES)
    with pytest.raises(ValueError, match=r"Invalid batch_size=0"):
        ds.batches(0)  # refused at the call, not at the first next()
    with pytest.raises(ValueError, match=r"Invalid rank=2"):
        ds.batches(1, rank=2, world_size=2)


def first_fault(line):
    """The reason a line is malformed (None if it is not), independently of the reader."""
    fields = line.split("\t")
    if len(fields) != 40:
        return "field_count"
    if fields[0] not in ("0", "1"):
        return "label"
    if not all(re.fullmatch(r"(-?[0-9]+)?", x) for x in fields[1:14]):
        return "integer"
    if not all(re.fullmatch(r"[0-9a-fA-F]*", x) for x in fields[14:]):
        return "category"
    return None


def test_skip_mode_agrees_with_a_plain_validator_on_corrupted_lines(tmp_path):
    rng = np.random.default_rng(9)
    lines = random_lines(400, seed=9)
    junk = list("\t-gx .é0aF+") + ["--", "0x", ""]
    for i in rng.choice(len(lines), 200, replace=False):
        line = lines[i]
        at = int(rng.integers(len(line)))
        lines[i] = line[:at] + str(rng.choice(junk)) + line[at + int(rng.integers(0, 2)) :]
    faults = [first_fault(line) for line in lines]
    assert 50 < sum(f is not None for f in faults) < 200  # the corruption is a real test
    ds = CriteoTextDataset([write(tmp_path / "a.tsv", lines)], SIZES, on_error="skip", chunk_bytes=2048, max_skip_fraction=1.0)
    assert stream(ds) == [reference(line) for line, fault in zip(lines, faults) if fault is None]
    expected = {r: faults.count(r) for r in set(faults) - {None}}
    assert dict(ds.skipped_by_reason) == expected


def test_a_file_without_newlines_is_refused(tmp_path, monkeypatch):
    import dist_rec.data.criteo as criteo

    monkeypatch.setattr(criteo, "_MAX_LINE_BYTES", 1000)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\x01" * 5000)
    with pytest.raises(ValueError, match=re.escape(f"{path}: a line longer than 1000 bytes")):
        list(CriteoTextDataset([path], SIZES, on_error="skip", chunk_bytes=256).batches(4))
