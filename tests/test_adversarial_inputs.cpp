// No NaN from finite input: every cache type, in several settings, fed keys and values
// that are legal but hostile to the arithmetic inside (zeros, constants, the edges of
// fp16's range, values that underflow, one huge element, groups whose minimum equals
// their maximum) and queries from zero to huge. Each step either attends to finite
// outputs or raises a lexico::error that says why; a NaN or Inf in an output fails.
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cache_test_util.hpp"
#include "factory_test_util.hpp"

namespace {

using lexico::CacheOptions;
using lexico::CacheShape;
using lexico::RowMatrix;

constexpr int layers = 2, kv_heads = 2, q_heads = 4, head_dim = 32;
const CacheShape shape{layers, kv_heads, head_dim};

// Key and value rows for `tokens` tokens, by pattern.
struct Pattern {
  const char* name;
  std::function<float(Eigen::Index token, Eigen::Index i, std::mt19937& rng)> value;
};

std::vector<Pattern> patterns() {
  const float fp16_max = 65504.0f;
  return {
      {"zeros", [](auto, auto, auto&) { return 0.0f; }},
      {"ones", [](auto, auto, auto&) { return 1.0f; }},
      {"fp16_max", [=](auto, auto, auto&) { return fp16_max; }},
      {"alternating_fp16_max", [=](auto t, auto i, auto&) { return (t + i) % 2 ? fp16_max : -fp16_max; }},
      {"underflow", [](auto t, auto i, auto&) { return (t + i) % 2 ? 1e-30f : -1e-30f; }},
      {"denormal", [](auto, auto, auto&) { return std::numeric_limits<float>::denorm_min(); }},
      {"one_huge_element", [=](auto t, auto i, auto&) { return t == 3 && i == 5 ? fp16_max : 0.0f; }},
      // Every channel constant over tokens (KIVI's key groups have minimum == maximum),
      // every token constant over channels (its value groups too).
      {"constant_channels", [](auto, auto i, auto&) { return static_cast<float>(i % 7) - 3.0f; }},
      {"constant_tokens", [](auto t, auto, auto&) { return static_cast<float>(t % 5) * 0.25f; }},
      {"growing", [](auto t, auto, auto&) { return std::ldexp(1.0f, static_cast<int>(t % 16)); }},
      {"normal", [](auto, auto, auto& rng) { return std::normal_distribution<float>(0.0f, 1.0f)(rng); }},
  };
}

RowMatrix rows_of(const Pattern& pattern, Eigen::Index tokens, Eigen::Index width, std::mt19937& rng) {
  RowMatrix m(tokens, width);
  for (Eigen::Index t = 0; t < tokens; ++t)
    for (Eigen::Index i = 0; i < width; ++i) m(t, i) = pattern.value(t, i, rng);
  return m;
}

// Every cache type in the settings whose arithmetic differs.
std::vector<std::pair<std::string, CacheOptions>> settings() {
  std::vector<std::pair<std::string, CacheOptions>> out;
  for (const auto& name : lexico::cache_names()) out.emplace_back(name, lexico_test::minimal(name, shape));
  const std::string dict = lexico_test::random_dictionary_dir(shape);
  out.emplace_back("dense", CacheOptions::parse("dtype=fp16"));
  out.emplace_back("dense", CacheOptions::parse("dtype=bf16"));
  out.emplace_back("kivi", CacheOptions::parse("bits=4,group=32,residual=32"));
  out.emplace_back("kivi", CacheOptions::parse("bits=2,group=32,residual=32"));
  for (const char* lexico : {"buffer=4,flush=2,tol=0", "buffer=4,flush=2,tol=0.999", "buffer=0,flush=1,s=1",
                             "buffer=4,flush=2,recent=4,rs=4", "buffer=4,flush=2,recent=4,recent_format=q8_0/q4_0",
                             "buffer=4,flush=4,pool=2", "buffer=4,flush=2,recent=4,rs=4,residual_k=2,residual_v=1"})
    out.emplace_back("lexico", CacheOptions::parse(std::string("dict=") + dict + "," + lexico));
  out.emplace_back("h2o", CacheOptions::parse("budget=6,scope=layer"));
  out.emplace_back("tova", CacheOptions::parse("budget=6,scope=layer"));
  out.emplace_back("snapkv", CacheOptions::parse("budget=6,window=2,kernel=3"));
  return out;
}

// Runs a prefill and decode steps; returns "" when every output was finite, else what failed.
std::string run(const std::string& name, const CacheOptions& options, const RowMatrix& keys, const RowMatrix& values,
                const RowMatrix& queries, Eigen::Index prompt) {
  auto cache = lexico::make_cache(name, shape, options);
  const std::string label = name + " " + cache->parameters();
  for (int l = 0; l < layers; ++l) {
    RowMatrix out(prompt, queries.cols());
    cache->prefill(l, keys.topRows(prompt), values.topRows(prompt), queries.topRows(prompt), out);
    if (!out.allFinite()) return label + ": prefill output not finite";
    RowMatrix step(q_heads, head_dim);
    for (Eigen::Index t = prompt; t < keys.rows(); ++t) {
      cache->decode(l, keys.row(t).data(), values.row(t).data(), lexico_test::query_heads(queries, t, head_dim), step);
      if (!step.allFinite()) return label + ": decode output not finite at token " + std::to_string(t);
    }
  }
  return "";
}

TEST(AdversarialInputs, EveryCacheAttendsToFiniteOutputs) {
  const Eigen::Index tokens = 40, prompt = 12;
  std::mt19937 rng(3);
  const RowMatrix normal_queries = lexico_test::random_rows(tokens, q_heads * head_dim, rng);
  const std::vector<std::pair<const char*, RowMatrix>> queries = {
      {"zero queries", RowMatrix::Zero(tokens, q_heads * head_dim)},
      {"normal queries", normal_queries},
      {"large queries", normal_queries * 1e4f}};
  int runs = 0;
  for (const auto& [name, options] : settings())
    for (const auto& pattern : patterns()) {
      const RowMatrix keys = rows_of(pattern, tokens, kv_heads * head_dim, rng);
      const RowMatrix values = rows_of(pattern, tokens, kv_heads * head_dim, rng);
      for (const auto& [query_name, q] : queries) {
        std::string failure;
        try {
          failure = run(name, options, keys, values, q, prompt);
        } catch (const lexico::error& e) {
          failure = std::string("raised on legal input: ") + e.what();
        }
        EXPECT_EQ(failure, "") << name << " with " << pattern.name << " keys and values, " << query_name;
        ++runs;
      }
    }
  std::cout << runs << " (cache, input, query) runs\n";
}

// Scores that overflow fp32 (finite queries and keys whose product does not fit) must
// not turn into NaN through the softmax: the output stays finite or the step is refused.
TEST(AdversarialInputs, OverflowingScoresAreRefusedOrFinite) {
  const Eigen::Index tokens = 20, prompt = 8;
  std::mt19937 rng(5);
  const RowMatrix keys = RowMatrix::Constant(tokens, kv_heads * head_dim, 65504.0f);
  const RowMatrix queries = RowMatrix::Constant(tokens, q_heads * head_dim, 1e36f);
  for (const auto& [name, options] : settings()) {
    std::string failure;
    try {
      failure = run(name, options, keys, keys, queries, prompt);
    } catch (const lexico::error& e) {
      EXPECT_NE(std::string(e.what()).find("score"), std::string::npos) << name << ": " << e.what();
    }
    EXPECT_EQ(failure, "") << name;
  }
}

TEST(AdversarialInputs, AnEmptyLayerAttendsToZeroOrRefuses) {
  const RowMatrix queries = RowMatrix::Ones(q_heads, head_dim);
  for (const auto& [name, options] : settings()) {
    auto cache = lexico::make_cache(name, shape, options);
    RowMatrix out = RowMatrix::Constant(q_heads, head_dim, std::numeric_limits<float>::quiet_NaN());
    try {
      cache->attend(1, queries, out);
      EXPECT_TRUE(out.isZero()) << name << ": attention over no tokens";
    } catch (const lexico::error& e) {
      EXPECT_NE(std::string(e.what()).find("no tokens"), std::string::npos) << name << ": " << e.what();
    }
  }
}

}  // namespace
