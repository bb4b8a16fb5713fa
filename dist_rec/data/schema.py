"""What the columns of a CTR dataset mean: a ``Schema``.

A schema names the label column, the dense columns with their transform,
and the categorical columns with their table, how a value becomes a row id
(hashed into a fixed size, parsed as a decimal or hex integer, or looked up
in a vocabulary built in one pass over the training files), and whether a
cell holds one value, a delimited multi-hot list or a sequence cut to its
latest ``max_length`` items. Several features may name one table (they then
share its rows); a multi-hot feature may take per-id weights from a column
of its own.

A schema is plain data: ``Schema.from_dict`` reads the mapping a YAML file
or a config's ``data.schema`` holds, ``to_dict`` writes it back, and
``criteo_schema`` is Criteo's layout as one. ``ColumnParser`` turns the raw
columns of a chunk of rows (strings from text, arrays from Parquet) into
``SampleRows`` and, per row, the first fault found, so readers can raise or
skip with the file and line. docs/data.md has worked schemas.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from dist_rec.data.batch import concatenated_ranges
from dist_rec.data.samples import SampleRows

TRANSFORMS = ("log1p", "standardize", "none")
ENCODINGS = ("hash", "int", "hex", "vocab")
# Skip reasons of the schema readers, in the order a row is checked.
REASONS = ("field_count", "label", "dense", "category", "weights")
OOV_ID = 0  # a vocabulary's row for values it never saw (rows 1.. are the values by frequency)

ColumnKey = Union[str, int]


@dataclass
class DenseColumn:
    """A dense feature.

    Args:
        name: the feature's name.
        column: header name or 0-based position of its column (default: ``name``).
        transform: "log1p" (``log(1 + max(x, 0))``, Criteo's), "standardize"
            (``(x - mean) / std``, with ``mean``/``std`` given or measured in
            one pass over the training files) or "none".
        fill: the value of a missing cell, before the transform.
    """

    name: str
    column: Optional[ColumnKey] = None
    transform: str = "log1p"
    mean: Optional[float] = None
    std: Optional[float] = None
    fill: float = 0.0


@dataclass
class SparseColumn:
    """A categorical feature: one bag of row ids per sample.

    Args:
        name: the feature's name.
        column: header name or 0-based position of its column (default: ``name``).
        table: the table it looks up (default: its own, ``name``). Features
            naming the same table share its rows.
        num_embeddings: the table's rows ("hash", "int", "hex"; for "vocab"
            the vocabulary's size plus one row for unseen values is used).
        encoding: "hash" (a stable 64-bit hash of the text, modulo the
            size), "int" or "hex" (the value as an integer, modulo the size)
            or "vocab" (row of the value in a vocabulary of the training
            files, most frequent first; ``min_count`` drops rarer values to
            the unseen row 0).
        delimiter: a multi-hot cell's separator (None: one value per cell).
        max_length: a sequence keeps its last ``max_length`` items.
        weights: column of per-id weights, delimited as the ids.
    """

    name: str
    column: Optional[ColumnKey] = None
    table: Optional[str] = None
    num_embeddings: Optional[int] = None
    encoding: str = "hash"
    delimiter: Optional[str] = None
    max_length: Optional[int] = None
    weights: Optional[ColumnKey] = None
    min_count: int = 1


@dataclass
class Schema:
    """A dataset's columns (see the module docstring).

    Args:
        label: header name or position of the label column.
        dense / sparse: the features, in model order.
        label_threshold: a label is ``value >= label_threshold`` (ratings,
            for example); None: it must be 0 or 1.
        delimiter: the text files' field separator ("," ; "\\t" for TSV).
        header: whether text files start with a header line (column names).
        columns: the column names of text files without a header, so the
            features can name them (default: positions only).
    """

    label: ColumnKey
    dense: List[DenseColumn] = field(default_factory=list)
    sparse: List[SparseColumn] = field(default_factory=list)
    label_threshold: Optional[float] = None
    delimiter: str = ","
    header: bool = True
    columns: Optional[List[str]] = None

    def __post_init__(self) -> None:
        self.dense = [d if isinstance(d, DenseColumn) else _make(DenseColumn, d, "dense") for d in self.dense]
        self.sparse = [s if isinstance(s, SparseColumn) else _make(SparseColumn, s, "sparse") for s in self.sparse]
        for d in self.dense:
            d.column = d.name if d.column is None else d.column
        for s in self.sparse:
            s.column = s.name if s.column is None else s.column
            s.table = s.name if s.table is None else s.table
        self.validate()

    @staticmethod
    def from_dict(values: Dict[str, Any]) -> "Schema":
        if not isinstance(values, dict):
            raise ValueError(f"Invalid schema={values!r}. Must be a mapping with label, dense and sparse.")
        unknown = sorted(set(values) - {f for f in Schema.__dataclass_fields__})
        if unknown:
            raise ValueError(f"Unknown schema key {unknown[0]!r}. Valid keys: {sorted(Schema.__dataclass_fields__)}.")
        if "label" not in values:
            raise ValueError("Invalid schema: it names no label column (key 'label').")
        return Schema(**values)

    @staticmethod
    def load(path: Union[str, "os.PathLike[str]"]) -> "Schema":
        """A schema from a YAML file."""
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"Cannot read schema file {path}: {error}") from None
        try:
            return Schema.from_dict(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def dense_feature_names(self) -> List[str]:
        return [d.name for d in self.dense]

    @property
    def sparse_feature_names(self) -> List[str]:
        return [s.name for s in self.sparse]

    @property
    def needs_fit(self) -> bool:
        """Whether building it needs a pass over the training files (a
        vocabulary, or standardisation without given moments)."""
        return any(s.encoding == "vocab" for s in self.sparse) or any(
            d.transform == "standardize" and (d.mean is None or d.std is None) for d in self.dense
        )

    def validate(self) -> None:
        names = self.dense_feature_names + self.sparse_feature_names
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Invalid schema: feature {duplicates[0]!r} is named twice. Feature names must be unique.")
        if not self.sparse:
            raise ValueError("Invalid schema: no sparse (categorical) features. A DLRM needs at least one table.")
        if not isinstance(self.delimiter, str) or len(self.delimiter) != 1:
            raise ValueError(f"Invalid schema delimiter={self.delimiter!r}. Must be one character, e.g. ',' or '\\t'.")
        for d in self.dense:
            if d.transform not in TRANSFORMS:
                raise ValueError(f"Invalid transform={d.transform!r} of dense feature {d.name!r}. Must be one of {list(TRANSFORMS)}.")
            if d.std is not None and not (math.isfinite(d.std) and d.std > 0):
                raise ValueError(f"Invalid std={d.std!r} of dense feature {d.name!r}. Must be finite and > 0.")
        sizes: Dict[str, Tuple[str, Optional[int], str]] = {}
        for s in self.sparse:
            where = f"sparse feature {s.name!r} (table {s.table!r})"
            if s.encoding not in ENCODINGS:
                raise ValueError(f"Invalid encoding={s.encoding!r} of {where}. Must be one of {list(ENCODINGS)}.")
            if s.encoding != "vocab" and (
                isinstance(s.num_embeddings, bool) or not isinstance(s.num_embeddings, int) or s.num_embeddings < 1
            ):
                raise ValueError(f"Invalid num_embeddings={s.num_embeddings!r} of {where}. Must be an int >= 1 "
                                 f"for encoding {s.encoding!r}.")  # fmt: skip
            if s.max_length is not None and (s.delimiter is None or s.max_length < 1):
                raise ValueError(f"Invalid max_length={s.max_length!r} of {where}. Must be >= 1, on a delimited "
                                 "(multi-hot) column.")  # fmt: skip
            if s.weights is not None and s.delimiter is None:
                raise ValueError(f"Invalid weights={s.weights!r} of {where}. Per-id weights need a delimited column.")
            if s.min_count < 1:
                raise ValueError(f"Invalid min_count={s.min_count!r} of {where}. Must be >= 1.")
            if s.delimiter is not None and (not isinstance(s.delimiter, str) or not s.delimiter or s.delimiter == self.delimiter):
                raise ValueError(f"Invalid delimiter={s.delimiter!r} of {where}. Must be a non-empty string other "
                                 f"than the field separator {self.delimiter!r}.")  # fmt: skip
            other = sizes.setdefault(s.table, (s.name, s.num_embeddings, s.encoding))
            if other[1:] != (s.num_embeddings, s.encoding):
                raise ValueError(f"Invalid schema: features {other[0]!r} and {s.name!r} share table {s.table!r} but "
                                 f"give it {other[2]}/{other[1]} and {s.encoding}/{s.num_embeddings} "
                                 "(encoding/num_embeddings). Shared tables need the same.")  # fmt: skip
            if s.encoding == "vocab" and other[0] != s.name:
                raise ValueError(f"Invalid schema: vocabulary table {s.table!r} is shared by {other[0]!r} and "
                                 f"{s.name!r}; a vocabulary is per feature (use encoding 'hash' to share).")  # fmt: skip

    def column_keys(self) -> List[ColumnKey]:
        """Every column the schema reads, label first."""
        keys: List[ColumnKey] = [self.label]
        keys += [d.column for d in self.dense]
        for s in self.sparse:
            keys.append(s.column)
            if s.weights is not None:
                keys.append(s.weights)
        return list(dict.fromkeys(keys))


def criteo_schema(num_embeddings_per_feature: Union[int, Sequence[int]]) -> Schema:
    """Criteo's layout (no header; label, 13 integer columns, 26 hex
    categories; tab-separated) with the transforms of ``CriteoTextDataset``."""
    sizes = [num_embeddings_per_feature] * 26 if isinstance(num_embeddings_per_feature, int) else list(num_embeddings_per_feature)
    if len(sizes) != 26:
        raise ValueError(f"Invalid num_embeddings_per_feature={num_embeddings_per_feature!r}. Must be an int or 26 ints.")
    return Schema(
        label=0,
        dense=[DenseColumn(f"int_{i}", column=1 + i, transform="log1p") for i in range(13)],
        sparse=[SparseColumn(f"cat_{i}", column=14 + i, num_embeddings=int(sizes[i]), encoding="hex") for i in range(26)],
        delimiter="\t",
        header=False,
    )


def _make(cls, values, kind: str):
    if not isinstance(values, dict) or "name" not in values:
        raise ValueError(f"Invalid {kind} column {values!r}. Must be a mapping with at least 'name'.")
    unknown = sorted(set(values) - set(cls.__dataclass_fields__))
    if unknown:
        raise ValueError(f"Unknown key {unknown[0]!r} in {kind} column {values['name']!r}. Valid keys: "
                         f"{sorted(cls.__dataclass_fields__)}.")  # fmt: skip
    return cls(**values)


# -- fitted state: vocabularies and moments ------------------------------------


@dataclass
class Fitted:
    """What one pass over the training files adds to a schema: each vocab
    feature's values by row (row 0 is the unseen value's) and each
    standardised column's mean and std. Plain data: stored in a binary
    dataset's meta.json."""

    vocabularies: Dict[str, List[str]] = field(default_factory=dict)
    moments: Dict[str, Tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"vocabularies": self.vocabularies, "moments": {k: list(v) for k, v in self.moments.items()}}

    @staticmethod
    def from_dict(values: Optional[Dict[str, Any]]) -> "Fitted":
        values = values or {}
        return Fitted(dict(values.get("vocabularies", {})), {k: (float(a), float(b)) for k, (a, b) in values.get("moments", {}).items()})


class FitAccumulator:
    """Collects vocab counts and moments chunk by chunk (``ColumnParser.fit``)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.counts: Dict[str, Counter] = {s.name: Counter() for s in schema.sparse if s.encoding == "vocab"}
        self.sums: Dict[str, List[float]] = {
            d.name: [0.0, 0.0, 0.0] for d in schema.dense if d.transform == "standardize" and (d.mean is None or d.std is None)
        }

    def result(self) -> Fitted:
        fitted = Fitted()
        by_name = {s.name: s for s in self.schema.sparse}
        for name, counts in self.counts.items():
            keep = [(value, n) for value, n in counts.items() if n >= by_name[name].min_count]
            keep.sort(key=lambda item: (-item[1], item[0]))  # most frequent first; ties by value: deterministic
            fitted.vocabularies[name] = [value for value, _ in keep]
        for name, (n, total, squares) in self.sums.items():
            if n == 0:  # no usable row: the reading pass says so, with the counts
                fitted.moments[name] = (0.0, 1.0)
                continue
            mean = total / n
            std = math.sqrt(max(squares / n - mean * mean, 0.0))
            fitted.moments[name] = (mean, std if std > 0 else 1.0)
        return fitted


# -- parsing -----------------------------------------------------------------------


class RowFaults:
    """The first fault of each row of a chunk: a reason code (0: none) and
    a message made on demand (only the first few are ever shown)."""

    def __init__(self, num_rows: int) -> None:
        self.reason = np.zeros(num_rows, dtype=np.int8)
        self._messages: List[Tuple[np.ndarray, Callable[[int], str]]] = []

    def add(self, reason: str, bad: np.ndarray, message: Callable[[int], str]) -> None:
        """Rows ``bad`` (a mask) have fault ``reason`` unless an earlier
        check already faulted them; ``message(i)`` describes row i's."""
        new = bad & (self.reason == 0)
        if new.any():
            self.reason[new] = REASONS.index(reason) + 1
            self._messages.append((new, message))

    def message(self, row: int) -> str:
        for mask, message in self._messages:
            if mask[row]:
                return message(row)
        return "no fault"

    def reason_name(self, row: int) -> str:
        return REASONS[self.reason[row] - 1]


class ColumnParser:
    """Turns a chunk's raw columns into ``SampleRows`` under a schema.

    Raw columns are numpy arrays indexed by row: strings (object or unicode
    arrays; "" or None is a missing cell), numbers (Parquet's numeric
    columns; NaN is a missing dense value), or for a multi-hot column
    possibly lists (Parquet list columns).
    """

    def __init__(self, schema: Schema, fitted: Optional[Fitted] = None) -> None:
        self.schema = schema
        self.fitted = fitted or Fitted()
        missing = [s.name for s in schema.sparse if s.encoding == "vocab" and s.name not in self.fitted.vocabularies]
        missing += [d.name for d in schema.dense if d.transform == "standardize" and d.mean is None and d.name not in self.fitted.moments]
        if missing:
            raise ValueError(f"The schema needs a pass over the training files first (vocabulary or moments of "
                             f"{missing}); build the dataset from the training files.")  # fmt: skip
        self._lookups = {
            name: {value: row + 1 for row, value in enumerate(values)} for name, values in self.fitted.vocabularies.items()
        }

    def num_embeddings(self, feature: SparseColumn) -> int:
        if feature.encoding == "vocab":
            return len(self.fitted.vocabularies[feature.name]) + 1
        return int(feature.num_embeddings)

    def parse(self, columns: Dict[ColumnKey, np.ndarray], num_rows: int) -> Tuple[SampleRows, RowFaults]:
        faults = self._field_counts(columns, num_rows)
        labels = self._labels(columns[self.schema.label], faults)
        dense = np.zeros((num_rows, len(self.schema.dense)), dtype=np.float32)
        for j, d in enumerate(self.schema.dense):
            dense[:, j] = self._dense(d, columns[d.column], faults)
        lengths = np.zeros((num_rows, len(self.schema.sparse)), dtype=np.int64)
        ids, weights = [], []
        for j, s in enumerate(self.schema.sparse):
            bags, bag_weights = self._sparse(s, columns[s.column], columns.get(s.weights) if s.weights is not None else None, faults)
            lengths[:, j] = [len(b) for b in bags] if s.delimiter is not None else (bags >= 0)
            ids.append(bags)
            weights.append(bag_weights)
        return self._assemble(labels, dense, lengths, ids, weights), faults

    def _check_rows(self, columns, num_rows: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """Which rows parse (vocabulary features aside: any text is a value),
        and each dense column's values before its transform."""
        faults = self._field_counts(columns, num_rows)
        self._labels(columns[self.schema.label], faults)
        dense = {d.name: self._dense(d, columns[d.column], faults, untransformed=True) for d in self.schema.dense}
        for s in self.schema.sparse:
            if s.encoding != "vocab":
                self._sparse(s, columns[s.column], columns.get(s.weights) if s.weights is not None else None, faults)
        return faults.reason == 0, dense

    def fit(self, columns: Dict[ColumnKey, np.ndarray], num_rows: int, accumulator: FitAccumulator,
            keep: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> None:  # fmt: skip
        """Adds a chunk's rows to ``accumulator``: those that parse, or
        ``keep(rows that parse)`` of them (the held-out split's training part)."""
        good, dense = self._check_rows(columns, num_rows)
        good = good if keep is None else keep(good)
        for name, sums in accumulator.sums.items():
            x = dense[name][good].astype(np.float64)
            sums[0] += len(x)
            sums[1] += float(x.sum())
            sums[2] += float((x * x).sum())
        for s in self.schema.sparse:
            if s.encoding == "vocab":
                counts = accumulator.counts[s.name]
                for cell in columns[s.column][good]:
                    counts.update(_tokens(cell, s))

    # -- columns ----------------------------------------------------------------

    def _field_counts(self, columns, num_rows: int) -> RowFaults:
        faults = RowFaults(num_rows)
        counts = getattr(columns, "counts", None)  # text rows: fields per row (tabular.FieldCounts)
        if counts is not None:
            width, sep = columns.width, self.schema.delimiter
            faults.add("field_count", columns.bad, lambda i: f"expected {width} {sep!r}-separated fields, got {counts[i]}")
        return faults

    def _labels(self, raw: np.ndarray, faults: RowFaults) -> np.ndarray:
        name = _column_name(self.schema.label)
        values, bad = _numbers(raw)
        bad |= np.isnan(values)
        threshold = self.schema.label_threshold
        if threshold is None:
            bad |= (values != 0) & (values != 1)
            rule = "0 or 1"
        else:
            rule = "a number"
            values = (values >= threshold).astype(np.float64)
        faults.add("label", bad, lambda i: f"label ({name}) must be {rule}, got {_show(raw[i])}")
        return np.where(bad, 0, values).astype(np.float32)

    def _dense(self, d: DenseColumn, cells: np.ndarray, faults: RowFaults, untransformed: bool = False) -> np.ndarray:
        values, bad = _numbers(cells)
        bad |= np.isinf(values)
        faults.add("dense", bad, lambda i: f"dense feature {d.name} (column {_column_name(d.column)}) must be a "
                                           f"finite number, got {_show(cells[i])}")  # fmt: skip
        values = np.where(np.isnan(values) | bad, d.fill, values)
        if untransformed:
            return values
        if d.transform == "log1p":
            return np.log1p(np.maximum(values, 0.0))
        if d.transform == "standardize":
            mean, std = (d.mean, d.std) if d.mean is not None and d.std is not None else self.fitted.moments[d.name]
            return (values - mean) / std
        return values

    def _sparse(self, s: SparseColumn, raw: np.ndarray, raw_weights: Optional[np.ndarray], faults: RowFaults):
        """Single-valued: ids ``[n]`` (-1: missing). Multi-hot: a list of id
        arrays. With the weights, as lists too."""
        size = self.num_embeddings(s)
        where = f"sparse feature {s.name} (column {_column_name(s.column)}, table {s.table})"
        if s.delimiter is None:
            present = np.array([_present(v) for v in raw], dtype=bool) if len(raw) else np.zeros(0, dtype=bool)
            lists = np.array([isinstance(v, (list, tuple, np.ndarray)) for v in raw], dtype=bool) if len(raw) else present
            present &= ~lists  # a list in a one-value column: refused below, never hashed as its repr
            ids = np.full(len(raw), -1, dtype=np.int64)
            encoded, bad = self._encode(s, raw[present], size)
            ids[present] = encoded
            bad_rows = lists.copy()
            bad_rows[present] = bad
            faults.add("category", bad_rows, lambda i: f"{where} must be {_RULE[s.encoding]}, got {_show(raw[i])}")
            return ids, None
        bags: List[np.ndarray] = []
        bad_rows = np.zeros(len(raw), dtype=bool)
        tokens = [_tokens(cell, s) for cell in raw]
        flat = np.array([t for cell in tokens for t in cell], dtype=object)
        encoded, bad = self._encode(s, flat, size)
        start = 0
        for i, cell in enumerate(tokens):
            stop = start + len(cell)
            bags.append(encoded[start:stop])
            bad_rows[i] = bad[start:stop].any()
            start = stop
        faults.add("category", bad_rows, lambda i: f"{where} must hold {_RULE[s.encoding]} separated by "
                                                   f"{s.delimiter!r}, got {_show(raw[i])}")  # fmt: skip
        if raw_weights is None:
            return bags, None
        bag_weights: List[np.ndarray] = []
        bad_weights = np.zeros(len(raw), dtype=bool)
        for i, (cell, weight_cell) in enumerate(zip(raw, raw_weights)):
            # Paired item by item as written: an empty id drops its weight with it.
            items, weight_items = _split(cell, s.delimiter, keep_empty=True), _split(weight_cell, s.delimiter, keep_empty=True)
            w = np.zeros(len(bags[i]), dtype=np.float32)
            if len(items) != len(weight_items):
                bad_weights[i] = True
            else:
                kept = [x for t, x in zip(items, weight_items) if t != ""]
                if s.max_length is not None:
                    kept = kept[-s.max_length :]
                try:
                    w = np.array([float(x) for x in kept], dtype=np.float32)
                except (TypeError, ValueError):
                    bad_weights[i] = True
                    w = np.zeros(len(bags[i]), dtype=np.float32)
                if len(w) != len(bags[i]) or not np.isfinite(w).all():
                    bad_weights[i] = True
                    w = np.zeros(len(bags[i]), dtype=np.float32)
            bag_weights.append(w)
        faults.add("weights", bad_weights, lambda i: f"weights of {where} (column {_column_name(s.weights)}) must be "
                                                     f"{len(bags[i])} finite numbers separated by {s.delimiter!r}, "
                                                     f"got {_show(raw_weights[i])}")  # fmt: skip
        return bags, bag_weights

    def _encode(self, s: SparseColumn, values: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
        """Row ids of non-missing values, and which could not be read."""
        if len(values) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        if s.encoding == "vocab":
            lookup = self._lookups[s.name]
            return np.array([lookup.get(_text(v), OOV_ID) for v in values], dtype=np.int64), np.zeros(len(values), dtype=bool)
        unique, inverse = np.unique(np.array([_text(v) for v in values], dtype=object), return_inverse=True)
        codes = np.empty(len(unique), dtype=np.int64)
        bad = np.zeros(len(unique), dtype=bool)
        for k, text in enumerate(unique.tolist()):
            try:
                codes[k] = _ENCODERS[s.encoding](text) % size
            except ValueError:
                codes[k], bad[k] = 0, True
        return codes[inverse.reshape(-1)], bad[inverse.reshape(-1)]

    def _assemble(self, labels, dense, lengths, ids, weights) -> SampleRows:
        """Sample-major values (row 0's bags, feature 0 first; then row
        1's...) from the per-feature ids, as a file holds them."""
        num_rows, num_features = lengths.shape
        weighted = any(w is not None for w in weights)
        flat_ids, flat_weights = [], []
        for j, s in enumerate(self.schema.sparse):
            if s.delimiter is None:
                flat_ids.append(ids[j][ids[j] >= 0])
                if weighted:
                    flat_weights.append(np.ones(int(lengths[:, j].sum()), dtype=np.float32))
            else:
                flat_ids.append(np.concatenate(ids[j]) if num_rows else np.zeros(0, dtype=np.int64))
                if weighted:
                    w = weights[j] if weights[j] is not None else [np.ones(len(b), np.float32) for b in ids[j]]
                    flat_weights.append(np.concatenate(w) if num_rows else np.zeros(0, dtype=np.float32))
        values_fm = np.concatenate(flat_ids).astype(np.int64) if flat_ids else np.zeros(0, dtype=np.int64)
        lengths_fm = lengths.T.reshape(-1)  # bag (feature j, row i) at j * n + i
        starts = np.zeros(len(lengths_fm), dtype=np.int64)
        np.cumsum(lengths_fm[:-1], out=starts[1:])
        order = np.arange(num_features * num_rows).reshape(num_features, num_rows).T.reshape(-1)
        gather = concatenated_ranges(starts[order], lengths_fm[order])
        values = values_fm[gather]
        w = np.concatenate(flat_weights).astype(np.float32)[gather] if weighted else None
        return SampleRows.build(labels, dense, lengths, values, w)


def stable_hash(text: str) -> int:
    """A 63-bit hash of ``text`` that is the same in every process and run
    (Python's ``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little") >> 1


_DECIMAL = re.compile(r"[0-9]+")
_HEX = re.compile(r"[0-9a-fA-F]+")


def _strict(pattern: "re.Pattern", base: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not pattern.fullmatch(text):  # int() would take " 7 ", "1_0" and "-5" (then wrapped into the table)
            raise ValueError(text)
        return int(text, base)

    return parse


_ENCODERS: Dict[str, Callable[[str], int]] = {"hash": stable_hash, "int": _strict(_DECIMAL, 10), "hex": _strict(_HEX, 16)}
_RULE = {"hash": "one value (text)", "int": "non-negative integers", "hex": "hex strings", "vocab": "one value (text)"}


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float):
        return not math.isnan(value)
    return not (isinstance(value, str) and value == "")


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))  # a Parquet float column of integer ids
    return str(value)


def _split(cell, delimiter: str, keep_empty: bool = False) -> List[str]:
    """A multi-hot cell's items: delimited text, or a Parquet list (whose
    nulls, like empty items, are missing values: dropped, unless kept to
    pair items with their weights)."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)) or (isinstance(cell, str) and cell == ""):
        return []
    if isinstance(cell, (list, tuple, np.ndarray)):
        items = ["" if x is None else _text(x) for x in cell]
    else:
        items = str(cell).split(delimiter)
    return items if keep_empty else [t for t in items if t != ""]


def _tokens(cell, s: SparseColumn) -> List[str]:
    if s.delimiter is None:
        return [_text(cell)] if _present(cell) else []
    items = _split(cell, s.delimiter)
    return items[-s.max_length :] if s.max_length is not None else items


def _numbers(raw: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Floats of a column (NaN: missing) and which cells are not numbers."""
    if raw.dtype.kind in "fiub":
        return raw.astype(np.float64), np.zeros(len(raw), dtype=bool)
    cells = np.asarray(raw, dtype=object)
    missing = np.array([c is None or c == "" for c in cells.tolist()], dtype=bool) if len(cells) else np.zeros(0, bool)
    values = np.full(len(cells), np.nan, dtype=np.float64)
    bad = np.zeros(len(cells), dtype=bool)
    try:
        values[~missing] = cells[~missing].astype(np.float64)  # float() per cell, in C
    except (TypeError, ValueError):
        for i in np.flatnonzero(~missing).tolist():
            try:
                values[i] = float(cells[i])
            except (TypeError, ValueError):
                bad[i] = True
    bad |= np.isnan(values) & ~missing  # "nan" in a file is not a missing value
    return values, bad


def _column_name(key: ColumnKey) -> str:
    return f"#{key}" if isinstance(key, int) else repr(key)


def _show(value, limit: int = 40) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")
