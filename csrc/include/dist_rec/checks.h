// Message macros for argument checks. Every check names the op, the argument
// and the offending value, so that a failure reads as a diagnosis rather than
// an assertion. The *_VALUE / *_INDEX / *_TYPE variants surface in Python as
// ValueError / IndexError / TypeError.
#pragma once

#include <c10/util/Exception.h>

#define DIST_REC_CHECK_VALUE(op, cond, ...) TORCH_CHECK_VALUE(cond, op, ": ", __VA_ARGS__)
#define DIST_REC_CHECK_INDEX(op, cond, ...) TORCH_CHECK_INDEX(cond, op, ": ", __VA_ARGS__)
#define DIST_REC_CHECK_TYPE(op, cond, ...) TORCH_CHECK_TYPE(cond, op, ": ", __VA_ARGS__)

#define DIST_REC_CHECK_CPU(op, x) \
  DIST_REC_CHECK_VALUE(op, (x).device().is_cpu(), #x " must be a CPU tensor; it is on ", (x).device())

#define DIST_REC_CHECK_DIM(op, x, n) \
  DIST_REC_CHECK_VALUE(op, (x).dim() == (n), #x " must have ", n, " dimensions; it has shape ", (x).sizes())

#define DIST_REC_CHECK_CONTIGUOUS(op, x) \
  DIST_REC_CHECK_VALUE(op, (x).is_contiguous(), #x " must be contiguous; it has strides ", (x).strides())

#define DIST_REC_CHECK_DTYPE(op, x, dtype) \
  DIST_REC_CHECK_TYPE(op, (x).scalar_type() == (dtype), #x " must have dtype ", dtype, "; it has ", (x).scalar_type())
