// The fused dot interaction's per-sample loops, written once and compiled
// per ISA: included inside namespace dist_rec::interaction::<isa> by
// interaction_<isa>.cpp under that ISA's target pragma. No include guard.
//
// The including file defines this ISA's float vector primitives (`vec`,
// `kLanes`, `v_zero`, `v_set1`, `v_fma`, `v_load`, `v_store`, as for the
// embedding kernels). Float inner loops work on whole vectors (per-sample
// buffers are zero-padded to lane multiples) in register blocks (below).
// float64 (tests, references) takes plain loops.

// The register block of both passes: R output rows by up to C column
// vectors, C = min(4, the pass's column vectors) and R = kBlockRows<C> (in a
// full-width block about twelve accumulators and never fewer than eight, the
// multiply-add chains needed in flight; the 2- and 1-vector blocks of a
// row's tail keep R), so that each broadcast value feeds up to C
// multiply-adds and each vector load R. The blocks used to be eight rows by one vector,
// which broadcast every value again for every column vector (still the
// block where a pass is one vector wide). Standalone A/B of the two versions
// of the AVX2 loops, alternated in one process (AMD EPYC, one thread,
// B=1024, F=26; results equal bit for bit): at D=64 the backward took
// 0.65-0.70x the time and the forward (with transpose8 and prefetch_sample)
// 0.80-0.83x; at D=32 0.61-0.74x and 0.71-0.75x; at D=16 0.75-0.98x and
// 0.77-0.85x. The AVX-512 build (its own R and C) was not timed.
constexpr int64_t kBlockVectors = 4;
template <int C>
constexpr int kBlockRows = C >= 4 ? 3 : C == 3 ? 4 : C == 2 ? 6 : 8;
constexpr int kMaxBlockRows = 8;
static_assert(kBlockRows<1> <= kMaxBlockRows && kBlockRows<4> <= kMaxBlockRows, "buffers are sized for kMaxBlockRows");

inline int64_t round_up(int64_t n, int64_t to) {
  return (n + to - 1) / to * to;
}

#ifndef DIST_REC_INTERACTION_TRANSPOSE8
// Columns [col, col + 8) of 8 rows into 8 rows of dst (stride `stride`):
// dst[k * stride + r] = rows[r][col + k]. The AVX2 build defines its own
// with register shuffles.
inline void transpose8(const float* const* rows, int64_t col, float* dst, int64_t stride) {
  for (int64_t k = 0; k < 8; ++k) {
    for (int64_t r = 0; r < 8; ++r) {
      dst[k * stride + r] = rows[r][col + k];
    }
  }
}
#endif

// `transposed` [dim, padded] = the rows (rows[j], j < padded, pointing at
// zeros past n) column by column: 8 x 8 blocks, then the
// columns and rows left over one at a time. Element by element (strided
// scalar stores) it took 45% of the forward's samples at D=64 (perf, AMD
// EPYC).
inline void transpose_rows(const float* const* rows, int64_t dim, int64_t padded, float* transposed) {
  int64_t j0 = 0;
  for (; j0 + 8 <= padded; j0 += 8) {
    int64_t d0 = 0;
    for (; d0 + 8 <= dim; d0 += 8) {
      transpose8(rows + j0, d0, transposed + d0 * padded + j0, padded);
    }
    for (int64_t d = d0; d < dim; ++d) {
      for (int64_t r = 0; r < 8; ++r) {
        transposed[d * padded + j0 + r] = rows[j0 + r][d];
      }
    }
  }
  for (int64_t j = j0; j < padded; ++j) {
    for (int64_t d = 0; d < dim; ++d) {
      transposed[d * padded + j] = rows[j][d];
    }
  }
}

// dst[0:n] = src[0:n], in registers: std::copy_n of a 64-float row is a
// memmove call (9% of a forward and backward at D=64, perf, when both
// passes copied every vector; the forward still copies each sample's dense
// vector into its output, and the backward copies only rows with a partial
// vector, through its buffers).
// A row with a partial vector is left to memmove: its scalar tail stores,
// read back by a whole-vector load, cannot be forwarded (the backward took
// 1.3x the time at D=20 with the loop below).
inline void copy_row(const float* src, int64_t n, float* dst) {
  if (n % kLanes != 0) {
    std::copy_n(src, n, dst);
    return;
  }
  for (int64_t i = 0; i < n; i += kLanes) {
    v_store(dst + i, v_load(src + i));
  }
}

inline void copy_row(const double* src, int64_t n, double* dst) {
  std::copy_n(src, n, dst);
}

// Vector v of sample b: the dense vector (v = 0), then the pooled features.
template <typename T>
inline const T* vector_row(const Shapes& s, const T* dense, const T* sparse, int64_t b, int64_t v) {
  const Layout& l = s.layout;
  return v == 0 ? dense + b * l.dense_stride : sparse + l.sparse_offset[v - 1] + b * l.sparse_stride[v - 1];
}

// Asks for sample b's F + 1 vectors while the sample before is computed:
// its rows are 27 scattered 256-byte pieces (D=64) that the hardware
// prefetchers do not see coming, and the forward's loads of them were its
// hottest instructions (perf, AMD EPYC). A volatile asm: GCC may delete a
// loop of __builtin_prefetch alone.
template <typename T>
inline void prefetch_sample(const Shapes& s, const T* dense, const T* sparse, int64_t b) {
  const int64_t bytes = s.dim * static_cast<int64_t>(sizeof(T));
  for (int64_t v = 0; v < s.vectors && bytes > 0; ++v) {
    // Every line the row touches, from the one it starts in.
    const uintptr_t start = reinterpret_cast<uintptr_t>(vector_row(s, dense, sparse, b, v));
    for (uintptr_t line = start & ~uintptr_t{63}; line < start + bytes; line += 64) {
      const char* p = reinterpret_cast<const char*>(line);
#if defined(__x86_64__) || defined(__i386__)
      __asm__ volatile("prefetcht0 %0" : : "m"(*p));
#else
      __builtin_prefetch(p, 0, 3);
#endif
    }
  }
}

// Copies sample b's F + 1 vectors into rows of `buffer` of stride
// `row_stride` (>= D; padding left as the caller set it).
template <typename T>
inline void gather_sample(const Shapes& s, const T* dense, const T* sparse, int64_t b, int64_t row_stride, T* buffer) {
  for (int64_t v = 0; v < s.vectors; ++v) {
    copy_row(vector_row(s, dense, sparse, b, v), s.dim, buffer + v * row_stride);
  }
}

// Writes sample b's dense gradient: d(pairs)/d(dense vector) (`grads`),
// plus the dense vector's own part, which passes straight through (the
// first D columns of `g`, sample b's row of grad_out).
template <typename T>
inline void write_dense_gradient(const Shapes& s, const T* g, const T* grads, T* grad_dense, int64_t b) {
  T* gd = grad_dense + b * s.dim;
  for (int64_t k = 0; k < s.dim; ++k) {
    gd[k] = g[k] + grads[k];
  }
}

// Writes sample b's gradients: `grads` holds d(pairs)/d(vector v) in rows
// of stride `row_stride`.
template <typename T>
inline void write_gradients(
    const Shapes& s,
    const T* g,
    const T* grads,
    int64_t row_stride,
    T* grad_dense,
    T* grad_sparse,
    int64_t b) {
  write_dense_gradient(s, g, grads, grad_dense, b);
  const Layout& l = s.layout;
  for (int64_t v = 1; v < s.vectors; ++v) {
    copy_row(grads + v * row_stride, s.dim, grad_sparse + l.grad_offset[v - 1] + b * l.grad_stride[v - 1]);
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

// One register block of both passes: for r < R and the C vectors of
// columns from c0, out(r)[c] = sum over t < terms of weight(r, t) *
// row(t)[c], each sum in the order of t with one multiply-add per term.
// Forward: weight(r, d) = vector i0 + r's element d, row(d) = the transposed
// vectors' row d, out(r) = a Gram row. Backward: weight(r, j) = the pair
// gradient of rows i0 + r and j, row(j) = vector j, out(r) = its gradient.
template <int R, int C, typename Weight, typename Row, typename Out>
inline void block_product(int64_t terms, int64_t c0, const Weight& weight, const Row& row, const Out& out) {
  vec acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int k = 0; k < C; ++k) {
      acc[r][k] = v_zero();
    }
  }
  for (int64_t t = 0; t < terms; ++t) {
    vec w[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      w[r] = v_set1(weight(r, t));
    }
    const float* source = row(t) + c0;
#pragma GCC unroll 8
    for (int k = 0; k < C; ++k) {
      const vec x = v_load(source + k * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        acc[r][k] = v_fma(w[r], x, acc[r][k]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* target = out(r) + c0;
#pragma GCC unroll 8
    for (int k = 0; k < C; ++k) {
      v_store(target + k * kLanes, acc[r][k]);
    }
  }
}

// gram[r][c0, c0 + C kLanes) = sum_d a[r][d] transposed[d][same], r < R.
template <int R, int C>
inline void forward_block(const float* const* a, const float* transposed, int64_t padded, int64_t dim, int64_t c0, float* gram) {
  block_product<R, C>(
      dim,
      c0,
      [a](int r, int64_t d) { return a[r][d]; },
      [transposed, padded](int64_t d) { return transposed + d * padded; },
      [gram, padded](int r) { return gram + r * padded; });
}

// out[r][c0, c0 + C kLanes) = sum_j w[r n + j] in_row[j][same], r < R.
template <int R, int C>
inline void backward_block(const float* const* in_row, const float* w, int64_t n, int64_t c0, float* const* out) {
  block_product<R, C>(
      n,
      c0,
      [w, n](int r, int64_t j) { return w[r * n + j]; },
      [in_row](int64_t j) { return in_row[j]; },
      [out](int r) { return out[r]; });
}

// Column vectors [c, vectors) of rows a[0 .. R): blocks of C, then of 2
// and 1 for what is left.
template <int R, int C>
inline void forward_columns(const float* const* a, const float* transposed, int64_t padded, int64_t dim, int64_t c,
                            int64_t vectors, float* gram) {
  for (; c + C <= vectors; c += C) {
    forward_block<R, C>(a, transposed, padded, dim, c * kLanes, gram);
  }
  if constexpr (C > 2) {
    if (c + 2 <= vectors) {
      forward_block<R, 2>(a, transposed, padded, dim, c * kLanes, gram);
      c += 2;
    }
  }
  if constexpr (C > 1) {
    if (c < vectors) {
      forward_block<R, 1>(a, transposed, padded, dim, c * kLanes, gram);
    }
  }
}

// The Gram rows of one sample, R at a time (only the column vectors right
// of the diagonal), their upper triangle appended at `pair`.
template <int C>
inline void forward_rows(const float* const* rows, const float* transposed, int64_t n, int64_t padded, int64_t dim,
                         float* gram, float* pair) {
  constexpr int R = kBlockRows<C>;
  for (int64_t i0 = 0; i0 + 1 < n; i0 += R) {
    forward_columns<R, C>(rows + i0, transposed, padded, dim, (i0 + 1) / kLanes, padded / kLanes, gram);
    for (int64_t r = 0; r < R && i0 + r + 1 < n; ++r) {
      for (int64_t j = i0 + r + 1; j < n; ++j) {
        *pair++ = gram[r * padded + j];
      }
    }
  }
}

// Every row's gradient of one sample, R rows at a time (rows past n land in
// scratch rows of out_row).
template <int C>
inline void backward_rows(const float* const* in_row, const float* symmetric, int64_t n, int64_t chunks,
                          float* const* out_row) {
  constexpr int R = kBlockRows<C>;
  for (int64_t i0 = 0; i0 < n; i0 += R) {
    const float* w = symmetric + i0 * n; // rows i0 .. i0 + R - 1
    int64_t c = 0;
    for (; c + C <= chunks; c += C) {
      backward_block<R, C>(in_row, w, n, c * kLanes, out_row + i0);
    }
    if constexpr (C > 2) {
      if (c + 2 <= chunks) {
        backward_block<R, 2>(in_row, w, n, c * kLanes, out_row + i0);
        c += 2;
      }
    }
    if constexpr (C > 1) {
      if (c < chunks) {
        backward_block<R, 1>(in_row, w, n, c * kLanes, out_row + i0);
      }
    }
  }
}

// The register block's width for a pass `vectors` column vectors wide.
inline int block_vectors(int64_t vectors) {
  return static_cast<int>(vectors >= kBlockVectors ? kBlockVectors : vectors < 1 ? 1 : vectors);
}

// Sample rows [begin, end) of the forward, float: Gram rows a register block
// at a time against the transposed vectors (only the column vectors right of
// the diagonal), then the upper triangle copied out.
// The vectors are read where they are (row pointers; rows past n point at
// zeros).
void forward_float(const Shapes& s, const float* dense, const float* sparse, float* out, int64_t begin, int64_t end) {
  const int64_t n = s.vectors, dim = s.dim;
  const int64_t padded = round_up(n, kLanes); // Gram columns
  const int64_t vectors_wide = padded / kLanes;
  // transposed [D, padded] (extra columns 0); gram: a block's Gram rows;
  // rows past n (read up to padded by transpose_rows, and by a last block
  // of rows) point at zeros.
  std::vector<float> transposed(dim * padded, 0.0f), gram(kMaxBlockRows * padded), zeros(dim, 0.0f);
  std::vector<const float*> rows(std::max(n, padded) + kMaxBlockRows, zeros.data());
  const int64_t width = dim + s.pairs;
  for (int64_t b = begin; b < end; ++b) {
    if (b + 1 < end) {
      prefetch_sample(s, dense, sparse, b + 1);
    }
    for (int64_t v = 0; v < n; ++v) {
      rows[v] = vector_row(s, dense, sparse, b, v);
    }
    transpose_rows(rows.data(), dim, padded, transposed.data());
    float* row = out + b * width;
    copy_row(rows[0], dim, row);
    float* pair = row + dim;
    switch (block_vectors(vectors_wide)) {
      case 4:
        forward_rows<4>(rows.data(), transposed.data(), n, padded, dim, gram.data(), pair);
        break;
      case 3:
        forward_rows<3>(rows.data(), transposed.data(), n, padded, dim, gram.data(), pair);
        break;
      case 2:
        forward_rows<2>(rows.data(), transposed.data(), n, padded, dim, gram.data(), pair);
        break;
      default:
        forward_rows<1>(rows.data(), transposed.data(), n, padded, dim, gram.data(), pair);
    }
  }
}

// Float backward: the pair gradients mirrored into a symmetric matrix with
// a zero diagonal, times the vectors, a register block at a time.
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
  const int64_t chunks = row_stride / kLanes;
  const int width = block_vectors(chunks);
  const int64_t padded_rows = round_up(n, kMaxBlockRows) + kMaxBlockRows; // past any block's last row
  // When D is a whole number of vectors, the vectors are read and their
  // gradients written where they lie (a copy in and a copy out per vector
  // otherwise); else every vector goes through `vectors` [n, row_stride]
  // (extra columns stay 0) and `grads` [padded_rows, row_stride]. Rows of
  // `grads` past n, and row 0 (the dense gradient adds grad_out's part),
  // are scratch. symmetric [padded_rows, n] (extra rows stay 0).
  const bool in_place = dim == row_stride;
  std::vector<float> vectors(in_place ? 0 : n * row_stride, 0.0f), grads(padded_rows * row_stride);
  std::vector<float> symmetric(padded_rows * n, 0.0f);
  std::vector<const float*> in_row(n);
  std::vector<float*> out_row(padded_rows); // past n: scratch rows of `grads`
  for (int64_t v = 0; v < padded_rows; ++v) {
    out_row[v] = grads.data() + v * row_stride;
  }
  if (!in_place) {
    for (int64_t v = 0; v < n; ++v) {
      in_row[v] = vectors.data() + v * row_stride;
    }
  }
  const Layout& l = s.layout;
  const std::vector<int64_t> triangle_row = triangle_rows(n);
  for (int64_t b = begin; b < end; ++b) {
    if (b + 1 < end) {
      prefetch_sample(s, dense, sparse, b + 1);
    }
    if (in_place) {
      for (int64_t v = 0; v < n; ++v) {
        in_row[v] = vector_row(s, dense, sparse, b, v);
      }
      for (int64_t v = 1; v < n; ++v) {
        out_row[v] = grad_sparse + l.grad_offset[v - 1] + b * l.grad_stride[v - 1];
      }
    } else {
      gather_sample(s, dense, sparse, b, row_stride, vectors.data());
    }
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
    switch (width) {
      case 4:
        backward_rows<4>(in_row.data(), symmetric.data(), n, chunks, out_row.data());
        break;
      case 3:
        backward_rows<3>(in_row.data(), symmetric.data(), n, chunks, out_row.data());
        break;
      case 2:
        backward_rows<2>(in_row.data(), symmetric.data(), n, chunks, out_row.data());
        break;
      default:
        backward_rows<1>(in_row.data(), symmetric.data(), n, chunks, out_row.data());
    }
    if (in_place) {
      write_dense_gradient(s, g, grads.data(), grad_dense, b);
    } else {
      write_gradients(s, g, grads.data(), row_stride, grad_dense, grad_sparse, b);
    }
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
