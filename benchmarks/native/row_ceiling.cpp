// The machine's own random-row rates, as a ceiling for the embedding kernels
// (benchmarks/bench_ceiling.py): nothing here is dist_rec's code.
//
// pooled_read:  out[bag] = sum of its rows (one row read per id), the row
//               `distance` ids ahead prefetched (`hint`: into L1, into L2,
//               or for writing), bags split over every core;
//               the sums stay in registers (a row of D floats is D / 16
//               AVX-512 registers).
// update_rows:  each listed row r := r * a + b in place (one read and one
//               write per row), rows `distance` ahead prefetched for writing.
//
// Built by bench_ceiling.py with g++ -O3 -march=native -fopenmp.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <type_traits>

namespace {

// hint 0: into L1 (prefetcht0); 1: into L2 (prefetcht1); 2: for writing
// (prefetchw); 3: prefetcht2 (what dist_rec's kernels use: shorter than t1
// on an Intel Xeon; AMD documents t1 and t2 alike, into L2, for Zen 4).
inline void prefetch_row(const float* row, int64_t dim, int hint) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < dim * 4; off += 64) {
    if (hint == 3) {
      _mm_prefetch(p + off, _MM_HINT_T2);
    } else if (hint == 2) {
      _m_prefetchw(const_cast<char*>(p + off));
    } else if (hint == 1) {
      _mm_prefetch(p + off, _MM_HINT_T1);
    } else {
      _mm_prefetch(p + off, _MM_HINT_T0);
    }
  }
}

template <int V>  // V = dim / 16 registers
void pooled_read_v(const float* const* tables, int64_t dim, const int64_t* ids, const int64_t* offsets, int64_t num_bags,
                   int64_t bags_per_table, float* out, int64_t distance, int hint) {
#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t bag = 0; bag < num_bags; ++bag) {
    const int64_t table = bag / bags_per_table;
    const float* w = tables[table];
    const int64_t start = offsets[bag], end = offsets[bag + 1];
    const int64_t table_end = offsets[(table + 1) * bags_per_table];
    __m512 acc[V];
    for (int k = 0; k < V; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t p = start; p < end; ++p) {
      if (distance > 0 && p + distance < table_end) prefetch_row(w + ids[p + distance] * dim, dim, hint);
      const float* row = w + ids[p] * dim;
      for (int k = 0; k < V; ++k) acc[k] = _mm512_add_ps(acc[k], _mm512_loadu_ps(row + 16 * k));
    }
    for (int k = 0; k < V; ++k) _mm512_storeu_ps(out + bag * dim + 16 * k, acc[k]);
  }
}

template <int V>
void update_rows_v(float* const* tables, int64_t dim, const int64_t* rows, const int64_t* table_starts, int64_t num_tables,
                   float a, float b, int64_t distance, int hint) {
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  for (int64_t t = 0; t < num_tables; ++t) {
    float* w = tables[t];
    const int64_t start = table_starts[t], end = table_starts[t + 1];
#pragma omp parallel for schedule(dynamic, 1024)
    for (int64_t i = start; i < end; ++i) {
      if (distance > 0 && i + distance < end) prefetch_row(w + rows[i + distance] * dim, dim, hint);
      float* row = w + rows[i] * dim;
      for (int k = 0; k < V; ++k) _mm512_storeu_ps(row + 16 * k, _mm512_fmadd_ps(_mm512_loadu_ps(row + 16 * k), va, vb));
    }
  }
}

}  // namespace

// Calls fn with the number of AVX-512 registers a row of `dim` floats fills
// (as a compile-time constant); -1 for a dim this build has no loop for.
template <typename Fn>
int with_registers(int64_t dim, Fn&& fn) {
  switch (dim) {
    case 16: fn(std::integral_constant<int, 1>{}); return 0;
    case 32: fn(std::integral_constant<int, 2>{}); return 0;
    case 64: fn(std::integral_constant<int, 4>{}); return 0;
    case 128: fn(std::integral_constant<int, 8>{}); return 0;
    case 256: fn(std::integral_constant<int, 16>{}); return 0;
  }
  return -1;
}

extern "C" {

int ceiling_threads() { return omp_get_max_threads(); }

int pooled_read(const float* const* tables, int64_t dim, const int64_t* ids, const int64_t* offsets, int64_t num_bags,
                int64_t bags_per_table, float* out, int64_t distance, int hint) {
  return with_registers(dim, [&](auto v) {
    pooled_read_v<decltype(v)::value>(tables, dim, ids, offsets, num_bags, bags_per_table, out, distance, hint);
  });
}

int update_rows(float* const* tables, int64_t dim, const int64_t* rows, const int64_t* table_starts, int64_t num_tables,
                float a, float b, int64_t distance, int hint) {
  return with_registers(dim, [&](auto v) {
    update_rows_v<decltype(v)::value>(tables, dim, rows, table_starts, num_tables, a, b, distance, hint);
  });
}

}  // extern "C"
