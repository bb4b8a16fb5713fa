// Plain-data interface between the op layer (which knows torch) and the
// ISA-specific inner loops (which must not: they are compiled once per
// instruction set, and any inline function shared with the rest of the
// extension could be merged by the linker into its AVX-512 copy and then
// crash on an older CPU). Only POD structs and function pointers cross here.
//
// Shape legend: B batch, F features, T tables, N total indices,
// U unique touched rows, D embedding dim.
#pragma once

#include <cstdint>

namespace dist_rec::cpu {

enum class WeightType : int32_t { kFloat = 0, kHalf = 1, kBFloat16 = 2 };
enum class PoolingMode : int32_t { kSum = 0, kMean = 1 };
enum class WeightDecayMode : int32_t { kNone = 0, kL2 = 1, kDecoupled = 2 };

struct TableView {
  void* weights; // [rows, dim] row-major, element type = WeightType
  int64_t rows;
  int64_t dim;
  float* state0; // optimizer state per row (momentum1 / m_sync), may be null
  float* state1; // second per-row state (local increment), may be null
};

struct FeatureView {
  int32_t table;
  int32_t pooling; // PoolingMode
  int64_t out_col; // first column of this feature in the pooled output
};

// Forward pooled lookup over bags [bag_begin, bag_end) of the flattened
// (feature-major) bag list. Returns -1, or the first index position whose id
// is out of its table's range (nothing is read from such a row).
struct ForwardArgs {
  const TableView* tables;
  const FeatureView* features;
  int64_t batch; // B: bags per feature
  const void* indices; // [N], int32 or int64 (offsets share the type)
  const void* offsets; // [F*B+1]
  const float* per_sample_weights; // [N] or null
  float* out; // [B, out_dim]
  int64_t out_dim;
  WeightType weight_type;
};

// The touched rows of a batch after its ids were sorted by row: segment s is
// one unique row, and its occurrences are [occ_begin[s], occ_begin[s+1]) of
// the occurrence arrays (in index-position order within the segment).
struct SegmentArgs {
  const TableView* tables;
  // By segment index: a table's segments run from its first occurrence's
  // index on (gaps between tables), and occ_begin of the index after a
  // table's last segment is where its occurrences end.
  const int32_t* seg_table;
  const int64_t* seg_row;
  const int64_t* occ_begin;
  int64_t num_occurrences; // N
  const int64_t* occ_grad_offset; // [N] where the occurrence's bag gradient starts in grad_output
  const float* occ_scale; // [N] per-sample weight x 1/L, or null (all ones)
  // float32 grad_output [B, out_dim] laid out feature by feature: feature
  // f's columns as a [B, D_f] block from B x its first column.
  const float* grad_output;
  WeightType weight_type;
  // Optimizer hyper-parameters (unused ones ignored).
  float learning_rate;
  float eps;
  float weight_decay;
  WeightDecayMode weight_decay_mode;
  float momentum_scale; // s of momentum-scaled row-wise AdaGrad
  // Row-gradient output: segment s writes its summed gradient to
  // row_grad_out[s] (a pointer to a [D] slot per segment index).
  float* const* row_grad_out;
};

// Gradient w.r.t. per-sample weights: out[p] = scale(bag) * <row_p, grad_bag>.
struct PerSampleWeightGradArgs {
  const TableView* tables;
  const FeatureView* features;
  int64_t batch;
  const void* indices;
  const void* offsets;
  const float* grad_output;
  int64_t out_dim;
  float* out; // [N]
  WeightType weight_type;
};

// grad_output [B, out_dim] copied into its feature blocks (see
// SegmentArgs::grad_output), or only read when blocks is null.
struct GradBlockArgs {
  const TableView* tables;
  const FeatureView* features;
  int64_t num_features;
  int64_t batch;
  const float* grad_output;
  int64_t out_dim;
  float* blocks; // [B * out_dim], or null
};

struct KernelTable {
  const char* isa_name;
  int64_t (*forward_i32)(const ForwardArgs&, int64_t bag_begin, int64_t bag_end);
  int64_t (*forward_i64)(const ForwardArgs&, int64_t bag_begin, int64_t bag_end);
  // Without the id range check: only for measuring what the check costs.
  int64_t (*forward_unchecked_i32)(const ForwardArgs&, int64_t bag_begin, int64_t bag_end);
  int64_t (*forward_unchecked_i64)(const ForwardArgs&, int64_t bag_begin, int64_t bag_end);
  // The backward's kernels take segments [seg_begin, seg_end) of one table.
  void (*update_sgd)(const SegmentArgs&, int64_t seg_begin, int64_t seg_end);
  void (*update_rowwise_adagrad)(const SegmentArgs&, int64_t seg_begin, int64_t seg_end);
  void (*update_momentum_scaled_rowwise_adagrad)(
      const SegmentArgs&,
      int64_t seg_begin,
      int64_t seg_end);
  void (*sum_row_grads)(const SegmentArgs&, int64_t seg_begin, int64_t seg_end);
  void (*per_sample_weight_grad_i32)(
      const PerSampleWeightGradArgs&,
      int64_t bag_begin,
      int64_t bag_end);
  void (*per_sample_weight_grad_i64)(
      const PerSampleWeightGradArgs&,
      int64_t bag_begin,
      int64_t bag_end);
  // Samples [sample_begin, sample_end) of GradBlockArgs; returns false when
  // a value read is NaN or inf.
  bool (*block_grad_by_feature)(const GradBlockArgs&, int64_t sample_begin, int64_t sample_end);
};

// Each is defined in its own translation unit, compiled for that ISA.
const KernelTable& scalar_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();

// The best table this CPU can run, unless DIST_REC_CPU_ISA (scalar | avx2 |
// avx512) asks for a lesser one. Defined in dispatch.cpp.
const KernelTable& active_kernels();
// active_kernels() unless the _set_cpu_isa test hook chose another (every
// op family with per-ISA builds follows this choice). Defined in
// embedding_bag_cpu.cpp.
const KernelTable& current_kernels();
// Lists the ISAs this CPU supports, best first.
int supported_isas(const KernelTable** out, int max_out);

} // namespace dist_rec::cpu
