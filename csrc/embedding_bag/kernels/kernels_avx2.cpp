// AVX2 + FMA + F16C build of the inner loops (8 floats per register). See
// kernels_avx512.cpp for why a target pragma rather than global flags.
#include "kernel_api.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#define DIST_REC_ISA_TARGET "avx2,fma,f16c"
#include "dist_rec/isa_target_begin.inc"

namespace dist_rec::cpu::avx2 {

using vec = __m256;
constexpr int64_t kLanes = 8;

#include "vec_avx2.inc"
#include "kernels_impl.h"

} // namespace dist_rec::cpu::avx2

#include "dist_rec/isa_target_end.inc"

namespace dist_rec::cpu {
const KernelTable& avx2_kernels() {
  static constexpr KernelTable table = avx2::make_kernel_table("avx2");
  return table;
}
} // namespace dist_rec::cpu

#else

namespace dist_rec::cpu {
const KernelTable& avx2_kernels() {
  static constexpr KernelTable table{"avx2-unavailable"};
  return table;
}
} // namespace dist_rec::cpu

#endif
