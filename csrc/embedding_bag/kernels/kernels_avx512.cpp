// AVX-512F build of the inner loops (16 floats per register). Compiled with a
// target pragma instead of global flags so the rest of the extension keeps
// the baseline ISA; dispatch.cpp only calls into here after checking CPUID.
#include "kernel_api.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#define DIST_REC_ISA_TARGET "avx512f,avx2,fma,f16c"
#include "dist_rec/isa_target_begin.inc"

namespace dist_rec::cpu::avx512 {

using vec = __m512;
constexpr int64_t kLanes = 16;

#include "vec_avx512.inc"
#include "kernels_impl.h"

} // namespace dist_rec::cpu::avx512

#include "dist_rec/isa_target_end.inc"

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
