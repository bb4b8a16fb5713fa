"""Where a shard's rows live: the placement vocabulary plans speak.

In the spirit of FBGEMM's ``EmbeddingLocation`` (DEVICE, MANAGED,
MANAGED_CACHING, HOST), one enum names every tier a plan may put rows in;
``dist_rec.placement.create_storage`` turns a location into the storage
that holds them.
"""

from __future__ import annotations

import enum
from typing import List


class EmbeddingLocation(str, enum.Enum):
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
    def str_values(cls) -> List[str]:
        return [member.value for member in cls]

    @classmethod
    def from_str(cls, value) -> "EmbeddingLocation":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"Invalid location={value!r}. Must be one of {cls.str_values()}.") from None

    def __str__(self) -> str:
        return self.value
