"""The binary dataset: text -> binary gives the same batches as the text,
multi-hot bags survive a round trip, the converter command works, a corrupt
directory is refused naming the file, and nothing already written is lost
to an overwrite or a failed conversion."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_rec.data.batch import Batch
from dist_rec.data.binary import BinaryDataset, write_binary_dataset
from dist_rec.data.convert_criteo import main as convert_main
from dist_rec.data.criteo import DENSE_FEATURE_NAMES, SPARSE_FEATURE_NAMES, CriteoTextDataset
from dist_rec.sparse.jagged_tensor import KeyedJaggedTensor

REPO = Path(__file__).resolve().parents[2]
SIZES = [500 + 11 * f for f in range(26)]


def criteo_lines(n, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-2, 10**6))) for _ in range(13)]
        cats = ["" if rng.random() < 0.15 else "%08x" % int(rng.integers(2**32)) for _ in range(26)]
        lines.append("\t".join([str(int(rng.integers(2)))] + ints + cats))
    return lines


def write_text(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def assert_same_batches(got, want):
    got, want = list(got), list(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.dense_features, b.dense_features)
        ka, kb = a.sparse_features, b.sparse_features
        assert ka.keys() == kb.keys() and ka.stride() == kb.stride()
        assert torch.equal(ka.lengths(), kb.lengths())
        assert torch.equal(ka.values(), kb.values())


@pytest.fixture
def text(tmp_path):
    return CriteoTextDataset([write_text(tmp_path / "day_0.tsv", criteo_lines(150))], SIZES)


@pytest.fixture
def written(tmp_path, text):
    out = write_binary_dataset(
        tmp_path / "bin",
        text.batches(64, drop_last=False),
        SPARSE_FEATURE_NAMES,
        SIZES,
        dense_feature_names=DENSE_FEATURE_NAMES,
    )
    return out


def test_text_to_binary_gives_the_text_batches(text, written):
    ds = BinaryDataset(written, verify=True)
    assert len(ds) == 150
    assert ds.sparse_feature_names == SPARSE_FEATURE_NAMES and ds.num_dense_features == 13
    assert ds.dense_feature_names == DENSE_FEATURE_NAMES and ds.num_embeddings_per_feature == SIZES
    meta = json.loads((written / "meta.json").read_text())
    assert meta["format"] == "dist_rec.binary" and meta["version"] == 1 and meta["num_samples"] == 150
    assert set(meta["arrays"]) == {
        "labels.npy",
        "dense.npy",
        "sparse_lengths.npy",
        "sparse_values.npy",
        "sample_offsets.npy",
    }
    for world_size, batch_size, drop_last in [(1, 150, True), (1, 16, False), (3, 7, True), (2, 32, False)]:
        for rank in range(world_size):
            assert_same_batches(
                ds.batches(batch_size, rank, world_size, drop_last),
                text.batches(batch_size, rank, world_size, drop_last),
            )
    # Plain numpy can read the files.
    assert np.load(written / "sparse_lengths.npy").shape == (150, 26)
    assert np.load(written / "sample_offsets.npy")[-1] == meta["num_values"]


def multi_hot_batch(bags, dense, labels, keys=("a", "b", "c")):
    """A batch from per-sample bags ``bags[b][f]``."""
    size = len(bags)
    lengths = [len(bags[b][f]) for f in range(len(keys)) for b in range(size)]
    values = [v for f in range(len(keys)) for b in range(size) for v in bags[b][f]]
    kjt = KeyedJaggedTensor(list(keys), torch.tensor(values, dtype=torch.int64), lengths=torch.tensor(lengths))
    return Batch(torch.tensor(dense, dtype=torch.float32), kjt, torch.tensor(labels, dtype=torch.float32))


def test_multi_hot_bags_round_trip(tmp_path):
    bags = [
        [[1, 2], [], [9]],
        [[], [3, 4, 5], []],
        [[6], [7], [8, 8, 8, 8]],
        [[], [], []],
        [[0, 1, 2, 3, 4], [5], []],
    ]
    dense = [[float(i), -float(i)] for i in range(5)]
    labels = [1, 0, 1, 1, 0]
    batches = [multi_hot_batch(bags[:2], dense[:2], labels[:2]), multi_hot_batch(bags[2:], dense[2:], labels[2:])]
    out = write_binary_dataset(tmp_path / "mh", iter(batches), ["a", "b", "c"], [10, 10, 10])
    ds = BinaryDataset(out, verify=True)
    assert len(ds) == 5 and ds.num_dense_features == 2 and ds.dense_feature_names is None
    assert np.load(out / "sparse_lengths.npy").tolist() == [[len(bag) for bag in sample] for sample in bags]
    assert np.load(out / "sparse_values.npy").tolist() == [v for sample in bags for bag in sample for v in bag]
    assert np.load(out / "sample_offsets.npy").tolist() == [0, 3, 6, 12, 12, 18]
    # Batches that cut across the written ones, on two ranks.
    assert_same_batches(
        ds.batches(3, drop_last=False),
        [multi_hot_batch(bags[:3], dense[:3], labels[:3]), multi_hot_batch(bags[3:], dense[3:], labels[3:])],
    )
    assert_same_batches(ds.batches(2, rank=1, world_size=2), [multi_hot_batch(bags[2:4], dense[2:4], labels[2:4])])


def test_writer_refuses_batches_it_cannot_store(tmp_path):
    good = multi_hot_batch([[[1], [2], [3]]], [[0.0]], [1])
    weighted = Batch(
        good.dense_features,
        KeyedJaggedTensor(
            ["a", "b", "c"], torch.tensor([1, 2, 3]), lengths=torch.ones(3, dtype=torch.int64), weights=torch.ones(3)
        ),
        good.labels,
    )
    cases = [
        ([good], ["a", "b"], [10, 10], r"Batch 0 has sparse features \['a', 'b', 'c'\]; expected \['a', 'b'\]"),
        ([weighted], ["a", "b", "c"], [10] * 3, "weighted"),
        (
            [good, multi_hot_batch([[[1], [2], [3]]], [[0.0, 1.0]], [1])],
            ["a", "b", "c"],
            [10] * 3,
            "Batch 1 has 2 dense features; earlier batches had 1",
        ),
        ([], ["a", "b", "c"], [10] * 3, "No batches to write"),
        ([good], ["a", "b", "c"], [10, 0, 10], r"Invalid num_embeddings_per_feature=\[10, 0, 10\]. Must be"),
        ([good], ["a", "a", "c"], [10] * 3, r"Invalid sparse_feature_names="),
    ]
    for batches, names, sizes, message in cases:
        with pytest.raises(ValueError, match=message):
            write_binary_dataset(tmp_path / "out", batches, names, sizes)
    assert os.listdir(tmp_path) == []  # no dataset, no leftovers


def run_converter(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "dist_rec.data.convert_criteo", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_converter_command(tmp_path):
    lines = criteo_lines(90, seed=1)
    first = write_text(tmp_path / "day_0.tsv", lines[:40])
    second = write_text(tmp_path / "day_1.tsv", lines[40:] + ["1\tnot a line"])
    out = tmp_path / "bin"
    sizes = ",".join(map(str, SIZES))
    result = run_converter("--out", out, "--num-embeddings-per-feature", sizes, "--on-error", "skip",
                           "--max-skip-fraction", "0.05", first, second)
    assert result.returncode == 0, result.stderr
    assert re.search(
        rf"Wrote 90 samples to {re.escape(str(out))} in .* s .*skipped 1 lines \(field_count: 1\)", result.stdout
    )
    assert f"{second}:51: expected 40 tab-separated fields, got 2" in result.stderr
    text = CriteoTextDataset([first, write_text(tmp_path / "clean.tsv", lines[40:])], SIZES)
    assert_same_batches(BinaryDataset(out, verify=True).batches(25, drop_last=False), text.batches(25, drop_last=False))


def test_converter_refuses_bad_arguments(tmp_path, written, capsys):
    day = tmp_path / "day_0.tsv"
    cases = [
        (["--out", written, "--num-embeddings", "100", day], "--overwrite"),
        (
            ["--out", tmp_path / "x", "--num-embeddings-per-feature", "1,2", day],
            "Invalid num_embeddings_per_feature=[1, 2]",
        ),
        (["--out", tmp_path / "x", "--num-embeddings", "0", day], "'0' must be > 0"),
        (["--out", tmp_path / "x", "--num-embeddings", "9", tmp_path / "nope"], "not found"),
        (["--out", tmp_path / "x", day], "one of the arguments --num-embeddings --num-embeddings-per-feature"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit:
            convert_main([str(a) for a in args])
        assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_failed_conversion_keeps_the_existing_dataset(tmp_path, written):
    before = {p.name: p.read_bytes() for p in written.iterdir()}
    bad = write_text(tmp_path / "bad.tsv", criteo_lines(30) + ["2" + "\t" * 39])
    result = run_converter("--out", written, "--num-embeddings", "100", "--overwrite", bad)
    assert result.returncode == 1
    assert f"{bad}:31: label must be 0 or 1, got '2'" in result.stderr
    assert {p.name: p.read_bytes() for p in written.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.tsv", "bin", "day_0.tsv"]  # no temporary left

    # Through the library: the writer fails after some batches.
    def failing():
        yield multi_hot_batch([[[1]] * 26], [[0.0] * 13], [1], keys=SPARSE_FEATURE_NAMES)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_binary_dataset(written, failing(), SPARSE_FEATURE_NAMES, SIZES, overwrite=True)
    assert {p.name: p.read_bytes() for p in written.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.tsv", "bin", "day_0.tsv"]
    BinaryDataset(written, verify=True)


def test_overwrite_rules(tmp_path, text, written):
    small = [multi_hot_batch([[[1]] * 26], [[0.0] * 13], [1], keys=SPARSE_FEATURE_NAMES)]
    with pytest.raises(ValueError, match=r"Invalid directory=.*Must be new or empty; pass overwrite=True"):
        write_binary_dataset(written, small, SPARSE_FEATURE_NAMES, SIZES)
    assert len(BinaryDataset(written)) == 150
    write_binary_dataset(written, small, SPARSE_FEATURE_NAMES, SIZES, overwrite=True)
    assert len(BinaryDataset(written, verify=True)) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    write_binary_dataset(empty, small, SPARSE_FEATURE_NAMES, SIZES)
    assert len(BinaryDataset(empty)) == 1

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds no dist_rec.binary dataset .* refusing to replace it"):
        write_binary_dataset(other, small, SPARSE_FEATURE_NAMES, SIZES, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"Must be a directory, not a file"):
        write_binary_dataset(other / "notes.txt", small, SPARSE_FEATURE_NAMES, SIZES, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["bin", "day_0.tsv", "empty", "other"]


def rewrite_meta(directory, **changes):
    meta = json.loads((directory / "meta.json").read_text())
    meta.update(changes)
    (directory / "meta.json").write_text(json.dumps(meta))


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


CORRUPTIONS = {
    "missing array": (lambda d: (d / "dense.npy").unlink(), r"dense\.npy: missing"),
    "missing meta": (lambda d: (d / "meta.json").unlink(), r"meta\.json: missing"),
    "meta not json": (lambda d: (d / "meta.json").write_text("{"), r"meta\.json: not valid JSON"),
    "other format": (lambda d: rewrite_meta(d, format="parquet"), r"meta\.json: format 'parquet'"),
    "other version": (lambda d: rewrite_meta(d, version=2), r"meta\.json: dist_rec\.binary version 2; this reader"),
    "bad count": (lambda d: rewrite_meta(d, num_samples=-1), r"meta\.json: num_samples=-1; must be"),
    "truncated values": (
        lambda d: truncate(d / "sparse_values.npy", (d / "sparse_values.npy").stat().st_size - 8),
        r"sparse_values\.npy: not a readable \.npy array .* truncated",
    ),
    "truncated header": (lambda d: truncate(d / "labels.npy", 20), r"labels\.npy: not a readable \.npy array"),
    "appended bytes": (
        lambda d: open(d / "labels.npy", "ab").write(b"\0" * 4),
        r"labels\.npy: 732 bytes; expected 728",
    ),
    "wrong shape": (
        lambda d: np.save(d / "dense.npy", np.zeros((150, 12), np.float32)),
        r"dense\.npy: float32 \[150, 12\]; expected float32 \[150, 13\]",
    ),
    "wrong dtype": (
        lambda d: np.save(d / "sparse_lengths.npy", np.zeros((150, 26), np.int64)),
        r"sparse_lengths\.npy: int64 \[150, 26\]; expected int32",
    ),
    "bad offsets": (
        lambda d: np.save(d / "sample_offsets.npy", np.zeros(151, np.int64)),
        r"sample_offsets\.npy: offsets run from 0 to 0; expected 0 to num_values=",
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_directory_is_refused_naming_the_file(written, kind):
    corrupt, message = CORRUPTIONS[kind]
    corrupt(written)
    with pytest.raises(ValueError, match=message):
        BinaryDataset(written)


def test_checksums_are_checked_on_request(written):
    path = written / "dense.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # same size, same structure, other values
    path.write_bytes(bytes(data))
    BinaryDataset(written)
    with pytest.raises(ValueError, match=r"dense\.npy: sha256 [0-9a-f]+ does not match"):
        BinaryDataset(written, verify=True)


def test_offsets_that_disagree_with_lengths(written):
    offsets = np.load(written / "sample_offsets.npy")
    offsets[1:-1] += 1  # first sample claims one more id, last one fewer
    np.save(written / "sample_offsets.npy", offsets)
    with pytest.raises(ValueError, match=r"sparse_lengths\.npy: samples \[0, 10\) have \d+ ids but"):
        list(BinaryDataset(written).batches(10))
    with pytest.raises(ValueError, match=r"sha256"):
        BinaryDataset(written, verify=True)


def test_batches_arguments_are_checked(written):
    ds = BinaryDataset(written)
    with pytest.raises(ValueError, match=r"Invalid batch_size=0"):
        ds.batches(0)
    with pytest.raises(ValueError, match=r"Invalid world_size=0"):
        ds.batches(4, rank=0, world_size=0)
    with pytest.raises(ValueError, match=r"Invalid directory='.*nothing'. Must be a directory"):
        BinaryDataset(written.parent / "nothing")


def test_converter_reports_progress(tmp_path, monkeypatch, capsys):
    import dist_rec.data.convert_criteo as convert_criteo

    monkeypatch.setattr(convert_criteo, "PROGRESS_EVERY", 40)
    day = write_text(tmp_path / "day.tsv", criteo_lines(150, seed=2))
    code = convert_main(["--out", str(tmp_path / "bin"), "--num-embeddings", "50", "--batch-size", "16", str(day)])
    out, err = capsys.readouterr()
    assert code == 0
    assert [int(line.split()[0].replace(",", "")) for line in err.splitlines()] == [48, 80, 128]
    assert all(line.endswith("lines/s") for line in err.splitlines())
    assert re.fullmatch(
        rf"Wrote 150 samples to {re.escape(str(tmp_path / 'bin'))} in \d+\.\d s \([\d,]+ lines/s\); "
        r"skipped 0 lines\.\n",
        out,
    )
    assert len(BinaryDataset(tmp_path / "bin")) == 150
