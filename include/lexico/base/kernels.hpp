#pragma once
// Small fp32 vector kernels written so that the compiler vectorises them without
// -ffast-math: a dot product keeps one partial sum per lane and adds the lanes
// only at the end, so no reassociation is needed inside the loop.

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace lexico::detail {

inline constexpr int lanes = 16;  // one AVX-512 register of floats, two AVX2 ones

// out[g] = <row, queries[g]> for `group` queries of length n stored back to back.
inline void dot_group(const float* row, const float* queries, int group, int n, float* out) {
  for (int g = 0; g < group; ++g) {
    const float* q = queries + g * n;
    float partial[lanes] = {};
    int i = 0;
    for (; i + lanes <= n; i += lanes)
      for (int l = 0; l < lanes; ++l) partial[l] += row[i + l] * q[i + l];
    float sum = 0.0f;
    for (; i < n; ++i) sum += row[i] * q[i];
    for (int l = 0; l < lanes; ++l) sum += partial[l];
    out[g] = sum;
  }
}

// out[g] += weights[g] * row for `group` outputs of length n stored back to back.
inline void axpy_group(const float* row, const float* weights, int group, int n, float* out) {
  for (int g = 0; g < group; ++g) {
    const float w = weights[g];
    float* o = out + g * n;
    for (int i = 0; i < n; ++i) o[i] += w * row[i];
  }
}

// exp(x) for x <= 0 (softmax arguments after subtracting the maximum), to about
// 3e-7 relative, on 16 floats at a time: std::exp is a library call per element,
// which dominated decode attention over long contexts. Cody-Waite range reduction
// x = n ln2 + r, |r| <= ln2/2, a degree-6 Taylor polynomial for e^r (truncation
// below 2e-8) and 2^n put into the exponent bits. GCC/Clang vector extensions keep
// it portable: they compile to AVX-512, AVX2 or scalar code as the target allows.
using float16v = float __attribute__((vector_size(64)));
using int16v = std::int32_t __attribute__((vector_size(64)));

// 16 values in place (a pointer, not a vector argument, keeps the ABI the same with
// and without AVX-512).
inline void exp_nonpositive16(float* values) {
  float16v x;
  std::memcpy(&x, values, sizeof x);
  x = x < -87.0f ? float16v{} - 87.0f : x;  // e^-87 ~ 1.6e-38: smaller results would be denormal
  const float16v n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, int16v), float16v);
  const float16v r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 split hi + lo; n = round(x / ln2)
  float16v p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int16v bits = (__builtin_convertvector(n, int16v) + 127) << 23;
  float16v scale;
  std::memcpy(&scale, &bits, sizeof scale);
  x = p * scale;
  std::memcpy(values, &x, sizeof x);
}

// values[i] = exp(values[i]) for n values <= 0.
inline void exp_nonpositive(float* values, long n) {
  long i = 0;
  for (; i + 16 <= n; i += 16) exp_nonpositive16(values + i);
  if (i < n) {
    float tail[16] = {};
    std::memcpy(tail, values + i, sizeof(float) * static_cast<std::size_t>(n - i));
    exp_nonpositive16(tail);
    std::memcpy(values + i, tail, sizeof(float) * static_cast<std::size_t>(n - i));
  }
}

}  // namespace lexico::detail
