"""A preprocessed dataset as memory-mapped ``.npy`` arrays.

Parsing text costs every epoch; these arrays are mapped, not read, so an
epoch costs only the pages the batches touch. A dataset is a directory:

* ``labels.npy``: float32 ``[N]``;
* ``dense.npy``: float32 ``[N, D]``;
* ``sparse_lengths.npy``: int32 ``[N, F]``, ids per (sample, feature);
* ``sparse_values.npy``: int64 ``[total ids]``, sample-major (sample 0's
  bags, feature 0 first, then sample 1's...), the order a file has;
* ``sample_offsets.npy``: int64 ``[N + 1]``, where each sample's ids start;
* ``sparse_weights.npy``: float32 beside the values, only for weighted
  features (a schema with per-id weights);
* ``meta.json``: format name and version, N, feature names, table sizes,
  the table of each feature (features may share one), the schema and its
  fitted vocabularies when written from one, and each array's dtype, shape
  and sha256.

A dataset is read in file order, or shuffled per epoch
(``shuffle_seed``: the order of epoch ``e`` is a permutation drawn from
(seed, e), the same on every world size), and may be restricted to a
subset of its samples (``select``: the held-out split, by index).

``write_binary_dataset`` streams batches into a temporary directory next to
the target and renames it into place only once complete, so a failed or
interrupted conversion never leaves a half dataset, nor costs the one that
was there. ``BinaryDataset`` checks the structure when it opens (files,
dtypes, shapes, sizes; with ``verify=True`` also checksums and offsets), not
the ids: an id beyond its table is the embedding module's to refuse.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from dist_rec.data.batch import Batch, concatenated_ranges, check_rank, kjt_from_sample_major, rank_block_ranges

FORMAT = "dist_rec.binary"
VERSION = 1
META_FILE = "meta.json"
LABELS_FILE = "labels.npy"
DENSE_FILE = "dense.npy"
LENGTHS_FILE = "sparse_lengths.npy"
VALUES_FILE = "sparse_values.npy"
OFFSETS_FILE = "sample_offsets.npy"
WEIGHTS_FILE = "sparse_weights.npy"
_DTYPES = {
    LABELS_FILE: np.dtype("<f4"),
    DENSE_FILE: np.dtype("<f4"),
    LENGTHS_FILE: np.dtype("<i4"),
    VALUES_FILE: np.dtype("<i8"),
    OFFSETS_FILE: np.dtype("<i8"),
    WEIGHTS_FILE: np.dtype("<f4"),
}
# Every .npy header is this long, so it can be written before the shape is
# known and rewritten in place at the end (a multiple of 64: aligned data).
_HEADER_BYTES = 128

PathLike = Union[str, "os.PathLike[str]"]


class BinaryDataset:
    """A directory written by ``write_binary_dataset`` (``Dataset`` protocol).

    Args:
        directory (str | Path): the dataset directory.
        verify (bool): also check every file's sha256 and that the offsets
            agree with the lengths; reads all the data once. (Default: False)

        shuffle_seed (int | None): shuffle the samples each epoch with this
            seed (None: file order). (Default: None)
        select (ndarray | None): read only these sample indices (sorted),
            e.g. one part of the held-out split. (Default: all)

    Raises ``ValueError`` naming the file when the directory is not a
    complete dataset of this format and version.
    """

    # With drop_last every rank yields the same number of batches (the split
    # in dist_rec.data.batch): the trainer needs no per-step agreement.
    equal_batches_per_rank = True

    def __init__(self, directory: PathLike, verify: bool = False, shuffle_seed: Optional[int] = None,
                 select: Optional[np.ndarray] = None) -> None:  # fmt: skip
        self._directory = Path(directory)
        if not self._directory.is_dir():
            raise ValueError(
                f"Invalid directory={str(directory)!r}. Must be a directory written by write_binary_dataset."
            )
        self._meta = _read_meta(self._directory / META_FILE)
        n, d = self._meta["num_samples"], self._meta["num_dense_features"]
        f, v = len(self._meta["sparse_feature_names"]), self._meta["num_values"]
        shapes = {
            LABELS_FILE: (n,),
            DENSE_FILE: (n, d),
            LENGTHS_FILE: (n, f),
            VALUES_FILE: (v,),
            OFFSETS_FILE: (n + 1,),
        }
        if self._meta["weighted"]:
            shapes[WEIGHTS_FILE] = (v,)
        self._arrays = {
            name: _open_array(self._directory / name, _DTYPES[name], shape) for name, shape in shapes.items()
        }
        self._shuffle_seed = shuffle_seed
        self._select = None if select is None else np.asarray(select, dtype=np.int64)
        if self._select is not None and len(self._select) and not (0 <= self._select.min() and self._select.max() < n):
            raise ValueError(f"Invalid select: sample indices must be in [0, {n}) for {self._directory}.")
        offsets = self._arrays[OFFSETS_FILE]
        if offsets[0] != 0 or offsets[-1] != v:
            raise ValueError(
                f"{self._directory / OFFSETS_FILE}: offsets run from {int(offsets[0])} to {int(offsets[-1])}; "
                f"expected 0 to num_values={v}."
            )
        if verify:
            self._verify()

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def meta(self) -> Dict[str, Any]:
        return copy.deepcopy(self._meta)

    @property
    def sparse_feature_names(self) -> List[str]:
        return list(self._meta["sparse_feature_names"])

    @property
    def dense_feature_names(self) -> Optional[List[str]]:
        names = self._meta["dense_feature_names"]
        return None if names is None else list(names)

    @property
    def num_dense_features(self) -> int:
        return self._meta["num_dense_features"]

    @property
    def num_embeddings_per_feature(self) -> List[int]:
        return list(self._meta["num_embeddings_per_feature"])

    @property
    def feature_tables(self) -> List[str]:
        return list(self._meta["feature_tables"])

    @property
    def is_weighted(self) -> bool:
        return bool(self._meta["weighted"])

    @property
    def num_samples(self) -> int:
        """Samples in the directory (``len`` counts only the selected ones)."""
        return self._meta["num_samples"]

    def __len__(self) -> int:
        return self._meta["num_samples"] if self._select is None else len(self._select)

    def subset(self, select: np.ndarray) -> "BinaryDataset":
        """The same directory restricted to ``select`` (indices into it)."""
        return BinaryDataset(self._directory, shuffle_seed=self._shuffle_seed, select=select)

    def order(self, epoch: int = 0) -> Optional[np.ndarray]:
        """The sample indices of epoch ``epoch`` in reading order (None: all, in file order)."""
        if self._shuffle_seed is None:
            return self._select
        count = len(self)
        permutation = np.random.default_rng([self._shuffle_seed, epoch]).permutation(count)
        return permutation if self._select is None else self._select[permutation]

    def batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = True, start_step: int = 0,
        epoch: int = 0,
    ) -> Iterator[Batch]:
        """This rank's batches of epoch ``epoch``, split as
        ``dist_rec.data.batch`` says, from global batch ``start_step`` on
        (a seek: the arrays are mapped)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"Invalid batch_size={batch_size!r}. Must be an int > 0.")
        check_rank(rank, world_size)
        return self._batches(batch_size, rank, world_size, drop_last, start_step, epoch)

    def _batches(self, batch_size: int, rank: int, world_size: int, drop_last: bool, start_step: int = 0,
                 epoch: int = 0) -> Iterator[Batch]:  # fmt: skip
        order = self.order(epoch)
        for start, stop in rank_block_ranges(len(self), batch_size, rank, world_size, drop_last, start_step):
            if order is None:
                yield self._contiguous(start, stop)
            else:
                yield self._gathered(order[start:stop])

    def _contiguous(self, start: int, stop: int) -> Batch:
        a = self._arrays
        lengths = np.asarray(a[LENGTHS_FILE][start:stop], dtype=np.int64)
        first, last = int(a[OFFSETS_FILE][start]), int(a[OFFSETS_FILE][stop])
        if lengths.sum() != last - first:
            raise ValueError(
                f"{self._directory / LENGTHS_FILE}: samples [{start}, {stop}) have {int(lengths.sum())} ids but "
                f"{OFFSETS_FILE} gives them {last - first}; the dataset is corrupt."
            )
        weights = np.asarray(a[WEIGHTS_FILE][first:last]) if WEIGHTS_FILE in a else None
        return Batch(
            dense_features=torch.from_numpy(np.array(a[DENSE_FILE][start:stop])),
            sparse_features=kjt_from_sample_major(self.sparse_feature_names, np.asarray(a[VALUES_FILE][first:last]),
                                                  lengths, weights),  # fmt: skip
            labels=torch.from_numpy(np.array(a[LABELS_FILE][start:stop])),
        )

    def _gathered(self, index: np.ndarray) -> Batch:
        """Samples ``index`` (any order): ids gathered sample by sample."""
        a = self._arrays
        lengths = np.asarray(a[LENGTHS_FILE][index], dtype=np.int64)
        starts, stops = a[OFFSETS_FILE][index], a[OFFSETS_FILE][index + 1]
        if not np.array_equal(lengths.sum(axis=1), stops - starts):
            raise ValueError(f"{self._directory / LENGTHS_FILE}: lengths disagree with {OFFSETS_FILE} in a batch of "
                             "shuffled samples; the dataset is corrupt.")  # fmt: skip
        gather = concatenated_ranges(np.asarray(starts), np.asarray(stops - starts))
        weights = np.asarray(a[WEIGHTS_FILE][gather]) if WEIGHTS_FILE in a else None
        return Batch(
            dense_features=torch.from_numpy(np.array(a[DENSE_FILE][index])),
            sparse_features=kjt_from_sample_major(self.sparse_feature_names, np.asarray(a[VALUES_FILE][gather]),
                                                  lengths, weights),  # fmt: skip
            labels=torch.from_numpy(np.array(a[LABELS_FILE][index])),
        )

    def _verify(self) -> None:
        for name, expected in self._meta["arrays"].items():
            digest = _sha256(self._directory / name)
            if digest != expected["sha256"]:
                raise ValueError(
                    f"{self._directory / name}: sha256 {digest} does not match {expected['sha256']} in {META_FILE}; "
                    "the file is corrupt."
                )
        lengths, offsets = self._arrays[LENGTHS_FILE], self._arrays[OFFSETS_FILE]
        step = 1 << 20
        for start in range(0, len(self), step):
            sizes = np.asarray(lengths[start : start + step], dtype=np.int64)
            if (sizes < 0).any():
                raise ValueError(f"{self._directory / LENGTHS_FILE}: negative lengths near sample {start}.")
            expected = int(offsets[start]) + np.cumsum(sizes.sum(axis=1))
            if not np.array_equal(expected, offsets[start + 1 : start + 1 + len(sizes)]):
                raise ValueError(
                    f"{self._directory / OFFSETS_FILE}: offsets disagree with {LENGTHS_FILE} near sample {start}."
                )


def write_binary_dataset(
    directory: PathLike,
    batches: Iterable[Batch],
    sparse_feature_names: Sequence[str],
    num_embeddings_per_feature: Sequence[int],
    *,
    dense_feature_names: Optional[Sequence[str]] = None,
    feature_tables: Optional[Sequence[str]] = None,
    weighted: bool = False,
    extra: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``batches`` (e.g. ``dataset.batches(b, drop_last=False)``, one
    rank) as a binary dataset in ``directory`` and returns its path.

    Streams: only one batch is in memory at a time. The result appears at
    ``directory`` only when complete. An existing non-empty ``directory`` is
    refused unless ``overwrite=True``, and then replaced only by a complete
    new dataset (and only if it is one itself: nothing else is deleted).
    Batches must carry ``sparse_feature_names`` in that order, with
    per-id weights exactly when ``weighted``. ``feature_tables`` names each
    feature's table (default: its own); ``extra`` (JSON-able: a schema and
    its vocabularies, say) is stored in meta.json as is.
    """
    names = list(sparse_feature_names)
    if not names or len(set(names)) != len(names) or not all(isinstance(k, str) and k for k in names):
        raise ValueError(f"Invalid sparse_feature_names={names!r}. Must be unique non-empty strings.")
    sizes = list(num_embeddings_per_feature)
    if len(sizes) != len(names) or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise ValueError(
            f"Invalid num_embeddings_per_feature={sizes!r}. Must be {len(names)} ints > 0, one per sparse feature."
        )
    dense_names = None if dense_feature_names is None else [str(k) for k in dense_feature_names]
    tables = list(names) if feature_tables is None else [str(t) for t in feature_tables]
    if len(tables) != len(names):
        raise ValueError(f"Invalid feature_tables={tables!r}. Must be {len(names)} table names, one per sparse feature.")
    for table in set(tables):
        shared = {sizes[i] for i, t in enumerate(tables) if t == table}
        if len(shared) > 1:
            raise ValueError(f"Invalid num_embeddings_per_feature={sizes!r}: the features of table {table!r} give it "
                             f"sizes {sorted(shared)}; a shared table has one size.")  # fmt: skip
    target = Path(directory)
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_directory(target, "tmp")
    try:
        meta = _write_arrays(staging, batches, names, dense_names, weighted)
        meta.update(
            sparse_feature_names=names,
            num_embeddings_per_feature=[int(s) for s in sizes],
            dense_feature_names=dense_names,
            feature_tables=tables,
            weighted=bool(weighted),
            extra=extra or {},
        )
        with open(staging / META_FILE, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _swap_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_arrays(staging: Path, batches: Iterable[Batch], names: List[str], dense_names, weighted: bool) -> Dict[str, Any]:
    files = [name for name in _DTYPES if weighted or name != WEIGHTS_FILE]
    writers = {name: _NpyWriter(staging / name, _DTYPES[name]) for name in files}
    try:
        num_samples = num_values = 0
        num_dense: Optional[int] = None
        writers[OFFSETS_FILE].write(np.zeros(1, dtype=np.int64))
        for i, batch in enumerate(batches):
            labels, dense, lengths, values, weights = _sample_major(batch, names, i, weighted)
            if num_dense is None:
                num_dense = dense.shape[1]
                if dense_names is not None and len(dense_names) != num_dense:
                    raise ValueError(
                        f"Invalid dense_feature_names={dense_names!r}. The batches have {num_dense} dense features."
                    )
            elif dense.shape[1] != num_dense:
                raise ValueError(f"Batch {i} has {dense.shape[1]} dense features; earlier batches had {num_dense}.")
            writers[LABELS_FILE].write(labels)
            writers[DENSE_FILE].write(dense)
            writers[LENGTHS_FILE].write(lengths)
            writers[VALUES_FILE].write(values)
            if weighted:
                writers[WEIGHTS_FILE].write(weights)
            writers[OFFSETS_FILE].write(num_values + np.cumsum(lengths.sum(axis=1, dtype=np.int64)))
            num_samples += len(labels)
            num_values += len(values)
        if num_dense is None:
            raise ValueError("No batches to write: a dataset needs at least one sample.")
        shapes = {
            LABELS_FILE: (num_samples,),
            DENSE_FILE: (num_samples, num_dense),
            LENGTHS_FILE: (num_samples, len(names)),
            VALUES_FILE: (num_values,),
            OFFSETS_FILE: (num_samples + 1,),
            WEIGHTS_FILE: (num_values,),
        }
        arrays = {}
        for name, writer in writers.items():
            writer.close(shapes[name])
            arrays[name] = {"dtype": _DTYPES[name].str, "shape": list(shapes[name]), "sha256": _sha256(writer.path)}
    finally:
        for writer in writers.values():
            writer.abort()
    return {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": num_samples,
        "num_values": num_values,
        "num_dense_features": num_dense,
        "arrays": arrays,
    }


def _sample_major(batch: Batch, names: List[str], index: int, weighted: bool):
    """A batch as (labels [B], dense [B, D], lengths [B, F], values,
    weights or None), the last three sample-major as the files store them."""
    kjt = batch.sparse_features
    if list(kjt.keys()) != names:
        raise ValueError(f"Batch {index} has sparse features {list(kjt.keys())}; expected {names}.")
    if (kjt.weights_or_none() is not None) != weighted:
        raise ValueError(f"Batch {index} has {'no ' if weighted else ''}per-id weights; the dataset is being written "
                         f"{'with' if weighted else 'without'} them (weighted={weighted}).")  # fmt: skip
    labels = batch.labels.detach().cpu().numpy().astype(np.float32, copy=False).reshape(-1)
    dense = batch.dense_features.detach().cpu().numpy().astype(np.float32, copy=False)
    size, num_features = len(labels), len(names)
    if dense.ndim != 2 or dense.shape[0] != size or kjt.stride() != size:
        raise ValueError(
            f"Batch {index}: labels {tuple(batch.labels.shape)}, dense {tuple(dense.shape)} and sparse stride "
            f"{kjt.stride()} disagree on the batch size."
        )
    lengths = kjt.lengths().detach().cpu().numpy().astype(np.int64, copy=False)
    offsets = kjt.offsets().detach().cpu().numpy().astype(np.int64, copy=False)
    values = kjt.values().detach().cpu().numpy()
    # Bag (feature f, sample b) sits at f * B + b; the file wants b * F + f.
    order = np.arange(num_features * size).reshape(num_features, size).T.reshape(-1)
    gather = concatenated_ranges(offsets[:-1][order], lengths[order])
    values = values[gather].astype(np.int64, copy=False)
    weights = kjt.weights().detach().cpu().numpy().astype(np.float32)[gather] if weighted else None
    return labels, dense, lengths[order].reshape(size, num_features).astype(np.int32), values, weights


class _NpyWriter:
    """Appends rows to a ``.npy`` file whose header (fixed size) is written
    for the final shape at ``close``."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self._dtype = dtype
        self._file = open(path, "wb")
        self._file.write(b"\0" * _HEADER_BYTES)

    def write(self, rows: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(rows, dtype=self._dtype).tobytes())

    def close(self, shape) -> None:
        self._file.seek(0)
        self._file.write(_npy_header(self._dtype, shape))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


def _npy_header(dtype: np.dtype, shape) -> bytes:
    """A version 1.0 ``.npy`` header (as NEP 1 defines it) padded to
    ``_HEADER_BYTES``."""
    text = repr({"descr": dtype.str, "fortran_order": False, "shape": tuple(int(s) for s in shape)}).encode("latin1")
    size = _HEADER_BYTES - 10  # magic, version and the length field take 10
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", size) + text.ljust(size - 1) + b"\n"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _is_dataset(directory: Path) -> bool:
    try:
        with open(directory / META_FILE) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ValueError(f"Invalid directory={str(target)!r}. Must be a directory, not a file.")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise ValueError(
                f"Invalid directory={str(target)!r}. Must be new or empty; pass overwrite=True to replace "
                "the dataset there."
            )
        if not _is_dataset(target):
            raise ValueError(
                f"Invalid directory={str(target)!r}. It is not empty and holds no {FORMAT} dataset "
                f"({META_FILE}); refusing to replace it even with overwrite=True."
            )


def _swap_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Renames the complete ``staging`` to ``target``; an old dataset there
    is moved aside first and deleted only after the rename succeeded."""
    _check_target(target, overwrite)  # it may have changed while writing
    old = None
    if target.is_dir() and any(target.iterdir()):
        old = _new_directory(target, "old")
        os.replace(target, old)  # onto the empty directory just made
    try:
        os.replace(staging, target)  # a directory may replace an empty one
    except OSError as e:
        if old is not None:
            os.replace(old, target)
        raise ValueError(f"Could not move the new dataset into {str(target)!r}: {e}") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_directory(target.parent)


def _new_directory(target: Path, kind: str) -> Path:
    """A fresh hidden directory beside ``target`` (same file system, so
    renames are atomic), with the umask's permissions, unlike mkdtemp's 0700."""
    while True:
        path = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_meta(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: missing; not a {FORMAT} dataset directory.")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: format {found!r}; expected {FORMAT!r}.")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: {FORMAT} version {meta.get('version')!r}; this reader reads version {VERSION}.")

    def bad(field: str, must: str) -> ValueError:
        return ValueError(f"{path}: {field}={meta.get(field)!r}; must be {must}.")

    for field in ("num_samples", "num_values", "num_dense_features"):
        value = meta.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(field, "an int >= 0")
    names = meta.get("sparse_feature_names")
    if not isinstance(names, list) or not all(isinstance(k, str) for k in names) or len(set(names)) != len(names):
        raise bad("sparse_feature_names", "a list of unique strings")
    sizes = meta.get("num_embeddings_per_feature")
    if (
        not isinstance(sizes, list)
        or len(sizes) != len(names)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
    ):
        raise bad("num_embeddings_per_feature", f"{len(names)} ints > 0, one per sparse feature")
    dense_names = meta.setdefault("dense_feature_names", None)
    if dense_names is not None and (
        not isinstance(dense_names, list) or len(dense_names) != meta["num_dense_features"]
    ):
        raise bad("dense_feature_names", f"null or {meta['num_dense_features']} names")
    meta.setdefault("feature_tables", list(names))
    meta.setdefault("weighted", False)
    meta.setdefault("extra", {})
    tables = meta["feature_tables"]
    if not isinstance(tables, list) or len(tables) != len(names) or not all(isinstance(t, str) for t in tables):
        raise bad("feature_tables", f"{len(names)} table names, one per sparse feature")
    if not isinstance(meta["weighted"], bool):
        raise bad("weighted", "true or false")
    expected_files = set(_DTYPES) if meta["weighted"] else set(_DTYPES) - {WEIGHTS_FILE}
    arrays = meta.get("arrays")
    if (
        not isinstance(arrays, dict)
        or set(arrays) != expected_files
        or not all(isinstance(a, dict) and isinstance(a.get("sha256"), str) for a in arrays.values())
    ):
        raise bad("arrays", f"a sha256 for each of {sorted(expected_files)}")
    return meta


def _open_array(path: Path, dtype: np.dtype, shape) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path}: missing.")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e}); the file is truncated or corrupt.") from e
    if array.dtype != dtype or array.shape != tuple(shape):
        raise ValueError(
            f"{path}: {array.dtype} {list(array.shape)}; expected {dtype} {list(shape)} (from {META_FILE})."
        )
    expected = array.offset + array.nbytes
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path}: {size} bytes; expected {expected} for {dtype} {list(shape)}.")
    return array
