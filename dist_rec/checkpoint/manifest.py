"""The manifest: what a checkpoint holds, and the checks that decide whether
it can be loaded into a model.

``manifest.json`` is plain JSON, written last. It records the format
version, the step, the saving world and grid, per sharded collection (by
module path) its plan, table configs and fused optimizer, and per file the
table rectangle it holds, its tensors (name, shape, dtype), its size and
its sha256. Everything a loader needs to pick and verify the files of one
shard is here, without opening any other file.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple

import torch

from dist_rec.checkpoint.delta import expected_tensors
from dist_rec.checkpoint.files import MANIFEST, CheckpointError
from dist_rec.planner.plan import ShardingPlan, ShardingType

FORMAT = "dist_rec.checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Optimizer hyper-parameters a schedule may change between steps: recorded,
# never compared.
SCHEDULED_HYPERPARAMETERS = ("lr",)

Rect = Tuple[int, int, int, int]  # row_offset, num_rows, col_offset, num_cols


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor_record(tensor: torch.Tensor) -> Dict:
    return {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}


def _plain(name: str, value):
    """A hyper-parameter as JSON, spelled one way (``"L2"``, ``"l2"`` and
    ``WeightDecayMode.L2`` are the same setting)."""
    if name == "weight_decay_mode":
        from dist_rec.optim.fused import _weight_decay_mode

        return _weight_decay_mode(value).name.lower()
    if isinstance(value, enum.Enum):
        return value.name.lower()
    return value


def optimizer_record(optimizer) -> Dict:
    hyper = {f.name: _plain(f.name, getattr(optimizer, f.name)) for f in dataclasses.fields(optimizer)}
    return {
        "class": type(optimizer).__name__,
        "state_names": list(optimizer.state_names),
        "hyperparameters": hyper,
    }


def table_records(sharded) -> Dict[str, Dict]:
    return {
        c.name: {
            "num_embeddings": c.num_embeddings,
            "embedding_dim": c.embedding_dim,
            "data_type": c.data_type.value,
            "dtype": dtype_name(c.dtype),
        }
        for c in sharded.embedding_bag_configs()
    }


def file_rect(entry: Dict) -> Rect:
    return (entry["row_offset"], entry["num_rows"], entry["col_offset"], entry["num_cols"])


# -- reading ------------------------------------------------------------------


def read_manifest(directory) -> Dict:
    """Parses and checks ``<directory>/manifest.json`` on its own (format,
    version, internal consistency). Raises ``CheckpointError``."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"No checkpoint at {directory}: the directory does not exist.")
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a complete checkpoint: it has no {MANIFEST} "
            "(the manifest is written last, so this is an unfinished or foreign directory)."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON manifest ({e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path}: not a dist_rec checkpoint manifest (format={found!r}, expected {FORMAT!r}).")
    version = manifest.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format version {version!r}; this dist_rec reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}."
        )
    try:
        _check_structure(manifest)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise CheckpointError(f"{path}: {e}") from None
        raise CheckpointError(f"{path}: malformed manifest ({type(e).__name__}: {e}).") from None
    return manifest


def _check_structure(manifest: Dict) -> None:
    """Every file entry is well formed, and per table the files tile the
    table exactly as the saved plan says (so any rectangle is covered)."""
    int(manifest["step"])
    if manifest.get("kind", "base") not in ("base", "delta"):
        raise CheckpointError(f"unknown checkpoint kind {manifest.get('kind')!r} (must be 'base' or 'delta').")
    if manifest.get("kind") == "delta" and not manifest.get("parent"):
        raise CheckpointError("a delta checkpoint must name its parent.")
    modules = manifest["modules"]
    by_table: Dict[Tuple[str, str], List[Rect]] = {}
    seen = set()
    for entry in manifest["files"]:
        name = entry["file"]
        where = f"file {name!r}"
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise CheckpointError(f"{where}: path escapes the checkpoint directory.")
        if name in seen:
            raise CheckpointError(f"{where}: listed twice.")
        seen.add(name)
        int(entry["bytes"])
        if not isinstance(entry["sha256"], str) or len(entry["sha256"]) != 64:
            raise CheckpointError(f"{where}: invalid sha256 {entry['sha256']!r}.")
        if entry["kind"] == "dense":
            continue
        if entry["kind"] not in ("shard", "data_parallel", "delta"):
            raise CheckpointError(f"{where}: unknown kind {entry['kind']!r}.")
        module, table = entry["module"], entry["table"]
        if module not in modules or table not in modules[module]["tables"]:
            raise CheckpointError(f"{where}: table {table!r} of module {module!r} is not in the manifest's tables.")
        config = modules[module]["tables"][table]
        rows, dim = config["num_embeddings"], config["embedding_dim"]
        r0, nr, c0, nc = file_rect(entry)
        if r0 < 0 or c0 < 0 or nr <= 0 or nc <= 0 or r0 + nr > rows or c0 + nc > dim:
            raise CheckpointError(
                f"{where}: rectangle rows {r0}+{nr}, cols {c0}+{nc} is outside table {table!r} ({rows} x {dim})."
            )
        tensors = entry["tensors"]
        count = nr
        if entry["kind"] == "delta":  # some rows of the rectangle: their ids, then the rows
            count = int(entry["rows"])
            if not 0 <= count <= nr:
                raise CheckpointError(f"{where}: {count} rows saved of a {nr}-row rectangle.")
        if entry["kind"] == "delta":
            expected = expected_tensors(tensors, count, nr, nc, config["dtype"])
        else:
            expected = {"weight": ([count, nc], config["dtype"])}
        for state in modules[module]["optimizer"]["state_names"]:
            expected[state] = ([count], "float32")
        got = {k: (list(v["shape"]), v["dtype"]) for k, v in tensors.items()}
        if got != expected:
            raise CheckpointError(f"{where}: records tensors {got}; a {nr} x {nc} block of {table!r} needs {expected}.")
        by_table.setdefault((module, table), []).append(file_rect(entry))
    if sum(1 for e in manifest["files"] if e["kind"] == "dense") != 1:
        raise CheckpointError("the manifest must list exactly one dense file.")
    for module, record in modules.items():
        plan = ShardingPlan.from_dict(record["plan"])
        for table, config in record["tables"].items():
            sharding = plan.tables.get(table)
            if sharding is None:
                raise CheckpointError(f"table {table!r} of module {module!r} has no saved plan.")
            if sharding.sharding_type == ShardingType.DATA_PARALLEL:
                expected_rects = [(0, config["num_embeddings"], 0, config["embedding_dim"])]
            else:
                expected_rects = [(s.row_offset, s.num_rows, s.col_offset, s.num_cols) for s in sharding.shards]
            got_rects = by_table.get((module, table), [])
            if sorted(got_rects) != sorted(expected_rects):
                missing = sorted(set(expected_rects) - set(got_rects))
                raise CheckpointError(
                    f"table {table!r} of module {module!r}: the files hold rectangles {sorted(got_rects)}; the saved plan "
                    f"has {sorted(expected_rects)} (missing {missing})."
                )


# -- against a model ------------------------------------------------------------


def check_model_matches(manifest: Dict, model) -> None:
    """Refuses a checkpoint whose sharded collections, tables or fused
    optimizers differ from ``model``'s (a ``DistributedModelParallel``)."""
    saved, live = set(manifest["modules"]), set(model.sharded)
    if saved != live:
        raise CheckpointError(
            f"The checkpoint holds sharded collections {sorted(saved)}; the model has {sorted(live)}."
        )
    for path, sharded in model.sharded.items():
        record = manifest["modules"][path]
        saved_tables, live_tables = record["tables"], table_records(sharded)
        if set(saved_tables) != set(live_tables):
            raise CheckpointError(
                f"Module {path!r}: the checkpoint has tables {sorted(saved_tables)}; the model has {sorted(live_tables)}."
            )
        for name, live in live_tables.items():
            s = saved_tables[name]
            diffs = [f"{k} {s.get(k)!r} in the checkpoint, {v!r} in the model" for k, v in live.items() if s.get(k) != v]
            if diffs:
                raise CheckpointError(f"Table {name!r} of module {path!r} differs: {'; '.join(diffs)}.")
        saved_opt, live_opt = record["optimizer"], optimizer_record(sharded.optimizer)
        if saved_opt["class"] != live_opt["class"] or saved_opt["state_names"] != live_opt["state_names"]:
            raise CheckpointError(
                f"Module {path!r}: the checkpoint was trained with fused optimizer {saved_opt['class']} "
                f"(state {saved_opt['state_names']}); the model uses {live_opt['class']} (state {live_opt['state_names']})."
            )
        diffs = [
            f"{k}={saved_opt['hyperparameters'].get(k)!r} in the checkpoint, {v!r} in the model"
            for k, v in live_opt["hyperparameters"].items()
            if k not in SCHEDULED_HYPERPARAMETERS and saved_opt["hyperparameters"].get(k) != v
        ]
        if diffs:
            raise CheckpointError(f"Module {path!r}: fused optimizer {live_opt['class']} differs: {'; '.join(diffs)}.")


def overlap(a: Rect, b: Rect) -> Optional[Rect]:
    """The intersection of two rectangles (row_offset, num_rows, col_offset,
    num_cols), or None when they do not meet."""
    r0, r1 = max(a[0], b[0]), min(a[0] + a[1], b[0] + b[1])
    c0, c1 = max(a[2], b[2]), min(a[2] + a[3], b[2] + b[3])
    if r0 >= r1 or c0 >= c1:
        return None
    return (r0, r1 - r0, c0, c1 - c0)
