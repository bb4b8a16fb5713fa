// CPU implementations of the pooled-embedding ops (schemas in
// embedding_bag_ops.cpp). This file validates arguments, splits the work
// across threads and, for the backward passes, groups the occurrences of each
// row; the per-row arithmetic lives in kernels/, built once per ISA.
//
// Shape legend: B batch, F feature slots, T tables, N indices, U unique rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dist_rec/checks.h"
#include "embedding_bag/embedding_bag_checks.h"
#include "embedding_bag/kernels/kernel_api.h"
#include "embedding_bag/radix_sort.h"
#include "memory/host_allocator.h"

namespace dist_rec {
namespace {

using at::Tensor;
using at::TensorList;
using c10::IntArrayRef;

// ---------------------------------------------------------------------------
// Process-wide test hooks
// ---------------------------------------------------------------------------

std::atomic<const cpu::KernelTable*> g_kernel_override{nullptr};
std::atomic<bool> g_index_checks{true};

const cpu::KernelTable& kernels() {
  return cpu::current_kernels();
}

std::string set_cpu_isa(c10::string_view isa) {
  const std::string previous = kernels().isa_name;
  if (isa.empty()) {
    g_kernel_override.store(nullptr);
    return previous;
  }
  const cpu::KernelTable* supported[3];
  const int n = cpu::supported_isas(supported, 3);
  for (int i = 0; i < n; ++i) {
    if (isa == supported[i]->isa_name) {
      g_kernel_override.store(supported[i]);
      return previous;
    }
  }
  TORCH_CHECK_VALUE(false, "_set_cpu_isa: '", isa, "' is not supported by this CPU (see _supported_cpu_isas())");
  return previous;
}

std::vector<std::string> supported_cpu_isas() {
  const cpu::KernelTable* supported[3];
  const int n = cpu::supported_isas(supported, 3);
  std::vector<std::string> names;
  for (int i = 0; i < n; ++i) {
    names.emplace_back(supported[i]->isa_name);
  }
  return names;
}

bool set_index_checks(bool enabled) {
  return g_index_checks.exchange(enabled);
}

// ---------------------------------------------------------------------------
// Validation: turn the op's arguments into kernel views, or explain why not
// ---------------------------------------------------------------------------

struct Problem {
  BagLayout layout;
  std::vector<cpu::TableView> tables;
  std::vector<cpu::FeatureView> features;
  int64_t batch = 0; // B
  int64_t num_indices = 0; // N
  int64_t out_dim = 0;
  cpu::WeightType weight_type = cpu::WeightType::kFloat;
  bool int32_indices = false;
  bool any_mean = false;
};

cpu::WeightType weight_type_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return cpu::WeightType::kHalf;
    case at::kBFloat16:
      return cpu::WeightType::kBFloat16;
    default: // check_bag_layout admits float32, float16, bfloat16 only
      return cpu::WeightType::kFloat;
  }
}

template <typename I>
void check_offsets(const char* op, const Tensor& offsets, int64_t batch, int64_t num_indices) {
  const I* o = offsets.const_data_ptr<I>();
  const int64_t n = offsets.numel();
  DIST_REC_CHECK_VALUE(op, o[0] == 0, "offsets[0] must be 0; it is ", static_cast<int64_t>(o[0]));
  for (int64_t i = 0; i + 1 < n; ++i) {
    if (o[i] > o[i + 1]) {
      const int64_t feature = batch > 0 ? i / batch : 0;
      DIST_REC_CHECK_VALUE(
          op,
          false,
          "offsets must be non-decreasing, but offsets[",
          i,
          "]=",
          static_cast<int64_t>(o[i]),
          " > offsets[",
          i + 1,
          "]=",
          static_cast<int64_t>(o[i + 1]),
          " (bag of feature slot ",
          feature,
          ", sample ",
          i - feature * batch,
          ")");
    }
  }
  DIST_REC_CHECK_VALUE(
      op,
      static_cast<int64_t>(o[n - 1]) == num_indices,
      "offsets must end at len(indices)=",
      num_indices,
      "; offsets[-1]=",
      static_cast<int64_t>(o[n - 1]));
}

Problem make_problem(
    const char* op,
    TensorList weights,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights) {
  const BagLayout layout = check_bag_layout(
      op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  DIST_REC_CHECK_CPU(op, weights[0]);
  Problem p;
  p.layout = layout;
  p.weight_type = weight_type_of(layout.weight_dtype);
  p.batch = layout.batch;
  p.num_indices = layout.num_indices;
  p.out_dim = layout.out_dim;
  p.int32_indices = layout.int32_indices;
  for (const Tensor& w : weights) {
    p.tables.push_back(cpu::TableView{const_cast<void*>(w.const_data_ptr()), w.size(0), w.size(1), nullptr, nullptr});
  }
  for (int64_t f = 0; f < layout.num_features; ++f) {
    p.features.push_back(cpu::FeatureView{
        static_cast<int32_t>(feature_table[f]), static_cast<int32_t>(feature_pooling[f]), feature_column[f]});
    p.any_mean = p.any_mean || feature_pooling[f] == 1;
  }
  if (p.int32_indices) {
    check_offsets<int32_t>(op, offsets, p.batch, p.num_indices);
  } else {
    check_offsets<int64_t>(op, offsets, p.batch, p.num_indices);
  }
  return p;
}

void check_grad_output(const char* op, const Problem& p, const Tensor& grad_output) {
  dist_rec::check_grad_output(op, p.layout, grad_output);
}

void attach_state(const char* op, const char* name, Problem& p, TensorList weights, TensorList state, int slot) {
  check_row_state(op, name, weights, state);
  for (size_t t = 0; t < state.size(); ++t) {
    float* data = const_cast<float*>(state[t].const_data_ptr<float>());
    (slot == 0 ? p.tables[t].state0 : p.tables[t].state1) = data;
  }
}

cpu::WeightDecayMode weight_decay_mode_of(const char* op, int64_t mode) {
  check_weight_decay_mode(op, mode);
  return static_cast<cpu::WeightDecayMode>(mode);
}

// ---------------------------------------------------------------------------
// Work splitting
// ---------------------------------------------------------------------------

// Splits the bags into chunks of about equal (indices + bags), so features of
// different pooling factors still spread evenly over threads.
template <typename I>
std::vector<int64_t> bag_chunks(const I* offsets, int64_t num_bags, int64_t num_indices) {
  const int64_t threads = at::get_num_threads();
  const int64_t work = num_indices + num_bags;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads * 16, work / 4096));
  std::vector<int64_t> bounds{0};
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = work * c / chunks;
    // First bag whose (offsets[bag] + bag) reaches the target.
    int64_t lo = bounds.back(), hi = num_bags;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (static_cast<int64_t>(offsets[mid]) + mid < target) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    bounds.push_back(lo);
  }
  bounds.push_back(num_bags);
  return bounds;
}

// Threads take the chunks in order, each the next one free when it is done
// with its last (not a fixed share each): on a shared machine one core is
// often slower for a while, and a fixed split waits for it.
// fn(task, worker): worker < min(tasks, threads), one per thread at a time.
template <typename Fn>
void for_each_task(int64_t tasks, const Fn& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t worker, int64_t) {
    for (int64_t c = next++; c < tasks; c = next++) {
      fn(c, worker);
    }
  });
}

template <typename Fn>
void for_each_chunk(const std::vector<int64_t>& bounds, const Fn& fn) {
  for_each_task(static_cast<int64_t>(bounds.size()) - 1, [&](int64_t c, int64_t) {
    if (bounds[c] < bounds[c + 1]) {
      fn(bounds[c], bounds[c + 1]);
    }
  });
}

void atomic_min(std::atomic<int64_t>& target, int64_t value) {
  int64_t current = target.load();
  while (value < current && !target.compare_exchange_weak(current, value)) {
  }
}

template <typename I>
[[noreturn]] void throw_bad_index(const char* op, const Problem& p, const Tensor& indices, const Tensor& offsets, int64_t pos) {
  const I* o = offsets.const_data_ptr<I>();
  const int64_t num_bags = offsets.numel() - 1;
  // The bag holding position pos: last bag whose start is <= pos and is non-empty.
  const int64_t bag = std::upper_bound(o, o + num_bags + 1, static_cast<I>(pos)) - o - 1;
  const int64_t table = p.features[bag / p.batch].table;
  const int64_t id = static_cast<int64_t>(indices.const_data_ptr<I>()[pos]);
  throw_id_out_of_range(op, pos, id, bag, p.batch, table, p.tables[table].rows);
}

void throw_bad_index_any(const char* op, const Problem& p, const Tensor& indices, const Tensor& offsets, int64_t pos) {
  if (p.int32_indices) {
    throw_bad_index<int32_t>(op, p, indices, offsets, pos);
  }
  throw_bad_index<int64_t>(op, p, indices, offsets, pos);
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename I>
void forward_impl(const Problem& p, const Tensor& indices, const Tensor& offsets, const float* psw, Tensor& out) {
  cpu::ForwardArgs args{
      p.tables.data(),
      p.features.data(),
      p.batch,
      indices.const_data_ptr(),
      offsets.const_data_ptr(),
      psw,
      out.mutable_data_ptr<float>(),
      p.out_dim,
      p.weight_type};
  const auto& k = kernels();
  const bool checks = g_index_checks.load(std::memory_order_relaxed);
  auto* forward = p.int32_indices ? (checks ? k.forward_i32 : k.forward_unchecked_i32)
                                  : (checks ? k.forward_i64 : k.forward_unchecked_i64);
  const int64_t num_bags = offsets.numel() - 1;
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  for_each_chunk(bag_chunks(offsets.const_data_ptr<I>(), num_bags, p.num_indices), [&](int64_t b0, int64_t b1) {
    const int64_t bad = forward(args, b0, b1);
    if (bad >= 0) {
      atomic_min(first_bad, bad);
    }
  });
  if (first_bad.load() != std::numeric_limits<int64_t>::max()) {
    throw_bad_index_any("embedding_bag_forward", p, indices, offsets, first_bad.load());
  }
}

Tensor embedding_bag_forward_cpu(
    TensorList weights,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights) {
  const char* op = "embedding_bag_forward";
  const Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  Tensor out = empty_recycled({p.batch, p.out_dim}, at::kFloat);
  const float* psw = per_sample_weights.has_value() ? per_sample_weights->const_data_ptr<float>() : nullptr;
  if (p.int32_indices) {
    forward_impl<int32_t>(p, indices, offsets, psw, out);
  } else {
    forward_impl<int64_t>(p, indices, offsets, psw, out);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Backward: group each row's occurrences (sort), then one update per row
// ---------------------------------------------------------------------------

// Grow-only scratch buffers, one set per thread, so that a training loop
// does not fault in fresh pages for its sort buffers at every step: the
// calling thread's holds the batch's arrays, and each thread's (the
// caller's too) the table it is sorting (kTable*: 16 bytes a slot of the
// largest table that thread has sorted, 24 with 64-bit keys, 40 for a
// thread that has sorted both; kept for the thread's life).
enum class Scratch : int {
  kKeys,
  kPayload,
  kGradOffset,
  kScale,
  kTmpKeys,
  kTmpPayload,
  kTableKeys,
  kTablePayload,
  kTableTmpKeys,
  kTableTmpPayload,
  kTableItems,
  kTableTmpItems,
  kOccBegin,
  kOccGradOffset,
  kOccScale,
  kSegTable,
  kSegRow,
  kGradBlocks,
  kCount
};

class Workspace {
 public:
  template <typename T>
  T* take(Scratch slot, int64_t count) {
    auto& buffer = buffers_[static_cast<int>(slot)];
    const size_t bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
    if (buffer.size < bytes) {
      buffer.data = empty_hugepage({static_cast<int64_t>(bytes + bytes / 4)}, at::kByte);
      buffer.size = bytes + bytes / 4;
    }
    return static_cast<T*>(buffer.data.mutable_data_ptr());
  }

 private:
  // On huge pages (above 2 MiB): the sort and the segment pass read and
  // write them at random. Same-process A/B against plain pages (Intel Xeon,
  // 2 threads): the backward took 0.955x the time at 8x1Mx64 B=8192
  // uniform, 0.98x at B=2048 and 8x1Mx128 B=8192 Zipf, the same at 8x1Mx64
  // B=2048 Zipf.
  struct Buffer {
    Tensor data;
    size_t size = 0;
  };
  Buffer buffers_[static_cast<int>(Scratch::kCount)];
};

thread_local Workspace t_workspace;

// Table t's segments (one per unique row, in row order) are [first[t],
// end[t]): they start at the table's first slot, so that each table writes
// its own as soon as it is sorted, without waiting for the counts of the
// tables before it. The indices from end[t] to first[t + 1] are unused,
// except that occ_begin[end[t]] is always first[t + 1], where table t's
// occurrences end.
struct Segments {
  std::vector<int64_t> first; // [T+1], first[T] = N
  std::vector<int64_t> end; // [T]
  int64_t num_segments = 0; // U, all tables
  const int64_t* occ_begin = nullptr; // by segment index; occ_begin[N] = N
  const int32_t* seg_table = nullptr; // by segment index
  const int64_t* seg_row = nullptr; // by segment index
  const int64_t* occ_grad_offset = nullptr; // [N], in sorted order
  const float* occ_scale = nullptr; // [N] in sorted order, or null
};

// Where each table's occurrences go before sorting: table t owns slots
// [begin[t], begin[t+1]), and its features' position ranges are laid there
// one after another in feature order, so a table's slots list its positions
// in increasing order (which keeps the stable sort's result unique).
struct TableRegions {
  std::vector<int64_t> begin; // [T+1]
  std::vector<int64_t> feature_slot; // [F] first slot of each feature
  std::vector<std::vector<int64_t>> features; // [T] the features reading each table, in order
};

template <typename I>
TableRegions table_regions(const Problem& p, const I* off) {
  const int64_t num_tables = static_cast<int64_t>(p.tables.size());
  const int64_t num_features = static_cast<int64_t>(p.features.size());
  TableRegions r;
  r.begin.assign(num_tables + 1, 0);
  r.features.resize(num_tables);
  for (int64_t f = 0; f < num_features; ++f) {
    r.begin[p.features[f].table + 1] += static_cast<int64_t>(off[(f + 1) * p.batch] - off[f * p.batch]);
    r.features[p.features[f].table].push_back(f);
  }
  for (int64_t t = 0; t < num_tables; ++t) {
    r.begin[t + 1] += r.begin[t];
  }
  std::vector<int64_t> cursor(r.begin.begin(), r.begin.end() - 1);
  r.feature_slot.resize(num_features);
  for (int64_t f = 0; f < num_features; ++f) {
    const int32_t t = p.features[f].table;
    r.feature_slot[f] = cursor[t];
    cursor[t] += static_cast<int64_t>(off[(f + 1) * p.batch] - off[f * p.batch]);
  }
  return r;
}

// What the segment pass writes, and (when the sort carried positions or
// bags rather than gradient offsets) what it gathers by them.
struct SegmentSink {
  int64_t* occ_begin;
  int32_t* seg_table;
  int64_t* seg_row;
  int64_t* occ_grad_offset;
  float* occ_scale; // or null
  const int64_t* grad_offset; // by payload (position or bag), or null: the payload is the gradient offset
  const float* scale; // by payload, or null
  // Entries of positions that start no segment go to a discard slot, one per
  // writer (no branch): the w-th at discard + kDiscardStride * w. They lie a
  // cache line apart (16 entries: 64 bytes of int32, 128 of int64) and past
  // every segment: adjacent, they shared lines that two threads wrote at
  // most positions, and the step took up to ten times longer on some
  // batches (measured).
  int64_t discard;
};
constexpr int64_t kDiscardStride = 16;

// A table's slots, as the sort leaves them: keys and payloads in arrays of
// their own, or packed in one (radix_sort_packed's items: key << 32 |
// payload).
template <typename K>
struct PairSlots {
  K* keys;
  uint32_t* payloads;
  K key(int64_t i) const {
    return keys[i];
  }
  uint32_t payload(int64_t i) const {
    return payloads[i];
  }
  void put(int64_t i, K key, uint32_t payload) const {
    keys[i] = key;
    payloads[i] = payload;
  }
};

struct PackedSlots {
  uint64_t* items;
  uint32_t key(int64_t i) const {
    return static_cast<uint32_t>(items[i] >> 32);
  }
  uint32_t payload(int64_t i) const {
    return static_cast<uint32_t>(items[i]);
  }
  void put(int64_t i, uint32_t key, uint32_t payload) const {
    items[i] = static_cast<uint64_t>(key) << 32 | payload;
  }
};

// Whether sorted slot i of a table starts a segment.
// Branch-free: whether a row repeats is data (a third of the positions
// start a segment at Zipf ids), and a branch on it mispredicted often.
template <typename Slots>
inline int64_t starts_segment(const Slots& slots, int64_t i) {
  return static_cast<int64_t>((i == 0) | (slots.key(i) != slots.key(i > 0 ? i - 1 : 0)));
}

// Writes sorted slots [i0, i1) of table t (indexed from the table's first
// slot `first`): each occurrence's gradient offset and weight, in sorted
// order (the kernels then read them in order, where they would gather them
// by position), and a segment at index s, s + 1, ... for each slot that
// starts one. Returns the next segment index.
template <typename Slots>
int64_t write_segments(
    const SegmentSink& o,
    int32_t t,
    int64_t first,
    const Slots& slots,
    int64_t i0,
    int64_t i1,
    int64_t s,
    int64_t writer) {
  // The gathers by position miss the cache (by bag, less often): fetched
  // this many slots ahead.
  constexpr int64_t kGatherAhead = 16;
  const int64_t discard = o.discard + kDiscardStride * writer;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t slot = first + i;
    const uint32_t pay = slots.payload(i);
    if (o.grad_offset == nullptr) {
      o.occ_grad_offset[slot] = pay;
    } else {
      if (i + kGatherAhead < i1) {
        const uint32_t pay_ahead = slots.payload(i + kGatherAhead);
        __builtin_prefetch(o.grad_offset + pay_ahead);
        if (o.occ_scale != nullptr) {
          __builtin_prefetch(o.scale + pay_ahead);
        }
      }
      o.occ_grad_offset[slot] = o.grad_offset[pay];
      if (o.occ_scale != nullptr) {
        o.occ_scale[slot] = o.scale[pay];
      }
    }
    const int64_t start = starts_segment(slots, i);
    const int64_t at = start != 0 ? s : discard;
    o.occ_begin[at] = slot;
    o.seg_table[at] = t;
    o.seg_row[at] = static_cast<int64_t>(slots.key(i));
    s += start;
  }
  return s;
}

// Fills, sorts and writes the segments of each table (fill_bags(b0, b1,
// slots, first) writes bags [b0, b1) into the slots of the table starting
// at slot `first`: PairSlots or PackedSlots); sets seg_end.
//
// A table's sort needs only the bits of its own row count and stays in
// cache, where one sort of all tables by (table, row) needed a pass more
// over the whole batch and scattered it across memory (half the backward's
// time at dim 16, measured). Tables go one per thread, largest first, each
// to whichever thread is free, in that thread's own scratch: filled,
// sorted, and its segments written while its slots are in L2, the scratch
// reused from table to table. Against doing it in buffers of the batch
// (each table's part of them cold, and the segments a pass of their own
// over the batch), the backward took 0.89-0.97x the time (Intel Xeon, 2
// threads, row-wise AdaGrad, 8 tables of 1M rows, dims 64 and 128, B 2048
// and 8192, uniform and Zipf ids; 17.25 -> 16.35 ms at dim 64, B=2048,
// uniform). Only a table too large for that to balance (more than a
// thread's share of what is left) is filled, sorted and segmented over all
// threads in the batch's buffers, since a split sort synchronises twice
// per pass: 8 tables of 41K ids took 4.1 ms split, 1.6 ms one per thread
// (2 threads, measured).
//
// Once a bad id is seen, no table whose fill ends after that is sorted or
// written; every table is still filled, so that the batch's first bad
// position is found.
template <typename K, typename FillBags>
void group_each_table(
    const Problem& p,
    const TableRegions& r,
    const FillBags& fill_bags,
    const std::atomic<int64_t>& first_bad,
    const SegmentSink& sink,
    Workspace& ws,
    std::vector<int64_t>& seg_end) {
  const int64_t num_tables = static_cast<int64_t>(p.tables.size());
  const int64_t n = r.begin[num_tables];
  const auto size_of = [&](int64_t t) { return r.begin[t + 1] - r.begin[t]; };
  const auto failed = [&] { return first_bad.load(std::memory_order_relaxed) != std::numeric_limits<int64_t>::max(); };
  const auto key_bits = [&](int64_t t) {
    return cpu::bits_needed(static_cast<uint64_t>(std::max<int64_t>(p.tables[t].rows - 1, 0)));
  };
  // Table t's bags: B per feature of t, the j-th of them at bag
  // features[t][j / B] * B + j % B.
  const auto fill_table_bags = [&](int64_t t, int64_t j0, int64_t j1, const auto& slots) {
    while (j0 < j1) {
      const int64_t f = j0 / p.batch;
      const int64_t end = std::min(j1, (f + 1) * p.batch);
      const int64_t first_bag = r.features[t][f] * p.batch - f * p.batch;
      fill_bags(first_bag + j0, first_bag + end, slots, r.begin[t]);
      j0 = end;
    }
  };
  // Table t's segments are written; its occurrences end at first[t + 1].
  const auto close_table = [&](int64_t t, int64_t end) {
    seg_end[t] = end;
    if (end < r.begin[t + 1]) {
      sink.occ_begin[end] = r.begin[t + 1];
    }
  };

  std::vector<int64_t> order(num_tables);
  for (int64_t t = 0; t < num_tables; ++t) {
    order[t] = t;
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return size_of(x) > size_of(y); });
  const int64_t threads = at::get_num_threads();
  int64_t rest = n;
  size_t first_whole = 0;
  for (; first_whole < order.size(); ++first_whole) {
    const int64_t t = order[first_whole];
    const int64_t size = size_of(t);
    if (threads == 1 || size < cpu::kRadixParallelMin || size * threads <= rest) {
      break;
    }
    rest -= size;
    K* k = ws.take<K>(Scratch::kKeys, n) + r.begin[t];
    uint32_t* pay = ws.take<uint32_t>(Scratch::kPayload, n) + r.begin[t];
    const int64_t bags = static_cast<int64_t>(r.features[t].size()) * p.batch;
    const PairSlots<K> slots{k, pay};
    at::parallel_for(0, bags, 256, [&](int64_t j0, int64_t j1) { fill_table_bags(t, j0, j1, slots); });
    if (failed()) {
      continue;
    }
    cpu::radix_sort_pairs<K>(
        k,
        pay,
        ws.take<K>(Scratch::kTmpKeys, n) + r.begin[t],
        ws.take<uint32_t>(Scratch::kTmpPayload, n) + r.begin[t],
        size,
        key_bits(t));
    // Segments counted per chunk, then written from each chunk's first.
    const int64_t chunks = size < (1 << 16) ? 1 : threads;
    const int64_t chunk_size = (size + chunks - 1) / chunks;
    std::vector<int64_t> chunk_first(chunks + 1, 0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t count = 0;
        for (int64_t i = c * chunk_size, end = std::min(size, (c + 1) * chunk_size); i < end; ++i) {
          count += starts_segment(slots, i);
        }
        chunk_first[c + 1] = count;
      }
    });
    chunk_first[0] = r.begin[t];
    for (int64_t c = 0; c < chunks; ++c) {
      chunk_first[c + 1] += chunk_first[c];
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t end = std::min(size, (c + 1) * chunk_size);
        write_segments(sink, static_cast<int32_t>(t), r.begin[t], slots, c * chunk_size, end, chunk_first[c], c);
      }
    });
    close_table(t, chunk_first[chunks]);
  }

  for_each_task(static_cast<int64_t>(order.size() - first_whole), [&](int64_t i, int64_t worker) {
    const int64_t t = order[first_whole + i];
    const int64_t size = size_of(t);
    const int64_t bags = static_cast<int64_t>(r.features[t].size()) * p.batch;
    Workspace& own = t_workspace; // this thread's
    // Rows of 32 bits or fewer: key and payload sorted as one 8-byte item.
    // Same-process A/B on an Intel Xeon (AVX-512), 2 threads, against keys
    // and payloads in arrays of their own: the backward took 0.97-0.98x the
    // time at 8x1Mx64 B=2048 and B=8192, uniform ids (2026-12-07).
    // sort(slots) returns the slots that hold the sorted table.
    const auto group = [&](const auto& slots, const auto& sort) {
      fill_table_bags(t, 0, bags, slots);
      if (failed()) {
        return;
      }
      close_table(t, write_segments(sink, static_cast<int32_t>(t), r.begin[t], sort(slots), 0, size, r.begin[t], worker));
    };
    if constexpr (sizeof(K) == sizeof(uint32_t)) {
      group(PackedSlots{own.take<uint64_t>(Scratch::kTableItems, size)}, [&](const PackedSlots& slots) {
        return PackedSlots{
            cpu::radix_sort_packed(slots.items, own.take<uint64_t>(Scratch::kTableTmpItems, size), size, key_bits(t))};
      });
    } else {
      group(PairSlots<K>{own.take<K>(Scratch::kTableKeys, size), own.take<uint32_t>(Scratch::kTablePayload, size)},
            [&](const PairSlots<K>& slots) {
              cpu::radix_sort_pairs<K>(
                  slots.keys,
                  slots.payloads,
                  own.take<K>(Scratch::kTableTmpKeys, size),
                  own.take<uint32_t>(Scratch::kTableTmpPayload, size),
                  size,
                  key_bits(t)); // on this thread only, in place
              return slots;
            });
    }
  });
}

template <typename I, typename K>
Segments group_by_row(
    const char* op,
    const Problem& p,
    const Tensor& indices,
    const Tensor& offsets,
    const float* psw,
    Workspace& ws) {
  const int64_t n = p.num_indices;
  const int64_t num_tables = static_cast<int64_t>(p.tables.size());
  const I* idx = indices.const_data_ptr<I>();
  const I* off = offsets.const_data_ptr<I>();
  const TableRegions regions = table_regions(p, off);
  // What each slot carries through the sort. The sort is stable and a
  // table's slots start in position order, so the payload need not be the
  // position (which the segment pass would use to gather the gradient
  // offset and weight of each occurrence: 12 bytes an id, read at random):
  // - without weights, the bag's gradient offset itself, which the segment
  //   pass copies in order;
  // - with mean pooling but no per-sample weights, the bag, whose gradient
  //   offset and 1/L it reads from arrays by bag (12 bytes a bag: in cache);
  // - with per-sample weights, the position.
  enum class Payload { kGradOffset, kBag, kPosition };
  const int64_t num_bags = static_cast<int64_t>(p.features.size()) * p.batch;
  const bool weighted = psw != nullptr || p.any_mean;
  const Payload payload =
      !weighted && static_cast<uint64_t>(p.batch) * static_cast<uint64_t>(p.out_dim) <= UINT32_MAX ? Payload::kGradOffset
      : psw == nullptr && static_cast<uint64_t>(num_bags) <= UINT32_MAX                            ? Payload::kBag
                                                                                                   : Payload::kPosition;
  const int64_t entries = payload == Payload::kBag ? num_bags : n; // of grad_offset and scale
  float* scale = weighted ? ws.take<float>(Scratch::kScale, entries) : nullptr;
  int64_t* grad_offset = payload == Payload::kGradOffset ? nullptr : ws.take<int64_t>(Scratch::kGradOffset, entries);

  // 1. Per position of bags [b0, b1) (group_each_table calls this with a
  //    table's bags, or a piece of them): its row and payload put in its
  //    table's slots (PairSlots or PackedSlots, from slot `first`), and (by
  //    position, or by bag) where its bag's gradient sits in grad_output's
  //    feature blocks and its weight (per-sample x 1/L). A range stops at its first
  //    bad id; first_bad keeps the smallest, thrown below once every table
  //    is filled and before anything is updated.
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  const auto fill_bags = [&](int64_t b0, int64_t b1, const auto& slots, int64_t first) {
    for (int64_t bag = b0; bag < b1; ++bag) {
      const int64_t feature = bag / p.batch;
      const int64_t sample = bag - feature * p.batch;
      const cpu::FeatureView& fv = p.features[feature];
      const int64_t rows = p.tables[fv.table].rows;
      const int64_t start = static_cast<int64_t>(off[bag]);
      const int64_t end = static_cast<int64_t>(off[bag + 1]);
      const int64_t slot = regions.feature_slot[feature] - static_cast<int64_t>(off[feature * p.batch]) - first;
      // In grad_output's feature blocks (block_grad_by_feature).
      const int64_t gofs = fv.out_col * p.batch + sample * p.tables[fv.table].dim;
      const float bag_scale =
          (fv.pooling == static_cast<int32_t>(cpu::PoolingMode::kMean) && end > start) ? 1.0f / (end - start) : 1.0f;
      if (payload == Payload::kBag) {
        grad_offset[bag] = gofs;
        if (scale != nullptr) {
          scale[bag] = bag_scale;
        }
      }
      for (int64_t i = start; i < end; ++i) {
        const int64_t id = static_cast<int64_t>(idx[i]);
        if (id < 0 || id >= rows) {
          atomic_min(first_bad, i);
          return;
        }
        if (payload == Payload::kGradOffset) {
          slots.put(slot + i, static_cast<K>(id), static_cast<uint32_t>(gofs));
        } else if (payload == Payload::kBag) {
          slots.put(slot + i, static_cast<K>(id), static_cast<uint32_t>(bag));
        } else {
          slots.put(slot + i, static_cast<K>(id), static_cast<uint32_t>(i));
          grad_offset[i] = gofs;
          if (scale != nullptr) {
            scale[i] = psw != nullptr ? psw[i] * bag_scale : bag_scale;
          }
        }
      }
    }
  };

  // 2. Each table sorted by row, stably, just after 1. fills it:
  //    occurrences of a row become adjacent, in position order, so each
  //    row's gradient is summed in a fixed order. 3. Its segments (one per
  //    unique row) written from its first slot on.
  const int64_t slots = n + 1 + kDiscardStride * (at::get_num_threads() + 1);
  SegmentSink sink{};
  sink.occ_begin = ws.take<int64_t>(Scratch::kOccBegin, slots);
  sink.seg_table = ws.take<int32_t>(Scratch::kSegTable, slots);
  sink.seg_row = ws.take<int64_t>(Scratch::kSegRow, slots);
  sink.occ_grad_offset = ws.take<int64_t>(Scratch::kOccGradOffset, n);
  sink.occ_scale = scale != nullptr ? ws.take<float>(Scratch::kOccScale, n) : nullptr;
  sink.grad_offset = grad_offset;
  sink.scale = scale;
  sink.discard = n + 1 + kDiscardStride;
  Segments segs;
  segs.end.assign(num_tables, 0);
  group_each_table<K>(p, regions, fill_bags, first_bad, sink, ws, segs.end);
  if (first_bad.load() != std::numeric_limits<int64_t>::max()) {
    throw_bad_index_any(op, p, indices, offsets, first_bad.load());
  }
  sink.occ_begin[n] = n;

  segs.first = regions.begin;
  for (int64_t t = 0; t < num_tables; ++t) {
    segs.num_segments += segs.end[t] - segs.first[t];
  }
  segs.occ_begin = sink.occ_begin;
  segs.seg_table = sink.seg_table;
  segs.seg_row = sink.seg_row;
  segs.occ_grad_offset = sink.occ_grad_offset;
  segs.occ_scale = sink.occ_scale;
  return segs;
}

Segments group_by_row_any(
    const char* op,
    const Problem& p,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    Workspace& ws) {
  DIST_REC_CHECK_VALUE(
      op,
      p.num_indices < (int64_t{1} << 31),
      "a batch may hold at most 2^31 - 1 indices; got ",
      p.num_indices);
  const float* psw = per_sample_weights.has_value() ? per_sample_weights->const_data_ptr<float>() : nullptr;
  int64_t max_rows = 0;
  for (const cpu::TableView& t : p.tables) {
    max_rows = std::max(max_rows, t.rows);
  }
  const bool narrow_keys = max_rows <= (int64_t{1} << 32);
  if (p.int32_indices) {
    return narrow_keys ? group_by_row<int32_t, uint32_t>(op, p, indices, offsets, psw, ws)
                       : group_by_row<int32_t, uint64_t>(op, p, indices, offsets, psw, ws);
  }
  return narrow_keys ? group_by_row<int64_t, uint32_t>(op, p, indices, offsets, psw, ws)
                     : group_by_row<int64_t, uint64_t>(op, p, indices, offsets, psw, ws);
}

// The first NaN or inf of grad_output, by sample, column, feature and
// table. Python's fused update turns it into a FloatingPointError naming
// the tables (it keys on "holds NaN or inf").
[[noreturn]] void throw_non_finite_gradient(const char* op, const Problem& p, const float* grad_output) {
  const int64_t n = p.batch * p.out_dim;
  int64_t pos = 0;
  while (pos < n && std::isfinite(grad_output[pos])) {
    ++pos;
  }
  const int64_t sample = pos / std::max<int64_t>(p.out_dim, 1);
  const int64_t column = pos - sample * p.out_dim;
  int64_t feature = 0;
  for (int64_t f = 0; f < static_cast<int64_t>(p.features.size()); ++f) {
    const cpu::FeatureView& fv = p.features[f];
    if (column >= fv.out_col && column < fv.out_col + p.tables[fv.table].dim) {
      feature = f;
    }
  }
  const float bad = pos < n ? grad_output[pos] : 0.0f;
  TORCH_CHECK(
      false,
      op,
      ": grad_output holds NaN or inf (",
      std::isnan(bad) ? std::string("nan") : c10::str(bad), // whatever its sign bit
      " at sample ",
      sample,
      ", column ",
      column,
      ": feature slot ",
      feature,
      ", table ",
      p.features.empty() ? 0 : p.features[feature].table,
      "); no row was updated");
}

// grad_output [B, out_dim] copied feature by feature: feature f's columns
// become a [B, D_f] block starting at B x f's first column. A segment reads
// its occurrences' gradient rows at random samples. In place, one
// feature's rows lie out_dim floats apart, a stride that maps them onto a
// fraction of the cache's sets (an eighth at 8 features of 64 floats), so
// they came from L3 however often they were read again; a block is
// contiguous and stays in L2. Same-process A/B on an Intel Xeon, 2 threads,
// row-wise AdaGrad, the 8 standard configs (8 tables of 1M rows, dims 64
// and 128, B 2048 and 8192, uniform and Zipf ids), alternated in rounds:
// the backward took 0.85-0.92x the time of reading grad_output in place,
// the copy included.
//
// With refusing_op set, the same pass refuses a NaN or inf gradient: it
// throws, naming the op and the first such value, before any row is read
// or stepped (a fused update would poison the row and its state for good).
const float* block_grad_by_feature(const Problem& p, const Tensor& grad_output, Workspace& ws, const char* refusing_op) {
  const float* in_place = grad_output.const_data_ptr<float>();
  // One feature's block, or one sample's, is grad_output itself; with no
  // occurrences nothing reads the blocks.
  const bool copy = p.features.size() > 1 && p.batch > 1 && p.num_indices > 0;
  if (!copy && refusing_op == nullptr) {
    return in_place;
  }
  cpu::GradBlockArgs g{};
  g.tables = p.tables.data();
  g.features = p.features.data();
  g.num_features = static_cast<int64_t>(p.features.size());
  g.batch = p.batch;
  g.grad_output = in_place;
  g.out_dim = p.out_dim;
  g.blocks = copy ? ws.take<float>(Scratch::kGradBlocks, p.batch * p.out_dim) : nullptr;
  const auto& k = kernels();
  std::atomic<bool> finite{true};
  at::parallel_for(0, p.batch, 256, [&](int64_t b0, int64_t b1) {
    if (!k.block_grad_by_feature(g, b0, b1)) {
      finite.store(false, std::memory_order_relaxed);
    }
  });
  if (refusing_op != nullptr && !finite.load()) {
    throw_non_finite_gradient(refusing_op, p, in_place);
  }
  return copy ? g.blocks : in_place;
}

cpu::SegmentArgs segment_args(
    const Problem& p,
    const Segments& s,
    const Tensor& grad_output,
    Workspace& ws,
    const char* refusing_op = nullptr) {
  cpu::SegmentArgs a{};
  a.tables = p.tables.data();
  a.seg_table = s.seg_table;
  a.seg_row = s.seg_row;
  a.occ_begin = s.occ_begin;
  a.num_occurrences = p.num_indices;
  a.occ_grad_offset = s.occ_grad_offset;
  a.occ_scale = s.occ_scale;
  a.grad_output = block_grad_by_feature(p, grad_output, ws, refusing_op);
  a.weight_type = p.weight_type;
  return a;
}

// Runs fn(seg_begin, seg_end) over every table's segments, in chunks that
// each sum about the same number of occurrences plus segments (hot rows
// make segments uneven); a chunk never spans two tables (the update
// kernels take a chunk's table from its first segment).
template <typename Fn>
void for_each_segment_chunk(const Segments& s, const Fn& fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads * 4, s.num_segments / 256));
  const int64_t num_tables = static_cast<int64_t>(s.end.size());
  const int64_t work = s.first[num_tables] + s.num_segments;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  int64_t done = 0; // the work of the tables before t
  int64_t c = 1; // the next chunk boundary, at work * c / chunks
  for (int64_t t = 0; t < num_tables; ++t) {
    const int64_t first = s.first[t];
    const int64_t end = s.end[t];
    // The work before segment x of table t (x in [first, end]).
    const auto work_before = [&](int64_t x) { return done + (s.occ_begin[x] - first) + (x - first); };
    int64_t lo = first;
    for (; c < chunks && work * c / chunks < work_before(end); ++c) {
      const int64_t target = work * c / chunks;
      int64_t x = lo, hi = end; // the first segment whose work before reaches the target
      while (x < hi) {
        const int64_t mid = (x + hi) / 2;
        if (work_before(mid) < target) {
          x = mid + 1;
        } else {
          hi = mid;
        }
      }
      if (x > lo) {
        ranges.emplace_back(lo, x);
        lo = x;
      }
    }
    if (lo < end) {
      ranges.emplace_back(lo, end);
    }
    done = work_before(end);
  }
  for_each_task(static_cast<int64_t>(ranges.size()), [&](int64_t i, int64_t) {
    fn(ranges[i].first, ranges[i].second);
  });
}

template <typename Update>
void fused_backward(
    const char* op,
    Problem& p,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    const Tensor& grad_output,
    cpu::SegmentArgs hyper,
    const Update& update) {
  check_grad_output(op, p, grad_output);
  Workspace& ws = t_workspace;
  const Segments segs = group_by_row_any(op, p, indices, offsets, per_sample_weights, ws);
  cpu::SegmentArgs a = segment_args(p, segs, grad_output, ws, op);
  a.learning_rate = hyper.learning_rate;
  a.eps = hyper.eps;
  a.weight_decay = hyper.weight_decay;
  a.weight_decay_mode = hyper.weight_decay_mode;
  a.momentum_scale = hyper.momentum_scale;
  for_each_segment_chunk(segs, [&](int64_t s0, int64_t s1) { update(a, s0, s1); });
}

void mark_weights_mutable(Problem& p, TensorList weights) {
  for (size_t t = 0; t < weights.size(); ++t) {
    p.tables[t].weights = weights[t].mutable_data_ptr();
  }
}

void embedding_bag_backward_sgd_cpu(
    TensorList weights,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    const Tensor& grad_output,
    double learning_rate,
    double weight_decay,
    int64_t weight_decay_mode) {
  const char* op = "embedding_bag_backward_sgd_";
  Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  mark_weights_mutable(p, weights);
  cpu::SegmentArgs hyper{};
  hyper.learning_rate = static_cast<float>(learning_rate);
  hyper.weight_decay = static_cast<float>(weight_decay);
  hyper.weight_decay_mode = weight_decay_mode_of(op, weight_decay_mode);
  fused_backward(op, p, indices, offsets, per_sample_weights, grad_output, hyper, kernels().update_sgd);
}

void embedding_bag_backward_rowwise_adagrad_cpu(
    TensorList weights,
    TensorList momentum1,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    const Tensor& grad_output,
    double learning_rate,
    double eps,
    double weight_decay,
    int64_t weight_decay_mode) {
  const char* op = "embedding_bag_backward_rowwise_adagrad_";
  Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  mark_weights_mutable(p, weights);
  attach_state(op, "momentum1", p, weights, momentum1, 0);
  cpu::SegmentArgs hyper{};
  hyper.learning_rate = static_cast<float>(learning_rate);
  hyper.eps = static_cast<float>(eps);
  hyper.weight_decay = static_cast<float>(weight_decay);
  hyper.weight_decay_mode = weight_decay_mode_of(op, weight_decay_mode);
  fused_backward(op, p, indices, offsets, per_sample_weights, grad_output, hyper, kernels().update_rowwise_adagrad);
}

void embedding_bag_backward_momentum_scaled_rowwise_adagrad_cpu(
    TensorList weights,
    TensorList momentum_sync,
    TensorList momentum_local,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    const Tensor& grad_output,
    double learning_rate,
    double eps,
    double momentum_scale,
    double weight_decay,
    int64_t weight_decay_mode) {
  const char* op = "embedding_bag_backward_momentum_scaled_rowwise_adagrad_";
  Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  mark_weights_mutable(p, weights);
  attach_state(op, "momentum_sync", p, weights, momentum_sync, 0);
  attach_state(op, "momentum_local", p, weights, momentum_local, 1);
  cpu::SegmentArgs hyper{};
  hyper.learning_rate = static_cast<float>(learning_rate);
  hyper.eps = static_cast<float>(eps);
  hyper.momentum_scale = static_cast<float>(momentum_scale);
  hyper.weight_decay = static_cast<float>(weight_decay);
  hyper.weight_decay_mode = weight_decay_mode_of(op, weight_decay_mode);
  fused_backward(
      op,
      p,
      indices,
      offsets,
      per_sample_weights,
      grad_output,
      hyper,
      kernels().update_momentum_scaled_rowwise_adagrad);
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>> embedding_bag_backward_row_grad_cpu(
    TensorList weights,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const std::optional<Tensor>& per_sample_weights,
    const Tensor& grad_output) {
  const char* op = "embedding_bag_backward_row_grad";
  Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, per_sample_weights);
  check_grad_output(op, p, grad_output);
  Workspace& ws = t_workspace;
  const Segments segs = group_by_row_any(op, p, indices, offsets, per_sample_weights, ws);

  // Each table's segments, in row order, from its first slot on.
  std::vector<Tensor> row_ids, row_grads;
  std::vector<float*> slots(std::max<int64_t>(p.num_indices, 1));
  for (int64_t t = 0; t < static_cast<int64_t>(p.tables.size()); ++t) {
    const int64_t begin = segs.first[t];
    const int64_t count = segs.end[t] - begin;
    const int64_t dim = p.tables[t].dim;
    Tensor ids = at::empty({count}, indices.options().dtype(at::kLong));
    Tensor grads = at::empty({count, dim}, grad_output.options());
    std::copy(segs.seg_row + begin, segs.seg_row + begin + count, ids.mutable_data_ptr<int64_t>());
    float* g = grads.mutable_data_ptr<float>();
    for (int64_t i = 0; i < count; ++i) {
      slots[begin + i] = g + i * dim;
    }
    row_ids.push_back(std::move(ids));
    row_grads.push_back(std::move(grads));
  }
  cpu::SegmentArgs a = segment_args(p, segs, grad_output, ws);
  a.row_grad_out = slots.data();
  const auto& k = kernels();
  for_each_segment_chunk(segs, [&](int64_t s0, int64_t s1) { k.sum_row_grads(a, s0, s1); });
  return {std::move(row_ids), std::move(row_grads)};
}

template <typename I>
int64_t first_bad_index(const Problem& p, const Tensor& indices, const Tensor& offsets) {
  const I* idx = indices.const_data_ptr<I>();
  const I* off = offsets.const_data_ptr<I>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  for_each_chunk(bag_chunks(off, offsets.numel() - 1, p.num_indices), [&](int64_t b0, int64_t b1) {
    for (int64_t bag = b0; bag < b1; ++bag) {
      const int64_t rows = p.tables[p.features[bag / p.batch].table].rows;
      for (int64_t i = off[bag]; i < off[bag + 1]; ++i) {
        if (idx[i] < 0 || idx[i] >= rows) {
          atomic_min(first_bad, i);
          return;
        }
      }
    }
  });
  return first_bad.load();
}

Tensor embedding_bag_per_sample_weights_grad_cpu(
    TensorList weights,
    IntArrayRef feature_table,
    IntArrayRef feature_pooling,
    IntArrayRef feature_column,
    const Tensor& indices,
    const Tensor& offsets,
    const Tensor& grad_output) {
  const char* op = "embedding_bag_per_sample_weights_grad";
  Problem p =
      make_problem(op, weights, feature_table, feature_pooling, feature_column, indices, offsets, std::nullopt);
  check_grad_output(op, p, grad_output);
  const int64_t bad = p.int32_indices ? first_bad_index<int32_t>(p, indices, offsets)
                                      : first_bad_index<int64_t>(p, indices, offsets);
  if (bad != std::numeric_limits<int64_t>::max()) {
    throw_bad_index_any(op, p, indices, offsets, bad);
  }
  Tensor out = at::empty({p.num_indices}, grad_output.options());
  cpu::PerSampleWeightGradArgs a{
      p.tables.data(),
      p.features.data(),
      p.batch,
      indices.const_data_ptr(),
      offsets.const_data_ptr(),
      grad_output.const_data_ptr<float>(),
      p.out_dim,
      out.mutable_data_ptr<float>(),
      p.weight_type};
  const auto& k = kernels();
  auto* fn = p.int32_indices ? k.per_sample_weight_grad_i32 : k.per_sample_weight_grad_i64;
  const int64_t num_bags = offsets.numel() - 1;
  if (p.int32_indices) {
    for_each_chunk(bag_chunks(offsets.const_data_ptr<int32_t>(), num_bags, p.num_indices), [&](int64_t b0, int64_t b1) {
      fn(a, b0, b1);
    });
  } else {
    for_each_chunk(bag_chunks(offsets.const_data_ptr<int64_t>(), num_bags, p.num_indices), [&](int64_t b0, int64_t b1) {
      fn(a, b0, b1);
    });
  }
  return out;
}

} // namespace

namespace cpu {
const KernelTable& current_kernels() {
  const KernelTable* chosen = g_kernel_override.load(std::memory_order_relaxed);
  return chosen != nullptr ? *chosen : active_kernels();
}
} // namespace cpu

TORCH_LIBRARY_IMPL(dist_rec, CPU, m) {
  m.impl("embedding_bag_forward", &embedding_bag_forward_cpu);
  m.impl("embedding_bag_backward_sgd_", &embedding_bag_backward_sgd_cpu);
  m.impl("embedding_bag_backward_rowwise_adagrad_", &embedding_bag_backward_rowwise_adagrad_cpu);
  m.impl(
      "embedding_bag_backward_momentum_scaled_rowwise_adagrad_",
      &embedding_bag_backward_momentum_scaled_rowwise_adagrad_cpu);
  m.impl("embedding_bag_backward_row_grad", &embedding_bag_backward_row_grad_cpu);
  m.impl("embedding_bag_per_sample_weights_grad", &embedding_bag_per_sample_weights_grad_cpu);
}

TORCH_LIBRARY_IMPL(dist_rec, CompositeImplicitAutograd, m) {
  m.impl("_set_cpu_isa", &set_cpu_isa);
  m.impl("_supported_cpu_isas", &supported_cpu_isas);
  m.impl("_set_index_checks", &set_index_checks);
}

} // namespace dist_rec
