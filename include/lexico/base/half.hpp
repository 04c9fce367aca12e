#pragma once
// Conversions between fp32 and the 16-bit storage types (Eigen::half = IEEE fp16,
// Eigen::bfloat16), row at a time, vectorised where the CPU has F16C / AVX-512.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <Eigen/Core>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lexico {

// One fp16 value as fp32: the F16C instruction where the CPU has it (Eigen's conversion
// here is a bit-twiddling routine, a dozen instructions with branches).
inline float half_to_float(Eigen::half h) {
#if defined(__F16C__) || defined(__AVX512F__)
  std::uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(h);
#endif
}

template <typename Scalar>
void to_float(const Scalar* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename Scalar>
void from_float(const float* src, Scalar* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = Scalar(src[i]);
}

template <>
inline void to_float<float>(const float* src, float* dst, int n) {
  std::copy(src, src + n, dst);
}

template <>
inline void to_float<Eigen::half>(const Eigen::half* src, float* dst, int n) {
  int i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

template <>
inline void to_float<Eigen::bfloat16>(const Eigen::bfloat16* src, float* dst, int n) {
  // bf16 is the top half of an fp32: widen by a 16-bit shift (vectorises as is).
  for (int i = 0; i < n; ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, src + i, sizeof bits);
    const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
    std::memcpy(dst + i, &wide, sizeof wide);
  }
}

// A name for each storage type, for cache parameters and messages.
template <typename Scalar>
constexpr const char* scalar_name() {
  if constexpr (std::is_same_v<Scalar, float>) return "fp32";
  if constexpr (std::is_same_v<Scalar, Eigen::half>) return "fp16";
  if constexpr (std::is_same_v<Scalar, Eigen::bfloat16>) return "bf16";
}

}  // namespace lexico
