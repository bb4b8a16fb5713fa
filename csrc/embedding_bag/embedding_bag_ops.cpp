// Schemas of the pooled-embedding op family. Kernels are registered per
// dispatch key in their own files (embedding_bag_cpu.cpp, later *_cuda.cu);
// fake kernels and autograd are registered from Python (dist_rec/ops).
//
// Conventions shared by every op:
//   weights         T tensors [rows_t, dim_t], one per table, same dtype
//                   (float32, float16 or bfloat16)
//   feature_table   F ints: the table each feature slot looks up
//   feature_pooling F ints: 0 = sum, 1 = mean
//   feature_column  F ints: first column of the slot in the pooled output;
//                   the slots' column ranges must tile [0, sum of dims)
//   indices         [N] int32 or int64 ids, feature-major like a
//                   KeyedJaggedTensor's values
//   offsets         [F*B + 1] same dtype as indices; bag (f, b) is
//                   indices[offsets[f*B+b] : offsets[f*B+b+1]]
//   per_sample_weights [N] float32 or None
//   grad_output     [B, sum of dims] float32, the gradient of the output
//   weight_decay_mode  0 = none, 1 = L2, 2 = decoupled
#include <torch/library.h>

TORCH_LIBRARY(dist_rec, m) {
  m.def(
      "embedding_bag_forward(Tensor[] weights, int[] feature_table, int[] feature_pooling, "
      "int[] feature_column, Tensor indices, Tensor offsets, Tensor? per_sample_weights) -> Tensor");

  // Backward passes fused with an optimizer: every row touched by the batch
  // has its gradient summed over the whole batch first, then is updated once,
  // in place. No dense gradient is formed.
  m.def(
      "embedding_bag_backward_sgd_(Tensor(a!)[] weights, int[] feature_table, int[] feature_pooling, "
      "int[] feature_column, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "Tensor grad_output, float learning_rate, float weight_decay=0.0, int weight_decay_mode=0) -> ()");
  m.def(
      "embedding_bag_backward_rowwise_adagrad_(Tensor(a!)[] weights, Tensor(b!)[] momentum1, "
      "int[] feature_table, int[] feature_pooling, int[] feature_column, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, Tensor grad_output, float learning_rate, float eps, "
      "float weight_decay=0.0, int weight_decay_mode=0) -> ()");
  m.def(
      "embedding_bag_backward_momentum_scaled_rowwise_adagrad_(Tensor(a!)[] weights, "
      "Tensor[] momentum_sync, Tensor(b!)[] momentum_local, int[] feature_table, int[] feature_pooling, "
      "int[] feature_column, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "Tensor grad_output, float learning_rate, float eps, float momentum_scale, "
      "float weight_decay=0.0, int weight_decay_mode=0) -> ()");

  // Backward that hands back the per-row gradient instead of applying it:
  // for each table, the sorted unique ids it touched and their summed
  // gradient rows [U_t, dim_t] (float32).
  m.def(
      "embedding_bag_backward_row_grad(Tensor[] weights, int[] feature_table, int[] feature_pooling, "
      "int[] feature_column, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "Tensor grad_output) -> (Tensor[], Tensor[])");

  // Gradient of the pooled output with respect to per_sample_weights [N].
  m.def(
      "embedding_bag_per_sample_weights_grad(Tensor[] weights, int[] feature_table, "
      "int[] feature_pooling, int[] feature_column, Tensor indices, Tensor offsets, "
      "Tensor grad_output) -> Tensor");

  // Testing and benchmarking hooks (process-wide): choose the CPU inner-loop
  // build ("" = best for this CPU), list the builds this CPU runs, and turn
  // the id range check off to measure its cost. Each returns the old value.
  m.def("_set_cpu_isa(str isa) -> str");
  m.def("_supported_cpu_isas() -> str[]");
  m.def("_set_index_checks(bool enabled) -> bool");
}
