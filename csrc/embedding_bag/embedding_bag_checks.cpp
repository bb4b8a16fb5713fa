#include "embedding_bag/embedding_bag_checks.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "dist_rec/checks.h"

namespace dist_rec {

using at::Tensor;

namespace {

void check_on(const char* op, const char* name, const Tensor& t, const at::Device& device) {
  DIST_REC_CHECK_VALUE(op, t.device() == device, name, " must be on ", device, " like the weights; it is on ", t.device());
}

} // namespace

BagLayout check_bag_layout(
    const char* op,
    at::TensorList weights,
    c10::IntArrayRef feature_table,
    c10::IntArrayRef feature_pooling,
    c10::IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& maybe_per_sample_weights) {
  BagLayout layout;
  layout.num_tables = static_cast<int64_t>(weights.size());
  DIST_REC_CHECK_VALUE(op, layout.num_tables > 0, "weights must hold at least one table");
  layout.device = weights[0].device();
  layout.weight_dtype = weights[0].scalar_type();
  DIST_REC_CHECK_TYPE(
      op,
      layout.weight_dtype == at::kFloat || layout.weight_dtype == at::kHalf || layout.weight_dtype == at::kBFloat16,
      "weights must be float32, float16 or bfloat16; got ",
      layout.weight_dtype);
  for (int64_t t = 0; t < layout.num_tables; ++t) {
    const Tensor& w = weights[t];
    DIST_REC_CHECK_VALUE(
        op, w.device() == layout.device, "weights[", t, "] is on ", w.device(), " but weights[0] on ", layout.device);
    DIST_REC_CHECK_VALUE(op, w.dim() == 2, "weights[", t, "] must be 2-D [rows, dim]; it has shape ", w.sizes());
    DIST_REC_CHECK_VALUE(op, w.is_contiguous(), "weights[", t, "] must be contiguous");
    DIST_REC_CHECK_TYPE(
        op,
        w.scalar_type() == layout.weight_dtype,
        "all weights must share one dtype; weights[0] is ",
        layout.weight_dtype,
        " but weights[",
        t,
        "] is ",
        w.scalar_type());
    DIST_REC_CHECK_VALUE(op, w.size(1) > 0, "weights[", t, "] has embedding dim 0");
    layout.max_dim = std::max(layout.max_dim, w.size(1));
  }

  layout.num_features = static_cast<int64_t>(feature_table.size());
  DIST_REC_CHECK_VALUE(op, layout.num_features > 0, "feature_table must name at least one feature slot");
  DIST_REC_CHECK_VALUE(
      op,
      static_cast<int64_t>(feature_pooling.size()) == layout.num_features &&
          static_cast<int64_t>(feature_column.size()) == layout.num_features,
      "feature_table, feature_pooling and feature_column must have one entry per feature slot; got lengths ",
      layout.num_features,
      ", ",
      feature_pooling.size(),
      ", ",
      feature_column.size());
  std::vector<std::pair<int64_t, int64_t>> column_ranges;
  for (int64_t f = 0; f < layout.num_features; ++f) {
    const int64_t t = feature_table[f];
    DIST_REC_CHECK_INDEX(
        op,
        t >= 0 && t < layout.num_tables,
        "feature slot ",
        f,
        " maps to table ",
        t,
        "; must be in [0, ",
        layout.num_tables,
        ")");
    const int64_t pooling = feature_pooling[f];
    DIST_REC_CHECK_VALUE(
        op, pooling == 0 || pooling == 1, "feature slot ", f, " has pooling ", pooling, "; must be 0 (sum) or 1 (mean)");
    const int64_t dim = weights[t].size(1);
    column_ranges.emplace_back(feature_column[f], dim);
    layout.out_dim += dim;
  }
  std::sort(column_ranges.begin(), column_ranges.end());
  int64_t expected_column = 0;
  for (const auto& [column, dim] : column_ranges) {
    DIST_REC_CHECK_VALUE(
        op,
        column == expected_column,
        "feature_column must tile the output columns [0, ",
        layout.out_dim,
        ") without gaps or overlaps; expected a slot starting at column ",
        expected_column,
        ", found ",
        column);
    expected_column += dim;
  }

  check_on(op, "indices", indices, layout.device);
  check_on(op, "offsets", offsets, layout.device);
  DIST_REC_CHECK_DIM(op, indices, 1);
  DIST_REC_CHECK_DIM(op, offsets, 1);
  DIST_REC_CHECK_TYPE(
      op,
      indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
      "indices must be int32 or int64; got ",
      indices.scalar_type());
  DIST_REC_CHECK_TYPE(
      op,
      offsets.scalar_type() == indices.scalar_type(),
      "offsets must have the dtype of indices (",
      indices.scalar_type(),
      "); got ",
      offsets.scalar_type());
  DIST_REC_CHECK_CONTIGUOUS(op, indices);
  DIST_REC_CHECK_CONTIGUOUS(op, offsets);
  DIST_REC_CHECK_VALUE(
      op,
      offsets.numel() >= 1 && (offsets.numel() - 1) % layout.num_features == 0,
      "offsets must have F*B+1 elements for F=",
      layout.num_features,
      " feature slots; it has ",
      offsets.numel());
  layout.batch = (offsets.numel() - 1) / layout.num_features;
  layout.num_indices = indices.numel();
  layout.int32_indices = indices.scalar_type() == at::kInt;

  if (maybe_per_sample_weights.has_value()) {
    const Tensor& per_sample_weights = *maybe_per_sample_weights;
    check_on(op, "per_sample_weights", per_sample_weights, layout.device);
    DIST_REC_CHECK_DTYPE(op, per_sample_weights, at::kFloat);
    DIST_REC_CHECK_DIM(op, per_sample_weights, 1);
    DIST_REC_CHECK_CONTIGUOUS(op, per_sample_weights);
    DIST_REC_CHECK_VALUE(
        op,
        per_sample_weights.numel() == layout.num_indices,
        "per_sample_weights must have one weight per index (",
        layout.num_indices,
        "); it has ",
        per_sample_weights.numel());
  }
  return layout;
}

void check_grad_output(const char* op, const BagLayout& layout, const Tensor& grad_output) {
  check_on(op, "grad_output", grad_output, layout.device);
  DIST_REC_CHECK_DTYPE(op, grad_output, at::kFloat);
  DIST_REC_CHECK_CONTIGUOUS(op, grad_output);
  DIST_REC_CHECK_VALUE(
      op,
      grad_output.dim() == 2 && grad_output.size(0) == layout.batch && grad_output.size(1) == layout.out_dim,
      "grad_output must have shape [",
      layout.batch,
      ", ",
      layout.out_dim,
      "]; it has shape ",
      grad_output.sizes());
}

void check_row_state(const char* op, const char* name, at::TensorList weights, at::TensorList state) {
  DIST_REC_CHECK_VALUE(
      op,
      state.size() == weights.size(),
      name,
      " must hold one tensor per table (",
      weights.size(),
      "); it holds ",
      state.size());
  for (size_t t = 0; t < state.size(); ++t) {
    const Tensor& s = state[t];
    DIST_REC_CHECK_VALUE(op, s.device() == weights[t].device(), name, "[", t, "] must be on ", weights[t].device());
    DIST_REC_CHECK_TYPE(op, s.scalar_type() == at::kFloat, name, "[", t, "] must be float32; it is ", s.scalar_type());
    DIST_REC_CHECK_VALUE(
        op,
        s.is_contiguous() && s.numel() == weights[t].size(0),
        name,
        "[",
        t,
        "] must be a contiguous tensor with one value per row (",
        weights[t].size(0),
        "); it has shape ",
        s.sizes());
  }
}

void check_weight_decay_mode(const char* op, int64_t mode) {
  DIST_REC_CHECK_VALUE(
      op, mode >= 0 && mode <= 2, "weight_decay_mode must be 0 (none), 1 (L2) or 2 (decoupled); got ", mode);
}

void throw_id_out_of_range(
    const char* op,
    int64_t position,
    int64_t id,
    int64_t bag,
    int64_t batch,
    int64_t table,
    int64_t rows) {
  const int64_t feature = batch > 0 ? bag / batch : 0;
  C10_THROW_ERROR(
      IndexError,
      c10::str(
          op,
          ": id ",
          id,
          " at indices[",
          position,
          "] (feature slot ",
          feature,
          ", sample ",
          bag - feature * batch,
          ") is out of range for table ",
          table,
          " with ",
          rows,
          " rows; ids must be in [0, ",
          rows,
          ")"));
}

} // namespace dist_rec
