// GAE on CUDA: one warp per row, a single pass over memory. The reverse recurrence is linear in the
// state s = (nv, g) (next value, running advantage), so each step is a lower-triangular affine map
//   nv' = a*nv + e,   g' = c*nv + d*g + f
// and a chunk of steps composes into one map of the same form. The row is walked back to front in
// tiles of 32 lanes x 8 steps: each lane composes its 8 steps, a warp suffix-scan (shuffles) gives
// every lane the state entering its chunk, then each lane replays its 8 steps writing outputs.
// Memory goes through shared memory in both directions: the warp loads and stores each tile as 8
// coalesced 32-lane rows (128 B per float row), while each lane works on 8 consecutive steps. Reading
// a lane's 8 steps straight from global memory had each warp load touch 32 sectors (lanes 32 B apart)
// for 128 useful bytes. Predicted: 1.2-1.5x this kernel at B=256 T=4096 on H100 (it is latency-bound:
// one warp walks its row's tiles in order). Not yet run on a GPU: checked by compiling (nvcc 13.0:
// 127 registers on sm_90, 104 on sm_80, were 72; no spills; 13.5 KB static shared memory a block;
// 4 blocks an SM, was 7: every row still resident at once up to B = 2112 on an H100) and by a Python
// transliteration of this kernel (lanes as a loop, the same shared-memory slots) matching the
// float64 time loop at T = 1, 7, 256, 300, 600 in both mask modes.
// Semantics match csrc/gae.cpp exactly (DESIGN "GAE"); built only when torch has CUDA.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include <tuple>

namespace {

constexpr int kSteps = 8;             // steps per lane per tile
constexpr int kTile = 32 * kSteps;    // steps per tile
constexpr int kWarpsPerBlock = 4;     // rows per block
constexpr int kPad = kSteps + 1;      // shared-memory words per lane: stride 9 keeps lanes' reads
                                      // of their own steps on 32 different banks

struct Map {  // s -> A s + b with A = [[a, 0], [c, d]], b = (e, f)
  float a, c, d, e, f;
};

__device__ __forceinline__ Map identity() { return {1.f, 0.f, 1.f, 0.f, 0.f}; }

// (x o y)(s) = x(y(s)): y is applied first (it is the later time step in the reverse walk).
__device__ __forceinline__ Map compose(const Map& x, const Map& y) {
  return {x.a * y.a, x.c * y.a + x.d * y.c, x.d * y.d, x.a * y.e + x.e, x.c * y.e + x.d * y.f + x.f};
}

__device__ __forceinline__ Map shfl_down(const Map& m, int offset) {
  const unsigned full = 0xffffffffu;
  return {__shfl_down_sync(full, m.a, offset), __shfl_down_sync(full, m.c, offset),
          __shfl_down_sync(full, m.d, offset), __shfl_down_sync(full, m.e, offset),
          __shfl_down_sync(full, m.f, offset)};
}

// One time step's map. Masked-out r and v are selected away (never multiplied), so NaN there
// cannot leak. carry (verl): nv and g carried across masked steps; zero (OpenRLHF/TRL): r, v
// scaled by m first and nv is the next (zeroed) value.
__device__ __forceinline__ Map step_map(float r, float v, float m, float gamma, float gl, bool carry) {
  const bool on = m != 0.f;
  if (carry) {
    const float vt = on ? v : 0.f, rt = on ? r : 0.f;
    return {1.f - m, m * gamma, m * gl + 1.f - m, m * vt, m * (rt - vt)};
  }
  const float vt = on ? m * v : 0.f, rt = on ? m * r : 0.f;
  return {0.f, gamma, gl, vt, rt - vt};
}

template <typename M>
__global__ void gae_kernel(const float* __restrict__ r, const float* __restrict__ v, const M* __restrict__ mk,
                           float* __restrict__ adv, float* __restrict__ ret, int64_t B, int64_t T, float gamma,
                           float gl, bool carry) {
  // Per warp, one tile of r, v, m (lane l's step k at l * kPad + k); after the scan r and m hold the
  // tile's advantages and returns, stored back coalesced.
  __shared__ float s_r[kWarpsPerBlock][32 * kPad], s_v[kWarpsPerBlock][32 * kPad],
      s_m[kWarpsPerBlock][32 * kPad];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (row >= B) return;  // whole warps exit together: the shuffles below stay full-warp
  float* sr = s_r[warp];
  float* sv = s_v[warp];
  float* sm = s_m[warp];
  const float* rr = r + row * T;
  const float* vv = v + row * T;
  const M* mm = mk + row * T;
  float* aa = adv + row * T;
  float* oo = ret + row * T;
  float nv = 0.f, g = 0.f;  // state entering the current tile from the right
  for (int64_t end = T; end > 0; end -= kTile) {
    const int64_t base = end - kTile;                  // the tile's first step (may be < 0)
    const int64_t lo = base + int64_t(lane) * kSteps;  // this lane's first step
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {  // coalesced: tile element j = 32 i + lane
      const int j = i * 32 + lane;
      const int64_t t = base + j;
      const int slot = (j / kSteps) * kPad + j % kSteps;
      sr[slot] = t >= 0 ? rr[t] : 0.f;
      sv[slot] = t >= 0 ? vv[t] : 0.f;
      sm[slot] = t >= 0 ? float(mm[t]) : 0.f;
    }
    __syncwarp();
    const int own = lane * kPad;  // this lane's 8 steps in shared memory
    Map maps[kSteps];
    Map chunk = identity();
#pragma unroll
    for (int k = kSteps - 1; k >= 0; --k) {
      const int64_t t = lo + k;
      maps[k] = t >= 0 ? step_map(sr[own + k], sv[own + k], sm[own + k], gamma, gl, carry) : identity();
      chunk = compose(maps[k], chunk);
    }
    // Inclusive suffix scan over lanes: q = chunk(lane) o chunk(lane+1) o ... o chunk(31).
    Map q = chunk;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const Map other = shfl_down(q, off);
      if (lane + off < 32) q = compose(q, other);
    }
    Map later = shfl_down(q, 1);  // exclusive: the lanes to the right of this one
    if (lane == 31) later = identity();
    float snv = later.a * nv + later.e;
    float sg = later.c * nv + later.d * g + later.f;
#pragma unroll
    for (int k = kSteps - 1; k >= 0; --k) {
      const int64_t t = lo + k;
      const Map& s = maps[k];
      const float nnv = s.a * snv + s.e;
      sg = s.c * snv + s.d * sg + s.f;
      snv = nnv;
      if (t >= 0) {  // this lane's own slots: r and m were read into maps[] above
        sr[own + k] = sg;
        // returns = adv + values (raw values in carry mode, as verl; zeroed values in zero mode)
        sm[own + k] = sg + (carry ? sv[own + k] : s.e);
      }
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {  // coalesced stores of the tile's outputs
      const int j = i * 32 + lane;
      const int64_t t = base + j;
      const int slot = (j / kSteps) * kPad + j % kSteps;
      if (t >= 0) {
        aa[t] = sr[slot];
        oo[t] = sm[slot];
      }
    }
    __syncwarp();  // the next tile's loads overwrite these slots
    // The state leaving this tile (entering the next one, to the left) is lane 0's.
    const float tnv = q.a * nv + q.e, tg = q.c * nv + q.d * g + q.f;
    nv = __shfl_sync(0xffffffffu, tnv, 0);
    g = __shfl_sync(0xffffffffu, tg, 0);
  }
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& token_rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam, bool carry) {
  TORCH_CHECK(values.is_cuda(), "values must be a CUDA tensor, got ", values.device());
  TORCH_CHECK(token_rewards.device() == values.device(), "token_rewards is on ", token_rewards.device(),
              " but values is on ", values.device());
  TORCH_CHECK(mask.device() == values.device(), "mask is on ", mask.device(), " but values is on ",
              values.device());
  TORCH_CHECK(values.dim() == 2, "values must be [B, T], got shape ", values.sizes());
  TORCH_CHECK(token_rewards.sizes() == values.sizes(), "token_rewards has shape ", token_rewards.sizes(),
              " but values has shape ", values.sizes());
  TORCH_CHECK(mask.sizes() == values.sizes(), "mask has shape ", mask.sizes(), " but values has shape ",
              values.sizes());
  TORCH_CHECK(token_rewards.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "token_rewards and values must be float32");
  TORCH_CHECK(mask.scalar_type() == at::kFloat || mask.scalar_type() == at::kBool,
              "mask must have dtype float32 or bool, got ", mask.scalar_type());
  TORCH_CHECK(token_rewards.is_contiguous() && values.is_contiguous() && mask.is_contiguous(),
              "token_rewards, values and mask must be contiguous");
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, "gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "lam must be in [0, 1], got ", lam);
  const c10::cuda::CUDAGuard guard(values.device());
  auto adv = at::empty_like(values);
  auto ret = at::empty_like(values);
  const int64_t B = values.size(0), T = values.size(1);
  if (B == 0 || T == 0) return {adv, ret};
  const int64_t blocks = (B + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= 2147483647LL, "gae: too many rows (", B, ")");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float g = float(gamma), gl = float(gamma * lam);
  if (mask.scalar_type() == at::kBool) {
    gae_kernel<bool><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
        token_rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr<bool>(), adv.data_ptr<float>(),
        ret.data_ptr<float>(), B, T, g, gl, carry);
  } else {
    gae_kernel<float><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
        token_rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr<float>(), adv.data_ptr<float>(),
        ret.data_ptr<float>(), B, T, g, gl, carry);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {adv, ret};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlp, CUDA, m) { m.impl("gae", &gae_cuda); }
