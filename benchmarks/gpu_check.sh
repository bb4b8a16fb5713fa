#!/usr/bin/env bash
# Everything the CUDA kernels need checked on a GPU, in one call:
#   build the extension for the GPU, run the CUDA tests, benchmark, and print
#   a short table. Logs and results go to $OUT (default /tmp/gpu_check).
#
#   benchmarks/gpu_check.sh            build + tests + benchmark
#   benchmarks/gpu_check.sh build test build + tests only
#   benchmarks/gpu_check.sh bench      benchmark only (extension already built)
#
# Uses whatever python3 holds a CUDA build of torch; installs nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
STAGES=${*:-build test bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, also for "bench" alone

has() { [[ " $STAGES " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

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
  "$PY" -m pytest tests/ops/test_cuda_ops.py -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
fi

if has bench; then
  "$PY" benchmarks/bench_embedding.py --device cuda --markdown docs/benchmarks.md --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -14
  cp docs/benchmarks.md "$OUT/benchmarks.md"
fi
