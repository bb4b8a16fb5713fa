// AVX2 + FMA build (8 floats per register) of the fused dot interaction's
// loops. Off x86-64 its table says it is unavailable.
#include "interaction/interaction_kernels.h"

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#define DIST_REC_ISA_TARGET "avx2,fma,f16c"
#include "dist_rec/isa_target_begin.inc"

namespace dist_rec::interaction::avx2 {

using vec = __m256;
constexpr int64_t kLanes = 8;

#include "embedding_bag/kernels/vec_avx2.inc"

// interaction_impl.h's transpose8 in registers: unpack pairs of rows,
// shuffle quads, swap 128-bit halves.
#define DIST_REC_INTERACTION_TRANSPOSE8
inline void transpose8(const float* const* rows, int64_t col, float* dst, int64_t stride) {
  __m256 r[8], t[8], q[8];
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm256_loadu_ps(rows[k] + col);
  }
  for (int k = 0; k < 8; k += 2) {
    t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]); // r0[0] r1[0] r0[1] r1[1] | [4], [5]
    t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]); // [2], [3] | [6], [7]
  }
  for (int k = 0; k < 8; k += 4) {
    q[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0)); // columns 0 | 4 of 4 rows
    q[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2)); // 1 | 5
    q[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0)); // 2 | 6
    q[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2)); // 3 | 7
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * stride, _mm256_permute2f128_ps(q[k], q[k + 4], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * stride, _mm256_permute2f128_ps(q[k], q[k + 4], 0x31));
  }
}

#include "interaction/interaction_impl.h"

} // namespace dist_rec::interaction::avx2

#include "dist_rec/isa_target_end.inc"

namespace dist_rec::interaction {
const Kernels& avx2_kernels() {
  static constexpr Kernels table = avx2::make_kernels("avx2");
  return table;
}
} // namespace dist_rec::interaction

#else

namespace dist_rec::interaction {
const Kernels& avx2_kernels() {
  static constexpr Kernels table{"avx2-unavailable"};
  return table;
}
} // namespace dist_rec::interaction

#endif
