"""Converts a dataset described by a schema (CSV/TSV or Parquet) to the
binary format, once, so that training epochs map arrays instead of parsing
text, and can be shuffled::

    python -m dist_rec.data.convert --schema avazu.schema.yaml --out data/avazu_bin train.csv.gz

The schema's vocabularies (one pass over the files) and the table of each
feature are stored in the dataset's ``meta.json``: the trainer builds the
model's tables from it, and an evaluation set converted with
``--fitted-from DIR`` reuses the training set's vocabularies. Nothing
appears at ``--out`` unless the conversion completes. For Criteo's own
layout, ``python -m dist_rec.data.convert_criteo`` is the faster path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from dist_rec.data.binary import BinaryDataset, write_binary_dataset
from dist_rec.data.schema import Fitted, Schema


def open_table(paths, schema: Schema, file_format: str = "auto", **kwargs):
    """A ``TextDataset`` or ``ParquetDataset`` of ``paths`` ("auto": by
    the first file's suffix, ``.parquet``/``.pq`` or text)."""
    from dist_rec.data.tabular import ParquetDataset, TextDataset

    first = Path(paths[0] if not isinstance(paths, (str, Path)) else paths)
    if file_format == "auto":
        file_format = "parquet" if first.suffix in (".parquet", ".pq") else "text"
    if file_format not in ("text", "parquet"):
        raise ValueError(f"Invalid format={file_format!r}. Must be 'auto', 'text' or 'parquet'.")
    return (ParquetDataset if file_format == "parquet" else TextDataset)(paths, schema, **kwargs)


def convert(paths, schema: Schema, out, *, file_format: str = "auto", on_error: str = "raise",
            max_skip_fraction: float = 0.01, fitted: Optional[Fitted] = None, overwrite: bool = False,
            batch_size: int = 65536):  # fmt: skip
    """Writes the files as a binary dataset at ``out``; returns the source
    dataset (its ``skips`` hold the counts)."""
    dataset = open_table(paths, schema, file_format, on_error=on_error, max_skip_fraction=max_skip_fraction,
                         fitted=fitted)  # fmt: skip
    write_binary_dataset(
        out,
        dataset.batches(batch_size, drop_last=False),
        dataset.sparse_feature_names,
        dataset.num_embeddings_per_feature,
        dense_feature_names=dataset.dense_feature_names,
        feature_tables=dataset.feature_tables,
        weighted=dataset.is_weighted,
        extra={"schema": schema.to_dict(), "fitted": dataset.fitted.to_dict()},
        overwrite=overwrite,
    )
    return dataset


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_rec.data.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--schema", required=True, metavar="FILE", help="the dataset's schema (YAML)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    parser.add_argument("--format", choices=["auto", "text", "parquet"], default="auto", help="input format (default: by suffix)")
    parser.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="on a bad row (default: raise)")
    parser.add_argument("--max-skip-fraction", type=float, default=0.01, help="with skip: the most that may be skipped")
    parser.add_argument("--fitted-from", metavar="DIR", help="reuse this binary dataset's vocabularies (an eval set)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    parser.add_argument("files", nargs="+", metavar="FILE", help="input files, read in this order as one stream")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        schema = Schema.load(args.schema)
        fitted = None
        if args.fitted_from:
            fitted = Fitted.from_dict(BinaryDataset(args.fitted_from).meta["extra"].get("fitted"))
        dataset = convert(args.files, schema, args.out, file_format=args.format, on_error=args.on_error,
                          max_skip_fraction=args.max_skip_fraction, fitted=fitted, overwrite=args.overwrite)  # fmt: skip
    except (ValueError, ImportError) as error:
        print(f"convert: error: {error}", file=sys.stderr)
        print(f"convert: nothing written; {args.out} is as it was", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    for example in dataset.skips.examples:
        print(f"skipped {example}", file=sys.stderr)
    written = BinaryDataset(args.out)
    print(f"Wrote {len(written)} samples to {args.out} in {seconds:.1f} s; {dataset.skips.describe()}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
