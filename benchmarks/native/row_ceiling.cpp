// The machine's own random-row rates, as a ceiling for the embedding kernels
// (benchmarks/bench_ceiling.py): nothing here is dist_rec's code.
//
// pooled_read:  out[bag] = sum of its rows (one row read per id), the row
//               `distance` ids ahead prefetched (`hint`: into L1, into L2,
//               prefetcht2 or for writing), bags split over every core;
//               the sums stay in registers (a row of D floats is D / lanes
//               vector registers, in blocks of at most 16).
// update_rows:  each listed row r := r * a + b in place (one read and one
//               write per row), rows `distance` ahead prefetched; with
//               `states`, also the row's one float of optimizer state
//               (row-wise AdaGrad's), s := s * a + b, prefetched alike.
//
// Built by bench_ceiling.py with g++ -O3 -march=native -fopenmp: the vectors
// are as wide as that CPU's widest (AVX-512, else AVX2 or AVX, else 16 bytes), so
// that the ceiling of an AVX2 machine is measured with AVX2 rather than not
// at all.
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

namespace {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr const char* kIsa = "AVX-512";
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#if defined(__AVX2__)
constexpr const char* kIsa = "AVX2";
#else
constexpr const char* kIsa = "AVX";
#endif
#elif defined(__x86_64__)
constexpr int kVectorBytes = 16;
constexpr const char* kIsa = "SSE";
#else
constexpr int kVectorBytes = 16;
constexpr const char* kIsa = "16-byte vectors";
#endif
constexpr int kLanes = kVectorBytes / 4;
typedef float vec __attribute__((vector_size(kVectorBytes)));

inline vec load(const float* p) {
  vec v;
  memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { memcpy(p, &v, sizeof v); }

// hint 0: into L1 (prefetcht0); 1: into L2 (prefetcht1); 2: for writing
// (prefetchw); 3: prefetcht2 (what dist_rec's kernels use: shorter than t1
// on an Intel Xeon; AMD documents t1 and t2 alike, into L2, for Zen 4).
inline void prefetch_row(const float* row, int64_t dim, int hint) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < dim * 4; off += 64) {
    if (hint == 3) {
      __builtin_prefetch(p + off, 0, 1);
    } else if (hint == 2) {
      __builtin_prefetch(p + off, 1, 3);
    } else if (hint == 1) {
      __builtin_prefetch(p + off, 0, 2);
    } else {
      __builtin_prefetch(p + off, 0, 3);
    }
  }
}

// A row of V vectors is pooled in column blocks of at most kMaxRegisters
// accumulators (16 vector registers: AVX2 has no more), the ids' rows
// prefetched by the first block only.
constexpr int kMaxRegisters = 16;

template <int V>  // V = dim / kLanes vectors
void pooled_read_v(const float* const* tables, int64_t dim, const int64_t* ids, const int64_t* offsets, int64_t num_bags,
                   int64_t bags_per_table, float* out, int64_t distance, int hint) {
  constexpr int kBlock = V < kMaxRegisters ? V : kMaxRegisters;
  static_assert(V % kBlock == 0, "a row is whole blocks");
#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t bag = 0; bag < num_bags; ++bag) {
    const int64_t table = bag / bags_per_table;
    const float* w = tables[table];
    const int64_t start = offsets[bag], end = offsets[bag + 1];
    const int64_t table_end = offsets[(table + 1) * bags_per_table];
    for (int block = 0; block < V / kBlock; ++block) {
      const int64_t col = int64_t{block} * kBlock * kLanes;
      vec acc[kBlock];
#pragma GCC unroll 16
      for (int k = 0; k < kBlock; ++k) acc[k] = vec{};
      for (int64_t p = start; p < end; ++p) {
        if (block == 0 && distance > 0 && p + distance < table_end) prefetch_row(w + ids[p + distance] * dim, dim, hint);
        const float* row = w + ids[p] * dim + col;
#pragma GCC unroll 16
        for (int k = 0; k < kBlock; ++k) acc[k] += load(row + kLanes * k);
      }
#pragma GCC unroll 16
      for (int k = 0; k < kBlock; ++k) store(out + bag * dim + col + kLanes * k, acc[k]);
    }
  }
}

template <int V>
void update_rows_v(float* const* tables, float* const* states, int64_t dim, const int64_t* rows,
                   const int64_t* table_starts, int64_t num_tables, float a, float b, int64_t distance, int hint) {
  const vec va = vec{} + a, vb = vec{} + b;
  for (int64_t t = 0; t < num_tables; ++t) {
    float* w = tables[t];
    float* state = states != nullptr ? states[t] : nullptr;
    const int64_t start = table_starts[t], end = table_starts[t + 1];
#pragma omp parallel for schedule(dynamic, 1024)
    for (int64_t i = start; i < end; ++i) {
      if (distance > 0 && i + distance < end) {
        prefetch_row(w + rows[i + distance] * dim, dim, hint);
        if (state != nullptr) prefetch_row(state + rows[i + distance], 1, hint);
      }
      if (state != nullptr) state[rows[i]] = state[rows[i]] * a + b;
      float* row = w + rows[i] * dim;
#pragma GCC unroll 32
      for (int k = 0; k < V; ++k) store(row + kLanes * k, load(row + kLanes * k) * va + vb);
    }
  }
}

}  // namespace

// Calls fn with the number of vector registers a row of `dim` floats fills
// (as a compile-time constant); -1 for a dim this build has no loop for.
template <typename Fn>
int with_registers(int64_t dim, Fn&& fn) {
  switch (dim) {
    case 16: fn(std::integral_constant<int, 16 / kLanes>{}); return 0;
    case 32: fn(std::integral_constant<int, 32 / kLanes>{}); return 0;
    case 64: fn(std::integral_constant<int, 64 / kLanes>{}); return 0;
    case 128: fn(std::integral_constant<int, 128 / kLanes>{}); return 0;
    case 256: fn(std::integral_constant<int, 256 / kLanes>{}); return 0;
  }
  return -1;
}

extern "C" {

int ceiling_threads() { return omp_get_max_threads(); }

const char* ceiling_isa() { return kIsa; }

int pooled_read(const float* const* tables, int64_t dim, const int64_t* ids, const int64_t* offsets, int64_t num_bags,
                int64_t bags_per_table, float* out, int64_t distance, int hint) {
  return with_registers(dim, [&](auto v) {
    pooled_read_v<decltype(v)::value>(tables, dim, ids, offsets, num_bags, bags_per_table, out, distance, hint);
  });
}

int update_rows(float* const* tables, float* const* states, int64_t dim, const int64_t* rows, const int64_t* table_starts,
                int64_t num_tables, float a, float b, int64_t distance, int hint) {
  return with_registers(dim, [&](auto v) {
    update_rows_v<decltype(v)::value>(tables, states, dim, rows, table_starts, num_tables, a, b, distance, hint);
  });
}

}  // extern "C"
