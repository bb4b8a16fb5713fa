"""Table-wise sharding: a whole table on one rank of the group.

Lookups of the table cost its owner alone, so a planner balances tables
over ranks; ids travel to the owner unchanged and pooled rows come back.
"""

from dist_rec.sharding.scheme import WholeRowsScheme


class TableWise(WholeRowsScheme):
    sharding_type = "table_wise"
