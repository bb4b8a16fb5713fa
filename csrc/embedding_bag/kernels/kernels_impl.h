// ISA-generic inner loops of the pooled embedding ops. This header is
// included inside `namespace dist_rec::cpu::<isa>` by kernels_<isa>.cpp after
// that file has defined:
//
//   vec                     the SIMD register type (float for scalar)
//   kLanes                  floats per vec
//   v_zero(), v_set1(x), v_add(a, b), v_mul(a, b), v_fma(a, b, c) = a*b+c
//   v_load(const T*), v_store(T*, vec) for T in {float, HalfBits, BFloat16Bits}
//   v_hsum(vec)             horizontal sum
//
// Every lane computes the same sequence of float operations as the scalar
// tail, in the same order, so forward results are bit-identical across ISAs
// (only horizontal sums, used for mean(g^2), differ in rounding).
//
// Nothing here may use the C++ standard library: see kernel_api.h.

#include "scalar_convert.h"

// How many index positions ahead the forward loop prefetches rows, and how
// many segments ahead the backward prefetches the rows it will update
// (from its update loop) and their optimizer state (from its summing loop;
// one line each, a miss of its own: cheap to ask for early). Same-process
// A/B on an Intel Xeon, 2 threads, the standard configs: the forward 48
// positions ahead against 16 took 0.7-0.8x the time on uniform ids
// (15.6 -> 11.4 ms at 8x1Mx128 B=2048, 57 -> 39 ms at B=8192) and
// 0.95-1.0x on Zipf ids; the backward 32 and 64 segments ahead against 16
// and 16, 2-9% shorter on every config; 8 or 32 occurrences ahead for the
// gradient rows made no difference. Since the rows are asked for from the
// update loop (update_table_segments), 64 segments ahead against 32, 48, 80 and
// 96: within noise of each other.
constexpr int64_t kForwardPrefetchPositions = 48;
constexpr int64_t kBackwardPrefetchSegments = 64;
constexpr int64_t kBackwardPrefetchStateSegments = 64;
constexpr int64_t kBackwardPrefetchOccurrences = 16;
// One cache line, not into L1: a row 16 or more positions ahead is 4-8
// lines, and at that depth prefetches into L1 queue behind its few miss
// buffers while the outer caches keep more in flight. Measured on an
// AVX-512 EPYC, one thread, row-wise AdaGrad steps at 20 ids per bag:
// prefetcht1 15-20% shorter than prefetcht0 (dim 64 and 128, Zipf and
// uniform ids). prefetcht2 (into L2 like t1 on Zen 4, as AMD documents
// it) was shorter again on an Intel Xeon, 2 threads, the standard configs,
// against t1 in the same process, alternated in rounds (2026-12-06): the
// step 0.85-0.95x the time on all 6 configs measured, the forward
// 0.81-0.92x (0.89x at 8x1Mx128 B=8192 uniform, 66.8 -> 59.1 ms) and the
// backward 0.88-0.98x. The forward with prefetcht0 took 1.07-1.10x the
// time, the backward with prefetchw 1.20-1.30x.
// GCC may delete a loop whose body is only __builtin_prefetch (no side
// effects, and C++ loops must make progress): it silently did so in the
// forward pass. A volatile asm cannot be deleted.
static inline void prefetch_line(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__ volatile("prefetcht2 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 1);
#endif
}

template <typename T>
static inline void prefetch_row(const T* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < bytes; offset += 64) {
    prefetch_line(p + offset);
  }
}

template <int N>
struct IntConstant {
  static constexpr int value = N;
};

// Heap scratch for the sum of one row wider than the update's chunk buffer
// (rare): grown to the widest row asked for, since one worker's segments
// can span tables of several widths.
struct WideRowScratch {
  float* heap = nullptr;
  int64_t capacity = 0;
  float* get(int64_t dim) {
    if (dim > capacity) {
      __builtin_free(heap);
      heap = static_cast<float*>(__builtin_malloc(sizeof(float) * dim));
      capacity = dim;
    }
    return heap;
  }
  ~WideRowScratch() {
    __builtin_free(heap);
  }
};

// ---------------------------------------------------------------------------
// Forward: pooled lookup
// ---------------------------------------------------------------------------

// Pools columns [col, col + NV * kLanes) of one bag with the accumulators in
// registers: an accumulator kept in memory costs a store and a reload per row
// and, measured, nearly halved the gather rate (fewer rows in flight).
// Unweighted rows are added (bit-identical to an FMA with weight 1).
//
// The loops over the NV accumulators are unrolled by pragma, here and in
// sum_grad_columns: left to GCC's own late unrolling, acc[] of 8 AVX2 or 8
// and 16 AVX-512 registers stayed an array on the stack, zeroed by `rep
// stos` and copied out through it at every bag or segment. On an AMD EPYC
// (Zen 3, AVX2 build), builds alternated in separate processes, 10 pairs:
// the backward took 0.84x the time at 8x1Mx128 B=2048 uniform, 0.86x at
// dim 64 and 0.90x at 8x1Mx64 B=2048 Zipf (the AVX2 forward compiled to
// the same code). The AVX-512 builds' changed loops were not timed.
//
// The first block of a bag (kFirst) also checks each id against `rows`
// before reading its row (returning the bad position; -1 when all are good)
// and calls prefetch(p) to keep the rows of later positions in flight.
template <int NV, bool kWeighted, bool kFirst, bool kCheckIds, typename T, typename I, typename Prefetch>
static inline int64_t pool_columns(
    const T* weights,
    int64_t dim,
    uint64_t rows,
    int64_t col,
    const I* indices,
    const float* per_sample_weights,
    int64_t start,
    int64_t end,
    float scale,
    float* out,
    const Prefetch& prefetch) {
  vec acc[NV];
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) {
    acc[k] = v_zero();
  }
  for (int64_t p = start; p < end; ++p) {
    const int64_t id = static_cast<int64_t>(indices[p]);
    if constexpr (kFirst) {
      if (kCheckIds && static_cast<uint64_t>(id) >= rows) {
        return p;
      }
      prefetch(p);
    }
    const T* row = weights + id * dim + col;
    if constexpr (kWeighted) {
      const vec w = v_set1(per_sample_weights[p]);
#pragma GCC unroll 16
      for (int k = 0; k < NV; ++k) {
        acc[k] = v_fma(w, v_load(row + k * kLanes), acc[k]);
      }
    } else {
#pragma GCC unroll 16
      for (int k = 0; k < NV; ++k) {
        acc[k] = v_add(acc[k], v_load(row + k * kLanes));
      }
    }
  }
  const vec vs = v_set1(scale);
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) {
    v_store(out + col + k * kLanes, v_mul(vs, acc[k]));
  }
  return -1;
}

// Pools one bag into out[0:dim]: blocks of up to 16 registers, then the
// columns that do not fill a register one at a time (same arithmetic).
// Returns the first out-of-range position (nothing written), or -1.
template <bool kWeighted, bool kCheckIds, typename T, typename I, typename Prefetch>
static inline int64_t pool_bag(
    const T* weights,
    int64_t dim,
    uint64_t rows,
    const I* indices,
    const float* per_sample_weights,
    int64_t start,
    int64_t end,
    float scale,
    float* out,
    const Prefetch& prefetch) {
  int64_t col = 0;
  int64_t vectors = dim / kLanes;
  int64_t bad = -1;
  auto block = [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    if (bad >= 0) {
      return; // the first block found a bad id: read no row of this bag
    }
    if (col == 0) {
      bad = pool_columns<NV, kWeighted, true, kCheckIds>(
          weights, dim, rows, col, indices, per_sample_weights, start, end, scale, out, prefetch);
    } else {
      pool_columns<NV, kWeighted, false, false>(
          weights, dim, rows, col, indices, per_sample_weights, start, end, scale, out, prefetch);
    }
    vectors -= NV;
    col += NV * kLanes;
  };
  while (vectors >= 16 && bad < 0) {
    block(IntConstant<16>{});
  }
  if (vectors >= 8) {
    block(IntConstant<8>{});
  }
  if (vectors >= 4) {
    block(IntConstant<4>{});
  }
  if (vectors >= 2) {
    block(IntConstant<2>{});
  }
  if (vectors >= 1) {
    block(IntConstant<1>{});
  }
  if (bad >= 0) {
    return bad;
  }
  if (col < dim) {
    if (col == 0) { // rows narrower than one register: check and prefetch here
      for (int64_t p = start; p < end; ++p) {
        if (kCheckIds && static_cast<uint64_t>(static_cast<int64_t>(indices[p])) >= rows) {
          return p;
        }
        prefetch(p);
      }
    }
    for (; col < dim; ++col) {
      float acc = 0.0f;
      for (int64_t p = start; p < end; ++p) {
        const float x = to_float(weights[static_cast<int64_t>(indices[p]) * dim + col]);
        acc = kWeighted ? fused_multiply_add(per_sample_weights[p], x, acc) : acc + x;
      }
      out[col] = scale * acc;
    }
  }
  return -1;
}

template <typename I, typename T, bool kCheckIds>
static int64_t forward_bags(const ForwardArgs& a, int64_t bag_begin, int64_t bag_end) {
  const I* indices = static_cast<const I*>(a.indices);
  const I* offsets = static_cast<const I*>(a.offsets);
  const int64_t batch = a.batch;
  for (int64_t bag = bag_begin; bag < bag_end; ++bag) {
    const int64_t feature = bag / batch;
    const int64_t sample = bag - feature * batch;
    const FeatureView& fv = a.features[feature];
    const TableView& tv = a.tables[fv.table];
    const int64_t start = static_cast<int64_t>(offsets[bag]);
    const int64_t end = static_cast<int64_t>(offsets[bag + 1]);
    // While row p is added, the row kForwardPrefetchPositions positions on
    // is fetched, if it belongs to this feature (same table). One prefetch
    // per row, interleaved with the work, measured 25% faster than issuing a
    // bag's worth at once; that id is not checked yet, so it is bounded here.
    const int64_t feature_end = static_cast<int64_t>(offsets[(feature + 1) * batch < bag_end ? (feature + 1) * batch : bag_end]);
    const T* weights = static_cast<const T*>(tv.weights);
    const int64_t dim = tv.dim;
    const uint64_t rows = static_cast<uint64_t>(tv.rows);
    const auto prefetch = [&](int64_t p) {
      const int64_t q = p + kForwardPrefetchPositions;
      if (q < feature_end) {
        const uint64_t id = static_cast<uint64_t>(static_cast<int64_t>(indices[q]));
        if (id < rows) {
          prefetch_row(weights + static_cast<int64_t>(id) * dim, dim);
        }
      }
    };
    float scale = 1.0f;
    if (fv.pooling == static_cast<int32_t>(PoolingMode::kMean) && end > start) {
      scale = 1.0f / static_cast<float>(end - start);
    }
    float* out = a.out + sample * a.out_dim + fv.out_col;
    const int64_t bad = a.per_sample_weights != nullptr
        ? pool_bag<true, kCheckIds>(weights, dim, rows, indices, a.per_sample_weights, start, end, scale, out, prefetch)
        : pool_bag<false, kCheckIds>(weights, dim, rows, indices, a.per_sample_weights, start, end, scale, out, prefetch);
    if (bad >= 0) {
      return bad;
    }
  }
  return -1;
}

template <typename I, bool kCheckIds>
static int64_t forward_bags_any(const ForwardArgs& a, int64_t bag_begin, int64_t bag_end) {
  switch (a.weight_type) {
    case WeightType::kFloat:
      return forward_bags<I, float, kCheckIds>(a, bag_begin, bag_end);
    case WeightType::kHalf:
      return forward_bags<I, HalfBits, kCheckIds>(a, bag_begin, bag_end);
    case WeightType::kBFloat16:
      return forward_bags<I, BFloat16Bits, kCheckIds>(a, bag_begin, bag_end);
  }
  return -1;
}

// ---------------------------------------------------------------------------
// Backward: sum each touched row's gradient over the batch, then update it
// ---------------------------------------------------------------------------

// Sums columns [col, col + NV * kLanes) of the occurrences [begin, end) of
// one row into g, accumulating in registers (see pool_columns).
template <int NV, bool kScaled>
static inline void sum_grad_columns(const SegmentArgs& a, int64_t begin, int64_t end, int64_t col, float* g) {
  vec acc[NV];
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) {
    acc[k] = v_zero();
  }
  for (int64_t i = begin; i < end; ++i) {
    const float* src = a.grad_output + a.occ_grad_offset[i] + col;
    if constexpr (kScaled) {
      const vec w = v_set1(a.occ_scale[i]);
#pragma GCC unroll 16
      for (int k = 0; k < NV; ++k) {
        acc[k] = v_fma(w, v_load(src + k * kLanes), acc[k]);
      }
    } else {
#pragma GCC unroll 16
      for (int k = 0; k < NV; ++k) {
        acc[k] = v_add(acc[k], v_load(src + k * kLanes));
      }
    }
  }
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) {
    v_store(g + col + k * kLanes, acc[k]);
  }
}

template <bool kScaled>
static inline void sum_grad(const SegmentArgs& a, int64_t begin, int64_t end, float* g, int64_t dim) {
  int64_t col = 0;
  int64_t vectors = dim / kLanes;
  for (; vectors >= 16; vectors -= 16, col += 16 * kLanes) {
    sum_grad_columns<16, kScaled>(a, begin, end, col, g);
  }
  if (vectors >= 8) {
    sum_grad_columns<8, kScaled>(a, begin, end, col, g);
    vectors -= 8, col += 8 * kLanes;
  }
  if (vectors >= 4) {
    sum_grad_columns<4, kScaled>(a, begin, end, col, g);
    vectors -= 4, col += 4 * kLanes;
  }
  if (vectors >= 2) {
    sum_grad_columns<2, kScaled>(a, begin, end, col, g);
    vectors -= 2, col += 2 * kLanes;
  }
  if (vectors >= 1) {
    sum_grad_columns<1, kScaled>(a, begin, end, col, g);
    col += kLanes;
  }
  for (; col < dim; ++col) {
    float acc = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      const float x = a.grad_output[a.occ_grad_offset[i] + col];
      acc = kScaled ? fused_multiply_add(a.occ_scale[i], x, acc) : acc + x;
    }
    g[col] = acc;
  }
}

// Asks for the gradient rows kBackwardPrefetchOccurrences occurrences
// ahead of segment s's (of this and later segments). Only summed segments
// ask (not one-occurrence ones, see kUpdateChunkRows): a longer segment
// after 16 or more of those finds its first rows not asked for.
static inline void prefetch_gradient_rows_ahead(const SegmentArgs& a, int64_t s, int64_t dim) {
  const int64_t begin = a.occ_begin[s];
  const int64_t end = a.occ_begin[s + 1];
  const int64_t ahead_end = end + kBackwardPrefetchOccurrences < a.num_occurrences
      ? end + kBackwardPrefetchOccurrences
      : a.num_occurrences;
  for (int64_t i = begin + kBackwardPrefetchOccurrences < ahead_end ? begin + kBackwardPrefetchOccurrences : ahead_end;
       i < ahead_end;
       ++i) {
    prefetch_row(a.grad_output + a.occ_grad_offset[i], dim);
  }
}

// Sums the gradient of segment s (one unique row) into g[0:D], summing its
// occurrences in index-position order.
static inline void sum_segment_grad(const SegmentArgs& a, int64_t s, float* g, int64_t dim) {
  const int64_t begin = a.occ_begin[s];
  const int64_t end = a.occ_begin[s + 1];
  prefetch_gradient_rows_ahead(a, s, dim);
  if (a.occ_scale != nullptr) {
    sum_grad<true>(a, begin, end, g, dim);
  } else {
    sum_grad<false>(a, begin, end, g, dim);
  }
}

// sum_d (g[d] + wd * w[d])^2 / D, the row's mean squared (regularised) gradient.
template <typename T>
static inline float mean_square(const float* g, const T* w, float l2, int64_t dim) {
  vec acc = v_zero();
  const vec vl2 = v_set1(l2);
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    const vec x = l2 != 0.0f ? v_fma(vl2, v_load(w + d), v_load(g + d)) : v_load(g + d);
    acc = v_fma(x, x, acc);
  }
  float sum = v_hsum(acc);
  for (; d < dim; ++d) {
    const float x = l2 != 0.0f ? fused_multiply_add(l2, to_float(w[d]), g[d]) : g[d];
    sum = fused_multiply_add(x, x, sum);
  }
  return sum / static_cast<float>(dim);
}

// w = correction * w - multiplier * g
template <typename T>
static inline void scaled_step(T* w, const float* g, float correction, float multiplier, int64_t dim) {
  const vec vc = v_set1(correction);
  const vec vm = v_set1(-multiplier);
  // (The tails start at a bound of their own: from where the vector loop
  // stopped, GCC warned of overflow in a tail it could not rule out.)
  const int64_t vector_end = dim - dim % kLanes;
  if (correction == 1.0f) {
    for (int64_t d = 0; d < vector_end; d += kLanes) {
      v_store(w + d, v_fma(vm, v_load(g + d), v_load(w + d)));
    }
    for (int64_t d = vector_end; d < dim; ++d) {
      w[d] = from_float<T>(fused_multiply_add(-multiplier, g[d], to_float(w[d])));
    }
  } else {
    for (int64_t d = 0; d < vector_end; d += kLanes) {
      v_store(w + d, v_fma(vm, v_load(g + d), v_mul(vc, v_load(w + d))));
    }
    for (int64_t d = vector_end; d < dim; ++d) {
      w[d] = from_float<T>(fused_multiply_add(-multiplier, g[d], correction * to_float(w[d])));
    }
  }
}

struct SgdUpdate {
  template <typename T>
  static void apply(const SegmentArgs& a, const TableView&, T* w, int64_t, const float* g, int64_t dim) {
    // L2 and decoupled decay coincide for SGD: w - lr * (g + wd * w).
    const float correction = a.weight_decay_mode == WeightDecayMode::kNone
        ? 1.0f
        : 1.0f - a.learning_rate * a.weight_decay;
    scaled_step(w, g, correction, a.learning_rate, dim);
  }
};

// Shared by row-wise AdaGrad and its momentum-scaled variant: given the
// accumulator value to step with, applies FBGEMM's weight-decay semantics.
template <typename T>
static inline void adagrad_step(const SegmentArgs& a, T* w, const float* g, float accumulator, int64_t dim) {
  const float multiplier = a.learning_rate / (__builtin_sqrtf(accumulator) + a.eps);
  float correction = 1.0f;
  if (a.weight_decay_mode == WeightDecayMode::kL2) {
    correction = 1.0f - multiplier * a.weight_decay;
  } else if (a.weight_decay_mode == WeightDecayMode::kDecoupled) {
    correction = 1.0f - a.learning_rate * a.weight_decay;
  }
  scaled_step(w, g, correction, multiplier, dim);
}

static inline float l2_coefficient(const SegmentArgs& a) {
  return a.weight_decay_mode == WeightDecayMode::kL2 ? a.weight_decay : 0.0f;
}

struct RowwiseAdagradUpdate {
  template <typename T>
  static void apply(const SegmentArgs& a, const TableView& tv, T* w, int64_t row, const float* g, int64_t dim) {
    const float momentum = tv.state0[row] + mean_square(g, w, l2_coefficient(a), dim);
    tv.state0[row] = momentum;
    adagrad_step(a, w, g, momentum, dim);
  }
};

struct MomentumScaledRowwiseAdagradUpdate {
  template <typename T>
  static void apply(const SegmentArgs& a, const TableView& tv, T* w, int64_t row, const float* g, int64_t dim) {
    // state0: accumulator agreed at the last sync (read only here);
    // state1: this replica's increment since then.
    const float increment = tv.state1[row] + mean_square(g, w, l2_coefficient(a), dim);
    tv.state1[row] = increment;
    adagrad_step(a, w, g, tv.state0[row] + a.momentum_scale * increment, dim);
  }
};

// The row the backward asks for kBackwardPrefetchSegments segments before
// updating it.
template <typename T>
static inline void prefetch_update_row(const SegmentArgs& a, const T* weights, int64_t dim, int64_t s, int64_t seg_end) {
  const int64_t ahead = s + kBackwardPrefetchSegments;
  if (ahead < seg_end) {
    prefetch_row(weights + a.seg_row[ahead] * dim, dim);
  }
}

// The optimizer state the backward asks for kBackwardPrefetchStateSegments
// segments before updating its row.
static inline void prefetch_update_state(const SegmentArgs& a, const TableView& tv, int64_t s, int64_t seg_end) {
  const int64_t ahead = s + kBackwardPrefetchStateSegments;
  if (ahead < seg_end) {
    if (tv.state0 != nullptr) {
      prefetch_line(tv.state0 + a.seg_row[ahead]);
    }
    if (tv.state1 != nullptr) {
      prefetch_line(tv.state1 + a.seg_row[ahead]);
    }
  }
}

// The update walks the segments in chunks of up to kUpdateChunkRows rows:
// first the chunk's gradient sums (their gradient rows mostly cache hits,
// many in flight at once) into a buffer that stays in L1, then the chunk's
// row updates (rows and state asked for a chunk or more before), so that
// the gradient reads and the row misses do not take turns row by row.
// Same-process A/B on an Intel Xeon, 2 threads, against summing and
// updating row by row, alternated in rounds: the backward took 0.92x the
// time at 8x1Mx128 B=2048 uniform (37.6 -> 34.7 ms), 0.96x at dim 64
// (19.9 -> 19.1 ms) and at 8x1Mx128 B=8192 Zipf (78.8 -> 75.7 ms), and
// the same at dim 64 B=8192 uniform and B=2048 Zipf. Chunks of 8 to 64 rows
// of dim 64 were within noise of each other; prefetching the chunk's rows
// into L1 before its updates changed nothing. Segments are distinct rows,
// so the order of the work changes no result.
//
// The rows are asked for from the update loop, one per update, and the
// state from the summing loop. Asking for both while summing put a chunk's
// row lines in a burst behind its gradient reads; spread over the updates
// they keep the misses in flight evenly (same-process A/B as above: the
// backward took 0.93x the time at 8x1Mx64 B=2048 uniform, 0.96x at dim
// 128 B=2048 and B=8192 uniform and at 8x1Mx128 B=8192 Zipf, 0.97x at
// 8x1Mx64 B=2048 Zipf and 0.99x at 8x1Mx64 B=8192 uniform).
//
// A segment of one occurrence with no weight (most of them on uniform ids:
// 92% at 8x1Mx64 B=8192) has its gradient row for its sum, bit for bit but
// the sign of a zero: the update reads that row where it lies in the
// gradient blocks rather than a copy of it in the buffer. Same-process A/B
// on an Intel Xeon (AVX-512, 2 MB of L2 per core; 2026-12-07), 2 threads,
// the standard configs, alternated step by step: the backward took
// 0.94-0.97x the time on uniform ids (8x1Mx128 B=8192: 68.1 -> 64.2 ms),
// 0.97-1.0x on Zipf ids at dim 64 and B=8192 at dim 128, 1.04x at
// 8x1Mx128 B=2048 Zipf. Nothing asks for such a row ahead: it is in the
// table's gradient block, mostly in L2 (asked for 16 occurrences ahead, as
// a longer segment's are, the backward took 1.01-1.05x the time on uniform
// ids and 1.01-1.02x on Zipf ids; same host, 2026-12-07).
constexpr int64_t kUpdateChunkRows = 32;
constexpr int64_t kUpdateChunkFloats = 4096;

// Segments [seg_begin, seg_end), all of table tv, whose rows are kDim
// floats wide (0: tv.dim, known at run time only).
template <typename T, typename Update, int64_t kDim>
static void update_table_segments(const SegmentArgs& a, const TableView& tv, int64_t seg_begin, int64_t seg_end) {
  const int64_t dim = kDim > 0 ? kDim : tv.dim;
  const int64_t floats = (dim + kLanes - 1) / kLanes * kLanes; // each sum starts on a vector
  const bool alone = floats > kUpdateChunkFloats; // a row wider than the buffer is a chunk of its own
  T* const weights = static_cast<T*>(tv.weights);
  float sums[kUpdateChunkFloats] __attribute__((aligned(64)));
  const float* sum_of[kUpdateChunkRows];
  WideRowScratch wide;
  for (int64_t chunk = seg_begin; chunk < seg_end;) {
    int64_t end = chunk;
    int64_t used = 0;
    while (end < seg_end && end - chunk < kUpdateChunkRows) {
      if (end > chunk && (alone || used + floats > kUpdateChunkFloats)) {
        break;
      }
      prefetch_update_state(a, tv, end, seg_end);
      const int64_t first = a.occ_begin[end];
      if (a.occ_scale == nullptr && a.occ_begin[end + 1] - first == 1) {
        sum_of[end - chunk] = a.grad_output + a.occ_grad_offset[first];
      } else {
        float* g = alone ? wide.get(dim) : sums + used;
        sum_segment_grad(a, end, g, dim);
        sum_of[end - chunk] = g;
        used += floats;
      }
      ++end;
    }
    for (int64_t s = chunk; s < end; ++s) {
      prefetch_update_row(a, weights, dim, s, seg_end);
      const int64_t row = a.seg_row[s];
      Update::apply(a, tv, weights + row * dim, row, sum_of[s - chunk], dim);
    }
    chunk = end;
  }
}

// Segments [seg_begin, seg_end) of one table. The common widths get loops
// of their own: with the width a constant, the row's loops unroll and the
// table is found once, not per segment. Same-process A/B on an Intel Xeon
// (AVX-512), 2 threads, uniform ids, against one loop for every width:
// the backward took 0.89-0.95x the time at 8x1Mx64 B=2048 and B=8192 and
// 0.89-0.93x at 8x1Mx128 B=2048 (2026-12-07).
template <typename T, typename Update>
static void update_segments(const SegmentArgs& a, int64_t seg_begin, int64_t seg_end) {
  if (seg_begin >= seg_end) {
    return;
  }
  const TableView& tv = a.tables[a.seg_table[seg_begin]];
  switch (tv.dim) {
    case 16:
      return update_table_segments<T, Update, 16>(a, tv, seg_begin, seg_end);
    case 32:
      return update_table_segments<T, Update, 32>(a, tv, seg_begin, seg_end);
    case 64:
      return update_table_segments<T, Update, 64>(a, tv, seg_begin, seg_end);
    case 128:
      return update_table_segments<T, Update, 128>(a, tv, seg_begin, seg_end);
    case 256:
      return update_table_segments<T, Update, 256>(a, tv, seg_begin, seg_end);
    default:
      return update_table_segments<T, Update, 0>(a, tv, seg_begin, seg_end);
  }
}

template <typename Update>
static void update_segments_any(const SegmentArgs& a, int64_t seg_begin, int64_t seg_end) {
  switch (a.weight_type) {
    case WeightType::kFloat:
      return update_segments<float, Update>(a, seg_begin, seg_end);
    case WeightType::kHalf:
      return update_segments<HalfBits, Update>(a, seg_begin, seg_end);
    case WeightType::kBFloat16:
      return update_segments<BFloat16Bits, Update>(a, seg_begin, seg_end);
  }
}

static void update_sgd(const SegmentArgs& a, int64_t seg_begin, int64_t seg_end) {
  update_segments_any<SgdUpdate>(a, seg_begin, seg_end);
}

static void update_rowwise_adagrad(const SegmentArgs& a, int64_t seg_begin, int64_t seg_end) {
  update_segments_any<RowwiseAdagradUpdate>(a, seg_begin, seg_end);
}

static void update_momentum_scaled_rowwise_adagrad(const SegmentArgs& a, int64_t seg_begin, int64_t seg_end) {
  update_segments_any<MomentumScaledRowwiseAdagradUpdate>(a, seg_begin, seg_end);
}

static void sum_row_grads(const SegmentArgs& a, int64_t seg_begin, int64_t seg_end) {
  for (int64_t s = seg_begin; s < seg_end; ++s) {
    sum_segment_grad(a, s, a.row_grad_out[s], a.tables[a.seg_table[s]].dim);
  }
}

// ---------------------------------------------------------------------------
// Gradient with respect to per-sample weights
// ---------------------------------------------------------------------------

template <typename T>
static inline float dot_row(const T* row, const float* g, int64_t dim) {
  vec acc = v_zero();
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    acc = v_fma(v_load(row + d), v_load(g + d), acc);
  }
  float sum = v_hsum(acc);
  for (; d < dim; ++d) {
    sum = fused_multiply_add(to_float(row[d]), g[d], sum);
  }
  return sum;
}

template <typename I, typename T>
static void per_sample_weight_grad(const PerSampleWeightGradArgs& a, int64_t bag_begin, int64_t bag_end) {
  const I* indices = static_cast<const I*>(a.indices);
  const I* offsets = static_cast<const I*>(a.offsets);
  for (int64_t bag = bag_begin; bag < bag_end; ++bag) {
    const int64_t feature = bag / a.batch;
    const int64_t sample = bag - feature * a.batch;
    const FeatureView& fv = a.features[feature];
    const TableView& tv = a.tables[fv.table];
    const float* g = a.grad_output + sample * a.out_dim + fv.out_col;
    const int64_t start = static_cast<int64_t>(offsets[bag]);
    const int64_t end = static_cast<int64_t>(offsets[bag + 1]);
    float scale = 1.0f;
    if (fv.pooling == static_cast<int32_t>(PoolingMode::kMean) && end > start) {
      scale = 1.0f / static_cast<float>(end - start);
    }
    for (int64_t p = start; p < end; ++p) {
      const T* row = static_cast<const T*>(tv.weights) + static_cast<int64_t>(indices[p]) * tv.dim;
      a.out[p] = scale * dot_row(row, g, tv.dim);
    }
  }
}

template <typename I>
static void per_sample_weight_grad_any(const PerSampleWeightGradArgs& a, int64_t bag_begin, int64_t bag_end) {
  switch (a.weight_type) {
    case WeightType::kFloat:
      return per_sample_weight_grad<I, float>(a, bag_begin, bag_end);
    case WeightType::kHalf:
      return per_sample_weight_grad<I, HalfBits>(a, bag_begin, bag_end);
    case WeightType::kBFloat16:
      return per_sample_weight_grad<I, BFloat16Bits>(a, bag_begin, bag_end);
  }
}

static void per_sample_weight_grad_i32(const PerSampleWeightGradArgs& a, int64_t bag_begin, int64_t bag_end) {
  per_sample_weight_grad_any<int32_t>(a, bag_begin, bag_end);
}

static void per_sample_weight_grad_i64(const PerSampleWeightGradArgs& a, int64_t bag_begin, int64_t bag_end) {
  per_sample_weight_grad_any<int64_t>(a, bag_begin, bag_end);
}

// ---------------------------------------------------------------------------
// grad_output's feature blocks, checked on the way
// ---------------------------------------------------------------------------

// The fused backward refuses a NaN or inf gradient before it steps a row.
// The test rides on the copy that reads every value anyway: x * 0 is 0 for
// a finite x and NaN otherwise, so a sum of them stays 0 until a value is
// not finite (a separate sum over grad_output cost 0.4-2.8 ms a step at the
// standard configs). Multiply and add, not an FMA: the scalar build would
// call libm's fmaf per value.
static bool block_grad_by_feature(const GradBlockArgs& a, int64_t sample_begin, int64_t sample_end) {
  const vec zero = v_zero();
  vec poison = v_zero();
  float poison_tail = 0.0f;
  for (int64_t b = sample_begin; b < sample_end; ++b) {
    for (int64_t f = 0; f < a.num_features; ++f) {
      const FeatureView& fv = a.features[f];
      const int64_t dim = a.tables[fv.table].dim;
      const float* src = a.grad_output + b * a.out_dim + fv.out_col;
      float* dst = a.blocks != nullptr ? a.blocks + fv.out_col * a.batch + b * dim : nullptr;
      int64_t d = 0;
      for (; d + kLanes <= dim; d += kLanes) {
        const vec x = v_load(src + d);
        if (dst != nullptr) {
          v_store(dst + d, x);
        }
        poison = v_add(poison, v_mul(x, zero));
      }
      for (; d < dim; ++d) {
        if (dst != nullptr) {
          dst[d] = src[d];
        }
        poison_tail += src[d] * 0.0f;
      }
    }
  }
  float lanes[kLanes]; // not v_hsum: GCC 12 warns of an uninitialised lane in its reduction here
  v_store(lanes, poison);
  for (int64_t i = 0; i < kLanes; ++i) {
    poison_tail += lanes[i];
  }
  return poison_tail == 0.0f; // false for NaN
}

static constexpr KernelTable make_kernel_table(const char* name) {
  return KernelTable{
      name,
      &forward_bags_any<int32_t, true>,
      &forward_bags_any<int64_t, true>,
      &forward_bags_any<int32_t, false>,
      &forward_bags_any<int64_t, false>,
      &update_sgd,
      &update_rowwise_adagrad,
      &update_momentum_scaled_rowwise_adagrad,
      &sum_row_grads,
      &per_sample_weight_grad_i32,
      &per_sample_weight_grad_i64,
      &block_grad_by_feature,
  };
}
