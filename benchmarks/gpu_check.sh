#!/usr/bin/env bash
# Everything the CUDA kernels need checked on a GPU, in one call:
#   build the extension for the GPU, run the CUDA tests, benchmark, print a
#   short table, and train the README's model on one GPU for its examples/s.
#   Logs and results go to $OUT (default /tmp/gpu_check).
#
#   benchmarks/gpu_check.sh            build + tests + benchmark + training run
#   benchmarks/gpu_check.sh build test build + tests only
#   benchmarks/gpu_check.sh bench      benchmark only (extension already built)
#   benchmarks/gpu_check.sh train      a one-GPU DLRM training run (examples/s, AUC; extension already built)
#
# Uses whatever python3 holds a CUDA build of torch; installs nothing else.
# TRAIN_DEVICE=cpu runs the "train" stage on the CPU (to try the script
# without a GPU); TRAIN_STEPS and TRAIN_BATCH size it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
STAGES=${*:-build test bench train}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, also for "bench" alone

has() { [[ " $STAGES " == *" $1 "* ]]; }

TRAIN_DEVICE=${TRAIN_DEVICE:-cuda}
if [[ "$STAGES" != "train" || "$TRAIN_DEVICE" == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
fi

if has build; then
  # Build with the system compiler: a toolchain that links libstdc++
  # statically (one such sat in $CXX on the lent H100 image) gives the
  # extension its own copy of the C++ runtime, and the first integer it
  # formats into an error message crashes.
  if [[ -x /usr/bin/g++ ]]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-16}
  start=$(date +%s)
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
  if nm -C dist_rec/_C*.so | grep -q " T std::codecvt<char16_t"; then
    echo "dist_rec/_C has libstdc++ linked in statically; rebuild with a compiler that links it dynamically"; exit 1
  fi
  "$PY" -c "import torch, dist_rec.ops; assert torch.ops.dist_rec.embedding_bag_forward.default.has_kernel_for_dispatch_key('CUDA'), 'no CUDA kernel registered'; print('CUDA kernels registered')"
fi

if has test; then
  "$PY" -m pytest tests/ops/test_cuda_ops.py tests/optim/shampoo/test_shampoo_cuda.py -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/tests.log" | tail -25
fi

if has bench; then
  "$PY" benchmarks/bench_embedding.py --device cuda --markdown docs/benchmarks.md --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -14
  cp docs/benchmarks.md "$OUT/benchmarks.md"
fi

if has train; then
  # The README's model and bundled synthetic data on one GPU (NCCL), a few
  # hundred steps without evaluation until the end: the summary's examples/s
  # and AUC. Bounded, so that a hang cannot eat the device budget.
  steps=${TRAIN_STEPS:-600}
  batch=${TRAIN_BATCH:-8192}
  limit=${TRAIN_TIMEOUT:-240}
  status=0
  NPROC_PER_NODE=1 RDZV_ENDPOINT=127.0.0.1:${TRAIN_PORT:-29517} PYTHON="$PY" timeout -k 30 "$limit" \
    launch/train.sh --config launch/configs/default.yaml "train.device=$TRAIN_DEVICE" "train.batch_size=$batch" \
    "train.steps=$steps" train.eval_every=0 train.log_every=100 "train.output_dir=$OUT/train" > "$OUT/train.log" 2>&1 \
    || status=$?
  tail -16 "$OUT/train.log"
  if [[ $status -eq 124 || $status -eq 137 ]]; then echo "train: stopped after ${limit} s (TRAIN_TIMEOUT)"; fi
  exit $status
fi
