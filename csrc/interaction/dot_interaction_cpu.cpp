// DLRM's dot interaction, fused: one pass per sample instead of a batched
// matrix product, a triangle gather and a concatenation.
//
//   dense  [B, D]       the dense arch's output (vector 0 of every sample)
//   sparse [B, F * D]   the pooled embeddings, feature after feature
//                       (vectors 1 .. F); rows may be strided, columns not
//   output [B, D + P]   dense, then <v_i, v_j> for every pair i < j of the
//                       F + 1 vectors, row-major over the upper triangle
//                       (P = (F + 1) F / 2; TorchRec's and the reference's
//                       order)
//
// dot_interaction_blocks reads the pooled embeddings where a sharded lookup
// receives them instead: a flat buffer of row-major blocks [B, W_r], one per
// source rank, feature f at columns [c_f, c_f + D) of block r_f. Its
// gradient comes back in the same layout, which is the buffer the output
// all-to-all's backward sends: no concatenation into feature order in the
// forward, no split in the backward.
//
// The unfused path (torch.bmm on [B, F + 1, D]) builds the whole
// [B, F + 1, F + 1] Gram tensor and, in the backward, a zero-filled tensor
// of that size to scatter the triangle into: on a CPU those batched 27 x 16
// products run far from peak and the fresh allocations page-fault. The
// loops (interaction_impl.h) are built per ISA and chosen as the embedding
// kernels are (including the _set_cpu_isa test hook).
//
// Reference: dist_rec/ops/interaction.py (dot_interaction_reference,
// dot_interaction_blocks_reference).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "dist_rec/checks.h"
#include "embedding_bag/kernels/kernel_api.h"
#include "interaction/interaction_kernels.h"

namespace dist_rec {
namespace {

using at::Tensor;
using interaction::Shapes;

// The interaction loops of the ISA the embedding kernels run.
const interaction::Kernels& kernels() {
  const char* isa = cpu::current_kernels().isa_name;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (std::strcmp(isa, "avx512") == 0) {
    return interaction::avx512_kernels();
  }
  if (std::strcmp(isa, "avx2") == 0) {
    return interaction::avx2_kernels();
  }
#endif
  return interaction::scalar_kernels();
}

// Per-feature row offsets and strides (input and gradient), owned here;
// Shapes::layout points into them.
struct FeatureLayout {
  std::vector<int64_t> offset, stride, grad_offset, grad_stride;
};

Shapes shapes(const Tensor& dense, int64_t features, const FeatureLayout& f) {
  const int64_t vectors = features + 1;
  return Shapes{
      dense.size(0),
      dense.size(1),
      vectors,
      vectors * (vectors - 1) / 2,
      interaction::Layout{
          dense.stride(0), f.offset.data(), f.stride.data(), f.grad_offset.data(), f.grad_stride.data()}};
}

void check_dense(const char* op, const Tensor& dense) {
  DIST_REC_CHECK_CPU(op, dense);
  DIST_REC_CHECK_DIM(op, dense, 2);
  DIST_REC_CHECK_TYPE(
      op,
      dense.scalar_type() == at::kFloat || dense.scalar_type() == at::kDouble,
      "dense must be float32 or float64; it is ",
      dense.scalar_type());
  DIST_REC_CHECK_VALUE(op, dense.size(1) > 0, "dense must have at least one column; it has shape ", dense.sizes());
  DIST_REC_CHECK_VALUE(op, dense.stride(1) == 1 || dense.size(1) == 1, "dense's columns must be contiguous");
}

void check_like_dense(const char* op, const char* name, const Tensor& t, const Tensor& dense) {
  DIST_REC_CHECK_VALUE(op, t.device().is_cpu(), name, " must be a CPU tensor; it is on ", t.device());
  DIST_REC_CHECK_TYPE(
      op,
      t.scalar_type() == dense.scalar_type(),
      name,
      " must have dense's dtype ",
      dense.scalar_type(),
      "; it has ",
      t.scalar_type());
}

// dot_interaction's sparse [B, F * D]: feature f at columns f * D; its
// gradient [B, F * D] contiguous.
FeatureLayout check_sparse(const char* op, const Tensor& dense, const Tensor& sparse) {
  check_dense(op, dense);
  check_like_dense(op, "sparse", sparse, dense);
  DIST_REC_CHECK_DIM(op, sparse, 2);
  const int64_t batch = dense.size(0), dim = dense.size(1);
  DIST_REC_CHECK_VALUE(
      op,
      sparse.size(0) == batch,
      "sparse has ",
      sparse.size(0),
      " rows but dense has ",
      batch,
      "; both hold one row per sample");
  DIST_REC_CHECK_VALUE(
      op,
      sparse.size(1) % dim == 0,
      "sparse has ",
      sparse.size(1),
      " columns, not a multiple of the embedding dim ",
      dim,
      " (dense's width)");
  DIST_REC_CHECK_VALUE(op, sparse.stride(1) == 1 || sparse.size(1) <= 1, "sparse's columns must be contiguous");
  const int64_t features = sparse.size(1) / dim;
  FeatureLayout f;
  for (int64_t k = 0; k < features; ++k) {
    f.offset.push_back(k * dim);
    f.stride.push_back(sparse.stride(0));
    f.grad_offset.push_back(k * dim);
    f.grad_stride.push_back(features * dim);
  }
  return f;
}

// dot_interaction_blocks' values: blocks [B, W_r] one after another, feature
// f at columns [c_f, c_f + D) of block r_f; no two features' columns
// overlap (their gradients are written, not added). Its gradient has the
// same layout. Returns the layout and whether the features cover every
// column (else the gradient's other columns are zero).
std::pair<FeatureLayout, bool> check_blocks(
    const char* op,
    const Tensor& dense,
    const Tensor& values,
    at::IntArrayRef block_widths,
    at::IntArrayRef feature_block,
    at::IntArrayRef feature_column) {
  check_dense(op, dense);
  check_like_dense(op, "values", values, dense);
  DIST_REC_CHECK_DIM(op, values, 1);
  DIST_REC_CHECK_VALUE(op, values.stride(0) == 1 || values.numel() <= 1, "values must be contiguous");
  const int64_t batch = dense.size(0), dim = dense.size(1);
  const int64_t blocks = static_cast<int64_t>(block_widths.size());
  const int64_t features = static_cast<int64_t>(feature_block.size());
  DIST_REC_CHECK_VALUE(
      op,
      static_cast<int64_t>(feature_column.size()) == features,
      "feature_block has ",
      features,
      " entries but feature_column has ",
      feature_column.size(),
      "; both hold one per feature");
  std::vector<int64_t> base(blocks + 1, 0);
  for (int64_t r = 0; r < blocks; ++r) {
    DIST_REC_CHECK_VALUE(op, block_widths[r] >= 0, "block_widths[", r, "] is ", block_widths[r], "; must be >= 0");
    base[r + 1] = base[r] + batch * block_widths[r];
  }
  DIST_REC_CHECK_VALUE(
      op,
      values.numel() == base[blocks],
      "values has ",
      values.numel(),
      " elements but ",
      blocks,
      " blocks of widths ",
      block_widths,
      " hold ",
      base[blocks],
      " for a batch of ",
      batch);
  FeatureLayout f;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> columns(blocks); // per block: (column, feature)
  for (int64_t k = 0; k < features; ++k) {
    const int64_t r = feature_block[k], c = feature_column[k];
    DIST_REC_CHECK_INDEX(
        op, r >= 0 && r < blocks, "feature ", k, " is in block ", r, "; there are ", blocks, " blocks");
    DIST_REC_CHECK_INDEX(
        op,
        c >= 0 && c + dim <= block_widths[r],
        "feature ",
        k,
        " takes columns [",
        c,
        ", ",
        c + dim,
        ") of block ",
        r,
        ", which has ",
        block_widths[r],
        " columns");
    columns[r].emplace_back(c, k);
    f.offset.push_back(base[r] + c);
    f.stride.push_back(block_widths[r]);
  }
  int64_t covered = 0;
  for (int64_t r = 0; r < blocks; ++r) {
    std::sort(columns[r].begin(), columns[r].end());
    for (size_t i = 1; i < columns[r].size(); ++i) {
      DIST_REC_CHECK_VALUE(
          op,
          columns[r][i].first >= columns[r][i - 1].first + dim,
          "features ",
          columns[r][i - 1].second,
          " and ",
          columns[r][i].second,
          " overlap in block ",
          r,
          " (columns ",
          columns[r][i - 1].first,
          " and ",
          columns[r][i].first,
          ", dim ",
          dim,
          ")");
    }
    covered += static_cast<int64_t>(columns[r].size()) * dim;
  }
  int64_t width = 0;
  for (int64_t r = 0; r < blocks; ++r) {
    width += block_widths[r];
  }
  f.grad_offset = f.offset;
  f.grad_stride = f.stride;
  return {std::move(f), covered == width};
}

// Samples per task: enough work to amortise a thread's start.
constexpr int64_t kGrain = 32;

Tensor run_forward(const Tensor& dense, const Tensor& sparse, int64_t features, const FeatureLayout& f) {
  const Shapes s = shapes(dense, features, f);
  Tensor out = at::empty({s.batch, s.dim + s.pairs}, dense.options());
  const interaction::Kernels& k = kernels();
  AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "dot_interaction", [&] {
    const auto forward = k.forward<scalar_t>();
    const scalar_t* d = dense.const_data_ptr<scalar_t>();
    const scalar_t* e = sparse.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.batch, kGrain, [&](int64_t begin, int64_t end) { forward(s, d, e, o, begin, end); });
  });
  return out;
}

// Fills grad_sparse (laid out as f.grad_*) and returns grad_dense.
Tensor run_backward(
    const char* op,
    const Tensor& grad_output,
    const Tensor& dense,
    const Tensor& sparse,
    int64_t features,
    const FeatureLayout& f,
    Tensor& grad_sparse) {
  const Shapes s = shapes(dense, features, f);
  check_like_dense(op, "grad_output", grad_output, dense);
  DIST_REC_CHECK_DIM(op, grad_output, 2);
  DIST_REC_CHECK_VALUE(
      op,
      grad_output.size(0) == s.batch && grad_output.size(1) == s.dim + s.pairs,
      "grad_output must have shape [",
      s.batch,
      ", ",
      s.dim + s.pairs,
      "]; it has ",
      grad_output.sizes());
  const Tensor grad = grad_output.stride(1) == 1 ? grad_output : grad_output.contiguous();
  Tensor grad_dense = at::empty({s.batch, s.dim}, dense.options());
  const interaction::Kernels& k = kernels();
  AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "dot_interaction_backward", [&] {
    const auto backward = k.backward<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* d = dense.const_data_ptr<scalar_t>();
    const scalar_t* e = sparse.const_data_ptr<scalar_t>();
    scalar_t* gd = grad_dense.mutable_data_ptr<scalar_t>();
    scalar_t* ge = grad_sparse.mutable_data_ptr<scalar_t>();
    const int64_t grad_stride = grad.stride(0);
    at::parallel_for(0, s.batch, kGrain, [&](int64_t begin, int64_t end) {
      backward(s, g, grad_stride, d, e, gd, ge, begin, end);
    });
  });
  return grad_dense;
}

Tensor dot_interaction_cpu(const Tensor& dense, const Tensor& sparse) {
  const FeatureLayout f = check_sparse("dot_interaction", dense, sparse);
  return run_forward(dense, sparse, static_cast<int64_t>(f.offset.size()), f);
}

std::tuple<Tensor, Tensor> dot_interaction_backward_cpu(const Tensor& grad_output, const Tensor& dense, const Tensor& sparse) {
  const char* op = "dot_interaction_backward";
  const FeatureLayout f = check_sparse(op, dense, sparse);
  Tensor grad_sparse = at::empty({sparse.size(0), sparse.size(1)}, sparse.options());
  Tensor grad_dense = run_backward(op, grad_output, dense, sparse, static_cast<int64_t>(f.offset.size()), f, grad_sparse);
  return {grad_dense, grad_sparse};
}

Tensor dot_interaction_blocks_cpu(
    const Tensor& dense,
    const Tensor& values,
    at::IntArrayRef block_widths,
    at::IntArrayRef feature_block,
    at::IntArrayRef feature_column) {
  const auto [f, covered] = check_blocks("dot_interaction_blocks", dense, values, block_widths, feature_block, feature_column);
  return run_forward(dense, values, static_cast<int64_t>(f.offset.size()), f);
}

std::tuple<Tensor, Tensor> dot_interaction_blocks_backward_cpu(
    const Tensor& grad_output,
    const Tensor& dense,
    const Tensor& values,
    at::IntArrayRef block_widths,
    at::IntArrayRef feature_block,
    at::IntArrayRef feature_column) {
  const char* op = "dot_interaction_blocks_backward";
  const auto [f, covered] = check_blocks(op, dense, values, block_widths, feature_block, feature_column);
  // Columns no feature reads get a zero gradient.
  Tensor grad_values = covered ? at::empty_like(values) : at::zeros_like(values);
  Tensor grad_dense = run_backward(op, grad_output, dense, values, static_cast<int64_t>(f.offset.size()), f, grad_values);
  return {grad_dense, grad_values};
}

} // namespace

TORCH_LIBRARY_FRAGMENT(dist_rec, m) {
  // DLRM's dot interaction: [dense, <v_i, v_j> for i < j] per sample, the
  // vectors being dense [B, D] and the F slices of sparse [B, F * D].
  m.def("dot_interaction(Tensor dense, Tensor sparse) -> Tensor");
  m.def("dot_interaction_backward(Tensor grad_output, Tensor dense, Tensor sparse) -> (Tensor, Tensor)");
  // The same, the F pooled vectors read from row-major blocks [B, W_r]
  // laid one after another in values: feature f at columns
  // [feature_column[f], + D) of block feature_block[f].
  m.def(
      "dot_interaction_blocks(Tensor dense, Tensor values, int[] block_widths, int[] feature_block, "
      "int[] feature_column) -> Tensor");
  m.def(
      "dot_interaction_blocks_backward(Tensor grad_output, Tensor dense, Tensor values, int[] block_widths, "
      "int[] feature_block, int[] feature_column) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dist_rec, CPU, m) {
  m.impl("dot_interaction", &dot_interaction_cpu);
  m.impl("dot_interaction_backward", &dot_interaction_backward_cpu);
  m.impl("dot_interaction_blocks", &dot_interaction_blocks_cpu);
  m.impl("dot_interaction_blocks_backward", &dot_interaction_blocks_backward_cpu);
}

} // namespace dist_rec
