// AVX2 + FMA build (8 floats per register) of the fused dot interaction's loops. A
// target pragma rather than global flags, as for the embedding kernels: the
// rest of the extension keeps the baseline ISA, and dot_interaction_cpu.cpp
// calls in here only on a CPU that has it. Empty off x86-64.
#include "interaction/interaction_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <algorithm>
#include <vector>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12 warns inside its own intrinsics headers (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c")
#endif

#include <immintrin.h>

namespace dist_rec::interaction::avx2 {

using vec = __m256;
constexpr int64_t kLanes = 8;

#include "embedding_bag/kernels/vec_avx2.inc"
#include "interaction/interaction_impl.h"

} // namespace dist_rec::interaction::avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif
