"""File-level building blocks of a checkpoint: hashed, fsynced writes and
the directory swap that publishes a finished checkpoint atomically.

A checkpoint directory ``<dir>`` is published in three renames, all by
global rank 0 once every rank's files are written and fsynced:

1. everything is written into the sibling ``<dir>.tmp-<id>``; the manifest
   goes last (written as ``manifest.json.partial``, fsynced, renamed), so a
   directory is a complete checkpoint exactly when it holds ``manifest.json``;
2. an existing ``<dir>`` is renamed to ``<dir>.old-<id>`` (it stays the last
   good checkpoint until step 3 is done);
3. ``<dir>.tmp-<id>`` is renamed to ``<dir>``, the parent directory fsynced,
   and ``<dir>.old-<id>`` deleted.

A crash before step 2 leaves ``<dir>`` untouched; a crash between steps 2
and 3 leaves no ``<dir>`` but two complete siblings, from which
``resolve_for_load`` picks the newest (and the next save repairs the
names, ``prepare_target``). An unfinished ``.tmp-`` (no manifest) is never
taken for a checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import urllib.parse
from pathlib import Path
from typing import BinaryIO, List, Optional, Tuple

import torch

MANIFEST = "manifest.json"
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
_CHUNK = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint cannot be written, or is refused on load (missing,
    corrupt, of another model, of an unsupported format)."""


class WriteCancelled(CheckpointError):
    """A write was cancelled (a rank died: the entry can no longer be published)."""


class _HashingWriter:
    """File-like wrapper that hashes and counts what ``torch.save`` writes,
    so no second read is needed for the checksum; a set ``cancel`` event
    stops the write at its next chunk."""

    def __init__(self, file: BinaryIO, path: Path, cancel: Optional[threading.Event] = None) -> None:
        self._file, self._path, self._cancel = file, path, cancel
        self.sha256 = hashlib.sha256()
        self.size = 0

    @property
    def cancelled(self) -> bool:
        return self._cancel is not None and self._cancel.is_set()

    def check(self) -> None:
        if self.cancelled:
            raise WriteCancelled(f"write of {self._path} cancelled")

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _CHUNK):  # a storage comes in one piece: cancel between chunks
            self.check()
            chunk = view[start : start + _CHUNK]
            self.sha256.update(chunk)
            self._file.write(chunk)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._file.flush()


def write_tensors(path: Path, obj, cancel: Optional[threading.Event] = None) -> Tuple[int, str]:
    """``torch.save(obj)`` to ``path``, fsynced; returns (size in bytes, sha256
    hex). Raises ``WriteCancelled`` once ``cancel`` is set (the file is then
    incomplete: it sits in a ``.tmp-`` directory that is never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = _HashingWriter(f, path, cancel)
        try:
            torch.save(obj, writer)
        except RuntimeError:  # torch's zip writer words an exception of ``write`` its own way
            writer.check()
            raise
        f.flush()
        writer.check()
        os.fsync(f.fileno())
    return writer.size, writer.sha256.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``path`` via a fsynced ``.partial`` file and a rename."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Makes renames and new entries in ``path`` durable (POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; nothing more to do there
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, _ in os.walk(root):
        fsync_dir(Path(dirpath))


def component(name: str) -> str:
    """A table or module name as one safe path component."""
    return urllib.parse.quote(name, safe="._-@")


def sibling(directory: Path, mark: str, ident: str) -> Path:
    return directory.with_name(directory.name + mark + ident)


def interrupted_publish_leftovers(directory: Path) -> List[Path]:
    """Every ``<directory>.tmp-*`` and ``.old-*`` sibling."""
    return _siblings(directory, TMP_MARK) + _siblings(directory, OLD_MARK)


def _siblings(directory: Path, mark: str) -> List[Path]:
    parent = directory.parent
    if not parent.is_dir():
        return []
    prefix = directory.name + mark
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _manifest_step(path: Path) -> int:
    import json

    try:
        return int(json.loads((path / MANIFEST).read_text()).get("step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return -1


def interrupted_swap_candidate(directory: Path) -> Optional[Path]:
    """When ``directory`` is missing because a save died between its two
    renames: the newest complete sibling (``.tmp-`` preferred over ``.old-``
    at the same step), else None."""
    if directory.exists():
        return None
    return newest_complete_sibling(directory)


def newest_complete_sibling(directory: Path) -> Optional[Path]:
    """The newest complete ``<directory>.tmp-*`` or ``.old-*`` an interrupted
    publish of a single checkpoint left (``.tmp-`` preferred at the same
    step), else None."""
    candidates = [(p, 1) for p in _siblings(directory, TMP_MARK) if is_complete(p)]
    candidates += [(p, 0) for p in _siblings(directory, OLD_MARK) if is_complete(p)]
    if not candidates:
        return None
    return max(candidates, key=lambda c: (_manifest_step(c[0]), c[1], c[0].name))[0]


def resolve_for_load(directory: Path) -> Tuple[Path, Optional[str]]:
    """The directory to read and a note when it is not ``directory`` itself."""
    candidate = interrupted_swap_candidate(directory)
    if candidate is not None:
        return candidate, (
            f"{directory} is missing (a save was interrupted while publishing); "
            f"reading the complete checkpoint left at {candidate}."
        )
    return directory, None


def prepare_target(directory: Path) -> None:
    """Rank 0, before a save: repairs an interrupted publish, refuses to
    replace a directory that is not a checkpoint, and removes what earlier
    interrupted saves left behind (a directory belongs to one job)."""
    candidate = interrupted_swap_candidate(directory)
    if candidate is not None:
        os.replace(candidate, directory)
        fsync_dir(directory.parent)
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(f"{directory} exists and is not a directory; refusing to replace it with a checkpoint.")
        if not is_complete(directory) and any(directory.iterdir()):
            raise CheckpointError(
                f"{directory} exists, is not empty and holds no {MANIFEST}: it is not a dist_rec checkpoint, "
                "so saving would destroy it. Choose another directory or remove it."
            )
    for stale in _siblings(directory, TMP_MARK) + _siblings(directory, OLD_MARK):
        shutil.rmtree(stale, ignore_errors=True)


def publish(tmp: Path, directory: Path, ident: str, hook=None) -> None:
    """Swaps the finished ``tmp`` into place as ``directory`` (see the
    module docstring); the previous checkpoint is deleted only after."""
    fsync_tree(tmp)
    old = None
    if directory.exists():
        old = sibling(directory, OLD_MARK, ident)
        os.replace(directory, old)
        if hook is not None:
            hook("renamed_old", old)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def undo_publish(tmp: Path, directory: Path, ident: str) -> None:
    """After a failed ``publish``: the old checkpoint back under its name."""
    old = sibling(directory, OLD_MARK, ident)
    if old.exists() and not directory.exists():
        os.replace(old, directory)
        fsync_dir(directory.parent)
    shutil.rmtree(tmp, ignore_errors=True)
