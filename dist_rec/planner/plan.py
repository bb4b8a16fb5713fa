"""Sharding plans: which rank holds which rows and columns of each table.

A plan is plain data, produced by ``dist_rec.planner`` or written by hand,
printable as a table and saved to / loaded from JSON. Ranks in a plan are
ranks *inside one sharding group* (0 .. group size - 1): under 2D
parallelism every replica group uses the same plan.

Every way of sharding is a list of rectangular shards of the table, each
on one rank:

=================  ===========================================================
``data_parallel``  every rank of the group holds the whole table
``table_wise``     one shard, the whole table, on one rank
``row_wise``       contiguous row blocks, one per rank of the group
``column_wise``    column blocks (each all rows), each on one rank
``table_row_wise`` contiguous row blocks over the ranks of one host
=================  ===========================================================

Each shard also says where its rows are stored (``EmbeddingLocation``:
the rank's device memory by default; see ``dist_rec.placement``), or, for a
shard split over two tiers, how many of its (hottest) rows are at
``location`` and where the rest are (``hot_rows``, ``cold_location``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from dist_rec.enums import StrChoice
from dist_rec.placement.location import EmbeddingLocation


class ShardingType(StrChoice):
    """How a table is split over the ranks of a sharding group (the table above)."""

    DATA_PARALLEL = "data_parallel"
    TABLE_WISE = "table_wise"
    ROW_WISE = "row_wise"
    COLUMN_WISE = "column_wise"
    TABLE_ROW_WISE = "table_row_wise"

    @classmethod
    def setting_name(cls) -> str:
        return "sharding_type"


SHARDING_TYPES = tuple(ShardingType.str_values())
# Types whose shards split a table's rows, so that each shard pools a partial sum of a bag.
ROW_SPLIT_TYPES = (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE)


@dataclass(frozen=True)
class Shard:
    """Rows ``[row_offset, row_offset + num_rows)`` and columns
    ``[col_offset, col_offset + num_cols)`` of a table, held by ``rank``,
    its rows stored at ``location`` (``dist_rec.placement``).

    A shard may split its rows over two tiers (RecShard): then its first
    ``hot_rows`` rows are at ``location`` and the other ones at
    ``cold_location``. The rows are in the table's remapped order, hottest
    first (``dist_rec.planner.access_stats``), so the hot rows are one
    contiguous range. ``hot_rows=None`` (the default) keeps all rows at
    ``location``."""

    rank: int
    row_offset: int
    num_rows: int
    col_offset: int
    num_cols: int
    location: EmbeddingLocation = EmbeddingLocation.DEVICE
    hot_rows: Optional[int] = None
    cold_location: Optional[EmbeddingLocation] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "location", EmbeddingLocation.from_str(self.location))
        if self.cold_location is not None:
            object.__setattr__(self, "cold_location", EmbeddingLocation.from_str(self.cold_location))

    @property
    def rows_at_location(self) -> int:
        """Rows stored at ``location``: ``hot_rows``, or all of them."""
        return self.num_rows if self.hot_rows is None else self.hot_rows

    @property
    def cold_rows(self) -> int:
        """Rows stored at ``cold_location`` (0 when the shard is not split)."""
        return self.num_rows - self.rows_at_location

    def to_dict(self) -> Dict:
        data = {
            "rank": self.rank, "row_offset": self.row_offset, "num_rows": self.num_rows,
            "col_offset": self.col_offset, "num_cols": self.num_cols, "location": self.location.value,
        }
        # Written only for split shards, so plans without tiers read as before.
        if self.hot_rows is not None:
            data["hot_rows"] = self.hot_rows
        if self.cold_location is not None:
            data["cold_location"] = self.cold_location.value
        return data

    @classmethod
    def from_dict(cls, data: Dict) -> "Shard":
        # Plans written before shards had a location hold their rows in device memory.
        named = ("location", "hot_rows", "cold_location")
        numbers = {k: int(v) for k, v in data.items() if k not in named}
        hot_rows = data.get("hot_rows")
        return cls(
            **numbers,
            location=data.get("location", EmbeddingLocation.DEVICE.value),
            hot_rows=None if hot_rows is None else int(hot_rows),
            cold_location=data.get("cold_location"),
        )

    @property
    def row_end(self) -> int:
        return self.row_offset + self.num_rows

    @property
    def col_end(self) -> int:
        return self.col_offset + self.num_cols


@dataclass
class TableSharding:
    """How one table is split. ``shards`` is empty for ``data_parallel``
    (every rank holds all of it)."""

    table: str
    sharding_type: ShardingType
    num_embeddings: int
    embedding_dim: int
    shards: List[Shard] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sharding_type = ShardingType.from_str(self.sharding_type, f"for table {self.table!r}")

    def to_dict(self) -> Dict:
        return {
            "table": self.table, "sharding_type": self.sharding_type.value, "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim, "shards": [s.to_dict() for s in self.shards],
        }

    @property
    def splits_rows(self) -> bool:
        """Whether the shards split the rows (row- and table-row-wise)."""
        return self.sharding_type in ROW_SPLIT_TYPES

    @property
    def ranks(self) -> List[int]:
        return sorted({s.rank for s in self.shards})

    def validate(self, world_size: int) -> None:
        """Refuses shards that do not tile the table exactly once."""
        where = f"table {self.table!r} ({self.sharding_type})"
        if self.num_embeddings <= 0 or self.embedding_dim <= 0:
            raise ValueError(f"{where}: invalid size {self.num_embeddings} x {self.embedding_dim}. Must be > 0.")
        if self.sharding_type == ShardingType.DATA_PARALLEL:
            if self.shards:
                raise ValueError(f"{where}: a data-parallel table has no shards; got {len(self.shards)}.")
            return
        if not self.shards:
            raise ValueError(f"{where}: no shards.")
        for s in self.shards:
            if not 0 <= s.rank < world_size:
                raise ValueError(f"{where}: shard on rank {s.rank}; the group has ranks 0..{world_size - 1}.")
            if s.num_rows <= 0 or s.num_cols <= 0 or s.row_offset < 0 or s.col_offset < 0:
                raise ValueError(f"{where}: empty or negative shard {s}.")
            if s.row_end > self.num_embeddings or s.col_end > self.embedding_dim:
                raise ValueError(f"{where}: shard {s} exceeds the table's {self.num_embeddings} x {self.embedding_dim}.")
            _check_tier_split(where, s)
        if self.sharding_type in (ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE):
            if any(s.col_offset != 0 or s.num_cols != self.embedding_dim for s in self.shards):
                raise ValueError(f"{where}: every shard must hold all {self.embedding_dim} columns.")
            _check_tiling(where, [(s.row_offset, s.num_rows) for s in self.shards], self.num_embeddings, "rows")
        if self.sharding_type == ShardingType.TABLE_WISE and len(self.shards) != 1:
            raise ValueError(f"{where}: table-wise means one shard; got {len(self.shards)}.")
        if self.sharding_type == ShardingType.COLUMN_WISE:
            if any(s.row_offset != 0 or s.num_rows != self.num_embeddings for s in self.shards):
                raise ValueError(f"{where}: every column shard must hold all {self.num_embeddings} rows.")
            _check_tiling(where, [(s.col_offset, s.num_cols) for s in self.shards], self.embedding_dim, "columns")
        if len(self.ranks) != len(self.shards):
            raise ValueError(f"{where}: two shards on one rank ({[s.rank for s in self.shards]}).")


def _check_tier_split(where: str, s: Shard) -> None:
    if s.hot_rows is None:
        if s.cold_location is not None:
            raise ValueError(f"{where}: shard on rank {s.rank} has cold_location={s.cold_location.value!r} but no hot_rows.")
        return
    if isinstance(s.hot_rows, bool) or not isinstance(s.hot_rows, int) or not 0 <= s.hot_rows <= s.num_rows:
        raise ValueError(
            f"{where}: invalid hot_rows={s.hot_rows!r} on rank {s.rank}. Must be an int in [0, num_rows={s.num_rows}]."
        )
    if s.hot_rows < s.num_rows and s.cold_location is None:
        raise ValueError(
            f"{where}: shard on rank {s.rank} keeps {s.hot_rows} of {s.num_rows} rows at {s.location.value!r} "
            "but gives no cold_location for the rest."
        )


def _check_tiling(where: str, spans: List[tuple], total: int, what: str) -> None:
    position = 0
    for offset, size in sorted(spans):
        if offset < position:
            raise ValueError(f"{where}: {what} {offset}..{position - 1} are covered by two shards.")
        if offset > position:
            raise ValueError(f"{where}: {what} {position}..{offset - 1} are covered by no shard.")
        position = offset + size
    if position != total:
        raise ValueError(f"{where}: shards cover {what} 0..{position - 1} of {total}.")


@dataclass
class ShardingPlan:
    """Sharding of every table over a group of ``world_size`` ranks."""

    world_size: int
    tables: Dict[str, TableSharding] = field(default_factory=dict)

    def validate(self, table_names: Optional[Iterable[str]] = None) -> None:
        if self.world_size < 1:
            raise ValueError(f"Invalid world_size={self.world_size}. Must be >= 1.")
        for key, sharding in self.tables.items():
            if key != sharding.table:
                raise ValueError(f"The plan files table {sharding.table!r} under the name {key!r}.")
            sharding.validate(self.world_size)
        if table_names is not None:
            names = set(table_names)
            missing, extra = sorted(names - set(self.tables)), sorted(set(self.tables) - names)
            if missing or extra:
                raise ValueError(f"The plan does not match the model: tables without a plan {missing}, planned tables not in the model {extra}.")

    # -- plain data ------------------------------------------------------------

    def to_dict(self) -> Dict:
        return {"world_size": self.world_size, "tables": [t.to_dict() for t in self.tables.values()]}

    @classmethod
    def from_dict(cls, data: Dict) -> "ShardingPlan":
        try:
            tables = {}
            for t in data["tables"]:
                if t["table"] in tables:
                    raise ValueError(f"Not a sharding plan: table {t['table']!r} is listed twice.")
                shards = [Shard.from_dict(s) for s in t.get("shards", [])]
                tables[t["table"]] = TableSharding(
                    table=t["table"],
                    sharding_type=t["sharding_type"],
                    num_embeddings=int(t["num_embeddings"]),
                    embedding_dim=int(t["embedding_dim"]),
                    shards=shards,
                )
            plan = cls(world_size=int(data["world_size"]), tables=tables)
        except (KeyError, TypeError, AttributeError) as e:  # ValueError (a bad type or location) says why itself
            raise ValueError(f"Not a sharding plan: {type(e).__name__} {e}.") from None
        plan.validate()
        return plan

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ShardingPlan":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON sharding plan ({e}).") from None
        return cls.from_dict(data)

    def __str__(self) -> str:
        rows = [("table", "type", "rows x dim", "shards (rank: rows / cols)")]
        for t in self.tables.values():
            if t.sharding_type == ShardingType.DATA_PARALLEL:
                where = f"all {self.world_size} ranks"
            else:
                where = ", ".join(
                    f"{s.rank}: {s.row_offset}..{s.row_end - 1} / {s.col_offset}..{s.col_end - 1}{_tiers_text(s)}"
                    for s in t.shards
                )
            rows.append((t.table, t.sharding_type.value, f"{t.num_embeddings} x {t.embedding_dim}", where))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return f"ShardingPlan over {self.world_size} ranks\n" + "\n".join(lines)


def _tiers_text(s: Shard) -> str:
    if s.hot_rows is None:
        return ""
    return f" ({s.hot_rows} hot at {s.location.value}, {s.cold_rows} at {s.cold_location.value if s.cold_location else '-'})"


# -- building blocks for planners and hand-written plans ------------------------


def even_splits(total: int, parts: int) -> List[tuple]:
    """``(offset, size)`` of ``parts`` near-equal contiguous blocks (the
    first ``total % parts`` one larger); blocks of size 0 are dropped."""
    base, extra = divmod(total, parts)
    spans, offset = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        if size > 0:
            spans.append((offset, size))
        offset += size
    return spans


def table_sharding(
    name: str,
    num_embeddings: int,
    embedding_dim: int,
    sharding_type: Union[str, ShardingType],
    ranks: Sequence[int] = (0,),
    location: Union[str, EmbeddingLocation] = EmbeddingLocation.DEVICE,
) -> TableSharding:
    """One table sharded by ``sharding_type`` over ``ranks`` (row or column
    blocks in rank order; table-wise uses ``ranks[0]``; data-parallel ignores
    them), every shard's rows at ``location``."""
    ranks = list(ranks)
    sharding_type = ShardingType.from_str(sharding_type, f"for table {name!r}")
    location = EmbeddingLocation.from_str(location)
    if sharding_type == ShardingType.DATA_PARALLEL:
        shards: List[Shard] = []
    elif sharding_type == ShardingType.TABLE_WISE:
        shards = [Shard(ranks[0], 0, num_embeddings, 0, embedding_dim, location)]
    elif sharding_type in ROW_SPLIT_TYPES:
        shards = [
            Shard(r, off, size, 0, embedding_dim, location)
            for r, (off, size) in zip(ranks, even_splits(num_embeddings, len(ranks)))
        ]
    else:  # column-wise
        shards = [
            Shard(r, 0, num_embeddings, off, size, location)
            for r, (off, size) in zip(ranks, even_splits(embedding_dim, len(ranks)))
        ]
    return TableSharding(name, sharding_type, num_embeddings, embedding_dim, shards)


def uniform_plan(
    tables: Sequence,
    sharding_type: Union[str, ShardingType],
    world_size: int,
    local_world_size: Optional[int] = None,
    location: Union[str, EmbeddingLocation] = EmbeddingLocation.DEVICE,
) -> ShardingPlan:
    """Every table sharded the same way: table-wise round-robin over ranks,
    row/column-wise over all ranks, table-row-wise over the ranks of one host
    (hosts of ``local_world_size`` ranks, tables round-robin over hosts).
    ``tables`` are ``EmbeddingBagConfig``s (ours or TorchRec's)."""
    plan = ShardingPlan(world_size)
    sharding_type = ShardingType.from_str(sharding_type)
    host = local_world_size or world_size
    if world_size % host != 0:
        raise ValueError(f"Invalid local_world_size={host}. Must divide world_size={world_size}.")
    for i, t in enumerate(tables):
        if sharding_type == ShardingType.TABLE_WISE:
            ranks = [i % world_size]
        elif sharding_type == ShardingType.TABLE_ROW_WISE:
            first = (i % (world_size // host)) * host
            ranks = list(range(first, first + host))
        elif sharding_type == ShardingType.COLUMN_WISE:
            ranks = [(i + k) % world_size for k in range(min(world_size, t.embedding_dim))]
        else:
            ranks = list(range(world_size))
        plan.tables[t.name] = table_sharding(t.name, t.num_embeddings, t.embedding_dim, sharding_type, ranks, location)
    plan.validate()
    return plan
