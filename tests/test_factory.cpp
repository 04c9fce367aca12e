// CacheOptions parsing and typed getters, make_cache for every name, rejected keys and
// values, the help text, and registering a new cache type.
#include <lexico/cache/factory.hpp>
#include <lexico/model/llama.hpp>

#include <unistd.h>

#include <filesystem>
#include <functional>
#include <map>
#include <random>

#include <gtest/gtest.h>

#include "cache_test_util.hpp"
#include "factory_test_util.hpp"

namespace {

using lexico_test::minimal;
using lexico_test::random_dictionary_dir;

using lexico::CacheOptions;
using lexico::RowMatrix;

// Expects `f` to raise lexico::error with a message that mentions every part.
template <typename F>
void expect_error_mentioning(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "no lexico::error raised";
  } catch (const lexico::error& e) {
    for (const char* part : parts) EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

TEST(CacheOptions, ParsesKeyValueLists) {
  const CacheOptions o = CacheOptions::parse(" bits=4, group = 64 ,residual=32");
  EXPECT_EQ(o.values().size(), 3u);
  EXPECT_EQ(o.get("group"), "64");
  EXPECT_EQ(o.get_int("bits"), 4);
  EXPECT_EQ(o.to_string(), "bits=4,group=64,residual=32");
  EXPECT_EQ(CacheOptions::parse(o.to_string()).values(), o.values());
  EXPECT_TRUE(CacheOptions::parse("").values().empty());
  EXPECT_TRUE(CacheOptions::parse("  ").values().empty());
  EXPECT_EQ(CacheOptions({{"budget", "0.2"}}).get_number("budget"), 0.2);
  for (const char* bad : {"bits", "=2", "bits=", "a=1,a=2", "a=1,", ",a=1", "a=1,,b=2"})
    EXPECT_THROW(CacheOptions::parse(bad), lexico::error) << bad;
}

TEST(CacheOptions, TypedGettersRejectMalformedValues) {
  const CacheOptions o = CacheOptions::parse("i=12,f=2.5,w=abc,n=nan,big=1e400,neg=-3,plus=+3,pad=4x");
  EXPECT_EQ(o.get_integer("i"), 12);
  EXPECT_EQ(o.get_number("f"), 2.5);
  EXPECT_EQ(o.get_number("i"), 12.0);
  EXPECT_EQ(o.get_int("neg"), -3);
  for (const char* key : {"f", "w", "n", "big", "plus", "pad"}) EXPECT_THROW(o.get_int(key), lexico::error) << key;
  for (const char* key : {"w", "n", "big", "pad"}) EXPECT_THROW(o.get_number(key), lexico::error) << key;
  EXPECT_THROW(o.get_int("i", 0, 10), lexico::error);   // out of range
  EXPECT_THROW(o.get("missing"), lexico::error);
  EXPECT_EQ(o.get_choice("w", {"xyz", "abc"}), "abc");
  expect_error_mentioning([&] { o.get_choice("w", {"max", "avg"}); }, {"'w'", "max|avg", "'abc'"});
}

TEST(CacheOptions, IntegerListsSplitOnColons) {
  const CacheOptions o = CacheOptions::parse("one=7,three=4:8:12,gap=4::8,tail=4:,high=4:300,word=4:x");
  EXPECT_EQ(o.get_int_list("one"), std::vector<int>({7}));
  EXPECT_EQ(o.get_int_list("three", 1, 255), std::vector<int>({4, 8, 12}));
  for (const char* key : {"gap", "tail", "word"}) EXPECT_THROW(o.get_int_list(key), lexico::error) << key;
  expect_error_mentioning([&] { o.get_int_list("high", 1, 255); }, {"'high'", "[1, 255]", "item '300'"});
}

TEST(Factory, MakesEveryCacheByName) {
  const std::vector<std::string> expected = {"dense", "fp8",  "h2o",    "kivi",      "lexico", "pyramidkv",
                                             "q4_0",  "q8_0", "snapkv", "streaming", "tova"};
  for (const auto& name : expected) EXPECT_TRUE(lexico::cache_type(name).make) << name;
  const int q_heads = 8, kv_heads = 2, d = 32, tokens = 24;
  std::mt19937 rng(1);
  const RowMatrix keys = lexico_test::random_rows(tokens, kv_heads * d, rng);
  const RowMatrix queries = lexico_test::random_rows(tokens, q_heads * d, rng);
  for (const auto& name : lexico::cache_names()) {
    auto cache = lexico::make_cache(name, {2, kv_heads, d}, minimal(name, {2, kv_heads, d}));
    EXPECT_EQ(cache->name(), name);
    RowMatrix out(tokens - 1, q_heads * d), step(q_heads, d);
    cache->prefill(1, keys.topRows(tokens - 1), keys.topRows(tokens - 1), queries.topRows(tokens - 1), out);
    cache->decode(1, keys.row(tokens - 1).data(), keys.row(tokens - 1).data(),
                  lexico_test::query_heads(queries, tokens - 1, d), step);
    EXPECT_TRUE(out.allFinite() && step.allFinite()) << name;
    EXPECT_GT(cache->kv_size_fraction(), 0.0) << name;
    EXPECT_LE(cache->kv_size_fraction(), 2.0) << name;
  }
}

TEST(Factory, OptionsReachTheCaches) {
  const lexico::CacheShape shape{1, 2, 32};
  EXPECT_EQ(lexico::make_cache("kivi", shape, CacheOptions::parse("bits=4,residual=64"))->parameters(),
            "bits=4 group=32 residual=64");
  EXPECT_EQ(lexico::make_cache("kivi", shape)->parameters(), "bits=2 group=32 residual=128");
  EXPECT_EQ(lexico::make_cache("dense", shape, CacheOptions::parse("dtype=bf16"))->parameters(), "dtype=bf16");
  EXPECT_EQ(lexico::make_cache("dense", shape)->parameters(), "dtype=fp32");
  EXPECT_EQ(lexico::make_cache("streaming", shape, CacheOptions::parse("budget=0.2,context=1024"))->parameters(),
            "budget=0.2 context=1024 sinks=4");
  EXPECT_EQ(lexico::make_cache("h2o", shape, CacheOptions::parse("budget=64,scope=layer"))->parameters(),
            "budget=64 window=half scope=layer");
  EXPECT_EQ(lexico::make_cache("h2o", shape, CacheOptions::parse("budget=64,window=8"))->parameters(),
            "budget=64 window=8");
  EXPECT_EQ(lexico::make_cache("snapkv", shape, CacheOptions::parse("budget=128,pool=avg,kernel=5"))->parameters(),
            "budget=128 window=32 kernel=5 pool=avg");
  EXPECT_EQ(lexico::make_cache("pyramidkv", shape, CacheOptions::parse("budget=128,beta=10"))->parameters(),
            "budget=128 window=32 kernel=7 pool=max beta=10");
  EXPECT_EQ(lexico::make_cache("tova", shape, CacheOptions::parse("budget=100"))->parameters(), "budget=100");
  EXPECT_EQ(lexico::make_cache("fp8", shape, CacheOptions::parse("k_headroom=2,v_headroom=2"))->parameters(),
            "scale=tensor headroom=2");
  EXPECT_EQ(lexico::make_cache("q4_0", shape)->parameters(), "bits=4 block=32");
  // A fixed context turns a fraction into a token count: round(0.25 * 40) = 10 kept.
  auto tova = lexico::make_cache("tova", {1, 1, 32}, CacheOptions::parse("budget=0.25,context=40"));
  std::vector<float> token(32, 1.0f);
  RowMatrix q = RowMatrix::Ones(1, 32), out(1, 32);
  for (int t = 0; t < 40; ++t) tova->decode(0, token.data(), token.data(), q, out);
  EXPECT_DOUBLE_EQ(tova->kv_size_fraction(), 0.25);
}

TEST(Factory, EveryDocumentedDefaultIsAccepted) {
  for (const auto& name : lexico::cache_names()) {
    for (const auto& info : lexico::cache_type(name).options) {
      if (info.fallback.empty()) continue;
      CacheOptions options = minimal(name, {1, 2, 64});
      options.set(info.key, info.fallback);
      EXPECT_NO_THROW(lexico::make_cache(name, {1, 2, 64}, options)) << name << " " << info.key;
    }
  }
}

TEST(Factory, UnknownNamesKeysAndBadValuesRaise) {
  const lexico::CacheShape shape{1, 2, 32};
  expect_error_mentioning([&] { lexico::make_cache("kivi", shape, CacheOptions::parse("bit=4")); },
                          {"'bit'", "bits, group, residual"});
  expect_error_mentioning([&] { lexico::make_cache("q8_0", shape, CacheOptions::parse("bits=8")); },
                          {"'bits'", "rotate"});
  expect_error_mentioning([&] { lexico::make_cache("kiwi", shape); }, {"'kiwi'", "kivi"});
  expect_error_mentioning([&] { lexico::make_cache("h2o", shape); }, {"'budget'", "required"});
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"q8_0", "bits=8"},           {"kivi", "bits=3"},          {"kivi", "group=abc"},
      {"kivi", "residual=100"},     {"dense", "dtype=fp64"},     {"fp8", "k_headroom=0.5"},
      {"fp8", "scale=block"},       {"q4_0", "rotate=1"},
      {"streaming", ""},            {"streaming", "budget=abc"}, {"streaming", "budget=64,context=100"},
      {"h2o", "budget=0.2,context=0"}, {"h2o", "budget=16,window=32"}, {"h2o", "budget=16,scope=group"},
      {"snapkv", "budget=0.2,context=100"}, {"snapkv", "budget=64,kernel=4"}, {"snapkv", "budget=64,pool=min"},
      {"pyramidkv", "budget=64,beta=0"},    {"tova", "budget=0"},            {"tova", "budget=64,sinks=2"},
      {"lexico", "s=8"},                    {"lexico", "dict=/nonexistent/dir"}};
  for (const auto& [name, options] : bad)
    EXPECT_THROW(lexico::make_cache(name, shape, CacheOptions::parse(options)), lexico::error)
        << name << " " << options;
}

// A set trained on keys before RoPE makes a cache that codes keys before RoPE with the
// manifest's rotation; a set that does not say which rotation is refused.
TEST(Factory, KeysBeforeRopeFollowTheManifest) {
  const lexico::CacheShape shape{1, 2, 32};
  const std::string before = random_dictionary_dir(
      shape, {{"keys", "before_rope"}, {"rope_theta", "10000"}, {"rope_style", "interleaved"}}, "_before");
  EXPECT_NE(lexico::make_cache("lexico", shape, CacheOptions({{"dict", before}}))->parameters().find("keys=before_rope"),
            std::string::npos);
  const std::string after = random_dictionary_dir(shape, {{"keys", "after_rope"}}, "_after");
  EXPECT_EQ(lexico::make_cache("lexico", shape, CacheOptions({{"dict", after}}))->parameters().find("keys="),
            std::string::npos);
  const std::vector<std::pair<std::map<std::string, std::string>, const char*>> refused = {
      {{{"keys", "before_rope"}, {"rope_style", "rotate_half"}}, "rope_theta"},
      {{{"keys", "before_rope"}, {"rope_theta", "1e4x"}, {"rope_style", "rotate_half"}}, "'1e4x'"},
      {{{"keys", "before_rope"}, {"rope_theta", "10000"}, {"rope_style", "sideways"}}, "'sideways'"}};
  for (std::size_t i = 0; i < refused.size(); ++i) {
    const std::string dir = random_dictionary_dir(shape, refused[i].first, "_refused" + std::to_string(i));
    expect_error_mentioning([&] { lexico::make_cache("lexico", shape, CacheOptions({{"dict", dir}})); },
                            {refused[i].second});
  }
  // A key form that is neither is refused when the set is written.
  expect_error_mentioning([&] { random_dictionary_dir(shape, {{"keys", "sideways"}}, "_sideways"); },
                          {"keys 'sideways'"});
}

// A set trained for another model is refused, naming both sides: layer count, head_dim,
// and (keys before RoPE) a RoPE that is not the model's.
TEST(Factory, SetsOfAnotherModelAreRefused) {
  const lexico::CacheShape shape{2, 2, 32};
  const std::string dir = random_dictionary_dir(shape, {}, "_mismatch");
  expect_error_mentioning([&] { lexico::make_cache("lexico", {3, 2, 32}, CacheOptions({{"dict", dir}})); },
                          {"'random'", "2 layers of head_dim 32", "3 layers of head_dim 32"});
  expect_error_mentioning([&] { lexico::make_cache("lexico", {2, 2, 64}, CacheOptions({{"dict", dir}})); },
                          {"2 layers of head_dim 32", "2 layers of head_dim 64"});

  // stories260K: 5 layers, head_dim 8, interleaved RoPE with theta 10000.
  const lexico::LlamaModel model = lexico::LlamaModel::load(LEXICO_REPO_DATA "/stories260k/stories260K.bin");
  const lexico::CacheShape model_shape = model.config().cache_shape();
  const std::string wrong_theta = random_dictionary_dir(
      model_shape, {{"keys", "before_rope"}, {"rope_theta", "500000"}, {"rope_style", "interleaved"}}, "_theta");
  const std::string wrong_style = random_dictionary_dir(
      model_shape, {{"keys", "before_rope"}, {"rope_theta", "10000"}, {"rope_style", "rotate_half"}}, "_style");
  const auto prefill_with = [&](const std::string& set) {
    auto cache = lexico::make_cache("lexico", model_shape, CacheOptions({{"dict", set}}));
    lexico::LlamaRunner runner(model);
    runner.prefill({1, 2, 3}, *cache);
  };
  expect_error_mentioning([&] { prefill_with(wrong_theta); }, {"theta 500000", "theta 10000"});
  expect_error_mentioning([&] { prefill_with(wrong_style); }, {"rotate_half", "interleaved"});
}

// The parameters() of a Lexico cache made from an option string over random dictionaries.
std::function<std::string(const std::string&)> lexico_parameters(const std::string& tag) {
  const lexico::CacheShape shape{1, 2, 32};
  const std::string dir = random_dictionary_dir(shape, {}, tag);
  return [shape, dir](const std::string& options) {
    return lexico::make_cache("lexico", shape, CacheOptions::parse("dict=" + dir + "," + options))->parameters();
  };
}

TEST(Factory, LexicoPoolReachesTheLongTermCodesOnlyWhenAsked) {
  const auto make = lexico_parameters("_pool");
  EXPECT_NE(make("pool=2,recent=8,rs=6,pool_recent=0").find("atom_pool=2 pool_recent=0"), std::string::npos);
  EXPECT_EQ(make("pool=2,recent=8,rs=6").find("pool_recent"), std::string::npos);  // default: every tier pools
  expect_error_mentioning([&] { make("pool=2,pool_recent=2"); }, {"pool_recent"});
}

TEST(Factory, LexicoRecentTierFormats) {
  const auto make = lexico_parameters("_tier_format");
  EXPECT_NE(make("recent=16,recent_format=q4_0").find("tier=16:q4_0"), std::string::npos);
  EXPECT_NE(make("recent=16,recent_format=q8_0/q4_0").find("tier=16:q8_0/q4_0"), std::string::npos);
  EXPECT_NE(make("recent=16,rs=6").find("tier=16:6:6"), std::string::npos);
  expect_error_mentioning([&] { make("recent=16,recent_format=q5_0"); }, {"q5_0"});
  expect_error_mentioning([&] { make("recent=16,recent_format=codes/q4_0"); }, {"both codes or both quantized"});
}

TEST(Factory, LexicoResidualBits) {
  const auto make = lexico_parameters("_residual");
  EXPECT_NE(make("residual=2").find("residual=2/2"), std::string::npos);
  EXPECT_NE(make("residual=2,residual_v=1").find("residual=2/1"), std::string::npos);
  EXPECT_NE(make("residual_k=4").find("residual=4/0"), std::string::npos);
  EXPECT_EQ(make("s=4").find("residual"), std::string::npos);
  expect_error_mentioning([&] { make("residual=3"); }, {"residual bits", "0, 1, 2 or 4"});
  expect_error_mentioning([&] { make("residual_v=5"); }, {"residual_v"});
}

TEST(Factory, LexicoLayerSparsityGivesEachLayerItsAtoms) {
  const lexico::CacheShape shape{3, 2, 32};
  const std::string dir = random_dictionary_dir(shape, {}, "_layers");
  auto make = [&](const std::string& options) {
    return lexico::make_cache("lexico", shape, CacheOptions::parse("dict=" + dir + "," + options));
  };
  EXPECT_NE(make("layer_s=2:4:6")->parameters().find(" L0=2/2 L1=4/4 L2=6/6"), std::string::npos);
  EXPECT_EQ(make("s=4")->parameters().find(" L0="), std::string::npos);
  // Each layer's codes take its own atoms: one coded token per layer costs what it costs
  // in a cache of that sparsity everywhere.
  auto payload = [&](const std::string& options) {
    auto cache = make(options + ",buffer=0,flush=1");
    const Eigen::VectorXf key = Eigen::VectorXf::Random(shape.kv_width()), value = Eigen::VectorXf::Random(shape.kv_width());
    for (int l = 0; l < shape.layers; ++l) cache->append(l, key.data(), value.data());
    return cache->bytes().payload;
  };
  EXPECT_EQ(3 * payload("layer_s=2:4:6"), payload("s=2") + payload("s=4") + payload("s=6"));
  EXPECT_LT(payload("layer_s=2:2:2"), payload("layer_s=2:4:6"));
  expect_error_mentioning([&] { make("layer_s=2:4"); }, {"layer_s", "2 sparsities", "3 layers"});
  expect_error_mentioning([&] { make("layer_s=2:0:4"); }, {"layer_s", "item '0'"});
  // kv_shift moves atoms from values to keys in every layer, and the bytes stay.
  EXPECT_NE(make("layer_s=2:4:6,kv_shift=1")->parameters().find(" L0=3/1 L1=5/3 L2=7/5"), std::string::npos);
  EXPECT_NE(make("layer_s=2:4:6,kv_shift=-1")->parameters().find(" L0=1/3 L1=3/5 L2=5/7"), std::string::npos);
  EXPECT_NE(make("s=4,kv_shift=2")->parameters().find("sk=6 sv=2"), std::string::npos);
  // (up to the packed indices' rounding to whole bytes: one byte per code row at most)
  EXPECT_NEAR(payload("layer_s=2:4:6,kv_shift=1"), payload("layer_s=2:4:6"), 2.0 * shape.layers * shape.kv_heads);
  expect_error_mentioning([&] { make("layer_s=2:4:6,kv_shift=2"); }, {"kv_shift=2", "layer 0", "0 value atoms"});
  expect_error_mentioning([&] { make("s=4,kv_shift=-4"); }, {"kv_shift=-4", "0 key and 8 value atoms"});
  // layer_sk / layer_sv set one part per layer over s or layer_s; kv_shift applies after them.
  EXPECT_NE(make("layer_s=2:4:6,layer_sk=3:3:3")->parameters().find(" L0=3/2 L1=3/4 L2=3/6"), std::string::npos);
  EXPECT_NE(make("s=4,layer_sv=1:2:5")->parameters().find(" L0=4/1 L1=4/2 L2=4/5"), std::string::npos);
  EXPECT_NE(make("s=4,layer_sk=5:5:5,layer_sv=3:3:3,kv_shift=-1")->parameters().find(" L0=4/4 L1=4/4 L2=4/4"),
            std::string::npos);
  EXPECT_EQ(3 * payload("layer_sk=2:4:6,layer_sv=2:4:6"), payload("s=2") + payload("s=4") + payload("s=6"));
  expect_error_mentioning([&] { make("s=4,layer_sv=1:2"); }, {"layer_sv", "2 sparsities", "3 layers"});
  expect_error_mentioning([&] { make("s=4,layer_sk=1:256:2"); }, {"layer_sk", "256"});
}

TEST(Factory, HelpListsEveryCacheAndOption) {
  const std::string help = lexico::cache_help();
  for (const auto& name : lexico::cache_names()) {
    EXPECT_NE(help.find("  " + name + " "), std::string::npos) << name;
    for (const auto& info : lexico::cache_type(name).options) EXPECT_NE(help.find(info.key), std::string::npos);
  }
  EXPECT_NE(help.find("residual=128"), std::string::npos);
}

TEST(Factory, RegisteringACacheIsOneEntry) {
  lexico::register_cache({"dense-half", "dense in fp16", {},
                          [](lexico::CacheShape shape, const CacheOptions&) -> std::unique_ptr<lexico::KVCache> {
                            return std::make_unique<lexico::DenseCache<Eigen::half>>(shape);
                          }});
  auto cache = lexico::make_cache("dense-half", {1, 1, 8});
  EXPECT_EQ(cache->parameters(), "dtype=fp16");
  EXPECT_NE(lexico::cache_help().find("dense-half"), std::string::npos);
  EXPECT_THROW(lexico::register_cache(lexico::cache_type("dense-half")), lexico::error);  // taken
  EXPECT_THROW(lexico::register_cache({"nothing", "", {}, nullptr}), lexico::error);
}

}  // namespace
