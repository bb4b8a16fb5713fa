"""Data sources of the trainer; each yields ``Batch``es split over ranks the
same way (see ``batch.py``)."""

from dist_rec.data.batch import Batch, Dataset
from dist_rec.data.binary import BinaryDataset, write_binary_dataset
from dist_rec.data.criteo import CriteoTextDataset
from dist_rec.data.synthetic import SyntheticConfig, SyntheticDataset

__all__ = [
    "Batch",
    "BinaryDataset",
    "CriteoTextDataset",
    "Dataset",
    "SyntheticConfig",
    "SyntheticDataset",
    "write_binary_dataset",
]
