"""Replica synchronisation: rules (MA, EASGD, BMUF) and the background
synchroniser (ShadowSync) with its foreground counterpart."""

from dist_rec.sync.rules import RULES, BlockMomentum, ElasticAveraging, ModelAveraging, make_rule
from dist_rec.sync.shadow import ForegroundSync, ShadowSync

__all__ = ["RULES", "BlockMomentum", "ElasticAveraging", "ForegroundSync", "ModelAveraging", "ShadowSync", "make_rule"]
