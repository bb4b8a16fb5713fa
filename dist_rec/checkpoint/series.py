"""A checkpoint directory that holds a series: full bases and the deltas
after them, the newest few kept, one job at a time.

``train.checkpoint_dir`` is the series' root::

    <root>/
      .lock                         held (flock) by the job writing the series
      step-000001000/               a base: a full checkpoint (manifest "kind": "base")
      step-000001500/               a delta: the rows saved since its parent (manifest
                                    "kind": "delta", "parent": "step-000001000")
      step-000002000/               another delta, parent step-000001500
      step-000002000.tmp-<id>/      a save in progress (never read)

Each entry is written under a temporary name and renamed once complete
(its manifest last), so a directory named ``step-*`` with a manifest is
complete, and a crash never leaves a half-written entry that looks
complete. An entry is restorable when its chain back to a base is
complete. A root written by an earlier dist_rec (a single checkpoint:
``<root>/manifest.json``) reads as one base entry.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional

from dist_rec.checkpoint.files import (
    MANIFEST, TMP_MARK, CheckpointError, fsync_dir, interrupted_publish_leftovers, newest_complete_sibling,
)

PREFIX = "step-"
LOCK = ".lock"


def entry_name(step: int) -> str:
    return f"{PREFIX}{int(step):09d}"


def _manifest(path: Path) -> Optional[Dict]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


class CheckpointSeries:
    """The checkpoints under ``root`` (see the module docstring)."""

    def __init__(self, root) -> None:
        self.root = Path(root)
        self._lock_fd: Optional[int] = None

    # -- what is there ---------------------------------------------------------------

    def check(self) -> None:
        """Refuses a root that is not a series: a file, or a non-empty
        directory holding neither entries nor a checkpoint (told at the start
        of a run, not at its first save)."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"{root} exists and is not a directory; it cannot hold checkpoints.")
        if not root.is_dir() or (root / MANIFEST).is_file():
            return
        foreign = [p.name for p in root.iterdir() if not (p.name.startswith(PREFIX) or p.name == LOCK)]
        if foreign and not self.entries():
            raise CheckpointError(
                f"{root} is not empty and holds no dist_rec checkpoints (it has {sorted(foreign)[:5]}); saving there "
                "could destroy it. Choose another train.checkpoint_dir or empty it."
            )

    def entries(self) -> List[Path]:
        """Complete entries, oldest first (a legacy single checkpoint, or the
        sibling an interrupted publish of one left, first of all)."""
        if (self.root / MANIFEST).is_file():
            out = [self.root]
        else:
            legacy = newest_complete_sibling(self.root)
            out = [legacy] if legacy is not None else []
        if not self.root.is_dir():
            return out
        named = sorted(p for p in self.root.iterdir() if p.name.startswith(PREFIX) and TMP_MARK not in p.name and p.is_dir())
        return out + [p for p in named if (p / MANIFEST).is_file()]

    def chain(self, entry: Path) -> List[Path]:
        """``entry`` and its ancestors back to its base, base first. Raises
        ``CheckpointError`` naming the missing or broken link."""
        chain = [entry]
        seen = {entry.name}
        while True:
            manifest = _manifest(chain[0])
            if manifest is None:
                raise CheckpointError(f"{chain[0]}: no readable {MANIFEST}.")
            if manifest.get("kind", "base") == "base":
                return chain
            parent = manifest.get("parent")
            if not parent:
                raise CheckpointError(f"{chain[0] / MANIFEST}: a delta that names no parent.")
            path = self.root / parent
            if parent in seen or not (path / MANIFEST).is_file():
                raise CheckpointError(
                    f"{chain[0] / MANIFEST}: its parent {parent} is missing or incomplete in {self.root}: the delta "
                    "cannot be applied without its base."
                )
            seen.add(parent)
            chain.insert(0, path)

    def latest(self) -> Optional[List[Path]]:
        """The chain of the newest restorable entry, or None without any."""
        errors = []
        for entry in reversed(self.entries()):
            try:
                return self.chain(entry)
            except CheckpointError as error:
                errors.append(str(error))
        if errors:
            raise CheckpointError(f"No restorable checkpoint in {self.root}: " + " | ".join(errors[:3]))
        return None

    def bases_since_last(self) -> int:
        """Saves since the newest base (0: the newest entry is a base)."""
        count = 0
        for entry in reversed(self.entries()):
            if (_manifest(entry) or {}).get("kind", "base") == "base":
                return count
            count += 1
        return count

    # -- writing ---------------------------------------------------------------------

    def prune(self, keep_last: int) -> List[Path]:
        """Deletes all but the ``keep_last`` newest entries and the ancestors
        they need; returns what was deleted. Also clears abandoned
        ``.tmp-`` directories."""
        entries = self.entries()
        keep = set()
        for entry in entries[-keep_last:] if keep_last > 0 else entries:
            try:
                keep.update(p.name for p in self.chain(entry))
            except CheckpointError:
                keep.add(entry.name)
        removed = []
        for entry in entries:
            if entry != self.root and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        if self.root.is_dir():
            for stale in self.root.glob(f"{PREFIX}*{TMP_MARK}*"):
                shutil.rmtree(stale, ignore_errors=True)
        if any(e.parent == self.root for e in entries):  # the series went on: an interrupted single save's leftovers are stale
            for stale in interrupted_publish_leftovers(self.root):
                shutil.rmtree(stale, ignore_errors=True)
        if removed:
            fsync_dir(self.root)
        return removed

    def lock(self) -> None:
        """Takes the series for this process (until it exits); a second job
        on the same directory is refused with who holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = ""
            try:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(
                    f"{self.root} is in use by another job ({holder or 'holder unknown'}): two jobs saving into one "
                    "checkpoint directory would overwrite each other. Stop it, or choose another train.checkpoint_dir."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
