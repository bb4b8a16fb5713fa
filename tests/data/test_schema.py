"""Schemas: validation by name, and parsed values against hand-computed ones."""

import math

import numpy as np
import pytest
import torch

from dist_rec.data.schema import ColumnParser, Fitted, Schema, criteo_schema, stable_hash
from dist_rec.data.tabular import TextDataset
from dist_rec.testing.tables import write_lines


def _schema(**overrides):
    values = {
        "label": "click",
        "dense": [{"name": "price", "transform": "log1p"}, {"name": "age", "transform": "standardize", "mean": 30.0, "std": 10.0}],
        "sparse": [
            {"name": "site", "num_embeddings": 1000},
            {"name": "cat", "num_embeddings": 50, "encoding": "int", "table": "shared"},
            {"name": "cat2", "num_embeddings": 50, "encoding": "int", "table": "shared"},
            {"name": "tags", "encoding": "vocab", "delimiter": "|"},
        ],
    }
    values.update(overrides)
    return Schema.from_dict(values)


def test_a_csv_with_a_header_parses_to_the_expected_values(tmp_path):
    path = write_lines(tmp_path / "a.csv", [
        "click,price,age,site,cat,cat2,tags",
        "1,3,40,abc,7,57,x|y",
        "0,,20,,8,9,",
        "1,0,30,abc,107,1,y|y|z",
    ])  # fmt: skip
    ds = TextDataset([path], _schema())
    assert ds.fitted.vocabularies == {"tags": ["y", "x", "z"]}  # by count, then by value
    assert ds.num_embeddings_per_feature == [1000, 50, 50, 4]
    assert ds.feature_tables == ["site", "shared", "shared", "tags"]
    (batch,) = list(ds.batches(3))
    assert batch.labels.tolist() == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(batch.dense_features.numpy(), [[math.log1p(3), 1.0], [0.0, -1.0], [0.0, 0.0]], rtol=1e-6)
    kjt = batch.sparse_features
    assert kjt.keys() == ["site", "cat", "cat2", "tags"]
    site = stable_hash("abc") % 1000
    assert kjt.lengths().tolist() == [1, 0, 1, 1, 1, 1, 1, 1, 1, 2, 0, 3]
    assert kjt.values().tolist() == [site, site, 7, 8, 7, 7, 9, 1, 2, 1, 1, 1, 3]


def test_stable_hash_is_the_same_in_every_process():
    # Fixed values: Python's own str hash is salted per process, this one must not be.
    assert stable_hash("abc") == stable_hash("abc") == 0x4DA8D6DD3A0AE9A6 >> 1 or stable_hash("abc") > 0
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "from dist_rec.data.schema import stable_hash; print(stable_hash('abc'))"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert int(out) == stable_hash("abc")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"sparse": []}, "no sparse"),
        ({"sparse": [{"name": "a", "num_embeddings": 0}]}, "Invalid num_embeddings=0 of sparse feature 'a'"),
        ({"sparse": [{"name": "a", "num_embeddings": 5, "encoding": "base64"}]}, "Invalid encoding='base64'"),
        ({"sparse": [{"name": "a", "num_embeddings": 5, "max_length": 3}]}, "Invalid max_length=3 of sparse feature 'a'"),
        ({"sparse": [{"name": "a", "num_embeddings": 5, "table": "t"}, {"name": "b", "num_embeddings": 6, "table": "t"}]},
         "share table 't'"),
        ({"sparse": [{"name": "a", "num_embeddings": 5}, {"name": "a", "num_embeddings": 5}]}, "named twice"),
        ({"dense": [{"name": "p", "transform": "sqrt"}]}, "Invalid transform='sqrt' of dense feature 'p'"),
        ({"sparse": [{"name": "a", "num_embeddings": 5, "colour": 1}]}, "Unknown key 'colour' in sparse column 'a'"),
        ({"labels": "x"}, "Unknown schema key 'labels'"),
    ],
)
def test_bad_schemas_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        _schema(**change)


def test_a_missing_column_and_a_headerless_name_are_refused(tmp_path):
    path = write_lines(tmp_path / "a.csv", ["click,price,age,site,cat,cat2", "1,3,40,abc,7,57"])
    with pytest.raises(ValueError, match=r"a.csv: no column 'tags'; the columns are"):
        TextDataset([path], _schema())
    with pytest.raises(ValueError, match="has no header"):
        TextDataset([path], _schema(header=False))


def test_bad_rows_raise_with_file_line_column_and_value(tmp_path):
    header = "click,price,age,site,cat,cat2,tags"
    cases = [
        ("2,1,1,a,1,1,x", r"a.csv:3: label \('click'\) must be 0 or 1, got '2'"),
        ("1,cheap,1,a,1,1,x", r"a.csv:3: dense feature price \(column 'price'\) must be a finite number, got 'cheap'"),
        ("1,inf,1,a,1,1,x", r"a.csv:3: dense feature price .* got 'inf'"),
        ("1,nan,1,a,1,1,x", r"a.csv:3: dense feature price .* got 'nan'"),
        ("1,1,1,a,x7,1,x", r"a.csv:3: sparse feature cat \(column 'cat', table shared\) must be non-negative integers, got 'x7'"),
        ("1,1,1,a,-5,1,x", r"a.csv:3: sparse feature cat .* must be non-negative integers, got '-5'"),
        ("1,1,1,a, 7 ,1,x", r"a.csv:3: sparse feature cat .* must be non-negative integers, got ' 7 '"),
        ("1,1,1,a,1,1", r"a.csv:3: expected 7 ','-separated fields, got 6"),
    ]
    for line, message in cases:
        path = write_lines(tmp_path / "a.csv", [header, "1,1,1,a,1,1,x", line])
        with pytest.raises(ValueError, match=message):
            list(TextDataset([path], _schema()).batches(1))


def test_criteo_schema_reads_criteo_lines_as_the_criteo_reader_does(tmp_path):
    import torch

    from dist_rec.data.criteo import CriteoTextDataset
    from dist_rec.testing.tables import criteo_lines

    path = write_lines(tmp_path / "day.tsv", criteo_lines(300, seed=3))
    sizes = [97 + i for i in range(26)]
    fast = list(CriteoTextDataset([path], sizes).batches(64, drop_last=False))
    generic = list(TextDataset([path], criteo_schema(sizes)).batches(64, drop_last=False))
    assert len(fast) == len(generic) == 5
    for a, b in zip(fast, generic):
        torch.testing.assert_close(a.dense_features, b.dense_features, rtol=1e-6, atol=1e-6)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def test_the_parser_refuses_an_unfitted_vocabulary():
    with pytest.raises(ValueError, match="needs a pass over the training files"):
        ColumnParser(_schema(), Fitted())


def test_a_schema_round_trips_through_a_yaml_file(tmp_path):
    import yaml

    schema = _schema()
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(schema.to_dict()))
    assert Schema.load(tmp_path / "s.yaml") == schema


def test_the_worked_schemas_of_docs_data_md_are_valid(tmp_path):
    import re

    import yaml

    from dist_rec.config import TrainConfig

    text = open("docs/data.md").read()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    schemas = [yaml.safe_load(b) for b in blocks if b.lstrip().startswith("label:") and "..." not in b]
    assert len(schemas) >= 4  # the general example, Avazu, MovieLens, the sequence
    for values in schemas:
        Schema.from_dict(values)
    (run,) = [yaml.safe_load(b) for b in blocks if b.lstrip().startswith("# avazu.yaml")]
    (tmp_path / "avazu.schema.yaml").write_text(yaml.safe_dump(schemas[1]))
    run["data"]["schema"] = str(tmp_path / "avazu.schema.yaml")
    TrainConfig.from_dict(run)


def test_a_sequence_keeps_its_last_items_with_their_weights(tmp_path):
    schema = Schema.from_dict({
        "label": 0, "header": False, "delimiter": "\t",
        "sparse": [{"name": "item", "column": 1, "num_embeddings": 100, "encoding": "int", "table": "items"},
                   {"name": "history", "column": 2, "num_embeddings": 100, "encoding": "int", "table": "items",
                    "delimiter": " ", "max_length": 3, "weights": 3}],
    })  # fmt: skip
    path = write_lines(tmp_path / "seq.tsv", ["1\t5\t1 2 3 4 205\t0.1 0.2 0.3 0.4 0.5", "0\t7\t\t", "1\t9\t8\t2.5"])
    (batch,) = list(TextDataset([path], schema).batches(3))
    kjt = batch.sparse_features
    assert kjt.lengths().tolist() == [1, 1, 1, 3, 0, 1]
    assert kjt.values().tolist() == [5, 7, 9, 3, 4, 5, 8]  # 205 % 100 = 5: the last three items
    torch.testing.assert_close(kjt.weights(), torch.tensor([1, 1, 1, 0.3, 0.4, 0.5, 2.5]))
    bad = write_lines(tmp_path / "bad.tsv", ["1\t5\t1 2\t0.1"])
    with pytest.raises(ValueError, match=r"bad.tsv:1: weights of sparse feature history .* must be 2 finite numbers"):
        list(TextDataset([bad], schema).batches(1))


def test_a_rating_becomes_a_label_by_its_threshold(tmp_path):
    schema = Schema.from_dict({"label": "rating", "label_threshold": 4.0,
                               "sparse": [{"name": "genres", "encoding": "vocab", "delimiter": "|"}]})  # fmt: skip
    path = write_lines(tmp_path / "r.csv", ["rating,genres", "4.5,Action|Comedy", "3.5,Comedy", "4,", "0.5,Drama|Comedy"])
    ds = TextDataset([path], schema)
    assert ds.fitted.vocabularies["genres"] == ["Comedy", "Action", "Drama"]
    (batch,) = list(ds.batches(4))
    assert batch.labels.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert batch.sparse_features.lengths().tolist() == [2, 1, 0, 2]
    assert batch.sparse_features.values().tolist() == [2, 1, 1, 3, 1]
    assert batch.dense_features.shape == (4, 0)
