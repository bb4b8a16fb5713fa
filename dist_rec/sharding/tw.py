"""Table-wise sharding: a whole table on one rank of the group.

Lookups of the table cost its owner alone, so a planner balances tables
over ranks; ids travel to the owner unchanged and pooled rows come back.
"""

from dist_rec.planner.plan import ShardingType
from dist_rec.sharding.scheme import WholeRowsScheme


class TwSharding(WholeRowsScheme):
    """Input: the feature's bags whole, to the table's one shard. Output:
    the shard's pooled columns are the feature's."""

    sharding_type = ShardingType.TABLE_WISE
