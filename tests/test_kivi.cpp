// KIVI: quantized values worked out by hand, the two residual rules, exact bytes, GQA
// attention over the stored tokens, and bad options.
#include <lexico/cache/kivi.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>

#include <gtest/gtest.h>

#include "cache_test_util.hpp"

namespace {

using lexico::KiviCache;
using lexico::KiviOptions;
using lexico::RowMatrix;
using lexico_test::random_rows;

// KIVI's quantizer written out independently: fp16 scale = (max - min) / (2^b - 1) and
// fp16 minimum, code = round((x - min) / scale) in [0, 2^b - 1], x̂ = code * scale + min.
std::vector<float> kivi_round_trip(const std::vector<float>& x, int bits) {
  const float lo = *std::min_element(x.begin(), x.end()), hi = *std::max_element(x.begin(), x.end());
  const float levels = static_cast<float>((1 << bits) - 1);
  const float scale = static_cast<float>(Eigen::half((hi - lo) / levels));
  const float min = static_cast<float>(Eigen::half(lo));
  std::vector<float> out;
  for (float v : x) {
    const float code = scale > 0 ? std::nearbyint(std::clamp((v - min) / scale, 0.0f, levels)) : 0.0f;
    out.push_back(code * scale + min);
  }
  return out;
}

TEST(BlockQuantizer, MinMaxPacksLowBitsFirst) {
  const lexico::BlockQuantizer two(lexico::QuantScheme::min_max, 2), four(lexico::QuantScheme::min_max, 4);
  const float x[8] = {0, 1, 2, 3, 3, 2, 1, 0};  // scale 1, minimum 0: codes are the values
  std::uint8_t packed[4] = {};
  Eigen::half params[2];
  two.quantize(x, 8, 1, packed, params);
  EXPECT_EQ(packed[0], 0b11100100);  // codes 0,1,2,3 from the low bits up
  EXPECT_EQ(packed[1], 0b00011011);  // codes 3,2,1,0
  EXPECT_EQ(static_cast<float>(params[0]), 1.0f);
  EXPECT_EQ(static_cast<float>(params[1]), 0.0f);
  const float y[4] = {15, 0, 5, 10};  // scale 1 at 4 bits
  four.quantize(y, 4, 1, packed, params);
  EXPECT_EQ(packed[0], 0x0F);
  EXPECT_EQ(packed[1], 0xA5);
  float back[4];
  four.dequantize(packed, params, 4, back);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(back[i], y[i]);
}

// 2 bits, group 32 = residual 32, one head of 32 channels, 33 prefilled tokens: keys
// 0..31 are quantized per channel, value 0 per token, the rest stays fp16.
TEST(Kivi, TwoBitCodesOfKnownValuesMatchHandComputation) {
  const int d = 32, tokens = 33;
  RowMatrix keys(tokens, d), values(tokens, d), queries = RowMatrix::Zero(tokens, d);
  for (int t = 0; t < tokens; ++t)
    for (int c = 0; c < d; ++c) {
      keys(t, c) = c == 0 ? static_cast<float>(t) : c == 1 ? 5.0f : static_cast<float>((t * c) % 7) - 3.0f + 0.1f * c;
      values(t, c) = static_cast<float>(c);
    }
  KiviCache cache({1, 1, d}, KiviOptions{2, 32, 32});
  RowMatrix out(tokens, d);
  cache.prefill(0, keys, values, queries, out);
  ASSERT_EQ(cache.quantized_keys(0), 32);
  ASSERT_EQ(cache.residual_keys(0), 1);
  ASSERT_EQ(cache.quantized_values(0), 1);
  ASSERT_EQ(cache.residual_values(0), 32);

  // 0, 1, ..., 31: scale = fp16(31 / 3) = 10.3359375, minimum 0. Codes change where
  // t / 10.3359375 crosses 0.5, 1.5, 2.5, i.e. at t = 6, 16, 26.
  const float s = 10.3359375f;
  ASSERT_EQ(static_cast<float>(Eigen::half(31.0f / 3.0f)), s);
  auto by_hand = [&](int i) { return i < 6 ? 0.0f : i < 16 ? s : i < 26 ? 2 * s : 3 * s; };
  const RowMatrix k = cache.stored_keys(0, 0), v = cache.stored_values(0, 0);
  for (int t = 0; t < 32; ++t) {
    EXPECT_EQ(k(t, 0), by_hand(t)) << "key channel 0, token " << t;
    EXPECT_EQ(k(t, 1), 5.0f) << "a constant group is exact (max == min)";
  }
  for (int c = 0; c < d; ++c) EXPECT_EQ(v(0, c), by_hand(c)) << "value 0, channel " << c;
  // Every other channel against the quantizer written out above.
  for (int c = 2; c < d; ++c) {
    std::vector<float> column;
    for (int t = 0; t < 32; ++t) column.push_back(static_cast<float>(Eigen::half(keys(t, c))));
    const std::vector<float> want = kivi_round_trip(column, 2);
    for (int t = 0; t < 32; ++t) EXPECT_EQ(k(t, c), want[static_cast<std::size_t>(t)]) << c << " " << t;
  }
  // The residual holds the fp16 inputs.
  for (int c = 0; c < d; ++c) {
    EXPECT_EQ(k(32, c), static_cast<float>(Eigen::half(keys(32, c))));
    for (int t = 1; t < tokens; ++t) EXPECT_EQ(v(t, c), values(t, c));
  }
}

// KIVI-b memory, written out: codes at b bits, an fp16 scale and minimum per group, fp16 residuals.
std::size_t kivi_bytes(Eigen::Index tokens, int heads, int d, int bits, int group, int residual) {
  const Eigen::Index quantized_keys = tokens / residual * residual, residual_keys = tokens - quantized_keys;
  const Eigen::Index quantized_values = std::max<Eigen::Index>(0, tokens - residual);
  const Eigen::Index residual_values = tokens - quantized_values;
  const Eigen::Index codes = (quantized_keys + quantized_values) * heads * d * bits / 8;
  const Eigen::Index groups = (quantized_keys / group) * heads * d + quantized_values * heads * (d / group);
  return static_cast<std::size_t>(codes + groups * 2 * 2 + (residual_keys + residual_values) * heads * d * 2);
}

class KiviRules : public ::testing::TestWithParam<int> {};

// After every decode step of T = 1..3R+3: keys quantized in blocks of R, values one at a
// time beyond R; bytes by the formula; a prefill of T tokens stores exactly the same.
TEST_P(KiviRules, ResidualWindowsAndBytesAfterEveryStep) {
  const int bits = GetParam(), heads = 2, d = 8, group = 4, residual = 8, q_heads = 4;
  const int steps = 3 * residual + 3;
  std::mt19937 rng(7);
  const RowMatrix keys = random_rows(steps, heads * d, rng), values = random_rows(steps, heads * d, rng);
  const RowMatrix queries = random_rows(steps, q_heads * d, rng);
  const KiviOptions options{bits, group, residual};
  KiviCache decoded({1, heads, d}, options);
  RowMatrix out(q_heads, d);
  for (int t = 0; t < steps; ++t) {
    decoded.append(0, keys.row(t).data(), values.row(t).data());
    // Before this step's attention the new key is still in the fp16 residual.
    EXPECT_EQ(decoded.residual_keys(0), t % residual + 1);
    decoded.attend(0, lexico_test::query_heads(queries, t, d), out);
    const int seen = t + 1;
    EXPECT_EQ(decoded.quantized_keys(0), seen / residual * residual);
    EXPECT_EQ(decoded.residual_keys(0), seen % residual);
    EXPECT_EQ(decoded.quantized_values(0), std::max(0, seen - residual));
    EXPECT_EQ(decoded.residual_values(0), std::min(seen, residual));
    EXPECT_EQ(decoded.bytes().total(), kivi_bytes(seen, heads, d, bits, group, residual)) << "T = " << seen;

    KiviCache prefilled({1, heads, d}, options);
    RowMatrix block_out(seen, q_heads * d);
    prefilled.prefill(0, keys.topRows(seen), values.topRows(seen), queries.topRows(seen), block_out);
    EXPECT_EQ(prefilled.bytes().total(), decoded.bytes().total());
    for (int h = 0; h < heads; ++h) {
      EXPECT_EQ(prefilled.stored_keys(0, h), decoded.stored_keys(0, h)) << "T = " << seen;
      EXPECT_EQ(prefilled.stored_values(0, h), decoded.stored_values(0, h)) << "T = " << seen;
    }
  }
  const double expected = static_cast<double>(kivi_bytes(steps, heads, d, bits, group, residual)) / (2.0 * 2 * steps * heads * d);
  EXPECT_DOUBLE_EQ(decoded.kv_size_fraction(), expected);
}

INSTANTIATE_TEST_SUITE_P(Bits, KiviRules, ::testing::Values(2, 4));

TEST(Kivi, PaperSizes) {
  // baselines.md §2.1.6: KIVI-2 at G = 32, R = 128, T = 1024 is 3.81 bits per element
  // (23.8 %), KIVI-4 5.69 bits; the bits per element do not depend on head_dim.
  EXPECT_NEAR(static_cast<double>(kivi_bytes(1024, 1, 128, 2, 32, 128)) * 8 / (2.0 * 1024 * 128), 3.8125, 1e-9);
  std::mt19937 rng(1);
  const RowMatrix kv = random_rows(1024, 32, rng), q = random_rows(1024, 32, rng);
  RowMatrix out(1024, 32);
  for (int bits : {2, 4}) {
    KiviCache cache({1, 1, 32}, KiviOptions{bits, 32, 128});
    cache.prefill(0, kv, kv, q, out);
    EXPECT_NEAR(cache.kv_size_fraction(), (bits == 2 ? 3.8125 : 5.6875) / 16, 1e-12);
    EXPECT_EQ(cache.bytes().total(), kivi_bytes(1024, 1, 32, bits, 32, 128));
  }
}

// 8 query heads on 2 KV heads: every decode step attends like naive attention over the
// dequantized keys and values, through several key flushes and value evictions.
TEST(Kivi, GqaAttentionMatchesNaiveOverStoredTokens) {
  const int q_heads = 8, kv_heads = 2, d = 32;
  for (int bits : {2, 4}) {
    KiviCache cache({2, kv_heads, d}, KiviOptions{bits, 32, 32});
    std::mt19937 rng(static_cast<unsigned>(bits));
    const int prompt = 40, steps = 60;
    const RowMatrix keys = random_rows(prompt + steps, kv_heads * d, rng);
    const RowMatrix values = random_rows(prompt + steps, kv_heads * d, rng);
    const RowMatrix queries = random_rows(prompt + steps, q_heads * d, rng);
    lexico_test::expect_decode_over_stored(cache, 1, keys, values, queries, prompt, 2e-5);
    EXPECT_GT(cache.quantized_keys(1), 0);
    EXPECT_EQ(cache.seen(0), 0);
    EXPECT_EQ(cache.bytes().total(), kivi_bytes(prompt + steps, kv_heads, d, bits, 32, 32));
  }
}

TEST(Kivi, ConstantAndZeroInputsStayFinite) {
  KiviCache cache({1, 1, 32}, KiviOptions{2, 32, 32});
  const std::vector<float> zeros(32, 0.0f), ones(32, 1.0f);
  RowMatrix q = RowMatrix::Ones(2, 32), out(2, 32);
  for (int t = 0; t < 70; ++t) cache.decode(0, zeros.data(), t % 2 ? ones.data() : zeros.data(), q, out);
  EXPECT_TRUE(out.allFinite());
  EXPECT_TRUE(cache.stored_keys(0, 0).isZero());
  const RowMatrix v = cache.stored_values(0, 0);
  for (int t = 0; t < 70; ++t) EXPECT_EQ(v(t, 0), t % 2 ? 1.0f : 0.0f);
}

TEST(Kivi, ClearForgetsEverything) {
  KiviCache cache({1, 1, 32}, KiviOptions{2, 32, 32});
  std::mt19937 rng(3);
  const RowMatrix kv = random_rows(80, 32, rng), q = random_rows(80, 32, rng);
  RowMatrix out(80, 32);
  cache.prefill(0, kv, kv, q, out);
  cache.clear();
  EXPECT_EQ(cache.bytes().total(), 0u);
  EXPECT_EQ(cache.stored_keys(0, 0).rows(), 0);
}

// The truncation floor is the token count at the last quantization: 0 while everything
// is in the windows, the count at the key block's quantization, then (values leave one
// per step) the last settled count, so only a token not yet attended can be undone. A
// truncated layer equals one that never saw the dropped tokens.
TEST(Kivi, TruncateFloorFollowsTheLastQuantization) {
  const int heads = 2, d = 32, residual = 32, q_heads = 4;
  std::mt19937 rng(12);
  const RowMatrix keys = random_rows(80, heads * d, rng), values = random_rows(80, heads * d, rng);
  const RowMatrix queries = random_rows(80, q_heads * d, rng);
  const KiviOptions options{2, 32, residual};
  KiviCache cache({1, heads, d}, options);
  RowMatrix out(q_heads, d);
  for (int t = 0; t < 31; ++t)
    cache.decode(0, keys.row(t).data(), values.row(t).data(), lexico_test::query_heads(queries, t, d), out);
  EXPECT_EQ(cache.truncate_floor(0), 0);  // 31 tokens, all in the windows
  cache.append(0, 31, keys.middleRows(31, 2), values.middleRows(31, 2));
  // Token 32's append settled 32 tokens: keys 0..31 were quantized.
  EXPECT_EQ(cache.quantized_keys(0), 32);
  EXPECT_EQ(cache.truncate_floor(0), 32);
  EXPECT_THROW(cache.truncate(31), lexico::error);
  cache.truncate(32);
  KiviCache reference({1, heads, d}, options);
  for (int t = 0; t < 31; ++t)
    reference.decode(0, keys.row(t).data(), values.row(t).data(), lexico_test::query_heads(queries, t, d), out);
  reference.decode(0, keys.row(31).data(), values.row(31).data(), lexico_test::query_heads(queries, 31, d), out);
  for (int h = 0; h < heads; ++h) {
    EXPECT_EQ(cache.stored_keys(0, h), reference.stored_keys(0, h));
    EXPECT_EQ(cache.stored_values(0, h), reference.stored_values(0, h));
  }
  EXPECT_EQ(cache.bytes().total(), reference.bytes().total());
  // From 33 tokens on every settle quantizes a value: one unattended token can go.
  for (int t = 32; t < 40; ++t)
    cache.decode(0, keys.row(t).data(), values.row(t).data(), lexico_test::query_heads(queries, t, d), out);
  EXPECT_EQ(cache.truncate_floor(0), 40);
  cache.append(0, keys.row(40).data(), values.row(40).data());
  EXPECT_EQ(cache.truncate_floor(0), 40);
  cache.truncate(40);
  EXPECT_EQ(cache.residual_values(0), residual);
  EXPECT_EQ(cache.quantized_values(0), 40 - residual);
  EXPECT_EQ(cache.bytes().total(), kivi_bytes(40, heads, d, 2, 32, residual));
}

// A block prefilled after a token that was appended but not attended (its window full of
// keys, not yet quantized): every tile of the block sees the held tokens settled, as the
// block's first append leaves them, and the cache ends as if the block was appended.
TEST(Kivi, ChunkedPrefillSeesTheSettledWindows) {
  const int heads = 2, d = 32, residual = 32, q_heads = 4, held = 32, block = 40;
  std::mt19937 rng(13);
  const RowMatrix keys = random_rows(held + block, heads * d, rng), values = random_rows(held + block, heads * d, rng);
  const RowMatrix queries = random_rows(held + block, q_heads * d, rng);
  const KiviOptions options{2, 32, residual};
  KiviCache chunked({1, heads, d}, options), settled({1, heads, d}, options), appended({1, heads, d}, options);
  RowMatrix out(q_heads, d);
  for (KiviCache* cache : {&chunked, &settled, &appended}) {
    for (int t = 0; t < held - 1; ++t)
      cache->decode(0, keys.row(t).data(), values.row(t).data(), lexico_test::query_heads(queries, t, d), out);
    cache->append(0, keys.row(held - 1).data(), values.row(held - 1).data());
  }
  ASSERT_EQ(chunked.residual_keys(0), residual);  // not yet quantized
  settled.attend(0, lexico_test::query_heads(queries, held - 1, d), out);
  ASSERT_EQ(settled.quantized_keys(0), residual);
  RowMatrix block_out(block, q_heads * d);
  chunked.prefill(0, held, keys.bottomRows(block), values.bottomRows(block), queries.bottomRows(block), block_out);
  // Reference in double: the settled held tokens, then block tokens 0..t exactly.
  const int group = q_heads / heads;
  for (int h = 0; h < heads; ++h) {
    const Eigen::MatrixXd held_keys = settled.stored_keys(0, h).cast<double>();
    const Eigen::MatrixXd held_values = settled.stored_values(0, h).cast<double>();
    for (int t = 0; t < block; ++t) {
      Eigen::MatrixXd k(held + t + 1, d), v(held + t + 1, d);
      k.topRows(held) = held_keys;
      v.topRows(held) = held_values;
      k.bottomRows(t + 1) = keys.block(held, h * d, t + 1, d).cast<double>();
      v.bottomRows(t + 1) = values.block(held, h * d, t + 1, d).cast<double>();
      for (int g = 0; g < group; ++g) {
        const int qh = h * group + g;
        const Eigen::VectorXd want = lexico_test::naive_attention(
            queries.row(held + t).segment(qh * d, d).transpose().cast<double>(), k, v);
        for (int i = 0; i < d; ++i)
          ASSERT_NEAR(block_out(t, qh * d + i), want(i), 2e-5) << "token " << t << " head " << qh;
      }
    }
  }
  appended.append(0, held, keys.bottomRows(block), values.bottomRows(block));
  for (int h = 0; h < heads; ++h) {
    EXPECT_EQ(chunked.stored_keys(0, h), appended.stored_keys(0, h));
    EXPECT_EQ(chunked.stored_values(0, h), appended.stored_values(0, h));
  }
  EXPECT_EQ(chunked.bytes().total(), appended.bytes().total());
}

TEST(Kivi, BadOptionsRaise) {
  const lexico::CacheShape shape{1, 2, 32};
  EXPECT_THROW(KiviCache(shape, KiviOptions{3, 32, 128}), lexico::error);   // bits
  EXPECT_THROW(KiviCache(shape, KiviOptions{2, 24, 48}), lexico::error);    // group does not divide head_dim
  EXPECT_THROW(KiviCache(shape, KiviOptions{2, 32, 48}), lexico::error);    // residual not a multiple of group
  EXPECT_THROW(KiviCache(shape, KiviOptions{2, 32, 0}), lexico::error);     // no residual
  EXPECT_THROW(KiviCache(shape, KiviOptions{2, 2, 32}), lexico::error);     // 2 codes of 2 bits: half a byte
  EXPECT_THROW(KiviCache(shape, KiviOptions{2, 0, 32}), lexico::error);
  // Inputs that fp16 cannot hold raise before anything is stored.
  KiviCache cache(shape);
  std::vector<float> bad(64, 1.0f), good(64, 1.0f);
  bad[5] = std::nanf("");
  EXPECT_THROW(cache.append(0, bad.data(), good.data()), lexico::error);
  bad[5] = 1e6f;
  EXPECT_THROW(cache.append(0, good.data(), bad.data()), lexico::error);
  try {
    cache.append(0, good.data(), bad.data());
  } catch (const lexico::error& e) {
    EXPECT_NE(std::string(e.what()).find("value element 5 is 1e+06"), std::string::npos) << e.what();
  }
  RowMatrix block = RowMatrix::Ones(3, 64), q = RowMatrix::Ones(3, 64), out(3, 64);
  block(2, 7) = std::numeric_limits<float>::infinity();
  EXPECT_THROW(cache.prefill(0, block, block, q, out), lexico::error);
  EXPECT_EQ(cache.bytes().total(), 0u);
}

}  // namespace
