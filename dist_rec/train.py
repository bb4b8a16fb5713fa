"""Train DLRM on one process or many: ``python -m dist_rec.train``.

Under ``torchrun`` (or any launcher that sets RANK/WORLD_SIZE) the processes
form a group (NCCL with GPUs, gloo on CPU). Embedding tables are spread as
``sharding`` says (data-parallel by default, with the optimizer fused into
the backward and updates agreed from the global batch), dense layers are
data-parallel under DDP or DeepSpeed ZeRO (``train.dense_engine``); N
processes with batch B train as one with batch N x B.

    python -m dist_rec.train --config launch/configs/default.yaml train.steps=500
    torchrun --nproc-per-node 2 -m dist_rec.train --config launch/configs/default.yaml

Rank 0 prints a progress line every ``train.log_every`` steps and a summary
at the end; ``train.output_dir`` receives ``metrics.jsonl`` (one JSON record
per log line and per evaluation), ``training.png`` (training loss and
evaluation AUC over steps), ``summary.json`` and the resolved ``config.yaml``.
The loop itself is ``dist_rec.trainer.Trainer``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from dist_rec.config import ConfigError, load_config
from dist_rec.distributed import destroy_process_group
from dist_rec.distributed.world import exit_process
from dist_rec.trainer import Environment, Trainer, TrainResult, setup_environment, train

__all__ = ["Environment", "TrainResult", "Trainer", "main", "train"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (defaults for anything it leaves out)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.steps=100")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    env = setup_environment(config)
    if env.member is not None:
        return _run_fault_tolerant(config, env)
    try:
        Trainer(config, env).train()
    except ConfigError as error:  # found while building (a data file, a schema, a checkpoint): the same one line
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if env.distributed:
            destroy_process_group()
    return 0


def _run_fault_tolerant(config, env, hooks=()) -> "NoReturn":
    """One worker of a job under ``dist_rec.fault.launch``; ends the
    process, with an exit code that tells the launcher what to do. A failed
    collective that recovery could not absorb (while this process was still
    being built) exits 1: the launcher starts a replacement. A program error
    (bad input, a bug) exits ``EXIT_JOB_FAILED``: every rank would meet it,
    so the job stops.

    The process ends with ``os._exit`` once its output is flushed: the
    teardown of gloo groups whose peers are gone or were aborted by a
    recovery can block or abort in C++ destructors, and the launcher would
    take a finished worker for a failed one."""
    import traceback

    from dist_rec.distributed.errors import is_collective_failure
    from dist_rec.fault.launch import EXIT_JOB_FAILED
    from dist_rec.fault.member import JobEnded

    code = 0
    try:
        Trainer(config, env, hooks=hooks).train()
    except JobEnded as ended:
        code = 0 if ended.code in (0, None) else 1
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException as error:  # noqa: BLE001 -- the exit code is the message to the launcher
        traceback.print_exc()
        if env.member.aborted.is_set() or is_collective_failure(error):
            env.member.say(f"a collective failed before this process could recover ({type(error).__name__}); exiting "
                           "for a replacement")  # fmt: skip
            code = 1
        else:
            env.member.say(f"program error ({type(error).__name__}: {error}); the job stops")
            code = EXIT_JOB_FAILED
    exit_process(code)


if __name__ == "__main__":
    from dist_rec.distributed.world import run_command

    run_command(main)
