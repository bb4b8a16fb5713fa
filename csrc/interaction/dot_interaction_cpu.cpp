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
// The unfused path (torch.bmm on [B, F + 1, D]) builds the whole
// [B, F + 1, F + 1] Gram tensor and, in the backward, a zero-filled tensor
// of that size to scatter the triangle into: on a CPU those batched 27 x 16
// products run far from peak and the fresh allocations page-fault. The
// loops (interaction_impl.h) are built per ISA and chosen as the embedding
// kernels are (including the _set_cpu_isa test hook).
//
// Reference: dist_rec/ops/interaction.py (dot_interaction_reference).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "dist_rec/checks.h"
#include "embedding_bag/kernels/kernel_api.h"
#include "interaction/interaction_kernels.h"

namespace dist_rec {
namespace {

using at::Tensor;

using interaction::Shapes;

template <typename T>
void forward_rows(const Shapes& s, const T* dense, const T* sparse, T* out, int64_t begin, int64_t end) {
#ifdef DIST_REC_INTERACTION_X86
  const std::string isa = cpu::current_kernels().isa_name;
  if (isa == "avx512") {
    return interaction::avx512::forward_rows(s, dense, sparse, out, begin, end);
  }
  if (isa == "avx2") {
    return interaction::avx2::forward_rows(s, dense, sparse, out, begin, end);
  }
#endif
  interaction::scalar::forward_rows(s, dense, sparse, out, begin, end);
}

template <typename T>
void backward_rows(
    const Shapes& s,
    const T* grad_out,
    int64_t grad_stride,
    const T* dense,
    const T* sparse,
    T* grad_dense,
    T* grad_sparse,
    int64_t begin,
    int64_t end) {
#ifdef DIST_REC_INTERACTION_X86
  const std::string isa = cpu::current_kernels().isa_name;
  if (isa == "avx512") {
    return interaction::avx512::backward_rows(s, grad_out, grad_stride, dense, sparse, grad_dense, grad_sparse, begin, end);
  }
  if (isa == "avx2") {
    return interaction::avx2::backward_rows(s, grad_out, grad_stride, dense, sparse, grad_dense, grad_sparse, begin, end);
  }
#endif
  interaction::scalar::backward_rows(s, grad_out, grad_stride, dense, sparse, grad_dense, grad_sparse, begin, end);
}

Shapes check_inputs(const char* op, const Tensor& dense, const Tensor& sparse) {
  DIST_REC_CHECK_CPU(op, dense);
  DIST_REC_CHECK_CPU(op, sparse);
  DIST_REC_CHECK_DIM(op, dense, 2);
  DIST_REC_CHECK_DIM(op, sparse, 2);
  DIST_REC_CHECK_TYPE(
      op,
      dense.scalar_type() == at::kFloat || dense.scalar_type() == at::kDouble,
      "dense must be float32 or float64; it is ",
      dense.scalar_type());
  DIST_REC_CHECK_TYPE(
      op,
      sparse.scalar_type() == dense.scalar_type(),
      "sparse must have dense's dtype ",
      dense.scalar_type(),
      "; it has ",
      sparse.scalar_type());
  const int64_t batch = dense.size(0), dim = dense.size(1);
  DIST_REC_CHECK_VALUE(op, dim > 0, "dense must have at least one column; it has shape ", dense.sizes());
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
  DIST_REC_CHECK_VALUE(op, dense.stride(1) == 1 || dim == 1, "dense's columns must be contiguous");
  DIST_REC_CHECK_VALUE(op, sparse.stride(1) == 1 || sparse.size(1) <= 1, "sparse's columns must be contiguous");
  const int64_t vectors = sparse.size(1) / dim + 1;
  return Shapes{batch, dim, vectors, vectors * (vectors - 1) / 2, dense.stride(0), sparse.stride(0)};
}

// Samples per task: enough work to amortise a thread's start.
constexpr int64_t kGrain = 32;

Tensor dot_interaction_cpu(const Tensor& dense, const Tensor& sparse) {
  const Shapes s = check_inputs("dot_interaction", dense, sparse);
  Tensor out = at::empty({s.batch, s.dim + s.pairs}, dense.options());
  AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "dot_interaction", [&] {
    const scalar_t* d = dense.const_data_ptr<scalar_t>();
    const scalar_t* e = sparse.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.batch, kGrain, [&](int64_t begin, int64_t end) { forward_rows(s, d, e, o, begin, end); });
  });
  return out;
}

std::tuple<Tensor, Tensor> dot_interaction_backward_cpu(const Tensor& grad_output, const Tensor& dense, const Tensor& sparse) {
  const char* op = "dot_interaction_backward";
  const Shapes s = check_inputs(op, dense, sparse);
  DIST_REC_CHECK_CPU(op, grad_output);
  DIST_REC_CHECK_DIM(op, grad_output, 2);
  DIST_REC_CHECK_TYPE(
      op,
      grad_output.scalar_type() == dense.scalar_type(),
      "grad_output must have dense's dtype ",
      dense.scalar_type(),
      "; it has ",
      grad_output.scalar_type());
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
  Tensor grad_sparse = at::empty({s.batch, sparse.size(1)}, sparse.options());
  AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "dot_interaction_backward", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* d = dense.const_data_ptr<scalar_t>();
    const scalar_t* e = sparse.const_data_ptr<scalar_t>();
    scalar_t* gd = grad_dense.mutable_data_ptr<scalar_t>();
    scalar_t* ge = grad_sparse.mutable_data_ptr<scalar_t>();
    const int64_t grad_stride = grad.stride(0);
    at::parallel_for(0, s.batch, kGrain, [&](int64_t begin, int64_t end) {
      backward_rows(s, g, grad_stride, d, e, gd, ge, begin, end);
    });
  });
  return {grad_dense, grad_sparse};
}

} // namespace

TORCH_LIBRARY_FRAGMENT(dist_rec, m) {
  // DLRM's dot interaction: [dense, <v_i, v_j> for i < j] per sample, the
  // vectors being dense [B, D] and the F slices of sparse [B, F * D].
  m.def("dot_interaction(Tensor dense, Tensor sparse) -> Tensor");
  m.def("dot_interaction_backward(Tensor grad_output, Tensor dense, Tensor sparse) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dist_rec, CPU, m) {
  m.impl("dot_interaction", &dot_interaction_cpu);
  m.impl("dot_interaction_backward", &dot_interaction_backward_cpu);
}

} // namespace dist_rec
