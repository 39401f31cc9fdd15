// Shared argument checks for the C++ ops: every failure names the argument and the expectation.
#pragma once
#include <torch/all.h>

#define RLP_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define RLP_CHECK_CONTIG(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define RLP_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define RLP_CHECK_SAME_SHAPE(x, y) \
  TORCH_CHECK((x).sizes() == (y).sizes(), #x " has shape ", (x).sizes(), " but " #y " has shape ", (y).sizes())
