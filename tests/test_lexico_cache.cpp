// The Lexico cache against attention over explicitly reconstructed keys and values,
// against the dense cache while everything is buffered, and its byte accounting
// against the formula.
#include <lexico/cache/dense.hpp>
#include <lexico/cache/lexico_cache.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <random>

#include <gtest/gtest.h>

#include "cache_test_util.hpp"
#include "test_util.hpp"

namespace {

using lexico::RowMatrix;

using lexico_test::random_rows;

std::shared_ptr<const lexico::Dictionary> random_dictionary(int d, int n, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  Eigen::MatrixXf atoms(d, n);
  for (Eigen::Index i = 0; i < atoms.size(); ++i) atoms.data()[i] = normal(rng);
  return std::make_shared<const lexico::Dictionary>(atoms);
}

std::vector<lexico::LayerDictionaries> random_dictionaries(int layers, int d, int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<lexico::LayerDictionaries> dicts;
  for (int l = 0; l < layers; ++l) dicts.push_back({random_dictionary(d, n, rng), random_dictionary(d, n, rng)});
  return dicts;
}

// x̂ of every coded row of one head, decoded independently of the attention kernels.
Eigen::MatrixXd reconstruct(const lexico::CodeStore& codes, const lexico::Dictionary& dict) {
  Eigen::MatrixXd rows(static_cast<Eigen::Index>(codes.rows()), dict.dim());
  rows.setZero();
  codes.for_each_row([&](std::size_t r, lexico::CodeStore::Indices index, const std::uint8_t* coefficient, int count,
                         float scale) {
    for (int i = 0; i < count; ++i)
      rows.row(static_cast<Eigen::Index>(r)) +=
          static_cast<double>(lexico::fp8_e4m3_decode(coefficient[i]) * scale) *
          dict.atoms().col(index[i]).cast<double>().transpose();
  });
  return rows;
}

// Appends the fp16 rounding of one head's rows of `tokens` below `rows`.
void append_fp16(Eigen::MatrixXd& rows, const RowMatrix& tokens, int head, int d) {
  const Eigen::Index begin = rows.rows();
  rows.conservativeResize(begin + tokens.rows(), d);
  for (Eigen::Index t = 0; t < tokens.rows(); ++t)
    for (int i = 0; i < d; ++i) rows(begin + t, i) = static_cast<float>(Eigen::half(tokens(t, head * d + i)));
}

// Rotates rows of keys coded before RoPE to their positions first, first + 1, ... with
// the model's angles.
void rotate_rows(Eigen::MatrixXd& rows, const lexico::Rope& rope, Eigen::Index first) {
  std::vector<float> cos(static_cast<std::size_t>(rope.pairs())), sin(cos.size()), row(static_cast<std::size_t>(rows.cols()));
  for (Eigen::Index r = 0; r < rows.rows(); ++r) {
    rope.angles(first + r, cos.data(), sin.data());
    for (Eigen::Index i = 0; i < rows.cols(); ++i) row[static_cast<std::size_t>(i)] = static_cast<float>(rows(r, i));
    rope.rotate(row.data(), cos.data(), sin.data());
    for (Eigen::Index i = 0; i < rows.cols(); ++i) rows(r, i) = row[static_cast<std::size_t>(i)];
  }
}

// Appends one head's keys as the cache holds them in fp16: rounded as they are, or, when
// it codes keys before RoPE, un-rotated from their positions first, first + 1, ...,
// rounded, and rotated back.
void append_held_keys(Eigen::MatrixXd& rows, const RowMatrix& tokens, int head, int d,
                      const std::optional<lexico::Rope>& rope) {
  if (!rope) return append_fp16(rows, tokens, head, d);
  const Eigen::Index first = rows.rows();
  RowMatrix unrotated = tokens.middleCols(head * d, d);
  std::vector<float> cos(static_cast<std::size_t>(rope->pairs())), sin(cos.size());
  for (Eigen::Index t = 0; t < unrotated.rows(); ++t) {  // the angles the cache un-rotates a token with
    rope->consecutive_angles(first + t, 1, cos.data(), sin.data());
    rope->rotate(unrotated.row(t).data(), cos.data(), sin.data(), true);
  }
  Eigen::MatrixXd held(0, d);
  append_fp16(held, unrotated, 0, d);
  rotate_rows(held, *rope, first);
  rows.conservativeResize(first + held.rows(), d);
  rows.bottomRows(held.rows()) = held;
}

// Adds a code tier's dequantized residuals (one head's rows) to its decoded codes.
void add_residual(Eigen::MatrixXd& decoded, const lexico::CodedRows<lexico::BlockCodec>* residual, int head) {
  if (!residual) return;
  ASSERT_EQ(residual->tokens(), decoded.rows());
  RowMatrix rows(residual->tokens(), residual->head_dim());
  lexico::detail::copy_rows(*residual, head, residual->tokens(), rows, 0);
  decoded += rows.cast<double>();
}

// Attention in double over explicit K̂, V̂: sinks (fp16), coded rows (plus their residuals)
// tier by tier (oldest first; rotated to their positions when keys are coded before RoPE),
// then the fp16 buffer.
RowMatrix reference_attention(const lexico::LexicoCache& cache, const std::optional<lexico::Rope>& rope, int layer,
                              const RowMatrix& queries,
                              const RowMatrix& key_sinks, const RowMatrix& value_sinks, const RowMatrix& key_buffer,
                              const RowMatrix& value_buffer) {
  const auto& shape = cache.shape();
  const int group = static_cast<int>(queries.rows()) / shape.kv_heads;
  RowMatrix out(queries.rows(), shape.head_dim);
  for (int h = 0; h < shape.kv_heads; ++h) {
    Eigen::MatrixXd keys(0, shape.head_dim), values(0, shape.head_dim);
    append_held_keys(keys, key_sinks, h, shape.head_dim, rope);
    append_fp16(values, value_sinks, h, shape.head_dim);
    for (int tier = 0; tier < cache.code_tiers(); ++tier) {
      Eigen::MatrixXd k = reconstruct(cache.key_codes(layer, h, tier), cache.key_dictionary(layer));
      add_residual(k, cache.key_residual(layer, tier), h);
      if (const auto* scale = cache.space().key_scale(layer))  // codes of √w ⊙ k: back to k
        for (Eigen::Index e = 0; e < k.cols(); ++e) k.col(e) /= static_cast<double>((*scale)[static_cast<std::size_t>(e)]);
      if (rope) rotate_rows(k, *rope, keys.rows());
      Eigen::MatrixXd v = reconstruct(cache.value_codes(layer, h, tier), cache.value_dictionary(layer));
      add_residual(v, cache.value_residual(layer, tier), h);
      if (const auto* map = cache.space().coding_map(layer, false))  // codes of T·v: back to v
        v = (map->cast<double>().inverse() * v.transpose()).transpose();
      keys.conservativeResize(keys.rows() + k.rows(), Eigen::NoChange);
      keys.bottomRows(k.rows()) = k;
      values.conservativeResize(values.rows() + v.rows(), Eigen::NoChange);
      values.bottomRows(v.rows()) = v;
    }
    if (const auto* recent = cache.recent_keys(layer)) {  // the quantized tier, dequantized
      RowMatrix k(recent->tokens(), shape.head_dim), v(recent->tokens(), shape.head_dim);
      lexico::detail::copy_rows(*recent, h, recent->tokens(), k, 0);
      lexico::detail::copy_rows(*cache.recent_values(layer), h, recent->tokens(), v, 0);
      Eigen::MatrixXd kd = k.cast<double>();
      if (rope) rotate_rows(kd, *rope, keys.rows());
      keys.conservativeResize(keys.rows() + kd.rows(), Eigen::NoChange);
      keys.bottomRows(kd.rows()) = kd;
      values.conservativeResize(values.rows() + v.rows(), Eigen::NoChange);
      values.bottomRows(v.rows()) = v.cast<double>();
    }
    append_held_keys(keys, key_buffer, h, shape.head_dim, rope);
    append_fp16(values, value_buffer, h, shape.head_dim);
    for (int g = 0; g < group; ++g) {
      const Eigen::VectorXd q = queries.row(h * group + g).transpose().cast<double>();
      Eigen::VectorXd p = keys * q / std::sqrt(static_cast<double>(shape.head_dim));
      p = (p.array() - p.maxCoeff()).exp();
      p /= p.sum();
      out.row(h * group + g) = (values.transpose() * p).transpose().cast<float>();
    }
  }
  return out;
}

double relative_error(const RowMatrix& got, const RowMatrix& want) {
  return static_cast<double>((got - want).norm() / want.norm());
}

struct Sequence {
  RowMatrix keys, values, queries;
};

// Cache options, the RoPE of a CodeSpace that codes keys before it (if any) and its key
// metric (if any).
struct Config {
  lexico::LexicoOptions options;
  std::optional<lexico::Rope> rope;
  int head_dim = 16;
  std::vector<std::vector<float>> key_metric;
  std::vector<Eigen::MatrixXf> value_metric;
};

lexico::CodeSpaceOptions space_options(const Config& config) {
  lexico::CodeSpaceOptions space;
  space.key_rope = config.rope;
  space.key_metric = config.key_metric;
  space.value_metric = config.value_metric;
  return space;
}

Sequence random_sequence(Eigen::Index tokens, int kv_heads, int q_heads, int d, unsigned seed) {
  std::mt19937 rng(seed);
  return {random_rows(tokens, kv_heads * d, rng), random_rows(tokens, kv_heads * d, rng),
          random_rows(tokens, q_heads * d, rng)};
}

RowMatrix query_at(const Sequence& s, Eigen::Index t, int q_heads, int d) {
  return Eigen::Map<const RowMatrix>(s.queries.row(t).data(), q_heads, d);
}

void check_against_reconstruction(int kv_heads, int q_heads, int layers, Config config = {}, int tokens = 70) {
  const int d = config.head_dim, n = 64;
  lexico::LexicoOptions& options = config.options;
  options.key_sparsity = 4;
  options.value_sparsity = 6;
  options.buffer = 8;
  options.flush = 5;
  lexico::LexicoCache cache({layers, kv_heads, d}, random_dictionaries(layers, d, n, 11), options,
                            space_options(config));
  const Sequence s = random_sequence(tokens, kv_heads, q_heads, d, 12);
  RowMatrix out(q_heads, d);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    for (int l = 0; l < layers; ++l) {
      cache.decode(l, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q_heads, d), out);
      const Eigen::Index sinks = cache.sink_tokens(l), buffered = cache.buffered_tokens(l),
                         coded = cache.coded_tokens(l);
      ASSERT_EQ(sinks + coded + buffered, t + 1);
      ASSERT_EQ(sinks, std::min<Eigen::Index>(t + 1, options.sinks));
      ASSERT_LE(buffered, options.buffer);
      for (int tier = 1; tier < cache.code_tiers(); ++tier)
        ASSERT_LE(static_cast<int>(cache.key_codes(l, 0, tier).rows()), options.tiers[static_cast<std::size_t>(cache.code_tiers() - 1 - tier)].tokens);
      if (const auto* recent = cache.recent_keys(l)) {
        ASSERT_LE(recent->tokens(), options.tiers.front().tokens);
      }
      const RowMatrix want = reference_attention(cache, config.rope, l, query_at(s, t, q_heads, d), s.keys.topRows(sinks),
                                                 s.values.topRows(sinks), s.keys.middleRows(sinks + coded, buffered),
                                                 s.values.middleRows(sinks + coded, buffered));
      ASSERT_LT(relative_error(out, want), 1e-5) << "token " << t << " layer " << l;
    }
  }
  EXPECT_GT(cache.coded_tokens(0), 50);
}

TEST(LexicoCache, EqualsAttentionOverReconstructedKV_Gqa4) { check_against_reconstruction(2, 8, 1); }
TEST(LexicoCache, EqualsAttentionOverReconstructedKV_Gqa2ThreeLayers) { check_against_reconstruction(3, 6, 3); }
TEST(LexicoCache, EqualsAttentionOverReconstructedKV_OddGroup) { check_against_reconstruction(1, 5, 1); }
TEST(LexicoCache, EqualsAttentionOverReconstructedKV_NoGqa) { check_against_reconstruction(2, 2, 2); }

Config with_sinks_and_tiers() {
  Config config;
  config.options.sinks = 3;
  config.options.tiers = {{6, 12, 10}, {9, 8, 7}};  // newest first
  return config;
}

TEST(LexicoCache, EqualsAttentionOverReconstructedKV_SinksAndTiers) {
  check_against_reconstruction(2, 8, 2, with_sinks_and_tiers());
}

Config keys_before_rope(Config config, lexico::RopeStyle style) {
  config.rope = lexico::Rope(config.head_dim, 10000.0f, style);
  return config;
}

TEST(LexicoCache, EqualsAttentionOverReconstructedKV_KeysBeforeRope) {
  check_against_reconstruction(2, 8, 2, keys_before_rope({}, lexico::RopeStyle::rotate_half));
  check_against_reconstruction(1, 5, 1, keys_before_rope(with_sinks_and_tiers(), lexico::RopeStyle::interleaved));
}

// The vector kernel of keys before RoPE (rotate_half, d = 64 and 128): over several
// RopeRun blocks of positions, with tiers starting inside a block.
TEST(LexicoCache, EqualsAttentionOverReconstructedKV_KeysBeforeRopeVectorKernel) {
  for (const int d : {64, 128}) {
    Config config = with_sinks_and_tiers();
    config.head_dim = d;
    check_against_reconstruction(2, 4, 1, keys_before_rope(config, lexico::RopeStyle::rotate_half), 200);
    config.options.tiers.clear();
    check_against_reconstruction(1, 3, 1, keys_before_rope(config, lexico::RopeStyle::rotate_half), 200);
  }
}

// A key metric (√w per layer, equal on RoPE pairs) spread over two orders of magnitude.
Config with_key_metric(Config config, int layers) {
  std::mt19937 rng(31);
  std::uniform_real_distribution<float> log_scale(-1.0f, 1.0f);
  const lexico::RopeStyle style = config.rope ? config.rope->style() : lexico::RopeStyle::rotate_half;
  for (int l = 0; l < layers; ++l) {
    std::vector<float> scale(static_cast<std::size_t>(config.head_dim));
    for (int e = 0; e < config.head_dim; ++e) {
      const int partner = lexico::rope_partner(e, config.head_dim, style);
      scale[static_cast<std::size_t>(e)] =
          partner < e ? scale[static_cast<std::size_t>(partner)] : std::pow(10.0f, log_scale(rng));
    }
    config.key_metric.push_back(scale);
  }
  return config;
}

// A value metric's map per layer: identity plus a random part, well conditioned.
Config with_value_metric(Config config, int layers) {
  std::mt19937 rng(33);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  for (int l = 0; l < layers; ++l) {
    Eigen::MatrixXf map = Eigen::MatrixXf::Identity(config.head_dim, config.head_dim);
    for (Eigen::Index i = 0; i < map.size(); ++i) map.data()[i] += normal(rng);
    config.value_metric.push_back(map);
  }
  return config;
}

// Values coded in a value metric (codes of T·v): attention equals attention over the
// decoded codes mapped back with T⁻¹, alone and with a key metric, keys before RoPE or after.
TEST(LexicoCache, EqualsAttentionOverReconstructedKV_ValueMetric) {
  check_against_reconstruction(2, 8, 2, with_value_metric({}, 2));
  check_against_reconstruction(
      1, 5, 1, with_value_metric(with_key_metric(keys_before_rope(with_sinks_and_tiers(), lexico::RopeStyle::rotate_half), 1), 1));
  Config quantized = with_sinks_and_tiers();
  quantized.head_dim = 64;
  quantized.options.tiers = {{12, 8, 8}};
  quantized.options.recent_format = lexico::LexicoOptions::RecentFormat::q8_0;
  check_against_reconstruction(2, 4, 1, with_value_metric(keys_before_rope(quantized, lexico::RopeStyle::rotate_half), 1), 120);
}

// Keys coded in a key metric: attention equals attention over the decoded codes turned
// back (k̂ = (D'c) ⊘ √w), after RoPE, before it (both styles) and in the vector kernel.
TEST(LexicoCache, EqualsAttentionOverReconstructedKV_KeyMetric) {
  check_against_reconstruction(2, 8, 2, with_key_metric({}, 2));
  check_against_reconstruction(2, 8, 2, with_key_metric(keys_before_rope({}, lexico::RopeStyle::rotate_half), 2));
  check_against_reconstruction(1, 5, 1,
                               with_key_metric(keys_before_rope(with_sinks_and_tiers(), lexico::RopeStyle::interleaved), 1));
  Config config = with_sinks_and_tiers();
  config.head_dim = 128;
  check_against_reconstruction(2, 4, 1, with_key_metric(keys_before_rope(config, lexico::RopeStyle::rotate_half), 1), 200);
}

// Metrics that weigh every dimension alike change no choice of OMP: the cache attends as
// the plain one does, though its codes hold 2k and 2v, its queries are halved and its coded
// values' output too (a power of two, so every product scales exactly and the FP8
// coefficients round alike).
TEST(LexicoCache, UniformMetricsAttendAsPlainVectors) {
  const int d = 16, kv = 2, q = 4, tokens = 60;
  for (const bool before_rope : {false, true}) {
    Config plain;
    plain.options.key_sparsity = plain.options.value_sparsity = 4;
    plain.options.buffer = 8;
    plain.options.flush = 4;
    if (before_rope) plain = keys_before_rope(plain, lexico::RopeStyle::rotate_half);
    Config uniform = plain;
    uniform.key_metric.assign(1, std::vector<float>(d, 2.0f));
    uniform.value_metric.assign(1, 2.0f * Eigen::MatrixXf::Identity(d, d));
    const auto dicts = random_dictionaries(1, d, 48, 41);
    lexico::LexicoCache a({1, kv, d}, dicts, plain.options, space_options(plain));
    lexico::LexicoCache b({1, kv, d}, dicts, uniform.options, space_options(uniform));
    const Sequence s = random_sequence(tokens, kv, q, d, 42);
    RowMatrix out_a(q, d), out_b(q, d);
    for (Eigen::Index t = 0; t < tokens; ++t) {
      a.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), out_a);
      b.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), out_b);
      ASSERT_LT(relative_error(out_b, out_a), 1e-5) << "token " << t << (before_rope ? " (keys before RoPE)" : "");
    }
    EXPECT_GT(a.coded_tokens(0), 40);
    // The same atoms in every row, twice the plain coefficients.
    const auto plain_rows = reconstruct(a.key_codes(0, 1), a.key_dictionary(0));
    const auto metric_rows = reconstruct(b.key_codes(0, 1), b.key_dictionary(0));
    EXPECT_LT((metric_rows / 2.0 - plain_rows).norm(), 1e-6 * plain_rows.norm());
  }
}

// Metrics a CodeSpace refuses: wrong counts, a non-positive or non-finite entry, and for
// keys before RoPE one that differs within a RoPE pair.
TEST(LexicoCache, RejectsBadKeyMetrics) {
  const int d = 8;
  const auto dicts = random_dictionaries(2, d, 16, 51);
  const auto space_with = [&](std::vector<std::vector<float>> metric, bool before_rope) {
    lexico::CodeSpaceOptions options;
    if (before_rope) options.key_rope = lexico::Rope(d, 10000.0f, lexico::RopeStyle::rotate_half);
    options.key_metric = std::move(metric);
    return lexico::CodeSpace(dicts, options);
  };
  const auto fails_with = [&](std::vector<std::vector<float>> metric, bool before_rope, const std::string& text) {
    const std::string message = lexico_test::error_of([&] { space_with(std::move(metric), before_rope); });
    EXPECT_NE(message.find(text), std::string::npos) << "message: '" << message << "', expected '" << text << "'";
  };
  const std::vector<float> ones(d, 1.0f);
  EXPECT_NO_THROW(space_with({ones, ones}, true));
  fails_with({ones}, false, "key metric of 1 layers for 2");
  fails_with({ones, std::vector<float>(d - 1, 1.0f)}, false, "key metric of layer 1: 7 entries for head_dim 8");
  for (const float bad : {0.0f, -1.0f, std::nanf(""), INFINITY}) {
    std::vector<float> scale = ones;
    scale[3] = bad;
    fails_with({ones, scale}, false, "entry 3");
  }
  std::vector<float> unpaired = ones;
  unpaired[1] = 2.0f;  // its rotate_half partner, 5, stays 1
  EXPECT_NO_THROW(space_with({ones, unpaired}, false));  // keys after RoPE: any diagonal metric
  fails_with({ones, unpaired}, true, "entries 1 and 5 form a rotate_half RoPE pair");
}

// Value maps a CodeSpace refuses: wrong counts or shape, NaN, and one too ill-conditioned
// to turn attention back in fp32.
TEST(LexicoCache, RejectsBadValueMetrics) {
  const int d = 8;
  const auto dicts = random_dictionaries(2, d, 16, 52);
  const auto fails_with = [&](std::vector<Eigen::MatrixXf> maps, const std::string& text) {
    lexico::CodeSpaceOptions options;
    options.value_metric = std::move(maps);
    const std::string message = lexico_test::error_of([&] { lexico::CodeSpace space(dicts, options); });
    EXPECT_NE(message.find(text), std::string::npos) << "message: '" << message << "', expected '" << text << "'";
  };
  const Eigen::MatrixXf identity = Eigen::MatrixXf::Identity(d, d);
  fails_with({identity}, "value metric of 1 layers for 2");
  fails_with({identity, Eigen::MatrixXf::Identity(d, d - 1)}, "value metric of layer 1: a map of 8 x 7");
  Eigen::MatrixXf bad = identity;
  bad(2, 3) = std::nanf("");
  fails_with({identity, bad}, "holds a NaN");
  bad = identity;
  bad(5, 5) = 1e-8f;
  fails_with({identity, bad}, "condition number");
}

// Keys that are sparse over the dictionary before RoPE, then rotated as a model does:
// coded before RoPE they come back up to fp8 rounding, and so does attention over them;
// coded after RoPE they do not.
TEST(LexicoCache, KeysBeforeRopeRecoverRotatedSparseKeys) {
  const int d = 32, n = 96, kv = 1, q = 2, tokens = 300;
  const auto dicts = random_dictionaries(1, d, n, 21);
  const lexico::Rope rope(d, 10000.0f, lexico::RopeStyle::rotate_half);
  std::mt19937 rng(22);
  std::uniform_int_distribution<int> atom(0, n - 1);
  std::normal_distribution<float> normal;
  RowMatrix keys(tokens, d), values(tokens, d);
  std::vector<float> cos(static_cast<std::size_t>(rope.pairs())), sin(cos.size());
  for (Eigen::Index t = 0; t < tokens; ++t) {
    keys.row(t) = (normal(rng) * dicts[0].keys->atoms().col(atom(rng)) +
                   normal(rng) * dicts[0].keys->atoms().col(atom(rng))).transpose();
    rope.angles(t, cos.data(), sin.data());
    rope.rotate(keys.row(t).data(), cos.data(), sin.data());
    values.row(t) = (normal(rng) * dicts[0].values->atoms().col(atom(rng))).transpose();
  }
  const RowMatrix queries = lexico_test::random_rows(1, q * d, rng) * 2.0f;  // peaked attention
  // Relative error of the coded keys (before RoPE when coded so) and of the attention output.
  const auto errors = [&](Config config) {
    lexico::LexicoOptions& options = config.options;
    options.key_sparsity = options.value_sparsity = 4;
    options.buffer = 0;
    lexico::LexicoCache cache({1, kv, d}, dicts, options, space_options(config));
    RowMatrix out(q, d);
    for (Eigen::Index t = 0; t < tokens; ++t) cache.append(0, keys.row(t).data(), values.row(t).data());
    const RowMatrix query = Eigen::Map<const RowMatrix>(queries.data(), q, d);
    cache.attend(0, query, out);
    lexico::DenseCache<float> dense({1, kv, d});
    for (Eigen::Index t = 0; t < tokens; ++t) dense.append(0, keys.row(t).data(), values.row(t).data());
    RowMatrix want(q, d);
    dense.attend(0, query, want);
    Eigen::MatrixXd coded = reconstruct(cache.key_codes(0, 0), *dicts[0].keys);
    if (config.rope) rotate_rows(coded, rope, 0);
    return std::make_pair((coded - keys.cast<double>()).norm() / keys.cast<double>().norm(),
                          relative_error(out, want));
  };
  Config coded_before_rope;
  coded_before_rope.rope = rope;
  const auto [key_before, out_before] = errors(coded_before_rope);
  const auto [key_after, out_after] = errors({});
  EXPECT_LT(key_before, 0.05);
  EXPECT_GT(key_after, 0.3);
  EXPECT_LT(out_before, 0.05);
  EXPECT_GT(out_after, 3 * out_before) << "key errors " << key_before << " and " << key_after;
}

TEST(LexicoCache, TiersReCodeAgingTokensAtLowerSparsity) {
  const int d = 16, kv = 1, tokens = 60;
  lexico::LexicoOptions options = with_sinks_and_tiers().options;
  options.buffer = 4;
  options.flush = 1;
  lexico::LexicoCache cache({1, kv, d}, random_dictionaries(1, d, 48, 21), options);
  const Sequence s = random_sequence(tokens, kv, 1, d, 22);
  RowMatrix out(1, d);
  for (Eigen::Index t = 0; t < tokens; ++t)
    cache.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, 1, d), out);
  // flush = 1: every tier is exactly full; tier 2 is the newest (6 tokens at 12/10 atoms).
  EXPECT_EQ(cache.sink_tokens(0), 3);
  EXPECT_EQ(cache.buffered_tokens(0), 4);
  EXPECT_EQ(cache.key_codes(0, 0, 2).rows(), 6u);
  EXPECT_EQ(cache.key_codes(0, 0, 2).sparsity(), 12);
  EXPECT_EQ(cache.value_codes(0, 0, 1).sparsity(), 7);
  EXPECT_EQ(cache.key_codes(0, 0, 1).rows(), 9u);
  EXPECT_EQ(cache.key_codes(0, 0, 0).rows(), static_cast<std::size_t>(tokens - 3 - 4 - 6 - 9));
  EXPECT_EQ(cache.key_codes(0, 0, 0).sparsity(), 8);
  // Re-coding the 12-atom reconstruction at 8 atoms: each tier's error grows with age.
  auto error_of_tier = [&](int tier, Eigen::Index first_token) {
    const Eigen::MatrixXd k = reconstruct(cache.key_codes(0, 0, tier), cache.key_dictionary(0));
    const Eigen::MatrixXd x = s.keys.middleRows(first_token, k.rows()).cast<double>();
    return (k - x).norm() / x.norm();
  };
  const double oldest = error_of_tier(0, 3), middle = error_of_tier(1, tokens - 4 - 6 - 9),
               newest = error_of_tier(2, tokens - 4 - 6);
  EXPECT_LT(newest, middle);
  EXPECT_LT(middle, oldest);
}

TEST(LexicoCache, EqualsDenseFp16WhileEverythingIsBuffered) {
  const int d = 16, kv = 2, q = 8, tokens = 40;
  lexico::LexicoOptions options;
  options.buffer = tokens;
  lexico::LexicoCache cache({2, kv, d}, random_dictionaries(2, d, 32, 3), options);
  lexico::DenseCache<Eigen::half> dense({2, kv, d});
  const Sequence s = random_sequence(tokens, kv, q, d, 4);
  RowMatrix a(q, d), b(q, d);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    cache.decode(1, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), a);
    dense.decode(1, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), b);
    // Equal to rounding: the dense cache streams its tokens with an online softmax and
    // divides by the sum at the end; Lexico's decode step normalises the weights first.
    ASSERT_LE((a - b).cwiseAbs().maxCoeff(), 1e-6f) << "token " << t;
  }
  EXPECT_EQ(cache.coded_tokens(1), 0);
  EXPECT_EQ(cache.bytes().total(), dense.bytes().total());
}

void check_prefill_then_decode(Config config) {
  const int d = config.head_dim, kv = 2, q = 4, prompt = 50, tokens = 65;
  lexico::LexicoOptions& options = config.options;
  options.buffer = 12;
  options.flush = 1;  // one-by-one then codes exactly the tokens a prefill codes
  const auto dicts = random_dictionaries(1, d, 48, 5);
  lexico::LexicoCache prefilled({1, kv, d}, dicts, options, space_options(config)),
      streamed({1, kv, d}, dicts, options, space_options(config));
  const Sequence s = random_sequence(tokens, kv, q, d, 6);
  RowMatrix block_out(prompt, q * d), a(q, d), b(q, d);
  prefilled.prefill(0, s.keys.topRows(prompt), s.values.topRows(prompt), s.queries.topRows(prompt), block_out);
  for (Eigen::Index t = 0; t < prompt; ++t)
    streamed.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), a);
  EXPECT_EQ(prefilled.coded_tokens(0), prompt - options.sinks - options.buffer);
  EXPECT_EQ(streamed.coded_tokens(0), prompt - options.sinks - options.buffer);
  for (Eigen::Index t = prompt; t < tokens; ++t) {
    prefilled.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), a);
    streamed.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), b);
    ASSERT_LT((a - b).cwiseAbs().maxCoeff(), 1e-6f) << "token " << t;
  }
  EXPECT_EQ(prefilled.bytes().total(), streamed.bytes().total());
}

TEST(LexicoCache, PrefillThenDecodeEqualsTokenByToken) { check_prefill_then_decode({}); }
Config with_sinks() {
  Config config;
  config.options.sinks = 3;
  return config;
}

TEST(LexicoCache, PrefillThenDecodeEqualsTokenByToken_Sinks) { check_prefill_then_decode(with_sinks()); }
TEST(LexicoCache, PrefillThenDecodeEqualsTokenByToken_KeysBeforeRope) {
  check_prefill_then_decode(keys_before_rope(with_sinks(), lexico::RopeStyle::rotate_half));
}

// Every row of a code store: its atom indices and stored coefficient bytes.
std::vector<std::vector<int>> rows_of(const lexico::CodeStore& codes, std::size_t count) {
  std::vector<std::vector<int>> rows;
  codes.for_each_row([&](std::size_t r, lexico::CodeStore::Indices index, const std::uint8_t* coefficient, int entries,
                         float scale) {
    if (r >= count) return;
    std::vector<int> row{entries, static_cast<int>(scale * 1024)};
    for (int i = 0; i < entries; ++i) row.insert(row.end(), {static_cast<int>(index[i]), coefficient[i]});
    rows.push_back(row);
  });
  return rows;
}

// With recent tiers a prefill puts each token that leaves the buffer straight into the
// tier its age gives it: the newest fill the recent tiers, the oldest are coded once at
// s, exactly as a cache without tiers codes them (no token goes through a tier first).
void check_prefill_places_tokens_by_age(Config config) {
  const int d = config.head_dim, kv = 2, q = 4, prompt = 50;
  lexico::LexicoOptions& options = config.options;
  options.buffer = 12;
  options.flush = 1;
  lexico::LexicoOptions plain_options = options;
  plain_options.tiers.clear();
  plain_options.recent_format = lexico::LexicoOptions::RecentFormat::codes;
  plain_options.recent_value_format.reset();
  const auto dicts = random_dictionaries(1, d, 48, 5);
  lexico::LexicoCache tiered({1, kv, d}, dicts, options, space_options(config)),
      plain({1, kv, d}, dicts, plain_options, space_options(config));
  const Sequence s = random_sequence(prompt, kv, q, d, 6);
  RowMatrix out(prompt, q * d);
  tiered.prefill(0, s.keys, s.values, s.queries, out);
  plain.prefill(0, s.keys, s.values, s.queries, out);
  const Eigen::Index leaving = prompt - options.sinks - options.buffer;
  ASSERT_EQ(tiered.coded_tokens(0), leaving);
  Eigen::Index recent = 0;
  if (const auto* rows = tiered.recent_keys(0)) {
    EXPECT_EQ(rows->tokens(), std::min<Eigen::Index>(leaving, options.tiers.front().tokens));
    recent = rows->tokens();
    // Quantized from the tokens as fp16 holds them: within the format's error of them.
    RowMatrix got(recent, d);
    lexico::detail::copy_rows(*rows, 1, recent, got, 0);
    const RowMatrix want = s.keys.block(prompt - options.buffer - recent, d, recent, d);
    EXPECT_LT((got - want).norm() / want.norm(), 0.2);
  }
  for (int tier = 1; tier < tiered.code_tiers(); ++tier) {
    const int capacity = options.tiers[static_cast<std::size_t>(tiered.code_tiers() - 1 - tier)].tokens;
    EXPECT_EQ(static_cast<Eigen::Index>(tiered.key_codes(0, 0, tier).rows()), std::min<Eigen::Index>(capacity, leaving - recent));
    recent += static_cast<Eigen::Index>(tiered.key_codes(0, 0, tier).rows());
  }
  const std::size_t oldest = static_cast<std::size_t>(leaving - recent);
  ASSERT_GT(oldest, 0u);
  for (int h = 0; h < kv; ++h) {
    ASSERT_EQ(tiered.key_codes(0, h, 0).rows(), oldest);
    EXPECT_EQ(rows_of(tiered.key_codes(0, h, 0), oldest), rows_of(plain.key_codes(0, h, 0), oldest)) << "head " << h;
    EXPECT_EQ(rows_of(tiered.value_codes(0, h, 0), oldest), rows_of(plain.value_codes(0, h, 0), oldest)) << "head " << h;
  }
}

TEST(LexicoCache, PrefillPlacesTokensByAge_SinksAndTiers) { check_prefill_places_tokens_by_age(with_sinks_and_tiers()); }
TEST(LexicoCache, PrefillPlacesTokensByAge_KeysBeforeRope) {
  check_prefill_places_tokens_by_age(keys_before_rope(with_sinks_and_tiers(), lexico::RopeStyle::rotate_half));
}

Config quantized_tier(lexico::LexicoOptions::RecentFormat format) {
  Config config = with_sinks();
  config.options.tiers = {{10, 0, 0}};
  config.options.recent_format = format;
  config.head_dim = 32;
  return config;
}

TEST(LexicoCache, PrefillPlacesTokensByAge_QuantizedTier) {
  check_prefill_places_tokens_by_age(quantized_tier(lexico::LexicoOptions::RecentFormat::q8_0));
  check_prefill_places_tokens_by_age(quantized_tier(lexico::LexicoOptions::RecentFormat::q4_0));
}

TEST(LexicoCache, EqualsAttentionOverReconstructedKV_QuantizedTier) {
  for (auto format : {lexico::LexicoOptions::RecentFormat::q8_0, lexico::LexicoOptions::RecentFormat::q4_0}) {
    check_against_reconstruction(2, 8, 2, quantized_tier(format));
    check_against_reconstruction(1, 5, 1, keys_before_rope(quantized_tier(format), lexico::RopeStyle::interleaved));
  }
}

// q8_0 keys with q4_0 values: each part holds its own format's rows and bytes.
TEST(LexicoCache, QuantizedTierWithValuesInTheirOwnFormat) {
  Config config = quantized_tier(lexico::LexicoOptions::RecentFormat::q8_0);
  config.options.recent_value_format = lexico::LexicoOptions::RecentFormat::q4_0;
  check_against_reconstruction(2, 8, 1, config);
  config.options.buffer = 8;
  config.options.flush = 4;
  lexico::LexicoCache cache({1, 2, 32}, random_dictionaries(1, 32, 64, 9), config.options);
  const Sequence s = random_sequence(40, 2, 4, 32, 10);
  RowMatrix out(4, 32);
  for (Eigen::Index t = 0; t < 40; ++t) cache.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, 4, 32), out);
  const Eigen::Index held = cache.recent_keys(0)->tokens();
  ASSERT_GT(held, 0);
  EXPECT_EQ(cache.recent_keys(0)->payload_bytes() + cache.recent_keys(0)->metadata_bytes(), static_cast<std::size_t>(held * 2 * 34));
  EXPECT_EQ(cache.recent_values(0)->payload_bytes() + cache.recent_values(0)->metadata_bytes(), static_cast<std::size_t>(held * 2 * 18));
  config.options.recent_format = lexico::LexicoOptions::RecentFormat::codes;
  EXPECT_THROW(lexico::LexicoCache({1, 2, 32}, random_dictionaries(1, 32, 64, 9), config.options), lexico::error);
  // A quantized format without a tier to hold: refused, not ignored.
  config.options.recent_format = lexico::LexicoOptions::RecentFormat::q8_0;
  config.options.tiers.clear();
  EXPECT_THROW(lexico::LexicoCache({1, 2, 32}, random_dictionaries(1, 32, 64, 9), config.options), lexico::error);
  config.options.recent_value_format.reset();
  EXPECT_THROW(lexico::LexicoCache({1, 2, 32}, random_dictionaries(1, 32, 64, 9), config.options), lexico::error);
}

// A quantized tier: tokens leave it coded once at s, so its bytes are the format's and no
// token carries more than s atoms.
TEST(LexicoCache, QuantizedTierHoldsTheFormatsBytes) {
  const int d = 32, kv = 2, tokens = 60;
  Config config = quantized_tier(lexico::LexicoOptions::RecentFormat::q4_0);
  config.options.key_sparsity = config.options.value_sparsity = 3;
  config.options.buffer = 8;
  config.options.flush = 4;
  lexico::LexicoCache cache({1, kv, d}, random_dictionaries(1, d, 64, 7), config.options);
  const Sequence s = random_sequence(tokens, kv, 4, d, 8);
  RowMatrix out(4, d);
  for (Eigen::Index t = 0; t < tokens; ++t) cache.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, 4, d), out);
  const auto* recent = cache.recent_keys(0);
  ASSERT_NE(recent, nullptr);
  EXPECT_GE(recent->tokens(), 10 - 3);
  EXPECT_LE(recent->tokens(), 10);
  EXPECT_EQ(cache.code_tiers(), 1);
  EXPECT_EQ(cache.key_codes(0, 0, 0).rows() + static_cast<std::size_t>(recent->tokens() + cache.buffered_tokens(0) + 3),
            static_cast<std::size_t>(tokens));
  // q4_0: 32 channels in 16 bytes and one fp16 scale, per token, head, K and V.
  EXPECT_EQ(recent->payload_bytes() + recent->metadata_bytes(), static_cast<std::size_t>(recent->tokens() * kv * 18));
  EXPECT_EQ(cache.key_codes(0, 0, 0).sparsity(), 3);
  EXPECT_THROW(lexico::LexicoCache({1, kv, 16}, random_dictionaries(1, 16, 64, 7), config.options), lexico::error);
}

// A quantized residual beside every code: head_dim a multiple of its 32-channel blocks.
Config with_residual(Config config, int key_bits, int value_bits) {
  config.options.key_residual_bits = key_bits;
  config.options.value_residual_bits = value_bits;
  if (config.head_dim % 32 != 0) config.head_dim = 32;
  return config;
}

// Codes with their residuals: attention equals attention over x̂ + r̂, keys after and before
// RoPE (both styles), through recent code tiers (which re-code x̂ + r̂ as tokens age), with
// a quantized tier, a key metric (residuals in its space) and the d = 128 vector kernel.
TEST(LexicoCache, EqualsAttentionOverReconstructedKV_Residual) {
  using lexico::RopeStyle;
  check_against_reconstruction(2, 8, 2, with_residual({}, 2, 1));
  check_against_reconstruction(1, 5, 1, keys_before_rope(with_residual(with_sinks_and_tiers(), 4, 2), RopeStyle::interleaved));
  check_against_reconstruction(2, 4, 2, with_key_metric(with_residual({}, 1, 0), 2));
  check_against_reconstruction(
      2, 4, 1,
      with_key_metric(keys_before_rope(with_residual(quantized_tier(lexico::LexicoOptions::RecentFormat::q8_0), 2, 2),
                                       RopeStyle::rotate_half), 1), 120);
  Config wide = with_sinks_and_tiers();
  wide.head_dim = 128;
  check_against_reconstruction(2, 4, 1, keys_before_rope(with_residual(wide, 2, 2), RopeStyle::rotate_half), 200);
}

TEST(LexicoCache, PrefillThenDecodeEqualsTokenByToken_Residual) {
  check_prefill_then_decode(keys_before_rope(with_residual(with_sinks(), 2, 1), lexico::RopeStyle::rotate_half));
}

// The residual removes most of the coding error (Gaussian-like residuals keep about 1 - 2/π
// of it at 1 bit, an eighth at 2 bits, a few thousandths at 4), leaves the codes as they
// were, and costs d·b/8 bytes plus an fp16 scale per 32 channels per coded vector.
TEST(LexicoCache, ResidualShrinksTheCodingErrorAtItsBytes) {
  const int d = 64, kv = 2, q = 4, tokens = 80;
  const Sequence s = random_sequence(tokens, kv, q, d, 51);
  const auto dicts = random_dictionaries(1, d, 96, 52);
  for (const auto& [bits, bound] : {std::pair{1, 0.45}, std::pair{2, 0.2}, std::pair{4, 0.02}}) {
    Config plain;
    plain.head_dim = d;
    plain.options.key_sparsity = plain.options.value_sparsity = 4;
    plain.options.buffer = 8;
    plain.options.flush = 4;
    const Config with = with_residual(plain, bits, bits);
    lexico::LexicoCache a({1, kv, d}, dicts, plain.options), b({1, kv, d}, dicts, with.options);
    RowMatrix out(q, d);
    for (Eigen::Index t = 0; t < tokens; ++t) {
      a.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), out);
      b.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), out);
    }
    const Eigen::Index coded = b.coded_tokens(0);
    ASSERT_GT(coded, 60);
    for (int h = 0; h < kv; ++h) {
      EXPECT_EQ(rows_of(a.key_codes(0, h), coded), rows_of(b.key_codes(0, h), coded));
      for (const bool keys : {true, false}) {
        const RowMatrix& x = keys ? s.keys : s.values;
        Eigen::MatrixXd truth(0, d);
        append_fp16(truth, x.topRows(coded), h, d);  // the cache codes fp16 tokens
        Eigen::MatrixXd decoded = reconstruct(keys ? b.key_codes(0, h) : b.value_codes(0, h),
                                              keys ? b.key_dictionary(0) : b.value_dictionary(0));
        const double coding_error = (truth - decoded).squaredNorm();
        add_residual(decoded, keys ? b.key_residual(0) : b.value_residual(0), h);
        EXPECT_LT((truth - decoded).squaredNorm(), bound * coding_error)
            << bits << " bits, " << (keys ? "keys" : "values") << ", head " << h;
      }
    }
    const std::size_t row = static_cast<std::size_t>(d * bits / 8 + d / 32 * 2);
    EXPECT_EQ(b.bytes().total() - a.bytes().total(), static_cast<std::size_t>(coded) * kv * 2 * row);
    EXPECT_EQ(b.bytes().metadata - a.bytes().metadata, static_cast<std::size_t>(coded) * kv * 2 * (d / 32 * 2));
  }
}

TEST(LexicoCache, RejectsBadResiduals) {
  const auto dicts = random_dictionaries(1, 32, 64, 3);
  EXPECT_THROW(lexico::LexicoCache({1, 1, 32}, dicts, with_residual({}, 3, 0).options), lexico::error);
  EXPECT_THROW(lexico::LexicoCache({1, 1, 32}, dicts, with_residual({}, 0, 8).options), lexico::error);
  Config narrow = with_residual({}, 2, 2);
  EXPECT_THROW(lexico::LexicoCache({1, 1, 16}, random_dictionaries(1, 16, 64, 3), narrow.options), lexico::error);
  const Config metric = with_value_metric(with_residual({}, 0, 2), 1);
  EXPECT_THROW(lexico::LexicoCache({1, 1, 32}, dicts, metric.options, space_options(metric)), lexico::error);
  // Codes appended without their residuals would leave the residual rows behind.
  lexico::LexicoCache cache({1, 1, 32}, dicts, with_residual({}, 2, 0).options);
  lexico::SparseCodes codes;
  codes.indices = Eigen::Matrix<std::uint16_t, Eigen::Dynamic, Eigen::Dynamic>::Zero(8, 1);
  codes.coefficients = Eigen::MatrixXf::Zero(8, 1);
  codes.counts = Eigen::Matrix<std::uint8_t, Eigen::Dynamic, 1>::Constant(1, 8);
  codes.sparsity = 8;
  EXPECT_THROW(cache.append_codes(0, codes, codes), lexico::error);
}

Config pooled(Config config) {
  config.options.atom_pool = 2.0f;
  return config;
}

TEST(LexicoCache, EqualsAttentionOverReconstructedKV_PooledAtoms) {
  check_against_reconstruction(2, 8, 2, pooled({}));
  check_against_reconstruction(1, 5, 1, pooled(keys_before_rope(with_sinks_and_tiers(), lexico::RopeStyle::rotate_half)));
}

TEST(LexicoCache, PrefillThenDecodeEqualsTokenByToken_PooledAtoms) { check_prefill_then_decode(pooled(with_sinks())); }
TEST(LexicoCache, PrefillPlacesTokensByAge_PooledAtoms) { check_prefill_places_tokens_by_age(pooled(with_sinks_and_tiers())); }

// Every flush's vectors hold s atoms each on average, some more, some fewer.
TEST(LexicoCache, PooledAtomsKeepTheAverageSparsityPerFlush) {
  const int d = 16, kv = 2, flushes = 4, flush = 10, tokens = 12 + flushes * flush;
  lexico::LexicoOptions options = pooled({}).options;
  options.key_sparsity = 4;
  options.value_sparsity = 3;
  options.buffer = 12;
  options.flush = flush;
  lexico::LexicoCache cache({1, kv, d}, random_dictionaries(1, d, 64, 2), options);
  std::mt19937 rng(4);
  const RowMatrix keys = random_rows(tokens, kv * d, rng), values = random_rows(tokens, kv * d, rng);
  for (Eigen::Index t = 0; t < tokens; ++t) cache.append(0, keys.row(t).data(), values.row(t).data());
  ASSERT_EQ(cache.coded_tokens(0), flushes * flush);
  for (const bool keys_part : {true, false}) {
    const int s = keys_part ? options.key_sparsity : options.value_sparsity;
    std::vector<int> entries(static_cast<std::size_t>(flushes * flush * kv));  // token-major, heads within
    for (int h = 0; h < kv; ++h) {
      const lexico::CodeStore& codes = keys_part ? cache.key_codes(0, h) : cache.value_codes(0, h);
      ASSERT_TRUE(codes.variable_rows());
      ASSERT_EQ(codes.rows(), static_cast<std::size_t>(flushes * flush));
      codes.for_each_row([&](std::size_t r, lexico::CodeStore::Indices, const std::uint8_t*, int count, float) {
        entries[r * kv + static_cast<std::size_t>(h)] = count;
      });
    }
    for (int f = 0; f < flushes; ++f) {
      const auto begin = entries.begin() + f * flush * kv, end = begin + flush * kv;
      EXPECT_EQ(std::accumulate(begin, end, 0), s * flush * kv) << (keys_part ? "keys" : "values") << ", flush " << f;
      EXPECT_LE(*std::max_element(begin, end), 2 * s);
    }
    EXPECT_GT(*std::max_element(entries.begin(), entries.end()), s) << "random vectors differ: some take more";
  }
}

Config pooled_long_term_only(Config config) {
  config = pooled(config);
  config.options.pool_recent_tiers = false;
  return config;
}

TEST(LexicoCache, EqualsAttentionOverReconstructedKV_PooledLongTermOnly) {
  check_against_reconstruction(1, 5, 1,
                               pooled_long_term_only(keys_before_rope(with_sinks_and_tiers(), lexico::RopeStyle::rotate_half)));
}

TEST(LexicoCache, PrefillPlacesTokensByAge_PooledLongTermOnly) {
  check_prefill_places_tokens_by_age(pooled_long_term_only(with_sinks_and_tiers()));
}

// With pool_recent_tiers off, the recent tiers hold exactly their sparsity (fixed rows)
// and only the long-term codes share atoms: s per vector on average, up to 2s.
TEST(LexicoCache, PooledLongTermOnlyLeavesRecentTiersFixed) {
  const int d = 16, kv = 2, tokens = 90;
  lexico::LexicoOptions options = pooled_long_term_only(with_sinks_and_tiers()).options;
  options.buffer = 8;
  options.flush = 4;
  lexico::LexicoCache cache({1, kv, d}, random_dictionaries(1, d, 64, 9), options);
  std::mt19937 rng(10);
  const RowMatrix keys = random_rows(tokens, kv * d, rng), values = random_rows(tokens, kv * d, rng);
  for (Eigen::Index t = 0; t < tokens; ++t) cache.append(0, keys.row(t).data(), values.row(t).data());
  EXPECT_NE(cache.parameters().find("pool_recent=0"), std::string::npos) << cache.parameters();
  std::size_t vectors = 0;
  int total = 0, longest = 0;
  for (int h = 0; h < kv; ++h) {
    for (int tier : {1, 2}) {
      const lexico::CodeStore& recent = cache.key_codes(0, h, tier);
      ASSERT_GT(recent.rows(), 0u);
      EXPECT_FALSE(recent.variable_rows()) << "tier " << tier;
      EXPECT_EQ(recent.sparsity(), tier == 2 ? 12 : 8);
    }
    const lexico::CodeStore& long_term = cache.value_codes(0, h, 0);
    ASSERT_TRUE(long_term.variable_rows());
    ASSERT_GT(long_term.rows(), 0u);
    vectors += long_term.rows();
    long_term.for_each_row([&](std::size_t, lexico::CodeStore::Indices, const std::uint8_t*, int count, float) {
      total += count;
      longest = std::max(longest, count);
    });
  }
  EXPECT_EQ(total, options.value_sparsity * static_cast<int>(vectors));  // pools span the heads of a flush
  EXPECT_LE(longest, 2 * options.value_sparsity);
  EXPECT_GT(longest, options.value_sparsity) << "random vectors differ: some take more";
}

TEST(LexicoCache, PrefillAttentionIsExact) {
  const int d = 16, kv = 2, q = 4, prompt = 30;
  lexico::LexicoOptions options;
  options.buffer = 4;
  lexico::LexicoCache cache({1, kv, d}, random_dictionaries(1, d, 48, 7), options);
  const Sequence s = random_sequence(prompt, kv, q, d, 8);
  RowMatrix out(prompt, q * d), exact(prompt, q * d);
  cache.prefill(0, s.keys, s.values, s.queries, out);
  lexico::causal_attention(s.queries, s.keys, s.values, d, exact);
  EXPECT_EQ((out - exact).cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_EQ(cache.coded_tokens(0), prompt - 4);
}

void check_bytes(bool pack_indices) {
  const int d = 32, kv = 2, layers = 2, tokens = 100, sk = 4, sv = 8, buffer = 16, flush = 8;
  lexico::LexicoOptions options;
  options.pack_indices = pack_indices;
  options.key_sparsity = sk;
  options.value_sparsity = sv;
  options.buffer = buffer;
  options.flush = flush;
  options.layer_sparsity[1] = {6, 2};
  lexico::LexicoCache cache({layers, kv, d}, random_dictionaries(layers, d, 128, 9), options);
  const Sequence s = random_sequence(tokens, kv, 2, d, 10);
  RowMatrix out(2, d);
  for (Eigen::Index t = 0; t < tokens; ++t)
    for (int l = 0; l < layers; ++l) cache.decode(l, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, 2, d), out);
  // Coded in blocks of `flush` once the buffer is full: 100 tokens, 16 buffered at most.
  std::size_t coded = 0;
  while (tokens - coded > static_cast<std::size_t>(buffer)) coded += flush;
  const std::size_t buffered = tokens - coded;
  ASSERT_EQ(static_cast<std::size_t>(cache.coded_tokens(0)), coded);
  // Per coded vector: s indices of 7 bits (N = 128) packed into whole bytes, or 16 bits
  // each unpacked, + s FP8 coefficients + 1 scale byte.
  auto row = [&](int s) {
    return static_cast<std::size_t>(pack_indices ? (7 * s + 7) / 8 + s + 1 : 3 * s + 1);
  };
  const std::size_t codes = coded * kv * (row(sk) + row(sv) + row(6) + row(2));
  const std::size_t fp16_buffer = layers * 2 * buffered * kv * d * 2;
  EXPECT_EQ(cache.bytes().total(), codes + fp16_buffer);
  EXPECT_EQ(cache.bytes().buffer, fp16_buffer);
  EXPECT_EQ(cache.bytes().metadata, coded * kv * 4);
  const double fp16 = static_cast<double>(layers * 2 * tokens * kv * d * 2);
  EXPECT_DOUBLE_EQ(cache.kv_size_fraction(), static_cast<double>(codes + fp16_buffer) / fp16);
}

TEST(LexicoCache, BytesFollowTheFormula_PackedIndices) { check_bytes(true); }
TEST(LexicoCache, BytesFollowTheFormula_SixteenBitIndices) { check_bytes(false); }

TEST(LexicoCache, ZeroBufferCodesEveryToken) {
  const int d = 16, kv = 1, q = 2;
  lexico::LexicoOptions options;
  options.buffer = 0;
  options.flush = 1;
  lexico::LexicoCache cache({1, kv, d}, random_dictionaries(1, d, 32, 13), options);
  const Sequence s = random_sequence(10, kv, q, d, 14);
  RowMatrix out(q, d);
  for (Eigen::Index t = 0; t < 10; ++t) {
    cache.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), out);
    EXPECT_EQ(cache.buffered_tokens(0), 0);
    EXPECT_TRUE(out.allFinite());
  }
  // N = 32: 8 indices of 5 bits = 5 bytes, 8 coefficients, 1 scale.
  EXPECT_EQ(cache.bytes().total(), static_cast<std::size_t>(10 * 2 * (5 + 8 + 1)));
}

TEST(LexicoCache, ToleranceStoresVariableRows) {
  const int d = 16;
  Eigen::MatrixXf atoms = Eigen::MatrixXf::Identity(d, d);  // every vector codes exactly with d atoms
  auto dict = std::make_shared<const lexico::Dictionary>(atoms);
  lexico::LexicoOptions options;
  options.key_sparsity = options.value_sparsity = 8;
  options.key_tolerance = options.value_tolerance = 1e-3f;
  options.buffer = 0;
  lexico::LexicoCache cache({1, 1, d}, {{dict, dict}}, options);
  float token[d] = {};
  token[3] = 2.0f;  // one atom suffices
  cache.append(0, token, token);
  // 1 entry (a 4-bit index in one byte, N = 16, and one coefficient byte) + scale + count, for K and V.
  EXPECT_EQ(cache.bytes().total(), 2u * (2 + 2));
}

TEST(LexicoCache, RejectsMismatchedDictionaries) {
  EXPECT_THROW(lexico::LexicoCache({2, 1, 16}, random_dictionaries(1, 16, 32, 1)), lexico::error);
  EXPECT_THROW(lexico::LexicoCache({1, 1, 8}, random_dictionaries(1, 16, 32, 1)), lexico::error);
  lexico::LexicoOptions bad;
  bad.flush = 0;
  EXPECT_THROW(lexico::LexicoCache({1, 1, 16}, random_dictionaries(1, 16, 32, 1), bad), lexico::error);
  lexico::LexicoOptions override_out_of_range;
  override_out_of_range.layer_sparsity[4] = {2, 2};
  EXPECT_THROW(lexico::LexicoCache({1, 1, 16}, random_dictionaries(1, 16, 32, 1), override_out_of_range),
               lexico::error);
}

}  // namespace

// Two threads split the heads and the value combination's columns: the same attention
// as one thread (the decode path of keys before and after RoPE, enough atoms in use for
// the combination to go parallel).
TEST(LexicoCache, TwoThreadsAttendAsOne) {
  const int d = 64, kv = 2, q = 4, tokens = 300;
  for (const bool before_rope : {false, true}) {
    Config config;
    config.head_dim = d;
    if (before_rope) config = keys_before_rope(config, lexico::RopeStyle::rotate_half);
    config.options.buffer = 8;
    const auto dicts = random_dictionaries(1, d, 512, 13);
    lexico::LexicoCache one({1, kv, d}, dicts, config.options, space_options(config)),
        two({1, kv, d}, dicts, config.options, space_options(config));
    one.set_threads(1);
    two.set_threads(2);
    const Sequence s = random_sequence(tokens, kv, q, d, 14);
    RowMatrix a(q, d), b(q, d);
    for (Eigen::Index t = 0; t < tokens; ++t) {
      one.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), a);
      two.decode(0, s.keys.row(t).data(), s.values.row(t).data(), query_at(s, t, q, d), b);
      ASSERT_LT((a - b).cwiseAbs().maxCoeff(), 1e-5f) << "token " << t << (before_rope ? " before RoPE" : "");
    }
  }
}
