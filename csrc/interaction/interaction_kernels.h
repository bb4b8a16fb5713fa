// The per-sample loops of the fused dot interaction, built once per ISA
// (scalar baseline, AVX2 + FMA, AVX-512); dot_interaction_cpu.cpp takes the
// table of the embedding kernels' ISA choice.
#pragma once

#include <cstdint>

namespace dist_rec::interaction {

// Where one sample's vectors are: row b of the dense vector starts at
// dense + b * dense_stride; row b of pooled feature f at
// sparse + sparse_offset[f] + b * sparse_stride[f] (a [B, F * D] tensor, or
// a flat buffer holding the features in row-major blocks, as the output
// all-to-all delivers them). The sparse gradient is written in its own such
// layout; the callers check that no two rows of it overlap.
struct Layout {
  int64_t dense_stride;
  const int64_t* sparse_offset; // [F]
  const int64_t* sparse_stride; // [F]
  const int64_t* grad_offset; // [F] (backward)
  const int64_t* grad_stride; // [F] (backward)
};

// One batch's geometry: B samples of F + 1 vectors of D (the dense vector,
// then the F pooled embeddings), P = (F + 1) F / 2 pairs.
struct Shapes {
  int64_t batch, dim, vectors, pairs;
  Layout layout;
};

// Samples [begin, end): out [B, D + P] (contiguous) = [dense, pair dots].
template <typename T>
using ForwardRows = void (*)(const Shapes&, const T* dense, const T* sparse, T* out, int64_t begin, int64_t end);
// Samples [begin, end): grad_dense [B, D] (contiguous) and grad_sparse
// (layout.grad_*) from grad_out (rows grad_stride apart). The gradients
// must not overlap the inputs: the float loops write a vector's gradient
// while other vectors of the sample are still to be read.
template <typename T>
using BackwardRows = void (*)(
    const Shapes&,
    const T* grad_out,
    int64_t grad_stride,
    const T* dense,
    const T* sparse,
    T* grad_dense,
    T* grad_sparse,
    int64_t begin,
    int64_t end);

struct Kernels {
  const char* isa_name;
  ForwardRows<float> forward_float;
  ForwardRows<double> forward_double;
  BackwardRows<float> backward_float;
  BackwardRows<double> backward_double;

  template <typename T>
  ForwardRows<T> forward() const {
    if constexpr (sizeof(T) == sizeof(float)) {
      return forward_float;
    } else {
      return forward_double;
    }
  }
  template <typename T>
  BackwardRows<T> backward() const {
    if constexpr (sizeof(T) == sizeof(float)) {
      return backward_float;
    } else {
      return backward_double;
    }
  }
};

// Each defined in its ISA's translation unit; the x86 ones only where the
// compiler can target them (else their isa_name says unavailable).
const Kernels& scalar_kernels();
const Kernels& avx2_kernels();
const Kernels& avx512_kernels();

} // namespace dist_rec::interaction
