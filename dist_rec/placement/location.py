"""Where a shard's rows live: the placement vocabulary plans speak.

In the spirit of FBGEMM's ``EmbeddingLocation`` (DEVICE, MANAGED,
MANAGED_CACHING, HOST), one enum names every tier a plan may put rows in;
``dist_rec.placement.create_storage`` turns a location into the storage
that holds them.
"""

from __future__ import annotations

from dist_rec.enums import StrChoice


class EmbeddingLocation(StrChoice):
    """A memory tier for embedding rows.

    ``DEVICE``: the rank's own memory: HBM on a GPU rank, host DRAM on a CPU
    rank (huge pages). ``HOST``: host DRAM (pinned, read over UVA, from a GPU
    rank; the same memory as ``DEVICE`` on a CPU rank). ``SSD``: a file on
    local flash, memory-mapped.
    """

    DEVICE = "device"
    HOST = "host"
    SSD = "ssd"

    @classmethod
    def setting_name(cls) -> str:
        return "location"
