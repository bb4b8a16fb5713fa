// The fused dot interaction's per-sample loops, written once and compiled
// per ISA: included inside namespace dist_rec::interaction::<isa> by
// interaction_<isa>.cpp under that ISA's target pragma. No include guard.
//
// The including file defines this ISA's float vector primitives (`vec`,
// `kLanes`, `v_zero`, `v_set1`, `v_fma`, `v_load`, `v_store`, as for the
// embedding kernels). Float inner loops work on whole vectors (per-sample
// buffers are zero-padded to lane multiples), eight rows at a time: eight
// independent accumulators hide the latency of the multiply-adds. float64
// (tests, references) takes plain loops.

constexpr int64_t kRows = 8;

inline int64_t round_up(int64_t n, int64_t to) {
  return (n + to - 1) / to * to;
}

// Vector v of sample b: the dense vector (v = 0), then the pooled features.
template <typename T>
inline const T* vector_row(const Shapes& s, const T* dense, const T* sparse, int64_t b, int64_t v) {
  const Layout& l = s.layout;
  return v == 0 ? dense + b * l.dense_stride : sparse + l.sparse_offset[v - 1] + b * l.sparse_stride[v - 1];
}

// Copies sample b's F + 1 vectors into rows of `buffer` of stride
// `row_stride` (>= D; padding left as the caller set it).
template <typename T>
inline void gather_sample(const Shapes& s, const T* dense, const T* sparse, int64_t b, int64_t row_stride, T* buffer) {
  for (int64_t v = 0; v < s.vectors; ++v) {
    std::copy_n(vector_row(s, dense, sparse, b, v), s.dim, buffer + v * row_stride);
  }
}

// Writes sample b's gradients: `grads` holds d(pairs)/d(vector v) in rows
// of stride `row_stride`; the dense vector also passes straight through
// (the first D columns of `g`, sample b's row of grad_out).
template <typename T>
inline void write_gradients(
    const Shapes& s,
    const T* g,
    const T* grads,
    int64_t row_stride,
    T* grad_dense,
    T* grad_sparse,
    int64_t b) {
  T* gd = grad_dense + b * s.dim;
  for (int64_t k = 0; k < s.dim; ++k) {
    gd[k] = g[k] + grads[k];
  }
  const Layout& l = s.layout;
  for (int64_t v = 1; v < s.vectors; ++v) {
    std::copy_n(grads + v * row_stride, s.dim, grad_sparse + l.grad_offset[v - 1] + b * l.grad_stride[v - 1]);
  }
}

// Where row j of the upper triangle starts among the pair gradients:
// pair (j, i), i > j, is at [j] + i.
inline std::vector<int64_t> triangle_rows(int64_t n) {
  std::vector<int64_t> rows(n);
  for (int64_t j = 0; j < n; ++j) {
    rows[j] = j * n - j * (j + 1) / 2 - j - 1;
  }
  return rows;
}

// Sample rows [begin, end) of the forward, float: Gram rows kRows at a
// time against the transposed vectors, then the upper triangle copied out.
// The vectors are read where they are (row pointers; rows past n point at
// zeros).
void forward_float(const Shapes& s, const float* dense, const float* sparse, float* out, int64_t begin, int64_t end) {
  const int64_t n = s.vectors, dim = s.dim;
  const int64_t padded = round_up(n, kLanes); // Gram columns
  // transposed [D, padded] (extra columns stay 0); gram: kRows Gram rows.
  std::vector<float> transposed(dim * padded, 0.0f), gram(kRows * padded), zeros(dim, 0.0f);
  std::vector<const float*> rows(round_up(n, kRows), zeros.data());
  const int64_t width = dim + s.pairs;
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t v = 0; v < n; ++v) {
      rows[v] = vector_row(s, dense, sparse, b, v);
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* source = rows[j];
      for (int64_t d = 0; d < dim; ++d) {
        transposed[d * padded + j] = source[d];
      }
    }
    float* row = out + b * width;
    std::copy_n(rows[0], dim, row);
    float* pair = row + dim;
    for (int64_t i0 = 0; i0 + 1 < n; i0 += kRows) {
      const float* const* a = rows.data() + i0;
      // Only the column chunks right of the diagonal.
      for (int64_t c = (i0 + 1) / kLanes * kLanes; c < padded; c += kLanes) {
        vec acc[kRows];
#pragma GCC unroll 8
        for (int64_t r = 0; r < kRows; ++r) {
          acc[r] = v_zero();
        }
        for (int64_t d = 0; d < dim; ++d) {
          const vec column = v_load(transposed.data() + d * padded + c);
#pragma GCC unroll 8
          for (int64_t r = 0; r < kRows; ++r) {
            acc[r] = v_fma(v_set1(a[r][d]), column, acc[r]);
          }
        }
#pragma GCC unroll 8
        for (int64_t r = 0; r < kRows; ++r) {
          v_store(gram.data() + r * padded + c, acc[r]);
        }
      }
      for (int64_t r = 0; r < kRows && i0 + r + 1 < n; ++r) {
        for (int64_t j = i0 + r + 1; j < n; ++j) {
          *pair++ = gram[r * padded + j];
        }
      }
    }
  }
}

// Float backward: the pair gradients mirrored into a symmetric matrix with
// a zero diagonal, times the vectors, kRows rows at a time.
void backward_float(
    const Shapes& s,
    const float* grad_out,
    int64_t grad_stride,
    const float* dense,
    const float* sparse,
    float* grad_dense,
    float* grad_sparse,
    int64_t begin,
    int64_t end) {
  const int64_t n = s.vectors, dim = s.dim;
  const int64_t row_stride = round_up(dim, kLanes);
  const int64_t padded_rows = round_up(n, kRows);
  // vectors and grads [n (rounded to kRows), row_stride] (extra columns stay
  // 0); symmetric [padded_rows, n] (extra rows stay 0).
  std::vector<float> vectors(n * row_stride, 0.0f), grads(padded_rows * row_stride);
  std::vector<float> symmetric(padded_rows * n, 0.0f);
  const std::vector<int64_t> triangle_row = triangle_rows(n);
  for (int64_t b = begin; b < end; ++b) {
    gather_sample(s, dense, sparse, b, row_stride, vectors.data());
    const float* g = grad_out + b * grad_stride;
    const float* grad_pairs = g + dim;
    // Row i of the mirror, written in order (strided stores would stall):
    // pairs (j, i) for j < i read down column i, then 0, then row i.
    for (int64_t i = 0; i < n; ++i) {
      float* mirror = symmetric.data() + i * n;
      for (int64_t j = 0; j < i; ++j) {
        mirror[j] = grad_pairs[triangle_row[j] + i];
      }
      mirror[i] = 0.0f;
      const float* upper = grad_pairs + triangle_row[i] + i + 1;
      for (int64_t j = i + 1; j < n; ++j) {
        mirror[j] = upper[j - i - 1];
      }
    }
    for (int64_t i0 = 0; i0 < n; i0 += kRows) {
      const float* w = symmetric.data() + i0 * n; // rows i0 .. i0 + kRows - 1
      for (int64_t c = 0; c < row_stride; c += kLanes) {
        vec acc[kRows];
#pragma GCC unroll 8
        for (int64_t r = 0; r < kRows; ++r) {
          acc[r] = v_zero();
        }
        for (int64_t j = 0; j < n; ++j) {
          const vec vj = v_load(vectors.data() + j * row_stride + c);
#pragma GCC unroll 8
          for (int64_t r = 0; r < kRows; ++r) {
            acc[r] = v_fma(v_set1(w[r * n + j]), vj, acc[r]);
          }
        }
#pragma GCC unroll 8
        for (int64_t r = 0; r < kRows; ++r) {
          v_store(grads.data() + (i0 + r) * row_stride + c, acc[r]);
        }
      }
    }
    write_gradients(s, g, grads.data(), row_stride, grad_dense, grad_sparse, b);
  }
}

// float64: plain loops, one pair (forward) or one vector (backward) at a time.
void forward_double(const Shapes& s, const double* dense, const double* sparse, double* out, int64_t begin, int64_t end) {
  const int64_t n = s.vectors, dim = s.dim;
  std::vector<double> vectors(n * dim);
  for (int64_t b = begin; b < end; ++b) {
    gather_sample(s, dense, sparse, b, dim, vectors.data());
    double* row = out + b * (dim + s.pairs);
    std::copy_n(vectors.data(), dim, row);
    double* pair = row + dim;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = i + 1; j < n; ++j) {
        double dot = 0.0;
        for (int64_t d = 0; d < dim; ++d) {
          dot += vectors[i * dim + d] * vectors[j * dim + d];
        }
        *pair++ = dot;
      }
    }
  }
}

void backward_double(
    const Shapes& s,
    const double* grad_out,
    int64_t grad_stride,
    const double* dense,
    const double* sparse,
    double* grad_dense,
    double* grad_sparse,
    int64_t begin,
    int64_t end) {
  const int64_t n = s.vectors, dim = s.dim;
  std::vector<double> vectors(n * dim), grads(n * dim);
  for (int64_t b = begin; b < end; ++b) {
    gather_sample(s, dense, sparse, b, dim, vectors.data());
    std::fill(grads.begin(), grads.end(), 0.0);
    const double* g = grad_out + b * grad_stride;
    const double* grad_pairs = g + dim;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = i + 1; j < n; ++j) {
        const double weight = *grad_pairs++;
        for (int64_t d = 0; d < dim; ++d) {
          grads[i * dim + d] += weight * vectors[j * dim + d];
          grads[j * dim + d] += weight * vectors[i * dim + d];
        }
      }
    }
    write_gradients(s, g, grads.data(), dim, grad_dense, grad_sparse, b);
  }
}

constexpr Kernels make_kernels(const char* isa_name) {
  return Kernels{isa_name, &forward_float, &forward_double, &backward_float, &backward_double};
}
