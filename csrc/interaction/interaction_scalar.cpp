// Baseline build of the fused dot interaction's loops, one float at a time
// (the compiler's default target, SSE2 on x86-64): the fallback for CPUs
// without AVX2, and a second opinion in tests.
#include <algorithm>
#include <vector>

#include "interaction/interaction_kernels.h"

namespace dist_rec::interaction {
namespace scalar {

using vec = float;
constexpr int64_t kLanes = 1;

static inline vec v_zero() {
  return 0.0f;
}
static inline vec v_set1(float x) {
  return x;
}
static inline vec v_fma(vec a, vec b, vec c) {
  return a * b + c;
}
static inline vec v_load(const float* p) {
  return *p;
}
static inline void v_store(float* p, vec v) {
  *p = v;
}

#include "interaction/interaction_impl.h"

} // namespace scalar

const Kernels& scalar_kernels() {
  static constexpr Kernels table = scalar::make_kernels("scalar");
  return table;
}

} // namespace dist_rec::interaction
