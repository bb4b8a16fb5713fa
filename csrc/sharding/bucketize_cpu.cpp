// Row-wise input routing in two passes over the ids
// (dist_rec/sharding/router.py): each id of a bucketised feature goes to the
// slot (feature, row block) that holds its row, made local to that block,
// with the ids grouped by slot and bag order kept inside every slot.
//
// The same work as a dozen tensor ops (repeat_interleave, a [N, W]
// comparison, three gathers, a stable sort, bincount) that each walked the
// whole batch; at 20 ids per bag they took about a fifth of a row-wise
// step. Here: pass 1 finds every id's slot and counts the bag lengths, a
// prefix sum places the slots, pass 2 scatters (a stable counting sort).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "dist_rec/checks.h"

namespace dist_rec {
namespace {

using at::Tensor;

constexpr const char* kOp = "bucketize_by_rows";

void check_inputs(const Tensor& ids, const Tensor& lengths, const Tensor& bounds, const Tensor& slot_table, int64_t num_slots) {
  for (const Tensor* t : {&ids, &lengths, &bounds, &slot_table}) {
    DIST_REC_CHECK_CPU(kOp, *t);
    DIST_REC_CHECK_DTYPE(kOp, *t, at::kLong);
    DIST_REC_CHECK_CONTIGUOUS(kOp, *t);
  }
  DIST_REC_CHECK_DIM(kOp, ids, 1);
  DIST_REC_CHECK_DIM(kOp, lengths, 2);
  DIST_REC_CHECK_DIM(kOp, bounds, 2);
  DIST_REC_CHECK_VALUE(
      kOp,
      bounds.sizes() == slot_table.sizes() && bounds.size(0) == lengths.size(0) && bounds.size(1) > 0,
      "bounds ",
      bounds.sizes(),
      " and slot_table ",
      slot_table.sizes(),
      " must both be [features, shards] with features = lengths' ",
      lengths.size(0));
  DIST_REC_CHECK_VALUE(kOp, num_slots >= 0, "num_slots must be >= 0, got ", num_slots);
  const int64_t* st = slot_table.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < slot_table.numel(); ++i) {
    DIST_REC_CHECK_INDEX(kOp, st[i] >= 0 && st[i] < num_slots, "slot_table holds slot ", st[i], ", outside 0..", num_slots - 1);
  }
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < lengths.numel(); ++i) {
    DIST_REC_CHECK_VALUE(kOp, len[i] >= 0, "bag ", i % std::max<int64_t>(lengths.size(1), 1), " of feature ",
                         i / std::max<int64_t>(lengths.size(1), 1), " has negative length ", len[i]);
    total += len[i];
  }
  DIST_REC_CHECK_VALUE(kOp, total == ids.numel(), "lengths sum to ", total, " but there are ", ids.numel(), " ids");
}

// The row block holding `row`: the last start <= row (-1 if none). Counted
// without branches over a few blocks: which block a random id falls in is a
// coin toss, and a binary search's mispredicted branches cost more than the
// rest of the pass.
inline int64_t block_of(const int64_t* starts, int64_t width, int64_t row) {
  if (width > 16) {
    return std::upper_bound(starts, starts + width, row) - starts - 1;
  }
  int64_t count = 0;
  for (int64_t j = 0; j < width; ++j) {
    count += static_cast<int64_t>(starts[j] <= row);
  }
  return count - 1;
}

// Returns (local ids grouped by slot, per-slot bag lengths [num_slots, B],
// and, if with_order, each output id's input position; else an empty tensor).
std::tuple<Tensor, Tensor, Tensor> bucketize_by_rows(
    const Tensor& ids,
    const Tensor& lengths,
    const Tensor& bounds,
    const Tensor& slot_table,
    int64_t num_slots,
    bool with_order) {
  check_inputs(ids, lengths, bounds, slot_table, num_slots);
  const int64_t n = ids.numel();
  const int64_t num_features = lengths.size(0);
  const int64_t batch = lengths.size(1);
  const int64_t width = bounds.size(1);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const int64_t* bound = bounds.const_data_ptr<int64_t>();
  const int64_t* slot_of = slot_table.const_data_ptr<int64_t>();

  Tensor slot_lengths = at::zeros({num_slots, batch}, lengths.options());
  int64_t* slot_len = slot_lengths.data_ptr<int64_t>();
  // Grow-only per thread: a step's fresh 4 bytes per id would fault in pages.
  thread_local std::vector<int32_t> slot;
  slot.resize(std::max<int64_t>(n, 1));
  std::vector<int64_t> slot_first_row(num_slots, 0);

  // 1. Each id's slot; bag lengths per slot.
  int64_t p = 0;
  for (int64_t f = 0; f < num_features; ++f) {
    const int64_t* starts = bound + f * width;
    const int64_t* slots = slot_of + f * width;
    for (int64_t b = 0; b < batch; ++b) {
      for (const int64_t end = p + len[f * batch + b]; p < end; ++p) {
        const int64_t k = block_of(starts, width, id[p]);
        DIST_REC_CHECK_INDEX(kOp, k >= 0, "id ", id[p], " at position ", p, " (feature ", f, ", bag ", b,
                             ") is below the first row block, which starts at row ", starts[0]);
        const int64_t s = slots[k];
        slot[p] = static_cast<int32_t>(s);
        slot_first_row[s] = starts[k];
        ++slot_len[s * batch + b];
      }
    }
  }

  // 2. Where each slot's ids start (slots in order), then a stable scatter.
  std::vector<int64_t> cursor(num_slots + 1, 0);
  for (int64_t s = 0; s < num_slots; ++s) {
    int64_t count = 0;
    for (int64_t b = 0; b < batch; ++b) {
      count += slot_len[s * batch + b];
    }
    cursor[s + 1] = cursor[s] + count;
  }
  Tensor out = at::empty({n}, ids.options());
  Tensor order = at::empty({with_order ? n : 0}, ids.options());
  int64_t* out_ids = out.data_ptr<int64_t>();
  int64_t* out_order = with_order ? order.data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t s = slot[i];
    const int64_t d = cursor[s]++;
    out_ids[d] = id[i] - slot_first_row[s];
    if (out_order != nullptr) {
      out_order[d] = i;
    }
  }
  return {out, slot_lengths, order};
}

} // namespace

TORCH_LIBRARY_FRAGMENT(dist_rec, m) {
  m.def(
      "bucketize_by_rows(Tensor ids, Tensor lengths, Tensor bounds, Tensor slot_table, int num_slots, bool with_order)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dist_rec, CPU, m) {
  m.impl("bucketize_by_rows", &bucketize_by_rows);
}

} // namespace dist_rec
