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
