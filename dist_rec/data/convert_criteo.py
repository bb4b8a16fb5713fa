"""Converts Criteo text files to the binary format, once, so that training
epochs map arrays instead of parsing text (see ``dist_rec.data.binary``)::

    python -m dist_rec.data.convert_criteo --out /data/criteo_kaggle_bin \\
        --num-embeddings 10000000 train.txt

The files are one stream, in the order given; ids are hashed into the table
sizes here, so the binary dataset is tied to them (they are in its
``meta.json``). Progress goes to stderr, the summary to stdout. Nothing
appears at ``--out`` unless the conversion completes; an existing dataset
there is replaced only with ``--overwrite`` and only by a complete one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from dist_rec.data.batch import Batch
from dist_rec.data.binary import write_binary_dataset
from dist_rec.data.criteo import DENSE_FEATURE_NAMES, SPARSE_FEATURE_NAMES, CriteoTextDataset

PROGRESS_EVERY = 1_000_000  # lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    sizes = args.num_embeddings if args.num_embeddings is not None else args.num_embeddings_per_feature
    out = Path(args.out)
    if not args.overwrite and out.is_dir() and any(out.iterdir()):
        parser.error(f"--out {args.out} is not empty; pass --overwrite to replace the dataset there.")
    try:
        dataset = CriteoTextDataset(args.files, sizes, on_error=args.on_error, max_skip_fraction=args.max_skip_fraction)
    except ValueError as e:
        parser.error(str(e))
    start = time.perf_counter()
    progress = _Progress(dataset, start)
    try:
        write_binary_dataset(
            args.out,
            progress.wrap(dataset.batches(args.batch_size, drop_last=False)),
            SPARSE_FEATURE_NAMES,
            dataset.num_embeddings_per_feature,
            dense_feature_names=DENSE_FEATURE_NAMES,
            overwrite=args.overwrite,
        )
    except ValueError as e:
        print(f"convert_criteo: error: {e}", file=sys.stderr)
        print(f"convert_criteo: nothing written; {args.out} is as it was", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"convert_criteo: interrupted; nothing written; {args.out} is as it was", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    lines = progress.samples + dataset.skipped_lines
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(dataset.skipped_by_reason.items()))
    for example in dataset.skipped_examples:
        print(f"skipped {example}", file=sys.stderr)
    rate = lines / max(seconds, 1e-9)
    skipped = f"skipped {dataset.skipped_lines} lines" + (f" ({reasons})" if reasons else "")
    print(f"Wrote {progress.samples} samples to {args.out} in {seconds:.1f} s ({rate:,.0f} lines/s); {skipped}.")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dist_rec.data.convert_criteo",
        description="Convert Criteo Kaggle/Terabyte text files to dist_rec's binary dataset format.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    sizes = parser.add_mutually_exclusive_group(required=True)
    sizes.add_argument(
        "--num-embeddings", type=_positive_int, metavar="N", help="table size of every categorical feature"
    )
    sizes.add_argument(
        "--num-embeddings-per-feature",
        type=_int_list,
        metavar="N0,N1,...",
        help="table size of each of the 26 categorical features",
    )
    parser.add_argument(
        "--on-error", choices=["raise", "skip"], default="raise", help="on a malformed line (default: raise)"
    )
    parser.add_argument(
        "--max-skip-fraction", type=float, default=0.01,
        help="with --on-error skip, the most of the lines that may be skipped (default: 0.01)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=65536, help="samples parsed and written at a time (default: 65536)"
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="Criteo text files (.gz too), read in this order")
    return parser


class _Progress:
    """Counts the samples going by and prints a line every ~1M lines."""

    def __init__(self, dataset: CriteoTextDataset, start: float) -> None:
        self._dataset = dataset
        self._start = start
        self._next = PROGRESS_EVERY
        self.samples = 0

    def wrap(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            self.samples += batch.batch_size
            lines = self.samples + self._dataset.skipped_lines
            if lines >= self._next:
                seconds = time.perf_counter() - self._start
                print(f"{lines:>14,} lines  {lines / max(seconds, 1e-9):>12,.0f} lines/s", file=sys.stderr, flush=True)
                self._next = (lines // PROGRESS_EVERY + 1) * PROGRESS_EVERY
            yield batch


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _int_list(text: str) -> List[int]:
    return [_positive_int(part.strip()) for part in text.split(",")]


if __name__ == "__main__":
    sys.exit(main())
