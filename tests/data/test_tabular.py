"""The schema readers on files in each shape users bring: text and Parquet
read alike, text -> binary -> batches is identical, bad rows are counted."""

import numpy as np
import pytest
import torch

from dist_rec.data.binary import BinaryDataset
from dist_rec.data.convert import convert, main as convert_main, open_table
from dist_rec.data.schema import Schema
from dist_rec.data.tabular import ParquetDataset, TextDataset
from dist_rec.testing import tables

SHAPES = {
    "avazu": (tables.avazu_lines, tables.AVAZU_SCHEMA, "avazu.csv", ""),
    "movielens": (tables.movielens_lines, tables.MOVIELENS_SCHEMA, "ratings.csv", "genres"),
    "sequence": (tables.sequence_lines, tables.SEQUENCE_SCHEMA, "behaviour.tsv", "history"),
}


def assert_same_batches(first, second):
    first, second = list(first), list(second)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.dense_features, b.dense_features)
        assert a.sparse_features.keys() == b.sparse_features.keys()
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())
        wa, wb = a.sparse_features.weights_or_none(), b.sparse_features.weights_or_none()
        assert (wa is None) == (wb is None)
        if wa is not None:
            assert torch.equal(wa, wb)


@pytest.fixture(params=sorted(SHAPES))
def shape(request, tmp_path):
    make, schema, name, list_column = SHAPES[request.param]
    path = tables.write_lines(tmp_path / name, make(700, seed=1))
    return request.param, path, Schema.from_dict(schema), list_column


def test_gzip_text_reads_as_the_plain_file(shape, tmp_path):
    import gzip

    _, path, schema, _ = shape
    packed = tmp_path / (path.name + ".gz")
    packed.write_bytes(gzip.compress(path.read_bytes()))
    assert_same_batches(TextDataset([path], schema).batches(100, drop_last=False),
                        TextDataset([packed], schema).batches(100, drop_last=False))  # fmt: skip


def test_parquet_reads_as_the_text_it_was_written_from(shape, tmp_path):
    _, path, schema, list_column = shape
    raw = schema.to_dict()
    for column in ("", list_column) if list_column else ("",):  # delimited strings, and a real list column
        parquet = tables.write_parquet(path, tmp_path / f"data{column}.parquet", raw, column)
        assert_same_batches(TextDataset([path], schema).batches(100, drop_last=False),
                            ParquetDataset([parquet], schema).batches(100, drop_last=False))  # fmt: skip


def test_text_to_binary_to_batches_is_identical(shape, tmp_path):
    name, path, schema, _ = shape
    source = convert([path], schema, tmp_path / "bin")
    binary = BinaryDataset(tmp_path / "bin", verify=True)
    assert binary.num_embeddings_per_feature == source.num_embeddings_per_feature
    assert binary.feature_tables == source.feature_tables
    assert binary.is_weighted == source.is_weighted == (name == "sequence")
    assert binary.meta["extra"]["fitted"] == source.fitted.to_dict()
    for rank in range(2):
        assert_same_batches(TextDataset([path], schema).batches(64, rank, 2, drop_last=False),
                            binary.batches(64, rank, 2, drop_last=False))  # fmt: skip


def test_the_converter_command_reuses_the_training_vocabularies_for_an_eval_set(tmp_path, capsys):
    import yaml

    schema_path = tmp_path / "movielens.yaml"
    schema_path.write_text(yaml.safe_dump(tables.MOVIELENS_SCHEMA))
    train = tables.write_lines(tmp_path / "train.csv", tables.movielens_lines(400, seed=1))
    test = tables.write_lines(tmp_path / "test.csv", tables.movielens_lines(100, seed=2)[:1] + ["1,2,4.0,964982703,Brand New"])
    assert convert_main(["--schema", str(schema_path), "--out", str(tmp_path / "train_bin"), str(train)]) == 0
    assert "Wrote 400 samples" in capsys.readouterr().out
    assert convert_main(["--schema", str(schema_path), "--out", str(tmp_path / "test_bin"),
                         "--fitted-from", str(tmp_path / "train_bin"), str(test)]) == 0  # fmt: skip
    train_bin, test_bin = BinaryDataset(tmp_path / "train_bin"), BinaryDataset(tmp_path / "test_bin")
    assert train_bin.num_embeddings_per_feature == test_bin.num_embeddings_per_feature
    (batch,) = list(test_bin.batches(1, drop_last=False))
    assert batch.sparse_features["genres"].values().tolist() == [0]  # unseen genre: the vocabulary's row 0


def test_missing_pyarrow_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ImportError, match=r"pip install 'dist_rec\[parquet\]'"):
        ParquetDataset([tables.write_lines(tmp_path / "x.parquet", ["x"])], Schema.from_dict(tables.AVAZU_SCHEMA))


def _with_bad_lines(tmp_path, count, bad_every):
    lines = tables.avazu_lines(count, seed=4)
    bad = 0
    for i in range(1, len(lines)):
        if i % bad_every == 0:
            fields = lines[i].split(",")
            fields[1] = "2"  # the label
            lines[i] = lines[i].replace(",", ";", 1) if bad % 2 else ",".join(fields)
            bad += 1
    return tables.write_lines(tmp_path / "bad.csv", lines), bad


def test_a_few_bad_lines_are_skipped_and_counted(tmp_path):
    path, bad = _with_bad_lines(tmp_path, 4000, 200)  # 0.5%
    ds = TextDataset([path], Schema.from_dict(tables.AVAZU_SCHEMA), on_error="skip")
    samples = sum(b.batch_size for b in ds.batches(100, drop_last=False))
    assert samples == 4000 - bad and bad == 20
    assert ds.skips.skipped == bad
    assert ds.skips.by_reason == {"field_count": 10, "label": 10}
    assert ds.skips.examples[0].startswith(f"{path}:201: ")


def test_too_many_bad_lines_stop_the_stream_with_the_counts(tmp_path):
    path, bad = _with_bad_lines(tmp_path, 12000, 50)  # 2%
    ds = TextDataset([path], Schema.from_dict(tables.AVAZU_SCHEMA), on_error="skip")
    with pytest.raises(ValueError, match=r"of 1\d{4} lines skipped in .*bad.csv \(field_count \d+, label \d+\); first: "
                                         r".*bad.csv:51: .*more than data.max_skip_fraction=0.01"):  # fmt: skip
        list(ds.batches(100))


def test_a_file_of_only_bad_lines_is_an_error_not_an_empty_run(tmp_path):
    path = tables.write_lines(tmp_path / "junk.csv", tables.avazu_lines(1)[:1] + ["this,is,not,data"] * 30)
    ds = TextDataset([path], Schema.from_dict(tables.AVAZU_SCHEMA), on_error="skip", max_skip_fraction=1.0)
    with pytest.raises(ValueError, match=r"No usable sample: 30 of 30 lines skipped in .*junk.csv \(field_count 30\); first: .*junk.csv:2: expected 12"):
        list(ds.batches(8))


def test_open_table_picks_the_reader_by_suffix(tmp_path):
    schema = Schema.from_dict(tables.AVAZU_SCHEMA)
    path = tables.write_lines(tmp_path / "a.csv", tables.avazu_lines(50))
    assert isinstance(open_table([path], schema), TextDataset)
    parquet = tables.write_parquet(path, tmp_path / "a.parquet", tables.AVAZU_SCHEMA)
    assert isinstance(open_table([parquet], schema), ParquetDataset)


# -- review cases: quoting, widths, pairing, encodings -------------------------------------------------------------

SIMPLE = {"label": "click", "sparse": [{"name": "site", "num_embeddings": 100}]}


def _texts(path, schema, chunk_rows=16384, **kwargs):
    ds = TextDataset([path], Schema.from_dict(schema), chunk_rows=chunk_rows, **kwargs)
    return [b for b in ds.batches(1, drop_last=False)], ds


def test_a_quoted_field_may_span_lines_and_chunks(tmp_path):
    from dist_rec.data.schema import stable_hash

    path = tmp_path / "q.csv"
    path.write_text('click,site\n1,"a\nb"\n0,c\n1,"d\n\ne"\n')
    for chunk_rows in (1, 2, 100):
        batches, _ = _texts(path, SIMPLE, chunk_rows)
        assert [b.sparse_features.values().item() for b in batches] == [stable_hash(t) % 100 for t in ("a\nb", "c", "d\n\ne")]
    path.write_text('click,site\n1,"a\nb"\n0,c\n2,d\n')
    with pytest.raises(ValueError, match=r"q.csv:5: label \('click'\) must be 0 or 1, got '2'"):  # the record's own line
        _texts(path, SIMPLE, 1)


def test_without_names_a_row_must_reach_the_last_column_read(tmp_path):
    schema = {"label": 0, "header": False, "sparse": [{"name": "x", "column": 2, "num_embeddings": 10, "encoding": "int"}]}
    path = tables.write_lines(tmp_path / "h.csv", ["1,5", "0,6,7", "1,7,8,9"])  # a bad first row does not set a width
    batches, ds = _texts(path, schema, on_error="skip", max_skip_fraction=1.0)
    assert [b.sparse_features.values().tolist() for b in batches] == [[7], [8]]
    assert ds.skips.examples == [f"{path}:1: expected at least 3 ','-separated fields, got 2"]


def test_weights_pair_with_their_ids_item_by_item(tmp_path):
    schema = {"label": 0, "header": False, "delimiter": "\t",
              "sparse": [{"name": "h", "column": 1, "num_embeddings": 10, "encoding": "int", "delimiter": "|", "weights": 2}]}  # fmt: skip
    path = tables.write_lines(tmp_path / "w.tsv", ["1\t1|2|\t0.5|0.2|9", "0\t|3\t7|0.25"])
    batches, _ = _texts(path, schema)
    assert [b.sparse_features.weights().tolist() for b in batches] == [[0.5, pytest.approx(0.2)], [0.25]]
    bad = tables.write_lines(tmp_path / "bad.tsv", ["1\t1|2\t0.5"])
    with pytest.raises(ValueError, match=r"bad.tsv:1: weights of sparse feature h"):
        _texts(bad, schema)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffclick,site\n1,a\n".encode("utf-8"))
    batches, _ = _texts(path, SIMPLE)
    assert batches[0].labels.tolist() == [1.0]


def test_parquet_integers_with_nulls_stay_exact_and_lists_are_checked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = Schema.from_dict({"label": "click", "sparse": [
        {"name": "id", "num_embeddings": 2**62, "encoding": "int"},
        {"name": "tags", "num_embeddings": 10, "encoding": "int", "delimiter": "|"}]})  # fmt: skip
    table = pa.table({"click": [1, 0, 1], "id": [2**53 + 1, None, 7], "tags": [[1, None, 3], [], None]})
    pq.write_table(table, tmp_path / "a.parquet")
    (batch,) = list(ParquetDataset([tmp_path / "a.parquet"], schema).batches(3))
    assert batch.sparse_features["id"].values().tolist() == [2**53 + 1, 7]  # not rounded through a float
    assert batch.sparse_features["tags"].values().tolist() == [1, 3]  # a null item is a missing value
    pq.write_table(pa.table({"click": [1], "id": [[1, 2]], "tags": [[1]]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b.parquet:row 1: sparse feature id .* must be non-negative integers"):
        list(ParquetDataset([tmp_path / "b.parquet"], schema).batches(1))


def test_the_fitting_pass_leaves_the_held_out_samples_out(tmp_path):
    from dist_rec.data.samples import held_out

    rows = [f"{i % 2},v{i}" for i in range(400)]
    path = tables.write_lines(tmp_path / "v.csv", ["click,site"] + rows)
    schema = Schema.from_dict({"label": "click", "sparse": [{"name": "site", "encoding": "vocab"}]})
    ds = TextDataset([path], schema, held_out=(0.25, 3))
    kept = {f"v{i}" for i in range(400) if not held_out(np.arange(400), 0.25, 3)[i]}
    assert set(ds.fitted.vocabularies["site"]) == kept and 250 < len(kept) < 350
