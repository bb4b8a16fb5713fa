// Portable build of the inner loops, one float at a time: the fallback for
// CPUs without AVX2 and for non-x86 machines, and a second opinion in tests.
#include "kernel_api.h"

namespace dist_rec::cpu::scalar {

using vec = float;
constexpr int64_t kLanes = 1;

struct HalfBits;
struct BFloat16Bits;
static inline float to_float(HalfBits h);
static inline float to_float(BFloat16Bits b);
template <typename T>
static inline T from_float(float v);

static inline vec v_zero() {
  return 0.0f;
}
static inline vec v_set1(float x) {
  return x;
}
static inline vec v_add(vec a, vec b) {
  return a + b;
}
static inline vec v_mul(vec a, vec b) {
  return a * b;
}
static inline vec v_fma(vec a, vec b, vec c) {
  return __builtin_fmaf(a, b, c);
}
static inline float v_hsum(vec a) {
  return a;
}
static inline vec v_load(const float* p) {
  return *p;
}
static inline void v_store(float* p, vec v) {
  *p = v;
}
template <typename T>
static inline vec v_load(const T* p) {
  return to_float(*p);
}
template <typename T>
static inline void v_store(T* p, vec v) {
  *p = from_float<T>(v);
}

#include "kernels_impl.h"

} // namespace dist_rec::cpu::scalar

namespace dist_rec::cpu {
const KernelTable& scalar_kernels() {
  static constexpr KernelTable table = scalar::make_kernel_table("scalar");
  return table;
}
} // namespace dist_rec::cpu
