// Tensors backed by transparent huge pages.
//
// Embedding lookups gather random rows from tables of many GB; with 4 KiB
// pages almost every row costs a TLB miss and a page walk. Backing the tables
// with 2 MiB pages (madvise(MADV_HUGEPAGE) on an aligned anonymous mapping)
// measured 2-3x faster random gathers on our CPUs. Where the OS offers no
// huge pages this is a plain allocation.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "dist_rec/checks.h"

namespace dist_rec {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

at::Tensor empty_hugepage(c10::IntArrayRef size, at::ScalarType dtype) {
  const char* op = "empty_hugepage";
  int64_t numel = 1;
  for (const int64_t s : size) {
    DIST_REC_CHECK_VALUE(op, s >= 0, "size must be non-negative; got ", size);
    numel *= s;
  }
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kHugePage) {
    // Over-allocate by one huge page so the data can start 2 MiB aligned.
    const size_t mapped = bytes + kHugePage;
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, op, ": mmap of ", mapped, " bytes failed: ", std::strerror(errno));
    const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(kHugePage - 1);
    // Best effort: a kernel without THP ignores the advice and we still have memory.
    madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
    return at::from_blob(
        reinterpret_cast<void*>(aligned),
        size,
        [base, mapped](void*) { munmap(base, mapped); },
        at::TensorOptions().dtype(dtype).device(at::kCPU));
  }
#endif
  return at::empty(size, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

} // namespace

TORCH_LIBRARY_FRAGMENT(dist_rec, m) {
  m.def("empty_hugepage(int[] size, ScalarType dtype) -> Tensor", &empty_hugepage);
}

} // namespace dist_rec
