// CUDA implementations of the pooled-embedding ops (schemas in
// embedding_bag_ops.cpp; CPU twin in embedding_bag_cpu.cpp). Semantics are
// the CPU ones exactly; docs/kernels.md describes them.
//
// Forward: one warp per bag, 16-byte row loads, sub-warp groups pooling
// different rows of the bag when a row is narrower than a warp, no atomics.
// Backward: linearise (table base + id), stable radix sort of (row,
// position), one warp per unique row summing its occurrences in position
// order (long segments of hot rows are first summed in fixed pieces, then the
// pieces in order), then the optimizer on the row in place. Deterministic.
//
// Bad input never reaches a device assert: kernels record the first bad
// position in a small device buffer, which the host reads (one sync) and
// turns into the same exception the CPU path raises.
//
// Shape legend: B batch, F feature slots, T tables, N indices, U unique rows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "dist_rec/checks.h"
#include "embedding_bag/embedding_bag_checks.h"

namespace dist_rec {
namespace {

using at::Tensor;
using at::TensorList;
using c10::IntArrayRef;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
// Occurrences of one row summed by a single warp; longer segments (hot rows)
// are split into pieces of this many, summed in parallel, then in order.
constexpr int64_t kPieceOccurrences = 64;
// Column chunks one lane keeps in registers in the backward: rows up to
// kWarp * vec * kMaxChunks wide (1024 floats for float32).
constexpr int kMaxChunks = 8;
constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();

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
__device__ __forceinline__ void load_row(const W* row, float* out);

template <>
__device__ __forceinline__ void load_row<float, 4>(const float* row, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(row);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}
template <>
__device__ __forceinline__ void load_row<float, 2>(const float* row, float* out) {
  const float2 v = *reinterpret_cast<const float2*>(row);
  out[0] = v.x, out[1] = v.y;
}
template <>
__device__ __forceinline__ void load_row<float, 1>(const float* row, float* out) {
  out[0] = *row;
}

template <typename H, int VEC>
__device__ __forceinline__ void load_row_16bit(const H* row, float* out) {
  if constexpr (VEC == 8) {
    const uint4 raw = *reinterpret_cast<const uint4*>(row);
    const H* h = reinterpret_cast<const H*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      out[i] = static_cast<float>(h[i]);
    }
  } else if constexpr (VEC == 4) {
    const uint2 raw = *reinterpret_cast<const uint2*>(row);
    const H* h = reinterpret_cast<const H*>(&raw);
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

template <>
__device__ __forceinline__ void load_row<at::Half, 8>(const at::Half* row, float* out) {
  load_row_16bit<at::Half, 8>(row, out);
}
template <>
__device__ __forceinline__ void load_row<at::Half, 4>(const at::Half* row, float* out) {
  load_row_16bit<at::Half, 4>(row, out);
}
template <>
__device__ __forceinline__ void load_row<at::Half, 2>(const at::Half* row, float* out) {
  load_row_16bit<at::Half, 2>(row, out);
}
template <>
__device__ __forceinline__ void load_row<at::Half, 1>(const at::Half* row, float* out) {
  load_row_16bit<at::Half, 1>(row, out);
}
template <>
__device__ __forceinline__ void load_row<at::BFloat16, 8>(const at::BFloat16* row, float* out) {
  load_row_16bit<at::BFloat16, 8>(row, out);
}
template <>
__device__ __forceinline__ void load_row<at::BFloat16, 4>(const at::BFloat16* row, float* out) {
  load_row_16bit<at::BFloat16, 4>(row, out);
}
template <>
__device__ __forceinline__ void load_row<at::BFloat16, 2>(const at::BFloat16* row, float* out) {
  load_row_16bit<at::BFloat16, 2>(row, out);
}
template <>
__device__ __forceinline__ void load_row<at::BFloat16, 1>(const at::BFloat16* row, float* out) {
  load_row_16bit<at::BFloat16, 1>(row, out);
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

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ __forceinline__ void record_min(int64_t* slot, int64_t value) {
  atomicMin(reinterpret_cast<unsigned long long*>(slot), static_cast<unsigned long long>(value));
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

// errors[0]: first index position with an out-of-range id; errors[1]: first
// bag whose offsets decrease or pass N (kNoError when none).
template <typename I, typename W, int VEC>
__global__ void forward_kernel(
    const TableMeta* __restrict__ tables,
    const FeatureMeta* __restrict__ features,
    int64_t num_bags,
    int64_t batch,
    const I* __restrict__ indices,
    const I* __restrict__ offsets,
    int64_t num_indices,
    const float* __restrict__ per_sample_weights,
    float* __restrict__ out,
    int64_t out_dim,
    int64_t* __restrict__ errors) {
  const int64_t bag = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bag >= num_bags) {
    return;
  }
  const int64_t feature = bag / batch;
  const int64_t sample = bag - feature * batch;
  const FeatureMeta fm = features[feature];
  const TableMeta tm = tables[fm.table];
  const int64_t start = static_cast<int64_t>(offsets[bag]);
  const int64_t end = static_cast<int64_t>(offsets[bag + 1]);
  if (start > end || end > num_indices || start < 0) {
    if (lane == 0) {
      record_min(errors + 1, bag);
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
  // Column chunks of lanes * VEC elements; each group pools rows
  // start + group, start + group + groups, ...
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
          record_min(errors, p);
        }
        continue;
      }
      if (col < dim) {
        float x[VEC];
        load_row<W, VEC>(weights + id * dim + col, x);
        const float w = per_sample_weights != nullptr ? per_sample_weights[p] : 1.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          acc[i] = fmaf(w, x[i], acc[i]);
        }
      }
    }
    // Sum the groups' partial sums (fixed order: deterministic).
    for (int offset = lanes; offset < kWarp; offset *= 2) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], offset);
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

// Checks ids and offsets, and linearises each position for the backward:
// keys[p] = row_base(table) + id, grad_offset[p] = where its bag's gradient
// starts, scale[p] = per-sample weight x 1/L (mean). One thread per bag.
template <typename I>
__global__ void linearize_kernel(
    const TableMeta* __restrict__ tables,
    const FeatureMeta* __restrict__ features,
    int64_t num_bags,
    int64_t batch,
    const I* __restrict__ indices,
    const I* __restrict__ offsets,
    int64_t num_indices,
    const float* __restrict__ per_sample_weights,
    int64_t out_dim,
    int64_t* __restrict__ keys,
    int64_t* __restrict__ grad_offset,
    float* __restrict__ scale,
    int64_t* __restrict__ errors) {
  const int64_t bag = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bag >= num_bags) {
    return;
  }
  const int64_t start = static_cast<int64_t>(offsets[bag]);
  const int64_t end = static_cast<int64_t>(offsets[bag + 1]);
  if (start > end || end > num_indices || start < 0) {
    record_min(errors + 1, bag);
    return;
  }
  const int64_t feature = bag / batch;
  const int64_t sample = bag - feature * batch;
  const FeatureMeta fm = features[feature];
  const TableMeta tm = tables[fm.table];
  const float bag_scale = (fm.pooling == 1 && end > start) ? 1.0f / static_cast<float>(end - start) : 1.0f;
  for (int64_t p = start; p < end; ++p) {
    const int64_t id = static_cast<int64_t>(indices[p]);
    if (id < 0 || id >= tm.rows) {
      record_min(errors, p);
      keys[p] = 0;
    } else {
      keys[p] = tm.row_base + id;
    }
    grad_offset[p] = sample * out_dim + fm.column;
    scale[p] = per_sample_weights != nullptr ? per_sample_weights[p] * bag_scale : bag_scale;
  }
}

// ---------------------------------------------------------------------------
// Error reporting (host side, after the kernel that filled `errors`)
// ---------------------------------------------------------------------------

template <typename I>
void raise_if_errors(const char* op, const Problem& p, const Tensor& errors, const Tensor& indices, const Tensor& offsets) {
  // Also checks offsets[0] == 0 and offsets[-1] == N (two scalars, same sync).
  const Tensor ends = at::stack({offsets[0].to(at::kLong), offsets[-1].to(at::kLong)});
  const Tensor host = at::cat({errors, ends}).cpu();
  const int64_t* e = host.const_data_ptr<int64_t>();
  DIST_REC_CHECK_VALUE(op, e[2] == 0, "offsets[0] must be 0; it is ", e[2]);
  if (e[1] != kNoError) {
    const Tensor pair = offsets.slice(0, e[1], e[1] + 2).to(at::kLong).cpu();
    const int64_t feature = p.batch > 0 ? e[1] / p.batch : 0;
    DIST_REC_CHECK_VALUE(
        op,
        false,
        "offsets must be non-decreasing and within len(indices)=",
        p.num_indices,
        ", but offsets[",
        e[1],
        "]=",
        pair.const_data_ptr<int64_t>()[0],
        ", offsets[",
        e[1] + 1,
        "]=",
        pair.const_data_ptr<int64_t>()[1],
        " (bag of feature slot ",
        feature,
        ", sample ",
        e[1] - feature * p.batch,
        ")");
  }
  DIST_REC_CHECK_VALUE(
      op, e[3] == p.num_indices, "offsets must end at len(indices)=", p.num_indices, "; offsets[-1]=", e[3]);
  if (e[0] != kNoError) {
    const int64_t pos = e[0];
    const Tensor host_offsets = offsets.to(at::kLong).cpu();
    const int64_t* o = host_offsets.const_data_ptr<int64_t>();
    const int64_t num_bags = host_offsets.numel() - 1;
    const int64_t bag = std::upper_bound(o, o + num_bags + 1, pos) - o - 1;
    const int64_t table = p.features[bag / p.batch].table;
    throw_id_out_of_range(op, pos, indices[pos].item<int64_t>(), bag, p.batch, table, p.tables[table].rows);
  }
}

void raise_if_errors_any(const char* op, const Problem& p, const Tensor& errors, const Tensor& indices, const Tensor& offsets) {
  if (p.int32_indices) {
    raise_if_errors<int32_t>(op, p, errors, indices, offsets);
  } else {
    raise_if_errors<int64_t>(op, p, errors, indices, offsets);
  }
}

Tensor new_errors(const at::Device& device) {
  return at::full({2}, kNoError, at::TensorOptions().dtype(at::kLong).device(device));
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
  Tensor errors = new_errors(device);
  if (num_bags > 0) {
    const Tensor tables = to_device(p.tables, device);
    const Tensor features = to_device(p.features, device);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const float* psw = per_sample_weights.has_value() ? per_sample_weights->const_data_ptr<float>() : nullptr;
    dispatch_index(p.int32_indices, [&](auto index_tag) {
      using I = decltype(index_tag);
      dispatch_weight(p.weight_dtype, [&](auto weight_tag) {
        using W = decltype(weight_tag);
        dispatch_vec<W>(p.vec, [&](auto vec_tag) {
          constexpr int VEC = decltype(vec_tag)::value;
          forward_kernel<I, W, VEC><<<blocks_for(num_bags * kWarp, kWarp * kWarpsPerBlock), kWarp * kWarpsPerBlock, 0, stream>>>(
              reinterpret_cast<const TableMeta*>(tables.const_data_ptr()),
              reinterpret_cast<const FeatureMeta*>(features.const_data_ptr()),
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
        });
      });
    });
  }
  raise_if_errors_any(op, p, errors, indices, offsets);
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
  Tensor grad_offset; // [N] int64: where each occurrence's bag gradient starts, in row order
  Tensor scale; // [N] float: its per-sample weight x 1/L, in row order
  Tensor unique_keys; // [U] int64
  Tensor seg_start; // [U+1] int64
  Tensor piece_base; // [U+1] int64: pieces of long segments before segment s
  Tensor tables; // the problem's TableMeta records on the device
  int64_t num_segments = 0;
  int64_t num_pieces = 0;
};

__global__ void piece_counts_kernel(const int64_t* __restrict__ seg_start, int64_t num_segments, int64_t* __restrict__ pieces) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < num_segments) {
    const int64_t count = seg_start[s + 1] - seg_start[s];
    pieces[s] = count > kPieceOccurrences ? (count + kPieceOccurrences - 1) / kPieceOccurrences : 0;
  }
}

Grouped group_by_row(const char* op, const Problem& p, const Tensor& indices, const Tensor& offsets, const std::optional<Tensor>& psw) {
  const at::Device device = indices.device();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = p.num_indices;
  DIST_REC_CHECK_VALUE(op, n < (int64_t{1} << 31), "a batch may hold at most 2^31 - 1 indices; got ", n);
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(device);
  Tensor keys = at::empty({n}, long_opts);
  Grouped g;
  g.grad_offset = at::empty({n}, long_opts);
  g.scale = at::empty({n}, long_opts.dtype(at::kFloat));
  Tensor errors = new_errors(device);
  const int64_t num_bags = offsets.numel() - 1;
  g.tables = to_device(p.tables, device);
  const Tensor& tables = g.tables;
  const Tensor features = to_device(p.features, device);
  if (num_bags > 0) {
    dispatch_index(p.int32_indices, [&](auto index_tag) {
      using I = decltype(index_tag);
      linearize_kernel<I><<<blocks_for(num_bags, 256), 256, 0, stream>>>(
          reinterpret_cast<const TableMeta*>(tables.const_data_ptr()),
          reinterpret_cast<const FeatureMeta*>(features.const_data_ptr()),
          num_bags,
          p.batch,
          indices.const_data_ptr<I>(),
          offsets.const_data_ptr<I>(),
          n,
          psw.has_value() ? psw->const_data_ptr<float>() : nullptr,
          p.out_dim,
          keys.mutable_data_ptr<int64_t>(),
          g.grad_offset.mutable_data_ptr<int64_t>(),
          g.scale.mutable_data_ptr<float>(),
          errors.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  raise_if_errors_any(op, p, errors, indices, offsets);

  // Stable sort by row (a radix sort inside torch): a row's occurrences
  // become adjacent, in position order; the permutation is their positions.
  // 32-bit keys when the rows allow: half the radix passes.
  const bool narrow = p.total_rows < (int64_t{1} << 31);
  auto [sorted_keys, sorted_positions] =
      at::sort(narrow ? keys.to(at::kInt) : keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  // The kernels walk occurrences in row order: lay their gradient offsets
  // and weights out that way.
  g.grad_offset = g.grad_offset.index_select(0, sorted_positions);
  g.scale = g.scale.index_select(0, sorted_positions);
  auto [unique_keys_narrow, inverse, counts] =
      at::unique_consecutive(sorted_keys, /*return_inverse=*/false, /*return_counts=*/true);
  const Tensor unique_keys = unique_keys_narrow.to(at::kLong);
  g.unique_keys = unique_keys;
  g.num_segments = unique_keys.numel();
  g.seg_start = at::zeros({g.num_segments + 1}, long_opts);
  if (g.num_segments > 0) {
    g.seg_start.slice(0, 1).copy_(at::cumsum(counts, 0));
  }
  Tensor pieces = at::zeros({g.num_segments}, long_opts);
  if (g.num_segments > 0) {
    piece_counts_kernel<<<blocks_for(g.num_segments, 256), 256, 0, stream>>>(
        g.seg_start.const_data_ptr<int64_t>(), g.num_segments, pieces.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  g.piece_base = at::zeros({g.num_segments + 1}, long_opts);
  if (g.num_segments > 0) {
    g.piece_base.slice(0, 1).copy_(at::cumsum(pieces, 0));
    g.num_pieces = g.piece_base[-1].item<int64_t>();
  }
  return g;
}

// The table of linear row `key` (tables are few: a linear scan of the
// cached metadata is cheap next to the row traffic).
__device__ __forceinline__ int64_t table_of(const TableMeta* tables, int64_t num_tables, int64_t key) {
  int64_t lo = 0, hi = num_tables - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tables[mid].row_base <= key) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Sums occurrences [begin, end) of columns [col, col + VEC) into acc. The
// occurrence arrays are in sorted (row) order, so they are read in sequence.
template <int VEC>
__device__ __forceinline__ void sum_occurrences(
    const int64_t* __restrict__ occ_grad_offset,
    const float* __restrict__ occ_scale,
    const float* __restrict__ grad_output,
    int64_t begin,
    int64_t end,
    int64_t col,
    float* acc) {
  for (int64_t i = begin; i < end; ++i) {
    const float* src = grad_output + occ_grad_offset[i] + col;
    const float w = occ_scale[i];
    float x[VEC];
    if constexpr (VEC % 4 == 0) {
#pragma unroll
      for (int k = 0; k < VEC; k += 4) {
        const float4 v = *reinterpret_cast<const float4*>(src + k);
        x[k] = v.x, x[k + 1] = v.y, x[k + 2] = v.z, x[k + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        x[k] = src[k];
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc[k] = fmaf(w, x[k], acc[k]);
    }
  }
}

// One warp per piece of a long segment: partial[q, 0:dim] = sum of its
// occurrences, in position order.
template <int VEC>
__global__ void piece_sum_kernel(
    const TableMeta* __restrict__ tables,
    int64_t num_tables,
    const int64_t* __restrict__ unique_keys,
    const int64_t* __restrict__ seg_start,
    const int64_t* __restrict__ piece_base,
    int64_t num_segments,
    int64_t num_pieces,
    const int64_t* __restrict__ occ_grad_offset,
    const float* __restrict__ occ_scale,
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
  const int64_t dim = tables[table_of(tables, num_tables, unique_keys[s])].dim;
  const int64_t begin = seg_start[s] + (q - piece_base[s]) * kPieceOccurrences;
  const int64_t piece_end = begin + kPieceOccurrences;
  const int64_t end = piece_end < seg_start[s + 1] ? piece_end : seg_start[s + 1];
  for (int64_t col = static_cast<int64_t>(lane) * VEC; col < dim; col += kWarp * VEC) {
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc[k] = 0.0f;
    }
    sum_occurrences<VEC>(occ_grad_offset, occ_scale, grad_output, begin, end, col, acc);
    store_floats<VEC>(partials + q * partial_stride + col, acc);
  }
}

// One warp per unique row: its summed gradient (from occurrences, or from
// its pieces in order), then the update. Each lane owns columns
// lane*VEC + k*32*VEC, k < kMaxChunks.
template <typename W, int VEC, int CHUNKS, Update kUpdate>
__global__ void update_kernel(
    const TableMeta* __restrict__ tables,
    int64_t num_tables,
    const int64_t* __restrict__ unique_keys,
    const int64_t* __restrict__ seg_start,
    const int64_t* __restrict__ piece_base,
    int64_t num_segments,
    const int64_t* __restrict__ occ_grad_offset,
    const float* __restrict__ occ_scale,
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
  const int64_t t = table_of(tables, num_tables, key);
  const TableMeta tm = tables[t];
  const int64_t row = key - tm.row_base;
  const int64_t dim = tm.dim;
  const int64_t first_piece = piece_base[s];
  const int64_t pieces = piece_base[s + 1] - first_piece;

  float g[CHUNKS][VEC];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int64_t col = static_cast<int64_t>(c) * kWarp * VEC + static_cast<int64_t>(lane) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      g[c][k] = 0.0f;
    }
    if (col < dim) {
      if (pieces == 0) {
        sum_occurrences<VEC>(occ_grad_offset, occ_scale, grad_output, seg_start[s], seg_start[s + 1], col, g[c]);
      } else {
        for (int64_t q = first_piece; q < first_piece + pieces; ++q) {
          const float* src = partials + q * partial_stride + col;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            g[c][k] += src[k];
          }
        }
      }
    }
  }

  if constexpr (kUpdate == Update::kRowGrad) {
    float* dst = row_grad_out + row_grad_offset[s];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t col = static_cast<int64_t>(c) * kWarp * VEC + static_cast<int64_t>(lane) * VEC;
      if (col < dim) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dst[col + k] = g[c][k];
        }
      }
    }
    return;
  } else {
    W* w = static_cast<W*>(const_cast<void*>(tm.weights)) + row * dim;
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
        const int64_t col = static_cast<int64_t>(c) * kWarp * VEC + static_cast<int64_t>(lane) * VEC;
        if (col < dim) {
          float x[VEC];
          load_row<W, VEC>(w + col, x);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float v = l2 != 0.0f ? fmaf(l2, x[k], g[c][k]) : g[c][k];
            sum = fmaf(v, v, sum);
          }
        }
      }
      const float mean_square = warp_sum(sum) / static_cast<float>(dim);
      float accumulator;
      if constexpr (kUpdate == Update::kRowwiseAdagrad) {
        accumulator = tm.state0[row] + mean_square;
        __syncwarp();
        if (lane == 0) {
          tm.state0[row] = accumulator;
        }
      } else {
        const float increment = tm.state1[row] + mean_square;
        __syncwarp();
        if (lane == 0) {
          tm.state1[row] = increment;
        }
        accumulator = tm.state0[row] + hyper.momentum_scale * increment;
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
      const int64_t col = static_cast<int64_t>(c) * kWarp * VEC + static_cast<int64_t>(lane) * VEC;
      if (col < dim) {
        float x[VEC];
        load_row<W, VEC>(w + col, x);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float updated = correction == 1.0f ? fmaf(-multiplier, g[c][k], x[k])
                                                   : fmaf(-multiplier, g[c][k], correction * x[k]);
          w[col + k] = from_float<W>(updated);
        }
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
  const Tensor& tables = g.tables; // copied once, by group_by_row
  const int64_t num_tables = static_cast<int64_t>(p.tables.size());
  // Round the partial rows up so every piece's row stays 16-byte aligned.
  const int64_t partial_stride = (p.max_dim + 3) / 4 * 4;
  Tensor partials = at::empty({std::max<int64_t>(g.num_pieces, 1), partial_stride}, grad_output.options());
  dispatch_weight(p.weight_dtype, [&](auto weight_tag) {
    using W = decltype(weight_tag);
    dispatch_vec<W>(p.vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      // The floats of grad_output are read VEC at a time: for 16-bit tables
      // VEC may be 8 (two float4), which alignment of columns to 4 allows.
      if (g.num_pieces > 0) {
        piece_sum_kernel<VEC><<<blocks_for(g.num_pieces * kWarp, kWarp * kWarpsPerBlock), kWarp * kWarpsPerBlock, 0, stream>>>(
            reinterpret_cast<const TableMeta*>(tables.const_data_ptr()),
            num_tables,
            g.unique_keys.const_data_ptr<int64_t>(),
            g.seg_start.const_data_ptr<int64_t>(),
            g.piece_base.const_data_ptr<int64_t>(),
            g.num_segments,
            g.num_pieces,
            g.grad_offset.const_data_ptr<int64_t>(),
            g.scale.const_data_ptr<float>(),
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
        update_kernel<W, VEC, CHUNKS, kUpdate><<<blocks_for(g.num_segments * kWarp, kWarp * kWarpsPerBlock), kWarp * kWarpsPerBlock, 0, stream>>>(
            reinterpret_cast<const TableMeta*>(tables.const_data_ptr()),
            num_tables,
            g.unique_keys.const_data_ptr<int64_t>(),
            g.seg_start.const_data_ptr<int64_t>(),
            g.piece_base.const_data_ptr<int64_t>(),
            g.num_segments,
            g.grad_offset.const_data_ptr<int64_t>(),
            g.scale.const_data_ptr<float>(),
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
__global__ void per_sample_weights_grad_kernel(
    const TableMeta* __restrict__ tables,
    const FeatureMeta* __restrict__ features,
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
  const FeatureMeta fm = features[feature];
  const TableMeta tm = tables[fm.table];
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
  // Validate ids and offsets with the forward's checks before reading rows.
  {
    const Tensor tables = to_device(p.tables, device);
    const Tensor features = to_device(p.features, device);
    Tensor errors = new_errors(device);
    const int64_t num_bags = offsets.numel() - 1;
    const int64_t n = p.num_indices;
    Tensor keys = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(device));
    Tensor grad_offset = at::empty({n}, keys.options());
    Tensor scale = at::empty({n}, keys.options().dtype(at::kFloat));
    if (num_bags > 0) {
      dispatch_index(p.int32_indices, [&](auto index_tag) {
        using I = decltype(index_tag);
        linearize_kernel<I><<<blocks_for(num_bags, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
            reinterpret_cast<const TableMeta*>(tables.const_data_ptr()),
            reinterpret_cast<const FeatureMeta*>(features.const_data_ptr()),
            num_bags,
            p.batch,
            indices.const_data_ptr<I>(),
            offsets.const_data_ptr<I>(),
            n,
            nullptr,
            p.out_dim,
            keys.mutable_data_ptr<int64_t>(),
            grad_offset.mutable_data_ptr<int64_t>(),
            scale.mutable_data_ptr<float>(),
            errors.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    raise_if_errors_any(op, p, errors, indices, offsets);
  }
  Tensor out = at::empty({p.num_indices}, grad_output.options());
  const int64_t num_bags = offsets.numel() - 1;
  if (num_bags > 0) {
    const Tensor tables = to_device(p.tables, device);
    const Tensor features = to_device(p.features, device);
    dispatch_index(p.int32_indices, [&](auto index_tag) {
      using I = decltype(index_tag);
      dispatch_weight(p.weight_dtype, [&](auto weight_tag) {
        using W = decltype(weight_tag);
        per_sample_weights_grad_kernel<I, W><<<blocks_for(num_bags * kWarp, kWarp * kWarpsPerBlock), kWarp * kWarpsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            reinterpret_cast<const TableMeta*>(tables.const_data_ptr()),
            reinterpret_cast<const FeatureMeta*>(features.const_data_ptr()),
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
