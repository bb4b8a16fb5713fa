"""Reader of the raw Criteo Kaggle / Terabyte text format, streamed.

Each line is ``label``, 13 integer features and 26 categorical features
(hex strings such as ``68fd1e64``), tab-separated; an empty field is a
missing value. Integers become ``log(1 + max(x, 0))`` (missing: 0);
categories are hashed into each table, ``int(hex, 16) % num_embeddings[f]``,
and a missing one is an empty bag. Files ending in ``.gz`` are decompressed
on the fly.

The files are one stream of lines, read in chunks of ``chunk_bytes`` (never
whole: the Terabyte days are larger than memory) and parsed with numpy a
column at a time, each field decoded 8 bytes per integer operation. Measured
on 1M Kaggle-like lines (one rank, batches of 4096, batches built): 0.45M
lines per CPU-second on the 2-core development machine while it was busy
with other work, 5x a per-line ``split``/``int`` loop measured the same way
(0.085M); the converter to the binary format ran at 0.25M lines/s. Epochs
after the first should read ``dist_rec.data.binary`` (see
``convert_criteo``), which serves batches at about 1.9M samples/s.

Ranks split the stream as ``dist_rec.data.batch`` says: block ``k`` of
``batch_size`` lines goes to rank ``k % world_size``, and a rank parses only
its own blocks. The number of lines is not known before the end, so with
``drop_last`` rank ``r`` yields the block of global batch ``k`` only once all
``world_size * batch_size`` lines of that global batch have been read: every
rank stops at the first global batch that is incomplete for any rank, and
all ranks yield the same number of batches (a rank buffers at most one
chunk's rows and one batch).

A malformed line (wrong field count, label not 0/1, an integer field that is
not an integer, a category that is not hex) raises ``ValueError`` naming the
file, the 1-based line number and the fault, when the reader reaches the
chunk holding it, with ``on_error="raise"``. Each rank checks only the lines
it parses. With ``on_error="skip"`` the line is dropped and counted
(``skipped_lines``, ``skipped_by_reason``, first few in
``skipped_examples``; ``skips`` holds them all, see ``dist_rec.data.skips``),
and past ``max_skip_fraction`` of the lines read, or with no valid line at
all, the stream stops with the counts. The block split is then over *valid*
lines, which only a rank that checks every line can know, so in skip mode
each rank parses the whole stream. A file with no newline for 16 MiB is refused in either mode.

A resume seeks instead of reading the stream again: as it reads, the
dataset notes where each chunk of an uncompressed file starts (valid lines
before it, file, byte offset, line number: ``seek_state``). ``batches(...,
start_step=k)`` starts at the last noted chunk at or before global batch
``k`` and parses at most one chunk it does not need. The notes travel with
a checkpoint and from a live rank to a replacement
(``restore_seek_state``); without a note (a fresh process, a ``.gz``
file) the reader scans newlines up to the position without parsing.
"""

from __future__ import annotations

import gzip
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch

from dist_rec.data.batch import Batch, check_rank, kjt_from_id_matrix
from dist_rec.data.skips import EXAMPLES_KEPT, SkipCounter, SkipCounts

NUM_DENSE_FEATURES = 13
NUM_SPARSE_FEATURES = 26
NUM_FIELDS = 1 + NUM_DENSE_FEATURES + NUM_SPARSE_FEATURES
DENSE_FEATURE_NAMES: List[str] = [f"int_{i}" for i in range(NUM_DENSE_FEATURES)]
SPARSE_FEATURE_NAMES: List[str] = [f"cat_{i}" for i in range(NUM_SPARSE_FEATURES)]

PathLike = Union[str, "os.PathLike[str]"]

_TAB, _NL, _CR, _MINUS = 9, 10, 13, 45
_PAD = 2 * 8  # zero bytes before a chunk, so every field has two words before its end
_GROUP_LINES = 1024
_MAX_LINE_BYTES = 1 << 24  # Criteo lines are a few hundred bytes: past this, not a text file

_DIGITS_RE = re.compile(rb"[0-9]+")
_INT_RE = re.compile(rb"-?[0-9]+")
_HEX_RE = re.compile(rb"[0-9a-fA-F]+")

# Skip reasons, in the order a line is checked.
REASONS = ("field_count", "label", "integer", "category")
_OK, _FIELD_COUNT, _LABEL, _INTEGER, _CATEGORY = 0, 1, 2, 3, 4


class CriteoTextDataset(SkipCounts):
    """The Criteo text files as one stream of batches (``Dataset`` protocol).

    Args:
        paths (Sequence[str | Path]): the files, read in this order as one
            stream (a single path is accepted too).
        num_embeddings_per_feature (int | Sequence[int]): table size of each
            categorical feature (26 values), or one size for all.
        on_error (str): "raise" on a malformed line, or "skip" it.
            (Default: "raise")
        max_skip_fraction (float): with "skip", the most of the lines read
            that may be skipped before the stream stops. (Default: 0.01)
        chunk_bytes (int): how much of a file is read and parsed at a time.
            (Default: 8 MiB)

    Example::

        ds = CriteoTextDataset(["day_0.tsv"], num_embeddings_per_feature=1_000_000)
        for batch in ds.batches(batch_size=2048, rank=rank, world_size=world_size):
            ...
    """

    # With drop_last every rank yields the same number of batches (the split
    # in dist_rec.data.batch): the trainer needs no per-step agreement.
    equal_batches_per_rank = True

    def __init__(
        self,
        paths: Union[PathLike, Sequence[PathLike]],
        num_embeddings_per_feature: Union[int, Sequence[int]],
        on_error: str = "raise",
        chunk_bytes: int = 8 << 20,
        max_skip_fraction: float = 0.01,
    ) -> None:
        self._paths = _check_paths(paths)
        self._num_embeddings = _check_num_embeddings(num_embeddings_per_feature)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"Invalid on_error={on_error!r}. Must be 'raise' or 'skip'.")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise ValueError(f"Invalid chunk_bytes={chunk_bytes!r}. Must be an int > 0.")
        self._on_error = on_error
        self._chunk_bytes = chunk_bytes
        # Chunk starts seen so far: valid lines before the chunk -> (file, byte offset, lines of the file before it).
        self._chunk_starts: Dict[int, Tuple[int, int, int]] = {}
        self._modulus = np.asarray(self._num_embeddings, dtype=np.uint64)
        # Counts of the latest batches() pass (skip mode).
        self._max_skip_fraction = max_skip_fraction
        self.skips = SkipCounter(max_skip_fraction, ", ".join(str(p) for p in self._paths))

    @property
    def paths(self) -> List[Path]:
        return list(self._paths)

    @property
    def sparse_feature_names(self) -> List[str]:
        return list(SPARSE_FEATURE_NAMES)

    @property
    def dense_feature_names(self) -> List[str]:
        return list(DENSE_FEATURE_NAMES)

    @property
    def num_dense_features(self) -> int:
        return NUM_DENSE_FEATURES

    @property
    def num_embeddings_per_feature(self) -> List[int]:
        return list(self._num_embeddings)

    def batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1, drop_last: bool = True, start_step: int = 0
    ) -> Iterator[Batch]:
        """This rank's batches, split as the module docstring says, from
        global batch ``start_step`` on (a seek: see the module docstring).
        Arguments are checked now, not at the first ``next()``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"Invalid batch_size={batch_size!r}. Must be an int > 0.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"Invalid start_step={start_step!r}. Must be an int >= 0.")
        check_rank(rank, world_size)
        return self._batches(batch_size, rank, world_size, drop_last, start_step)

    def seek_state(self) -> List[List[int]]:
        """Where the chunks read so far start (plain lists: JSON-able), for
        ``restore_seek_state`` in another process."""
        return [[seen, *where] for seen, where in sorted(self._chunk_starts.items())]

    def restore_seek_state(self, state) -> None:
        """Takes another process's ``seek_state`` (the same files)."""
        for seen, path_index, offset, line_base in state or []:
            self._chunk_starts[int(seen)] = (int(path_index), int(offset), int(line_base))

    def _batches(self, batch_size: int, rank: int, world_size: int, drop_last: bool, start_step: int = 0) -> Iterator[Batch]:
        self.skips = SkipCounter(self._max_skip_fraction, self.skips.what)
        global_batch = batch_size * world_size
        pending: List[_Rows] = []
        num_pending = 0
        step = start_step  # this rank's next step: global batch `step`, block step * W + rank

        def ready(seen: int) -> bool:
            return num_pending >= batch_size and (not drop_last or seen >= (step + 1) * global_batch)

        for rows, seen in self._my_rows(batch_size, rank, world_size, start_step * global_batch):
            if len(rows):
                pending.append(rows)
                num_pending += len(rows)
            if not ready(seen):
                continue
            rows = _Rows.concat(pending)
            done = 0
            while ready(seen):
                yield self._batch(rows.slice(done, done + batch_size))
                done += batch_size
                num_pending -= batch_size
                step += 1
            pending = [rows.slice(done, len(rows))] if num_pending else []
        if not drop_last and num_pending:
            yield self._batch(_Rows.concat(pending))

    def _batch(self, rows: "_Rows") -> Batch:
        return Batch(
            dense_features=torch.from_numpy(rows.dense),
            sparse_features=kjt_from_id_matrix(SPARSE_FEATURE_NAMES, rows.ids),
            labels=torch.from_numpy(rows.labels),
        )

    def _resume_point(self, first_line: int) -> Tuple[int, int, int, int]:
        """(valid lines before, file, byte offset, line number in the file)
        of the last noted chunk start at or before valid line ``first_line``."""
        noted = [seen for seen in self._chunk_starts if seen <= first_line]
        if not noted:
            return 0, 0, 0, 0
        seen = max(noted)
        return (seen, *self._chunk_starts[seen])

    def _my_rows(self, batch_size: int, rank: int, world_size: int, first_line: int = 0) -> Iterator[Tuple["_Rows", int]]:
        """This rank's parsed lines from valid line ``first_line`` of the
        stream on, chunk by chunk, each with the number of valid lines of the
        whole stream read so far."""
        skip = self._on_error == "skip"
        seen, first_path, offset, first_base = self._resume_point(first_line)
        for path_index, path in enumerate(self._paths):
            if path_index < first_path:
                continue
            start = offset if path_index == first_path else 0
            line_base = first_base if path_index == first_path else 0  # lines of this file before the chunk
            for buf, chunk_offset in _read_line_chunks(path, self._chunk_bytes, start):
                if path.suffix != ".gz":
                    self._chunk_starts.setdefault(seen, (path_index, chunk_offset, line_base))
                ends = np.flatnonzero(buf == _NL)
                starts = np.empty_like(ends)
                starts[0] = _PAD
                starts[1:] = ends[:-1] + 1
                ends -= buf[ends - 1] == _CR  # "\r\n" files (a pad byte is not \r)
                num_lines = len(ends)
                if skip:
                    # Which lines are samples decides the blocks: check all.
                    rows, reason = _parse_lines(buf, starts, ends, self._modulus)
                    bad = np.flatnonzero(reason != _OK)
                    self._count_skipped(path, line_base, num_lines, bad, reason, buf, starts, ends)
                    valid = np.flatnonzero(reason == _OK)
                    mine = valid[_my_positions(seen, len(valid), batch_size, rank, world_size, first_line)]
                    rows = rows.take(mine)
                    seen += len(valid)
                else:
                    mine = _my_positions(seen, num_lines, batch_size, rank, world_size, first_line)
                    rows, reason = _parse_lines(buf, starts[mine], ends[mine], self._modulus)
                    bad = np.flatnonzero(reason != _OK)
                    if len(bad):
                        i = mine[bad[0]]
                        message = _diagnose(buf[starts[i] : ends[i]].tobytes())[1]
                        raise ValueError(f"{path}:{line_base + i + 1}: {message}")
                    self.skips.add(num_lines, [], [])
                    seen += num_lines
                line_base += num_lines
                yield rows, seen
        self.skips.finish()

    def _count_skipped(self, path, line_base, num_lines, bad, reason, buf, starts, ends) -> None:
        shown = bad[: max(0, EXAMPLES_KEPT - len(self.skips.examples))].tolist()
        messages = [f"{path}:{line_base + i + 1}: {_diagnose(buf[starts[i] : ends[i]].tobytes())[1]}" for i in shown]
        self.skips.add(num_lines, [REASONS[code - 1] for code in reason[bad].tolist()], messages)


def _my_positions(seen: int, count: int, batch_size: int, rank: int, world_size: int, first_line: int = 0) -> np.ndarray:
    """Positions in ``[0, count)`` of the lines, numbered from ``seen`` in
    the stream, that fall in this rank's blocks (and not before
    ``first_line``)."""
    skip = max(0, min(count, first_line - seen))
    if world_size == 1:
        return np.arange(skip, count)
    index = seen + np.arange(skip, count)
    return skip + np.flatnonzero((index // batch_size) % world_size == rank)


def _read_line_chunks(path: Path, chunk_bytes: int, start: int = 0) -> Iterator[Tuple[np.ndarray, int]]:
    """The file from byte ``start`` (a line start) in pieces of whole lines,
    each ending with a newline (one is added after an unterminated last
    line), as bytes after ``_PAD`` zeros, with the file offset of the
    piece's first line."""
    opener = gzip.open if path.suffix == ".gz" else open
    pad = bytes(_PAD)
    with opener(path, "rb") as f:
        if start:
            f.seek(start)
        carry = b""
        offset = start  # file offset of carry's first byte
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            data = b"".join((pad, carry, block))
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # a line longer than a chunk
                carry = data[_PAD:]
                if len(carry) > _MAX_LINE_BYTES:
                    raise ValueError(
                        f"{path}: a line longer than {_MAX_LINE_BYTES} bytes ends past byte {f.tell()}; "
                        "not a Criteo text file?"
                    )
                continue
            carry = data[cut:]
            yield np.frombuffer(data, dtype=np.uint8, count=cut), offset
            offset += cut - _PAD
        if carry:
            yield np.frombuffer(b"".join((pad, carry, b"\n")), dtype=np.uint8), offset


@dataclass
class _Rows:
    """Parsed lines: labels ``[n]``, dense ``[n, 13]``, ids ``[n, 26]``
    (-1: missing)."""

    labels: np.ndarray
    dense: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "_Rows":
        return _Rows(self.labels[index], self.dense[index], self.ids[index])

    def slice(self, start: int, stop: int) -> "_Rows":
        return _Rows(self.labels[start:stop], self.dense[start:stop], self.ids[start:stop])

    @staticmethod
    def concat(parts: Sequence["_Rows"]) -> "_Rows":
        if len(parts) == 1:
            return parts[0]
        return _Rows(
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.dense for p in parts]),
            np.concatenate([p.ids for p in parts]),
        )


def _parse_lines(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, modulus: np.ndarray
) -> Tuple[_Rows, np.ndarray]:
    """Parses lines ``buf[starts[i]:ends[i]]`` (increasing; ``buf`` begins
    with ``_PAD`` zero bytes). Returns the rows and, per line, the first
    fault (``_OK`` if none); a faulty line's row is garbage.

    Works on groups of ``_GROUP_LINES`` lines: the column-wise passes over a
    group's arrays then stay in cache (2-3x faster than whole chunks)."""
    if len(starts) <= _GROUP_LINES:
        return _parse_group(buf, starts, ends, modulus)
    parts = [
        _parse_group(buf, starts[i : i + _GROUP_LINES], ends[i : i + _GROUP_LINES], modulus)
        for i in range(0, len(starts), _GROUP_LINES)
    ]
    return _Rows.concat([rows for rows, _ in parts]), np.concatenate([reason for _, reason in parts])


def _parse_group(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, modulus: np.ndarray
) -> Tuple[_Rows, np.ndarray]:
    n = len(starts)
    lo, hi = (int(starts[0]), int(ends[-1])) if n else (0, 0)
    tabs = np.flatnonzero(buf[lo:hi] == _TAB) + lo
    reason = np.zeros(n, dtype=np.int8)
    # Field k of a line ends at its k-th tab (the last one at the line end)
    # and starts one past the previous end.
    line_tabs, good_count = _line_tabs(tabs, starts, ends)
    reason[~good_count] = _FIELD_COUNT
    field_end = np.empty((n, NUM_FIELDS), dtype=np.int64)
    field_end[:, :-1] = line_tabs
    field_end[:, -1] = ends
    field_len = np.empty_like(field_end)
    field_len[:, 0] = field_end[:, 0] - starts
    np.subtract(field_end[:, 1:], field_end[:, :-1] + 1, out=field_len[:, 1:])
    if not good_count.all():  # such a line gets empty fields
        field_end[~good_count] = starts[~good_count, None]
        field_len[~good_count] = 0
    words = np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))

    label_byte = buf[starts]
    good_label = (field_len[:, 0] == 1) & ((label_byte == ord("0")) | (label_byte == ord("1")))
    reason[(reason == _OK) & ~good_label] = _LABEL
    labels = (label_byte == ord("1")).astype(np.float32)

    # Integers: an optional "-", then decimal digits.
    cols = slice(1, 1 + NUM_DENSE_FEATURES)
    end, length = field_end[:, cols].ravel(), field_len[:, cols].ravel()
    negative = (length > 0) & (buf[end - length] == _MINUS)
    length = length - negative
    value, bad = _swar_field(words, end, length, _decimal8, 10**8)
    bad |= negative & (length == 0)
    value[negative] = 0
    dense = np.log1p(value.astype(np.float64)).astype(np.float32)
    for i in _longer_than(length, 2 * _WORD):
        text = buf[end[i] - length[i] : end[i]].tobytes()
        bad[i] = not _DIGITS_RE.fullmatch(text)
        dense[i] = 0.0 if bad[i] or negative[i] else _log1p(int(text))
    reason[(reason == _OK) & bad.reshape(n, NUM_DENSE_FEATURES).any(axis=1)] = _INTEGER

    # Categories: hex digits, hashed into the table; empty is missing (-1).
    cols = slice(1 + NUM_DENSE_FEATURES, NUM_FIELDS)
    end, length = field_end[:, cols].ravel(), field_len[:, cols].ravel()
    value, bad = _swar_field(words, end, length, _hex8, 1 << 32)
    ids = (value.reshape(n, NUM_SPARSE_FEATURES) % modulus).astype(np.int64).ravel()
    for i in _longer_than(length, 2 * _WORD):
        text = buf[end[i] - length[i] : end[i]].tobytes()
        bad[i] = not _HEX_RE.fullmatch(text)
        ids[i] = 0 if bad[i] else int(text, 16) % int(modulus[i % NUM_SPARSE_FEATURES])
    ids[length == 0] = -1
    reason[(reason == _OK) & bad.reshape(n, NUM_SPARSE_FEATURES).any(axis=1)] = _CATEGORY
    return (
        _Rows(labels, dense.reshape(n, NUM_DENSE_FEATURES), ids.reshape(n, NUM_SPARSE_FEATURES)),
        reason,
    )


def _log1p(x: int) -> float:
    # math.log takes ints beyond float range, where log1p(x) == log(x).
    return math.log1p(x) if x < 2**53 else math.log(x)


def _line_tabs(tabs: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The 39 tab positions of each line ``[n, 39]`` (garbage where the
    line has another count) and which lines have exactly 39."""
    n = len(starts)
    if n and len(tabs) == n * (NUM_FIELDS - 1):
        # The common case: every line of the chunk parsed and well formed
        # (each line holds its 39 tabs, so there are no others).
        line_tabs = tabs.reshape(n, NUM_FIELDS - 1)
        if (line_tabs[:, 0] >= starts).all() and (line_tabs[:, -1] < ends).all():
            return line_tabs, np.ones(n, dtype=bool)
    first = np.searchsorted(tabs, starts)
    good = np.searchsorted(tabs, ends) - first == NUM_FIELDS - 1
    line_tabs = np.zeros((n, NUM_FIELDS - 1), dtype=np.int64)
    line_tabs[good] = tabs[first[good, None] + np.arange(NUM_FIELDS - 1)]
    return line_tabs, good


# Fields are decoded 8 bytes at a time, as one little-endian word whose top
# `length` bytes are the field's last characters ("SWAR"); lower bytes are
# replaced by "0". A field of up to 16 characters takes two words; longer
# ones (never in Criteo) go through Python.
_WORD = 8
_HIGH = 0x8080808080808080
_LOW7 = 0x7F7F7F7F7F7F7F7F
_ZEROS = 0x3030303030303030
_KEEP = np.array([~((1 << (8 * (_WORD - k))) - 1) & (2**64 - 1) for k in range(_WORD + 1)], dtype=np.uint64)


def _swar_field(words: np.ndarray, end: np.ndarray, length: np.ndarray, decode8, scale: int):
    """Decodes fields ``buf[end - length : end]`` (as unsigned numbers)."""
    value, bad = decode8(words[end - _WORD], np.minimum(length, _WORD))
    long = _longer_than(length, _WORD)
    if long:
        high, high_bad = decode8(words[end[long] - 2 * _WORD], np.minimum(length[long] - _WORD, _WORD))
        value[long] += high * np.uint64(scale)
        bad[long] |= high_bad
    return value, bad


def _longer_than(length: np.ndarray, limit: int) -> List[int]:
    """Indices of the fields longer than ``limit`` (usually none)."""
    if len(length) == 0 or length.max() <= limit:
        return []
    return np.flatnonzero(length > limit).tolist()


def _masked(word: np.ndarray, length: np.ndarray) -> np.ndarray:
    keep = _KEEP[length]
    return (word & keep) | (_ZEROS & ~keep)


def _decimal8(word: np.ndarray, length: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Value of up to 8 decimal digits, and whether any byte was not one."""
    x = _masked(word, length)
    x7 = x & _LOW7  # per-byte arithmetic below must not carry between bytes
    is_digit = ((x7 | _HIGH) - _ZEROS) & ~(x7 + 0x4646464646464646) & ~x & _HIGH
    d = x - _ZEROS
    d = (d * 10 + (d >> 8)) & 0x00FF00FF00FF00FF
    d = (d * 100 + (d >> 16)) & 0x0000FFFF0000FFFF
    d = (d * 10000 + (d >> 32)) & 0x00000000FFFFFFFF
    return d, is_digit != _HIGH


def _hex8(word: np.ndarray, length: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Value of up to 8 hex digits, and whether any byte was not one."""
    x = _masked(word, length)
    x7 = x & _LOW7
    is_digit = ((x7 | _HIGH) - _ZEROS) & ~(x7 + 0x4646464646464646)
    lower = x7 | 0x2020202020202020
    is_letter = ((lower | _HIGH) - 0x6161616161616161) & ~(lower + 0x1919191919191919)
    ok = (is_digit | is_letter) & ~x & _HIGH
    # Digits have bit 6 clear, letters set: nibble = low 4 bits (+ 9).
    v = (x & 0x0F0F0F0F0F0F0F0F) + ((x >> 6) & 0x0101010101010101) * 9
    v = ((v & 0x00FF00FF00FF00FF) << 4) | ((v >> 8) & 0x00FF00FF00FF00FF)
    v = ((v & 0x0000FFFF0000FFFF) << 8) | ((v >> 16) & 0x0000FFFF0000FFFF)
    v = ((v & 0x00000000FFFFFFFF) << 16) | (v >> 32)
    return v, ok != _HIGH


def _diagnose(line: bytes) -> Tuple[str, str]:
    """The first fault of a line as (reason, message), the slow way; the
    same checks as ``_parse_lines``."""
    fields = line.split(b"\t")
    if len(fields) != NUM_FIELDS:
        return "field_count", f"expected {NUM_FIELDS} tab-separated fields, got {len(fields)}"
    if fields[0] not in (b"0", b"1"):
        return "label", f"label must be 0 or 1, got {_show(fields[0])}"
    for i, field in enumerate(fields[1 : 1 + NUM_DENSE_FEATURES]):
        if field and not _INT_RE.fullmatch(field):
            return "integer", f"field {i + 2} ({DENSE_FEATURE_NAMES[i]}) must be an integer, got {_show(field)}"
    for i, field in enumerate(fields[1 + NUM_DENSE_FEATURES :]):
        if field and not _HEX_RE.fullmatch(field):
            name = SPARSE_FEATURE_NAMES[i]
            return "category", f"field {i + 2 + NUM_DENSE_FEATURES} ({name}) must be a hex string, got {_show(field)}"
    return "ok", "no fault"


def _show(field: bytes, limit: int = 40) -> str:
    text = field.decode("utf-8", errors="backslashreplace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _check_paths(paths) -> List[Path]:
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    try:
        result = [Path(os.fsdecode(p)) for p in paths]
    except TypeError:
        raise ValueError(f"Invalid paths={paths!r}. Must be a sequence of file paths.") from None
    if not result:
        raise ValueError(f"Invalid paths={list(paths)!r}. Must name at least one file.")
    missing = [str(p) for p in result if not p.is_file()]
    if missing:
        raise ValueError(f"Invalid paths={[str(p) for p in result]}. Must be existing files; not found: {missing}.")
    return result


def _check_num_embeddings(value) -> List[int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        sizes = [value] * NUM_SPARSE_FEATURES
    else:
        try:
            sizes = list(value)
        except TypeError:
            sizes = None
        if sizes is None or len(sizes) != NUM_SPARSE_FEATURES:
            raise ValueError(
                f"Invalid num_embeddings_per_feature={value!r}. Must be an int or {NUM_SPARSE_FEATURES} ints "
                f"(one per categorical feature)" + (f", got {len(sizes)}." if sizes is not None else ".")
            )
    for name, size in zip(SPARSE_FEATURE_NAMES, sizes):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 < size < 2**63:
            raise ValueError(
                f"Invalid num_embeddings_per_feature={value!r}. Must be ints in [1, 2**63); {name} is {size!r}."
            )
    return [int(s) for s in sizes]
