// Math the compiler can vectorise. std::exp is a libm call that keeps a loop scalar without
// -ffast-math; these are plain float/int arithmetic, so `omp simd` loops that call them vectorise.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

namespace rlp {

// exp(x) for -88 <= x <= 88, about 2 ulp: Cody-Waite range reduction and Cephes' degree-6
// polynomial. round(x / ln 2) uses the 1.5 * 2^23 shifter (std::floor is a libm call too).
// At -88 the 2**n bits reach 0: exp(-88) == 0. Callers clamp their arguments into range.
inline float exp_vec(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);  // y * 2**n
}

// fp64 is the reference-precision path: keep libm.
inline double exp_vec(double x) { return std::exp(x); }

}  // namespace rlp
