"""Every sharding type's rules, by type."""

from __future__ import annotations

from typing import Dict

from dist_rec.planner.plan import ShardingType
from dist_rec.sharding.cw import CwSharding
from dist_rec.sharding.dp import DpSharding
from dist_rec.sharding.rw import RwSharding
from dist_rec.sharding.scheme import ShardingScheme
from dist_rec.sharding.tw import TwSharding
from dist_rec.sharding.twrw import TwRwSharding

SCHEMES: Dict[ShardingType, ShardingScheme] = {
    s.sharding_type: s for s in (TwSharding(), RwSharding(), CwSharding(), TwRwSharding(), DpSharding())
}


def scheme_for(sharding_type) -> ShardingScheme:
    return SCHEMES[ShardingType.from_str(sharding_type)]
