// Host memory for large tensors: huge-page backed, and recycled.
#pragma once

#include <ATen/ATen.h>

namespace dist_rec {

// A fresh tensor on 2 MiB transparent huge pages (plain at::empty when small
// or where the OS has no THP). For long-lived big tensors: tables, state.
at::Tensor empty_hugepage(c10::IntArrayRef size, at::ScalarType dtype);

// Like empty_hugepage, but the memory comes from (and returns to) a small
// process-wide pool: a training loop allocates same-sized outputs every step,
// and faulting in fresh pages for them cost 2-10 ms per step (measured on a
// 2-core VM for 8-32 MB outputs).
at::Tensor empty_recycled(c10::IntArrayRef size, at::ScalarType dtype);

} // namespace dist_rec
