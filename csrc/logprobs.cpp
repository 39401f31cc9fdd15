// Token log-probs and entropy from logits on CPU (semantics: kernels/logprobs.py).
// Forward, per row: pass 1 finds the max logit, pass 2 sums e = exp(z - m) and e (z - m), so that
// lse = m + log s and entropy = log s - t / s (no cancellation between numbers of the logits' size).
// Backward recomputes p = exp(z - lse) from the saved lse. Rows run in parallel (OpenMP through
// at::parallel_for); the inner loops are `omp simd` loops over plain float arithmetic.
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "vec_math.h"

namespace {

// Every exponent is clamped below at -88 (p = 0 there; p * log p stays 0, not nan, for -inf logits).
// The bound is read through a volatile once per row: with a compile-time constant GCC folds
// exp(-88) into its own branch of the clamp and the loop no longer vectorises (-fopt-info-vec:
// "control flow in loop").
volatile float g_min_exponent = -88.0f;

// float -> scalar_t. bf16 rounds to nearest even with integer ops only: c10's conversion tests
// isnan with a branch that keeps the backward loop scalar.
template <typename scalar_t>
inline scalar_t to_scalar(float v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t u = std::bit_cast<uint32_t>(v);
    const uint32_t rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
    const uint32_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;  // NaN stays NaN
    return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

struct RowStats {
  float lse;
  float entropy;
};

template <typename scalar_t, bool kEntropy>
RowStats row_forward(const scalar_t* __restrict__ x, int64_t V, float inv_t) {
  const float lo = g_min_exponent;
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<float>(x[v]));
  const float m = mx * inv_t;  // temperature > 0, so max(z) == max(x) / temperature
  float s = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, t)
  for (int64_t v = 0; v < V; ++v) {
    const float d = std::max(static_cast<float>(x[v]) * inv_t - m, lo);
    const float e = rlp::exp_vec(d);
    s += e;
    if constexpr (kEntropy) t += e * d;
  }
  const float log_s = std::log(s);
  return {m + log_s, kEntropy ? log_s - t / s : 0.0f};
}

// d logit for one column: g_lp (onehot - p) - g_h p (log p + h), g_lp and g_h already / temperature.
template <bool kEntropy>
inline float column_grad(float z, float onehot, float lse, float g_lp, float g_h, float h, float lo) {
  const float logp = std::max(z - lse, lo);
  const float p = rlp::exp_vec(logp);
  float g = g_lp * (onehot - p);
  if constexpr (kEntropy) g -= g_h * p * (logp + h);
  return g;
}

template <typename scalar_t, bool kEntropy>
void row_backward(const scalar_t* __restrict__ x, scalar_t* __restrict__ dx, int64_t V, int64_t y, float inv_t,
                  float lse, float g_lp, float g_h, float h) {
  const float lo = g_min_exponent;
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    const float g = column_grad<kEntropy>(static_cast<float>(x[v]) * inv_t, 0.0f, lse, g_lp, g_h, h, lo);
    dx[v] = to_scalar<scalar_t>(g);
  }
  // The label's column again, whole, in fp32: adding g_lp to a rounded bf16 value would lose it.
  const float gy = column_grad<kEntropy>(static_cast<float>(x[y]) * inv_t, 1.0f, lse, g_lp, g_h, h, lo);
  dx[y] = to_scalar<scalar_t>(gy);
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1)); }

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  RLP_CHECK_CPU(logits);
  RLP_CHECK_CPU(labels);
  RLP_CHECK_CONTIG(logits);
  RLP_CHECK_CONTIG(labels);
  TORCH_CHECK(logits.dim() == 2, "logits must be [N, V], got shape ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) >= 1, "logits must have at least one vocab column, got shape ", logits.sizes());
  RLP_CHECK_DTYPE(labels, at::kLong);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), "labels must be [N] with N = ",
              logits.size(0), " (logits has shape ", logits.sizes(), "), got shape ", labels.sizes());
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
}

void check_label_range(const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t n = 0; n < labels.size(0); ++n) {
    TORCH_CHECK(y[n] == ignore_index || (y[n] >= 0 && y[n] < V), "labels[", n, "] = ", y[n],
                " is outside [0, ", V, ") and is not ignore_index (", ignore_index, ")");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                            double temperature, int64_t ignore_index,
                                                            bool with_entropy) {
  check_logits_labels(logits, labels, temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_label_range(labels, V, ignore_index);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({N}, opts), ent = at::empty({N}, opts), lse = at::empty({N}, opts);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* y = labels.data_ptr<int64_t>();
  float *lp_p = lp.data_ptr<float>(), *ent_p = ent.data_ptr<float>(), *lse_p = lse.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_fwd", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        if (y[n] == ignore_index) {  // not a token: skip the row's work entirely
          lp_p[n] = ent_p[n] = lse_p[n] = 0.0f;
          continue;
        }
        const scalar_t* row = x + n * V;
        const RowStats st = with_entropy ? row_forward<scalar_t, true>(row, V, inv_t)
                                         : row_forward<scalar_t, false>(row, V, inv_t);
        lse_p[n] = st.lse;
        ent_p[n] = st.entropy;
        lp_p[n] = static_cast<float>(row[y[n]]) * inv_t - st.lse;
      }
    });
  });
  return {lp, ent, lse};
}

at::Tensor logprobs_bwd(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                        const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                        const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  check_logits_labels(logits, labels, temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_label_range(labels, V, ignore_index);
  for (const at::Tensor* t : {&grad_logprobs, &lse, &entropy}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->dim() == 1 && t->size(0) == N,
                "grad_logprobs, lse and entropy must be contiguous fp32 CPU tensors of shape [", N, "]");
  }
  const bool has_ent = grad_entropy.has_value();
  if (has_ent) {
    const at::Tensor& g = *grad_entropy;
    TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && g.is_contiguous() && g.dim() == 1 &&
                    g.size(0) == N,
                "grad_entropy must be a contiguous fp32 CPU tensor of shape [", N, "], got ", g.sizes());
  }
  at::Tensor dx = at::empty_like(logits);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* y = labels.data_ptr<int64_t>();
  const float *glp = grad_logprobs.data_ptr<float>(), *lse_p = lse.data_ptr<float>();
  const float* h_p = entropy.data_ptr<float>();
  const float* gh = has_ent ? grad_entropy->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_bwd", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* d = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* drow = d + n * V;
        if (y[n] == ignore_index) {
          std::fill(drow, drow + V, scalar_t(0));
          continue;
        }
        const float g_lp = glp[n] * inv_t;
        if (has_ent) {
          row_backward<scalar_t, true>(x + n * V, drow, V, y[n], inv_t, lse_p[n], g_lp, gh[n] * inv_t, h_p[n]);
        } else {
          row_backward<scalar_t, false>(x + n * V, drow, V, y[n], inv_t, lse_p[n], g_lp, 0.0f, 0.0f);
        }
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlp, m) {
  m.def(
      "logprobs_fwd(Tensor logits, Tensor labels, float temperature, int ignore_index, bool with_entropy) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_bwd(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, Tensor lse, "
      "Tensor entropy, float temperature, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlp, CPU, m) {
  m.impl("logprobs_fwd", &logprobs_fwd);
  m.impl("logprobs_bwd", &logprobs_bwd);
}
