// Argument checks shared by the CPU and CUDA implementations of the
// pooled-embedding ops: everything that can be judged from shapes, dtypes,
// devices and the feature layout. The contents of indices and offsets are
// checked by each implementation where the data lives.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace dist_rec {

struct BagLayout {
  int64_t num_tables = 0; // T
  int64_t num_features = 0; // F
  int64_t batch = 0; // B
  int64_t num_indices = 0; // N
  int64_t out_dim = 0; // sum of the slots' dims
  int64_t max_dim = 0;
  bool int32_indices = false;
  at::ScalarType weight_dtype = at::kFloat;
  at::Device device = at::kCPU;
};

// weights: T tables [rows, dim], one dtype (float32/16, bfloat16), one
// device; feature_table/_pooling/_column: one entry per slot, columns tiling
// [0, out_dim); indices/offsets: 1-D, int32 or int64 alike, F*B+1 offsets;
// per_sample_weights: float32 [N].
BagLayout check_bag_layout(
    const char* op,
    at::TensorList weights,
    c10::IntArrayRef feature_table,
    c10::IntArrayRef feature_pooling,
    c10::IntArrayRef feature_column,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights);

// grad_output: float32, contiguous, [B, out_dim], on the tables' device.
void check_grad_output(const char* op, const BagLayout& layout, const at::Tensor& grad_output);

// Per-row optimizer state: one float32 tensor of rows_t values per table.
void check_row_state(const char* op, const char* name, at::TensorList weights, at::TensorList state);

// 0 none, 1 L2, 2 decoupled.
void check_weight_decay_mode(const char* op, int64_t mode);

// IndexError for the out-of-range `id` at indices[position], which sits in
// (feature-major) bag `bag` of a batch of `batch` and looks up `table`.
[[noreturn]] void throw_id_out_of_range(
    const char* op,
    int64_t position,
    int64_t id,
    int64_t bag,
    int64_t batch,
    int64_t table,
    int64_t rows);

} // namespace dist_rec
