// Token eviction: StreamingLLM, H2O, SnapKV, PyramidKV and TOVA on crafted attention
// patterns whose kept set is obvious, against an independent simulation, exact bytes,
// GQA attention over the kept tokens, budgets, and bad options.
//
// Every test token's value rows hold its position in every channel, so the kept
// positions of a head are the first column of stored_values().
#include <lexico/cache/factory.hpp>
#include <lexico/cache/h2o.hpp>
#include <lexico/cache/pyramidkv.hpp>
#include <lexico/cache/snapkv.hpp>
#include <lexico/cache/streaming.hpp>
#include <lexico/cache/tova.hpp>

#include <algorithm>
#include <numeric>

#include <gtest/gtest.h>

#include "cache_test_util.hpp"

namespace {

using lexico::Budget;
using lexico::CacheShape;
using lexico::EvictionCache;
using lexico::RowMatrix;
using lexico_test::query_heads;
using lexico_test::random_rows;
using Positions = std::vector<int>;

Positions kept_positions(const EvictionCache& cache, int layer, int head) {
  const RowMatrix values = cache.stored_values(layer, head);
  Positions positions;
  for (Eigen::Index t = 0; t < values.rows(); ++t) positions.push_back(static_cast<int>(values(t, 0)));
  return positions;
}

Positions range(int first, int end) {
  Positions p(static_cast<std::size_t>(end - first));
  std::iota(p.begin(), p.end(), first);
  return p;
}

Positions join(Positions a, const Positions& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Values: position t in every channel of every head.
RowMatrix position_values(int tokens, int width) {
  RowMatrix v(tokens, width);
  for (int t = 0; t < tokens; ++t) v.row(t).setConstant(static_cast<float>(t));
  return v;
}

std::size_t kept_bytes(const EvictionCache& cache) {
  std::size_t kept = 0;
  for (int l = 0; l < cache.shape().layers; ++l) kept += static_cast<std::size_t>(cache.kept(l));
  return kept * static_cast<std::size_t>(cache.shape().kv_width()) * 2 * 2;  // K and V at fp16
}

void decode(EvictionCache& cache, int layer, const RowMatrix& keys, const RowMatrix& values, const RowMatrix& queries,
            int t) {
  RowMatrix q = query_heads(queries, t, cache.shape().head_dim), out(q.rows(), q.cols());
  cache.decode(layer, keys.row(t).data(), values.row(t).data(), q, out);
}

TEST(Streaming, KeepsSinksAndTheRecentWindow) {
  const int heads = 2, d = 8, steps = 30;
  std::mt19937 rng(1);
  const RowMatrix keys = random_rows(steps, heads * d, rng), values = position_values(steps, heads * d);
  const RowMatrix queries = random_rows(steps, 2 * heads * d, rng);
  lexico::StreamingCache decoded({1, heads, d}, {Budget::count(10), 4});
  EXPECT_EQ(decoded.name(), "streaming");
  EXPECT_EQ(decoded.parameters(), "budget=10 sinks=4");
  for (int t = 0; t < steps; ++t) {
    const int seen = t + 1;
    decoded.append(0, keys.row(t).data(), values.row(t).data());
    const Positions want = seen <= 10 ? range(0, seen) : join(range(0, 4), range(seen - 6, seen));
    for (int h = 0; h < heads; ++h) ASSERT_EQ(kept_positions(decoded, 0, h), want) << "T = " << seen;
    lexico_test::expect_attention_over_stored(decoded, 0, query_heads(queries, t, d), 2e-5);
    EXPECT_EQ(decoded.bytes().total(), kept_bytes(decoded));
    EXPECT_DOUBLE_EQ(decoded.kv_size_fraction(), std::min(seen, 10) / static_cast<double>(seen));
  }
  // A prefill keeps the sinks and the block's end, then streams on.
  lexico::StreamingCache prefilled({1, heads, d}, {Budget::count(10), 4});
  RowMatrix out(25, 2 * heads * d);
  prefilled.prefill(0, keys.topRows(25), values.topRows(25), queries.topRows(25), out);
  EXPECT_EQ(kept_positions(prefilled, 0, 1), join(range(0, 4), range(19, 25)));
  decode(prefilled, 0, keys, values, queries, 25);
  EXPECT_EQ(kept_positions(prefilled, 0, 0), join(range(0, 4), range(20, 26)));
}

TEST(Streaming, FractionBudgets) {
  const int d = 8, steps = 100;
  std::mt19937 rng(2);
  const RowMatrix keys = random_rows(steps, d, rng), values = position_values(steps, d);
  const RowMatrix queries = random_rows(steps, d, rng);
  // Of the tokens seen so far: kept = round(0.2 T) all along.
  lexico::StreamingCache running({1, 1, d}, {Budget::share(0.2), 1});
  // Of a fixed context: round(0.2 * 50) = 10 tokens.
  lexico::StreamingCache fixed({1, 1, d}, {Budget::share(0.2, 50), 1});
  for (int t = 0; t < steps; ++t) {
    decode(running, 0, keys, values, queries, t);
    decode(fixed, 0, keys, values, queries, t);
    EXPECT_EQ(running.kept(0), std::max<long>(1, std::lround(0.2 * (t + 1))));
    EXPECT_EQ(fixed.kept(0), std::min(t + 1, 10));
  }
  EXPECT_DOUBLE_EQ(running.kv_size_fraction(), 0.2);
  EXPECT_EQ(kept_positions(fixed, 0, 0), join({0}, range(91, 100)));
}

// One query direction; the "heavy" tokens' keys point along it and take almost all the
// attention, every other key is zero.
struct Heavy {
  RowMatrix keys, values, queries;
};

Heavy heavy_pattern(int tokens, int kv_heads, int q_heads, int d, const std::vector<Positions>& heavy) {
  Heavy p{RowMatrix::Zero(tokens, kv_heads * d), position_values(tokens, kv_heads * d),
          RowMatrix::Zero(tokens, q_heads * d)};
  const int group = q_heads / kv_heads;
  for (int h = 0; h < kv_heads; ++h) {
    for (int t : heavy[static_cast<std::size_t>(h)]) p.keys(t, h * d) = 3.0f;
    for (int g = 0; g < group; ++g) p.queries.col((h * group + g) * d).setConstant(8.0f);
  }
  return p;
}

// Budget 8 with a window of 5. While few tokens exist the first ones collect the whole
// attention (token 0: 1 + 1/2), so the window must be long enough for a heavy hitter
// (1/3 of the attention per step once three exist) to outscore them before it leaves it.
TEST(H2O, KeepsHeavyHittersAndTheRecentWindowPerKvHead) {
  const int kv_heads = 2, q_heads = 8, d = 4, steps = 20;
  const std::vector<Positions> heavy = {{2, 5, 9}, {3, 7, 11}};
  const Heavy p = heavy_pattern(steps, kv_heads, q_heads, d, heavy);
  lexico::H2OCache cache({1, kv_heads, d}, {Budget::count(8), 5});
  EXPECT_EQ(cache.parameters(), "budget=8 window=5");
  for (int t = 0; t < steps; ++t) decode(cache, 0, p.keys, p.values, p.queries, t);
  EXPECT_EQ(kept_positions(cache, 0, 0), join(heavy[0], range(15, 20)));
  EXPECT_EQ(kept_positions(cache, 0, 1), join(heavy[1], range(15, 20)));
  // Kept tokens at fp16 plus one fp32 score per kept token and KV head.
  EXPECT_EQ(cache.bytes().payload, kept_bytes(cache));
  EXPECT_EQ(cache.bytes().metadata, 8u * kv_heads * 4);

  // A prefill ranks by the column sums of the block's attention.
  lexico::H2OCache prefilled({1, kv_heads, d}, {Budget::count(6), 3});
  RowMatrix out(steps, q_heads * d);
  prefilled.prefill(0, p.keys, p.values, p.queries, out);
  EXPECT_EQ(kept_positions(prefilled, 0, 0), join(heavy[0], {17, 18, 19}));
  EXPECT_EQ(kept_positions(prefilled, 0, 1), join(heavy[1], {17, 18, 19}));
  EXPECT_EQ(prefilled.bytes().metadata, 6u * kv_heads * 4);
  EXPECT_EQ(prefilled.parameters(), "budget=6 window=3");
  EXPECT_EQ(lexico::H2OCache({1, 1, 4}, {Budget::count(6)}).parameters(), "budget=6 window=half");
}

// H2O and TOVA written out independently, in double: every step adds the token, computes
// each KV head's attention averaged over its query heads, folds it into the scores and,
// over budget, drops the lowest-scored token outside the window (the oldest on ties).
struct Simulation {
  int budget, window;
  bool accumulate;
  std::vector<Positions> kept;
  std::vector<std::vector<double>> scores;

  void step(const RowMatrix& keys, const RowMatrix& queries, int t, int d) {
    const int kv_heads = static_cast<int>(kept.size()), group = static_cast<int>(queries.cols() / d) / kv_heads;
    for (int h = 0; h < kv_heads; ++h) {
      auto& k = kept[static_cast<std::size_t>(h)];
      auto& s = scores[static_cast<std::size_t>(h)];
      k.push_back(t);
      s.push_back(0.0);
      Eigen::MatrixXd stored(k.size(), d);
      for (std::size_t j = 0; j < k.size(); ++j)
        for (int i = 0; i < d; ++i)
          stored(static_cast<Eigen::Index>(j), i) = static_cast<double>(Eigen::half(keys(k[j], h * d + i)));
      Eigen::VectorXd mean = Eigen::VectorXd::Zero(static_cast<Eigen::Index>(k.size()));
      for (int g = 0; g < group; ++g) {
        const Eigen::VectorXd q = queries.row(t).segment((h * group + g) * d, d).transpose().cast<double>();
        Eigen::VectorXd a = stored * q / std::sqrt(static_cast<double>(d));
        a = (a.array() - a.maxCoeff()).exp();
        mean += a / a.sum() / group;
      }
      for (std::size_t j = 0; j < k.size(); ++j) s[j] = (accumulate ? s[j] : 0.0) + mean(static_cast<Eigen::Index>(j));
      if (static_cast<int>(k.size()) > budget) {
        const auto end = s.begin() + static_cast<std::ptrdiff_t>(k.size()) - window;
        const auto victim = std::min_element(s.begin(), end) - s.begin();
        k.erase(k.begin() + victim);
        s.erase(s.begin() + victim);
      }
    }
  }
};

void check_against_simulation(EvictionCache& cache, Simulation sim) {
  const int kv_heads = cache.shape().kv_heads, d = cache.shape().head_dim, steps = 60;
  sim.kept.resize(static_cast<std::size_t>(kv_heads));
  sim.scores.resize(static_cast<std::size_t>(kv_heads));
  std::mt19937 rng(3);
  const RowMatrix keys = random_rows(steps, kv_heads * d, rng), values = position_values(steps, kv_heads * d);
  const RowMatrix queries = random_rows(steps, 4 * kv_heads * d, rng);
  for (int t = 0; t < steps; ++t) {
    decode(cache, 0, keys, values, queries, t);
    sim.step(keys, queries, t, d);
    for (int h = 0; h < kv_heads; ++h)
      ASSERT_EQ(kept_positions(cache, 0, h), sim.kept[static_cast<std::size_t>(h)]) << "step " << t << " head " << h;
  }
}

TEST(H2O, MatchesAnIndependentSimulationWithGqa) {
  lexico::H2OCache cache({1, 2, 8}, {Budget::count(12), 4});
  check_against_simulation(cache, {12, 4, true, {}, {}});
}

TEST(Tova, MatchesAnIndependentSimulationWithGqa) {
  lexico::TovaCache cache({1, 2, 8}, {Budget::count(12), /*layerwise=*/false});
  check_against_simulation(cache, {12, 0, false, {}, {}});
}

TEST(Tova, EvictsTheLeastAttendedTokenOnePerStep) {
  const int d = 4;
  // Token 1's key points away from the queries: it is attended least and goes first.
  RowMatrix keys = RowMatrix::Zero(8, d), values = position_values(8, d), queries = RowMatrix::Zero(8, d);
  queries.col(0).setConstant(2.0f);
  keys(1, 0) = -4.0f;
  keys(3, 0) = -2.0f;
  keys(5, 0) = 1.0f;
  lexico::TovaCache cache({1, 1, d}, {Budget::count(4)});
  for (int t = 0; t < 4; ++t) decode(cache, 0, keys, values, queries, t);
  EXPECT_EQ(kept_positions(cache, 0, 0), range(0, 4));
  decode(cache, 0, keys, values, queries, 4);
  EXPECT_EQ(kept_positions(cache, 0, 0), Positions({0, 2, 3, 4}));
  decode(cache, 0, keys, values, queries, 5);
  EXPECT_EQ(kept_positions(cache, 0, 0), Positions({0, 2, 4, 5}));
  decode(cache, 0, keys, values, queries, 6);  // ties among zero keys: the oldest goes
  EXPECT_EQ(kept_positions(cache, 0, 0), Positions({2, 4, 5, 6}));
  EXPECT_EQ(cache.bytes().metadata, 0u);  // TOVA's scores are workspace
  EXPECT_EQ(cache.bytes().total(), kept_bytes(cache));
}

TEST(Tova, LayerwiseKeepsTheSameTokensInEveryHead) {
  const int kv_heads = 2, d = 8, steps = 40;
  std::mt19937 rng(4);
  const RowMatrix keys = random_rows(steps, kv_heads * d, rng), values = position_values(steps, kv_heads * d);
  const RowMatrix queries = random_rows(steps, 2 * kv_heads * d, rng);
  // Layer scope is TOVA's default (the reference's); head scope is the option.
  lexico::TovaCache layerwise({1, kv_heads, d}, {Budget::count(10)});
  lexico::TovaCache per_head({1, kv_heads, d}, {Budget::count(10), false});
  EXPECT_EQ(layerwise.parameters(), "budget=10");
  EXPECT_EQ(per_head.parameters(), "budget=10 scope=head");
  const auto made = [&](const char* options) {
    return lexico::make_cache("tova", {1, kv_heads, d}, lexico::CacheOptions::parse(options))->parameters();
  };
  EXPECT_EQ(made("budget=10"), "budget=10");
  EXPECT_EQ(made("budget=10,scope=head"), "budget=10 scope=head");
  RowMatrix out(20, 2 * kv_heads * d);
  layerwise.prefill(0, keys.topRows(20), values.topRows(20), queries.topRows(20), out);
  per_head.prefill(0, keys.topRows(20), values.topRows(20), queries.topRows(20), out);
  EXPECT_EQ(kept_positions(layerwise, 0, 0), kept_positions(layerwise, 0, 1));
  EXPECT_NE(kept_positions(per_head, 0, 0), kept_positions(per_head, 0, 1));
  for (int t = 20; t < steps; ++t) {
    decode(layerwise, 0, keys, values, queries, t);
    decode(per_head, 0, keys, values, queries, t);
    ASSERT_EQ(kept_positions(layerwise, 0, 0), kept_positions(layerwise, 0, 1));
  }
  EXPECT_NE(kept_positions(per_head, 0, 0), kept_positions(per_head, 0, 1));
}

// 64-token prompt, observation window 8, kernel 7, budget 8 + 14. KV head 0: three query
// heads look along e0, where tokens 20 and 40 have keys, one looks along e1 at token 30;
// averaged over the group, 20 and 40 outscore 30, and max pooling keeps each with its
// three neighbours on either side. KV head 1: tokens 10 and 50 for all its query heads.
TEST(SnapKV, KeepsPooledClustersOfTheGroupMeanAttention) {
  const int kv_heads = 2, q_heads = 8, d = 8, tokens = 64;
  RowMatrix keys = RowMatrix::Zero(tokens, kv_heads * d), queries = RowMatrix::Zero(tokens, q_heads * d);
  const RowMatrix values = position_values(tokens, kv_heads * d);
  keys(20, 0) = keys(40, 0) = keys(30, 1) = 4.0f;
  keys(10, d) = keys(50, d) = 4.0f;
  for (int g = 0; g < 3; ++g) queries.col(g * d).setConstant(4.0f);
  queries.col(3 * d + 1).setConstant(4.0f);
  for (int g = 4; g < 8; ++g) queries.col(g * d).setConstant(4.0f);
  lexico::SnapKVCache cache({1, kv_heads, d}, {Budget::count(22), 8, 7});
  EXPECT_EQ(cache.parameters(), "budget=22 window=8 kernel=7 pool=max");
  RowMatrix out(tokens, q_heads * d);
  cache.prefill(0, keys, values, queries, out);
  EXPECT_EQ(kept_positions(cache, 0, 0), join(join(range(17, 24), range(37, 44)), range(56, 64)));
  EXPECT_EQ(kept_positions(cache, 0, 1), join(join(range(7, 14), range(47, 54)), range(56, 64)));
  EXPECT_EQ(cache.bytes().total(), kept_bytes(cache));
  EXPECT_NEAR(cache.kv_size_fraction(), 22.0 / 64, 1e-12);
  // Decode tokens are appended, nothing more is evicted.
  RowMatrix more = position_values(70, kv_heads * d);
  for (int t = tokens; t < 70; ++t) decode(cache, 0, RowMatrix::Zero(70, kv_heads * d), more, RowMatrix::Zero(70, q_heads * d), t);
  EXPECT_EQ(cache.kept(0), 28);
  // A fraction is of the prefill length: 0.25 * 64 = 16 = window + 8. Head 1's two clusters
  // tie; ties go to the newer tokens.
  lexico::SnapKVCache fraction({1, kv_heads, d}, {Budget::share(0.25), 8, 7});
  fraction.prefill(0, keys, values, queries, out);
  EXPECT_EQ(kept_positions(fraction, 0, 1), join({13}, join(range(47, 54), range(56, 64))));
  // A prompt within the budget is kept whole.
  lexico::SnapKVCache roomy({1, kv_heads, d}, {Budget::count(64), 8, 7});
  roomy.prefill(0, keys, values, queries, out);
  EXPECT_EQ(kept_positions(roomy, 0, 0), range(0, 64));
}

TEST(SnapKV, PoolingByHand) {
  Eigen::VectorXf s(7);
  s << 0, 0, 3, 0, 0, 0, 1;
  Eigen::VectorXf max = lexico::detail::pooled(s, 0, 7, 3, lexico::Pool::max);
  Eigen::VectorXf avg = lexico::detail::pooled(s, 0, 7, 3, lexico::Pool::avg);
  Eigen::VectorXf want_max(7), want_avg(7);
  want_max << 0, 3, 3, 3, 0, 1, 1;
  want_avg << 0, 1, 1, 1, 0, 1.0f / 3, 1.0f / 3;  // divided by the kernel, padding counts
  EXPECT_EQ(max, want_max);
  EXPECT_TRUE(avg.isApprox(want_avg));
  // Only [lo, hi) is pooled; the rest is left as it was.
  EXPECT_EQ(lexico::detail::pooled(s, 0, 2, 3, lexico::Pool::max)(2), 3.0f);
  EXPECT_EQ(lexico::detail::pooled(s, 0, 2, 3, lexico::Pool::max)(1), 0.0f);
}

TEST(PyramidKV, LayerBudgetsFallLinearlyAndKeepTheTotal) {
  for (std::int64_t length : {1000, 100, 70}) {
    const auto limits = lexico::pyramid_limits(8, 64, 8, length, 20);
    std::int64_t selectable = 0;
    for (std::size_t l = 0; l < limits.size(); ++l) {
      selectable += limits[l] - 8;
      EXPECT_LE(limits[l], std::max<std::int64_t>(length, 64));
      if (l > 0) {
        EXPECT_LE(limits[l], limits[l - 1]);
      }
    }
    EXPECT_EQ(selectable, 8 * (64 - 8)) << "length " << length;
  }
  // By hand: c = 56, lo = 56 / 20 = 2.8, hi = 112 - 2.8 = 109.2; layer 0 keeps 109 + window.
  const auto limits = lexico::pyramid_limits(8, 64, 8, 1000, 20);
  EXPECT_EQ(limits.front(), 8 + 109);
  EXPECT_EQ(limits.back(), 8 + 3);
  // Capped by the prompt: P = 92, hi = 92, lo = 112 - 92 = 20.
  EXPECT_EQ(lexico::pyramid_limits(8, 64, 8, 100, 20).front(), 100);
  EXPECT_EQ(lexico::pyramid_limits(8, 64, 8, 100, 20).back(), 28);

  const int layers = 4, d = 8, tokens = 120;
  std::mt19937 rng(6);
  const RowMatrix keys = random_rows(tokens, d, rng), values = position_values(tokens, d);
  const RowMatrix queries = random_rows(tokens, 2 * d, rng);
  lexico::PyramidKVOptions options;
  options.budget = Budget::count(40);
  options.window = 8;
  lexico::PyramidKVCache cache({layers, 1, d}, options);
  lexico::SnapKVCache snap({layers, 1, d}, options);
  RowMatrix out(tokens, 2 * d);
  for (int l = 0; l < layers; ++l) {
    cache.prefill(l, keys, values, queries, out);
    snap.prefill(l, keys, values, queries, out);
    EXPECT_EQ(cache.kept(l), cache.prefill_limit(l, tokens));
    EXPECT_EQ(snap.kept(l), 40);
  }
  EXPECT_GT(cache.kept(0), cache.kept(layers - 1));
  EXPECT_EQ(cache.bytes().total(), snap.bytes().total());  // same total as SnapKV
}

// 8 query heads on 2 KV heads, prefill then decode: attention equals naive attention over
// the tokens each policy keeps at that moment.
TEST(Eviction, GqaAttentionMatchesNaiveOverKeptTokens) {
  const int kv_heads = 2, q_heads = 8, d = 16, prompt = 40, steps = 20;
  std::mt19937 rng(8);
  const RowMatrix keys = random_rows(prompt + steps, kv_heads * d, rng);
  const RowMatrix values = random_rows(prompt + steps, kv_heads * d, rng);
  const RowMatrix queries = random_rows(prompt + steps, q_heads * d, rng);
  const CacheShape shape{1, kv_heads, d};
  lexico::PyramidKVOptions pyramid;
  pyramid.budget = Budget::count(16);
  pyramid.window = 4;
  lexico::StreamingCache streaming(shape, {Budget::count(16), 4});
  lexico::H2OCache h2o(shape, {Budget::count(16)});
  lexico::SnapKVCache snapkv(shape, {Budget::count(16), 4, 5, lexico::Pool::avg});
  lexico::PyramidKVCache pyramidkv(shape, pyramid);
  lexico::TovaCache tova(shape, {Budget::share(0.3)});
  for (EvictionCache* cache : {static_cast<EvictionCache*>(&streaming), static_cast<EvictionCache*>(&h2o),
                               static_cast<EvictionCache*>(&snapkv), static_cast<EvictionCache*>(&pyramidkv),
                               static_cast<EvictionCache*>(&tova)}) {
    lexico_test::expect_decode_over_stored(*cache, 0, keys, values, queries, prompt, 2e-5);
    EXPECT_LT(cache->kept(0), prompt + steps) << cache->name();
  }
}

// Truncation floors: tokens appended without attention since the last eviction or
// score-changing attention can be dropped, and the kept tokens (positions) then equal a
// cache that never saw them; nothing older can.
TEST(Eviction, TruncateDropsOnlyWhatWasNeitherEvictedNorAttended) {
  const int kv_heads = 2, d = 8, steps = 30;
  std::mt19937 rng(9);
  const RowMatrix keys = random_rows(steps, kv_heads * d, rng), values = position_values(steps, kv_heads * d);
  const RowMatrix queries = random_rows(steps, 2 * kv_heads * d, rng);
  const CacheShape shape{1, kv_heads, d};
  RowMatrix out(12, 2 * kv_heads * d);
  // H2O: prefill 12 (scored), 4 decode steps, 3 appended tokens.
  lexico::H2OCache h2o(shape, {Budget::count(20)}), reference(shape, {Budget::count(20)});
  for (lexico::H2OCache* cache : {&h2o, &reference}) {
    cache->prefill(0, keys.topRows(12), values.topRows(12), queries.topRows(12), out);
    EXPECT_EQ(cache->truncate_floor(0), 12);
    for (int t = 12; t < 16; ++t) decode(*cache, 0, keys, values, queries, t);
  }
  h2o.append(0, 16, keys.middleRows(16, 3), values.middleRows(16, 3));
  EXPECT_EQ(h2o.truncate_floor(0), 16);
  EXPECT_THROW(h2o.truncate(15), lexico::error);
  h2o.truncate(16);
  for (int t = 16; t < steps; ++t) {
    decode(h2o, 0, keys, values, queries, t);
    decode(reference, 0, keys, values, queries, t);
    for (int h = 0; h < kv_heads; ++h) ASSERT_EQ(kept_positions(h2o, 0, h), kept_positions(reference, 0, h)) << t;
  }
  EXPECT_EQ(h2o.bytes().total(), reference.bytes().total());
  EXPECT_EQ(h2o.truncate_floor(0), steps);  // every step attends
  // StreamingLLM: free until the budget fills, then every append evicts.
  lexico::StreamingCache streaming(shape, {Budget::count(10), 2});
  for (int t = 0; t < 10; ++t) streaming.append(0, keys.row(t).data(), values.row(t).data());
  EXPECT_EQ(streaming.truncate_floor(0), 0);
  streaming.truncate(4);
  EXPECT_EQ(kept_positions(streaming, 0, 1), range(0, 4));
  for (int t = 4; t < 12; ++t) streaming.append(0, keys.row(t).data(), values.row(t).data());
  EXPECT_EQ(streaming.truncate_floor(0), 12);
  EXPECT_THROW(streaming.truncate(11), lexico::error);
  // SnapKV: the selecting prefill is the floor; decode tokens after it can go.
  lexico::SnapKVCache snap(shape, {Budget::count(8), 4, 3});
  snap.prefill(0, keys.topRows(12), values.topRows(12), queries.topRows(12), out);
  const Positions selected = kept_positions(snap, 0, 0);
  for (int t = 12; t < 15; ++t) decode(snap, 0, keys, values, queries, t);
  EXPECT_EQ(snap.truncate_floor(0), 12);
  snap.truncate(12);
  EXPECT_EQ(kept_positions(snap, 0, 0), selected);
  EXPECT_EQ(snap.bytes().total(), kept_bytes(snap));
}

TEST(Eviction, BudgetParsing) {
  EXPECT_EQ(Budget::parse("256").tokens, 256);
  EXPECT_EQ(Budget::parse("1").tokens, 1);
  EXPECT_DOUBLE_EQ(Budget::parse("0.2").fraction, 0.2);
  EXPECT_DOUBLE_EQ(Budget::parse("1.0").fraction, 1.0);
  EXPECT_EQ(Budget::share(0.2, 1024).resolve(10), 205);
  EXPECT_EQ(Budget::share(0.2).resolve(10), 2);
  EXPECT_EQ(Budget::share(0.01).resolve(10), 1);
  for (const char* bad : {"0", "-3", "1.5", "abc", "", "0.2x", "nan", "inf", "12 "})
    EXPECT_THROW(Budget::parse(bad), lexico::error) << bad;
}

TEST(Eviction, BadOptionsRaise) {
  const CacheShape shape{1, 2, 8};
  EXPECT_THROW(lexico::StreamingCache(shape, {Budget{}, 4}), lexico::error);              // no budget
  EXPECT_THROW(lexico::StreamingCache(shape, {Budget::count(4), 4}), lexico::error);      // sinks fill it
  EXPECT_THROW(lexico::H2OCache(shape, {Budget::count(8), 9}), lexico::error);            // window > budget
  EXPECT_THROW(lexico::SnapKVCache(shape, {Budget::count(16), 32}), lexico::error);       // window > budget
  EXPECT_THROW(lexico::SnapKVCache(shape, {Budget::count(64), 8, 4}), lexico::error);     // even kernel
  EXPECT_THROW(lexico::SnapKVCache(shape, {Budget::share(0.2, 100)}), lexico::error);     // context
  EXPECT_THROW(Budget::share(0.2, -1), lexico::error);
  EXPECT_THROW(Budget::count(0), lexico::error);
  lexico::PyramidKVOptions zero;
  zero.budget = Budget::count(64);
  zero.beta = 0;
  EXPECT_THROW(lexico::PyramidKVCache(shape, zero), lexico::error);
  lexico::H2OCache h2o(shape, {Budget::count(8)});
  std::vector<float> bad(16, 1.0f);
  bad[0] = std::nanf("");
  EXPECT_THROW(h2o.append(0, bad.data(), bad.data()), lexico::error);
  EXPECT_EQ(h2o.kept(0), 0);
  bad[0] = 7e4f;  // beyond fp16, where kept tokens are stored
  EXPECT_THROW(h2o.append(0, bad.data(), bad.data()), lexico::error);
  EXPECT_EQ(h2o.kept(0), 0);
  EXPECT_EQ(h2o.seen(0), 0);
}

}  // namespace
