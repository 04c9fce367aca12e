#pragma once
// FP8 E4M3, OCP 8-bit floating point specification, "fn" variant: 1 sign bit,
// 4 exponent bits (bias 7), 3 mantissa bits, no infinities, one NaN pattern per
// sign (S.1111.111), largest finite value 448, smallest subnormal 2^-9.
//
// Lexico stores sparse-code coefficients in this format. The reference code casts
// without a scale, so a coefficient above 448 becomes NaN there; here every coded
// vector carries a power-of-two scale (one E8M0 byte, as in the OCP MX formats),
// chosen so that the vector's largest coefficient lands in [224, 448].

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>

#include "error.hpp"

namespace lexico {

inline constexpr float fp8_e4m3_max = 448.0f;

namespace detail {

inline float fp8_e4m3_value(std::uint8_t code) {
  const int sign = code >> 7;
  const int exponent = (code >> 3) & 0xF;
  const int mantissa = code & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    magnitude = std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: m/8 * 2^-6
  } else {
    magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);  // (1 + m/8) * 2^(e-7)
  }
  return sign ? -magnitude : magnitude;
}

inline const std::array<float, 256>& fp8_e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> values{};
    for (int c = 0; c < 256; ++c) values[static_cast<std::size_t>(c)] = fp8_e4m3_value(static_cast<std::uint8_t>(c));
    return values;
  }();
  return table;
}

}  // namespace detail

inline float fp8_e4m3_decode(std::uint8_t code) { return detail::fp8_e4m3_table()[code]; }

// Round to nearest, ties to even; magnitudes above 448 saturate to 448.
inline std::uint8_t fp8_e4m3_encode(float x) {
  require(std::isfinite(x), "fp8_e4m3_encode: input is ", x, " (NaN and Inf cannot be coded)");
  const std::uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  const float magnitude = std::fabs(x);
  if (magnitude >= fp8_e4m3_max) return sign | 0x7E;
  if (magnitude == 0.0f) return sign;
  int exponent;  // magnitude = f * 2^exponent, f in [0.5, 1)
  std::frexp(magnitude, &exponent);
  // Below 2^-6 the grid step is 2^-9 (subnormals); a normal binade [2^e, 2^(e+1))
  // has step 2^(e-3). Counting steps from zero makes the code a plain integer:
  // rounding up out of a binade carries into the exponent field by itself.
  const int binade = exponent - 1;
  if (binade < -6) return sign | static_cast<std::uint8_t>(std::nearbyint(std::ldexp(magnitude, 9)));
  const int steps = static_cast<int>(std::nearbyint(std::ldexp(magnitude, 3 - binade)));  // in [8, 16]
  return sign | static_cast<std::uint8_t>(((binade + 7) << 3) + (steps - 8));
}

namespace detail {

// 2^(code - 127) for every E8M0 code; 0xFF (NaN) is never produced by fp8_scale_for.
inline const std::array<float, 256>& e8m0_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> values{};
    for (int c = 0; c < 255; ++c) values[static_cast<std::size_t>(c)] = std::ldexp(1.0f, c - 127);
    values[255] = std::numeric_limits<float>::quiet_NaN();
    return values;
  }();
  return table;
}

}  // namespace detail

// E8M0: an unsigned power-of-two exponent with bias 127 (OCP MX scale format).
inline float e8m0_decode(std::uint8_t code) {
  require(code != 0xFF, "e8m0_decode: 0xFF is the NaN scale");
  return detail::e8m0_table()[code];
}

// The power-of-two scale for a vector whose largest magnitude is `max_abs`:
// max_abs / scale falls in [224, 448], so no value overflows and small values keep
// as many significant bits as the format allows.
inline std::uint8_t fp8_scale_for(float max_abs) {
  require(std::isfinite(max_abs), "fp8_scale_for: largest magnitude is ", max_abs);
  if (max_abs == 0.0f) return 127;
  int exponent;
  std::frexp(max_abs / fp8_e4m3_max, &exponent);  // max_abs / 448 < 2^exponent
  const int biased = std::clamp(exponent + 127, 0, 254);
  return static_cast<std::uint8_t>(biased);
}

// Codes n values with one shared power-of-two scale; returns the scale byte.
inline std::uint8_t fp8_encode_scaled(const float* values, int n, std::uint8_t* codes) {
  float max_abs = 0.0f;
  for (int i = 0; i < n; ++i) {
    require(std::isfinite(values[i]), "fp8_encode_scaled: value ", i, " is ", values[i]);
    max_abs = std::max(max_abs, std::fabs(values[i]));
  }
  const std::uint8_t scale = fp8_scale_for(max_abs);
  const int shift = 127 - static_cast<int>(scale);
  for (int i = 0; i < n; ++i) codes[i] = fp8_e4m3_encode(std::ldexp(values[i], shift));
  return scale;
}

inline void fp8_decode_scaled(const std::uint8_t* codes, int n, std::uint8_t scale, float* values) {
  const float factor = e8m0_decode(scale);
  for (int i = 0; i < n; ++i) values[i] = fp8_e4m3_decode(codes[i]) * factor;
}

}  // namespace lexico
