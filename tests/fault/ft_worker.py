"""A training worker for the fault-tolerance tests: ``python -m dist_rec.train``
plus a hook that records this process's shards at the moments the tests
check (``DIST_REC_TEST_DUMPS`` names the directory):

* ``failure-<step>``: when a failure is about to be recovered (the state the
  failure left);
* ``restored-<epoch>``: once an epoch formed and its state was restored
  (training resumes from it), with, on a rank whose shards came from the
  checkpoint, the checkpoint's rectangles of those shards read separately;
* ``synced-<epoch>``: after the first step of that epoch (replicas
  synchronised).

Files are ``rank<r>.<incarnation>.<moment>.pt``: ``{shard key: (weight, {state})}``.
"""

import os
import sys
from pathlib import Path

import torch

from dist_rec.checkpoint import CheckpointReader, resolve_chain
from dist_rec.config import load_config
from dist_rec.trainer import Trainer, TrainerHook, setup_environment


def shards(trainer):
    out = {}
    for path, sharded in trainer.sharded.sharded.items():
        for local in sharded.local_shards():
            s = local.shard
            weight, state = local.read()
            out[f"{path}/{local.table}/r{s.row_offset}_c{s.col_offset}"] = (
                weight.clone(), {k: v.clone() for k, v in state.items()})
    return out


class DumpHook(TrainerHook):
    def __init__(self, directory: Path, member) -> None:
        self.directory, self.member = directory, member
        self.synced_pending = None

    def _save(self, moment: str, payload) -> None:
        name = f"rank{self.member.rank}.{self.member.incarnation}.{moment}.pt"
        torch.save(payload, self.directory / (name + ".partial"))
        os.replace(self.directory / (name + ".partial"), self.directory / name)

    def before_recovery(self, trainer, step, error):
        self._save(f"failure-{step}", {"step": step, "shards": shards(trainer)})

    def after_restore(self, trainer, epoch, step):
        payload = {"step": step, "role": epoch.roles[self.member.rank], "shards": shards(trainer), "checkpoint": None}
        directory = trainer.checkpointer.directory
        if epoch.roles[self.member.rank] == "replacement" and directory is not None and CheckpointReader.find(directory):
            reader = resolve_chain(directory)[-1]  # the policy is "full": every entry is a base
            saved = {}
            for path, sharded in trainer.sharded.sharded.items():
                for local in sharded.local_shards():
                    s = local.shard
                    saved[f"{path}/{local.table}/r{s.row_offset}_c{s.col_offset}"] = reader.read_rectangle(
                        path, local.table, (s.row_offset, s.num_rows, s.col_offset, s.num_cols))
            payload["checkpoint"] = {"step": reader.step, "shards": saved}
        self._save(f"restored-{epoch.id}", payload)
        self.synced_pending = epoch.id

    def after_step(self, trainer, step):
        if self.synced_pending is not None:
            self._save(f"synced-{self.synced_pending}", {"step": step, "shards": shards(trainer)})
            self.synced_pending = None


def main() -> int:
    from dist_rec.train import _run_fault_tolerant

    args = sys.argv[1:]
    config = load_config(args[args.index("--config") + 1], [a for a in args if "=" in a])
    env = setup_environment(config)
    directory = Path(os.environ["DIST_REC_TEST_DUMPS"])
    directory.mkdir(parents=True, exist_ok=True)
    hooks = [DumpHook(directory, env.member)]
    return _run_fault_tolerant(config, env, hooks=hooks)


if __name__ == "__main__":
    sys.exit(main())
