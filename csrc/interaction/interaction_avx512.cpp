// AVX-512F build (16 floats per register) of the fused dot interaction's
// loops. Off x86-64 its table says it is unavailable.
#include "interaction/interaction_kernels.h"

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#define DIST_REC_ISA_TARGET "avx512f,avx2,fma,f16c"
#include "dist_rec/isa_target_begin.inc"

namespace dist_rec::interaction::avx512 {

using vec = __m512;
constexpr int64_t kLanes = 16;

#include "embedding_bag/kernels/vec_avx512.inc"
#include "interaction/interaction_impl.h"

} // namespace dist_rec::interaction::avx512

#include "dist_rec/isa_target_end.inc"

namespace dist_rec::interaction {
const Kernels& avx512_kernels() {
  static constexpr Kernels table = avx512::make_kernels("avx512");
  return table;
}
} // namespace dist_rec::interaction

#else

namespace dist_rec::interaction {
const Kernels& avx512_kernels() {
  static constexpr Kernels table{"avx512-unavailable"};
  return table;
}
} // namespace dist_rec::interaction

#endif
