#!/usr/bin/env bash
# Fault-tolerant launch of dist_rec training: like train.sh, but with
# dist_rec.fault.launch instead of torchrun's agent. A dead or hung worker
# is replaced alone; the others keep their processes and memory, re-form the
# groups with the replacement and go on (docs/fault_tolerance.md).
#
#   launch/ft_train.sh --config launch/configs/default.yaml [section.field=value ...]
#   NPROC_PER_NODE=4 launch/ft_train.sh --config launch/configs/default_2d.yaml 'fault.inject=["rank=2 step=1500"]'
#
# Several nodes: run it on each with the same FT_STORE (an address of the
# first node that every node reaches) and its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 FT_STORE=10.0.0.1:29400 launch/ft_train.sh --config ...    # first node: hosts the store
#   NNODES=2 NODE_RANK=1 FT_STORE=10.0.0.1:29400 launch/ft_train.sh --config ...
#
# Environment (all optional):
#   NPROC_PER_NODE   processes per node (default: 2)
#   NNODES           nodes (default: 1)
#   NODE_RANK        this node's rank (default: 0)
#   FT_STORE         host:port of the job's store, on the first node (default: 127.0.0.1:29400)
#   MAX_RESTARTS     replacements per rank before the job fails (default: 10)
#   PYTHON           interpreter (default: the repository's .venv/bin/python if present,
#                    else python3)
#
# Relative paths (--config, data paths, train.output_dir, ...) are taken from
# the directory it is run in, like any command's: the script does not change
# directory; it finds the repository from its own path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
# dist_rec from this checkout wherever the job runs (as the repository root
# as working directory used to give it), also when it is not installed.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$PYTHON" -m dist_rec.fault.launch \
    --nnodes "${NNODES:-1}" \
    --node-rank "${NODE_RANK:-0}" \
    --nproc-per-node "${NPROC_PER_NODE:-2}" \
    --store "${FT_STORE:-127.0.0.1:29400}" \
    --max-restarts "${MAX_RESTARTS:-10}" \
    -m dist_rec.train "$@"
