// Parallel least-significant-digit radix sort of (key, value) pairs.
//
// Used by the fused backward to group every occurrence of a row together
// ("exact" optimizer semantics). The sort is stable, and each pass splits the
// input into fixed chunks processed in order, so the result is the unique
// stable order whatever the thread count: backward results are identical for
// any number of threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace dist_rec::cpu {

// Digits of at most this many bits: 2^11 counters per chunk stay in L1.
constexpr int kRadixMaxDigitBits = 11;
// Below this many pairs a pass runs on one thread.
constexpr int64_t kRadixParallelMin = 1 << 15;

inline int bits_needed(uint64_t max_key) {
  int bits = 0;
  while (bits < 64 && (max_key >> bits) != 0) {
    ++bits;
  }
  return bits;
}

// Sorts keys[0:n] (and values alongside) in place by the low `key_bits` bits,
// using tmp_keys/tmp_values (same sizes) as scratch.
template <typename K>
void radix_sort_pairs(K* keys, uint32_t* values, K* tmp_keys, uint32_t* tmp_values, int64_t n, int key_bits) {
  if (n <= 1 || key_bits == 0) {
    return;
  }
  const int passes = (key_bits + kRadixMaxDigitBits - 1) / kRadixMaxDigitBits;
  const int digit_bits = (key_bits + passes - 1) / passes;
  const int64_t buckets = int64_t{1} << digit_bits;
  // Inside a parallel region (one table per thread) the passes run on this
  // thread alone.
  const int64_t chunks =
      n < kRadixParallelMin || at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk_size = (n + chunks - 1) / chunks;
  std::vector<int64_t> counts(chunks * buckets);

  K* src_keys = keys;
  uint32_t* src_values = values;
  K* dst_keys = tmp_keys;
  uint32_t* dst_values = tmp_values;
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * digit_bits;
    const K mask = static_cast<K>(buckets - 1);
    std::fill(counts.begin(), counts.end(), 0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* count = counts.data() + c * buckets;
        const int64_t end = std::min(n, (c + 1) * chunk_size);
        for (int64_t i = c * chunk_size; i < end; ++i) {
          ++count[(src_keys[i] >> shift) & mask];
        }
      }
    });
    // Exclusive prefix over (bucket, chunk): chunk c writes its bucket-k
    // elements after those of chunks < c, which keeps the sort stable.
    int64_t running = 0;
    for (int64_t k = 0; k < buckets; ++k) {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t count = counts[c * buckets + k];
        counts[c * buckets + k] = running;
        running += count;
      }
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* next = counts.data() + c * buckets;
        const int64_t end = std::min(n, (c + 1) * chunk_size);
        for (int64_t i = c * chunk_size; i < end; ++i) {
          const int64_t slot = next[(src_keys[i] >> shift) & mask]++;
          dst_keys[slot] = src_keys[i];
          dst_values[slot] = src_values[i];
        }
      }
    });
    std::swap(src_keys, dst_keys);
    std::swap(src_values, dst_values);
  }
  if (src_keys != keys) {
    std::copy(src_keys, src_keys + n, keys);
    std::copy(src_values, src_values + n, values);
  }
}

// Sorts items[0:n], on this thread, by their high 32 bits (the key; the
// low 32 bits ride along), stably, by the key's low `key_bits` bits (at
// most 32), with tmp (n items) for scratch; returns whichever of the two
// holds the result (tmp after an odd number of passes: no copy back). One 8-byte store an item per pass,
// where a key and its value in arrays of their own take two stores to two
// streams of lines; and every pass's counts come from one read. On an
// Intel Xeon (AVX-512, 2 MB of L2 per core), 164K keys of 20 bits: 9.0-10.7
// ns a key with the packing pass, against 10.5-12.1 for radix_sort_pairs.
inline uint64_t* radix_sort_packed(uint64_t* items, uint64_t* tmp, int64_t n, int key_bits) {
  if (n <= 1 || key_bits == 0) {
    return items;
  }
  const int passes = (key_bits + kRadixMaxDigitBits - 1) / kRadixMaxDigitBits;
  const int digit_bits = (key_bits + passes - 1) / passes;
  const int64_t buckets = int64_t{1} << digit_bits;
  const uint64_t mask = static_cast<uint64_t>(buckets - 1);
  std::vector<int64_t> counts(passes * buckets, 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t key = items[i] >> 32;
    for (int pass = 0; pass < passes; ++pass) {
      ++counts[pass * buckets + ((key >> (pass * digit_bits)) & mask)];
    }
  }
  uint64_t* src = items;
  uint64_t* dst = tmp;
  for (int pass = 0; pass < passes; ++pass) {
    int64_t* next = counts.data() + pass * buckets;
    int64_t running = 0;
    for (int64_t k = 0; k < buckets; ++k) {
      const int64_t count = next[k];
      next[k] = running;
      running += count;
    }
    const int shift = 32 + pass * digit_bits;
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t item = src[i];
      dst[next[(item >> shift) & mask]++] = item;
    }
    std::swap(src, dst);
  }
  return src;
}

} // namespace dist_rec::cpu
