"""Readers of any CTR table under a ``Schema``: delimited text (CSV/TSV,
with or without a header, optionally gzip) and Parquet.

Both read the files as one stream of rows, chunk by chunk, parse each
chunk's columns with the schema (``ColumnParser``) and cut the samples into
this rank's batches (``RankBlocks``: the split of ``dist_rec.data.batch``,
so N processes see what one does). Every rank parses the whole stream:
which lines are samples, with ``on_error="skip"``, is known only so, and a
bad line then stops every rank alike instead of leaving the others waiting.
For epochs after the first, convert once to the binary format
(``python -m dist_rec.data.convert``): it maps instead of parsing, and it
shuffles.

A bad row (wrong field count, a label that is not 0/1, a dense cell that is
not a finite number, an id that cannot be read, weights that do not match
their ids) raises ``ValueError`` naming ``file:line``, the column and the
value with ``on_error="raise"``; with ``"skip"`` it is dropped and counted
(``skips``: ``dist_rec.data.skips``), and past ``max_skip_fraction`` of the
lines, or with no sample left, the stream stops with the counts.

Vocabularies and standardisation moments come from one pass over the
training files when the dataset is built (``fitted``); give the evaluation
dataset the training one's (``fitted=train.fitted``).
"""

from __future__ import annotations

import csv
import gzip
import itertools
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from dist_rec.data.batch import Batch
from dist_rec.data.samples import RankBlocks, SampleRows, held_out
from dist_rec.data.schema import ColumnKey, ColumnParser, FitAccumulator, Fitted, Schema
from dist_rec.data.skips import SkipCounter, SkipCounts

PathLike = Union[str, "os.PathLike[str]"]


class _TableDataset(SkipCounts):
    """What the text and Parquet readers share (``Dataset`` protocol)."""

    equal_batches_per_rank = True
    kind = "table"

    def __init__(self, paths, schema: Schema, on_error: str = "raise", max_skip_fraction: float = 0.01,
                 fitted: Optional[Fitted] = None, chunk_rows: int = 16384, held_out: Optional[Tuple[float, int]] = None) -> None:  # fmt: skip
        if not isinstance(schema, Schema):
            raise ValueError(f"Invalid schema={schema!r}. Must be a dist_rec.data.Schema.")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"Invalid on_error={on_error!r}. Must be 'raise' or 'skip'.")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
            raise ValueError(f"Invalid chunk_rows={chunk_rows!r}. Must be an int > 0.")
        self._paths = _check_paths(paths)
        self.schema = schema
        self._on_error = on_error
        self._max_skip_fraction = max_skip_fraction
        self._chunk_rows = chunk_rows
        self._held_out = held_out  # (fraction, seed): the evaluation's samples, left out of the fitting pass
        self.skips = SkipCounter(max_skip_fraction, ", ".join(str(p) for p in self._paths))
        for path in self._paths:  # every file has the schema's columns: said now, not at its first batch
            if path.stat().st_size:
                _column_index(schema, self._column_names(path), path)
        self.fitted = fitted if fitted is not None else (self._fit() if schema.needs_fit else Fitted())
        self._parser = ColumnParser(schema, self.fitted)

    # -- what the model is built from ------------------------------------------------

    @property
    def paths(self) -> List[Path]:
        return list(self._paths)

    @property
    def sparse_feature_names(self) -> List[str]:
        return self.schema.sparse_feature_names

    @property
    def dense_feature_names(self) -> List[str]:
        return self.schema.dense_feature_names

    @property
    def num_dense_features(self) -> int:
        return len(self.schema.dense)

    @property
    def num_embeddings_per_feature(self) -> List[int]:
        return [self._parser.num_embeddings(s) for s in self.schema.sparse]

    @property
    def feature_tables(self) -> List[str]:
        return [s.table for s in self.schema.sparse]

    @property
    def is_weighted(self) -> bool:
        return any(s.weights is not None for s in self.schema.sparse)

    # -- batches -------------------------------------------------------------------------

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                start_step: int = 0) -> Iterator[Batch]:  # fmt: skip
        """This rank's batches from global batch ``start_step`` on (the rows
        before it are parsed and dropped: convert to binary to seek)."""
        blocks = RankBlocks(batch_size, rank, world_size, drop_last, start_step)
        keys = self.sparse_feature_names
        return (rows.to_batch(keys) for rows in blocks(self._samples()))

    def _samples(self) -> Iterator[SampleRows]:
        self.skips = SkipCounter(self._max_skip_fraction, self.skips.what)
        for columns, num_rows, where in self._chunks():
            rows, faults = self._parser.parse(columns, num_rows)
            bad = np.flatnonzero(faults.reason != 0)
            if len(bad):
                if self._on_error == "raise":
                    raise ValueError(f"{where(int(bad[0]))}: {faults.message(int(bad[0]))}")
                shown = [f"{where(int(i))}: {faults.message(int(i))}" for i in bad[:10].tolist()]
                self.skips.add(num_rows, [faults.reason_name(int(i)) for i in bad.tolist()], shown)
                rows = rows.take(np.flatnonzero(faults.reason == 0))
            else:
                self.skips.add(num_rows, [], [])
            yield rows
        self.skips.finish()

    def _fit(self) -> Fitted:
        """One pass: vocabularies and moments, from the rows that parse."""
        placeholder = Fitted(
            vocabularies={s.name: [] for s in self.schema.sparse if s.encoding == "vocab"},
            moments={d.name: (0.0, 1.0) for d in self.schema.dense if d.transform == "standardize"},
        )
        parser, accumulator = ColumnParser(self.schema, placeholder), FitAccumulator(self.schema)
        index = 0  # of the valid samples, as the held-out split numbers them

        def training_part(good: np.ndarray) -> np.ndarray:
            nonlocal index
            rows = np.flatnonzero(good)
            keep = good.copy()
            keep[rows] = ~held_out(index + np.arange(len(rows)), *self._held_out)
            index += len(rows)
            return keep

        for columns, num_rows, _ in self._chunks():
            parser.fit(columns, num_rows, accumulator, training_part if self._held_out is not None else None)
        return accumulator.result()

    def _chunks(self) -> Iterator[Tuple[Dict[ColumnKey, np.ndarray], int, "callable"]]:
        """(raw columns by schema key, rows, row -> "file:line")."""
        raise NotImplementedError

    def _column_names(self, path: Path) -> Optional[List[str]]:
        """The file's column names (None: a text file without header or ``schema.columns``)."""
        raise NotImplementedError


class TextDataset(_TableDataset):
    """Delimited text files (``schema.delimiter``, ``schema.header``; ``.gz``
    decompressed on the fly) as one stream of batches.

    Example::

        schema = Schema.load("data/avazu.schema.yaml")
        ds = TextDataset(["train.csv"], schema)
        for batch in ds.batches(batch_size=2048, rank=rank, world_size=world_size):
            ...
    """

    kind = "text"

    def _column_names(self, path: Path) -> Optional[List[str]]:
        if not self.schema.header:
            return self.schema.columns
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                return next(csv.reader(f, delimiter=self.schema.delimiter, strict=True), [])
        except (OSError, EOFError, csv.Error) as error:
            raise ValueError(f"{path}: cannot read its header: {type(error).__name__}: {error}") from None

    def _chunks(self):
        for path in self._paths:
            try:
                yield from self._file_chunks(path)
            except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:  # a truncated .gz, an unreadable file
                raise ValueError(f"{path}: cannot be read past what was read so far: {type(error).__name__}: {error}") from None

    def _file_chunks(self, path: Path):
        opener = gzip.open if path.suffix == ".gz" else open
        # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name.
        with opener(path, "rt", newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.reader(f, delimiter=self.schema.delimiter, strict=True)
            names = self.schema.columns
            if self.schema.header:
                names = next(reader, None)
                if names is None:
                    return  # an empty file
            index = _column_index(self.schema, names, path)
            # Without names, a row must reach the last column the schema reads; with them, have them all.
            width = len(names) if names is not None else None
            least = max(index.values()) + 1
            last_line = reader.line_num
            while True:
                rows, first_lines = [], []
                for row in itertools.islice(reader, self._chunk_rows):
                    rows.append(row)
                    first_lines.append(last_line + 1)  # a quoted field may span lines: the record starts here
                    last_line = reader.line_num
                if not rows:
                    break
                yield self._columns(rows, width, least, index, path, first_lines)

    def _columns(self, rows: List[List[str]], width: Optional[int], least: int, index: Dict[ColumnKey, int], path: Path,
                 first_lines: List[int]):  # fmt: skip
        counts = np.array([len(r) for r in rows], dtype=np.int64)
        bad = counts != width if width is not None else counts < least
        if bad.any():
            rows = [[""] * least if wrong else r for r, wrong in zip(rows, bad.tolist())]
        columns = FieldCounts({key: np.array([r[i] for r in rows], dtype=object) for key, i in index.items()},
                              counts, bad, width if width is not None else f"at least {least}")  # fmt: skip
        return columns, len(rows), (lambda i: f"{path}:{first_lines[i]}")


class FieldCounts(dict):
    """Raw columns that also carry each row's number of fields and which
    rows have a wrong count, which the parser checks first (such a row gets
    empty cells)."""

    def __init__(self, columns, counts: np.ndarray, bad: np.ndarray, width) -> None:
        super().__init__(columns)
        self.counts, self.bad, self.width = counts, bad, width


class ParquetDataset(_TableDataset):
    """Parquet files (``pyarrow``, an optional dependency: ``pip install
    dist_rec[parquet]``) as one stream of batches. Columns are named by the
    schema; a multi-hot column may be a list column or delimited strings."""

    kind = "parquet"

    def __init__(self, *args, **kwargs) -> None:
        _pyarrow()  # a clear message before anything else
        super().__init__(*args, **kwargs)

    def _column_names(self, path: Path) -> Optional[List[str]]:
        try:
            return _pyarrow().ParquetFile(path).schema_arrow.names
        except Exception as error:  # pyarrow raises its own types
            raise ValueError(f"{path}: not a readable Parquet file ({error}).") from None

    def _chunks(self):
        pq = _pyarrow()
        for path in self._paths:
            try:
                parquet = pq.ParquetFile(path)
            except Exception as error:  # pyarrow raises its own types
                raise ValueError(f"{path}: not a readable Parquet file ({error}).") from None
            names = parquet.schema_arrow.names
            index = _column_index(self.schema, names, path)
            wanted = sorted(set(index.values()))
            first = 0
            for record_batch in parquet.iter_batches(batch_size=self._chunk_rows, columns=[names[i] for i in wanted]):
                arrays = {name: _arrow_column(record_batch.column(j)) for j, name in enumerate(record_batch.schema.names)}
                columns = {key: arrays[names[i]] for key, i in index.items()}
                n = record_batch.num_rows
                yield columns, n, (lambda i, base=first, p=path: f"{p}:row {base + i + 1}")
                first += n


def _arrow_column(array) -> np.ndarray:
    import pyarrow as pa

    kind = array.type
    if pa.types.is_floating(kind) or ((pa.types.is_integer(kind) or pa.types.is_boolean(kind)) and not array.null_count):
        return array.to_numpy(zero_copy_only=False)  # float nulls: NaN
    # Integers with nulls (as Python ints and None, not floats: ids past 2**53 stay exact), strings, lists:
    return np.array(array.to_pylist() + [None], dtype=object)[:-1]


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "Reading Parquet needs pyarrow, an optional dependency: pip install 'dist_rec[parquet]' (or pyarrow)."
        ) from None
    return pq


def _column_index(schema: Schema, names: Optional[Sequence[str]], path: Path) -> Dict[ColumnKey, int]:
    """Position of each column the schema reads, from names or positions."""
    index: Dict[ColumnKey, int] = {}
    for key in schema.column_keys():
        if isinstance(key, int):
            if names is not None and not 0 <= key < len(names):
                raise ValueError(f"{path}: the schema reads column #{key}, but the file has {len(names)} columns.")
            index[key] = key
        elif names is None:
            raise ValueError(f"{path}: the schema names column {key!r}, but the file has no header; give "
                             "schema.columns or column positions.")  # fmt: skip
        elif key not in names:
            raise ValueError(f"{path}: no column {key!r}; the columns are {list(names)}.")
        else:
            index[key] = list(names).index(key)
    return index


def _check_paths(paths) -> List[Path]:
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    result = [Path(os.fsdecode(p)) for p in paths]
    if not result:
        raise ValueError("Invalid paths=[]. Must name at least one file.")
    missing = [str(p) for p in result if not p.is_file()]
    if missing:
        raise ValueError(f"Invalid paths={[str(p) for p in result]}. Must be existing files; not found: {missing}.")
    return result
