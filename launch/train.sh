#!/usr/bin/env bash
# Launch dist_rec training with torchrun, on one node or many.
#
#   launch/train.sh --config launch/configs/default.yaml [section.field=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE   processes per node (default: 2, or the GPU count when there are GPUs)
#   NNODES           nodes (default: 1); a range like 2:4 makes the job elastic
#   NODE_RANK        this node's rank (default: 0; ignored with the c10d rendezvous)
#   RDZV_ENDPOINT    host:port of the rendezvous (default: 127.0.0.1:29500; on many
#                    nodes, an address of the first node that every node can reach)
#   RDZV_ID          job id shared by the nodes of one job (default: dist_rec)
#   MAX_RESTARTS     elastic restarts after a failure (default: 0)
#   RDZV_IS_HOST     1 on the node that hosts the rendezvous store, 0 on the others, where
#                    torchrun cannot tell from the endpoint (containers, network namespaces)
#   LOCAL_ADDR       the address other nodes reach this node at (default: what its
#                    hostname resolves to)
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
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
NPROC_PER_NODE=${NPROC_PER_NODE:-$([[ "$gpus" -gt 0 ]] && echo "$gpus" || echo 2)}
NNODES=${NNODES:-1}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29500}
RDZV_ID=${RDZV_ID:-dist_rec}
MAX_RESTARTS=${MAX_RESTARTS:-0}

# gloo jobs cannot restart on the agent's shared TCP store; with its own store
# a restarted worker group rendezvouses again.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# One process per core slice: torchrun's default of one OpenMP thread per
# process is right for CPU jobs; the trainer sets torch's threads itself.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

rdzv_conf=()
if [[ -n "${RDZV_IS_HOST:-}" ]]; then rdzv_conf+=(--rdzv-conf "is_host=${RDZV_IS_HOST}"); fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then rdzv_conf+=(--local-addr "${LOCAL_ADDR}"); fi

exec "$PYTHON" -m torch.distributed.run \
    "${rdzv_conf[@]}" \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "$RDZV_ID" \
    --max-restarts "$MAX_RESTARTS" \
    -m dist_rec.train "$@"
