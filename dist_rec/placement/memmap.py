"""``MemmapStorage``: rows and state in memory-mapped files, one per tensor.

The first storage other than ``InMemoryStorage``: tables whose rows live in
files (``<directory>/<table>.weight`` and ``<table>.<state>``, raw
row-major arrays) and reach the kernels only through ``StagedStorage``'s
compact per-batch copies. It proves the storage interface is the only door
to a table's rows: every lookup, update, sync and checkpoint works on it
unchanged. It is deliberately plain, no cache of its own and no direct I/O:
the page cache decides what stays in memory, so it measures nothing about
a slow tier (the tiered storage of the RecShard issue does).

Every read hands out copies, so a caller that changed a block without
handing it back (``write_block``) would lose the change: the interface's
rule, enforced by construction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dist_rec.placement.location import EmbeddingLocation
from dist_rec.placement.staged import StagedStorage
from dist_rec.placement.storage import Block, TableSpec

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def _file_component(name: str) -> str:
    """A table name as a file name (shard names hold '@')."""
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


class MemmapStorage(StagedStorage):
    """Tables as memory-mapped files under ``directory`` (created if needed).

    Args:
        tables, state_names, device: as ``EmbeddingStorage``.
        directory: where the files go; existing files of the same names are
            overwritten (a storage starts fresh: checkpoints keep data).
    """

    location = EmbeddingLocation.SSD

    def __init__(self, tables: Sequence[TableSpec], state_names: Sequence[str], device: torch.device, directory) -> None:
        super().__init__(tables, state_names, device)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._weights, self._states = [], []
        for spec in self.tables:
            if spec.dtype not in _NUMPY_DTYPES:
                raise NotImplementedError(
                    f"MemmapStorage: table {spec.name!r} has dtype {spec.dtype}; memory-mapped tables hold "
                    f"{sorted(str(d) for d in _NUMPY_DTYPES)}."
                )
            stem = self.directory / _file_component(spec.name)
            self._weights.append(self._map(f"{stem}.weight", _NUMPY_DTYPES[spec.dtype], (spec.num_rows, spec.dim)))
            self._states.append({n: self._map(f"{stem}.{n}", np.float32, (spec.num_rows,)) for n in self.state_names})

    @staticmethod
    def _map(path: str, dtype, shape) -> np.memmap:
        array = np.memmap(path, dtype=dtype, mode="w+", shape=shape)
        array[...] = 0
        return array

    def read_rows(self, table: int, ids_U: torch.Tensor) -> Block:
        index = ids_U.to(torch.int64).cpu().numpy()
        weight = torch.from_numpy(np.ascontiguousarray(self._weights[table][index]))
        state = {n: torch.from_numpy(np.ascontiguousarray(a[index])) for n, a in self._states[table].items()}
        return weight, state

    def write_rows(self, table: int, ids_U, weight_UD=None, state=None) -> None:
        index = ids_U.to(torch.int64).cpu().numpy()
        if weight_UD is not None:
            self._weights[table][index] = _as_numpy(weight_UD, self.tables[table].dtype)
        for name, values in (state or {}).items():
            self._states[table][name][index] = _as_numpy(values, torch.float32)

    def read_block(self, table: int, start: int = 0, count: Optional[int] = None) -> Block:
        count = self.tables[table].num_rows - start if count is None else count
        self._check_block(table, start, count)
        end = start + count
        weight = torch.from_numpy(np.array(self._weights[table][start:end]))
        return weight, {n: torch.from_numpy(np.array(a[start:end])) for n, a in self._states[table].items()}

    def write_block(self, table: int, start: int, weight=None, state=None) -> None:
        if weight is not None:
            self._check_block(table, start, weight.shape[0])
            self._weights[table][start : start + weight.shape[0]] = _as_numpy(weight, self.tables[table].dtype)
        for name, values in (state or {}).items():
            self._check_block(table, start, values.shape[0])
            self._states[table][name][start : start + values.shape[0]] = _as_numpy(values, torch.float32)

    def flush(self) -> None:
        """Writes the mapped pages back to their files."""
        for weight, state in zip(self._weights, self._states):
            weight.flush()
            for array in state.values():
                array.flush()


def _as_numpy(tensor: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=dtype).numpy()
