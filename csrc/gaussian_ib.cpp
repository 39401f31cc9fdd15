// Symmetric KL between diagonal Gaussians on CPU (formulas: kernels/gaussian_ib.py), one row of
// D dims per iteration, rows in parallel (OpenMP through at::parallel_for), fp32 arithmetic.
// SKL = 1/4 sum_d [ (exp(dl/2) - exp(-dl/2))^2 + delta^2 (exp(-logvar1) + exp(-logvar2)) ].
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "common.h"

namespace {

void check_inputs(const at::Tensor& mu1, const at::Tensor& logvar1, const at::Tensor& mu2,
                  const at::Tensor& logvar2) {
  for (const at::Tensor* t : {&mu1, &logvar1, &mu2, &logvar2}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "mu1, logvar1, mu2, logvar2 must be contiguous CPU tensors");
  }
  TORCH_CHECK(mu1.dim() == 2, "mu1 must be [M, D], got shape ", mu1.sizes());
  TORCH_CHECK(at::isFloatingType(mu1.scalar_type()), "mu1 must be floating point, got ", mu1.scalar_type());
  RLP_CHECK_SAME_SHAPE(logvar1, mu1);
  RLP_CHECK_SAME_SHAPE(mu2, mu1);
  RLP_CHECK_SAME_SHAPE(logvar2, mu1);
  RLP_CHECK_DTYPE(logvar1, mu1.scalar_type());
  RLP_CHECK_DTYPE(mu2, mu1.scalar_type());
  RLP_CHECK_DTYPE(logvar2, mu1.scalar_type());
}

int64_t grain_rows(int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)); }

at::Tensor gaussian_skl_fwd(const at::Tensor& mu1, const at::Tensor& logvar1, const at::Tensor& mu2,
                            const at::Tensor& logvar2) {
  check_inputs(mu1, logvar1, mu2, logvar2);
  const int64_t M = mu1.size(0), D = mu1.size(1);
  at::Tensor out = at::empty({M}, mu1.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu1.scalar_type(), "gaussian_skl_fwd", [&] {
    const scalar_t *m1 = mu1.data_ptr<scalar_t>(), *l1 = logvar1.data_ptr<scalar_t>();
    const scalar_t *m2 = mu2.data_ptr<scalar_t>(), *l2 = logvar2.data_ptr<scalar_t>();
    at::parallel_for(0, M, grain_rows(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float acc = 0.0f;
        for (int64_t i = r * D; i < (r + 1) * D; ++i) {
          const float a = static_cast<float>(l1[i]), b = static_cast<float>(l2[i]);
          const float delta = static_cast<float>(m1[i]) - static_cast<float>(m2[i]);
          const float h = std::exp(0.5f * (a - b));
          const float diff = h - 1.0f / h;
          acc += diff * diff + delta * delta * (std::exp(-a) + std::exp(-b));
        }
        o[r] = 0.25f * acc;
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_skl_bwd(const at::Tensor& grad,
                                                                            const at::Tensor& mu1,
                                                                            const at::Tensor& logvar1,
                                                                            const at::Tensor& mu2,
                                                                            const at::Tensor& logvar2) {
  check_inputs(mu1, logvar1, mu2, logvar2);
  const int64_t M = mu1.size(0), D = mu1.size(1);
  RLP_CHECK_CPU(grad);
  RLP_CHECK_CONTIG(grad);
  RLP_CHECK_DTYPE(grad, at::kFloat);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == M, "grad must be [", M, "], got shape ", grad.sizes());
  at::Tensor dm1 = at::empty_like(mu1), dl1 = at::empty_like(logvar1);
  at::Tensor dm2 = at::empty_like(mu2), dl2 = at::empty_like(logvar2);
  const float* g = grad.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu1.scalar_type(), "gaussian_skl_bwd", [&] {
    const scalar_t *m1 = mu1.data_ptr<scalar_t>(), *l1 = logvar1.data_ptr<scalar_t>();
    const scalar_t *m2 = mu2.data_ptr<scalar_t>(), *l2 = logvar2.data_ptr<scalar_t>();
    scalar_t *gm1 = dm1.data_ptr<scalar_t>(), *gl1 = dl1.data_ptr<scalar_t>();
    scalar_t *gm2 = dm2.data_ptr<scalar_t>(), *gl2 = dl2.data_ptr<scalar_t>();
    at::parallel_for(0, M, grain_rows(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float gr = g[r];
        for (int64_t i = r * D; i < (r + 1) * D; ++i) {
          const float a = static_cast<float>(l1[i]), b = static_cast<float>(l2[i]);
          const float delta = static_cast<float>(m1[i]) - static_cast<float>(m2[i]);
          const float inv1 = std::exp(-a), inv2 = std::exp(-b), ratio = std::exp(a - b);
          const float dm = gr * 0.5f * delta * (inv1 + inv2);
          gm1[i] = static_cast<scalar_t>(dm);
          gm2[i] = static_cast<scalar_t>(-dm);
          gl1[i] = static_cast<scalar_t>(gr * 0.25f * (ratio - 1.0f / ratio - delta * delta * inv1));
          gl2[i] = static_cast<scalar_t>(gr * 0.25f * (1.0f / ratio - ratio - delta * delta * inv2));
        }
      }
    });
  });
  return {dm1, dl1, dm2, dl2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlp, m) {
  m.def("gaussian_skl_fwd(Tensor mu1, Tensor logvar1, Tensor mu2, Tensor logvar2) -> Tensor");
  m.def(
      "gaussian_skl_bwd(Tensor grad, Tensor mu1, Tensor logvar1, Tensor mu2, Tensor logvar2) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlp, CPU, m) {
  m.impl("gaussian_skl_fwd", &gaussian_skl_fwd);
  m.impl("gaussian_skl_bwd", &gaussian_skl_bwd);
}
