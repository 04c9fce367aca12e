#pragma once
// Small fp32 vector kernels written so that the compiler vectorises them without
// -ffast-math: a dot product keeps one partial sum per lane and adds the lanes
// only at the end, so no reassociation is needed inside the loop.

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

}  // namespace lexico::detail
