// Cache option strings, as lexico-eval's --cache NAME:KEY=VALUE,... passes them to the
// factory: every registered cache, made and driven through a prefill and decode steps.
// A Lexico cache's dict= is replaced by a small set of random dictionaries (the fuzzer
// must not name files).
#include <random>
#include <string>

#include <lexico/cache/factory.hpp>
#include <lexico/coding/dictionary_set.hpp>

#include "fuzz_target.hpp"

namespace {

constexpr int layers = 1, kv_heads = 2, q_heads = 4, head_dim = 32;

const std::string& dictionary_dir() {
  static const std::string dir = [] {
    const std::string path = (std::filesystem::temp_directory_path() / "lexico_fuzz_cache_options").string();
    if (std::filesystem::exists(path + "/manifest.json")) return path;
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    std::vector<lexico::LayerDictionaries> set;
    for (int l = 0; l < layers; ++l) {
      Eigen::MatrixXf keys(head_dim, 64), values(head_dim, 64);
      for (Eigen::Index i = 0; i < keys.size(); ++i) keys.data()[i] = normal(rng), values.data()[i] = normal(rng);
      set.push_back({std::make_shared<const lexico::Dictionary>(keys), std::make_shared<const lexico::Dictionary>(values)});
    }
    lexico::DictionarySetManifest manifest;
    manifest.model = "fuzz";
    manifest.method = "none";
    manifest.layers = layers;
    manifest.head_dim = head_dim;
    manifest.atoms = 64;
    manifest.sparsity = 8;
    manifest.settings = {{"keys", "before_rope"}, {"rope_theta", "10000"}, {"rope_style", "rotate_half"}};
    lexico::save_dictionaries(path, set, manifest);
    return path;
  }();
  return dir;
}

}  // namespace

LEXICO_FUZZ_TARGET(cache_options) {
  const std::string spec(bytes);
  const std::size_t colon = spec.find(':');
  const std::string name = spec.substr(0, colon);
  lexico::CacheOptions options =
      colon == std::string::npos ? lexico::CacheOptions() : lexico::CacheOptions::parse(spec.substr(colon + 1));
  if (name == "lexico") {
    options.set("dict", dictionary_dir());
    // Held across inputs: the factory shares a CodeSpace only while one is alive.
    static const auto space = lexico::shared_code_space(dictionary_dir(), lexico::CodeSpaceOptions());
  }
  // One thread: the fuzzer may ask for thousands, which is legal but not what is tested here.
  if (options.has("threads")) options.set("threads", "1");
  auto cache = lexico::make_cache(name, {layers, kv_heads, head_dim}, options);
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  const Eigen::Index prompt = 12, steps = 4;
  lexico::RowMatrix keys(prompt + steps, kv_heads * head_dim), values(keys.rows(), keys.cols()),
      queries(keys.rows(), q_heads * head_dim);
  for (auto* m : {&keys, &values, &queries})
    for (Eigen::Index i = 0; i < m->size(); ++i) m->data()[i] = normal(rng);
  for (int l = 0; l < layers; ++l) {
    lexico::RowMatrix out(prompt, queries.cols()), step(q_heads, head_dim);
    cache->prefill(l, keys.topRows(prompt), values.topRows(prompt), queries.topRows(prompt), out);
    lexico::fuzz::require_sane(out.allFinite(), name + ": prefill output not finite");
    for (Eigen::Index t = prompt; t < prompt + steps; ++t) {
      const Eigen::Map<const lexico::RowMatrix> q(queries.row(t).data(), q_heads, head_dim);
      cache->decode(l, keys.row(t).data(), values.row(t).data(), q, step);
      lexico::fuzz::require_sane(step.allFinite(), name + ": decode output not finite");
    }
  }
}
