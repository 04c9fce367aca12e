// Per-token quantized caches: llama.cpp q8_0 / q4_0 and FP8 E4M3 with per-tensor scales,
// against values worked out by hand, exact bytes, GQA attention over the stored tokens.
#include <lexico/base/hadamard.hpp>
#include <lexico/cache/factory.hpp>
#include <lexico/cache/fp8_cache.hpp>
#include <lexico/cache/token_quant.hpp>

#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "cache_test_util.hpp"

namespace {

using lexico::RowMatrix;
using lexico_test::random_rows;

using BlockCache = lexico::TokenQuantCache<lexico::BlockCodec>;

// One token of one head (32 channels) stored through the cache and read back.
template <typename Cache>
std::vector<float> round_trip(Cache& cache, const std::vector<float>& x) {
  cache.clear();
  cache.append(0, x.data(), x.data());
  const RowMatrix k = cache.stored_keys(0, 0);
  EXPECT_EQ(k, cache.stored_values(0, 0));
  return std::vector<float>(k.data(), k.data() + k.size());
}

std::vector<float> ramp(float first, float step) {
  std::vector<float> x;
  for (int i = 0; i < 32; ++i) x.push_back(first + step * static_cast<float>(i));
  return x;
}

TEST(TokenQuant, Q8_0OfARampMatchesHandComputation) {
  BlockCache cache({1, 1, 32}, lexico::q8_0_codec());
  EXPECT_EQ(cache.name(), "q8_0");
  const std::vector<float> x = ramp(-16, 1);  // -16 .. 15
  const std::vector<float> got = round_trip(cache, x);
  // d = 16 / 127 stored as fp16 0.1259765625 (1032 steps of 2^-13); codes round(x * 127 / 16).
  const double d = 0.1259765625;
  ASSERT_EQ(static_cast<float>(Eigen::half(16.0f / 127.0f)), static_cast<float>(d));
  EXPECT_EQ(got[0], static_cast<float>(-127 * d));   // -16 -> -127
  EXPECT_EQ(got[16], 0.0f);                          //   0 -> 0
  EXPECT_EQ(got[17], static_cast<float>(8 * d));     //   1 -> 7.94 -> 8
  EXPECT_EQ(got[18], static_cast<float>(16 * d));    //   2 -> 15.875 -> 16
  EXPECT_EQ(got[31], static_cast<float>(119 * d));   //  15 -> 119.06 -> 119
  for (int i = 0; i < 32; ++i) {
    const double code = std::round(static_cast<double>(x[static_cast<std::size_t>(i)]) * 127.0 / 16.0);
    EXPECT_EQ(got[static_cast<std::size_t>(i)], static_cast<float>(code * d)) << i;
  }
}

TEST(TokenQuant, Q4_0OfARampMatchesHandComputation) {
  BlockCache cache({1, 1, 32}, lexico::q4_0_codec());
  EXPECT_EQ(cache.name(), "q4_0");
  // -16 .. 15: the largest magnitude is -16, d = -16 / -8 = 2, q = min(15, trunc(x / 2 + 8.5)),
  // x̂ = 2 (q - 8): even x stay, odd x go up by one, and 15 (q would be 16) becomes 14.
  std::vector<float> got = round_trip(cache, ramp(-16, 1));
  for (int i = 0; i < 32; ++i) {
    const int x = i - 16;
    const float want = x == 15 ? 14.0f : x % 2 == 0 ? static_cast<float>(x) : static_cast<float>(x + 1);
    EXPECT_EQ(got[static_cast<std::size_t>(i)], want) << x;
  }
  // 16 .. -15: the largest is +16, d = -2 flips the grid: 16 -> 16, -15 -> -14.
  got = round_trip(cache, ramp(16, -1));
  EXPECT_EQ(got[0], 16.0f);
  EXPECT_EQ(got[31], -14.0f);
  // An all-zero block has d = 0 and decodes to zeros.
  got = round_trip(cache, std::vector<float>(32, 0.0f));
  for (float v : got) EXPECT_EQ(v, 0.0f);
}

// Symmetric codes (the residuals of lexico codes) of -16 .. 15: at 1 bit d = 2 mean|x| =
// 16, signs at ±8; at 2 bits d = 16 / 2 = 8, levels ±4 and ±12 for x in [-16, -8), [-8, 0),
// [0, 8), [8, 16); at 4 bits d = 16 / 8 = 2, x̂ = 2 floor(x / 2) + 1, the middle of x's cell.
TEST(TokenQuant, SymmetricOfARampMatchesHandComputation) {
  for (const int bits : {1, 2, 4}) {
    BlockCache cache({1, 1, 32}, lexico::BlockCodec(lexico::BlockQuantizer(lexico::QuantScheme::symmetric, bits), 32));
    EXPECT_EQ(cache.bytes().total(), 0u);
    const std::vector<float> got = round_trip(cache, ramp(-16, 1));
    EXPECT_EQ(cache.bytes().total(), 2u * (32 * bits / 8 + 2)) << bits << " bits";
    for (int i = 0; i < 32; ++i) {
      const int x = i - 16;
      const float want = bits == 1   ? (x < 0 ? -8.0f : 8.0f)
                         : bits == 2 ? static_cast<float>(8 * static_cast<int>(std::floor(x / 8.0)) + 4)
                                     : static_cast<float>(2 * static_cast<int>(std::floor(x / 2.0)) + 1);
      EXPECT_EQ(got[static_cast<std::size_t>(i)], want) << bits << " bits, x = " << x;
    }
    for (float v : round_trip(cache, std::vector<float>(32, 0.0f))) EXPECT_EQ(v, 0.0f) << bits << " bits";
    // Residuals beyond fp16 (±1e6): the scale caps at 65504 and the codes saturate at
    // ±(2^b - 1)/2 · 65504 instead of raising.
    const lexico::BlockCodec codec(lexico::BlockQuantizer(lexico::QuantScheme::symmetric, bits), 32);
    std::vector<float> huge(32), back(32);
    for (int i = 0; i < 32; ++i) huge[static_cast<std::size_t>(i)] = i % 2 == 0 ? 1e6f : -1e6f;
    std::vector<std::uint8_t> row(static_cast<std::size_t>(codec.payload_bytes(32) + codec.metadata_bytes(32)));
    codec.encode(huge.data(), 32, row.data());
    codec.decode(row.data(), 32, back.data());
    const float top = static_cast<float>((1 << bits) - 1) / 2.0f * 65504.0f;
    for (int i = 0; i < 32; ++i) EXPECT_EQ(back[static_cast<std::size_t>(i)], i % 2 == 0 ? top : -top) << bits << " bits";
  }
  EXPECT_THROW(lexico::BlockQuantizer(lexico::QuantScheme::symmetric, 8), lexico::error);
  EXPECT_THROW(lexico::BlockQuantizer(lexico::QuantScheme::symmetric, 3), lexico::error);
}

TEST(TokenQuant, DequantizedCodesEqualTheirDefinition) {
  // code · scale + offset for every code, low bits first: the vectorised blocks of 32
  // codes and a tail past them at 8, 4, 2 and 1 bits, and every byte value at 8 bits.
  std::vector<std::uint8_t> packed(64);
  for (std::size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<std::uint8_t>(i * 37 + 11);
  const float scale = 0.0371f, offset = -1.25f;
  for (int n : {32, 64, 40, 8}) {
    std::vector<float> out(static_cast<std::size_t>(n), 0.0f);
    lexico::detail::dequantize_codes<8>(packed.data(), n, scale, offset, out.data());
    for (int i = 0; i < n; ++i)
      ASSERT_NEAR(out[static_cast<std::size_t>(i)], packed[static_cast<std::size_t>(i)] * scale + offset, 1e-6f) << i;
    lexico::detail::dequantize_codes<4>(packed.data(), n, scale, offset, out.data());
    for (int i = 0; i < n; ++i) {
      const int code = (packed[static_cast<std::size_t>(i / 2)] >> (4 * (i % 2))) & 15;
      ASSERT_NEAR(out[static_cast<std::size_t>(i)], code * scale + offset, 1e-6f) << i;
    }
    lexico::detail::dequantize_codes<2>(packed.data(), n, scale, offset, out.data());
    for (int i = 0; i < n; ++i) {
      const int code = (packed[static_cast<std::size_t>(i / 4)] >> (2 * (i % 4))) & 3;
      ASSERT_NEAR(out[static_cast<std::size_t>(i)], code * scale + offset, 1e-6f) << "2 bits, code " << i;
    }
    lexico::detail::dequantize_codes<1>(packed.data(), n, scale, offset, out.data());
    for (int i = 0; i < n; ++i) {
      const int code = (packed[static_cast<std::size_t>(i / 8)] >> (i % 8)) & 1;
      ASSERT_NEAR(out[static_cast<std::size_t>(i)], code * scale + offset, 1e-6f) << "1 bit, code " << i;
    }
  }
  std::vector<std::uint8_t> every(256);
  for (int i = 0; i < 256; ++i) every[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(i);
  std::vector<float> out(256);
  lexico::detail::dequantize_codes<8>(every.data(), 256, 1.0f, -128.0f, out.data());
  for (int i = 0; i < 256; ++i) ASSERT_EQ(out[static_cast<std::size_t>(i)], i - 128.0f);
}

TEST(TokenQuant, Fp8ScaleComesFromThePrefillBlockAndSaturates) {
  const int d = 32;
  lexico::Fp8Cache cache({2, 1, d}, lexico::Fp8Codec());
  EXPECT_EQ(cache.name(), "fp8");
  RowMatrix keys = RowMatrix::Zero(2, d), values = RowMatrix::Zero(2, d), q = RowMatrix::Zero(2, d), out(2, d);
  keys(0, 0) = 896;  // key scale 896 / 448 = 2
  keys(0, 1) = 3.0f;  // 1.5 on the E4M3 grid
  keys(1, 2) = 2.125f;  // 1.0625: a tie between 1 and 1.125, to even: 1 -> 2
  values(1, 3) = -448;  // value scale 1
  values(0, 4) = 0.3f;  // 0.3 -> 0.3125 (step 1/32 in [0.25, 0.5))
  cache.prefill(0, keys, values, q, out);
  EXPECT_EQ(cache.keys(0).codec().scale(), 2.0f);
  EXPECT_EQ(cache.values(0).codec().scale(), 1.0f);
  // A later value beyond the block's range saturates at 448 * scale.
  std::vector<float> k(d, 0.0f), v(d, 0.0f);
  k[0] = 5000;
  v[0] = -1000;
  cache.append(0, k.data(), v.data());
  const RowMatrix sk = cache.stored_keys(0, 0), sv = cache.stored_values(0, 0);
  EXPECT_EQ(sk(0, 0), 896.0f);
  EXPECT_EQ(sk(0, 1), 3.0f);
  EXPECT_EQ(sk(1, 2), 2.0f);
  EXPECT_EQ(sk(2, 0), 896.0f);
  EXPECT_EQ(sv(1, 3), -448.0f);
  EXPECT_EQ(sv(0, 4), 0.3125f);
  EXPECT_EQ(sv(2, 0), -448.0f);
  // A layer that starts with decode takes its scale from its first token.
  v[0] = 44.8f;
  cache.append(1, k.data(), v.data());
  EXPECT_FLOAT_EQ(cache.keys(1).codec().scale(), 5000.0f / 448.0f);
  EXPECT_FLOAT_EQ(cache.values(1).codec().scale(), 0.1f);
  // Headroom makes room for larger values later.
  lexico::Fp8Cache roomy({1, 1, d}, lexico::Fp8Codec(4.0f));
  roomy.append(0, v.data(), v.data());
  EXPECT_FLOAT_EQ(roomy.keys(0).codec().scale(), 0.4f);
  // clear() forgets the scale with the tokens.
  cache.clear();
  EXPECT_EQ(cache.bytes().total(), 0u);
  EXPECT_EQ(cache.keys(0).codec().scale(), 2.0f);  // kept until the next calibration
  cache.append(0, v.data(), v.data());
  EXPECT_FLOAT_EQ(cache.keys(0).codec().scale(), 0.1f);
}

// Bytes written out: q8_0 34 bytes and q4_0 18 bytes per 32 values; FP8 one byte per
// value plus a 4-byte scale for K and for V of each layer holding tokens.
TEST(TokenQuant, BytesAreExact) {
  const int layers = 2, heads = 2, d = 64, tokens = 9;
  std::mt19937 rng(5);
  const RowMatrix kv = random_rows(tokens, heads * d, rng), q = random_rows(tokens, heads * d, rng);
  RowMatrix out(tokens, heads * d);
  BlockCache q8({layers, heads, d}, lexico::q8_0_codec()), q4({layers, heads, d}, lexico::q4_0_codec());
  lexico::Fp8Cache fp8({layers, heads, d}, lexico::Fp8Codec());
  for (lexico::KVCache* cache : std::initializer_list<lexico::KVCache*>{&q8, &q4, &fp8})
    cache->prefill(1, kv, kv, q, out);
  const std::size_t values = 2u * tokens * heads * d;  // K and V
  EXPECT_EQ(q8.bytes().payload, values);
  EXPECT_EQ(q8.bytes().metadata, values / 32 * 2);
  EXPECT_EQ(q4.bytes().payload, values / 2);
  EXPECT_EQ(q4.bytes().metadata, values / 32 * 2);
  EXPECT_EQ(fp8.bytes().payload, values);
  EXPECT_EQ(fp8.bytes().metadata, 8u);
  EXPECT_NEAR(q8.kv_size_fraction(), 8.5 / 16, 1e-12);
  EXPECT_NEAR(q4.kv_size_fraction(), 4.5 / 16, 1e-12);
  EXPECT_NEAR(fp8.kv_size_fraction(), (values + 8.0) / (2.0 * values), 1e-12);
}

template <typename Cache>
void check_gqa(Cache& cache) {
  const int q_heads = 8, kv_heads = 2, d = 32, prompt = 20, steps = 10;
  std::mt19937 rng(11);
  const RowMatrix keys = random_rows(prompt + steps, kv_heads * d, rng);
  const RowMatrix values = random_rows(prompt + steps, kv_heads * d, rng);
  const RowMatrix queries = random_rows(prompt + steps, q_heads * d, rng);
  lexico_test::expect_decode_over_stored(cache, 0, keys, values, queries, prompt, 2e-5);
  // Quantization error is bounded: within a few percent of the inputs for 8-bit formats.
  const RowMatrix stored = cache.stored_keys(0, 1);
  EXPECT_EQ(stored.rows(), prompt + steps);
  const RowMatrix original = keys.middleCols(d, d);
  EXPECT_LT((stored - original).norm() / original.norm(), cache.name() == "q4_0" ? 0.15 : 0.05);
}

TEST(TokenQuant, GqaAttentionMatchesNaiveOverStoredTokens) {
  BlockCache q8({1, 2, 32}, lexico::q8_0_codec()), q4({1, 2, 32}, lexico::q4_0_codec());
  lexico::Fp8Cache fp8({1, 2, 32}, lexico::Fp8Codec());
  check_gqa(q8);
  check_gqa(q4);
  check_gqa(fp8);
}

// CodedRows keeps any prefix of its rows; the calibration stays with them.
TEST(TokenQuant, CodedRowsTruncate) {
  lexico::CodedRows<lexico::BlockCodec> rows(2, 32, lexico::q8_0_codec());
  std::mt19937 rng(9);
  const RowMatrix tokens = random_rows(6, 64, rng);
  for (Eigen::Index t = 0; t < 6; ++t) rows.append(tokens.row(t).data());
  std::vector<float> before(32), after(32);
  rows.row(1, 3, before.data());
  rows.truncate(4);
  EXPECT_EQ(rows.tokens(), 4);
  EXPECT_EQ(rows.payload_bytes(), 4u * 2 * 32);
  rows.row(1, 3, after.data());
  EXPECT_EQ(before, after);
  EXPECT_THROW(rows.truncate(5), lexico::error);
  EXPECT_TRUE(rows.calibrated());
  rows.truncate(0);
  EXPECT_EQ(rows.payload_bytes(), 0u);
}

// A block append calibrates FP8 on the whole block; truncate() can go back to that block
// and no further, and dropping later tokens is exact.
TEST(TokenQuant, Fp8CalibratesOnTheFirstBlockAndTruncatesToIt) {
  const int d = 32;
  std::mt19937 rng(10);
  RowMatrix keys = random_rows(12, d, rng), values = random_rows(12, d, rng);
  keys(3, 5) = 40.0f;  // the largest key of the first block: scale 40 / 448
  keys(9, 1) = 80.0f;  // beyond it, later: saturates
  lexico::Fp8Cache cache({1, 1, d}, lexico::Fp8Codec()), reference({1, 1, d}, lexico::Fp8Codec());
  cache.append(0, 0, keys.topRows(6), values.topRows(6));
  EXPECT_FLOAT_EQ(cache.keys(0).codec().scale(), 40.0f / 448.0f);
  EXPECT_EQ(cache.truncate_floor(0), 6);
  cache.append(0, 6, keys.bottomRows(6), values.bottomRows(6));
  EXPECT_EQ(cache.truncate_floor(0), 6);
  EXPECT_FLOAT_EQ(cache.stored_keys(0, 0)(9, 1), 40.0f);
  EXPECT_THROW(cache.truncate(5), lexico::error);
  cache.truncate(8);
  reference.append(0, 0, keys.topRows(6), values.topRows(6));
  reference.append(0, keys.row(6).data(), values.row(6).data());
  reference.append(0, keys.row(7).data(), values.row(7).data());
  EXPECT_EQ(cache.stored_keys(0, 0), reference.stored_keys(0, 0));
  EXPECT_EQ(cache.stored_values(0, 0), reference.stored_values(0, 0));
  EXPECT_EQ(cache.bytes().total(), reference.bytes().total());
  // A layer that starts with one token calibrates on it: nothing can be dropped below it.
  lexico::Fp8Cache single({1, 1, d}, lexico::Fp8Codec());
  single.append(0, keys.row(0).data(), values.row(0).data());
  single.append(0, keys.row(1).data(), values.row(1).data());
  EXPECT_EQ(single.truncate_floor(0), 1);
  single.truncate(1);
  EXPECT_EQ(single.seen(0), 1);
  // q8_0 and q4_0 code every row alone: any length.
  BlockCache q4({1, 1, d}, lexico::q4_0_codec());
  q4.append(0, 0, keys, values);
  EXPECT_EQ(q4.truncate_floor(0), 0);
  q4.truncate(3);
  EXPECT_EQ(q4.bytes().payload, 3u * 2 * d / 2);
}

// A block that fails to code (a q8_0 scale beyond fp16, found after two rows were coded)
// leaves the layer as it was, calibration included.
TEST(TokenQuant, AFailedBlockStoresNothing) {
  const int d = 32;
  RowMatrix keys = RowMatrix::Ones(4, d), values = RowMatrix::Ones(4, d);
  values(2, 7) = 1e9f;
  BlockCache q8({1, 1, d}, lexico::q8_0_codec());
  q8.append(0, keys.row(0).data(), values.row(0).data());
  const std::size_t bytes = q8.bytes().total();
  EXPECT_THROW(q8.append(0, 1, keys.bottomRows(3), values.bottomRows(3)), lexico::error);
  EXPECT_EQ(q8.seen(0), 1);
  EXPECT_EQ(q8.bytes().total(), bytes);
  EXPECT_EQ(q8.keys(0).tokens(), 1);
  EXPECT_EQ(q8.values(0).tokens(), 1);
  BlockCache fresh({1, 1, d}, lexico::q8_0_codec());
  EXPECT_THROW(fresh.append(0, 0, keys, values), lexico::error);
  EXPECT_EQ(fresh.bytes().total(), 0u);
  EXPECT_FALSE(fresh.keys(0).calibrated());
  EXPECT_EQ(fresh.truncate_floor(0), 0);
}

// The fast transform against the matrix written out: M_ij = (-1)^popcount(i & j) · s_j / √n.
TEST(Hadamard, RotationIsTheSignedSylvesterMatrixAndOrthogonal) {
  for (int n : {1, 2, 16, 128}) {
    std::vector<float> x(static_cast<std::size_t>(n));
    for (int j = 0; j < n; ++j) {
      std::fill(x.begin(), x.end(), 0.0f);
      x[static_cast<std::size_t>(j)] = 1.0f;
      lexico::hadamard_rotate(x.data(), n);
      for (int i = 0; i < n; ++i) {
        const double parity = __builtin_popcount(static_cast<unsigned>(i & j)) % 2 ? -1.0 : 1.0;
        const double want = parity * lexico::hadamard_sign(j) / std::sqrt(static_cast<double>(n));
        ASSERT_NEAR(x[static_cast<std::size_t>(i)], want, 1e-6) << n << " " << i << " " << j;
      }
    }
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    std::vector<float> y(static_cast<std::size_t>(n));
    for (auto& v : y) v = normal(rng);
    std::vector<float> z = y;
    lexico::hadamard_rotate(z.data(), n);
    double before = 0, after = 0;
    for (int i = 0; i < n; ++i) before += y[i] * y[i], after += z[i] * z[i];
    EXPECT_NEAR(after, before, 1e-4 * before);
    lexico::hadamard_rotate(z.data(), n, /*inverse=*/true);
    for (int i = 0; i < n; ++i) EXPECT_NEAR(z[i], y[i], 1e-5);
  }
  int negative = 0;
  for (int i = 0; i < 128; ++i) negative += lexico::hadamard_sign(i) < 0;
  EXPECT_GT(negative, 40);
  EXPECT_LT(negative, 88);
  float odd[12] = {};
  EXPECT_THROW(lexico::hadamard_rotate(odd, 12), lexico::error);
}

// Keys and values with one outlier channel: q4_0's block holding it loses the others to
// its scale; rotated, the outlier is spread over every channel and the error drops.
// Attention is read in the model's basis (against the stored rows turned back).
template <typename Cache>
void check_rotation(Cache& plain, Cache& turned, bool lowers_the_error) {
  const int heads = plain.shape().kv_heads, d = plain.shape().head_dim, tokens = 40, q_heads = 2 * heads;
  std::mt19937 rng(11);
  RowMatrix keys = random_rows(tokens, heads * d, rng), values = random_rows(tokens, heads * d, rng);
  for (Eigen::Index t = 0; t < tokens; ++t) keys(t, 5) = values(t, d + 9) = 40.0f + static_cast<float>(t % 3);
  const RowMatrix queries = random_rows(tokens, q_heads * d, rng);
  EXPECT_TRUE(turned.rotates());
  lexico_test::expect_decode_over_stored(turned, 0, keys, values, queries, 24, 2e-5);
  RowMatrix out(tokens, q_heads * d);
  plain.prefill(0, keys, values, queries, out);
  const auto error = [&](const Cache& cache) {
    double sum = 0;
    for (int h = 0; h < heads; ++h) {
      sum += (cache.stored_keys(0, h) - keys.middleCols(h * d, d)).squaredNorm();
      sum += (cache.stored_values(0, h) - values.middleCols(h * d, d)).squaredNorm();
    }
    return sum;
  };
  if (lowers_the_error) {
    EXPECT_LT(error(turned), 0.5 * error(plain));
  }
  EXPECT_EQ(turned.bytes().total(), plain.bytes().total());
}

TEST(TokenQuant, HadamardRotationTamesAnOutlierChannelAndAttendsInTheModelsBasis) {
  const lexico::CacheShape shape{1, 2, 64};
  for (const auto& codec : {lexico::q4_0_codec(), lexico::q8_0_codec()}) {
    SCOPED_TRACE(codec.name());
    BlockCache plain(shape, codec), turned(shape, codec, /*rotate=*/true);
    check_rotation(plain, turned, true);
  }
  lexico::Fp8Cache plain(shape, lexico::Fp8Codec()), turned(shape, lexico::Fp8Codec(), true);
  check_rotation(plain, turned, false);
  EXPECT_EQ(lexico::make_cache("q4_0", shape, lexico::CacheOptions::parse("rotate=hadamard"))->parameters(),
            "bits=4 block=32 rotate=hadamard");
  EXPECT_THROW(lexico::make_cache("q8_0", {1, 1, 48}, lexico::CacheOptions::parse("rotate=hadamard")), lexico::error);
  EXPECT_THROW(lexico::make_cache("q8_0", {1, 1, 64}, lexico::CacheOptions::parse("rotate=yes")), lexico::error);
}

// Per-token FP8 scales: a stream whose magnitude grows 1,000-fold keeps E4M3's relative
// precision (3 mantissa bits: error <= 2^-4 of each row's largest value) where a tensor
// scale taken from the first token saturates; 2 bytes of scale per row; any token can be
// dropped.
TEST(TokenQuant, Fp8TokenScalesFollowTheStreamAndRollBackAnywhere) {
  const int d = 32, tokens = 30;
  std::mt19937 rng(13);
  RowMatrix rows = random_rows(tokens, d, rng);
  for (Eigen::Index t = 0; t < tokens; ++t) rows.row(t) *= std::pow(10.0f, 3.0f * static_cast<float>(t) / tokens);
  lexico::Fp8Cache token({1, 1, d}, lexico::Fp8Codec(1.0f, lexico::Fp8Scale::token));
  lexico::Fp8Cache tensor({1, 1, d}, lexico::Fp8Codec(1.0f, lexico::Fp8Scale::tensor));
  for (Eigen::Index t = 0; t < tokens; ++t) {
    token.append(0, rows.row(t).data(), rows.row(t).data());
    tensor.append(0, rows.row(t).data(), rows.row(t).data());
  }
  const RowMatrix a = token.stored_keys(0, 0), b = tensor.stored_keys(0, 0);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    const float largest = rows.row(t).cwiseAbs().maxCoeff();
    EXPECT_LE((a.row(t) - rows.row(t)).cwiseAbs().maxCoeff(), largest / 16.0f * 1.01f) << t;
  }
  EXPECT_GT((b.bottomRows(1) - rows.bottomRows(1)).cwiseAbs().maxCoeff(),
            0.5f * rows.bottomRows(1).cwiseAbs().maxCoeff());  // saturated
  EXPECT_EQ(token.bytes().metadata, 2u * tokens * 2u);          // K and V rows, fp16 scale each
  EXPECT_EQ(token.truncate_floor(0), 0);
  EXPECT_EQ(tensor.truncate_floor(0), 1);
  token.truncate(3);
  EXPECT_EQ(token.stored_keys(0, 0), a.topRows(3));
  // An all-zero row codes to zeros; a row beyond fp16's scale range raises.
  std::vector<float> x(d, 0.0f);
  token.append(0, x.data(), x.data());
  EXPECT_EQ(token.stored_keys(0, 0).bottomRows(1).cwiseAbs().maxCoeff(), 0.0f);
  x[1] = 1e8f;
  EXPECT_THROW(token.append(0, x.data(), x.data()), lexico::error);
  EXPECT_EQ(token.stored_keys(0, 0).rows(), 4);
}

// The factory's FP8 takes vLLM's constants by default: scale = amax / 200 for keys and
// amax / 100 for values (headroom 448 / 200 and 448 / 100).
TEST(TokenQuant, Fp8FactoryDefaultsAreVllmsScales) {
  auto cache = lexico::make_cache("fp8", {1, 1, 32});
  EXPECT_EQ(cache->parameters(), "keys: scale=tensor headroom=2.24; values: scale=tensor headroom=4.48");
  std::vector<float> x(32, 0.0f);
  x[0] = 100.0f;
  cache->append(0, x.data(), x.data());
  const auto& fp8 = dynamic_cast<const lexico::Fp8Cache&>(*cache);
  EXPECT_FLOAT_EQ(fp8.keys(0).codec().scale(), 0.5f);
  EXPECT_FLOAT_EQ(fp8.values(0).codec().scale(), 1.0f);
  EXPECT_EQ(lexico::make_cache("fp8", {1, 1, 32}, lexico::CacheOptions::parse("scale=token"))->parameters(),
            "scale=token");
}

TEST(TokenQuant, BadInputRaises) {
  EXPECT_THROW(BlockCache({1, 1, 48}, lexico::q8_0_codec()), lexico::error);  // 48 is not a multiple of 32
  EXPECT_THROW(lexico::Fp8Codec(0.5f), lexico::error);
  EXPECT_THROW(lexico::BlockQuantizer(lexico::QuantScheme::min_max, 3), lexico::error);
  BlockCache q8({1, 1, 32}, lexico::q8_0_codec());
  lexico::Fp8Cache fp8({1, 1, 32}, lexico::Fp8Codec());
  std::vector<float> x(32, 1.0f);
  x[3] = std::nanf("");
  EXPECT_THROW(q8.append(0, x.data(), x.data()), lexico::error);
  EXPECT_THROW(fp8.append(0, x.data(), x.data()), lexico::error);
  x[3] = 1e9f;  // beyond fp16: the q8_0 scale would be infinite
  EXPECT_THROW(q8.append(0, x.data(), x.data()), lexico::error);
}

}  // namespace
