#!/usr/bin/env bash
# Two nodes, 2 processes each (4 ranks), one rendezvous on the first node.
# Run the same command on every node; only the endpoint must be reachable
# from all of them:
#
#   node A (10.0.0.1):  RDZV_ENDPOINT=10.0.0.1:29500 launch/multi_node.sh --config launch/configs/default.yaml
#   node B:             RDZV_ENDPOINT=10.0.0.1:29500 launch/multi_node.sh --config launch/configs/default.yaml
#
# gloo picks the interface that resolves the hostname; set GLOO_SOCKET_IFNAME
# (NCCL: NCCL_SOCKET_IFNAME) to the interface the nodes share when that is
# wrong. Where torchrun cannot tell which node the endpoint is (containers,
# network namespaces: the hostname does not resolve to the endpoint), set
# RDZV_IS_HOST=1 on the first node and RDZV_IS_HOST=0 on the others, and
# LOCAL_ADDR to each node's own address.
# NNODES=1:2 would let the job start with one node and grow.
set -euo pipefail
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the first node}"
export NNODES=${NNODES:-2}
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
export RDZV_ID=${RDZV_ID:-dist_rec_multi_node}
exec "$(dirname "$0")/train.sh" "$@"
