// Picks the inner-loop build for this CPU once, at first use.
#include "kernel_api.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define DIST_REC_X86 1
#endif

namespace dist_rec::cpu {
namespace {

#ifdef DIST_REC_X86
bool os_saves_registers(unsigned long long mask) {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) {
    return false;
  }
  unsigned int xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const unsigned long long xcr0 = (static_cast<unsigned long long>(xcr0_hi) << 32) | xcr0_lo;
  return (xcr0 & mask) == mask;
}

bool cpu_has_avx2() {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) {
    return false;
  }
  const bool fma = ecx & bit_FMA;
  const bool f16c = ecx & bit_F16C;
  if (!fma || !f16c || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    return false;
  }
  return (ebx & bit_AVX2) && os_saves_registers(0x6); // XMM | YMM state
}

bool cpu_has_avx512() {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!cpu_has_avx2() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    return false;
  }
  return (ebx & bit_AVX512F) && os_saves_registers(0xe6); // + opmask, ZMM state
}
#else
bool cpu_has_avx2() {
  return false;
}
bool cpu_has_avx512() {
  return false;
}
#endif

const KernelTable& choose_kernels() {
  const KernelTable* supported[3];
  const int n = supported_isas(supported, 3);
  const char* requested = std::getenv("DIST_REC_CPU_ISA");
  if (requested == nullptr || requested[0] == '\0') {
    return *supported[0];
  }
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(supported[i]->isa_name, requested) == 0) {
      return *supported[i];
    }
  }
  std::string names;
  for (int i = 0; i < n; ++i) {
    names += (i ? ", " : "") + std::string(supported[i]->isa_name);
  }
  throw std::runtime_error(
      "DIST_REC_CPU_ISA=" + std::string(requested) + " is not supported by this CPU; supported: " + names);
}

} // namespace

int supported_isas(const KernelTable** out, int max_out) {
  int n = 0;
  if (cpu_has_avx512() && n < max_out) {
    out[n++] = &avx512_kernels();
  }
  if (cpu_has_avx2() && n < max_out) {
    out[n++] = &avx2_kernels();
  }
  if (n < max_out) {
    out[n++] = &scalar_kernels();
  }
  return n;
}

const KernelTable& active_kernels() {
  static const KernelTable& table = choose_kernels();
  return table;
}

} // namespace dist_rec::cpu
