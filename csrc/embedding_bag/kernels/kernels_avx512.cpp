// AVX-512F build of the inner loops (16 floats per register). Compiled with a
// target pragma instead of global flags so the rest of the extension keeps
// the baseline ISA; dispatch.cpp only calls into here after checking CPUID.
#include "kernel_api.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12 warns inside its own intrinsics headers (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif

#include <immintrin.h>

namespace dist_rec::cpu::avx512 {

using vec = __m512;
constexpr int64_t kLanes = 16;

#include "vec_avx512.inc"
#include "kernels_impl.h"

} // namespace dist_rec::cpu::avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace dist_rec::cpu {
const KernelTable& avx512_kernels() {
  static constexpr KernelTable table = avx512::make_kernel_table("avx512");
  return table;
}
} // namespace dist_rec::cpu

#else

namespace dist_rec::cpu {
const KernelTable& avx512_kernels() {
  static constexpr KernelTable table{"avx512-unavailable"};
  return table;
}
} // namespace dist_rec::cpu

#endif
