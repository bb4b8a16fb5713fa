"""Reading a checkpoint, one verified file at a time, and the resharding
rule that assembles any rectangle of a table from the saved blocks.

Nothing here is a collective: a rank can read exactly the files its own
shards need, which is what both ``load_checkpoint`` (every rank, then an
agreement) and partial recovery (one replacement rank alone) do.

Resharding rule. The saved files of a table tile it (validated from the
manifest). For a live rectangle R, every saved block S that meets R gives
``weight[R ∩ S]``; row-wise optimizer state holds one value per row,
identical in every column block of that row, so each overlapping block
gives ``state[rows of R ∩ S]`` and any of them serves. Together the blocks
cover R exactly once (weights) and every row of R at least once (state).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from dist_rec.checkpoint.delta import decode_rows, decode_weights, saved_row_count
from dist_rec.checkpoint.files import CheckpointError, resolve_for_load
from dist_rec.checkpoint.manifest import Rect, file_rect, overlap, read_manifest


class CheckpointReader:
    """A checkpoint directory opened for reading.

    Args:
        directory: the checkpoint (``save_checkpoint``'s directory). When it
            is missing because a save died while publishing, the complete
            sibling it left is read instead (``note`` says so).

    Example::

        reader = CheckpointReader("ckpt/step_1000")
        weight, state = reader.read_rectangle("sparse_arch", "t0", (0, 100, 0, 64))
    """

    def __init__(self, directory) -> None:
        self.requested = Path(directory)
        self.directory, self.note = resolve_for_load(self.requested)
        self.manifest = read_manifest(self.directory)
        self._cache: Dict[str, Dict[str, torch.Tensor]] = {}

    @staticmethod
    def find(directory) -> Optional[Path]:
        """The newest complete checkpoint ``directory`` holds (itself; the
        newest complete sibling an interrupted publish left; or, for a series
        root, its newest entry), or None when there is none yet."""
        if directory is None:
            return None
        path, _ = resolve_for_load(Path(directory))
        if (path / "manifest.json").is_file():
            return path
        from dist_rec.checkpoint.series import CheckpointSeries

        entries = CheckpointSeries(directory).entries()
        return entries[-1] if entries else None

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def entries(self, module: str, table: str) -> List[Dict]:
        return [e for e in self.manifest["files"] if e.get("module") == module and e.get("table") == table]

    def overlapping(self, module: str, table: str, rect: Rect) -> List[Tuple[Dict, Rect]]:
        """The saved blocks of ``table`` that meet ``rect``, with the overlap."""
        out = []
        for entry in self.entries(module, table):
            common = overlap(rect, file_rect(entry))
            if common is not None:
                out.append((entry, common))
        return out

    def check_present(self) -> None:
        """Every listed file exists with its recorded size (a stat each:
        cheap, and catches missing or truncated files whoever needs them)."""
        for entry in self.manifest["files"]:
            path = self.directory / entry["file"]
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (listed in the manifest of {self.directory}).")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise CheckpointError(
                    f"{path}: {size} bytes, the manifest records {entry['bytes']} (truncated or overwritten)."
                )

    def read_file(self, entry: Dict) -> Dict:
        """The tensors of one file, after checking its size, sha256 and the
        recorded names, shapes and dtypes. Cached per file."""
        name = entry["file"]
        if name in self._cache:
            return self._cache[name]
        path = self.directory / name
        # Mapped, not read into a buffer: the hash and the tensors read the
        # same page-cache pages, and no copy of the file is made before the
        # rows are copied into their shard.
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (listed in the manifest of {self.directory}).") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e}).") from None
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest records {entry['bytes']} (truncated or overwritten).")
        digest = hashlib.sha256(view).hexdigest()
        if digest != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']} (corrupt file).")
        try:
            # Shard files stay mapped until their rows are copied in; the dense
            # state (small, and held by the optimizer afterwards) is read whole.
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=entry["kind"] != "dense")
        except Exception as e:  # a checksummed file that torch cannot read: written by something else
            raise CheckpointError(f"{path}: not a readable tensor file ({type(e).__name__}: {e}).") from None
        finally:
            if size:
                view.close()
        if entry["kind"] != "dense":
            _check_tensors(path, content, entry["tensors"])
        if entry["kind"] == "delta" and saved_row_count(content) != int(entry["rows"]):
            raise CheckpointError(f"{path}: its row bitmap names {saved_row_count(content)} rows; the manifest records "
                                  f"{entry['rows']} (and the file holds that many weight rows).")  # fmt: skip
        self._cache[name] = content
        return content

    def read_dense(self) -> Dict:
        entry = next(e for e in self.manifest["files"] if e["kind"] == "dense")
        content = self.read_file(entry)
        if not isinstance(content, dict) or not {"model", "optimizer", "extra"} <= set(content):
            found = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise CheckpointError(f"{self.directory / entry['file']}: not a dense-state file (it holds {found}).")
        return content

    def prefetch(self, wanted: List[Tuple[str, str, Rect]]) -> None:
        """Reads and verifies, side by side on every core, the files that
        the rectangles ``(module, table, rect)`` need (hashing releases the
        GIL), so that the ``copies_for`` that follow find them read. The
        first failing file raises, as ``read_file`` would."""
        entries = {e["file"]: e for module, table, rect in wanted for e, _ in self.overlapping(module, table, rect)}
        pending = [e for name, e in entries.items() if name not in self._cache]
        if len(pending) < 2:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(pending), os.cpu_count() or 1)) as pool:
            list(pool.map(self.read_file, pending))

    def copies_for(self, module: str, table: str, rect: Rect) -> List[Tuple[Dict[str, torch.Tensor], Rect, Rect]]:
        """(saved tensors, saved rectangle, overlap) for every saved block
        meeting ``rect``; reads and verifies those files."""
        return [(self.read_file(entry), file_rect(entry), common) for entry, common in self.overlapping(module, table, rect)]

    def read_rectangle(
        self, module: str, table: str, rect: Rect, state_names: Optional[List[str]] = None
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """New tensors holding ``rect`` = (row_offset, num_rows, col_offset,
        num_cols) of ``table``: the weight block and each row-wise state
        (default: every state the checkpoint's optimizer keeps)."""
        record = self.manifest["modules"].get(module)
        if record is None or table not in record["tables"]:
            raise CheckpointError(f"{self.directory}: no table {table!r} in module {module!r}.")
        config = record["tables"][table]
        saved_names = record["optimizer"]["state_names"]
        names = saved_names if state_names is None else list(state_names)
        if not set(names) <= set(saved_names):
            unknown = sorted(set(names) - set(saved_names))
            raise CheckpointError(f"{self.directory}: no optimizer state {unknown}; it saved {saved_names}.")
        weight = torch.empty(rect[1], rect[3], dtype=getattr(torch, config["dtype"]))
        state = {n: torch.empty(rect[1], dtype=torch.float32) for n in names}
        copies = self.copies_for(module, table, rect)
        if not copies or sum(c[2][1] * c[2][3] for c in copies) != rect[1] * rect[3]:
            size = f"{config['num_embeddings']} x {config['embedding_dim']}"
            raise CheckpointError(f"{self.directory}: rectangle {rect} is not inside table {table!r} ({size}).")
        for tensors, saved, common in copies:
            copy_block(weight, state, rect, tensors, saved, common)
        return weight, state


def _check_tensors(path: Path, content, recorded: Dict) -> None:
    if not isinstance(content, dict) or set(content) != set(recorded):
        got = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"{path}: holds {got}; the manifest records tensors {sorted(recorded)}.")
    for name, record in recorded.items():
        tensor = content[name]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: {name!r} is a {type(tensor).__name__}, not a tensor.")
        if list(tensor.shape) != list(record["shape"]) or str(tensor.dtype) != f"torch.{record['dtype']}":
            raise CheckpointError(
                f"{path}: tensor {name!r} is {list(tensor.shape)} {tensor.dtype}; the manifest records "
                f"{record['shape']} torch.{record['dtype']}."
            )


@torch.no_grad()
def copy_block(
    weight: torch.Tensor,
    state: Dict[str, torch.Tensor],
    rect: Rect,
    saved_tensors: Dict[str, torch.Tensor],
    saved: Rect,
    common: Rect,
) -> None:
    """Copies the ``common`` part of a saved block (at ``saved``) into the
    live tensors of rectangle ``rect``: weight rows x cols, state rows."""
    r0, nr, c0, nc = common
    dr, dc = r0 - rect[0], c0 - rect[2]
    sr, sc = r0 - saved[0], c0 - saved[2]
    weight[dr : dr + nr, dc : dc + nc].copy_(saved_tensors["weight"][sr : sr + nr, sc : sc + nc])
    for name, tensor in state.items():
        tensor[dr : dr + nr].copy_(saved_tensors[name][sr : sr + nr])


@torch.no_grad()
def copy_block_into_shard(local, rect: Rect, saved_tensors: Dict[str, torch.Tensor], saved: Rect, common: Rect) -> None:
    """``copy_block`` into a live shard (``LocalShard``), through its
    storage: whole rows go in as they are; a column part of rows is merged
    into the shard's rows first."""
    r0, nr, c0, nc = common
    dr, dc = r0 - rect[0], c0 - rect[2]
    sr, sc = r0 - saved[0], c0 - saved[2]
    part = saved_tensors["weight"][sr : sr + nr, sc : sc + nc]
    state = {name: saved_tensors[name][sr : sr + nr] for name in local.state_names}
    if nc == rect[3]:
        local.write(part, state, start=dr)
        return
    weight, _ = local.read(dr, nr)
    weight[:, dc : dc + nc] = part
    local.write(weight, state, start=dr)


@torch.no_grad()
def copy_rows_into_shard(local, rect: Rect, saved_tensors: Dict[str, torch.Tensor], saved: Rect, common: Rect) -> None:
    """A delta's rows (``delta.decode_rows`` of the saved rectangle
    ``saved``) that fall in ``common`` into a live shard, through its
    storage (``write_rows``); a column part of rows is merged first, and a
    quantised delta's changes are added to the rows' current values."""
    r0, nr, c0, nc = common
    rows = decode_rows(saved_tensors, saved[0], saved[1])
    inside = (rows >= r0) & (rows < r0 + nr)
    if not bool(inside.any()):
        return
    picked = inside.nonzero().flatten()
    local_ids = rows[picked] - rect[0]
    cols = slice(c0 - saved[2], c0 - saved[2] + nc)
    whole = nc == rect[3]
    current = None
    if not whole or "weight" not in saved_tensors:
        current, _ = local.storage.read_rows(local.index, local_ids)
    here = slice(c0 - rect[2], c0 - rect[2] + nc)
    part = decode_weights(saved_tensors, picked, saved[3], cols, current[:, here] if current is not None else None)
    state = {name: saved_tensors[name][picked] for name in local.state_names}
    if not whole:
        current[:, here] = part
        part = current
    local.storage.write_rows(local.index, local_ids, part, state)
