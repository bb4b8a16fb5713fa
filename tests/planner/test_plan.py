"""Sharding plans as data: validation refuses shards that do not tile a
table exactly once, uniform plans for every type, JSON round trips."""

import json
import re

import pytest

from dist_rec.modules.embedding_configs import EmbeddingBagConfig
from dist_rec.placement import EmbeddingLocation
from dist_rec.planner.plan import (
    SHARDING_TYPES,
    Shard,
    ShardingPlan,
    ShardingType,
    TableSharding,
    even_splits,
    table_sharding,
    uniform_plan,
)

TABLES = [
    EmbeddingBagConfig(num_embeddings=rows, embedding_dim=dim, name=f"t{i}", feature_names=[f"f{i}"])
    for i, (rows, dim) in enumerate([(10, 4), (7, 3), (100, 8), (3, 16), (50, 2)])
]


def rows_sharding(spans, sharding_type="row_wise", rows=10, dim=4):
    return TableSharding("t", sharding_type, rows, dim, [Shard(r, off, n, 0, dim) for r, (off, n) in enumerate(spans)])


def cols_sharding(spans, rows=10, dim=4):
    return TableSharding("t", "column_wise", rows, dim, [Shard(r, 0, rows, off, n) for r, (off, n) in enumerate(spans)])


# -- validation ----------------------------------------------------------------------


def test_valid_shardings_pass():
    rows_sharding([(0, 5), (5, 5)]).validate(2)
    rows_sharding([(5, 5), (0, 5)], "table_row_wise").validate(2)  # any order
    cols_sharding([(0, 1), (1, 3)]).validate(2)
    TableSharding("t", "table_wise", 10, 4, [Shard(1, 0, 10, 0, 4)]).validate(2)
    TableSharding("t", "data_parallel", 10, 4).validate(2)


@pytest.mark.parametrize(
    "sharding, message",
    [
        (rows_sharding([(0, 6), (4, 6)]), "rows 4..5 are covered by two shards"),  # overlap
        (rows_sharding([(0, 4), (5, 5)]), "rows 4..4 are covered by no shard"),  # gap
        (rows_sharding([(1, 9)]), "rows 0..0 are covered by no shard"),  # first rows missing
        (rows_sharding([(0, 4), (4, 4)]), "shards cover rows 0..7 of 10"),  # last rows missing
        (cols_sharding([(0, 2), (3, 1)]), "columns 2..2 are covered by no shard"),
        (cols_sharding([(0, 3), (2, 2)]), "columns 2..2 are covered by two shards"),  # overlap
    ],
)
def test_tiling_errors(sharding, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sharding.validate(4)


@pytest.mark.parametrize("rank", [-1, 2, 5])
def test_shard_on_a_rank_outside_the_group(rank):
    sharding = TableSharding("t", "table_wise", 10, 4, [Shard(rank, 0, 10, 0, 4)])
    with pytest.raises(
        ValueError, match=re.escape(f"table 't' (table_wise): shard on rank {rank}; the group has ranks 0..1.")
    ):
        sharding.validate(2)


def test_unknown_sharding_type():
    with pytest.raises(
        ValueError,
        match=re.escape("Invalid sharding_type='rowwise' for table 't'. Must be one of data_parallel, table_wise"),
    ):
        rows_sharding([(0, 10)], "rowwise").validate(2)


@pytest.mark.parametrize(
    "sharding, message",
    [
        (
            TableSharding("t", "data_parallel", 10, 4, [Shard(0, 0, 10, 0, 4)]),
            "a data-parallel table has no shards; got 1.",
        ),
        (TableSharding("t", "row_wise", 10, 4, []), "no shards."),
        (rows_sharding([(0, 5), (5, 5)], "table_wise"), "table-wise means one shard; got 2."),
        (TableSharding("t", "table_wise", 10, 4, [Shard(0, 0, 10, 0, 3)]), "every shard must hold all 4 columns."),
        (TableSharding("t", "row_wise", 10, 4, [Shard(0, 0, 10, 1, 3)]), "every shard must hold all 4 columns."),
        (TableSharding("t", "column_wise", 10, 4, [Shard(0, 0, 9, 0, 4)]), "every column shard must hold all 10 rows."),
        (
            TableSharding("t", "row_wise", 10, 4, [Shard(0, 0, 0, 0, 4), Shard(1, 0, 10, 0, 4)]),
            "empty or negative shard",
        ),
        (TableSharding("t", "row_wise", 10, 4, [Shard(0, -1, 11, 0, 4)]), "empty or negative shard"),
        (TableSharding("t", "row_wise", 10, 4, [Shard(0, 0, 11, 0, 4)]), "exceeds the table's 10 x 4."),
        (
            TableSharding("t", "column_wise", 10, 4, [Shard(0, 0, 10, 2, 3), Shard(1, 0, 10, 0, 2)]),
            "exceeds the table's 10 x 4.",
        ),
        (
            TableSharding("t", "row_wise", 10, 4, [Shard(0, 0, 5, 0, 4), Shard(0, 5, 5, 0, 4)]),
            "two shards on one rank ([0, 0]).",
        ),
    ],
)
def test_shape_errors(sharding, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sharding.validate(2)


def test_plan_validation_checks_world_size_and_table_names():
    with pytest.raises(ValueError, match=re.escape("Invalid world_size=0. Must be >= 1.")):
        ShardingPlan(0).validate()
    plan = uniform_plan(TABLES[:2], "row_wise", 2)
    plan.validate(["t0", "t1"])
    with pytest.raises(
        ValueError, match=re.escape("tables without a plan ['t2'], planned tables not in the model ['t1']")
    ):
        plan.validate(["t0", "t2"])


def test_plan_validation_reaches_every_table():
    plan = uniform_plan(TABLES[:2], "table_wise", 2)
    plan.tables["t1"].shards[0] = Shard(3, 0, 7, 0, 3)
    with pytest.raises(ValueError, match=re.escape("table 't1' (table_wise): shard on rank 3")):
        plan.validate()


# -- building blocks ------------------------------------------------------------------


def test_even_splits():
    assert even_splits(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert even_splits(9, 3) == [(0, 3), (3, 3), (6, 3)]
    assert even_splits(2, 4) == [(0, 1), (1, 1)]  # empty blocks dropped


def test_table_sharding_refuses_unknown_type():
    with pytest.raises(ValueError, match=re.escape("Invalid sharding_type='grid' for table 't'.")):
        table_sharding("t", 10, 4, "grid", [0])


def test_row_wise_with_fewer_rows_than_ranks_uses_fewer_ranks():
    sharding = table_sharding("t", 2, 4, "row_wise", [0, 1, 2, 3])
    sharding.validate(4)
    assert sharding.ranks == [0, 1]


# -- uniform plans ---------------------------------------------------------------------


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_uniform_plan_every_type(sharding_type):
    world, host = 4, 2
    plan = uniform_plan(TABLES, sharding_type, world, local_world_size=host)
    plan.validate([t.name for t in TABLES])
    assert list(plan.tables) == [t.name for t in TABLES]
    for i, (t, s) in enumerate(zip(TABLES, plan.tables.values())):
        assert (s.table, s.sharding_type, s.num_embeddings, s.embedding_dim) == (
            t.name,
            sharding_type,
            t.num_embeddings,
            t.embedding_dim,
        )
        if sharding_type == "data_parallel":
            assert s.shards == []
        elif sharding_type == "table_wise":
            assert s.shards == [Shard(i % world, 0, t.num_embeddings, 0, t.embedding_dim)]
        elif sharding_type == "row_wise":
            assert s.ranks == list(range(min(world, t.num_embeddings)))
            assert sum(x.num_rows for x in s.shards) == t.num_embeddings
        elif sharding_type == "table_row_wise":
            first = (i % (world // host)) * host
            assert s.ranks == [first, first + 1]
        elif sharding_type == "column_wise":
            assert len(s.shards) == min(world, t.embedding_dim)
            assert sum(x.num_cols for x in s.shards) == t.embedding_dim
            assert all(x.num_rows == t.num_embeddings for x in s.shards)


def test_uniform_plan_column_wise_narrow_table_and_rotation():
    plan = uniform_plan(TABLES, "column_wise", 4)
    assert [s.rank for s in plan.tables["t1"].shards] == [1, 2, 3]  # dim 3: three blocks, starting at rank 1
    assert [(s.col_offset, s.num_cols) for s in plan.tables["t4"].shards] == [(0, 1), (1, 1)]


def test_uniform_plan_table_row_wise_one_host_by_default():
    plan = uniform_plan(TABLES, "table_row_wise", 4)
    assert all(s.ranks == [0, 1, 2, 3] for name, s in plan.tables.items() if name != "t3")


def test_uniform_plan_refuses_host_size_that_does_not_divide():
    with pytest.raises(ValueError, match=re.escape("Invalid local_world_size=3. Must divide world_size=4.")):
        uniform_plan(TABLES, "table_row_wise", 4, local_world_size=3)


def test_uniform_plan_refuses_unknown_type():
    with pytest.raises(ValueError, match="Invalid sharding_type='diagonal'"):
        uniform_plan(TABLES, "diagonal", 2)


# -- plain data ---------------------------------------------------------------------------


@pytest.mark.parametrize("sharding_type", SHARDING_TYPES)
def test_json_round_trip(tmp_path, sharding_type):
    plan = uniform_plan(TABLES, sharding_type, 4, local_world_size=2)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert ShardingPlan.load(path) == plan
    assert ShardingPlan.from_dict(json.loads(path.read_text())) == plan


def test_shard_locations_round_trip_and_default_to_device(tmp_path):
    plan = uniform_plan(TABLES, "row_wise", 2, location="ssd")
    assert {s.location for t in plan.tables.values() for s in t.shards} == {EmbeddingLocation.SSD}
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["tables"][0]["shards"][0]["location"] == "ssd"
    assert ShardingPlan.from_dict(data) == plan
    for table in data["tables"]:  # a plan saved before shards had a location
        for shard in table["shards"]:
            del shard["location"]
    assert {s.location for t in ShardingPlan.from_dict(data).tables.values() for s in t.shards} == {EmbeddingLocation.DEVICE}
    with pytest.raises(ValueError, match=re.escape("Invalid location='tape'. Must be one of device, host, ssd.")):
        table_sharding("t", 10, 4, "table_wise", [0], location="tape")


def test_sharding_type_is_an_enum_that_reads_its_strings():
    plan = uniform_plan(TABLES[:1], "table_wise", 2)
    assert plan.tables["t0"].sharding_type is ShardingType.TABLE_WISE
    assert ShardingType.from_str("row_wise") is ShardingType.ROW_WISE
    assert plan.to_dict()["tables"][0]["sharding_type"] == "table_wise"


def test_load_refuses_what_is_not_a_plan(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON sharding plan"):
        ShardingPlan.load(path)
    with pytest.raises(ValueError, match=re.escape("Not a sharding plan: KeyError 'tables'.")):
        ShardingPlan.from_dict({"world_size": 2})
    with pytest.raises(ValueError, match=re.escape("Not a sharding plan: TypeError")):
        ShardingPlan.from_dict(
            {
                "world_size": 2,
                "tables": [
                    {
                        "table": "t",
                        "sharding_type": "table_wise",
                        "num_embeddings": 3,
                        "embedding_dim": 2,
                        "shards": [{"rank": 0}],
                    }
                ],
            }
        )


def test_load_validates(tmp_path):
    data = uniform_plan(TABLES[:1], "row_wise", 2).to_dict()
    data["tables"][0]["shards"][1]["row_offset"] = 4  # overlaps the first block
    with pytest.raises(ValueError, match="covered by two shards"):
        ShardingPlan.from_dict(data)
    data = uniform_plan(TABLES[:1], "row_wise", 2).to_dict()
    data["tables"].append(dict(data["tables"][0]))
    with pytest.raises(ValueError, match="listed twice"):
        ShardingPlan.from_dict(data)


def test_printable_table():
    text = str(uniform_plan(TABLES[:2], "row_wise", 2)) + "\n" + str(uniform_plan(TABLES[:1], "data_parallel", 3))
    assert text.splitlines()[0] == "ShardingPlan over 2 ranks"
    assert "t0    | row_wise | 10 x 4     | 0: 0..4 / 0..3, 1: 5..9 / 0..3" in text
    assert "all 3 ranks" in text
