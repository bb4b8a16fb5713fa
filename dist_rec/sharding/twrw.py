"""Table-row-wise sharding: a table's rows split over the ranks of one host.

Row-wise within a host, table-wise across hosts: the all-to-all traffic
of a table stays on the fast intra-host links while its lookups are still
spread over several ranks. Routing is row-wise; only the ranks differ.
"""

from dist_rec.planner.plan import ShardingType
from dist_rec.sharding.rw import RwSharding


class TwRwSharding(RwSharding):
    """Row-wise rules over the ranks of one host (the plan picks the ranks)."""

    sharding_type = ShardingType.TABLE_ROW_WISE
