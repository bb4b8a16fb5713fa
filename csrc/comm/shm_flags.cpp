// Flags in shared memory for the intra-host all-to-all
// (dist_rec/distributed/shm_transport.py): a rank publishes how far it has
// written or read with a release store, and sleeps on a peer's progress
// with a futex on a "doorbell" word that the peer increments and wakes.
// The words live in int32 tensors mapped from /dev/shm by every rank of the
// host, so the futexes are the shared (not process-private) kind.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <ctime>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "dist_rec/checks.h"

namespace dist_rec {
namespace {

using at::Tensor;

int32_t* word(const char* op, const Tensor& flags, int64_t index) {
  DIST_REC_CHECK_CPU(op, flags);
  DIST_REC_CHECK_DTYPE(op, flags, at::kInt);
  DIST_REC_CHECK_CONTIGUOUS(op, flags);
  DIST_REC_CHECK_INDEX(op, index >= 0 && index < flags.numel(), "index ", index, " is outside flags of ", flags.numel());
  return flags.data_ptr<int32_t>() + index;
}

// Publishes `value` after every earlier write of this thread (the data it
// announces) is visible.
void shm_store(const Tensor& flags, int64_t index, int64_t value) {
  int32_t* w = word("_shm_store", flags, index);
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  __atomic_store_n(w, static_cast<int32_t>(value), __ATOMIC_RELEASE);
}

// The word's current value, ordered before the reads that follow it.
int64_t shm_load(const Tensor& flags, int64_t index) {
  return __atomic_load_n(word("_shm_load", flags, index), __ATOMIC_ACQUIRE);
}

// Increments a doorbell and wakes whoever sleeps on it.
void shm_ring(const Tensor& flags, int64_t index) {
  int32_t* w = word("_shm_ring", flags, index);
  __atomic_fetch_add(w, 1, __ATOMIC_SEQ_CST);
#if defined(__linux__)
  syscall(SYS_futex, w, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
#endif
}

// Sleeps while the doorbell still reads `seen`, at most timeout_ms;
// returns its value then. Callers re-check their condition (wake-ups may
// be spurious).
int64_t shm_sleep(const Tensor& flags, int64_t index, int64_t seen, int64_t timeout_ms) {
  int32_t* w = word("_shm_sleep", flags, index);
#if defined(__linux__)
  if (__atomic_load_n(w, __ATOMIC_ACQUIRE) == static_cast<int32_t>(seen)) {
    timespec timeout{static_cast<time_t>(timeout_ms / 1000), static_cast<long>((timeout_ms % 1000) * 1000000)};
    syscall(SYS_futex, w, FUTEX_WAIT, static_cast<int32_t>(seen), &timeout, nullptr, 0);
  }
#else
  (void)seen;
  (void)timeout_ms;
#endif
  return __atomic_load_n(w, __ATOMIC_ACQUIRE);
}

} // namespace

TORCH_LIBRARY_FRAGMENT(dist_rec, m) {
  m.def("_shm_store(Tensor(a!) flags, int index, int value) -> ()");
  m.def("_shm_load(Tensor flags, int index) -> int");
  m.def("_shm_ring(Tensor(a!) flags, int index) -> ()");
  m.def("_shm_sleep(Tensor flags, int index, int seen, int timeout_ms) -> int");
}

TORCH_LIBRARY_IMPL(dist_rec, CPU, m) {
  m.impl("_shm_store", &shm_store);
  m.impl("_shm_load", &shm_load);
  m.impl("_shm_ring", &shm_ring);
  m.impl("_shm_sleep", &shm_sleep);
}

} // namespace dist_rec
