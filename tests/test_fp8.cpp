#include <lexico/base/fp8.hpp>

#include <cmath>
#include <limits>

#include <gtest/gtest.h>

namespace {

// The value of an E4M3 code straight from the definition, written independently of
// the library: (-1)^s * 2^(e-7) * (1 + m/8) for e > 0, (-1)^s * 2^-6 * m/8 for e = 0.
double reference_value(int code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  const double magnitude = e == 0 ? std::pow(2.0, -6) * m / 8.0 : std::pow(2.0, e - 7) * (1.0 + m / 8.0);
  return s ? -magnitude : magnitude;
}

bool is_nan_code(int code) { return (code & 0x7F) == 0x7F; }

TEST(Fp8, EveryCodeDecodesToItsDefinedValue) {
  for (int code = 0; code < 256; ++code) {
    const float decoded = lexico::fp8_e4m3_decode(static_cast<std::uint8_t>(code));
    if (is_nan_code(code)) {
      EXPECT_TRUE(std::isnan(decoded)) << "code " << code;
    } else {
      EXPECT_EQ(static_cast<double>(decoded), reference_value(code)) << "code " << code;
    }
  }
  EXPECT_EQ(lexico::fp8_e4m3_decode(0x7E), 448.0f);
  EXPECT_EQ(lexico::fp8_e4m3_decode(0x01), std::ldexp(1.0f, -9));
}

TEST(Fp8, EncodeInvertsDecodeForEveryFiniteCode) {
  for (int code = 0; code < 256; ++code) {
    if (is_nan_code(code)) continue;
    const float value = lexico::fp8_e4m3_decode(static_cast<std::uint8_t>(code));
    EXPECT_EQ(lexico::fp8_e4m3_encode(value), code) << "value " << value;
  }
}

TEST(Fp8, RoundsToNearestWithTiesToEven) {
  // Between 1.0 (mantissa 000) and 1.125 (001): 1.0625 is a tie -> even (1.0).
  EXPECT_EQ(lexico::fp8_e4m3_decode(lexico::fp8_e4m3_encode(1.0625f)), 1.0f);
  // Between 1.125 (001) and 1.25 (010): 1.1875 is a tie -> even (1.25).
  EXPECT_EQ(lexico::fp8_e4m3_decode(lexico::fp8_e4m3_encode(1.1875f)), 1.25f);
  EXPECT_EQ(lexico::fp8_e4m3_decode(lexico::fp8_e4m3_encode(1.07f)), 1.125f);
  // Subnormal tie: 1.5 * 2^-9 lies between codes 1 and 2 -> 2 (even).
  EXPECT_EQ(lexico::fp8_e4m3_encode(1.5f * std::ldexp(1.0f, -9)), 2);
  EXPECT_EQ(lexico::fp8_e4m3_encode(0.5f * std::ldexp(1.0f, -9)), 0);  // ties to zero (even)
  // Rounding up out of a binade: 15.9 -> 16 (next exponent, mantissa 0).
  EXPECT_EQ(lexico::fp8_e4m3_decode(lexico::fp8_e4m3_encode(15.9f)), 16.0f);
  // Exhaustive check against the nearest grid value for a sweep of inputs.
  for (float x = -500.0f; x <= 500.0f; x += 0.0371f) {
    const float coded = lexico::fp8_e4m3_decode(lexico::fp8_e4m3_encode(x));
    double best = 1e30;
    for (int code = 0; code < 256; ++code)
      if (!is_nan_code(code)) best = std::min(best, std::fabs(reference_value(code) - std::clamp(x, -448.0f, 448.0f)));
    EXPECT_NEAR(std::fabs(static_cast<double>(coded) - std::clamp(x, -448.0f, 448.0f)), best, 1e-9) << x;
  }
}

TEST(Fp8, SaturatesInsteadOfOverflowing) {
  EXPECT_EQ(lexico::fp8_e4m3_decode(lexico::fp8_e4m3_encode(460.0f)), 448.0f);
  EXPECT_EQ(lexico::fp8_e4m3_decode(lexico::fp8_e4m3_encode(1e30f)), 448.0f);
  EXPECT_EQ(lexico::fp8_e4m3_decode(lexico::fp8_e4m3_encode(-1e30f)), -448.0f);
}

TEST(Fp8, NonFiniteInputRaises) {
  EXPECT_THROW(lexico::fp8_e4m3_encode(std::numeric_limits<float>::quiet_NaN()), lexico::error);
  EXPECT_THROW(lexico::fp8_e4m3_encode(std::numeric_limits<float>::infinity()), lexico::error);
  const float values[2] = {1.0f, std::numeric_limits<float>::infinity()};
  std::uint8_t codes[2];
  EXPECT_THROW(lexico::fp8_encode_scaled(values, 2, codes), lexico::error);
}

TEST(Fp8, ScaledCodingNeverOverflowsAndKeepsRelativePrecision) {
  for (float magnitude : {1e-30f, 1e-6f, 0.3f, 448.0f, 1353.0f, 1e6f, 3e38f}) {
    const float values[4] = {magnitude, -0.5f * magnitude, 0.01f * magnitude, 0.0f};
    std::uint8_t codes[4];
    const std::uint8_t scale = lexico::fp8_encode_scaled(values, 4, codes);
    float decoded[4];
    lexico::fp8_decode_scaled(codes, 4, scale, decoded);
    for (int i = 0; i < 4; ++i) {
      ASSERT_TRUE(std::isfinite(decoded[i])) << magnitude;
      // 3 mantissa bits: relative error at most 2^-4 for normal values.
      EXPECT_LE(std::fabs(decoded[i] - values[i]), std::fabs(values[i]) / 16.0f + 1e-38f) << magnitude << " " << i;
    }
    // The largest value uses the top binade: scaled into [224, 448].
    const float scaled = values[0] / lexico::e8m0_decode(scale);
    EXPECT_GE(scaled, 224.0f);
    EXPECT_LE(scaled, 448.0f);
  }
}

}  // namespace
