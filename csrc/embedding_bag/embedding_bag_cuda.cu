// CUDA implementations of the pooled-embedding ops (schemas in
// embedding_bag_ops.cpp; CPU twin in embedding_bag_cpu.cpp). Semantics are
// the CPU ones exactly; docs/kernels.md describes them.
//
// Forward: a light kernel checks ids and offsets, and the host reads its
// verdict while the pooling kernel runs: one warp per bag, 16-byte row loads,
// sub-warp groups pooling different rows of the bag when a row is narrower
// than a warp, no atomics.
// Backward: one warp per bag linearises (table base + id) and packs each
// position's gradient offset and weight; a stable radix sort (cub, only the
// key bits the rows need) groups a row's occurrences in position order; a
// run-length encoding gives the segments; one warp per unique row sums its
// occurrences in position order (long segments of hot rows are first summed
// in fixed pieces, then the pieces in order), then applies the optimizer to
// the row in place. Deterministic.
//
// Table and slot metadata travel as a kernel parameter (no copy to the
// device per call) unless there are more than fit; see Meta.
//
// Bad input never reaches a device assert: kernels record the first bad
// position in a small device buffer, which the host reads (one sync) and
// turns into the same exception the CPU path raises.
//
// Shape legend: B batch, F feature slots, T tables, N indices, U unique rows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "dist_rec/checks.h"
#include "embedding_bag/embedding_bag_checks.h"

namespace dist_rec {
namespace {

using at::Tensor;
using at::TensorList;
using c10::IntArrayRef;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;
constexpr int kBlock = kWarp * kWarpsPerBlock;
// Occurrences a piece's warp loads before it adds any (independent loads in
// flight per lane; the pieces of hot rows are long).
constexpr int kPieceUnroll = 4;
// Occurrences of one row summed by a single warp; longer segments (hot rows)
// are split into pieces of this many, summed in parallel, then in order.
constexpr int kPieceOccurrences = 64;
// Resident blocks per SM the forward and the update kernels are compiled for
// (a register budget: 40 per thread at 6). Both wait on random row reads, and
// more warps in flight beat more loads per warp: on an H100 the forward at 6
// blocks (40 registers) beat 48-96 register versions with 2-4 row loads per
// lane in flight, and the update at 6 blocks took 1 ms less per step at
// B=65536 than at 4 blocks with its gradient sum unrolled 4 ways.
constexpr int kForwardBlocksPerSM = 6;
constexpr int update_blocks_per_sm(int chunks) {
  return chunks == 1 ? 6 : chunks == 2 ? 4 : 1;
}
// Column chunks one lane keeps in registers in the backward: rows up to
// kWarp * vec * kMaxChunks wide (1024 floats for float32).
constexpr int kMaxChunks = 8;

// ---------------------------------------------------------------------------
// Metadata the kernels read: one record per table and per feature slot.
// ---------------------------------------------------------------------------

struct TableMeta {
  const void* weights; // [rows, dim]
  float* state0;
  float* state1;
  int64_t rows;
  int64_t dim;
  int64_t row_base; // first linear row
};

struct FeatureMeta {
  int64_t table;
  int64_t pooling; // 0 sum, 1 mean
  int64_t column;
};

// Up to this many tables and slots ride in the kernel parameter (about 3 KB
// of the 4 KB a launch may pass); beyond, the kernels read a device copy.
constexpr int kInlineTables = 32;
constexpr int kInlineFeatures = 64;

// Passed by value as a __grid_constant__ parameter: reads come from the
// constant cache, and a launch needs no host-to-device copy (two pinned
// copies per call cost about as much host time as the small forward itself).
struct Meta {
  TableMeta tables[kInlineTables];
  FeatureMeta features[kInlineFeatures];
  const TableMeta* device_tables; // non-null when there are more tables
  const FeatureMeta* device_features; // non-null when there are more slots
  int64_t num_tables;
};

__device__ __forceinline__ TableMeta table_meta(const Meta& m, int64_t t) {
  return m.device_tables != nullptr ? m.device_tables[t] : m.tables[t];
}

__device__ __forceinline__ FeatureMeta feature_meta(const Meta& m, int64_t f) {
  return m.device_features != nullptr ? m.device_features[f] : m.features[f];
}

__device__ __forceinline__ int64_t row_base_of(const Meta& m, int64_t t) {
  return m.device_tables != nullptr ? m.device_tables[t].row_base : m.tables[t].row_base;
}

// The table of linear row `key`: the last table whose row_base <= key.
__device__ __forceinline__ int64_t table_of(const Meta& m, int64_t key) {
  int64_t lo = 0, hi = m.num_tables - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (row_base_of(m, mid) <= key) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

struct Problem {
  BagLayout layout;
  std::vector<TableMeta> tables;
  std::vector<FeatureMeta> features;
  int64_t batch = 0;
  int64_t num_indices = 0;
  int64_t out_dim = 0;
  int64_t total_rows = 0;
  int64_t max_dim = 0;
  int vec = 1; // elements per 16-byte load usable for every table
  at::ScalarType weight_dtype = at::kFloat;
  bool int32_indices = false;
};

// Copies plain records to the device as bytes (pointer-sized fields and all).
template <typename T>
Tensor to_device(const std::vector<T>& records, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(records.size() * sizeof(T));
  Tensor host = at::empty({std::max<int64_t>(bytes, 1)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (bytes > 0) {
    std::memcpy(host.mutable_data_ptr(), records.data(), bytes);
  }
  return host.to(device, /*non_blocking=*/true);
}

// The kernels' view of a problem, plus the device copies it may point into
// (kept alive for as long as the launches that read them are queued).
struct KernelMeta {
  Meta meta;
  Tensor device_tables;
  Tensor device_features;
};

KernelMeta make_meta(const Problem& p, const at::Device& device) {
  KernelMeta k;
  std::memset(&k.meta, 0, sizeof(Meta));
  k.meta.num_tables = static_cast<int64_t>(p.tables.size());
  if (p.tables.size() <= kInlineTables) {
    std::copy(p.tables.begin(), p.tables.end(), k.meta.tables);
  } else {
    k.device_tables = to_device(p.tables, device);
    k.meta.device_tables = reinterpret_cast<const TableMeta*>(k.device_tables.const_data_ptr());
  }
  if (p.features.size() <= kInlineFeatures) {
    std::copy(p.features.begin(), p.features.end(), k.meta.features);
  } else {
    k.device_features = to_device(p.features, device);
    k.meta.device_features = reinterpret_cast<const FeatureMeta*>(k.device_features.const_data_ptr());
  }
  return k;
}

Problem make_problem(
    const char* op,
    TensorList weights,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights) {
  const BagLayout layout = check_bag_layout(
      op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  Problem p;
  p.layout = layout;
  p.batch = layout.batch;
  p.num_indices = layout.num_indices;
  p.out_dim = layout.out_dim;
  p.max_dim = layout.max_dim;
  p.weight_dtype = layout.weight_dtype;
  p.int32_indices = layout.int32_indices;
  // Elements per 16-byte load, reduced until every table's rows, every
  // slot's output columns and the output width keep the alignment.
  p.vec = 16 / static_cast<int>(c10::elementSize(p.weight_dtype));
  for (const Tensor& w : weights) {
    p.tables.push_back(TableMeta{w.const_data_ptr(), nullptr, nullptr, w.size(0), w.size(1), p.total_rows});
    p.total_rows += w.size(0);
    while (p.vec > 1 &&
           ((w.size(1) % p.vec) != 0 || (reinterpret_cast<uintptr_t>(w.const_data_ptr()) % 16) != 0)) {
      p.vec /= 2;
    }
  }
  for (int64_t f = 0; f < layout.num_features; ++f) {
    p.features.push_back(FeatureMeta{feature_table[f], feature_pooling[f], feature_column[f]});
    while (p.vec > 1 && (feature_column[f] % std::min(p.vec, 4)) != 0) {
      p.vec /= 2;
    }
  }
  while (p.vec > 1 && (p.out_dim % std::min(p.vec, 4)) != 0) {
    p.vec /= 2;
  }
  return p;
}

void attach_state(const char* op, const char* name, Problem& p, TensorList weights, TensorList state, int slot) {
  check_row_state(op, name, weights, state);
  for (size_t t = 0; t < state.size(); ++t) {
    float* data = const_cast<float*>(state[t].const_data_ptr<float>());
    (slot == 0 ? p.tables[t].state0 : p.tables[t].state1) = data;
  }
}

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

// Loads `vec` consecutive elements (16 bytes, or fewer when vec is smaller)
// and widens them to float.
template <typename W, int VEC>
__device__ __forceinline__ void load_row(const W* row, float* out) {
  if constexpr (sizeof(W) == 4) {
    if constexpr (VEC == 4) {
      const float4 v = *reinterpret_cast<const float4*>(row);
      out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    } else if constexpr (VEC == 2) {
      const float2 v = *reinterpret_cast<const float2*>(row);
      out[0] = v.x, out[1] = v.y;
    } else {
      out[0] = row[0];
    }
  } else {
    if constexpr (VEC == 8) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row);
      const W* h = reinterpret_cast<const W*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        out[i] = static_cast<float>(h[i]);
      }
    } else if constexpr (VEC == 4) {
      const uint2 raw = *reinterpret_cast<const uint2*>(row);
      const W* h = reinterpret_cast<const W*>(&raw);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        out[i] = static_cast<float>(h[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        out[i] = static_cast<float>(row[i]);
      }
    }
  }
}

// Loads VEC consecutive floats, 16 bytes at a time when VEC allows (the
// caller guarantees the alignment then).
template <int VEC>
__device__ __forceinline__ void load_floats(const float* src, float* out) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      const float4 v = *reinterpret_cast<const float4*>(src + k);
      out[k] = v.x, out[k + 1] = v.y, out[k + 2] = v.z, out[k + 3] = v.w;
    }
  } else if constexpr (VEC == 2) {
    const float2 v = *reinterpret_cast<const float2*>(src);
    out[0] = v.x, out[1] = v.y;
  } else {
    out[0] = src[0];
  }
}

// Stores floats (any count) to consecutive floats, 16 bytes at a time when
// aligned (the caller guarantees it when VEC >= 4).
template <int VEC>
__device__ __forceinline__ void store_floats(float* dst, const float* v) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      *reinterpret_cast<float4*>(dst + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      dst[i] = v[i];
    }
  }
}

template <typename W>
__device__ __forceinline__ W from_float(float x) {
  return static_cast<W>(x); // round to nearest even, as the CPU kernels
}

// Narrows VEC floats to W and stores them as one access (8 or 16 bytes where
// the width allows; the row alignment of load_row holds for stores too).
template <typename W, int VEC>
__device__ __forceinline__ void store_row(W* dst, const float* v) {
  if constexpr (sizeof(W) == 4) {
    store_floats<VEC>(reinterpret_cast<float*>(dst), v);
  } else if constexpr (VEC == 8 || VEC == 4) {
    using Raw = std::conditional_t<VEC == 8, uint4, uint2>;
    Raw raw;
    W* h = reinterpret_cast<W*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      h[i] = from_float<W>(v[i]);
    }
    *reinterpret_cast<Raw*>(dst) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      dst[i] = from_float<W>(v[i]);
    }
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

// Error words a kernel fills (see raise_if_errors): the host sets words 0 and
// 1 to all ones (no error) before the launch.
enum ErrorWord { kBadIndex = 0, kBadBag = 1, kFirstOffset = 2, kLastOffset = 3, kNumErrorWords = 4 };

__device__ __forceinline__ void record_min(int64_t* slot, int64_t value) {
  atomicMin(reinterpret_cast<unsigned long long*>(slot), static_cast<unsigned long long>(value));
}

// offsets[0] and offsets[F*B], for the host's check that they are 0 and N.
template <typename I>
__device__ __forceinline__ void record_offset_ends(int64_t* errors, const I* offsets, int64_t num_bags) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    errors[kFirstOffset] = static_cast<int64_t>(offsets[0]);
    errors[kLastOffset] = static_cast<int64_t>(offsets[num_bags]);
  }
}

// Threads of a warp that share one row: the smallest power of two covering
// dim / VEC, at most a warp.
__device__ __forceinline__ int lanes_per_row(int64_t dim, int vec) {
  int lanes = 1;
  while (lanes < kWarp && lanes * vec < dim) {
    lanes *= 2;
  }
  return lanes;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// Each group of `lanes` pools rows start + group, start + group + groups,
// ...: it reads the id (lanes of a group share the load) and then the row.
// Rows are added in position order within a group and the groups summed in
// a fixed order afterwards (deterministic). Ids and offsets were checked by
// linearize_kernel, launched before, whose verdict the host reads; bad ones
// are skipped here all the same (nothing out of range is read meanwhile) and
// recorded again, though no one reads these records: without that path the
// compiler hoists more row loads and spills registers at this kernel's
// 40-register budget (ptxas: 72-120 bytes for float32).
template <typename I, typename W, int VEC, bool WEIGHTED>
__global__ void __launch_bounds__(kBlock, kForwardBlocksPerSM) forward_kernel(
    const __grid_constant__ Meta meta,
    int64_t num_bags,
    int64_t batch,
    const I* __restrict__ indices,
    const I* __restrict__ offsets,
    int64_t num_indices,
    const float* __restrict__ per_sample_weights,
    float* __restrict__ out,
    int64_t out_dim,
    int64_t* __restrict__ errors) {
  record_offset_ends(errors, offsets, num_bags);
  const int64_t bag = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bag >= num_bags) {
    return;
  }
  const int64_t feature = bag / batch;
  const int64_t sample = bag - feature * batch;
  const FeatureMeta fm = feature_meta(meta, feature);
  const TableMeta tm = table_meta(meta, fm.table);
  const int64_t start = static_cast<int64_t>(offsets[bag]);
  const int64_t end = static_cast<int64_t>(offsets[bag + 1]);
  if (start > end || end > num_indices || start < 0) {
    if (lane == 0) {
      record_min(errors + kBadBag, bag);
    }
    return;
  }
  const W* weights = static_cast<const W*>(tm.weights);
  const int64_t dim = tm.dim;
  const int lanes = lanes_per_row(dim, VEC);
  const int group = lane / lanes; // which of the warp's row groups
  const int groups = kWarp / lanes;
  const int sub = lane % lanes;
  const float scale = (fm.pooling == 1 && end > start) ? 1.0f / static_cast<float>(end - start) : 1.0f;
  float* dst = out + sample * out_dim + fm.column;
  // Column chunks of lanes * VEC elements (one, unless rows are wider than
  // a warp's 16-byte loads).
  for (int64_t c0 = 0; c0 < dim; c0 += static_cast<int64_t>(lanes) * VEC) {
    const int64_t col = c0 + static_cast<int64_t>(sub) * VEC;
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc[i] = 0.0f;
    }
#pragma unroll 4
    for (int64_t p = start + group; p < end; p += groups) {
      const int64_t id = static_cast<int64_t>(indices[p]);
      if (id < 0 || id >= tm.rows) {
        if (sub == 0 && c0 == 0) {
          record_min(errors + kBadIndex, p);
        }
        continue;
      }
      if (col < dim) {
        float x[VEC];
        load_row<W, VEC>(weights + id * dim + col, x);
        const float w = WEIGHTED ? per_sample_weights[p] : 1.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          acc[i] = WEIGHTED ? fmaf(w, x[i], acc[i]) : acc[i] + x[i];
        }
      }
    }
    // Sum the groups' partial sums (fixed order: deterministic).
    for (int offset = lanes; offset < kWarp; offset *= 2) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc[i] += __shfl_xor_sync(kFullMask, acc[i], offset);
      }
    }
    if (group == 0 && col < dim) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc[i] *= scale;
      }
      store_floats<VEC>(dst + col, acc);
    }
  }
}

// One occurrence of a row in the backward, packed in 64 bits so that the
// sort carries it as the value: where its bag's gradient starts in
// grad_output (low 32 bits; the host checks B * out_dim < 2^32) and its
// weight, per-sample weight x 1/L for mean pooling (high 32 bits).
__device__ __forceinline__ uint64_t pack_occurrence(uint32_t grad_offset, float scale) {
  return (static_cast<uint64_t>(__float_as_uint(scale)) << 32) | grad_offset;
}
__device__ __forceinline__ uint32_t occurrence_offset(uint64_t occ) {
  return static_cast<uint32_t>(occ);
}
__device__ __forceinline__ float occurrence_scale(uint64_t occ) {
  return __uint_as_float(static_cast<uint32_t>(occ >> 32));
}

// Checks ids and offsets and, when `keys` is given, linearises each
// position: keys[p] = row_base(table) + id, occurrences[p] its packed
// gradient offset and weight. One warp per bag, lanes over its positions
// (coalesced).
template <typename I, typename K>
__global__ void __launch_bounds__(kBlock) linearize_kernel(
    const __grid_constant__ Meta meta,
    int64_t num_bags,
    int64_t batch,
    const I* __restrict__ indices,
    const I* __restrict__ offsets,
    int64_t num_indices,
    const float* __restrict__ per_sample_weights,
    int64_t out_dim,
    K* __restrict__ keys,
    uint64_t* __restrict__ occurrences,
    int64_t* __restrict__ errors) {
  record_offset_ends(errors, offsets, num_bags);
  const int64_t bag = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bag >= num_bags) {
    return;
  }
  const int64_t start = static_cast<int64_t>(offsets[bag]);
  const int64_t end = static_cast<int64_t>(offsets[bag + 1]);
  if (start > end || end > num_indices || start < 0) {
    if (lane == 0) {
      record_min(errors + kBadBag, bag);
    }
    return;
  }
  const int64_t feature = bag / batch;
  const int64_t sample = bag - feature * batch;
  const FeatureMeta fm = feature_meta(meta, feature);
  const TableMeta tm = table_meta(meta, fm.table);
  const float bag_scale = (fm.pooling == 1 && end > start) ? 1.0f / static_cast<float>(end - start) : 1.0f;
  const uint32_t grad_offset = static_cast<uint32_t>(sample * out_dim + fm.column);
  for (int64_t p = start + lane; p < end; p += kWarp) {
    const int64_t id = static_cast<int64_t>(indices[p]);
    const bool ok = id >= 0 && id < tm.rows;
    if (!ok) {
      record_min(errors + kBadIndex, p);
    }
    if (keys != nullptr) {
      keys[p] = static_cast<K>(ok ? tm.row_base + id : 0);
      const float scale = per_sample_weights != nullptr ? per_sample_weights[p] * bag_scale : bag_scale;
      occurrences[p] = pack_occurrence(grad_offset, scale);
    }
  }
}

// ---------------------------------------------------------------------------
// Error reporting (host side)
// ---------------------------------------------------------------------------

// A fresh error buffer: words 0 and 1 all ones ("none"; record_min lowers
// them), the rest written by the kernel. `extra` more words for the caller.
Tensor new_errors(const at::Device& device, int extra = 0) {
  Tensor errors = at::empty({kNumErrorWords + extra}, at::TensorOptions().dtype(at::kLong).device(device));
  C10_CUDA_CHECK(cudaMemsetAsync(
      errors.mutable_data_ptr(), 0xff, errors.numel() * sizeof(int64_t), c10::cuda::getCurrentCUDAStream()));
  return errors;
}

// Copies `bytes` (at most 64) from the device to the host, waiting for the
// kernels before them. Through a small pinned buffer per thread (allocated
// once, never freed): one DMA straight into it, where pageable memory takes
// the driver's staging path. Every op reads its checks this way, so the
// copy sits on the critical path of each call.
constexpr size_t kStagingBytes = 64;

void* staging_buffer() {
  thread_local void* staging = [] {
    void* buffer = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&buffer, kStagingBytes, cudaHostAllocPortable));
    return buffer;
  }();
  return staging;
}

void read_to_host(const void* device, void* host, size_t bytes) {
  TORCH_INTERNAL_ASSERT(bytes <= kStagingBytes);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemcpyAsync(staging_buffer(), device, bytes, cudaMemcpyDeviceToHost, stream));
  c10::cuda::stream_synchronize(stream);
  std::memcpy(host, staging_buffer(), bytes);
}

// The same read in two halves, for work queued in between that the host
// need not wait for: the constructor queues the copy after the kernels
// queued so far and marks its end with an event (made on the current device,
// per read: a few microseconds); finish() waits for that mark only.
class QueuedRead {
 public:
  QueuedRead(const void* device, size_t bytes) : bytes_(bytes) {
    TORCH_INTERNAL_ASSERT(bytes <= kStagingBytes);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaMemcpyAsync(staging_buffer(), device, bytes, cudaMemcpyDeviceToHost, stream));
    C10_CUDA_CHECK(cudaEventRecord(done_, stream));
  }
  QueuedRead(const QueuedRead&) = delete;
  QueuedRead& operator=(const QueuedRead&) = delete;
  ~QueuedRead() {
    C10_CUDA_CHECK_WARN(cudaEventDestroy(done_));
  }

  void finish(void* host) {
    C10_CUDA_CHECK(cudaEventSynchronize(done_));
    std::memcpy(host, staging_buffer(), bytes_);
  }

 private:
  cudaEvent_t done_ = nullptr;
  size_t bytes_;
};

void read_words(const Tensor& words, int64_t* host, int64_t count) {
  read_to_host(words.const_data_ptr(), host, count * sizeof(int64_t));
}

constexpr int64_t kNone = -1; // all ones

// Raises the CPU path's exception for the first problem the words record
// (e: the error words as read back), in the CPU path's order of checks.
void raise_if_errors(const char* op, const Problem& p, const int64_t* e, const Tensor& indices, const Tensor& offsets) {
  DIST_REC_CHECK_VALUE(op, e[kFirstOffset] == 0, "offsets[0] must be 0; it is ", e[kFirstOffset]);
  if (e[kBadBag] != kNone) {
    const int64_t bag = e[kBadBag];
    const Tensor pair = offsets.slice(0, bag, bag + 2).to(at::kLong).cpu();
    const int64_t feature = p.batch > 0 ? bag / p.batch : 0;
    DIST_REC_CHECK_VALUE(
        op,
        false,
        "offsets must be non-decreasing and within len(indices)=",
        p.num_indices,
        ", but offsets[",
        bag,
        "]=",
        pair.const_data_ptr<int64_t>()[0],
        ", offsets[",
        bag + 1,
        "]=",
        pair.const_data_ptr<int64_t>()[1],
        " (bag of feature slot ",
        feature,
        ", sample ",
        bag - feature * p.batch,
        ")");
  }
  DIST_REC_CHECK_VALUE(
      op,
      e[kLastOffset] == p.num_indices,
      "offsets must end at len(indices)=",
      p.num_indices,
      "; offsets[-1]=",
      e[kLastOffset]);
  if (e[kBadIndex] != kNone) {
    const int64_t pos = e[kBadIndex];
    const Tensor host_offsets = offsets.to(at::kLong).cpu();
    const int64_t* o = host_offsets.const_data_ptr<int64_t>();
    const int64_t num_bags = host_offsets.numel() - 1;
    const int64_t bag = std::upper_bound(o, o + num_bags + 1, pos) - o - 1;
    const int64_t table = p.features[bag / p.batch].table;
    throw_id_out_of_range(op, pos, indices[pos].item<int64_t>(), bag, p.batch, table, p.tables[table].rows);
  }
}

template <typename Fn>
void dispatch_index(bool int32_indices, const Fn& fn) {
  if (int32_indices) {
    fn(int32_t{});
  } else {
    fn(int64_t{});
  }
}

template <typename Fn>
void dispatch_weight(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kHalf:
      return fn(at::Half{});
    default:
      return fn(at::BFloat16{});
  }
}

// VEC is 16 bytes of weights when every table allows it, else smaller.
template <typename W, typename Fn>
void dispatch_vec(int vec, const Fn& fn) {
  if constexpr (sizeof(W) == 4) {
    switch (vec) {
      case 4:
        return fn(std::integral_constant<int, 4>{});
      case 2:
        return fn(std::integral_constant<int, 2>{});
      default:
        return fn(std::integral_constant<int, 1>{});
    }
  } else {
    switch (vec) {
      case 8:
        return fn(std::integral_constant<int, 8>{});
      case 4:
        return fn(std::integral_constant<int, 4>{});
      case 2:
        return fn(std::integral_constant<int, 2>{});
      default:
        return fn(std::integral_constant<int, 1>{});
    }
  }
}

int64_t blocks_for(int64_t threads, int64_t per_block) {
  return std::max<int64_t>(1, (threads + per_block - 1) / per_block);
}

// Checks ids and offsets on the device (one sync) and raises as the CPU path
// would; when `keys` is given, also linearises for the backward.
template <typename K>
void linearize(
    const char* op,
    const Problem& p,
    const Meta& meta,
    const Tensor& indices,
    const Tensor& offsets,
    const float* psw,
    K* keys,
    uint64_t* occurrences,
    const Tensor& errors) {
  const int64_t num_bags = offsets.numel() - 1;
  dispatch_index(p.int32_indices, [&](auto index_tag) {
    using I = decltype(index_tag);
    linearize_kernel<I, K><<<blocks_for(num_bags * kWarp, kBlock), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        meta,
        num_bags,
        p.batch,
        indices.const_data_ptr<I>(),
        offsets.const_data_ptr<I>(),
        p.num_indices,
        psw,
        p.out_dim,
        keys,
        occurrences,
        errors.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor embedding_bag_forward_cuda(
    TensorList weights,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights) {
  const char* op = "embedding_bag_forward";
  const Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  const at::Device device = weights[0].device();
  const c10::cuda::CUDAGuard guard(device);
  Tensor out = at::empty({p.batch, p.out_dim}, weights[0].options().dtype(at::kFloat));
  const int64_t num_bags = offsets.numel() - 1;
  const KernelMeta k = make_meta(p, device);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float* psw = per_sample_weights.has_value() ? per_sample_weights->const_data_ptr<float>() : nullptr;
  // Check ids and offsets first, with a light kernel (it reads the ids and
  // offsets only), and queue its verdict's copy to the host before the
  // pooling. The host then waits for the check alone: its wake-up and
  // return overlap the pooling instead of following it, which at B=8192 is
  // a third of the time a caller sees.
  Tensor errors = new_errors(device);
  linearize<int32_t>(op, p, k.meta, indices, offsets, nullptr, nullptr, nullptr, errors);
  QueuedRead verdict(errors.const_data_ptr(), kNumErrorWords * sizeof(int64_t));
  // Launched even with no bags (a grid of one block that does nothing).
  dispatch_index(p.int32_indices, [&](auto index_tag) {
    using I = decltype(index_tag);
    dispatch_weight(p.weight_dtype, [&](auto weight_tag) {
      using W = decltype(weight_tag);
      dispatch_vec<W>(p.vec, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        auto launch = [&](auto kernel) {
          kernel<<<blocks_for(num_bags * kWarp, kBlock), kBlock, 0, stream>>>(
              k.meta,
              num_bags,
              p.batch,
              indices.const_data_ptr<I>(),
              offsets.const_data_ptr<I>(),
              p.num_indices,
              psw,
              out.mutable_data_ptr<float>(),
              p.out_dim,
              errors.mutable_data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (psw != nullptr) {
          launch(forward_kernel<I, W, VEC, true>);
        } else {
          launch(forward_kernel<I, W, VEC, false>);
        }
      });
    });
  });
  int64_t e[kNumErrorWords];
  verdict.finish(e);
  raise_if_errors(op, p, e, indices, offsets);
  return out;
}

// ---------------------------------------------------------------------------
// Backward: group occurrences by row, then one warp per row
// ---------------------------------------------------------------------------

enum class Update { kSgd, kRowwiseAdagrad, kMomentumScaled, kRowGrad };

struct Hyper {
  float learning_rate = 0.0f;
  float eps = 0.0f;
  float weight_decay = 0.0f;
  int weight_decay_mode = 0; // 0 none, 1 L2, 2 decoupled
  float momentum_scale = 1.0f;
};

struct Grouped {
  KernelMeta k;
  Tensor occurrences; // [N] packed (gradient offset, weight), in row order (as int64)
  Tensor unique_keys; // [U] int64
  Tensor seg_start; // [U+1] int32: first occurrence of segment s
  Tensor piece_base; // [U+1] int32: pieces of long segments before segment s
  int64_t num_segments = 0;
  int64_t num_pieces = 0;
};

__global__ void piece_counts_kernel(const int32_t* __restrict__ seg_start, int64_t num_segments, int32_t* __restrict__ pieces) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < num_segments) {
    const int32_t count = seg_start[s + 1] - seg_start[s];
    pieces[s] = count > kPieceOccurrences ? (count + kPieceOccurrences - 1) / kPieceOccurrences : 0;
  }
}

// Runs a cub device algorithm: once for its scratch size, once for real.
template <typename Fn>
void run_cub(const at::Device& device, const Fn& fn) {
  size_t bytes = 0;
  C10_CUDA_CHECK(fn(nullptr, bytes));
  Tensor scratch = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, at::TensorOptions().dtype(at::kByte).device(device));
  C10_CUDA_CHECK(fn(scratch.mutable_data_ptr(), bytes));
}

// Bits a radix sort needs for keys in [0, total_rows).
int key_bits(int64_t total_rows) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < total_rows) {
    ++bits;
  }
  return bits;
}

// Linearise (with the id checks), sort (row, occurrence) by row, and find
// the segments. K: the sort key, 32-bit when the rows allow (fewer passes).
template <typename K>
void group_by_row_with(
    const char* op,
    const Problem& p,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& psw,
    Grouped& g) {
  const at::Device device = indices.device();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = p.num_indices;
  const auto key_opts = at::TensorOptions().dtype(sizeof(K) == 4 ? at::kInt : at::kLong).device(device);
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(device);
  const auto int_opts = at::TensorOptions().dtype(at::kInt).device(device);
  Tensor keys = at::empty({n}, key_opts);
  Tensor occurrences = at::empty({n}, long_opts);
  // The error words, then the number of segments (written by the encoding).
  Tensor words = new_errors(device, 1);
  linearize<K>(
      op,
      p,
      g.k.meta,
      indices,
      offsets,
      psw.has_value() ? psw->const_data_ptr<float>() : nullptr,
      keys.mutable_data_ptr<K>(),
      reinterpret_cast<uint64_t*>(occurrences.mutable_data_ptr<int64_t>()),
      words);

  // Stable radix sort by row over the bits the rows need: a row's
  // occurrences become adjacent, in position order.
  Tensor sorted_keys = at::empty({n}, key_opts);
  g.occurrences = at::empty({n}, long_opts);
  Tensor unique_keys = at::empty({n}, long_opts);
  Tensor counts = at::empty({n}, int_opts);
  int64_t* num_runs = words.mutable_data_ptr<int64_t>() + kNumErrorWords;
  if (n > 0) {
    const int bits = key_bits(p.total_rows);
    const K* keys_in = keys.const_data_ptr<K>();
    K* keys_out = sorted_keys.mutable_data_ptr<K>();
    const uint64_t* occ_in = reinterpret_cast<const uint64_t*>(occurrences.const_data_ptr<int64_t>());
    uint64_t* occ_out = reinterpret_cast<uint64_t*>(g.occurrences.mutable_data_ptr<int64_t>());
    const int items = static_cast<int>(n);
    run_cub(device, [&](void* scratch, size_t& bytes) {
      return cub::DeviceRadixSort::SortPairs(scratch, bytes, keys_in, keys_out, occ_in, occ_out, items, 0, bits, stream);
    });
    // Segments: unique rows and their occurrence counts.
    int64_t* unique_out = unique_keys.mutable_data_ptr<int64_t>();
    int32_t* counts_out = counts.mutable_data_ptr<int32_t>();
    run_cub(device, [&](void* scratch, size_t& bytes) {
      return cub::DeviceRunLengthEncode::Encode(scratch, bytes, keys_out, unique_out, counts_out, num_runs, items, stream);
    });
  }
  // One sync: the id and offset checks, and the number of segments.
  int64_t e[kNumErrorWords + 1];
  read_words(words, e, kNumErrorWords + 1);
  raise_if_errors(op, p, e, indices, offsets);
  g.num_segments = n > 0 ? e[kNumErrorWords] : 0;
  const int64_t u = g.num_segments;
  g.unique_keys = unique_keys.slice(0, 0, u);
  g.seg_start = at::zeros({u + 1}, int_opts);
  g.piece_base = at::zeros({u + 1}, int_opts);
  if (u == 0) {
    return;
  }
  const int items = static_cast<int>(u);
  const int32_t* counts_in = counts.const_data_ptr<int32_t>();
  int32_t* seg_start = g.seg_start.mutable_data_ptr<int32_t>();
  run_cub(device, [&](void* scratch, size_t& bytes) {
    return cub::DeviceScan::InclusiveSum(scratch, bytes, counts_in, seg_start + 1, items, stream);
  });
  // Pieces of long segments (counts is free again: it holds them).
  int32_t* pieces = counts.mutable_data_ptr<int32_t>();
  piece_counts_kernel<<<blocks_for(u, 256), 256, 0, stream>>>(seg_start, u, pieces);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  int32_t* piece_base = g.piece_base.mutable_data_ptr<int32_t>();
  run_cub(device, [&](void* scratch, size_t& bytes) {
    return cub::DeviceScan::InclusiveSum(scratch, bytes, pieces, piece_base + 1, items, stream);
  });
  int32_t total_pieces = 0;
  read_to_host(piece_base + u, &total_pieces, sizeof(int32_t));
  g.num_pieces = total_pieces;
}

Grouped group_by_row(const char* op, const Problem& p, const Tensor& indices, const Tensor& offsets, const std::optional<Tensor>& psw) {
  DIST_REC_CHECK_VALUE(op, p.num_indices < (int64_t{1} << 31), "a batch may hold at most 2^31 - 1 indices; got ", p.num_indices);
  DIST_REC_CHECK_VALUE(
      op,
      p.batch * p.out_dim < (int64_t{1} << 32),
      "the CUDA backward supports grad_output of at most 2^32 elements; it has ",
      p.batch,
      " x ",
      p.out_dim);
  Grouped g;
  g.k = make_meta(p, indices.device());
  if (p.total_rows < (int64_t{1} << 31)) {
    group_by_row_with<int32_t>(op, p, indices, offsets, psw, g);
  } else {
    group_by_row_with<int64_t>(op, p, indices, offsets, psw, g);
  }
  return g;
}

// Adds occurrences [begin, end) of one row into g, in position order: the
// warp loads up to 32 packed occurrences at once (one coalesced load), then
// each lane reads its columns of U gradient rows before adding any. Lane
// columns: col0 + c * kWarp * VEC for chunk c.
template <int VEC, int CHUNKS, int U>
__device__ __forceinline__ void sum_occurrences(
    const uint64_t* __restrict__ occurrences,
    const float* __restrict__ grad_output,
    int begin,
    int end,
    int64_t col0,
    int64_t dim,
    int lane,
    float (&g)[CHUNKS][VEC]) {
  for (int base = begin; base < end; base += kWarp) {
    const int count = end - base < kWarp ? end - base : kWarp;
    const uint64_t mine = lane < count ? occurrences[base + lane] : 0;
    for (int j0 = 0; j0 < count; j0 += U) {
      float x[U][CHUNKS][VEC];
      float scale[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const uint64_t occ = __shfl_sync(kFullMask, mine, (j0 + u) & (kWarp - 1));
        scale[u] = occurrence_scale(occ);
        const float* src = grad_output + occurrence_offset(occ);
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
          const int64_t col = col0 + static_cast<int64_t>(c) * kWarp * VEC;
          if (j0 + u < count && col < dim) {
            load_floats<VEC>(src + col, x[u][c]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (j0 + u < count) {
#pragma unroll
          for (int c = 0; c < CHUNKS; ++c) {
            const int64_t col = col0 + static_cast<int64_t>(c) * kWarp * VEC;
            if (col < dim) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) {
                g[c][k] = fmaf(scale[u], x[u][c][k], g[c][k]);
              }
            }
          }
        }
      }
    }
  }
}

// One warp per piece of a long segment: partial[q, 0:dim] = sum of its
// occurrences, in position order.
template <int VEC>
__global__ void __launch_bounds__(kBlock) piece_sum_kernel(
    const __grid_constant__ Meta meta,
    const int64_t* __restrict__ unique_keys,
    const int32_t* __restrict__ seg_start,
    const int32_t* __restrict__ piece_base,
    int64_t num_segments,
    int64_t num_pieces,
    const uint64_t* __restrict__ occurrences,
    const float* __restrict__ grad_output,
    float* __restrict__ partials,
    int64_t partial_stride) {
  const int64_t q = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (q >= num_pieces) {
    return;
  }
  // The segment owning piece q: last s with piece_base[s] <= q.
  int64_t lo = 0, hi = num_segments - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (piece_base[mid] <= q) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t s = lo;
  const int64_t dim = table_meta(meta, table_of(meta, unique_keys[s])).dim;
  const int begin = seg_start[s] + static_cast<int>(q - piece_base[s]) * kPieceOccurrences;
  const int end = min(begin + kPieceOccurrences, seg_start[s + 1]);
  for (int64_t c0 = 0; c0 < dim; c0 += kWarp * VEC) {
    const int64_t col = c0 + static_cast<int64_t>(lane) * VEC;
    float acc[1][VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc[0][k] = 0.0f;
    }
    sum_occurrences<VEC, 1, kPieceUnroll>(occurrences, grad_output, begin, end, col, dim, lane, acc);
    if (col < dim) {
      store_floats<VEC>(partials + q * partial_stride + col, acc[0]);
    }
  }
}

// One warp per unique row: its summed gradient (from occurrences, or from
// its pieces in order), then the update. Each lane owns columns
// lane*VEC + c*32*VEC, c < CHUNKS. The row and its state are read before the
// gradient: they do not depend on it, so their latency overlaps its loads.
template <typename W, int VEC, int CHUNKS, Update kUpdate>
__global__ void __launch_bounds__(kBlock, update_blocks_per_sm(CHUNKS)) update_kernel(
    const __grid_constant__ Meta meta,
    const int64_t* __restrict__ unique_keys,
    const int32_t* __restrict__ seg_start,
    const int32_t* __restrict__ piece_base,
    int64_t num_segments,
    const uint64_t* __restrict__ occurrences,
    const float* __restrict__ grad_output,
    const float* __restrict__ partials,
    int64_t partial_stride,
    Hyper hyper,
    float* __restrict__ row_grad_out,
    const int64_t* __restrict__ row_grad_offset) {
  const int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (s >= num_segments) {
    return;
  }
  const int64_t key = unique_keys[s];
  const int begin = seg_start[s];
  const int end = seg_start[s + 1];
  const int first_piece = piece_base[s];
  const int last_piece = piece_base[s + 1];
  const TableMeta tm = table_meta(meta, table_of(meta, key));
  const int64_t row = key - tm.row_base;
  const int64_t dim = tm.dim;
  const int64_t col0 = static_cast<int64_t>(lane) * VEC;
  auto col_of = [&](int c) { return col0 + static_cast<int64_t>(c) * kWarp * VEC; };

  W* w = static_cast<W*>(const_cast<void*>(tm.weights)) + row * dim;
  float x[CHUNKS][VEC];
  float state0 = 0.0f, state1 = 0.0f;
  if constexpr (kUpdate != Update::kRowGrad) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      if (col_of(c) < dim) {
        load_row<W, VEC>(w + col_of(c), x[c]);
      }
    }
    if constexpr (kUpdate == Update::kRowwiseAdagrad || kUpdate == Update::kMomentumScaled) {
      state0 = tm.state0[row];
    }
    if constexpr (kUpdate == Update::kMomentumScaled) {
      state1 = tm.state1[row];
    }
  }

  float g[CHUNKS][VEC];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      g[c][k] = 0.0f;
    }
  }
  if (first_piece == last_piece) {
    // One occurrence at a time: rows touched once or twice are the common
    // case, and the registers an unrolled sum takes cost more warps.
    sum_occurrences<VEC, CHUNKS, 1>(occurrences, grad_output, begin, end, col0, dim, lane, g);
  } else {
    for (int q = first_piece; q < last_piece; ++q) {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        if (col_of(c) < dim) {
          float part[VEC];
          load_floats<VEC>(partials + q * partial_stride + col_of(c), part);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            g[c][k] += part[k];
          }
        }
      }
    }
  }

  if constexpr (kUpdate == Update::kRowGrad) {
    float* dst = row_grad_out + row_grad_offset[s];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      if (col_of(c) < dim) {
        store_floats<VEC>(dst + col_of(c), g[c]);
      }
    }
    return;
  } else {
    float correction = 1.0f;
    float multiplier = hyper.learning_rate;
    if constexpr (kUpdate == Update::kSgd) {
      if (hyper.weight_decay_mode != 0) {
        correction = 1.0f - hyper.learning_rate * hyper.weight_decay;
      }
    } else {
      // mean over the row of (g + l2 * w)^2, reduced across the warp.
      const float l2 = hyper.weight_decay_mode == 1 ? hyper.weight_decay : 0.0f;
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        if (col_of(c) < dim) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float v = l2 != 0.0f ? fmaf(l2, x[c][k], g[c][k]) : g[c][k];
            sum = fmaf(v, v, sum);
          }
        }
      }
      const float mean_square = warp_sum(sum) / static_cast<float>(dim);
      float accumulator;
      // Every lane has read the state (before the gradient); only then does
      // lane 0 write it.
      __syncwarp();
      if constexpr (kUpdate == Update::kRowwiseAdagrad) {
        accumulator = state0 + mean_square;
        if (lane == 0) {
          tm.state0[row] = accumulator;
        }
      } else {
        const float increment = state1 + mean_square;
        if (lane == 0) {
          tm.state1[row] = increment;
        }
        accumulator = state0 + hyper.momentum_scale * increment;
      }
      multiplier = hyper.learning_rate / (sqrtf(accumulator) + hyper.eps);
      if (hyper.weight_decay_mode == 1) {
        correction = 1.0f - multiplier * hyper.weight_decay;
      } else if (hyper.weight_decay_mode == 2) {
        correction = 1.0f - hyper.learning_rate * hyper.weight_decay;
      }
    }
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      if (col_of(c) < dim) {
        float updated[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          updated[k] = correction == 1.0f ? fmaf(-multiplier, g[c][k], x[c][k])
                                          : fmaf(-multiplier, g[c][k], correction * x[c][k]);
        }
        store_row<W, VEC>(w + col_of(c), updated);
      }
    }
  }
}

template <Update kUpdate>
void run_update(
    const char* op,
    const Problem& p,
    const Grouped& g,
    const Tensor& maybe_unaligned_grad_output,
    const Hyper& hyper,
    float* row_grad_out = nullptr,
    const int64_t* row_grad_offset = nullptr) {
  // Gradient rows are read 16 bytes at a time: a view starting off a 16-byte
  // boundary is copied first.
  const Tensor grad_output = reinterpret_cast<uintptr_t>(maybe_unaligned_grad_output.const_data_ptr()) % 16 == 0
      ? maybe_unaligned_grad_output
      : maybe_unaligned_grad_output.clone();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  DIST_REC_CHECK_VALUE(
      op,
      p.max_dim <= static_cast<int64_t>(kWarp) * p.vec * kMaxChunks,
      "the CUDA backward supports rows up to ",
      static_cast<int64_t>(kWarp) * p.vec * kMaxChunks,
      " elements for these tables; the widest has ",
      p.max_dim);
  if (g.num_segments == 0) {
    return;
  }
  const uint64_t* occurrences = reinterpret_cast<const uint64_t*>(g.occurrences.const_data_ptr<int64_t>());
  // Round the partial rows up so every piece's row stays 16-byte aligned.
  const int64_t partial_stride = (p.max_dim + 3) / 4 * 4;
  Tensor partials = at::empty({std::max<int64_t>(g.num_pieces, 1), partial_stride}, grad_output.options());
  // Elements per lane: at most 4 (16 bytes of float gradient), so that a
  // 128-wide 16-bit row keeps all 32 lanes busy with half the registers;
  // 8 only for 16-bit rows too wide for kMaxChunks chunks of 4.
  const int vec = p.max_dim <= static_cast<int64_t>(kWarp) * 4 * kMaxChunks ? std::min(p.vec, 4) : p.vec;
  dispatch_weight(p.weight_dtype, [&](auto weight_tag) {
    using W = decltype(weight_tag);
    dispatch_vec<W>(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      // The floats of grad_output are read VEC at a time: for 16-bit tables
      // VEC may be 8 (two float4), which alignment of columns to 4 allows.
      if (g.num_pieces > 0) {
        piece_sum_kernel<VEC><<<blocks_for(g.num_pieces * kWarp, kBlock), kBlock, 0, stream>>>(
            g.k.meta,
            g.unique_keys.const_data_ptr<int64_t>(),
            g.seg_start.const_data_ptr<int32_t>(),
            g.piece_base.const_data_ptr<int32_t>(),
            g.num_segments,
            g.num_pieces,
            occurrences,
            grad_output.const_data_ptr<float>(),
            partials.mutable_data_ptr<float>(),
            partial_stride);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // Registers for as many column chunks as the widest row needs: fewer
      // registers, more warps in flight.
      const int64_t chunks = (p.max_dim + kWarp * VEC - 1) / (kWarp * VEC);
      auto launch = [&](auto chunks_tag) {
        constexpr int CHUNKS = decltype(chunks_tag)::value;
        update_kernel<W, VEC, CHUNKS, kUpdate><<<blocks_for(g.num_segments * kWarp, kBlock), kBlock, 0, stream>>>(
            g.k.meta,
            g.unique_keys.const_data_ptr<int64_t>(),
            g.seg_start.const_data_ptr<int32_t>(),
            g.piece_base.const_data_ptr<int32_t>(),
            g.num_segments,
            occurrences,
            grad_output.const_data_ptr<float>(),
            partials.const_data_ptr<float>(),
            partial_stride,
            hyper,
            row_grad_out,
            row_grad_offset);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (chunks <= 1) {
        launch(std::integral_constant<int, 1>{});
      } else if (chunks <= 2) {
        launch(std::integral_constant<int, 2>{});
      } else if (chunks <= 4) {
        launch(std::integral_constant<int, 4>{});
      } else {
        launch(std::integral_constant<int, kMaxChunks>{});
      }
    });
  });
}

Hyper make_hyper(const char* op, double lr, double eps, double wd, int64_t mode, double scale) {
  check_weight_decay_mode(op, mode);
  Hyper h;
  h.learning_rate = static_cast<float>(lr);
  h.eps = static_cast<float>(eps);
  h.weight_decay = static_cast<float>(wd);
  h.weight_decay_mode = static_cast<int>(mode);
  h.momentum_scale = static_cast<float>(scale);
  return h;
}

void embedding_bag_backward_sgd_cuda(
    TensorList weights,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    const Tensor& grad_output,
    double learning_rate,
    double weight_decay,
    int64_t weight_decay_mode) {
  const char* op = "embedding_bag_backward_sgd_";
  const Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  check_grad_output(op, p.layout, grad_output);
  const Hyper hyper = make_hyper(op, learning_rate, 0.0, weight_decay, weight_decay_mode, 1.0);
  const Grouped g = group_by_row(op, p, indices, offsets, per_sample_weights);
  run_update<Update::kSgd>(op, p, g, grad_output, hyper);
}

void embedding_bag_backward_rowwise_adagrad_cuda(
    TensorList weights,
    TensorList momentum1,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    const Tensor& grad_output,
    double learning_rate,
    double eps,
    double weight_decay,
    int64_t weight_decay_mode) {
  const char* op = "embedding_bag_backward_rowwise_adagrad_";
  Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  attach_state(op, "momentum1", p, weights, momentum1, 0);
  check_grad_output(op, p.layout, grad_output);
  const Hyper hyper = make_hyper(op, learning_rate, eps, weight_decay, weight_decay_mode, 1.0);
  const Grouped g = group_by_row(op, p, indices, offsets, per_sample_weights);
  run_update<Update::kRowwiseAdagrad>(op, p, g, grad_output, hyper);
}

void embedding_bag_backward_momentum_scaled_rowwise_adagrad_cuda(
    TensorList weights,
    TensorList momentum_sync,
    TensorList momentum_local,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    const Tensor& grad_output,
    double learning_rate,
    double eps,
    double momentum_scale,
    double weight_decay,
    int64_t weight_decay_mode) {
  const char* op = "embedding_bag_backward_momentum_scaled_rowwise_adagrad_";
  Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  const c10::cuda::CUDAGuard guard(weights[0].device());
  attach_state(op, "momentum_sync", p, weights, momentum_sync, 0);
  attach_state(op, "momentum_local", p, weights, momentum_local, 1);
  check_grad_output(op, p.layout, grad_output);
  const Hyper hyper = make_hyper(op, learning_rate, eps, weight_decay, weight_decay_mode, momentum_scale);
  const Grouped g = group_by_row(op, p, indices, offsets, per_sample_weights);
  run_update<Update::kMomentumScaled>(op, p, g, grad_output, hyper);
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>> embedding_bag_backward_row_grad_cuda(
    TensorList weights,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    const Tensor& grad_output) {
  const char* op = "embedding_bag_backward_row_grad";
  const Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  const at::Device device = weights[0].device();
  const c10::cuda::CUDAGuard guard(device);
  check_grad_output(op, p.layout, grad_output);
  const Grouped g = group_by_row(op, p, indices, offsets, per_sample_weights);
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(device);

  // Segments are sorted by linear row, hence grouped by table: count them
  // per table, and give each its slot in one flat output.
  std::vector<int64_t> row_base;
  for (const auto& t : p.tables) {
    row_base.push_back(t.row_base);
  }
  const Tensor bases = at::tensor(row_base, at::kLong).to(device);
  const Tensor seg_table = at::searchsorted(bases, g.unique_keys, /*out_int32=*/false, /*right=*/true) - 1;
  const Tensor per_table = at::bincount(seg_table, {}, static_cast<int64_t>(p.tables.size())).cpu();
  std::vector<int64_t> dims;
  for (const auto& t : p.tables) {
    dims.push_back(t.dim);
  }
  const Tensor seg_dim = at::tensor(dims, at::kLong).to(device).index_select(0, seg_table);
  Tensor flat_offset = at::zeros({g.num_segments + 1}, long_opts);
  if (g.num_segments > 0) {
    flat_offset.slice(0, 1).copy_(at::cumsum(seg_dim, 0));
  }
  const int64_t total = g.num_segments > 0 ? flat_offset[-1].item<int64_t>() : 0;
  Tensor flat = at::empty({total}, grad_output.options());
  run_update<Update::kRowGrad>(op, p, g, grad_output, Hyper{}, flat.mutable_data_ptr<float>(), flat_offset.const_data_ptr<int64_t>());

  std::vector<Tensor> row_ids, row_grads;
  int64_t seg = 0, elem = 0;
  for (size_t t = 0; t < p.tables.size(); ++t) {
    const int64_t count = per_table.const_data_ptr<int64_t>()[t];
    row_ids.push_back(g.unique_keys.slice(0, seg, seg + count) - p.tables[t].row_base);
    // Own storage per table: the op's outputs must not alias each other.
    row_grads.push_back(flat.slice(0, elem, elem + count * p.tables[t].dim).view({count, p.tables[t].dim}).clone());
    seg += count;
    elem += count * p.tables[t].dim;
  }
  return {std::move(row_ids), std::move(row_grads)};
}

// out[p] = scale(bag) * <row_p, grad of p's bag>: one warp per bag.
template <typename I, typename W>
__global__ void __launch_bounds__(kBlock) per_sample_weights_grad_kernel(
    const __grid_constant__ Meta meta,
    int64_t num_bags,
    int64_t batch,
    const I* __restrict__ indices,
    const I* __restrict__ offsets,
    const float* __restrict__ grad_output,
    int64_t out_dim,
    float* __restrict__ out) {
  const int64_t bag = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bag >= num_bags) {
    return;
  }
  const int64_t feature = bag / batch;
  const int64_t sample = bag - feature * batch;
  const FeatureMeta fm = feature_meta(meta, feature);
  const TableMeta tm = table_meta(meta, fm.table);
  const int64_t start = static_cast<int64_t>(offsets[bag]);
  const int64_t end = static_cast<int64_t>(offsets[bag + 1]);
  const float scale = (fm.pooling == 1 && end > start) ? 1.0f / static_cast<float>(end - start) : 1.0f;
  const float* g = grad_output + sample * out_dim + fm.column;
  const W* weights = static_cast<const W*>(tm.weights);
  for (int64_t p = start; p < end; ++p) {
    const W* row = weights + static_cast<int64_t>(indices[p]) * tm.dim;
    float dot = 0.0f;
    for (int64_t d = lane; d < tm.dim; d += kWarp) {
      dot = fmaf(static_cast<float>(row[d]), g[d], dot);
    }
    dot = warp_sum(dot);
    if (lane == 0) {
      out[p] = scale * dot;
    }
  }
}

Tensor embedding_bag_per_sample_weights_grad_cuda(
    TensorList weights,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const Tensor& grad_output) {
  const char* op = "embedding_bag_per_sample_weights_grad";
  const Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, std::nullopt);
  const at::Device device = weights[0].device();
  const c10::cuda::CUDAGuard guard(device);
  check_grad_output(op, p.layout, grad_output);
  const KernelMeta k = make_meta(p, device);
  // Validate ids and offsets before reading rows.
  {
    Tensor errors = new_errors(device);
    linearize<int32_t>(op, p, k.meta, indices, offsets, nullptr, nullptr, nullptr, errors);
    int64_t e[kNumErrorWords];
    read_words(errors, e, kNumErrorWords);
    raise_if_errors(op, p, e, indices, offsets);
  }
  Tensor out = at::empty({p.num_indices}, grad_output.options());
  const int64_t num_bags = offsets.numel() - 1;
  if (num_bags > 0) {
    dispatch_index(p.int32_indices, [&](auto index_tag) {
      using I = decltype(index_tag);
      dispatch_weight(p.weight_dtype, [&](auto weight_tag) {
        using W = decltype(weight_tag);
        per_sample_weights_grad_kernel<I, W><<<blocks_for(num_bags * kWarp, kBlock), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            k.meta,
            num_bags,
            p.batch,
            indices.const_data_ptr<I>(),
            offsets.const_data_ptr<I>(),
            grad_output.const_data_ptr<float>(),
            p.out_dim,
            out.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(dist_rec, CUDA, m) {
  m.impl("embedding_bag_forward", &embedding_bag_forward_cuda);
  m.impl("embedding_bag_backward_sgd_", &embedding_bag_backward_sgd_cuda);
  m.impl("embedding_bag_backward_rowwise_adagrad_", &embedding_bag_backward_rowwise_adagrad_cuda);
  m.impl(
      "embedding_bag_backward_momentum_scaled_rowwise_adagrad_",
      &embedding_bag_backward_momentum_scaled_rowwise_adagrad_cuda);
  m.impl("embedding_bag_backward_row_grad", &embedding_bag_backward_row_grad_cuda);
  m.impl("embedding_bag_per_sample_weights_grad", &embedding_bag_per_sample_weights_grad_cuda);
}

} // namespace dist_rec
