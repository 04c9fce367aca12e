// Golden tests of the Llama runner: logits, NLL and K/V against outputs computed
// outside this project (llama2.c run.c, PyTorch), through the full-block prefill path
// and the token-by-token decode path, with the dense cache.

#include <gtest/gtest.h>

#include "test_util.hpp"

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <lexico/cache/dense.hpp>
#include <lexico/cache/factory.hpp>
#include <lexico/base/files.hpp>
#include <lexico/base/json.hpp>
#include <lexico/model/safetensors.hpp>
#include <lexico/model/llama.hpp>
#include <lexico/model/tokenizer.hpp>

namespace {

namespace fs = std::filesystem;
using lexico::DenseCache;
using lexico::LlamaModel;
using lexico::LlamaRunner;
using lexico::LlamaWeights;
using lexico::RowMatrix;

template <typename T>
std::vector<T> read_raw(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  in.seekg(0, std::ios::end);
  std::vector<T> out(static_cast<std::size_t>(in.tellg()) / sizeof(T));
  in.seekg(0);
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size() * sizeof(T)));
  return out;
}

// NLL of `next` under a row of logits (log-sum-exp in double).
double nll(const float* logits, int vocab, int next) {
  double top = logits[0];
  for (int i = 1; i < vocab; ++i) top = std::max(top, static_cast<double>(logits[i]));
  double sum = 0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(logits[i] - top);
  return std::log(sum) + top - logits[next];
}

// Records what the runner feeds the cache: per layer, the rows of keys and values.
struct KVRecorder {
  std::vector<std::vector<float>> keys, values;
  explicit KVRecorder(LlamaRunner& runner, int layers) : keys(layers), values(layers) {
    runner.set_kv_observer([this](int layer, lexico::ConstRowsRef, lexico::ConstRowsRef k, lexico::ConstRowsRef v) {
      for (Eigen::Index t = 0; t < k.rows(); ++t) {
        keys[layer].insert(keys[layer].end(), k.row(t).data(), k.row(t).data() + k.cols());
        values[layer].insert(values[layer].end(), v.row(t).data(), v.row(t).data() + v.cols());
      }
    });
  }
};

// Max |a - b| over the first n elements.
float max_diff(const float* a, const float* b, std::size_t n) {
  float m = 0;
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

// The two tiny models' golden folders: tokens.i32, logits.f32 (T x vocab),
// k_cache.f32 / v_cache.f32 [layer][position][kv_head][head_dim].
void check_tiny_model(const std::string& model_path, const std::string& golden, double expected_nll) {
  const LlamaModel model = LlamaModel::load(model_path);
  const auto& c = model.config();
  const std::vector<int> tokens = read_raw<std::int32_t>(golden + "/tokens.i32");
  const std::vector<float> logits = read_raw<float>(golden + "/logits.f32");
  const std::vector<float> k_cache = read_raw<float>(golden + "/k_cache.f32");
  const std::vector<float> v_cache = read_raw<float>(golden + "/v_cache.f32");
  const std::size_t T = tokens.size(), V = static_cast<std::size_t>(c.vocab), W = static_cast<std::size_t>(c.kv_width());
  ASSERT_EQ(logits.size(), T * V);
  ASSERT_EQ(k_cache.size(), static_cast<std::size_t>(c.layers) * T * W);

  // Full-block prefill.
  LlamaRunner runner(model);
  KVRecorder kv(runner, c.layers);
  DenseCache<float> cache(c.cache_shape());
  const RowMatrix out = runner.prefill(tokens, cache);
  ASSERT_EQ(static_cast<std::size_t>(out.rows()), T);
  ASSERT_EQ(static_cast<std::size_t>(out.cols()), V);
  EXPECT_EQ(cache.seen(0), static_cast<std::int64_t>(T));
  const float logit_diff = max_diff(out.data(), logits.data(), T * V);
  float k_diff = 0, v_diff = 0;
  for (int l = 0; l < c.layers; ++l) {
    ASSERT_EQ(kv.keys[l].size(), T * W);
    k_diff = std::max(k_diff, max_diff(kv.keys[l].data(), k_cache.data() + l * T * W, T * W));
    v_diff = std::max(v_diff, max_diff(kv.values[l].data(), v_cache.data() + l * T * W, T * W));
  }
  double mean_nll = 0, golden_nll = 0;
  for (std::size_t t = 0; t + 1 < T; ++t) {
    mean_nll += nll(out.row(t).data(), c.vocab, tokens[t + 1]);
    golden_nll += nll(logits.data() + t * V, c.vocab, tokens[t + 1]);
  }
  mean_nll /= static_cast<double>(T - 1);
  golden_nll /= static_cast<double>(T - 1);
  std::printf("  %s prefill: max |logit diff| %.3g, max |K diff| %.3g, max |V diff| %.3g, NLL %.5f (golden %.5f)\n",
              model_path.c_str(), logit_diff, k_diff, v_diff, mean_nll, golden_nll);
  EXPECT_LE(logit_diff, 1e-3f);
  EXPECT_LE(k_diff, 1e-4f);
  EXPECT_LE(v_diff, 1e-4f);
  EXPECT_NEAR(mean_nll, expected_nll, 1e-4);
  EXPECT_NEAR(mean_nll, golden_nll, 1e-5);

  // Token by token through decode(), after a prefilled prefix (positions continue).
  const std::size_t prefix = 100;
  DenseCache<float> stepped(c.cache_shape());
  KVRecorder kv2(runner, c.layers);
  const RowMatrix head = runner.prefill(std::vector<int>(tokens.begin(), tokens.begin() + prefix), stepped);
  float decode_diff = max_diff(head.data(), logits.data(), prefix * V);
  for (std::size_t t = prefix; t < T; ++t) {
    const auto step = runner.decode(tokens[t], stepped);
    decode_diff = std::max(decode_diff, max_diff(step.data(), logits.data() + t * V, V));
  }
  float kv_decode_diff = 0;
  for (int l = 0; l < c.layers; ++l) {
    kv_decode_diff = std::max(kv_decode_diff, max_diff(kv2.keys[l].data(), k_cache.data() + l * T * W, T * W));
    kv_decode_diff = std::max(kv_decode_diff, max_diff(kv2.values[l].data(), v_cache.data() + l * T * W, T * W));
  }
  std::printf("  %s decode: max |logit diff| %.3g, max |K/V diff| %.3g\n", model_path.c_str(), decode_diff,
              kv_decode_diff);
  EXPECT_LE(decode_diff, 1e-3f);
  EXPECT_LE(kv_decode_diff, 1e-4f);
}

TEST(LlamaGolden, Stories260K) {
  const std::string dir = LEXICO_REPO_DATA "/stories260k";
  check_tiny_model(dir + "/stories260K.bin", dir + "/golden", 1.3112);
}

TEST(LlamaGolden, TinyStories656K) {
  const std::string dir = LEXICO_REPO_DATA "/tinystories-656k";
  check_tiny_model(dir, dir + "/golden", 3.4272);
}

// The proxies' golden/dev_window.safetensors: tokens (1024), nll (1023), argmax,
// logits_first8, logits_last, k.{l} / v.{l} [kv_heads, 128, head_dim].
void check_proxy(const std::string& name) {
  const std::string dir = std::string(LEXICO_SHARED_DATA) + "/" + name;
  if (!fs::exists(dir)) GTEST_SKIP() << "shared data not found at " << dir;
  const LlamaModel model = LlamaModel::load(dir);
  const auto& c = model.config();
  const lexico::SafetensorsFile golden(dir + "/golden/dev_window.safetensors");
  const std::vector<int> tokens = golden.read_i32("tokens");
  const std::vector<int> argmax = golden.read_i32("argmax");
  const std::vector<float> nll_golden = golden.read_f32("nll");
  const std::vector<float> first8 = golden.read_f32("logits_first8");
  const std::vector<float> last = golden.read_f32("logits_last");
  const double summary_nll =
      lexico::json::parse_file(dir + "/golden/summary.json").at("golden_window_mean_nll_fp32").as_double();
  const std::size_t T = tokens.size(), V = static_cast<std::size_t>(c.vocab);
  const std::size_t W = static_cast<std::size_t>(c.kv_width()), D = static_cast<std::size_t>(c.head_dim);
  const std::size_t kv_tokens = 128;

  // Compares recorded K/V rows [t][kv_head][d] with golden [kv_head][t][d], t < n.
  auto kv_diff = [&](const std::vector<std::vector<float>>& rows, const char* prefix, std::size_t n) {
    float m = 0;
    for (int l = 0; l < c.layers; ++l) {
      const std::vector<float> g = golden.read_f32(prefix + std::to_string(l));
      for (std::size_t h = 0; h < static_cast<std::size_t>(c.kv_heads); ++h)
        for (std::size_t t = 0; t < n; ++t)
          m = std::max(m, max_diff(rows[l].data() + t * W + h * D, g.data() + (h * kv_tokens + t) * D, D));
    }
    return m;
  };

  LlamaRunner runner(model);
  {
    KVRecorder kv(runner, c.layers);
    DenseCache<float> cache(c.cache_shape());
    const RowMatrix out = runner.prefill(tokens, cache);
    const float logit_diff = std::max(max_diff(out.data(), first8.data(), 8 * V),
                                      max_diff(out.row(static_cast<Eigen::Index>(T) - 1).data(), last.data(), V));
    double mean_nll = 0;
    float nll_diff = 0;
    int argmax_mismatch = 0;
    for (std::size_t t = 0; t < T; ++t) {
      Eigen::Index best;
      out.row(static_cast<Eigen::Index>(t)).maxCoeff(&best);
      argmax_mismatch += best != argmax[t];
      if (t + 1 == T) break;
      const double x = nll(out.row(static_cast<Eigen::Index>(t)).data(), c.vocab, tokens[t + 1]);
      mean_nll += x;
      nll_diff = std::max(nll_diff, static_cast<float>(std::fabs(x - nll_golden[t])));
    }
    mean_nll /= static_cast<double>(T - 1);
    const float k_diff = kv_diff(kv.keys, "k.", kv_tokens), v_diff = kv_diff(kv.values, "v.", kv_tokens);
    std::printf("  %s prefill: max |logit diff| %.3g, max |NLL diff| %.3g, max |K diff| %.3g, max |V diff| %.3g, "
                "NLL %.5f (golden %.5f), argmax mismatches %d\n",
                name.c_str(), logit_diff, nll_diff, k_diff, v_diff, mean_nll, summary_nll, argmax_mismatch);
    EXPECT_LE(logit_diff, 1e-3f);
    EXPECT_LE(nll_diff, 1e-3f);
    EXPECT_LE(k_diff, 1e-4f);
    EXPECT_LE(v_diff, 1e-4f);
    EXPECT_NEAR(mean_nll, summary_nll, 1e-4);
    EXPECT_LE(argmax_mismatch, 2);  // only exact near-ties may flip
  }
  {
    // Token by token from an empty cache over a shorter prefix.
    const std::size_t n = 64;
    KVRecorder kv(runner, c.layers);
    DenseCache<float> cache(c.cache_shape());
    float logit_diff = 0, nll_diff = 0;
    for (std::size_t t = 0; t < n; ++t) {
      const auto logits = runner.decode(tokens[t], cache);
      if (t < 8) logit_diff = std::max(logit_diff, max_diff(logits.data(), first8.data() + t * V, V));
      nll_diff = std::max(nll_diff, static_cast<float>(std::fabs(nll(logits.data(), c.vocab, tokens[t + 1]) - nll_golden[t])));
    }
    const float k_diff = kv_diff(kv.keys, "k.", n), v_diff = kv_diff(kv.values, "v.", n);
    std::printf("  %s decode: max |logit diff| %.3g, max |NLL diff| %.3g, max |K diff| %.3g, max |V diff| %.3g\n",
                name.c_str(), logit_diff, nll_diff, k_diff, v_diff);
    EXPECT_LE(logit_diff, 1e-3f);
    EXPECT_LE(nll_diff, 1e-3f);
    EXPECT_LE(k_diff, 1e-4f);
    EXPECT_LE(v_diff, 1e-4f);
  }
}

// Greedy decoding from BOS alone, token by token through the cache.
std::vector<int> greedy(const LlamaModel& model, int steps) {
  LlamaRunner runner(model);
  DenseCache<float> cache(model.config().cache_shape());
  std::vector<int> out;
  int token = model.config().bos_id;
  for (int i = 0; i < steps; ++i) {
    Eigen::Index next;
    runner.decode(token, cache).maxCoeff(&next);
    token = static_cast<int>(next);
    out.push_back(token);
  }
  return out;
}

std::string trim_newlines(std::string s) {
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

// Keys observed before RoPE are the observed-after-RoPE keys rotated back: equal at
// position 0, and at every position each rotated pair keeps its length. The pairs are
// (i, i + d/2) for the Hugging Face layout and (2i, 2i + 1) for llama2.c's.
void check_keys_before_rope(const LlamaModel& model, bool interleaved) {
  const int d = model.config().head_dim, heads = model.config().kv_heads;
  std::vector<lexico::RowMatrix> seen[2];
  for (int before = 0; before < 2; ++before) {
    lexico::LlamaRunner runner(model);
    runner.set_kv_observer([&](int layer, lexico::ConstRowsRef, lexico::ConstRowsRef keys, lexico::ConstRowsRef) {
      if (layer == 1) seen[before].push_back(keys);
    }, before == 1);
    lexico::DenseCache<float> cache(model.config().cache_shape());
    runner.prefill({1, 20, 300, 40, 500, 60, 70}, cache);
  }
  const lexico::RowMatrix& after = seen[0].front();
  const lexico::RowMatrix& before = seen[1].front();
  EXPECT_LT((after.row(0) - before.row(0)).cwiseAbs().maxCoeff(), 1e-6f);
  EXPECT_GT((after.row(3) - before.row(3)).cwiseAbs().maxCoeff(), 1e-3f);
  for (Eigen::Index t = 0; t < after.rows(); ++t)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < d / 2; ++i) {
        const int a = h * d + (interleaved ? 2 * i : i), b = h * d + (interleaved ? 2 * i + 1 : i + d / 2);
        EXPECT_NEAR(std::hypot(after(t, a), after(t, b)), std::hypot(before(t, a), before(t, b)), 1e-4f)
            << "token " << t << " head " << h << " pair " << i;
      }
}

TEST(LlamaObserver, KeysBeforeRopeRotateIntoTheCachedKeys) {
  check_keys_before_rope(LlamaModel::load(LEXICO_REPO_DATA "/stories260k/stories260K.bin"), true);
  check_keys_before_rope(LlamaModel::load(LEXICO_REPO_DATA "/tinystories-656k"), false);
}

TEST(LlamaGreedy, Stories260KMatchesRunC) {
  const std::string dir = LEXICO_REPO_DATA "/stories260k";
  const LlamaModel model = LlamaModel::load(dir + "/stories260K.bin");
  const std::vector<int> ids = greedy(model, 200);  // run.c -t 0 -n 200: positions 0..199
  const auto tok = lexico::load_tokenizer(dir + "/tok512.bin");
  std::ifstream in(dir + "/golden/greedy_t0_n200.txt");
  const std::string expected((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(tok->decode(ids), trim_newlines(expected));
}

TEST(LlamaGreedy, TinyStories656KMatchesTransformers) {
  const std::string dir = LEXICO_REPO_DATA "/tinystories-656k";
  std::ifstream in(dir + "/golden/greedy_from_bos.ids.txt");
  const std::vector<int> expected{std::istream_iterator<int>(in), std::istream_iterator<int>()};
  ASSERT_FALSE(expected.empty());
  EXPECT_EQ(greedy(LlamaModel::load(dir), static_cast<int>(expected.size())), expected);
}

TEST(LlamaGolden, ProxyHd64) { check_proxy("proxy-lm-hd64"); }
TEST(LlamaGolden, ProxyHd128) { check_proxy("proxy-lm-hd128"); }

using lexico_test::error_of;

// Writes a llama2.c model as a Hugging Face checkpoint: q/k rows permuted so that
// rotate-half RoPE sees the pairs interleaved RoPE saw (as HF's conversion script does).
void write_as_hf(const LlamaModel& model, const fs::path& dir) {
  const auto& c = model.config();
  const auto& w = model.weights();
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << "{\"model_type\": \"llama\", \"hidden_size\": " << c.dim
                                     << ", \"intermediate_size\": " << c.hidden_dim
                                     << ", \"num_hidden_layers\": " << c.layers << ", \"num_attention_heads\": " << c.heads
                                     << ", \"num_key_value_heads\": " << c.kv_heads << ", \"vocab_size\": " << c.vocab
                                     << ", \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0, \"rope_scaling\": null"
                                     << ", \"tie_word_embeddings\": true, \"hidden_act\": \"silu\"}";
  lexico::SafetensorsWriter out;
  auto add = [&](const std::string& name, const auto& m) {
    const RowMatrix copy = m;
    out.add(name, {copy.rows(), copy.cols()}, copy.data());
  };
  auto add_vector = [&](const std::string& name, const Eigen::VectorXf& v) {
    out.add(name, {v.size()}, v.data());
  };
  auto permute = [&](const RowMatrix& rows, int heads) {
    RowMatrix p(rows.rows(), rows.cols());
    const int d = c.head_dim, half = d / 2;
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < half; ++i)
        for (int j = 0; j < 2; ++j) p.row(h * d + j * half + i) = rows.row(h * d + 2 * i + j);
    return p;
  };
  add("model.embed_tokens.weight", w.embedding);
  add_vector("model.norm.weight", w.final_norm);
  for (int l = 0; l < c.layers; ++l) {
    const auto& layer = w.layers[static_cast<std::size_t>(l)];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "self_attn.q_proj.weight", permute(layer.wqkv.topRows(c.q_width()), c.heads));
    add(p + "self_attn.k_proj.weight", permute(layer.wqkv.middleRows(c.q_width(), c.kv_width()), c.kv_heads));
    add(p + "self_attn.v_proj.weight", layer.wqkv.bottomRows(c.kv_width()));
    add(p + "self_attn.o_proj.weight", layer.wo);
    add(p + "mlp.gate_proj.weight", layer.w_gate_up.topRows(c.hidden_dim));
    add(p + "mlp.up_proj.weight", layer.w_gate_up.bottomRows(c.hidden_dim));
    add(p + "mlp.down_proj.weight", layer.w_down);
    add_vector(p + "input_layernorm.weight", layer.attn_norm);
    add_vector(p + "post_attention_layernorm.weight", layer.mlp_norm);
  }
  out.write((dir / "model.safetensors").string());
}

class LlamaFormats : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("lexico_llama_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    write_as_hf(source_, dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  const LlamaModel source_ = LlamaModel::load(LEXICO_REPO_DATA "/stories260k/stories260K.bin");
  fs::path dir_;
};

TEST_F(LlamaFormats, Llama2cAndHfLayoutsAgree) {
  const LlamaModel hf = LlamaModel::load(dir_.string());
  EXPECT_EQ(hf.config().rope, lexico::RopeStyle::rotate_half);
  EXPECT_EQ(source_.config().rope, lexico::RopeStyle::interleaved);
  std::vector<int> tokens = read_raw<std::int32_t>(LEXICO_REPO_DATA "/stories260k/golden/tokens.i32");
  tokens.resize(96);
  LlamaRunner a(source_), b(hf);
  DenseCache<float> ca(source_.config().cache_shape()), cb(hf.config().cache_shape());
  const RowMatrix la = a.prefill(tokens, ca), lb = b.prefill(tokens, cb);
  EXPECT_LE((la - lb).cwiseAbs().maxCoeff(), 1e-4f);
}

TEST_F(LlamaFormats, BadCheckpointsNameFileAndTensor) {
  const std::string config = (dir_ / "config.json").string();
  const std::string weights = (dir_ / "model.safetensors").string();
  const std::string good_config = [&] {
    std::ifstream in(config);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }();
  auto with_config = [&](const std::string& from, const std::string& to) {
    std::string text = good_config;
    text.replace(text.find(from), from.size(), to);
    std::ofstream(config, std::ios::trunc) << text;
    return error_of([&] { LlamaModel::load(dir_.string()); });
  };
  EXPECT_NE(with_config("\"rope_scaling\": null", "\"rope_scaling\": {}").find(config + ": rope_scaling"),
            std::string::npos);
  EXPECT_NE(with_config("\"silu\"", "\"gelu\"").find("hidden_act 'gelu'"), std::string::npos);
  EXPECT_NE(with_config("\"num_hidden_layers\"", "\"layers\"").find("missing key \"num_hidden_layers\""),
            std::string::npos);
  EXPECT_NE(with_config("\"vocab_size\": 512", "\"vocab_size\": 500").find(
                weights + ": tensor 'model.embed_tokens.weight' has shape [512, 64], expected [500, 64]"),
            std::string::npos);
  EXPECT_NE(with_config("\"num_hidden_layers\": 5", "\"num_hidden_layers\": 6")
                .find(weights + ": no tensor 'model.layers.5.input_layernorm.weight'"),
            std::string::npos);
  EXPECT_NE(with_config("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false")
                .find("no tensor 'lm_head.weight'"),
            std::string::npos);
  EXPECT_NE(with_config("{", "[").find(config + ": JSON error"), std::string::npos);
  std::ofstream(config, std::ios::trunc) << good_config;

  // A weight that is NaN.
  const lexico::SafetensorsFile file(weights);
  const auto& t = file.tensor("model.layers.2.mlp.up_proj.weight");
  {
    std::fstream io(weights, std::ios::in | std::ios::out | std::ios::binary);
    std::uint64_t header;
    io.read(reinterpret_cast<char*>(&header), 8);
    io.seekp(static_cast<std::streamoff>(8 + header + t.begin + 40));
    const float nan = std::nanf("");
    io.write(reinterpret_cast<const char*>(&nan), 4);
  }
  EXPECT_NE(error_of([&] { LlamaModel::load(dir_.string()); }).find("layer 2 w_gate_up holds NaN or Inf"),
            std::string::npos);
}

TEST(LlamaErrors, TruncatedLlama2cFile) {
  const fs::path path = fs::temp_directory_path() / "lexico_truncated_stories.bin";
  {
    std::ifstream in(LEXICO_REPO_DATA "/stories260k/stories260K.bin", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(path, std::ios::binary) << bytes.substr(0, bytes.size() - 100);
  }
  const std::string message = error_of([&] { LlamaModel::load(path.string()); });
  EXPECT_NE(message.find(path.string() + ": 1056440 bytes, but the header"), std::string::npos) << message;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << "abc";
  EXPECT_NE(error_of([&] { LlamaModel::load(path.string()); }).find("shorter than the 28-byte"), std::string::npos);
  fs::remove(path);
  EXPECT_NE(error_of([] { LlamaModel::load("/nonexistent/model.bin"); }).find("cannot open"), std::string::npos);
}

TEST(LlamaErrors, RunnerRejectsBadTokensAndCaches) {
  const LlamaModel model = LlamaModel::load(LEXICO_REPO_DATA "/stories260k/stories260K.bin");
  LlamaRunner runner(model);
  DenseCache<float> cache(model.config().cache_shape());
  EXPECT_NE(error_of([&] { runner.prefill({1, 5, 512}, cache); }).find("token 512 at index 2 outside the vocabulary"),
            std::string::npos);
  EXPECT_NE(error_of([&] { runner.decode(-1, cache); }).find("token -1"), std::string::npos);
  EXPECT_NE(error_of([&] { runner.prefill({}, cache); }).find("no tokens"), std::string::npos);
  DenseCache<float> wrong({model.config().layers, model.config().kv_heads, 16});
  EXPECT_NE(error_of([&] { runner.decode(1, wrong); }).find("does not match the model"), std::string::npos);
  // A cache whose layers disagree (fed outside the runner) is refused too.
  DenseCache<float> uneven(model.config().cache_shape());
  std::vector<float> kv(static_cast<std::size_t>(model.config().kv_width()), 0.0f);
  uneven.append(3, kv.data(), kv.data());
  EXPECT_NE(error_of([&] { runner.decode(1, uneven); }).find("cache layer 3 is at position 1, layer 0 at 0"),
            std::string::npos);
}

// decode_batch: B sequences at different positions, each in its own cache (two cache
// types mixed), give the logits of decoding each sequence alone, and leave each cache
// where a lone decode would.
TEST(LlamaBatch, DecodeBatchMatchesOneSequenceAtATime) {
  const LlamaModel model = LlamaModel::load(LEXICO_REPO_DATA "/tinystories-656k");
  const lexico::CacheShape shape = model.config().cache_shape();
  const std::vector<std::vector<int>> prompts = {{1, 20, 300, 40, 500}, {1, 7, 8, 9, 10, 11, 12, 13, 14}, {1, 99}};
  const std::vector<std::vector<int>> steps = {{5, 6, 7}, {100, 200, 300}, {42, 43, 44}};
  std::vector<std::unique_ptr<lexico::KVCache>> alone, batched;
  for (std::size_t b = 0; b < prompts.size(); ++b)
    for (auto* caches : {&alone, &batched})
      caches->push_back(b == 1 ? lexico::make_cache("kivi", shape, {{"bits", "4"}, {"group", "16"}})
                               : std::unique_ptr<lexico::KVCache>(std::make_unique<DenseCache<float>>(shape)));
  LlamaRunner runner(model), batch_runner(model);
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    runner.prefill(prompts[b], *alone[b]);
    batch_runner.prefill(prompts[b], *batched[b]);
  }
  std::vector<lexico::KVCache*> pointers;
  for (auto& cache : batched) pointers.push_back(cache.get());
  for (std::size_t step = 0; step < steps.front().size(); ++step) {
    std::vector<int> tokens;
    for (const auto& s : steps) tokens.push_back(s[step]);
    const RowMatrix logits = batch_runner.decode_batch(tokens, pointers);
    ASSERT_EQ(logits.rows(), 3);
    for (std::size_t b = 0; b < prompts.size(); ++b) {
      const Eigen::VectorXf expected = runner.decode(tokens[b], *alone[b]);
      // The batch multiplies the weights as a matrix, one sequence as a vector: rounding.
      EXPECT_LT((logits.row(static_cast<Eigen::Index>(b)).transpose() - expected).cwiseAbs().maxCoeff(), 2e-4f)
          << "sequence " << b << " step " << step;
      EXPECT_EQ(batched[b]->next_position(0), alone[b]->next_position(0));
    }
  }
  EXPECT_EQ(batched[1]->next_position(model.config().layers - 1), 9 + 3);
  EXPECT_NE(error_of([&] { batch_runner.decode_batch({1, 2}, {pointers[0], pointers[0]}); })
                .find("caches 0 and 1 are the same cache"), std::string::npos);
  EXPECT_NE(error_of([&] { batch_runner.decode_batch({1, 2}, pointers); }).find("2 tokens for 3 caches"),
            std::string::npos);
  EXPECT_NE(error_of([&] { batch_runner.decode_batch({1, 100000, 3}, pointers); })
                .find("token 100000 at index 1 outside the vocabulary"), std::string::npos);
  DenseCache<float> wrong({shape.layers, shape.kv_heads, 4});
  EXPECT_NE(error_of([&] { batch_runner.decode_batch({1, 2}, {pointers[0], &wrong}); }).find("does not match the model"),
            std::string::npos);
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void expect_same_model(const LlamaModel& a, const LlamaModel& b) {
  const auto &ca = a.config(), &cb = b.config();
  EXPECT_EQ(ca.dim, cb.dim);
  EXPECT_EQ(ca.hidden_dim, cb.hidden_dim);
  EXPECT_EQ(ca.layers, cb.layers);
  EXPECT_EQ(ca.heads, cb.heads);
  EXPECT_EQ(ca.kv_heads, cb.kv_heads);
  EXPECT_EQ(ca.head_dim, cb.head_dim);
  EXPECT_EQ(ca.vocab, cb.vocab);
  EXPECT_EQ(ca.max_context, cb.max_context);
  EXPECT_EQ(ca.norm_eps, cb.norm_eps);
  EXPECT_EQ(ca.rope_theta, cb.rope_theta);
  EXPECT_EQ(ca.rope, cb.rope);
  const auto &wa = a.weights(), &wb = b.weights();
  EXPECT_EQ(wa.embedding, wb.embedding);
  EXPECT_EQ(wa.lm_head, wb.lm_head);
  EXPECT_EQ(wa.final_norm, wb.final_norm);
  ASSERT_EQ(wa.layers.size(), wb.layers.size());
  for (std::size_t l = 0; l < wa.layers.size(); ++l) {
    EXPECT_EQ(wa.layers[l].attn_norm, wb.layers[l].attn_norm) << "layer " << l;
    EXPECT_EQ(wa.layers[l].mlp_norm, wb.layers[l].mlp_norm) << "layer " << l;
    EXPECT_EQ(wa.layers[l].wqkv, wb.layers[l].wqkv) << "layer " << l;
    EXPECT_EQ(wa.layers[l].wo, wb.layers[l].wo) << "layer " << l;
    EXPECT_EQ(wa.layers[l].w_gate_up, wb.layers[l].w_gate_up) << "layer " << l;
    EXPECT_EQ(wa.layers[l].w_down, wb.layers[l].w_down) << "layer " << l;
  }
}

TEST(LlamaLoaders, InMemoryAndFileLoadersAgree) {
  const std::string bin = LEXICO_REPO_DATA "/stories260k/stories260K.bin";
  const std::string bytes = file_bytes(bin);
  expect_same_model(LlamaModel::load_llama2c(lexico::MemoryBytes(bytes, "mem.bin")), LlamaModel::load(bin));

  const std::string dir = LEXICO_REPO_DATA "/tinystories-656k";
  lexico::MemoryFolder folder("mem");
  for (const char* file : {"config.json", "model.safetensors"}) folder.add(file, file_bytes(dir + "/" + file));
  expect_same_model(LlamaModel::load_hf(folder), LlamaModel::load(dir));
}

// A llama2.c header, then `floats` zero floats.
std::string llama2c_bytes(std::vector<std::int32_t> header, std::size_t floats = 0) {
  std::string bytes(4 * header.size() + 4 * floats, '\0');
  std::memcpy(bytes.data(), header.data(), 4 * header.size());
  return bytes;
}

std::string llama2c_error(const std::string& bytes) {
  return error_of([&] { LlamaModel::load_llama2c(lexico::MemoryBytes(bytes, "mem.bin")); });
}

// Header fields are bounded before any size is computed from them (these headers
// overflowed int and int64 before), and the size they imply must be the file's before
// anything is allocated.
TEST(LlamaErrors, Llama2cHeaderSizesAreCheckedBeforeUse) {
  EXPECT_EQ(llama2c_error(llama2c_bytes({4, 6, 1, 2, 1 << 20, 8, 4})),
            "mem.bin: header field n_kv_heads = 1048576 is outside [1, 4096]");
  EXPECT_EQ(llama2c_error(llama2c_bytes({4, 6, 1, 2, 1, std::numeric_limits<std::int32_t>::min(), 4})),
            "mem.bin: header field vocab_size = 2147483648 is outside [1, 4194304]");
  EXPECT_EQ(llama2c_error(llama2c_bytes({4, -6, 1, 2, 1, 8, 4})), "mem.bin: header field hidden_dim = -6 is outside [1, 1048576]");
  EXPECT_EQ(llama2c_error(llama2c_bytes({4, 6, 1, 2, 3, 8, 4})), "mem.bin: heads 2 not a multiple of kv_heads 3");
  EXPECT_EQ(llama2c_error(llama2c_bytes({6, 6, 1, 2, 1, 8, 4})), "mem.bin: RoPE needs an even head_dim, got 3");
  // Every field at its bound: a size of about 2^53 bytes, computed without wrapping and
  // refused before a byte is allocated.
  const std::string m = llama2c_error(llama2c_bytes({1 << 17, 1 << 20, 1 << 12, 1 << 12, 1 << 12, -(1 << 22), 1 << 30}));
  EXPECT_NE(m.find("mem.bin: 28 bytes, but the header (dim 131072, hidden 1048576, layers 4096, heads 4096/4096, "
                   "vocab -4194304, seq_len 1073741824) needs 7885839128854556"),
            std::string::npos)
      << m;
  // One float short of the header's size.
  const std::size_t tiny_floats = 8 * 4 + (2 * 4 + 2 * 16 + 2 * 2 * 4 + 3 * 6 * 4) + 4 + 4 * 2;
  EXPECT_NO_THROW(LlamaModel::load_llama2c(lexico::MemoryBytes(llama2c_bytes({4, 6, 1, 2, 1, 8, 4}, tiny_floats))));
  EXPECT_EQ(llama2c_error(llama2c_bytes({4, 6, 1, 2, 1, 8, 4}, tiny_floats - 1)).rfind("mem.bin: 712 bytes, but the header", 0),
            0u);
}

TEST(LlamaErrors, ConfigWidthsNeverWrap) {
  lexico::LlamaConfig c;
  c.dim = c.hidden_dim = c.layers = c.vocab = 8;
  c.heads = c.kv_heads = c.head_dim = 1 << 20;
  EXPECT_NE(error_of([&] { (void)c.q_width(); }).find("q_width"), std::string::npos);
  EXPECT_NE(error_of([&] { (void)c.kv_width(); }).find("kv_width"), std::string::npos);
  EXPECT_NE(error_of([&] { c.check("cfg"); }).find("cfg: heads = 1048576 is outside [1, 4096]"), std::string::npos);
}

// A Hugging Face checkpoint in memory: a config.json with `config` spliced into a tiny
// valid one (dim 4, FFN 6, 1 layer, 2 heads over 1 kv head, vocab 8), whose tensors
// model.safetensors holds.
class LlamaHfInMemory : public ::testing::Test {
 protected:
  static std::string config(const std::string& extra) {
    return R"({"model_type": "llama", "hidden_act": "silu", "hidden_size": 4, "intermediate_size": 6,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 8,
               "tie_word_embeddings": true)" +
           extra + "}";
  }
  static std::string weights(float scale = 0.25f) {
    lexico::SafetensorsWriter out;
    auto add = [&](const std::string& name, std::vector<std::int64_t> shape) {
      std::int64_t n = 1;
      for (const auto d : shape) n *= d;
      std::vector<float> values(static_cast<std::size_t>(n));
      for (std::size_t i = 0; i < values.size(); ++i) values[i] = scale * std::sin(static_cast<float>(i + 1));
      out.add(name, shape, values.data());
    };
    add("model.embed_tokens.weight", {8, 4});
    add("model.norm.weight", {4});
    add("model.layers.0.input_layernorm.weight", {4});
    add("model.layers.0.post_attention_layernorm.weight", {4});
    add("model.layers.0.self_attn.q_proj.weight", {4, 4});
    add("model.layers.0.self_attn.k_proj.weight", {2, 4});
    add("model.layers.0.self_attn.v_proj.weight", {2, 4});
    add("model.layers.0.self_attn.o_proj.weight", {4, 4});
    add("model.layers.0.mlp.gate_proj.weight", {6, 4});
    add("model.layers.0.mlp.up_proj.weight", {6, 4});
    add("model.layers.0.mlp.down_proj.weight", {4, 6});
    return out.bytes();
  }
  static std::string load_error(const std::string& config_text, const std::string& weight_bytes = weights()) {
    lexico::MemoryFolder folder("mem");
    folder.add("config.json", config_text).add("model.safetensors", weight_bytes);
    return error_of([&] { LlamaModel::load_hf(folder); });
  }
};

TEST_F(LlamaHfInMemory, LoadsAndRuns) {
  lexico::MemoryFolder folder("mem");
  folder.add("config.json", config("")).add("model.safetensors", weights());
  const LlamaModel model = LlamaModel::load_hf(folder);
  LlamaRunner runner(model);
  DenseCache<float> cache(model.config().cache_shape());
  EXPECT_TRUE(runner.prefill({1, 2, 3}, cache).allFinite());
}

// Config sizes are bounded where they are read (naming the file and the key), and a
// config within bounds that the tensors do not back fails on the tensor's header shape
// before its matrix is allocated (4M x 128K floats here: 2 TiB).
TEST_F(LlamaHfInMemory, ConfigSizesAreCheckedBeforeAllocation) {
  EXPECT_EQ(load_error(config(R"(, "head_dim": 1073741824)")), "mem/config.json: head_dim = 1073741824 is outside [1, 4096]");
  EXPECT_EQ(load_error(R"({"hidden_size": 1073741824})"), "mem/config.json: hidden_size = 1073741824 is outside [1, 131072]");
  std::string uneven = config("");
  uneven.replace(uneven.find("\"num_key_value_heads\": 1"), 24, "\"num_key_value_heads\": 3");
  EXPECT_EQ(load_error(uneven), "mem/config.json: heads 2 not a multiple of kv_heads 3");
  EXPECT_EQ(load_error(config(R"(, "rms_norm_eps": 1e300)")).find("mem/config.json: norm_eps must be positive"), 0u);
  std::string huge = config(R"(, "head_dim": 2)");
  huge.replace(huge.find("\"hidden_size\": 4"), 16, "\"hidden_size\": 131072");
  huge.replace(huge.find("\"vocab_size\": 8"), 15, "\"vocab_size\": 4194304");
  EXPECT_EQ(load_error(huge),
            "mem/model.safetensors: tensor 'model.embed_tokens.weight' has shape [8, 4], expected [4194304, 131072]");
  std::string wide = config("");
  wide.replace(wide.find("\"intermediate_size\": 6"), 22, "\"intermediate_size\": 1048576");
  EXPECT_EQ(load_error(wide),
            "mem/model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape [6, 4], expected [1048576, 4]");
  const std::string padded = config("") + std::string(1 << 20, ' ');
  EXPECT_EQ(load_error(padded), "mem/config.json: " + std::to_string(padded.size()) +
                                    " bytes, above the limit of 1048576 for this kind of file");
}

// Finite weights that overflow fp32 in the forward pass raise, naming the layer and the
// position, instead of returning NaN logits.
TEST(LlamaErrors, NonFiniteActivationsRaise) {
  const LlamaModel good = LlamaModel::load(LEXICO_REPO_DATA "/stories260k/stories260K.bin");
  LlamaWeights weights = good.weights();
  weights.layers[2].mlp_norm.setConstant(3e38f);  // finite, so validate() accepts it
  const LlamaModel bad(good.config(), std::move(weights));
  LlamaRunner runner(bad);
  DenseCache<float> cache(bad.config().cache_shape());
  EXPECT_EQ(error_of([&] { runner.prefill({1, 2, 3}, cache); }),
            "LlamaRunner: non-finite activations after layer 2 at position 0 (token 0 of this call): the weights "
            "overflow fp32 on this input");
  // Through decode, after three good positions.
  DenseCache<float> used(good.config().cache_shape());
  LlamaRunner(good).prefill({1, 2, 3}, used);
  EXPECT_NE(error_of([&] { runner.decode(4, used); }).find("after layer 2 at position 3 (token 0 of this call)"),
            std::string::npos);
  // The final norm overflows the logits alone.
  LlamaWeights last = good.weights();
  last.final_norm.setConstant(3e38f);
  const LlamaModel bad_logits(good.config(), std::move(last));
  LlamaRunner logits_runner(bad_logits);
  DenseCache<float> fresh(good.config().cache_shape());
  EXPECT_NE(error_of([&] { logits_runner.prefill({1, 2}, fresh); }).find("LlamaRunner: non-finite logits at position 0"),
            std::string::npos);
}

// RMSNorm of a finite row whose squares overflow fp32 still normalises it.
TEST(LlamaRunnerMath, RmsNormOfHugeFiniteRows) {
  RowMatrix x(2, 3), out(2, 3);
  x << 1, -2, 3, 1e30f, -2e30f, 3e30f;
  const Eigen::VectorXf weight = Eigen::VectorXf::Ones(3);
  lexico::detail::rms_norm(x, weight, 1e-6f, out);
  EXPECT_LT((out.row(0) - out.row(1)).cwiseAbs().maxCoeff(), 1e-5f) << out;
}

// Speed of the runner with the dense cache (not part of the suite: run with
//   test_llama --gtest_also_run_disabled_tests --gtest_filter='LlamaSpeed.*'):
// prefill of 1024 dev tokens, then 64 decode steps at context 1024..1087.
void measure_speed(const std::string& name) {
  const std::string dir = std::string(LEXICO_SHARED_DATA) + "/" + name;
  if (!fs::exists(dir)) GTEST_SKIP() << "shared data not found at " << dir;
  const LlamaModel model = LlamaModel::load(dir);
  const std::vector<int> tokens = lexico::SafetensorsFile(dir + "/golden/dev_window.safetensors").read_i32("tokens");
  LlamaRunner runner(model);
  DenseCache<float> cache(model.config().cache_shape());
  using clock = std::chrono::steady_clock;
  auto start = clock::now();
  runner.prefill(tokens, cache);
  const double prefill = std::chrono::duration<double>(clock::now() - start).count();
  const int steps = 64;
  start = clock::now();
  for (int i = 0; i < steps; ++i) runner.decode(tokens[static_cast<std::size_t>(i)], cache);
  const double decode = std::chrono::duration<double>(clock::now() - start).count();
  std::printf("  %s: prefill %zu tokens %.3f s = %.0f tokens/s; decode at context %zu..%zu: %.2f ms/token = %.1f tokens/s\n",
              name.c_str(), tokens.size(), prefill, tokens.size() / prefill, tokens.size(), tokens.size() + steps - 1,
              1e3 * decode / steps, steps / decode);
}

TEST(LlamaSpeed, DISABLED_ProxyHd64) { measure_speed("proxy-lm-hd64"); }
TEST(LlamaSpeed, DISABLED_ProxyHd128) { measure_speed("proxy-lm-hd128"); }

}  // namespace
