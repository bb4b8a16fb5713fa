"""``save_checkpoint`` and ``load_checkpoint``: sharded, atomic, verified,
and reshardable on load.

Both are collectives over the default process group: every rank calls them
with the same arguments. Every rank writes (or reads) only its own shards;
rank 0 writes the data-parallel tables, the dense state and the manifest,
and publishes the directory (``files.py``). A failure on any rank is agreed
over all ranks (one ``all_gather_object`` of the error texts), so every rank
raises the same ``CheckpointError`` instead of some ranks hanging.

Layout of a checkpoint ``<dir>``::

    manifest.json                                    written last (see manifest.py)
    dense.pt                                         dense state_dict, dense optimizer, extra
    shards/<module>/<table>/r<row>_c<col>.pt         one model-parallel shard: weight + row-wise state
    data_parallel/<module>/<table>.pt                one data-parallel table, whole

See ``docs/checkpoint.md`` for the full description.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from dist_rec.checkpoint.delta import decode_rows, saved_row_count
from dist_rec.checkpoint.files import (
    MANIFEST,
    TMP_MARK,
    CheckpointError,
    component,
    prepare_target,
    publish,
    sibling,
    undo_publish,
    write_tensors,
    write_text_atomic,
)
from dist_rec.checkpoint.manifest import (
    FORMAT,
    FORMAT_VERSION,
    Rect,
    check_model_matches,
    optimizer_record,
    table_records,
    tensor_record,
)
from dist_rec.checkpoint.reader import CheckpointReader, copy_block_into_shard, copy_rows_into_shard

# Test seam: called as ``_fault_hook(stage, path)`` at "file_written" (every
# writing rank, after each file), "manifest_written" and "renamed_old"
# (rank 0, while publishing). Tests raise from it to interrupt a save.
_fault_hook: Optional[Callable[[str, Path], None]] = None


def _hook(stage: str, path: Path) -> None:
    if _fault_hook is not None:
        _fault_hook(stage, path)


# -- helpers shared by save and load -------------------------------------------


def dense_state_dict(model) -> Dict[str, torch.Tensor]:
    """The model's state_dict without the sharded collections' entries."""
    prefixes = tuple(f"{path}." for path in model.sharded)
    return {
        k: v for k, v in model.unwrapped.state_dict().items() if not k.startswith(prefixes) and k not in model.sharded
    }


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"


def _agree_on(error: Optional[BaseException], what: str, group) -> None:
    """``_agree`` over ``group`` for an exception; a refusal for NaN / inf
    anywhere is raised as ``NonFiniteError`` on every rank."""
    text = None if error is None else (("NONFINITE:" if isinstance(error, NonFiniteError) else "") + _describe(error))
    gathered: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, text, group=group)
    failures: Dict[str, List[int]] = {}
    for rank, message in enumerate(gathered):
        if message is not None:
            failures.setdefault(message, []).append(rank)
    if failures:
        parts = [f"{'rank' if len(r) == 1 else 'ranks'} {', '.join(map(str, r))}: {m.replace('NONFINITE:', '')}"
                 for m, r in failures.items()]  # fmt: skip
        kind = NonFiniteError if any(m.startswith("NONFINITE:") for m in failures) else CheckpointError
        raise kind(f"{what} refused on every rank. " + " | ".join(parts))


def _agree(error: Optional[str], what: str) -> None:
    """Every rank learns every rank's error; all raise the same text."""
    gathered: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    failures: Dict[str, List[int]] = {}
    for rank, message in enumerate(gathered):
        if message is not None:
            failures.setdefault(message, []).append(rank)
    if failures:
        parts = [
            f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}: {message}"
            for message, ranks in failures.items()
        ]
        raise CheckpointError(f"{what} refused on every rank. " + " | ".join(parts))


def _cpu_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its elements (``torch.save`` writes
    whole storages)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor.cpu()
    if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor)


def _check_extra(value, where: str = "extra") -> None:
    """``extra`` is read back with ``torch.load(weights_only=True)``: plain
    containers, numbers, strings and tensors only."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_extra(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"Invalid key {key!r} in {where}. Must be a str or int.")
            _check_extra(item, f"{where}[{key!r}]")
        return
    raise CheckpointError(
        f"Invalid {where} of type {type(value).__name__}. Must be None, bool, int, float, str, bytes, a tensor, "
        "or a list / tuple / dict of those (it is loaded with weights_only=True)."
    )


# -- save ------------------------------------------------------------------------


def save_checkpoint(directory, model, dense_optimizer=None, step: int = 0, extra: Optional[Dict] = None) -> Path:
    """Writes a checkpoint of ``model`` to ``directory`` (a collective).

    Args:
        directory: the checkpoint directory, on a filesystem every rank
            sees. An existing checkpoint there stays intact until the new
            one is complete, then is replaced.
        model (DistributedModelParallel): the model; under 2D parallelism
            the first sharding group writes the shards (call it right after
            ``model.sync()``, when replicas are equal).
        dense_optimizer (Optional[torch.optim.Optimizer]): its state_dict is
            saved with the dense layers. (Default: None)
        step (int): the training step to resume from. (Default: 0)
        extra (Optional[dict]): anything small to restore with the
            checkpoint (data position, RNG state): plain containers, numbers,
            strings, tensors. Rank 0's is saved. (Default: None)

    Returns the directory. Raises ``CheckpointError`` on every rank if any
    rank fails; the previous checkpoint is then left as it was.

    Example::

        save_checkpoint("ckpt/latest", dmp, dense_optimizer=opt, step=step + 1, extra={"batches": n})
    """
    directory = Path(directory)
    rank, world = dist.get_rank(), dist.get_world_size()
    what = f"save_checkpoint({str(directory)!r})"

    # 1. Rank 0 checks the arguments, repairs or clears leftovers, creates the temp dir.
    setup: Tuple[Optional[str], Optional[str]] = (None, None)
    if rank == 0:
        try:
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise CheckpointError(f"Invalid step={step!r}. Must be an int >= 0.")
            _check_extra(extra)
            prepare_target(directory)
            ident = f"{step}-{uuid.uuid4().hex[:10]}"
            sibling(directory, TMP_MARK, ident).mkdir(parents=True)
            setup = (ident, None)
        except Exception as e:
            setup = (None, _describe(e))
    box = [setup]
    dist.broadcast_object_list(box, src=0)
    ident, error = box[0]
    if error is not None:
        raise CheckpointError(f"{what} refused on every rank. rank 0: {error}")
    tmp = sibling(directory, TMP_MARK, ident)
    if rank == 0 and model.grid.replicas > 1 and model.sync_steps % model.sync_every != 0:
        warnings.warn(
            f"{what}: {model.sync_steps} sync() calls is not a multiple of sync_every={model.sync_every}; replicas may "
            "differ and only the first sharding group's shards are saved.",
            stacklevel=2,
        )

    # 2. Every rank writes its files; all learn whether every rank succeeded.
    records: List[Dict] = []
    error = None
    try:
        records = _write_rank_files(tmp, model, dense_optimizer, extra, rank)
    except Exception as e:
        error = _describe(e)
    try:
        _agree(error, what)
    except CheckpointError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    gathered: List[Optional[List[Dict]]] = [None] * world
    dist.all_gather_object(gathered, records)

    # 3. Rank 0 writes the manifest last and publishes the directory.
    status = None
    if rank == 0:
        try:
            files = sorted((r for rank_records in gathered for r in rank_records), key=lambda r: r["file"])
            manifest = _manifest(model, dense_optimizer, step, files)
            write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            _hook("manifest_written", tmp)
            publish(tmp, directory, ident, hook=_hook)
        except Exception as e:
            undo_publish(tmp, directory, ident)
            status = _describe(e)
    box = [status]
    dist.broadcast_object_list(box, src=0)  # nobody returns before the checkpoint is in place
    if box[0] is not None:
        raise CheckpointError(f"{what} refused on every rank. rank 0: {box[0]}")
    return directory


def _write_rank_files(tmp: Path, model, dense_optimizer, extra, rank: int) -> List[Dict]:
    from dist_rec.checkpoint.snapshot import SavePolicy, take_snapshot

    # No copies: the live rows are written as they are (a synchronous save).
    snapshot = take_snapshot(model, dense_optimizer, 0, extra, "base", SavePolicy(), copy=False)
    return write_items(tmp, snapshot.items, rank)


class NonFiniteError(CheckpointError):
    """A save refused: the state holds NaN or inf. The last good checkpoint
    stays; the run must stop (the next save would replace good with bad)."""


def write_items(tmp: Path, items, rank: int, check_finite: bool = False, cancel=None) -> List[Dict]:
    """Writes a snapshot's items (``snapshot.Item``) under ``tmp``; returns
    their manifest records. ``check_finite`` refuses NaN / inf first; a set
    ``cancel`` event (``threading.Event``) stops the writing (``WriteCancelled``)."""
    records = []
    for item in items:
        if check_finite:
            _check_finite(item, rank)
        if item.encode is not None:
            item.tensors, item.encode = item.encode(item.tensors), None
        if item.kind == "dense":
            model_state = item.tensors["model"]
            size, sha = write_tensors(tmp / item.file, item.tensors, cancel)
            records.append({"file": item.file, "kind": "dense", "bytes": size, "sha256": sha,
                            "tensors": {k: tensor_record(v) for k, v in model_state.items()}, "written_by": rank})  # fmt: skip
        else:
            size, sha = write_tensors(tmp / item.file, item.tensors, cancel)
            r0, nr, c0, nc = item.rect
            record = {
                "file": item.file, "kind": item.kind, "module": item.module, "table": item.table,
                "row_offset": r0, "num_rows": nr, "col_offset": c0, "num_cols": nc,
                "tensors": {k: tensor_record(v) for k, v in item.tensors.items()},
                "bytes": size, "sha256": sha,
                "shard_rank": item.shard_rank,  # rank inside the sharding group; -1 for a data-parallel table
                "written_by": rank,
            }  # fmt: skip
            if item.kind == "delta":
                record["rows"] = saved_row_count(item.tensors)
            records.append(record)
        _hook("file_written", tmp / item.file)
    return records


def _check_finite(item, rank: int) -> None:
    if item.kind == "dense":
        bad = [k for k, v in item.tensors["model"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteError(f"rank {rank}: the dense layers hold NaN or inf ({', '.join(bad[:5])}); not saved.")
        return
    for name, tensor in item.tensors.items():
        if not tensor.is_floating_point():
            continue
        if tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor).reshape(tensor.shape[0], -1).all(dim=1)
        if not bool(finite.all()):
            rows = (~finite).nonzero().flatten()
            if item.kind == "delta":
                first = int(decode_rows(item.tensors, item.rect[0], item.rect[1])[rows[0]])
            else:
                first = item.rect[0] + int(rows[0])
            raise NonFiniteError(
                f"rank {rank}: table {item.table!r} of module {item.module!r} holds NaN or inf in {name} of "
                f"{rows.numel()} row(s) (first: row {first}); not saved."
            )


def _manifest(model, dense_optimizer, step: int, files: List[Dict]) -> Dict:
    return dict(manifest_header(model, dense_optimizer, step), files=files)


def manifest_header(model, dense_optimizer, step: int, kind: str = "base", parent: Optional[str] = None) -> Dict:
    """Everything of a manifest but its files (taken when the snapshot is,
    on the training thread)."""
    grid = model.grid
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "created_unix": time.time(),
        "world_size": grid.world_size,
        "grid": {
            "replicas": grid.replicas,
            "layout": grid.layout,
            "group_size": grid.group_size,
            "sharding_groups": grid.sharding_groups,
            "sync_every": model.sync_every,
            "sync_steps": model.sync_steps,
        },
        "modules": {
            path: {
                "plan": sharded.plan.to_dict(),
                "is_weighted": sharded.is_weighted(),
                "tables": table_records(sharded),
                "optimizer": optimizer_record(sharded.optimizer),
            }
            for path, sharded in model.sharded.items()
        },
        "dense_optimizer": type(dense_optimizer).__name__ if dense_optimizer is not None else None,
        "kind": kind,
    }
    if parent is not None:
        header["parent"] = parent
    return header


# -- load -------------------------------------------------------------------------

# (live shard, its rectangle, [(saved tensors, saved rectangle, overlap)])
_Copies = List[Tuple[object, Rect, List[Tuple[Dict[str, torch.Tensor], Rect, Rect]]]]


def resolve_chain(directory) -> List[CheckpointReader]:
    """Readers of what loading ``directory`` means, base first: a single
    checkpoint; a series root's newest restorable entry and its ancestors
    (``series.py``); or one entry of a series and its ancestors. Raises
    ``CheckpointError`` when there is none or a link is missing."""
    from dist_rec.checkpoint.series import CheckpointSeries

    directory = Path(directory)
    if not directory.exists():  # a single checkpoint whose publish was interrupted: its sibling, with a note
        return [CheckpointReader(directory)]
    if (directory / MANIFEST).is_file():
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("kind", "base") == "delta":
            return [CheckpointReader(p) for p in CheckpointSeries(directory.parent).chain(directory)]
        return [CheckpointReader(directory)]
    chain = CheckpointSeries(directory).latest()
    if chain is None:
        return [CheckpointReader(directory)]  # raises with the reason (missing, unfinished, foreign)
    return [CheckpointReader(p) for p in chain]


def load_checkpoint(directory, model, dense_optimizer=None, check_extra: Optional[Callable[[object], None]] = None) -> Dict:
    """Loads a checkpoint into ``model`` (a collective), resharding as needed.

    The loading world size, plans and 2D grid may differ from the saving
    ones: each rank reads the saved blocks that overlap each of its shards
    (``reader.py``). A delta checkpoint is loaded with its chain: the base,
    then every delta in order (each delta's rows land wherever they are
    held now). Everything is verified (manifest versions, every file's
    presence, size and sha256, tables and optimizers against the model,
    tensor shapes, the chain's links) before any live tensor changes; a
    problem on any rank raises the same ``CheckpointError`` on every rank
    and leaves the model untouched.

    Args:
        directory: a directory written by ``save_checkpoint``, a series
            root (``series.py``: its newest restorable entry), or an entry.
        model (DistributedModelParallel): the model to fill.
        dense_optimizer (Optional[torch.optim.Optimizer]): restored from the
            checkpoint's dense optimizer state (same class and parameter
            groups). (Default: None: not restored)
        check_extra: called with the saved ``extra`` before anything is
            loaded; what it raises refuses the load (the trainer compares
            its settings with the saved ones). (Default: None)

    Returns ``{"step": int, "extra": ..., "directory": str, "chain": [str]}``.
    """
    what = f"load_checkpoint({str(directory)!r})"
    prepared, error = None, None
    try:
        chain = resolve_chain(directory)
        if chain[0].note is not None and dist.get_rank() == 0:
            warnings.warn(chain[0].note, stacklevel=2)
        if check_extra is not None:  # the settings first: a refusal by name beats one by shape
            check_extra(chain[-1].read_dense()["extra"])
        prepared = _prepare_load(chain, model, dense_optimizer)
    except Exception as e:
        error = _describe(e)
    _agree(error, what)

    steps, dense = prepared
    for copies in steps:
        _apply_copies(copies)
    last = chain[-1]
    with torch.no_grad():
        model.unwrapped.load_state_dict(dense["model"], strict=False)
    if dense_optimizer is not None:
        dense_optimizer.load_state_dict(dense["optimizer"])
    model.sync_steps = int(last.manifest["grid"].get("sync_steps", 0))
    dist.barrier()
    return {"step": last.step, "extra": dense["extra"], "directory": str(last.directory), "chain": [str(r.directory) for r in chain]}


def _prepare_load(chain: List[CheckpointReader], model, dense_optimizer):
    steps = []
    for reader in chain:
        check_model_matches(reader.manifest, model)
        reader.check_present()
    steps = [_shard_copies(reader, model, None, None) for reader in chain]
    dense = chain[-1].read_dense()
    _check_dense(chain[-1], dense, model, dense_optimizer)
    return steps, dense


def _shard_copies(reader: CheckpointReader, model, modules: Optional[Sequence[str]], tables: Optional[Sequence[str]]) -> _Copies:
    """What to copy into each live shard (and data-parallel table); reads and
    verifies exactly the files that overlap them."""
    copies: _Copies = []
    wanted = []
    for path, sharded in model.sharded.items():
        if modules is not None and path not in modules:
            continue
        for local in sharded.local_shards() + sharded.data_parallel_tables():
            if tables is not None and local.table not in tables:
                continue
            s = local.shard
            wanted.append((path, local, (s.row_offset, s.num_rows, s.col_offset, s.num_cols)))
    reader.prefetch([(path, local.table, rect) for path, local, rect in wanted])  # every file at once
    delta = reader.manifest.get("kind", "base") == "delta"
    for path, local, rect in wanted:
        blocks = reader.copies_for(path, local.table, rect)
        if not delta or local.shard.rank < 0:  # a base, or a data-parallel table (saved whole in every entry)
            if sum(b[2][1] * b[2][3] for b in blocks) != local.shard.num_rows * local.shard.num_cols:
                raise CheckpointError(f"{reader.directory}: the saved blocks of table {local.table!r} do not cover {local.shard}.")
        copies.append((local, rect, blocks))
    return copies


def _apply_copies(copies: _Copies) -> None:
    for local, rect, blocks in copies:
        for tensors, saved, common in blocks:
            if "rows" in tensors or "row_bits" in tensors:
                copy_rows_into_shard(local, rect, tensors, saved, common)
            else:
                copy_block_into_shard(local, rect, tensors, saved, common)


def _check_dense(reader: CheckpointReader, dense: Dict, model, dense_optimizer) -> None:
    where = reader.directory / "dense.pt"
    saved, live = dense["model"], dense_state_dict(model)
    if set(saved) != set(live):
        raise CheckpointError(
            f"{where}: the dense layers differ: in the checkpoint only {sorted(set(saved) - set(live))}, "
            f"in the model only {sorted(set(live) - set(saved))}."
        )
    for key, tensor in live.items():
        if saved[key].shape != tensor.shape or saved[key].dtype != tensor.dtype:
            raise CheckpointError(
                f"{where}: dense {key!r} is {list(saved[key].shape)} {saved[key].dtype} in the checkpoint, "
                f"{list(tensor.shape)} {tensor.dtype} in the model."
            )
    if dense_optimizer is None:
        return
    saved_opt = dense["optimizer"]
    saved_class = reader.manifest.get("dense_optimizer")
    if saved_opt is None:
        raise CheckpointError(f"{where}: saved without a dense optimizer; cannot restore {type(dense_optimizer).__name__}.")
    if saved_class != type(dense_optimizer).__name__:
        raise CheckpointError(f"{where}: the dense optimizer was {saved_class}; the model uses {type(dense_optimizer).__name__}.")
    saved_groups = [len(g["params"]) for g in saved_opt["param_groups"]]
    live_groups = [len(g["params"]) for g in dense_optimizer.param_groups]
    if saved_groups != live_groups:
        raise CheckpointError(
            f"{where}: the dense optimizer's parameter groups hold {saved_groups} parameters in the checkpoint, "
            f"{live_groups} in the model."
        )


def restore_local_shards(
    directory, model, modules: Optional[Sequence[str]] = None, tables: Optional[Sequence[str]] = None
) -> List:
    """Reloads only this rank's shards (optionally of some modules / tables)
    from a checkpoint: **not** a collective, the hook for partial recovery
    (a replacement rank restores its own shards while the others keep
    theirs). Resharding applies as in ``load_checkpoint``; every file read
    is verified before anything is copied. Dense layers are not touched.

    A delta checkpoint restores with its chain (base, then each delta).
    Returns the restored ``LocalShard``s. Raises ``CheckpointError``.
    """
    chain = resolve_chain(directory)
    for reader in chain:
        check_model_matches(reader.manifest, model)
    steps = [_shard_copies(reader, model, modules, tables) for reader in chain]  # every file verified first
    for copies in steps:
        _apply_copies(copies)
    return [local for local, _, _ in steps[0]]
