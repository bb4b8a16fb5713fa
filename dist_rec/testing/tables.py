"""Small CTR files in the shapes users bring, with their schemas, for the
tests and ``benchmarks/bench_data.py``: an Avazu-like CSV (header, string
categories), a MovieLens-like file (``|``-separated multi-hot genres, a
rating as the label), a Taobao-like TSV without a header (a behaviour
sequence with per-item weights), and Criteo's TSV. Labels follow a hidden
rule of the categories, so a model can learn them (AUC above 0.5).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List

AVAZU_SCHEMA: Dict = {
    "label": "click",
    "dense": [{"name": "hour", "transform": "standardize"}, {"name": "C15", "transform": "log1p"}],
    "sparse": [
        {"name": "C1", "num_embeddings": 64, "encoding": "int"},
        {"name": "banner_pos", "encoding": "vocab"},
        {"name": "site_id", "num_embeddings": 500},
        {"name": "site_category", "num_embeddings": 50},
        {"name": "app_id", "num_embeddings": 500},
        {"name": "device_type", "encoding": "vocab"},
        {"name": "C14", "num_embeddings": 300, "table": "C14_C17"},
        {"name": "C17", "num_embeddings": 300, "table": "C14_C17"},
    ],
}

MOVIELENS_SCHEMA: Dict = {
    "label": "rating",
    "label_threshold": 4.0,
    "dense": [{"name": "timestamp", "transform": "standardize"}],
    "sparse": [
        {"name": "userId", "num_embeddings": 200, "encoding": "int"},
        {"name": "movieId", "num_embeddings": 400, "encoding": "int"},
        {"name": "genres", "encoding": "vocab", "delimiter": "|"},
    ],
}

SEQUENCE_SCHEMA: Dict = {
    "label": "clk",
    "header": False,
    "delimiter": "\t",
    "columns": ["clk", "price", "user", "item", "history", "dwell"],
    "dense": [{"name": "price", "transform": "log1p"}],
    "sparse": [
        {"name": "user", "num_embeddings": 300, "encoding": "int"},
        {"name": "item", "num_embeddings": 1000, "encoding": "int", "table": "items"},
        {"name": "history", "num_embeddings": 1000, "encoding": "int", "table": "items", "delimiter": " ",
         "max_length": 5, "weights": "dwell"},
    ],
}

GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]  # fmt: skip


def _click(rng: random.Random, *keys) -> int:
    score = sum((hash_of(k) % 7) - 3 for k in keys) / 3.0
    return int(rng.random() < 1 / (1 + pow(2.718281828, -score)))


def hash_of(key) -> int:
    """A small deterministic hash (Python's str hash is salted per process)."""
    h = 2166136261
    for ch in str(key):
        h = ((h ^ ord(ch)) * 16777619) % 2**32
    return h


def avazu_lines(count: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    rows = ["id,click,hour,C1,banner_pos,site_id,site_category,app_id,device_type,C14,C15,C17"]
    for i in range(count):
        site = f"{rng.randrange(300):08x}"
        app = f"{int(rng.paretovariate(1.2)) % 400:08x}"
        banner = str(rng.choice([0, 0, 0, 1, 1, 2, 7]))
        device = str(rng.choice([0, 1, 1, 1, 4, 5]))
        c14 = str(rng.randrange(15000, 15300))
        click = _click(rng, site, app, banner)
        hour = f"141021{rng.randrange(10):02d}{rng.randrange(24):02d}"
        category = "" if rng.random() < 0.05 else f"{rng.randrange(20):06x}"
        rows.append(",".join([str(10**18 + i), str(click), hour, str(rng.choice([1005, 1002, 1010])), banner, site,
                              category, app, device, c14, str(rng.choice([320, 300, 216])), str(rng.randrange(100, 400))]))  # fmt: skip
    return rows


def movielens_lines(count: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    rows = ["userId,movieId,rating,timestamp,genres"]
    for _ in range(count):
        user, movie = rng.randrange(150), rng.randrange(350)
        genres = rng.sample(GENRES, rng.choice([0, 1, 1, 2, 3])) if movie % 23 else []
        good = _click(rng, user % 5, movie, *genres[:1])
        rating = rng.choice([4.0, 4.5, 5.0]) if good else rng.choice([0.5, 1.0, 2.0, 3.0, 3.5])
        genre_text = "|".join(genres) if genres else "(no genres listed)"
        rows.append(f"{user},{movie},{rating},{964982703 + rng.randrange(10**7)},{genre_text}")
    return rows


def sequence_lines(count: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        user, item = rng.randrange(300), rng.randrange(1000)
        history = [rng.randrange(1000) for _ in range(rng.randrange(0, 9))]
        dwell = [f"{rng.uniform(0.1, 3.0):.2f}" for _ in history]
        click = _click(rng, item % 13, *(h % 13 for h in history[-2:]))
        price = f"{rng.uniform(1, 500):.2f}"
        rows.append("\t".join([str(click), price, str(user), str(item), " ".join(map(str, history)), " ".join(dwell)]))
    return rows


def criteo_lines(count: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        cats = ["" if rng.random() < 0.1 else f"{rng.randrange(16**8):08x}" for _ in range(26)]
        label = str(_click(rng, *cats[:3]))
        ints = ["" if rng.random() < 0.1 else str(rng.randint(-2, 500)) for _ in range(13)]
        rows.append("\t".join([label] + ints + cats))
    return rows


def write_lines(path: Path, lines: List[str]) -> Path:
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(csv_path: Path, parquet_path: Path, schema: Dict, list_column: str = "") -> Path:
    """The same rows as Parquet: every column as text (as the CSV has it),
    and ``list_column`` (a delimited multi-hot column) as a list column."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    header = schema.get("header", True)
    read = pa_csv.ReadOptions(column_names=None if header else schema["columns"])
    parse = pa_csv.ParseOptions(delimiter=schema.get("delimiter", ","))
    table = pa_csv.read_csv(csv_path, read_options=read, parse_options=parse,
                            convert_options=pa_csv.ConvertOptions(strings_can_be_null=False,
                                                                  column_types={n: pa.string() for n in _names(csv_path, schema)}))  # fmt: skip
    if list_column:
        delimiter = next(s["delimiter"] for s in schema["sparse"] if s["name"] == list_column)
        values = [[t for t in (v or "").split(delimiter) if t] for v in table.column(list_column).to_pylist()]
        table = table.set_column(table.schema.get_field_index(list_column), list_column, pa.array(values, pa.list_(pa.string())))
    pq.write_table(table, parquet_path)
    return Path(parquet_path)


def _names(csv_path: Path, schema: Dict) -> List[str]:
    if not schema.get("header", True):
        return list(schema["columns"])
    with open(csv_path) as f:
        return f.readline().rstrip("\n").split(schema.get("delimiter", ","))
