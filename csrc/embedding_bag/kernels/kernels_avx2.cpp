// AVX2 + FMA + F16C build of the inner loops (8 floats per register). See
// kernels_avx512.cpp for why a target pragma rather than global flags.
#include "kernel_api.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12 warns inside its own intrinsics headers (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c")
#endif

#include <immintrin.h>

namespace dist_rec::cpu::avx2 {

using vec = __m256;
constexpr int64_t kLanes = 8;

#include "vec_avx2.inc"
#include "kernels_impl.h"

} // namespace dist_rec::cpu::avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

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
