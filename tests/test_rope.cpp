// RoPE: the inverse rotation undoes the rotation in both layouts, a rotation keeps the
// norm of every pair, and the consecutive-position angles agree with angles computed
// directly in double at every position.
#include <lexico/base/rope.hpp>

#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

namespace {

TEST(Rope, InverseRotationUndoesRotationAndPairsKeepTheirNorms) {
  for (const auto style : {lexico::RopeStyle::rotate_half, lexico::RopeStyle::interleaved}) {
    const lexico::Rope rope(8, 10000.0f, style);
    std::mt19937 rng(3);
    std::normal_distribution<float> normal;
    std::vector<float> v(8), cos(4), sin(4);
    for (float& x : v) x = normal(rng);
    const std::vector<float> original = v;
    rope.angles(777, cos.data(), sin.data());
    rope.rotate(v.data(), cos.data(), sin.data());
    for (int j = 0; j < 4; ++j) {
      const int a = style == lexico::RopeStyle::interleaved ? 2 * j : j;
      const int b = style == lexico::RopeStyle::interleaved ? 2 * j + 1 : j + 4;
      EXPECT_NEAR(std::hypot(v[a], v[b]), std::hypot(original[a], original[b]), 1e-5) << "pair " << j;
    }
    EXPECT_GT(std::abs(v[0] - original[0]), 1e-3);
    rope.rotate(v.data(), cos.data(), sin.data(), true);
    for (int i = 0; i < 8; ++i) EXPECT_NEAR(v[i], original[i], 1e-5) << "element " << i;
  }
}

TEST(Rope, HandComputedRotation) {
  // d = 4, theta = 100: frequencies 1 and 0.1; at position 2 the angles are 2 and 0.2.
  const lexico::Rope rope(4, 100.0f, lexico::RopeStyle::rotate_half);
  std::vector<float> v = {1, 0, 0, 1}, cos(2), sin(2);  // pairs (v0, v2) = (1, 0) and (v1, v3) = (0, 1)
  rope.angles(2, cos.data(), sin.data());
  rope.rotate(v.data(), cos.data(), sin.data());
  EXPECT_NEAR(v[0], std::cos(2.0), 1e-6);
  EXPECT_NEAR(v[2], std::sin(2.0), 1e-6);
  EXPECT_NEAR(v[1], -std::sin(0.2), 1e-6);
  EXPECT_NEAR(v[3], std::cos(0.2), 1e-6);
}

TEST(Rope, ConsecutiveAnglesMatchDirectAngles) {
  const int d = 64;
  const lexico::Rope rope(d, 500000.0f, lexico::RopeStyle::rotate_half);
  const std::int64_t first = 70000, count = 3000;
  std::vector<float> cos(static_cast<std::size_t>(count * d / 2)), sin(cos.size());
  rope.consecutive_angles(first, count, cos.data(), sin.data());
  double worst = 0;
  for (std::int64_t t = 0; t < count; ++t)
    for (int j = 0; j < d / 2; ++j) {
      const double frequency = 1.0f / std::pow(500000.0f, static_cast<float>(2 * j) / static_cast<float>(d));
      const double angle = static_cast<double>(first + t) * frequency;
      worst = std::max({worst, std::abs(cos[static_cast<std::size_t>(t * d / 2 + j)] - std::cos(angle)),
                        std::abs(sin[static_cast<std::size_t>(t * d / 2 + j)] - std::sin(angle))});
    }
  EXPECT_LT(worst, 1e-6);
}

TEST(Rope, RotateRowsAgreesWithConsecutiveAnglesWhateverItRotatedBefore) {
  // rotate_rows keeps the angles of its last runs per thread: every run, repeated or new,
  // and a Rope of another theta at the same positions, must turn rows by their own angles.
  const lexico::Rope a(8, 10000.0f, lexico::RopeStyle::rotate_half), b(8, 500.0f, lexico::RopeStyle::rotate_half);
  const std::int64_t runs[][2] = {{0, 4},    {900, 33}, {0, 4},    {901, 33}, {900, 32},
                                  {7, 1},    {900, 33}, {0, 4},    {0, 2000}, {900, 33},
                                  {5, 1500}, {0, 2000}, {0, 4}};  // runs past 1,024 take the scratch slot
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  for (int repeat = 0; repeat < 2; ++repeat)
    for (const auto& run : runs)
      for (const lexico::Rope* rope : {&a, &b}) {
        const std::int64_t first = run[0], count = run[1];
        std::vector<float> rows(static_cast<std::size_t>(count * 8)), want, cos(static_cast<std::size_t>(count * 4)),
            sin(cos.size());
        for (float& x : rows) x = normal(rng);
        want = rows;
        rope->consecutive_angles(first, count, cos.data(), sin.data());
        for (std::int64_t t = 0; t < count; ++t) rope->rotate(want.data() + t * 8, cos.data() + t * 4, sin.data() + t * 4);
        rope->rotate_rows(first, rows.data(), count, 8, 1);
        for (std::size_t i = 0; i < rows.size(); ++i)
          ASSERT_EQ(rows[i], want[i]) << "theta " << rope->theta() << " first " << first << " count " << count;
      }
}

TEST(Rope, RejectsImpossibleParameters) {
  EXPECT_THROW(lexico::Rope(7, 10000.0f, lexico::RopeStyle::rotate_half), lexico::error);
  EXPECT_THROW(lexico::Rope(8, 1.0f, lexico::RopeStyle::rotate_half), lexico::error);
  EXPECT_THROW(lexico::Rope(8, NAN, lexico::RopeStyle::rotate_half), lexico::error);
  EXPECT_THROW(lexico::parse_rope_style("sideways"), lexico::error);
  EXPECT_EQ(lexico::parse_rope_style(lexico::to_string(lexico::RopeStyle::interleaved)), lexico::RopeStyle::interleaved);
}

}  // namespace

// A RopeRun's angles over several blocks, from a far position, against direct sin/cos in double.
TEST(Rope, RunMatchesDirectAngles) {
  for (auto style : {lexico::RopeStyle::rotate_half, lexico::RopeStyle::interleaved}) {
    const lexico::Rope rope(64, 500000.0f, style);
    const std::int64_t first = 123457;
    lexico::RopeRun run(rope, first);
    std::vector<float> cos(32), sin(32);
    for (std::int64_t t = 0; t < 3 * lexico::Rope::run_block + 5; ++t) {
      run.next(cos.data(), sin.data());
      for (int j = 0; j < 32; ++j) {
        const double angle = static_cast<double>(first + t) * rope.frequency(j);
        ASSERT_NEAR(cos[static_cast<std::size_t>(j)], std::cos(angle), 2e-6) << t << " " << j;
        ASSERT_NEAR(sin[static_cast<std::size_t>(j)], std::sin(angle), 2e-6) << t << " " << j;
      }
    }
  }
}

// The block form: block k's angle is position first + k·run_block, and turning it by the
// step table gives every position of the block.
TEST(Rope, RunBlocksMatchDirectAngles) {
  const lexico::Rope rope(64, 500000.0f, lexico::RopeStyle::rotate_half);
  const std::int64_t first = 98765;
  lexico::RopeRun run(rope, first);
  std::vector<float> cos(32), sin(32);
  for (int k = 0; k < 5; ++k) {
    run.next_block(cos.data(), sin.data());
    for (int t : {0, 1, lexico::Rope::run_block - 1}) {
      const float* pc = rope.step_cos(t);
      const float* ps = rope.step_sin(t);
      for (int j = 0; j < 32; ++j) {
        const double angle = static_cast<double>(first + k * lexico::Rope::run_block + t) * rope.frequency(j);
        const double c = cos[j] * pc[j] - sin[j] * ps[j], s = sin[j] * pc[j] + cos[j] * ps[j];
        ASSERT_NEAR(c, std::cos(angle), 2e-6) << k << " " << t << " " << j;
        ASSERT_NEAR(s, std::sin(angle), 2e-6) << k << " " << t << " " << j;
      }
    }
  }
}
