"""How often each embedding row is read, measured on a sample of the data.

RecShard plans from statistics, not from table sizes: a table whose reads
concentrate on a few rows can keep those rows in fast memory and the rest in
a slow tier at little cost. ``collect_access_stats`` reads the first batches
of a dataset and counts, per table, how often every row is touched; from the
counts follow what the planner needs:

* the access CDF over rows sorted hottest first (``cdf``, ``cdf_at``): the
  share of reads that the hottest fraction of rows serves;
* the pooling factor (ids per bag), the coverage (share of non-empty bags),
  the share of rows never touched, and the reads per sample;
* ``hot_order``: row ids hottest first, which remaps ids so that a table's
  hot rows are the range ``[0, hot_rows)``.

Statistics are plain data: ``AccessStats.save(directory)`` writes the counts
(``counts.npz``) and a readable summary (``summary.json``), ``load`` reads
them back.

From the command line, on the training data a config describes::

    python -m dist_rec.planner.access_stats --config launch/configs/default.yaml --batches 200 --out runs/stats

prints the table of statistics and writes them with ``access_cdf.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from dist_rec.modules.embedding_configs import EmbeddingBagConfig, as_embedding_bag_config

COUNTS_FILE = "counts.npz"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "access_cdf.png"

# Ids are buffered and counted with one bincount per table once the buffer
# holds as many ids as the table has rows (or this many): counting then costs
# O(ids + rows) over the whole sample instead of O(rows) per batch.
_MAX_BUFFERED_IDS = 1 << 24


@dataclass(eq=False)  # counts are an array: compare tables by their fields, not with ==
class TableAccessStats:
    """Row accesses of one table over a sample of batches.

    Args:
        table (str): the table's name.
        counts (np.ndarray): int64 ``[num_embeddings]``, reads of each row
            (an id that appears twice in a bag counts twice).
        num_samples (int): samples in the sample of data.
        num_bags (int): bags read, ``num_samples`` times the table's features.
        nonempty_bags (int): bags with at least one id.
        feature_names (List[str]): the features that read this table.
    """

    table: str
    counts: np.ndarray
    num_samples: int
    num_bags: int
    nonempty_bags: int
    feature_names: List[str] = field(default_factory=list)
    _cdf: Optional[np.ndarray] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.counts.ndim != 1 or self.counts.size == 0:
            raise ValueError(f"Invalid counts for table {self.table!r}: shape {self.counts.shape}. Must be [num_embeddings > 0].")
        if (self.counts < 0).any():
            raise ValueError(f"Invalid counts for table {self.table!r}: negative entries.")
        if not 0 <= self.nonempty_bags <= self.num_bags:
            raise ValueError(
                f"Invalid nonempty_bags={self.nonempty_bags} for table {self.table!r}. Must be in [0, num_bags={self.num_bags}]."
            )

    @property
    def num_embeddings(self) -> int:
        return int(self.counts.size)

    @property
    def total_accesses(self) -> int:
        return int(self.counts.sum())

    @property
    def pooling_factor(self) -> float:
        """Mean ids per bag, over all bags of the table's features (empty ones included)."""
        return self.total_accesses / self.num_bags if self.num_bags else 0.0

    @property
    def coverage(self) -> float:
        """Share of bags that hold at least one id."""
        return self.nonempty_bags / self.num_bags if self.num_bags else 0.0

    @property
    def used_rows(self) -> int:
        """Rows read at least once."""
        return int(np.count_nonzero(self.counts))

    @property
    def untouched_fraction(self) -> float:
        """Share of rows never read in the sample."""
        return 1.0 - self.used_rows / self.num_embeddings

    @property
    def accesses_per_sample(self) -> float:
        return self.total_accesses / self.num_samples if self.num_samples else 0.0

    def cdf(self) -> np.ndarray:
        """float64 ``[num_embeddings + 1]``: entry ``r`` is the share of reads
        that the ``r`` hottest rows serve (``cdf()[0] == 0``, non-decreasing,
        reaching 1 at ``used_rows``). A table never read loses nothing to a
        slow tier: its CDF is 1 everywhere."""
        if self._cdf is None:
            total = self.total_accesses
            if total == 0:
                cdf = np.ones(self.num_embeddings + 1)
            else:
                cdf = np.zeros(self.num_embeddings + 1)
                np.cumsum(np.sort(self.counts)[::-1], out=cdf[1:])
                cdf /= total
                cdf[self.used_rows :] = 1.0  # exact, whatever the rounding of the sum
            self._cdf = cdf
        return self._cdf

    def cdf_at(self, fraction: Union[float, np.ndarray]) -> Union[float, np.ndarray]:
        """Share of reads that the hottest ``fraction`` of rows serves
        (``round(fraction * num_embeddings)`` rows); a number or an array."""
        fractions = np.asarray(fraction, dtype=np.float64)
        if np.any((fractions < 0) | (fractions > 1)) or np.any(np.isnan(fractions)):
            raise ValueError(f"Invalid fraction={fraction!r} for table {self.table!r}. Must be in [0, 1].")
        values = self.cdf()[np.rint(fractions * self.num_embeddings).astype(np.int64)]
        return float(values) if values.ndim == 0 else values

    def hot_order(self) -> np.ndarray:
        """int64 row ids, hottest first, ties by id: row ``hot_order()[i]``
        becomes row ``i`` when the table is remapped so that the hottest
        rows form the range ``[0, hot_rows)``."""
        return np.argsort(-self.counts, kind="stable").astype(np.int64)

    def remap(self) -> np.ndarray:
        """int64 ``[num_embeddings]``: the new id of each old id under
        ``hot_order`` (the inverse permutation), ready to index with the ids
        of a batch."""
        order = self.hot_order()
        new_ids = np.empty_like(order)
        new_ids[order] = np.arange(order.size, dtype=np.int64)
        return new_ids

    def summary(self) -> Dict:
        """The numbers of the statistics, for JSON and the printed table."""
        return {
            "table": self.table,
            "feature_names": list(self.feature_names),
            "num_embeddings": self.num_embeddings,
            "num_samples": self.num_samples,
            "num_bags": self.num_bags,
            "nonempty_bags": self.nonempty_bags,
            "total_accesses": self.total_accesses,
            "pooling_factor": self.pooling_factor,
            "coverage": self.coverage,
            "used_rows": self.used_rows,
            "untouched_fraction": self.untouched_fraction,
            "accesses_per_sample": self.accesses_per_sample,
            "cdf_at": {f"{f:g}": float(self.cdf_at(f)) for f in _SUMMARY_FRACTIONS},
        }


_SUMMARY_FRACTIONS = (0.001, 0.01, 0.1, 0.5)


@dataclass
class AccessStats:
    """Access statistics of every table, gathered from ``num_batches``
    batches of ``batch_size`` samples.

    Example::

        stats = collect_access_stats(dataset, tables, num_batches=100, batch_size=512)
        stats["t_cat_0"].cdf_at(0.01)    # share of reads to the hottest 1% of rows
        stats.save("runs/stats")
    """

    tables: Dict[str, TableAccessStats]
    batch_size: int
    num_batches: int

    def __getitem__(self, table: str) -> TableAccessStats:
        try:
            return self.tables[table]
        except KeyError:
            raise KeyError(f"No access statistics for table {table!r}; they cover {sorted(self.tables)}.") from None

    def __contains__(self, table: str) -> bool:
        return table in self.tables

    def __iter__(self) -> Iterator[str]:
        return iter(self.tables)

    def __len__(self) -> int:
        return len(self.tables)

    def items(self):
        return self.tables.items()

    # -- plain data ------------------------------------------------------------

    def save(self, directory: Union[str, Path]) -> None:
        """``counts.npz`` (one int64 array per table) and ``summary.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = list(self.tables)
        # npz keys are positional so that any table name (dots, slashes) is safe.
        np.savez_compressed(directory / COUNTS_FILE, **{f"t{i}": self.tables[n].counts for i, n in enumerate(names)})
        summary = {
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
            "tables": [self.tables[n].summary() for n in names],
        }
        (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "AccessStats":
        directory = Path(directory)
        try:
            summary = json.loads((directory / SUMMARY_FILE).read_text())
            with np.load(directory / COUNTS_FILE) as arrays:
                tables = {}
                for i, t in enumerate(summary["tables"]):
                    tables[t["table"]] = TableAccessStats(
                        table=t["table"],
                        counts=arrays[f"t{i}"],
                        num_samples=int(t["num_samples"]),
                        num_bags=int(t["num_bags"]),
                        nonempty_bags=int(t["nonempty_bags"]),
                        feature_names=list(t.get("feature_names", [])),
                    )
            return cls(tables, int(summary["batch_size"]), int(summary["num_batches"]))
        except FileNotFoundError as e:
            raise ValueError(f"{directory}: no access statistics ({Path(e.filename).name} is missing).") from None
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{directory}: not access statistics ({type(e).__name__} {e}).") from None

    def __str__(self) -> str:
        header = ["table", "rows", "reads/sample", "pooling", "coverage", "untouched", "top 1%", "top 10%"]
        rows = [header]
        for s in self.tables.values():
            rows.append(
                [
                    s.table,
                    str(s.num_embeddings),
                    f"{s.accesses_per_sample:.3g}",
                    f"{s.pooling_factor:.3g}",
                    f"{100 * s.coverage:.1f}%",
                    f"{100 * s.untouched_fraction:.1f}%",
                    f"{100 * s.cdf_at(0.01):.1f}%",
                    f"{100 * s.cdf_at(0.1):.1f}%",
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        samples = self.num_batches * self.batch_size
        title = f"Access statistics of {len(self.tables)} tables over {self.num_batches} batches ({samples} samples)"
        return title + "\n" + "\n".join(lines)

    def plot_cdfs(self, path: Union[str, Path], max_tables: int = 30) -> None:
        """A PNG of each table's access CDF (share of reads against the share
        of rows, hottest first, rows on a log axis); the ``max_tables`` most
        skewed tables when there are more."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = sorted(self.tables.values(), key=lambda s: -s.cdf_at(0.01))[:max_tables]
        fig, ax = plt.subplots(figsize=(8, 5))
        for s in shown:
            n = s.num_embeddings
            # ~500 points, log-spaced in rows: a 40M-row table plots as fast as a tiny one.
            rows = np.unique(np.geomspace(1, n, num=min(n, 500)).astype(np.int64))
            ax.plot(rows / n, s.cdf()[rows], label=s.table, linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("hottest fraction of rows")
        ax.set_ylabel("share of reads")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"Row access CDF ({self.num_batches} batches of {self.batch_size})")
        if len(shown) <= 12:
            ax.legend(fontsize="small", loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


class _RowCounter:
    """Counts the ids of one table, buffering them so that bincount runs
    once per ``max(rows, ...)`` ids rather than once per batch."""

    def __init__(self, num_embeddings: int) -> None:
        self.counts = np.zeros(num_embeddings, dtype=np.int64)
        self.buffer: List[np.ndarray] = []
        self.buffered = 0
        self.flush_at = min(max(num_embeddings, 1 << 16), _MAX_BUFFERED_IDS)

    def add(self, ids: np.ndarray) -> None:
        self.buffer.append(ids)
        self.buffered += ids.size
        if self.buffered >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        if self.buffered:
            self.counts += np.bincount(np.concatenate(self.buffer), minlength=self.counts.size)
        self.buffer, self.buffered = [], 0


def collect_access_stats(
    dataset,
    tables: Sequence,
    num_batches: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> AccessStats:
    """Counts row reads of each table over the first ``num_batches`` batches
    of ``dataset``.

    Args:
        dataset: any source with ``batches(batch_size, rank, world_size,
            drop_last=True)`` yielding ``dist_rec.data.batch.Batch``.
        tables (Sequence[EmbeddingBagConfig]): the tables and the features
            that read them (ours or TorchRec's configs).
        num_batches (int): batches to read; fewer if the data ends first.
        batch_size (int): samples per batch.
        rank, world_size: whose share of the data to read (default: all
            of it, as one process would).

    Raises:
        ValueError: a feature of a table is missing from the batches, or an
            id is outside its table's rows.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"Invalid num_batches={num_batches!r}. Must be an int >= 1.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size={batch_size!r}. Must be an int >= 1.")
    configs: List[EmbeddingBagConfig] = [as_embedding_bag_config(t) for t in tables]
    if not configs:
        raise ValueError("Invalid tables=[]. Must name at least one table.")
    counters = {c.name: _RowCounter(c.num_embeddings) for c in configs}
    bags = {c.name: 0 for c in configs}
    nonempty = {c.name: 0 for c in configs}
    samples = batches_read = 0
    for batch in dataset.batches(batch_size, rank, world_size, drop_last=True):
        kjt = batch.sparse_features
        keys = set(kjt.keys())
        for c in configs:
            for feature in c.feature_names:
                if feature not in keys:
                    raise ValueError(
                        f"Table {c.name!r} reads feature {feature!r}, which the batches do not have "
                        f"(they have {sorted(keys)})."
                    )
                bag = kjt[feature]
                ids = bag.values().detach().cpu().numpy().astype(np.int64, copy=False)
                if ids.size and (ids.min() < 0 or ids.max() >= c.num_embeddings):
                    bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
                    raise ValueError(
                        f"Feature {feature!r} of table {c.name!r} has id {bad}, outside the table's "
                        f"{c.num_embeddings} rows."
                    )
                counters[c.name].add(ids)
                lengths = bag.lengths()
                bags[c.name] += int(lengths.numel())
                nonempty[c.name] += int((lengths > 0).sum())
        samples += batch.batch_size
        batches_read += 1
        if batches_read == num_batches:
            break
    stats = {}
    for c in configs:
        counters[c.name].flush()
        stats[c.name] = TableAccessStats(
            table=c.name,
            counts=counters[c.name].counts,
            num_samples=samples,
            num_bags=bags[c.name],
            nonempty_bags=nonempty[c.name],
            feature_names=list(c.feature_names),
        )
    return AccessStats(stats, batch_size=batch_size, num_batches=batches_read)


# -- command line ---------------------------------------------------------------------


def tables_of_config(config, data) -> List[EmbeddingBagConfig]:
    """The tables the trainer builds for ``config``: one per sparse feature,
    named ``t_<feature>`` (as ``dist_rec.trainer.builders.build_model``)."""
    return [
        EmbeddingBagConfig(
            name=f"t_{name}", embedding_dim=config.model.embedding_dim, num_embeddings=rows, feature_names=[name]
        )
        for name, rows in zip(data.sparse_feature_names, data.num_embeddings_per_feature)
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dist_rec.planner.access_stats",
        description="Row access statistics of a training config's data (for the RecShard planner).",
    )
    parser.add_argument("--config", help="training YAML config (defaults for anything it leaves out)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. data.zipf_exponent=1.2")
    parser.add_argument("--batches", type=int, default=100, help="batches to read (default: 100)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: train.batch_size)")
    parser.add_argument("--out", required=True, help="directory for counts.npz, summary.json and access_cdf.png")
    args = parser.parse_args(argv)

    from dist_rec.config import ConfigError, load_config
    from dist_rec.trainer.builders import build_data

    try:
        config = load_config(args.config, args.overrides)
        data = build_data(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    batch_size = args.batch_size or config.train.batch_size
    try:
        stats = collect_access_stats(data.train, tables_of_config(config, data), args.batches, batch_size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    stats.save(out)
    stats.plot_cdfs(out / PLOT_FILE)
    print(stats)
    print(f"wrote {out / COUNTS_FILE}, {out / SUMMARY_FILE} and {out / PLOT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
