// The per-sample loops of the fused dot interaction, declared once per ISA
// build (scalar baseline, AVX2 + FMA, AVX-512); dot_interaction_cpu.cpp
// picks one with the embedding kernels' ISA choice.
#pragma once

#include <cstdint>

namespace dist_rec::interaction {

// One batch's geometry: B samples of F + 1 vectors of D (the dense vector,
// then the F pooled embeddings), P = (F + 1) F / 2 pairs.
struct Shapes {
  int64_t batch, dim, vectors, pairs;
  int64_t dense_stride, sparse_stride; // row strides of dense and sparse
};

// Samples [begin, end): out [B, D + P] (contiguous) = [dense, pair dots].
#define DIST_REC_INTERACTION_DECLARE(isa)                                                                       \
  namespace isa {                                                                                               \
  void forward_rows(const Shapes&, const float* dense, const float* sparse, float* out, int64_t, int64_t);     \
  void forward_rows(const Shapes&, const double* dense, const double* sparse, double* out, int64_t, int64_t); \
  void backward_rows(                                                                                           \
      const Shapes&,                                                                                            \
      const float* grad_out,                                                                                    \
      int64_t grad_stride,                                                                                      \
      const float* dense,                                                                                       \
      const float* sparse,                                                                                      \
      float* grad_dense,                                                                                        \
      float* grad_sparse,                                                                                       \
      int64_t,                                                                                                  \
      int64_t);                                                                                                 \
  void backward_rows(                                                                                           \
      const Shapes&,                                                                                            \
      const double* grad_out,                                                                                   \
      int64_t grad_stride,                                                                                      \
      const double* dense,                                                                                      \
      const double* sparse,                                                                                     \
      double* grad_dense,                                                                                       \
      double* grad_sparse,                                                                                      \
      int64_t,                                                                                                  \
      int64_t);                                                                                                 \
  }

DIST_REC_INTERACTION_DECLARE(scalar)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DIST_REC_INTERACTION_X86 1
DIST_REC_INTERACTION_DECLARE(avx2)
DIST_REC_INTERACTION_DECLARE(avx512)
#endif

#undef DIST_REC_INTERACTION_DECLARE

} // namespace dist_rec::interaction
